"""The ``Config`` record and how it is built from plain data (YAML, JSON, Hydra).

Pure. Parsing is strict: an unknown key is an error that names it (``mdoe`` must
never silently become the default), and every error carries the key path of the
offending entry relative to the object the user passed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ckptfn.core.errors import ConfigError, _join_path
from ckptfn.core.every import EVERY_KEYS, TRIGGER_KEYS, Every
from ckptfn.core.naming import archived_of, dcp_name, member_of
from ckptfn.core.strategy import ON_MISSING, Strategy, check_bool

__all__ = ["STRATEGY_KEYS", "Config", "as_config", "parse_strategy"]

STRATEGY_KEYS = tuple(field.name for field in attrs.fields(Strategy))
_WRAPPER_KEYS = ("enabled", "strategies", "on_missing", "trackers", "save_on")
_PLAIN_DATA_HINT = "(use Config.from_mapping for plain data)"


def duplicate_filename(strategies: Iterable[Strategy]) -> tuple[int, int] | None:
    """``(index, earlier_index)`` of the first filename used twice, else None.

    >>> duplicate_filename([Strategy("a"), Strategy("b"), Strategy("a", mode="max")])
    (2, 0)
    """
    seen: dict[str, int] = {}
    for index, strategy in enumerate(strategies):
        if strategy.filename in seen:
            return index, seen[strategy.filename]
        seen[strategy.filename] = index
    return None


def _duplicate_error(strategies: tuple[Strategy, ...], prefix: str) -> ConfigError | None:
    found = duplicate_filename(strategies)
    if found is None:
        return None
    index, earlier = found
    return ConfigError(
        f"{strategies[index].filename!r} is already used by {_join_path(prefix, f'[{earlier}]')}",
        _join_path(prefix, f"[{index}].filename"),
    )


def _to_strategies(value: object) -> tuple[Strategy | Every, ...]:
    if isinstance(value, (Strategy, Every)):
        return (value,)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(
            f"expected a sequence of Strategy, got {type(value).__name__} {_PLAIN_DATA_HINT}",
            "strategies",
        )
    items = tuple(value)
    for index, item in enumerate(items):
        if not isinstance(item, (Strategy, Every)):
            raise ConfigError(
                f"expected a Strategy, got {type(item).__name__} (or an Every) {_PLAIN_DATA_HINT}",
                f"strategies[{index}]",
            )
    return items


def _archive_name_clash(strategies: tuple, prefix: str) -> ConfigError | None:
    """A strategy whose filename has the form of another strategy's archived versions would be
    deleted by that strategy's ``keep`` (or taken for one of its versions): refused.

    >>> print(_archive_name_clash((Strategy("a", filename="model.pt"),
    ...                            Strategy("b", filename="model_20250101T000000000000Z.pt")), "strategies"))
    strategies[1].filename: 'model_20250101T000000000000Z.pt' has the form of an archived version of 'model.pt' (strategies[0]); choose a name that is not <stem>_<UTC stamp><suffix>
    """
    for index, strategy in enumerate(strategies):
        for other, owner in enumerate(strategies):
            if other != index and archived_of(strategy.filename, owner.filename):
                return ConfigError(
                    f"{strategy.filename!r} has the form of an archived version of {owner.filename!r} "
                    f"({_join_path(prefix, f'[{other}]')}); choose a name that is not <stem>_<UTC stamp><suffix>",
                    _join_path(prefix, f"[{index}].filename"),
                )
            if other != index and getattr(owner, "top_k", 1) > 1 and member_of(strategy.filename, owner.filename):
                return ConfigError(
                    f"{strategy.filename!r} has the form of a top-k member of {owner.filename!r} "
                    f"({_join_path(prefix, f'[{other}]')}), whose top_k would delete it; choose another name",
                    _join_path(prefix, f"[{index}].filename"),
                )
    return None


def _check_unique_filenames(_inst: object, _attribute: attrs.Attribute, value: tuple) -> None:
    error = _duplicate_error(value, "strategies") or _archive_name_clash(value, "strategies")
    if error is not None:
        raise error


def _tree_name_clash(strategies: tuple, prefix: str) -> ConfigError | None:
    """Sharded checkpoints are named by the filename's stem (``dcp_name``): two strategies
    must not share one, or their sharded saves would overwrite each other.

    >>> print(_tree_name_clash((Strategy("a", filename="best.pt"), Strategy("b", filename="best.pth")), "strategies"))
    strategies[1].filename: 'best.pt' and 'best.pth' would both be saved as the sharded checkpoint 'best.dcp'; give them different names before the suffix
    """
    seen: dict[str, int] = {}
    for index, strategy in enumerate(strategies):
        name = dcp_name(strategy.filename)
        if name in seen:
            return ConfigError(
                f"{strategies[seen[name]].filename!r} and {strategy.filename!r} would both be saved as the sharded "
                f"checkpoint {name!r}; give them different names before the suffix",
                _join_path(prefix, f"[{index}].filename"),
            )
        seen[name] = index
    return None


def _to_names(value: object) -> object:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return value
    return tuple(value)


def _check_names(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, tuple):
        raise ConfigError(f"expected a list of names, got {type(value).__name__} {value!r}", attribute.name)
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"expected a tracker name, got {type(name).__name__} {name!r}", f"{attribute.name}[{index}]")


#: Signals no process can catch: a preemption save can never be made on them.
_UNCATCHABLE = ("SIGKILL", "SIGSTOP")
_SIGNAL_NAME = re.compile(r"SIG[A-Z][A-Z0-9]*")


def _signal_name_problem(name: object) -> str | None:
    """Why ``name`` is not a signal name a preemption save can be made on, else None.

    The core knows names only; which of them this platform has is checked by the shell
    that installs the handlers (``ckptfn.shells.preemption``).

    >>> _signal_name_problem("SIGUSR1") is None, _signal_name_problem("sigterm"), _signal_name_problem("SIGKILL")
    (True, "expected a signal name such as 'SIGTERM', got 'sigterm' (did you mean 'SIGTERM'?)", "'SIGKILL' cannot be caught, so no save can be made on it")
    """
    if not isinstance(name, str) or not _SIGNAL_NAME.fullmatch(name):
        shown = f"{type(name).__name__} {name!r}" if not isinstance(name, str) else repr(name)
        guess = name.upper() if isinstance(name, str) else ""
        guess = guess if guess.startswith("SIG") else "SIG" + guess
        hint = f" (did you mean {guess!r}?)" if isinstance(name, str) and _SIGNAL_NAME.fullmatch(guess) else ""
        return f"expected a signal name such as 'SIGTERM', got {shown}{hint}"
    if name in _UNCATCHABLE:
        return f"{name!r} cannot be caught, so no save can be made on it"
    return None


def _check_save_on(inst: Config, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, tuple):
        raise ConfigError(f"expected a list of signal names, got {type(value).__name__} {value!r}", attribute.name)
    for index, name in enumerate(value):
        problem = _signal_name_problem(name)
        if problem is None and name in value[:index]:
            problem = f"{name!r} is listed twice"
        if problem is not None:
            raise ConfigError(problem, f"{attribute.name}[{index}]")
    if value and inst.active and not any(isinstance(strategy, Every) for strategy in inst.strategies):
        raise ConfigError(
            "a preemption save writes the config's Every strategies (last.pt), and it has none; "
            "add one, e.g. Every(filename='last.pt') (also saved every epoch) or Every(seconds=3600, filename='last.pt')",
            attribute.name,
        )


def _check_on_missing(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value not in ON_MISSING:
        raise ConfigError(f"{value!r} is not one of 'error', 'warn'", attribute.name)


@attrs.frozen
class Config:
    """An ordered set of strategies; ``enabled=False`` or no strategies turns checkpointing off.

    A strategy is a ``Strategy`` (keep the best for a metric) or an ``Every``
    (save every n epochs); file names are unique across both.

    >>> Config([Strategy("val_loss"), Strategy("val_corr", mode="max")]).active
    True
    >>> Config([Strategy("val_loss")], enabled=False).active
    False
    """

    strategies: tuple[Strategy | Every, ...] = attrs.field(
        default=(), converter=_to_strategies, validator=_check_unique_filenames
    )
    enabled: bool = attrs.field(default=True, validator=check_bool)
    on_missing: str = attrs.field(default="error", kw_only=True, validator=_check_on_missing)
    #: names of experiment trackers that hear about every save (``"wandb"``, ``"mlflow"``);
    #: the shells build them (``ckptfn.integrations.trackers``)
    trackers: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_to_names, validator=_check_names)
    #: names of the signals that announce a preemption (``"SIGTERM"``, ``"SIGUSR1"``): the shells
    #: record them and write every ``Every`` strategy's file at the next safe point
    #: (``ckptfn.shells.preemption``). An active config that names any needs an ``Every``.
    save_on: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_to_names, validator=_check_save_on)

    def __repr__(self) -> str:
        missing = "" if self.on_missing == "error" else f", on_missing={self.on_missing!r}"
        trackers = f", trackers={self.trackers!r}" if self.trackers else ""
        save_on = f", save_on={self.save_on!r}" if self.save_on else ""
        return f"Config(strategies={self.strategies!r}, enabled={self.enabled!r}{missing}{trackers}{save_on})"

    def on_missing_of(self, strategy: Strategy) -> str:
        """What ``strategy`` does when its metric is missing before its first save: its own
        ``on_missing``, else the config's.

        >>> Config([Strategy("a")], on_missing="warn").on_missing_of(Strategy("a", on_missing="error"))
        'error'
        """
        return strategy.on_missing or self.on_missing

    def check_sharded(self) -> Config:
        """This config, if it can be saved as sharded checkpoints (one ``.dcp`` directory per
        strategy), else the ``ConfigError`` naming the two strategies whose directories clash.

        >>> Config([Strategy("a", filename="best.pt"), Strategy("b", filename="best.pth")]).check_sharded()
        Traceback (most recent call last):
        ...
        ckptfn.ConfigError: strategies[1].filename: 'best.pt' and 'best.pth' would both be saved as the sharded checkpoint 'best.dcp'; give them different names before the suffix
        """
        error = _tree_name_clash(self.strategies, "strategies")
        if error is not None:
            raise error
        return self

    @property
    def active(self) -> bool:
        """True when ``step`` can emit actions: enabled and at least one strategy."""
        return self.enabled and bool(self.strategies)

    @classmethod
    def from_mapping(cls, obj: object) -> Config:
        """Build a Config from plain data (YAML, JSON, Hydra ``DictConfig``/``ListConfig``).

        Accepts ``None`` (disabled), one strategy mapping, a sequence of strategy
        mappings, or ``{"enabled": bool, "strategies": [...]}``; a ``Config``, a
        ``Strategy``/``Every`` or such items in the sequence pass through. A mapping
        with ``every_n_epochs``, ``every_n_steps`` or ``every_seconds`` (instead of
        ``metric_name``) is an ``Every``. The wrapper may set ``on_missing``, ``trackers``
        and ``save_on`` (signal names that trigger a preemption save).

        >>> Config.from_mapping([{"metric_name": "val_corr", "mode": "max"}]).strategies[0].filename
        'best_val_corr.pt'
        >>> Config.from_mapping({"enabled": False, "strategies": [{"metric_name": "val_loss"}]}).active
        False
        >>> Config.from_mapping([{"metric_name": "val_loss", "mdoe": "max"}])
        Traceback (most recent call last):
        ...
        ckptfn.ConfigError: [0]: unknown key 'mdoe' (did you mean 'mode'?); valid keys: metric_name, mode, filename, overwrite, min_delta, keep, top_k, on_missing
        >>> Config.from_mapping([{"metric_name": "val_loss"}, {"every_n_epochs": 2, "filename": "last.ckpt"}]).strategies[1]
        Every(n_epochs=2, filename='last.ckpt', overwrite=True, keep=None)
        >>> Config.from_mapping({"save_on": ["SIGTERM", "SIGUSR1"], "strategies": [{"every_n_steps": 500}]}).save_on
        ('SIGTERM', 'SIGUSR1')
        >>> Config.from_mapping({"save_on": ["SIGTERM"], "strategies": [{"metric_name": "val_loss"}]})
        Traceback (most recent call last):
        ...
        ckptfn.ConfigError: save_on: a preemption save writes the config's Every strategies (last.pt), and it has none; add one, e.g. Every(filename='last.pt') (also saved every epoch) or Every(seconds=3600, filename='last.pt')
        """
        return as_config(obj)


def _items(mapping: Mapping, path: str) -> list[tuple[str, object]]:
    """The mapping's items with str keys; reading a value may fail (OmegaConf's ``???``)."""
    items = []
    for key in mapping:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {type(key).__name__} {key!r}", path)
        try:
            value = mapping[key]
        except Exception as error:  # e.g. omegaconf.MissingMandatoryValue
            raise ConfigError(f"cannot read value: {error}", _join_path(path, key)) from error
        items.append((key, value))
    return items


def _unknown_key(key: str, valid: Sequence[str], path: str, also: Sequence[str] = ()) -> ConfigError:
    """An unknown key, the closest known one (among ``valid`` and ``also``), and the valid keys."""
    close = difflib.get_close_matches(key, [*valid, *also], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r}{hint}; valid keys: {', '.join(valid)}", path)


def _parse_every(items: list[tuple[str, object]], path: str) -> Every:
    fields = {}
    for key, value in items:
        if key not in EVERY_KEYS:
            raise _unknown_key(key, EVERY_KEYS, path)
        if not (key == "filename" and value is None):
            fields[TRIGGER_KEYS.get(key, key)] = value
    try:
        return Every(**fields)
    except ConfigError as error:
        where = {field: key for key, field in TRIGGER_KEYS.items()}.get(error.path, error.path)
        detail = error.detail
        for key, field in TRIGGER_KEYS.items():
            detail = detail.replace(f"{field}=", f"{key}=")
        raise ConfigError(detail, where).within(path) from None


def parse_strategy(obj: object, path: str = "") -> Strategy | Every:
    """One strategy from a mapping of its fields (or a ``Strategy``/``Every``, passed through).

    A ``filename`` of None means the default name; a mapping with
    ``every_n_epochs``, ``every_n_steps`` or ``every_seconds`` instead of
    ``metric_name`` is an ``Every``.

    >>> parse_strategy({"metric_name": "loss_components.concordance", "filename": None}).filename
    'best_loss_components_concordance.pt'
    >>> parse_strategy({"every_n_epochs": 5, "filename": None})
    Every(n_epochs=5, filename='last.pt', overwrite=True, keep=None)
    >>> parse_strategy({"every_n_steps": 500, "filename": "last.ckpt"})
    Every(n_steps=500, filename='last.ckpt', overwrite=True, keep=None)
    """
    if isinstance(obj, (Strategy, Every)):
        return obj
    if not isinstance(obj, Mapping):
        raise ConfigError(f"expected a strategy mapping, got {type(obj).__name__} {obj!r}", path)
    items = _items(obj, path)
    keys = {key for key, _ in items}
    trigger = next((key for key in TRIGGER_KEYS if key in keys), None)
    if trigger is not None:
        if "metric_name" in keys:
            raise ConfigError(
                f"a strategy either watches a metric (metric_name) or saves periodically "
                f"({trigger}), not both",
                _join_path(path, trigger),
            )
        return _parse_every(items, path)
    fields = {}
    for key, value in items:
        if key not in STRATEGY_KEYS:
            raise _unknown_key(key, STRATEGY_KEYS, path, also=tuple(TRIGGER_KEYS))
        if not (key == "filename" and value is None):
            fields[key] = value
    if "metric_name" not in fields:
        raise ConfigError("required key is missing", _join_path(path, "metric_name"))
    try:
        return Strategy(**fields)
    except ConfigError as error:
        raise error.within(path) from None


def _parse_sequence(obj: object, path: str) -> tuple[Strategy | Every, ...]:
    if obj is None:
        return ()
    if isinstance(obj, (str, bytes, Mapping)) or not isinstance(obj, Sequence):
        raise ConfigError(f"expected a list of strategies, got {type(obj).__name__} {obj!r}", path)
    strategies = tuple(
        parse_strategy(item, _join_path(path, f"[{index}]")) for index, item in enumerate(obj)
    )
    error = _duplicate_error(strategies, path) or _archive_name_clash(strategies, path)
    if error is not None:
        raise error
    return strategies


def _parse_wrapper(obj: Mapping) -> Config:
    fields = dict(_items(obj, ""))
    for key in fields:
        if key not in _WRAPPER_KEYS:
            raise _unknown_key(key, _WRAPPER_KEYS + STRATEGY_KEYS + tuple(TRIGGER_KEYS), "")
    enabled = fields.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"expected true or false, got {type(enabled).__name__} {enabled!r}", "enabled")
    on_missing = fields.get("on_missing", "error")
    trackers = fields.get("trackers") or ()
    save_on = fields.get("save_on") or ()
    return Config(
        _parse_sequence(fields.get("strategies"), "strategies"),
        enabled=enabled,
        on_missing=on_missing,
        trackers=trackers,
        save_on=save_on,
    )


def as_config(obj: object) -> Config:
    """Anything ``Config.from_mapping`` accepts, as a ``Config``.

    >>> as_config(None).active, as_config(Strategy("val_loss")).strategies[0].metric_name
    (False, 'val_loss')
    """
    if isinstance(obj, Config):
        return obj
    if obj is None:
        return Config(enabled=False)
    if isinstance(obj, (Strategy, Every)):
        return Config((obj,))
    if isinstance(obj, Mapping):
        if any((key in STRATEGY_KEYS or key in EVERY_KEYS) and key not in _WRAPPER_KEYS for key in obj):
            return Config((parse_strategy(obj),))
        return _parse_wrapper(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return Config(_parse_sequence(obj, ""))
    raise ConfigError(
        "expected None, a strategy mapping, a list of strategies or "
        f"{{'enabled': ..., 'strategies': [...]}}, got {type(obj).__name__} {obj!r}"
    )
