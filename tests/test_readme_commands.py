"""Every command of every bundle README, run as written.

* The README follows the MONAI model-zoo template: its ``##`` sections in :data:`TEMPLATE` order.
* Every ``python -m monai.bundle run`` and ``torchrun`` line (and the explanation-report script) of
  the README's fenced code blocks runs, in document order (the order a user runs them: training
  first, then evaluation, inference, the other workflows), on the bundle's tiny format twin, in a
  temporary copy of the repository layout so that the relative paths resolve as in the real one.
  Placeholders (``--dataset_dir /path/to/...``, ``...``, ``/data/...``, ``/weights/...``) become the
  twin's paths; the case's tiny settings are appended (a small network, no worker processes;
  trainings: one epoch, ``--resume False`` so that each training of the README starts over in the
  same folder and the workflows after it use the last one). ``torchrun`` runs as
  ``python -m torch.distributed.run`` (what the ``torchrun`` command is) with the README's 2
  processes (gloo on a CPU) on a free port. A misspelt option fails the test: the bundles refuse it with one ``error:`` line.
  Every line of a fenced block must be one of these commands or an export, so no command goes
  untested.
* The ``### Export`` commands (under ``## Commands``): per bundle a 1-epoch training with the config
  list of the training that the README's first export command follows (the demo or quick start; the
  config list is this file's, checked against the demo script where there is one, never read from the
  command under test), then the README command with the same tiny overrides appended, and the
  TorchScript file against the eager network built from the training's config list. A README command
  that leaves out a config file of the training fails: the weights do not load, or (options that
  change no weight, e.g. MedViT's ``stem_stride``) the exported network computes something else. The
  full-size variants (the same command for the paper-size training) are checked for their config list.

The commands other than ``torchrun`` (whose launcher starts its own processes) run in forks of one
interpreter that has imported torch and MONAI once (:class:`bundle_utils.ForkedPython`): the same
``monai.bundle`` entry point and arguments as a fresh ``python -m monai.bundle`` process, without its
~4 s of imports per command.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bundle_utils import REPO, TINY, ForkedPython, config_arg, run

pytestmark = pytest.mark.slow

CKPT_EXPORT = ["python", "-m", "monai.bundle", "ckpt_export", "network_def"]
BUNDLE_RUN = ["python", "-m", "monai.bundle", "run"]
TEMPLATE = ["Model Overview", "Data", "Input", "Output", "Training", "Performance", "Commands", "References", "License"]
#: options whose README value is a placeholder for a local path, and what may stand there
PATH_OPTIONS = ("--dataset_dir", "--masks_dir", "--boxes_json", "--pretrained_path", "--npz_path")
PLACEHOLDER = re.compile(r"^(\.\.\.|/path/to/.*|/data/.*|/weights/.*)$")
#: what each workflow writes (globs under the bundle root): the run must write or rewrite one of them
WRITES = {
    "training": "models/**/model.pt",
    "evaluating": "eval/**/metrics_test.json",
    "inferring": "eval/**/predictions*.csv",
    "evaluating_robustness": "eval/**/robustness_test.json",
    "explaining": "eval/**/explanations/index.json",
    "evaluating_explanations": "eval/**/explanation_metrics.json",
}
#: appended to every README ``run`` command (the twins are tiny; worker processes only cost time)
RUN_EXTRA = {"--num_workers": 0}
#: appended per workflow: one epoch, each training starting over; a 2-step PGD
WORKFLOW_EXTRA = {"training": {"--num_epochs": 1, "--resume": False}, "evaluating_robustness": {"--pgd_steps": 2}}


def _brats20(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_brats20_twin

    return {"--dataset_dir": str(write_brats20_twin(d, n_per_split=(1, 1, 1), shape=(40, 40, 16), seed=1))}


def _lits17(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_lits17_twin

    return {"--dataset_dir": str(write_lits17_twin(d, n_per_split=(1, 1, 1), shape=(48, 48, 20), seed=2))}


def _medmnist2d(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_medmnist2d_twin

    write_medmnist2d_twin(d / "breastmnist.npz", name="breastmnist", n=(8, 4, 4), size=28, seed=3)
    return {"--dataset_dir": str(d)}


def _medmnist3d(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_medmnist3d_twin

    write_medmnist3d_twin(d / "organmnist3d.npz", name="organmnist3d", n=(8, 4, 4), size=28, seed=3)
    return {"--dataset_dir": str(d)}


def _standin_sup(d: Path) -> str:
    """timm-layout weights of the tiny ViT of :data:`VIT_SMALL` (the ``sup`` initialisation's file)."""
    from custom_components.data.synthetic import write_standin_vit_checkpoints

    return str(write_standin_vit_checkpoints(d / "weights", img_size=32, patch_size=8, hidden_size=64, num_layers=2,
                                             num_heads=4, mlp_dim=128, seed=5)["sup"])  # fmt: skip


def _kvasir(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_kvasir_twin

    twin = write_kvasir_twin(d, n_per_class=8, size=(80, 64), seed=1)
    return {"--dataset_dir": str(twin), "--masks_dir": str(twin / "masks"), "--pretrained_path": _standin_sup(d)}


def _mura(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_mura_twin

    twin = write_mura_twin(d, n_patients=8, size=(48, 64), seed=2)
    return {"--dataset_dir": str(twin), "--boxes_json": str(twin / "mura_boxes.json"), "--pretrained_path": _standin_sup(d)}


def _nihcxr14(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_nihcxr14_twin

    return {"--dataset_dir": str(write_nihcxr14_twin(d, n_images=32, size=48, seed=1))}


def _brain_tumor(d: Path) -> dict[str, str]:
    """The Brain Tumor MRI twin and a stand-in LVM-Med file (torchvision layout, written from MONAI's ResNet-18)."""
    import torch

    from custom_components.data.synthetic import write_brain_tumor_twin
    from custom_components.networks.ham import DilatedResNet

    torch.manual_seed(5)
    state = {**DilatedResNet("resnet18", output_stride=32, dilation=False).state_dict(),
             "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    (d / "weights").mkdir(parents=True, exist_ok=True)
    torch.save(state, d / "weights" / "lvmmed_resnet18.torch")
    return {"--dataset_dir": str(write_brain_tumor_twin(d / "brain", n_per_class=(8, 2), size=40, seed=1)),
            "--pretrained_path": str(d / "weights" / "lvmmed_resnet18.torch")}


def _kvasir_seg(d: Path) -> dict[str, str]:
    """The Kvasir-SEG twin and a stand-in encoder file (torchvision key layout, MONAI's ResNet-18 with "A" shortcuts)."""
    import torch
    from monai.networks.nets import ResNet

    from custom_components.data.synthetic import write_kvasir_seg_twin

    torch.manual_seed(6)
    net = ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3, num_classes=1000,
                 shortcut_type="A", bias_downsample=False)  # fmt: skip
    (d / "weights").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), d / "weights" / "lvmmed_resnet18.torch")
    return {"--dataset_dir": str(write_kvasir_seg_twin(d / "kvasir_seg", n_images=12, size=48, seed=1)),
            "--pretrained_path": str(d / "weights" / "lvmmed_resnet18.torch")}



def _mmwhs(d: Path) -> dict[str, str]:
    """MM-WHS CT and MR twins in one folder and a stand-in encoder file (MONAI's ResNet-18, RGB stem, torchvision keys)."""
    import torch
    from monai.networks.nets import ResNet

    from custom_components.data.synthetic import write_mmwhs_twin

    torch.manual_seed(7)
    net = ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3, num_classes=1000,
                 shortcut_type="A", bias_downsample=False)  # fmt: skip
    (d / "weights").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), d / "weights" / "lvmmed_resnet18.torch")
    for modality in ("ct", "mr"):
        write_mmwhs_twin(d / "mmwhs", n_per_split=(2, 1, 1), shape=(24, 24, 8), seed=1, modality=modality)
    return {"--dataset_dir": str(d / "mmwhs"), "--pretrained_path": str(d / "weights" / "lvmmed_resnet18.torch")}


