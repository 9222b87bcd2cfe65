"""Preemption under a process group: 2 gloo ranks, a real SIGUSR1 to rank 1 only.

The ranks agree on the flag with one collective per ``update``, so both stop at the same step,
and rank 0 alone writes ``last.pt``, which holds that step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import ckptfn

from tests.distributed import preempted_training
from tests.distributed.harness import run_ranks, start_forkserver
from tests.reliability.common import ROOT

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)


def start_rank(directory, rank: int, store, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.distributed.preempted_training", str(directory),
         "--world", "2", "--rank", str(rank), "--store", str(store), "--count-collectives", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize("extra", [(), ("--async-save",)], ids=["sync", "async"])
def test_a_signal_to_rank_1_stops_both_ranks_at_the_same_step_and_rank_0_saves_it(tmp_path, extra):
    run = tmp_path / "run"
    ranks = [start_rank(run, rank, tmp_path / "store", *extra) for rank in (0, 1)]
    try:
        for line in ranks[1].stdout:
            if line.strip() == "step 5":
                ranks[1].send_signal(signal.SIGUSR1)  # rank 1 only
                break
        outputs = [rank.communicate(timeout=60) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (_, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-3000:]
    zero, one = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    stopped = zero["stopped_at"]
    assert one["stopped_at"] == stopped >= 5
    assert one["preempted"]["signals"] == ["SIGUSR1"] and zero["preempted"]["signals"] == []  # rank 0 got none
    assert zero["preempted"]["global_step"] == one["preempted"]["global_step"] == stopped
    assert zero["agreements"] == one["agreements"] == stopped  # one agreement collective per update
    assert one["creates"] == 0 and zero["creates"] > 0  # only rank 0 writes
    assert ckptfn.verify_checkpoint(run / "last.pt", level="full").ok
    saved, metadata = ckptfn.load_checkpoint(run / "last.pt")
    assert metadata["global_step"] == saved["step"] == stopped
    finals = [torch.load(run / f"final{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, value in saved["model"].items():  # DDP: the same weights on both ranks, and in the file
        assert torch.equal(value, finals[0]["model"][name]) and torch.equal(value, finals[1]["model"][name])


def test_ranks_that_differ_in_save_on_all_raise_the_same_error(tmp_path):
    start_forkserver()
    results = run_ranks(tmp_path, preempted_training.mismatched_save_on, str(tmp_path / "run"), timeout=60)
    assert results[0] == results[1]
    assert "rank 1 has save_on=('SIGUSR1',) where rank 0 has ()" in results[0]
