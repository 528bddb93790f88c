"""Crash safety: SIGKILL a scan that writes a live report after every checkpoint, at 30 points (sampling,
embedding, between the statements of a store write, thumbnails, report files, and at random times),
resume it, and prove that every checkpoint is evaluated exactly once and nothing is lost or torn.

The scan runs in tests/crash_worker.py, a fork server: torch and diffusers are imported once and every
trial is a forked child, so 30 kills + 30 resumes take seconds, not minutes. Each trial:

1. runs the scan in a fresh store with one kill point armed and checks that SIGKILL ended it;
2. right after the kill, checks the store (integrity, each checkpoint all-or-nothing) and the report
   files (absent, the last complete version, or the complete version being written -- never torn);
3. resumes the scan to the end and checks that every checkpoint has exactly one evaluation, equal to an
   uninterrupted reference scan (same samples, same metrics), that checkpoints stored before the kill were
   not sampled again, and that no row is duplicated or orphaned.

``MEMTRACK_CRASH_SEED`` changes the random kill points (the summary line prints the seed used).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_checkpoint

WORKER = Path(__file__).with_name("crash_worker.py")
STEPS = (10, 20, 30)
PLAN = {"num_samples": 4, "steps": 2, "batch_size": 2}
FORWARDS = len(STEPS) * (PLAN["num_samples"] // PLAN["batch_size"]) * PLAN["steps"]  # UNet calls per scan
REPORT_FILES = ("report.html", "summary.json")
PHASE_NAMES = {"sample": "sampling", "embed": "embedding", "store": "store write", "thumbs": "thumbnail write",
               "report": "report write"}

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------------------------- the worker


class Worker:
    """The fork server: send a spec, get back how the child ended."""

    def __init__(self, tmp: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MEMTRACK_NO_PROGRESS="1",
                   PYTHONPATH=os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
        self.stderr = open(tmp / "worker.stderr", "w")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the crash worker died: " + Path(self.stderr.name).read_text()[-2000:])
        return line

    def run(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory, pixel_index):
    tmp = tmp_path_factory.mktemp("crash")
    run = tmp / "run"
    for i, step in enumerate(STEPS):
        write_checkpoint(run, step, seed=i)
    worker = Worker(tmp)
    try:
        yield tmp, run, pixel_index, worker
    finally:
        worker.close()


def _spec(tmp: Path, run: Path, index: Path, name: str, kill: dict | None = None, events: str = "events") -> dict:
    return {"run": str(run), "index": str(index), "store": str(tmp / name), "events": str(tmp / f"{name}.{events}"),
            "kill": kill, **PLAN}


# ------------------------------------------------------------------------------------------- reading back


def _events(path: str) -> list[list[str]]:
    p = Path(path)
    return [ln.split()[1:] for ln in p.read_text().splitlines()] if p.exists() else []


_TABLES = {"meta", "evaluations", "metrics", "samples"}


def _connect(store: Path) -> sqlite3.Connection | None:
    """A read-only connection, or None where no store was made yet.

    A kill before the schema's one transaction commits leaves a database file with no tables at all: that is
    the "none" half of all-or-nothing, an empty store. A file with only some of the tables is torn and is
    reported as such.
    """
    db = store / "store.sqlite"
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        conn.close()
        return None
    assert tables >= _TABLES, f"{db} holds a partial schema: {sorted(tables)}"
    return conn


def _stored(store: Path) -> dict:
    """checkpoint -> (eval_key, status, n_samples, sample sha256s, metrics) of every stored evaluation."""
    conn = _connect(store)
    if conn is None:
        return {}
    out: dict = {}
    try:
        for eid, ck, key, status, n in conn.execute(
                "SELECT id, checkpoint, eval_key, status, n_samples FROM evaluations ORDER BY id"):
            shas = [r[0] for r in conn.execute("SELECT sha256 FROM samples WHERE eval_id=? ORDER BY sample", (eid,))]
            metrics = {r[0]: r[1:] for r in conn.execute(
                "SELECT metric, rate, ci_low, ci_high, count, n, extra FROM metrics WHERE eval_id=?", (eid,))}
            out.setdefault(ck, []).append((key, status, n, shas, metrics))
    finally:
        conn.close()
    return out


def _store_checks(store: Path) -> list[str]:
    """Integrity problems of a store: sqlite's own checks, orphaned or missing rows, torn thumbnails."""
    conn = _connect(store)
    if conn is None:
        return []
    problems = []
    try:
        if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("integrity_check failed")
        if conn.execute("PRAGMA foreign_key_check").fetchall():
            problems.append("foreign_key_check failed")
        for table in ("metrics", "samples"):
            orphans = conn.execute(f"SELECT count(*) FROM {table} WHERE eval_id NOT IN "
                                   "(SELECT id FROM evaluations)").fetchone()[0]
            if orphans:
                problems.append(f"{orphans} orphaned {table} rows")
        for eid, n, got in conn.execute("SELECT e.id, e.n_samples, (SELECT count(*) FROM samples s "
                                        "WHERE s.eval_id=e.id) FROM evaluations e WHERE status='done'"):
            if n != got:
                problems.append(f"evaluation {eid} holds {got} of its {n} samples")
        for (thumb,) in conn.execute("SELECT thumb FROM samples"):
            try:
                with Image.open(store / thumb) as im:
                    im.load()
            except OSError as exc:
                problems.append(f"thumbnail {thumb} is unreadable: {exc}")
    finally:
        conn.close()
    return problems


