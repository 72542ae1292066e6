"""The DYffusion family (``model.family: dyffusion``): forecasting as a diffusion process in physical time.

Ruehling Cachay, Zhao, Joren and Yu 2023, "DYffusion: A Dynamics-informed Diffusion Model for Spatiotemporal
Forecasting" (NeurIPS; arXiv 2306.01984), with the paper's symbols. Over a horizon of ``h`` model steps from
the state ``x_t``:

* the **interpolator** ``I_phi(x_t, x_{t+h}, i) ~ x_{t+i}`` (``0 < i < h``) plays the forward (corrupting)
  process; it is *stochastic*: its dropout stays on when forecasting (and while the forecaster trains), so
  each call draws another plausible intermediate state. Boundary values ``I(x_t, x_{t+h}, 0) = x_t`` and
  ``I(x_t, x_{t+h}, h) = x_{t+h}`` need no network;
* the **forecaster** ``F_theta(x_{t+i}, i) ~ x_{t+h}`` plays the reverse (denoising) process; it is
  conditioned on the initial conditions too (the paper's "data" forward conditioning).

Training (Algorithm 1), both stages in one ``forecast train`` run: first the interpolator alone, ``i ~ U{1 ..
h-1}``, minimising ``||I_phi(x_t, x_{t+h}, i) - x_{t+i}||^2``; then, with ``I_phi`` frozen, the forecaster,
``i ~ U{0 .. h-1}``, ``x~_{t+i} = I_phi(x_t, x_{t+h}, i)`` (``x_t`` for ``i = 0``), minimising
``(1 - w) ||F_theta(x~_{t+i}, i) - x_{t+h}||^2 + w ||F_theta(I_phi(x_t, F_theta(x~_{t+i}, i), i + 1), i + 1) -
x_{t+h}||^2`` (the second term, for ``i + 1 < h``, is the released code's one-step look-ahead that trains the
forecaster on its own predictions; ``w`` is ``lookahead_weight``; the code uses 0.5/0.5). The stage of a step
comes from the network's step counter ``trained_steps`` (a persistent buffer, so ``--resume`` continues in the
right stage); entering stage 2 switches off the interpolator's gradients, and re-freezes it on every later
step (a resumed run rebuilds the module with gradients on). The learning-rate schedule spans the whole run.

Chained windows (``training_windows`` K > 1, ours, not the paper's): beyond the horizon every window starts
from the last window's forecast, which the two networks never see in training. With K > 1 a batch holds K
windows of targets; for each stage-2 step a number ``k ~ U{0 .. K-1}`` is drawn, the first ``k`` windows are
sampled from the analyses by the model itself (its ``sampler``, no gradients, dropout as in training), and the
forecaster loss above is taken on window ``k + 1`` from those sampled states against its true end (the
pushforward trick of Brandstetter, Worrall and Welling 2022). The interpolator stage always uses the first window.

Forecaster at the start only (``forecaster_times: start``, ours): the direct sampler below calls the forecaster
at ``i = 0`` only, so stage 2 can spend every sample there: ``i = 0`` always, no look-ahead term.

Sampling is the paper's cold sampling (Algorithm 2) on a schedule ``0 = i_0 < i_1 < ... < i_{N-1} < i_N = h``:

    s^(0) = x_t;   for n = 0 .. N-1:
        x^_{t+h} = F_theta(s^(n), i_n)
        s^(n+1)  = I_phi(x_t, x^_{t+h}, i_{n+1}) - I_phi(x_t, x^_{t+h}, i_n) + s^(n)

and ``s^(n)`` is the forecast for lead ``i_n``, so every whole step ``1 .. h`` comes out of one pass "for
free"; ``s^(N)`` is the lead-``h`` state. The schedule holds the whole steps ``0 .. h-1`` and
``sampling_steps - h`` extra times evenly in ``(0, 1)`` (the paper's additional interpolation steps ``k``,
which the interpolator, trained on whole steps, meets only here); one pass costs ``N`` forecaster and
``2N - 2`` interpolator evaluations (:func:`network_evaluations`). Forecasts beyond ``h`` chain passes, each
starting from the last pass's states.

Direct sampling (``sampler: direct``, ours): one forecaster evaluation per window, from the window's start,

    x^_{t+h} = F_theta(x_t, 0);   s_j = I_phi(x_t, x^_{t+h}, j)  (j = 1 .. h-1);   s_h = x^_{t+h}

(``h - 1`` interpolator evaluations). It is the released code's ``refine_intermediate_predictions`` (every
intermediate lead re-interpolated from the final estimate) on the shortest schedule. Cold sampling refines the
estimate with forecaster calls on interpolated states ``s^(n)``, which the forecaster met in training only as
interpolations towards the *true* end; on the three-year stores each of those later estimates carried a larger
time-mean t2m error than the first (README, "Three simulated years"), and chained windows accumulated it.

Units and inputs: states are normalised with the store's statistics, ``n = (x - mean) / std``. The
interpolator predicts a departure from linear interpolation in tendency-std units, ``I = n_t + (i / h)
(n_{t+h} - n_t) + R tendency_std / std``, and the forecaster a change from its input in ``sqrt(h)``
tendency-std units (the random-walk scale of ``h`` steps), ``F = n_{t+i} + sqrt(h) R' tendency_std / std``;
losses are measured in tendency-std units, weighted by cell area and channel. Both networks are
:class:`~forecasting.models.UNet` (circular in longitude on the global grid) conditioned on the lead ``i``
in hours, and see the ``input_steps`` states ending at ``x_t``, the time forcings of those times, of
``t + i`` and of ``t + h``, the static fields and ``sin``/``cos`` of latitude.

With ``forecaster_dropout_at_inference`` the forecaster's dropout stays on when forecasting too (Monte Carlo
dropout, a second source of ensemble spread; the paper keeps only the interpolator stochastic).

Renewed perturbations (``window_perturbation`` > 0, ours, not the paper's): at the start of every window after
the first, each member's states get a fresh smooth Gaussian random field of that many 6-hour tendency stds
(forecasting.diffusion.perturbations, correlation length ``perturbation_length``), a stochastic forcing renewed
once per horizon, where perturbations of the initial state alone are damped as the forecast goes on.
Perturbed estimates (``estimate_perturbation`` > 0, ours too): one fresh field per member and window is added
to every estimate ``x^_{t+h}`` the forecaster makes in the window, so that the interpolated states
``I(x_t, x^_{t+h}, i)`` carry about ``i / h`` of it and the spread grows through the window as the error does,
instead of starting at its largest and being damped.

Randomness: when forecasting, each sample's dropout masks (both networks') come from its own generator, seeded from
``(seed, start time, member, window)``; so forecasts repeat exactly for the same seed, and a member does not
depend on the batch it was drawn in (``member_batch``). In training, dropout draws from torch's global
generator, as usual.

:class:`DYffusion` is the torch side (normalised tensors only); :class:`DYffusionForecaster` the
:class:`~forecasting.forecasters.Forecaster` (it shares the one-grid plumbing of
:class:`~forecasting.diffusion.conditional.OneGridDiffusionForecaster`: stores, checkpoints, input checks,
initial states, forcings); :class:`DYffusionObjective` and :func:`dyffusion_training_setup` plug the family
into ``forecast train``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from forecasting.config import ConfigError, DYffusionModelConfig, ExperimentConfig
from forecasting.diffusion.conditional import (
    OneGridDiffusionForecaster,
    OneGridNetwork,
    WeightedObjective,
    check_one_grid_training,
    one_grid_training_setup,
)
from forecasting.models import UNet

if TYPE_CHECKING:
    from forecasting.training.train import TrainingSetup

__all__ = [
    "DYffusion",
    "DYffusionForecaster",
    "DYffusionObjective",
    "dyffusion_training_setup",
    "SAMPLERS",
    "network_evaluations",
    "sampling_schedule",
]


def sampling_schedule(horizon: int, steps: int) -> list[float]:
    """Interpolation times ``[i_0 = 0, ..., i_{N-1}]`` (``i_N = horizon`` is implied) of ``steps = N`` sampling
    steps: the whole steps ``0 .. horizon-1`` and ``steps - horizon`` extra times evenly in (0, 1)."""
    if horizon < 2 or steps < horizon:
        raise ValueError(f"need horizon >= 2 and steps >= horizon; found horizon={horizon}, steps={steps}")
    extra = steps - horizon
    return [0.0, *[(j + 1) / (extra + 1) for j in range(extra)], *map(float, range(1, horizon))]


SAMPLERS = ("cold", "direct")


def _checked(sampler: str) -> str:
    """``sampler`` when it is one of :data:`SAMPLERS`; ValueError naming it otherwise."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown DYffusion sampler {sampler!r}; expected 'cold' or 'direct'")
    return sampler


