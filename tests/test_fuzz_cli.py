"""Hostile input through the command line: a fuzzed config file, metadata file or gate.

The library-level fuzz tests (test_config.py, test_data.py, test_gate.py) run hundreds of cases against
the parsers. Here each input the library rejects is handed to ``memtrack`` itself, next to a run that is
already scanned and reported and an index that is already built, and the CLI must:

* exit with code 2;
* print one error line (``memtrack: error: ...``) that names the file or the gate, then only indented
  hint lines, never a traceback;
* leave every file already there byte-identical: the store (sqlite file and thumbnails), the reports,
  the index folder, the training folder.

Hypothesis examples are few (tens), so the whole file takes seconds.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_checkpoint, write_training_set
from memtrack.cli.main import main
from memtrack.config import DataConfig, load_config
from memtrack.data.dataset import read_dataset
from memtrack.errors import ConfigError, DataError, GateError
from memtrack.report.write import parse_gate, run_summary
from test_config import _sections
from test_data import _LINE
from test_gate import FIELDS

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def snapshot(*folders: Path) -> dict:
    """relative path -> sha256 of every file under ``folders`` (what must not change)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, code: int, *names: str) -> str:
    """Assert a clean refusal: exit 2, one error line naming one of ``names``, then only hint lines."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert lines and lines[0].startswith("memtrack: error: "), err
    assert "Traceback" not in err
    assert all(ln.startswith("  ") for ln in lines[1:]), f"more than one error line: {err!r}"
    assert any(n in lines[0] for n in names), f"{lines[0]!r} names none of {names}"
    return lines[0]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, pixel_index):
    """A run with one checkpoint scanned (2 samples, 1 step) and reported."""
    run = tmp_path_factory.mktemp("fuzzrun") / "run"
    write_checkpoint(run, 10, seed=0)
    assert main(["scan", str(run), "--index", str(pixel_index), "--num-samples", "2", "--steps", "1"]) == 0
    assert main(["report", str(run), "--quiet"]) == 0
    return run


# --------------------------------------------------------------------------------------------- configs


def _scan_with(config: Path, run: Path, index: Path) -> int:
    return main(["scan", str(run), "--index", str(index), "--config", str(config)])


def _check_config_refused(path: Path, run: Path, index: Path, capsys) -> None:
    try:
        load_config(path)
    except ConfigError:
        before = snapshot(run, index)
        line = refused(capsys, _scan_with(path, run, index), str(path))
        assert snapshot(run, index) == before, line
        return
    # accepted configs are checked for validity by test_config.py; a scan would evaluate, which is slow


@FUZZ
@given(data=_sections())
def test_fuzzed_config_mapping_through_scan(data, scanned, pixel_index, tmp_path_factory, capsys):
    path = tmp_path_factory.getbasetemp() / "fuzz-cli.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    except (yaml.YAMLError, RecursionError):
        return  # not representable as YAML: nothing a user could write
    _check_config_refused(path, scanned, pixel_index, capsys)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzzed_config_text_through_scan(text, scanned, pixel_index, tmp_path_factory, capsys):
    path = tmp_path_factory.getbasetemp() / "fuzz-cli-text.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check_config_refused(path, scanned, pixel_index, capsys)


@pytest.mark.parametrize("text,words", [
    ("sampling:\n  num_samples: many\n", "sampling.num_samples"),
    ("detectors:\n  nn_ratio: -1\n", "nn_ratio"),
    ("sampling: [1, 2]\n", "sampling"),
    ("- a\n- b\n", "top level"),
    ("sampling: {num_samples: 3\n", "not valid YAML"),
])
def test_known_bad_configs_through_scan(text, words, scanned, pixel_index, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    before = snapshot(scanned, pixel_index)
    line = refused(capsys, _scan_with(path, scanned, pixel_index), str(path))
    assert words in line
    assert snapshot(scanned, pixel_index) == before


# -------------------------------------------------------------------------------------------- metadata


@pytest.fixture(scope="module")
def add_target(tmp_path_factory):
    """An index of two photographs, and a folder of two others (with a config for the line limit)."""
    base = tmp_path_factory.mktemp("fuzzmeta")
    first = write_training_set(base / "first", names=["astronaut", "chelsea"])
    assert main(["index", "build", str(first), "--out", str(base / "ref"), "--resolution", "16"]) == 0
    more = write_training_set(base / "more", names=["coffee", "rocket"], metadata=False)
    (base / "c.yaml").write_text("data:\n  max_metadata_line_bytes: 4096\n")
    return base / "ref", more, base / "c.yaml"


@FUZZ
@given(lines=st.lists(_LINE, max_size=6), as_csv=st.booleans())
def test_fuzzed_metadata_through_index_build_add(lines, as_csv, add_target, capsys):
    ref, root, config = add_target
    for name in ("metadata.jsonl", "metadata.csv"):
        (root / name).unlink(missing_ok=True)
    target = root / ("metadata.csv" if as_csv else "metadata.jsonl")
    body = b"\n".join(lines) + b"\n"
    target.write_bytes((b"file_name,text,identity\n" + body) if as_csv else body)
    try:
        read_dataset(root, DataConfig(max_metadata_line_bytes=4096), show_progress=False)
    except DataError:
        before = snapshot(ref, root)
        code = main(["index", "build", str(root), "--out", str(ref), "--add", "--config", str(config)])
        refused(capsys, code, target.name, str(root))
        assert snapshot(ref, root) == before


# ----------------------------------------------------------------------------------------------- gates


def _judged(text: str, summary: dict) -> bool:
    """Whether the library accepts ``text`` as a gate on ``summary`` (parses and names a known metric)."""
    try:
        parse_gate(text).evaluate(summary)
    except GateError:
        return False
    return True


_GATES = st.one_of(
    st.text(max_size=80),
    st.builds(lambda m, f, o, v: f"{m}.{f}{o}{v}",
              st.sampled_from(["nn_ratio", "tiled_l2", "nn_ratio_", "clip_copy", "x", ""]) | st.text(max_size=8),
              st.sampled_from(FIELDS + ("x", "")), st.sampled_from(["<", ">", "==", "=", ">>", " "]),
              st.one_of(st.text(max_size=6), st.floats().map(repr), st.just("null"))),
)


@FUZZ
@given(text=_GATES)
def test_fuzzed_gates_through_report(text, scanned, capsys):
    if "\x00" in text:
        return  # argv cannot carry a NUL byte
    if _judged(text, run_summary(scanned, with_index=False)):
        return
    before = snapshot(scanned)
    code = main(["report", str(scanned), "--quiet", "--fail-on", "nn_ratio.rate > 0.5", f"--fail-on={text}"])
    refused(capsys, code, "gate", "metric")
    assert snapshot(scanned) == before


@pytest.mark.parametrize("gate,words", [
    ("nn_ratio.rate >>> 1", "cannot parse gate"),
    ("nn_ratio.speed > 1", "unknown field 'speed'"),
    ("nn_ratio.rate > null", "null can only be compared"),
    ("no_such_metric.rate > 0", "unknown metric 'no_such_metric'"),
    ("distinct_train_images.rate > 0", "has no field 'rate'"),
])
def test_known_bad_gates_change_no_report(gate, words, scanned, capsys):
    before = snapshot(scanned)
    line = refused(capsys, main(["report", str(scanned), "--quiet", "--fail-on", gate]), "gate", "metric")
    assert words in line
    assert snapshot(scanned) == before  # report.html and summary.json not rewritten either


# ------------------------------------------------------------------------------------ hostile run files


def store_content(run: Path) -> list[str]:
    """The store's rows, as SQL (its logical content: the same whatever pages sqlite rewrote)."""
    import sqlite3

    with sqlite3.connect(f"file:{run / 'memtrack' / 'store.sqlite'}?mode=ro", uri=True) as conn:
        return list(conn.iterdump())


