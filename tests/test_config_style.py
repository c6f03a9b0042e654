"""The bundles' workflow configs read like model-zoo configs (issue #11): short lines, list items by
id rather than position, imports only where a ``$`` expression uses them, override files without the
base file's import list. (metadata.json holds prose fields and is not a workflow config.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "bundles").glob("*/configs/**/*.json") if p.name != "metadata.json")


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "bundles")))
def test_workflow_config_style(path):
    text = path.read_text()
    assert max(len(line) for line in text.splitlines()) <= 200
    config = json.loads(text)
    strings = list(_strings({k: v for k, v in config.items() if k not in ("imports", "+imports")}))
    # list items addressed by position (train#handlers#3#sampler) or sliced ($@train#handlers[:4])
    assert not [s for s in strings if re.search(r"#\d+(#|$)", s) or re.search(r"@[\w#]+\[\s*[-\d:]", s)]
    expressions = " ".join(s for s in strings if s.startswith("$"))
    imports = config.get("imports", []) + config.get("+imports", [])
    for line in imports:
        name = line.split(" as ")[-1] if " as " in line else line.split()[-1]
        if line.startswith("$import custom_components") and name == "custom_components":
            continue  # the package name that "import custom_components.x" needs (MONAI binds the submodule)
        assert re.search(rf"(?<![\w.]){re.escape(name)}\b", expressions), f"{path.name}: unused {line}"
    if path.name != "train.json":
        assert "imports" not in config, "override files add imports with '+imports' only"
