"""Experiment trackers hear about every save: ``on_saved`` hooks for Weights & Biases and MLflow.

A tracker is a plain callable ``hook(event)`` over ``ckptfn.core.events.Saved``, given as
``on_saved=`` to a shell (``CheckpointManager``, the Lightning callback) or named in a
config (``trackers: [wandb]``, built by ``tracker``). It is called once per committed name,
after the files are on disk, so what it logs always exists.

What each tracker records, per ``Saved.kind``:

============  ==========================================  ==========================================
kind          ``WandbTracker``                            ``MLflowTracker``
============  ==========================================  ==========================================
``best``      summary ``best/<metric>`` (and              metric ``best/<metric>`` at step
              ``best_epoch/<metric>``,                    ``global_step`` (else the epoch); the file
              ``best_step/<metric>``); the file as a      under ``checkpoints/<strategy>/``
              new version of the strategy's artifact,
              aliases ``best-<metric>`` and ``latest``
``top_k``     a new version, alias ``latest``             the file under ``checkpoints/<strategy>/``
``periodic``  a new version, alias ``latest``             the file under ``checkpoints/<strategy>/``
============  ==========================================  ==========================================

Names are made acceptable to each library deterministically (``artifact_name``,
``alias_of``, ``mlflow_key``): a name that is already valid is used as it is, and one
that had to change carries a checksum of the original, so two names never merge.

Never a reason to stop training: no active run is a WARNING once (then DEBUG) and the
save is not logged; a tracker library error is left to the shell, which logs it as a
WARNING. A missing library is an ``ImportError`` naming the extra, when the tracker is
built (before training starts).

>>> tracker("wandbb")
Traceback (most recent call last):
...
ckptfn.ConfigError: trackers: unknown tracker 'wandbb' (did you mean 'wandb'?); known trackers: mlflow, wandb
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
import pathlib
import re
import zlib
from collections.abc import Callable

from ckptfn.core.errors import ConfigError
from ckptfn.core.events import Saved

__all__ = [
    "ARTIFACT_MODES", "TRACKERS", "MLflowTracker", "WandbTracker", "alias_of", "artifact_name", "mlflow_key", "tracker",
]

logger = logging.getLogger("ckptfn")

#: how ``WandbTracker`` logs a file: a reference to the local path (no copy), an upload, or not at all
ARTIFACT_MODES = ("reference", "upload", None)

#: W&B artifact names and aliases: alphanumerics, dashes, underscores and dots, at most 128 characters
_NOT_IN_WANDB_NAMES = re.compile(r"[^A-Za-z0-9._-]")
_WANDB_NAME_MAX = 128
#: MLflow metric names: word characters, ``/``, ``.``, ``-``, spaces and (not on Windows) ``:``
_NOT_IN_MLFLOW_KEYS = re.compile(r"[^\w./ -]" if os.name == "nt" else r"[^\w./ :-]")
_MLFLOW_KEY_MAX = 250


def _fit(original: str, cleaned: str, limit: int, *, changed_needs_check: bool = True) -> str:
    """``cleaned`` if it is ``original`` and fits, else shortened to ``limit`` with the CRC32
    of ``original`` appended (always when it is too long; when it merely changed, if
    ``changed_needs_check``)."""
    if len(cleaned) <= limit and (cleaned == original or not changed_needs_check):
        return cleaned
    check = f"{zlib.crc32(original.encode('utf-8', 'surrogateescape')):08x}"
    return f"{cleaned[: limit - len(check) - 1]}-{check}"


def artifact_name(name: str) -> str:
    """A W&B artifact name for ``name``: itself if valid (alphanumerics, ``-``, ``_``, ``.``,
    at most 128 characters), else with every other character as ``_`` and a checksum of
    the original appended, so that two names never share an artifact.

    >>> artifact_name("best_val_loss.pt"), artifact_name("best val(loss).pt")
    ('best_val_loss.pt', 'best_val_loss_.pt-8cad2337')
    """
    return _fit(name, _NOT_IN_WANDB_NAMES.sub("_", name), _WANDB_NAME_MAX)


def alias_of(metric_name: str) -> str:
    """The W&B alias of a strategy's best: ``best-<metric>``, other characters as ``_`` (an
    artifact holds one strategy, so aliases of two metrics never meet; a checksum is added
    only when the alias is too long).

    >>> alias_of("val_loss"), alias_of("val/loss:top1")
    ('best-val_loss', 'best-val_loss_top1')
    """
    raw = f"best-{metric_name}"
    return _fit(raw, _NOT_IN_WANDB_NAMES.sub("_", raw), _WANDB_NAME_MAX, changed_needs_check=False)


def mlflow_key(metric_name: str, prefix: str = "best/") -> str:
    """The MLflow metric name ``best/<metric>``: itself when MLflow accepts it (``/``, ``.``,
    ``-``, ``_``, spaces, ``:`` off Windows; no empty, ``.`` or ``..`` path parts; at most
    250 characters), else with the offending characters and parts as ``_`` and a checksum
    of the original appended.

    >>> mlflow_key("val/loss"), mlflow_key("val.loss top-1"), mlflow_key("f1@0.5"), mlflow_key("a//b")
    ('best/val/loss', 'best/val.loss top-1', 'best/f1_0.5-2c1775fd', 'best/a/_/b-031e8745')
    """
    raw = f"{prefix}{metric_name}"
    parts = _NOT_IN_MLFLOW_KEYS.sub("_", raw).split("/")
    cleaned = "/".join("_" if part in ("", ".", "..") else part for part in parts)
    return _fit(raw, cleaned, _MLFLOW_KEY_MAX)


def _import(module: str, extra: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{what} needs the {module} package: pip install 'ckptfn[{extra}]'") from error


def _plain(value: object) -> object:
    """JSON-safe: non-finite floats (W&B metadata refuses them) as None, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def _metadata(event: Saved) -> dict:
    """What a version's metadata says about its save (the local paths excluded)."""
    return {key: _plain(value) for key, value in event.to_dict().items() if key != "paths"}


