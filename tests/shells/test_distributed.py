"""Distributed runs: 2 CPU ranks over gloo (forked workers, see tests/distributed/).

Every multi-rank test runs its ranks under a hard timeout (``run_ranks``): a
hang fails the test, it never blocks CI. The one-time cost of the forkserver
(importing torch, DCP and FSDP once) is paid in the module fixture.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import ckptfn
from ckptfn import CheckpointManager, load_checkpoint, read_metadata
from ckptfn.core.naming import archived_of

from tests.distributed import workers
from tests.distributed.harness import RanksFailed, hidden, run_ranks, start_forkserver, visible

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)


@pytest.fixture(scope="module", autouse=True)
def forkserver():
    """Start the forkserver (it imports torch, DCP, FSDP once) before the first test's clock runs."""
    start_forkserver()


# --- replicated payloads (DDP) -----------------------------------------------------------------


def test_ddp_ranks_act_on_rank_0s_decision_and_only_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    rank0, rank1 = run_ranks(tmp_path, workers.ddp_one_decision, str(out))
    # rank 0's metrics decide (rank 1's own metrics would have saved at other epochs)
    expected = [["best_loss.pt", "best_corr.pt"], ["best_loss.pt"], ["best_corr.pt"], ["best_loss.pt"]]
    assert rank0["returned"] == rank1["returned"] == expected
    assert rank0["states"] == rank1["states"]  # equal after every epoch, not just at the end
    assert rank0["best"] == rank1["best"] == {"best_loss.pt": 0.7, "best_corr.pt": 0.3}
    # exactly one set of files, all written by rank 0
    assert rank1["creates"] == 0 and rank0["creates"] > 0
    names = visible(out)
    assert [n for n in names if not archived_of(n, "best_corr.pt")] == ["best_corr.pt", "best_loss.pt"]
    assert len([n for n in names if archived_of(n, "best_corr.pt")]) == 1  # overwrite=False kept epoch 0's
    assert hidden(out) == []
    state_dict, metadata = load_checkpoint(out / "best_loss.pt")
    assert metadata["epoch"] == 3 and metadata["metrics"] == {"val_loss": 0.7, "val_corr": 0.2}  # rank 0's
    assert all(torch.equal(state_dict["model"][k], v) for k, v in rank0["weights"].items())
    assert ckptfn.restore(ckptfn.Config.from_mapping(workers.TWO), metadata["manager_state"]).to_dict() == rank1["states"][3]
    assert rank1["visible_after_barrier"]  # update(..., barrier=True) returned after rank 0's write


def test_a_failure_on_rank_0_is_raised_on_every_rank_and_they_stay_in_step(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, workers.failures_reach_every_rank, str(tmp_path / "run"))
    assert [kind for kind, _ in rank0["seen"]] == [kind for kind, _ in rank1["seen"]] == [
        "MetricTypeError",
        "CheckpointWriteError",
    ]
    assert all(message.startswith("on rank 0: ") for _, message in rank1["seen"])
    assert "'oops'" in rank1["seen"][0][1] and "No space left on device" in rank1["seen"][1][1]
    # nothing was written, so no rank believes in a best
    assert rank0["after_failure"] == rank1["after_failure"]
    assert [s["best"] for s in rank1["after_failure"]["strategies"]] == [None, None]
    assert rank0["paths"] == rank1["paths"] == ["best_loss.pt", "best_corr.pt"]
    assert rank0["state"] == rank1["state"]
    assert visible(tmp_path / "run") == ["best_corr.pt", "best_loss.pt"]


# --- sharded payloads (FSDP2 on CPU) ------------------------------------------------------------


