"""Model checkpoints: one file with everything a trained model needs to forecast.

A checkpoint is a dict written with ``torch.save`` and read with ``torch.load(weights_only=True)``, so it
holds only tensors, dicts, lists, str, int, float, bool and None (no pickled objects, nothing executed on
load):

* ``format_version``: int, :data:`CHECKPOINT_FORMAT_VERSION` when written by this code;
* ``family``: the model family (``"graph"`` ...), the registry key of :mod:`forecasting.forecasters`;
* ``config``: the full resolved experiment config as plain JSON data (``ExperimentConfig.model_dump``);
* ``state_dict``: the weights, ``{name: tensor}``;
* ``statistics``: the normalisation statistics, ``{name: float64 tensor}``;
* ``graph``: None or ``{"description": JSON text, "arrays": {name: tensor}}`` holding every array of a
  :class:`~forecasting.graphs.ForecastGraph` (mesh arrays prefixed ``mesh_``) and its description;
* ``data``: what the family needs to know about its inputs and outputs (channels, grids, time step);
* ``metadata``: ``created`` (UTC ISO), ``forecasting_version``, ``torch_version`` and whatever the
  trainer adds (``global_step`` ...).

Files are written to a hidden temporary sibling and renamed into place, so a reader never sees half a
checkpoint. On load a checkpoint of an older format is upgraded step by step by the functions in
:data:`MIGRATIONS` (``from_version -> function(dict) -> dict`` of the next version); a format with no
migration, or a newer one, fails with a message saying what to do. A corrupt or truncated file, a file
that is not a checkpoint, or one of another family raises :class:`~forecasting.errors.SourceError` naming
the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import forecasting
from forecasting.errors import SchemaError, SourceError
from forecasting.graphs import ForecastGraph, MeshGraph

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "MIGRATIONS",
    "Checkpoint",
    "file_sha256",
    "graph_from_tensors",
    "graph_to_tensors",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 1
#: Upgrades of older formats: ``from_version -> function`` returning the checkpoint dict of ``from_version + 1``.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

_KEYS = ("format_version", "family", "config", "state_dict", "statistics", "graph", "data", "metadata")
_PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the fields); ``sha256`` is the file's hash."""

    path: Path
    format_version: int
    family: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    statistics: dict[str, torch.Tensor]
    graph: ForecastGraph | None
    data: dict[str, Any]
    metadata: dict[str, Any]
    sha256: str


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Graphs as tensors
# ----------------------------------------------------------------------------------------------
def graph_to_tensors(graph: ForecastGraph) -> dict[str, Any]:
    """``{"description": JSON text, "arrays": {name: tensor}}``; dtypes kept (bool, int64, float32/64)."""
    arrays = {f.name: getattr(graph, f.name) for f in fields(graph) if f.name not in ("mesh", "description")}
    arrays.update({f"mesh_{f.name}": getattr(graph.mesh, f.name) for f in fields(graph.mesh)})
    return {
        "description": json.dumps(graph.description, sort_keys=True),
        "arrays": {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in arrays.items()},
    }


