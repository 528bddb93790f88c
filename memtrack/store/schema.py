"""The run store's SQLite schema, its version, and the in-place upgrades of older stores.

Version history:

1. ``evaluations`` (one row per checkpoint and evaluation key), ``metrics``, ``samples``, ``meta``.
2. Evaluation series: ``evaluations.series`` names the series key of each row, and the ``series`` table
   keeps what each key was computed from (``identity``, JSON). Rows of a version-1 store join the
   ``legacy`` series (``legacy-live`` for the ``step-N`` states of ``Tracker.step``): what they were
   computed from was not recorded, so they are kept and shown, never mixed with the series after them.

An upgrade runs inside the transaction that opens the store (:func:`prepare_schema`): a failure or a kill
leaves the older store exactly as it was, and the next open tries again.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Callable, Optional

from memtrack.errors import StoreError

SCHEMA_VERSION = 2
#: The series of evaluations recorded before series existed (schema 1), or recorded without one.
LEGACY = "legacy"
LEGACY_LIVE = "legacy-live"

SCHEMA = """
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
    series TEXT NOT NULL DEFAULT 'legacy',
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
CREATE TABLE IF NOT EXISTS series (key TEXT PRIMARY KEY, identity TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS evaluations_step ON evaluations(step);
CREATE INDEX IF NOT EXISTS evaluations_series ON evaluations(series, step)
"""


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """1 -> 2: every evaluation gets a series; the old rows join the legacy ones."""
    conn.execute(f"ALTER TABLE evaluations ADD COLUMN series TEXT NOT NULL DEFAULT '{LEGACY}'")
    conn.execute("UPDATE evaluations SET series=? WHERE weights='live'", (LEGACY_LIVE,))
    conn.execute("CREATE TABLE IF NOT EXISTS series (key TEXT PRIMARY KEY, identity TEXT NOT NULL, "
                 "created REAL NOT NULL)")
    for key, source in ((LEGACY, "saved"), (LEGACY_LIVE, "live")):
        conn.execute("INSERT OR IGNORE INTO series SELECT ?, ?, min(created) FROM evaluations WHERE series=? "
                     "HAVING count(*) > 0", (key, json.dumps({"legacy": True, "source": source}), key))


#: ``{version: the upgrade from it to version + 1}``, applied in order.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_v1}


def stored_version(conn: sqlite3.Connection) -> Optional[int]:
    """The store's schema version; None when it has none (a new or foreign database)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row is not None else None


def check_version(version: int, db: Path) -> None:
    if version != SCHEMA_VERSION:
        raise StoreError(f"{db} has schema version {version}; this memtrack uses {SCHEMA_VERSION}",
                         hint="use the memtrack version that wrote it, or move the store aside")


def upgradable(version: Optional[int]) -> bool:
    return version is not None and version < SCHEMA_VERSION and version in MIGRATIONS


def prepare_schema(conn: sqlite3.Connection, db: Path) -> None:
    """Create the schema, or upgrade an older one, in one transaction: a kill leaves all of it or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = stored_version(conn)
        while upgradable(version):
            MIGRATIONS[version](conn)
            version += 1
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
        if version is not None:
            check_version(version, db)
        for statement in SCHEMA.split(";"):
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