def test_fsdp_best_checkpoints_are_sharded_directories_that_load_back_every_shard(tmp_path):
    out = tmp_path / "run"
    rank0, rank1 = run_ranks(tmp_path, workers.fsdp_best_checkpoints, str(out))
    assert rank0["kinds"] == ["DTensor"]  # the parameters really are sharded
    expected = [
        ["best_loss.dcp", "best_corr.dcp"],
        ["best_loss.dcp", "best_corr.dcp"],
        ["best_corr.dcp"],
        ["best_loss.dcp", "best_corr.dcp"],
    ]
    assert rank0["returned"] == rank1["returned"] == expected
    assert rank0["state"] == rank1["state"]
    # each rank holds a different half of every parameter
    for key, shard in rank0["best_local"].items():
        assert shard.shape[0] * 2 == rank0["best_full"][key].shape[0]
        assert torch.equal(torch.cat([shard, rank1["best_local"][key]]), rank0["best_full"][key])
    # load_sharded restored every shard (and the optimizer state) into a differently initialized model
    for rank in (rank0, rank1):
        assert rank["metadata_epoch"] == 3
        for key, shard in rank["best_local"].items():
            assert not torch.equal(rank["before_local"][key], shard)
            assert torch.equal(rank["loaded_local"][key], shard)
        assert torch.equal(rank["loaded_exp_avg"], rank["best_exp_avg"])
    # on disk: committed trees only, one write for both names of epoch 3 (hard links), archives for overwrite=False
    names = visible(out)
    assert [n for n in names if not archived_of(n, "best_corr.dcp")] == ["best_corr.dcp", "best_loss.dcp"]
    assert len([n for n in names if archived_of(n, "best_corr.dcp")]) == 3  # epochs 0, 1, 2
    assert hidden(out) == []
    for entry in os.listdir(out / "best_loss.dcp"):
        assert os.path.samefile(out / "best_loss.dcp" / entry, out / "best_corr.dcp" / entry)
    # ckptfn's metadata record, and a whole (consolidated) load in this single process
    metadata = read_metadata(out / "best_loss.dcp")
    assert metadata["format"] == "ckptfn/1" and metadata["epoch"] == 3
    assert [s["filename"] for s in metadata["saves"]] == ["best_loss.pt", "best_corr.pt"]
    assert metadata["metrics"] == {"val_loss": 0.6, "val_corr": 0.5}  # rank 0's
    state_dict, same = load_checkpoint(out / "best_loss.dcp")
    assert same == metadata
    for key, full in rank0["best_full"].items():
        assert type(state_dict["model"][key]) is torch.Tensor and torch.equal(state_dict["model"][key], full)
    assert load_checkpoint(out / "best_corr.dcp")[1]["epoch"] == 3


def test_a_resumed_sharded_run_continues_from_the_best_values_on_disk(tmp_path):
    out = tmp_path / "run"
    run_ranks(tmp_path, workers.fsdp_best_checkpoints, str(out))
    rank0, rank1 = run_ranks(tmp_path, workers.fsdp_resume, str(out), 4)
    for rank in (rank0, rank1):
        bests = {s["filename"]: (s["best"], s["best_epoch"]) for s in rank["resumed"]["strategies"]}
        assert bests == {"best_loss.pt": (0.6, 3), "best_corr.pt": (0.5, 3)}
    # epoch 4: loss 0.7 is worse than 0.6 (no save), corr 0.6 beats 0.5; epoch 5: loss 0.55 beats 0.6
    assert rank0["returned"] == rank1["returned"] == [["best_corr.dcp"], ["best_loss.dcp"]]
    assert rank0["best"] == rank1["best"] == {"best_loss.pt": 0.55, "best_corr.pt": 0.6}
    assert rank0["state"] == rank1["state"]
    assert read_metadata(out / "best_loss.dcp")["epoch"] == 5 and read_metadata(out / "best_corr.dcp")["epoch"] == 4


@pytest.mark.parametrize(
    ("victim", "where"),
    [(1, "writing"), (0, "writing"), (0, "committing")],
    ids=["rank1-killed-writing-shards", "rank0-killed-writing-shards", "rank0-killed-before-publishing"],
)
def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint_loadable(tmp_path, victim, where):
    out = tmp_path / "run"
    with pytest.raises(RanksFailed) as failed:
        run_ranks(tmp_path, workers.sharded_save_killed, str(out), victim, where)
    assert failed.value.exitcodes[victim] == -9  # SIGKILL, not a clean error
    # the committed epoch-0 checkpoint is intact and whole
    state_dict, metadata = load_checkpoint(out / "best_loss.dcp")
    assert metadata["epoch"] == 0 and set(state_dict) == {"model", "optim"}
    assert visible(out) == ["best_corr.dcp", "best_loss.dcp"]
    # a restarted run resumes from it, tidies the dead writers' trees, and saves again
    rank0, rank1 = run_ranks(tmp_path, workers.fsdp_resume, str(out), 2)
    assert [s["best"] for s in rank0["resumed"]["strategies"]] == [0.9, 0.1]
    assert rank0["returned"] == rank1["returned"] == [["best_loss.dcp", "best_corr.dcp"], ["best_loss.dcp"]]
    assert hidden(out) == []
    assert read_metadata(out / "best_loss.dcp")["epoch"] == 3


# --- the README's examples ----------------------------------------------------------------------

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "distributed"
README = EXAMPLES.parent.parent / "README.md"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_example(tmp_path, name: str) -> list[list[str]]:
    outputs = run_ranks(
        tmp_path, workers.torchrun_script, str(EXAMPLES / name), str(tmp_path), free_port(), init=False
    )
    return [output.splitlines() for output in outputs]


def test_the_readme_ddp_example_runs_on_two_ranks(tmp_path):
    rank0, rank1 = run_example(tmp_path, "example_ddp.py.txt")
    assert rank0[0].startswith("0 ['best_loss.pt'] {'best_loss.pt': ") and rank1[0] == "1" + rank0[0][1:]
    best = read_metadata(tmp_path / "ddp_run" / "best_loss.pt")["saves"][0]["value"]
    assert rank0[0].endswith(f"{{'best_loss.pt': {best!r}}}")
    assert visible(tmp_path / "ddp_run") == ["best_loss.pt"]


