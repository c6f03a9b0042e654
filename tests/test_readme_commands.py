"""The ``## Export`` command of every bundle README, run as written.

Per bundle: a 1-epoch training with the config list of the training that the README's first export
command follows (the demo or quick start; the config list is this file's, checked against the demo
script where there is one, never read from the command under test), in a temporary copy of the
repository layout so that the command's relative paths resolve as in the real one; then the README
command with the same tiny overrides appended, and the TorchScript file against the eager network
built from the training's config list. A README command that leaves out a config file of the
training fails: the weights do not load, or (options that change no weight, e.g. MedViT's
``stem_stride``) the exported network computes something else.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bundle_utils import REPO, TINY, config_arg, run

pytestmark = pytest.mark.slow

CKPT_EXPORT = ["python", "-m", "monai.bundle", "ckpt_export", "network_def"]


def _brats20(d: Path) -> list[str]:
    from custom_components.data.synthetic import write_brats20_twin

    return ["--dataset_dir", str(write_brats20_twin(d, n_per_split=(1, 1, 1), shape=(40, 40, 16), seed=1))]


def _lits17(d: Path) -> list[str]:
    from custom_components.data.synthetic import write_lits17_twin

    return ["--dataset_dir", str(write_lits17_twin(d, n_per_split=(1, 1, 1), shape=(48, 48, 20), seed=2))]


def _medmnist2d(d: Path) -> list[str]:
    from custom_components.data.synthetic import write_medmnist2d_twin

    write_medmnist2d_twin(d / "breastmnist.npz", name="breastmnist", n=(8, 4, 4), size=28, seed=3)
    return ["--dataset_dir", str(d)]


def _medmnist3d(d: Path) -> list[str]:
    from custom_components.data.synthetic import write_medmnist3d_twin

    write_medmnist3d_twin(d / "organmnist3d.npz", name="organmnist3d", n=(8, 4, 4), size=28, seed=3)
    return ["--dataset_dir", str(d)]


def _kvasir(d: Path) -> list[str]:
    from custom_components.data.synthetic import write_kvasir_twin

    return ["--dataset_dir", str(write_kvasir_twin(d, n_per_class=8, size=(80, 64), seed=1))]


def _mura(d: Path) -> list[str]:
    from custom_components.data.synthetic import write_mura_twin

    return ["--dataset_dir", str(write_mura_twin(d, n_patients=8, size=(48, 64), seed=2))]


@dataclass(frozen=True)
class Case:
    train_configs: tuple[str, ...]  # the training the README's first export command follows
    full_configs: tuple[str, ...]  # the full-size (paper settings) training
    root: str  # that training's bundle_root, relative to the repository root
    twin: Callable[[Path], list[str]]  # writes the data, returns its training arguments
    input_shape: tuple[int, ...]
    overrides: dict = field(default_factory=dict)  # tiny settings: training and export alike
    demo_script: str | None = None  # the script whose training is `train_configs`
    demo_needles: tuple[str, ...] = ()  # its config list and output folder, as written there


LGMVIT_TINY = dict(zip(TINY[::2], (int(v) for v in TINY[1::2]), strict=True))  # image 32, patch 8: keeps demo.json's width/depth
VIT_SMALL = {"--image_size": 32, "--resize_short": 36, "--network_def#patch_size": 8}
ATTENTION = ("configs/train.json", "configs/init/random.json", "configs/demo.json")
CASES = {
    "lgmvit_brats20": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "demo/lgmvit_brats20/bundle",
        _brats20, (2, 3, 32, 32), LGMVIT_TINY, "scripts/demo_lgmvit_brats20.sh",
        ("\"['configs/train.json','configs/demo.json']\"", "/demo/lgmvit_brats20}", 'ROOT=$DEMO_DIR/bundle'),
    ),
    "lgmvit_lits17": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/lgmvit_lits17",
        _lits17, (2, 3, 32, 32), LGMVIT_TINY,
    ),
    # small_input.json changes no weight shape (stem stride 1): only the output comparison sees it dropped
    "medvit_medmnist2d": Case(
        ("configs/train.json", "configs/small_input.json"), ("configs/train.json",), "bundles/medvit_medmnist2d",
        _medmnist2d, (2, 3, 14, 14),
        {"--network_def#_target_": "custom_components.networks.medvit.MedViT", "--network_def#depths": [1, 1, 5, 1],
         "--image_size": 14, "--batch_size": 8},
    ),
    "medvit3d_medmnist3d": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/medvit3d_medmnist3d",
        _medmnist3d, (2, 1, 28, 28, 28),
    ),
    "vit_attention_maps_kvasir": Case(
        ATTENTION, ("configs/train.json", "configs/init/sup.json"), "demo/attention_maps_kvasir/bundle",
        _kvasir, (2, 3, 32, 32), VIT_SMALL, "scripts/demo_attention_maps.sh",
        ("\"'configs/train.json','configs/init/$init.json','configs/demo.json'\"", "/demo/attention_maps_$DATASET}",
         'ROOT=$DEMO_DIR/bundle'),
    ),
    "vit_attention_maps_mura": Case(
        ATTENTION, ("configs/train.json", "configs/init/sup.json"), "demo/attention_maps_mura/bundle",
        _mura, (2, 3, 32, 32), VIT_SMALL, "scripts/demo_attention_maps.sh",
        ("\"'configs/train.json','configs/init/$init.json','configs/demo.json'\"", "/demo/attention_maps_$DATASET}",
         'ROOT=$DEMO_DIR/bundle'),
    ),
}  # fmt: skip


def export_commands(readme: Path) -> list[list[str]]:
    """The ``ckpt_export`` command lines of the fenced code blocks under ``## Export``, split by ``shlex``."""
    text = readme.read_text()
    section = re.search(r"^## Export\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"{readme}: no '## Export' section"
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section.group(1), re.S | re.M)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    cmds = [shlex.split(line) for line in lines if line.startswith("python -m monai.bundle ckpt_export")]
    assert cmds, f"{readme}: no 'python -m monai.bundle ckpt_export' line in a code block under '## Export'"
    return cmds


