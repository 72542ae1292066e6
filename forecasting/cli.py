"""The ``forecast`` command line.

Every sub-command is a thin layer over a library function: it parses options, calls the library and
prints a short summary. Errors a user can act on (:class:`ForecastingError`) are printed as one
message and exit with status 2; nothing half-written is left behind by the library functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from forecasting.errors import ForecastingError


def _key_values(items: Sequence[str] | None, *, option: str, cast=str) -> dict:
    """Parse ``KEY=VALUE`` pairs given to a repeatable option."""
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ForecastingError(f"{option} expects KEY=VALUE; got {item!r}")
        try:
            out[key] = cast(value)
        except ValueError:
            raise ForecastingError(f"{option} {key}: cannot read {value!r} as {cast.__name__}") from None
    return out


def _yaml_value(text: str):
    """A command-line value read as YAML reads it: ``20`` an int, ``0.5`` a float, ``null`` None, else text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(text) from None


def _block_length(text: str) -> int | str:
    """``--bootstrap-block``: ``auto`` or a whole number >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 1; got {text!r}")
    return value


def _cmd_simulate(args: argparse.Namespace) -> None:
    from forecasting.config import SimulationConfig, load_config, parse_config
    from forecasting.data.builtin import run_simulation

    base = load_config(args.config).simulation if args.config else SimulationConfig()
    overrides = {k: v for k, v in {"years": args.years, "seed": args.seed, "nlat": args.nlat}.items() if v is not None}
    if "nlat" in overrides:
        overrides["nlon"] = 2 * overrides["nlat"]
    config = parse_config({**base.model_dump(), **overrides}, source="simulate options", model=SimulationConfig)
    paths = run_simulation(config, Path(args.out), overwrite=args.overwrite, progress=not args.quiet)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from forecasting.config import IngestConfig, load_config, parse_config
    from forecasting.data.ingest import ingest
    from forecasting.data.sources import Selection

    if args.config:
        if args.sources:
            raise ForecastingError("give either SOURCEs or --config, not both")
        jobs = load_config(args.config).ingest
        if not jobs:
            raise ForecastingError(f"config {args.config} has no 'ingest' entries")
    else:
        if not args.sources or not args.out:
            raise ForecastingError("ingest needs at least one SOURCE and --out (or --config with 'ingest' entries)")
        conform = {
            "rename": _key_values(args.rename, option="--rename"),
            "units": _key_values(args.units, option="--units"),
            "levels": _key_values(args.level, option="--level", cast=float),
            "reference_time": args.reference_time,
            "nan_policy": args.nan_policy,
        }
        job = {
            "sources": args.sources,
            "out": args.out,
            "variables": args.variables,
            "levels": args.levels,
            "time": (args.start, args.end) if (args.start or args.end) else None,
            "area": tuple(args.area) if args.area else None,
            "train_period": (args.train_start, args.train_end) if (args.train_start or args.train_end) else None,
            "dask_address": args.dask_address,
            "conform": conform,
        }
        jobs = [parse_config(job, source="ingest options", model=IngestConfig)]
    for job in jobs:
        selection = Selection(
            variables=tuple(job.variables) if job.variables else None,
            levels=tuple(job.levels) if job.levels else None,
            time=job.time,
            area=job.area,
        )
        report = ingest(
            job.sources,
            Path(job.out),
            selection=selection,
            options=job.conform.to_options(),
            overwrite=args.overwrite,
            append=args.append,
            train_period=job.train_period,
            dask_address=args.dask_address or job.dask_address,
            progress=not args.quiet,
        )
        print(report.describe())


def _cmd_stats(args: argparse.Namespace) -> None:
    from forecasting.data.ingest import describe_store

    print(describe_store(args.store, as_json=args.json))


def _start_times(args: argparse.Namespace):
    import pandas as pd

    if args.start and args.starts:
        raise ForecastingError("give either --start (repeatable) or --starts FROM TO EVERY, not both")
    if args.start:
        return pd.DatetimeIndex(args.start)
    if args.starts:
        first, last, every = args.starts
        try:
            return pd.date_range(first, last, freq=pd.Timedelta(every))
        except ValueError as exc:
            raise ForecastingError(f"--starts {first} {last} {every}: {exc}") from None
    raise ForecastingError("no start times: give --start TIME (repeatable) or --starts FROM TO EVERY")


def _cmd_baseline(args: argparse.Namespace) -> None:
    import pandas as pd

    from forecasting.inference import baseline_forecast, write_forecast
    from forecasting.verification.verify import open_truth

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ForecastingError(f"forecast {out} already exists; pass --overwrite to replace it")
    if args.steps < 1 or args.step_hours <= 0:
        raise ForecastingError(f"--steps must be >= 1 and --step-hours > 0; got {args.steps}, {args.step_hours}")
    if args.members < 1:  # which kinds take members and which leads: inference.baseline_forecast checks
        raise ForecastingError(f"--members must be >= 1; got {args.members}")
    truth = open_truth(args.truth)
    starts = _start_times(args)
    leads = pd.to_timedelta([args.step_hours * (i + 1) for i in range(args.steps)], unit="h")
    period = tuple(args.climatology_period) if args.climatology_period else None
    forecast = baseline_forecast(truth, kind=args.kind, init_times=starts, leads=leads, climatology_period=period,
                                 members=args.members, source=str(args.truth))
    write_forecast(forecast, out, model=args.kind, overwrite=args.overwrite,
                   config={"kind": args.kind, "truth": str(args.truth), "steps": args.steps, "members": args.members,
                           "step_hours": args.step_hours, "climatology_period": period})
    print(f"wrote {args.kind} forecast {out}: {len(starts)} start times x {args.steps} leads x {args.members} member(s)")


def _cmd_verify(args: argparse.Namespace) -> None:
    from forecasting.verification.verify import verify

    regions = {}
    for name, *box in args.region or ():
        try:
            regions[name] = tuple(float(x) for x in box)
        except ValueError:
            raise ForecastingError(f"--region {name}: bounds must be numbers; got {box}") from None
    result = verify(
        args.forecast,
        out_dir=Path(args.out),
        truth_path=args.truth,
        observations_path=args.obs,
        reference=args.reference,
        regions=regions,
        station_method=args.station_method,
        chunk_starts=args.chunk_starts,
        n_resamples=args.bootstrap,
        bootstrap_block=args.bootstrap_block,
        overwrite=args.overwrite,
        plots=not args.no_plots,
    )
    print(f"verification written to {result.out_dir} ({len(result.files)} files); summary: {result.out_dir / 'summary.md'}")


def _cmd_train(args: argparse.Namespace) -> None:
    from forecasting.config import load_config
    from forecasting.training.train import train

    config = load_config(args.config)
    result = train(
        config, out_dir=args.out, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps,
        progress=not args.quiet,
    )
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()) if k.endswith("loss"))
    print(f"trained {result.global_step} steps ({shown}); model: {result.checkpoint}; resume from: {result.resume_checkpoint}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from forecasting.inference import predict

    if args.steps < 1 or args.members < 1:
        raise ForecastingError(f"--steps and --members must be >= 1; got {args.steps}, {args.members}")
    starts = _start_times(args)
    stores = _key_values(args.store, option="--store")
    sampling = _key_values(args.sampling, option="--sampling", cast=_yaml_value)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = predict(
        args.checkpoint, starts=starts, members=args.members, steps=args.steps, out=args.out, stores=stores,
        boundary=args.boundary, seed=args.seed, batch_size=args.batch_size, device=args.device,
        overwrite=args.overwrite, sampling=sampling,
    )
    print(f"wrote forecast {out}: {len(starts)} start times x {args.steps} leads x {args.members} members")


def _cmd_check_denoiser(args: argparse.Namespace) -> None:
    import torch

    from forecasting.diffusion.diagnostics import check_checkpoint

    if args.samples < 1:
        raise ForecastingError(f"--samples must be >= 1; got {args.samples}")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise ForecastingError(f"{args.out} already exists; pass --overwrite to replace it")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sampling = _key_values(args.sampling, option="--sampling", cast=_yaml_value)
    table = check_checkpoint(args.checkpoint, store=args.store, period=tuple(args.period) if args.period else None,
                             samples=args.samples, seed=args.seed, sampling=sampling)
    if args.out:
        out = Path(args.out)
        partial = out.with_name(out.name + ".partial")
        table.to_csv(partial, index=False)
        partial.replace(out)
    for column, what in (("noise_left", "share of the noise power left at the smallest quarter of zonal scales"),
                         ("small_scale_error", "small-scale error power of the denoised estimate / the target's")):
        wide = table.pivot_table(index=["frame", "step", "sigma"], columns="channel", values=column, sort=False)
        print(f"{column}: {what}")
        print(wide.to_string(float_format=lambda v: f"{v:.3g}"))
        print()
    if args.out:
        print(f"wrote {args.out}")


def _cmd_regrid(args: argparse.Namespace) -> None:
    from forecasting.inference import regrid_forecast

    out = regrid_forecast(args.forecast, like=args.like, out=args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {args.forecast} interpolated (bilinear) onto the grid of {args.like}")


def _cmd_downscale(args: argparse.Namespace) -> None:
    from forecasting.downscaling import downscale

    starts = _start_times(args) if (args.start or args.starts) else None
    out = downscale(
        args.forecast, checkpoint=args.checkpoint, out=args.out, members_per_input=args.members_per_input,
        starts=starts, leads=[f"{h}h" for h in args.leads] if args.leads else None, sampler=args.sampler,
        sampling_steps=args.sampling_steps, seed=args.seed,
        batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
    )
    print(f"wrote fine forecast {out}: {args.forecast} downscaled with {args.checkpoint}, "
          f"{args.members_per_input} member(s) per input member")


def _cmd_pairs(args: argparse.Namespace) -> None:
    from forecasting.data.pairs import make_derived_pairs

    pairs = make_derived_pairs(
        args.sources, args.out, factor=args.factor, variables=args.variables,
        time=(args.start, args.end) if (args.start or args.end) else None,
        area=tuple(args.area) if args.area else None,
        train_period=(args.train_start, args.train_end) if (args.train_start or args.train_end) else None,
        overwrite=args.overwrite,
    )
    print(f"wrote derived pair: coarse {pairs.coarse}, fine {pairs.fine}")


def _prefect_flows(quiet: bool = False):
    """The flow registry (imported only here: the library itself never imports Prefect)."""
    import os

    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from workflows import flows

    return flows


def _cmd_quickstart(args: argparse.Namespace) -> None:
    if args.no_prefect:
        from forecasting.quickstart import run_quickstart

        report = run_quickstart(Path(args.workdir), fast=args.fast, overwrite=args.overwrite, progress=not args.quiet)
    else:
        flows = _prefect_flows(args.quiet)
        report = flows.quickstart_flow(workdir=args.workdir, fast=args.fast, overwrite=args.overwrite,
                                       progress=not args.quiet)
    html = Path(report).with_suffix(".html")
    print(f"quickstart report: {report}" + (f" (HTML: {html})" if html.exists() else ""))


def _cmd_run(args: argparse.Namespace) -> None:
    from forecasting.backtest import load_forecast_run

    load_forecast_run(args.config)  # a bad config fails here, before any flow run
    flows = _prefect_flows(args.quiet)
    if args.verify_only:
        if args.start:
            raise ForecastingError("--start makes a forecast; it does not go with --verify-only")
        verified = flows.verify_flow(config=args.config, overwrite=args.overwrite)
        print(f"verified {len(verified)} earlier forecasts: {', '.join(verified) or 'none were due'}")
        return
    result = flows.forecast_flow(config=args.config, start=args.start, overwrite=args.overwrite)
    verified = result["verified"]
    print(f"forecast: {result['forecast']}")
    print(f"verified {len(verified)} earlier forecasts: {', '.join(verified) or 'none were due'}")


def _cmd_backtest(args: argparse.Namespace) -> None:
    from forecasting.backtest import load_forecast_run, run_backtest

    if args.workers is not None and args.workers < 1:
        raise ForecastingError(f"--workers must be >= 1; got {args.workers}")
    if args.address and args.workers:
        raise ForecastingError("--address uses an existing Dask cluster and --workers sizes a new one: give one")
    config = load_forecast_run(args.config)  # a bad config fails here, before any flow run
    if not args.no_prefect:
        outcome = _prefect_flows(args.quiet).backtest_flow(
            config=args.config, overwrite=args.overwrite, address=args.address, workers=args.workers)
        computed, reused, summary = outcome["computed"], outcome["reused"], outcome["summary"]
    elif args.workers:
        raise ForecastingError("--workers sizes the LocalCluster of the Prefect flow; with --no-prefect the start "
                               "times run one after the other, or on the cluster at --address")
    else:
        log = None if args.quiet else print
        if args.address:
            from distributed import Client

            with Client(args.address, timeout="30s") as client:
                result = run_backtest(config, client=client, overwrite=args.overwrite, log=log)
        else:
            result = run_backtest(config, overwrite=args.overwrite, log=log)
        computed, reused, summary = result.computed, result.reused, result.summary
    print(f"backtest: {len(computed)} start times scored now, {len(reused)} already scored; "
          f"summary: {Path(summary) / 'summary.md'}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from workflows.serve import serve_deployments

    serve_deployments(args.config)


def _cmd_flow(args: argparse.Namespace) -> None:
    import yaml

    flows = _prefect_flows(args.quiet)
    parameters = {k: yaml.safe_load(v) for k, v in _key_values(args.param, option="--param").items()}
    if args.config is not None:
        parameters["config"] = args.config
    print(f"flow {args.name} returned: {flows.run_flow(args.name, parameters)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forecast",
        description="Data-driven probabilistic weather forecasting: simulate, ingest, train, forecast, verify.",
    )
    parser.add_argument("--version", action="store_true", help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "quickstart",
        help="run the whole pipeline on the built-in data (a Prefect flow)",
        description="Simulate the built-in dataset, ingest it into analysis-ready Zarr stores (coarse global, "
        "fine regional, stations), train small versions of the models listed in configs/quickstart.yaml, "
        "forecast ensembles for the held-out last quarter, verify them and the persistence and climatology "
        "baselines against the gridded truth and the stations, and write WORKDIR/report.md and report.html "
        "(timings, scorecards, plots). Each step is a task of the 'quickstart' Prefect flow (no server needed); "
        "steps already done are reused, so an interrupted run continues where it stopped.",
    )
    p.add_argument("--workdir", default="data/quickstart", help="where everything is written (default: %(default)s)")
    p.add_argument("--fast", action="store_true",
                   help="a small, quick version: a 30-day, low-resolution simulation and a few training steps")
    p.add_argument("--overwrite", action="store_true", help="recompute every step, even those already done")
    p.add_argument("--no-prefect", action="store_true", help="run the steps in this process without Prefect")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only warnings from Prefect")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser(
        "run",
        help="forecast from the latest analysis and verify earlier forecasts (the 'forecast' flow)",
        description="One cycle of an operational forecast, as the 'forecast' Prefect flow: the model of CONFIG "
        "(its 'forecast' section, e.g. configs/backtest.yaml: checkpoint, stores, members, steps, out) forecasts "
        "from the latest analysis time "
        "all its stores hold (or --start) into OUT/forecasts/<start>.zarr; then every earlier forecast in "
        "OUT/forecasts whose leads the truth now covers, and that is not verified yet, is verified against the "
        "truth and the stations into OUT/verification/<start>/. A forecast that exists is not made again.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML with a 'forecast' section (e.g. configs/backtest.yaml)")
    p.add_argument("--start", metavar="TIME", help="the start time (default: the latest analysis time in the stores)")
    p.add_argument("--verify-only", action="store_true", help="only verify earlier forecasts (the 'verify' flow)")
    p.add_argument("--overwrite", action="store_true", help="make the forecast (and verifications) again")
    p.add_argument("--quiet", action="store_true", help="only warnings from Prefect")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "backtest",
        help="forecast and score many start times on a Dask cluster (the 'backtest' flow)",
        description="Forecast every start time of CONFIG's 'starts' with its model, score each against the "
        "gridded truth, the stations and the baselines for the same start, and stream the scores to "
        "OUT/scores/<start>.nc, one small file per start time; then write OUT/summary (scores, scorecards "
        "against each baseline, plots, summary.md). Start times fan out over Dask: the scheduler at the "
        "config's dask.address, else a LocalCluster of dask.n_workers workers. Start times already scored are "
        "skipped, so an interrupted backtest run again computes only the missing ones.",
    )
    p.add_argument("config", metavar="CONFIG",
                   help="YAML with a 'forecast' section holding 'starts' (e.g. configs/backtest.yaml)")
    p.add_argument("--address", metavar="ADDR",
                   help="run on this Dask scheduler (e.g. tcp://127.0.0.1:8786) instead of the config's dask section")
    p.add_argument("--workers", type=int, metavar="N", help="workers of the LocalCluster (default: dask.n_workers)")
    p.add_argument("--no-prefect", action="store_true",
                   help="without Prefect: start times one after the other in this process, or on --address")
    p.add_argument("--overwrite", action="store_true", help="score every start time again")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only warnings from Prefect")
    p.set_defaults(func=_cmd_backtest)

    p = sub.add_parser(
        "serve",
        help="serve the flows as deployments on cron schedules against a Prefect server",
        description="Register the deployments of CONFIG (its 'serve' section, e.g. configs/serve.yaml: flow, cron or "
        "interval, parameters) "
        "with the Prefect server at PREFECT_API_URL and run their scheduled flow runs until stopped (Ctrl-C). "
        "Start a server first: 'prefect server start --host 127.0.0.1', then "
        "'export PREFECT_API_URL=http://127.0.0.1:4200/api'; watch the runs at http://127.0.0.1:4200.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML with a 'serve' section (e.g. configs/serve.yaml)")
    p.set_defaults(func=_cmd_serve)

    from typing import get_args

    from forecasting.config import FlowName

    p = sub.add_parser(
        "flow",
        help="run one Prefect flow by name (ingest, train, forecast, verify, backtest, quickstart, downscale)",
        description="Run the named flow once, locally (Prefect's temporary server) or against PREFECT_API_URL, "
        "exactly as a deployment of 'forecast serve' would: ingest CONFIG (its 'ingest' entries), train CONFIG, "
        "forecast CONFIG, verify CONFIG, backtest CONFIG, quickstart (--param workdir=DIR --param fast=true), "
        "downscale (--param forecast=F.zarr --param checkpoint=CKPT --param out=OUT.zarr).",
    )
    p.add_argument("name", choices=list(get_args(FlowName)))
    p.add_argument("config", nargs="?", metavar="CONFIG", help="the flow's config file")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="another flow parameter (YAML value: true, 3, text); repeatable")
    p.add_argument("--quiet", action="store_true", help="only warnings from Prefect")
    p.set_defaults(func=_cmd_flow)

    p = sub.add_parser(
        "simulate",
        help="write the built-in physical dataset (synthetic reanalysis + stations)",
        description="Run the forced-dissipative shallow-water simulator and write DIR/global_coarse.nc "
        "(5.625 deg), DIR/regional_fine.nc (the fine regional box), DIR/stations.parquet and DIR/simulation.json.",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--years", type=float, help="simulated years after spin-up (default 1)")
    p.add_argument("--seed", type=int, help="random seed (default 0); same seed, same data")
    p.add_argument("--nlat", type=int, help="latitudes of the model grid, a multiple of 32 (default 128)")
    p.add_argument("--config", help="experiment YAML whose 'simulation' section gives the defaults")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "ingest",
        help="conform sources and write an analysis-ready Zarr store with statistics",
        description="Read SOURCEs (files, globs, URLs or catalog names), map them onto the canonical schema, "
        "check them and write STORE.zarr (one time step per chunk) with normalisation statistics. Station "
        "tables (CSV, Parquet, station netCDF) are quality-controlled and written as a (station, time) store "
        "with a QC report beside it.",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="files, globs, URLs or catalog names")
    p.add_argument("--out", help="output Zarr store")
    p.add_argument("--config", help="experiment YAML whose 'ingest' entries are run (instead of SOURCEs)")
    p.add_argument("--variables", nargs="+", metavar="V", help="canonical variable names to keep")
    p.add_argument("--levels", nargs="+", type=float, metavar="HPA", help="pressure levels to keep")
    p.add_argument("--start", help="first time to keep (ISO)")
    p.add_argument("--end", help="last time to keep (ISO)")
    p.add_argument("--area", nargs=4, type=float, metavar=("LAT_MIN", "LAT_MAX", "LON_MIN", "LON_MAX"),
                   help="keep only this box (lon_min > lon_max wraps across 0E)")
    p.add_argument("--train-start", help="first time of the training period used for statistics")
    p.add_argument("--train-end", help="last time of the training period used for statistics")
    p.add_argument("--rename", action="append", metavar="SRC=NAME", help="map a source variable to a canonical name")
    p.add_argument("--units", action="append", metavar="VAR=UNITS", help="declare units missing or wrong in the file")
    p.add_argument("--level", action="append", metavar="VAR=HPA", help="attach a pressure level to a variable")
    p.add_argument("--reference-time", help="start of integer hour offsets when the file gives none")
    p.add_argument("--nan-policy", choices=["error", "fixed", "allow"], default="error",
                   help="NaNs: error (default), fixed (a static mask; all-missing time steps dropped), allow")
    p.add_argument("--append", action="store_true", help="append new times to an existing store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--dask-address", help="run on an existing Dask scheduler (e.g. tcp://127.0.0.1:8786)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser(
        "baseline",
        help="write persistence, climatology or perfect-model forecasts from an analysis store",
        description="Persistence (the analysis at the start time, for every lead), climatology (a smoothed "
        "day-of-year and time-of-day mean of the analysis) or, for a store of the built-in data, the "
        "perfect model (the simulator itself restarted from the true state, members differing only in the "
        "future stirring the data do not carry: the skill no forecaster of the data can beat) forecasts in "
        "the forecast layout, as Zarr.",
    )
    p.add_argument("kind", choices=["persistence", "climatology", "perfect-model"])
    p.add_argument("--truth", required=True, help="analysis store the baseline is made from")
    p.add_argument("--out", required=True, help="output forecast Zarr")
    p.add_argument("--start", action="append", metavar="TIME", help="a start time (repeatable)")
    p.add_argument("--starts", nargs=3, metavar=("FROM", "TO", "EVERY"), help="start times FROM..TO every EVERY (e.g. 24h)")
    p.add_argument("--steps", type=int, default=20, help="number of leads (default %(default)s)")
    p.add_argument("--step-hours", type=float, default=6, help="hours between leads (default %(default)s)")
    p.add_argument("--members", type=int, default=1, help="perfect-model members (default %(default)s)")
    p.add_argument("--climatology-period", nargs=2, metavar=("FROM", "TO"),
                   help="period the climatology is computed over (default: the store's training period, else all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing forecast")
    p.set_defaults(func=_cmd_baseline)

    p = sub.add_parser(
        "verify",
        help="score a forecast against gridded truth and stations; scorecard and plots",
        description="Write DIR/scores.nc and scores.csv (metric, variable, lead, region, model), a scorecard "
        "against the reference with paired-bootstrap significance, plots and DIR/summary.md.",
    )
    p.add_argument("--forecast", required=True, help="forecast Zarr (an analysis store counts as a lead-0 forecast)")
    p.add_argument("--truth", help="gridded truth store on the same grid")
    p.add_argument("--obs", help="observations: a station store, CSV, Parquet or station netCDF")
    p.add_argument("--reference", action="append",
                   help="persistence, climatology (built from --truth) or another forecast Zarr; repeatable (all are "
                        "scored, the scorecard is against the first)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--region", action="append", nargs=5, metavar=("NAME", "LAT_MIN", "LAT_MAX", "LON_MIN", "LON_MAX"),
                   help="an extra named region to score (repeatable)")
    p.add_argument("--station-method", choices=["bilinear", "nearest"], default="bilinear",
                   help="interpolation to stations (default %(default)s)")
    p.add_argument("--chunk-starts", type=int, default=8, help="start times held in memory at once (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the scorecard (default %(default)s)")
    p.add_argument("--bootstrap-block", type=_block_length, default="auto", metavar="L",
                   help="consecutive start times per block of the scorecard's circular block bootstrap: a number "
                        "(1: the ordinary bootstrap) or auto, chosen from the scores' autocorrelation (default %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "train",
        help="train a forecaster (PyTorch Lightning) from an experiment config",
        description="Train the model of CONFIG ('model', 'data' and 'training' sections) on its stores. Writes "
        "DIR/model.pt (the model checkpoint for 'forecast predict'), DIR/checkpoints/last.ckpt (to resume), "
        "CSV and TensorBoard logs and the resolved config; DIR defaults to training.out_dir, else runs/<name>.",
    )
    p.add_argument("config", metavar="CONFIG", help="experiment YAML (e.g. configs/graph.yaml)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: training.out_dir or runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the stopped run in DIR exactly where it was")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N optimiser steps in all (the learning-rate schedule keeps training.max_steps)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar or Lightning messages")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "predict",
        help="ensemble forecasts from a trained model, streamed to Zarr",
        description="Roll the model of CKPT out STEPS steps from each start time, MEMBERS members batched "
        "together, and write the forecast lead by lead to OUT.zarr (one group per grid for a stretched-grid "
        "model), with provenance attributes. Initial conditions come from the stores of the model's config "
        "unless --store GRID=PATH is given.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="model checkpoint (model.pt of forecast train)")
    p.add_argument("--start", action="append", metavar="TIME", help="a start time (repeatable)")
    p.add_argument("--starts", nargs=3, metavar=("FROM", "TO", "EVERY"), help="start times FROM..TO every EVERY (e.g. 24h)")
    p.add_argument("--members", type=int, default=1, help="ensemble members (default %(default)s)")
    p.add_argument("--steps", type=int, required=True, help="number of model steps (leads)")
    p.add_argument("--out", required=True, help="output forecast Zarr")
    p.add_argument("--store", action="append", metavar="GRID=PATH",
                   help="initial-condition store of a grid (global, regional); repeatable")
    p.add_argument("--boundary", metavar="PATH",
                   help="limited-area models: boundary analysis store or forecast Zarr (default: the global store)")
    p.add_argument("--seed", type=int, default=0, help="seed of the members' noise (default %(default)s)")
    p.add_argument("--batch-size", type=int, metavar="N", help="start times x members per model call (default: all)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s; e.g. cuda)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: one per core; 1 is often faster on a busy machine)")
    p.add_argument("--sampling", action="append", metavar="KEY=VALUE",
                   help="diffusion families: a sampler setting replacing the checkpoint's for this forecast "
                   "(sampler, sampling_steps, member_batch, initial_perturbation, perturbation_length, "
                   "perturbation_scales, initial_perturbation_scales, perturbation_map_hours, "
                   "perturbation_map_power, spectral_filter_hours, spectral_filter_order for all three; churn, "
                   "s_noise, s_tmin, s_tmax for the conditional and rolling families; the conditional family's "
                   "schedule sigma_min, sigma_max, rho; init_steps for rolling; window_perturbation for all three; "
                   "perturbation_every for the conditional and rolling families; estimate_perturbation and "
                   "forecaster_dropout_at_inference for dyffusion); "
                   "repeatable, values in YAML, e.g. 'perturbation_scales={2m_temperature: 0}' or "
                   "spectral_filter_hours=null")
    p.add_argument("--overwrite", action="store_true", help="replace an existing forecast")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "check-denoiser",
        help="how much noise a diffusion model's denoiser leaves at each noise level its sampler visits",
        description="Noise validation windows at each noise level the sampler of CKPT visits (the conditional "
        "family's EDM schedule; each frame's level at each step of a rolling pass), denoise them and print, per "
        "channel, the share of the noise power the denoiser leaves at the smallest quarter of the zonal scales "
        "(1: none removed) and the denoised estimate's small-scale error against the target's power there. "
        "Noise left at the last levels stays in every forecast state.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a diffusion or rolling model.pt")
    p.add_argument("--store", metavar="STORE.zarr", help="windows from this store (default: the model's own)")
    p.add_argument("--period", nargs=2, metavar=("START", "END"),
                   help="windows within these times (default: the config's validation period)")
    p.add_argument("--samples", type=int, default=16, help="windows, evenly spread (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default %(default)s)")
    p.add_argument("--sampling", action="append", metavar="KEY=VALUE",
                   help="a sampler setting replacing the checkpoint's, as for forecast predict (e.g. sigma_min=0.1 "
                   "for the diffusion family); repeatable")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--out", metavar="FILE.csv", help="also write the table as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.csv")
    p.set_defaults(func=_cmd_check_denoiser)

    p = sub.add_parser(
        "regrid",
        help="interpolate a forecast onto another store's grid (bilinear)",
        description="Interpolate the forecast F.zarr (bilinear; periodic in longitude for global grids) onto the "
        "latitude-longitude grid of STORE.zarr and write it to OUT.zarr in the same forecast layout: e.g. a coarse "
        "global model on the fine regional grid, as the reference a regional product is verified against.",
    )
    p.add_argument("forecast", metavar="F.zarr", help="forecast Zarr (a group such as F.zarr/global for a stretched-grid model)")
    p.add_argument("--like", required=True, metavar="STORE.zarr", help="store whose latitude/longitude grid to interpolate onto")
    p.add_argument("--out", required=True, metavar="OUT.zarr", help="output forecast Zarr")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_regrid)

    p = sub.add_parser(
        "downscale",
        help="downscale a coarse forecast to the fine regional grid with a trained downscaling model",
        description="Turn the coarse forecast F.zarr (forecast layout; an analysis store counts as a lead-0 forecast) "
        "into a fine regional forecast OUT.zarr in the same layout with the downscaling model CKPT (regression + "
        "residual diffusion): start times and leads are kept (all, or those of --start/--starts and --leads), each input "
        "member gives --members-per-input members, streamed lead by lead, with provenance attributes.",
    )
    p.add_argument("forecast", metavar="F.zarr", help="coarse forecast Zarr (a group such as F.zarr/global) or analysis store")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="downscaling checkpoint (model.pt of forecast train)")
    p.add_argument("--out", required=True, metavar="OUT.zarr", help="output fine forecast Zarr")
    p.add_argument("--members-per-input", type=int, default=1, metavar="K",
                   help="output members per input member (default %(default)s; 1 for a regression-only model)")
    p.add_argument("--start", action="append", metavar="TIME", help="a start time to downscale (repeatable; default: all)")
    p.add_argument("--starts", nargs=3, metavar=("FROM", "TO", "EVERY"), help="start times FROM..TO every EVERY (e.g. 24h)")
    p.add_argument("--leads", nargs="+", type=float, metavar="HOURS", help="leads to downscale, in hours (default: all)")
    p.add_argument("--sampler", choices=["euler", "heun", "dpmpp_2m"], help="diffusion solver (default: the checkpoint's)")
    p.add_argument("--sampling-steps", type=int, metavar="N", help="schedule intervals (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' noise (default %(default)s)")
    p.add_argument("--batch-size", type=int, metavar="N", help="samples per network call (default: model.member_batch)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s; e.g. cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_downscale)

    p = sub.add_parser(
        "pairs",
        help="make derived (coarse, fine) downscaling pairs by coarsening a fine dataset",
        description="Read a fine dataset (files, globs, URLs or catalog names), average blocks of FACTOR x FACTOR cells "
        "(area-weighted) into a coarse grid, and write DIR/coarse.zarr and DIR/fine.zarr (the fine points between the "
        "coarse cell centres) as training stores labelled as derived.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="fine dataset: files, globs, URLs or catalog names")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of the pair")
    p.add_argument("--factor", type=int, required=True, help="fine cells per coarse cell along each axis (e.g. 4)")
    p.add_argument("--variables", nargs="+", metavar="V", help="canonical variable names to keep")
    p.add_argument("--start", help="first time to keep (ISO)")
    p.add_argument("--end", help="last time to keep (ISO)")
    p.add_argument("--area", nargs=4, type=float, metavar=("LAT_MIN", "LAT_MAX", "LON_MIN", "LON_MAX"),
                   help="keep only this box (on one side of the 0/360 meridian, longitudes in 0..360)")
    p.add_argument("--train-start", help="first time of the statistics period")
    p.add_argument("--train-end", help="last time of the statistics period")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_pairs)

    p = sub.add_parser("stats", help="print a store's contents and normalisation statistics",
                       description="Print the variables, time axis, chunks and statistics of STORE.zarr.")
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from forecasting import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 1
    try:
        args.func(args)
    except ForecastingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def app() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    app()
