#!/usr/bin/env python
"""Write the static HTML report of the attention-map interpretability study.

    python scripts/explanation_report.py --runs eval/random,eval/sup --out report.html [--n_examples 8]
    python scripts/explanation_report.py --eval_dir eval [--out eval/explanation_report.html]
        [--title "..."] [--seed 0] [--image_format jpeg|png]

``--runs`` lists run folders (each with ``explanations/index.json``); ``--eval_dir`` takes every
subfolder that has one, random, sup, dino, mae first. The report is one self-contained file that
opens offline in any browser. Input contract and page contents:
:mod:`custom_components.reports.explanation_html`. Bad input data ends with a one-line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from custom_components import errors
from custom_components.cli import parse_names, run_commands
from custom_components.io import InputDataError
from custom_components.reports.explanation_html import discover_runs, write_explanation_report


def report(runs: str | Sequence[str] | None = None, eval_dir: str | None = None, out: str | None = None,
           n_examples: int = 8, title: str | None = None, seed: int = 0, image_format: str = "jpeg") -> str:  # fmt: skip
    """Write the report of ``runs`` (comma list) or of every run under ``eval_dir``; print where it is.

    ``image_format``: ``jpeg`` (quality 90, about 6x smaller files) or ``png`` (lossless panels).
    """
    names = parse_names(runs)
    if (names is None) == (eval_dir is None):
        raise InputDataError("--runs/--eval_dir", "give exactly one of them")
    folders = [Path(n) for n in names] if names is not None else discover_runs(eval_dir)
    if not folders:
        raise InputDataError("--runs", "no run folder given")
    if out is None:
        out = str(Path(eval_dir) / "explanation_report.html") if eval_dir is not None else "explanation_report.html"
    path = write_explanation_report(folders, out, n_examples=int(n_examples), title=title, seed=int(seed),
                                    image_format=str(image_format)).resolve()
    print(f"report: {path} ({len(folders)} runs: {', '.join(f.name for f in folders)})")
    print(f"open it offline in any browser: {path.as_uri()}  (e.g. xdg-open {path})")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    errors.install()  # input errors raised outside fire's call (e.g. while importing) stay one line too
    return run_commands(report, argv)


if __name__ == "__main__":
    sys.exit(main())
