"""The run store: SQLite (WAL) in ``<run>/memtrack/``, one transaction per checkpoint, resumable.

An evaluation is keyed by the checkpoint's name and an *evaluation key*: the hash of the checkpoint's
weights and of its *series key*. The series key hashes everything else an evaluation was computed from --
the sampling plan and config, the scheduler actually used, the detector config, the reference index's
content hash, the probes (see :meth:`memtrack.scan.tracker.Tracker.series_identity`) -- so the evaluations of
one series are the points of one curve, and a report never draws two series on one curve. Each row names
its series; the ``series`` table keeps what each series key was computed from.

Re-running a scan skips checkpoints already evaluated with the same key and re-evaluates those whose key
changed. Everything one checkpoint produces (the evaluation row, its metrics, its per-sample rows, its
series entry) is written in one transaction, so a kill leaves either all of it or none of it. Sample
thumbnails are PNG files written atomically before the transaction; a thumbnail without a row is harmless
and is overwritten on the next attempt. Older stores are upgraded in place when opened
(:mod:`memtrack.store.schema`).

The folder is named ``memtrack`` -- never ``checkpoint*``, which diffusers' scripts parse and delete.
"""
from __future__ import annotations

import functools
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from memtrack.errors import StoreError
from memtrack.store.schema import (LEGACY, SCHEMA_VERSION, check_version, prepare_schema, stored_version,  # noqa: F401
                           upgradable)
from memtrack.utils import get_logger

logger = get_logger(__name__)

STORE_DIR = "memtrack"
DB_NAME = "store.sqlite"


def _reads(fn):
    """A read sqlite refuses (a damaged page, a file removed underneath) is a StoreError, not a traceback."""
    @functools.wraps(fn)
    def read(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read the run store {self.folder}: {exc}",
                             hint="the file may be damaged; `PRAGMA integrity_check` tells, and a copy can be "
                                  "moved aside to start over") from None
    return read


