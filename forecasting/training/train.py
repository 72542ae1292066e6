"""``forecast train``: train a forecaster from an experiment config with PyTorch Lightning.

A run directory (``--out``, else ``training.out_dir``, else ``runs/<name>``) holds:

* ``config.json``: the resolved config (a resumed run must use the same one);
* ``checkpoints/last.ckpt``: the Lightning checkpoint (weights, optimiser, scheduler, loop state) written
  every ``training.checkpoint_every`` steps and at the end; ``--resume`` continues from it exactly;
* ``model.pt``: the model checkpoint for inference (:mod:`forecasting.training.checkpoint`), at the end;
* ``logs/version_N/metrics.csv`` (CSV logger) and ``tensorboard/version_N`` (when tensorboard is
  installed), one version per run segment; ``graph_summary.json`` (node and edge counts of the graph).

Hardware comes from the config: ``accelerator`` (auto: a GPU when there is one), ``devices``,
``num_nodes`` and ``strategy`` (``ddp`` across GPUs and nodes, launched by torchrun or SLURM as Lightning
supports), ``precision`` (auto: ``bf16-mixed`` autocast on a GPU, ``32-true`` on the CPU). Everything is
checked (stores, variables, region, periods) before the run directory is touched.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from forecasting.config import ConfigError, ExperimentConfig, GraphModelConfig, TrainingConfig
from forecasting.errors import ForecastingError
from forecasting.forecasters import GLOBAL, REGIONAL, GraphForecaster, build_forecaster
from forecasting.training.data import ForecastDataModule, NodeWindowDataset, open_training_store
from forecasting.training.module import ForecastModule, Objective, RolloutObjective

__all__ = ["TrainResult", "TrainingSetup", "train"]

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class TrainingSetup:
    """What the engine needs from a family: the module to optimise, its objective, data and an exporter.

    ``model`` is what ``objective`` calls (trained in place); ``val`` is None without a validation period;
    ``export(path, metadata)`` writes the inference checkpoint of the trained model; ``summary`` is written
    to the run directory as ``graph_summary.json`` (JSON-serialisable).
    """

    model: torch.nn.Module
    objective: Objective
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    val_rollout_steps: int
    export: Callable[[Path, dict], Path]
    summary: dict


@dataclass(frozen=True)
class TrainResult:
    """Where a run wrote its outputs, how far it got and its last logged metrics."""

    out_dir: Path
    checkpoint: Path
    resume_checkpoint: Path
    global_step: int
    metrics: dict[str, float]


def _graph_setup(config: ExperimentConfig) -> TrainingSetup:
    """Forecaster, objective and windows of the graph family (checks stores, variables, region, periods)."""
    training = config.training
    assert training is not None and config.data is not None and isinstance(config.model, GraphModelConfig)
    forecaster = build_forecaster(config)
    assert isinstance(forecaster, GraphForecaster)
    data = config.data
    paths = {GLOBAL: data.global_store, REGIONAL: data.regional_store}
    stores = {grid: open_training_store(paths[grid], in_memory=data.in_memory) for grid in forecaster.grids}
    boundary = open_training_store(paths[GLOBAL], in_memory=data.in_memory) if forecaster.limited_area else None
    val_steps = training.val_rollout_steps or training.max_rollout_steps

    def windows(target_steps: int, period, what: str) -> NodeWindowDataset:
        return NodeWindowDataset(
            forecaster, stores, boundary_store=boundary,
            target_steps=target_steps, time=period, source=f"{what} period {list(period)}",
        )

    train_set = windows(training.max_rollout_steps, training.train_period, "training")
    val_set = windows(val_steps, training.val_period, "validation") if training.val_period is not None else None
    objective = RolloutObjective(
        node_weights=forecaster.loss_node_weights(training.regional_loss_share),
        channel_weights=forecaster.channel_weights(training.variable_weights),
        error_scale=forecaster.normalisation.tendency_std,
        ensemble_size=training.ensemble_size if forecaster.probabilistic else None,
        channel_names=forecaster.channels.names,
    )

    def export(path: Path, metadata: dict) -> Path:
        return forecaster.save_checkpoint(path, config=config, metadata=metadata)

    return TrainingSetup(
        model=forecaster.rollout, objective=objective, train=train_set, val=val_set, val_rollout_steps=val_steps,
        export=export, summary=forecaster.graph.summary(),
    )


def _diffusion_setup(config: ExperimentConfig) -> TrainingSetup:
    """The conditional diffusion family (its module builds on the forecasters, so it is imported on use)."""
    from forecasting.diffusion.conditional import diffusion_training_setup

    return diffusion_training_setup(config)


def _rolling_setup(config: ExperimentConfig) -> TrainingSetup:
    """The rolling diffusion family (imported on use, as the conditional diffusion family)."""
    from forecasting.diffusion.rolling import rolling_training_setup

    return rolling_training_setup(config)


def _dyffusion_setup(config: ExperimentConfig) -> TrainingSetup:
    """The DYffusion family, both stages in one run (imported on use, as the conditional diffusion family)."""
    from forecasting.diffusion.dyffusion import dyffusion_training_setup

    return dyffusion_training_setup(config)


def _downscaling_setup(config: ExperimentConfig) -> TrainingSetup:
    """The downscaling family (regression + residual diffusion; its module imports this one on use)."""
    from forecasting.downscaling import downscaling_training_setup

    return downscaling_training_setup(config)


#: Trainable families: family -> setup builder. Families without an entry have nothing to train.
TRAINABLE: dict[str, Callable[[ExperimentConfig], TrainingSetup]] = {
    "graph": _graph_setup, "diffusion": _diffusion_setup, "downscaling": _downscaling_setup,
    "rolling": _rolling_setup, "dyffusion": _dyffusion_setup,
}


def _initialise_weights(model: torch.nn.Module, path: str, *, family: str, model_config: Any = None) -> None:
    """Load the weights of the model checkpoint ``path`` (``training.init_from``) into ``model``.

    The checkpoint must be of ``family`` and hold exactly the parameters of ``model`` with the same shapes
    (the network sizes of the config); otherwise ConfigError/SourceError name the file and what differs.
    Graph networks share their weights across nodes, so a checkpoint trained on another mesh or grid loads;
    but not across ``model.nesting: refine`` and the others, whose regional outputs mean different things
    (a correction to the interpolated coarse tendency, or the whole tendency) with the same shapes, nor
    across ``model.encoder_aggregation`` (the encoder's weights were fitted to sums or to means).

    A coarse-only graph model (``model.mode: global``) also starts a stretched one of the same sizes (transfer
    learning, as anemoi does from a global model to a stretched or limited-area one): the stretched network
    reads more inputs per data node (the regional flag, and with ``detail_inputs`` the fine detail), so the
    first layer of its data-node embedding takes the global model's columns and zeros for the new ones. The
    other weights load unchanged, so at the start the network treats the fine nodes as more coarse points
    (with ``refine`` its output there is added to the interpolated coarse tendency until training corrects it).
    """
    from forecasting.training.checkpoint import load_checkpoint

    where = f"training.init_from {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist (a model checkpoint, e.g. runs/NAME/model.pt, is expected)")
    checkpoint = load_checkpoint(path, family=family)
    state = checkpoint.state_dict
    transfer = False
    if family == "graph" and model_config is not None:
        their_mode = (checkpoint.config.get("model") or {}).get("mode", "stretched")
        transfer = their_mode == "global" and model_config.mode == "stretched"
        if their_mode != model_config.mode and not transfer:
            raise ConfigError(
                f"{where} was trained with model.mode {their_mode!r} and the config asks for "
                f"{model_config.mode!r}: a graph model starts another of its own mode, or a stretched one from "
                "a global one"
            )
        theirs = (checkpoint.config.get("model") or {}).get("nesting", "cutout")
        if not transfer and (theirs == "refine") != (model_config.nesting == "refine"):
            raise ConfigError(
                f"{where} was trained with model.nesting {theirs!r} and the config asks for "
                f"{model_config.nesting!r}: the network's regional output means another thing in 'refine'; "
                f"fine-tune with model.nesting: {theirs}"
            )
        theirs = (checkpoint.config.get("model") or {}).get("encoder_aggregation", "sum")
        if theirs != model_config.encoder_aggregation:
            raise ConfigError(
                f"{where} was trained with model.encoder_aggregation {theirs!r} and the config asks for "
                f"{model_config.encoder_aggregation!r}: the same weights read messages of another scale; "
                f"fine-tune with model.encoder_aggregation: {theirs}"
            )
    own = model.state_dict()
    if transfer:
        state = _widen_data_embedding(state, own, model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or reshaped:
        details = "; ".join(f"{what}: {names[:4]}{' ...' if len(names) > 4 else ''}" for what, names in
                            (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped)) if names)
        raise ConfigError(
            f"{where}: its network does not match the config's model section ({details}); "
            "fine-tune with the model settings the checkpoint was trained with"
        )
    model.load_state_dict(state)


def _widen_data_embedding(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """A global graph model's weights with the first data-embedding layer widened to ``own``'s inputs.

    The embedding reads ``[inputs, node position features]``; a stretched model's inputs are the global
    model's followed by its extra channels (regional flag, fine detail), whose columns start at zero. Other
    weights are returned as they are (shape mismatches are reported by the caller).
    """
    from forecasting.models.graph_network import EncodeProcessDecode

    networks = [m for m in model.modules() if isinstance(m, EncodeProcessDecode)]
    if len(networks) != 1:
        return state
    n_position = networks[0].data_node_features.shape[1]
    widened = dict(state)
    for name, theirs in state.items():
        if not name.endswith("data_embed.net.0.weight") or name not in own:
            continue
        ours = own[name]
        if ours.shape[0] != theirs.shape[0] or ours.shape[1] <= theirs.shape[1]:
            continue
        n_theirs = theirs.shape[1] - n_position  # the global model's inputs, before the position features
        n_ours = ours.shape[1] - n_position
        weight = torch.zeros_like(ours)
        weight[:, :n_theirs] = theirs[:, :n_theirs]
        weight[:, n_ours:] = theirs[:, n_theirs:]
        widened[name] = weight
    return widened


def _precision(training: TrainingConfig) -> str:
    if training.precision != "auto":
        return training.precision
    gpu = training.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu else "32-true"


def _loggers(out: Path) -> list[Logger]:
    """CSV logs always; TensorBoard logs too when tensorboard (or tensorboardX) is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir=out, name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir=out, name="tensorboard", default_hp_metric=False))
    return loggers


