"""The package's layers: the library and the command line's core never import the experiments (``kvmap.eval``)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvmap"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_nothing_outside_eval_imports_eval():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "eval") in path.parents:
            continue
        bad = sorted(n for n in imported_modules(path) if n == "kvmap.eval" or n.startswith("kvmap.eval."))
        if bad:
            offenders[str(path.relative_to(PACKAGE.parent))] = bad
    assert not offenders, offenders


def test_the_measurement_commands_come_in_through_the_plugin_group():
    from kvmap.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"eval", "bench", "report", "remember", "ask"} <= set(commands)
