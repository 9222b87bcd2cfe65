"""Asynchronous and distributed corners; every part counts what it tried.

- fault "fork with a save in flight": ``os.fork()`` while the background writer
  is inside a save; the child exits normally (or saves asynchronously itself, with
  a new manager and with the writer it inherited), the parent's save completes
  intact. Each scenario runs in a fresh interpreter under a timeout
  (tests/shells/forking.py), so a hang is counted, never waited for.
- input "payload kinds, sync vs async": payloads mixing many tensor kinds (dense
  of every dtype, views, slices, tied weights, nested, sparse COO/CSR/CSC/BSR/BSC,
  quantized, parameters, requires_grad, conj/neg views, Python attributes, meta,
  zero-size; tests/shells/tensor_kinds.py) saved with and without
  ``async_save``: both load exactly the same (bits, layout, sharing), or both are
  refused with the same ``PayloadError`` before anything is written.
- input "ranks configured differently": two gloo ranks whose managers differ in
  one setting (mode, filename, number of strategies, Every period, resume,
  async_save): every rank raises the same ``ConfigError`` naming the difference,
  without a hang or a gloo error, and the process group still works afterwards.
"""

from __future__ import annotations

import pathlib
import tempfile
import warnings

import torch
from hypothesis import HealthCheck, given, settings

from tests.reliability.common import Tally
from tests.shells import forking, tensor_kinds

FORK = "fork with a save in flight"
PAYLOADS = "payload kinds, sync vs async"
RANKS = "ranks configured differently"


def fork_scenarios(tally: Tally, work: pathlib.Path) -> None:
    for scenario in forking.SCENARIOS:
        tally.tried("fault", FORK)
        directory = work / f"fork-{scenario}"
        directory.mkdir(parents=True)
        for category, message in forking.check(directory, scenario):
            tally.problem("fault", FORK, category, message)


def _compare(tally: Tally, payload: object, what: str) -> None:
    tally.tried("input", PAYLOADS)
    with tempfile.TemporaryDirectory(prefix="ckptfn-kinds-") as root:
        try:
            found = tensor_kinds.sync_vs_async(pathlib.Path(root), payload)
        except Exception as error:  # noqa: BLE001 - counted
            found = f"{type(error).__name__}: {error}"
    if found is not None:
        category = "corruption" if found.startswith("the files differ") else "unexpected"
        tally.problem("input", PAYLOADS, category, f"{what}: {found}")


def payload_kinds(tally: Tally, examples: int) -> None:
    """The kinds the snapshot used to break, then ``examples`` payloads mixing kinds at random."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta/prototype notices for sparse and nested tensors
        for name, make in tensor_kinds.REGRESSIONS.items():
            _compare(tally, {"x": make(), "epoch": 1}, name)

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(tensor_kinds.payloads())
        def check(case):
            payload, kinds = case
            _compare(tally, payload, f"a payload of {', '.join(kinds)}")

        check()


def ranks_configured_differently(tally: Tally, work: pathlib.Path) -> None:
    from tests.distributed import workers
    from tests.distributed.harness import RanksFailed, run_ranks, start_forkserver

    cases = list(workers.MISCONFIGURED)
    tally.tried("input", RANKS, len(cases))
    start_forkserver()
    try:
        rank0, rank1 = run_ranks(work, workers.configured_differently, str(work / "ranks"), cases, timeout=90)
    except RanksFailed as error:  # a hang, a crash or a gloo error
        tally.problem("input", RANKS, "unexpected", f"the ranks failed: {str(error)[:800]}")
        return
    for case in cases:
        expected = workers.expected_refusal(case)
        if not rank0["seen"][case] == rank1["seen"][case] == expected:
            tally.problem(
                "input", RANKS, "unexpected",
                f"{case}: rank 0 {rank0['seen'][case]}, rank 1 {rank1['seen'][case]}, expected {expected}",
            )
    if not rank0["paths"] == rank1["paths"] == [["best_loss.pt", "best_corr.pt"], ["best_loss.pt"], []]:
        tally.problem("input", RANKS, "unexpected", f"ranks configured alike then saved {rank0['paths']} / {rank1['paths']}")


def run(examples: int = 40) -> Tally:
    """Every corner; ``examples`` random payloads for the sync-vs-async comparison."""
    tally = Tally()
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        raise RuntimeError("tests/reliability/corners.py needs torch.distributed with gloo")
    with tempfile.TemporaryDirectory(prefix="ckptfn-corners-") as work:
        fork_scenarios(tally, pathlib.Path(work))
        payload_kinds(tally, examples)
        ranks_configured_differently(tally, pathlib.Path(work))
    return tally
