"""The API reference is the docstrings: every public name has a runnable example.

For every name in ``ckptfn.__all__``, ``ckptfn.kit.__all__`` (the shell kit) and
``ckptfn.lightning.__all__``, the object's *own* docstring (a class's, not only its
methods' or its module's) must exist and hold at least one doctest example, and
those examples must pass. ``pytest --doctest-modules`` runs them too (pyproject
``addopts``); this test is the gate that fails when an example is missing.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import sys

import pytest

PUBLIC_MODULES = ("ckptfn", "ckptfn.kit", "ckptfn.lightning")

#: Public names that are not classes or functions and cannot carry a docstring of
#: their own; each with the reason. Keep this list minimal.
EXEMPT = {
    "ckptfn.__version__": "a version string (str), not an API object; it cannot carry its own docstring",
    "ckptfn.Action": "a type alias (Save | Periodic | Skip, a types.UnionType); its members Save, "
    "Periodic and Skip are checked themselves",
}

#: Public instances: their class's docstring is checked instead (an instance has none of its own).
INSTANCES = {"ckptfn.MISSING", "ckptfn.kit.REAL"}

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_names() -> list[str]:
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)  # ckptfn.lightning needs lightning (a test dependency)
        names.extend(f"{module_name}.{name}" for name in module.__all__)
    return names


def _resolve(qualified: str) -> object:
    module_name, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module_name), name)  # getattr: lazily loaded names too


def _documented(qualified: str) -> object:
    """The object whose docstring documents ``qualified``."""
    obj = _resolve(qualified)
    return type(obj) if qualified in INSTANCES else obj


def _own_doc(obj: object) -> str | None:
    # A class's own docstring only (not inherited from a base class).
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def _own_doctests(obj: object, qualified: str) -> list[doctest.DocTest]:
    """The doctests of ``obj``'s own docstring, with the globals of the module it reports
    as its home (``__module__``, which is also where ``--doctest-modules`` collects it)."""
    module = sys.modules[obj.__module__]
    finder = doctest.DocTestFinder(recurse=False)
    tests = finder.find(obj, qualified, module=module, globs=dict(vars(module)))
    return [test for test in tests if test.examples]


NAMES = [name for name in _public_names() if name not in EXEMPT]


def test_exemptions_are_public_names_without_a_docstring_of_their_own():
    public = set(_public_names())
    for name in EXEMPT:
        assert name in public, f"{name} is exempt but not public any more: drop the exemption"
        obj = _resolve(name)
        assert not (inspect.isclass(obj) or inspect.isroutine(obj)), f"{name} can have a docstring: document it"
    for name in INSTANCES:
        assert name in public, f"{name} is listed as an instance but not public any more"
        assert not (inspect.isclass(_resolve(name)) or inspect.isroutine(_resolve(name)))


def test_every_public_name_is_a_documented_object_or_exempt():
    for name in NAMES:
        obj = _documented(name)
        assert inspect.isclass(obj) or inspect.isroutine(obj), (
            f"{name} is a {type(obj).__name__}: list it in INSTANCES (its class is documented) "
            "or, with a reason, in EXEMPT"
        )


@pytest.mark.parametrize("qualified", NAMES)
def test_public_name_has_a_docstring_with_an_example(qualified):
    obj = _documented(qualified)
    assert _own_doc(obj), f"{qualified} has no docstring"
    tests = _own_doctests(obj, qualified)
    assert tests and any(">>>" in (test.docstring or "") for test in tests), (
        f"{qualified}: its docstring has no example (a '>>>' doctest of its own, not only its module's "
        "or its methods')"
    )


@pytest.mark.parametrize("qualified", NAMES)
def test_public_name_examples_pass(qualified):
    obj = _documented(qualified)
    tests = _own_doctests(obj, qualified)
    if not tests:
        pytest.fail(f"{qualified}: no example to run")
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report: list[str] = []
    failed = attempted = 0
    for test in tests:
        result = runner.run(test, out=report.append)
        failed, attempted = failed + result.failed, attempted + result.attempted
    assert failed == 0, f"{qualified}: {failed} of {attempted} examples failed:\n" + "".join(report)
