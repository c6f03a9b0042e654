"""The attention-map bundles' configs come from one source (scripts/generate_bundles.py)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from bundle_utils import REPO

sys.path.insert(0, str(REPO / "scripts"))
import generate_bundles


def test_committed_bundle_configs_are_generated_from_the_sources():
    assert generate_bundles.generate(check=True) == [], "run python scripts/generate_bundles.py"


@pytest.fixture()
def sources(tmp_path, monkeypatch):
    copy = tmp_path / "bundle_sources"
    shutil.copytree(generate_bundles.SOURCES, copy)
    monkeypatch.setattr(generate_bundles, "SOURCES", copy)
    return copy / "vit_attention_maps"


def test_one_edit_of_the_source_changes_both_bundles(sources, tmp_path):
    evaluate = sources / "configs" / "evaluate.json"
    config = json.loads(evaluate.read_text())
    config["eval_split"] = "validation"
    evaluate.write_text(json.dumps(config))
    stale = generate_bundles.generate(bundles_dir=tmp_path / "bundles")
    assert {p.relative_to(tmp_path / "bundles").as_posix() for p in stale if p.name == "evaluate.json"} == {
        "vit_attention_maps_kvasir/configs/evaluate.json",
        "vit_attention_maps_mura/configs/evaluate.json",
    }
    for bundle in ("vit_attention_maps_kvasir", "vit_attention_maps_mura"):
        assert json.loads((tmp_path / "bundles" / bundle / "configs" / "evaluate.json").read_text())["eval_split"] == "validation"


def test_dataset_settings_go_where_the_source_says(sources):
    kvasir = json.loads(generate_bundles.render("vit_attention_maps", "kvasir")["configs/train.json"])
    mura = json.loads(generate_bundles.render("vit_attention_maps", "mura")["configs/train.json"])
    assert kvasir["prepare"]["positive"] == "@positive_class" and "body_parts" not in kvasir["prepare"]
    assert mura["prepare"]["body_parts"] == "@body_parts" and "positive" not in mura["prepare"]
    assert (kvasir["dataset_name"], mura["dataset_name"]) == ("kvasir", "mura")
    assert "dataset_options" not in kvasir and "@@insert" not in json.dumps(mura)


def test_a_misspelt_dataset_setting_is_refused(sources):
    settings = sources / "mura.json"
    doc = json.loads(settings.read_text())
    doc["configs/train.json"]["num_epoch"] = 3
    settings.write_text(json.dumps(doc))
    with pytest.raises(KeyError, match="'num_epoch' is not an id of the source config"):
        generate_bundles.render("vit_attention_maps", "mura")
    doc["configs/train.json"].pop("num_epoch")
    doc["configs/train.json"]["@@nowhere"] = {"a": 1}
    settings.write_text(json.dumps(doc))
    with pytest.raises(KeyError, match="no placeholder"):
        generate_bundles.render("vit_attention_maps", "mura")
