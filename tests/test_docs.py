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


def test_every_embedder_option_is_documented():
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "scripts" / "gen_config_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.embedder_rows()
    assert any(r.startswith("| `face.verify` | `true` |") for r in rows)
    undocumented = [r.split("|")[1].strip() for r in rows if not r.rstrip(" |").split("|")[-1].strip()]
    assert not undocumented, f"options without a meaning: {undocumented}"


def test_readme_quickstart_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for cmd in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert cmd in readme
        assert (ROOT / cmd.split()[1]).is_file()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _readme_commands() -> list[list[str]]:
    """Every ``memtrack ...`` command line in the README's code blocks (continuations joined)."""
    import shlex

    text = (ROOT / "README.md").read_text()
    blocks = text.split("```")[1::2]
    lines = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("memtrack "):
                line = line.split("  #")[0].split(" # ")[0]
                lines.append(shlex.split(line)[1:])
    return lines


def test_every_readme_command_parses():
    """The README's commands are accepted by the real argument parser (they are not run: they name files)."""
    from memtrack.cli.main import _parser

    commands = _readme_commands()
    assert len(commands) >= 15
    parser = _parser()
    for argv in commands:
        if argv[:1] == ["launch"]:  # everything after `--` is the training command, passed through
            argv = argv[:argv.index("--")] if "--" in argv else argv
        args = parser.parse_args(argv)
        assert args.command == argv[0], argv