def _report_versions(events: list[list[str]]) -> dict:
    """name -> (sha of the last complete version or None, sha of the version in flight or None)."""
    done: dict = {}
    flying: dict = {}
    for ev in events:
        if ev[0] == "write":
            flying[ev[1]] = ev[2]
        elif ev[0] == "wrote":
            done[ev[1]] = ev[2]
            flying.pop(ev[1], None)
    return {name: (done.get(name), flying.get(name)) for name in REPORT_FILES}


def _torn_reports(store: Path, events: list[list[str]]) -> list[str]:
    bad = []
    for name, (last, flying) in _report_versions(events).items():
        path = store / name
        sha = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
        allowed = {last} | ({flying} if flying else set())  # last None: no complete version yet, absent is fine
        if sha not in allowed:
            bad.append(f"{name} is neither absent/old nor the new complete file")
    return bad


def _landed(events: list[list[str]]) -> str:
    """Where the kill landed: the deterministic kill point, else the phase entered and not left."""
    for ev in events:
        if ev[0] == "kill" and ev[1] != "timer":
            return PHASE_NAMES[ev[1]]
    open_phases = []
    for ev in events:
        if ev[0] == "enter":
            open_phases.append(ev[1])
        elif ev[0] == "exit" and open_phases:
            open_phases.pop()
    if open_phases:
        return PHASE_NAMES[open_phases[-1]]
    return "setup" if not any(ev[0] == "enter" for ev in events) else "between phases"


# ----------------------------------------------------------------------------------------------- trials


def _kill_plan(rng: random.Random, total_s: float) -> list[dict]:
    """30 kill points: deterministic places (with random call counts) plus random times."""
    plan = [{"phase": "sample", "at": rng.randint(1, FORWARDS)} for _ in range(6)]
    plan += [{"phase": "embed", "at": rng.randint(1, len(STEPS)), "where": w} for w in ("before", "after") * 2]
    plan += [{"phase": "store", "at": rng.randint(1, len(STEPS)), "stmt": s}
             for s in (0, 1, 2, 3, 4, rng.randint(0, 4))]
    plan += [{"phase": "thumbs", "at": rng.randint(1, len(STEPS) * PLAN["num_samples"])} for _ in range(2)]
    plan += [{"phase": "report", "at": rng.randint(1, 2 * len(STEPS)), "where": w}
             for w in ("torn", "before_rename", "after_rename") * 2]
    plan += [{"phase": "timer", "delay": round(rng.uniform(0.0, total_s), 3)} for _ in range(6)]
    return plan


