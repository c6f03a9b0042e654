"""Split choice of the slice-store preparation: published, a split file, or a seeded random split.

A partial dataset (only some cases of the published split) must still train: ``split="random"``
splits the cases present case-wise and writes ``<store>/split.json``; the datalist follows the
chosen split, and an empty set names itself and ``--split random``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from custom_components.data.brats20 import prepare_brats20
from custom_components.data.datalists import load_split
from custom_components.data.lits17 import prepare_lits17
from custom_components.data.slice_store import SliceDataset
from custom_components.data.splits import SETS, parse_ratios, random_split, set_sizes
from custom_components.data.synthetic import write_brats20_twin, write_lits17_twin
from custom_components.io import InputDataError

REPO = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats20_format"
SHAPE = (24, 24, 8)


def cases_of(datalist: dict) -> dict[str, list[str]]:
    return {k: [e["case"] for e in v] for k, v in datalist.items()}


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """Seven BraTS cases: 3 / 2 / 2 of the published training / validation / test sets."""
    return write_brats20_twin(tmp_path_factory.mktemp("twin"), n_per_split=(3, 2, 2), shape=SHAPE, seed=4)


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> Path:
    """A partial dataset: two cases, both in the published training set."""
    return write_brats20_twin(tmp_path_factory.mktemp("partial"), n_per_split=(2, 0, 0), shape=SHAPE, seed=5)


# ---------------------------------------------------------------- set sizes and the split itself


def test_default_ratios_reproduce_the_published_sizes():
    assert set_sizes(369) == (258, 37, 74)  # BraTS2020
    assert set_sizes(131) == (92, 13, 26)  # LiTS17
    assert parse_ratios("7,1,2") == parse_ratios([0.7, 0.1, 0.2]) == (0.7, 0.1, 0.2)


@pytest.mark.parametrize("ratios", [(0.7, 0.1, 0.2), (0.6, 0.2, 0.2), (0.8, 0.2, 0.0), (1, 1, 1)])
@pytest.mark.parametrize("n", [3, 7, 10, 25, 50, 101])
def test_sizes_follow_the_ratios(n, ratios):
    sizes = set_sizes(n, ratios)
    r = parse_ratios(ratios)
    assert sum(sizes) == n
    rounding_only = n * min(s for s in r if s > 0) >= 1  # no set needs a case moved into it
    for size, share in zip(sizes, r, strict=True):
        if share == 0:
            assert size == 0
        else:
            assert size >= 1, (n, ratios, sizes)
            if rounding_only:
                assert abs(size - n * share) < 1, (n, ratios, sizes)


def test_fewer_cases_than_sets_fill_training_then_validation():
    assert set_sizes(1) == (1, 0, 0)
    assert set_sizes(2) == (1, 1, 0)
    assert set_sizes(3) == (1, 1, 1)
    assert set_sizes(2, (0.5, 0, 0.5)) == (1, 0, 1)


@pytest.mark.parametrize("bad", [(0.7, 0.3), (0, 0.5, 0.5), (0.7, -0.1, 0.4), "a,b,c", (float("nan"), 1, 1)])
def test_bad_ratios_are_refused(bad):
    with pytest.raises(ValueError, match="split_ratios"):
        parse_ratios(bad)


def test_random_split_is_case_wise_disjoint_and_seeded():
    cases = [f"BraTS20_Training_{i:03d}" for i in range(1, 41)]
    split = random_split(cases, seed=42)
    assert list(split) == list(SETS)
    assert [len(v) for v in split.values()] == [28, 4, 8]
    sets = [set(v) for v in split.values()]
    assert set.union(*sets) == set(cases) and sum(map(len, sets)) == len(cases)  # each case once
    # depends on the seed and the set of cases only, not on their order
    assert random_split(cases[::-1], seed=42) == split
    assert random_split(cases, seed=43) != split


# ---------------------------------------------------------------- preparation with a split choice


def test_random_split_file_beside_the_store_is_written_and_reused(twin, tmp_path, capsys):
    out = tmp_path / "store"
    dl = read(prepare_brats20(twin, out, split="random", split_seed=7, image_size=16, progress=False))
    printed = capsys.readouterr().out
    split_file = out / "split.json"
    assert "training 5, validation 1, test 1" in printed and str(split_file) in printed
    raw = read(split_file)
    assert raw["_random_split"] == {"seed": 7, "ratios": [0.7, 0.1, 0.2], "n_cases": 7}
    split = load_split(split_file)  # the published form, usable as split=<file>
    assert cases_of(dl) == split == random_split(sorted(p.name for p in twin.iterdir() if p.is_dir()), seed=7)
    # every slice of a case is in the set of its case: entries are whole cases
    assert all(e["image"] == f"{e['case']}/image.npy" for v in dl.values() for e in v)

    mtime = split_file.stat().st_mtime_ns
    prepare_brats20(twin, out, split="random", split_seed=7, image_size=16, progress=False)
    printed = capsys.readouterr().out
    assert "reusing" in printed and "7 cases were already prepared" in printed
    assert split_file.stat().st_mtime_ns == mtime

    # the file works as an explicit split for another store
    dl2 = read(prepare_brats20(twin, tmp_path / "other", split=split_file, image_size=16, progress=False))
    assert cases_of(dl2) == split


def test_switching_split_rebuilds_the_datalist(twin, tmp_path, capsys):
    out = tmp_path / "store"
    published = {k: [c for c in v if (twin / c).is_dir()] for k, v in load_split("brats20").items()}
    assert cases_of(read(prepare_brats20(twin, out, image_size=16, progress=False))) == published
    seed7 = cases_of(read(prepare_brats20(twin, out, split="random", split_seed=7, image_size=16, progress=False)))
    assert seed7 == load_split(out / "split.json") != published
    capsys.readouterr()
    seed8 = cases_of(read(prepare_brats20(twin, out, split="random", split_seed=8, image_size=16, progress=False)))
    assert "made for other cases, seed or ratios" in capsys.readouterr().out
    assert seed8 == load_split(out / "split.json") != seed7
    ratios = cases_of(read(prepare_brats20(twin, out, split="random", split_seed=8, split_ratios="0.5,0.5,0",
                                           image_size=16, progress=False)))
    assert [len(ratios[k]) for k in SETS] == [4, 3, 0]
    # back to the published split: the random split file does not leak into the datalist
    assert cases_of(read(prepare_brats20(twin, out, split="published", image_size=16, progress=False))) == published
    assert "7 cases were already prepared" in capsys.readouterr().out  # only the datalist changed


def test_published_split_with_an_empty_set_names_it_and_the_fix(train_only, tmp_path, capsys):
    dl_path = prepare_brats20(train_only, tmp_path / "store", image_size=16, progress=False)
    printed = capsys.readouterr().out
    assert "training 2, validation 0, test 0" in printed
    assert "no case of set validation, test of split brats20 is present" in printed and "--split random" in printed
    with pytest.raises(InputDataError) as ei:
        SliceDataset(dl_path, split="validation")
    msg = str(ei.value)
    assert "\n" not in msg and "set 'validation' has no case" in msg and "pass --split random" in msg, msg

    # the fix: a random split of the two cases present trains (one training, one validation case)
    dl_path = prepare_brats20(train_only, tmp_path / "store", split="random", split_seed=42, image_size=16,
                              progress=False)
    assert "set test stays empty" in capsys.readouterr().out
    assert len(SliceDataset(dl_path, split="training").case_ids) == 1
    assert len(SliceDataset(dl_path, split="validation").case_ids) == 1
    with pytest.raises(InputDataError, match="too few cases for it; add cases or change split_ratios"):
        SliceDataset(dl_path, split="test")


def test_random_split_of_requested_cases(twin, tmp_path):
    pick = sorted(p.name for p in twin.iterdir() if p.is_dir())[:4]
    dl = read(prepare_brats20(twin, tmp_path, split="random", cases=pick, image_size=16, progress=False))
    assert sorted(c for v in cases_of(dl).values() for c in v) == pick and "unsplit" not in dl


def test_lits17_random_split(tmp_path):
    root = write_lits17_twin(tmp_path / "ds", n_per_split=(2, 1, 1), shape=(16, 16, 8), seed=1)
    dl = read(prepare_lits17(root, tmp_path / "store", split="random", split_seed=3, image_size=16, progress=False))
    cases = sorted(p.name.removesuffix(".nii") for p in (root / "scans").iterdir())
    assert cases_of(dl) == random_split(cases, seed=3) == load_split(tmp_path / "store" / "split.json")
    assert [len(dl[k]) for k in SETS] == [2, 1, 1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_split_options(train_only, tmp_path):
    main = _script("prepare_brats20").main
    args = ["prepare", "--dataset_dir", str(train_only), "--output_dir", str(tmp_path), "--image_size", "16",
            "--progress", "False", "--split", "random", "--split_ratios", "0.5,0.5,0", "--split_seed", "3"]
    assert main(args) == 0
    assert read(tmp_path / "split.json")["_random_split"] == {"seed": 3, "ratios": [0.5, 0.5, 0.0], "n_cases": 2}
    assert [len(v) for v in read(tmp_path / "datalist.json").values()] == [1, 1, 0]


@pytest.mark.parametrize("bundle", ["lgmvit_brats20", "lgmvit_lits17"])
def test_bundle_config_passes_the_split_options(bundle):
    config = read(REPO / "bundles" / bundle / "configs" / "train.json")
    # top-level keys, so `monai.bundle run ... --split random` is a known override
    assert config["split"] == "published" and config["split_ratios"] == [0.7, 0.1, 0.2]
    assert config["split_seed"] == "@seed"
    assert {k: config["prepare"][k] for k in ("split", "split_ratios", "split_seed")} == {
        "split": "@split", "split_ratios": "@split_ratios", "split_seed": "@split_seed"}


# ---------------------------------------------------------------- real-format sample


@pytest.mark.skipif(not (REAL / "MICCAI_BraTS2020_TrainingData").is_dir(), reason="real-format BraTS sample absent")
def test_real_two_case_sample_trains_with_a_random_split(tmp_path):
    # both sample cases are in the published training set: the published split has no validation case
    dl_path = prepare_brats20(REAL, tmp_path, split="random", split_seed=42, image_size=16, progress=False)
    train, val = SliceDataset(dl_path, split="training"), SliceDataset(dl_path, split="validation")
    assert len(train.case_ids) == len(val.case_ids) == 1 and train.case_ids != val.case_ids
    assert len(train) == len(val) == 155
    assert load_split(tmp_path / "split.json")["test"] == []
