"""Metric names that catch typos, and names with slashes (issue 14).

``on_missing="error"`` (the default): a watched metric missing before its strategy's first
save raises ``MissingMetricError`` listing the metrics there are and a "did you mean";
``"warn"`` skips. Default file names never hold a character a file name cannot have.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import CheckpointManager, Config, ConfigError, MissingMetricError, Save, Skip, Strategy, init, scan, step
from ckptfn.core.metrics import MAX_LISTED, MISSING, metric_names
from ckptfn.core.naming import member_name
from ckptfn.core.strategy import MAX_FILENAME_BYTES, default_filename

from tests.strategies import logical_values, modes


# --- the typo --------------------------------------------------------------------------------


def test_a_misspelt_metric_fails_at_the_first_decision_with_the_names_and_a_hint():
    """``val_los`` instead of ``val_loss``: the first decision raises, naming the metric, its
    file, every metric there is and the closest one."""
    with pytest.raises(MissingMetricError) as info:
        step(init(Strategy("val_los")), {"val_loss": 0.5, "train_loss": 0.7, "lr": 1e-3}, epoch=0)
    message = str(info.value)
    assert "'val_los'" in message and "best_val_los.pt" in message
    assert "the metrics are: lr, train_loss, val_loss" in message
    assert "did you mean 'val_loss'?" in message
    assert "on_missing='warn'" in message
    assert isinstance(info.value, LookupError)


def test_the_message_lists_nested_names_dotted_and_says_when_the_mapping_is_empty():
    with pytest.raises(MissingMetricError, match=r"the metrics are: val\.acc, val\.loss \(did you mean 'val\.loss'\?\)"):
        step(init(Strategy("val.los")), {"val": {"loss": 0.5, "acc": 0.9}})
    with pytest.raises(MissingMetricError, match="the metrics mapping is empty"):
        step(init(Strategy("val_loss")), {})
    with pytest.raises(MissingMetricError) as info:  # nothing close: no guess
        step(init(Strategy("val_loss")), {"epoch_time": 3.0})
    assert "did you mean" not in str(info.value) and "epoch_time" in str(info.value)


def test_a_long_list_of_metrics_is_cut_short():
    metrics = {f"m{i:03d}": float(i) for i in range(3 * MAX_LISTED)}
    with pytest.raises(MissingMetricError) as info:
        step(init(Strategy("val_loss")), metrics)
    listed = re.search(r"the metrics are: (.*?)(, \.\.\.)?\. Fix", str(info.value))
    assert listed is not None and listed.group(2) == ", ..."
    assert len(listed.group(1).split(", ")) == MAX_LISTED


@pytest.mark.parametrize("how", ["config", "strategy", "mapping"])
def test_on_missing_warn_skips_and_lists_what_there_is(how):
    """``on_missing="warn"`` (on the config, on the strategy, or in plain data) gives a Skip whose
    ``available`` lists the metric names, and the run goes on."""
    metrics = {"val_loss": 0.5, "train": {"loss": 0.7}}
    config = {
        "config": Config([Strategy("val_los")], on_missing="warn"),
        "strategy": Config([Strategy("val_los", on_missing="warn")]),
        "mapping": Config.from_mapping({"on_missing": "warn", "strategies": [{"metric_name": "val_los"}]}),
    }[how]
    state, actions = step(init(config), metrics, epoch=0, global_step=12)
    assert actions == (Skip(config.strategies[0], 0, "missing", global_step=12),)
    assert actions[0].available == ("train.loss", "val_loss") == metric_names(metrics)
    assert state.bests == init(config).bests and state.steps == 1
    state, actions = step(state, {"val_los": 0.4}, epoch=1)  # it appears later: saved
    assert [type(a) for a in actions] == [Save]


@pytest.mark.parametrize(
    "config_mode, strategy_mode, raises",
    [
        ("error", None, True),
        ("warn", None, False),
        ("error", "warn", False),
        ("warn", "error", True),
        ("error", "error", True),
        ("warn", "warn", False),
    ],
)
def test_the_strategy_setting_beats_the_config_setting(config_mode, strategy_mode, raises):
    config = Config([Strategy("val_loss"), Strategy("val_los", on_missing=strategy_mode)], on_missing=config_mode)
    assert config.on_missing_of(config.strategies[1]) == (strategy_mode or config_mode)
    if raises:
        with pytest.raises(MissingMetricError, match="'val_los'"):
            step(init(config), {"val_loss": 0.5})
    else:
        _, actions = step(init(config), {"val_loss": 0.5})
        assert [(type(a), a.filename) for a in actions] == [(Save, "best_val_loss.pt"), (Skip, "best_val_los.pt")]


def test_the_default_is_error_and_it_is_documented_in_the_repr():
    assert Config().on_missing == "error" and Strategy("a").on_missing is None
    assert repr(Config([Strategy("a")])) == "Config(strategies=(Strategy(metric_name='a', mode='min', filename='best_a.pt', overwrite=True, min_delta=0.0, keep=None),), enabled=True)"
    assert repr(Config([Strategy("a", on_missing="warn")], on_missing="warn")).endswith(
        "keep=None, on_missing='warn'),), enabled=True, on_missing='warn')")


def test_a_disabled_config_never_raises():
    assert step(init(Config([Strategy("val_los")], enabled=False)), {"val_loss": 1.0})[1] == ()


@given(st.sampled_from([1, 2, 3]), modes, st.lists(logical_values, max_size=25))
def test_it_raises_exactly_while_nothing_was_saved_and_step_stays_pure(top_k, mode, logical):
    """``on_missing="error"``: a missing metric raises iff no finite value was seen before (a
    NaN does not count); then the caller's state is unchanged and usable, and skipping that
    decision continues like a run that never had it. Once saved, a missing metric is a Skip."""
    strategy = Strategy("val_loss", mode=mode, top_k=top_k)
    state, saved = init(strategy), False
    for epoch, value in enumerate(logical):
        metrics = {} if value is MISSING else {"val_loss": value, "train_loss": 1.0}
        if value is MISSING and not saved:
            before, data = copy.deepcopy(state), state.to_dict()
            with pytest.raises(MissingMetricError, match="the metrics mapping is empty"):
                step(state, metrics, epoch)
            assert state == before and state.to_dict() == data
            continue
        state, actions = step(state, metrics, epoch)
        if value is MISSING:
            assert [(type(a), a.reason) for a in actions] == [(Skip, "missing")]
        saved = saved or math.isfinite(value)
        assert (state.bests[0].value is not None) == saved


@given(st.lists(logical_values, max_size=25))
def test_warn_and_error_agree_wherever_error_does_not_raise(logical):
    """The two settings differ only before the first save: from the first finite value on
    (and on any history without an early missing value) both give the same states and actions."""
    first = next((i for i, v in enumerate(logical) if v is not MISSING and math.isfinite(v)), len(logical))
    tail = [{} if v is MISSING else {"val_loss": v} for v in logical[first:]]
    head = [{"val_loss": v} for v in logical[:first] if v is not MISSING]
    history = head + tail
    warn_final, warn_steps = scan(init(Config([Strategy("val_loss")], on_missing="warn")), history)
    error_final, error_steps = scan(init(Config([Strategy("val_loss")], on_missing="error")), history)
    assert warn_final.bests == error_final.bests and warn_steps == error_steps


def test_a_restored_top_k_set_without_its_best_file_counts_as_saved():
    """A top-k strategy whose members were restored (its best file gone) has saved before: skip."""
    s = Strategy("acc", mode="max", top_k=3)
    state = ckptfn.State(Config([s]), [ckptfn.Best(None, None, None, [ckptfn.Member(0.5, 1, None, "best_acc-epoch=1.pt")])])
    _, actions = step(state, {"loss": 1.0})
    assert [a.reason for a in actions] == ["missing"]


def test_the_manager_raises_before_writing_anything(tmp_path):
    """Through ``CheckpointManager``: the typo fails the first update, no file is written, the
    state is still fresh; with ``on_missing="warn"`` the warning names the metrics and the hint."""
    manager = CheckpointManager(tmp_path, [{"metric_name": "val_los"}])
    with pytest.raises(MissingMetricError, match="did you mean 'val_loss'"):
        manager.update({"val_loss": 0.5}, {"w": torch.ones(1)}, 0)
    assert list(tmp_path.iterdir()) == [] and manager.state == init(manager.config)
    warned = CheckpointManager(tmp_path, {"on_missing": "warn", "strategies": [{"metric_name": "val_los"}]})
    with pytest.warns(ckptfn.MetricWarning, match=r"val_los is missing at epoch 0.*the metrics are: val_loss \(did you mean 'val_loss'\?\)"):
        assert warned.update({"val_loss": 0.5}, {"w": torch.ones(1)}, 0) == []


# --- plain data ------------------------------------------------------------------------------


def test_from_mapping_reads_on_missing():
    config = Config.from_mapping({"on_missing": "warn", "strategies": [
        {"metric_name": "val_loss"}, {"metric_name": "val_acc", "mode": "max", "on_missing": "error"}]})
    assert config.on_missing == "warn" and [s.on_missing for s in config.strategies] == [None, "error"]
    assert Config.from_mapping({"metric_name": "a", "on_missing": "warn"}).strategies[0].on_missing == "warn"
    assert Config.from_mapping([{"metric_name": "a"}]).on_missing == "error"


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"on_missing": "loud", "strategies": [{"metric_name": "a"}]}, "on_missing: 'loud' is not one of 'error', 'warn'"),
        ({"on_missing": None, "strategies": [{"metric_name": "a"}]}, "on_missing: None is not one of 'error', 'warn'"),
        ([{"metric_name": "a", "on_missing": "ignore"}], "[0].on_missing: 'ignore' is not one of 'error', 'warn' (or None: the config's)"),
        ({"strategies": [{"metric_name": "a"}, {"metric_name": "b", "on_missing": 1}]}, "strategies[1].on_missing: 1 is not one of"),
        ({"on_mising": "warn", "strategies": []}, "unknown key 'on_mising' (did you mean 'on_missing'?)"),
    ],
)
def test_a_bad_on_missing_is_a_config_error_naming_it(obj, message):
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(obj)
    assert str(info.value).startswith(message), str(info.value)


def test_on_missing_survives_to_dict_and_restore():
    """The strategy's own setting is part of its saved entry; restore matches by identity."""
    config = Config([Strategy("val_loss", on_missing="warn")])
    state, _ = scan(init(config), [{"val_loss": 0.5}])
    data = json.loads(json.dumps(state.to_dict()))
    assert data["strategies"][0]["on_missing"] == "warn"
    assert ckptfn.restore(config, data) == state
    assert ckptfn.restore([Strategy("val_loss")], data).bests == state.bests  # identity: name, mode, file


