"""The CPU thread budget of memtrack's own processes, and of the training command when asked.

Every torch process spins up one thread per core: a sidecar and a training job on the same cores then
fight over every core, and OpenMP's busy-waiting makes both crawl (a scan sharing 2 cores with another
torch process fell from 0.145 to 3.1 s per image). So ``scan``, ``watch`` and ``launch`` resolve a thread
budget and apply it to every thread pool memtrack's process uses, and to the environment its children
inherit.

The rule (``tracking.threads`` / ``--threads`` always wins):

* alone (``scan``): every core this process may use (``os.sched_getaffinity``, so ``taskset``, cgroup
  cpusets and SLURM allocations are respected);
* beside training (``watch``, ``launch``): memtrack takes 1 thread, leaving every other core to training,
  which by default uses all of them; when ``launch --threads-for-training T`` gives each of the P training
  processes T threads, memtrack takes what is left, ``max(1, cores - T * P)``.

Where the budget goes (each was checked to take effect, see ``tests/test_budget.py``): torch's intra-op
and inter-op pools (the inter-op pool only before its first parallel work), faiss's OpenMP pool, every
OpenBLAS already loaded (numpy's own), and ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` in ``os.environ`` -- read by libraries loaded later and by child processes
(torch reads the first two at start-up). The training command never inherits memtrack's budget:
:func:`training_env` gives it the environment memtrack started with, plus its own budget only when asked.

Example:
    >>> budget = resolve(None, beside_training=True)
    >>> applied = apply(budget)        # {"torch": 1, "torch_interop": 1, "faiss": 1, ...}
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from memtrack.errors import ConfigError
from memtrack.utils import get_logger

logger = get_logger(__name__)

#: the variables children (and libraries loaded later) read their thread count from
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: launcher flags that say how many training processes one command starts (accelerate, torchrun)
PROCESS_FLAGS = ("--num_processes", "--nproc_per_node", "--nproc-per-node")
#: (set, get) symbol pairs of OpenBLAS builds: numpy's scipy-openblas (64-bit ints), plain OpenBLAS
_OPENBLAS_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                     ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                     ("openblas_set_num_threads", "openblas_get_num_threads"))

_ORIGINAL_ENV: dict[str, Optional[str]] = {}  # THREAD_ENV as it was before apply() first changed it
_APPLIED_ENV: dict[str, str] = {}              # what apply() last wrote there


@dataclass(frozen=True)
class ThreadBudget:
    """How many threads memtrack's process uses, out of how many cores, and why."""

    threads: int
    cores: int
    reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve(threads: Optional[int], *, beside_training: bool, training_threads: Optional[int] = None,
            training_processes: int = 1, cores: Optional[int] = None) -> ThreadBudget:
    """The budget by the rule in the module doc.

    Args:
        threads: ``tracking.threads`` / ``--threads`` (None: the rule decides).
        beside_training: memtrack shares the machine with a training process (``watch``, ``launch``).
        training_threads: threads given to each training process (``launch --threads-for-training``).
        training_processes: how many processes the training command starts.
        cores: the cores to budget (default :func:`usable_cores`).
    """
    cores = cores or usable_cores()
    if training_threads is not None:
        check_threads(training_threads, "--threads-for-training")
    if threads is not None:
        check_threads(threads, "tracking.threads")
        if threads > cores:
            logger.warning("%d threads on %d usable cores: they will compete with each other", threads, cores)
        return ThreadBudget(threads, cores, "set by --threads / tracking.threads")
    if not beside_training:
        return ThreadBudget(cores, cores, f"alone: all {cores} usable cores")
    if training_threads is None:
        return ThreadBudget(1, cores, f"beside training, which may use all {cores} cores: 1 thread "
                                      "(--threads-for-training T leaves memtrack the rest)")
    used = training_threads * max(1, training_processes)
    return ThreadBudget(max(1, cores - used), cores,
                        f"beside training ({max(1, training_processes)} x {training_threads} threads): "
                        f"the {max(1, cores - used)} of {cores} cores left")


