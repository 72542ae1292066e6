"""Verification: score forecasts against gridded truth and station observations.

``metrics`` holds the scores (small pure functions over named dims, WeatherBench2 style, built on the
``scores`` library where it has them) and the :data:`METRICS` registry; ``spectra`` the zonal power
spectra. Area weights come from :mod:`forecasting.weights`, shared with the training loss.
"""

from forecasting.verification.metrics import (
    METRICS,
    MetricSpec,
    acc,
    bias,
    brier_score,
    crps,
    energy_score,
    ensemble_mean_rmse,
    mae,
    mse,
    rank_histogram,
    rmse,
    spread,
    spread_skill_ratio,
)
from forecasting.verification.spectra import zonal_power_spectrum

__all__ = [
    "METRICS",
    "MetricSpec",
    "acc",
    "bias",
    "brier_score",
    "crps",
    "energy_score",
    "ensemble_mean_rmse",
    "mae",
    "mse",
    "rank_histogram",
    "rmse",
    "spread",
    "spread_skill_ratio",
    "zonal_power_spectrum",
]
