"""The shells with an S3 URL as the checkpoint directory (moto on 127.0.0.1): manager, async, execute, resume."""

from __future__ import annotations

import pytest
import torch

import ckptfn

CONFIG = [ckptfn.Strategy("val_loss"), ckptfn.Strategy("acc", mode="max", top_k=2), ckptfn.Every(n_steps=20, filename="last.pt")]
HISTORY = [(0.5, 0.7), (0.6, 0.8), (0.4, 0.75), (0.45, 0.6)]


def names(s3, url):
    s3.invalidate_cache()
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(url.removeprefix("s3://")))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_the_manager_keeps_its_bests_in_a_bucket_and_resumes_from_it(s3_url, s3, tmp_path, async_save):
    events = []
    with ckptfn.CheckpointManager(s3_url, CONFIG, async_save=async_save, on_saved=events.append) as manager:
        for step, (loss, acc) in enumerate(HISTORY, start=1):
            paths = manager.update({"val_loss": loss, "acc": acc}, {"w": torch.full((8,), float(step))}, 0, global_step=20 * step)
            assert all(str(p).startswith(s3_url + "/") for p in paths)
    with ckptfn.CheckpointManager(tmp_path, CONFIG) as local:  # the same decisions on a local disk
        for step, (loss, acc) in enumerate(HISTORY, start=1):
            local.update({"val_loss": loss, "acc": acc}, {"w": torch.full((8,), float(step))}, 0, global_step=20 * step)
    assert manager.state == local.state
    assert names(s3, s3_url) == sorted(p.name for p in tmp_path.iterdir())
    assert [e.path.rsplit("/", 1)[1] for e in events] == [e.name for e in events]
    resumed = ckptfn.CheckpointManager(s3_url, CONFIG)  # a restart: the bests come from the bucket
    assert resumed.state == manager.state
    payload, metadata = ckptfn.load_checkpoint(s3_url + "/last.pt")
    assert payload["w"][0].item() == 4.0 and metadata["global_step"] == 80
    assert "s3://" in resumed.summary()


def test_execute_and_save_checkpoint_take_urls(s3_url, s3):
    state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, 0)
    (path,) = ckptfn.execute(actions, {"w": torch.zeros(2)}, s3_url, state=state)
    assert path == s3_url + "/best_val_loss.pt" and path.name == "best_val_loss.pt"
    manager = ckptfn.CheckpointManager(s3_url, ckptfn.Strategy("val_loss"))
    saved = manager.save_checkpoint({"w": torch.ones(2)}, "final.pt", metadata={"epoch": 9})
    assert saved == s3_url + "/final.pt" and ckptfn.read_metadata(saved)["epoch"] == 9
    elsewhere = manager.save_checkpoint({}, s3_url + "/sub/x.pt")
    assert "x.pt" in names(s3, s3_url + "/sub")
    assert elsewhere.name == "x.pt"


def test_sharded_saves_to_a_bucket_are_refused_clearly(s3_url):
    manager = ckptfn.CheckpointManager(s3_url, ckptfn.Strategy("val_loss"), sharded=True)
    with pytest.raises(ckptfn.CheckpointWriteError, match="sharded .DCP. checkpoints need a local or shared file system path, not a URL"):
        manager.update({"val_loss": 0.5}, {"w": torch.zeros(2)}, 0)
    assert not any(p.name.startswith("s3:") for p in __import__("pathlib").Path.cwd().iterdir())  # nothing local
