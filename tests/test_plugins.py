"""A plug-in is one registration: the README's detector example, run through a scan, a report and a gate.

The detector is defined only here (in the README's words); the copycat run (tests/memorizing.py) makes
exact copies of training images, so the detector has positives to find.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import COPYCAT_SCHEDULE
from memtrack.cli.main import main
from memtrack.detectors import registry
from memtrack.sampling import registry as pipelines

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if "register_detector(" in b and "def exact_pixel_copy" in b]
    assert found, "README lost its plug-in example (section 'Adding a detector or an embedder')"
    return found[0]


@pytest.fixture()
def exact_copy(monkeypatch):
    """The README's detector, registered for this test only."""
    registry.list_detectors()  # built-ins first, so the copy holds them
    monkeypatch.setattr(registry, "_DETECTORS", dict(registry._DETECTORS))
    exec(compile(readme_example(), str(README), "exec"), {})
    return registry.get_detector("exact_copy")


def test_the_readme_example_registers_a_complete_spec(exact_copy):
    assert exact_copy is not None and exact_copy.space == "pixel" and exact_copy.reproduction
    assert registry.metric_labels()["exact_copy"] == "exact copies"
    from memtrack.report.text import label

    assert label("exact_copy") == "exact copies (exact_copy)"


def test_a_plugin_detector_is_scanned_reported_and_gated(exact_copy, copycat_run, pixel_index):
    from memorizing import scan_copycat

    results = scan_copycat(copycat_run, pixel_index, num_samples=16)
    # the copycat alternates exact and sigma-0.01 copies: only the exact half is byte-identical
    counts = [r.metrics["exact_copy"]["count"] for r in results]
    assert counts == [(c + 1) // 2 for _, c in sorted(COPYCAT_SCHEDULE.items())]
    assert main(["report", str(copycat_run), "--format", "json", "--quiet"]) == 0
    summary = json.loads((copycat_run / "memtrack" / "summary.json").read_text())
    th = summary["thresholds"]["exact_copy"]
    assert th["citation"] == "memtrack (a sanity check, no paper)" and th["source"] == "memtrack"
    assert summary["onset"]["exact_copy"]["step"] == 300
    assert main(["report", str(copycat_run), "--quiet", "--fail-on", "exact_copy.rate > 0"]) == 1
    assert main(["report", str(copycat_run), "--quiet", "--fail-on", "exact_copy.rate > 0.5"]) == 0


def test_pipeline_builders_are_a_public_registry():
    assert {"unet", "pipeline", "t2i_unet", "t2i_pipeline", "lora"} <= set(pipelines.pipeline_kinds())
    builtin = pipelines.get_pipeline_builder("unet")
    with pytest.raises(ValueError, match="already registered"):
        pipelines.register_pipeline_builder("unet", builtin)
    from memtrack.errors import CheckpointError

    with pytest.raises(CheckpointError, match="known kinds"):
        pipelines.get_pipeline_builder("no_such_kind")


def test_report_rendering_loads_no_model_and_no_index(tmp_path):
    """The renderers read a summary: importing them pulls in neither torch nor faiss."""
    import subprocess
    import sys

    code = ("import sys, memtrack.report.html, memtrack.report.markdown, memtrack.report.terminal, "
            "memtrack.report.text as t; t.label('nn_ratio'); "
            "print(sorted(m for m in ('torch', 'faiss', 'diffusers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout
