"""The README's measured tables sit in marked regions that the measuring scripts write.

No figure in these tables is copied by hand: ``tests/benchmarks/run.py --write-readme``,
``tests/reliability/report.py --write-readme`` and ``tests/benchmarks/lightning_bytes.py
--write-readme`` write them (see tests/readme_regions.py).
These tests check that every region is well-formed and parses, that the tables are
consistent with themselves, and that replacing a region touches nothing else.
"""

from __future__ import annotations

import datetime
import re

import pytest

from tests.benchmarks import hf_bytes, lightning_bytes, remote_read
from tests.benchmarks.measure import COLUMNS, Row, render
from tests.readme_regions import (
    README,
    RegionError,
    find_regions,
    measured_note,
    parse_table,
    region_table,
    replace_region,
    write_region,
)

TEXT = README.read_text(encoding="utf-8")
RELIABILITY_COLUMNS = ("", "tried", "unexpected exceptions", "corruptions", "data lost")
#: Each region, the script that writes it, and the header of its table.
EXPECTED = {
    "benchmark": ("tests/benchmarks/run.py", COLUMNS),
    "benchmark-again": ("tests/benchmarks/run.py", COLUMNS),
    "reliability": ("tests/reliability/report.py", RELIABILITY_COLUMNS),
    "lightning-bytes": ("tests/benchmarks/lightning_bytes.py", lightning_bytes.COLUMNS),
    "remote-read": ("tests/benchmarks/remote_read.py", remote_read.COLUMNS),
    "hf-bytes": ("tests/benchmarks/hf_bytes.py", hf_bytes.COLUMNS),
    "step-time": ("tests/benchmarks/step_time.py", COLUMNS),
}
NOTE = re.compile(r"Measured (\d{4}-\d{2}-\d{2}) with `python (\S+)( [^`]*)?`: ckptfn \S+")


# --- the README's regions ------------------------------------------------------------------------


def test_every_region_has_one_matching_end_and_a_unique_name():
    regions = find_regions(TEXT)
    begins = re.findall(r"^<!-- begin: (\S+) -->$", TEXT, flags=re.M)
    ends = re.findall(r"^<!-- end: (\S+) -->$", TEXT, flags=re.M)
    assert begins == ends == list(regions)
    assert len(set(begins)) == len(begins)


def test_the_expected_regions_exist():
    assert set(find_regions(TEXT)) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_region_holds_a_note_and_one_table_that_parses(name):
    script, header = EXPECTED[name]
    body = find_regions(TEXT)[name].body
    table = parse_table(body)
    assert table.header == header
    assert table.rows, f"region {name!r} has an empty table"
    note = NOTE.match(body.splitlines()[0])
    assert note, f"region {name!r} must start with the line measured_note() writes"
    assert note.group(2) == script
    datetime.date.fromisoformat(note.group(1))


@pytest.mark.parametrize("name", ["benchmark", "benchmark-again"])
def test_the_benchmark_tables_are_consistent_with_their_targets(name):
    table = region_table(TEXT, name)
    ids = table.column("#")
    assert len(set(ids)) == len(ids) and ids[0] == "0"
    for cells in table.rows:
        row = dict(zip(table.header, cells))
        assert Row(row["#"], row["measurement"], float(row["ratio"]), row["target"]).met == row["met"], cells
        assert row["detail"], cells


def test_the_reliability_totals_are_the_sums_of_its_rows():
    table = region_table(TEXT, "reliability")
    *rows, total = table.rows
    assert total[0] == "**total**"
    sums = [0, 0, 0, 0]
    for kind, *counts in rows:
        if kind.startswith("**"):  # a section heading: no counts
            assert counts == ["", "", "", ""]
            continue
        nested = kind.startswith("&nbsp;")  # "of which ...": part of the row above, not added to "tried"
        for index, count in enumerate(counts):
            if not (nested and index == 0):
                sums[index] += int(count)
    assert [int(cell.strip("*")) for cell in total[1:]] == sums


def test_the_lightning_bytes_ratios_are_bytes_over_checkpoint_size():
    table = region_table(TEXT, "lightning-bytes")
    assert table.column("setup") == list(lightning_bytes.SETUPS.values())
    for cells in table.rows:
        row = dict(zip(table.header, cells))
        written, size = (int(row[key].replace(",", "")) for key in ("bytes written", "one checkpoint (bytes)"))
        assert f"{written / size:.2f}" == row["checkpoints written"], cells


# --- replacing a region ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_replacing_a_region_with_its_own_body_gives_the_same_readme(name):
    assert replace_region(TEXT, name, find_regions(TEXT)[name].body) == TEXT


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_replacing_a_region_changes_only_that_region(name):
    before = find_regions(TEXT)
    body = "Measured 2000-01-01 with `python x.py`: ckptfn 0\n\n| a | b |\n|---|---:|\n| 1 | 2 |"
    new = replace_region(TEXT, name, body)
    after = find_regions(new)
    assert list(after) == list(before)
    assert after[name].body == body
    assert new[: after[name].start] == TEXT[: before[name].start]
    assert new[after[name].end :] == TEXT[before[name].end :]
    assert all(after[other].content == before[other].content for other in before if other != name)
    assert parse_table(after[name].body).rows == (("1", "2"),)


