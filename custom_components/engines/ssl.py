"""LVM-Med's self-supervised training and evaluation steps (spec ``specs/lvmmed.md`` section 2).

For MONAI's ``SupervisedTrainer(iteration_update=SSLIteration(), loss_function=objective)``, no labels:
the two views of every image of the batch (``view_s``, ``view_t``, (B, C, S, S)) go through the
backbone in **one** forward pass of the 2B views (one DDP forward, one set of BN statistics), the
feature maps are split back into (B, D, R, S) per view, and the graph-matching objective
(:class:`~custom_components.ssl.objective.GraphMatchingObjective`: projector, kNN graphs, GCN,
affinities, solver, Hamming loss, IMLE backward) turns them and the views' crop/flip geometry
(``geom_s``, ``geom_t``) into the loss. Backward and optimiser step as the other iterations
(:func:`~custom_components.engines.guided.optimise`, with the trainer's AMP scaler and
``torch.autocast`` when ``amp`` is on; the objective computes in float32).

The optimiser must hold the objective's parameters (projector, GCN) as well as the backbone's;
under DDP the objective is wrapped as well (``configs/multi_gpu_train.json``), so its gradients
are averaged over the processes while each process builds the graphs of its own batch.

Output keys (detached floats for ``StatsHandler`` / TensorBoard): ``loss``, ``matching_accuracy``
(fraction of nodes matched to their true partner), ``solver_seconds`` (forward and IMLE backward
solves), ``graph_seconds`` (the objective's graph-matching part: projector, graphs, GCN, affinities,
forward solve, loss, plus the backward solves), ``step_seconds`` (the whole iteration) and ``graph_share`` =
``graph_seconds / step_seconds``, and (training) ``lr``, the first parameter group's learning rate.
:class:`SSLEvalIteration` is the evaluation step (no gradient,
networks in eval mode) with the same statistics, for a held-out list.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from custom_components.engines.guided import optimise, to_device

__all__ = ["SSLIteration", "SSLEvalIteration", "SSL_STATS"]

#: the scalar statistics of a step (output keys besides ``loss``)
SSL_STATS = ("matching_accuracy", "solver_seconds", "graph_seconds", "step_seconds", "graph_share")
#: the objective's accumulator of the IMLE backward solves (they run in ``loss.backward()``)
_BACKWARD_SOLVES = "backward_solver_seconds"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _float(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


class _SSLStep:
    def __init__(self, objective: torch.nn.Module | None = None, view_keys=("view_s", "view_t"),
                 geom_keys=("geom_s", "geom_t")) -> None:
        self.objective = objective
        self.view_keys, self.geom_keys = tuple(view_keys), tuple(geom_keys)

    def _objective(self, engine) -> torch.nn.Module:
        objective = self.objective if self.objective is not None else engine.loss_function
        if objective is None:
            raise ValueError("SSL iterations need the graph-matching objective: pass objective= or the trainer's loss_function")
        return objective

    def forward(self, network, objective, views_s, views_t, geom_s, geom_t, amp: bool = False, amp_kwargs=None):
        """The objective's output for one batch of view pairs (both views in one backbone forward)."""
        b = views_s.shape[0]
        with torch.autocast(device_type=views_s.device.type, enabled=bool(amp), **(amp_kwargs or {})):
            maps = network(torch.cat([views_s, views_t], dim=0))
        maps = maps.float()
        return objective(maps[:b], maps[b:], geom_s.float(), geom_t.float())

    def _inputs(self, engine, batchdata):
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        keys = self.view_keys + self.geom_keys
        return to_device(batchdata, keys, engine.state.device, engine.non_blocking)

    @staticmethod
    def _output(out, start: float, device: torch.device, backward_solver: float = 0.0) -> dict[str, float]:
        _sync(device)
        step = time.perf_counter() - start
        graph = _float(out.graph_seconds) + backward_solver
        return {
            "loss": _float(out.loss),
            "matching_accuracy": _float(out.matching_accuracy),
            "solver_seconds": _float(out.solver_seconds) + backward_solver,
            "graph_seconds": graph,
            "step_seconds": step,
            "graph_share": graph / step if step > 0 else 0.0,
        }


class SSLIteration(_SSLStep):
    """One optimisation step of the graph-matching objective (see the module docstring).

    Args:
        objective: the :class:`~custom_components.ssl.objective.GraphMatchingObjective` (or its DDP
            wrapper); ``None`` takes the trainer's ``loss_function``.
        view_keys, geom_keys: batch keys of the two views and of their (B, 5) crop/flip geometry.
    """

    def __call__(self, engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        views_s, views_t, geom_s, geom_t = self._inputs(engine, batchdata)
        objective = self._objective(engine)
        engine.network.train()
        objective.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        out = self.forward(engine.network, objective, views_s, views_t, geom_s, geom_t, engine.amp, engine.amp_kwargs)
        loss = out.loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"non-finite loss at iteration {engine.state.iteration}: check the inputs or lower the learning rate"
            )
        timer = getattr(getattr(objective, "module", objective), "timer", None)
        before = timer.get(_BACKWARD_SOLVES, 0.0) if isinstance(timer, dict) else 0.0
        optimise(engine, loss)
        _sync(views_s.device)
        backward = timer.get(_BACKWARD_SOLVES, 0.0) - before if isinstance(timer, dict) else 0.0
        stats = self._output(out, start, views_s.device, backward)
        stats["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        return stats


class SSLEvalIteration(_SSLStep):
    """Evaluation step: the objective's loss and matching accuracy on view pairs, no gradient.

    Args:
        objective: the graph-matching objective (an evaluator has no ``loss_function``).
        noiseless: solve without the IMLE perturbation (the objective's ``noise`` is ``"none"``
            during the step), so the accuracy is that of the learned affinities.
        view_keys, geom_keys: as :class:`SSLIteration`.
    """

    def __init__(self, objective: torch.nn.Module | None = None, noiseless: bool = True, view_keys=("view_s", "view_t"),
                 geom_keys=("geom_s", "geom_t")) -> None:
        super().__init__(objective, view_keys, geom_keys)
        self.noiseless = bool(noiseless)

    def __call__(self, engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        from monai.engines.utils import IterationEvents

        start = time.perf_counter()
        views_s, views_t, geom_s, geom_t = self._inputs(engine, batchdata)
        objective = self._objective(engine)
        engine.network.eval()
        objective.eval()
        module = getattr(objective, "module", objective)
        noise = getattr(module, "noise", None)
        if noise is not None and self.noiseless:
            module.noise = "none"
        try:
            with torch.no_grad():
                out = self.forward(engine.network, objective, views_s, views_t, geom_s, geom_t, engine.amp,
                                   getattr(engine, "amp_kwargs", None))
        finally:
            if noise is not None:
                module.noise = noise
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return self._output(out, start, views_s.device)
