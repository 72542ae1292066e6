"""Verification metrics: small pure functions over named dims (WeatherBench2 ``metrics.py`` style).

Every metric takes ``forecast`` and ``truth`` (DataArray or Dataset, scored per variable) that already
broadcast against each other over named dims: the caller selects truth at the forecast's valid times.
Forecast dims follow shared/DESIGN.md: ``time`` (initialisation), ``prediction_timedelta``,
``realization`` (members), optional ``level``, ``latitude``/``longitude`` or ``station``. Truth has the
same dims without ``realization``. Inputs are never modified; with dask-backed inputs the result is lazy.

Which dims are reduced
    ``reduce_dims`` and ``preserve_dims`` work as in ``scores`` / WeatherBench2: give one of them, or
    neither to reduce every dim. The result has the preserved dims only (plus ``rank`` for
    :func:`rank_histogram`). The ensemble member dim (``member_dim``) is always consumed by ensemble
    scores and may not be named in either argument.

How the reduction is done (WeatherBench2 order of operations)
    1. the per-point score is averaged over the reduced *spatial* dims (``latitude``, ``longitude``,
       ``station``) with area weights, per time/lead/level/member;
    2. that spatial mean is averaged, unweighted, over the other reduced dims (``time``, ...);
    3. root-mean-square scores (:func:`rmse`, :func:`ensemble_mean_rmse`, :func:`spread`) take the
       square root last, after the mean over ``time``, so ``rmse = sqrt(mean_t(spatial-mean MSE_t))``
       and not the mean of per-time RMSEs (Rasp et al. 2024, WeatherBench 2).
    Every initialisation thus counts the same however many points it has.

Weights
    ``weights="area"`` (default) uses :func:`forecasting.weights.area_weights` on the truth: cell-area
    latitude weights for gridded data, uniform for station data. ``weights=None`` is uniform; a
    DataArray over spatial dims of the data (e.g. ``station``) is used as given (non-negative, no NaN).

Missing truth
    Where truth is NaN (missing station observations, masked cells) the forecast is masked too, and the
    spatial mean renormalises the weights over the points left; a time with no valid point is skipped
    in step 2. The same holds for every metric, including :func:`spread`, which does not otherwise look
    at the truth.

From ``scores`` (Leeuwenburg et al. 2024, JOSS): :func:`mse`, :func:`rmse` (from its MSE),
:func:`mae`, :func:`bias` (``additive_bias``), :func:`crps` and :func:`ensemble_mean_rmse`
(``crps_for_ensemble`` / ``mse``), :func:`brier_score` (``brier_score`` on the member fraction), and its
``processing.aggregate`` for every weighted spatial mean. Written here because ``scores`` lacks them in
this form: :func:`acc`, :func:`spread`, :func:`spread_skill_ratio`, :func:`rank_histogram` (random
tie-breaking, ranks 0..M, counts) and :func:`energy_score`.

:data:`METRICS` names every scalar score with how to read it, so a CLI or scorecard can iterate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

import dask.array
import numpy as np
import xarray as xr
from scores.continuous import additive_bias as _scores_additive_bias
from scores.continuous import mae as _scores_mae
from scores.continuous import mse as _scores_mse
from scores.probability import brier_score as _scores_brier_score
from scores.probability import crps_for_ensemble as _scores_crps_for_ensemble
from scores.processing import aggregate

from forecasting.data.observations import STATION
from forecasting.errors import SchemaError
from forecasting.schema import LAT, LON, MEMBER
from forecasting.weights import area_weights

XarrayLike = TypeVar("XarrayLike", xr.DataArray, xr.Dataset)
Dims = str | Iterable[str] | None
Weights = xr.DataArray | Literal["area"] | None

#: Dims averaged first, with area weights, before any other reduced dim (WeatherBench2 order).
SPATIAL_DIMS: tuple[str, ...] = (LAT, LON, STATION)
#: Name of the rank dim of :func:`rank_histogram`.
RANK = "rank"


# ----------------------------------------------------------------------------------------------
# Input checks and the reduction plan
# ----------------------------------------------------------------------------------------------
def _check_pair(
    forecast: xr.DataArray | xr.Dataset,
    truth: xr.DataArray | xr.Dataset,
    *,
    member_dim: str | None = None,
    names: tuple[str, str] = ("forecast", "truth"),
) -> None:
    """Check that ``forecast`` and ``truth`` are the same kind of object on the same coordinates."""
    first, second = names
    for obj, name in ((forecast, first), (truth, second)):
        if not isinstance(obj, (xr.DataArray, xr.Dataset)):
            raise SchemaError(f"{name} must be an xarray DataArray or Dataset; found {type(obj).__name__}")
    if type(forecast) is not type(truth):
        raise SchemaError(
            f"{first} and {second} must both be DataArrays or both Datasets; "
            f"found {type(forecast).__name__} and {type(truth).__name__}"
        )
    if isinstance(forecast, xr.Dataset):
        missing = sorted(set(forecast.data_vars) ^ set(truth.data_vars))
        if missing:
            raise SchemaError(
                f"{first} and {second} must hold the same variables; {missing} are in only one "
                f"({first}: {sorted(forecast.data_vars)}, {second}: {sorted(truth.data_vars)})"
            )
    if member_dim is not None:
        if member_dim not in forecast.dims:
            raise SchemaError(
                f"{first} has no ensemble member dim {member_dim!r}; dims found: {dict(forecast.sizes)}"
            )
        if member_dim in truth.dims:
            raise SchemaError(f"{second} must not have the member dim {member_dim!r}; dims found: {dict(truth.sizes)}")
    for dim in set(forecast.indexes) & set(truth.indexes):
        left, right = forecast.indexes[dim], truth.indexes[dim]
        if not left.equals(right):
            raise SchemaError(
                f"{first} and {second} disagree on the coordinate {dim!r}: {first} has {left.size} values "
                f"starting {list(left[:3])}, {second} has {right.size} starting {list(right[:3])}; "
                "select truth on the forecast's coordinates first"
            )


def _as_dims(dims: Dims) -> list[str]:
    if dims is None:
        return []
    if isinstance(dims, str):
        return [dims]
    return list(dims)


@dataclass(frozen=True)
class _Plan:
    """Which dims a metric reduces, in two stages, and the weights of the spatial stage."""

    spatial: tuple[Hashable, ...]
    rest: tuple[Hashable, ...]
    weights: xr.DataArray | None

    @property
    def reduce(self) -> tuple[Hashable, ...]:
        return self.spatial + self.rest

    def scores_kwargs(self) -> dict[str, object]:
        """Arguments that make a ``scores`` function do stage 1 (the spatial mean) only."""
        if not self.spatial:
            return {"preserve_dims": "all"}
        return {"reduce_dims": list(self.spatial), "weights": self.weights}

    def spatial_mean(self, values: XarrayLike) -> XarrayLike:
        """Stage 1: area-weighted mean over the reduced spatial dims, NaN skipped, weights renormalised."""
        if not self.spatial:
            return values
        return aggregate(values, reduce_dims=list(self.spatial), weights=self.weights)

    def finish(self, values: XarrayLike) -> XarrayLike:
        """Stage 2: unweighted mean over the other reduced dims (NaN skipped)."""
        if not self.rest:
            return values
        return values.mean(list(self.rest))


def _plan(
    forecast: xr.DataArray | xr.Dataset,
    truth: xr.DataArray | xr.Dataset,
    *,
    reduce_dims: Dims,
    preserve_dims: Dims,
    weights: Weights,
    consumed: Sequence[str] = (),
) -> _Plan:
    """Split the dims to reduce into spatial ones and the rest; resolve ``weights``.

    ``consumed`` are dims the score itself reduces (members, the energy score's vector dim): they may
    not be named in ``reduce_dims``/``preserve_dims``.
    """
    dims: list[Hashable] = []
    for dim in (*forecast.dims, *truth.dims):
        if dim not in dims and dim not in consumed:
            dims.append(dim)
    if reduce_dims is not None and preserve_dims is not None:
        raise ValueError(f"give reduce_dims or preserve_dims, not both; found {reduce_dims!r} and {preserve_dims!r}")
    named = _as_dims(preserve_dims if preserve_dims is not None else reduce_dims)
    taken = sorted(set(named) & set(consumed))
    if taken:
        raise ValueError(f"dims {taken} are consumed by this score and cannot be reduced or preserved by name")
    unknown = sorted(set(named) - set(dims), key=str)
    if unknown:
        raise ValueError(f"dims {unknown} are not dims of the data; dims found: {dims}")
    if preserve_dims is not None:
        reduce = [dim for dim in dims if dim not in named]
    elif reduce_dims is not None:
        reduce = [dim for dim in dims if dim in named]
    else:
        reduce = dims
    spatial = tuple(dim for dim in reduce if dim in SPATIAL_DIMS)
    rest = tuple(dim for dim in reduce if dim not in SPATIAL_DIMS)

    resolved: xr.DataArray | None
    if isinstance(weights, str):
        if weights != "area":
            raise ValueError(f"weights must be 'area', None or a DataArray; found {weights!r}")
        resolved = area_weights(truth if LAT in truth.dims else forecast)
    elif isinstance(weights, xr.DataArray):
        extra = sorted(set(weights.dims) - set(dims), key=str)
        if extra:
            raise SchemaError(f"weights have dims {extra} that the data lacks; data dims: {dims}")
        not_spatial = sorted(set(weights.dims) - set(SPATIAL_DIMS), key=str)
        if not_spatial:
            raise SchemaError(f"weights apply to the spatial mean over {SPATIAL_DIMS}; found dims {not_spatial}")
        resolved = weights
    elif weights is None:
        resolved = None
    else:
        raise ValueError(f"weights must be 'area', None or a DataArray; found {type(weights).__name__}")
    # Weights only matter where they vary along a reduced spatial dim; elsewhere they would only
    # rescale sums (rank-histogram counts) without changing any mean.
    if resolved is not None and not set(resolved.dims) & set(spatial):
        resolved = None
    return _Plan(spatial=spatial, rest=rest, weights=resolved)


def _mask_missing_truth(values: XarrayLike, truth: XarrayLike) -> XarrayLike:
    """Set ``values`` to NaN where the truth is missing."""
    return values.where(truth.notnull())


def _variables(obj: xr.DataArray | xr.Dataset) -> list[xr.DataArray]:
    return list(obj.data_vars.values()) if isinstance(obj, xr.Dataset) else [obj]


def _members(forecast: xr.DataArray | xr.Dataset, member_dim: str, *, minimum: int, score: str) -> int:
    n_members = forecast.sizes[member_dim]
    if n_members < minimum:
        raise SchemaError(
            f"{score} needs at least {minimum} ensemble members along {member_dim!r}; found {n_members}"
        )
    return n_members


# ----------------------------------------------------------------------------------------------
# Deterministic scores
# ----------------------------------------------------------------------------------------------
def mse(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Mean squared error ``mean((forecast - truth)**2)``, spatial mean first (``scores.continuous.mse``).

    Args:
        forecast: any dims; a ``realization`` dim is treated like any other dim (reduced by default).
        truth: broadcasts against ``forecast``; NaN marks missing truth.
        reduce_dims, preserve_dims, weights: see the module docstring.

    Returns:
        The preserved dims of ``forecast`` and ``truth``; units are the variable's units squared.
    """
    _check_pair(forecast, truth)
    plan = _plan(forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights)
    return plan.finish(_scores_mse(forecast, truth, **plan.scores_kwargs()))


def rmse(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Root mean squared error in WeatherBench2's definition.

    ``rmse = sqrt( mean_over_time( area-weighted spatial mean of (forecast - truth)**2 ) )``: the square
    root comes after the mean over ``time`` (and every other reduced non-spatial dim), so this is not the
    mean of per-initialisation RMSEs (which is smaller, by Jensen's inequality, when errors vary in
    time). Preserve ``time`` to get per-initialisation RMSEs.

    Returns:
        The preserved dims; units of the variable.
    """
    return np.sqrt(mse(forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights))


def mae(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Mean absolute error ``mean(|forecast - truth|)`` (``scores.continuous.mae``); units of the variable."""
    _check_pair(forecast, truth)
    plan = _plan(forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights)
    return plan.finish(_scores_mae(forecast, truth, **plan.scores_kwargs()))


def bias(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Additive bias ``mean(forecast - truth)`` (``scores.continuous.additive_bias``); positive = too high."""
    _check_pair(forecast, truth)
    plan = _plan(forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights)
    return plan.finish(_scores_additive_bias(forecast, truth, **plan.scores_kwargs()))


def acc(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    climatology: XarrayLike,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Anomaly correlation coefficient, area-weighted, per time then averaged (WeatherBench2 ``ACC``).

    With anomalies ``fa = forecast - climatology`` and ``oa = truth - climatology`` (no further removal
    of their spatial means, as in WeatherBench2), per time/lead/level/member::

        ACC = sum(w fa oa) / sqrt(sum(w fa**2) * sum(w oa**2))      (sums over the reduced spatial dims)

    then the unweighted mean over the other reduced dims. Points where any of forecast, truth or
    climatology is NaN are left out of all three sums. A time whose anomalies are all zero gives NaN.

    Args:
        climatology: broadcasts against ``truth`` on the same coordinates, already selected at the
            forecast's valid times (e.g. by day of year and hour); no member dim.

    Returns:
        The preserved dims; dimensionless, 1 for a perfect forecast.
    """
    _check_pair(forecast, truth)
    _check_pair(climatology, truth, names=("climatology", "truth"))
    plan = _plan(forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights)
    forecast_anomaly = forecast - climatology
    truth_anomaly = truth - climatology
    valid = forecast_anomaly.notnull() & truth_anomaly.notnull()
    forecast_anomaly = forecast_anomaly.where(valid)
    truth_anomaly = truth_anomaly.where(valid)
    # Means instead of sums: the same normalisation cancels, and an all-missing time gives NaN, not 0/0.
    covariance = plan.spatial_mean(forecast_anomaly * truth_anomaly)
    norm = np.sqrt(plan.spatial_mean(forecast_anomaly**2) * plan.spatial_mean(truth_anomaly**2))
    return plan.finish(covariance / norm.where(norm > 0))


# ----------------------------------------------------------------------------------------------
# Ensemble scores
# ----------------------------------------------------------------------------------------------
def crps(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    fair: bool,
    member_dim: str = MEMBER,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Continuous ranked probability score of an ensemble (``scores.probability.crps_for_ensemble``).

    ``CRPS = mean_i |x_i - y| - sum_ij |x_i - x_j| / (2 K)`` with ``K = M**2`` (``fair=False``: the CRPS
    of the ensemble's empirical CDF) or ``K = M (M - 1)`` (``fair=True``: unbiased for the CRPS of the
    distribution the M members are drawn from; Ferro 2014). With one member the standard CRPS is the MAE.

    Args:
        forecast: has ``member_dim`` (at least 2 members when ``fair``).
        truth: no ``member_dim``.

    Returns:
        The preserved dims; units of the variable; 0 is perfect.
    """
    _check_pair(forecast, truth, member_dim=member_dim)
    _members(forecast, member_dim, minimum=2 if fair else 1, score="fair CRPS" if fair else "CRPS")
    plan = _plan(
        forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights, consumed=(member_dim,)
    )
    method = "fair" if fair else "ecdf"
    if any(variable.chunks is not None for variable in _variables(forecast)):
        forecast = forecast.chunk({member_dim: -1})  # scores sorts the members of each case in one block
    return plan.finish(_scores_crps_for_ensemble(forecast, truth, member_dim, method=method, **plan.scores_kwargs()))


def ensemble_mean_rmse(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    member_dim: str = MEMBER,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """RMSE (:func:`rmse`, WeatherBench2 order) of the ensemble mean over ``member_dim`` (NaN members skipped)."""
    _check_pair(forecast, truth, member_dim=member_dim)
    return rmse(
        forecast.mean(member_dim), truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights
    )


def spread(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    member_dim: str = MEMBER,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Ensemble spread ``sqrt(mean(var_members(forecast, ddof=1)))``, mean in WeatherBench2 order.

    The unbiased (ddof=1) member variance is averaged like an MSE (area-weighted spatial mean, then
    the other reduced dims) and the square root is taken last, so ``spread`` and
    :func:`ensemble_mean_rmse` are directly comparable. ``truth`` only masks: points where it is NaN
    are left out, as in every other metric.

    Returns:
        The preserved dims; units of the variable.
    """
    _check_pair(forecast, truth, member_dim=member_dim)
    _members(forecast, member_dim, minimum=2, score="spread")
    plan = _plan(
        forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights, consumed=(member_dim,)
    )
    variance = _mask_missing_truth(forecast.var(member_dim, ddof=1), truth)
    return np.sqrt(plan.finish(plan.spatial_mean(variance)))


def spread_skill_ratio(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    corrected: bool = True,
    member_dim: str = MEMBER,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Spread-skill ratio ``sqrt((M + 1) / M) * spread / ensemble_mean_rmse`` (Fortin et al. 2014).

    For an M-member ensemble whose members and truth are exchangeable draws from one distribution,
    the expected ensemble-mean MSE is ``(1 + 1/M)`` times the expected unbiased member variance, so
    ``spread / ensemble_mean_rmse -> sqrt(M / (M + 1))``. The factor ``sqrt((M + 1) / M)`` (Fortin,
    Abaza, Anctil and Turcotte 2014, "Why should ensemble spread match the RMSE of the ensemble mean?",
    J. Hydrometeorol. 15, 1708-1713) corrects for the finite ensemble so that a statistically consistent
    ensemble scores 1; ``corrected=False`` gives the plain ratio. Below 1: under-dispersed.

    Returns:
        The preserved dims; dimensionless. NaN where the ensemble-mean RMSE is 0.
    """
    _check_pair(forecast, truth, member_dim=member_dim)
    n_members = _members(forecast, member_dim, minimum=2, score="spread-skill ratio")
    kwargs = {"member_dim": member_dim, "reduce_dims": reduce_dims, "preserve_dims": preserve_dims, "weights": weights}
    skill = ensemble_mean_rmse(forecast, truth, **kwargs)
    ratio = spread(forecast, truth, **kwargs) / skill.where(skill > 0)
    return ratio * math.sqrt((n_members + 1) / n_members) if corrected else ratio


def rank_histogram(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    member_dim: str = MEMBER,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
    normalize: bool = True,
    seed: int = 0,
) -> XarrayLike:
    """Rank (Talagrand) histogram: where the truth falls among the sorted members (Hamill 2001).

    The rank of a truth value ``y`` among M members is ``#{x_i < y}`` plus, when members tie with ``y``,
    a uniform random integer in ``0..#{x_i == y}`` drawn from ``seed`` (reproducible for a given seed and
    dask chunking), so a calibrated ensemble gives a flat histogram even for discrete variables (rain).
    Cases with a missing truth or any missing member are not counted. Unlike the metrics above this
    pools all reduced dims at once (a histogram, not a mean of per-time histograms).

    Args:
        forecast: has ``member_dim`` (M members).
        normalize: True: relative frequencies summing to 1 over ``rank``; False: counts, weighted by
            the area weights (mean 1, so they add up to the number of counted cases; plain integer
            counts with ``weights=None`` or for station data).
        seed: seed of the tie-breaking generator.

    Returns:
        The preserved dims plus ``rank`` (last), coordinate 0..M: rank 0 means the truth is below every
        member, rank M above every member. For a Dataset, one histogram per variable.
    """
    _check_pair(forecast, truth, member_dim=member_dim)
    n_members = _members(forecast, member_dim, minimum=1, score="rank histogram")
    plan = _plan(
        forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights, consumed=(member_dim,)
    )
    if isinstance(forecast, xr.Dataset):
        return xr.Dataset(
            {
                name: _rank_histogram(forecast[name], truth[name], plan, member_dim, n_members, normalize, seed)
                for name in forecast.data_vars
            }
        )
    return _rank_histogram(forecast, truth, plan, member_dim, n_members, normalize, seed)


def _rank_histogram(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    plan: _Plan,
    member_dim: str,
    n_members: int,
    normalize: bool,
    seed: int,
) -> xr.DataArray:
    valid = truth.notnull() & forecast.notnull().all(member_dim)
    below = (forecast < truth).sum(member_dim)  # shape of the broadcast (forecast without members, truth)
    ties = (forecast == truth).sum(member_dim)
    if below.chunks is None:
        uniform = np.random.default_rng(seed).random(below.shape)
    else:
        uniform = dask.array.random.default_rng(seed).random(below.shape, chunks=below.chunks)
    uniform = xr.DataArray(uniform, dims=below.dims)
    rank = below + np.floor(uniform * (ties + 1))
    ranks = xr.DataArray(np.arange(n_members + 1), dims=RANK, coords={RANK: np.arange(n_members + 1)})
    hits = ((rank == ranks) & valid).astype(np.float64)
    reduce = [dim for dim in plan.reduce if dim in hits.dims]
    if plan.weights is not None:
        hits = hits * plan.weights
    counts = hits.sum(reduce)
    counts = counts.transpose(..., RANK)
    if not normalize:
        return counts
    total = counts.sum(RANK)
    return counts / total.where(total > 0)


def brier_score(
    forecast: XarrayLike,
    truth: XarrayLike,
    *,
    threshold: float | xr.DataArray | xr.Dataset,
    member_dim: str = MEMBER,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> XarrayLike:
    """Brier score of the event ``value > threshold`` (``scores.probability.brier_score``).

    The forecast probability is the fraction of (non-missing) members above ``threshold``; the outcome
    is 1 where the truth is above it, 0 where not, missing where the truth is NaN. This is the plain
    (not the fair) Brier score of that probability: ``mean((p - o)**2)``.

    Args:
        threshold: a number, or a DataArray/Dataset that broadcasts against ``truth`` (e.g. a
            climatological quantile per grid point, or one threshold per variable).

    Returns:
        The preserved dims; dimensionless, 0 is perfect.
    """
    _check_pair(forecast, truth, member_dim=member_dim)
    plan = _plan(
        forecast, truth, reduce_dims=reduce_dims, preserve_dims=preserve_dims, weights=weights, consumed=(member_dim,)
    )
    probability = (forecast > threshold).where(forecast.notnull()).mean(member_dim)
    outcome = (truth > threshold).where(truth.notnull())
    # check_args=False: both are in range by construction, and checking would compute dask inputs.
    return plan.finish(_scores_brier_score(probability, outcome, check_args=False, **plan.scores_kwargs()))


def energy_score(
    forecast: xr.DataArray | xr.Dataset,
    truth: xr.DataArray | xr.Dataset,
    *,
    variables: Sequence[str] | None = None,
    variables_dim: str = "variable",
    fair: bool = False,
    member_dim: str = MEMBER,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weights: Weights = "area",
) -> xr.DataArray:
    """Energy score of a multivariate ensemble (Gneiting and Raftery 2007, JASA 102, 359-378).

    ``ES = mean_i ||x_i - y|| - sum_ij ||x_i - x_j|| / (2 K)``, ``||.||`` the Euclidean norm over the
    variables, ``K = M**2`` (``fair=False``, the ensemble's empirical distribution) or ``K = M (M - 1)``
    (``fair=True``). For one variable it is the CRPS (:func:`crps` with the same ``fair``). The norm adds
    variables as they are, so **the caller must normalise them first** (e.g. divide each by its
    climatological standard deviation); otherwise the variable with the largest numbers dominates.

    Args:
        forecast, truth: a Dataset, whose ``variables`` (default: all, which must share dims) are stacked
            along ``variables_dim``; or a DataArray that already has ``variables_dim``.
        variables: Dataset variables to combine; only for Dataset input.
        variables_dim: the vector dim, consumed by the norm.

    Returns:
        A DataArray over the preserved dims; in the (normalised) units of the inputs; 0 is perfect.
        Points where any variable of the truth is NaN are skipped.
    """
    _check_pair(forecast, truth, member_dim=member_dim)
    if isinstance(forecast, xr.Dataset):
        names = list(variables) if variables is not None else list(forecast.data_vars)
        absent = [name for name in names if name not in forecast.data_vars]
        if absent:
            raise SchemaError(f"energy_score: variables {absent} not in the data; found {sorted(forecast.data_vars)}")
        forecast = forecast[names].to_dataarray(dim=variables_dim)
        truth = truth[names].to_dataarray(dim=variables_dim)
    elif variables is not None:
        raise ValueError("energy_score: `variables` selects Dataset variables; a DataArray needs `variables_dim`")
    for obj, name in ((forecast, "forecast"), (truth, "truth")):
        if variables_dim not in obj.dims:
            raise SchemaError(
                f"energy_score: {name} has no vector dim {variables_dim!r}; dims found: {dict(obj.sizes)}"
            )
    score_name = "fair energy score" if fair else "energy score"
    n_members = _members(forecast, member_dim, minimum=2 if fair else 1, score=score_name)
    plan = _plan(
        forecast,
        truth,
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weights=weights,
        consumed=(member_dim, variables_dim),
    )

    def norm(difference: xr.DataArray) -> xr.DataArray:
        return np.sqrt((difference**2).sum(variables_dim, skipna=False))

    truth_term = norm(forecast - truth).mean(member_dim)
    # sum over pairs i < j of ||x_i - x_j||, one member at a time to keep memory at O(M N), not O(M^2 N)
    pair_sum = xr.zeros_like(truth_term)
    for i in range(n_members - 1):
        later = forecast.isel({member_dim: slice(i + 1, None)})
        pair_sum = pair_sum + norm(later - forecast.isel({member_dim: i}, drop=True)).sum(member_dim)
    denominator = n_members * (n_members - 1) if fair else n_members**2
    score = truth_term - pair_sum / denominator  # sum_ij = 2 sum_{i<j}, divided by 2 K
    return plan.finish(plan.spatial_mean(score))


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
MetricKind = Literal["deterministic", "ensemble", "probability"]
MetricUnits = Literal["same as variable", "square of variable", "1"]


@dataclass(frozen=True)
class MetricSpec:
    """How to call and read one scalar score.

    function: called as ``function(forecast, truth, *, reduce_dims=..., preserve_dims=..., weights=...)``
        plus ``member_dim=`` for kind "ensemble"/"probability", ``climatology=`` when
        ``needs_climatology`` and ``threshold=`` for kind "probability".
    kind: "deterministic" scores any forecast (members are reduced like any dim); "ensemble" needs the
        member dim; "probability" scores the member fraction above a threshold.
    higher_is_better: True/False, or None where the best value is ``perfect_score`` and both
        directions are worse (bias, spread-skill ratio) or where there is no best value (spread).
    perfect_score: the value of a perfect forecast, None where there is none.
    units: "same as variable", "square of variable" or "1" (dimensionless).
    per_variable: False for scores that combine the variables of a Dataset into one number.
    """

    name: str
    function: Callable[..., xr.DataArray | xr.Dataset]
    kind: MetricKind
    higher_is_better: bool | None
    needs_climatology: bool
    units: MetricUnits
    perfect_score: float | None
    per_variable: bool = True


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("mse", mse, "deterministic", False, False, "square of variable", 0.0),
        MetricSpec("rmse", rmse, "deterministic", False, False, "same as variable", 0.0),
        MetricSpec("mae", mae, "deterministic", False, False, "same as variable", 0.0),
        MetricSpec("bias", bias, "deterministic", None, False, "same as variable", 0.0),
        MetricSpec("acc", acc, "deterministic", True, True, "1", 1.0),
        MetricSpec("crps", partial(crps, fair=False), "ensemble", False, False, "same as variable", 0.0),
        MetricSpec("fair_crps", partial(crps, fair=True), "ensemble", False, False, "same as variable", 0.0),
        MetricSpec("ensemble_mean_rmse", ensemble_mean_rmse, "ensemble", False, False, "same as variable", 0.0),
        MetricSpec("spread", spread, "ensemble", None, False, "same as variable", None),
        MetricSpec("spread_skill_ratio", spread_skill_ratio, "ensemble", None, False, "1", 1.0),
        MetricSpec("brier_score", brier_score, "probability", False, False, "1", 0.0),
        MetricSpec("energy_score", energy_score, "ensemble", False, False, "1", 0.0, per_variable=False),
    )
}
