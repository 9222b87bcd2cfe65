"""A small, readable reference Trainer that checkpoints through ``CheckpointManager``.

It fits a tiny MLP to a synthetic regression generated in-process (no downloads)
and validates every epoch with the metrics ckptfn is built for:

- ``val_loss``: the total loss, ``mse + 0.5 * concordance``;
- ``loss_components``: a nested dict with ``mse`` and ``concordance`` (one minus
  Lin's concordance correlation coefficient; lower is better);
- ``val_residual_spearman``: Spearman correlation between predicted and true
  residuals over a linear baseline (higher is better).

Every epoch it also writes ``last.pt`` (after the best files) holding model,
optimizer, epoch, RNG states and the manager state, so a crash loses at most one
epoch and ``Trainer(..., resume_from=".../last.pt")`` continues exactly.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable, Mapping

import torch

from ckptfn.core.errors import ConfigError
from ckptfn.shells.manager import CheckpointManager
from ckptfn.io.read import load_checkpoint

__all__ = ["LAST", "Trainer", "concordance_loss", "spearman"]

logger = logging.getLogger("ckptfn")

#: The Trainer's own every-epoch checkpoint.
LAST = "last.pt"

EpochCallback = Callable[[int, Mapping, list], None]


def _ranks(values: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(values)
    ranks[values.argsort()] = torch.arange(len(values), dtype=values.dtype)
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position).

    >>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])), 6)
    0.5
    """
    return float(_pearson(_ranks(a), _ranks(b)))


def concordance_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One minus Lin's concordance correlation coefficient (0 when prediction == target)."""
    mp, mt = prediction.mean(), target.mean()
    covariance = ((prediction - mp) * (target - mt)).mean()
    denominator = prediction.var(unbiased=False) + target.var(unbiased=False) + (mp - mt) ** 2
    return 1 - 2 * covariance / denominator.clamp_min(1e-12)


def _make_data(seed: int, n_train: int = 512, n_val: int = 256, features: int = 8):
    g = torch.Generator().manual_seed(seed)
    w_linear, w_wave = torch.randn(features, generator=g), torch.randn(features, generator=g)
    x = torch.randn(n_train + n_val, features, generator=g)
    y = 0.5 * x @ w_linear + torch.sin(1.5 * x @ w_wave) + 0.3 * torch.randn(n_train + n_val, generator=g)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class Trainer:
    """Train a tiny model for ``epochs`` epochs in total, checkpointing into ``output_dir``.

    Args:
        output_dir: where the best files and ``last.pt`` go.
        checkpointing: anything ``CheckpointManager`` accepts (``None``: no best files).
        epochs: the total number of epochs; a resumed run continues up to it.
        seed: seeds data, initialisation and batch order.
        resume_from: a ``last.pt`` (or best) checkpoint to continue from: model,
            optimizer, epoch and RNG states come from it; the bests come from the
            best files in ``output_dir``, which are the truth (``resume=True``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        checkpointing: object = None,
        *,
        epochs: int = 20,
        seed: int = 0,
        resume_from: str | os.PathLike | None = None,
        batch_size: int = 64,
        lr: float = 3e-2,
    ) -> None:
        self.output_dir = pathlib.Path(output_dir)
        self.epochs, self.seed, self.batch_size = epochs, seed, batch_size
        (self.x_train, self.y_train), (self.x_val, self.y_val) = _make_data(seed)
        self.baseline = torch.linalg.lstsq(self.x_train, self.y_train.unsqueeze(1)).solution.squeeze(1)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.batch_order = torch.Generator().manual_seed(seed + 1)
        self.start_epoch = 0
        self.manager = CheckpointManager(self.output_dir, checkpointing, resume=resume_from is not None)
        if any(s.filename == LAST for s in self.manager.config.strategies):
            raise ConfigError(f"{LAST!r} is the Trainer's own every-epoch file", "strategies.filename")
        if resume_from is not None:
            self._resume(resume_from)

    # --- one epoch ------------------------------------------------------------------------

    def _loss(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mse = torch.nn.functional.mse_loss(prediction, target)
        concordance = concordance_loss(prediction, target)
        return mse + 0.5 * concordance, {"mse": mse, "concordance": concordance}

    def train_one_epoch(self) -> None:
        self.model.train()
        order = torch.randperm(len(self.x_train), generator=self.batch_order)
        for batch in order.split(self.batch_size):
            self.optimizer.zero_grad()
            loss, _ = self._loss(self.model(self.x_train[batch]).squeeze(1), self.y_train[batch])
            loss.backward()
            self.optimizer.step()

    @torch.no_grad()
    def validate(self) -> dict:
        """This epoch's validation metrics, nested as a training loop would log them."""
        self.model.eval()
        prediction = self.model(self.x_val).squeeze(1)
        loss, components = self._loss(prediction, self.y_val)
        linear = self.x_val @ self.baseline
        return {
            "val_loss": loss.item(),
            "loss_components": {name: value.item() for name, value in components.items()},
            "val_residual_spearman": spearman(prediction - linear, self.y_val - linear),
        }

    # --- checkpoints ----------------------------------------------------------------------

    def payload(self, epoch: int) -> dict:
        """Everything needed to continue after ``epoch`` (plain tensors and data: weights_only loads it)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "rng": {"torch": torch.get_rng_state(), "batch_order": self.batch_order.get_state()},
            "manager": self.manager.state_dict(),
        }

    def _resume(self, path: str | os.PathLike) -> None:
        payload, metadata = load_checkpoint(path)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"]["torch"])
        self.batch_order.set_state(payload["rng"]["batch_order"])
        self.start_epoch = int(payload["epoch"]) + 1
        logger.info("resumed from %s after epoch %d", path, payload["epoch"])

    # --- the loop -------------------------------------------------------------------------

    def fit(self, on_epoch: EpochCallback | None = None) -> dict[str, float | None]:
        """Train up to ``epochs`` in total; return the manager's best values ({} when checkpointing is off).

        ``on_epoch(epoch, metrics, written_paths)`` is called after every epoch.
        """
        for epoch in range(self.start_epoch, self.epochs):
            self.train_one_epoch()
            metrics = self.validate()
            written = self.manager.update(metrics, self.payload(epoch), epoch)
            self.manager.save_checkpoint(self.payload(epoch), LAST, metadata={"epoch": epoch})
            if on_epoch is not None:
                on_epoch(epoch, metrics, written)
        if self.manager.config.active:
            logger.info("best checkpoints:\n%s", self.manager.summary())
            return self.manager.best_values
        return {}
