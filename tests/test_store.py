"""The SQLite run store: create/open, record and read back, resume, atomicity, bad files."""
from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from memtrack.errors import StoreError
from memtrack.store.run_store import DB_NAME, STORE_DIR, RunStore


def _metrics(rate=0.25):
    return {"nn_ratio": {"rate": rate, "ci_low": 0.1, "ci_high": 0.4, "count": 4, "n": 16, "mean": 0.5,
                         "distinct": 2, "p95": None},
            "distinct_train_images": {"count": 2}}


def _samples(n=3):
    return [{"sample": i, "seed": 100 + i, "sha256": f"h{i}", "thumb": f"samples/{i}.png",
             "scores": {"nn_ratio": 0.1 * i}, "flags": {"nn_ratio": i == 0}, "matches": {"nn_ratio": i}}
            for i in range(n)]


def _record(store, step=100, key="k1", ckpt=None, **kw):
    args = dict(step=step, checkpoint=ckpt or f"checkpoint-{step}", weights="w" + str(step), eval_key=key,
                metrics=_metrics(), samples=_samples(), info={"top_matches": [{"seed": 100}]}, duration_s=1.5)
    args.update(kw)
    return store.record(**args)


def _counts(run):
    with sqlite3.connect(run / STORE_DIR / DB_NAME) as c:
        return tuple(c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("evaluations", "metrics", "samples"))


@pytest.fixture()
def run(tmp_path):
    return tmp_path / "run"


def test_create_and_open(run):
    with RunStore.open(run) as store:
        assert store.folder == run / "memtrack" and (run / "memtrack" / "store.sqlite").is_file()
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.integrity_ok()
        assert store.evaluations() == []
    assert not any(p.name.startswith("checkpoint") for p in run.rglob("*"))  # diffusers would parse it
    with RunStore.open(run, create=False) as store:  # reopening an existing store
        assert store.get_meta("schema_version") == 2  # schema 2: evaluation series


def test_custom_folder(tmp_path):
    with RunStore.open(tmp_path / "run", folder=tmp_path / "elsewhere") as store:
        assert (tmp_path / "elsewhere" / DB_NAME).is_file()
        assert store.thumb_dir("key", "checkpoint-5") == tmp_path / "elsewhere" / "samples" / "checkpoint-5" / "key"


def test_record_and_read_back(run):
    with RunStore.open(run) as store:
        eval_id = _record(store)
        (ev,) = store.evaluations()
        assert ev.id == eval_id and ev.step == 100 and ev.checkpoint == "checkpoint-100"
        assert ev.weights == "w100" and ev.status == "done" and ev.n_samples == 3 and ev.duration_s == 1.5
        assert ev.info == {"top_matches": [{"seed": 100}]}
        assert ev.metrics["nn_ratio"] == {"rate": 0.25, "ci_low": 0.1, "ci_high": 0.4, "count": 4, "n": 16,
                                          "mean": 0.5, "distinct": 2}   # None values are dropped
        assert ev.metrics["distinct_train_images"] == {"count": 2}
        samples = store.samples(eval_id)
        assert [s["seed"] for s in samples] == [100, 101, 102]
        assert samples[0]["flags"] == {"nn_ratio": True} and samples[2]["scores"]["nn_ratio"] == pytest.approx(0.2)
        assert samples[1]["matches"] == {"nn_ratio": 1} and samples[1]["thumb"] == "samples/1.png"
        assert ev.to_dict()["metrics"] is ev.metrics


def test_numpy_values_are_stored_as_json(run):
    with RunStore.open(run) as store:
        samples = [{"sample": 0, "seed": 1, "scores": {"a": np.float32(0.5)}, "flags": {"a": np.bool_(True)},
                    "matches": {"a": np.int64(3)}}]
        eval_id = _record(store, samples=samples, info={"arr": np.arange(3)})
        (s,) = store.samples(eval_id)
        assert s["flags"] == {"a": True} and s["scores"] == {"a": 0.5} and s["matches"] == {"a": 3}
        assert store.evaluations()[0].info == {"arr": [0, 1, 2]}


