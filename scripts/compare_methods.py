"""Train and evaluate every method of a bundle over several seeds; write the comparison table.

    python scripts/compare_methods.py lgmvit_brats20 --dataset_dir /data/MICCAI_BraTS2020_TrainingData --seeds 3
    python scripts/compare_methods.py lgmvit_brats20 --dataset_dir demo/raw/... --seeds 2 --demo   # small settings
    python scripts/compare_methods.py ham_nihcxr14 --dataset_dir /data/NIHChestXray14 --seeds 3

Each (method, seed) run merges ``configs/train.json`` [+ ``configs/demo.json``] +
``configs/methods/<method>.json`` with each workflow's config and runs the bundle's workflows (its
:class:`Profile`) one after the other in one process. All runs share one prepared data store. The
table (``comparison.md`` and ``comparison.csv`` in ``--output_dir``) gives each profile's metrics as
mean ± std over seeds (in %, as the papers):

* ``lgmvit_*``: training, test-split evaluation and inference (explanation maps scored against the
  test masks): F1, accuracy, AUROC, AP and Cohen's kappa, and the explanation quality of each
  method's own map (pointing game and IoU of the top-10 % box, slices with a tumour only).
* ``ham_nihcxr14``: training, evaluation, explain and evaluate_explanations: HAM (``configs/train.json``
  alone, row ``ham``), HAM without boxes and the CAM baseline, each with every map its explain
  workflow writes (HAM's own attention maps, Grad-CAM, Grad-CAM++; one row per training and map):
  mean AUROC over the 14 findings, localisation accuracy T(IoU) at 0.1-0.7 and the pointing game on
  the test images' boxes (one case per image and boxed finding), the paper's localisation table.

A (method, seed) whose outputs already exist is not run again, so an interrupted comparison resumes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom_components.io import InputDataError  # noqa: E402
from custom_components.reports.comparison import (  # noqa: E402
    main,
    run_child_workflows,
    summarise,
    write_comparison,
)
from custom_components.runs import check_override_ids  # noqa: E402

DEFAULT_SEEDS = (42, 43, 44)
TIOU_THRESHOLDS = ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7")


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _read_lgmvit(run_dir: Path, method: str) -> dict[str, dict[str, float]]:
    metrics = json.loads((run_dir / "eval" / "metrics_test.json").read_text())["metrics"]
    quality_file = run_dir / "eval" / "inference" / "explanation_quality.json"
    quality = json.loads(quality_file.read_text())["overall"] if quality_file.is_file() else {}
    row = {k: _number(metrics.get(k)) for k in ("f1", "accuracy", "auroc", "ap", "kappa")}
    row.update({k: _number(quality.get(k)) for k in ("pointing_game", "iou_top10")})
    return {method: row}


def _read_ham(run_dir: Path, method: str) -> dict[str, dict[str, float]]:
    auroc = _number(json.loads((run_dir / "eval" / "metrics_test.json").read_text())["metrics"].get("auroc"))
    maps = json.loads((run_dir / "eval" / "explanation_metrics.json").read_text())["metrics"]
    rows = {}
    for explainer, scores in maps.items():
        row = {"auroc": auroc, **{f"tiou_{t}": _number(scores.get(f"tiou_{t}")) for t in TIOU_THRESHOLDS}}
        rows[f"{method} + {explainer}"] = {**row, "pointing_game": _number(scores.get("pointing_game"))}
    return rows


@dataclass(frozen=True)
class Profile:
    """What a comparison of one bundle family runs and tabulates."""

    method_order: tuple[str, ...]  # table order; configs/methods files not listed follow, sorted
    workflows: tuple[tuple[str, str | None, dict], ...]  # (run id, config merged after the method's, overrides)
    done: tuple[str, ...]  # files under a run folder that mark it finished
    columns: tuple[str, ...]
    read: Callable[[Path, str], dict[str, dict[str, float]]]  # (run folder, method) -> {row: {column: value}}
    note: str  # the table's explanation
    plain_method: str | None = None  # a row for configs/train.json alone (no methods file)


PROFILES = {
    "lgmvit": Profile(
        method_order=("baseline", "gradmask", "robustvit", "res_g", "res_l", "lgmvit"),
        workflows=(("training", None, {"resume": False}), ("evaluating", "evaluate.json", {}),
                   ("inferring", "inference.json", {})),
        done=("eval/metrics_test.json", "eval/inference/predictions.csv"),
        columns=("f1", "accuracy", "auroc", "ap", "kappa", "pointing_game", "iou_top10"),
        read=_read_lgmvit,
        note="Slice-level metrics in %, mean ± std over seeds. Explanation quality of each method's own map "
        "on test slices with a mask: pointing game and IoU of the top-10 % box.",
    ),
    "ham": Profile(
        method_order=("ham", "nobox", "baseline"),
        workflows=(("training", None, {"resume": False}), ("evaluating", "evaluate.json", {}),
                   ("explaining", "explain.json", {}),
                   ("evaluating_explanations", "evaluate_explanations.json", {"faithfulness_steps": 0})),
        done=("eval/metrics_test.json", "eval/explanation_metrics.json"),
        columns=("auroc", *(f"tiou_{t}" for t in TIOU_THRESHOLDS), "pointing_game"),
        read=_read_ham,
        note="In %, mean ± std over seeds. One row per training (ham: configs/train.json with boxes; nobox; "
        "baseline: ResNet CAM classifier, BCE only) and map. auroc: mean test AUROC over the 14 findings. "
        "tiou_T: fraction of (test image, boxed finding) cases whose map, binarised as HAM's (refined map "
        "> 0.5), overlaps the finding's boxes with IoU > T; pointing_game: the map's maximum inside a box.",
        plain_method="ham",
    ),
}  # fmt: skip


def profile_of(bundle_name: str) -> Profile:
    for prefix, profile in PROFILES.items():
        if bundle_name.startswith(prefix):
            return profile
    raise InputDataError(bundle_name, f"no comparison profile (known: {', '.join(f'{p}*' for p in PROFILES)})")


def available_methods(bundle_dir: Path, profile: Profile) -> list[str]:
    found = {p.stem for p in (bundle_dir / "configs" / "methods").glob("*.json")}
    if profile.plain_method:
        found.add(profile.plain_method)
    return [m for m in profile.method_order if m in found] + sorted(found - set(profile.method_order))


def _run_one(bundle_dir: Path, run_dir: Path, profile: Profile, method: str, seed: int, dataset_dir: str,
             prepared_dir: Path, demo: bool, overrides: dict) -> None:  # fmt: skip
    """Run the profile's workflows for one (method, seed) in one child process (MONAI starts once)."""
    configs = ["configs/train.json"] + (["configs/demo.json"] if demo else [])
    if method != profile.plain_method:
        configs.append(f"configs/methods/{method}.json")
    common = {"bundle_root": str(run_dir), "dataset_dir": str(dataset_dir), "prepared_dir": str(prepared_dir),
              "seed": seed}  # fmt: skip
    workflows = [
        {"run_id": run_id, "config_file": [*configs, *([f"configs/{extra}"] if extra else [])],
         **common, **fixed, **overrides}
        for run_id, extra, fixed in profile.workflows
    ]  # fmt: skip
    # evaluate.json and inference.json both define MONAI's top-level inference ids (dataset, evaluator,
    # inferer): each run merges one of them, so the workflows run one after the other
    run_child_workflows(__file__, workflows, bundle_dir, run_dir / "log.txt", f"{method} seed {seed}")


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
        methods: comma-separated subset of the bundle's methods (default: all).
        output_dir: where runs and tables go (default ``runs/compare_<bundle>``).
        demo: merge the bundle's ``configs/demo.json`` (small network, few epochs).
        overrides: further bundle overrides, e.g. ``--num_epochs 5`` or ``--image_size 32``.
    """
    bundle_dir = Path(bundle) if Path(bundle).is_dir() else REPO / "bundles" / bundle
    if not (bundle_dir / "configs" / "train.json").is_file():
        print(f"error: {bundle_dir} is not a bundle folder", file=sys.stderr)
        sys.exit(2)
    name = bundle_dir.name
    profile = profile_of(name)
    all_methods = available_methods(bundle_dir, profile)
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
    workflow_configs = ["train.json", "demo.json", *(extra for _, extra, _ in profile.workflows if extra)]
    check_override_ids([bundle_dir / "configs" / c for c in workflow_configs], overrides)

    results: dict[str, list[dict[str, float]]] = {}
    for method in chosen:
        for seed in seed_list:
            run_dir = out / f"{method}_seed{seed}"
            if not all((run_dir / f).is_file() for f in profile.done):
                run_dir.mkdir(parents=True, exist_ok=True)
                start = time.time()
                print(f"[{name}] {method} seed {seed} ...", flush=True)
                _run_one(bundle_dir, run_dir, profile, method, seed, dataset_dir, prepared, demo, overrides)
                print(f"[{name}] {method} seed {seed} done in {time.time() - start:.0f} s", flush=True)
            for row, values in profile.read(run_dir, method).items():
                results.setdefault(row, []).append(values)

    rows, csv_rows = summarise(results, profile.columns, "method")
    heading = (
        f"# Method comparison: {name} (test split, {len(seed_list)} seeds: {', '.join(map(str, seed_list))})\n\n"
        + profile.note + "\n\n"
    )
    table = write_comparison(out, heading, rows, csv_rows, ["method", *profile.columns])
    print(table)
    return str(out / "comparison.md")


if __name__ == "__main__":
    main(compare)
