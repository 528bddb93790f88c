"""report / status show one evaluation series, say which, list the others; every error exits 2.

End to end through the CLI on tiny real checkpoints (as tests/test_report_cli.py), with stores that hold
several series: another sample count, live ``step-N`` states beside saved ``checkpoint-N`` folders.
"""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import tiny_unet
from memtrack.cli.main import main
from memtrack.config import Config
from memtrack.store.run_store import RunStore
from memtrack.scan.tracker import Tracker


def _scan(run, index, n):
    assert main(["scan", str(run), "--index", str(index), "--num-samples", str(n), "--steps", "2"]) == 0


def _summary(run, tmp_path, *extra) -> dict:
    out = tmp_path / "summary.json"  # the json format writes summary.json beside --out
    assert main(["report", str(run), "--format", "json", "--out", str(out), "--quiet", *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture()
def two_series(tiny_run, pixel_index):
    """6 samples on checkpoints 10, 20, 30; then two of them deleted and 4 samples on the last one:
    the newest evaluation per checkpoint would mix 6, 6 and 4 samples."""
    _scan(tiny_run, pixel_index, 6)
    shutil.rmtree(tiny_run / "checkpoint-10")
    shutil.rmtree(tiny_run / "checkpoint-20")
    _scan(tiny_run, pixel_index, 4)
    return tiny_run


def test_a_report_shows_one_series_and_names_the_other(two_series, tmp_path, capsys):
    s = _summary(two_series, tmp_path)
    assert [(c["step"], c["n_samples"]) for c in s["checkpoints"]] == [(30, 4)]  # never 6, 6 and 4
    assert s["sampling"]["num_samples"] == 4 and s["sampling"]["num_inference_steps"] == 2
    block = s["series"]
    assert block["selected_by"] == "latest" and block["n_checkpoints"] == 1 and block["n_samples"] == [4]
    (other,) = block["others"]
    assert other["n_checkpoints"] == 3 and other["n_samples"] == [6] and other["source"] == "saved"
    assert block["index_content_hash"] == s["index"]["content_hash"]
    capsys.readouterr()
    assert main(["report", str(two_series), "--out", str(tmp_path / "r.html")]) == 0
    printed = capsys.readouterr().out
    assert f"evaluation series {block['key']}" in printed and "1 other series" in printed and other["key"] in printed
    html = (tmp_path / "r.html").read_text()
    assert block["key"] in html and other["key"] in html
    assert main(["report", str(two_series), "--format", "md", "--out", str(tmp_path / "r.md"), "--quiet"]) == 0
    assert other["key"] in (tmp_path / "r.md").read_text()


def test_key_and_config_choose_the_series(two_series, tmp_path, capsys):
    latest = _summary(two_series, tmp_path)["series"]
    old_key = latest["others"][0]["key"]
    s = _summary(two_series, tmp_path, "--key", old_key[:6])  # a prefix is enough
    assert s["series"]["key"] == old_key and s["series"]["selected_by"] == "key"
    assert [(c["step"], c["n_samples"]) for c in s["checkpoints"]] == [(10, 6), (20, 6), (30, 6)]
    assert s["sampling"]["num_samples"] == 6 and [o["key"] for o in s["series"]["others"]] == [latest["key"]]
    cfg = tmp_path / "six.yaml"
    cfg.write_text("sampling:\n  num_samples: 6\n  num_inference_steps: 2\n")
    s = _summary(two_series, tmp_path, "--config", str(cfg))
    assert s["series"]["key"] == old_key and s["series"]["selected_by"] == "config"
    assert main(["status", str(two_series), "--key", old_key, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["series"]["key"] == old_key
    assert main(["status", str(two_series)]) == 0
    assert "1 other series" in capsys.readouterr().out


@pytest.mark.parametrize("argv,expected", [
    (["--key", "nosuchkey"], "no evaluation series 'nosuchkey'"),
    (["--key", ""], "names 2 evaluation series"),
    (["--config", "{cfg}"], "which"),
    (["--key", "a", "--config", "{cfg}"], None),  # argparse: not allowed together
])
def test_a_series_that_is_not_there_is_exit_2(two_series, tmp_path, capsys, argv, expected):
    cfg = tmp_path / "nine.yaml"
    cfg.write_text("sampling:\n  num_samples: 9\n")
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    for command in (["report", str(two_series), "--quiet"], ["status", str(two_series)]):
        capsys.readouterr()
        try:
            code = main([*command, *argv])
        except SystemExit as exc:  # argparse's own exit for conflicting flags
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        if expected:
            assert err.startswith("memtrack: error: ") and expected in err


def test_live_steps_and_checkpoints_at_the_same_step_are_both_reportable(tiny_run, pixel_index, tmp_path, capsys):
    _scan(tiny_run, pixel_index, 4)
    cfg = Config()
    cfg.sampling.num_samples, cfg.sampling.num_inference_steps = 4, 2
    tracker = Tracker.from_config(cfg, index=pixel_index, run_dir=tiny_run)
    for step, seed in ((10, 7), (20, 8)):  # the live model at the steps checkpoint-10/20 were saved
        assert not tracker.step(step, unet=tiny_unet(seed=seed), force=True).cached
    tracker.close()
    capsys.readouterr()
    assert main(["report", str(tiny_run), "--quiet"]) == 0  # once a traceback and exit 1
    live = _summary(tiny_run, tmp_path)
    assert [c["checkpoint"] for c in live["checkpoints"]] == ["step-10", "step-20"]
    assert live["series"]["source"] == "live"
    (saved,) = live["series"]["others"]
    assert saved["source"] == "saved" and saved["n_checkpoints"] == 3
    s = _summary(tiny_run, tmp_path, "--key", saved["key"])
    assert [c["checkpoint"] for c in s["checkpoints"]] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert main(["status", str(tiny_run)]) == 0


# ----------------------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("command", ["report", "status", "scan"])
def test_an_unforeseen_error_inside_a_command_is_exit_2_not_the_gates_1(command, debug, tiny_run, pixel_index,
                                                                       monkeypatch, capsys):
    _scan(tiny_run, pixel_index, 4)
    import memtrack.report.write as report
    import memtrack.analysis.summary as summary_mod

    def boom(*a, **k):
        raise ValueError("steps must be distinct, got [10, 10]")

    monkeypatch.setattr(summary_mod, "seed_dynamics", boom)
    monkeypatch.setattr(report, "build_summary", lambda *a, **k: boom())
    monkeypatch.setattr(Tracker, "evaluate", boom)
    if debug:
        monkeypatch.setenv("MEMTRACK_DEBUG", "1")
    argv = {"report": ["report", str(tiny_run), "--quiet"], "status": ["status", str(tiny_run)],
            "scan": ["scan", str(tiny_run), "--index", str(pixel_index), "--num-samples", "4", "--steps", "2"]}
    capsys.readouterr()
    assert main(argv[command]) == 2
    err = capsys.readouterr().err
    assert f"memtrack: error: unexpected ValueError in `memtrack {command}`: steps must be distinct" in err
    assert ("Traceback" in err) == debug  # the traceback only when asked for, and the exit code is still 2


def test_a_memtrack_error_with_debug_is_still_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMTRACK_DEBUG", "1")
    (tmp_path / "run").mkdir()
    assert main(["status", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "memtrack: error: no memtrack results" in err


def test_the_stored_series_identity_is_what_the_key_hashes(tiny_run, pixel_index):
    from memtrack.scan.eval_identity import series_key

    _scan(tiny_run, pixel_index, 4)
    with RunStore.open(tiny_run, create=False) as store:
        (series,) = store.list_series()
        assert series_key(series.identity) == series.key
        ident = series.identity
        assert ident["scheduler"]["class"] == "DDIMScheduler" and ident["source"] == "saved"
        assert ident["index"]["content_hash"].startswith("sha256:") and ident["plan"]["n_samples"] == 4
        assert all(e.series == series.key for e in store.evaluations(latest_per_checkpoint=False))


def test_a_store_that_fails_while_read_is_exit_2_with_the_store_named(tiny_run, pixel_index, capsys):
    import sqlite3

    _scan(tiny_run, pixel_index, 4)
    with sqlite3.connect(tiny_run / "memtrack" / "store.sqlite") as c:
        c.execute("DROP TABLE samples")  # damage that only a read finds
    capsys.readouterr()
    assert main(["report", str(tiny_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memtrack: error: cannot read the run store") and "no such table: samples" in err
