"""``async_save=True`` under a process group and for sharded state: 2 CPU ranks over gloo.

The decision stays synchronous and shared; rank 0 (replicated payloads) or every rank
(sharded ones, through DCP's ``async_save``) writes in the background; a failure on any
rank is raised on every rank at the next ``update``/``wait``, with the same rolled-back
state everywhere. Every run has a hard timeout (``run_ranks``).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import ckptfn
from ckptfn import CheckpointManager, load_checkpoint, read_metadata
from ckptfn.core.naming import archived_of

from tests.distributed import async_workers, workers
from tests.distributed.harness import RanksFailed, hidden, run_ranks, start_forkserver, visible

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)


@pytest.fixture(scope="module", autouse=True)
def forkserver():
    start_forkserver()


# --- replicated payloads (DDP) -------------------------------------------------------------------


def test_ddp_with_async_save_decides_together_and_rank_0_writes_what_was_staged(tmp_path):
    out = tmp_path / "run"
    rank0, rank1 = run_ranks(tmp_path, async_workers.ddp_async, str(out))
    # the same decisions as a synchronous run (rank 0's metrics), the same paths and states on every rank
    expected = [["best_loss.pt", "best_corr.pt"], ["best_loss.pt"], ["best_corr.pt"], ["best_loss.pt"]]
    assert rank0["returned"] == rank1["returned"] == expected
    assert rank0["states"] == rank1["states"]
    assert rank0["best"] == rank1["best"] == {"best_loss.pt": 0.7, "best_corr.pt": 0.3}
    assert rank1["creates"] == 0 and rank0["creates"] > 0  # rank 0 alone wrote
    assert rank0["heard"] == [("best_loss.pt", 0), ("best_corr.pt", 0), ("best_loss.pt", 1), ("best_corr.pt", 2),
                              ("best_loss.pt", 3)]  # each write once confirmed, in order
    assert rank1["heard"] == []
    assert [name.split("_")[0] for name in rank0["writers"]] == ["ckptfn-writer"]  # every byte written in the background
    assert hidden(out) == []
    # the files hold the payload as it was when update returned, not the +1000 the loop applied after
    state_dict, metadata = load_checkpoint(out / "best_loss.pt")
    assert metadata["epoch"] == 3
    for key, value in rank0["saved_weights"][3].items():
        assert torch.equal(state_dict["model"][key], value)
    corr, corr_metadata = load_checkpoint(out / "best_corr.pt")
    assert corr_metadata["epoch"] == 2
    assert all(torch.equal(corr["model"][k], v) for k, v in rank0["saved_weights"][2].items())
    archived = [name for name in visible(out) if archived_of(name, "best_corr.pt")]
    assert len(archived) == 1 and read_metadata(out / archived[0])["epoch"] == 0


@pytest.mark.parametrize("where", ["update", "wait"])
def test_a_failed_background_write_is_raised_on_every_rank_at_the_same_call(tmp_path, where):
    out = tmp_path / "run"
    rank0, rank1 = run_ranks(tmp_path, async_workers.ddp_async_failure, str(out), where)
    assert rank0["returned"] == rank1["returned"] == ["best_loss.pt", "best_corr.pt"]
    assert rank0["believed"] == rank1["believed"]
    assert [s["best"] for s in rank0["believed"]["strategies"]] == [0.5, 0.2]  # handed over: believed
    assert len(rank0["seen"]) == len(rank1["seen"]) == 1
    assert "No space left on device" in rank0["seen"][0] and rank1["seen"][0].startswith("on rank 0: ")
    assert "No space left on device" in rank1["seen"][0]
    # rolled back to the files on every rank alike: epoch 0's bests
    assert rank0["after_failure"] == rank1["after_failure"]
    assert [(s["best"], s["best_epoch"]) for s in rank0["after_failure"]["strategies"]] == [(0.9, 0), (0.1, 0)]
    # in step afterwards: epoch 3 improves both again and is on disk (barrier=True)
    assert rank0["paths"] == rank1["paths"] == ["best_loss.pt", "best_corr.pt"]
    assert rank0["state"] == rank1["state"]
    assert read_metadata(out / "best_loss.pt")["epoch"] == 3
    assert hidden(out) == []


def test_a_rank_leaving_its_with_block_with_an_exception_closes_alone_and_its_write_lands(tmp_path):
    out = tmp_path / "run"
    rank0, rank1 = run_ranks(tmp_path, async_workers.leaving_with_an_exception, str(out))
    assert rank0["raised"] == "the loop failed on rank 0" and rank1["raised"] == "the loop failed on rank 1"
    assert rank0["collectives_on_exit"] == rank1["collectives_on_exit"] == 0  # a rank alone never blocks on the others
    assert rank0["best"] == {"best_loss.pt": 0.5, "best_corr.pt": 0.2}  # read back from the files
    assert read_metadata(out / "best_loss.pt")["epoch"] == 0 and hidden(out) == []


# --- sharded payloads (FSDP2 on CPU) ---------------------------------------------------------------


def test_fsdp_with_async_save_writes_sharded_trees_through_dcp_async_save(tmp_path):
    out = tmp_path / "run"
    rank0, rank1 = run_ranks(tmp_path, async_workers.fsdp_async, str(out), timeout=90)
    expected = [
        ["best_loss.dcp", "best_corr.dcp"],
        ["best_loss.dcp", "best_corr.dcp"],
        ["best_corr.dcp"],
        ["best_loss.dcp", "best_corr.dcp"],
    ]
    assert rank0["returned"] == rank1["returned"] == expected
    assert rank0["states"] == rank1["states"]
    for rank in (rank0, rank1):  # DCP's async_save, called from the loop's thread, saved on a thread of its own
        assert rank["started"] == ["MainThread"] * 4
        assert [name.split("_")[0] for name in rank["saved"]] == ["AsyncCheckpointExecutor"]
    for rank in (rank0, rank1):  # every shard as it was when update returned (not +1000)
        assert rank["metadata_epoch"] == 3
        for key, shard in rank["best_local"].items():
            assert torch.equal(rank["loaded_local"][key], shard)
    names = visible(out)
    assert [n for n in names if not archived_of(n, "best_corr.dcp")] == ["best_corr.dcp", "best_loss.dcp"]
    assert len([n for n in names if archived_of(n, "best_corr.dcp")]) == 3
    assert hidden(out) == []
    for entry in os.listdir(out / "best_loss.dcp"):  # one write for both names: the same tree
        assert os.path.samefile(out / "best_loss.dcp" / entry, out / "best_corr.dcp" / entry)


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1-fails", "rank0-fails"])
def test_a_rank_failing_its_background_shard_write_fails_every_rank_alike(tmp_path, victim):
    out = tmp_path / "run"
    rank0, rank1 = run_ranks(tmp_path, async_workers.fsdp_async_failure, str(out), victim, timeout=90)
    assert rank0["returned"] == rank1["returned"] == ["best_loss.dcp", "best_corr.dcp"]
    assert len(rank0["seen"]) == len(rank1["seen"]) == 1
    assert all("No space left on device" in rank["seen"][0] for rank in (rank0, rank1))
    assert rank0["after_failure"] == rank1["after_failure"]
    assert [(s["best"], s["best_epoch"]) for s in rank0["after_failure"]["strategies"]] == [(0.9, 0), (0.1, 0)]
    assert rank0["paths"] == rank1["paths"] == ["best_loss.dcp"]  # 0.4 beats 0.9; 0.05 does not beat 0.1
    assert rank0["state"] == rank1["state"]
    assert rank0["hidden"] == [] and hidden(out) == []  # the failed tree was removed
    assert read_metadata(out / "best_loss.dcp")["epoch"] == 2 and read_metadata(out / "best_corr.dcp")["epoch"] == 0


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1-killed", "rank0-killed"])
def test_a_rank_killed_during_a_background_shard_write_leaves_the_previous_trees(tmp_path, victim):
    out = tmp_path / "run"
    with pytest.raises(RanksFailed) as failed:
        run_ranks(tmp_path, async_workers.fsdp_async_killed, str(out), victim, timeout=60)
    assert failed.value.exitcodes[victim] == -9
    state_dict, metadata = load_checkpoint(out / "best_loss.dcp")
    assert metadata["epoch"] == 0 and set(state_dict) == {"model", "optim"}
    assert visible(out) == ["best_corr.dcp", "best_loss.dcp"]
    rank0, rank1 = run_ranks(tmp_path, workers.fsdp_resume, str(out), 2)  # resumes and tidies
    assert [s["best"] for s in rank0["resumed"]["strategies"]] == [0.9, 0.1]
    assert rank0["returned"] == rank1["returned"] == [["best_loss.dcp", "best_corr.dcp"], ["best_loss.dcp"]]
    assert hidden(out) == []


# --- one process, sharded=True -----------------------------------------------------------------------


def test_sharded_async_in_one_process_stages_now_and_commits_the_tree_later(tmp_path):
    strategies = [ckptfn.Strategy("val_loss"), ckptfn.Every(n_epochs=1)]
    weights = torch.zeros(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DCP's "assuming a single process" warning is not the user's business
        with CheckpointManager(tmp_path, strategies, sharded=True, async_save=True) as manager:
            returned = []
            for epoch, loss in enumerate([0.5, 0.4, 0.6]):
                weights += 1
                returned.append([p.name for p in manager.update({"val_loss": loss}, {"w": weights, "epoch": epoch}, epoch)])
                weights += 100  # after update returned: must not reach the tree
    assert returned == [["best_val_loss.dcp", "last.dcp"], ["best_val_loss.dcp", "last.dcp"], ["last.dcp"]]
    assert manager.best_values == {"best_val_loss.pt": 0.4}
    best, metadata = load_checkpoint(tmp_path / "best_val_loss.dcp")
    assert metadata["epoch"] == 1 and torch.equal(best["w"], torch.full((4,), 102.0))
    last, metadata = load_checkpoint(tmp_path / "last.dcp")
    assert metadata["epoch"] == 2 and torch.equal(last["w"], torch.full((4,), 203.0))
    assert hidden(tmp_path) == []
    resumed = CheckpointManager(tmp_path, strategies, sharded=True, async_save=True)
    assert resumed.best_values == {"best_val_loss.pt": 0.4}
    resumed.close()


def test_a_payload_dcp_cannot_store_is_refused_before_anything_starts(tmp_path):
    with CheckpointManager(tmp_path, [ckptfn.Strategy("val_loss")], sharded=True, async_save=True) as manager:
        with pytest.raises(ckptfn.PayloadError, match="lambda|function"):
            manager.update({"val_loss": 0.5}, {"w": torch.zeros(2), "f": lambda: 0}, 0)
        assert manager.best_values == {"best_val_loss.pt": None}
        assert [p.name for p in manager.update({"val_loss": 0.5}, {"w": torch.zeros(2)}, 1)] == ["best_val_loss.dcp"]
    assert visible(tmp_path) == ["best_val_loss.dcp"] and hidden(tmp_path) == []