def test_sigkill_anywhere_then_resume_evaluates_every_checkpoint_exactly_once(crash_env, capsys):
    tmp, run, index, worker = crash_env
    seed = int(os.environ.get("MEMTRACK_CRASH_SEED", "20250107"))
    rng = random.Random(seed)

    # the reference: one uninterrupted scan
    ref_spec = _spec(tmp, run, index, "reference")
    assert worker.run(ref_spec) == {"signal": None, "code": 0}, Path(ref_spec["events"] + ".log").read_text()
    reference = _stored(tmp / "reference")
    assert sorted(reference) == [f"checkpoint-{s}" for s in STEPS]
    assert all(len(v) == 1 and v[0][1] == "done" and v[0][2] == PLAN["num_samples"] for v in reference.values())
    total_s = float(Path(ref_spec["events"]).read_text().splitlines()[-1].split()[0])

    stats = Counter()
    landed = Counter()
    for i, kill in enumerate(_kill_plan(rng, total_s)):
        name = f"trial{i:02d}"
        spec = _spec(tmp, run, index, name, kill)
        store = Path(spec["store"])
        ctx = f"trial {i} kill={kill}"

        # 1. run with the kill armed
        end = worker.run(spec)
        events = _events(spec["events"])
        stats["trials"] += 1
        if end["signal"] is None:  # a random time after the scan had finished: nothing to test but resume
            assert kill["phase"] == "timer" and end["code"] == 0, f"{ctx}: {end}"
            stats["finished before the kill"] += 1
        else:
            assert end["signal"] == signal.SIGKILL, f"{ctx}: {end}"
            stats["kills"] += 1
            landed[_landed(events)] += 1

        # 2. right after the kill: the store is intact and all-or-nothing, no report is torn
        problems = _store_checks(store) + _torn_reports(store, events)
        stats["torn or corrupt after kill"] += len(problems)
        assert not problems, f"{ctx}: {problems}"
        committed = {ck for ck, evs in _stored(store).items() if any(e[1] == "done" for e in evs)}
        stats["temp files left"] += sum(1 for _ in store.rglob("*.tmp")) if store.exists() else 0

        # 3. resume to the end
        resume = _spec(tmp, run, index, name, events="resume")
        log = Path(resume["events"] + ".log")
        assert worker.run(resume) == {"signal": None, "code": 0}, f"{ctx}: " + log.read_text()
        problems = _store_checks(store)
        assert not problems, f"{ctx} after resume: {problems}"
        stored = _stored(store)
        lost = [ck for ck in reference if stored.get(ck) != reference[ck]]
        stats["results lost"] += len(lost)
        assert not lost, f"{ctx}: stored {stored} differs from the reference for {lost}"
        assert set(stored) == set(reference), f"{ctx}: extra evaluations {set(stored) - set(reference)}"
        again = Counter(ev[2] for ev in _events(resume["events"]) if ev[:2] == ["enter", "sample"])
        twice = sorted(committed & set(again))
        stats["evaluated twice"] += len(twice)
        assert not twice, f"{ctx}: {twice} were stored before the kill and sampled again"
        assert all(again[ck] == 1 for ck in reference if ck not in committed), f"{ctx}: {again}"
        summary = json.loads((store / "summary.json").read_text())
        assert [c["step"] for c in summary["checkpoints"]] == list(STEPS)
        assert (store / "report.html").read_text().rstrip().endswith("</html>")

    by_phase = ", ".join(f"{phase} {n}" for phase, n in sorted(landed.items()))
    line = (f"crash test (seed {seed}): {stats['trials']} trials, {stats['kills']} SIGKILLs ({by_phase}); "
            f"{stats['finished before the kill']} finished before a random kill; after resume: results lost "
            f"{stats['results lost']}, evaluated twice {stats['evaluated twice']}, torn/corrupt "
            f"{stats['torn or corrupt after kill']}; {stats['temp files left']} orphaned temp files")
    with capsys.disabled():
        print("\n" + line)
    assert stats["kills"] >= 20
    assert {"sampling", "embedding", "store write", "report write"} <= set(landed)


# ----------------------------------------------------------------------- the real processes: scan, watch

REPO = WORKER.parent.parent
CLI_PLAN = ["--num-samples", str(PLAN["num_samples"]), "--steps", str(PLAN["steps"])]
COPIER = WORKER.parent / "scripts" / "copy_checkpoints.py"


class Proc:
    """A real ``python -m memtrack ...`` process whose output lines are collected with their times."""

    ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MEMTRACK_NO_PROGRESS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def __init__(self, args: list[str]):
        import threading
        import time

        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "memtrack", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=self.ENV)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        import time

        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def results(self) -> list[str]:
        return [ln for _, ln in self.lines if ln.strip().startswith("checkpoint-")]

    def kill_after(self, n_results: int, extra_s: float, ready=lambda: True, timeout: float = 120) -> bool:
        """SIGKILL ``extra_s`` after the ``n_results``-th result line (and ``ready()``); False when it ended first."""
        import time

        deadline = time.monotonic() + timeout
        while (len(self.results()) < n_results or not ready()) and self.proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            self.proc.wait(timeout=extra_s)
            return False
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            return True
        finally:
            self.reader.join(10)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        self.stderr = self.proc.stderr.read()
        return code


def _row_ids(store: Path) -> dict:
    conn = _connect(store)
    if conn is None:
        return {}
    try:
        return {ck: eid for eid, ck in conn.execute("SELECT id, checkpoint FROM evaluations WHERE status='done'")}
    finally:
        conn.close()


def _lines_check(ctx: str, lines: list[str], committed: dict) -> None:
    """Every result line of a process: "stored earlier" exactly for what was stored before it started."""
    for ln in lines:
        ck = ln.split()[0]
        assert ("stored earlier" in ln) == (ck in committed), f"{ctx}: {ln!r} (stored before: {sorted(committed)})"