def test_resume_skips_done_checkpoints_and_reevaluates_changed_keys(run):
    with RunStore.open(run) as store:
        _record(store, step=100, key="k1")
        _record(store, step=200, key="k1")
    with RunStore.open(run) as store:  # a later scan
        assert store.is_done("checkpoint-100", "k1") and store.is_done("checkpoint-200", "k1")
        assert not store.is_done("checkpoint-300", "k1")
        assert not store.is_done("checkpoint-100", "k2")  # config or index changed: evaluate again
        assert store.find("checkpoint-200", "k1").step == 200
        assert store.find("checkpoint-100", "k2") is None


def test_recording_the_same_evaluation_twice_replaces_it(run):
    """scan --force (or a second writer) re-records a checkpoint under the same key: one row, the newest."""
    with RunStore.open(run) as store:
        _record(store)
        _record(store, metrics=_metrics(0.9))
        assert [e.metrics["nn_ratio"]["rate"] for e in store.evaluations(latest_per_checkpoint=False)] == [0.9]
        assert _counts(run) == (1, len(_metrics()), 3)
        assert store.integrity_ok()


def test_one_transaction_per_checkpoint_an_error_mid_record_stores_nothing(run):
    with RunStore.open(run) as store:
        _record(store, step=100)
        before = _counts(run)
        bad = _samples()
        del bad[2]["seed"]  # fails after the evaluation row and the metrics are inserted
        with pytest.raises(KeyError):
            _record(store, step=200, samples=bad)
        assert _counts(run) == before
        assert not store.is_done("checkpoint-200", "k1")
        dup = _samples() + [_samples()[0]]  # sqlite itself refuses the second sample 0
        with pytest.raises(StoreError):
            _record(store, step=200, samples=dup)
        assert _counts(run) == before
        _record(store, step=200)  # the store is still usable
        assert [e.step for e in store.evaluations()] == [100, 200]
        assert store.integrity_ok()


def test_an_interrupt_inside_a_transaction_rolls_back(run):
    with RunStore.open(run) as store:
        with pytest.raises(KeyboardInterrupt):
            with store.transaction() as c:
                c.execute("INSERT INTO meta VALUES ('x', '1')")
                raise KeyboardInterrupt
        assert store.get_meta("x") is None
        assert not store.conn.in_transaction


def test_readers_see_only_committed_checkpoints(run):
    with RunStore.open(run) as writer:
        _record(writer, step=100)
        with writer.transaction() as c:
            c.execute("INSERT INTO evaluations (step, checkpoint, eval_key, status, created) "
                      "VALUES (200, 'checkpoint-200', 'k1', 'done', 0)")
            with RunStore.open(run, create=False, readonly=True) as reader:
                assert [e.step for e in reader.evaluations()] == [100]
        with RunStore.open(run, create=False, readonly=True) as reader:
            assert [e.step for e in reader.evaluations()] == [100, 200]


def test_record_skip(run):
    with RunStore.open(run) as store:
        store.record_skip(step=300, checkpoint="checkpoint-300", eval_key="k1", reason="deleted while evaluated")
        store.record_skip(step=300, checkpoint="checkpoint-300", eval_key="k1", reason="again")  # no error
        _record(store, step=100)
        store.record_skip(step=100, checkpoint="checkpoint-100", eval_key="k1", reason="ignored: already done")
        assert [e.step for e in store.evaluations()] == [100]
        (skip,) = store.evaluations(status="skipped")
        assert skip.step == 300 and skip.reason == "deleted while evaluated" and skip.n_samples == 0
        assert store.is_done("checkpoint-300", "k1")  # skipped checkpoints are not retried
        assert store.find("checkpoint-100", "k1").status == "done"


def test_evaluations_latest_per_checkpoint(run):
    with RunStore.open(run) as store:
        _record(store, step=200, key="old", metrics=_metrics(0.1))
        _record(store, step=100, key="old", metrics=_metrics(0.2))
        _record(store, step=200, key="new", metrics=_metrics(0.3))
        latest = store.evaluations()
        assert [(e.step, e.eval_key) for e in latest] == [(100, "old"), (200, "new")]
        assert latest[1].metrics["nn_ratio"]["rate"] == 0.3
        every = store.evaluations(latest_per_checkpoint=False)
        assert [(e.step, e.eval_key) for e in every] == [(100, "old"), (200, "old"), (200, "new")]


def test_meta_round_trip(run):
    with RunStore.open(run) as store:
        store.set_meta("index", {"path": "/ref", "n_train": 8})
        store.set_meta("index", {"path": "/ref2", "n_train": 9})
        assert store.get_meta("index") == {"path": "/ref2", "n_train": 9}
        assert store.get_meta("missing", "dflt") == "dflt"


