"""Checks that every datamodule runs on its root before training: errors name the path and the expected layout."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class DatasetLayoutError(FileNotFoundError):
    """A dataset root is missing or does not have the expected folder layout."""


def require_paths(root: Path, relative_paths: Iterable[str], dataset: str, expected_layout: str) -> None:
    """Raise :class:`DatasetLayoutError` unless ``root`` and each ``root/relative_path`` exist.

    Args:
        root: the dataset root (or category folder) given by the user.
        relative_paths: folders or files that must exist below ``root``.
        dataset: dataset name used in the message.
        expected_layout: a short drawing of the expected layout, shown in the message.
    """
    if not root.is_dir():
        msg = f"{dataset} root {root} does not exist or is not a folder. Expected layout:\n{expected_layout}"
        raise DatasetLayoutError(msg)
    missing = [relative for relative in relative_paths if not (root / relative).exists()]
    if missing:
        msg = f"{dataset} root {root} lacks {', '.join(missing)}. Expected layout:\n{expected_layout}"
        raise DatasetLayoutError(msg)


def check_images_readable(paths: Iterable[str | Path]) -> None:
    """Open every image header and verify its data; raise an error that names the first unreadable file."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            msg = f"Cannot read image file {path}: {error}"
            raise ValueError(msg) from error
