"""Reading checkpoints: safe loading only, clear errors for every kind of bad file."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

import ckptfn
from ckptfn import CheckpointError, CheckpointNotFoundError, Strategy, execute, init, load_checkpoint, read_metadata, step
from tests.faults import RunsACommand


@pytest.fixture
def good(tmp_path):
    state, actions = step(init(Strategy("val_loss", filename="best_loss.pt")), {"val_loss": 0.5})
    (path,) = execute(actions, {"w": torch.randn(64, 64)}, tmp_path, state=state)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["raw pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = {"state_dict": RunsACommand(marker), "metadata": {"format": "ckptfn/1"}}
    if how == "raw pickle":
        path.write_bytes(pickle.dumps(evil))
    else:
        torch.save(evil, path)
    for reader in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError, match="cannot be loaded safely|not a torch zip archive") as info:
            reader(path)
        assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files_are_checkpoint_errors(good, tmp_path, fraction):
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    for reader in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError) as info:
            reader(cut)
        assert str(cut) in str(info.value)


def test_random_bytes_and_empty_files(tmp_path):
    for name, content in [("empty.pt", b""), ("noise.pt", os.urandom(4096)), ("text.pt", b"hello")]:
        path = tmp_path / name
        path.write_bytes(content)
        for reader in (load_checkpoint, read_metadata):
            with pytest.raises(CheckpointError, match=name):
                reader(path)


def test_a_plain_torch_save_file_is_not_a_ckptfn_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    for reader in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError, match="not a ckptfn checkpoint"):
            reader(path)
    torch.save({"state_dict": {}, "metadata": {"format": "other/2"}}, path)
    with pytest.raises(CheckpointError, match="not a ckptfn checkpoint"):
        load_checkpoint(path)


def test_missing_file_lists_what_the_directory_holds(good):
    missing = good.parent / "best_corr.pt"
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)
    assert str(missing) in str(info.value) and "best_loss.pt" in str(info.value)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        read_metadata(good.parent / "nowhere" / "x.pt")


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_read_metadata_matches_load_and_map_location(good):
    state_dict, meta = load_checkpoint(good, map_location="cpu")
    assert read_metadata(good) == meta
    assert state_dict["w"].device.type == "cpu"


@pytest.mark.filterwarnings("ignore::ckptfn.MetricWarning")
def test_restore_from_directory_trusts_the_files(tmp_path):
    config = ckptfn.Config([Strategy("val_loss", filename="best_loss.pt"), Strategy("val_corr", mode="max", filename="best_corr.pt"),
                            Strategy("mse", filename="best_mse.pt")])
    state = init(config)
    for epoch, metrics in enumerate([{"val_loss": 1.0, "val_corr": 0.1}, {"val_loss": 0.5, "val_corr": 0.05}]):
        state, actions = step(state, metrics)
        execute(actions, {}, tmp_path, state=state)
    (tmp_path / "best_mse.pt").write_bytes(b"garbage")
    with pytest.raises(ckptfn.CheckpointError, match=r"cannot judge the checkpoint at a watched name.*best_mse.pt"):
        ckptfn.restore_from_directory(config, tmp_path)  # a file that cannot be judged is never "absent"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = ckptfn.restore_from_directory(config, tmp_path, unreadable="warn")
    assert ckptfn.best_values(resumed) == {"best_loss.pt": 0.5, "best_corr.pt": 0.1, "best_mse.pt": None}
    assert [b.epoch for b in resumed.bests] == [1, 0, None]
    assert resumed.steps == 2
    assert any("best_mse.pt" in str(w.message) for w in caught)
    # a changed mode under the same file name starts fresh
    flipped = ckptfn.Config([Strategy("val_loss", mode="max", filename="best_loss.pt")])
    assert ckptfn.best_values(ckptfn.restore_from_directory(flipped, tmp_path)) == {"best_loss.pt": None}
