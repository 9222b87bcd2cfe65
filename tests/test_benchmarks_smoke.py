"""The benchmark suite (tests/benchmarks/run.py) runs at a tiny size and prints a well-formed table.

A smoke test, so the suite cannot rot: it checks the table's shape, never a timing
(no test fails because a machine is slow or busy).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.benchmarks.measure import COLUMNS

REPO = pathlib.Path(__file__).resolve().parents[1]
ROWS = ("0", "1", "1b", "2a", "2b", "2c", "2d", "3a", "3b", "3c", "4a", "4b", "5a", "5b", "6a", "6b", "7a", "7b", "7c", "7d", "8a", "8b")
TARGET = re.compile(r"(<=|>=) (\d+(\.\d+)?)")


@pytest.mark.skipif(
    not (os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/io")),
    reason="the memory and I/O rows read Linux's /proc/self/clear_refs and /proc/self/io",
)
def test_the_benchmark_suite_prints_one_well_formed_table(tmp_path):
    command = [sys.executable, "tests/benchmarks/run.py", "--mb", "1", "--repeat", "2", "--epochs", "2000"]
    result = subprocess.run(command + ["--dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    header, blank, *table = result.stdout.strip().splitlines()
    assert header.startswith("ckptfn ") and "payload 1.0 MiB in 16 float32 tensors" in header and blank == ""
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and table[1] == "|" + "---|" * len(COLUMNS)
    rows = [line.strip("|").split(" | ") for line in table[2:]]
    assert [row[0].strip() for row in rows] == list(ROWS)
    for row in rows:
        assert len(row) == len(COLUMNS), row
        row_id, measurement, ratio, target, met, detail = (cell.strip() for cell in row)
        assert measurement and detail, row
        assert math.isfinite(float(ratio)) and float(ratio) >= 0, row
        if target == "report":
            assert met == "-", row
        else:
            op, bound = TARGET.fullmatch(target).group(1, 2)
            holds = float(ratio) <= float(bound) if op == "<=" else float(ratio) >= float(bound)
            assert met == ("yes" if holds else "no"), row
    assert list(tmp_path.iterdir()) == []  # the benchmark's files are gone


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="the script reads Linux's /proc/self/io")
def test_the_lightning_bytes_script_writes_its_region(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    import tests.readme_regions
    from tests.benchmarks import lightning_bytes
    from tests.readme_regions import README, find_regions, parse_table

    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    before = find_regions(readme.read_text())[lightning_bytes.REGION]
    monkeypatch.setattr(tests.readme_regions, "README", readme)
    work = tmp_path / "work"
    work.mkdir()
    arguments = ["--epochs", "2", "--dir", str(work)]
    assert lightning_bytes.main([*arguments, "--write-readme"]) == 0
    text = readme.read_text()
    region = find_regions(text)[lightning_bytes.REGION]
    note = region.body.splitlines()[0]
    assert note.startswith("Measured ")
    assert f"`python tests/benchmarks/lightning_bytes.py {' '.join(arguments)} --write-readme`" in note
    assert "2 epochs" in note and "Both setups found the same bests" in note
    table = parse_table(region.body)
    assert table.header == lightning_bytes.COLUMNS and len(table.rows) == 2
    ours = float(table.rows[1][3])
    assert 1.9 <= ours <= 2.1  # one write per epoch (checkpoints differ in size by a few percent)
    assert float(table.rows[0][3]) > ours  # the separate callbacks write at least that, and more
    original = README.read_text(encoding="utf-8")
    assert text[: region.start] == original[: before.start] and text[region.end :] == original[before.end :]
    assert list(work.iterdir()) == []  # the fits' files are gone
