"""The step-time benchmark (tests/benchmarks/step_time.py) runs at a tiny size and writes a well-formed table.

A smoke test, so the script cannot rot: it checks the table's shape and that it
lands in its README region, never a timing (no test fails because a machine is
slow or busy).
"""

from __future__ import annotations

import math
import re

import torch

from tests.benchmarks import step_time
from tests.benchmarks.measure import COLUMNS

TARGET = re.compile(r"(<=|>=) (\d+(\.\d+)?)")
TINY = ["--mb", "1", "--every", "3", "--repeat", "2", "--width", "32", "--batch", "4"]


def test_the_step_time_script_prints_and_writes_one_well_formed_table(tmp_path, monkeypatch, capsys):
    import tests.readme_regions
    from tests.readme_regions import README, find_regions, parse_table

    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    before = find_regions(readme.read_text())[step_time.REGION]
    monkeypatch.setattr(tests.readme_regions, "README", readme)
    work = tmp_path / "work"
    work.mkdir()
    arguments = [*TINY, "--threads", "1", "--dir", str(work)]
    threads = torch.get_num_threads()
    try:
        assert step_time.main([*arguments, "--write-readme"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets it for its loop; the test session keeps its own

    header, blank, *table = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("ckptfn ") and "payload 1024 KiB" in header and "`torch.set_num_threads(1)`" in header
    assert "one save every 3 steps" in header and blank == ""
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and table[1] == "|" + "---|" * len(COLUMNS)
    rows = [line.strip("|").split(" | ") for line in table[2:]]
    ids = [row[0].strip() for row in rows]
    assert ids == ["0", "1", "2a", "2b", "3a", "3b", "4a", "4b"]  # 4: the thread with the loop on 1 torch thread
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
    targeted = {row[0].strip() for row in rows if row[3].strip() != "report"}
    assert targeted == {"2a"}

    text = readme.read_text()
    region = find_regions(text)[step_time.REGION]
    note = region.body.splitlines()[0]
    assert note.startswith("Measured ")
    assert f"`python tests/benchmarks/step_time.py {' '.join(arguments)} --write-readme`: ckptfn " in note
    assert parse_table(region.body).header == COLUMNS and len(parse_table(region.body).rows) == len(ids)
    original = README.read_text(encoding="utf-8")
    assert text[: region.start] == original[: before.start] and text[region.end :] == original[before.end :]
    assert list(work.iterdir()) == []  # the benchmark's files are gone
