"""MONAI's bundle-workflow checks on every bundle: ``ConfigWorkflow(...).initialize()`` +
``check_properties()`` for the train and inference workflow types (train.json; evaluate.json and
inference.json merged after it, as the bundles are run), on each bundle's tiny format twin, and a
one-epoch training driven by ``monai.bundle.create_workflow``. In-process: no subprocess start-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow, create_workflow

from custom_components.data import synthetic
from custom_components.io import load_checkpoint

from bundle_utils import REPO

pytestmark = pytest.mark.slow


def _twin(bundle: str, root: Path) -> tuple[Path, dict]:
    """The bundle's format twin and the tiny overrides its tests use."""
    if bundle == "lvmmed_cls_brain":
        data = synthetic.write_brain_tumor_twin(root, n_per_class=(4, 1), size=32, seed=1)
        return data, {"image_size": 32, "arch": "resnet18", "batch_size": 4}
    if bundle.startswith("lgmvit"):
        make = synthetic.write_brats20_twin if bundle == "lgmvit_brats20" else synthetic.write_lits17_twin
        data = make(root, n_per_split=(2, 1, 1), shape=(32, 32, 8), seed=1)
        return data, {"image_size": 32, "network_def#patch_size": 8, "blur_kernel_size": 7, "batch_size": 16}
    if bundle == "ham_nihcxr14":
        data = synthetic.write_nihcxr14_twin(root, n_images=32, size=48, seed=1)
        return data, {"image_size": 32}
    if bundle == "lvmmed_det_vindr":
        return synthetic.write_vindr_twin(root, n_images=16, size=40, seed=1), {"image_size": 32}
    if bundle == "medvit_medmnist2d":
        synthetic.write_medmnist2d_twin(root / "breastmnist.npz", name="breastmnist", n=(8, 4, 4), size=28, seed=3)
        return root, {"batch_size": 4}
    if bundle == "medvit3d_medmnist3d":
        synthetic.write_medmnist3d_twin(root / "organmnist3d.npz", name="organmnist3d", n=(6, 3, 3), size=28, seed=3)
        return root, {"batch_size": 4}
    if bundle == "lvmmed_seg2d_kvasir":
        return synthetic.write_kvasir_seg_twin(root / "kvasir_seg", n_images=10, size=48, seed=1), {"image_size": 32}
    if bundle == "lvmmed_seg3d_mmwhs":
        return synthetic.write_mmwhs_twin(root / "mmwhs", n_per_split=(2, 1, 1), shape=(24, 24, 8), seed=1), {"image_size": 32}
    if bundle == "lvmmed_pretrain":
        data = synthetic.write_ssl2d_twin(root, n_images=32, size=40, seed=1)
        return data, {"image_size": 32, "arch": "resnet18", "graph_size": 8, "knn_k": 3, "batch_size": 8}
    small = {"image_size": 32, "resize_short": 36, "network_def#patch_size": 8}
    if bundle == "vit_attention_maps_kvasir":
        return synthetic.write_kvasir_twin(root / "kvasir", n_per_class=4, size=(80, 64), seed=1), small
    data = synthetic.write_mura_twin(root / "mura", n_patients=6, size=(48, 64), seed=2)
    return data, {**small, "boxes_json": str(data / "mura_boxes.json")}


BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())
WORKFLOWS = {"train": ["train.json"], "infer": ["evaluate.json", "inference.json"]}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_and_inference_workflows_have_every_property(bundle, tmp_path, monkeypatch):
    configs = REPO / "bundles" / bundle / "configs"
    monkeypatch.chdir(configs.parent)
    data, tiny = _twin(bundle, tmp_path / "data")
    common = {"bundle_root": str(tmp_path / "root"), "dataset_dir": str(data), **tiny}
    for workflow_type, files in WORKFLOWS.items():
        for extra in files:
            config = [str(configs / "train.json"), str(configs / "demo.json")]
            if extra != "train.json":
                config.append(str(configs / extra))
            workflow = ConfigWorkflow(config_file=config, workflow_type=workflow_type, logging_file=False, **common)
            workflow.initialize()
            try:
                assert workflow.check_properties() == [], (bundle, extra)
            finally:
                workflow.finalize()


def test_create_workflow_trains_one_epoch(tmp_path, monkeypatch):
    bundle = REPO / "bundles" / "lgmvit_brats20"
    monkeypatch.chdir(bundle)
    data, tiny = _twin("lgmvit_brats20", tmp_path / "data")
    workflow = create_workflow(
        config_file=[str(bundle / "configs" / "train.json"), str(bundle / "configs" / "demo.json")],
        workflow_type="train", logging_file=False, bundle_root=str(tmp_path / "root"), dataset_dir=str(data),
        num_epochs=1, **tiny,
    )  # fmt: skip
    workflow.run()
    workflow.finalize()
    assert load_checkpoint(tmp_path / "root" / "models" / "last.pt")["trainer"]["epoch"] == 1
    assert workflow.max_epochs == 1 and workflow.train_dataset is not None
