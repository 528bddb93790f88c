"""scripts/gpu_check.sh on a machine without a GPU: it says so, runs the CPU references, exits 0.

The GPU rows themselves can only run where a GPU is; here the test holds the script to the rest of its
contract: every GPU check is *skipped* (not failed, not silently dropped), the CPU references really ran
and measured something, and a check that fails makes the run fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GPU_ROWS = ("sampling cuda:0 float32", "sampling cuda:0 float16", "sampling cuda:0 bfloat16", "clip cuda fp32",
            "clip cuda fp16", "text-to-image cuda:0", "faiss-gpu", "arcface cuda:0", "sidecar cuda:1")

pytestmark = pytest.mark.timeout(300)


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "rows.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--quick", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("no GPU")
    rows = {r["check"]: r for r in json.loads(out.read_text())}
    assert {rows[name]["status"] for name in GPU_ROWS} == {"skipped"}
    assert all(rows[name]["note"].startswith(("no GPU", "faiss has no GPU")) for name in GPU_ROWS)
    for name in ("environment", "sampling cpu float32", "clip cpu fp32"):
        assert rows[name]["status"] == "ran" and rows[name]["measurement"], rows[name]
    assert "samples/s" in rows["sampling cpu float32"]["measurement"]
    for name in rows:
        assert name in proc.stdout                                  # the printed table has every row
    assert "0 failed" in proc.stdout


def test_a_failing_check_is_a_failed_row_and_exit_code_1(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", mod)             # dataclasses look their module up there
    spec.loader.exec_module(mod)

    def broken(ctx):
        raise RuntimeError("kernel exploded")

    def skipped(ctx):
        raise mod.Skip("no GPU")

    monkeypatch.setattr(mod, "CHECKS", [("broken", broken), ("skipped", skipped)])
    monkeypatch.setattr(mod, "Context", lambda work: None)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert mod.main() == 1
    out = capsys.readouterr().out
    assert "broken" in out and "failed" in out and "RuntimeError: kernel exploded" in out
    assert "0 ran, 1 skipped, 1 failed" in out
