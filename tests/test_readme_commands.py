"""The README's two commands work verbatim on a fresh copy of the repository.

The commands are parsed out of README.md (so the README cannot drift) and run
with bash in a copy of the tracked files: the main job first (fresh venv, install,
``ckptfn demo``), then the test command in the same copy.

Two concessions keep this affordable in CI, both outside the commands' text:
- torch is not unpacked again (700 MB): before the commands run, the new venv gets
  a path file exposing *only* the already installed torch distribution and the
  distributions it requires, so the command's ``pip install torch==2.13.0`` finds it
  satisfied; everything else (attrs, toolz, pyyaml, the test extras, ckptfn itself)
  is installed by the commands as on a new machine.
- the nested test run gets ``CKPTFN_NESTED_README_RUN=1``, which makes conftest.py
  collect only a small, fast part of the suite: running the whole suite (and this
  test) again inside itself would double CI time without checking anything new
  about the command (``.ci/run`` runs the same command on the whole suite).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NESTED = "CKPTFN_NESTED_README_RUN"


def readme_command(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- command: {name} -->\s*```bash\n(.*?)\n```", text, flags=re.S)
    assert match, f"README.md has no '{name}' command block"
    return match.group(1).strip()


def _closure(name: str) -> list:
    """The installed distribution ``name`` and, recursively, the distributions it requires."""
    import importlib.metadata
    import re as regex

    seen, todo, found = set(), [name], []
    while todo:
        key = regex.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            distribution = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(distribution)
        for requirement in distribution.requires or ():
            if "extra ==" not in requirement:
                todo.append(regex.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return found


def expose_installed_torch(venv: pathlib.Path, scratch: pathlib.Path) -> None:
    """Make the new venv see the running environment's torch and its requirements, nothing else."""
    only_torch = scratch / "installed-torch"
    only_torch.mkdir()
    for distribution in _closure("torch"):
        site = pathlib.Path(distribution.locate_file(""))
        for top in {pathlib.PurePath(str(f)).parts[0] for f in distribution.files or ()}:
            source, target = site / top, only_torch / top
            if source.exists() and not top.endswith(".pth") and top not in ("..", "bin") and not target.exists():
                target.symlink_to(source)
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    (site_packages / "installed_torch.pth").write_text(str(only_torch) + "\n")


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files belong to the repository")
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


def test_both_commands_are_single_copy_paste_lines():
    for name in ("demo", "tests"):
        command = readme_command(name)
        assert "\n" not in command and command.startswith("python3 -m venv .venv")
    assert readme_command("demo").endswith("ckptfn demo")
    assert "'.[test]'" in readme_command("tests")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- command: tests -->" in ci and 'bash -euo pipefail -c "$command"' in ci


@pytest.mark.skipif(os.environ.get(NESTED) == "1", reason="this is the nested run started by this very test")
def test_readme_commands_run_verbatim_in_a_fresh_copy(tmp_path):
    copy = tmp_path / "ckptfn"
    for name in tracked_files():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    # a clean environment: not the venv this suite runs in
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=path, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    base_python = shutil.which("python3", path=path) or "python3"
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(copy / ".venv")], check=True, env=env)
    expose_installed_torch(copy / ".venv", tmp_path)

    demo = subprocess.run(["bash", "-c", readme_command("demo")], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "Failed to initialize NumPy" not in demo.stderr  # numpy is a dependency: torch finds it
    assert "best values:" in demo.stdout and "$ ckptfn inspect ckpt-demo/run-" in demo.stdout
    assert demo.stdout.count("\nepoch ") == 30
    (run_dir,) = (copy / "ckpt-demo").iterdir()
    assert {"best_loss.pt", "best_concordance.pt", "best_corr.pt", "last.pt"} <= {p.name for p in run_dir.iterdir()}

    tests = subprocess.run(["bash", "-c", readme_command("tests")], cwd=copy, env={**env, NESTED: "1"},
                           capture_output=True, text=True, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert re.search(r"\d+ passed", tests.stdout)
