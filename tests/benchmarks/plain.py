"""The imperative design ckptfn replaces: the same decision rules over a mutable dict.

The baseline of benchmark row 5. It implements exactly the rules of
``ckptfn.step`` (dotted names with exact keys winning, missing and non-finite
metrics skipped, strict improvement by more than ``min_delta``), the way a
training script or a per-metric callback usually does it: one object whose
``best`` dict is updated in place, actions as tuples. It validates nothing.

>>> tracker = PlainTracker([{"metric_name": "val_loss", "mode": "min", "filename": "best.pt", "min_delta": 0.0}])
>>> tracker.step({"val_loss": 0.5}), tracker.step({"val_loss": 0.7}), tracker.step({})
([('save', 'best.pt', 0, 0.5, None)], [], [('skip', 'best.pt', 2, 'missing')])
"""

from __future__ import annotations

import math

_MISSING = object()


def _lookup(metrics, name):
    if name in metrics:
        return metrics[name]
    head, dot, rest = name.partition(".")
    if not dot or head not in metrics:
        return _MISSING
    inner = metrics[head]
    return _lookup(inner, rest) if isinstance(inner, dict) else _MISSING


class PlainTracker:
    """Bests in a dict, mutated by ``step``; actions as tuples ``("save"|"skip", filename, epoch, ...)``."""

    def __init__(self, strategies):
        self.strategies = [dict(s) for s in strategies]
        self.best = {s["filename"]: None for s in self.strategies}
        self.best_epoch = {s["filename"]: None for s in self.strategies}
        self.steps = 0

    def step(self, metrics, epoch=None):
        if epoch is None:
            epoch = self.steps
        actions = []
        for s in self.strategies:
            filename = s["filename"]
            value = _lookup(metrics, s["metric_name"])
            if value is _MISSING:
                actions.append(("skip", filename, epoch, "missing"))
                continue
            value = float(value)
            if not math.isfinite(value):
                actions.append(("skip", filename, epoch, "not_finite"))
                continue
            best = self.best[filename]
            if s["mode"] == "min":
                better = best is None or value < best - s["min_delta"]
            else:
                better = best is None or value > best + s["min_delta"]
            if better:
                actions.append(("save", filename, epoch, value, best))
                self.best[filename] = value
                self.best_epoch[filename] = epoch
        self.steps += 1
        return actions


def plain_scan(strategies, history):
    """The tracker after every epoch of ``history``, and each epoch's actions."""
    tracker = PlainTracker(strategies)
    return tracker, [tracker.step(metrics) for metrics in history]