class _Once:
    """A WARNING on the ``ckptfn`` logger the first time for each reason, DEBUG afterwards."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def __call__(self, reason: str, message: str, *args: object) -> None:
        if reason in self._said:
            logger.debug(message, *args)
            return
        self._said.add(reason)
        logger.warning(message + " (further such saves are logged at DEBUG)", *args)


class WandbTracker:
    """Log every save to a Weights & Biases run: the bests in the run summary, the files
    as model artifacts whose aliases follow the bests.

    Args:
        run: the ``wandb`` run; ``None`` (default) uses ``wandb.run`` at each save. With no
            active run (or a finished one) the save is not logged: a WARNING once, then DEBUG.
        artifacts: ``"reference"`` (default) records the local file by path and checksum
            (read once, nothing copied; the path is what ckptfn overwrites when the best
            changes, so only the newest version's file is still on disk), ``"upload"``
            copies it into the run (every version kept, at its size in storage; the copy
            is made during the save's hook), ``None`` logs no artifacts.
        name: the artifact of a strategy, formatted with ``run_id`` and ``filename`` (the
            strategy's file name) and made valid by ``artifact_name``. The default keeps one
            artifact per run and strategy (like ``WandbLogger``'s ``model-<run id>``), so
            aliases never move between runs; ``"{filename}"`` shares one across a project.

    Each save of a strategy is a new version of its artifact (type ``model``, metadata:
    the ``Saved`` fields): a best has the aliases ``best-<metric>`` and ``latest``, a top-k
    member or a periodic save ``latest`` (W&B moves an alias to the version that takes
    it). A best also sets the summary ``best/<metric>`` to its value, ``best_epoch/<metric>``
    and ``best_step/<metric>`` (when a global step is known); summary keys keep the metric
    name as logged.

    >>> import tempfile, torch, wandb, ckptfn
    >>> run = wandb.init(mode="disabled")  # offline and online runs work the same way
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"),
    ...                                        on_saved=WandbTracker(artifacts=None))
    ...     for epoch, loss in enumerate([0.5, 0.4, 0.45]):
    ...         _ = manager.update({"val_loss": loss}, {"w": torch.zeros(2)}, epoch, global_step=10 * epoch)
    >>> run.summary["best/val_loss"], run.summary["best_epoch/val_loss"], run.summary["best_step/val_loss"]
    (0.4, 1, 10)
    >>> wandb.finish()
    """

    def __init__(
        self, run: object = None, *, artifacts: str | None = "reference", name: str = "{run_id}-{filename}"
    ) -> None:
        if artifacts not in ARTIFACT_MODES:
            raise ConfigError(f"{artifacts!r} is not one of 'reference', 'upload', None", "artifacts")
        try:
            valid = isinstance(name, str) and name.format(run_id="", filename="<>") != name.format(run_id="", filename="")
        except (KeyError, IndexError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(
                f"expected a str holding '{{filename}}' (and maybe '{{run_id}}'), got {type(name).__name__} {name!r}", "name"
            )
        self._wandb = _import("wandb", "wandb", "WandbTracker")
        self.run = run
        self.artifacts = artifacts
        self.name = name
        self._once = _Once()

    def __repr__(self) -> str:
        return f"WandbTracker(run={self.run!r}, artifacts={self.artifacts!r})"

    def __call__(self, event: Saved) -> None:
        run = self.run if self.run is not None else self._wandb.run
        if run is None:
            self._once("no run", "no active W&B run: %s was not logged (call wandb.init() before training, "
                       "or pass run=)", event.name)
            return
        try:
            if event.kind == "best":
                summary = {f"best/{event.metric_name}": event.value, f"best_epoch/{event.metric_name}": event.epoch}
                if event.global_step is not None:
                    summary[f"best_step/{event.metric_name}"] = event.global_step
                run.summary.update(summary)
            if self.artifacts is not None:
                self._log_artifact(run, event)
        except self._wandb.errors.UsageError as error:  # a finished run: expected at the end of training
            self._once("usage", "the W&B run does not take %s: %s", event.name, error)

    def _log_artifact(self, run: object, event: Saved) -> None:
        wandb = self._wandb
        name = artifact_name(self.name.format(run_id=getattr(run, "id", "run"), filename=event.strategy))
        artifact = wandb.Artifact(name=name, type="model", metadata=_metadata(event))
        path = pathlib.Path(event.path).absolute()
        entry = path.name
        if self.artifacts == "reference":
            artifact.add_reference(path.as_uri(), name=entry)
        elif path.is_dir():  # a sharded checkpoint's directory
            artifact.add_dir(str(path), name=entry)
        else:
            artifact.add_file(str(path), name=entry)
        aliases = [alias_of(event.metric_name), "latest"] if event.kind == "best" else ["latest"]
        run.log_artifact(artifact, aliases=aliases)


class MLflowTracker:
    """Log every save to an MLflow run: the bests as metrics, the files as artifacts.

    Args:
        run_id: the run to log to; ``None`` (default) uses ``mlflow.active_run()`` at each
            save. With neither, the save is not logged: a WARNING once, then DEBUG.
        client: an ``mlflow.MlflowClient``; default: a client of the current tracking URI,
            made at each save.
        artifacts: ``False`` logs no files (``True``: each is copied or uploaded to the run's
            artifact store during the save's hook, on the training thread).

    A best logs ``best/<metric>`` (``mlflow_key``) with its value at step ``global_step``
    (the epoch when there is none), so the metric's history is the sequence of bests. Every
    save (best, top-k member, periodic) logs its file under ``checkpoints/<strategy>/``
    (a sharded checkpoint's directory under ``checkpoints/<strategy>/<name>/``); a file
    logged again under the same name replaces the earlier one in the run's artifacts, and
    MLflow keeps the top-k members that ckptfn deletes.

    Example (not run here: it needs a tracking store)::

        mlflow.set_tracking_uri("sqlite:///mlflow.db")
        with mlflow.start_run() as run:
            manager = ckptfn.CheckpointManager("run", strategies, on_saved=MLflowTracker())
            ...  # manager.update(...) every epoch
        MlflowClient().get_metric_history(run.info.run_id, "best/val_loss")  # every new best, at its step
    """

    def __init__(self, run_id: str | None = None, *, client: object = None, artifacts: bool = True) -> None:
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ConfigError(f"expected a run id, got {type(run_id).__name__} {run_id!r}", "run_id")
        if not isinstance(artifacts, bool):
            raise ConfigError(f"expected a bool, got {type(artifacts).__name__} {artifacts!r}", "artifacts")
        self._mlflow = _import("mlflow", "mlflow", "MLflowTracker")
        self.run_id = run_id
        self.client = client
        self.artifacts = artifacts
        self._once = _Once()

    def __repr__(self) -> str:
        return f"MLflowTracker(run_id={self.run_id!r}, artifacts={self.artifacts!r})"

    def __call__(self, event: Saved) -> None:
        run_id = self.run_id
        if run_id is None:
            run = self._mlflow.active_run()
            if run is None:
                self._once("no run", "no active MLflow run: %s was not logged (call mlflow.start_run() "
                           "before training, or pass run_id=)", event.name)
                return
            run_id = run.info.run_id
        client = self.client if self.client is not None else self._mlflow.MlflowClient()
        if event.kind == "best":
            step = event.global_step if event.global_step is not None else event.epoch
            client.log_metric(run_id, mlflow_key(event.metric_name), event.value, step=step)
        if self.artifacts:
            where = f"checkpoints/{event.strategy}"
            if os.path.isdir(event.path):
                client.log_artifacts(run_id, event.path, artifact_path=f"{where}/{os.path.basename(event.path)}")
            else:
                client.log_artifact(run_id, event.path, artifact_path=where)


#: the tracker names a config may list, and what each builds
TRACKERS: dict[str, Callable[..., Callable[[Saved], None]]] = {"mlflow": MLflowTracker, "wandb": WandbTracker}


def tracker(name: str, /, **options: object) -> Callable[[Saved], None]:
    """The ``on_saved`` hook of the tracker ``name`` (``Config.trackers``), built with ``options``.

    ``"wandb"`` is ``WandbTracker(**options)``, ``"mlflow"`` ``MLflowTracker(**options)``.
    An unknown name is a ``ConfigError`` naming the known ones; a tracker whose library
    is not installed an ``ImportError`` with the ``pip`` command.

    >>> tracker("mlfow")
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: trackers: unknown tracker 'mlfow' (did you mean 'mlflow'?); known trackers: mlflow, wandb
    """
    build = TRACKERS.get(name) if isinstance(name, str) else None
    if build is None:
        close = difflib.get_close_matches(name, TRACKERS, n=1) if isinstance(name, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown tracker {name!r}{hint}; known trackers: {', '.join(sorted(TRACKERS))}", "trackers")
    return build(**options)