def _vindr(d: Path) -> dict[str, str]:
    """VinDr-CXR and NIH ChestX-ray14 twins in one folder (train.csv + train/ beside BBox_List_2017.csv +
    images/), and a stand-in torchvision-layout ResNet-18 file for the LVM-Med init (the case's arch)."""
    from custom_components.data.synthetic import write_nihcxr14_twin, write_vindr_twin
    from custom_components.networks.ham import DilatedResNet

    write_vindr_twin(d, n_images=16, size=40, seed=1)
    write_nihcxr14_twin(d, n_images=32, size=48, seed=1)
    torch.manual_seed(0)
    weights = d / "weights" / "lvmmed_resnet18.torch"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(DilatedResNet("resnet18", output_stride=32, dilation=False).state_dict(), weights)
    return {"--dataset_dir": str(d), "--pretrained_path": str(weights)}
def _ssl2d(d: Path) -> dict[str, str]:
    from custom_components.data.synthetic import write_ssl2d_twin

    return {"--dataset_dir": str(write_ssl2d_twin(d, n_images=40, size=48, seed=1))}


@dataclass(frozen=True)
class Case:
    train_configs: tuple[str, ...]  # the training the README's first export command follows
    full_configs: tuple[str, ...]  # the full-size (paper settings) training
    root: str  # that training's bundle_root, relative to the repository root
    twin: Callable[[Path], dict[str, str]]  # writes the data, returns the paths for PATH_OPTIONS
    input_shape: tuple[int, ...]
    overrides: dict = field(default_factory=dict)  # tiny settings: every training, workflow and export
    demo_script: str | None = None  # the script whose training is `train_configs`
    demo_needles: tuple[str, ...] = ()  # its config list and output folder, as written there


