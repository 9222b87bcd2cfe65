"""improved() and the Save/Skip records."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptfn import ConfigError, Save, Skip, Strategy, improved

finite = st.floats(allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize(
    "mode, best, value, min_delta, expected",
    [
        ("min", None, 5.0, 0.0, True),
        ("max", None, -5.0, 0.0, True),
        ("min", 1.0, 0.9, 0.0, True),
        ("min", 1.0, 1.0, 0.0, False),
        ("max", 1.0, 1.0, 0.0, False),
        ("min", 1.0, 0.9, 0.1, False),
        ("min", 1.0, 0.85, 0.1, True),
        ("max", 1.0, 1.2, 0.1, True),
        ("max", 1.0, 1.05, 0.1, False),
        ("min", 0.0, -0.0, 0.0, False),
    ],
)
def test_improved_examples(mode, best, value, min_delta, expected):
    assert improved(mode, best, value, min_delta) is expected


@given(finite, finite, st.floats(0, 1e3))
def test_ties_never_improve_and_modes_are_dual(best, value, min_delta):
    assert not improved("min", best, best, min_delta)
    assert not improved("max", best, best, min_delta)
    assert improved("max", best, value, min_delta) == improved("min", -best, -value, min_delta)


def test_improved_rejects_unknown_modes():
    with pytest.raises(ConfigError, match="'auto' is not one of 'min', 'max'"):
        improved("auto", 1.0, 0.5)


def test_save_validates_its_invariant():
    s = Strategy("val_loss", min_delta=0.1)
    assert Save(s, 1, 0.5, 1.0).filename == "best_val_loss.pt"
    with pytest.raises(ValueError, match="does not improve"):
        Save(s, 1, 0.95, 1.0)
    with pytest.raises(ValueError, match="finite"):
        Save(s, 1, math.nan, None)
    with pytest.raises(ValueError, match="epoch"):
        Save(s, -1, 0.5, None)


def test_skip_reasons_and_equality():
    s = Strategy("val_loss")
    with pytest.raises(ValueError, match="reason"):
        Skip(s, 0, "bad")
    assert Skip(s, 0, "not_finite", math.nan) == Skip(s, 0, "not_finite", math.nan)
    assert str(Skip(s, 4, "missing")) == "val_loss is missing at epoch 4; best_val_loss.pt not saved"


def test_actions_support_match():
    def describe(action):
        match action:
            case Save(strategy=Strategy(filename=name), value=value):
                return f"save {name} {value}"
            case Skip(reason=reason):
                return f"skip {reason}"

    s = Strategy("val_loss")
    assert describe(Save(s, 0, 1.0, None)) == "save best_val_loss.pt 1.0"
    assert describe(Skip(s, 0, "missing")) == "skip missing"
