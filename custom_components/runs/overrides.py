"""Refuse misspelt command-line options of ``python -m monai.bundle run``.

MONAI treats every ``--key value`` it does not know as a config override and adds the key when it
is missing, so ``--num_epoch 2`` (for ``--num_epochs``) is silently ignored by the workflow. The
check below reads the command line of a ``monai.bundle run`` process (or any list of ids, for
scripts that forward options), and refuses an override whose top-level id is not a key of the
config files, with the closest known key as a suggestion. Nested ids whose top-level key exists
(``--network_def#dropout_rate 0.1``) may add arguments, as MONAI intends, and are allowed.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from custom_components.io import InputDataError

__all__ = ["UnknownOptionError", "bundle_run_arguments", "check_cli_overrides", "check_override_ids"]

ID_SEP = "#"


class UnknownOptionError(InputDataError):
    """An override names no key of the bundle's configs."""


def _runner_parameters() -> set[str]:
    """Argument names that ``monai.bundle run`` consumes itself (not config overrides)."""
    from monai.bundle import scripts, workflows

    names: set[str] = set()
    for fn in (scripts.run, scripts.create_workflow, workflows.ConfigWorkflow.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names - {"self"}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def bundle_run_arguments(argv: Sequence[str] | None = None) -> tuple[list[str], dict[str, Any]] | None:
    """``(config_files, overrides)`` of a ``python -m monai.bundle run ...`` command line, else None.

    Parsed as fire does: ``--key value``, ``--key=value``, a bare ``--flag`` (True); hyphens in a key
    read as underscores. ``args_file`` contents count as if given on the command line.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] != "run" or Path(argv[0]).parent.name != "bundle" or Path(argv[0]).name != "__main__.py":
        return None
    args: dict[str, Any] = {}
    tokens = argv[2:]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not tok.startswith("--"):
            continue  # positional run_id / init_id / final_id
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_") if ID_SEP not in key else key
        if not eq:
            if i < len(tokens) and not tokens[i].startswith("--"):
                value = tokens[i]
                i += 1
            else:
                value = "True"
        args[key] = _literal(value)
    if "args_file" in args:
        args = {**ConfigParser.load_config_file(str(args["args_file"])), **args}
    files = args.get("config_file") or []
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    known = _runner_parameters()
    overrides = {k: v for k, v in args.items() if k not in known}
    return [str(f) for f in files], overrides


def check_override_ids(config_files: Sequence[str | os.PathLike], ids: Iterable[str]) -> None:
    """Raise :class:`UnknownOptionError` for the first id whose top-level key is in no config file."""
    files = [str(f) for f in config_files]
    content = ConfigParser.load_config_files(files) if files else {}
    keys = [k for k in content if isinstance(k, str)]
    for override in ids:
        top = str(override).split(ID_SEP, 1)[0]
        if top in content or top.startswith("_meta_"):
            continue
        close = difflib.get_close_matches(top, keys, n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}?" if close else "see configs/train.json for the options"
        names = ", ".join(Path(f).name for f in files) or "the config"
        raise UnknownOptionError(f"--{override}", f"unknown option (not a key of {names}); {hint}")


def boolean_overrides(config_files: Sequence[str | os.PathLike], overrides: dict[str, Any]) -> dict[str, bool]:
    """The overrides given as ``true``/``false`` in any letter case for ids whose config value is a bool.

    fire reads only ``True``/``False`` as booleans: ``--resume false`` arrives as the string
    ``'false'``, which is truthy, so the run would silently resume.
    """
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    out = {}
    for key, value in overrides.items():
        text = value.strip().lower() if isinstance(value, str) else None
        if text in ("true", "false") and key in parser and isinstance(parser[key], bool):
            out[key] = text == "true"
    return out


def check_cli_overrides(argv: Sequence[str] | None = None, parser: ConfigParser | None = None) -> None:
    """Check the overrides of this process's ``monai.bundle run`` command line (no-op elsewhere).

    With ``parser`` (the one running the workflow), ``true``/``false`` strings given for boolean
    options are turned into booleans there (:func:`boolean_overrides`).
    """
    parsed = bundle_run_arguments(argv)
    if parsed is None:
        return
    files, overrides = parsed
    check_override_ids(files, overrides)
    if parser is not None:
        for key, value in boolean_overrides(files, overrides).items():
            parser[key] = value
