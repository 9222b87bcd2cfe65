"""Config.from_mapping: every accepted shape and every documented error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

import ckptfn
from ckptfn import Config, ConfigError, Strategy


class FrozenMap(Mapping):
    """A Mapping that is not a dict (like OmegaConf's DictConfig)."""

    def __init__(self, **items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


class FrozenList(Sequence):
    """A Sequence that is not a list (like OmegaConf's ListConfig)."""

    def __init__(self, *items):
        self._items = items

    def __getitem__(self, index):
        return self._items[index]

    def __len__(self):
        return len(self._items)


def test_none_is_disabled():
    config = Config.from_mapping(None)
    assert not config.enabled and not config.active


def test_single_mapping():
    config = Config.from_mapping({"metric_name": "val_corr", "mode": "max"})
    assert config.strategies == (Strategy("val_corr", mode="max"),)


def test_sequence_of_mappings_with_defaults_filled_in():
    config = Config.from_mapping(
        [{"metric_name": "val_loss"}, {"metric_name": "loss_components.concordance", "min_delta": 0.01}]
    )
    assert config.strategies == (
        Strategy("val_loss"),
        Strategy("loss_components.concordance", min_delta=0.01),
    )


def test_wrapper_mapping_and_disabled_wrapper_still_validates():
    config = Config.from_mapping({"enabled": True, "strategies": [{"metric_name": "val_loss"}]})
    assert config.active
    off = Config.from_mapping({"enabled": False, "strategies": [{"metric_name": "val_loss"}]})
    assert not off.active and len(off.strategies) == 1
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.mode"):
        Config.from_mapping({"enabled": False, "strategies": [{"metric_name": "a", "mode": "x"}]})


@pytest.mark.parametrize("obj", [[], {}, {"strategies": None}, {"enabled": True, "strategies": []}])
def test_empty_forms_are_off(obj):
    assert not Config.from_mapping(obj).active


def test_any_mapping_and_sequence_types_are_accepted():
    config = Config.from_mapping(
        FrozenMap(enabled=True, strategies=FrozenList(FrozenMap(metric_name="a", overwrite=False)))
    )
    assert config.strategies == (Strategy("a", overwrite=False),)


def test_records_pass_through():
    config = Config([Strategy("a")])
    assert Config.from_mapping(config) is config
    assert Config.from_mapping(Strategy("a")) == config
    assert Config.from_mapping([Strategy("a"), {"metric_name": "b"}]).strategies[1] == Strategy("b")


def test_filename_none_means_default():
    assert Config.from_mapping({"metric_name": "a", "filename": None}).strategies[0].filename == "best_a.pt"


@pytest.mark.parametrize(
    "obj, message",
    [
        (
            [{"metric_name": "val_loss", "mdoe": "max"}],
            "[0]: unknown key 'mdoe' (did you mean 'mode'?); valid keys: metric_name, mode, filename, overwrite, min_delta",
        ),
        (
            {"enabled": True, "strategies": [{"metric_name": "a"}, {"metric_name": "b", "mode": "maximum"}]},
            "strategies[1].mode: 'maximum' is not one of 'min', 'max'",
        ),
        ([{"metric_name": "a"}, {"mode": "max"}], "[1].metric_name: required key is missing"),
        ({"mode": "max"}, "metric_name: required key is missing"),
        ([{"metric_name": "a"}, {"metric_name": "a"}], "[1].filename: 'best_a.pt' is already used by [0]"),
        (
            {"strategies": [{"metric_name": "a", "filename": "x.pt"}, {"metric_name": "b", "filename": "x.pt"}]},
            "strategies[1].filename: 'x.pt' is already used by strategies[0]",
        ),
        ({"enabled": "yes"}, "enabled: expected true or false, got str 'yes'"),
        ({"strategy": []}, "unknown key 'strategy' (did you mean 'strategies'?)"),
        ({"strategies": "val_loss"}, "strategies: expected a list of strategies, got str 'val_loss'"),
        ({"strategies": [3]}, "strategies[0]: expected a strategy mapping, got int 3"),
        ("val_loss", "expected None, a strategy mapping, a list of strategies"),
        (3.5, "expected None, a strategy mapping"),
        ([{"metric_name": "a", 1: 2}], "[0]: keys must be strings, got int 1"),
        ([{"metric_name": "a", "filename": "../x.pt"}], "[0].filename: '../x.pt' contains a '/'"),
        ([{"metric_name": "a", "overwrite": "false"}], "[0].overwrite: expected true or false, got str 'false'"),
        ([{"metric_name": "a", "min_delta": -1}], "[0].min_delta: must be a finite number >= 0, got -1"),
        ([{"metric_name": "a..b"}], "[0].metric_name: 'a..b' has an empty segment"),
    ],
)
def test_errors_name_the_key_path(obj, message):
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(obj)
    assert str(info.value).startswith(message), str(info.value)


def test_unreadable_value_is_a_config_error():
    class Exploding(Mapping):
        def __getitem__(self, key):
            raise RuntimeError("Missing mandatory value: mode")

        def __iter__(self):
            return iter(["metric_name"])

        def __len__(self):
            return 1

    with pytest.raises(ConfigError, match="metric_name: cannot read value: Missing mandatory value"):
        Config.from_mapping(Exploding())


# --- a name that another strategy's retention would delete (issue 13) -----------------------------


def test_a_filename_of_the_form_of_another_strategys_archive_is_refused_naming_both():
    clashing = [
        {"metric_name": "val_loss", "filename": "model.pt", "overwrite": False, "keep": 1},
        {"metric_name": "val_corr", "mode": "max", "filename": "model_20250101T000000000000Z.pt"},
    ]
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(clashing)
    message = str(info.value)
    assert message.startswith("[1].filename: 'model_20250101T000000000000Z.pt' has the form of an archived version")
    assert "'model.pt' ([0])" in message
    with pytest.raises(ConfigError, match=r"^strategies\[0\]\.filename: 'model_20250101T000000000000Z-3.pt'"):
        Config([Strategy("a", filename="model_20250101T000000000000Z-3.pt"), ckptfn.Every(filename="model.pt")])
    Config([Strategy("a", filename="model.pt"), Strategy("b", filename="model_best.pt")])  # not a stamp: fine