def option(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, f"{name} given {cmd.count(name)} times in {shlex.join(cmd)}"
    return cmd[cmd.index(name) + 1]


def config_list(cmd: list[str]) -> tuple[str, ...]:
    value = option(cmd, "--config_file")
    return tuple(ast.literal_eval(value)) if value.startswith("[") else (value,)


def cli(overrides: dict) -> list[str]:
    # lists as JSON, which the bundle CLI (fire) reads back as lists
    return [a for k, v in overrides.items() for a in (k, json.dumps(v) if isinstance(v, list) else str(v))]


def eager_network(bundle: Path, configs: tuple[str, ...], overrides: dict) -> torch.nn.Module:
    """``network_def`` as the training built it (its config list and overrides), parsed in this process."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / c) for c in configs])
    for k, v in overrides.items():
        parser[k.removeprefix("--")] = v
    return parser.get_parsed_content("network_def")


def test_every_bundle_readme_has_a_case():
    assert sorted(p.parents[1].name for p in (REPO / "bundles").glob("*/docs/README.md")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_section_gives_the_full_size_variant(name):
    case = CASES[name]
    cmds = export_commands(REPO / "bundles" / name / "docs" / "README.md")
    for cmd in cmds:
        assert cmd[:5] == CKPT_EXPORT and option(cmd, "--meta_file") == "configs/metadata.json", shlex.join(cmd)
        assert option(cmd, "--filepath").endswith("model.ts") and option(cmd, "--ckpt_file").endswith("model.pt")
    assert config_list(cmds[0]) == case.train_configs
    assert case.full_configs in [config_list(c) for c in cmds[1:]]
    if case.demo_script:  # the case's training is the demo's
        script = (REPO / case.demo_script).read_text()
        assert all(needle in script for needle in case.demo_needles), case.demo_script


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_command_runs_after_its_training(name, tmp_path):
    case = CASES[name]
    repo = tmp_path / "repo"  # the repository's layout: bundles/<name>/configs, demo/... beside it
    bundle = repo / "bundles" / name
    shutil.copytree(REPO / "bundles" / name / "configs", bundle / "configs")
    root = repo / case.root
    run([
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config_arg(*case.train_configs),
        "--bundle_root", str(root), *case.twin(tmp_path / "data"), *cli(case.overrides), "--num_epochs", "1",
    ], cwd=bundle)  # fmt: skip

    cmd = export_commands(REPO / "bundles" / name / "docs" / "README.md")[0]
    assert cmd[:5] == CKPT_EXPORT, shlex.join(cmd)
    run([sys.executable, *cmd[1:], *cli(case.overrides)], cwd=bundle)

    net = eager_network(bundle, case.train_configs, case.overrides)
    ckpt = bundle / option(cmd, "--ckpt_file")
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    scripted = torch.jit.load(str(bundle / option(cmd, "--filepath")))
    x = torch.rand(*case.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net.eval()(x), rtol=1e-4, atol=1e-5)
