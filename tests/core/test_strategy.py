"""Every documented Strategy/Config validation case, as examples."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import Config, ConfigError, Strategy


def test_defaults():
    s = Strategy("val_loss")
    assert (s.mode, s.filename, s.overwrite, s.min_delta) == ("min", "best_val_loss.pt", True, 0.0)
    assert Strategy("loss_components.concordance").filename == "best_loss_components_concordance.pt"


@pytest.mark.parametrize("name", ["", "a..b", ".a", "a.", "."])
def test_bad_metric_names(name):
    with pytest.raises(ConfigError, match=r"^metric_name: ") as info:
        Strategy(name)
    assert info.value.path == "metric_name"


def test_metric_name_must_be_a_string():
    with pytest.raises(ConfigError, match="metric_name: expected a str, got int 3"):
        Strategy(3)


@pytest.mark.parametrize("mode", ["maximum", "MIN", "auto", None, 1])
def test_bad_mode_names_value_and_valid_ones(mode):
    with pytest.raises(ConfigError) as info:
        Strategy("val_loss", mode=mode)
    assert str(info.value) == f"mode: {mode!r} is not one of 'min', 'max'"


@pytest.mark.parametrize(
    "filename, fragment",
    [
        ("", "must not be empty"),
        ("sub/best.pt", "contains a '/'"),
        ("/abs/best.pt", "contains a '/'"),
        ("..\\best.pt", "contains a '\\'"),
        ("a\\b.pt", "contains a '\\'"),
        ("a\0b.pt", "NUL"),
        (".hidden.pt", "starts with '.'"),
        (".", "starts with '.'"),
        ("..", "starts with '.'"),
        ("C:best.pt", "drive"),
        (7, "expected a str"),
    ],
)
def test_bad_filenames(filename, fragment):
    with pytest.raises(ConfigError, match=r"^filename: ") as info:
        Strategy("val_loss", filename=filename)
    assert fragment in str(info.value)
    assert repr(filename) in str(info.value) or filename == ""


@pytest.mark.parametrize("overwrite", ["false", 0, 1, None])
def test_overwrite_must_be_a_bool(overwrite):
    with pytest.raises(ConfigError, match=r"^overwrite: expected true or false"):
        Strategy("val_loss", overwrite=overwrite)


@pytest.mark.parametrize("min_delta", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_bad_min_delta(min_delta):
    with pytest.raises(ConfigError, match=r"^min_delta: "):
        Strategy("val_loss", min_delta=min_delta)


def test_min_delta_is_converted_to_float():
    assert Strategy("val_loss", min_delta=1).min_delta == 1.0
    assert type(Strategy("val_loss", min_delta=1).min_delta) is float


def test_records_are_frozen_and_evolve_revalidates():
    s = Strategy("val_loss")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.mode = "max"
    assert attrs.evolve(s, mode="max").mode == "max"
    with pytest.raises(ConfigError, match="mode"):
        attrs.evolve(s, mode="maximum")


def test_config_converts_lists_and_rejects_duplicates():
    config = Config([Strategy("a"), Strategy("b")])
    assert isinstance(config.strategies, tuple)
    with pytest.raises(ConfigError) as info:
        Config([Strategy("a"), Strategy("b"), Strategy("a", mode="max")])
    assert str(info.value) == "strategies[2].filename: 'best_a.pt' is already used by strategies[0]"
    with pytest.raises(ConfigError, match=r"strategies\[1\].*expected a Strategy, got dict"):
        Config([Strategy("a"), {"metric_name": "b"}])
    with pytest.raises(ConfigError, match="enabled: expected true or false"):
        Config([], enabled="no")


def test_same_metric_twice_with_different_files_is_allowed():
    config = Config([Strategy("a"), Strategy("a", overwrite=False, filename="a_history.pt")])
    assert len(config.strategies) == 2


def test_active():
    assert not Config().active
    assert not Config([Strategy("a")], enabled=False).active
    assert Config(Strategy("a")).active


@given(st.text(min_size=1).filter(lambda t: "" not in t.split(".")))
def test_default_filename_is_always_valid_or_rejected_cleanly(name):
    try:
        s = Strategy(name)
    except ConfigError as error:
        assert error.path == "filename"
    else:
        assert s.filename.startswith("best_") and "/" not in s.filename


def test_public_api_is_exported():
    for name in ckptfn.__all__:
        assert hasattr(ckptfn, name), name
    assert issubclass(ckptfn.ConfigError, ValueError)
    assert issubclass(ckptfn.MetricTypeError, TypeError)
    assert issubclass(ckptfn.MetricWarning, UserWarning)
    assert issubclass(ckptfn.CheckpointWriteError, ckptfn.CheckpointError)
    assert issubclass(ckptfn.CheckpointNotFoundError, FileNotFoundError)
