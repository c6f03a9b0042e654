"""Train and evaluate every guidance method of a bundle over several seeds; write the comparison table.

    python scripts/compare_methods.py lgmvit_brats20 --dataset_dir /data/MICCAI_BraTS2020_TrainingData --seeds 3
    python scripts/compare_methods.py lgmvit_brats20 --dataset_dir demo/raw/... --seeds 2 --demo   # small settings

Each (method, seed) run merges ``configs/train.json`` [+ ``configs/demo.json``] +
``configs/methods/<method>.json`` + ``configs/evaluate.json`` + ``configs/inference.json`` and runs
training, test-split evaluation and inference (explanation maps scored against the test masks) in
one process. All runs share one prepared data store. The table (``comparison.md`` and
``comparison.csv`` in ``--output_dir``) gives F1, accuracy, AUROC, AP and Cohen's kappa as
mean ± std over seeds (in %, as the paper) and the explanation quality of each method's own map
(pointing game and IoU of the top-10 % box, slices with a tumour only).
A (method, seed) whose outputs already exist is not run again, so an interrupted comparison resumes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom_components.handlers.report import format_mean_std, markdown_table  # noqa: E402
from custom_components.io import InputDataError, atomic_write_text  # noqa: E402
from custom_components.runs import check_override_ids  # noqa: E402

METRICS = ("f1", "accuracy", "auroc", "ap", "kappa")
QUALITY = ("pointing_game", "iou_top10")
DEFAULT_SEEDS = (42, 43, 44)
METHOD_ORDER = ("baseline", "gradmask", "robustvit", "res_g", "res_l", "lgmvit")
# evaluate.json and inference.json both define MONAI's top-level inference ids (dataset, evaluator,
# inferer): each run merges one of them, so the three workflows run one after the other
WORKFLOWS_FLAG = "--run_workflows"


def run_workflows(workflows: list[dict]) -> None:
    """Run ``monai.bundle run`` workflows one after the other in this process."""
    from monai.bundle import run

    for workflow in workflows:
        run(**workflow)


def available_methods(bundle_dir: Path) -> list[str]:
    found = {p.stem for p in (bundle_dir / "configs" / "methods").glob("*.json")}
    return [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))


def _run_one(bundle_dir: Path, run_dir: Path, method: str, seed: int, dataset_dir: str, prepared_dir: Path,
             demo: bool, overrides: dict) -> None:  # fmt: skip
    """Train, evaluate and infer one (method, seed) in one child process (MONAI starts once)."""
    configs = ["configs/train.json"] + (["configs/demo.json"] if demo else []) + [f"configs/methods/{method}.json"]
    common = {"bundle_root": str(run_dir), "dataset_dir": str(dataset_dir), "prepared_dir": str(prepared_dir),
              "seed": seed, **overrides}  # fmt: skip
    workflows = [
        {"run_id": "training", "config_file": configs, "resume": False, **common},
        {"run_id": "evaluating", "config_file": [*configs, "configs/evaluate.json"], **common},
        {"run_id": "inferring", "config_file": [*configs, "configs/inference.json"], **common},
    ]
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKFLOWS_FLAG, json.dumps(workflows)]
    log = run_dir / "log.txt"
    with open(log, "w") as fh:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, cwd=bundle_dir, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode == 2:  # the bundle's one-line input error: pass it on as it is
        errors = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
        if errors:
            raise InputDataError(f"{method} seed {seed}", f"{errors[-1][len('error: '):]} (log {log})")
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}); log {log}:\n{tail}")


def _read_results(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "eval" / "metrics_test.json").read_text())["metrics"]
    quality_file = run_dir / "eval" / "inference" / "explanation_quality.json"
    quality = json.loads(quality_file.read_text())["overall"] if quality_file.is_file() else {}
    out = {k: (float("nan") if metrics.get(k) is None else float(metrics[k])) for k in METRICS}
    out.update({k: (float("nan") if quality.get(k) is None else float(quality[k])) for k in QUALITY})
    return out


def compare(
    bundle: str,
    dataset_dir: str,
    seeds: int | tuple | list = 3,
    methods: str | tuple | list | None = None,
    output_dir: str | None = None,
    demo: bool = False,
    **overrides,
) -> str:
    """Run the comparison and return the Markdown table.

    Args:
        bundle: bundle name under ``bundles/`` (or a path to a bundle folder).
        dataset_dir: the dataset in its original layout (what the bundle's ``dataset_dir`` takes).
        seeds: a number of seeds (42, 43, ...) or an explicit list.
        methods: comma-separated subset of the bundle's ``configs/methods`` (default: all).
        output_dir: where runs and tables go (default ``runs/compare_<bundle>``).
        demo: merge the bundle's ``configs/demo.json`` (small network, few epochs).
        overrides: further bundle overrides, e.g. ``--num_epochs 5`` or ``--image_size 32``.
    """
    bundle_dir = Path(bundle) if Path(bundle).is_dir() else REPO / "bundles" / bundle
    if not (bundle_dir / "configs" / "train.json").is_file():
        print(f"error: {bundle_dir} is not a bundle folder", file=sys.stderr)
        sys.exit(2)
    name = bundle_dir.name
    all_methods = available_methods(bundle_dir)
    if methods is None:
        chosen = all_methods
    else:
        chosen = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
        unknown = sorted(set(chosen) - set(all_methods))
        if unknown:
            print(f"error: unknown methods {unknown}; {name} has {all_methods}", file=sys.stderr)
            sys.exit(2)
    seed_list = list(seeds) if isinstance(seeds, (list, tuple)) else [DEFAULT_SEEDS[0] + i for i in range(int(seeds))]
    out = Path(output_dir) if output_dir else REPO / "runs" / f"compare_{name}"
    prepared = out / "prepared"
    # a misspelt option stops here, before any run, rather than in every run's log
    workflow_configs = ["train.json", "demo.json", "evaluate.json", "inference.json"]
    check_override_ids([bundle_dir / "configs" / c for c in workflow_configs], overrides)

    results: dict[str, list[dict[str, float]]] = {}
    for method in chosen:
        for seed in seed_list:
            run_dir = out / f"{method}_seed{seed}"
            eval_dir = run_dir / "eval"
            done = (eval_dir / "metrics_test.json").is_file() and (eval_dir / "inference" / "predictions.csv").is_file()
            if not done:
                run_dir.mkdir(parents=True, exist_ok=True)
                start = time.time()
                print(f"[{name}] {method} seed {seed} ...", flush=True)
                _run_one(bundle_dir, run_dir, method, seed, dataset_dir, prepared, demo, overrides)
                print(f"[{name}] {method} seed {seed} done in {time.time() - start:.0f} s", flush=True)
            results.setdefault(method, []).append(_read_results(run_dir))

    columns = ["method", *METRICS, *QUALITY]
    rows, csv_rows = [], []
    for method, per_seed in results.items():
        row, csv_row = {"method": method}, {"method": method, "seeds": len(per_seed)}
        for key in (*METRICS, *QUALITY):
            values = [r[key] for r in per_seed if not math.isnan(r[key])]
            row[key] = format_mean_std(values) if values else "n/a"
            mean = sum(values) / len(values) if values else float("nan")
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
            csv_row[f"{key}_mean"], csv_row[f"{key}_std"] = mean, std
        rows.append(row)
        csv_rows.append(csv_row)
    table = (
        f"# Method comparison: {name} (test split, {len(seed_list)} seeds: {', '.join(map(str, seed_list))})\n\n"
        "Slice-level metrics in %, mean ± std over seeds. Explanation quality of each method's own map "
        "on test slices with a mask: pointing game and IoU of the top-10 % box.\n\n" + markdown_table(rows, columns) + "\n"
    )
    atomic_write_text(table, out / "comparison.md")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(csv_rows[0]))
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write_text(buf.getvalue(), out / "comparison.csv")
    print(table)
    return str(out / "comparison.md")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKFLOWS_FLAG:  # the child process of _run_one
        from custom_components import errors

        errors.install()
        run_workflows(json.loads(sys.argv[2]))
        sys.exit(0)
    try:
        fire.Fire(compare)
    except InputDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
