"""Reading the ``ckptfn inspect`` table in tests: its rows without the header, rule and footer."""

from __future__ import annotations


def _is_footer(line: str) -> bool:
    return line[:1].isdigit() and (" on disk" in line or " in the store" in line)


def table_rows(out: str) -> list[str]:
    """The body rows of an inspect table (the footer, ``N names, M snapshots, ...``, left out)."""
    lines = out.splitlines()[2:]
    if lines and _is_footer(lines[-1]):
        lines = lines[:-1]
    return lines


def footer(out: str) -> str:
    """The footer line of an inspect table ('' when it has none): ``... on disk`` (``... in the store``
    for objects in a store)."""
    last = out.splitlines()[-1] if out else ""
    return last if _is_footer(last) else ""
