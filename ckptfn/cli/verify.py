"""``ckptfn verify``: is every byte of each checkpoint still the one written (``ckptfn.io.verify``)?

One line per checkpoint, then a summary; exit status 0 only when every checkpoint
is intact, 1 when any is damaged (or none was found), 2 for a usage error. A path
may be an object-store URL: an object, or a directory whose checkpoint-named objects
are verified (each read whole, in ranges, once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable

import attrs

from ckptfn.cli.errors import UserError, human_size, printable, remote_kind, store_errors
from ckptfn.io.objectstore import is_remote, location
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
        if is_remote(name):
            remote_kind(name)  # an object or a directory, else one line naming the URL
        elif not os.path.lexists(location(name)):
            raise UserError(f"{name}: no such file or directory")  # UserError escapes it


def _verdicts(paths: Iterable[str], level: str):
    """``verify_checkpoints`` of each path in turn (a URL stays a URL); a store's errors are one line."""
    for name in paths:
        with store_errors(name) if is_remote(name) else contextlib.nullcontext():
            yield from verify_checkpoints([location(name)], level=level)


def cmd_verify(args: argparse.Namespace) -> int:
    _check_paths(args.paths)
    level = "structure" if args.structure else "full"
    verdicts = []
    for verdict in _verdicts(args.paths, level):
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
