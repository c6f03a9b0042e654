"""``python -m custom_components.export``: MONAI's ``ckpt_export`` behind the collection's checks.

MONAI's ``python -m monai.bundle ckpt_export`` loads the checkpoint itself, so a missing,
truncated or mismatched file ends in a traceback wall, and a misspelt override is ignored. This
command takes the same arguments, first loads the checkpoint into the configured network through
:func:`custom_components.io.load_network_weights` (one ``error: <file>: <problem>`` line, exit 2)
and checks the overrides against the config files, then runs MONAI's export unchanged::

    python -m custom_components.export --config_file "['configs/train.json','configs/demo.json']" \\
        --ckpt_file models/model.pt --filepath models/model.ts
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Sequence
from typing import Any

from custom_components.cli import run_commands
from custom_components.io import load_network_weights
from custom_components.runs import check_override_ids

__all__ = ["export"]


def _files(config_file: str | Sequence[str]) -> list[str]:
    if isinstance(config_file, str) and config_file.lstrip().startswith("["):
        config_file = ast.literal_eval(config_file)
    return [config_file] if isinstance(config_file, (str, os.PathLike)) else [str(f) for f in config_file]


def export(
    config_file: str | Sequence[str],
    ckpt_file: str = "models/model.pt",
    filepath: str = "models/model.ts",
    meta_file: str = "configs/metadata.json",
    net_id: str = "network_def",
    **override: Any,
) -> str:
    """Check ``ckpt_file`` against the network of ``config_file`` (+ overrides), then export TorchScript.

    Args:
        config_file: the config files the model was trained with (a list, as for ``monai.bundle run``).
        ckpt_file: trained weights (``model.pt``, or a resumable ``last.pt``).
        filepath: the TorchScript file to write.
        meta_file: the bundle's metadata.
        net_id: config id of the bare network.
        override: config overrides, as given to the training (e.g. ``--image_size 64``).
    """
    from monai.bundle import ConfigParser, ckpt_export

    files = _files(config_file)
    check_override_ids(files, override)
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(override)
    load_network_weights(parser.get_parsed_content(net_id), ckpt_file)
    ckpt_export(net_id=net_id, filepath=filepath, ckpt_file=ckpt_file, meta_file=meta_file, config_file=files, **override)
    return filepath


if __name__ == "__main__":
    sys.exit(run_commands(export))
