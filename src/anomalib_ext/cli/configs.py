"""List the YAML configs shipped with anomalib-ext, or copy one to use it with ``anomalib train --config``.

The wheel carries the repository's ``configs/`` folder as ``anomalib_ext/configs``; an editable install (a clone) reads
the clone's ``configs/`` folder. Names are paths relative to that folder without ``.yaml``, e.g. ``uflow_nfa`` or
``stock/padim_textures``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import anomalib_ext

PACKAGE_CONFIGS = Path(anomalib_ext.__file__).parent / "configs"
SOURCE_TREE_CONFIGS = Path(anomalib_ext.__file__).parents[2] / "configs"  # <clone>/src/anomalib_ext -> <clone>/configs


def configs_dir() -> Path:
    """Folder of the shipped configs: inside the installed package (wheel), else the clone's ``configs/`` (editable)."""
    for folder in (PACKAGE_CONFIGS, SOURCE_TREE_CONFIGS):
        if folder.is_dir():
            return folder
    msg = f"No shipped configs found (looked in {PACKAGE_CONFIGS} and {SOURCE_TREE_CONFIGS}); reinstall anomalib-ext."
    raise FileNotFoundError(msg)


def list_configs() -> dict[str, Path]:
    """Config name (relative path without ``.yaml``) -> file, sorted by name."""
    root = configs_dir()
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in sorted(root.rglob("*.yaml"))}


def copy_config(name: str, destination: str | Path) -> Path:
    """Copy config ``name`` to ``destination`` (a file, or a folder that keeps the file name); returns the new file.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        FileExistsError: the target file exists already.
    """
    configs = list_configs()
    source = configs.get(name.removesuffix(".yaml"))
    if source is None:
        msg = f"Unknown config {name!r}. Known: {', '.join(configs)}"
        raise KeyError(msg)
    target = Path(destination)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        msg = f"{target} exists already; remove it or choose another destination."
        raise FileExistsError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``list`` or ``copy NAME DEST``."""
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="print the name and path of every shipped config")
    copy = actions.add_parser("copy", help="copy a shipped config to DEST (a file or a folder)")
    copy.add_argument("name", help="config name as printed by `anomalib-ext configs list`, e.g. uflow_nfa")
    copy.add_argument("destination", nargs="?", default=".", help="target file or folder (default: current folder)")


def run(args: argparse.Namespace) -> int:
    """Print the configs, or copy one and print how to train with it."""
    if args.action == "list":
        for name, path in list_configs().items():
            print(f"{name:40s} {path}")
        return 0
    try:
        target = copy_config(args.name, args.destination)
    except (KeyError, FileExistsError) as error:
        print(f"anomalib-ext configs: {error.args[0]}", file=sys.stderr)
        return 2
    print(f"Copied to {target}. Train with: anomalib train --config {target}")
    return 0
