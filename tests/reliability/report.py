"""Run the whole reliability suite and print one table.

    python tests/reliability/report.py

Faults injected per kind, bad inputs tried per kind, and for each the unexpected
exceptions (including crashes and hangs), corruptions and data lost, which must
all be 0. ``--quick`` runs the sizes of the pytest suite instead.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile
import time

if __name__ == "__main__":  # run as a script: make `tests` importable, then run the module proper
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from tests.reliability.report import main

    sys.exit(main())

import torch

import ckptfn
from tests.reliability import (
    cli_inputs, concurrency, corners, crashpoints, diskfaults, fuzz, hostile, kill, objectstore, powerloss, statedisk,
)
from tests.reliability.common import Mounts, Tally

SIZES = {
    "full": {"exhaustive": True, "kill_trials": 30, "kill_mib": (8, 64), "race_seconds": 8.0, "examples": 1500,
             "filenames": 300, "mutations": 2400,
             "statedisk": {"epochs": 120, "seeds": (3, 4, 5), "seconds": 6.0, "histories": 60}, "corners": 300,
             "s3_quick": False},
    "quick": {"exhaustive": False, "kill_trials": 12, "kill_mib": (1, 4), "race_seconds": 2.0, "examples": 200,
              "filenames": 80, "mutations": 240,
              "statedisk": {"epochs": 60, "seeds": (3,), "seconds": 3.0, "histories": 15}, "corners": 30,
              "s3_quick": True},
}


def run_all(size: dict, *, progress=print) -> tuple[Tally, dict[str, str], int, dict[str, float], list[str]]:
    """Every part of the suite; returns the tally, the scenarios this machine could not run, the
    versions superseded by two writers of one name, the seconds each part took, and notes."""
    tally, unavailable, seconds, notes = Tally(), {}, {}, []

    def part(name, function):
        started = time.monotonic()
        progress(f"running {name} ...")
        result = function()
        seconds[name] = time.monotonic() - started
        return result

    tally.merge(part("crash points", lambda: crashpoints.run(exhaustive=size["exhaustive"])))
    tally.merge(part("power loss", powerloss.run))
    state_tally, missing = part("state vs disk", lambda: statedisk.run(**size["statedisk"]))
    tally.merge(state_tally)
    unavailable.update(missing)
    tally.merge(part("kills", lambda: kill.run(size["kill_trials"], mib=size["kill_mib"])))
    s3_tally, s3_missing, landed = part("object stores", lambda: objectstore.run(quick=size["s3_quick"]))
    tally.merge(s3_tally)
    unavailable.update(s3_missing)
    if landed:
        notes.append(landed)
    with tempfile.TemporaryDirectory(prefix="ckptfn-report-") as work:
        mounts = Mounts(pathlib.Path(work) / "mounts")
        try:
            unavailable.update(part("disk faults", lambda: diskfaults.run(tally, mounts, pathlib.Path(work))))
        finally:
            mounts.close()
    race, superseded = part("concurrency", lambda: concurrency.run(seconds=size["race_seconds"]))
    tally.merge(race)

    def fuzzers():
        fuzzed = Tally()
        fuzz.fuzz_configs(fuzzed, size["examples"])
        fuzz.fuzz_states(fuzzed, size["examples"])
        fuzz.fuzz_metrics(fuzzed, size["examples"])
        fuzz.fuzz_filenames(fuzzed, size["filenames"])
        fuzz.fuzz_mutations(fuzzed, size["mutations"])
        fuzz.fuzz_pickles(fuzzed, size["examples"])
        fuzz.fuzz_zips(fuzzed, size["examples"])
        return fuzzed

    tally.merge(part("fuzzing", fuzzers))
    tally.merge(part("hostile files", hostile.run))
    tally.merge(part("command line inputs", cli_inputs.run))
    tally.merge(part("async and distributed corners", lambda: corners.run(examples=size["corners"])))
    return tally, unavailable, superseded, seconds, notes


def table(tally: Tally) -> str:
    """One Markdown table: faults, then bad inputs, then the totals."""
    lines = ["| | tried | unexpected exceptions | corruptions | data lost |", "|---|---:|---:|---:|---:|"]
    totals = [0, 0, 0, 0]
    for section, title in (("fault", "**faults injected**"), ("input", "**bad inputs tried**")):
        lines.append(f"| {title} | | | | |")
        for (row_section, kind), row in tally.rows.items():
            if row_section != section:
                continue
            counts = (row.tried, row.unexpected, row.corruption, row.lost)
            nested = kind.startswith("  ")
            totals = [t + (0 if nested and i == 0 else c) for i, (t, c) in enumerate(zip(totals, counts))]
            shown = f"&nbsp;&nbsp;{kind.strip()}" if nested else kind
            lines.append(f"| {shown} | " + " | ".join(str(c) for c in counts) + " |")
    lines.append("| **total** | " + " | ".join(f"**{t}**" for t in totals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the reliability suite and print one table.")
    parser.add_argument("--quick", action="store_true", help="the reduced sizes of the pytest suite")
    parser.add_argument("--write-readme", action="store_true", help="also write the table into README.md")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    started = time.monotonic()
    tally, unavailable, superseded, seconds, landed = run_all(size, progress=lambda text: print(text, file=sys.stderr))
    header = (f"ckptfn {ckptfn.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
              f"{platform.system()} {platform.release()}, {time.monotonic() - started:.0f} s "
              f"({', '.join(f'{name} {s:.0f} s' for name, s in seconds.items())})")
    print(header)
    print()
    print(table(tally))
    print()
    notes = [f"not run here: {name}: {reason}" for name, reason in unavailable.items()]
    notes.append(f"two writers sharing one overwrite=False name: {superseded} versions replaced before they were "
                 "archived")
    notes += landed
    print("\n".join(notes))
    if args.write_readme:
        from tests.readme_regions import measured_note, write_region

        command = " ".join(["python tests/reliability/report.py", *(sys.argv[1:] if argv is None else argv)])
        write_region("reliability", "\n\n".join([measured_note(command, header), table(tally), "\n".join(notes)]))
    for problem in tally.problems[:30]:
        print("  " + problem)
    return 1 if tally.problems or unavailable else 0