@dataclass
class Series:
    """One evaluation series of a run: its key, what it was computed from, and what it holds."""

    key: str
    identity: dict
    n_checkpoints: int = 0
    n_samples: list = field(default_factory=list)
    n_skipped: int = 0
    first_evaluated: Optional[float] = None
    last_evaluated: Optional[float] = None

    @property
    def legacy(self) -> bool:
        """Recorded before series existed: what it was computed from is unknown, and may vary."""
        return bool(self.identity.get("legacy"))

    def to_dict(self) -> dict:
        return {**dict(self.__dict__), "legacy": self.legacy}


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
    series: str = LEGACY
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
                conn = cls._open_readonly(db, run_dir)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(db, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                prepare_schema(conn, db)
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

    @classmethod
    def _open_readonly(cls, db: Path, run_dir) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
        try:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                # a process killed before its first commit leaves an empty database: nothing stored yet
                raise StoreError(f"no memtrack results in {run_dir} yet ({db} is empty)",
                                 hint="run (or resume) `memtrack scan RUN --index DIR` first")
            version = stored_version(conn)  # sqlite opens lazily: read now, fail now
            if version is None:
                raise StoreError(f"cannot open the run store {db}: it is not a memtrack run store (no schema "
                                 "version)", hint="move it aside, or pass the folder of a memtrack store")
            if upgradable(version):  # an older store: upgrade it in place, then read it
                conn.close()
                _upgrade_for_reading(db, version)
                return cls._open_readonly(db, run_dir)
            check_version(version, db)
        except BaseException:
            conn.close()
            raise
        return conn

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

    @_reads
    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # ------------------------------------------------------------------------------------ writing
    @_reads
    def find(self, checkpoint: str, eval_key: str) -> Optional[Evaluation]:
        row = self.conn.execute("SELECT * FROM evaluations WHERE checkpoint=? AND eval_key=?",
                                (checkpoint, eval_key)).fetchone()
        return self._evaluation(row) if row else None

    def is_done(self, checkpoint: str, eval_key: str) -> bool:
        return self.find(checkpoint, eval_key) is not None

    def record(self, *, step: int, checkpoint: str, weights: str | None, eval_key: str, metrics: dict,
               samples: list[dict], info: dict, duration_s: float | None = None, series: str = LEGACY,
               series_identity: dict | None = None) -> int:
        """Store one finished evaluation (its row, metrics and samples) in a single transaction.

        ``series`` is the evaluation's series key and ``series_identity`` what it hashes (kept once per
        series). An evaluation already stored under the same checkpoint and key (``scan --force``, or a
        second writer that evaluated the same state) is replaced in the same transaction: never counted twice.
        """
        with self.transaction() as c:
            c.execute("DELETE FROM evaluations WHERE checkpoint=? AND eval_key=?", (checkpoint, eval_key))
            cur = c.execute(
                "INSERT INTO evaluations (step, checkpoint, weights, eval_key, status, n_samples, created, "
                "duration_s, info, series) VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?, ?)",
                (step, checkpoint, weights, eval_key, len(samples), time.time(), duration_s,
                 json.dumps(info, default=_default), series))
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
            _add_series(c, series, series_identity)
        return int(eval_id)

    def record_skip(self, *, step: int, checkpoint: str, eval_key: str, reason: str, series: str = LEGACY,
                    series_identity: dict | None = None) -> None:
        """Record that a checkpoint was skipped (vanished, half-written, unknown layout): never retried."""
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO evaluations (step, checkpoint, eval_key, status, reason, created, "
                      "series) VALUES (?, ?, ?, 'skipped', ?, ?, ?)",
                      (step, checkpoint, eval_key, reason, time.time(), series))
            _add_series(c, series, series_identity)

    # ------------------------------------------------------------------------------------ reading
    def _evaluation(self, row: sqlite3.Row) -> Evaluation:
        d = dict(row)
        d["info"] = json.loads(d["info"] or "{}")
        return Evaluation(**d)

    @_reads
    def evaluations(self, *, status: str | None = "done", latest_per_checkpoint: bool = True,
                    series: str | None = None) -> list[Evaluation]:
        """Stored evaluations in step order (by default the newest done one per checkpoint).

        ``series``: only that series' evaluations (a report's curve); None: every series.
        """
        where = [(c, v) for c, v in (("status=?", status), ("series=?", series)) if v is not None]
        q = ("SELECT * FROM evaluations" + (" WHERE " + " AND ".join(c for c, _ in where) if where else "")
             + " ORDER BY step, id")
        rows = [self._evaluation(r) for r in self.conn.execute(q, tuple(v for _, v in where))]
        if latest_per_checkpoint:
            latest: dict[str, Evaluation] = {}
            for ev in rows:
                latest[ev.checkpoint] = ev
            rows = sorted(latest.values(), key=lambda e: (e.step, e.id))
        for ev in rows:
            ev.metrics = self.metrics(ev.id)
        return rows

    # ------------------------------------------------------------------------------------- series
    @_reads
    def list_series(self) -> list[Series]:
        """Every series holding an evaluation, the most recently evaluated first."""
        identities = {r["key"]: json.loads(r["identity"]) for r in self.conn.execute("SELECT * FROM series")}
        out = []
        for r in self.conn.execute(
                "SELECT series, count(DISTINCT CASE WHEN status='done' THEN checkpoint END) AS n_ck, "
                "sum(status='skipped') AS n_skip, min(created) AS first, max(created) AS last "
                "FROM evaluations GROUP BY series"):
            counts = [int(x[0]) for x in self.conn.execute(
                "SELECT DISTINCT n_samples FROM evaluations WHERE series=? AND status='done' ORDER BY n_samples",
                (r["series"],))]
            out.append(Series(r["series"], identities.get(r["series"], {}), int(r["n_ck"]), counts,
                              int(r["n_skip"] or 0), r["first"], r["last"]))
        return sorted(out, key=lambda x: -(x.last_evaluated or 0.0))

    @_reads
    def latest_series(self) -> Optional[str]:
        """The series of the newest done evaluation (of the newest skip when nothing was evaluated)."""
        row = self.conn.execute("SELECT series FROM evaluations ORDER BY status='done' DESC, created DESC, id DESC "
                                "LIMIT 1").fetchone()
        return row[0] if row else None

    def resolve_series(self, prefix: str) -> str:
        """The one stored series whose key starts with ``prefix``.

        Raises:
            StoreError: none does, or several do (each is named).
        """
        keys = [x.key for x in self.list_series()]
        hits = [k for k in keys if k == prefix] or [k for k in keys if k.startswith(prefix)]
        if len(hits) == 1:
            return hits[0]
        listed = ", ".join(hits if hits else keys) or "none"
        raise StoreError(f"no evaluation series {prefix!r} in {self.folder}" if not hits else
                         f"{prefix!r} names {len(hits)} evaluation series in {self.folder}: {listed}",
                         hint=f"stored series: {listed}; `memtrack status RUN --json` lists them" if not hits
                         else "give more characters of the key")

    @_reads
    def metrics(self, eval_id: int) -> dict:
        out = {}
        for r in self.conn.execute("SELECT * FROM metrics WHERE eval_id=?", (eval_id,)):
            m = {k: r[k] for k in ("rate", "ci_low", "ci_high", "count", "n")}
            m.update(json.loads(r["extra"]))
            out[r["metric"]] = {k: v for k, v in m.items() if v is not None}
        return out

    @_reads
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


def _add_series(c: sqlite3.Connection, key: str, identity: dict | None) -> None:
    c.execute("INSERT OR IGNORE INTO series (key, identity, created) VALUES (?, ?, ?)",
              (key, json.dumps(identity or {}, default=_default), time.time()))


def _upgrade_for_reading(db: Path, version: int) -> None:
    """Upgrade an older store for a reader, through a short-lived writable connection."""
    try:
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            prepare_schema(conn, db)
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        raise StoreError(f"{db} was written by an older memtrack (schema {version}) and cannot be upgraded here: "
                         f"{exc}", hint="open it once where it is writable (e.g. `memtrack status RUN`), or copy "
                                        "the store folder somewhere writable") from None


def _default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
