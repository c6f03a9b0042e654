#!/usr/bin/env python
"""Train and evaluate a bundle from each encoder initialisation over seeds; write the comparison table.

    python scripts/compare_init.py lvmmed_seg2d_kvasir --dataset_dir /data/Kvasir-SEG --seeds 3 \\
        --pretrained_path /weights/lvmmed_resnet.torch --imagenet_path /weights/resnet50-0676ba61.pth
    python scripts/compare_init.py lvmmed_seg2d_kvasir --dataset_dir D --seeds 1 --demo --inits scratch,lvmmed \\
        --pretrained_path W   # small settings

How a user checks the paper's claim that LVM-Med initialisation helps (spec lvmmed.md section 5).
Each (init, seed) run merges ``configs/train.json`` [+ ``configs/demo.json``] +
``configs/init/<init>.json`` and runs training, then ``configs/evaluate.json`` on the test split,
in one child process, with ``--seed <seed>`` (the data split stays the bundle's, fixed over seeds
as in the reference's trials). All runs share one prepared data store. ``--pretrained_path`` is the
``lvmmed`` file, ``--imagenet_path`` the ``imagenet`` one; an initialisation that needs a file not
given stops before any run. The tables ``comparison.md`` / ``comparison.csv`` in ``--output_dir``
give each metric of the bundle's profile as mean ± std over seeds (in %).

Resumable: a finished (init, seed), one whose metrics file exists, is not run again; an interrupted
training resumes from its ``last.pt`` (same settings, so the bundle's fingerprint check passes).

A bundle is added with one entry of :data:`PROFILES` (its metrics file and keys).
"""

from __future__ import annotations

import json
import sys
import time
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

#: per bundle: the metrics file (under the run's bundle root) and its keys to tabulate, the configs
#: of the evaluation merged after the training's, and the ids of folders all runs share (relative
#: to ``--output_dir``; e.g. the prepared data store)
PROFILES: dict[str, dict] = {
    "lvmmed_seg2d_kvasir": {
        "metrics_file": "eval/metrics_test.json",
        "metrics": ("dice", "iou"),
        "evaluate": ("configs/evaluate.json",),
        "shared": {"prepared_dir": "prepared"},
        "what": "Dice and IoU of the polyp class, per test image then mean",
    },
    "lvmmed_seg3d_mmwhs": {
        "metrics_file": "eval/metrics_test.json",
        "metrics": ("iou", "dice", "mean_iou", "mean_dice"),
        "evaluate": ("configs/evaluate.json",),
        "shared": {"prepared_dir": "prepared"},
        "what": "3-D IoU / Dice of the left-atrium blood cavity (label 420) per test volume, then the means over "
        "the 7 structures",
    },
    "lvmmed_det_vindr": {
        "metrics_file": "eval/metrics_test.json",
        "metrics": ("map50", "map"),
        "evaluate": ("configs/evaluate.json",),
        "shared": {"prepared_dir": "prepared"},
        "what": "AP@0.5 (the paper's metric) and mAP@[0.5:0.95], means over the classes with test boxes",
    },
    "lvmmed_cls_brain": {
        "metrics_file": "eval/metrics_test.json",
        "metrics": ("accuracy", "macro_f1", "macro_auroc"),
        "evaluate": ("configs/evaluate.json",),
        "shared": {},
        "what": "accuracy, macro F1 and macro AUROC on the test split",
    },
}
INIT_ORDER = ("scratch", "imagenet", "lvmmed")
DEFAULT_SEEDS = (42, 43, 44)


def available_inits(bundle_dir: Path) -> list[str]:
    found = {p.stem for p in (bundle_dir / "configs" / "init").glob("*.json")}
    return [i for i in INIT_ORDER if i in found] + sorted(found - set(INIT_ORDER))


def _run_one(bundle_dir: Path, run_dir: Path, init: str, seed: int, common: dict, demo: bool, profile: dict,
             train_extra: dict) -> None:  # fmt: skip
    """Train (resuming an interrupted run) and evaluate one (init, seed) in one child process.

    ``train_extra`` (the encoder file) goes to the training only: evaluation loads the trained weights.
    """
    configs = ["configs/train.json"] + (["configs/demo.json"] if demo else []) + [f"configs/init/{init}.json"]
    base = {"bundle_root": str(run_dir), "seed": seed, **common}
    workflows = [
        {"run_id": "training", "config_file": configs, "resume": True, **base, **train_extra},
        {"run_id": "evaluating", "config_file": [*configs, *profile["evaluate"]], **base},
    ]
    run_child_workflows(__file__, workflows, bundle_dir, run_dir / "log.txt", f"{init} seed {seed}", append=True)


