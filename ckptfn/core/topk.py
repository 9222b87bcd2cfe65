"""Top-k by value: which snapshot enters the k best, under which name, and who leaves.

Pure. A strategy with ``top_k=k`` keeps the k best finite values it has seen: the best
at its ``filename`` (``Best.value``), the other k - 1 in ``Best.others`` (best first),
each under a name that says its position (``ckptfn.core.naming.member_name``). A value
enters when the top k is not full or when it beats the k-th best by more than
``min_delta`` (ties: the earlier one stays). A new best moves the previous best aside
to its member name; whoever falls out of the k is deleted after the new snapshot is
committed. ``top_k=1`` is exactly the plain best (``overwrite=True``).
"""

from __future__ import annotations

from ckptfn.core.actions import Enter, Save, improved
from ckptfn.core.naming import member_name
from ckptfn.core.state import Best, Member, ranked
from ckptfn.core.strategy import Strategy

__all__ = ["free_member_name", "judge_top_k"]


def free_member_name(filename: str, epoch: int, global_step: int | None, taken: frozenset[str]) -> str:
    """The member name for a snapshot at this position that no current member uses.

    >>> free_member_name("best.pt", 3, None, frozenset({"best-epoch=3.pt"}))
    'best-epoch=3-1.pt'
    """
    clash = 0
    while (name := member_name(filename, epoch, global_step, clash)) in taken:
        clash += 1
    return name


def judge_top_k(
    strategy: Strategy, best: Best, value: float, epoch: int, global_step: int | None
) -> tuple[Best, Save | Enter | None]:
    """One finite ``value``'s verdict for a strategy with ``top_k`` > 1: the new ``Best``
    (with its members) and the action (None: it does not enter).

    >>> s = Strategy("acc", mode="max", top_k=3)
    >>> best, kept = Best(), []
    >>> for epoch, v in enumerate([0.50, 0.45, 0.60, 0.55, 0.58]):
    ...     best, action = judge_top_k(s, best, v, epoch, None)
    >>> best.value, [(m.value, m.name) for m in best.others]
    (0.6, [(0.58, 'best_acc-epoch=4.pt'), (0.55, 'best_acc-epoch=3.pt')])
    >>> type(action).__name__, action.leaves
    ('Enter', ('best_acc-epoch=0.pt',))
    """
    k, mode, delta = strategy.top_k, strategy.mode, strategy.min_delta
    if best.value is None and best.others:  # the best file is gone: the best member is the best, where it is
        top, *rest = ranked(mode, best.others)
        best = Best(top.value, top.epoch, top.global_step, rest, at=top.name)
    others = best.others
    full = (best.value is not None) + len(others) >= k
    taken = frozenset(member.name for member in others) | ({best.at} if best.at else set())
    if improved(mode, best.value, value, delta):  # a new best: the old one steps aside
        aside = None
        if best.value is not None:
            # where the old best stays: its own member name if it already has one (its file at the
            # strategy's name was moved away by hand), else a new one it is moved aside to
            kept_as = best.at or free_member_name(strategy.filename, best.epoch, best.global_step, taken)
            aside = None if best.at else kept_as
            others = ranked(mode, (Member(best.value, best.epoch, best.global_step, kept_as), *others))
        kept, leaving = others[: k - 1], others[k - 1 :]
        action = Save(
            strategy, epoch, value, best.value, global_step=global_step, aside=aside,
            leaves=tuple(member.name for member in leaving),
        )
        return Best(value, epoch, global_step, kept), action
    kth = (others[-1].value if others else best.value) if full else None
    if full and not improved(mode, kth, value, delta):
        return best, None
    name = free_member_name(strategy.filename, epoch, global_step, taken)
    others = ranked(mode, (*others, Member(value, epoch, global_step, name)))
    kept, leaving = (others[:-1], others[-1:]) if full else (others, ())
    action = Enter(
        strategy, epoch, value, name, kth=kth, global_step=global_step,
        leaves=tuple(member.name for member in leaving),
    )
    return Best(best.value, best.epoch, best.global_step, kept, at=best.at), action
