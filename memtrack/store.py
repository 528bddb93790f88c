"""The run store: SQLite (WAL) in ``<run>/memtrack/``, one transaction per checkpoint, resumable.

An evaluation is keyed by the checkpoint's name and an *evaluation key* (a hash of the checkpoint's
weights fingerprint, the sampling and detector config, and the index fingerprint). Re-running a scan skips
checkpoints already evaluated with the same key and re-evaluates those whose key changed. Everything one
checkpoint produces (the evaluation row, its metrics, its per-sample rows) is written in one transaction,
so a kill leaves either all of it or none of it. Sample thumbnails are PNG files written atomically before
the transaction; a thumbnail without a row is harmless and is overwritten on the next attempt.

The folder is named ``memtrack`` -- never ``checkpoint*``, which diffusers' scripts parse and delete.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .errors import StoreError
from .utils import get_logger

logger = get_logger(__name__)

STORE_DIR = "memtrack"
DB_NAME = "store.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
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


@dataclass
class Evaluation:
    """One stored evaluation of one checkpoint."""

    id: int
    step: int
    checkpoint: str
    weights: Optional[str]
    eval_key: str
    status: str
    reason: Optional[str]
    n_samples: int
    created: float
    duration_s: Optional[float]
    info: dict
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class RunStore:
    """The SQLite store of one run.

    Example:
        >>> store = RunStore.open("runs/ddpm")            # creates runs/ddpm/memtrack/store.sqlite
        >>> store.is_done("checkpoint-500", key)
        >>> store.record(step=500, checkpoint="checkpoint-500", ...)
    """

    def __init__(self, folder: Path, conn: sqlite3.Connection):
        self.folder = folder
        self.conn = conn

    # ------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, run_dir: str | Path, *, folder: str | Path | None = None, create: bool = True,
             readonly: bool = False) -> "RunStore":
        """Open (or create) the store of ``run_dir``; ``folder`` overrides ``<run_dir>/memtrack``."""
        folder = Path(folder) if folder is not None else Path(run_dir) / STORE_DIR
        db = folder / DB_NAME
        if not db.exists() and not create:
            raise StoreError(f"no memtrack results in {run_dir} (missing {db})",
                             hint="run `memtrack scan RUN --index DIR` first")
        conn = None
        try:
            if readonly:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    # a process killed before its first commit leaves an empty database: nothing stored yet
                    raise StoreError(f"no memtrack results in {run_dir} yet ({db} is empty)",
                                     hint="run (or resume) `memtrack scan RUN --index DIR` first")
                cls._check_schema(conn, db, readonly=True)  # sqlite opens lazily: read now, fail now
            else:
                folder.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(db, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                # the whole schema and its version in one transaction: a kill leaves all of it or none
                conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}INSERT OR IGNORE INTO meta VALUES "
                                   f"('schema_version', '{SCHEMA_VERSION}');COMMIT;")
                cls._check_schema(conn, db)
            conn.execute("PRAGMA foreign_keys=ON")
            conn.row_factory = sqlite3.Row
        except (sqlite3.DatabaseError, OSError, StoreError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, OSError):
                raise StoreError(f"cannot create the run store in {folder}: {exc.strerror or exc}",
                                 hint="check that the folder is writable and the disk has space") from None
            raise StoreError(f"cannot open the run store {db}: {exc}",
                             hint="the file may be corrupt or not a memtrack store; move it aside to start over"
                             ) from None
        return cls(folder, conn)

    @staticmethod
    def _check_schema(conn: sqlite3.Connection, db: Path, readonly: bool = False) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None and readonly:
            raise StoreError(f"{db} is not a memtrack run store (it has no schema version)")
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{db} has schema version {row[0]}; this memtrack uses {SCHEMA_VERSION}",
                             hint="use the memtrack version that wrote it, or move the store aside")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit: BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the run store {self.folder} is busy or read-only: {exc}",
                             hint="check the store's permissions and free disk space, and that no other memtrack "
                                  "process has held it for 30 s; results stored before are intact") from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:  # sqlite may already have rolled back (e.g. on SQLITE_FULL)
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError):  # disk full, read-only, constraint: a clear error
                raise StoreError(f"could not write to the run store {self.folder}: {exc}",
                                 hint="check free disk space and permissions; results stored before are intact"
                                 ) from None
            raise

    # ----------------------------------------------------------------------------------- metadata
    def set_meta(self, key: str, value) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # ------------------------------------------------------------------------------------ writing
    def find(self, checkpoint: str, eval_key: str) -> Optional[Evaluation]:
        row = self.conn.execute("SELECT * FROM evaluations WHERE checkpoint=? AND eval_key=?",
                                (checkpoint, eval_key)).fetchone()
        return self._evaluation(row) if row else None

    def is_done(self, checkpoint: str, eval_key: str) -> bool:
        return self.find(checkpoint, eval_key) is not None

    def record(self, *, step: int, checkpoint: str, weights: str | None, eval_key: str, metrics: dict,
               samples: list[dict], info: dict, duration_s: float | None = None) -> int:
        """Store one finished evaluation (its row, metrics and samples) in a single transaction.

        An evaluation already stored under the same checkpoint and key (``scan --force``, or a second
        writer that evaluated the same state) is replaced in the same transaction: never counted twice.
        """
        with self.transaction() as c:
            c.execute("DELETE FROM evaluations WHERE checkpoint=? AND eval_key=?", (checkpoint, eval_key))
            cur = c.execute(
                "INSERT INTO evaluations (step, checkpoint, weights, eval_key, status, n_samples, created, "
                "duration_s, info) VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?)",
                (step, checkpoint, weights, eval_key, len(samples), time.time(), duration_s,
                 json.dumps(info, default=_default)))
            eval_id = cur.lastrowid
            c.executemany(
                "INSERT INTO metrics (eval_id, metric, rate, ci_low, ci_high, count, n, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(eval_id, name, m.get("rate"), m.get("ci_low"), m.get("ci_high"), m.get("count"), m.get("n"),
                  json.dumps({k: v for k, v in m.items()
                              if k not in ("rate", "ci_low", "ci_high", "count", "n")}, default=_default))
                 for name, m in metrics.items()])
            c.executemany(
                "INSERT INTO samples (eval_id, sample, seed, prompt, sha256, thumb, scores, flags, matches) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(eval_id, s["sample"], s["seed"], s.get("prompt"), s.get("sha256"), s.get("thumb"),
                  json.dumps(s["scores"], default=_default), json.dumps(s["flags"], default=_default),
                  json.dumps(s["matches"], default=_default)) for s in samples])
        return int(eval_id)

    def record_skip(self, *, step: int, checkpoint: str, eval_key: str, reason: str) -> None:
        """Record that a checkpoint was skipped (vanished, half-written, unknown layout): never retried."""
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO evaluations (step, checkpoint, eval_key, status, reason, created) "
                      "VALUES (?, ?, ?, 'skipped', ?, ?)", (step, checkpoint, eval_key, reason, time.time()))

    # ------------------------------------------------------------------------------------ reading
    def _evaluation(self, row: sqlite3.Row) -> Evaluation:
        d = dict(row)
        d["info"] = json.loads(d["info"] or "{}")
        return Evaluation(**d)

    def evaluations(self, *, status: str | None = "done", latest_per_checkpoint: bool = True) -> list[Evaluation]:
        """Stored evaluations in step order (by default the newest done one per checkpoint)."""
        q = "SELECT * FROM evaluations" + (" WHERE status=?" if status else "") + " ORDER BY step, id"
        rows = [self._evaluation(r) for r in self.conn.execute(q, (status,) if status else ())]
        if latest_per_checkpoint:
            latest: dict[str, Evaluation] = {}
            for ev in rows:
                latest[ev.checkpoint] = ev
            rows = sorted(latest.values(), key=lambda e: (e.step, e.id))
        for ev in rows:
            ev.metrics = self.metrics(ev.id)
        return rows

    def metrics(self, eval_id: int) -> dict:
        out = {}
        for r in self.conn.execute("SELECT * FROM metrics WHERE eval_id=?", (eval_id,)):
            m = {k: r[k] for k in ("rate", "ci_low", "ci_high", "count", "n")}
            m.update(json.loads(r["extra"]))
            out[r["metric"]] = {k: v for k, v in m.items() if v is not None}
        return out

    def samples(self, eval_id: int) -> list[dict]:
        out = []
        for r in self.conn.execute("SELECT * FROM samples WHERE eval_id=? ORDER BY sample", (eval_id,)):
            d = dict(r)
            for k in ("scores", "flags", "matches"):
                d[k] = json.loads(d[k])
            out.append(d)
        return out

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def thumb_dir(self, eval_key: str, checkpoint: str) -> Path:
        return self.folder / "samples" / checkpoint / eval_key


def _default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
