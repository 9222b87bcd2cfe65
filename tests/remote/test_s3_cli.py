"""``ckptfn inspect``, ``verify`` and ``export`` on S3 URLs (moto on 127.0.0.1): objects and directories,
metadata by range requests only, one-line errors naming the URL, never a local path made of a URL."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import ckptfn
from ckptfn.cli.main import main
from ckptfn.io.objectstore import ObjectStore

from tests.cli.tables import footer, table_rows

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = [ckptfn.Strategy("val_loss"), ckptfn.Strategy("acc", mode="max", overwrite=False), ckptfn.Every()]
HISTORY = [(0.5, 0.6), (0.4, 0.7), (0.45, 0.8)]  # val_loss best at epoch 1, acc improves every epoch


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def key(url: str) -> str:
    return url.removeprefix("s3://")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory: nothing may appear in it (``nothing_local``)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "cwd"


@pytest.fixture
def run_url(s3_url, s3, cwd):
    """A bucket directory written by a manager over HISTORY, plus an object that is no checkpoint."""
    with ckptfn.CheckpointManager(s3_url, CONFIG) as manager:
        for epoch, (loss, acc) in enumerate(HISTORY):
            weights = {"weight": torch.full((3, 2), float(epoch)), "bias": torch.zeros(3)}
            manager.update({"val_loss": loss, "acc": acc}, {"model": weights, "w": torch.zeros(1000)}, epoch)
    s3.pipe_file(key(s3_url) + "/notes.txt", b"not a checkpoint")
    return s3_url


def nothing_local(tmp_path: pathlib.Path) -> None:
    assert list((tmp_path / "cwd").iterdir()) == []  # no "s3:" directory, nothing else either


# --- inspect -----------------------------------------------------------------------------


def test_inspect_lists_a_remote_directory_like_a_local_one(run_url, s3, capsys, tmp_path):
    code, out, err = run(capsys, "inspect", run_url)
    assert code == 0 and err == ""
    rows = table_rows(out)
    names = [row.split()[0] for row in rows]
    archived = sorted(n for n in s3.ls(key(run_url), refresh=True) if n.rsplit("/", 1)[1].startswith("best_acc_"))
    assert len(archived) == 2  # overwrite=False: the versions of epochs 0 and 1
    assert names == sorted(["best_acc.pt", "best_val_loss.pt", "last.pt", *(n.rsplit("/", 1)[1] for n in archived)])
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["best_val_loss.pt"][1:3] == ["1", "-"] and "val_loss=0.4" in by_name["best_val_loss.pt"]
    assert by_name["best_acc.pt"][1] == "2" and "acc=0.8" in rows[names.index("best_acc.pt")]
    assert by_name["last.pt"][1] == "2" and "every 1 epoch" in rows[names.index("last.pt")]
    assert sum("[archived]" in row for row in rows) == 2
    assert footer(out).startswith("5 names, 5 snapshots, ") and footer(out).endswith(
        " in the store; 1 other entry skipped (not checkpoints)")
    nothing_local(tmp_path)


def test_inspect_json_of_a_remote_file_and_a_directory(run_url, capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", "--json", run_url + "/best_val_loss.pt")
    assert code == 0
    (row,) = json.loads(out)
    assert row["path"] == run_url + "/best_val_loss.pt" and row["file"] == "best_val_loss.pt"
    assert row["kind"] == "ckptfn" and row["epoch"] == 1 and row["error"] is None and row["size"] > 0
    assert {s["filename"]: s.get("value") for s in row["saves"]}["best_val_loss.pt"] == 0.4
    code, out, _ = run(capsys, "inspect", "--json", run_url)
    rows = json.loads(out)
    assert code == 0 and len(rows) == 5 and all(r["path"].startswith(run_url + "/") for r in rows)
    assert sorted(r["snapshot"] for r in rows) == [1, 2, 3, 4, 5]  # each name is an object of its own
    nothing_local(tmp_path)


def test_inspect_reads_metadata_by_range_requests_only(s3_url, s3, monkeypatch, capsys):
    manager = ckptfn.CheckpointManager(s3_url, [ckptfn.Strategy("val_loss"), ckptfn.Every()])
    manager.update({"val_loss": 0.5}, {"w": torch.zeros(4 << 20)}, 0)  # 16 MiB per object
    fetched = []
    original = ObjectStore.read_ranges

    def counting(self, path, ranges):
        data = original(self, path, ranges)
        fetched.extend(len(chunk) for chunk in data)
        return data

    def whole(self, *args, **kwargs):
        raise AssertionError("inspect downloaded a whole object")

    monkeypatch.setattr(ObjectStore, "read_ranges", counting)
    monkeypatch.setattr(ObjectStore, "read", whole)
    monkeypatch.setattr(ObjectStore, "reader", whole)
    code, out, _ = run(capsys, "inspect", s3_url)
    assert code == 0 and [row.split()[0] for row in table_rows(out)] == ["best_val_loss.pt", "last.pt"]
    assert "val_loss=0.5" in out
    assert 0 < sum(fetched) < (1 << 20), sum(fetched)  # two 16 MiB objects, well under 1 MiB fetched


# --- verify ------------------------------------------------------------------------------


def test_verify_finds_a_flipped_bit_in_a_remote_object(run_url, s3, capsys, tmp_path):
    code, out, err = run(capsys, "verify", run_url)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[-1] == "verified 5 checkpoints (full): 5 intact, 0 damaged"
    assert all(line.startswith(f"OK       {run_url}/") for line in lines[:-1])
    target = key(run_url) + "/best_val_loss.pt"
    data = bytearray(s3.cat_file(target))
    data[data.index(bytes(4000)) + 1234] ^= 0x10  # inside the 4000 zero bytes of "w"
    s3.pipe_file(target, bytes(data))
    code, out, _ = run(capsys, "verify", run_url + "/best_val_loss.pt")
    first, summary = out.splitlines()
    assert code == 1 and first.startswith(f"DAMAGED  {run_url}/best_val_loss.pt  (") and "CRC32 mismatch" in first
    assert summary == "verified 1 checkpoint (full): 0 intact, 1 damaged"
    code, out, _ = run(capsys, "verify", "--json", run_url)
    verdicts = json.loads(out)
    assert code == 1 and [v["ok"] for v in verdicts].count(False) == 1
    assert next(v for v in verdicts if not v["ok"])["path"] == run_url + "/best_val_loss.pt"
    code, out, _ = run(capsys, "verify", "--structure", run_url)
    assert code == 0 and out.splitlines()[-1] == "verified 5 checkpoints (structure): 5 intact, 0 damaged"
    nothing_local(tmp_path)


# --- export ------------------------------------------------------------------------------


def test_export_from_a_bucket_to_a_local_file_and_to_a_bucket(run_url, s3, capsys, tmp_path):
    from safetensors.torch import load, load_file

    local = tmp_path / "out" / "model.safetensors"
    local.parent.mkdir()
    code, out, _ = run(capsys, "export", run_url + "/best_val_loss.pt", "--to", local, "--key", "model")
    assert code == 0 and out.startswith(f"exported {run_url}/best_val_loss.pt -> {local} (")
    assert torch.equal(load_file(local)["weight"], torch.full((3, 2), 1.0))
    remote = run_url + "/export/model.safetensors"
    code, out, _ = run(capsys, "export", run_url + "/best_acc.pt", "--to", remote, "--key", "model")
    assert code == 0 and out.startswith(f"exported {run_url}/best_acc.pt -> {remote} (")
    assert torch.equal(load(s3.cat_file(key(remote)))["weight"], torch.full((3, 2), 2.0))
    code, _, _ = run(capsys, "export", run_url + "/best_val_loss.pt", "--to", remote, "--key", "model")  # replaced
    assert code == 0 and torch.equal(load(s3.cat_file(key(remote)))["weight"], torch.full((3, 2), 1.0))
    ckptfn.CheckpointManager(tmp_path / "local", ckptfn.Strategy("val_loss")).update(
        {"val_loss": 0.1}, {"model": {"weight": torch.ones(2)}}, 7)
    code, _, _ = run(capsys, "export", tmp_path / "local" / "best_val_loss.pt", "--to", remote)  # local -> bucket
    assert code == 0 and torch.equal(load(s3.cat_file(key(remote)))["weight"], torch.ones(2))
    assert sorted(n.rsplit("/", 1)[1] for n in s3.ls(key(run_url) + "/export", refresh=True)) == ["model.safetensors"]
    nothing_local(tmp_path)


# --- errors ------------------------------------------------------------------------------


BAD = {  # {run}: an empty directory in a bucket that exists
    "a missing object": ("{run}/missing.pt", "{run}/missing.pt: no such object or directory"),
    "a missing bucket": ("s3://ckptfn-no-such-bucket/run", "there is no bucket 'ckptfn-no-such-bucket'"),
    "an unknown protocol": ("nosuch://bucket/run", "unknown storage protocol 'nosuch'"),
    "a protocol whose package is not installed": ("gs://bucket/run", "gcsfs"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("command", ["inspect", "verify", "export"])
def test_bad_urls_are_one_line_naming_the_url_with_status_2(s3_url, cwd, capsys, tmp_path, command, case):
    if case == "a protocol whose package is not installed" and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    template, message = BAD[case]
    url = template.format(run=s3_url)
    argv = [command, url] + (["--to", str(tmp_path / "m.safetensors")] if command == "export" else [])
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"ckptfn {command}: error: {url}") and message.format(run=s3_url) in lines[0], lines
    nothing_local(tmp_path)


def test_without_s3fs_the_error_says_what_to_install(s3_url, cwd, capsys, monkeypatch, tmp_path):
    (local,) = ckptfn.CheckpointManager(tmp_path / "local", ckptfn.Strategy("val_loss")).update(
        {"val_loss": 0.1}, {"model": {"weight": torch.ones(2)}}, 0)
    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs raises ImportError
    cases = [(["inspect", s3_url], s3_url), (["verify", s3_url], s3_url),
             (["export", s3_url + "/last.pt", "--to", "m.safetensors"], s3_url + "/last.pt"),
             (["export", str(local), "--to", s3_url + "/m.safetensors"], s3_url + "/m.safetensors")]
    for argv, url in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.splitlines() == [
            f"ckptfn {argv[0]}: error: {url}: Install s3fs to access S3 (pip install 'ckptfn[s3]')"], err
    nothing_local(tmp_path)


def test_export_to_a_remote_directory_is_refused(run_url, capsys, tmp_path):
    bucket = run_url.rsplit("/", 1)[0]
    for url in (bucket, run_url, run_url + "/"):  # a bucket, a directory, a trailing slash
        code, _, err = run(capsys, "export", run_url + "/last.pt", "--to", url)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "the export needs an object name" in lines[0], lines
        assert lines[0].startswith(f"ckptfn export: error: {url.rstrip('/')}"), lines
    nothing_local(tmp_path)


def test_the_demo_refuses_a_url_and_makes_no_local_directory(s3_url, cwd, capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--epochs", "1", "--output-dir", s3_url + "/demo")
    assert code == 2 and "the demo writes to a local directory" in err
    nothing_local(tmp_path)


# --- as a separate process ---------------------------------------------------------------


def test_the_installed_command_reads_the_endpoint_from_fsspec_environment_variables(run_url, s3_endpoint, tmp_path):
    env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "ckptfn", "inspect", "--json", run_url]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path / "cwd", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(row["file"] for row in json.loads(result.stdout))[-2:] == ["best_val_loss.pt", "last.pt"]
    missing = subprocess.run([sys.executable, "-m", "ckptfn", "verify", run_url + "/missing.pt"], capture_output=True,
                             text=True, cwd=tmp_path / "cwd", env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"ckptfn verify: error: {run_url}/missing.pt: no such object or directory")
    nothing_local(tmp_path)
