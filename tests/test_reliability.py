"""Faults around training, on tiny real models and real files: checkpoints that vanish or are half-written
while a scan runs, a full disk or a refused write, a report read while a scan writes, hostile weights
files (pickles that would run code), and hostile names in the report.

Each test names the guarantee it proves; docs/reliability.md collects them.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

import memtrack.sampling.checkpoints as checkpoints_mod
import memtrack.sampling.unconditional as sampling_mod
from conftest import tiny_unet, write_checkpoint, write_training_set
from memtrack.sampling.checkpoints import discover
from memtrack.cli.main import main
from memtrack.config import Config, EmbedderSpec
from memtrack.errors import CheckpointError
from memtrack.report.write import write_report
from memtrack.sampling.unconditional import load_unet
from memtrack.store.run_store import RunStore
from memtrack.scan.tracker import Tracker

FAST = ["--num-samples", "4", "--steps", "2"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _scan(run, index, *extra):
    return main(["scan", str(run), "--index", str(index), *FAST, *extra])


def _rows(run) -> list[tuple]:
    with sqlite3.connect(run / "memtrack" / "store.sqlite") as c:
        return c.execute("SELECT checkpoint, status, reason FROM evaluations ORDER BY id").fetchall()


def _integrity_ok(run) -> bool:
    with sqlite3.connect(run / "memtrack" / "store.sqlite") as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.fixture()
def warnings():
    """The memtrack logger's warnings (it does not propagate to the root logger)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("memtrack")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


class Evil:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------ vanishing checkpoints


@pytest.mark.parametrize("when", ["after_discovery", "during_load"])
def test_a_checkpoint_deleted_while_evaluated_is_skipped_named_and_never_retried(
        when, tiny_run, pixel_index, monkeypatch, warnings, capsys):
    victim = tiny_run / "checkpoint-20"
    if when == "after_discovery":  # training's checkpoints_total_limit removes it between discovery and load
        real_discover = checkpoints_mod.discover

        def discover_then_delete(*a, **k):
            found = real_discover(*a, **k)
            shutil.rmtree(victim / "unet")
            return found
        monkeypatch.setattr(checkpoints_mod, "discover", discover_then_delete)
    else:  # removed after memtrack read its config, while the weights are being opened
        real_has = sampling_mod._has_safetensors

        def has_then_delete(folder):
            found = real_has(folder)
            if victim in folder.parents:
                shutil.rmtree(victim)
            return found
        monkeypatch.setattr(sampling_mod, "_has_safetensors", has_then_delete)
    assert _scan(tiny_run, pixel_index) == 0
    out = capsys.readouterr().out
    assert "checkpoint-20  skipped:" in out
    assert any(w.startswith("skipping checkpoint-20: ") for w in warnings), warnings
    rows = _rows(tiny_run)
    assert [(ck, status) for ck, status, _ in rows] == [
        ("checkpoint-10", "done"), ("checkpoint-20", "skipped"), ("checkpoint-30", "done")]
    assert str(victim) in rows[1][2]  # the reason names the folder
    monkeypatch.undo()
    capsys.readouterr()
    assert _scan(tiny_run, pixel_index) == 0       # the next scan evaluates nothing again
    assert capsys.readouterr().out.count("stored earlier") == 2
    assert len(_rows(tiny_run)) == 3 and _integrity_ok(tiny_run)


def test_a_checkpoint_deleted_after_its_weights_are_loaded_is_still_stored_once(tiny_run, pixel_index,
                                                                                 monkeypatch):
    victim = tiny_run / "checkpoint-20"
    real_load = sampling_mod.load_unet

    def load_then_delete(folder, *a, **k):
        unet = real_load(folder, *a, **k)
        if victim in folder.parents:
            shutil.rmtree(victim)
        return unet
    monkeypatch.setattr(sampling_mod, "load_unet", load_then_delete)
    assert _scan(tiny_run, pixel_index) == 0
    assert [status for _, status, _ in _rows(tiny_run)] == ["done"] * 3
    monkeypatch.undo()
    assert _scan(tiny_run, pixel_index) == 0
    assert len(_rows(tiny_run)) == 3


