"""Hydra: the shipped config group composes into working managers, with overrides."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import ckptfn
from ckptfn import CheckpointManager, ConfigError


def composed(*overrides):
    with initialize_config_module(config_module="ckptfn.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_multi_metric_config(tmp_path):
    cfg = composed()
    manager = CheckpointManager(tmp_path, cfg.checkpointing)
    assert [s.filename for s in manager.config.strategies] == ["best_loss.pt", "best_concordance.pt", "best_corr.pt"]
    assert manager.config.strategies[2].mode == "max" and manager.config.strategies[2].overwrite is False
    written = manager.update({"val_loss": 1.0, "loss_components": {"concordance": 0.5}, "val_residual_spearman": 0.2}, {}, 0)
    assert [p.name for p in written] == ["best_loss.pt", "best_concordance.pt", "best_corr.pt"]


def test_group_variants(tmp_path):
    single = CheckpointManager(tmp_path / "s", composed("checkpointing=single_metric").checkpointing)
    assert [s.metric_name for s in single.config.strategies] == ["val_loss"]
    off = CheckpointManager(tmp_path / "d", composed("checkpointing=disabled").checkpointing)
    assert not off.config.active
    assert off.update({"val_loss": 1.0}, {}, 0) == []


def test_command_line_overrides(tmp_path):
    cfg = composed("checkpointing=single_metric", "checkpointing.strategies.0.mode=max", "+checkpointing.strategies.0.min_delta=0.01")
    (strategy,) = CheckpointManager(tmp_path, cfg.checkpointing).config.strategies
    assert (strategy.mode, strategy.min_delta) == ("max", 0.01)


def test_defaults_are_filled_in_for_a_minimal_entry(tmp_path):
    cfg = OmegaConf.create({"strategies": [{"metric_name": "loss_components.concordance"}]})
    (strategy,) = CheckpointManager(tmp_path, cfg).config.strategies
    assert strategy == ckptfn.Strategy("loss_components.concordance")


def test_bad_overrides_name_the_key_path():
    with pytest.raises(ConfigError) as info:
        ckptfn.Config.from_mapping(composed("checkpointing.strategies.1.mode=maximum").checkpointing)
    assert str(info.value) == "strategies[1].mode: 'maximum' is not one of 'min', 'max'"
    with pytest.raises(ConfigError, match=r"strategies\[0\]: unknown key 'mdoe' \(did you mean 'mode'\?\)"):
        ckptfn.Config.from_mapping(composed("+checkpointing.strategies.0.mdoe=max").checkpointing)
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.filename: cannot read value"):
        ckptfn.Config.from_mapping(OmegaConf.create({"strategies": [{"metric_name": "a", "filename": "???"}]}))


def test_trainer_from_the_composed_config(tmp_path):
    from ckptfn.demo import Trainer

    cfg = composed("epochs=3", f"output_dir={tmp_path}")
    bests = Trainer(cfg.output_dir, cfg.checkpointing, epochs=cfg.epochs, seed=cfg.seed).fit()
    assert set(bests) == {"best_loss.pt", "best_concordance.pt", "best_corr.pt"}


def test_step_based_group_reads_steps_seconds_top_k_and_on_missing(tmp_path):
    cfg = composed("checkpointing=step_based", "checkpointing.strategies.1.every_n_steps=2")
    manager = CheckpointManager(tmp_path, cfg.checkpointing)
    top, by_steps, by_clock = manager.config.strategies
    assert (top.filename, top.top_k, manager.config.on_missing) == ("best_val_loss.pt", 3, "error")
    assert (by_steps.n_steps, by_clock.seconds) == (2, 1800.0)
    for step, loss in ((1, 0.5), (2, 0.4), (3, 0.6), (4, 0.7)):
        manager.update({"val/loss": loss}, {}, 0, global_step=step)
    assert ckptfn.read_metadata(tmp_path / "last.pt")["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best_val_loss-epoch=0-step=1.pt", "best_val_loss-epoch=0-step=3.pt", "best_val_loss.pt", "last.pt", "last_by_clock.pt",
    ]
    with pytest.raises(ConfigError, match=r"strategies\[1\].every_n_steps: expected an int >= 1, got int 0"):
        CheckpointManager(tmp_path / "bad", composed("checkpointing=step_based", "checkpointing.strategies.1.every_n_steps=0").checkpointing)
