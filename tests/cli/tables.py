"""Reading the ``ckptfn inspect`` table in tests: its rows without the header, rule and footer."""

from __future__ import annotations


def table_rows(out: str) -> list[str]:
    """The body rows of an inspect table (the footer, ``N names, M snapshots, ...``, left out)."""
    lines = out.splitlines()[2:]
    if lines and " on disk" in lines[-1] and lines[-1][:1].isdigit():
        lines = lines[:-1]
    return lines


def footer(out: str) -> str:
    """The footer line of an inspect table ('' when it has none)."""
    last = out.splitlines()[-1] if out else ""
    return last if " on disk" in last and last[:1].isdigit() else ""
