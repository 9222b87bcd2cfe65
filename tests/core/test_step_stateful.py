"""A RuleBasedStateMachine drives step with random metrics beside a tiny model."""

from __future__ import annotations

import math

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ckptfn
from ckptfn import Save, Skip

from tests.strategies import configs, finite_values, NON_FINITE


class CoreMachine(RuleBasedStateMachine):
    """Model: filename -> best value, plus a step counter; nothing else is needed."""

    @initialize(config=configs())
    def start(self, config):
        self.config = config
        self.state = ckptfn.init(config)
        self.model = {s.filename: None for s in config.strategies}
        self.steps = 0
        self.last_epoch = None

    def _apply(self, metrics, epoch=None):
        self.state, actions = ckptfn.step(self.state, metrics, epoch)
        at = self.steps if epoch is None else epoch
        expected = []
        for s in self.config.strategies:
            value = metrics.get(s.metric_name)  # the machine's metrics are flat
            if value is None:
                expected.append(("skip", s.filename, "missing"))
            elif not math.isfinite(value):
                expected.append(("skip", s.filename, "not_finite"))
            else:
                best = self.model[s.filename]
                better = best is None or (
                    value < best - s.min_delta if s.mode == "min" else value > best + s.min_delta
                )
                if better:
                    expected.append(("save", s.filename, value))
                    self.model[s.filename] = value
        got = [
            ("save", a.filename, a.value) if isinstance(a, Save) else ("skip", a.filename, a.reason)
            for a in actions
        ]
        assert got == expected
        assert all(a.epoch == at for a in actions)
        self.steps += 1

    @rule(data=st.data())
    def epoch_with_every_metric(self, data):
        metrics = {s.metric_name: data.draw(finite_values) for s in self.config.strategies}
        self._apply(metrics)

    @rule(data=st.data())
    def epoch_with_gaps_and_non_finite_values(self, data):
        metrics = {}
        for s in self.config.strategies:
            metrics[s.metric_name] = data.draw(st.one_of(finite_values, st.sampled_from(NON_FINITE)))
        dropped = data.draw(st.sets(st.sampled_from([s.metric_name for s in self.config.strategies])))
        self._apply({k: v for k, v in metrics.items() if k not in dropped})

    @rule(data=st.data(), epoch=st.integers(0, 10_000))
    def epoch_with_explicit_number(self, data, epoch):
        self._apply({s.metric_name: data.draw(finite_values) for s in self.config.strategies}, epoch)

    @rule()
    def round_trip_through_to_dict(self):
        self.state = ckptfn.restore(self.config, self.state.to_dict())

    @precondition(lambda self: len(self.config.strategies) > 1)
    @rule(data=st.data())
    def drop_a_strategy_and_restore(self, data):
        gone = data.draw(st.sampled_from(self.config.strategies))
        self.config = ckptfn.Config(tuple(s for s in self.config.strategies if s != gone), on_missing=self.config.on_missing)
        self.state = ckptfn.restore(self.config, self.state.to_dict())
        del self.model[gone.filename]

    @invariant()
    def bests_match_the_model(self):
        assert ckptfn.best_values(self.state) == self.model

    @invariant()
    def steps_are_counted(self):
        assert self.state.steps == self.steps


TestCoreMachine = CoreMachine.TestCase