# --- names with slashes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric_name, filename",
    [
        ("val/loss", "best_val_loss.pt"),
        ("eval/loss", "best_eval_loss.pt"),
        ("train/loss/epoch", "best_train_loss_epoch.pt"),
        ("val\\loss", "best_val_loss.pt"),
        ("loss_components.concordance", "best_loss_components_concordance.pt"),
        ("a:b*c?d", "best_a_b_c_d.pt"),
        ("val loss", "best_val loss.pt"),
        ("\x1b[31mred", "best__[31mred.pt"),
        ("tab\there", "best_tab_here.pt"),
        ("ünïcode/λ", "best_ünïcode_λ.pt"),
    ],
)
def test_default_filenames_replace_what_cannot_be_in_a_file_name(metric_name, filename):
    assert Strategy(metric_name).filename == filename


def test_hidden_names_never_come_from_a_metric_name():
    """A name with a leading dot (only possible after a '/': dotted segments cannot be empty)."""
    assert not Strategy("/.hidden").filename.startswith(".")
    assert Strategy("/.hidden").filename == "best___hidden.pt"


def test_explicit_filenames_keep_the_strict_rules():
    for bad, what in (("a/b.pt", "contains a '/'"), ("a\\b.pt", "contains a '\\'"), (".hidden.pt", "starts with '.'"),
                      ("a\x00b.pt", "a NUL character"), ("a\nb.pt", "control character")):
        with pytest.raises(ConfigError, match=re.escape(what)):
            Strategy("val/loss", filename=bad)