# image 32, patch 8, and demo.json's width/depth (so that train.json alone builds the same small ViT)
VIT_WIDTH = {"--network_def#hidden_size": 64, "--network_def#num_layers": 2, "--network_def#num_heads": 4,
             "--network_def#mlp_dim": 128}  # fmt: skip
LGMVIT_TINY = {**dict(zip(TINY[::2], (int(v) for v in TINY[1::2]), strict=True)), **VIT_WIDTH}
VIT_SMALL = {"--image_size": 32, "--resize_short": 36, "--network_def#patch_size": 8, **VIT_WIDTH, "--batch_size": 8}
ATTENTION = ("configs/train.json", "configs/init/random.json", "configs/demo.json")
# MedMNIST batches of 4: the training loaders drop the last partial batch, and each of torchrun's 2 processes
# gets 4 of the twin's 8 training images (a larger batch leaves the loader empty: MONAI then skips the run)
CASES = {
    # demo.json's ResNet-18 and fusion width, so that train.json alone builds the same small network
    "ham_nihcxr14": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/ham_nihcxr14",
        _nihcxr14, (2, 3, 32, 32),
        {"--image_size": 32, "--arch": "resnet18", "--fusion_channels": 32, "--batch_size": 8},
    ),
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
         "--image_size": 14, "--batch_size": 4},
    ),
    # demo.json's settings, so that train.json alone builds the same small network
    "medvit3d_medmnist3d": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/medvit3d_medmnist3d",
        _medmnist3d, (2, 1, 28, 28, 28),
        {"--depths": [1, 1, 5, 1], "--stem_stride": 4, "--path_dropout": 0.0, "--batch_size": 4},
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
    # demo.json's ResNet-18 at 32 px, so that train.json alone builds the same small network
    "lvmmed_cls_brain": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/lvmmed_cls_brain",
        _brain_tumor, (2, 3, 32, 32), {"--image_size": 32, "--arch": "resnet18", "--batch_size": 8},
    ),
    # demo.json's ResNet-18 encoder and decoder widths at 32 px, so that train.json alone builds the same network
    "lvmmed_seg2d_kvasir": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/lvmmed_seg2d_kvasir",
        _kvasir_seg, (2, 3, 32, 32),
        {"--image_size": 32, "--backbone": "resnet18", "--decoder_channels": [64, 32, 16, 16, 8], "--batch_size": 8},
    ),
    # demo.json's ResNet-18 encoder and decoder widths at 32 px; one grey input channel, 8 classes
    "lvmmed_seg3d_mmwhs": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/lvmmed_seg3d_mmwhs",
        _mmwhs, (2, 1, 32, 32),
        {"--image_size": 32, "--backbone": "resnet18", "--decoder_channels": [64, 32, 16, 16, 8], "--batch_size": 8},
    ),
    # demo.json's backbone and graphs, so that train.json alone builds the same small network
    "lvmmed_pretrain": Case(
        ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/lvmmed_pretrain",
        _ssl2d, (2, 3, 32, 32),
        {"--image_size": 32, "--arch": "resnet18", "--graph_size": 8, "--knn_k": 3, "--num_matches": 4,
         "--batch_size": 8},
    ),
}  # fmt: skip
# demo.json's ResNet-18 FPN (layer1-2, 32 channels, its anchors), so that train.json alone builds the same small network
CASES["lvmmed_det_vindr"] = Case(
    ("configs/train.json", "configs/demo.json"), ("configs/train.json",), "bundles/lvmmed_det_vindr",
    _vindr, (2, 3, 64, 64),
    {"--image_size": 32, "--arch": "resnet18", "--returned_layers": [1, 2], "--fpn_channels": 32,
     "--base_anchor_shapes": [[8, 8], [6, 12], [12, 6]], "--batch_size": 4},
)  # fmt: skip


