"""Warnings point at the user's line, not at ckptfn's (the ``stacklevel`` of every shell)."""

from __future__ import annotations

import warnings

import ckptfn

CONFIG = ckptfn.Config([ckptfn.Strategy("val_loss", on_missing="warn")])


def _caught(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, ckptfn.MetricWarning)]


def test_every_shell_warns_at_the_callers_line(tmp_path):
    _, actions = ckptfn.step(ckptfn.init(CONFIG), {}, 0)

    def manager():
        ckptfn.CheckpointManager(tmp_path / "a", CONFIG).update({}, {}, 0)

    def background_manager():
        with ckptfn.CheckpointManager(tmp_path / "b", CONFIG, async_save=True) as m:
            m.update({}, {}, 0)

    def execute():
        ckptfn.execute(actions, {}, tmp_path / "c")

    def executor():
        with ckptfn.AsyncExecutor() as writer:
            writer.submit(actions, {}, tmp_path / "d")

    for call in (manager, background_manager, execute, executor):
        (warning,) = _caught(call)
        assert warning.filename == __file__, (call.__name__, warning.filename)
        assert "val_loss is missing" in str(warning.message)
