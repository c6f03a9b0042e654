"""Pack a bundle folder into a zip that ``python -m monai.bundle download --url file://...`` installs.

    python scripts/pack_bundle.py lgmvit_brats20 --out dist/lgmvit_brats20.zip

The zip holds ``<name>/configs``, ``<name>/docs`` and ``<name>/LICENSE`` (plus ``models/`` only
with ``--with_models``); training outputs and prepared data are left out. The bundle's Python
code is the installed ``custom_components`` package (declared in its metadata), so the target
machine needs ``pip install`` of this collection.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom_components.io import atomic_write  # noqa: E402

EXCLUDED_DIRS = {"models", "eval", "data", "__pycache__", "runs"}


def pack(name: str, out: str | None = None, with_models: bool = False) -> str:
    bundle = REPO / "bundles" / name
    if not (bundle / "configs" / "metadata.json").is_file():
        print(f"error: {bundle} is not a bundle (no configs/metadata.json)", file=sys.stderr)
        sys.exit(2)
    out_path = Path(out) if out else REPO / "dist" / f"{name}.zip"
    excluded = EXCLUDED_DIRS - ({"models"} if with_models else set())
    with atomic_write(out_path, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle.rglob("*")):
            rel = path.relative_to(bundle)
            if path.is_file() and not (set(rel.parts[:-1]) | {rel.parts[0]}) & excluded:
                zf.write(path, Path(name) / rel)
    return str(out_path)


if __name__ == "__main__":
    fire.Fire(pack)
