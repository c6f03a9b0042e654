"""Accuracy under FGSM / PGD at several epsilons, written as a JSON + Markdown report.

The bundles' ``configs/evaluate_robustness.json`` instantiates :class:`RobustnessEvaluation` with
the test split in **pixel units** (no intensity normalisation in the transforms) and the
normalisation as ``intensity_mean`` / ``intensity_std``; the network then sees
``(x_adv - mean) / std`` (:class:`~custom_components.evaluation.adversarial.PixelSpaceModel`), so
the epsilons are pixel-unit L-infinity radii (e.g. 8/255) as in Goodfellow et al. 2015 (FGSM) and
Madry et al. 2018 (PGD). Accuracy has the official MedMNIST semantics of the task
(:func:`custom_components.data.medmnist.medmnist_metrics`: argmax for multi-class / ordinal,
last-class score > 0.5 for binary, mean per-label accuracy at 0.5 for multi-label); AUC is
reported beside it.

Report (``<output_dir>/<filename>.json`` and ``.md``, atomic writes, rank 0 of one process)::

    {"title": ..., "task": ..., "n_samples": N, "epsilons": [0.0, 0.0039, ...],
     "clean": {"ACC": ..., "AUC": ...},
     "attacks": {"fgsm": [{"eps": 0.0, "ACC": ..., "AUC": ...}, ...], "pgd": [...]},
     "settings": {...}, "extra": {...}}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from custom_components.data.medmnist import _TASK_ALIASES, medmnist_metrics
from custom_components.evaluation.adversarial import ATTACKS, PixelSpaceModel
from custom_components.handlers.report import format_percent, markdown_table
from custom_components.io import atomic_save_json, atomic_write_text, load_network_weights
from custom_components.metrics.medmnist_metrics import logits_to_scores

__all__ = ["RobustnessEvaluation", "DEFAULT_EPSILONS"]

logger = logging.getLogger(__name__)

DEFAULT_EPSILONS: tuple[float, ...] = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)


def _nan_to_none(v: float) -> float | None:
    return None if v != v else float(v)


class RobustnessEvaluation:
    """Run FGSM and PGD on a dataloader at each epsilon and report MedMNIST ACC (and AUC).

    Args:
        network: the classifier (returns logits for normalised inputs).
        dataloader: batches ``{"image": pixel-unit images, "label": labels}``.
        task: a MedMNIST task (``binary``, ``multi-class``, ``multi-label``, ``ordinal-regression``).
        output_dir, filename: report location (``robustness.json`` / ``.md``).
        epsilons: L-infinity radii in pixel units.
        attacks: names from :data:`~custom_components.evaluation.adversarial.ATTACKS`.
        pgd_steps: PGD iterations (10).
        pgd_step_factor: PGD step size = ``pgd_step_factor * eps / pgd_steps`` (2.5, Madry et al.).
        pgd_random_start: uniform random start in the ball.
        intensity_mean, intensity_std: the training normalisation applied inside the attacked model.
        pixel_range: valid pixel range the perturbed image is clipped to.
        ckpt_path: weights (a ``state_dict``, loaded with ``weights_only=True``); None keeps the network's.
        device: where to run.
        seed: seed of the PGD random starts.
        progress: show a progress bar.
        title, extra: report heading and extra JSON fields.

    The network is put in eval mode for the run and restored to its previous mode afterwards.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataloader: Iterable[Mapping[str, Any]],
        task: str,
        output_dir: str | os.PathLike,
        filename: str = "robustness",
        epsilons: Sequence[float] = DEFAULT_EPSILONS,
        attacks: Sequence[str] = ("fgsm", "pgd"),
        pgd_steps: int = 10,
        pgd_step_factor: float = 2.5,
        pgd_random_start: bool = True,
        intensity_mean: float = 0.5,
        intensity_std: float = 0.5,
        pixel_range: Sequence[float] = (0.0, 1.0),
        ckpt_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        progress: bool = True,
        title: str = "Accuracy under adversarial attack",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if task not in _TASK_ALIASES:
            raise ValueError(f"unknown MedMNIST task {task!r}; expected one of {sorted(_TASK_ALIASES)}")
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; available: {sorted(ATTACKS)}")
        self.epsilons = [float(e) for e in epsilons]
        if not self.epsilons or min(self.epsilons) < 0:
            raise ValueError(f"epsilons must be a non-empty list of values >= 0, got {list(epsilons)}")
        if len(pixel_range) != 2 or not pixel_range[0] < pixel_range[1]:
            raise ValueError(f"pixel_range must be (min, max) with min < max, got {pixel_range}")
        self.network = network
        self.dataloader = dataloader
        self.task = _TASK_ALIASES[task]
        self.output_dir = Path(output_dir)
        self.filename = filename
        self.attacks = list(attacks)
        self.pgd_steps = int(pgd_steps)
        self.pgd_step_factor = float(pgd_step_factor)
        self.pgd_random_start = bool(pgd_random_start)
        self.intensity_mean = float(intensity_mean)
        self.intensity_std = float(intensity_std)
        self.clip = (float(pixel_range[0]), float(pixel_range[1]))
        self.ckpt_path = ckpt_path
        self.device = torch.device(device)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.title = title
        self.extra = dict(extra) if extra is not None else {}

    @property
    def json_path(self) -> Path:
        return self.output_dir / f"{self.filename}.json"

    @property
    def markdown_path(self) -> Path:
        return self.output_dir / f"{self.filename}.md"

    def _attack(self, name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                generator: torch.Generator) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(clip_min=self.clip[0], clip_max=self.clip[1], multi_label=self.task == "multi-label")
        if name == "pgd":
            kwargs.update(steps=self.pgd_steps, step_size=self.pgd_step_factor * eps / self.pgd_steps,
                          random_start=self.pgd_random_start, generator=generator)
        return ATTACKS[name](model, x, y, eps, **kwargs)

    def evaluate(self) -> dict[str, Any]:
        """Attack every batch; returns the report dict (no file I/O)."""
        if self.ckpt_path is not None:
            load_network_weights(self.network, self.ckpt_path, map_location=self.device)
        was_training = self.network.training
        self.network.to(self.device).eval()
        model = PixelSpaceModel(self.network, self.intensity_mean, self.intensity_std)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        clean_logits: list[torch.Tensor] = []
        adv_logits = {(a, e): [] for a in self.attacks for e in self.epsilons}
        labels: list[torch.Tensor] = []
        total = len(self.dataloader) if hasattr(self.dataloader, "__len__") else None
        try:
            for batch in tqdm(self.dataloader, total=total, desc="robustness", disable=not self.progress):
                x = torch.as_tensor(batch["image"]).to(self.device, torch.float32)
                y = torch.as_tensor(batch["label"]).to(self.device)
                with torch.no_grad():
                    clean_logits.append(model(x).float().cpu())
                for name in self.attacks:
                    for eps in self.epsilons:
                        x_adv = self._attack(name, model, x, y, eps, generator)
                        with torch.no_grad():
                            adv_logits[(name, eps)].append(model(x_adv).float().cpu())
                labels.append(y.cpu())
        finally:
            self.network.train(was_training)
        if not labels:
            raise ValueError("the dataloader yielded no batch")
        y_all = torch.cat(labels)
        y_all = y_all.reshape(y_all.shape[0], -1) if self.task == "multi-label" else y_all.reshape(-1)

        def score(logit_list: list[torch.Tensor]) -> dict[str, float | None]:
            m = medmnist_metrics(self.task, logits_to_scores(torch.cat(logit_list), self.task), y_all)
            return {k: _nan_to_none(v) for k, v in m.items()}

        return {
            "title": self.title,
            "task": self.task,
            "n_samples": int(y_all.shape[0]),
            "epsilons": self.epsilons,
            "clean": score(clean_logits),
            "attacks": {a: [{"eps": e, **score(adv_logits[(a, e)])} for e in self.epsilons] for a in self.attacks},
            "settings": {
                "norm": "Linf", "pixel_range": list(self.clip), "intensity_mean": self.intensity_mean,
                "intensity_std": self.intensity_std, "pgd_steps": self.pgd_steps,
                "pgd_step_size": f"{self.pgd_step_factor} * eps / {self.pgd_steps}",
                "pgd_random_start": self.pgd_random_start, "seed": self.seed,
            },
            "extra": self.extra,
        }  # fmt: skip

    def markdown(self, report: Mapping[str, Any]) -> str:
        columns = ["eps", "eps x 255"] + [f"{a.upper()} ACC" for a in self.attacks]
        rows = []
        for i, eps in enumerate(report["epsilons"]):
            row = {"eps": f"{eps:.5g}", "eps x 255": f"{eps * 255:.3g}"}
            for a in self.attacks:
                row[f"{a.upper()} ACC"] = format_percent(report["attacks"][a][i]["ACC"])
            rows.append(row)
        clean = report["clean"]
        return (
            f"# {report['title']}\n\n" + markdown_table(rows, columns)
            + f"\nACC in percent ({report['task']} MedMNIST semantics), {report['n_samples']} samples; "
            f"clean ACC {format_percent(clean['ACC'])}, AUC {format_percent(clean['AUC'])}. "
            f"L-infinity attacks in pixel units on {list(self.clip)}; PGD: {self.pgd_steps} steps of "
            f"{self.pgd_step_factor} * eps / {self.pgd_steps}, random start {self.pgd_random_start}.\n"
        )  # fmt: skip

    def run(self) -> dict[str, Any]:
        """:meth:`evaluate`, then write the JSON and Markdown reports atomically; returns the report."""
        report = self.evaluate()
        atomic_save_json(report, self.json_path)
        atomic_write_text(self.markdown(report), self.markdown_path)
        logger.info("robustness report written to %s and %s", self.json_path, self.markdown_path)
        return report
