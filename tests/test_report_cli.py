"""report / status / gates on a store built by a real scan of tiny real checkpoints."""
from __future__ import annotations

import json
import re

import pytest

from memtrack.cli.main import main


@pytest.fixture()
def scanned(tiny_run, pixel_index):
    assert main(["scan", str(tiny_run), "--index", str(pixel_index), "--num-samples", "6", "--steps", "2"]) == 0
    return tiny_run


def _refuse(word):
    raise ValueError(f"{word} is not JSON (jq and JavaScript reject it)")


def test_json_output_has_no_nan_or_infinity():
    import numpy as np

    from memtrack.utils import to_json

    text = to_json({"mean": float("nan"), "hi": np.float32("inf"), "v": np.arange(2), 3: [np.nan, 1.5]})
    assert json.loads(text, parse_constant=_refuse) == {"mean": None, "hi": None, "v": [0, 1], "3": [None, 1.5]}


def test_report_writes_html_and_summary(scanned, tmp_path, capsys):
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(scanned), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nn_ratio" in printed and f"wrote {out}" in printed
    html = out.read_text()
    assert not re.findall(r'(?:src|href)\s*=\s*["\']\s*(?:https?:)?//', html)
    summary = json.loads((out.parent / "summary.json").read_text(), parse_constant=_refuse)  # strict JSON
    assert [c["step"] for c in summary["checkpoints"]] == [10, 20, 30]
    assert summary["index"]["n_train"] == 6 and summary["dataset"]["n_train"] == 6
    assert summary["thresholds"]["nn_ratio"]["source"] == "published"           # Gu et al.'s 1/3
    assert summary["thresholds"]["tiled_l2"]["source"] == "memtrack"            # the paper publishes none
    assert set(summary["onset"]) >= {"nn_ratio", "tiled_l2", "adaptive_l2"}
    assert summary["onset"]["nn_ratio"] == {"step": None, "between": None, "confirmed": False, "provisional": None}
    assert summary["recommended_checkpoint"]["step"] == 30
    for ck in summary["checkpoints"]:
        m = ck["metrics"]["nn_ratio"]
        assert m["n"] == 6 and 0 <= m["ci_low"] <= m["rate"] <= m["ci_high"] <= 1
    assert "Memorization report" in html and "near-copies" in html


def test_report_default_location_and_changes_since_last_time(scanned, capsys):
    assert main(["report", str(scanned), "--quiet"]) == 0
    first = json.loads((scanned / "memtrack" / "summary.json").read_text())
    assert (scanned / "memtrack" / "report.html").is_file() and "changes" not in first
    assert main(["report", str(scanned), "--quiet"]) == 0
    second = json.loads((scanned / "memtrack" / "summary.json").read_text())
    assert second["changes"]["new_checkpoints"] == [] and second["changes"]["since"] == first["generated_at"]


@pytest.mark.parametrize("fmt,name", [("md", "report.md"), ("json", "summary.json")])
def test_other_formats(scanned, tmp_path, fmt, name):
    out = tmp_path / name
    assert main(["report", str(scanned), "--out", str(out), "--format", fmt, "--quiet"]) == 0
    if fmt == "md":
        text = out.read_text()
        assert "nn\\_ratio" in text and (tmp_path / "memtrack-rates.png").is_file()  # markdown-escaped
    else:
        assert json.loads(out.read_text())["checkpoints"][0]["step"] == 10


def test_gates_exit_codes(copycat_scanned, capsys):
    # a run whose latest checkpoint has 8/16 near-copies and whose copies began at step 300
    run = str(copycat_scanned)
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.rate > 0.5",
                 "--fail-on", "nn_ratio_dedup.onset == null"]) == 0
    assert "gate tripped" not in capsys.readouterr().err
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.rate >= 0.5", "--fail-on", "nn_ratio.rate > 0.5",
                 "--fail-on", "nn_ratio_dedup.onset != null"]) == 1
    err = capsys.readouterr().err
    assert "gate tripped: nn_ratio.rate >= 0.5 (observed 0.5)" in err
    assert "gate tripped: nn_ratio_dedup.onset != null (observed 300)" in err
    assert "nn_ratio.rate > 0.5" not in err  # the gate that holds is not reported
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.rate >>> 1"]) == 2
    assert main(["report", run, "--quiet", "--fail-on", "no_such_metric.rate > 0"]) == 2
    assert "unknown metric" in capsys.readouterr().err


def test_two_runs_overlaid(scanned, tmp_path, pixel_index):
    from conftest import write_checkpoint

    other = tmp_path / "other"
    for i, step in enumerate((10, 20)):
        write_checkpoint(other, step, seed=50 + i)
    assert main(["scan", str(other), "--index", str(pixel_index), "--num-samples", "6", "--steps", "2"]) == 0
    out = tmp_path / "cmp.html"
    assert main(["report", str(scanned), str(other), "--out", str(out), "--quiet"]) == 0
    html = out.read_text()
    assert str(other) in html and str(scanned) in html and "Runs compared" in html


def test_status_table_and_json(scanned, capsys):
    assert main(["status", str(scanned)]) == 0
    table = capsys.readouterr().out
    assert "nn_ratio" in table and "30" in table
    assert main(["status", str(scanned), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][-1]["step"] == 30


def test_report_on_a_run_never_scanned(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "no memtrack results" in capsys.readouterr().err
    assert not (tmp_path / "run" / "memtrack").exists()
