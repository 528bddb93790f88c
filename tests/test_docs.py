"""The documentation that is generated from code stays current."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "scripts" / "gen_config_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "config.md").read_text() == mod.render(), \
        "docs/config.md is stale: run python scripts/gen_config_doc.py"


def test_readme_quickstart_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for cmd in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert cmd in readme
        assert (ROOT / cmd.split()[1]).is_file()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
