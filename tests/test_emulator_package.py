"""The emulator stands apart from the client it stands in for: it imports nothing of `exporter`,
so it cannot borrow the client's reading of Adobe's ids and phrases (docs/design.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import aep_emulator

PACKAGE = Path(aep_emulator.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def imported(tree: ast.AST) -> set[str]:
    """Every module an `import` or `from ... import` names, wherever it sits (functions too)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_import_finder_sees_imports_in_functions() -> None:
    tree = ast.parse("def f():\n    from exporter.aep import facts\n    import exporter.clock\n")
    assert imported(tree) == {"exporter.aep", "exporter.clock"}


def test_no_emulator_module_imports_the_exporter() -> None:
    assert len(MODULES) > 10
    offenders = {
        module.name: sorted(
            n for n in imported(ast.parse(module.read_text())) if n.split(".")[0] == "exporter"
        )
        for module in MODULES
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_emulator_module_imports_with_the_exporter_unimportable() -> None:
    """What the source shows, at run time too: with `exporter` blocked, every module loads."""
    names = [f"aep_emulator.{m.stem}" for m in MODULES if m.stem != "__init__"]
    script = (
        "import importlib, sys\n"
        "sys.modules['exporter'] = None\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'exporter'))\n"
    )
    result = subprocess.run(  # noqa: S603 - a fixed script
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['exporter']"  # only the blocking placeholder
