"""Atomic, resumable checkpoints and best-model selection.

``TrainingCheckpoint`` saves everything a run needs to continue (network, optimizer, scheduler,
trainer counters, best-model state) to one file through an atomic rename, and on start reloads
it with ``weights_only=True``. A run killed at any moment therefore resumes from its last
completed epoch, and the best model of the earlier part of the run is remembered.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from custom_components.io import atomic_save, load_checkpoint

__all__ = ["TrainingCheckpoint", "BestMetricSaver", "SamplerEpochSetter"]

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
    """

    def __init__(
        self,
        ckpt_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "last.pt",
        resume: bool = True,
        interval: int = 1,
    ) -> None:
        self.path = Path(ckpt_dir) / filename
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.interval = max(int(interval), 1)

    def attach(self, engine: Engine) -> None:
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
        state["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration, "epoch_length": engine.state.epoch_length}
        atomic_save(state, self.path)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            return
        ckpt = load_checkpoint(self.path, map_location="cpu")
        for name, obj in self.save_dict.items():
            if name not in ckpt:
                raise KeyError(f"{self.path}: no '{name}' entry to resume from (has {sorted(ckpt)})")
            _unwrap(obj).load_state_dict(ckpt[name])
        trainer = ckpt["trainer"]
        if trainer["epoch"] > engine.state.max_epochs:
            raise ValueError(
                f"{self.path}: checkpoint is at epoch {trainer['epoch']} beyond max_epochs {engine.state.max_epochs}"
            )
        engine.state.epoch = int(trainer["epoch"])
        engine.state.iteration = int(trainer["iteration"])
        logger.info("resumed from %s at epoch %d (iteration %d)", self.path, engine.state.epoch, engine.state.iteration)


class BestMetricSaver:
    """Keep the network with the best value of ``metric_name`` (ties: the later epoch wins, as upstream).

    Attach to the validation evaluator; the epoch number is the evaluator's (equal to the trainer's
    under MONAI's ``ValidationHandler``) unless ``epoch_source`` names another engine.
    The saved file holds the network's ``state_dict`` only, loadable with ``weights_only=True``.
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
