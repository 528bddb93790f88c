"""The process that tests/test_crash.py kills: a watcher-style scan that writes the live report after
every checkpoint, with kill points at named places.

It runs as a fork server so that torch, diffusers and faiss are imported once, not once per trial:

    python tests/crash_worker.py serve         # one JSON spec per stdin line -> fork, wait, one JSON reply
    python tests/crash_worker.py run SPEC.json # one run in this process (for debugging a trial)

A spec names the run, the index, the store folder, an events file, the plan size, and optionally a kill:

    {"phase": "sample", "at": 5}                 # SIGKILL inside the 5th UNet forward (mid-denoising)
    {"phase": "embed", "at": 2, "where": "after"} # inside the 2nd pixel embedding, before/after computing
    {"phase": "store", "at": 2, "stmt": 2}       # 2nd RunStore.record, after its 2nd statement
                                                 # (0: just after BEGIN ... 3: before COMMIT, 4: after COMMIT)
    {"phase": "thumbs", "at": 3}                 # half-way through the 3rd thumbnail's temp file
    {"phase": "report", "at": 2, "where": "torn"} # 2nd report file: half written | before_rename | after_rename
    {"phase": "timer", "delay": 1.3}             # whatever is running 1.3 s after the start

The events file records every phase entered and left (``enter sample checkpoint-20``), every report file
about to be written and written (with its sha256), and the kill point reached, each line prefixed with
the seconds since the start, so the test can tell where a kill landed and which report versions were
complete.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")       # no thread pool in the server: forking stays safe
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MEMTRACK_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402

import memtrack.report.write as report_mod  # noqa: E402
import memtrack.scan.tracker as tracker_mod  # noqa: E402
import memtrack.utils as utils_mod  # noqa: E402
from memtrack.sampling.checkpoints import discover  # noqa: E402
from memtrack.config import Config  # noqa: E402
from memtrack.embedders.pixel import PixelEmbedder  # noqa: E402
from memtrack.store.run_store import RunStore  # noqa: E402

REPORT_FILES = ("report.html", "summary.json")


class Run:
    """One scan + live report with the spec's kill point armed."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.kill = spec.get("kill") or {}
        self.counts: dict[str, int] = {}
        self.t0 = time.monotonic()
        self.record_armed = self.report_armed = False
        self.fd = os.open(spec["events"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # ---------------------------------------------------------------------------------- events, kills
    def note(self, *words) -> None:
        elapsed = f"{time.monotonic() - self.t0:.3f}"
        os.write(self.fd, (" ".join([elapsed, *map(str, words)]) + "\n").encode())

    def die(self, where: str) -> None:
        self.note("kill", self.kill.get("phase"), where)
        os.kill(os.getpid(), signal.SIGKILL)

    def armed(self, phase: str) -> bool:
        """Count a pass through ``phase``'s kill point; True on the pass the spec names."""
        self.counts[phase] = self.counts.get(phase, 0) + 1
        return self.kill.get("phase") == phase and self.counts[phase] == self.kill.get("at")

    def phase(self, name: str, fn, label=lambda *a, **k: ""):
        run = self

        def wrapper(*args, **kwargs):
            tag = label(*args, **kwargs)
            run.note("enter", name, tag)
            out = fn(*args, **kwargs)
            run.note("exit", name, tag)
            return out
        return wrapper

    # ------------------------------------------------------------------------------------- hooks
    def install(self) -> None:
        run = self
        # phases (what was running when a kill landed)
        tracker_mod.sample = self.phase("sample", tracker_mod.sample, lambda ck, *a, **k: ck.name)
        tracker_mod.Tracker.assess = self.phase("embed", tracker_mod.Tracker.assess)
        tracker_mod.Tracker._sample_rows = self.phase("thumbs", tracker_mod.Tracker._sample_rows,
                                                      lambda self_, s, o, ck, key: ck.name)
        RunStore.record = self.phase("store", RunStore.record, lambda self_, **k: k["checkpoint"])
        report_mod.write_report = self.phase("report", report_mod.write_report)

        # sample: inside a UNet forward, i.e. mid-denoising
        unet_forward = diffusers.UNet2DModel.forward

        def forward(self_, *a, **k):
            if run.armed("sample"):
                run.die("unet forward %d" % run.counts["sample"])
            return unet_forward(self_, *a, **k)
        diffusers.UNet2DModel.forward = forward

        # embed: inside the pixel embedder, before or after it computes
        embed = PixelEmbedder.embed

        def embed_hook(self_, images):
            hit = run.armed("embed")
            if hit and run.kill.get("where") == "before":
                run.die("before embedding")
            out = embed(self_, images)
            if hit:
                run.die("after embedding")
            return out
        PixelEmbedder.embed = embed_hook

        # store: between the statements of one record() transaction, or just after its COMMIT
        transaction = RunStore.transaction

        @contextlib.contextmanager
        def tx(self_):
            armed = run.record_armed
            with transaction(self_) as conn:
                yield _Statements(conn, run) if armed else conn
            if armed and run.kill.get("stmt") == 4:
                run.die("after COMMIT")
        RunStore.transaction = tx
        record = RunStore.record

        def record_hook(self_, **k):
            run.record_armed = run.armed("store")
            try:
                return record(self_, **k)
            finally:
                run.record_armed = False
        RunStore.record = record_hook

        # report files: counted as they are handed to atomic_write_bytes (with their sha256)
        atomic_write_bytes = utils_mod.atomic_write_bytes

        def logged_write(path, data):
            name = os.path.basename(path)
            if name not in REPORT_FILES:
                return atomic_write_bytes(path, data)
            sha = hashlib.sha256(data).hexdigest()
            run.note("write", name, sha)
            run.report_armed = run.armed("report")
            atomic_write_bytes(path, data)
            run.report_armed = False
            run.note("wrote", name, sha)
        utils_mod.atomic_write_bytes = logged_write

        # thumbs and report files: torn temp files, kills around the rename
        write_bytes = pathlib.Path.write_bytes

        def write_bytes_hook(self_, data):
            target = _target(self_)
            torn = (run.report_armed and run.kill.get("where") == "torn") or (
                target.endswith(".png") and run.armed("thumbs"))
            if torn:
                with open(self_, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                run.die(f"half-way through {target}")
            return write_bytes(self_, data)
        pathlib.Path.write_bytes = write_bytes_hook

        replace = os.replace

        def replace_hook(src, dst, **kw):
            name = os.path.basename(dst)
            where = run.kill.get("where") if run.report_armed else None
            if where == "before_rename":
                run.die(f"before renaming {name}")
            replace(src, dst, **kw)
            if where == "after_rename":
                run.die(f"after renaming {name}")
        os.replace = replace_hook

        if self.kill.get("phase") == "timer":
            t = threading.Timer(self.kill["delay"], lambda: self.die("timer"))
            t.daemon = True
            t.start()

    # --------------------------------------------------------------------------------------- run
    def __call__(self) -> int:
        spec = self.spec
        torch.set_num_threads(1)
        self.install()
        cfg = Config()
        cfg.sampling.num_samples = spec["num_samples"]
        cfg.sampling.num_inference_steps = spec["steps"]
        cfg.sampling.batch_size = spec["batch_size"]
        self.note("start")
        tracker = tracker_mod.Tracker.from_config(cfg, index=spec["index"], run_dir=spec["run"],
                                                  store_dir=spec["store"])
        try:
            for ck in discover(spec["run"]):
                res = tracker.evaluate(ck)
                self.note("evaluated", ck.name, "cached" if res.cached else "new")
                report_mod.write_report([spec["run"]], index=spec["index"], store_dir=spec["store"], quiet=True)
        finally:
            tracker.close()
        self.note("done")
        return 0


class _Statements:
    """The connection of an armed record(): counts its statements and kills after the chosen one."""

    def __init__(self, conn, run: Run):
        self.conn, self.run, self.n = conn, run, 0
        if run.kill.get("stmt") == 0:
            run.die("just after BEGIN")

    def _count(self) -> None:
        self.n += 1
        if self.run.kill.get("stmt") == self.n:
            self.run.die(f"after statement {self.n}" + (" (before COMMIT)" if self.n == 3 else ""))

    def execute(self, *a):
        out = self.conn.execute(*a)
        self._count()
        return out

    def executemany(self, *a):
        out = self.conn.executemany(*a)
        self._count()
        return out


def _target(tmp: pathlib.Path) -> str:
    """``report.html`` for the temp file ``.report.html.abc123.tmp`` that atomic_path renames onto it."""
    name = tmp.name
    if name.startswith(".") and name.endswith(".tmp"):
        return name[1:].rsplit(".", 2)[0]
    return name


def run_in_child(spec: dict) -> dict:
    """Fork; the child redirects its output to a log and runs the spec; wait and describe how it ended."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            log = os.open(spec["events"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = Run(spec)()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "code": None}
    return {"signal": None, "code": os.WEXITSTATUS(status)}


def warm_up() -> None:
    """Import what the library imports lazily (diffusers' lazy modules, the renderers), so children don't."""
    for name in ("UNet2DModel", "DDIMPipeline", "DDIMScheduler", "DDPMPipeline", "DDPMScheduler"):
        getattr(diffusers, name)
    import memtrack.report.html  # noqa: F401
    import memtrack.report.terminal  # noqa: F401
    import memtrack.sampling.unconditional  # noqa: F401


def serve() -> None:
    warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_in_child(json.loads(line))), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"]:
        sys.exit(Run(json.loads(pathlib.Path(sys.argv[2]).read_text()))())
    else:
        sys.exit(__doc__)
