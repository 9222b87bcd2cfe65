"""``ckptfn verify``: is every byte of each checkpoint still the one written (``ckptfn.io.verify``)?

One line per checkpoint, then a summary; exit status 0 only when every checkpoint
is intact, 1 when any is damaged (or none was found), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Iterable

import attrs

from ckptfn.cli.errors import UserError, human_size, printable
from ckptfn.io.verify import Verdict, verify_checkpoints

__all__ = ["cmd_verify", "format_verdict"]



def _what_was_checked(verdict: Verdict) -> str:
    names = {"crc32": f"crc32 of {verdict.records} records", "read": f"{human_size(verdict.bytes_read)} read",
             "load": "loads with weights_only"}
    return ", ".join(names.get(check, check) for check in verdict.checked)


def format_verdict(verdict: Verdict) -> str:
    """One line: OK or DAMAGED, the path, what was checked, then the problems (and notes).

    >>> print(format_verdict(Verdict("run/best.pt", "full", ["structure", "crc32", "read"],
    ...                              ["'archive/data/0': CRC32 mismatch"], records=7, bytes_read=4096)))
    DAMAGED  run/best.pt  (structure, crc32 of 7 records, 4.0 KiB read): 'archive/data/0': CRC32 mismatch
    """
    line = f"{'OK' if verdict.ok else 'DAMAGED':<8} {verdict.path}  ({_what_was_checked(verdict)})"
    details = list(verdict.problems) + [f"note: {note}" for note in verdict.notes]
    return printable(line + (": " + "; ".join(details) if details else ""))


def _summary(verdicts: Iterable[Verdict], level: str) -> str:
    verdicts = list(verdicts)
    damaged = sum(not verdict.ok for verdict in verdicts)
    noun = "checkpoint" if len(verdicts) == 1 else "checkpoints"
    return f"verified {len(verdicts)} {noun} ({level}): {len(verdicts) - damaged} intact, {damaged} damaged"


def _check_paths(paths: Iterable[str]) -> None:
    for name in paths:
        if not os.path.lexists(name):
            raise UserError(f"{name}: no such file or directory")  # UserError escapes it


def cmd_verify(args: argparse.Namespace) -> int:
    _check_paths(args.paths)
    level = "structure" if args.structure else "full"
    verdicts = []
    for verdict in verify_checkpoints(map(pathlib.Path, args.paths), level=level):
        verdicts.append(verdict)
        if not args.json:
            print(format_verdict(verdict), flush=True)
    if args.json:
        print(json.dumps([attrs.asdict(verdict) for verdict in verdicts], indent=2))
    if not verdicts:
        print(f"ckptfn verify: no checkpoints found in {printable(', '.join(args.paths))}", file=sys.stderr)
        return 1
    if not args.json:
        print(_summary(verdicts, level))
    return 0 if all(verdict.ok for verdict in verdicts) else 1
