"""Odd inputs to ``inspect`` and ``replay``: one line on stderr and status 2, or a row saying why.

The cases of the reliability issue, each of which tracebacked (or, for the
byte-order mark, was refused) before; the whole corpus, through a subprocess, is
``tests/reliability/cli_inputs.py``. ``ODD`` is a table so the same cases can be
run against another ckptfn through the command line (``run_through``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptfn.cli.errors import printable
from ckptfn.cli.main import main

from tests.cli.tables import footer, table_rows

CONFIG = "strategies:\n  - metric_name: val_loss\n"
GOOD_CSV = "epoch,val_loss\n0,1.0\n1,0.5\n"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def metadata(**fields) -> dict:
    base = {"format": "ckptfn/1", "epoch": 3, "timestamp": "2026-01-01T00:00:00+00:00",
            "saves": [{"metric_name": "val_loss", "mode": "min", "filename": "best.pt", "value": 0.5,
                       "previous": None}]}
    return {**base, **fields}


def laughs() -> str:
    """A "billion laughs" config: nine aliases of nine aliases ... of "lol" (9**9 once expanded), in a value
    the config validation must look at (and, before, printed whole in its error message)."""
    chain = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    for level in "bcdefghi":
        chain.append(f"&{level} [" + ", ".join([f"*{chr(ord(level) - 1)}"] * 9) + "]")
    return CONFIG + "    min_delta: [" + ", ".join(chain) + "]\n"


#: name -> (files to write: name -> str/bytes, the replay arguments, status, text stderr (2) or stdout (0) holds)
ODD = {
    "CSV epoch 1.5": ({"h.csv": "epoch,val_loss\n0,1\n1.5,0.5\n"}, ["h.csv"], 2,
                      "h.csv: line 3: column 'epoch': '1.5' is not a whole number >= 0"),
    "CSV epoch -1": ({"h.csv": "epoch,val_loss\n-1,1\n"}, ["h.csv"], 2,
                     "h.csv: line 2: column 'epoch': '-1' is not a whole number >= 0"),
    'JSONL epoch "3"': ({"h.jsonl": '{"epoch": "3", "val_loss": 1}\n'}, ["h.jsonl"], 2,
                        "h.jsonl: line 1: key 'epoch': a string '3' is not a whole number >= 0"),
    "JSONL epoch true": ({"h.jsonl": '{"epoch": 0, "val_loss": 2}\n{"epoch": true, "val_loss": 1}\n'}, ["h.jsonl"],
                         2, "h.jsonl: line 2: key 'epoch': True is not a whole number >= 0"),
    "JSONL dict metric value": ({"h.jsonl": '{"val_loss": {"mean": 1}}\n'}, ["h.jsonl"], 2,
                                "h.jsonl: line 1: key 'val_loss': expected a number, got dict of 1 item"),
    "non-UTF-8 history": ({"h.csv": "val_loss,d\u00e9j\u00e0\n1,2\n".encode("latin-1")}, ["h.csv"], 2,
                          "h.csv: line 1: byte 11 (b'\\xe9') is not UTF-8 text"),
    "non-UTF-8 config": ({"h.csv": GOOD_CSV, "c.yaml": "strategies:\n  - metric_name: \u00e9\n".encode("latin-1")},
                         ["h.csv", "c.yaml"], 2, "c.yaml: line 2: byte 18 (b'\\xe9') is not UTF-8 text"),
    "5,000-digit integer in a history": ({"h.jsonl": '{"val_loss": ' + "9" * 5000 + "}\n"}, ["h.jsonl"], 2,
                                         "h.jsonl: line 1: invalid JSON (Exceeds the limit (4300 digits)"),
    "5,000-digit integer in a config": ({"h.csv": GOOD_CSV, "c.yaml": CONFIG + "    min_delta: " + "9" * 5000 + "\n"},
                                        ["h.csv", "c.yaml"], 2, "c.yaml: invalid YAML: Exceeds the limit"),
    "JSON nested 100,000 deep": ({"h.jsonl": '{"val_loss": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n"},
                                 ["h.jsonl"], 2, "h.jsonl: line 1: JSON nested too deeply"),
    "YAML nested 100,000 deep": ({"h.csv": GOOD_CSV, "c.yaml": "[" * 100_000 + "]" * 100_000},
                                 ["h.csv", "c.yaml"], 2, "c.yaml: nested too deeply"),
    "YAML billion laughs": ({"h.csv": GOOD_CSV, "c.yaml": laughs()}, ["h.csv", "c.yaml"], 2,
                            "c.yaml: invalid YAML: its aliases expand to more than 100000 nodes (refused)"),
    "CSV with a byte-order mark": ({"h.csv": "\ufeffval_loss\n1\n0.5\n"}, ["h.csv"], 0,
                                   "epoch    1: best_val_loss.pt"),
}


def _write(directory: pathlib.Path, files: dict) -> None:
    (directory / "c.yaml").write_text(CONFIG)
    for name, content in files.items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def _argv(directory: pathlib.Path, paths: list[str]) -> list[str]:
    history, config = (paths + ["c.yaml"])[:2]
    return ["replay", str(directory / history), "--config", str(directory / config)]


@pytest.mark.parametrize("name", list(ODD))
def test_odd_replay_inputs_are_one_line_or_work(tmp_path, capsys, name):
    files, paths, status, text = ODD[name]
    _write(tmp_path, files)
    code, out, err = run(capsys, *_argv(tmp_path, paths))
    assert code == status, err
    if status == 2:
        assert out == "" and err.count("\n") == 1 and text in err, err
    else:
        assert err == "" and text in out


def run_through(pythonpath: str, directory: pathlib.Path) -> dict[str, str]:
    """Each ``ODD`` case through ``python -m ckptfn`` with ``PYTHONPATH=pythonpath``: name -> outcome."""
    outcomes = {}
    for name, (files, paths, status, text) in ODD.items():
        case = directory / f"case{len(outcomes)}"
        case.mkdir()
        _write(case, files)
        try:
            result = subprocess.run([sys.executable, "-m", "ckptfn", *_argv(case, paths)], capture_output=True,
                                    text=True, timeout=60, env={**os.environ, "PYTHONPATH": pythonpath}, cwd=case)
        except subprocess.TimeoutExpired:
            outcomes[name] = "no answer within 60 s"
            continue
        if "Traceback" in result.stderr:
            outcomes[name] = "traceback: " + result.stderr.strip().splitlines()[-1][:120]
        elif result.returncode != status or text not in (result.stderr if status == 2 else result.stdout):
            outcomes[name] = f"status {result.returncode}: {(result.stderr or result.stdout).strip()[:120]}"
        else:
            outcomes[name] = "ok"
    return outcomes


# --- replay: more of the same, in-process -----------------------------------------------------


def test_a_fifo_as_history_or_config_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "h.csv")
    (tmp_path / "c.yaml").write_text(CONFIG)
    (tmp_path / "good.csv").write_text(GOOD_CSV)
    for history, config in (("h.csv", "c.yaml"), ("good.csv", "h.csv")):
        result = subprocess.run([sys.executable, "-m", "ckptfn", "replay", str(tmp_path / history), "--config",
                                 str(tmp_path / config)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and "not a regular file" in result.stderr
        assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("content, found", [
    ("epoch,val_loss\n0.0,1\n2.0,0.5\n", "epoch    2: best_val_loss.pt"),  # a whole float is an epoch
    ("val_loss\r\n1\r\n0.5\r\n", "epoch    1: best_val_loss.pt"),
])
def test_csv_epochs_as_whole_floats_and_crlf_work(tmp_path, capsys, content, found):
    (tmp_path / "h.csv").write_text(content, newline="")
    (tmp_path / "c.yaml").write_text(CONFIG)
    code, out, err = run(capsys, "replay", tmp_path / "h.csv", "--config", tmp_path / "c.yaml")
    assert code == 0 and found in out, err


def test_jsonl_null_is_missing_and_a_bom_is_dropped(tmp_path, capsys):
    (tmp_path / "h.jsonl").write_text('\ufeff{"val_loss": null}\n{"val_loss": 0.5, "epoch": null}\n')
    (tmp_path / "c.json").write_text("\ufeff" + json.dumps({"strategies": [{"metric_name": "val_loss"}]}))
    code, out, err = run(capsys, "replay", tmp_path / "h.jsonl", "--config", tmp_path / "c.json", "--json")
    assert code == 0, err
    assert [(s["epoch"], s["value"]) for s in json.loads(out)["saves"]] == [(1, 0.5)]


@pytest.mark.parametrize("config, message", [
    ("strategies: &s [*s]\n", "an alias refers to its own anchor"),
    ("- val_loss\n- val_acc\n", "c.yaml: [0]: expected a strategy mapping, got str 'val_loss'"),
    ("strategies:\n  - metric_name: val_loss\n    filename: 2001-13-45\n", "c.yaml: invalid YAML: month must be in"),
    ("strategies: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
])
def test_odd_configs_are_one_line(tmp_path, capsys, config, message):
    (tmp_path / "h.csv").write_text(GOOD_CSV)
    (tmp_path / "c.yaml").write_text(config)
    code, out, err = run(capsys, "replay", tmp_path / "h.csv", "--config", tmp_path / "c.yaml")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_yaml_anchors_and_merge_keys_still_work(tmp_path, capsys):
    (tmp_path / "h.csv").write_text(GOOD_CSV)
    (tmp_path / "c.yaml").write_text("strategies:\n  - &s {metric_name: val_loss}\n  - {<<: *s, filename: b.pt}\n")
    code, out, err = run(capsys, "replay", tmp_path / "h.csv", "--config", tmp_path / "c.yaml", "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["bests"]) == ["b.pt", "best_val_loss.pt"]


def test_control_characters_in_names_are_escaped(tmp_path, capsys):
    (tmp_path / "h.csv").write_text("\x1b[2Jval_los\x07,x\n1,2\n")
    (tmp_path / "c.yaml").write_text(CONFIG)
    code, _, err = run(capsys, "replay", tmp_path / "h.csv", "--config", tmp_path / "c.yaml")
    assert code == 2 and "\x1b" not in err and "\\x1b[2Jval_los\\x07" in err
    name = "\x1b[31mloss\u202e"
    (tmp_path / "h.jsonl").write_text(json.dumps({name: 1}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"metric_name": name, "filename": "x.pt"}]))
    code, out, err = run(capsys, "replay", tmp_path / "h.jsonl", "--config", tmp_path / "c.json")
    assert code == 0 and "\x1b" not in out and "\u202e" not in out and "\\x1b[31mloss\\u202e" in out, err


def test_plot_to_a_path_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "h.csv").write_text(GOOD_CSV)
    (tmp_path / "c.yaml").write_text(CONFIG)
    for target, message in ((tmp_path / "no" / "p.png", "cannot write the plot (No such file or directory)"),
                            (tmp_path / "p.txt", "Format 'txt' is not supported")):
        code, out, err = run(capsys, "replay", tmp_path / "h.csv", "--config", tmp_path / "c.yaml", "--plot", target)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


# --- replay: any text at all --------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.text(), st.binary(), st.text(alphabet="0123456789.,-e\n\r\"{}[]:nafitrul \ufeff")),
       suffix=st.sampled_from([".csv", ".jsonl"]), header=st.booleans())
def test_any_history_exits_0_or_2_with_at_most_one_line(tmp_path_factory, capsys, content, suffix, header):
    directory = tmp_path_factory.mktemp("any")
    path = directory / f"h{suffix}"
    if header and suffix == ".csv":
        content = (b"epoch,val_loss\n" + content) if isinstance(content, bytes) else "epoch,val_loss\n" + content
    if header and suffix == ".jsonl" and isinstance(content, str):
        content = '{"val_loss": 1}\n' + content
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    (directory / "c.yaml").write_text(CONFIG)
    code, out, err = run(capsys, "replay", path, "--config", directory / "c.yaml")
    assert code in (0, 2) and err.count("\n") <= 1 and "Traceback" not in err
    assert (code == 2) == bool(err)
    assert all(char == "\n" or char.isprintable() for char in out + err)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.text(), st.binary(), st.text(alphabet="&*[]{}:- \nabc!<>\"'0123456789")))
def test_any_config_exits_0_or_2_with_at_most_one_line(tmp_path_factory, capsys, content):
    directory = tmp_path_factory.mktemp("anyconfig")
    (directory / "h.csv").write_text(GOOD_CSV)
    path = directory / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    code, out, err = run(capsys, "replay", directory / "h.csv", "--config", path)
    assert code in (0, 2) and err.count("\n") <= 1 and "Traceback" not in err
    assert all(char == "\n" or char.isprintable() for char in out + err)


# --- inspect ------------------------------------------------------------------------------------


ODD_METADATA = {
    "saves null": (metadata(saves=None), "saves: expected a list, got NoneType None"),
    "saves an int": (metadata(saves=5), "saves: expected a list, got int 5"),
    "saves a list of ints": (metadata(saves=[1]), "saves[0]: expected a mapping, got int 1"),
    "timestamp an int": (metadata(timestamp=5), "timestamp: expected an ISO date string, got int 5"),
    "a value of 10**400": (metadata(saves=[{"metric_name": "val_loss", "value": 10**400}]),
                           "saves[0].value: expected a number (a float), got int with 401 digits"),
    "epoch 10**400": (metadata(epoch=10**400), "epoch: expected an int >= 0, got int with 401 digits"),
    "epoch a string": (metadata(epoch="three"), "epoch: expected an int >= 0, got str 'three'"),
}


@pytest.mark.parametrize("name", list(ODD_METADATA))
def test_odd_metadata_gets_a_row_showing_what_is_readable(tmp_path, capsys, name):
    meta, note = ODD_METADATA[name]
    torch.save({"state_dict": {}, "metadata": meta}, tmp_path / "odd.pt")
    code, out, err = run(capsys, "inspect", tmp_path / "odd.pt")
    assert code == 0 and err == ""
    (row,) = table_rows(out)
    assert row.startswith("odd.pt") and f"(odd metadata: {note})" in row
    code, out, err = run(capsys, "inspect", "--json", tmp_path / "odd.pt")
    (row,) = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))
    assert code == 0 and row["error"] is None and row["odd"] == [note]


def test_inspect_keeps_what_is_readable_beside_odd_fields(tmp_path, capsys):
    torch.save({"state_dict": {}, "metadata": metadata(timestamp=5, epoch=math.nan)}, tmp_path / "odd.pt")
    code, out, _ = run(capsys, "inspect", "--json", tmp_path / "odd.pt")
    (row,) = json.loads(out)
    assert code == 0 and row["epoch"] is None and row["timestamp"] is None
    assert row["saves"] == [{"metric_name": "val_loss", "mode": "min", "filename": "best.pt", "value": 0.5,
                             "previous": None}]
    code, out, _ = run(capsys, "inspect", tmp_path / "odd.pt")
    header, _, row = out.splitlines()
    assert row.split()[:4] == ["odd.pt", "?", "-", "val_loss=0.5"]  # epoch odd, no step recorded


def test_inspect_escapes_control_characters_from_files(tmp_path, capsys):
    ansi = "\x1b[31mred\x1b]0;title\x07\r\n\u202e"
    meta = metadata(timestamp="2026" + ansi, saves=[{"metric_name": ansi, "value": 0.5, "filename": "b.pt"}])
    torch.save({"state_dict": {}, "metadata": meta}, tmp_path / f"evil{ansi}.pt")
    with open(os.path.join(os.fsencode(tmp_path), b"latin1_\xe9.pt"), "wb") as file:
        file.write(b"junk")
    code, out, err = run(capsys, "inspect", tmp_path)
    assert code == 0 and err == ""
    assert all(char == "\n" or char.isprintable() for char in out)
    assert printable(f"evil{ansi}.pt") in out and printable(ansi) + "=0.5" in out and "latin1_\\udce9.pt" in out
    assert len(table_rows(out)) == 2  # the newline in the name stays escaped
    assert footer(out) == "2 names, 2 snapshots, " + footer(out).split(", ")[2]
    code, out, _ = run(capsys, "inspect", "--json", tmp_path)
    assert {row["file"] for row in json.loads(out)} == {f"evil{ansi}.pt", "latin1_\udce9.pt"}


def test_inspect_rows_for_fifos_and_symlink_loops(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.pt")
    os.symlink("b.pt", tmp_path / "a.pt")
    os.symlink("a.pt", tmp_path / "b.pt")
    torch.save({"state_dict": {}, "metadata": metadata()}, tmp_path / "good.pt")
    code, out, _ = run(capsys, "inspect", tmp_path / "fifo.pt", tmp_path / "a.pt")
    rows = {line.split()[0]: line for line in table_rows(out)}
    assert code == 0 and sorted(rows) == ["a.pt", "fifo.pt"]
    assert "unreadable: not a regular file" in rows["fifo.pt"]
    assert "unreadable: cannot be read (Too many levels of symbolic links)" in rows["a.pt"]
    code, out, _ = run(capsys, "inspect", tmp_path)  # a loop in a directory hides nothing else
    assert code == 0 and [line.split()[0] for line in table_rows(out)] == ["good.pt"]
    assert footer(out).endswith("; 3 other entries skipped (not checkpoints)")  # the FIFO and the two links


def test_inspect_bounds_a_huge_saves_list(tmp_path, capsys):
    saves = [{"metric_name": f"m{i}", "value": float(i)} for i in range(10_000)]
    torch.save({"state_dict": {}, "metadata": metadata(saves=saves)}, tmp_path / "many.pt")
    code, out, _ = run(capsys, "inspect", tmp_path / "many.pt")
    assert code == 0 and "m7=7, ... (9992 more)" in out and len(out) < 1000
