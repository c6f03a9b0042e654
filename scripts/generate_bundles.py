"""Write the configs that several bundles share from one source (``scripts/bundle_sources/``).

The attention-map bundles (Kvasir, MURA) run the same study on two datasets: their configs are the
files of ``scripts/bundle_sources/<family>/configs/`` with each dataset's settings from
``scripts/bundle_sources/<family>/<dataset>.json`` applied, so one edit of the source changes every
bundle of the family, and each bundle stays a self-contained folder (as packed into a zip).

A dataset file maps a config file (``configs/train.json``) to its settings:

* ``"id": value`` replaces the value at a MONAI id (``num_epochs``, ``prepare#seed``); the id must
  exist in the source, so a typo cannot add a dead key;
* a source entry ``"<name>": "@@insert"`` is a placeholder: the dataset's ``"@@<name>"`` mapping is
  spliced in its place (keys a dataset has and the other has not, in a readable position), or
  nothing when the dataset gives none.

    python scripts/generate_bundles.py            # write bundles/<bundle>/configs/...
    python scripts/generate_bundles.py --check    # exit 1 and list the files that differ
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom_components.io import atomic_write_text  # noqa: E402

SOURCES = REPO / "scripts" / "bundle_sources"
INSERT = "@@insert"
SEP = "#"

# family -> {dataset name: bundle folder}
FAMILIES = {
    "vit_attention_maps": {"kvasir": "vit_attention_maps_kvasir", "mura": "vit_attention_maps_mura"},
}


def _splice(node: Any, inserts: dict[str, dict], used: set[str]) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if value == INSERT:
                used.add(key)
                out.update(inserts.get(key, {}))
            else:
                out[key] = _splice(value, inserts, used)
        return out
    if isinstance(node, list):
        return [_splice(v, inserts, used) for v in node]
    return node


def _set(config: dict, path: str, value: Any, source: Path) -> None:
    *parents, last = path.split(SEP)
    node: Any = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.get(part)
        if node is None:
            raise KeyError(f"{source}: '{path}' is not an id of the source config")
    if isinstance(node, list):
        node[int(last)] = value
    elif last in node:
        node[last] = value
    else:
        raise KeyError(f"{source}: '{path}' is not an id of the source config")


def render(family: str, dataset: str) -> dict[str, str]:
    """Relative path in the bundle -> file content, for one dataset of a family."""
    root = SOURCES / family
    settings_file = root / f"{dataset}.json"
    settings = json.loads(settings_file.read_text())
    files: dict[str, str] = {}
    for src in sorted((root / "configs").rglob("*")):
        if not src.is_file():
            continue
        rel = src.relative_to(root).as_posix()
        if src.suffix != ".json":
            files[rel] = src.read_text()
            continue
        changes = settings.get(rel, {})
        inserts = {k[2:]: v for k, v in changes.items() if k.startswith("@@")}
        used: set[str] = set()
        config = _splice(json.loads(src.read_text()), inserts, used)
        unknown = set(inserts) - used
        if unknown:
            raise KeyError(f"{settings_file}: no placeholder {sorted(unknown)} in {rel}")
        for path, value in changes.items():
            if not path.startswith("@@"):
                _set(config, path, value, settings_file)
        files[rel] = json.dumps(config, indent=4, ensure_ascii=False) + "\n"
    unknown_files = set(settings) - set(files)
    if unknown_files:
        raise KeyError(f"{settings_file}: no source file {sorted(unknown_files)}")
    return files


def generate(check: bool = False, bundles_dir: Path = REPO / "bundles") -> list[Path]:
    """Write (or with ``check`` only compare) every generated file; returns the files that differ."""
    stale = []
    for family, datasets in FAMILIES.items():
        for dataset, bundle in datasets.items():
            for rel, text in render(family, dataset).items():
                target = bundles_dir / bundle / rel
                if target.is_file() and target.read_text() == text:
                    continue
                stale.append(target)
                if not check:
                    atomic_write_text(text, target)
    return stale


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = generate(check=check)
    for path in stale:
        print(f"{'stale' if check else 'wrote'} {path.relative_to(REPO)}")
    if check and stale:
        print("error: bundle configs differ from scripts/bundle_sources: run python scripts/generate_bundles.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