def test_the_readme_fsdp_example_runs_resumes_and_loads_whole(tmp_path):
    rank0, rank1 = run_example(tmp_path, "example_fsdp.py.txt")
    metadata = read_metadata(tmp_path / "fsdp_run" / "best_loss.dcp")
    best = metadata["saves"][0]["value"]
    assert rank0 == [f"0 ['best_loss.dcp'] {{'best_loss.pt': {best!r}}}", f"0 restored epoch {metadata['epoch']}"]
    assert rank1 == ["1" + line[1:] for line in rank0]
    again, _ = run_example(tmp_path, "example_fsdp.py.txt")  # resume=True: the same losses are no better
    assert again[0] == f"0 [] {{'best_loss.pt': {best!r}}}"
    state_dict, same = load_checkpoint(tmp_path / "fsdp_run" / "best_loss.dcp")
    assert same == metadata
    shapes = {k: tuple(v.shape) for k, v in state_dict["model"].items()}
    assert shapes == {"0.weight": (16, 8), "0.bias": (16,), "2.weight": (1, 16), "2.bias": (1,)}


def test_the_readme_shows_the_tested_examples_verbatim():
    blocks = re.findall(r"```py(?:thon)?\n(.*?)```", README.read_text(), flags=re.S)
    for name in ("example_ddp.py.txt", "example_fsdp.py.txt"):
        script = (EXAMPLES / name).read_text()
        header = script.splitlines()[0]
        shown = [block for block in blocks if block.startswith(header)]
        assert all(block == script for block in shown), f"README's {header!r} differs from tests/distributed/{name}"


# --- the single-process path pays nothing -------------------------------------------------------


def test_a_single_process_never_touches_torch_distributed(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called in a single process")

    for name in ("broadcast_object_list", "broadcast", "barrier", "all_reduce", "all_gather_object", "gather_object"):
        monkeypatch.setattr(torch.distributed, name, forbidden)
    monkeypatch.setattr(ckptfn.shells.distributed.Coordinator, "update", forbidden)
    monkeypatch.setattr(ckptfn.shells.distributed.Coordinator, "save_one", forbidden)
    manager = CheckpointManager(tmp_path, workers.TWO)
    for epoch, loss in enumerate([0.5, 0.4, 0.6]):
        manager.update({"val_loss": loss, "val_corr": loss}, {"w": torch.zeros(2)}, epoch)
    manager.save_checkpoint({"w": torch.ones(2)}, "last.pt")
    assert CheckpointManager(tmp_path, workers.TWO, resume=True).best_values == {"best_loss.pt": 0.4, "best_corr.pt": 0.6}
    assert not torch.distributed.is_initialized()


def test_importing_and_using_ckptfn_in_one_process_loads_no_distributed_checkpointing(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, torch, ckptfn
        manager = ckptfn.CheckpointManager({str(tmp_path)!r}, [{{"metric_name": "val_loss"}}], resume=True)
        manager.update({{"val_loss": 0.5}}, {{"w": torch.zeros(2)}}, 0)
        ckptfn.load_checkpoint(manager.output_dir / "best_val_loss.pt")
        heavy = sorted(m for m in sys.modules if m.startswith(("torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.fsdp")))
        print(heavy, torch.distributed.is_initialized())
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(ckptfn.__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"


# --- ranks configured differently ---------------------------------------------------------------


def test_ranks_configured_differently_all_raise_the_same_config_error_when_the_manager_is_built(tmp_path):
    cases = list(workers.MISCONFIGURED)
    rank0, rank1 = run_ranks(tmp_path, workers.configured_differently, str(tmp_path / "run"), cases, timeout=60)
    # before: no error on rank 0, then rank 1 failed with a ValueError or a ConfigError at the first update
    # while rank 0 died in gloo ("Read error", "Connection closed by peer"); a different Every period
    # went unnoticed
    for case in workers.MISCONFIGURED:
        assert rank0["seen"][case] == rank1["seen"][case] == workers.expected_refusal(case), case
    assert not (tmp_path / "run" / "mode").exists()  # refused before anything was read or written
    # the process group is intact: a manager configured alike saves on every rank, and the check
    # was one collective when it was built, none per update
    assert rank0["paths"] == rank1["paths"] == [["best_loss.pt", "best_corr.pt"], ["best_loss.pt"], []]
    for rank in (rank0, rank1):
        assert rank["at_construction"] == {"all_gather_object": 1, "broadcast_object_list": 1}  # the check; restore
        assert rank["after_updates"]["all_gather_object"] == 1
