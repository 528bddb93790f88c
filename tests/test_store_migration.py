"""A store written by schema 1 (before evaluation series) opens, upgrades in place, and loses nothing.

The version-1 store is written here with schema 1's own statements, exactly as memtrack up to that
version created and filled it, so the test does not depend on today's code to produce the old layout.
"""
from __future__ import annotations

import json
import sqlite3

import pytest

from memtrack.store import schema as store_schema
from memtrack.cli.main import main
from memtrack.store.run_store import DB_NAME, STORE_DIR, RunStore

V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    step INTEGER NOT NULL,
    checkpoint TEXT NOT NULL,
    weights TEXT,
    eval_key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'skipped')),
    reason TEXT,
    n_samples INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    duration_s REAL,
    info TEXT NOT NULL DEFAULT '{}',
    UNIQUE (checkpoint, eval_key)
);
CREATE TABLE IF NOT EXISTS metrics (
    eval_id INTEGER NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    metric TEXT NOT NULL,
    rate REAL, ci_low REAL, ci_high REAL, count INTEGER, n INTEGER,
    extra TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (eval_id, metric)
);
CREATE TABLE IF NOT EXISTS samples (
    eval_id INTEGER NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    sample INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    prompt TEXT,
    sha256 TEXT,
    thumb TEXT,
    scores TEXT NOT NULL,
    flags TEXT NOT NULL,
    matches TEXT NOT NULL,
    PRIMARY KEY (eval_id, sample)
);
CREATE INDEX IF NOT EXISTS evaluations_step ON evaluations(step);
"""

# (step, checkpoint, weights, eval_key, status, n_samples, created): what the issue measured -- 6, 6 and 4
# samples under different keys, a live state at a checkpoint's step, and a skipped checkpoint
ROWS = [(10, "checkpoint-10", "unet", "k6", "done", 6, 1.0), (20, "checkpoint-20", "unet", "k6", "done", 6, 2.0),
        (30, "checkpoint-30", "unet", "k4", "done", 4, 3.0), (20, "step-20", "live", "kl", "done", 4, 4.0),
        (40, "checkpoint-40", None, "k4", "skipped", 0, 5.0)]


def _write_v1(run) -> None:
    db = run / STORE_DIR / DB_NAME
    db.parent.mkdir(parents=True)
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.executescript(f"BEGIN IMMEDIATE;{V1_SCHEMA}INSERT OR IGNORE INTO meta VALUES ('schema_version', '1');COMMIT;")
    c.execute("INSERT INTO meta VALUES ('config', ?)", (json.dumps({"sampling": {"num_samples": 4}}),))
    for step, name, weights, key, status, n, created in ROWS:
        info = {"checkpoint": {"step": step, "name": name}, "top_matches": [], "thresholds": {}}
        cur = c.execute("INSERT INTO evaluations (step, checkpoint, weights, eval_key, status, reason, n_samples, "
                        "created, duration_s, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (step, name, weights, key, status, "vanished" if status == "skipped" else None, n,
                         created, 1.5, json.dumps(info)))
        if status != "done":
            continue
        c.execute("INSERT INTO metrics VALUES (?, 'nn_ratio', ?, 0.0, 0.5, ?, ?, '{\"mean\": 0.7}')",
                  (cur.lastrowid, step / 100, 1, n))
        c.executemany("INSERT INTO samples VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                      [(cur.lastrowid, i, i, f"h{i}", f"samples/{name}/{key}/{i:05d}.png", '{"nn_ratio": 0.5}',
                        '{"nn_ratio": false}', '{"nn_ratio": 0}') for i in range(n)])
    c.close()


def _dump(run) -> dict:
    """Every row of the three data tables, as schema 1 had them."""
    with sqlite3.connect(run / STORE_DIR / DB_NAME) as c:
        cols = "id, step, checkpoint, weights, eval_key, status, reason, n_samples, created, duration_s, info"
        return {"evaluations": c.execute(f"SELECT {cols} FROM evaluations ORDER BY id").fetchall(),
                "metrics": c.execute("SELECT * FROM metrics ORDER BY eval_id, metric").fetchall(),
                "samples": c.execute("SELECT * FROM samples ORDER BY eval_id, sample").fetchall(),
                "version": c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]}


@pytest.fixture()
def v1_run(tmp_path):
    run = tmp_path / "run"
    _write_v1(run)
    return run


@pytest.mark.parametrize("readonly", [False, True])
def test_a_v1_store_opens_upgrades_and_loses_nothing(v1_run, readonly):
    before = _dump(v1_run)
    assert before["version"] == "1"
    with RunStore.open(v1_run, create=False, readonly=readonly) as store:  # a reader upgrades it too
        assert store.get_meta("schema_version") == 2
        assert store.get_meta("config") == {"sampling": {"num_samples": 4}}
        every = store.evaluations(latest_per_checkpoint=False)
        assert [(e.checkpoint, e.series) for e in every] == [
            ("checkpoint-10", "legacy"), ("checkpoint-20", "legacy"), ("step-20", "legacy-live"),
            ("checkpoint-30", "legacy")]
        assert store.evaluations(status="skipped")[0].series == "legacy"
        series = {s.key: s for s in store.list_series()}
        assert set(series) == {"legacy", "legacy-live"} and all(s.legacy for s in series.values())
        assert series["legacy"].n_checkpoints == 3 and series["legacy"].n_samples == [4, 6]
        assert series["legacy"].n_skipped == 1 and series["legacy-live"].identity["source"] == "live"
        assert store.metrics(every[0].id)["nn_ratio"] == {"rate": 0.1, "ci_low": 0.0, "ci_high": 0.5, "count": 1,
                                                          "n": 6, "mean": 0.7}
        assert store.integrity_ok()
    after = _dump(v1_run)
    assert after["version"] == "2"
    assert {k: after[k] for k in ("evaluations", "metrics", "samples")} == \
        {k: before[k] for k in ("evaluations", "metrics", "samples")}
    with RunStore.open(v1_run) as store:  # and goes on as a version-2 store
        store.record(step=50, checkpoint="checkpoint-50", weights="unet", eval_key="new", metrics={}, samples=[],
                     info={}, series="s2", series_identity={"plan": {"n_samples": 0}})
        assert store.latest_series() == "s2" and store.resolve_series("s") == "s2"


def test_an_upgrade_that_fails_half_way_leaves_the_v1_store_as_it_was(v1_run, monkeypatch):
    before = _dump(v1_run)

    def half(conn):
        store_schema._migrate_v1(conn)  # every statement of the upgrade, then a failure before COMMIT
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(store_schema.MIGRATIONS, 1, half)
    with pytest.raises(Exception, match="disk I/O error"):
        RunStore.open(v1_run, create=False)
    assert _dump(v1_run) == before
    with sqlite3.connect(v1_run / STORE_DIR / DB_NAME) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(evaluations)")]
        assert "series" not in cols and c.execute("SELECT name FROM sqlite_master WHERE name='series'").fetchone() is None
    monkeypatch.undo()
    with RunStore.open(v1_run, create=False) as store:  # the next open upgrades it
        assert len(store.evaluations(latest_per_checkpoint=False)) == 4


def test_a_report_of_an_upgraded_store_keeps_the_legacy_series_apart(v1_run, tmp_path, capsys):
    out = tmp_path / "summary.json"
    assert main(["report", str(v1_run), "--format", "json", "--out", str(out), "--quiet"]) == 0
    s = json.loads(out.read_text())
    # the newest evaluation was the live one: its series is the latest; the saved one is listed
    assert s["series"]["key"] == "legacy-live" and [c["checkpoint"] for c in s["checkpoints"]] == ["step-20"]
    assert s["series"]["legacy"] and [o["key"] for o in s["series"]["others"]] == ["legacy"]
    assert main(["report", str(v1_run), "--format", "json", "--out", str(out), "--quiet", "--key", "legacy"]) == 0
    s = json.loads(out.read_text())
    assert [(c["step"], c["n_samples"]) for c in s["checkpoints"]] == [(10, 6), (20, 6), (30, 4)]
    assert s["sampling"] == {"num_samples": None}  # not recorded, and not uniform: no claim is made
    assert [k["checkpoint"] for k in s["skipped"]] == ["checkpoint-40"]
    capsys.readouterr()
    assert main(["status", str(v1_run), "--key", "legacy"]) == 0
    assert "legacy: evaluated before memtrack recorded" in capsys.readouterr().out


def test_a_store_from_a_newer_memtrack_is_still_refused(v1_run):
    with sqlite3.connect(v1_run / STORE_DIR / DB_NAME) as c:
        c.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    for readonly in (False, True):
        with pytest.raises(Exception, match="schema version 3"):
            RunStore.open(v1_run, readonly=readonly)
