"""What the shells say about saves and states, as text.

Pure string formatting: the shells log these lines; nothing here logs.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptfn.core.actions import Periodic, Save
from ckptfn.core.every import Every
from ckptfn.core.state import State

__all__ = ["format_value", "save_line", "summary_lines"]


def format_value(value: float | None) -> str:
    """A metric value for a log line: 4 decimals in the usual range, else scientific.

    >>> format_value(0.123456), format_value(1e-7), format_value(None)
    ('0.1235', '1.0000e-07', 'none')
    """
    if value is None:
        return "none"
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4e}"


def save_line(save: Save | Periodic) -> str:
    """The INFO line for one save.

    >>> from ckptfn.core.strategy import Strategy
    >>> save_line(Save(Strategy("val_loss"), epoch=3, value=0.25, previous=0.5))
    'saved best_val_loss.pt: val_loss 0.2500 (was 0.5000) at epoch 3'
    >>> save_line(Periodic(Every(2), epoch=5))
    'saved last.pt: every 2 epoch(s), at epoch 5'
    """
    if type(save) is Periodic:
        return f"saved {save.filename}: every {save.strategy.n_epochs} epoch(s), at epoch {save.epoch}"
    return (
        f"saved {save.filename}: {save.strategy.metric_name} {format_value(save.value)} "
        f"(was {format_value(save.previous)}) at epoch {save.epoch}"
    )


def summary_lines(state: State, path_of: Callable[[str], str]) -> tuple[str, ...]:
    """One line per strategy: metric, mode, best value, epoch, path (or "never saved").

    ``path_of`` maps a filename to the path to show.

    >>> from ckptfn.core.state import Best, Last
    >>> from ckptfn.core.config import Config
    >>> from ckptfn.core.strategy import Strategy
    >>> state = State(Config([Strategy("val_loss"), Every(2)]), [Best(0.25, 3), Last()], steps=4)
    >>> for line in summary_lines(state, lambda name: f"runs/{name}"):
    ...     print(line)
    val_loss (min): best 0.25 at epoch 3 -> runs/best_val_loss.pt
    every 2 epoch(s) (last.pt): never saved
    """
    config = state.config
    if not config.strategies:
        return ("checkpointing is off (no strategies)",)
    lines = [] if config.enabled else ["checkpointing is disabled"]
    for strategy, best in zip(config.strategies, state.bests):
        if isinstance(strategy, Every):
            saved = "never saved" if best.epoch is None else f"last saved at epoch {best.epoch} -> {path_of(strategy.filename)}"
            lines.append(f"every {strategy.n_epochs} epoch(s) ({strategy.filename}): {saved}")
            continue
        head = f"{strategy.metric_name} ({strategy.mode})"
        if best.value is None:
            lines.append(f"{head}: never saved")
        else:
            lines.append(f"{head}: best {best.value:.6g} at epoch {best.epoch} -> {path_of(strategy.filename)}")
    return tuple(lines)
