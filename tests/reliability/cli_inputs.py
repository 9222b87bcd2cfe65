"""Odd inputs to the real command line: every one ends in one clear line or a clean row.

    python tests/reliability/cli_inputs.py [--pythonpath DIR]

Each case runs ``python -m ckptfn ...`` in a subprocess (a timeout, an address-space
limit; several at once), so a hang, a blow-up or a traceback stays there and is
reported. Kinds (section ``input``):

- ``replay: odd histories and configs``: CSV and JSON Lines histories with epochs
  that are not whole numbers >= 0, metric values of other types, byte-order marks,
  CRLF, non-UTF-8 bytes, NULs, huge lines, numbers of 5000 digits, nesting 100,000
  deep; configs that are lists of strings, alias bombs ("billion laughs"), cycles,
  odd YAML tags, dates that do not exist; directories, FIFOs, symlink loops and
  missing files at either path; ``--plot`` to a path it cannot write.
- ``inspect: odd metadata and paths``: ckptfn files (plain ``torch.save``) whose
  metadata has ``saves`` null / an int / a list of ints, timestamps that are ints or
  1 MB strings, epochs that are strings or ``10**400``, values that are NaN, dicts or
  5000-digit ints, control characters and ANSI escapes in every string; sharded
  ``.dcp`` directories with odd ``ckptfn.json``; FIFOs, symlink loops, file names
  that are not UTF-8, a directory of 10,000 files.

A problem ("unexpected") is a traceback, a timeout, an exit status other than the
case's (2 for a replay error, 0 for an inspect listing whose odd files get rows),
more than one line on stderr, a control character in stdout or stderr, ``--json``
output that is not strict JSON, or (with ``check_text``) a missing expected text.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tests.reliability.common import Tally

SECTION = "input"
REPLAY = "replay: odd histories and configs"
INSPECT = "inspect: odd metadata and paths"
TIMEOUT = 20.0
MEMORY = 4 * 1024**3  # address space per command


@dataclasses.dataclass
class Case:
    kind: str
    name: str
    argv: list[str]
    status: int  # the exit status the command must end with
    stdout_has: tuple[str, ...] = ()  # texts stdout must hold (the new behaviour; checked with check_text)
    stderr_has: tuple[str, ...] = ()
    json_stdout: bool = False  # on success, stdout must be strict JSON


@dataclasses.dataclass
class Outcome:
    case: Case
    status: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    def problems(self, check_text: bool = True) -> list[str]:
        case, found = self.case, []
        if self.status is None:
            return [f"no answer within {TIMEOUT:.0f} s (a hang?)"]
        if self.traceback:
            last = [line for line in self.stderr.splitlines() if line.strip()][-1:]
            found.append(f"traceback: {last[0][:200] if last else ''}")
        if self.status != case.status:
            found.append(f"exit status {self.status}, expected {case.status}")
        lines = self.stderr.splitlines()
        if len(lines) > 1 or (case.status == 2 and len(lines) != 1):
            found.append(f"{len(lines)} lines on stderr: {self.stderr[:300]!r}")
        for stream, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            bad = sorted({char for char in text if char != "\n" and not char.isprintable()})
            if bad:
                found.append(f"control characters in {stream}: {''.join(bad)[:20]!r}")
        if case.json_stdout and self.status == 0:
            try:
                json.loads(self.stdout, parse_constant=_no_constant)
            except ValueError as error:
                found.append(f"--json output is not strict JSON ({error})")
        if check_text:
            for text in case.stdout_has:
                if text not in self.stdout:
                    found.append(f"stdout lacks {text!r}: {self.stdout[:300]!r}")
            for text in case.stderr_has:
                if text not in self.stderr:
                    found.append(f"stderr lacks {text!r}: {self.stderr[:300]!r}")
        return found


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# --- running ---------------------------------------------------------------------------------


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run_case(case: Case, cwd: pathlib.Path, pythonpath: str | None = None) -> Outcome:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "COLUMNS")}
    env["PYTHONIOENCODING"] = "utf-8"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ckptfn", *case.argv], capture_output=True, timeout=TIMEOUT, cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired as expired:
        return Outcome(case, None, _text(expired.stdout), _text(expired.stderr), time.monotonic() - started)
    return Outcome(case, result.returncode, _text(result.stdout), _text(result.stderr), time.monotonic() - started)


def _text(data: bytes | None) -> str:
    # undecodable bytes become U+FFFD, which is printable: a separate check would be needed for them,
    # but a print of a lone surrogate fails before it writes anything (a traceback, counted)
    return (data or b"").decode("utf-8", errors="replace")


def run_cases(cases: list[Case], cwd: pathlib.Path, pythonpath: str | None = None, workers: int | None = None
              ) -> list[Outcome]:
    workers = workers or max(2, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda case: run_case(case, cwd, pythonpath), cases))


# --- the replay corpus -------------------------------------------------------------------------

CONFIG = "strategies:\n  - metric_name: val_loss\n"
GOOD_CSV = "epoch,val_loss\n0,1.0\n1,0.5\n"


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def _jsonl(*rows: str) -> str:
    return "\n".join(rows) + "\n"


def replay_cases(work: pathlib.Path) -> list[Case]:
    """Every odd replay input, written under ``work``."""
    root = work / "replay"
    root.mkdir()
    config = root / "config.yaml"
    config.write_text(CONFIG)
    good = root / "good.csv"
    good.write_text(GOOD_CSV)
    cases: list[Case] = []

    def write(name: str, content: str | bytes) -> pathlib.Path:
        path = root / name
        path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
        return path

    def history(name: str, content: str | bytes | None, status: int, *, out: tuple[str, ...] = (),
                err: tuple[str, ...] = (), config_path: pathlib.Path = config, extra: tuple[str, ...] = (),
                path: pathlib.Path | None = None, json_too: bool = False) -> None:
        target = path if path is not None else write(name, content)
        cases.append(Case(REPLAY, f"history {name}", ["replay", str(target), "--config", str(config_path), *extra],
                          status, out, err))
        if status == 0 and not extra and json_too:
            cases.append(Case(REPLAY, f"history {name} (--json)",
                              ["replay", str(target), "--config", str(config_path), "--json"], 0, json_stdout=True))

    def conf(name: str, content: str | bytes | None, status: int, *, err: tuple[str, ...] = (),
             out: tuple[str, ...] = (), path: pathlib.Path | None = None) -> None:
        target = path if path is not None else write(name, content)
        cases.append(Case(REPLAY, f"config {name}", ["replay", str(good), "--config", str(target)], status, out, err))

    not_whole = ("is not a whole number >= 0",)
    # epochs
    history("epoch_float.csv", "epoch,val_loss\n0,1\n1.5,0.5\n", 2,
            err=("epoch_float.csv: line 3: column 'epoch': '1.5' is not a whole number >= 0",))
    history("epoch_negative.csv", "epoch,val_loss\n-1,1\n", 2, err=("line 2: column 'epoch': '-1'",))
    history("epoch_nan.csv", "epoch,val_loss\nnan,1\n", 2, err=not_whole)
    history("epoch_word.csv", "epoch,val_loss\nthree,1\n", 2, err=not_whole)
    history("epoch_5000_digits.csv", "epoch,val_loss\n" + "9" * 5000 + ",1\n", 2, err=("too large for an epoch",))
    history("epoch_2.0.csv", "epoch,val_loss\n0.0,1\n2.0,0.5\n", 0, out=("epoch    2: best_val_loss.pt",),
            json_too=True)
    history("epoch_string.jsonl", _jsonl('{"epoch": "3", "val_loss": 1}'), 2,
            err=("line 1: key 'epoch': a string '3' is not a whole number >= 0",))
    history("epoch_true.jsonl", _jsonl('{"epoch": true, "val_loss": 1}'), 2, err=("key 'epoch': True",))
    history("epoch_negative.jsonl", _jsonl('{"epoch": -1, "val_loss": 1}'), 2, err=not_whole)
    history("epoch_float.jsonl", _jsonl('{"epoch": 2.5, "val_loss": 1}'), 2, err=not_whole)
    history("epoch_1e400.jsonl", _jsonl('{"epoch": 1e400, "val_loss": 1}'), 2, err=("too large for an epoch",))
    history("epoch_list.jsonl", _jsonl('{"epoch": [1], "val_loss": 1}'), 2, err=not_whole)
    history("epoch_2.0.jsonl", _jsonl('{"epoch": 2.0, "val_loss": 1}'), 0, out=("epoch    2: best_val_loss.pt",))
    history("epoch_null.jsonl", _jsonl('{"epoch": null, "val_loss": 1}'), 0, out=("epoch    0: best_val_loss.pt",))
    history("epochs_decreasing.jsonl", _jsonl(*(f'{{"epoch": {e}, "val_loss": {e}}}' for e in (3, 2, 1))), 0,
            out=("epoch    1: best_val_loss.pt",))
    history("epochs_repeated.csv", "epoch,val_loss\n1,3\n1,2\n1,1\n", 0, out=("epoch    1: best_val_loss.pt",))
    # metric values
    history("dict_value.jsonl", _jsonl('{"val_loss": {"a": 1}}'), 2,
            err=("line 1: key 'val_loss': expected a number, got dict",))
    history("string_value.jsonl", _jsonl('{"val_loss": 0.5}', '{"val_loss": "0.4"}'), 2,
            err=("line 2: key 'val_loss': expected a number, got str '0.4'",))
    history("bool_value.jsonl", _jsonl('{"val_loss": true}'), 2, err=("got bool True",))
    history("list_value.jsonl", _jsonl('{"val_loss": [0.5]}'), 2, err=("got list",))
    history("null_value.jsonl", _jsonl('{"val_loss": null}', '{"val_loss": 0.5}'), 0,
            out=("epoch    1: best_val_loss.pt",))
    history("nan_infinity_literals.jsonl", _jsonl('{"val_loss": NaN}', '{"val_loss": Infinity}', '{"val_loss": 2}'),
            0, out=("epoch    2: best_val_loss.pt",), json_too=True)
    history("int_5000_digits.jsonl", _jsonl('{"val_loss": ' + "9" * 5000 + "}"), 2, err=("line 1: invalid JSON",))
    history("int_400_digits.jsonl", _jsonl('{"val_loss": ' + "9" * 400 + "}", '{"val_loss": 1}'), 0,
            out=("epoch    1: best_val_loss.pt",), json_too=True)
    history("value_5000_digits.csv", "val_loss\n" + "9" * 5000 + "\n1\n", 0, out=("epoch    1: best_val_loss.pt",),
            json_too=True)
    history("nan_inf_strings.csv", "val_loss\nnan\ninf\n-inf\nNaN\n-Infinity\n0.5\n", 0,
            out=("epoch    5: best_val_loss.pt",), json_too=True)
    history("value_word.csv", "val_loss\n1\nabc\n", 2, err=("line 3: column 'val_loss': 'abc' is not a number",))
    # nesting
    history("nested_100000.jsonl", _jsonl('{"val_loss": 1, "x": ' + _nested(100_000) + "}"), 2,
            err=("line 1: JSON nested too deeply",))
    history("nested_990.jsonl", _jsonl('{"val_loss": 1, "x": ' + _nested(990) + "}"), 2, err=("line 1:",))
    history("nested_dicts_40.jsonl", _jsonl('{"val_loss": 1, "x": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"), 2,
            err=("nested more than 32 levels",))
    # the shape of a line
    history("top_level_list.jsonl", _jsonl("[1, 2]"), 2, err=("line 1: expected a JSON object, got list",))
    history("top_level_number.jsonl", _jsonl("3"), 2, err=("got int",))
    history("top_level_string.jsonl", _jsonl('"val_loss"'), 2, err=("got str",))
    history("top_level_null.jsonl", _jsonl("null"), 2, err=("got NoneType",))
    history("whole_file_array.json", json.dumps([{"val_loss": 1}, {"val_loss": 0.5}], indent=1), 2,
            err=("line 1: invalid JSON",))
    history("invalid_json.jsonl", _jsonl('{"val_loss": 1', ""), 2, err=("line 1: invalid JSON",))
    # encodings and line ends
    history("bom.csv", "\ufeffval_loss\n1\n0.5\n", 0, out=("epoch    1: best_val_loss.pt",), json_too=True)
    history("bom.jsonl", "\ufeff" + _jsonl('{"val_loss": 1}'), 0, out=("epoch    0: best_val_loss.pt",))
    history("crlf.csv", "epoch,val_loss\r\n0,1\r\n1,0.5\r\n", 0, out=("epoch    1: best_val_loss.pt",))
    history("crlf.jsonl", '{"val_loss": 1}\r\n{"val_loss": 0.5}\r\n', 0, out=("epoch    1: best_val_loss.pt",))
    history("latin1.csv", "val_loss,d\u00e9j\u00e0\n1,2\n".encode("latin-1"), 2,
            err=("latin1.csv: line 1: byte 11", "is not UTF-8 text"))
    history("utf16.csv", "val_loss\n1\n".encode("utf-16"), 2, err=("is not UTF-8 text",))
    history("binary.csv", bytes(range(256)) * 64, 2, err=("binary.csv: line",))
    history("binary.jsonl", b"\x00\x01\x02" * 100, 2, err=("binary.jsonl: line 1",))
    history("nul.csv", "val_loss\n1\x00\n", 2, err=("line 2: a NUL character",))
    history("surrogate_key.jsonl", _jsonl('{"\\ud800\\u001b[31m": 1}'), 2, err=("never appears",))
    history("ansi_header.csv", "\x1b[2Jval\x1b[31m_los,x\n1,2\n", 2, err=("never appears", "\\x1b[2J"))
    history("empty.csv", "", 2, err=("empty CSV",))
    history("empty.jsonl", "", 2, err=("never appears",))
    history("header_only.csv", "epoch,val_loss\n", 2, err=("never appears",))
    history("blank_lines_only.csv", "\n\n\n", 2, err=("empty CSV",))
    history("duplicate_columns.csv", "val_loss,val_loss\n1,2\n", 2, err=("column 'val_loss' appears twice",))
    history("unnamed_column.csv", "val_loss,,x\n1,2,3\n", 2, err=("line 1: column 2 has no name",))
    history("extra_cells.csv", "val_loss\n1,2\n", 2, err=("line 2: 2 cells for 1 columns",))
    history("unbalanced_quote.csv", 'val_loss\n"0.5\n1\n', 2, err=("is not a number",))
    history("huge_cell.csv", "val_loss\n" + "1" * (1 << 20) + "\n", 2, err=("line 2: not valid CSV",))
    history("wide_200000_columns.csv", ",".join(f"m{i}" for i in range(200_000)) + ",val_loss\n"
            + ",".join(["1"] * 200_001) + "\n", 0, out=("epoch    0: best_val_loss.pt",))
    history("huge_line_20MiB.jsonl", _jsonl('{"val_loss": 1, "blob": "' + "x" * (20 << 20) + '"}'), 0,
            out=("epoch    0: best_val_loss.pt",))
    history("100000_epochs.csv", "val_loss\n" + "\n".join(str(1 + (i % 7)) for i in range(100_000)) + "\n", 0,
            out=("final bests:",))
    # paths
    (root / "a_directory.csv").mkdir()
    history("a_directory.csv", None, 2, err=("is a directory",), path=root / "a_directory.csv")
    os.mkfifo(root / "fifo.csv")
    history("fifo.csv", None, 2, err=("not a regular file",), path=root / "fifo.csv")
    history("missing.csv", None, 2, err=("no such history file",), path=root / "missing.csv")
    os.symlink("loop_b.csv", root / "loop_a.csv")
    os.symlink("loop_a.csv", root / "loop_b.csv")
    history("symlink_loop.csv", None, 2, err=("loop_a.csv: cannot open",), path=root / "loop_a.csv")
    history("wrong_extension.txt", "val_loss\n1\n", 2, err=("unknown history format '.txt'",))
    history("no_extension", "val_loss\n1\n", 2, err=("(no extension)",))
    history("missing_\x1b[31m.csv", None, 2, err=("missing_\\x1b[31m.csv: no such history file",),
            path=root / "missing_\x1b[31m.csv")
    big = root / "larger_than_256MiB.csv"
    with open(big, "wb") as file:
        file.truncate(300 * 1024**2)  # sparse: no disk used
    history("larger_than_256MiB.csv", None, 2, err=("larger than 256 MiB",), path=big)
    # --plot
    history("plot_into_missing_dir.csv", GOOD_CSV, 2, err=("--plot", "cannot write the plot"),
            extra=("--plot", str(root / "no" / "such" / "dir.png")))
    history("plot_unknown_format.csv", GOOD_CSV, 2, err=("--plot",), extra=("--plot", str(root / "plot.txt")))
    (root / "a_directory.png").mkdir()
    history("plot_onto_a_directory.csv", GOOD_CSV, 2, err=("cannot write the plot",),
            extra=("--plot", str(root / "a_directory.png")))
    mathtext = write("mathtext.json", json.dumps([{"metric_name": "$\\frac$", "filename": "m.pt"}]))
    history("plot_mathtext_name.csv", "$\\frac$\n1\n0.5\n", 0, config_path=mathtext,
            extra=("--plot", str(root / "mathtext.png")), out=("plot written to",))
    ansi_config = write("ansi.json", json.dumps([{"metric_name": "\x1b[31mloss\u202e", "filename": "x.pt"}]))
    history("ansi_metric_name.jsonl", _jsonl(json.dumps({"\x1b[31mloss\u202e": 1})), 0, config_path=ansi_config,
            out=("\\x1b[31mloss\\u202e",))

    # configs
    conf("list_of_strings.yaml", "- val_loss\n- val_acc\n", 2, err=("[0]: expected a strategy mapping, got str",))
    conf("number.yaml", "3\n", 2, err=("got int 3",))
    conf("string.json", '"val_loss"', 2, err=("got str",))
    conf("empty.yaml", "", 2, err=("nothing to replay",))
    conf("wrapped_list_of_strings.yaml", "checkpointing:\n  - a\n", 2, err=("expected a strategy mapping",))
    conf("latin1.yaml", "strategies:\n  - metric_name: d\u00e9j\u00e0\n".encode("latin-1"), 2,
         err=("latin1.yaml: line 2:", "is not UTF-8 text"))
    conf("binary.yaml", bytes(range(256)) * 4, 2, err=("binary.yaml:",))
    conf("nul.yaml", "strategies:\x00\n", 2, err=("a NUL character",))
    conf("control_character.yaml", "strategies:\n  - metric_name: \x1b[31mx\n", 2, err=("invalid YAML",))
    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        laughs.append(f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 9) + "]")
    laughs.append("strategies: *i")
    conf("billion_laughs.yaml", "\n".join(laughs) + "\n", 2, err=("aliases expand to more than",))
    chain = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    chain += [f"&{level} [" + ", ".join([f"*{chr(ord(level) - 1)}"] * 9) + "]" for level in "bcdefghi"]
    for key in ("min_delta", "mode", "metric_name"):  # values the validation looks at (and prints)
        conf(f"billion_laughs_in_{key}.yaml", f"{CONFIG}    {key}: [{', '.join(chain)}]\n", 2,
             err=("aliases expand to more than",))
    conf("self_alias.yaml", "strategies: &s [*s]\n", 2, err=("an alias refers to its own anchor",))
    conf("nested_100000.yaml", _nested(100_000), 2, err=("nested",))
    conf("nested_200.yaml", "strategies: " + _nested(200) + "\n", 2, err=("nested more than 32 levels",))
    conf("nested_100000.json", _nested(100_000), 2, err=("nested too deeply",))
    conf("int_5000_digits.yaml", "strategies:\n  - metric_name: val_loss\n    min_delta: " + "9" * 5000 + "\n", 2,
         err=("invalid YAML",))
    conf("int_5000_digits.json", '[{"metric_name": "val_loss", "min_delta": ' + "9" * 5000 + "}]", 2,
         err=("invalid JSON",))
    conf("min_delta_10e400.yaml", "strategies:\n  - metric_name: val_loss\n    min_delta: 1" + "0" * 400 + "\n", 2,
         err=("min_delta",))
    conf("min_delta_inf.yaml", "strategies:\n  - metric_name: val_loss\n    min_delta: 1e999\n", 2, err=("min_delta",))
    conf("impossible_date.yaml", "strategies:\n  - metric_name: val_loss\n    filename: 2001-13-45\n", 2,
         err=("invalid YAML",))
    conf("python_tag.yaml", "strategies: !!python/object/apply:os.system [echo hi]\n", 2, err=("invalid YAML",))
    conf("unknown_key.yaml", "strategies:\n  - metric_name: val_loss\n    colour: red\n", 2, err=("unknown key",))
    conf("bom.yaml", "\ufeff" + CONFIG, 0, out=("best_val_loss.pt",))
    conf("bom.json", "\ufeff" + json.dumps([{"metric_name": "val_loss"}]), 0, out=("best_val_loss.pt",))
    conf("anchors_and_merge.yaml", "strategies:\n  - &s {metric_name: val_loss, mode: min}\n"
         "  - {<<: *s, filename: other.pt}\n", 0, out=("other.pt",))
    conf("larger_than_1MiB.yaml", "#" * (2 * 1024**2), 2, err=("larger than 1 MiB",))
    conf("a_directory", None, 2, err=("is a directory",), path=root / "a_directory.csv")
    conf("fifo", None, 2, err=("not a regular file",), path=root / "fifo.csv")
    conf("missing.yaml", None, 2, err=("no such config file",), path=root / "missing.yaml")
    conf("symlink_loop", None, 2, err=("cannot open the config file",), path=root / "loop_a.csv")
    return cases


# --- the inspect corpus ------------------------------------------------------------------------

ENTRY = {"metric_name": "val_loss", "mode": "min", "filename": "best.pt", "overwrite": True, "min_delta": 0.0,
         "keep": None, "value": 0.5, "previous": None, "epoch": 3}


def _meta(**fields: object) -> dict:
    base = {"format": "ckptfn/1", "epoch": 3, "timestamp": "2026-01-01T00:00:00+00:00", "saves": [dict(ENTRY)],
            "metrics": {"val_loss": 0.5}}
    base.update(fields)
    return base


def _entry(**fields: object) -> dict:
    return {**ENTRY, **fields}


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


ANSI = "\x1b[31mred\x1b[0m\x1b]0;title\x07\r\n\u202e\x9b"

ODD_METADATA = {
    "saves null": _meta(saves=None),
    "saves an int": _meta(saves=5),
    "saves a string": _meta(saves="best.pt"),
    "saves a list of ints": _meta(saves=[1, 2, 3]),
    "saves a dict": _meta(saves={"metric_name": "val_loss"}),
    "saves 10,000 entries": _meta(saves=[_entry(value=float(i)) for i in range(10_000)]),
    "value 10**400": _meta(saves=[_entry(value=10**400)]),
    "value NaN": _meta(saves=[_entry(value=float("nan"), previous=float("inf"))]),
    "value a nested dict": _meta(saves=[_entry(value={"a": {"b": [1, {"c": 2}]}})]),
    "value a 5000-digit int": _meta(saves=[_entry(value=10**4999)]),
    "value a bool": _meta(saves=[_entry(value=True)]),
    "value a string": _meta(saves=[_entry(value="0.5")]),
    "previous a list": _meta(saves=[_entry(previous=[1])]),
    "metric_name an int": _meta(saves=[_entry(metric_name=5)]),
    "metric_name with ANSI escapes": _meta(saves=[_entry(metric_name=ANSI)]),
    "metric_name a lone surrogate": _meta(saves=[_entry(metric_name="\ud800\udcff")]),
    "filename with ANSI escapes": _meta(saves=[_entry(filename=ANSI + ".pt")]),
    "filename None": _meta(saves=[_entry(filename=None)]),
    "every_n_epochs a string": _meta(saves=[{"every_n_epochs": "x", "filename": "last.pt"}]),
    "every_n_epochs 10**400": _meta(saves=[{"every_n_epochs": 10**400, "filename": "last.pt"}]),
    "timestamp an int": _meta(timestamp=5),
    "timestamp NaN": _meta(timestamp=float("nan")),
    "timestamp a list": _meta(timestamp=["2026"]),
    "timestamp a 1 MB string": _meta(timestamp="9" * 1_000_000),
    "timestamp with ANSI escapes": _meta(timestamp="2026-01-01" + ANSI),
    "epoch a string": _meta(epoch="three"),
    "epoch 10**400": _meta(epoch=10**400),
    "epoch a 5000-digit int": _meta(epoch=10**4999),
    "epoch NaN": _meta(epoch=float("nan")),
    "epoch -1": _meta(epoch=-1),
    "epoch True": _meta(epoch=True),
    "epoch a nested dict": _meta(epoch={"a": {"b": 1}}),
    "epoch nested 400 deep": _meta(epoch=_deep(400)),
    "epoch with ANSI escapes": _meta(epoch=ANSI),
    "metrics a list": _meta(metrics=[1, 2]),
    "metrics a 5000-digit int": _meta(metrics={"val_loss": 10**4999}),
    "keys that are not strings": {**_meta(), 1: "one", None: "none", (1, 2): "tuple"},
    "format only": {"format": "ckptfn/1"},
    "everything odd at once": _meta(epoch=10**4999, timestamp=b"2026", saves=[7, _entry(value=10**4999,
                                    metric_name=ANSI, filename=[1]), None]),
}

ODD_SHARDED = {
    "ckptfn.json saves null, timestamp an int": json.dumps({"format": "ckptfn/1", "epoch": 1, "timestamp": 5,
                                                            "saves": None}),
    "ckptfn.json epoch NaN, value Infinity": '{"format": "ckptfn/1", "epoch": NaN, "saves": [{"metric_name": "x", '
                                            '"value": Infinity}]}',
    "ckptfn.json nested 100,000 deep": '{"format": "ckptfn/1", "epoch": ' + _nested(100_000) + "}",
    "ckptfn.json a 5000-digit int": '{"format": "ckptfn/1", "epoch": ' + "9" * 5000 + "}",
    "ckptfn.json not UTF-8": b'{"format": "ckptfn/1", "epoch": "\xff"}',
    "ckptfn.json with ANSI escapes": json.dumps({"format": "ckptfn/1", "epoch": 0, "timestamp": ANSI,
                                                 "saves": [_entry(metric_name=ANSI)]}),
}


def _save(path: pathlib.Path, metadata: dict) -> None:
    import torch

    torch.save({"state_dict": {}, "metadata": metadata}, path)


def inspect_cases(work: pathlib.Path, many: int = 10_000) -> list[Case]:
    """Every odd inspect input, written under ``work``."""
    root = work / "inspect"
    root.mkdir()
    cases: list[Case] = []

    def both(name: str, path: pathlib.Path, status: int = 0, out: tuple[str, ...] = (), json_too: bool = True) -> None:
        cases.append(Case(INSPECT, name, ["inspect", str(path)], status, out))
        if json_too:
            cases.append(Case(INSPECT, f"{name} (--json)", ["inspect", "--json", str(path)], status, json_stdout=True))

    odd_dir = root / "odd"
    odd_dir.mkdir()
    for number, (name, metadata) in enumerate(ODD_METADATA.items()):
        path = odd_dir / f"odd_{number:02d}.pt"
        _save(path, metadata)
        both(f"metadata: {name}", path, out=(path.name,), json_too=False)  # --json: all at once, below
    both("a directory of every odd metadata", odd_dir, out=("odd_00.pt", f"odd_{len(ODD_METADATA) - 1:02d}.pt"))
    for number, (name, text) in enumerate(ODD_SHARDED.items()):
        tree = root / f"sharded_{number}.dcp"
        tree.mkdir()
        (tree / ".metadata").write_bytes(b"")
        (tree / "ckptfn.json").write_bytes(text.encode() if isinstance(text, str) else text)
        both(f"sharded: {name}", tree, out=(tree.name,), json_too=False)
    cases.append(Case(INSPECT, "every odd sharded tree (--json)", ["inspect", "--json",
                      *(str(root / f"sharded_{number}.dcp") for number in range(len(ODD_SHARDED)))], 0,
                      json_stdout=True))
    # paths
    fifo = root / "fifo.pt"
    os.mkfifo(fifo)
    both("a FIFO at the path", fifo, out=("unreadable: not a regular file",))
    os.symlink("loop_b.pt", root / "loop_a.pt")
    os.symlink("loop_a.pt", root / "loop_b.pt")
    both("a symlink loop", root / "loop_a.pt", out=("unreadable: cannot be read",))
    os.symlink("nowhere.pt", root / "dangling.pt")
    both("a dangling symlink", root / "dangling.pt", out=("unreadable:",))
    links = root / "links"
    links.mkdir()
    _save(links / "good.pt", _meta())
    os.mkfifo(links / "fifo.pt")
    os.symlink("loop_b.pt", links / "loop_a.pt")
    os.symlink("loop_a.pt", links / "loop_b.pt")
    os.symlink(".", links / "self.dcp")
    os.symlink("..", links / "parent.pt")
    both("a directory with a FIFO, symlink loops and links to itself", links, out=("good.pt",))
    rooted = root / "rooted"
    rooted.mkdir()
    os.symlink("/", rooted / "everything.dcp")
    both("a sharded-looking link to / (its size is not the whole disk)", rooted, out=("everything.dcp",))
    names = root / "names"
    names.mkdir()
    _save(names / "evil\x1b[2J\n\r.pt", _meta())
    _save(names / "ok.pt", _meta())
    with open(os.path.join(os.fsencode(names), b"not_utf8_\xff\xfe.pt"), "wb") as file:
        file.write(b"junk")
    both("file names with ANSI escapes, newlines and bytes that are not UTF-8", names, out=("ok.pt", "\\x1b[2J"))
    for name, content in (("empty.pt", b""), ("text.pt", b"hello\x1b[31m\n"), ("truncated.pt", b"PK\x03\x04\x00")):
        (root / name).write_bytes(content)
        both(f"a foreign file: {name}", root / name, out=("unreadable:",))
    crowd = root / "crowd"
    crowd.mkdir()
    _save(crowd / "model_00000.pt", _meta())
    for index in range(1, many):
        if index % 2:
            os.link(crowd / "model_00000.pt", crowd / f"model_{index:05d}.pt")
        else:
            (crowd / f"junk_{index:05d}.txt").write_bytes(b"")
    both(f"a directory of {many} files", crowd, out=(f"model_{many - 1:05d}.pt",))
    cases.append(Case(INSPECT, "a missing path", ["inspect", str(root / "missing.pt")], 2))
    cases.append(Case(INSPECT, "a missing path with ANSI escapes", ["inspect", str(root / "x\x1b[2J.pt")], 2))
    return cases


# --- the suite ---------------------------------------------------------------------------------


def all_cases(work: pathlib.Path, many: int = 10_000) -> list[Case]:
    return replay_cases(work) + inspect_cases(work, many)


def run(tally: Tally | None = None, *, pythonpath: str | None = None, many: int = 10_000,
        check_text: bool = True) -> Tally:
    """Every corpus input through ``python -m ckptfn``; problems are tallied as unexpected."""
    tally = tally if tally is not None else Tally()
    with tempfile.TemporaryDirectory(prefix="ckptfn-cli-inputs-") as work:
        work = pathlib.Path(work)
        cases = all_cases(work, many)
        for outcome in run_cases(cases, work, pythonpath):
            tally.tried(SECTION, outcome.case.kind)
            for problem in outcome.problems(check_text):
                tally.problem(SECTION, outcome.case.kind, "unexpected", f"{outcome.case.name}: {problem}")
    return tally


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pythonpath", help="run another ckptfn (e.g. a worktree of an older commit)")
    parser.add_argument("--quiet", action="store_true", help="counts only")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckptfn-cli-inputs-") as work:
        work = pathlib.Path(work)
        outcomes = run_cases(all_cases(work), work, args.pythonpath)
    for kind in (REPLAY, INSPECT):
        mine = [o for o in outcomes if o.case.kind == kind]
        print(f"{kind}: {len(mine)} inputs, {sum(o.traceback for o in mine)} tracebacks, "
              f"{sum(o.status is None for o in mine)} hangs, "
              f"{sum(bool(o.problems(check_text=False)) for o in mine)} with a problem "
              f"(traceback, hang, status, stderr lines, control characters, JSON)")
        if not args.quiet:
            for outcome in mine:
                problems = outcome.problems(check_text=False)
                if problems:
                    print(f"  {outcome.case.name}: {'; '.join(problems)}"[:400])
    print(f"{time.monotonic() - started:.1f} s; slowest: " + ", ".join(
        f"{o.case.name} {o.seconds:.1f} s" for o in sorted(outcomes, key=lambda o: -o.seconds)[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