def graph_from_tensors(stored: Mapping[str, Any], *, source: str) -> ForecastGraph:
    """The inverse of :func:`graph_to_tensors`; SourceError naming ``source`` when arrays are missing or bad."""
    try:
        arrays = {name: np.asarray(tensor.numpy()) for name, tensor in stored["arrays"].items()}
        description = json.loads(stored["description"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SourceError(f"{source}: the stored graph is unreadable ({type(exc).__name__}: {exc})") from None
    mesh_names = [f.name for f in fields(MeshGraph)]
    graph_names = [f.name for f in fields(ForecastGraph) if f.name not in ("mesh", "description")]
    missing = [n for n in (*graph_names, *(f"mesh_{m}" for m in mesh_names)) if n not in arrays]
    if missing:
        raise SourceError(f"{source}: the stored graph lacks arrays {missing}")
    try:
        mesh = MeshGraph(**{n: arrays[f"mesh_{n}"] for n in mesh_names})
        return ForecastGraph(mesh=mesh, description=description, **{n: arrays[n] for n in graph_names})
    except SchemaError as exc:
        raise SourceError(f"{source}: the stored graph is inconsistent: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is plain data (dict with str keys, list, str, int, float, bool, None)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint {where} has a non-string key {key!r}")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif type(value) not in _PLAIN:  # exact types: a str subclass would be pickled as its class
        raise TypeError(f"checkpoint {where} must be plain data; found {type(value).__name__}")


def _check_tensors(value: Mapping[str, Any], where: str) -> None:
    for key, item in value.items():
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"checkpoint {where}.{key} must be a tensor; found {type(item).__name__}")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    family: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    statistics: Mapping[str, torch.Tensor],
    graph: ForecastGraph | None,
    data: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary sibling + rename); returns ``path``.

    ``config``, ``data`` and ``metadata`` must be plain data and ``state_dict``/``statistics`` map names to
    tensors (TypeError otherwise, before anything is written). Tensors are saved detached, on the CPU.
    """
    path = Path(path)
    config, data = dict(config), dict(data)
    meta = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "forecasting_version": forecasting.__version__,
        "torch_version": str(torch.__version__),
        **dict(metadata or {}),
    }
    for value, where in ((config, "config"), (data, "data"), (meta, "metadata")):
        _check_plain(value, where)
    _check_tensors(state_dict, "state_dict")
    _check_tensors(statistics, "statistics")
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "family": str(family),
        "config": config,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "statistics": {k: v.detach().cpu().clone() for k, v in statistics.items()},
        "graph": graph_to_tensors(graph) if graph is not None else None,
        "data": data,
        "metadata": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, *, family: str | None = None) -> Checkpoint:
    """Read a checkpoint with ``torch.load(weights_only=True)`` onto the CPU, upgrading older formats.

    Args:
        path: The checkpoint file.
        family: The family the caller expects; None accepts any.

    Raises:
        SourceError: naming the file, when it is missing, corrupt or truncated, not a checkpoint, of a
            format that cannot be read (with what to do), or of another family than ``family``.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"no checkpoint file at {path}")
    sha256 = file_sha256(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file boundary: any failure to unpickle means a corrupt or foreign file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "error:" in line.lower()), lines[0] if lines else "")
        raise SourceError(
            f"cannot read checkpoint {path}: the file is corrupt, truncated or not a forecasting checkpoint "
            f"({type(exc).__name__}: {first[:300]})"
        ) from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise SourceError(f"{path} is not a forecasting checkpoint (no 'format_version' entry)")
    payload = _migrate(payload, path=path)
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise SourceError(f"checkpoint {path} lacks entries {missing}; it is incomplete or not a forecasting checkpoint")
    found = payload["family"]
    if family is not None and found != family:
        raise SourceError(
            f"checkpoint {path} holds a {found!r} model, not a {family!r} one; use a checkpoint trained with "
            f"model.family: {family}"
        )
    for key, kind in (("config", dict), ("state_dict", dict), ("statistics", dict), ("data", dict), ("metadata", dict),
                      ("family", str)):
        if not isinstance(payload[key], kind):
            raise SourceError(f"checkpoint {path}: entry {key!r} must be a {kind.__name__}; found {type(payload[key]).__name__}")
    graph = graph_from_tensors(payload["graph"], source=str(path)) if payload["graph"] is not None else None
    return Checkpoint(
        path=path,
        format_version=int(payload["format_version"]),
        family=found,
        config=payload["config"],
        state_dict=payload["state_dict"],
        statistics=payload["statistics"],
        graph=graph,
        data=payload["data"],
        metadata=payload["metadata"],
        sha256=sha256,
    )


def _migrate(payload: dict[str, Any], *, path: Path) -> dict[str, Any]:
    """Upgrade ``payload`` to :data:`CHECKPOINT_FORMAT_VERSION` with :data:`MIGRATIONS`, or explain why not."""
    version = payload["format_version"]
    if not isinstance(version, int):
        raise SourceError(f"checkpoint {path}: format_version must be an integer; found {version!r}")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise SourceError(
            f"checkpoint {path} has format version {version}, newer than this forecasting "
            f"({forecasting.__version__}) reads (up to {CHECKPOINT_FORMAT_VERSION}); upgrade the forecasting package"
        )
    while version < CHECKPOINT_FORMAT_VERSION:
        upgrade = MIGRATIONS.get(version)
        if upgrade is None:
            meta = payload.get("metadata")
            wrote = meta.get("forecasting_version", "unknown") if isinstance(meta, dict) else "unknown"
            raise SourceError(
                f"checkpoint {path} has format version {version}, which this forecasting ({forecasting.__version__}, "
                f"format {CHECKPOINT_FORMAT_VERSION}) cannot upgrade; load it with the forecasting release that wrote "
                f"it ({wrote}) or retrain the model"
            )
        payload = upgrade(dict(payload))
        if payload.get("format_version") != version + 1:
            raise SourceError(f"checkpoint {path}: the migration from format {version} did not produce format {version + 1}")
        version += 1
    return payload