def network_evaluations(horizon: int, steps: int, sampler: str = "cold") -> dict[str, int]:
    """Network evaluations of one sampling pass (window): cold sampling of ``steps = N`` steps,
    ``{"forecaster": N, "interpolator": 2N - 2}``; direct sampling (``steps`` unused),
    ``{"forecaster": 1, "interpolator": horizon - 1}``."""
    if _checked(sampler) == "direct":
        return {"forecaster": 1, "interpolator": horizon - 1}
    n = len(sampling_schedule(horizon, steps))
    return {"forecaster": n, "interpolator": 2 * n - 2}


class DYffusion(OneGridNetwork):
    """The interpolator and the forecaster of DYffusion on normalised tensors (see the module docstring).

    Shapes: states ``(B, T_in, C, H, W)`` normalised, oldest first (the last is ``x_t``); one state ``(B, C, H,
    W)``; forcings ``(B, T_in + 2, F, H, W)`` (the input times, ``t + i``, ``t + h``); static ``(B, S, H, W)``;
    interpolation times ``i`` ``(B,)`` in model steps (float).

    Args:
        n_channels, n_forcings, n_static, input_steps, latitude, residual_scale: As for
            :class:`~forecasting.diffusion.conditional.OneGridNetwork` (the conditioning takes the forcings of
            ``T_in + 2`` times).
        horizon: ``h``, model steps from ``x_t`` to ``x_{t+h}``.
        step_hours: Hours per model step (the networks are conditioned on ``i`` in hours).
        periodic_lon: The grid goes round the globe (circular padding in longitude).
        interpolator_dropout: Dropout of the interpolator, active in training and when forecasting.
        forecaster_dropout_at_inference: Keep the forecaster's dropout (``unet["dropout"]``) on when
            forecasting too, as a second source of spread.
        unet: Keyword arguments of :class:`~forecasting.models.UNet` shared by both networks (``base_channels``,
            ``channel_mult``, ``blocks_per_level``, ``embedding_dim``, ``dropout``: the forecaster's).

    Buffers: ``trained_steps`` (persistent), the optimiser steps trained so far (it sets the training stage).
    """

    def __init__(
        self,
        *,
        n_channels: int,
        n_forcings: int,
        n_static: int,
        input_steps: int,
        horizon: int,
        step_hours: float,
        latitude: np.ndarray,
        residual_scale: np.ndarray,
        periodic_lon: bool,
        interpolator_dropout: float,
        unet: Mapping[str, Any],
        forecaster_dropout_at_inference: bool = False,
    ) -> None:
        if horizon < 2 or not step_hours > 0 or not 0 < interpolator_dropout < 1:
            raise ValueError(
                "DYffusion needs horizon >= 2, step_hours > 0 and 0 < interpolator_dropout < 1; found "
                f"{horizon}, {step_hours}, {interpolator_dropout}"
            )
        super().__init__(
            n_channels=n_channels, n_forcings=n_forcings, n_static=n_static, input_steps=input_steps,
            forcing_times=input_steps + 2, latitude=latitude, residual_scale=residual_scale,
        )
        self.horizon = horizon
        self.step_hours = float(step_hours)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.int64))
        sizes = dict(unet)
        self.forecaster = UNet(
            n_channels + self.n_condition, n_channels, conditions=("lead_time",), periodic_lon=periodic_lon, **sizes
        )
        sizes["dropout"] = interpolator_dropout
        self.interpolator = UNet(
            n_channels + self.n_condition, n_channels, conditions=("lead_time",), periodic_lon=periodic_lon, **sizes
        )
        self.interpolator.dropout_at_inference = True
        self.forecaster.dropout_at_inference = bool(forecaster_dropout_at_inference)

    def _hours(self, i: Tensor, batch: int) -> Tensor:
        i = torch.as_tensor(i, dtype=torch.float32, device=self.residual_scale.device)
        if i.shape != (batch,):
            raise ValueError(f"interpolation times must have shape ({batch},); found {tuple(i.shape)}")
        return i * self.step_hours

    def interpolate(self, states: Tensor, end: Tensor, i: Tensor, forcings: Tensor, static: Tensor,
                    generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """``I_phi(x_t, x_{t+h}, i)``: the state at ``t + i`` (B, C, H, W) between ``x_t = states[:, -1]`` and
        ``end`` (B, C, H, W); stochastic while :attr:`interpolator` has dropout active, its masks drawn from
        ``generators`` (one per sample) when given."""
        batch = end.shape[0]
        hours = self._hours(i, batch)
        start = states[:, -1]
        linear = start + (hours / (self.horizon * self.step_hours)).view(batch, 1, 1, 1) * (end - start)
        inputs = torch.cat([end, self.conditioning(states, forcings, static)], dim=1)
        return linear + self.interpolator(inputs, lead_time=hours, generators=generators) / self.residual_scale

    def forecast(self, state: Tensor, states: Tensor, i: Tensor, forcings: Tensor, static: Tensor,
                 generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """``F_theta(x_{t+i}, i)``: the state at ``t + h`` (B, C, H, W) from ``state`` at ``t + i`` (B, C, H, W),
        given the initial conditions ``states``; stochastic while :attr:`forecaster` has dropout active, its
        masks drawn from ``generators`` (one per sample) when given."""
        batch = state.shape[0]
        inputs = torch.cat([state, self.conditioning(states, forcings, static)], dim=1)
        change = self.forecaster(inputs, lead_time=self._hours(i, batch), generators=generators)
        return state + math.sqrt(self.horizon) * change / self.residual_scale

    def cold_sample(
        self, states: Tensor, static: Tensor, forcings: Callable[[float], Tensor], schedule: Sequence[float],
        generators: Sequence[torch.Generator] | None = None, estimate_offset: Tensor | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """Cold sampling (Algorithm 2) from ``states`` over one horizon on ``schedule`` (:func:`sampling_schedule`).

        ``forcings(i)`` returns the forcings (B, T_in + 2, F, H, W) of interpolation time ``i``; ``generators``
        (one per sample) draw the interpolator's dropout masks; ``estimate_offset`` (B, C, H, W), when given, is
        added to every forecaster estimate ``x^_{t+h}``. Yields ``(j, s)`` for every whole step ``j = 1 .. h`` in
        order, ``s`` (B, C, H, W) the state at lead ``j``.
        """
        increasing = all(a < b for a, b in itertools.pairwise(schedule))
        if not schedule or schedule[0] != 0 or not increasing or schedule[-1] >= self.horizon:
            raise ValueError(f"the schedule must start at 0 and increase below the horizon {self.horizon}; found {schedule}")
        batch = states.shape[0]
        start = states[:, -1]
        s = start

        def full(i: float) -> Tensor:
            return torch.full((batch,), float(i), device=start.device)

        times = [*map(float, schedule), float(self.horizon)]
        for i_n, i_next in itertools.pairwise(times):
            estimate = self.forecast(s, states, full(i_n), forcings(i_n), static,  # x^_{t+h}
                                     generators=generators)
            if estimate_offset is not None:
                estimate = estimate + estimate_offset
            ahead = estimate if i_next == self.horizon else self.interpolate(
                states, estimate, full(i_next), forcings(i_next), static, generators=generators
            )
            here = start if i_n == 0 else self.interpolate(states, estimate, full(i_n), forcings(i_n), static, generators=generators)
            s = s - here + ahead
            if float(i_next).is_integer():
                yield int(i_next), s

    def direct_sample(
        self, states: Tensor, static: Tensor, forcings: Callable[[float], Tensor],
        generators: Sequence[torch.Generator] | None = None, estimate_offset: Tensor | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """Direct sampling from ``states`` over one horizon (see the module docstring): the forecaster once, at
        ``i = 0``, then the interpolator towards its estimate (plus ``estimate_offset`` when given). Arguments and
        yields as for :meth:`cold_sample`."""
        batch = states.shape[0]
        start = states[:, -1]

        def full(i: float) -> Tensor:
            return torch.full((batch,), float(i), device=start.device)

        estimate = self.forecast(start, states, full(0.0), forcings(0.0), static, generators=generators)
        if estimate_offset is not None:
            estimate = estimate + estimate_offset
        for j in range(1, self.horizon):
            yield j, self.interpolate(states, estimate, full(j), forcings(float(j)), static, generators=generators)
        yield self.horizon, estimate

    def sample_window(
        self, sampler: str, states: Tensor, static: Tensor, forcings: Callable[[float], Tensor],
        schedule: Sequence[float], generators: Sequence[torch.Generator] | None = None,
        estimate_offset: Tensor | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """One window by ``sampler`` (``cold``: :meth:`cold_sample` on ``schedule``; ``direct``:
        :meth:`direct_sample`, ``schedule`` unused)."""
        if _checked(sampler) == "direct":
            return self.direct_sample(states, static, forcings, generators, estimate_offset)
        return self.cold_sample(states, static, forcings, schedule, generators, estimate_offset)


class DYffusionObjective(WeightedObjective):
    """The two-stage DYffusion loss on batches of WindowDataset windows (see the module docstring).

    A batch holds ``inputs`` (B, T_in, C, H, W) and ``targets`` (B, K h, C, H, W) normalised (K =
    ``training_windows``), ``forcings`` (B, T_in + K h, F, H, W) and ``static`` (B, S, H, W). Steps whose
    network counter ``trained_steps`` is below ``interpolator_steps`` train the interpolator, later ones the
    forecaster (interpolator frozen, its states drawn without gradients). Errors are in tendency-std units,
    weighted by ``area_weights`` (H,) and ``channel_weights`` (C,) (both mean 1). A training call (module in
    training mode, gradients on) advances ``trained_steps`` by one.

    With ``training_windows`` K > 1 the batch holds ``K h`` targets and stage 2 trains on a chained window
    (see the module docstring).

    Metrics besides ``loss``: ``stage`` (1 interpolator, 2 forecaster); ``interpolation_rmse`` in stage 1;
    ``forecast_rmse`` and, with ``lookahead_weight > 0``, ``lookahead_rmse`` in stage 2; with K > 1 also
    ``sampled_windows`` (the windows the model sampled before the trained one) in stage 2. The sampled windows
    use ``sampler`` (``cold`` on the whole steps, or ``direct``), as forecasts do. With ``forecaster_times``
    ``start`` stage 2 trains the forecaster at ``i = 0`` only (no look-ahead).
    """

    def __init__(
        self, *, area_weights: np.ndarray, channel_weights: np.ndarray, interpolator_steps: int,
        lookahead_weight: float, training_windows: int = 1, sampler: str = "cold", forecaster_times: str = "all",
    ) -> None:
        if interpolator_steps < 1 or not 0.0 <= lookahead_weight < 1.0 or training_windows < 1:
            raise ValueError(
                "need interpolator_steps >= 1, 0 <= lookahead_weight < 1 and training_windows >= 1; found "
                f"{interpolator_steps}, {lookahead_weight}, {training_windows}"
            )
        if forecaster_times not in ("all", "start"):
            raise ValueError(f"forecaster_times must be 'all' or 'start'; found {forecaster_times!r}")
        if forecaster_times == "start" and lookahead_weight > 0:
            raise ValueError(f"forecaster_times 'start' has no look-ahead; found lookahead_weight {lookahead_weight}")
        super().__init__(area_weights=area_weights, channel_weights=channel_weights)
        self.interpolator_steps = int(interpolator_steps)
        self.lookahead_weight = float(lookahead_weight)
        self.training_windows = int(training_windows)
        self.sampler = _checked(sampler)
        self.forecaster_times = forecaster_times

    def stage(self, model: DYffusion) -> int:
        """The stage the network's next step trains: 1 (interpolator) or 2 (forecaster)."""
        return 1 if int(model.trained_steps) < self.interpolator_steps else 2

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], *, steps: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        if steps != 1:
            raise ValueError(f"DYffusion trains on windows of its horizon, without rollouts; asked for {steps} steps")
        assert isinstance(model, DYffusion)
        stage = self.stage(model)
        if model.training and torch.is_grad_enabled():
            model.trained_steps += 1
        inputs, targets = batch["inputs"].float(), batch["targets"].float()
        batch_size, steps_in = inputs.shape[:2]
        horizon, windows = model.horizon, self.training_windows
        if targets.shape[1] != horizon * windows:
            raise ValueError(
                f"{windows} window(s) of a horizon of {horizon} steps need {horizon * windows} targets; "
                f"found {targets.shape[1]}"
            )
        device = inputs.device
        all_forcings, static = batch["forcings"], batch["static"]
        rows = torch.arange(batch_size, device=device)

        def window_forcings(k: int) -> Callable[[Tensor], Tensor]:
            first = k * horizon  # window k: inputs at first .. first + T_in - 1, then t + i and t + h

            def forcings(i: Tensor) -> Tensor:  # the input times, t + i and t + h: (B, T_in + 2, F, H, W)
                return torch.cat([all_forcings[:, first:first + steps_in],
                                  all_forcings[rows, first + steps_in - 1 + i][:, None],
                                  all_forcings[:, first + steps_in - 1 + horizon][:, None]], dim=1)

            return forcings

        forcings = window_forcings(0)

        weights = self.point_weights(device)  # (C, H, 1)

        def error(prediction: Tensor, truth: Tensor) -> Tensor:  # weighted MSE in tendency-std units
            return (((prediction - truth) * model.residual_scale) ** 2 * weights).mean()

        metrics: dict[str, Tensor] = {"stage": torch.tensor(float(stage), device=device)}
        if stage == 1:
            i = torch.randint(1, horizon, (batch_size,), generator=generator, device=device)
            interpolated = model.interpolate(inputs, targets[:, -1], i.float(), forcings(i), static)
            loss = error(interpolated, targets[rows, i - 1])
            metrics["loss"] = loss
            metrics["interpolation_rmse"] = loss.detach().sqrt()
            return metrics

        model.interpolator.requires_grad_(False)
        if windows > 1:
            sampled = int(torch.randint(0, windows, (1,), generator=generator, device=device))
            metrics["sampled_windows"] = torch.tensor(float(sampled), device=device)
            if sampled:
                with torch.no_grad():
                    inputs = self._sampled_states(model, inputs, static, window_forcings, sampled, self.sampler)
            forcings = window_forcings(sampled)
            end = targets[:, (sampled + 1) * horizon - 1]
        else:
            end = targets[:, horizon - 1]
        if self.forecaster_times == "start":
            i = torch.zeros(batch_size, dtype=torch.long, device=device)
        else:
            i = torch.randint(0, horizon, (batch_size,), generator=generator, device=device)
        state = inputs[:, -1].clone()
        later = i > 0
        with torch.no_grad():
            if later.any():
                state[later] = model.interpolate(
                    inputs[later], end[later], i[later].float(), forcings(i)[later], static[later]
                )
        prediction = model.forecast(state, inputs, i.float(), forcings(i), static)
        loss = error(prediction, end)
        metrics["forecast_rmse"] = loss.detach().sqrt()
        ahead = i < horizon - 1
        if self.lookahead_weight > 0 and ahead.any():
            i2 = i[ahead] + 1
            forcing2 = forcings(i.clamp(max=horizon - 2) + 1)[ahead]
            state2 = model.interpolate(inputs[ahead], prediction[ahead], i2.float(), forcing2, static[ahead])
            prediction2 = model.forecast(state2, inputs[ahead], i2.float(), forcing2, static[ahead])
            lookahead = error(prediction2, end[ahead])
            metrics["lookahead_rmse"] = lookahead.detach().sqrt()
            loss = (1.0 - self.lookahead_weight) * loss + self.lookahead_weight * lookahead
        metrics["loss"] = loss
        return metrics

    @staticmethod
    def _sampled_states(model: DYffusion, states: Tensor, static: Tensor,
                        window_forcings: Callable[[int], Callable[[Tensor], Tensor]], windows: int,
                        sampler: str = "cold") -> Tensor:
        """The last ``T_in`` states (B, T_in, C, H, W) after sampling ``windows`` windows from ``states`` by
        ``sampler`` (cold sampling on the whole-step schedule, or direct; the networks' dropout as the module's
        mode has it)."""
        schedule = sampling_schedule(model.horizon, model.horizon)
        batch = states.shape[0]
        for k in range(windows):
            forcings = window_forcings(k)

            def at(i: float, forcings: Callable[[Tensor], Tensor] = forcings) -> Tensor:
                return forcings(torch.full((batch,), int(i), dtype=torch.long, device=states.device))

            path = [state for _, state in model.sample_window(sampler, states, static, at, schedule)]
            states = torch.cat([states, torch.stack(path, dim=1)], dim=1)[:, -states.shape[1]:]
        return states


class DYffusionForecaster(OneGridDiffusionForecaster):
    """The DYffusion forecaster on one grid (see the module docstring).

    Build it with :meth:`from_stores` (untrained) or :meth:`from_checkpoint` (which loads the step counter
    ``trained_steps`` too). Attributes as for :class:`~forecasting.diffusion.conditional.OneGridDiffusionForecaster`
    (``model_config``, ``channels``, ``static``, ``normalisation``, ``grid``, ``latitude``, ``longitude``), plus
    ``horizon`` and ``schedule`` (the interpolation times at which a sampling pass calls the forecaster: ``[0]``
    for the direct sampler); ``model`` is a :class:`DYffusion`.
    """

    family = "dyffusion"
    config_type = DYffusionModelConfig
    checkpoint_name = "DYffusion"

    model_config: DYffusionModelConfig
    model: DYffusion

    def _network(self) -> DYffusion:
        config = self.model_config
        self.horizon = config.horizon
        self.schedule = ([0.0] if config.sampler == "direct"
                         else sampling_schedule(self.horizon, config.sampling_steps or self.horizon))
        return DYffusion(
            **self._network_arguments(), horizon=self.horizon, step_hours=self.step.total_seconds() / 3600.0,
            interpolator_dropout=config.interpolator_dropout,
            forecaster_dropout_at_inference=config.forecaster_dropout_at_inference,
        )

    def _sample_leads(self, states, static, *, starts, steps, members, seed) -> Iterator[tuple[int, Tensor]]:
        horizon = self.horizon
        groups = self._member_batches(states.shape[0])
        origin = states[:, -1]
        for window in range(math.ceil(steps / horizon)):
            cache: dict[float, Tensor] = {}

            def window_forcings(i: float, window: int = window, cache: dict = cache) -> Tensor:
                # All samples: the input times, t + i and t + h of this window, (n_samples, T_in + 2, F, H, W).
                if i not in cache:
                    cache[i] = self._forcings(starts, members, ahead=(i, horizon), later=window * horizon)
                return cache[i]

            leads = [[] for _ in range(horizon)]  # per whole step: the groups' states
            # one dropout generator per sample: members do not depend on how the samples are batched
            generators = self._window_generators(starts, members, seed, window)
            offsets = self._estimate_offsets(states, starts, members, seed, window)
            for rows in groups:
                for j, state in self.model.sample_window(
                    self.model_config.sampler, states[rows], static.expand(rows.stop - rows.start, -1, -1, -1),
                    lambda i, rows=rows: window_forcings(i)[rows], self.schedule, generators[rows],
                    estimate_offset=None if offsets is None else offsets[rows],
                ):
                    leads[j - 1].append(state)
            # (n_samples, h, C, H, W); with a spectral filter, the change since the forecast's start damped over
            # the steps since the window's start (the start state's own change already damped before)
            path = torch.stack([self._damped(torch.cat(parts), origin, j + 1) for j, parts in enumerate(leads)], dim=1)
            states = torch.cat([states, path], dim=1)[:, -self.input_steps :]
            if self.model_config.window_perturbation > 0 and (window + 1) * horizon < steps:
                states = self._renew_perturbation(states, starts, members, seed, window + 1)
            for j in range(horizon):
                lead = window * horizon + j
                if lead >= steps:
                    break
                yield lead, path[:, j]

    def _window_generators(self, starts: pd.DatetimeIndex, members: int, seed: int, window: int, *,
                           salt: int = 0) -> list[torch.Generator]:
        """One generator per sample (start by start, its members in order) for one window, seeded by
        ``(seed, start, member, window)`` (:func:`_dropout_seed`); a nonzero ``salt`` (XORed into the seed)
        gives another stream for the same samples."""
        return [
            torch.Generator(device=self.device).manual_seed(_dropout_seed(seed, start, m, window) ^ salt)
            for start in starts for m in range(members)
        ]

    def _estimate_offsets(self, states: Tensor, starts: pd.DatetimeIndex, members: int, seed: int,
                          window: int) -> Tensor | None:
        """The window's fields of ``estimate_perturbation`` tendency stds (n_samples, C, H, W), one per sample
        from a generator seeded by ``(seed, start, member, window)`` and salted apart from the others; None
        when ``estimate_perturbation`` is 0."""
        amplitude = self.model_config.estimate_perturbation
        if amplitude == 0:
            return None
        generators = self._window_generators(starts, members, seed, window, salt=_ESTIMATE_PERTURBATION_SALT)
        return self._perturbed(torch.zeros_like(states[:, -1:]), generators, amplitude)[:, 0]

    def _renew_perturbation(self, states: Tensor, starts: pd.DatetimeIndex, members: int, seed: int,
                            window: int) -> Tensor:
        """``states`` (n_samples, T_in, C, H, W) plus a fresh smooth field per sample of ``window_perturbation``
        tendency stds (:func:`~forecasting.diffusion.perturbations.perturb_initial_states`), drawn from a
        generator seeded by ``(seed, start, member, window)`` and salted apart from the dropout masks."""
        generators = self._window_generators(starts, members, seed, window, salt=_WINDOW_PERTURBATION_SALT)
        return self._perturbed(states, generators, self.model_config.window_perturbation)


_WINDOW_PERTURBATION_SALT = 0x3C6E_F372_FE94_F82B
_ESTIMATE_PERTURBATION_SALT = 0x2545_F491_4F6C_DD1D


def _dropout_seed(seed: int, start: pd.Timestamp, member: int, window: int) -> int:
    """A 63-bit seed of the interpolator dropout of one sample (start time, member) in one window."""
    ns = int(pd.Timestamp(start).value)
    entropy = [seed, ns & 0xFFFFFFFF, (ns >> 32) & 0xFFFFFFFF, member, window]
    state = np.random.SeedSequence(entropy).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def dyffusion_training_setup(config: ExperimentConfig) -> TrainingSetup:
    """Forecaster, objective and windows of the DYffusion family for ``forecast train`` (both stages).

    Checks (before anything is written): no rollout schedule (``training.rollout`` of one stage of 1 step,
    ``val_rollout_steps`` unset or 1), no ``regional_loss_share`` (one grid), an interpolator stage that leaves
    optimiser steps for the forecaster, the store, variables, grid and periods. Windows of ``input_steps``
    states and ``horizon * training_windows`` targets come from
    :class:`~forecasting.data.torch_dataset.WindowDataset`.
    """
    training, data, model = config.training, config.data, config.model
    assert training is not None and data is not None and isinstance(model, DYffusionModelConfig)
    check_one_grid_training(
        training, family=DYffusionForecaster.family,
        trains="DYffusion trains windows of model.horizon steps without rollouts",
        validates="DYffusion validates whole windows",
    )
    interpolator_steps = model.interpolator_steps or training.max_steps // 2
    if not 1 <= interpolator_steps < training.max_steps:
        raise ConfigError(
            f"model.interpolator_steps ({interpolator_steps}) must be at least 1 and below training.max_steps "
            f"({training.max_steps}) so that the forecaster stage gets steps"
        )
    forecaster = DYffusionForecaster.from_stores(model, data)
    return one_grid_training_setup(
        config, forecaster, target_steps=model.horizon * model.training_windows,
        objective=partial(DYffusionObjective, interpolator_steps=interpolator_steps,
                          lookahead_weight=model.lookahead_weight, training_windows=model.training_windows,
                          sampler=model.sampler, forecaster_times=model.forecaster_times),
        summary={
            "parameters": {name: sum(p.numel() for p in getattr(forecaster.model, name).parameters())
                           for name in ("interpolator", "forecaster")},
            "horizon": model.horizon,
            "interpolator_steps": interpolator_steps,
            "sampler": model.sampler,
            "forecaster_times": model.forecaster_times,
            "sampling_schedule": forecaster.schedule,
            "network_evaluations_per_window": network_evaluations(
                model.horizon, model.sampling_steps or model.horizon, model.sampler),
        },
    )