@pytest.mark.parametrize("text,words", [
    ("{", "cannot read the run's scheduler config"),
    ("[1]", "is not a scheduler config"),
    ('{"num_train_timesteps": "abc"}', "cannot build a DDIMScheduler"),
])
def test_a_damaged_scheduler_config_stops_the_scan_and_keeps_what_is_stored(text, words, tmp_path, pixel_index,
                                                                            capsys):
    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0)
    scan = ["scan", str(run), "--index", str(pixel_index), "--num-samples", "2", "--steps", "1"]
    assert main(scan) == 0
    before, files = store_content(run), snapshot(run / "memtrack" / "thumbs", pixel_index)
    write_checkpoint(run, 20, seed=1)                       # a new checkpoint, and a damaged run folder
    (run / "scheduler").mkdir()
    (run / "scheduler" / "scheduler_config.json").write_text(text)
    capsys.readouterr()
    line = refused(capsys, main(scan), "scheduler")
    assert words in line
    assert store_content(run) == before and snapshot(run / "memtrack" / "thumbs", pixel_index) == files


def test_a_bad_training_set_leaves_no_index_behind(tmp_path, capsys):
    data = write_training_set(tmp_path / "data", names=["coffee", "rocket"])
    (data / "metadata.jsonl").write_text('{"file_name": "../outside.png"}\n')
    before = snapshot(data)
    code = main(["index", "build", str(data), "--out", str(tmp_path / "ref"), "--resolution", "16"])
    assert "escapes the dataset folder" in refused(capsys, code, "metadata.jsonl")
    assert not (tmp_path / "ref").exists() and snapshot(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp folder either


def test_an_error_quoting_a_multi_line_exception_is_one_line():
    from memtrack.errors import MAX_MESSAGE, CheckpointError

    exc = CheckpointError("cannot load x: linspace() got\n * (Tensor start)\n\n * (Number start)", hint="fix\nit")
    assert exc.message == "cannot load x: linspace() got * (Tensor start) * (Number start)" and exc.hint == "fix it"
    assert len(CheckpointError("y" * 10_000).message) == MAX_MESSAGE
