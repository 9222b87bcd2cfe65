"""The layer rules, parsed from the source (not trusted):

1. Everything under ``ckptfn/core/`` is pure: it imports only ``ckptfn.core`` and an
   allow-list of pure standard-library parts, attrs and toolz, and calls no
   effectful builtin or clock.
2. Every call that changes the file system is made in ``ckptfn/io/fs.py`` (the seam).
3. Private names of torch and Lightning are used only in their adapter modules.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import ckptfn

PACKAGE = pathlib.Path(ckptfn.__file__).parent
CORE = PACKAGE / "core"
SEAM = PACKAGE / "io" / "fs.py"
#: The one module per dependency allowed to use its private names.
ADAPTERS = {
    "torch": PACKAGE / "io" / "torch_internals.py",
    "lightning": PACKAGE / "integrations" / "lightning_internals.py",
}

#: What a pure module may import besides ``ckptfn.core``.
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
    "zlib",  # crc32 of a long metric name in its default file name: a pure function
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "compile", "__import__", "breakpoint"}
#: Clock readings (datetime is allowed for formatting given moments, never for reading the clock).
FORBIDDEN_METHODS = {"now", "utcnow", "today", "fromtimestamp", "time", "monotonic", "perf_counter"}
#: Calls that change the file system (module, attribute), and the builtin ``open`` for writing.
MUTATING = {
    ("os", name)
    for name in (
        "open", "replace", "rename", "renames", "link", "symlink", "unlink", "remove", "rmdir",
        "removedirs", "mkdir", "makedirs", "fsync", "fdatasync", "truncate", "ftruncate", "chmod", "write",
    )
} | {("shutil", name) for name in ("rmtree", "copy", "copy2", "copyfile", "move", "copytree")} | {
    ("fcntl", "flock"),
    ("fcntl", "lockf"),
}


def core_modules() -> list[pathlib.Path]:
    return sorted(CORE.rglob("*.py"))


def library_modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: pathlib.Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


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


def purity_violations(path: pathlib.Path) -> list[str]:
    """What makes the module at ``path`` impure under rule 1 (empty: pure)."""
    problems = []
    for name in imports_of(path):
        if name == "ckptfn.core" or name.startswith("ckptfn.core."):
            continue
        if name.startswith("ckptfn") or name not in ALLOWED:
            problems.append(f"imports {name}")
    tree = ast.parse(path.read_text())
    for call in (node.func for node in ast.walk(tree) if isinstance(node, ast.Call)):
        if isinstance(call, ast.Name) and call.id in FORBIDDEN_CALLS:
            problems.append(f"calls {call.id}()")
        if isinstance(call, ast.Attribute) and call.attr in FORBIDDEN_METHODS:
            problems.append(f"calls .{call.attr}()")
    return problems


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> module for ``import os``, ``import os as o``, ``from os import replace``."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def mutating_calls(path: pathlib.Path) -> list[str]:
    """The file-system-changing calls the module at ``path`` makes itself (rule 2)."""
    tree = ast.parse(path.read_text())
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if node.args and ast.unparse(node.args[0]) == "os.devnull":
            continue  # redirecting a stream to /dev/null changes no file
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            module = aliases.get(func.value.id, func.value.id)
            if (module, func.attr) in MUTATING:
                found.append(f"{module}.{func.attr} (line {node.lineno})")
        elif isinstance(func, ast.Name) and "." in aliases.get(func.id, ""):
            module, _, attr = aliases[func.id].rpartition(".")
            if (module, attr) in MUTATING:
                found.append(f"{module}.{attr} (line {node.lineno})")
        elif isinstance(func, ast.Name) and func.id == "open" and _opens_for_writing(node):
            found.append(f"open(..., writing) (line {node.lineno})")
    return found


def _opens_for_writing(call: ast.Call) -> bool:
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        return False
    if not isinstance(mode, ast.Constant) or not isinstance(mode.value, str):
        return True  # a computed mode: assume the worst
    return any(flag in mode.value for flag in "wxa+")


def private_uses(path: pathlib.Path, dependency: str) -> list[str]:
    """Uses of ``dependency``'s private names: an attribute or module path segment starting with ``_``."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == dependency:
            names = node.module.split(".") + [alias.name for alias in node.names]
            if any(part.startswith("_") and not part.startswith("__") for part in names):
                found.append(f"from {node.module} import ... (line {node.lineno})")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == dependency and any(p.startswith("_") for p in alias.name.split(".")):
                    found.append(f"import {alias.name} (line {node.lineno})")
        elif (
            dependency == "torch"
            and isinstance(node, ast.Call)
            and "torch" in ast.unparse(node.func)
            and any(k.arg and k.arg.startswith("_") for k in node.keywords)
        ):
            found.append(f"{ast.unparse(node.func)}(_...= private keyword) (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in {dependency, "dcp", "dist"} and dependency == "torch":
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
            if dependency == "lightning" and isinstance(root, ast.Name) and root.id in {"trainer", "pl"}:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


# --- rule 1 ------------------------------------------------------------------------------------


def test_the_core_folder_exists_and_holds_the_decisions():
    names = {path.stem for path in core_modules()}
    assert {"step", "state", "config", "actions", "commit", "snapshot", "naming", "retention"} <= names


@pytest.mark.parametrize("path", core_modules(), ids=_name)
def test_core_modules_are_pure(path):
    assert purity_violations(path) == []


@pytest.mark.parametrize(
    "source, problem",
    [
        ("import torch\n", "imports torch"),
        ("import os\n", "imports os"),
        ("from time import time\n", "imports time"),
        ("import logging\n", "imports logging"),
        ("from ckptfn.io.fs import REAL\n", "imports ckptfn.io.fs"),
        ("import datetime as dt\nx = dt.datetime.now()\n", "calls .now()"),
        ("print('hi')\n", "calls print()"),
    ],
)
def test_the_purity_checker_catches_each_kind_of_violation(tmp_path, source, problem):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    assert problem in purity_violations(bad)


def test_the_purity_checker_accepts_core_imports(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import attrs\nfrom ckptfn.core.state import State\nimport ckptfn.core.naming\n")
    assert purity_violations(good) == []


# --- rule 2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p in library_modules() if p != SEAM], ids=_name)
def test_only_the_seam_changes_the_file_system(path):
    assert mutating_calls(path) == []


def test_the_seam_checker_sees_direct_calls(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, fcntl\nfrom os import replace as swap\nimport shutil\n"
        "os.open('d', 0)\nswap('a', 'b')\nfcntl.flock(3, 2)\nshutil.rmtree('x')\nopen('f', 'wb')\nopen('g', 'rb')\n"
    )
    found = mutating_calls(bad)
    assert [entry.split(" ")[0] for entry in found] == ["os.open", "os.replace", "fcntl.flock", "shutil.rmtree", "open(...,"]
    assert mutating_calls(SEAM), "the seam itself makes the calls"


# --- rule 3 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dependency", sorted(ADAPTERS))
def test_private_names_of_a_dependency_live_in_its_adapter(dependency):
    offenders = {
        _name(path): uses
        for path in library_modules()
        if path != ADAPTERS[dependency] and (uses := private_uses(path, dependency))
    }
    assert offenders == {}
    adapter = ADAPTERS[dependency].read_text()
    assert "checked with" in adapter, "the adapter names the versions it was checked with"


def test_the_private_name_checker_sees_private_uses(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner\n"
        "import torch\nx = torch.utils.serialization.config._config\ny = trainer._checkpoint_connector\n"
        "s = torch.TypedStorage(wrap_storage=u, dtype=d, _internal=True)\n"
    )
    assert len(private_uses(bad, "torch")) == 3 and len(private_uses(bad, "lightning")) == 1