def readme(name: str) -> Path:
    return REPO / "bundles" / name / "docs" / "README.md"


def section(text: str, heading: str) -> str:
    """The body of the first ``heading`` line (``## X``, ``### X``), up to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    found = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#{{1,{level}}} |\Z)", text, re.S | re.M)
    assert found, f"no '{heading}' section"
    return found.group(1)


def block_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks of ``text``, continuation lines (``\\``) joined."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    return [line.strip() for b in blocks for line in re.sub(r"\\\n\s*", " ", b).splitlines() if line.strip()]


def export_commands(path: Path) -> list[list[str]]:
    """The ``ckpt_export`` command lines of the fenced code blocks under ``### Export``, split by ``shlex``."""
    text = path.read_text()
    assert re.search(r"^### Export$", section(text, "## Commands"), re.M), f"{path}: '### Export' is not under '## Commands'"
    lines = block_lines(section(text, "### Export"))
    cmds = [shlex.split(line) for line in lines if line.startswith("python -m monai.bundle ckpt_export")]
    assert cmds, f"{path}: no 'python -m monai.bundle ckpt_export' line in a code block under '### Export'"
    return cmds


def readme_commands(path: Path) -> list[list[str]]:
    """Every command line of the README's fenced code blocks, in document order, split by ``shlex``."""
    cmds = [shlex.split(line) for line in block_lines(path.read_text())]
    for cmd in cmds:
        known = cmd[:4] == BUNDLE_RUN or cmd[:5] == CKPT_EXPORT or cmd[0] == "torchrun" or (
            cmd[0] == "python" and cmd[1].endswith(".py"))  # fmt: skip
        assert known, f"{path}: a code block holds a line this test does not run: {shlex.join(cmd)}"
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