def test_slashed_metric_names_work_end_to_end_in_scan():
    """Hugging Face / Lightning style names: flat keys with '/', judged and saved like any other."""
    config = Config([Strategy("val/loss"), Strategy("eval/accuracy", mode="max"), Strategy("train.loss")])
    history = [
        {"val/loss": 1.0, "eval/accuracy": 0.5, "train": {"loss": 2.0}},
        {"val/loss": 0.5, "eval/accuracy": 0.4, "train": {"loss": 2.5}},
        {"val/loss": 0.7, "eval/accuracy": 0.9, "train": {"loss": 1.5}},
    ]
    final, per_step = scan(init(config), history)
    assert [[a.filename for a in s] for s in per_step] == [
        ["best_val_loss.pt", "best_eval_accuracy.pt", "best_train_loss.pt"],
        ["best_val_loss.pt"],
        ["best_eval_accuracy.pt", "best_train_loss.pt"],
    ]
    assert ckptfn.best_values(final) == {"best_val_loss.pt": 0.5, "best_eval_accuracy.pt": 0.9, "best_train_loss.pt": 1.5}


def test_slashed_metric_names_through_the_manager(tmp_path):
    manager = CheckpointManager(tmp_path, [{"metric_name": "val/loss"}, {"metric_name": "eval/loss", "top_k": 2}])
    for epoch, (a, b) in enumerate([(1.0, 1.0), (0.5, 2.0), (0.7, 0.5)]):
        manager.update({"val/loss": a, "eval/loss": b}, {"w": torch.ones(1)}, epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_eval_loss-epoch=0.pt", "best_eval_loss.pt", "best_val_loss.pt"]
    assert ckptfn.read_metadata(tmp_path / "best_val_loss.pt")["saves"][0]["metric_name"] == "val/loss"
    assert CheckpointManager(tmp_path, manager.config).best_values == {"best_val_loss.pt": 0.5, "best_eval_loss.pt": 0.5}


def test_names_that_map_to_one_file_are_a_clear_config_error():
    """``val/loss`` and ``val_loss`` would share ``best_val_loss.pt``: refused, naming both."""
    with pytest.raises(ConfigError, match=r"strategies\[1\]\.filename: 'best_val_loss.pt' is already used by strategies\[0\]"):
        Config([Strategy("val/loss"), Strategy("val_loss")])
    Config([Strategy("val/loss"), Strategy("val_loss", filename="best_plain.pt")])


valid_metric_names = st.text(min_size=1, max_size=300).filter(lambda name: "" not in name.split("."))
_SAFE = re.compile(r"[A-Za-z0-9_-]+")


@given(valid_metric_names)
def test_every_metric_name_gets_a_valid_deterministic_default_filename(name):
    """For any metric name: the default file name is a plain, printable, visible name of at
    most 120 UTF-8 bytes (room for top-k member names), ``best_<...>.pt``, the same each time;
    a short name of safe characters is kept as it is."""
    filename = Strategy(name).filename
    assert filename == default_filename(name) == Strategy(name, mode="max").filename
    for bad in ("/", "\\", "\0"):
        assert bad not in filename
    assert filename.isprintable() and not filename.startswith(".")
    assert filename.startswith("best_") and filename.endswith(".pt")
    assert len(filename.encode("utf-8")) <= MAX_FILENAME_BYTES - 40
    Strategy(name, top_k=3)  # member names fit
    assert len(member_name(filename, 10**6, 10**9).encode("utf-8")) <= MAX_FILENAME_BYTES
    if _SAFE.fullmatch(name) and len(name) <= 100:
        assert filename == f"best_{name}.pt"


@given(st.text(st.characters(codec="utf-8", exclude_characters="."), min_size=101, max_size=200),
       st.text(st.characters(codec="utf-8", exclude_characters="."), min_size=1, max_size=5))
def test_long_names_that_share_a_head_get_different_files(head, tail):
    """Shortened names keep a checksum of the whole name: two long names that differ only after
    the kept head still get different files."""
    a, b = "x" + head, "x" + head + tail
    assert Strategy(a).filename != Strategy(b).filename


def test_a_long_metric_name_with_a_lone_surrogate_gets_a_file_name():
    """Short names with any unprintable character get a name ('\\ud800' -> ``best__.pt``);
    a long one must too (or a ConfigError), not a UnicodeEncodeError from the default."""
    assert Strategy("\ud800").filename == "best__.pt"
    assert Strategy("\ud800" * 200).filename.startswith("best_")
