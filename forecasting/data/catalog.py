"""The data catalog: named sources (``data/catalog.yaml``) that people open by name instead of by URL.

Each entry says which reader opens it (``kind``), where it lives (``url``: a cloud URL, an ``http(s)://``
URL, or a local path, glob or directory relative to the data root), what it is (description,
resolution, time step), how to reach it (fsspec ``storage_options``, e.g. ``{token: anon}`` for public
Google Cloud buckets), what to declare when conforming it (``conform``: rename / units / levels /
reference_time / nan_policy, see :class:`forecasting.schema.ConformOptions`) and which ``variables`` and
``levels`` to read when the caller does not say.

The default catalog is ``<project>/data/catalog.yaml`` (override with the environment variable
``FORECASTING_CATALOG``); relative local paths in it are resolved against the data root
``FORECASTING_DATA_ROOT`` (default ``<project>/data``). Every model is frozen and rejects unknown keys,
so a typo in the YAML fails with :class:`forecasting.config.ConfigError` naming the key and the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator, model_validator

from forecasting.config import ConfigError, ConformConfig, StrictModel, load_yaml, parse_config
from forecasting.errors import SourceError

#: The project root (the folder holding ``forecasting/`` and ``data/``) of this source tree.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CATALOG_ENV = "FORECASTING_CATALOG"
DATA_ROOT_ENV = "FORECASTING_DATA_ROOT"

# A catalog name is a plain word (letters, digits, '-', '_', '.') so it can never be mistaken for a path.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CatalogEntry(StrictModel):
    """One named source.

    kind: the reader (``netcdf``, ``grib`` or ``zarr``; a key of ``sources.SOURCE_TYPES`` other than
        ``catalog``).
    url: ``gs://``, ``s3://``, ``http(s)://``, ``memory://`` or ``file://`` URL, or a local path / glob,
        absolute or relative to the data root.
    resolution: horizontal grid in words, e.g. ``"1.5 deg (240x121 equiangular with poles)"``.
    time_step: spacing of the time axis as a pandas timedelta string (``"6h"``, ``"1h"``, ``"1D"``).
    storage_options: passed to fsspec (``{"token": "anon"}`` for public Google Cloud buckets).
    conform: what to declare when conforming (rename, units, levels, reference_time, nan_policy).
    variables / levels: read these when the caller's selection does not name any.
    filter_by_keys: for GRIB only: the cfgrib filter selecting one hypercube of a mixed file.
    """

    kind: Literal["netcdf", "grib", "zarr"]
    url: str = Field(min_length=1)
    description: str = Field(min_length=1)
    resolution: str = Field(min_length=1)
    time_step: str
    storage_options: dict[str, Any] = {}
    conform: ConformConfig | None = None
    variables: tuple[str, ...] | None = Field(default=None, min_length=1)
    levels: tuple[float, ...] | None = Field(default=None, min_length=1)
    filter_by_keys: dict[str, str | int | float] | None = None

    @field_validator("time_step")
    @classmethod
    def _positive_step(cls, value: str) -> str:
        try:
            step = pd.Timedelta(value)
        except ValueError as exc:
            raise ValueError(f"time_step {value!r} is not a timedelta such as '6h' or '1D': {exc}") from None
        if step <= pd.Timedelta(0):
            raise ValueError(f"time_step must be positive; found {value!r}")
        return value

    @field_validator("levels")
    @classmethod
    def _levels_in_range(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and any(not 0 < lv <= 1100 for lv in value):
            raise ValueError(f"levels must be pressure levels in (0, 1100] hPa; found {list(value)}")
        return value

    @model_validator(mode="after")
    def _grib_only_filter(self) -> CatalogEntry:
        if self.filter_by_keys is not None and self.kind != "grib":
            raise ValueError(f"filter_by_keys applies to kind 'grib' only; this entry has kind {self.kind!r}")
        return self


class CatalogFile(StrictModel):
    """The YAML layout of a catalog file: ``sources: {name: entry}``."""

    sources: dict[str, CatalogEntry]

    @field_validator("sources")
    @classmethod
    def _plain_names(cls, value: dict[str, CatalogEntry]) -> dict[str, CatalogEntry]:
        bad = [name for name in value if not _NAME_RE.match(name)]
        if bad:
            raise ValueError(f"catalog names must be plain words (letters, digits, '-', '_', '.'); found {bad}")
        return value


class Catalog(StrictModel):
    """A loaded catalog: its entries, the file it came from and the data root for relative paths."""

    sources: dict[str, CatalogEntry]
    data_root: Path
    path: Path | None = None

    def names(self) -> tuple[str, ...]:
        """The entry names, sorted."""
        return tuple(sorted(self.sources))

    def entry(self, name: str) -> CatalogEntry:
        """The entry called ``name``; :class:`SourceError` listing the known names when there is none."""
        try:
            return self.sources[name]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            raise SourceError(
                f"no catalog entry named {name!r}{where}; known names: {', '.join(self.names()) or '(none)'}"
            ) from None

    def resolve_url(self, url: str) -> str:
        """URLs unchanged; a relative local path (or glob) joined onto the data root."""
        if "://" in url:
            return url
        path = Path(url).expanduser()
        return str(path if path.is_absolute() else self.data_root / path)


def default_catalog_path() -> Path:
    """``$FORECASTING_CATALOG`` if set, else ``<project>/data/catalog.yaml``."""
    env = os.environ.get(CATALOG_ENV)
    return Path(env).expanduser() if env else PROJECT_ROOT / "data" / "catalog.yaml"


def default_data_root() -> Path:
    """``$FORECASTING_DATA_ROOT`` if set, else ``<project>/data``."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else PROJECT_ROOT / "data"


def load_catalog(path: Path | None = None, *, data_root: Path | None = None) -> Catalog:
    """Read and validate a catalog file (default: :func:`default_catalog_path`).

    Raises :class:`ConfigError` naming the file when it is missing or unreadable, is not YAML, or holds
    an unknown key or an invalid value (the message names the key, e.g. ``sources.era5.urll``).
    """
    file = Path(path) if path is not None else default_catalog_path()
    if not file.is_file():
        raise ConfigError(f"data catalog {file} not found (set {CATALOG_ENV} to use another catalog file)")
    parsed = parse_config(load_yaml(file), source=str(file), model=CatalogFile)
    return Catalog(
        sources=parsed.sources,
        data_root=Path(data_root) if data_root is not None else default_data_root(),
        path=file,
    )
