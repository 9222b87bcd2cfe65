"""``ckptfn demo`` on a fresh machine: its first line is the demo's, not a warning from torch.

torch warns ``UserWarning: Failed to initialize NumPy`` on import when numpy is missing,
so numpy is a dependency of the package (a fresh install has it); the subprocess below
runs the demo as a user does and reads what comes first on the terminal (stdout and
stderr together).
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_numpy_is_a_dependency_of_the_package():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"numpy\s*(>=|$)", requirement) for requirement in dependencies), dependencies


def test_the_first_line_of_the_demo_is_the_demos(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ckptfn", "demo", "--epochs", "1", "--output-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    first = result.stdout.splitlines()[0]
    assert first == "ckptfn demo: training a tiny regression model for 1 epoch (seed 0)", first
    assert "Warning" not in result.stdout, result.stdout