def _read_results(path: Path, keys: tuple[str, ...]) -> dict[str, float]:
    metrics = json.loads(path.read_text())["metrics"]
    return {k: (float("nan") if metrics.get(k) is None else float(metrics[k])) for k in keys}


def _names(value) -> list[str]:
    return [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]


def compare(
    bundle: str,
    dataset_dir: str,
    seeds: int | tuple | list = 3,
    inits: str | tuple | list | None = None,
    pretrained_path: str | None = None,
    imagenet_path: str | None = None,
    output_dir: str | None = None,
    demo: bool = False,
    **overrides,
) -> str:
    """Run the comparison and return the path of ``comparison.md``.

    Args:
        bundle: bundle name under ``bundles/`` (or a path to a bundle folder) with a profile.
        dataset_dir: the dataset in its original layout (what the bundle's ``dataset_dir`` takes).
        seeds: a number of seeds (42, 43, ...) or an explicit list.
        inits: comma-separated subset of the bundle's ``configs/init`` (default: all).
        pretrained_path: the LVM-Med encoder file (``lvmmed``).
        imagenet_path: the ImageNet encoder file (``imagenet``).
        output_dir: where runs and tables go (default ``runs/compare_init_<bundle>``).
        demo: merge the bundle's ``configs/demo.json`` (small network, few epochs).
        overrides: further bundle overrides, e.g. ``--num_epochs 5`` or ``--image_size 32``.
    """
    bundle_dir = Path(bundle) if Path(bundle).is_dir() else REPO / "bundles" / bundle
    if not (bundle_dir / "configs" / "train.json").is_file():
        raise InputDataError(bundle_dir, "not a bundle folder")
    name = bundle_dir.name
    if name not in PROFILES:
        raise InputDataError(bundle_dir, f"no compare_init profile (known: {', '.join(sorted(PROFILES))})")
    profile = PROFILES[name]
    all_inits = available_inits(bundle_dir)
    chosen = all_inits if inits is None else _names(inits)
    unknown = sorted(set(chosen) - set(all_inits))
    if unknown:
        raise InputDataError(bundle_dir / "configs" / "init", f"unknown inits {unknown}; {name} has {all_inits}")
    files = {"lvmmed": pretrained_path, "imagenet": imagenet_path}
    for init in chosen:
        if init in files and not files[init]:
            option = "--pretrained_path" if init == "lvmmed" else "--imagenet_path"
            raise InputDataError(f"init {init!r}", f"needs its encoder file: pass {option} FILE")
        if init in files and not Path(files[init]).is_file():
            raise InputDataError(files[init], f"encoder file of init {init!r} does not exist")
    seed_list = [int(s) for s in seeds] if isinstance(seeds, (list, tuple)) else [DEFAULT_SEEDS[0] + i for i in range(int(seeds))]
    out = Path(output_dir) if output_dir else REPO / "runs" / f"compare_init_{name}"
    # a misspelt option stops here, before any run, rather than in every run's log
    check_override_ids([bundle_dir / "configs" / c for c in ("train.json", "demo.json", "evaluate.json")], overrides)
    shared = {k: str((out / v).resolve()) for k, v in profile.get("shared", {}).items()}
    common = {"dataset_dir": str(Path(dataset_dir).resolve()), **shared, **overrides}

    results: dict[str, list[dict[str, float]]] = {}
    for init in chosen:
        for seed in seed_list:
            run_dir = (out / f"{init}_seed{seed}").resolve()
            metrics_file = run_dir / profile["metrics_file"]
            if metrics_file.is_file():
                print(f"[{name}] {init} seed {seed}: done before, not rerun", flush=True)
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                start = time.time()
                print(f"[{name}] {init} seed {seed} ...", flush=True)
                extra = {"pretrained_path": str(Path(files[init]).resolve())} if files.get(init) else {}
                _run_one(bundle_dir, run_dir, init, seed, common, demo, profile, extra)
                print(f"[{name}] {init} seed {seed} done in {time.time() - start:.0f} s", flush=True)
            results.setdefault(init, []).append(_read_results(metrics_file, profile["metrics"]))

    keys = profile["metrics"]
    rows, csv_rows = summarise(results, keys, "init")
    heading = (
        f"# Initialisation comparison: {name} (test split, {len(seed_list)} seeds: {', '.join(map(str, seed_list))}"
        f"{', demo settings' if demo else ''})\n\n"
        f"{profile['what']}; in %, mean ± std over seeds (sample std).\n\n"
    )
    table = write_comparison(out, heading, rows, csv_rows, ["init", "seeds", *keys])
    print(table)
    return str(out / "comparison.md")


if __name__ == "__main__":
    main(compare, serialize=lambda _: None)
