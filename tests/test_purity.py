"""The import rule: pure modules import nothing effectful (parsed, not trusted)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import ckptfn

PACKAGE = pathlib.Path(ckptfn.__file__).parent

PURE = {
    "_errors",
    "_strategy",
    "_config",
    "_metrics",
    "_actions",
    "_state",
    "_core",
    "_version",
    "_naming",
    "_metadata",
    "_every",
    "_retention",
    "_decision",
}
EFFECTFUL = {"__init__", "_fs", "_payload", "_executor", "_reading", "_manager", "_async", "demo", "__main__", "_cli", "_history", "_distributed", "_sharded", "lightning", "_peek"}

#: What a pure module may import: the standard library's pure parts and attrs/toolz.
ALLOWED = {
    "__future__",
    "math",
    "numbers",
    "difflib",
    "re",
    "datetime",
    "typing",
    "collections.abc",
    "functools",
    "itertools",
    "attrs",
    "toolz",
    "enum",
    "types",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "compile", "__import__", "breakpoint"}
#: Clock readings (datetime is allowed for formatting given moments, never for reading the clock).
FORBIDDEN_METHODS = {"now", "utcnow", "today", "fromtimestamp", "time", "monotonic", "perf_counter"}


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path.name}: use absolute imports (from ckptfn.x import ...)")
            found.add(node.module)
    return found


def test_every_module_is_classified():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == PURE | EFFECTFUL, "classify new modules as PURE or EFFECTFUL"


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_module_imports_only_pure_things(module):
    path = PACKAGE / f"{module}.py"
    for name in imports_of(path):
        if name.startswith("ckptfn."):
            assert name.removeprefix("ckptfn.") in PURE, f"{module} imports effectful {name}"
        else:
            assert name in ALLOWED, f"{module} imports {name!r}, which is not on the pure allow-list"


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_module_calls_no_effectful_builtins(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert not {f.id for f in calls if isinstance(f, ast.Name)} & FORBIDDEN_CALLS
    assert not {f.attr for f in calls if isinstance(f, ast.Attribute)} & FORBIDDEN_METHODS


def test_the_checker_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom time import time\n")
    assert imports_of(bad) == {"os", "time"}
    assert not ({"os", "time"} <= ALLOWED)
