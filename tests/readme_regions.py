"""Marked regions of README.md that the measuring scripts write, so no figure is copied by hand.

A region is a block of README text between two marker lines, each a line of its own::

    <!-- begin: benchmark -->

    One line saying when, how and where it was measured.

    | # | measurement | ratio | ... |
    |---|---|---|...|
    | 0 | ... |

    <!-- end: benchmark -->

The content is stored in a canonical form (one blank line after the begin marker,
one before the end marker), so writing a region's own body back changes nothing.
``tests/benchmarks/run.py --write-readme``, ``tests/reliability/report.py
--write-readme`` and ``tests/benchmarks/lightning_bytes.py --write-readme`` call
:func:`write_region`; ``tests/test_readme_regions.py``
checks that every region of the README parses.

>>> text = "intro\\n<!-- begin: demo -->\\n\\n| a | b |\\n|---|---:|\\n| 1 | 2 |\\n\\n<!-- end: demo -->\\nrest\\n"
>>> table = parse_table(find_regions(text)["demo"].body)
>>> table.header, table.rows
(('a', 'b'), (('1', '2'),))
>>> new = replace_region(text, "demo", "| a | b |\\n|---|---|\\n| 3 | 4 |")
>>> new.startswith("intro\\n") and new.endswith("rest\\n"), find_regions(new)["demo"].body.splitlines()[-1]
(True, '| 3 | 4 |')
"""

from __future__ import annotations

import datetime
import os
import pathlib
import re
from dataclasses import dataclass

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

#: A marker line; names are lower-case words joined by hyphens.
MARKER = re.compile(r"^<!-- (begin|end): ([a-z0-9]+(?:-[a-z0-9]+)*) -->$", re.M)
#: Anything that looks like a marker, to report misspelled ones instead of ignoring them.
LOOSE_MARKER = re.compile(r"^[ \t]*<!--[ \t]*(begin|end)\b.*$", re.M)
SEPARATOR_CELL = re.compile(r":?-{3,}:?")


class RegionError(ValueError):
    """The README's region markers or a region's table are malformed."""


@dataclass(frozen=True)
class Region:
    """One region: its name, and the offsets of its content in the text (between the marker lines)."""

    name: str
    start: int  # first character after the begin marker's line
    end: int  # first character of the end marker's line
    content: str  # text[start:end]

    @property
    def body(self) -> str:
        """The content without the blank lines around it."""
        return self.content.strip("\n")


@dataclass(frozen=True)
class Table:
    """A parsed Markdown table: the header cells and one tuple of cells per row."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def column(self, name: str) -> list[str]:
        index = self.header.index(name)
        return [row[index] for row in self.rows]


def _line_number(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def find_regions(text: str) -> dict[str, Region]:
    """Every region of ``text`` by name, in order; a ``RegionError`` for unmatched, nested,
    misspelled or duplicated markers."""
    exact = {match.start() for match in MARKER.finditer(text)}
    for loose in LOOSE_MARKER.finditer(text):
        if loose.start() not in exact:
            raise RegionError(f"line {_line_number(text, loose.start())}: malformed marker {loose.group(0).strip()!r}")
    regions: dict[str, Region] = {}
    open_name, open_at = None, 0
    for match in MARKER.finditer(text):
        kind, name = match.groups()
        line = _line_number(text, match.start())
        if kind == "begin":
            if open_name is not None:
                raise RegionError(f"line {line}: region {name!r} begins inside region {open_name!r}")
            if name in regions:
                raise RegionError(f"line {line}: a second region named {name!r}")
            open_name, open_at = name, match.end() + 1  # content starts after the marker's newline
        else:
            if open_name != name:
                expected = f"region {open_name!r} is open" if open_name else "no region is open"
                raise RegionError(f"line {line}: end of {name!r}, but {expected}")
            start = min(open_at, match.start())
            regions[name] = Region(name, start, match.start(), text[start : match.start()])
            open_name = None
    if open_name is not None:
        raise RegionError(f"region {open_name!r} has no '<!-- end: {open_name} -->'")
    return regions


def canonical(body: str) -> str:
    """A region's content as stored: one blank line, the body, one blank line."""
    return "\n" + body.strip("\n") + "\n\n"


def replace_region(text: str, name: str, body: str) -> str:
    """``text`` with region ``name``'s content replaced by ``body``; everything else unchanged."""
    regions = find_regions(text)
    if name not in regions:
        raise RegionError(f"no region {name!r}; the regions are {sorted(regions)}")
    if MARKER.search(body) or LOOSE_MARKER.search(body):
        raise RegionError(f"the new content of region {name!r} contains a region marker")
    region = regions[name]
    return text[: region.start] + canonical(body) + text[region.end :]


def _cells(line: str) -> tuple[str, ...]:
    inner = line.strip()
    if not (inner.startswith("|") and inner.endswith("|")) or len(inner) < 2:
        raise RegionError(f"not a table row (must start and end with '|'): {line!r}")
    return tuple(cell.strip() for cell in re.split(r"(?<!\\)\|", inner[1:-1]))


def parse_table(body: str) -> Table:
    """The one Markdown table in ``body`` (other lines, such as a note, may come before or after it).

    The table must be contiguous, have a header separator as its second line, and the same
    number of cells in every line; otherwise a ``RegionError`` says where it breaks.
    """
    lines = body.splitlines()
    at = [index for index, line in enumerate(lines) if line.lstrip().startswith("|")]
    if not at:
        raise RegionError("no table")
    if at != list(range(at[0], at[-1] + 1)):
        raise RegionError("more than one table, or a table broken by other lines")
    if at[0] > 0 and lines[at[0] - 1].strip():
        raise RegionError("a table must follow a blank line, or Markdown reads it as text")
    table = [_cells(lines[index]) for index in at]
    if len(table) < 2 or not all(SEPARATOR_CELL.fullmatch(cell) for cell in table[1]):
        raise RegionError(f"the table has no header separator (|---|...) under {lines[at[0]]!r}")
    header, _, *rows = table
    for index, row in zip(at[2:], rows):
        if len(row) != len(header):
            raise RegionError(f"{len(row)} cells where the header has {len(header)}: {lines[index]!r}")
    if len(table[1]) != len(header):
        raise RegionError(f"the separator has {len(table[1])} cells where the header has {len(header)}")
    return Table(header, tuple(rows))


def region_table(text: str, name: str) -> Table:
    """The parsed table of region ``name``."""
    regions = find_regions(text)
    if name not in regions:
        raise RegionError(f"no region {name!r}; the regions are {sorted(regions)}")
    return parse_table(regions[name].body)


def measured_note(command: str, facts: str, *, today: datetime.date | None = None) -> str:
    """The line above a written table: when, by which command, and the script's own line of facts."""
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    return f"Measured {today.isoformat()} with `{command}`: {facts}"


def write_region(name: str, body: str, readme: pathlib.Path | str | None = None) -> pathlib.Path:
    """Replace region ``name`` of ``readme`` (default: this repository's README.md) with ``body``, atomically.

    ``body`` must hold one well-formed table; otherwise nothing is written.
    """
    parse_table(body)
    path = pathlib.Path(README if readme is None else readme)
    text = replace_region(path.read_text(encoding="utf-8"), name, body)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path
