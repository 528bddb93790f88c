"""The CPU thread budget: the default rule, that it reaches every pool, children, and only the right ones.

Budgets are applied in fresh subprocesses: a thread budget is process-wide (and torch's inter-op pool can
only be sized once), so applying one inside the test process would leak into every later test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtrack import budget
from memtrack.config import load_config
from memtrack.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

pytestmark = pytest.mark.timeout(240)


def clean_env(**extra: str) -> dict:
    """The environment with no thread variables (so a child's default is torch's own), memtrack importable."""
    env = {k: v for k, v in os.environ.items() if k not in budget.THREAD_ENV}
    env.update(PYTHONPATH=str(REPO), MEMTRACK_NO_PROGRESS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def run_py(code: str, **extra: str) -> dict:
    proc = subprocess.run([PY, "-c", code], env=clean_env(**extra), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the rule


def test_default_rule_alone_beside_training_and_explicit():
    assert budget.resolve(None, beside_training=False, cores=8).threads == 8
    beside = budget.resolve(None, beside_training=True, cores=8)
    assert beside.threads == 1 and "beside training" in beside.reason
    # launch --threads-for-training 3 with 2 processes on 8 cores: memtrack takes the 2 left
    assert budget.resolve(None, beside_training=True, training_threads=3, training_processes=2, cores=8).threads == 2
    assert budget.resolve(None, beside_training=True, training_threads=8, cores=8).threads == 1  # never 0
    assert budget.resolve(5, beside_training=True, training_threads=2, cores=8).threads == 5    # explicit wins
    assert budget.resolve(None, beside_training=False).cores == len(os.sched_getaffinity(0))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="tracking.threads"):
            budget.resolve(bad, beside_training=False)
    with pytest.raises(ConfigError, match="--threads-for-training"):
        budget.resolve(None, beside_training=True, training_threads=0)


def test_config_field_and_training_process_count():
    assert load_config(None).tracking.threads is None
    assert load_config(None, {"tracking.threads": 3}).tracking.threads == 3
    with pytest.raises(ConfigError, match="tracking.threads must be >= 1"):
        load_config(None, {"tracking.threads": 0})
    with pytest.raises(ConfigError, match="tracking.threads"):
        load_config(None, {"tracking.threads": "many"})
    assert budget.training_processes(["python", "train.py", "--output_dir", "x"]) == 1
    assert budget.training_processes(["accelerate", "launch", "--multi_gpu", "--num_processes", "4", "t.py"]) == 4
    assert budget.training_processes(["torchrun", "--nproc-per-node=8", "t.py"]) == 8


def test_training_env_drops_memtrack_budget_and_adds_the_asked_one(monkeypatch):
    monkeypatch.setitem(budget._ORIGINAL_ENV, "OMP_NUM_THREADS", None)      # unset before memtrack's budget
    monkeypatch.setitem(budget._APPLIED_ENV, "OMP_NUM_THREADS", "1")
    monkeypatch.setitem(budget._ORIGINAL_ENV, "MKL_NUM_THREADS", "6")       # the user's own value
    monkeypatch.setitem(budget._APPLIED_ENV, "MKL_NUM_THREADS", "1")
    environ = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/bin"}
    assert budget.training_env(environ) == {"MKL_NUM_THREADS": "6", "PATH": "/bin"}
    asked = budget.training_env(environ, 3)
    assert {v: asked[v] for v in budget.THREAD_ENV} == dict.fromkeys(budget.THREAD_ENV, "3")
    assert budget.training_env({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"  # set after memtrack: kept
    with pytest.raises(ConfigError, match="--threads-for-training"):
        budget.training_env(environ, 0)


# ----------------------------------------------------------------------------- what takes effect

POOLS = """
import json, os, sys
from memtrack import budget
applied = budget.apply({n})
import numpy as np, torch, faiss
def os_threads(): return len(os.listdir("/proc/self/task"))
x = np.random.rand(20000, 64).astype("float32")
index = faiss.IndexFlatL2(64); index.add(x); index.search(x[:2000], 5)      # faiss's OpenMP
a = torch.randn(512, 512); (a @ a).sum()                                    # torch intra-op (BLAS)
torch.nn.functional.conv2d(torch.randn(8, 3, 64, 64), torch.randn(8, 3, 3, 3))
b = np.random.rand(600, 600); b @ b                                         # numpy's OpenBLAS
child = [sys.executable, "-c", "import torch, faiss, os; print(torch.get_num_threads(), faiss.omp_get_max_threads(),"
         " os.environ['OMP_NUM_THREADS'])"]
import subprocess
print(json.dumps({{"applied": applied, "os_threads": os_threads(),
                  "child": subprocess.run(child, capture_output=True, text=True).stdout.split()}}))
"""


def test_a_budget_of_one_leaves_one_os_thread_after_torch_faiss_and_numpy_work():
    one = run_py(POOLS.format(n=1))
    assert one["applied"]["torch"] == one["applied"]["torch_interop"] == one["applied"]["faiss"] == 1
    assert one["applied"]["openblas"] and set(one["applied"]["openblas"]) == {1}    # numpy's OpenBLAS found
    assert one["os_threads"] == 1, one          # no pool started a thread: the budget took effect everywhere
    two = run_py(POOLS.format(n=2))             # the same work with 2 threads does start pool threads
    assert two["os_threads"] > 1 and two["applied"]["faiss"] == 2


@pytest.fixture(scope="module")
def torch_default() -> int:
    """torch's thread count in a child with no thread variables (it caps them at the core count)."""
    out = subprocess.run([PY, "-c", "import torch; print(torch.get_num_threads())"], env=clean_env(),
                         capture_output=True, text=True, timeout=120).stdout
    return int(out.strip())


def test_a_child_process_started_by_memtrack_sees_the_budget(torch_default):
    if torch_default < 2:
        pytest.skip("one core: a budget of 1 is the default, so a child could not tell")
    n = 1
    got = run_py(POOLS.format(n=n))
    assert got["child"] == [str(n), str(n), str(n)], got


# ---------------------------------------------------------------------------------- launch, end to end

CHILD = """
import json, os, sys
import torch
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
seen = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
json.dump({"torch": torch.get_num_threads(), "env": seen}, open(os.path.join(out, "threads.json"), "w"))
"""


def _launch(tmp_path: Path, index: Path, *flags: str) -> tuple[dict, str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    cmd = [PY, "-m", "memtrack", "launch", "--index", str(index), *flags, "--", PY, str(script),
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=clean_env(MEMTRACK_VERBOSITY="info"), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "threads.json").read_text()), proc.stderr


def test_launch_budgets_the_training_command_only_when_asked(tmp_path, pixel_index, torch_default):
    if torch_default < 2:
        pytest.skip("one core: a budget of 1 is the default, so the training command could not tell")
    untouched, log = _launch(tmp_path, pixel_index)
    assert untouched == {"torch": torch_default, "env": dict.fromkeys(budget.THREAD_ENV)}  # memtrack's 1 not inherited
    assert "thread budget 1 (beside training" in log                                       # the sidecar's own
    n = 1
    asked, log = _launch(tmp_path, pixel_index, "--threads-for-training", str(n), "--threads", "2")
    assert asked == {"torch": n, "env": dict.fromkeys(budget.THREAD_ENV, str(n))}
    assert "thread budget 2 (set by --threads" in log
