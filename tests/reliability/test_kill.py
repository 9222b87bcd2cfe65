"""Kill test (tests/reliability/kill.py), reduced: 12 SIGKILLs, 1-4 MiB payloads, most during a write.

The full run is ``python tests/reliability/kill.py --trials 100`` (8-64 MiB).
"""

from __future__ import annotations

import json
import warnings

import torch

from ckptfn import CheckpointManager
from tests.reliability import kill
from tests.reliability.common import Tally


def test_sigkill_at_random_moments_and_during_writes_loses_nothing(tmp_path):
    tally = kill.run(12, mib=(1, 4), restarts=4, workdir=tmp_path, in_write_share=0.8, delay_fraction=0.3)
    tally.assert_clean()
    assert tally.count("fault", kill.KILLS) == 12
    assert tally.count("fault", kill.IN_WRITE) >= 6  # most kills land inside a write


def _session_with_history(tmp_path):
    """A run directory as a child leaves it after three epochs, and that child's log."""
    session = kill.Session(tmp_path / "run", elements=2048)
    log = tmp_path / "log.jsonl"
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(session.directory, kill.STRATEGIES, resume=True)
        records.append({"event": "start", "bests": manager.best_values})
        for epoch in range(3):
            metrics = {"val_loss": 1.0 - epoch / 10, "loss_components": {"concordance": 1.0 - epoch / 10}, "val_corr": epoch / 10}
            weights = torch.rand(2048)
            weights[: kill.MARK] = float(epoch)
            payload = {"model": {"w": weights}, "epoch": epoch, "sum": float(weights.sum(dtype=torch.float64))}
            records.append({"event": "update", "epoch": epoch, "metrics": metrics})
            written = manager.update(metrics, payload, epoch)
            records.append({"event": "done", "epoch": epoch, "written": [p.name for p in written], "bests": manager.best_values})
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return session, log


def test_the_checks_see_a_clean_directory_as_clean(tmp_path):
    session, log = _session_with_history(tmp_path)
    tally = Tally()
    session.check(tally, log, killed=0, where="clean")
    tally.assert_clean()


def test_the_checks_catch_a_partial_file_under_a_final_name(tmp_path):
    session, log = _session_with_history(tmp_path)
    path = session.directory / "best_loss.pt"
    data = path.read_bytes()
    path.unlink()  # (not in place: the names of one snapshot share the file)
    path.write_bytes(data[: len(data) // 2])
    tally = Tally()
    session.check(tally, log, killed=0, where="truncated")
    assert any("corruption" in p and "best_loss.pt" in p for p in tally.problems)


def test_the_checks_catch_a_best_that_got_worse_and_a_lost_version(tmp_path):
    session, log = _session_with_history(tmp_path)
    tally = Tally()
    session.check(tally, log, killed=0, where="first look")
    archived = sorted(p for p in session.directory.iterdir() if p.name.startswith("best_corr_"))
    (session.directory / "best_corr.pt").unlink()
    archived[0].rename(session.directory / "best_corr.pt")  # an older, worse version back in place
    session.check(tally, log, killed=0, where="second look")
    assert any("lost" in p and "best_corr.pt" in p for p in tally.problems)
