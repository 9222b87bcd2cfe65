"""The configuration check across ranks, in one process: every rank's fingerprint, compared alike.

``Coordinator.check_config`` gathers every rank's ``config_to_wire`` (one
collective) and raises the ``ConfigError`` of ``config_difference`` on every rank.
Here the ranks are simulated (each sees the same gathered list), so the
comparison can be checked over many configurations; tests/shells/test_distributed.py
runs it on two real gloo ranks.
"""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn import ConfigError, Every, Strategy
from ckptfn.core.config import Config
from ckptfn.core.wire import config_difference, config_to_wire
from ckptfn.shells.distributed import Coordinator


class FakeRanks:
    """Rank ``rank`` of a simulated group whose members send ``everyone`` (counts the gathers)."""

    def __init__(self, rank: int, everyone: list) -> None:
        self.rank, self.size, self.everyone, self.gathers = rank, len(everyone), everyone, 0

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def gather(self, message):
        self.gathers += 1
        assert message == self.everyone[self.rank]
        return list(self.everyone)

    def share(self, message):
        raise AssertionError("no decision is shared before the configurations are compared")


strategies_ = st.one_of(
    st.builds(
        Strategy,
        metric_name=st.sampled_from(["val_loss", "val_acc"]),
        mode=st.sampled_from(["min", "max"]),
        filename=st.sampled_from(["a.pt", "b.pt", "c.pt"]),
        min_delta=st.sampled_from([0.0, 0.1]),
    ),
    st.builds(Every, n_epochs=st.integers(1, 3), filename=st.sampled_from(["a.pt", "b.pt", "last.pt"])),
)
configs = st.builds(
    lambda items, enabled: Config(items, enabled=enabled),
    st.lists(strategies_, max_size=3, unique_by=lambda s: s.filename),
    st.booleans(),
)
options = st.fixed_dictionaries({"resume": st.booleans(), "async_save": st.booleans()})


@settings(max_examples=300)
@given(st.lists(st.tuples(configs, options), min_size=2, max_size=4))
def test_ranks_differ_exactly_when_a_configuration_or_option_differs_and_every_rank_says_the_same(ranks):
    everyone = [config_to_wire(config, **extra) for config, extra in ranks]
    alike = all(config == ranks[0][0] and extra == ranks[0][1] for config, extra in ranks)
    messages = []
    for rank, (config, extra) in enumerate(ranks):
        coordinator = Coordinator(FakeRanks(rank, everyone), config, pathlib.Path("unused"), None)
        try:
            coordinator.check_config(**extra)
        except ConfigError as error:
            messages.append(str(error))
        else:
            messages.append(None)
        assert coordinator.ranks.gathers == 1
    assert messages == [messages[0]] * len(ranks)  # the same outcome, word for word, on every rank
    if alike:
        assert messages[0] is None
    else:
        first = next(rank for rank, (config, extra) in enumerate(ranks) if (config, extra) != ranks[0])
        assert messages[0].startswith(f"the ranks are configured differently: rank {first} has ")


def test_the_message_names_every_difference_of_the_first_rank_and_the_other_ranks_that_differ():
    rank0 = config_to_wire(Config([Strategy("val_loss", filename="a.pt"), Every(2, filename="last.pt")]))
    rank1 = config_to_wire(Config([Strategy("val_loss", mode="max", filename="a.pt", min_delta=0.5), Strategy("x")]))
    rank2 = config_to_wire(Config([Strategy("val_loss", filename="a.pt")], enabled=False))
    assert config_difference([rank0, rank1]) == (
        "the ranks are configured differently: rank 1 has strategies[0].mode='max' where rank 0 has 'min' (a.pt); "
        "strategies[0].min_delta=0.5 where rank 0 has 0.0 (a.pt); "
        "strategies[1] = Strategy 'best_x.pt' where rank 0 has Every 'last.pt'; "
        "every rank must build its CheckpointManager with the same checkpoint configuration"
    )
    assert config_difference([rank0, rank0, rank2, rank1]) == (
        "the ranks are configured differently: rank 2 has enabled=False where rank 0 has True; "
        "1 strategies ['a.pt'] where rank 0 has 2 ['a.pt', 'last.pt'] (rank 3 differs from rank 0 too); "
        "every rank must build its CheckpointManager with the same checkpoint configuration"
    )


def test_a_failed_check_is_raised_again_without_a_collective_and_a_late_coordinator_checks_first():
    config = Config([Strategy("val_loss")])
    everyone = [config_to_wire(config), config_to_wire(Config([Strategy("val_loss", mode="max")]))]
    ranks = FakeRanks(0, everyone)
    coordinator = Coordinator(ranks, config, pathlib.Path("unused"), None)
    # built after the manager (the process group appeared later): the first call checks, then fails
    with pytest.raises(ConfigError, match=r"rank 1 has strategies\[0\]\.mode='max'"):
        coordinator.update(ckptfn.init(config), {"val_loss": 0.5}, {}, 0, barrier=False)
    with pytest.raises(ConfigError, match=r"rank 1 has strategies\[0\]\.mode='max'"):
        coordinator.restore()  # every rank raises again, and none enters a collective
    assert ranks.gathers == 1