def _chain(ctx: str, start, kills: int, rng: random.Random, per_ck: float, store: Path, reference: dict,
           stats: Counter) -> None:
    """Start the command, SIGKILL it at a random moment, start the same command again, ``kills`` times; then
    let it finish. After each kill the store is intact and keeps every row stored before; at the end it
    holds exactly the reference's evaluations, and no process evaluated a stored checkpoint again."""
    committed: dict = {}
    for k in range(kills + 1):
        proc = start()
        here = f"{ctx}, process {k + 1}"
        if k < kills:
            # after its n-th result line (cached ones come first; the first new one includes diffusers'
            # lazy imports), plus a random part of a checkpoint's time: the kill lands mid-evaluation
            n = min(len(committed) + 1 + rng.randint(0, 1), len(reference) - 1)
            extra = round(rng.uniform(0.0, 1.5 * per_ck), 3)
            killed = proc.kill_after(n, extra)
            stats["kills"] += killed
            here += f" (SIGKILL {extra}s after result line {n})" if killed else " (ended before the kill)"
        else:
            assert proc.finish() == 0, f"{here}: {proc.stderr[-2000:]}"
        _lines_check(here, proc.results(), committed)
        problems = _store_checks(store)
        stats["torn or corrupt after kill"] += len(problems)
        assert not problems, f"{here}: {problems}"
        now = _row_ids(store)
        again = [ck for ck in committed if now.get(ck) != committed[ck]]
        stats["evaluated twice"] += len(again)
        assert not again, f"{here}: {again} were stored before and stored again"
        committed = now
    stored = _stored(store)
    lost = [ck for ck in reference if stored.get(ck) != reference[ck]]
    stats["results lost"] += len(lost)
    assert not lost and set(stored) == set(reference), f"{ctx}: stored {stored} differs from the reference"
    stats["temp files left"] += sum(1 for _ in store.rglob("*.tmp"))


def test_sigkill_the_real_scan_and_watch_processes_then_resume_with_the_same_command(crash_env, tmp_path, capsys):
    """``python -m memtrack scan`` and ``watch`` (beside a process that saves checkpoints), each SIGKILLed
    twice at random moments mid-run and restarted with the same command line."""
    import threading

    tmp, _, index, worker = crash_env
    seed = int(os.environ.get("MEMTRACK_CRASH_SEED", "20250107"))
    rng = random.Random(seed + 1)
    run = tmp_path / "run5"
    for i, step in enumerate((10, 20, 30, 40, 50)):
        write_checkpoint(run, step, seed=i)
    ref_spec = _spec(tmp, run, index, "cli-reference")
    assert worker.run(ref_spec) == {"signal": None, "code": 0}
    reference = _stored(tmp / "cli-reference")
    per_ck = float(Path(ref_spec["events"]).read_text().splitlines()[-1].split()[0]) / len(reference)
    stats = Counter()

    # 1. memtrack scan
    store = tmp_path / "scan-store"
    scan = ["scan", str(run), "--index", str(index), "--store", str(store), *CLI_PLAN]
    _chain("scan", lambda: Proc(scan), 2, rng, per_ck, store, reference, stats)

    # 2. memtrack watch beside a "training" process that saves the same checkpoints one by one
    out, store = tmp_path / "watched", tmp_path / "watch-store"
    trainer = subprocess.Popen([sys.executable, str(COPIER), "--source", str(run), "--output_dir", str(out),
                                "--interval", "0.3", "--linger", "2"], stdout=subprocess.DEVNULL)
    reaper = threading.Thread(target=trainer.wait, daemon=True)  # an unreaped child would look alive to --pid
    reaper.start()
    watch = ["watch", str(out), "--index", str(index), "--store", str(store), *CLI_PLAN, "--pid", str(trainer.pid),
             "--quiet-period", "0.2", "--poll-interval", "0.1"]
    _chain("watch", lambda: Proc(watch), 2, rng, per_ck, store, reference, stats)
    reaper.join(60)
    assert trainer.returncode == 0
    staging = store / "staging"
    assert not staging.exists() or not any(staging.iterdir()), "staged checkpoint files left behind"

    line = (f"crash test of real processes (seed {seed}): {stats['kills']} of 4 scan/watch processes SIGKILLed "
            f"mid-run; after resume: results lost {stats['results lost']}, evaluated twice "
            f"{stats['evaluated twice']}, torn/corrupt {stats['torn or corrupt after kill']}; "
            f"{stats['temp files left']} orphaned temp files")
    with capsys.disabled():
        print("\n" + line)
    assert stats["kills"] >= 2
