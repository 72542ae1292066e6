"""Training engine: Lightning module and data, checkpoints, and the ``forecast train`` entry point.

* :mod:`~forecasting.training.checkpoint`: the one-file model checkpoint (weights, config, statistics,
  graph, format version), loaded with ``torch.load(weights_only=True)``; importable without Lightning;
* :mod:`~forecasting.training.module`: :class:`ForecastModule`, the LightningModule that trains any step
  model with any objective (rollout MSE or fair CRPS for the graph family), warm-up + cosine learning rate
  and the rollout schedule;
* :mod:`~forecasting.training.data`: windows of the training stores gathered onto data nodes, and the
  resumable sampler;
* :mod:`~forecasting.training.train`: :func:`~forecasting.training.train.train` (``forecast train``).

Only the checkpoint API is imported here, so loading a model for inference does not import Lightning.
"""

from forecasting.training.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    Checkpoint,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["CHECKPOINT_FORMAT_VERSION", "Checkpoint", "file_sha256", "load_checkpoint", "save_checkpoint"]