@contextmanager
def _lightning_messages(show: bool) -> Iterator[None]:
    """Lightning's informational messages (devices, tips) only when progress is shown."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    if not show:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def train(
    config: ExperimentConfig,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the model of ``config`` (see the module docstring); returns where everything went.

    ``max_steps`` stops the run after that many optimiser steps in all (the learning-rate schedule still
    spans ``training.max_steps``), so a run can be split into pieces continued with ``resume``.

    Raises ConfigError for a missing section, an untrainable family or a changed config on resume;
    ForecastingError when the run directory exists (without ``resume`` or ``overwrite``) or there is
    nothing to resume; SchemaError/StoreError for bad stores, variables, regions or periods. Nothing is
    written before all of these checks pass.
    """
    for section in ("model", "data", "training"):
        if getattr(config, section) is None:
            raise ConfigError(f"training needs a '{section}' section in the config")
    training = config.training
    assert training is not None and config.model is not None
    family = config.model.family
    if family not in TRAINABLE:
        raise ConfigError(f"model family {family!r} has nothing to train; trainable families: {sorted(TRAINABLE)}")
    stop = training.max_steps if max_steps is None else int(max_steps)
    if stop < 1:
        raise ConfigError(f"max_steps must be >= 1; found {stop}")
    out = Path(out_dir or training.out_dir or Path("runs") / config.name)
    resolved = config.model_dump(mode="json")
    last = out / LAST_CHECKPOINT
    # Under DDP every process runs this function (torchrun, SLURM, or Lightning re-running the command
    # for ranks > 0); only rank 0 checks, clears and creates the run directory.
    manager = rank_zero_only.rank == 0
    if resume:
        if not last.is_file():
            raise ForecastingError(f"nothing to resume: {last} does not exist")
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else None
        if saved != resolved:
            raise ConfigError(
                f"the config differs from the one the run in {out} was started with ({out / 'config.json'}); "
                "resume with the same config, or start a new run with --out"
            )
    elif manager and out.exists() and any(out.iterdir()) and not overwrite:
        raise ForecastingError(f"run directory {out} already exists; pass --resume to continue it or --overwrite to start again")

    seed_everything(training.seed, verbose=False)
    if training.num_threads is not None:
        torch.set_num_threads(training.num_threads)
    setup = TRAINABLE[family](config)
    if training.init_from is not None and not resume:  # a resumed run restores its own weights
        _initialise_weights(setup.model, training.init_from, family=family, model_config=config.model)

    if manager and not resume:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
        (out / "graph_summary.json").write_text(json.dumps(setup.summary, indent=2))

    module = ForecastModule(
        setup.model,
        setup.objective,
        learning_rate=training.learning_rate,
        min_learning_rate=training.min_learning_rate,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_steps,
        max_steps=training.max_steps,
        rollout=[(stage.at_step, stage.steps) for stage in training.rollout],
        val_rollout_steps=setup.val_rollout_steps,
        seed=training.seed,
    )
    data = ForecastDataModule(
        setup.train, setup.val, batch_size=training.batch_size, num_workers=training.num_workers,
        seed=training.seed, val_batches=training.val_batches,
    )
    checkpointing = ModelCheckpoint(
        dirpath=out / LAST_CHECKPOINT.parent, every_n_train_steps=training.checkpoint_every, save_last=True,
        save_top_k=0,
    )
    with warnings.catch_warnings(), _lightning_messages(progress):
        # Lightning's advice about worker processes: num_workers is a config choice (0 on small CPU runs).
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        # lightning 2.6 uses torch's LeafSpec, which torch 2.13 deprecates: noise, not a problem of the run.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        trainer = L.Trainer(
            accelerator=training.accelerator,
            devices=training.devices,
            num_nodes=training.num_nodes,
            strategy=training.strategy,
            precision=_precision(training),
            max_steps=stop,
            max_epochs=-1,
            gradient_clip_val=training.gradient_clip,
            val_check_interval=training.val_every,
            check_val_every_n_epoch=None,
            limit_val_batches=training.val_batches if setup.val is not None else 0,
            num_sanity_val_steps=0,
            log_every_n_steps=training.log_every,
            enable_progress_bar=progress,
            enable_model_summary=progress,
            logger=_loggers(out),
            # TQDM counts steps of the endless training stream sensibly (the rich bar shows an epoch "-2").
            callbacks=[checkpointing, LearningRateMonitor(logging_interval="step"),
                       *([TQDMProgressBar()] if progress else [])],
            use_distributed_sampler=False,
            default_root_dir=out,
        )
        # last.ckpt is Lightning's own format (optimiser, loops, callbacks), written by this run: trusted. The
        # model checkpoint for inference (model.pt) is the pickle-free format of training.checkpoint.
        trainer.fit(module, datamodule=data, ckpt_path=last if resume else None, weights_only=False)
        trainer.save_checkpoint(last, weights_only=False)
    model_path = out / MODEL_FILE
    if trainer.is_global_zero:
        setup.export(model_path, {"global_step": int(trainer.global_step), "run_dir": str(out)})
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return TrainResult(out, model_path, last, int(trainer.global_step), metrics)
