"""``ckptfn.lightning``: the PyTorch Lightning callback (see ``ckptfn.integrations.lightning``)."""

from ckptfn.integrations.lightning import Checkpointing, plain_metrics, weights_only_checkpoint

__all__ = ["Checkpointing", "plain_metrics", "weights_only_checkpoint"]
