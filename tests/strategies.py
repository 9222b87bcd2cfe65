"""Hypothesis strategies shared by the whole test suite.

A *logical* history is a list of epochs, each a dict ``metric name -> value`` where
the value is a float (possibly NaN/inf) or ``MISSING``. ``render`` turns one logical
epoch into the metrics mapping a training loop would pass: dotted names nested or
flat at random, values as Python floats, ints, numpy or torch scalars, plus noise
keys that no strategy watches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st

import ckptfn
from ckptfn.core.metrics import MISSING
from ckptfn.core.strategy import MODES

# No name is a dotted prefix of another, so nesting never collides.
METRIC_NAMES = (
    "val_loss",
    "val_corr",
    "loss_components.mse",
    "loss_components.concordance",
    "eval.scores.auc",
)

NON_FINITE = (math.nan, math.inf, -math.inf)

#: Finite values on a small grid (frequent ties and repeats) or anywhere.
finite_values = st.one_of(
    st.integers(-4, 4).map(lambda i: i / 2),
    st.floats(allow_nan=False, allow_infinity=False),
)

#: A logical value of one metric in one epoch.
logical_values = st.one_of(
    finite_values,
    finite_values,
    st.sampled_from(NON_FINITE),
    st.just(MISSING),
)

modes = st.sampled_from(MODES)
min_deltas = st.one_of(st.just(0.0), st.sampled_from([0.25, 0.5, 1.0]), st.floats(0, 1e6))


@st.composite
def strategies_for(draw, metric_name: str, *, min_delta=min_deltas, filename=None) -> ckptfn.Strategy:
    """A Strategy watching ``metric_name`` with random mode, overwrite and min_delta."""
    return ckptfn.Strategy(
        metric_name,
        mode=draw(modes),
        filename=filename,
        overwrite=draw(st.booleans()),
        min_delta=draw(min_delta) if isinstance(min_delta, st.SearchStrategy) else min_delta,
    )


@st.composite
def configs(draw, *, min_delta=min_deltas, max_strategies: int = 4) -> ckptfn.Config:
    """1..max_strategies strategies over METRIC_NAMES, possibly several per metric.

    ``on_missing="warn"``: histories here miss metrics at any epoch, the first included,
    to exercise skips; ``on_missing="error"`` has its own properties (tests/core/test_on_missing.py).
    """
    names = draw(st.lists(st.sampled_from(METRIC_NAMES), min_size=1, max_size=max_strategies))
    return ckptfn.Config(
        tuple(
            draw(strategies_for(name, min_delta=min_delta, filename=f"s{index}_{name}.pt"))
            for index, name in enumerate(names)
        ),
        on_missing="warn",
    )


def logical_histories(names, *, max_size: int = 25):
    """Lists of epochs over the given metric names."""
    epoch = st.fixed_dictionaries({name: logical_values for name in names})
    return st.lists(epoch, max_size=max_size)


def _render_value(draw, value: float):
    kind = draw(st.sampled_from(["float", "float", "float", "int", "numpy", "torch"]))
    if kind == "int" and math.isfinite(value) and value == int(value):
        return int(value)
    if kind == "numpy":
        return np.float64(value)
    if kind == "torch":
        return torch.tensor(value, dtype=torch.float64)
    return value


@st.composite
def rendered(draw, logical: dict) -> dict:
    """The metrics mapping for one logical epoch (nested or flat, mixed scalar types, noise)."""
    metrics: dict = {"lr": 1e-3, "notes": "not a metric", "other": {"x": [1, 2]}}
    for name, value in logical.items():
        if value is MISSING:
            continue
        shown = _render_value(draw, value)
        if "." in name and draw(st.booleans()):
            *parents, leaf = name.split(".")
            node = metrics
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = shown
        else:
            metrics[name] = shown
    return metrics


@st.composite
def runs(draw, *, min_delta=min_deltas, max_size: int = 25):
    """``(config, logical_history, rendered_history)`` for one training run."""
    config = draw(configs(min_delta=min_delta))
    names = sorted({s.metric_name for s in config.strategies})
    logical = draw(logical_histories(names, max_size=max_size))
    return config, logical, [draw(rendered(epoch)) for epoch in logical]


# --- periodic saves and retention (issue 9) ----------------------------------------------------


@st.composite
def everys(draw, filename: str = "last.pt", *, max_n: int = 5) -> ckptfn.Every:
    """An Every with a random period, overwrite policy and (when archiving) keep."""
    overwrite = draw(st.booleans())
    keep = None if overwrite else draw(st.one_of(st.none(), st.integers(1, 4)))
    return ckptfn.Every(draw(st.integers(1, max_n)), filename=filename, overwrite=overwrite, keep=keep)


@st.composite
def mixed_configs(draw, *, min_delta=min_deltas, max_strategies: int = 4) -> ckptfn.Config:
    """``configs()`` plus one or two ``Every`` strategies at random positions."""
    strategies = list(draw(configs(min_delta=min_delta, max_strategies=max_strategies)).strategies)
    for index in range(draw(st.integers(1, 2))):
        position = draw(st.integers(0, len(strategies)))
        strategies.insert(position, draw(everys(filename=f"every{index}.pt")))
    return ckptfn.Config(tuple(strategies), on_missing="warn")


@st.composite
def mixed_runs(draw, *, min_delta=min_deltas, max_size: int = 25):
    """``(config, logical_history, rendered_history)`` for a config with ``Every`` strategies."""
    config = draw(mixed_configs(min_delta=min_delta))
    names = sorted({s.metric_name for s in config.strategies if isinstance(s, ckptfn.Strategy)})
    logical = draw(logical_histories(names, max_size=max_size))
    return config, logical, [draw(rendered(epoch)) for epoch in logical]


#: Strictly increasing epoch numbers with gaps (validation that skips epochs).
increasing_epochs = st.lists(st.integers(1, 4), max_size=30).map(
    lambda steps: [sum(steps[: i + 1]) - 1 for i in range(len(steps))]
)


# --- top-k by value, steps and clocks (issue 14) ---------------------------------------------

#: Values on a half grid: their differences and the grid min_deltas below are exact floats,
#: so a reference model in exact arithmetic and the library's float comparisons agree.
grid_values = st.integers(-8, 8).map(lambda i: i / 2)
grid_min_deltas = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5])

#: A logical value on the grid, or not finite, or missing.
grid_logical_values = st.one_of(grid_values, grid_values, st.sampled_from(NON_FINITE), st.just(MISSING))


@st.composite
def top_k_strategies(draw, metric_name: str = "val_loss", *, min_delta=st.just(0.0), top_k=st.integers(2, 5),
                     on_missing: str | None = "warn") -> ckptfn.Strategy:
    """A Strategy keeping the top k (random mode, k and min_delta)."""
    return ckptfn.Strategy(
        metric_name,
        mode=draw(modes),
        min_delta=draw(min_delta),
        top_k=draw(top_k),
        on_missing=on_missing,
    )


@st.composite
def top_k_runs(draw, *, min_delta=st.just(0.0), top_k=st.integers(2, 5), values=logical_values, max_size: int = 25):
    """``(strategy, logical values, rendered history)`` for one top-k strategy (``on_missing="warn"``)."""
    name = draw(st.sampled_from(METRIC_NAMES))
    strategy = draw(top_k_strategies(name, min_delta=min_delta, top_k=top_k))
    logical = draw(st.lists(values, max_size=max_size))
    return strategy, logical, [draw(rendered({name: value})) for value in logical]


#: Non-decreasing global steps with gaps (0 allowed: repeated decisions at one step).
non_decreasing_steps = st.tuples(st.integers(0, 50), st.lists(st.integers(0, 30), max_size=30)).map(
    lambda start_gaps: [start_gaps[0] + sum(start_gaps[1][:i]) for i in range(len(start_gaps[1]) + 1)]
)

#: Non-decreasing clock readings on a quarter-second grid (exact in floats).
non_decreasing_clocks = st.tuples(st.integers(-400, 400), st.lists(st.integers(0, 200), max_size=30)).map(
    lambda start_gaps: [(start_gaps[0] + sum(start_gaps[1][:i])) / 4 for i in range(len(start_gaps[1]) + 1)]
)

#: Periods of ``Every(seconds=...)`` on the same grid.
grid_seconds = st.integers(1, 400).map(lambda i: i / 4)
