"""Scorecards: skill of a model against a reference, with paired bootstrap intervals over start times.

The skill of a score ``s`` with perfect value ``p`` is ``1 - |s_model - p| / |s_reference - p|``: for an
error (p = 0) the familiar ``1 - model / reference``, for a score whose best is 1 (ACC) the share of the
reference's shortfall the model recovers, for a bias (p = 0, both signs bad) the relative reduction of
its magnitude. Positive = the model is better, 1 = perfect.

Uncertainty comes from a paired bootstrap over start times (Efron and Tibshirani 1993; as in the
WeatherBench2 and ECMWF scorecards): the start times are resampled with replacement, the same draws for
model and reference, the aggregate score of each is recomputed from the per-start scores, and the skill
of every resample forms the distribution whose central ``confidence`` interval is reported. A difference
is significant when that interval excludes 0; the two-sided p-value is twice the smaller tail share of
the resampled skills on either side of 0 (capped at 1).

Forecasts started a day apart make errors that are alike, so their score differences are autocorrelated and
an ordinary bootstrap, which treats every start as independent, gives intervals that are too narrow. The
resampling is therefore a circular block bootstrap (Politis and Romano 1992): each resample strings together
blocks of ``L`` consecutive start times (in time order, wrapping round at the end). ``L = 1`` is the ordinary
bootstrap. By default ``L`` is chosen per metric from the data with the rule of Wilks (1997, "Resampling
hypothesis tests for autocorrelated fields"; Wilks 2011, section 5.3.5), ``L = (n - L + 1)^((2/3)(1 - n'/n))``
with the effective sample size ``n' = n (1 - rho) / (1 + rho)``, where ``rho`` is the median lag-1
autocorrelation of the model-minus-reference per-start scores over the metric's series (variables, leads,
regions). Uncorrelated differences give ``L = 1``.

Per-start scores (the input) hold each start time's score, spatially averaged: what
:func:`forecasting.verification.stations.per_start_scores` returns, or a metric of
:mod:`forecasting.verification.metrics` with ``time`` among ``preserve_dims``. Their aggregate over start
times follows WeatherBench2: a mean for mean-type scores, the root of the mean of squares for RMSE-type
scores (``sqrt(mean_t RMSE_t^2) = sqrt(mean_t MSE_t)``), so the full-sample aggregate equals the score
computed in one go. Resampling is vectorised: each resample is a row of draw counts and every aggregate
is one matrix product, so 1000 resamples of hundreds of series take milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

from forecasting.errors import SchemaError
from forecasting.schema import LEAD, TIME
from forecasting.verification.metrics import METRICS

Statistic = Literal["rmse", "mean"]
#: A block length for the bootstrap: a number of consecutive start times, or ``"auto"`` (Wilks' rule).
BlockLength = int | Literal["auto"]

#: How each metric's per-start scores aggregate over start times; orientation and perfect value are
#: those of :data:`forecasting.verification.metrics.METRICS`. Spread, ratios and correlations are not
#: aggregates of per-start values and cannot be bootstrapped this way.
SCORECARD_STATISTICS: dict[str, Statistic] = {
    "rmse": "rmse",
    "ensemble_mean_rmse": "rmse",
    "mse": "mean",
    "mae": "mean",
    "bias": "mean",
    "acc": "mean",
    "crps": "mean",
    "fair_crps": "mean",
    "brier_score": "mean",
    "energy_score": "mean",
}
#: Metrics a scorecard shows unless others are asked for. Bias is left out: its skill, the relative change of
#: its magnitude, explodes where the reference is nearly unbiased (the spatial-mean bias of a climatology is
#: close to 0: skills of -10^8 % were printed), so biases are reported as values in the score tables instead.
DEFAULT_SCORECARD_METRICS = tuple(m for m in SCORECARD_STATISTICS if m != "bias")
REGION = "region"


def skill_score(
    score_model: xr.DataArray | np.ndarray | float,
    score_reference: xr.DataArray | np.ndarray | float,
    *,
    higher_is_better: bool | None,
    perfect_score: float | None = None,
) -> xr.DataArray | np.ndarray:
    """``1 - |model - perfect| / |reference - perfect|``; NaN where the reference is perfect.

    higher_is_better: sets the default ``perfect_score``: 1 when True (ACC), else 0 (errors; bias,
        whose both signs are bad, with None). Inputs broadcast (xarray by dim name, NumPy by shape).
    """
    perfect = perfect_score if perfect_score is not None else (1.0 if higher_is_better else 0.0)
    return xr.apply_ufunc(_skill, score_model, score_reference, kwargs={"perfect": perfect})


def _skill(model: np.ndarray, reference: np.ndarray, *, perfect: float) -> np.ndarray:
    distance_model = np.abs(np.asarray(model, dtype=np.float64) - perfect)
    distance_reference = np.abs(np.asarray(reference, dtype=np.float64) - perfect)
    ok = distance_reference > 0
    ratio = np.divide(distance_model, np.where(ok, distance_reference, 1.0))
    return np.where(ok, 1.0 - ratio, np.nan)


def lag1_autocorrelation(series: np.ndarray) -> float:
    """Median over rows of the lag-1 autocorrelation of ``series`` (K, n), ignoring NaNs.

    Each row's autocorrelation is ``mean(x_t x_{t+1}) / mean(x_t^2)`` of its anomalies, the first mean over
    the pairs where both values are finite, the second over the finite values. Rows with fewer than 3 such
    pairs or no variance are left out; NaN when none is left.
    """
    values = np.asarray(series, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 2:
        return float("nan")
    finite = np.isfinite(values)
    count = finite.sum(axis=1, keepdims=True)
    mean = np.where(finite, values, 0.0).sum(axis=1, keepdims=True) / np.maximum(count, 1)
    anomaly = np.where(finite, values - mean, 0.0)
    pair = finite[:, :-1] & finite[:, 1:]
    n_pairs = pair.sum(axis=1)
    covariance = (anomaly[:, :-1] * anomaly[:, 1:] * pair).sum(axis=1) / np.maximum(n_pairs, 1)
    variance = (anomaly**2).sum(axis=1) / np.maximum(count[:, 0], 1)
    usable = (n_pairs >= 3) & (variance > 0)
    if not usable.any():
        return float("nan")
    return float(np.median(covariance[usable] / variance[usable]))


def block_length_for(rho: float, n: int) -> int:
    """Wilks' (1997) block length for a series of ``n`` values with lag-1 autocorrelation ``rho``.

    Solves ``L = (n - L + 1)^((2/3)(1 - n'/n))``, ``n' = n (1 - rho) / (1 + rho)``, by fixed-point iteration
    (a contraction: the right side's slope is below 2/3 in magnitude) and rounds to a whole number in
    ``[1, n]``. ``rho`` that is NaN or not positive gives 1 (the ordinary bootstrap); it is capped at 0.99.
    """
    if n < 2 or not np.isfinite(rho) or rho <= 0:
        return 1
    rho = min(float(rho), 0.99)
    exponent = (2.0 / 3.0) * (1.0 - (1.0 - rho) / (1.0 + rho))
    length = 1.0
    for _ in range(100):
        updated = (n - length + 1.0) ** exponent
        if abs(updated - length) < 1e-9:
            break
        length = updated
    return int(min(max(round(length), 1), n))


def _check_block_length(block_length: BlockLength) -> None:
    if block_length == "auto":
        return
    if isinstance(block_length, bool) or not isinstance(block_length, (int, np.integer)) or block_length < 1:
        raise SchemaError(f"bootstrap block length must be 'auto' or a whole number >= 1; found {block_length!r}")


def paired_bootstrap(
    per_start_model: xr.DataArray,
    per_start_reference: xr.DataArray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    dim: str = TIME,
    statistic: Statistic = "rmse",
    higher_is_better: bool | None = False,
    perfect_score: float | None = None,
    confidence: float = 0.95,
    block_length: BlockLength = "auto",
) -> xr.Dataset:
    """Skill of model over reference with a paired (circular block) bootstrap over ``dim`` (start times).

    per_start_model, per_start_reference: per-start scores with ``dim`` and any other dims (lead,
        variable, region); ``dim`` coordinates must be equal. A start where either is NaN is left out of
        both (pairing).
    statistic: ``rmse``: the aggregate is ``sqrt(mean(x**2))`` of per-start RMSEs; ``mean``: ``mean(x)``.
    higher_is_better, perfect_score: as in :func:`skill_score`.
    block_length: consecutive start times per resampled block (1: the ordinary bootstrap), or ``"auto"``
        (see the module docstring). Blocks follow ``dim`` sorted ascending.
    Returns a Dataset over the other dims: ``skill`` (full sample), ``lower``/``upper`` (central
    ``confidence`` interval of the resampled skills), ``p_value``, ``significant`` (interval excludes 0),
    ``model_score``/``reference_score`` (full-sample aggregates); attrs include the ``block_length`` used
    and the ``lag1_autocorrelation`` it was chosen from (NaN for a given length). Same ``seed`` -> same draws.
    """
    if statistic not in ("rmse", "mean"):
        raise SchemaError(f"bootstrap statistic must be 'rmse' or 'mean'; found {statistic!r}")
    if n_resamples < 1:
        raise SchemaError(f"n_resamples must be at least 1; found {n_resamples}")
    if not 0 < confidence < 1:
        raise SchemaError(f"confidence must lie in (0, 1); found {confidence}")
    _check_block_length(block_length)
    for name, values in (("model", per_start_model), ("reference", per_start_reference)):
        if dim not in values.dims:
            raise SchemaError(f"per-start {name} scores have no {dim!r} dim; dims are {values.dims}")
    try:
        model, reference = xr.align(per_start_model, per_start_reference, join="exact")
    except ValueError as exc:
        raise SchemaError(f"per-start model and reference scores have different coordinates: {exc}") from exc
    model, reference = xr.broadcast(model, reference)
    if dim in model.indexes:  # blocks are runs of consecutive start times
        model, reference = model.sortby(dim), reference.sortby(dim)
    other = [d for d in model.dims if d != dim]
    model = model.transpose(*other, dim)
    reference = reference.transpose(*other, dim)
    n_start = model.sizes[dim]

    m = model.values.astype(np.float64).reshape(-1, n_start)  # (K, n_start)
    r = reference.values.astype(np.float64).reshape(-1, n_start)
    valid = np.isfinite(m) & np.isfinite(r)
    power = 2 if statistic == "rmse" else 1
    m_terms = np.where(valid, m, 0.0) ** power
    r_terms = np.where(valid, r, 0.0) ** power
    weight = valid.astype(np.float64)

    if block_length == "auto":
        rho = lag1_autocorrelation(np.where(valid, m_terms - r_terms, np.nan))
        length = block_length_for(rho, n_start)
    else:
        rho, length = float("nan"), int(min(block_length, n_start))
    rng = np.random.default_rng(seed)
    n_blocks = -(-n_start // length)
    block_starts = rng.integers(0, n_start, size=(n_resamples, n_blocks))
    draws = ((block_starts[:, :, None] + np.arange(length)) % n_start).reshape(n_resamples, -1)[:, :n_start]
    counts = np.zeros((n_resamples, n_start))  # (R, n_start): how often each start is drawn
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)

    def aggregate(terms: np.ndarray, times_drawn: np.ndarray) -> np.ndarray:
        total = terms @ times_drawn.T  # (K, R)
        n = weight @ times_drawn.T
        mean = np.where(n > 0, total / np.where(n > 0, n, 1.0), np.nan)
        return np.sqrt(mean) if power == 2 else mean

    once = np.ones((1, n_start))
    model_score = aggregate(m_terms, once)[:, 0]
    reference_score = aggregate(r_terms, once)[:, 0]
    kwargs = {"perfect": perfect_score if perfect_score is not None else (1.0 if higher_is_better else 0.0)}
    skill = _skill(model_score, reference_score, **kwargs)
    resampled = _skill(aggregate(m_terms, counts), aggregate(r_terms, counts), **kwargs)  # (K, R)

    alpha = (1.0 - confidence) / 2.0
    finite = np.isfinite(resampled)
    usable = finite.any(axis=1)
    filled = np.where(usable[:, None], resampled, 0.0)
    lower, upper = np.nanquantile(filled, [alpha, 1.0 - alpha], axis=1)
    n_finite = np.maximum(finite.sum(axis=1), 1)
    below = (finite & (resampled <= 0)).sum(axis=1) / n_finite
    above = (finite & (resampled >= 0)).sum(axis=1) / n_finite
    p_value = np.minimum(1.0, 2.0 * np.minimum(below, above))
    lower, upper, p_value = (np.where(usable, x, np.nan) for x in (lower, upper, p_value))
    significant = usable & ((lower > 0) | (upper < 0))

    shape = tuple(model.sizes[d] for d in other)
    coords = {name: coord for name, coord in model.coords.items() if dim not in coord.dims}
    fields = {
        "skill": skill,
        "lower": lower,
        "upper": upper,
        "p_value": p_value,
        "significant": significant,
        "model_score": model_score,
        "reference_score": reference_score,
    }
    result = xr.Dataset({k: (other, v.reshape(shape)) for k, v in fields.items()}, coords=coords)
    result.attrs = {
        "statistic": statistic,
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": confidence,
        "n_start_times": n_start,
        "block_length": length,
        "lag1_autocorrelation": rho,
    }
    return result


def build_scorecard(
    model_scores_per_start: xr.Dataset,
    reference_scores_per_start: xr.Dataset,
    *,
    model_name: str,
    reference_name: str,
    metrics: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    region: str = "all",
    block_length: BlockLength = "auto",
) -> xr.Dataset:
    """Skill of a model over a reference per metric, variable, lead and region, with bootstrap intervals.

    model_scores_per_start, reference_scores_per_start: Datasets with ``score`` (metric, variable, time,
        prediction_timedelta[, region]) (the layout of ``stations.per_start_scores``). The reference must
        hold every metric, variable, lead, region and start time of the model (it may hold more); the
        scorecard covers the model's.
    metrics: default every metric of the model in :data:`DEFAULT_SCORECARD_METRICS`.
    region: name given to the single region of inputs without a ``region`` dim.
    block_length: of the bootstrap (:func:`paired_bootstrap`); ``"auto"`` chooses one per metric.
    Returns dims (metric, variable, prediction_timedelta, region) with ``skill``, ``lower``, ``upper``,
    ``p_value``, ``significant`` (bool), ``model_score``, ``reference_score``, and per metric the bootstrap's
    ``block_length`` (start times per block); attrs name the model and reference, resamples, seed, confidence,
    number of start times and the block-length setting.
    """
    _check_block_length(block_length)
    model = _per_start_scores(model_scores_per_start, name=model_name, region=region)
    reference = _per_start_scores(reference_scores_per_start, name=reference_name, region=region)
    chosen = list(metrics) if metrics is not None else [
        str(m) for m in model["metric"].values if str(m) in DEFAULT_SCORECARD_METRICS
    ]
    if not chosen:
        raise SchemaError(
            f"{model_name}: none of its metrics {model['metric'].values.tolist()} can go on a scorecard; "
            f"supported: {sorted(SCORECARD_STATISTICS)}"
        )
    unsupported = [m for m in chosen if m not in SCORECARD_STATISTICS]
    if unsupported:
        raise SchemaError(
            f"metrics {unsupported} cannot be bootstrapped from per-start scores; "
            f"supported: {sorted(SCORECARD_STATISTICS)}"
        )
    model = _select(model, {"metric": chosen}, name=model_name)
    reference = _select(
        reference, {d: model[d].values for d in ("metric", "variable", TIME, LEAD, REGION)}, name=reference_name
    )
    cards = []
    for metric in chosen:
        spec = METRICS[metric]
        card = paired_bootstrap(
            model.sel(metric=metric, drop=True),
            reference.sel(metric=metric, drop=True),
            n_resamples=n_resamples,
            seed=seed,
            dim=TIME,
            statistic=SCORECARD_STATISTICS[metric],
            higher_is_better=spec.higher_is_better,
            perfect_score=spec.perfect_score,
            confidence=confidence,
            block_length=block_length,
        )
        card = card.transpose("variable", LEAD, REGION)
        cards.append(card.assign(block_length=card.attrs["block_length"]))
    result = xr.concat(cards, dim=pd.Index(chosen, name="metric"))
    result.attrs = {
        "model": model_name,
        "reference": reference_name,
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": confidence,
        "n_start_times": int(model.sizes[TIME]),
        "block_length": str(block_length),
        "skill": "1 - |model - perfect| / |reference - perfect|",
    }
    return result


def _per_start_scores(ds: xr.Dataset, *, name: str, region: str) -> xr.DataArray:
    if "score" not in ds.data_vars:
        raise SchemaError(f"{name}: per-start scores need a 'score' variable; found {sorted(map(str, ds.data_vars))}")
    score = ds["score"]
    if REGION not in score.dims:
        score = score.expand_dims({REGION: [region]})
    needed = ("metric", "variable", TIME, LEAD, REGION)
    missing = [d for d in needed if d not in score.dims]
    extra = [d for d in score.dims if d not in needed]
    if missing or extra:
        raise SchemaError(
            f"{name}: per-start 'score' must have dims {needed} (region optional); found {score.dims}"
        )
    for d in needed:
        if d not in score.coords:
            raise SchemaError(f"{name}: per-start 'score' dim {d!r} has no coordinate")
    return score.transpose(*needed)


def _select(score: xr.DataArray, wanted: dict[str, object], *, name: str) -> xr.DataArray:
    for dim, values in wanted.items():
        index = score.indexes[dim]
        values = np.asarray(values)
        position = index.get_indexer(values)
        if np.any(position < 0):
            absent = [str(v) for v in values[position < 0][:5]]
            held = [str(v) for v in index[:5]]
            raise SchemaError(f"{name}: per-start scores lack {dim} {absent}; they hold {held}...")
        score = score.isel({dim: position})
    return score


def scorecard_to_frame(scorecard: xr.Dataset) -> pd.DataFrame:
    """One row per (metric, variable, prediction_timedelta, region) with every scorecard field as a column.

    Columns: model, reference, metric, variable, prediction_timedelta, region, skill, lower, upper,
    p_value, significant, model_score, reference_score, and block_length when the scorecard has it.
    """
    fields = ["skill", "lower", "upper", "p_value", "significant", "model_score", "reference_score"]
    fields += ["block_length"] if "block_length" in scorecard.data_vars else []
    frame = scorecard[fields].to_dataframe().reset_index()
    frame.insert(0, "reference", scorecard.attrs.get("reference", ""))
    frame.insert(0, "model", scorecard.attrs.get("model", ""))
    return frame[["model", "reference", "metric", "variable", LEAD, REGION, *fields]]


def format_lead(lead: np.timedelta64 | pd.Timedelta) -> str:
    """``1d``, ``36h``, ``90min``: whole days as days, then whole hours, then minutes."""
    value = pd.Timedelta(lead)
    if value % pd.Timedelta(days=1) == pd.Timedelta(0) and value > pd.Timedelta(0):
        return f"{value.days}d"
    if value % pd.Timedelta(hours=1) == pd.Timedelta(0):
        return f"{int(value / pd.Timedelta(hours=1))}h"
    return f"{value / pd.Timedelta(minutes=1):g}min"


def format_skill(skill: float, significant: bool, *, decimals: int = 1) -> str:
    """``+12.3%*`` (significantly better), ``-4.0%*`` (significantly worse), ``+1.0%``; ``n/a`` for NaN."""
    if not np.isfinite(skill):
        return "n/a"
    percent = round(float(skill) * 100.0, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{percent:+.{decimals}f}%" + ("*" if significant else "")


def _blocks_text(scorecard: xr.Dataset) -> str:
    """How the starts were resampled, for the scorecard's text: ``, one start at a time`` (blocks of 1),
    ``, in circular blocks of 3 consecutive starts``, or the length of each metric's blocks when they differ;
    empty for a scorecard without block lengths."""
    if "block_length" not in scorecard.data_vars:
        return ""
    lengths = {str(m): int(v) for m, v in zip(scorecard["metric"].values, np.atleast_1d(scorecard["block_length"].values))}
    if set(lengths.values()) == {1}:
        return ", one start at a time"
    if len(set(lengths.values())) == 1:
        return f", in circular blocks of {next(iter(lengths.values()))} consecutive starts"
    return ", in circular blocks of consecutive starts: " + ", ".join(f"{m} {n}" for m, n in lengths.items())


def scorecard_markdown(scorecard: xr.Dataset, *, decimals: int = 1) -> str:
    """Markdown: per metric and region a table of variables (rows) by leads (columns) of skill in percent.

    A ``*`` marks a significant difference: ``+12.3%*`` significantly better than the reference,
    ``-4.0%*`` significantly worse, ``+1.0%`` not significant.
    """
    model = scorecard.attrs.get("model", "model")
    reference = scorecard.attrs.get("reference", "reference")
    confidence = float(scorecard.attrs.get("confidence", 0.95))
    lines = [
        f"## Scorecard: {model} vs {reference}",
        "",
        f"Skill = 1 - |{model} - perfect| / |{reference} - perfect|, in percent (positive: {model} is better), "
        f"over {scorecard.attrs.get('n_start_times', '?')} start times. `*`: the {confidence:.0%} paired "
        f"bootstrap interval ({scorecard.attrs.get('n_resamples', '?')} resamples of start times"
        f"{_blocks_text(scorecard)}) excludes 0.",
    ]
    leads = [format_lead(v) for v in scorecard[LEAD].values]
    skipped = []
    for metric in scorecard["metric"].values:
        for region in scorecard[REGION].values:
            card = scorecard.sel(metric=metric, region=region)
            # Variables with no finite skill (e.g. not observed at stations, or a metric undefined for the
            # pair of models) get no row; a table without rows is named at the end instead.
            variables = [v for v in scorecard["variable"].values if np.isfinite(card.sel(variable=v)["skill"].values).any()]
            if not variables:
                skipped.append(f"{metric} ({region})")
                continue
            lines += ["", f"### {metric} ({region})", ""]
            lines.append("| variable | " + " | ".join(leads) + " |")
            lines.append("|---|" + "---:|" * len(leads))
            for variable in variables:
                row = card.sel(variable=variable)
                cells = [
                    format_skill(float(s), bool(g), decimals=decimals)
                    for s, g in zip(row["skill"].values, row["significant"].values)
                ]
                lines.append(f"| {variable} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", f"No skill defined (no data, or the metric is undefined for one of the models): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"