def with_paths(cmd: list[str], paths: dict[str, str]) -> list[str]:
    """``cmd`` with the value of every option of :data:`PATH_OPTIONS` (a placeholder) replaced by ``paths``'."""
    out = list(cmd)
    for i, tok in enumerate(cmd[:-1]):
        if tok in PATH_OPTIONS:
            assert PLACEHOLDER.match(cmd[i + 1]), f"{tok} {cmd[i + 1]}: not a placeholder path in {shlex.join(cmd)}"
            assert tok in paths, f"{tok}: the twin has no such file, in {shlex.join(cmd)}"
            out[i + 1] = paths[tok]
    left = [t for t in out if PLACEHOLDER.match(t)]
    assert not left, f"placeholders {left} left in {shlex.join(cmd)}: give them with an option of PATH_OPTIONS"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eager_network(bundle: Path, configs: tuple[str, ...], overrides: dict) -> torch.nn.Module:
    """``network_def`` as the training built it (its config list and overrides), parsed in this process."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / c) for c in configs])
    for k, v in overrides.items():
        parser[k.removeprefix("--")] = v
    return parser.get_parsed_content("network_def")


def repo_copy(name: str, tmp_path: Path) -> Path:
    """``bundles/<name>/configs`` (and the scripts the READMEs call) in a temporary repository layout."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "bundles" / name / "configs", repo / "bundles" / name / "configs")
    shutil.copytree(REPO / "scripts", repo / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    return repo / "bundles" / name


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    forked = ForkedPython(tmp_path_factory.mktemp("forked_python"))
    yield forked
    forked.close()


def test_every_bundle_readme_has_a_case():
    assert sorted(p.parents[1].name for p in (REPO / "bundles").glob("*/docs/README.md")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_readme_follows_the_model_zoo_template(name):
    text = readme(name).read_text()
    assert text.startswith("# ") and not text.startswith("# ", 1), "the first line is the '# <title>'"
    assert re.findall(r"^## (.*)$", text, re.M) == TEMPLATE
    assert len(re.findall(r"^# ", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)) == 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_readme_commands_run_on_the_twin(name, tmp_path, python):
    case = CASES[name]
    bundle = repo_copy(name, tmp_path)
    paths = case.twin(tmp_path / "data")
    cmds = readme_commands(readme(name))
    runs = [c for c in cmds if c[:4] == BUNDLE_RUN]
    assert runs and runs[0][4] == "training", "the first 'monai.bundle run' command of the README must be a training"
    for cmd in cmds:
        if cmd[:5] == CKPT_EXPORT:  # test_export_command_runs_after_its_training
            continue
        if cmd[0] == "python" and cmd[1].endswith(".py"):  # a script of the repository
            written, extra = option(cmd, "--out"), {}
        else:
            run_args = cmd[cmd.index("-m") :] if cmd[0] == "torchrun" else cmd[1:]
            assert run_args[:3] == ["-m", "monai.bundle", "run"], shlex.join(cmd)
            workflow, configs = run_args[3], config_list(cmd)
            assert workflow in WRITES, f"{shlex.join(cmd)}: workflow {workflow!r} is none of {sorted(WRITES)}"
            assert all((bundle / c).is_file() for c in configs), shlex.join(cmd)
            assert cmd[0] != "torchrun" or "configs/multi_gpu_train.json" in configs, shlex.join(cmd)
            written, extra = WRITES[workflow], {**case.overrides, **RUN_EXTRA, **WORKFLOW_EXTRA.get(workflow, {})}
        before = {p: p.stat().st_mtime_ns for p in bundle.glob(written)}
        full = [*with_paths(cmd, paths), *cli(extra)]
        if cmd[0] == "torchrun":  # the launcher's own processes; a free port, not the default 29500 another run may hold
            run([sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port()), *full[1:]], cwd=bundle)
        else:
            python.run(full, cwd=bundle)
        after = {p: p.stat().st_mtime_ns for p in bundle.glob(written)}
        assert any(before.get(p) != t for p, t in after.items()), f"{shlex.join(cmd)} wrote no {written}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_section_gives_the_full_size_variant(name):
    case = CASES[name]
    cmds = export_commands(readme(name))
    for cmd in cmds:
        assert cmd[:5] == CKPT_EXPORT and option(cmd, "--meta_file") == "configs/metadata.json", shlex.join(cmd)
        assert option(cmd, "--filepath").endswith("model.ts") and option(cmd, "--ckpt_file").endswith("model.pt")
    assert config_list(cmds[0]) == case.train_configs
    assert case.full_configs in [config_list(c) for c in cmds[1:]]
    if case.demo_script:  # the case's training is the demo's
        script = (REPO / case.demo_script).read_text()
        assert all(needle in script for needle in case.demo_needles), case.demo_script


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_command_runs_after_its_training(name, tmp_path, python):
    case = CASES[name]
    bundle = repo_copy(name, tmp_path)  # the repository's layout: bundles/<name>/configs, demo/... beside it
    root = bundle.parents[1] / case.root
    python.run([
        "python", "-m", "monai.bundle", "run", "training", "--config_file", config_arg(*case.train_configs),
        "--bundle_root", str(root), "--dataset_dir", case.twin(tmp_path / "data")["--dataset_dir"],
        *cli(case.overrides), *cli(RUN_EXTRA), "--num_epochs", "1",
    ], cwd=bundle)  # fmt: skip

    cmd = export_commands(readme(name))[0]
    assert cmd[:5] == CKPT_EXPORT, shlex.join(cmd)
    python.run([*cmd, *cli(case.overrides)], cwd=bundle)

    net = eager_network(bundle, case.train_configs, case.overrides)
    ckpt = bundle / option(cmd, "--ckpt_file")
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    scripted = torch.jit.load(str(bundle / option(cmd, "--filepath")))
    x = torch.rand(*case.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net.eval()(x), rtol=1e-4, atol=1e-5)