def test_readonly_open_of_a_missing_store(run):
    with pytest.raises(StoreError, match="no memtrack results in") as err:
        RunStore.open(run, create=False, readonly=True)
    assert "memtrack scan" in err.value.hint
    with pytest.raises(StoreError, match="cannot open the run store"):
        RunStore.open(run, readonly=True)
    assert not (run / STORE_DIR).exists()  # a read-only open creates nothing


def test_a_readonly_store_refuses_writes_with_a_store_error(run):
    RunStore.open(run).close()
    with RunStore.open(run, readonly=True) as store:
        with pytest.raises(StoreError, match="read-only|readonly"):
            _record(store)


@pytest.mark.parametrize("readonly", [False, True])
def test_a_corrupt_db_file_is_a_store_error_and_left_untouched(run, readonly):
    db = run / STORE_DIR / DB_NAME
    db.parent.mkdir(parents=True)
    garbage = np.random.default_rng(0).bytes(8192)
    db.write_bytes(garbage)
    with pytest.raises(StoreError, match="cannot open the run store") as err:
        RunStore.open(run, create=False, readonly=readonly)
    assert "corrupt" in err.value.hint
    assert db.read_bytes() == garbage


def test_a_sqlite_file_that_is_not_a_memtrack_store_is_refused_when_reading(run):
    db = run / STORE_DIR / DB_NAME
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE other (x)")
    with pytest.raises(StoreError, match="cannot open the run store"):
        RunStore.open(run, create=False, readonly=True)


def test_an_empty_database_left_by_a_kill_at_start_up_reads_as_no_results_and_resumes(run):
    db = run / STORE_DIR / DB_NAME
    db.parent.mkdir(parents=True)
    sqlite3.connect(db).execute("PRAGMA journal_mode=WAL").fetchone()  # a file with no tables, as a kill leaves
    with pytest.raises(StoreError, match="no memtrack results in .* yet") as err:
        RunStore.open(run, create=False, readonly=True)
    assert "memtrack scan" in err.value.hint
    with RunStore.open(run) as store:  # the writer completes the schema and goes on
        _record(store)
    assert _counts(run) == (1, 2, 3)


def test_schema_version_mismatch(run):
    RunStore.open(run).close()
    with sqlite3.connect(run / STORE_DIR / DB_NAME) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    for readonly in (False, True):
        with pytest.raises(StoreError, match="schema version 99"):
            RunStore.open(run, readonly=readonly)


def test_a_store_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "run").write_text("a file where the run folder should be")
    with pytest.raises(StoreError, match="cannot create the run store") as err:
        RunStore.open(tmp_path / "run")
    assert "writable" in err.value.hint


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unwritable_folder_is_a_clear_error(run):
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(StoreError):
            RunStore.open(run)
    finally:
        run.chmod(0o755)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unwritable_store_file_is_a_clear_error_and_stays_intact(run):
    with RunStore.open(run) as store:
        _record(store)
    folder = run / STORE_DIR
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)
    try:
        with pytest.raises(StoreError):
            with RunStore.open(run) as store:
                _record(store, step=200)
        with RunStore.open(run, readonly=True) as store:
            assert [e.step for e in store.evaluations()] == [100]
    finally:
        folder.chmod(0o755)
        for p in folder.iterdir():
            p.chmod(0o644)


def test_a_full_disk_mid_record_is_a_store_error_and_keeps_what_was_stored(run):
    # PRAGMA max_page_count makes sqlite report SQLITE_FULL exactly as a full disk does
    with RunStore.open(run) as store:
        _record(store, step=100)
        pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
        store.conn.execute(f"PRAGMA max_page_count = {pages}")
        big = [dict(s, scores={"x" * 20: list(range(2000))}) for s in _samples(20)]
        with pytest.raises(StoreError, match="full") as err:
            _record(store, step=200, samples=big)
        assert "disk space" in err.value.hint
        assert not store.conn.in_transaction
        assert [e.step for e in store.evaluations()] == [100] and store.integrity_ok()
        store.conn.execute("PRAGMA max_page_count = 1073741823")
        _record(store, step=200, samples=big)
        assert [e.step for e in store.evaluations()] == [100, 200]
