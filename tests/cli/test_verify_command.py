"""``ckptfn verify``: one line per checkpoint and a summary; exit 0 only when every checkpoint is intact."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import ckptfn
from ckptfn.cli.main import main

REPO = pathlib.Path(__file__).resolve().parents[2]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def save(directory: pathlib.Path, **options) -> pathlib.Path:
    manager = ckptfn.CheckpointManager(directory, [ckptfn.Strategy("val_loss")], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's single-process warning
        (path,) = manager.update({"val_loss": 0.5}, {"w": torch.zeros(1000)}, 0)
    return path


def damage(path: pathlib.Path) -> None:
    """Flip one bit inside the tensor's 4000 zero bytes (the file still loads with torch.load)."""
    data = bytearray(path.read_bytes())
    data[data.index(bytes(4000)) + 2000] ^= 0x01
    path.write_bytes(data)


def test_intact_checkpoints_exit_0_with_one_line_each_and_a_summary(tmp_path, capsys):
    save(tmp_path)
    save(tmp_path / "sharded", sharded=True)
    code, out, err = run(capsys, "verify", tmp_path, tmp_path / "sharded")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"OK       {tmp_path / 'best_val_loss.pt'}  (structure, crc32 of 7 records, ")
    assert lines[0].endswith("read, loads with weights_only)")
    assert lines[1].startswith(f"OK       {tmp_path / 'sharded' / 'best_val_loss.dcp'}  (structure, crc32 of ")
    assert lines[2] == "verified 2 checkpoints (full): 2 intact, 0 damaged"


def test_a_damaged_checkpoint_exits_1_and_names_the_record(tmp_path, capsys):
    path = save(tmp_path)
    damage(path)
    assert torch.load(path, weights_only=True)  # torch does not notice
    code, out, _ = run(capsys, "verify", path)
    assert code == 1
    first, summary = out.splitlines()
    assert first.startswith(f"DAMAGED  {path}  (structure, crc32 of 7 records, ")
    assert "'archive/data/0': CRC32 mismatch: its 4000 bytes at offset " in first
    assert summary == "verified 1 checkpoint (full): 0 intact, 1 damaged"


def test_structure_only_does_not_read_the_data(tmp_path, capsys):
    path = save(tmp_path)
    damage(path)
    code, out, _ = run(capsys, "verify", "--structure", path)
    assert code == 0
    summary = "verified 1 checkpoint (structure): 1 intact, 0 damaged"
    assert out.splitlines() == [f"OK       {path}  (structure)", summary]


def test_one_damaged_among_intact_ones_exits_1(tmp_path, capsys):
    good = save(tmp_path / "a")
    bad = save(tmp_path / "b")
    damage(bad)
    code, out, _ = run(capsys, "verify", good, bad)
    assert code == 1 and out.splitlines()[-1] == "verified 2 checkpoints (full): 1 intact, 1 damaged"


def test_json_output(tmp_path, capsys):
    path = save(tmp_path)
    tree = save(tmp_path / "sharded", sharded=True)
    (tree / "__0_0.distcp").write_bytes(b"cut")
    code, out, _ = run(capsys, "verify", "--json", path, tree)
    assert code == 1
    first, second = json.loads(out)
    assert first == {"path": str(path), "level": "full", "checked": ["structure", "crc32", "read", "load"],
                     "problems": [], "notes": [], "records": 7, "bytes_read": first["bytes_read"], "ok": True}
    assert second["ok"] is False and second["path"] == str(tree)
    assert all("beyond the end of the 3-byte file" in problem for problem in second["problems"])


def test_checksums_false_files_are_ok_with_a_note(tmp_path, capsys):
    path = save(tmp_path, checksums=False)
    code, out, _ = run(capsys, "verify", path)
    assert code == 0
    assert out.splitlines()[0].startswith(f"OK       {path}  (structure, ")
    assert "note: a file written without checksums (checksums=False)" in out


def test_a_missing_path_is_a_usage_error(tmp_path, capsys):
    save(tmp_path)
    code, out, err = run(capsys, "verify", tmp_path, tmp_path / "nothing.pt")
    assert code == 2 and out == ""
    assert err == f"ckptfn verify: error: {tmp_path / 'nothing.pt'}: no such file or directory\n"


def test_a_directory_without_checkpoints_exits_1(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, out, err = run(capsys, "verify", tmp_path)
    assert code == 1 and out == ""
    assert err == f"ckptfn verify: no checkpoints found in {tmp_path}\n"


def test_control_characters_from_files_are_never_printed(tmp_path, capsys):
    path = save(tmp_path)
    hostile = tmp_path / "best\x1b[2J\u202e\n.pt"
    path.rename(hostile)
    damage(hostile)
    for argv in (["verify", hostile], ["verify", tmp_path], ["verify", "--json", tmp_path]):
        code, out, err = run(capsys, *argv)
        assert code == 1
        assert "\x1b" not in out + err and "\u202e" not in out + err
        assert out.count("\n") == (out.strip().count("\n") + 1)  # no line broken by the name
    code, out, _ = run(capsys, "verify", hostile)
    assert "best\\x1b[2J\\u202e\\n.pt" in out


def test_python_dash_m_ckptfn_verify(tmp_path):
    path = save(tmp_path)
    command = [sys.executable, "-m", "ckptfn", "verify", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "verified 1 checkpoint (full): 1 intact, 0 damaged"
    damage(path)
    result = subprocess.run(command + ["--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and json.loads(result.stdout)[0]["ok"] is False


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_a_checkpoint_does_not_block(tmp_path, capsys):
    fifo = tmp_path / "best.pt"
    os.mkfifo(fifo)
    code, out, _ = run(capsys, "verify", fifo)
    assert code == 1 and "not a regular file" in out
