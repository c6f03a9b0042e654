"""Write the pre-trained backbone's weights for the downstream bundles (LVM-Med pre-training).

:class:`BackboneExport` saves :func:`~custom_components.networks.lvmmed_backbone.backbone_state_dict`
of the network (the bare backbone: the torchvision / LVM-Med key layout, no projector, GCN or DDP
prefix) to ``<ckpt_dir>/backbone.pt`` (and any further file names, e.g. the bundle's ``model.pt``
for ``ckpt_export``) through an atomic rename, at every ``interval`` epochs (with the resumable
checkpoint) and when the run completes, on rank 0 only. The file holds tensors only, so
``torch.load(..., weights_only=True)`` and
:func:`~custom_components.networks.pretrained.load_pretrained_resnet` read it into a fresh MONAI
ResNet with no missing or unexpected keys. :class:`SSLCheckpointLoader` restores backbone and
objective for the ``evaluate`` workflow; :class:`EmbeddingCSVWriter` writes per-image embeddings
(``inference``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from custom_components.handlers.prediction_csv import _BatchCSVWriter
from custom_components.io import atomic_save
from custom_components.networks.lvmmed_backbone import backbone_state_dict

__all__ = ["BackboneExport", "SSLCheckpointLoader", "EmbeddingCSVWriter"]

logger = logging.getLogger(__name__)


class BackboneExport:
    """Save the backbone's state dict to ``ckpt_dir/<filename>`` for each of ``filenames``.

    Args:
        ckpt_dir: output folder (the bundle's ``models``).
        network: the backbone (or its DDP wrapper).
        filenames: file names to write (``backbone.pt`` first).
        interval: also save every ``interval`` epochs (0: only when the run completes).
    """

    def __init__(self, ckpt_dir: str, network: torch.nn.Module, filenames: str | Sequence[str] = ("backbone.pt",),
                 interval: int = 1) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.network = network
        self.filenames = (filenames,) if isinstance(filenames, str) else tuple(filenames)
        if not self.filenames:
            raise ValueError("BackboneExport needs at least one file name")
        self.interval = max(int(interval), 0)
        self._saved_at: int | None = None

    def attach(self, engine: Engine) -> None:
        if self.interval:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def save(self) -> list[Path]:
        """Write the files now (rank 0 only); returns the paths written."""
        if idist.get_rank() != 0:
            return []
        state = backbone_state_dict(self.network)
        paths = [atomic_save(state, self.ckpt_dir / name) for name in self.filenames]
        logger.info("backbone weights (%d tensors) saved to %s", len(state), ", ".join(str(p) for p in paths))
        return paths

    def __call__(self, engine: Engine) -> None:
        if self._saved_at == engine.state.iteration:  # COMPLETED right after the last epoch's save
            return
        self.save()
        self._saved_at = engine.state.iteration


class SSLCheckpointLoader:
    """Load the backbone and the objective (projector, GCN) of a resumable ``last.pt`` when the engine starts.

    For the ``evaluate`` workflow, whose matching accuracy needs both. A missing or truncated file,
    or weights of another configuration, stop the run with one line naming the file.

    Args:
        load_path: the training's ``last.pt``.
        modules: checkpoint entry -> module (``{"network": ..., "objective": ...}``); DDP wrappers are unwrapped.
    """

    def __init__(self, load_path: str, modules: dict[str, torch.nn.Module]) -> None:
        self.load_path = Path(load_path)
        self.modules = dict(modules)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        from custom_components.io import InputDataError, load_checkpoint, state_dict_mismatch

        if not self.load_path.is_file():
            raise InputDataError(self.load_path, "trained checkpoint not found: run the training first")
        ckpt = load_checkpoint(self.load_path)
        for name, module in self.modules.items():
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get(name), dict):
                raise InputDataError(self.load_path, f"no '{name}' entry (a resumable checkpoint of this bundle's training?)")
            target = module.module if isinstance(getattr(module, "module", None), torch.nn.Module) else module
            problem = state_dict_mismatch(target, ckpt[name])
            if problem is not None:
                raise InputDataError(self.load_path, f"'{name}' does not fit the configured network: {problem}")
            target.load_state_dict(ckpt[name])
        logger.info("loaded %s (%s)", self.load_path, ", ".join(self.modules))


class EmbeddingCSVWriter(_BatchCSVWriter):
    """Per-image embeddings of the backbone (its feature map averaged over space) as one CSV (inference).

    Rows: ``<id_key>, f_0 .. f_{D-1}`` (6 significant digits), written atomically when the run ends;
    on several ranks each writes ``path`` with a ``.rank<N>`` suffix. Needs ``decollate=False``.
    """

    def __init__(self, path: str, id_key: str = "image_path") -> None:
        super().__init__(path, id_key)

    def rows(self, engine: Engine, n: int) -> torch.Tensor:
        maps = engine.state.output["pred"].detach().float().cpu()
        return maps.reshape(n, maps.shape[1], -1).mean(dim=2)

    def lines(self, ids, rows: torch.Tensor) -> list[list]:
        header = [self.id_key, *(f"f_{i}" for i in range(rows.shape[1] if rows.ndim == 2 else 0))]
        return [header, *([key, *(f"{v:.6g}" for v in row)] for key, row in zip(ids, rows.tolist(), strict=True))]