def check_threads(value: int, where: str) -> int:
    """``value`` if it is a usable thread count; a :class:`ConfigError` naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a whole number >= 1, got {value!r}",
                          hint="e.g. --threads 2; leave it unset for the default rule (docs/integrations.md)")
    return value


def training_processes(argv: Sequence[str]) -> int:
    """How many processes a training command starts (``--num_processes`` / ``--nproc_per_node``; 1 if unsaid)."""
    count = 1
    for i, tok in enumerate(argv):
        for flag in PROCESS_FLAGS:
            value = argv[i + 1] if tok == flag and i + 1 < len(argv) else (
                tok.split("=", 1)[1] if tok.startswith(flag + "=") else None)
            if value is not None and value.isdigit() and int(value) > 0:
                count = int(value)
    return count


# ------------------------------------------------------------------------------------------ applying


def apply(budget: ThreadBudget | int) -> dict:
    """Set every thread pool of this process, and the environment its children inherit, to the budget.

    Returns what each pool reports afterwards (``{"torch": n, "torch_interop": n, "faiss": n,
    "openblas": [n, ...], "env": {...}}``), so a caller can see what took effect.
    """
    n = budget.threads if isinstance(budget, ThreadBudget) else check_threads(budget, "threads")
    for var in THREAD_ENV:
        if var not in _APPLIED_ENV or os.environ.get(var) != _APPLIED_ENV[var]:  # not ours: the original
            _ORIGINAL_ENV[var] = os.environ.get(var)
        os.environ[var] = _APPLIED_ENV[var] = str(n)
    import faiss
    import torch

    faiss.omp_set_num_threads(n)  # both, in this order: faiss's OpenMP may be torch's or its own copy
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # only possible before the pool's first parallel work
            logger.info("torch's inter-op pool already started with %d threads; left as it is",
                        torch.get_num_interop_threads())
    applied = {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
               "faiss": faiss.omp_get_max_threads(), "openblas": set_openblas_threads(n),
               "env": {var: os.environ[var] for var in THREAD_ENV}}
    logger.info("thread budget %d (%s): %s", n, getattr(budget, "reason", "given"), applied)
    return applied


def set_openblas_threads(n: int) -> list[int]:
    """Set every OpenBLAS this process has loaded (numpy's, faiss's) to ``n`` threads; their counts after.

    OpenBLAS reads ``OPENBLAS_NUM_THREADS`` only when it is loaded, which for numpy is before any
    budget can be set, so it is set through the library's own call.
    """
    out = []
    for path in _loaded_libraries("openblas"):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                getattr(lib, set_name)(ctypes.c_int(n))
                out.append(int(getattr(lib, get_name)()))
                break
    return out


def _loaded_libraries(fragment: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name contains ``fragment``."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            text = maps.read()
    except OSError:  # not Linux: only the pools reached through torch and faiss are set
        return []
    names = {m.group(1) for m in re.finditer(r"(/\S+\.so[.\d]*)\s*$", text, re.M)}
    return sorted(p for p in names if fragment in os.path.basename(p).lower())


def training_env(environ: Mapping[str, str], training_threads: Optional[int] = None) -> dict:
    """The environment for the training command: ``environ`` without memtrack's own budget, plus
    ``training_threads`` in :data:`THREAD_ENV` when the user asked for one."""
    env = dict(environ)
    for var, original in _ORIGINAL_ENV.items():
        if var not in _APPLIED_ENV or env.get(var) != _APPLIED_ENV[var]:
            continue  # someone set it after memtrack did: theirs, not memtrack's budget
        if original is None:
            env.pop(var, None)
        else:
            env[var] = original
    if training_threads is not None:
        check_threads(training_threads, "--threads-for-training")
        env.update({var: str(training_threads) for var in THREAD_ENV})
    return env


def for_command(cfg, *, beside_training: bool, training_threads: Optional[int] = None,
                training_argv: Sequence[str] = ()) -> tuple[ThreadBudget, dict]:
    """Resolve (from ``cfg.tracking.threads``) and apply the budget of a memtrack command; (budget, applied)."""
    budget = resolve(cfg.tracking.threads, beside_training=beside_training, training_threads=training_threads,
                     training_processes=training_processes(training_argv))
    return budget, apply(budget)
