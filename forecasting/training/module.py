"""The training engine: one LightningModule for any step model and any objective.

:class:`ForecastModule` owns the optimiser (AdamW), the learning-rate schedule (linear warm-up, then cosine
decay to a floor; GraphCast, Lam et al. 2023, supplement 4.5), the rollout schedule (train on 1 step,
then from given optimiser steps on 2, 3, ... autoregressive steps with backpropagation through the whole
rollout) and the random streams: every training step and validation batch draws its noise from a
generator seeded by (seed, stream, step or batch, rank), so a resumed run repeats an uninterrupted one
exactly. What a batch means and how the loss is computed is the objective's business
(:class:`Objective`): :class:`RolloutObjective` for the graph family; the diffusion families plug in their
own denoising objectives.

Losses (unreduced over points, reduced by the objective):

* MSE of the error in units of each channel's tendency std (GraphCast's normalised residual space);
* the fair CRPS of an ensemble of K members (Ferro 2014; used for AIFS-CRPS, Lang et al. 2024):
  ``CRPS_fair = mean_i |x_i - y| - sum_{i != j} |x_i - x_j| / (2 K (K - 1))``, an unbiased estimate of the
  CRPS of the distribution the members are drawn from. Computed from the sorted members in
  O(K log K): ``sum_{i != j} |x_i - x_j| = 2 sum_k (2k - K + 1) x_(k)`` for ascending ``x_(0..K-1)``.
Both are weighted per node (area weights, summing to 1) and per channel (mean 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Protocol

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ForecastModule",
    "Objective",
    "RolloutObjective",
    "fair_crps",
    "learning_rate_factor",
]


def fair_crps(ensemble: Tensor, target: Tensor, *, dim: int = 0) -> Tensor:
    """Fair CRPS of the members along ``dim`` of ``ensemble`` (K >= 2) against ``target``, per point.

    ``target`` has the shape of ``ensemble`` without ``dim``; so has the result (differentiable).
    """
    members = ensemble.shape[dim]
    if members < 2:
        raise ValueError(f"the fair CRPS needs at least 2 members along dim {dim}; found {members}")
    skill = (ensemble - target.unsqueeze(dim)).abs().mean(dim)
    ordered = ensemble.sort(dim=dim).values
    shape = [1] * ensemble.ndim
    shape[dim] = members
    coefficient = (2 * torch.arange(members, device=ensemble.device, dtype=ensemble.dtype) - members + 1).view(shape)
    pair_sum = 2 * (coefficient * ordered).sum(dim)  # sum over i != j of |x_i - x_j|
    return skill - pair_sum / (2 * members * (members - 1))


def learning_rate_factor(step: int, *, warmup_steps: int, max_steps: int, floor: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps``, then a cosine from 1 down to
    ``floor`` at ``max_steps`` (and ``floor`` after).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Objective(Protocol):
    """Loss and metrics of a model on a batch; ``"loss"`` is what is minimised."""

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int, generator: torch.Generator
    ) -> dict[str, Tensor]: ...


class RolloutObjective:
    """Loss of a :class:`~forecasting.forecasters.Rollout` over ``steps`` steps against the batch's targets.

    Batches follow :class:`~forecasting.training.data.NodeWindowDataset` (``inputs``, ``targets``,
    ``forcings``, ``static`` and optionally ``boundary``; batch first). Deterministic (``ensemble_size``
    None): the weighted MSE of the error in tendency-std units, averaged over samples and steps.
    Probabilistic: every sample is run ``ensemble_size`` times (different noise) and the weighted fair
    CRPS is averaged instead.

    Metrics besides ``loss``: ``rmse_<channel>``, the node-weighted RMSE in physical units at the last
    step (of the ensemble mean).

    Args:
        node_weights: Shape (N,), summing to 1.
        channel_weights: Shape (C,), mean 1.
        error_scale: Shape (C,), the tendency std of each channel (physical units).
        ensemble_size: Members per sample for the fair CRPS, or None for the MSE.
        channel_names: Names of the C channels (for the metric names).
    """

    def __init__(
        self,
        *,
        node_weights: np.ndarray,
        channel_weights: np.ndarray,
        error_scale: np.ndarray,
        ensemble_size: int | None,
        channel_names: Sequence[str],
    ) -> None:
        if ensemble_size is not None and ensemble_size < 2:
            raise ValueError(f"ensemble_size must be >= 2 for the fair CRPS; found {ensemble_size}")
        self.node_weights = torch.as_tensor(np.asarray(node_weights, dtype=np.float32))
        self.channel_weights = torch.as_tensor(np.asarray(channel_weights, dtype=np.float32))
        self.error_scale = torch.as_tensor(np.asarray(error_scale, dtype=np.float32))
        self.ensemble_size = ensemble_size
        self.channel_names = tuple(channel_names)

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        inputs, targets = batch["inputs"], batch["targets"][:, :steps]
        if targets.shape[1] < steps:
            raise ValueError(f"a {steps}-step rollout needs {steps} target steps; the batch has {targets.shape[1]}")
        members = self.ensemble_size or 1
        device = inputs.device
        node_w = self.node_weights.to(device)
        channel_w = self.channel_weights.to(device)
        scale = self.error_scale.to(device)

        def repeat(x: Tensor) -> Tensor:
            return x.repeat_interleave(members, dim=0) if members > 1 else x

        boundary = batch.get("boundary")
        prediction = model(
            repeat(inputs),
            static=repeat(batch["static"]),
            forcings=repeat(batch["forcings"][:, : inputs.shape[1] + steps]),
            steps=steps,
            boundary=None if boundary is None else repeat(boundary[:, :steps]),
            generator=generator,
        ).float()  # (B * K, steps, N, C)
        if members > 1:
            ensemble = prediction.reshape(inputs.shape[0], members, *prediction.shape[1:])
            score = fair_crps(ensemble / scale, targets / scale, dim=1)  # (B, steps, N, C)
            mean = ensemble.mean(dim=1)
        else:
            score = ((prediction - targets) / scale) ** 2
            mean = prediction
        loss = ((score * channel_w).mean(dim=-1) * node_w).sum(dim=-1).mean()
        metrics = {"loss": loss}
        with torch.no_grad():
            squared = ((mean[:, -1] - targets[:, -1]) ** 2 * node_w[:, None]).sum(dim=-2).mean(dim=0)  # (C,)
            for name, value in zip(self.channel_names, squared.sqrt(), strict=True):
                metrics[f"rmse_{name}"] = value
        return metrics


class ForecastModule(L.LightningModule):
    """Trains ``model`` by minimising ``objective`` (see the module docstring).

    Args:
        model: Any torch module the objective knows how to call (a Rollout for the graph family).
        objective: :class:`Objective`.
        learning_rate, min_learning_rate, weight_decay, warmup_steps, max_steps: AdamW and its schedule
            (:func:`learning_rate_factor`; ``max_steps`` is the schedule's length).
        rollout: ``(at_step, steps)`` stages: from optimiser step ``at_step`` on, roll out ``steps`` steps.
        val_rollout_steps: Steps rolled out in validation.
        seed: Seed of the noise streams.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        *,
        learning_rate: float,
        max_steps: int,
        min_learning_rate: float = 0.0,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        rollout: Sequence[tuple[int, int]] = ((0, 1),),
        val_rollout_steps: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.learning_rate, self.min_learning_rate = learning_rate, min_learning_rate
        self.weight_decay, self.warmup_steps, self.max_steps = weight_decay, warmup_steps, max_steps
        self.rollout = sorted((int(a), int(s)) for a, s in rollout)
        if not self.rollout or self.rollout[0][0] != 0:
            raise ValueError(f"the rollout schedule must start at step 0; found {self.rollout}")
        self.val_rollout_steps = val_rollout_steps
        self.seed = seed

    def rollout_steps(self, step: int) -> int:
        """Autoregressive steps trained on at optimiser step ``step``."""
        return [steps for at, steps in self.rollout if at <= step][-1]

    def _generator(self, stream: int, index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, stream, index, self.global_rank]).generate_state(2)
        seed = ((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        steps = self.rollout_steps(self.global_step)
        metrics = self.objective(self.model, batch, steps=steps, generator=self._generator(0, self.global_step))
        size = int(batch["inputs"].shape[0])
        self.log("train/loss", metrics["loss"], prog_bar=True, batch_size=size)
        self.log("train/rollout_steps", float(steps), batch_size=size)
        return metrics["loss"]

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        metrics = self.objective(self.model, batch, steps=self.val_rollout_steps, generator=self._generator(1, batch_idx))
        size = int(batch["inputs"].shape[0])
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        optimiser = torch.optim.AdamW(
            self.model.parameters(), lr=self.learning_rate, betas=(0.9, 0.95), weight_decay=self.weight_decay
        )
        factor = partial(
            learning_rate_factor,
            warmup_steps=self.warmup_steps,
            max_steps=self.max_steps,
            floor=self.min_learning_rate / self.learning_rate,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
