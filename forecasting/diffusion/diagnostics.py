"""How much of the noise a trained denoiser takes out, noise level by noise level, at the smallest scales.

A sampler integrates ``dx/dsigma = (x - D(x; sigma)) / sigma`` down to ``sigma = 0``. Where the trained
denoiser ``D`` stops telling the noise from the signal (``D(x; sigma) = x``), the integration keeps whatever
noise is left, and the forecast state it emits carries it. For weather the smallest scales show it first: a
six-hour change has little power there, so noise a hundredth of its size is already many times its power at
the last wavenumbers. Each step of a rollout then adds some, and the forecast's spectrum climbs at the small
scales with the lead time.

:func:`denoising_check` measures it on validation windows. For a clean target ``y`` (the family's own
training target, in tendency-std units), unit Gaussian noise ``n`` and ``D = D(y + sigma n; sigma)``, per
channel and noise level:

* ``noise_left = P_hi(D - y) / P_hi(sigma n)``: the share of the noise power at the smallest scales that the
  denoiser leaves (1: nothing removed; 0: all of it);
* ``small_scale_error = P_hi(D - y) / P_hi(y)``: the error of the denoised estimate at those scales against
  the target's own power there (above 1: the estimate has more small-scale structure than the truth);
* ``large_scale_error = P_lo(D - y) / P_lo(y)``: the same at the largest scales.

``P_hi`` sums the zonal power spectrum (an FFT along each latitude row, averaged over rows and windows) over
the top quarter of the zonal wavenumbers, ``P_lo`` over wavenumbers 1 to a quarter of the largest (on a
regional grid the rows are not periodic, so the spectrum there is only indicative).

The noise levels are those the family's sampler visits:

* ``diffusion`` (conditional): the EDM schedule of the model's sampling settings (``sampling_steps``,
  ``sigma_min``, ``sigma_max``, ``rho``; :func:`~forecasting.diffusion.samplers.karras_sigmas`), one row per
  level (stochastic churn raises some of them a little before the network sees them; the rows do not);
* ``rolling``: each frame's level at each step ``t_i = 1 - i / S`` of a rolling pass
  (:class:`~forecasting.diffusion.rolling.RollingSchedule`), one row per frame and step. Frame 0 is the one
  emitted at the end of the pass: its rows say what noise the forecast keeps.

DYffusion has no noise-level denoiser (its stochasticity is the interpolator's dropout) and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import Tensor

from forecasting.config import ConfigError
from forecasting.diffusion.conditional import DiffusionForecaster, OneGridDiffusionForecaster
from forecasting.diffusion.rolling import RollingDiffusionForecaster
from forecasting.diffusion.samplers import karras_sigmas
from forecasting.errors import SchemaError
from forecasting.schema import TIME

__all__ = ["CHECK_COLUMNS", "check_checkpoint", "denoising_check", "zonal_power"]

#: Columns of :func:`denoising_check`'s table.
CHECK_COLUMNS = ("frame", "step", "sigma", "channel", "noise_left", "small_scale_error", "large_scale_error")


def zonal_power(x: Tensor) -> Tensor:
    """Zonal power spectrum of fields ``(..., H, W)``: ``|FFT_lon|^2`` averaged over every dim but the last
    two and over latitude rows; shape ``(W // 2 + 1,)``, float64."""
    power = torch.fft.rfft(x.double(), dim=-1).abs() ** 2
    return power.reshape(-1, power.shape[-1]).mean(dim=0)


def _band_ratios(error: Tensor, noise: Tensor, target: Tensor) -> tuple[float, float, float]:
    """(noise_left, small_scale_error, large_scale_error) of fields (N, H, W) (see the module docstring)."""
    p_err, p_noise, p_target = zonal_power(error), zonal_power(noise), zonal_power(target)
    k_max = p_err.shape[0] - 1
    if k_max < 4:
        raise SchemaError(f"a zonal spectrum needs at least 8 longitudes; the grid has {2 * k_max}")
    high = slice(k_max - k_max // 4 + 1, k_max + 1)
    low = slice(1, k_max // 4 + 1)

    def ratio(a: Tensor, b: Tensor) -> float:
        denominator = float(b.sum())
        return float(a.sum()) / denominator if denominator > 0 else float("nan")

    return ratio(p_err[high], p_noise[high]), ratio(p_err[high], p_target[high]), ratio(p_err[low], p_target[low])


def _windows(
    forecaster: OneGridDiffusionForecaster,
    store: str | Path | xr.Dataset,
    *,
    target_steps: int,
    period: tuple[str | None, str | None] | None,
    samples: int,
) -> dict[str, Tensor]:
    """``samples`` windows evenly spread over ``period`` of ``store``, normalised with the forecaster's own
    statistics: ``inputs`` (N, T_in, C, H, W), ``targets`` (N, T_out, C, H, W), ``forcings``, ``static``."""
    from forecasting.data.store import open_store
    from forecasting.data.torch_dataset import WindowDataset, normalised

    source = store if isinstance(store, xr.Dataset) else str(store)
    name = "<dataset>" if isinstance(store, xr.Dataset) else str(store)
    try:
        windows = WindowDataset(
            source, variables=list(forecaster.channels.variables), input_steps=forecaster.input_steps,
            target_steps=target_steps, step=forecaster.step, time=period,
            static_variables=list(forecaster.static.variables), normalise=False,
        )
    except SchemaError as exc:
        raise SchemaError(f"{name}: {exc}") from None
    if tuple(windows.channels) != tuple(forecaster.channels.names):
        raise SchemaError(f"{name}: channels {list(windows.channels)} differ from the model's "
                          f"{list(forecaster.channels.names)}")
    if len(windows) == 0:
        raise SchemaError(f"{name}: no window of {forecaster.input_steps} + {target_steps} steps in period {period}")
    index = np.unique(np.linspace(0, len(windows) - 1, samples).round().astype(int))
    # The windows fill missing values with the training mean, as in training; here they would pass for signal.
    times = np.unique(np.concatenate([windows.window_times(int(i)) for i in index]))
    data = store if isinstance(store, xr.Dataset) else open_store(store)
    for variable in forecaster.channels.variables:
        missing = data[variable].sel({TIME: times}).isnull()
        if bool(missing.any()):
            first = times[np.flatnonzero(missing.any(dim=[d for d in missing.dims if d != TIME]).values)[0]]
            raise SchemaError(f"{name}: {variable} has missing values in the windows checked (e.g. at {first}); "
                              "the check needs complete windows: choose another period")
    items = [windows[int(i)] for i in index]
    batch = {k: np.stack([np.asarray(item[k]) for item in items]) for k in ("inputs", "targets", "forcings", "static")}
    height, width = batch["inputs"].shape[-2:]
    if (height, width) != (len(forecaster.latitude), len(forecaster.longitude)):
        raise SchemaError(f"{name}: grid {height} x {width} is not the model's "
                          f"{len(forecaster.latitude)} x {len(forecaster.longitude)}")
    norm = forecaster.normalisation  # the model's own statistics, whatever the store's
    per_channel = (-1, 1, 1)
    for key in ("inputs", "targets"):
        batch[key] = normalised(batch[key], norm.mean.reshape(per_channel), norm.std.reshape(per_channel))
    batch["static"] = normalised(batch["static"], norm.static_mean.reshape(per_channel),
                                 norm.static_std.reshape(per_channel))
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in batch.items()}


def denoising_check(
    forecaster: OneGridDiffusionForecaster,
    store: str | Path | xr.Dataset,
    *,
    period: tuple[str | None, str | None] | None = None,
    samples: int = 16,
    seed: int = 0,
) -> pd.DataFrame:
    """How much noise ``forecaster``'s denoiser leaves at each noise level its sampler visits (module docstring).

    Args:
        forecaster: A trained ``diffusion`` or ``rolling`` forecaster.
        store: Its grid's store (path or Dataset), e.g. the one it was trained on.
        period: ``(start, end)`` inclusive time labels of the windows (None: the whole store).
        samples: Windows, evenly spread over the period.
        seed: Seed of the noise.

    Returns a DataFrame with the columns :data:`CHECK_COLUMNS`: ``frame`` (0 for the conditional family),
    ``step`` (index of the level in the sampler's schedule or pass), ``sigma``, ``channel`` and the three ratios.

    Raises ConfigError for a family without a noise-level denoiser or ``samples < 1``; SchemaError when the
    store lacks the model's variables, grid or windows in ``period``.
    """
    if samples < 1:
        raise ConfigError(f"samples must be >= 1; found {samples}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    channels = forecaster.channels.names
    with torch.no_grad():
        if isinstance(forecaster, DiffusionForecaster):
            model = forecaster.model
            batch = _windows(forecaster, store, target_steps=1, period=period, samples=samples)
            y = model.residual(batch["inputs"], batch["targets"][:, 0])  # (N, C, H, W)
            condition = model.conditioning(batch["inputs"], batch["forcings"], batch["static"])
            edm = forecaster.edm
            levels = karras_sigmas(forecaster.model_config.sampling_steps, sigma_min=edm.sigma_min,
                                   sigma_max=edm.sigma_max, rho=edm.rho)[:-1]
            for step, sigma in enumerate(levels.tolist()):
                noise = sigma * torch.randn(y.shape, generator=generator)
                error = model.denoiser(y + noise, torch.full((y.shape[0],), sigma), condition) - y
                for c, name in enumerate(channels):
                    rows.append((0, step, sigma, name, *_band_ratios(error[:, c], noise[:, c], y[:, c])))
        elif isinstance(forecaster, RollingDiffusionForecaster):
            model = forecaster.model
            window = model.window
            batch = _windows(forecaster, store, target_steps=window, period=period, samples=samples)
            y = model.frames(batch["inputs"], batch["targets"])  # (N, W, C, H, W)
            condition = model.conditioning(batch["inputs"], batch["forcings"], batch["static"])
            passes = forecaster.model_config.sampling_steps
            for step in range(passes):
                t = torch.full((y.shape[0],), 1.0 - step / passes, dtype=torch.float64)
                sigma = forecaster.schedule.sigmas(t, init=False).float()  # (N, W)
                noise = sigma[..., None, None, None] * torch.randn(y.shape, generator=generator)
                error = model.denoise(y + noise, sigma, condition) - y
                for k in range(window):
                    for c, name in enumerate(channels):
                        rows.append((k, step, float(sigma[0, k]), name,
                                     *_band_ratios(error[:, k, c], noise[:, k, c], y[:, k, c])))
        else:
            raise ConfigError(
                f"a {forecaster.family!r} model has no noise-level denoiser to check; the check serves the "
                "'diffusion' and 'rolling' families"
            )
    return pd.DataFrame(rows, columns=list(CHECK_COLUMNS))


def check_checkpoint(
    checkpoint: str | Path,
    *,
    store: str | Path | None = None,
    period: tuple[str | None, str | None] | None = None,
    samples: int = 16,
    seed: int = 0,
    sampling: Mapping[str, object] | None = None,
) -> pd.DataFrame:
    """:func:`denoising_check` of the model in ``checkpoint`` (a ``model.pt`` of ``forecast train``).

    ``store`` defaults to the store of the model's grid in its config, ``period`` to the config's validation
    period (the whole store when it has none); ``sampling`` replaces sampler settings as ``forecast predict
    --sampling`` does (:func:`~forecasting.inference.with_sampling`), e.g. another ``sigma_min``.

    Raises SourceError for an unreadable checkpoint, ConfigError for a family without a noise-level denoiser
    or a bad sampling setting, SchemaError as :func:`denoising_check`.
    """
    from forecasting.diffusion.conditional import _store_path
    from forecasting.inference import sampled_forecaster
    from forecasting.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if ckpt.family not in ("diffusion", "rolling"):
        raise ConfigError(
            f"{checkpoint} holds a {ckpt.family!r} model, which has no noise-level denoiser to check; the check "
            "serves the 'diffusion' and 'rolling' families"
        )
    forecaster, config, _ = sampled_forecaster(ckpt, sampling)
    assert isinstance(forecaster, OneGridDiffusionForecaster) and config.data is not None
    if store is None:
        store = _store_path(forecaster.model_config, config.data)
    if period is None and config.training is not None:
        period = config.training.val_period
    return denoising_check(forecaster, store, period=period, samples=samples, seed=seed)
