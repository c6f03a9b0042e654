"""Per-image predictions of a classification evaluator as one CSV (the inference workflow)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from custom_components.io import atomic_write_text

__all__ = ["PredictionCSVWriter", "MultiLabelCSVWriter", "rank_path"]


def rank_path(path: str | os.PathLike) -> Path:
    """``path`` itself in a single process; with a ``.rank<N>`` suffix before the extension on several ranks."""
    path = Path(path)
    if idist.get_world_size() > 1:
        return path.with_name(f"{path.stem}.rank{idist.get_rank()}{path.suffix}")
    return path


class _BatchCSVWriter:
    """Collect one row tensor per image over an evaluator run; write one CSV atomically when it ends.

    Subclasses give the rows of a batch (:meth:`rows`) and the CSV lines (:meth:`lines`). On several
    ranks each writes ``path`` with a ``.rank<N>`` suffix before the extension.
    """

    def __init__(self, path: str | os.PathLike, id_key: str) -> None:
        self.path = Path(path)
        self.id_key = id_key
        self._ids: list[str] = []
        self._rows: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._ids, self._rows = [], []

    def rows(self, engine: Engine, n: int) -> torch.Tensor:
        raise NotImplementedError

    def lines(self, ids: Sequence[str], rows: torch.Tensor) -> list[list[Any]]:
        raise NotImplementedError

    def _collect(self, engine: Engine) -> None:
        ids: Sequence[Any] = engine.state.batch[self.id_key]
        self._rows.append(self.rows(engine, len(ids)))
        self._ids.extend(str(i) for i in ids)

    def _write(self, engine: Engine) -> None:
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 0)
        path = rank_path(self.path)
        buf = io.StringIO()
        csv.writer(buf).writerows(self.lines(self._ids, rows))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(buf.getvalue(), path)


class PredictionCSVWriter(_BatchCSVWriter):
    """Collect ``id_key`` and the class probabilities of every batch; write ``path`` when the run ends.

    Rows: ``<id_key>, label, pred, prob_0 .. prob_{C-1}`` (softmax of C >= 2 logits, or ``prob_1`` =
    sigmoid of a single logit), written atomically. Single-process inference (on several ranks each
    writes ``path`` with a ``.rank<N>`` suffix before the extension). Needs an evaluator with
    ``decollate=False`` (batched ``engine.state.batch`` / ``output``).
    """

    def __init__(self, path: str | os.PathLike, id_key: str = "image_path", label_key: str = "label") -> None:
        super().__init__(path, id_key)
        self.label_key = label_key

    def rows(self, engine: Engine, n: int) -> torch.Tensor:
        logits = engine.state.output["pred"].detach().float().cpu()
        logits = logits.reshape(logits.shape[0], -1)
        probs = torch.softmax(logits, 1) if logits.shape[1] > 1 else torch.sigmoid(logits)
        labels = torch.as_tensor(engine.state.batch[self.label_key]).reshape(n, -1)[:, :1].float().cpu()
        return torch.cat([labels, probs], 1)

    def lines(self, ids: Sequence[str], rows: torch.Tensor) -> list[list[Any]]:
        n_prob = max(rows.shape[1] - 1, 1)
        names = ["prob_1"] if n_prob == 1 else [f"prob_{c}" for c in range(n_prob)]
        out: list[list[Any]] = [[self.id_key, "label", "pred", *names]]
        for key, row in zip(ids, rows.tolist(), strict=True):
            probs = row[1:]
            pred = int(probs[0] > 0.5) if n_prob == 1 else max(range(n_prob), key=probs.__getitem__)
            out.append([key, int(row[0]), pred, *[f"{p:.6f}" for p in probs]])
        return out


class MultiLabelCSVWriter(_BatchCSVWriter):
    """Per-image sigmoid probabilities of a multi-label classifier as one CSV, written when the run ends.

    Rows: ``<id_key>, <column 0>, <column 1>, ...`` with one column per logit of ``pred`` (e.g.
    HAM: ``abnormal`` then the 14 findings), probabilities = sigmoid(logit) with 6 decimals, written
    atomically. Needs ``decollate=False``; on several ranks each writes ``path`` with a
    ``.rank<N>`` suffix before the extension.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], id_key: str = "case") -> None:
        super().__init__(path, id_key)
        self.columns = [str(c) for c in columns]

    def rows(self, engine: Engine, n: int) -> torch.Tensor:
        logits = engine.state.output["pred"].detach().float().cpu().reshape(n, -1)
        if logits.shape[1] != len(self.columns):
            raise ValueError(f"{logits.shape[1]} logits per image for {len(self.columns)} columns {self.columns}")
        return torch.sigmoid(logits)

    def lines(self, ids: Sequence[str], rows: torch.Tensor) -> list[list[Any]]:
        body = [[key, *[f"{p:.6f}" for p in row]] for key, row in zip(ids, rows.tolist(), strict=True)]
        return [[self.id_key, *self.columns], *body]
