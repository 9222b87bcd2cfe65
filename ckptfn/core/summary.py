"""What the shells say about saves and states, as text.

Pure string formatting: the shells log these lines; nothing here logs.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptfn.core.actions import Enter, Periodic, Save, Skip
from ckptfn.core.every import Every
from ckptfn.core.metrics import missing_hint
from ckptfn.core.state import State

__all__ = ["count_of", "format_value", "format_values", "position", "save_line", "skip_line", "summary_lines"]


def count_of(count: int, noun: str, plural: str | None = None) -> str:
    """``1 strategy``, ``3 strategies``: a count with its noun in the right number.

    >>> count_of(1, "strategy", "strategies"), count_of(3, "strategy", "strategies"), count_of(0, "file")
    ('1 strategy', '3 strategies', '0 files')
    """
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


def format_value(value: float | None, digits: int = 4) -> str:
    """A metric value for a log line: ``digits`` decimals in the usual range, else scientific.

    >>> format_value(0.123456), format_value(1e-7), format_value(None)
    ('0.1235', '1.0000e-07', 'none')
    """
    if value is None:
        return "none"
    return f"{value:.{digits}f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.{digits}e}"


def format_values(value: float, previous: float | None) -> tuple[str, str]:
    """``value`` and ``previous`` with the fewest digits (at least 4) that tell them apart.

    >>> format_values(0.42168, 0.42171), format_values(0.5, 0.25)
    (('0.42168', '0.42171'), ('0.5000', '0.2500'))
    >>> format_values(0.1 + 0.2, 0.3)
    ('0.30000000000000004', '0.3')
    """
    if previous is None:
        return format_value(value), "none"
    for digits in range(4, 16):
        shown, was = format_value(value, digits), format_value(previous, digits)
        if shown != was:
            return shown, was
    return repr(value), repr(previous)


def position(epoch: int, global_step: int | None) -> str:
    """``epoch 3`` or ``epoch 3, step 1200``.

    >>> position(3, None), position(3, 1200)
    ('epoch 3', 'epoch 3, step 1200')
    """
    return f"epoch {epoch}" if global_step is None else f"epoch {epoch}, step {global_step}"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def save_line(save: Save | Enter | Periodic) -> str:
    """The INFO line for one save.

    >>> from ckptfn.core.strategy import Strategy
    >>> save_line(Save(Strategy("val_loss"), epoch=3, value=0.25, previous=0.5))
    'saved best_val_loss.pt: val_loss 0.2500 (was 0.5000) at epoch 3'
    >>> save_line(Periodic(Every(n_steps=20), epoch=5, global_step=120))
    'saved last.pt: every 20 steps, at epoch 5, step 120'
    >>> s = Strategy("acc", mode="max", top_k=3)
    >>> save_line(Enter(s, 4, 0.58, "best_acc-epoch=4.pt", kth=0.5))
    'saved best_acc-epoch=4.pt: acc 0.5800 enters the top 3 of best_acc.pt (beating 0.5000) at epoch 4'
    >>> save_line(Save(s, 2, 0.6, 0.5, aside="best_acc-epoch=0.pt"))
    'saved best_acc.pt: acc 0.6000 (was 0.5000, kept as best_acc-epoch=0.pt) at epoch 2'
    """
    at = position(save.epoch, save.global_step)
    if type(save) is Periodic:
        return f"saved {save.filename}: {save.strategy.describe()}, at {at}"
    s = save.strategy
    if type(save) is Enter:
        shown, beaten = format_values(save.value, save.kth)
        beating = "" if save.kth is None else f" (beating {beaten})"
        return f"saved {save.filename}: {s.metric_name} {shown} enters the top {s.top_k} of {s.filename}{beating} at {at}"
    shown, was = format_values(save.value, save.previous)
    kept = "" if save.aside is None else f", kept as {save.aside}"
    return f"saved {save.filename}: {s.metric_name} {shown} (was {was}{kept}) at {at}"


def skip_line(skip: Skip) -> str:
    """The warning for a skip; for a missing metric, with the metrics there were and the closest name.

    >>> from ckptfn.core.strategy import Strategy
    >>> skip_line(Skip(Strategy("val_loss"), 0, "missing", available=("train_loss", "val_los")))
    "val_loss is missing at epoch 0; best_val_loss.pt not saved; the metrics are: train_loss, val_los (did you mean 'val_los'?)"
    """
    if skip.reason != "missing":
        return str(skip)
    return f"{skip}; {missing_hint(skip.strategy.metric_name, skip.available)}"


def summary_lines(state: State, path_of: Callable[[str], str]) -> tuple[str, ...]:
    """One line per strategy: metric, mode, best value, position, path (or "never saved");
    a top-k strategy lists its other members. Nothing saved at all: one line that says so.

    ``path_of`` maps a filename to the path to show.

    >>> from ckptfn.core.state import Best, Last, Member
    >>> from ckptfn.core.config import Config
    >>> from ckptfn.core.strategy import Strategy
    >>> config = Config([Strategy("val_loss"), Strategy("acc", mode="max", top_k=2), Every(2)])
    >>> state = State(config, [Best(0.25, 3), Best(0.9, 4, 400, [Member(0.8, 1, 100, "best_acc-epoch=1-step=100.pt")]), Last()], steps=5)
    >>> for line in summary_lines(state, lambda name: f"runs/{name}"):
    ...     print(line)
    val_loss (min): best 0.25 at epoch 3 -> runs/best_val_loss.pt
    acc (max): best 0.9 at epoch 4, step 400 -> runs/best_acc.pt; top 2: 0.8 at epoch 1, step 100 -> runs/best_acc-epoch=1-step=100.pt
    every 2 epochs (last.pt): never saved
    >>> summary_lines(State(config), str)
    ('no checkpoints yet (3 strategies)',)
    """
    config = state.config
    if not config.strategies:
        return ("checkpointing is off (no strategies)",)
    lines = [] if config.enabled else ["checkpointing is disabled"]
    if all(best.epoch is None and not getattr(best, "others", ()) for best in state.bests):
        return (*lines, f"no checkpoints yet ({count_of(len(config.strategies), 'strategy', 'strategies')})")
    for strategy, best in zip(config.strategies, state.bests):
        if isinstance(strategy, Every):
            saved = (
                "never saved" if best.epoch is None
                else f"last saved at {position(best.epoch, best.global_step)} -> {path_of(strategy.filename)}"
            )
            lines.append(f"{strategy.describe()} ({strategy.filename}): {saved}")
            continue
        head = f"{strategy.metric_name} ({strategy.mode})"
        if best.value is None:
            line = f"{head}: never saved"
        else:
            line = f"{head}: best {best.value:.6g} at {position(best.epoch, best.global_step)} -> {path_of(best.at or strategy.filename)}"
        if best.others:
            members = ", ".join(
                f"{m.value:.6g} at {position(m.epoch, m.global_step)} -> {path_of(m.name)}" for m in best.others
            )
            line += f"; top {strategy.top_k}: {members}"
        lines.append(line)
    return tuple(lines)
