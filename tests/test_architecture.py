"""The house rules of ARCHITECTURE.md, checked on the source (README "How it is built").

Every module imports only from its own layer's package or from the layers below it, there is no import cycle
(imports inside functions count), and no module takes a ``_private`` name from another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "memtrack"

# Bottom to top. A package may import its own modules and any package of a lower layer.
LAYERS = [
    ["memtrack"],
    ["memtrack.errors"],
    ["memtrack.utils"],
    ["memtrack.config"],
    ["memtrack.budget"],
    ["memtrack.detectors.types"],  # the detectors' vocabulary: imports nothing of memtrack
    ["memtrack.data", "memtrack.store"],
    ["memtrack.embedders"],
    ["memtrack.identity"],
    ["memtrack.detectors"],
    ["memtrack.index"],
    ["memtrack.sampling", "memtrack.probes"],
    ["memtrack.scan"],
    ["memtrack.card"],
    ["memtrack.analysis"],
    ["memtrack.report"],
    ["memtrack.integrations"],
    ["memtrack.demo"],
    ["memtrack.cli"],
    ["memtrack.__main__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) for every memtrack import in the file, nested ones included."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = []
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "memtrack":
                found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "memtrack"]
    return found


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: ``from pkg import mod`` names a module, not an attribute."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return subs or [target]


def unit(mod: str) -> str:
    """The layer unit of a module: the longest name in LAYERS that contains it (memtrack.index.space ->
    memtrack.index)."""
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if any(name in layer for layer in LAYERS):
            return name
    return mod


def layer_of(mod: str) -> int:
    u = unit(mod)
    for i, layer in enumerate(LAYERS):
        if u in layer:
            return i
    raise AssertionError(f"{mod} is in no layer: add its package to LAYERS in {__file__}")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for target, names, _ in imports(p) for t in resolve(target, names, known) if t != m}
            for m, p in known.items()}


def test_every_package_has_a_layer():
    for mod in modules():
        layer_of(mod)


def test_no_upward_or_sideways_import():
    known = modules()
    bad = []
    for mod, path in known.items():
        for target, names, line in imports(path):
            for t in resolve(target, names, known):
                if unit(t) == unit(mod) or t == "memtrack":
                    continue
                if layer_of(t) >= layer_of(mod):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {t}")
    assert not bad, "imports that go up or sideways in the layers:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles)


def test_no_private_name_across_modules():
    known = modules()
    bad = [f"{p.relative_to(ROOT.parent)}:{line} takes {n} from {target}"
           for mod, p in known.items() for target, names, line in imports(p)
           for n in names if n.startswith("_") and not n.startswith("__") and target != mod]
    assert not bad, "private names imported from another module (make them public there):\n" + "\n".join(bad)


def test_root_package_imports_nothing_eagerly():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not top, "memtrack/__init__.py must stay lazy (import memtrack is cheap)"


@pytest.mark.parametrize("rule", [test_no_upward_or_sideways_import, test_no_import_cycle,
                                  test_no_private_name_across_modules])
def test_rules_catch_a_violation(rule, tmp_path, monkeypatch):
    """Each rule fails on a tree that breaks it (a copy of the package with one bad import added)."""
    import shutil

    root = tmp_path / "memtrack"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    bad = {test_no_upward_or_sideways_import: ("errors.py", "from memtrack.report.write import write_report"),
           test_no_import_cycle: ("store/schema.py", "from memtrack.store.run_store import RunStore"),
           test_no_private_name_across_modules: ("scan/check.py", "from memtrack.utils import _hidden")}[rule]
    path = root / bad[0]
    path.write_text(path.read_text() + f"\n\ndef _added():\n    {bad[1]}\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", root)
    with pytest.raises(AssertionError):
        rule()