# ---------------------------------------------------------------------------------- half-written checkpoints


def test_a_checkpoint_without_random_states_is_not_evaluated_until_accelerate_finishes(tmp_path, pixel_index,
                                                                                     capsys):
    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0)
    write_checkpoint(run, 20, seed=1, complete=False)  # accelerate writes random_states_0.pkl last
    assert _scan(run, pixel_index) == 0
    assert "checkpoint-20" not in capsys.readouterr().out
    assert [ck for ck, _, _ in _rows(run)] == ["checkpoint-10"]
    (run / "checkpoint-20" / "random_states_0.pkl").write_bytes(b"\x80\x04N.")
    assert _scan(run, pixel_index) == 0
    out = capsys.readouterr().out
    assert "checkpoint-10" in out and "stored earlier" in out.splitlines()[0]
    assert [(ck, status) for ck, status, _ in _rows(run)] == [("checkpoint-10", "done"), ("checkpoint-20", "done")]


@pytest.mark.parametrize("damage", ["empty", "8 bytes", "header only", "half", "last byte missing",
                                    "garbage header", "config not json", "config a list", "config other class",
                                    "config wrong shapes"])
def test_a_damaged_checkpoint_is_skipped_with_a_clear_reason_and_the_scan_goes_on(damage, tiny_run, pixel_index,
                                                                                   capsys):
    unet = tiny_run / "checkpoint-20" / "unet"
    weights = unet / WEIGHTS
    data = weights.read_bytes()
    header_len = 8 + int.from_bytes(data[:8], "little")
    config = json.loads((unet / "config.json").read_text())
    change = {
        "empty": lambda: weights.write_bytes(b""),
        "8 bytes": lambda: weights.write_bytes(data[:8]),
        "header only": lambda: weights.write_bytes(data[:header_len]),
        "half": lambda: weights.write_bytes(data[: len(data) // 2]),
        "last byte missing": lambda: weights.write_bytes(data[:-1]),
        "garbage header": lambda: weights.write_bytes(b"\xff" * 8 + data[8:]),
        "config not json": lambda: (unet / "config.json").write_text('{"_class_name": "UNet2D'),
        "config a list": lambda: (unet / "config.json").write_text("[1, 2]"),
        "config other class": lambda: (unet / "config.json").write_text(
            json.dumps({**config, "_class_name": "DiffusionPipeline"})),
        "config wrong shapes": lambda: (unet / "config.json").write_text(
            json.dumps({**config, "block_out_channels": [16, 32]})),
    }[damage]
    change()
    assert _scan(tiny_run, pixel_index) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "checkpoint-20  skipped: " in lines[1]
    reason = _rows(tiny_run)[1][2]
    assert str(unet) in reason and any(w in reason for w in ("cannot", "not a diffusers", "unknown model"))
    assert [status for _, status, _ in _rows(tiny_run)] == ["done", "skipped", "done"]
    if damage != "half":
        return
    # once training rewrites it completely, its fingerprint changes and it is evaluated
    write_checkpoint(tiny_run, 20, seed=5)
    assert _scan(tiny_run, pixel_index) == 0
    assert [status for _, status, _ in _rows(tiny_run)] == ["done", "skipped", "done", "done"]
    assert _integrity_ok(tiny_run)


@pytest.mark.parametrize("text,words", [
    ("{", "cannot read the run's scheduler config"),
    ("[1]", "is not a scheduler config"),          # diffusers would take a list for a hub id and go online
    ('{"num_train_timesteps": "abc"}', "cannot build a DDIMScheduler"),
    ('{"beta_schedule": "nope"}', "cannot build a DDIMScheduler"),
])
def test_a_damaged_scheduler_config_in_the_run_stops_the_scan_with_one_sentence(text, words, tiny_run, pixel_index,
                                                                                capsys):
    (tiny_run / "scheduler").mkdir()
    (tiny_run / "scheduler" / "scheduler_config.json").write_text(text)
    assert _scan(tiny_run, pixel_index) == 2
    err = capsys.readouterr().err
    assert err.startswith("memtrack: error: ") and words in err and "Traceback" not in err
    assert _rows(tiny_run) == []  # a run-level problem: no checkpoint is recorded as skipped for it


# ----------------------------------------------------------------------------------- refused writes


def _full_store_on_second_record(monkeypatch):
    """SQLITE_FULL from the second record on, exactly as a full disk reports it."""
    real = RunStore.record
    calls = []

    def record(self, **k):
        calls.append(k["checkpoint"])
        if len(calls) == 2:  # no page left, and a write that needs new ones
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            self.conn.execute(f"PRAGMA max_page_count = {pages}")
            k["info"] = {**k["info"], "padding": "x" * 200_000}
        return real(self, **k)
    monkeypatch.setattr(RunStore, "record", record)


def _readonly_store_on_second_record(monkeypatch):
    """SQLITE_READONLY from the second record on (a store whose file became read-only)."""
    real = RunStore.record
    calls = []

    def record(self, **k):
        calls.append(k["checkpoint"])
        if len(calls) == 2:
            self.conn.execute("PRAGMA query_only = ON")
        return real(self, **k)
    monkeypatch.setattr(RunStore, "record", record)


def _os_error_on_thumbnails_of_second_checkpoint(code: int):
    def patch(monkeypatch):
        real = Path.write_bytes

        def write_bytes(self, data):
            if "checkpoint-20" in str(self) and self.name.endswith(".tmp"):
                raise OSError(code, os.strerror(code), str(self))
            return real(self, data)
        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return patch


@pytest.mark.parametrize("fault,words", [
    (_full_store_on_second_record, "database or disk is full"),
    (_readonly_store_on_second_record, "readonly database"),
    (_os_error_on_thumbnails_of_second_checkpoint(errno.ENOSPC), "No space left on device"),
    (_os_error_on_thumbnails_of_second_checkpoint(errno.EACCES), "Permission denied"),
], ids=["store-full", "store-readonly", "thumbnail-enospc", "thumbnail-eacces"])
def test_a_refused_write_is_one_clear_error_and_earlier_results_survive(fault, words, tiny_run, pixel_index,
                                                                        monkeypatch, capsys):
    fault(monkeypatch)
    assert _scan(tiny_run, pixel_index) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("memtrack: error: ") and words in captured.err, captured.err
    assert "Traceback" not in captured.err and "hint:" in captured.err
    assert "disk space" in captured.err or "permissions" in captured.err
    assert [(ck, status) for ck, status, _ in _rows(tiny_run)] == [("checkpoint-10", "done")]
    assert _integrity_ok(tiny_run)
    assert not list((tiny_run / "memtrack").rglob("*.tmp"))  # no temp file left behind
    monkeypatch.undo()
    assert _scan(tiny_run, pixel_index) == 0  # the space is back: the scan resumes where it stopped
    assert [ck for ck, _, _ in _rows(tiny_run)] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert "stored earlier" in capsys.readouterr().out.splitlines()[0]


# ---------------------------------------------------------------------------------- concurrent readers


def _tracker(run, index) -> Tracker:
    cfg = Config()
    cfg.sampling.num_samples, cfg.sampling.num_inference_steps = 4, 2
    return Tracker.from_config(cfg, index=index, run_dir=run)


def test_a_report_written_while_the_scan_holds_a_write_transaction_neither_waits_nor_sees_it(
        tiny_run, pixel_index, monkeypatch, tmp_path):
    armed, in_transaction, report_done = threading.Event(), threading.Event(), threading.Event()
    real = RunStore.transaction

    @contextmanager
    def held(self):
        with real(self) as conn:
            yield conn
            if armed.is_set():  # every row of checkpoint-20 written, COMMIT not yet run
                in_transaction.set()
                assert report_done.wait(60), "the report waited for the scan's write lock"
    monkeypatch.setattr(RunStore, "transaction", held)
    errors: list[BaseException] = []

    def scan():  # sqlite connections belong to their thread: the scan opens its store here
        try:
            tracker = _tracker(tiny_run, pixel_index)
            cks = discover(tiny_run)
            tracker.evaluate(cks[0])
            armed.set()
            tracker.evaluate(cks[1])
            tracker.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            in_transaction.set()
    writer = threading.Thread(target=scan)
    writer.start()
    assert in_transaction.wait(120) and not errors, errors
    t0 = time.perf_counter()
    try:
        code = write_report([tiny_run], out=tmp_path / "report.html", quiet=True)
    finally:
        took = time.perf_counter() - t0
        report_done.set()
        writer.join(60)
    assert code == 0 and not errors and took < 30
    seen = json.loads((tmp_path / "summary.json").read_text())
    assert [c["checkpoint"] for c in seen["checkpoints"]] == ["checkpoint-10"]  # not the uncommitted one
    assert [ck for ck, _, _ in _rows(tiny_run)] == ["checkpoint-10", "checkpoint-20"]


def test_reports_in_a_loop_while_a_scan_writes_all_succeed(tiny_run, pixel_index, tmp_path):
    tracker = _tracker(tiny_run, pixel_index)  # creates the store: a report can open it from now on
    done = threading.Event()
    reports: list[int] = []
    errors: list[BaseException] = []

    def reader():
        i = 0
        while not done.is_set() or i == 0:
            try:
                out = tmp_path / f"r{i % 2}" / "report.html"
                assert write_report([tiny_run], out=out, quiet=True) == 0
                reports.append(len(json.loads((out.parent / "summary.json").read_text())["checkpoints"]))
            except BaseException as exc:  # surfaced below
                errors.append(exc)
                return
            i += 1
    t = threading.Thread(target=reader)
    t.start()
    try:
        for ck in discover(tiny_run):
            tracker.evaluate(ck)
    finally:
        done.set()
        t.join(120)
        tracker.close()
    assert not errors, errors
    assert len(reports) >= 2 and reports == sorted(reports)  # each saw a committed prefix, never less
    assert write_report([tiny_run], out=tmp_path / "final.html", quiet=True) == 0
    assert len(json.loads((tmp_path / "summary.json").read_text())["checkpoints"]) == 3


# --------------------------------------------------------------------------------------- hostile weights


def _pickled_unet(folder: Path, marker: Path, fmt: str) -> Path:
    import torch

    tiny_unet().save_pretrained(folder, safe_serialization=False)
    weights = folder / "diffusion_pytorch_model.bin"
    state = {k: v for k, v in torch.load(weights, weights_only=True).items()}
    state["conv_in.weight"] = Evil(marker)  # a plausible state dict with one poisoned entry
    if fmt == "torch.save":
        torch.save(state, weights)
    else:
        weights.write_bytes(pickle.dumps(state))
    return folder


@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_a_bin_with_a_malicious_reduce_is_refused_and_never_executed(fmt, tmp_path):
    marker = tmp_path / "PWNED"
    folder = _pickled_unet(tmp_path / "unet", marker, fmt)
    with pytest.raises(CheckpointError, match="refused .*diffusion_pytorch_model.bin.* could run code") as err:
        load_unet(folder)
    assert "safe_serialization=True" in err.value.hint
    assert not marker.exists()


def test_a_malicious_bin_checkpoint_is_skipped_by_the_scan_and_never_executed(tiny_run, pixel_index, tmp_path,
                                                                              capsys):
    marker = tmp_path / "PWNED"
    unet = tiny_run / "checkpoint-20" / "unet"
    shutil.rmtree(unet)
    _pickled_unet(unet, marker, "torch.save")
    assert _scan(tiny_run, pixel_index) == 0
    assert "checkpoint-20  skipped: refused" in capsys.readouterr().out
    assert [status for _, status, _ in _rows(tiny_run)] == ["done", "skipped", "done"]
    assert not marker.exists()


def test_a_plain_bin_checkpoint_still_loads(tmp_path):
    tiny_unet(seed=3).save_pretrained(tmp_path / "unet", safe_serialization=False)
    model = load_unet(tmp_path / "unet")
    ref = tiny_unet(seed=3)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_safetensors_win_over_a_malicious_bin_beside_them(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "unet"
    tiny_unet().save_pretrained(folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil(marker)}))
    load_unet(folder)
    assert not marker.exists()


def test_random_states_pkl_is_only_checked_for_existence_never_unpickled(tiny_run, pixel_index, tmp_path):
    marker = tmp_path / "PWNED"
    for ck in tiny_run.glob("checkpoint-*"):
        (ck / "random_states_0.pkl").write_bytes(pickle.dumps(Evil(marker)))
    assert [c.complete for c in discover(tiny_run)] == [True] * 3
    assert _scan(tiny_run, pixel_index) == 0
    assert [status for _, status, _ in _rows(tiny_run)] == ["done"] * 3
    assert not marker.exists()


def test_the_library_never_unpickles_untrusted_files():
    """A static guard: no pickle.load(s), every torch.load says weights_only=True, np.load never allows pickle."""
    import ast

    import memtrack

    offenders = []
    for path in Path(memtrack.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            unpickler = node.func.attr in ("load", "loads", "Unpickler")
            if owner in ("pickle", "dill", "joblib", "cloudpickle") and unpickler:
                offenders.append(f"{where} {owner}.{node.func.attr}")
            if owner == "torch" and node.func.attr == "load" and not (
                    isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True):
                offenders.append(f"{where} torch.load without weights_only=True")
            if owner in ("np", "numpy") and node.func.attr == "load" and "allow_pickle" in kwargs:
                offenders.append(f"{where} np.load(allow_pickle=...)")
    assert offenders == []


# ----------------------------------------------------------------------------------- hostile report text

XSS_FILE = '"><img src=x onerror="window.__pwned=1">.png'
XSS_CAPTION = "<script>window.__pwned=2</script>a photo"


def test_hostile_file_names_and_captions_from_a_real_dataset_are_inert_in_the_report(tmp_path):
    """The whole path (metadata -> index -> scan -> store -> report) keeps data text as text."""
    from PIL import Image

    from memtrack.data.dataset import read_dataset
    from memtrack.embedders.registry import get_embedder
    from memtrack.index.reference import ReferenceIndex

    data = write_training_set(tmp_path / "data", names=["coffee", "rocket"], metadata=False)
    os.rename(data / "coffee.png", data / XSS_FILE)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": XSS_FILE, "text": XSS_CAPTION}) + "\n"
                                         + json.dumps({"file_name": "rocket.png", "text": "a rocket"}) + "\n")
    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": 16})]
    ReferenceIndex.build(read_dataset(data), [get_embedder(s) for s in cfg.index.embedders], tmp_path / "ref", cfg)
    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0)
    cfg.sampling.num_samples, cfg.sampling.num_inference_steps = 2, 2
    tracker = Tracker.from_config(cfg, index=tmp_path / "ref", run_dir=run)
    copies = [Image.open(data / XSS_FILE).convert("RGB"), Image.open(data / "rocket.png").convert("RGB")]
    fake = lambda **kw: SimpleNamespace(images=copies[: kw["batch_size"]])  # noqa: E731 -- a model that copies
    tracker.evaluate(discover(run)[0], pipeline=fake)
    tracker.close()
    out = tmp_path / "report.html"
    assert write_report([run], out=out, quiet=True) == 0
    html = out.read_text()
    assert "window.__pwned" in html                    # the hostile text is shown ...
    assert "<script>window.__pwned" not in html and 'onerror="window.__pwned' not in html  # ... as text
    _assert_inert_in_chromium(out)


def _assert_inert_in_chromium(page: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed; the string checks above passed")
    if not (chromium and driver_path):
        pytest.skip("headless Chromium not found (apt-get install chromium chromium-driver)")
    import tempfile

    profile = tempfile.mkdtemp(prefix="memtrack-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(page.as_uri())
        text = driver.execute_script("return document.body.innerText")
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        assert XSS_CAPTION in text and XSS_FILE in text  # shown as text
        assert driver.execute_script("return document.querySelectorAll('script').length") == 0
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------ atomic files


def test_reports_are_replaced_atomically_with_ordinary_permissions(tiny_run, pixel_index, tmp_path):
    assert _scan(tiny_run, pixel_index) == 0
    out = tmp_path / "report.html"
    assert write_report([tiny_run], out=out, quiet=True) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)  # not 0600: others may read the report
    assert not list(tmp_path.glob(".*.tmp"))