def test_write_region_writes_the_file_and_refuses_a_body_without_a_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- begin: t -->\n\nold\n\n<!-- end: t -->\n\nafter\n")
    write_region("t", "| a |\n|---|\n| 1 |", readme)
    assert readme.read_text() == "# x\n\n<!-- begin: t -->\n\n| a |\n|---|\n| 1 |\n\n<!-- end: t -->\n\nafter\n"
    with pytest.raises(RegionError, match="no table"):
        write_region("t", "no table here", readme)
    with pytest.raises(RegionError, match="no region 'u'"):
        write_region("u", "| a |\n|---|\n| 1 |", readme)
    assert parse_table(find_regions(readme.read_text())["t"].body).rows == (("1",),)
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left


# --- malformed regions and tables are errors, not silence --------------------------------------

REGION = "<!-- begin: {0} -->\n\n| a |\n|---|\n| 1 |\n\n<!-- end: {0} -->\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- begin: a -->\n| a |\n", "region 'a' has no '<!-- end: a -->'"),
        ("x\n<!-- end: a -->\n", "end of 'a', but no region is open"),
        ("<!-- begin: a -->\n<!-- begin: b -->\n<!-- end: b -->\n<!-- end: a -->\n", "'b' begins inside region 'a'"),
        ("<!-- begin: a -->\n<!-- end: b -->\n", "end of 'b', but region 'a' is open"),
        (REGION.format("a") + REGION.format("a"), "a second region named 'a'"),
        ("<!-- begin: Bench mark -->\n<!-- end: Bench mark -->\n", "malformed marker"),
        ("<!--begin: a-->\n", "malformed marker"),
    ],
)
def test_malformed_markers_are_reported(text, message):
    with pytest.raises(RegionError, match=re.escape(message)):
        find_regions(text)


@pytest.mark.parametrize(
    "body, message",
    [
        ("just text", "no table"),
        ("| a | b |\n| 1 | 2 |", "no header separator"),
        ("| a | b |\n|---|---|\n| 1 |", "1 cells where the header has 2"),
        ("| a | b |\n|---|\n| 1 | 2 |", "the separator has 1 cells where the header has 2"),
        ("| a |\n|---|\n\n| b |\n|---|", "more than one table"),
        ("note\n| a |\n|---|", "must follow a blank line"),
        ("| a |\n|---|\n| 1", "not a table row"),
    ],
)
def test_malformed_tables_are_reported(body, message):
    with pytest.raises(RegionError, match=re.escape(message)):
        parse_table(body)


def test_cells_may_hold_escaped_pipes_and_alignment_colons():
    table = parse_table("| a | b |\n|:---|---:|\n| x \\| y | `2` |")
    assert table.header == ("a", "b") and table.rows == (("x \\| y", "`2`"),)


# --- the scripts' renderers write tables that parse --------------------------------------------


def test_the_benchmark_renderer_writes_a_table_that_parses():
    rows = [Row("1", "a / b", 1.02, "<= 1.05", "a 1.0 s, b 0.98 s"), Row("2", "c / d", 0.5)]
    body = measured_note("python tests/benchmarks/run.py --write-readme", "ckptfn 0.1.0 benchmarks: ...")
    table = parse_table(body + "\n\n" + render(rows))
    assert table.header == COLUMNS
    assert table.rows == (("1", "a / b", "1.020", "<= 1.05", "yes", "a 1.0 s, b 0.98 s"), ("2", "c / d", "0.500", "report", "-", ""))
    assert NOTE.match(body)


def test_the_reliability_renderer_writes_a_table_that_parses():
    from tests.reliability.common import Tally
    from tests.reliability.report import table as render_tally

    tally = Tally()
    tally.tried("fault", "SIGKILL of a training process", 3)
    tally.tried("fault", "  of which during a write", 2)
    tally.tried("input", "step: metric mappings", 5)
    tally.problem("input", "step: metric mappings", "unexpected", "boom")
    table = parse_table(render_tally(tally))
    assert table.header == RELIABILITY_COLUMNS
    assert table.rows[-1] == ("**total**", "**8**", "**1**", "**0**", "**0**")
    assert ("&nbsp;&nbsp;of which during a write", "2", "0", "0", "0") in table.rows


def test_the_benchmark_script_writes_its_region(tmp_path, monkeypatch):
    import tests.readme_regions
    from tests.benchmarks import run

    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n<!-- begin: benchmark -->\n\n<!-- end: benchmark -->\n\nrest\n")
    monkeypatch.setattr(tests.readme_regions, "README", readme)
    arguments = ["--mb", "1", "--repeat", "2", "--epochs", "200", "--only", "5", "--dir", str(tmp_path)]
    assert run.main([*arguments, "--write-readme"]) == 0
    body = find_regions(readme.read_text())["benchmark"].body
    assert NOTE.match(body).group(2) == "tests/benchmarks/run.py"
    assert " ".join(arguments) in body.splitlines()[0]
    assert parse_table(body).column("#") == ["5a", "5b"]
    assert readme.read_text().startswith("intro\n\n") and readme.read_text().endswith("\n\nrest\n")
