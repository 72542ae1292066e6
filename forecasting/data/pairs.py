"""Derived (coarse, fine) training pairs for downscaling: a fine dataset and its area-mean coarsening.

A downscaling model learns from pairs of a coarse field and the fine field it should become. Where no coarse
product exists beside a fine one (an ERA5 0.25-degree extract, say), the coarse field is derived from the fine
one by averaging blocks of ``factor x factor`` fine cells, as DeepSD did with PRISM data (Vandal et al. 2017,
"DeepSD: Generating High Resolution Climate Change Projections through Single Image Super-Resolution", KDD):
the model then learns to restore what the averaging removed. Pairs made this way are labelled as *derived*
in the stores' attributes, so nobody mistakes them for an independent coarse product.

Conventions (latitude ascending, longitude ascending within one contiguous, regularly spaced range that does
not cross the 0/360 seam, as the forecasting schema stores it):

* :func:`coarsen_area_mean`: coarse cell ``(I, J)`` is the area-weighted mean of fine cells
  ``(f I .. f I + f - 1, f J .. f J + f - 1)``, with the fine cells' areas from
  :func:`forecasting.weights.latitude_weights` (exact for a regular grid); its coordinates are the means of the
  block's fine coordinates (the block centre). Rows and columns beyond the last whole block are dropped.
* :func:`make_derived_pairs`: the coarse store is that coarsening; the fine store is the part of the fine grid
  between the outermost coarse cell centres (``coarse_lat[0] <= lat <= coarse_lat[-1]``, likewise in longitude),
  so every target point has coarse neighbours on all sides and a bilinear interpolation of the coarse field
  reaches it without extrapolating. Both are training stores (:func:`forecasting.data.store.write_store`) with
  statistics over ``train_period``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from forecasting.data.sources import Selection, open_sources
from forecasting.data.store import write_store
from forecasting.errors import SchemaError, StoreError
from forecasting.schema import LAT, LON
from forecasting.weights import latitude_weights

__all__ = ["COARSE_STORE", "FINE_STORE", "DerivedPairs", "coarsen_area_mean", "make_derived_pairs"]

COARSE_STORE = "coarse.zarr"
FINE_STORE = "fine.zarr"
#: Relative tolerance on grid spacings (float32 coordinates).
_SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class DerivedPairs:
    """Where :func:`make_derived_pairs` wrote the pair: the coarse store and the fine (target) store."""

    coarse: Path
    fine: Path


def _regular_axis(values: np.ndarray, *, name: str, source: str) -> float:
    """The spacing of an ascending, regularly spaced axis; SchemaError naming ``source`` otherwise."""
    if values.size < 2:
        raise SchemaError(f"{source}: {name} needs at least 2 points to coarsen; found {values.size}")
    steps = np.diff(values)
    step = float(np.median(steps))
    if step <= 0 or not np.allclose(steps, step, rtol=_SPACING_RTOL, atol=1e-6):
        hint = (" (an area crossing the 0/360 meridian is stored as two ranges: choose an area on one side of it)"
                if name == LON else "")
        raise SchemaError(
            f"{source}: {name} must be one ascending, regularly spaced range to coarsen; found steps "
            f"{np.unique(np.round(steps, 6))[:5].tolist()}{hint}"
        )
    return step


def coarsen_area_mean(ds: xr.Dataset, factor: int, *, source: str) -> xr.Dataset:
    """Area-weighted means over ``factor x factor`` blocks of fine cells (see the module docstring).

    Args:
        ds: A gridded dataset (dims ``(..., latitude, longitude)``; lazy is fine and stays lazy). Variables
            without both horizontal dims are kept as they are.
        factor: Fine cells per coarse cell along each axis (>= 2).
        source: Names the data in error messages.

    Returns a new Dataset on the coarse grid (``H // factor`` x ``W // factor``), each variable in its input
    dtype (float32 for a non-float one, e.g. a boolean mask, which becomes a fraction) with its attributes. Raises SchemaError when ``factor`` < 2, an axis is irregular or shorter than
    ``factor``.
    """
    if int(factor) != factor or factor < 2:
        raise SchemaError(f"{source}: the coarsening factor must be an integer >= 2; found {factor}")
    factor = int(factor)
    for dim in (LAT, LON):
        if dim not in ds.dims:
            raise SchemaError(f"{source}: no {dim!r} dim to coarsen (dims {dict(ds.sizes)})")
        _regular_axis(np.asarray(ds[dim].values, dtype=np.float64), name=dim, source=source)
        if ds.sizes[dim] < factor:
            raise SchemaError(f"{source}: {dim} has {ds.sizes[dim]} points, fewer than the factor {factor}")
    weights = xr.DataArray(latitude_weights(np.asarray(ds[LAT].values, dtype=np.float64)), dims=LAT,
                           coords={LAT: ds[LAT].values})
    window = {LAT: factor, LON: factor}
    block_weight = weights.coarsen({LAT: factor}, boundary="trim").sum() * factor  # (H // f,)
    out_vars = {}
    for name, var in ds.data_vars.items():
        if LAT not in var.dims or LON not in var.dims:
            out_vars[name] = var
            continue
        summed = (var * weights).coarsen(window, boundary="trim", coord_func="mean").sum()
        dtype = var.dtype if np.issubdtype(var.dtype, np.floating) else np.float32  # a mask becomes a fraction
        mean = (summed / block_weight).transpose(*var.dims).astype(dtype)
        mean.attrs = dict(var.attrs)
        out_vars[name] = mean
    lat = ds[LAT].coarsen({LAT: factor}, boundary="trim").mean().values
    lon = ds[LON].coarsen({LON: factor}, boundary="trim").mean().values
    coords = {k: v for k, v in ds.coords.items() if LAT not in v.dims and LON not in v.dims}
    out = xr.Dataset(out_vars, coords=coords, attrs=dict(ds.attrs))
    return out.assign_coords({LAT: (LAT, lat.astype(ds[LAT].dtype), ds[LAT].attrs),
                              LON: (LON, lon.astype(ds[LON].dtype), ds[LON].attrs)})


def make_derived_pairs(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    factor: int,
    variables: Sequence[str] | None = None,
    time: tuple[str | None, str | None] | None = None,
    area: tuple[float, float, float, float] | None = None,
    train_period: tuple[str | None, str | None] | None = None,
    overwrite: bool = False,
) -> DerivedPairs:
    """Read a fine dataset, coarsen it and write the pair ``out_dir/coarse.zarr`` + ``out_dir/fine.zarr``.

    Args:
        sources: Files, globs, URLs or catalog names read with :func:`forecasting.data.sources.open_sources`.
        out_dir: The pair's directory (written to a temporary sibling and renamed into place at the end).
        factor: Fine cells per coarse cell along each axis (e.g. 4: 0.25 -> 1.0 degree).
        variables, time, area: The :class:`~forecasting.data.sources.Selection` read from the sources; ``area``
            ``(lat_min, lat_max, lon_min, lon_max)`` must lie on one side of the 0/360 meridian.
        train_period: The period of both stores' normalisation statistics (None: all times).
        overwrite: Replace an existing ``out_dir`` (only once the new pair is complete).

    Returns the two store paths. Both stores carry ``derived = "true"``, ``pair_role`` (``coarse``/``fine``),
    ``derived_from`` (the sources), ``coarsening_factor`` and ``derivation`` (how the coarse field was made).
    Raises StoreError when ``out_dir`` exists (before reading anything) and SchemaError/SourceError for data
    that cannot be coarsened; nothing is left at ``out_dir`` on failure.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise StoreError(f"derived pair directory {out} already exists; pass overwrite to replace it")
    names = ", ".join(os.fspath(s) for s in sources)
    selection = Selection(variables=tuple(variables) if variables else None, time=time, area=area)
    fine = open_sources(list(sources), selection=selection)
    fine = fine[[v for v in fine.data_vars if not str(v).endswith("_mask")]]
    coarse = coarsen_area_mean(fine, factor, source=names)
    clat, clon = coarse[LAT].values, coarse[LON].values
    inside_lat = (fine[LAT].values >= clat[0] - 1e-6) & (fine[LAT].values <= clat[-1] + 1e-6)
    inside_lon = (fine[LON].values >= clon[0] - 1e-6) & (fine[LON].values <= clon[-1] + 1e-6)
    if inside_lat.sum() < 2 or inside_lon.sum() < 2:
        raise SchemaError(
            f"{names}: the coarse grid ({clat.size} x {clon.size} cells of {factor} x {factor} fine cells) leaves "
            "fewer than 2 x 2 fine points between its cell centres; use a larger area or a smaller factor"
        )
    target = fine.isel({LAT: np.flatnonzero(inside_lat), LON: np.flatnonzero(inside_lon)})
    derivation = (f"area-weighted mean over blocks of {factor} x {factor} fine cells "
                  "(forecasting.data.pairs.coarsen_area_mean)")
    common = {"derived": "true", "derived_from": names, "coarsening_factor": int(factor), "derivation": derivation,
              "source": f"derived from {names}"}
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        write_store(coarse, tmp / COARSE_STORE, train_period=train_period, attrs={**common, "pair_role": "coarse"})
        write_store(
            target, tmp / FINE_STORE, train_period=train_period,
            attrs={**common, "pair_role": "fine",
                   "note": "the fine grid's points between the outermost coarse cell centres"},
        )
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DerivedPairs(coarse=out / COARSE_STORE, fine=out / FINE_STORE)
