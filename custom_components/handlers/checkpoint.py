"""Atomic, resumable checkpoints and best-model selection.

``TrainingCheckpoint`` saves everything a run needs to continue (network, optimizer, scheduler,
trainer counters, best-model state) to one file through an atomic rename, and on start reloads
it with ``weights_only=True``. A run killed at any moment therefore resumes from its last
completed epoch, and the best model of the earlier part of the run is remembered. The checkpoint
also holds the run's fingerprint (:mod:`custom_components.runs.fingerprint`): a resume with other
settings is refused with one line saying what differs. ``ModelLoader`` loads trained weights for
evaluation and inference through the same checked path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from custom_components.handlers.tensorboard_maps import mark_restart
from custom_components.io import InputDataError, atomic_save, load_checkpoint, load_network_weights, state_dict_mismatch
from custom_components.runs.fingerprint import describe_differences, fingerprint_differences

__all__ = ["TrainingCheckpoint", "BestMetricSaver", "SamplerEpochSetter", "ModelLoader"]

logger = logging.getLogger(__name__)


def _unwrap(module: Any) -> Any:
    return module.module if hasattr(module, "module") and isinstance(module, torch.nn.Module) else module


class TrainingCheckpoint:
    """Save ``save_dict`` objects + trainer state every ``interval`` epochs; resume on start.

    Args:
        ckpt_dir: folder of the checkpoint.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (network, optimizer,
            lr_scheduler, :class:`BestMetricSaver` ...). DDP wrappers are unwrapped.
        filename: checkpoint file name (``last.pt``).
        resume: load the file at ``Events.STARTED`` when it exists.
        interval: save every ``interval`` epochs (and always after the last one).
        fingerprint: the run's settings (``runs.run_fingerprint()``), saved with every checkpoint
            and compared on resume.
        force_resume: resume even when the fingerprints differ (a warning lists the differences;
            later checkpoints carry this run's fingerprint).
        summary_writer: TensorBoard writer of the run; after a resume it is told to hide the
            events the interrupted epoch logged past the checkpoint, which are logged again.
    """

    def __init__(
        self,
        ckpt_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "last.pt",
        resume: bool = True,
        interval: int = 1,
        fingerprint: Mapping[str, Any] | None = None,
        force_resume: bool = False,
        summary_writer: Any = None,
    ) -> None:
        self.path = Path(ckpt_dir) / filename
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.interval = max(int(interval), 1)
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.force_resume = force_resume
        self.summary_writer = summary_writer

    def attach(self, engine: Engine) -> None:
        # MONAI's workflows skip run() with only a warning when the loader yields no batch (e.g. each
        # process's share below the batch size with drop_last): the run would "finish" having trained nothing
        if getattr(engine.state, "epoch_length", None) == 0:
            loader = getattr(engine, "data_loader", None)
            dataset = getattr(loader, "dataset", None)
            size = f"{len(dataset)} samples" if hasattr(dataset, "__len__") else "no sample"
            per_process = " in this process" if idist.get_world_size() > 1 else ""
            batch = getattr(loader, "batch_size", None)
            raise InputDataError(
                "training data", f"the training loader yields no batch ({size}{per_process}, batch size {batch}); "
                "lower --batch_size or give more training data",
            )
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        last = engine.state.epoch == engine.state.max_epochs
        if engine.state.epoch % self.interval != 0 and not last:
            return
        if idist.get_rank() != 0:
            return
        state = {name: _unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        state["trainer"] = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "epoch_length": engine.state.epoch_length,
        }
        if self.fingerprint is not None:
            state["fingerprint"] = self.fingerprint
        atomic_save(state, self.path)

    def _check_fingerprint(self, saved: Mapping[str, Any] | None) -> None:
        if self.fingerprint is None:
            return
        if saved is None:
            logger.warning("%s holds no run fingerprint (an older checkpoint): resuming without checking its settings", self.path)
            return
        differences = fingerprint_differences(saved, self.fingerprint)
        if not differences:
            return
        what = describe_differences(differences)
        if self.force_resume:
            logger.warning("%s: resuming with other settings (--force_resume): %s", self.path, what)
            return
        raise InputDataError(
            self.path,
            f"was trained with other settings ({what}); start a new run with --resume false (replaces the checkpoints "
            "in this folder) or another bundle_root, or continue with the new settings with --force_resume true",
        )

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            return
        ckpt = load_checkpoint(self.path, map_location="cpu")
        if not isinstance(ckpt, Mapping) or "trainer" not in ckpt:
            raise InputDataError(self.path, "not a resumable training checkpoint (no trainer state)")
        self._check_fingerprint(ckpt.get("fingerprint"))
        for name, obj in self.save_dict.items():
            if name not in ckpt:
                raise InputDataError(self.path, f"no '{name}' entry to resume from (has {sorted(ckpt)})")
            target = _unwrap(obj)
            if isinstance(target, torch.nn.Module) and (problem := state_dict_mismatch(target, ckpt[name])):
                raise InputDataError(self.path, f"'{name}' does not fit the configured network: {problem}")
            try:
                target.load_state_dict(ckpt[name])
            except (KeyError, ValueError, RuntimeError) as e:
                raise InputDataError(self.path, f"cannot restore '{name}' ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        trainer = ckpt["trainer"]
        if trainer["epoch"] > engine.state.max_epochs:
            raise InputDataError(
                self.path, f"checkpoint is at epoch {trainer['epoch']}, beyond num_epochs {engine.state.max_epochs}"
            )
        engine.state.epoch = int(trainer["epoch"])
        engine.state.iteration = int(trainer["iteration"])
        if self.summary_writer is not None:
            mark_restart(self.summary_writer, engine.state.iteration + 1)
        logger.info("resumed from %s at epoch %d (iteration %d)", self.path, engine.state.epoch, engine.state.iteration)


class BestMetricSaver:
    """Keep the network with the best value of ``metric_name`` (ties: the later epoch wins, as upstream).

    Attach to the validation evaluator; the epoch number is the evaluator's (equal to the trainer's
    under MONAI's ``ValidationHandler``) unless ``epoch_source`` names another engine.
    The saved file holds the network's ``state_dict`` only, loadable with ``weights_only=True``.

    A NaN value (an undefined metric, e.g. a localisation accuracy on a validation split without
    boxes) never wins: while no value has won, no file is written, and a file of that name left by
    an earlier run in the folder is removed (with a warning), so that no stale "best" model can be
    evaluated as this run's.
    """

    def __init__(
        self,
        ckpt_dir: str,
        network: torch.nn.Module,
        metric_name: str = "val_f1",
        filename: str = "model.pt",
        mode: str = "max",
        epoch_source: Engine | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.path = Path(ckpt_dir) / filename
        self.network = network
        self.metric_name = metric_name
        self.mode = mode
        self.epoch_source = epoch_source
        self.best_value: float | None = None
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def _better(self, value: float) -> bool:
        if value != value:  # NaN never wins
            return False
        if self.best_value is None:
            return True
        return value >= self.best_value if self.mode == "max" else value <= self.best_value

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if value != value and self.best_value is None and idist.get_rank() == 0 and self.path.is_file():
            self.path.unlink()
            logger.warning("removed %s of an earlier run: %s is undefined (NaN) in this run", self.path, self.metric_name)
        if not self._better(value):
            return
        self.best_value = value
        # MONAI's ValidationHandler runs the evaluator with the trainer's epoch as its own.
        self.best_epoch = self.epoch_source.state.epoch if self.epoch_source is not None else engine.state.epoch
        if idist.get_rank() == 0:
            atomic_save(_unwrap(self.network).state_dict(), self.path)
            logger.info("new best %s = %.4f at epoch %d -> %s", self.metric_name, value, self.best_epoch, self.path)

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_epoch = int(state["best_epoch"])


class SamplerEpochSetter:
    """Call ``sampler.set_epoch(epoch)`` before each epoch so shuffles differ and survive a resume."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(engine.state.epoch)


class ModelLoader:
    """Load trained weights into ``network`` when the engine starts (evaluation, inference).

    Goes through :func:`custom_components.io.load_network_weights`: a missing or truncated file,
    or weights of another configuration, stop the run with one line naming the file.
    """

    def __init__(self, load_path: str, network: torch.nn.Module, map_location: Any = "cpu") -> None:
        self.load_path = load_path
        self.network = network
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        load_network_weights(self.network, self.load_path, map_location=self.map_location)
        logger.info("loaded %s", self.load_path)
