"""The ``downscale`` flow: a coarse forecast Zarr in, a fine regional forecast Zarr out.

A thin Prefect wrapper over :func:`forecasting.downscaling.downscale` (tested without Prefect): the task passes
paths and settings, never arrays. The output is a resumable step (:func:`forecasting.backtest.run_once`): it is
written atomically and recorded by a manifest keyed on the settings and the inputs' fingerprints, so running the
flow again with the same inputs keeps it, and a changed input, setting or ``overwrite`` makes it again.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from forecasting.backtest import StepResult, output_key, run_once
from forecasting.downscaling import downscale

__all__ = ["downscale_flow", "downscale_task"]


@task(name="downscale", task_run_name="downscale {forecast}", cache_policy=NO_CACHE, persist_result=False)
def downscale_task(
    forecast: str,
    checkpoint: str,
    out: str,
    settings: dict,
    overwrite: bool,
) -> StepResult:
    """:func:`forecasting.downscaling.downscale` of ``forecast`` into ``out`` with ``settings`` (its keyword
    arguments), unless ``out`` is current for these inputs and settings."""
    key = output_key({"step": "downscale", **settings}, inputs=[forecast, checkpoint])
    return run_once(
        out, key=key, overwrite=overwrite,
        make=lambda: downscale(forecast, checkpoint=checkpoint, out=out, overwrite=True, **settings),
    )


@flow(name="downscale")
def downscale_flow(
    forecast: str,
    checkpoint: str,
    out: str,
    members_per_input: int = 1,
    starts: list[str] | None = None,
    leads: list[str] | None = None,
    sampler: str | None = None,
    sampling_steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> str:
    """Downscale the coarse forecast ``forecast`` with the downscaling ``checkpoint`` into ``out``; returns ``out``.

    Arguments are those of :func:`forecasting.downscaling.downscale` (``starts`` as ISO strings, ``leads`` as
    pandas strings such as ``"24h"``; None: every start time or lead of the forecast).
    """
    settings = {
        "members_per_input": members_per_input, "starts": starts, "leads": leads, "sampler": sampler,
        "sampling_steps": sampling_steps, "seed": seed, "batch_size": batch_size, "device": device,
    }
    result = downscale_task(forecast, checkpoint, out, settings, overwrite)
    state = "done" if result.computed else "already there"
    get_run_logger().info("%s: %s (%.1f s)", result.path, state, result.seconds)
    return str(result.path)
