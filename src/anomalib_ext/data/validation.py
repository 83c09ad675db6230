"""Checks that every datamodule runs on its root before training: errors name the path and the expected layout."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)
OS_METADATA_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}  # plus every name starting with "." (.DS_Store, ._x.png)


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


def is_os_metadata(path: Path) -> bool:
    """Operating-system metadata: hidden entries (``.DS_Store``, ``._img.png``), ``Thumbs.db``, ``desktop.ini``, ``__MACOSX``."""
    return path.name.startswith(".") or path.name.lower() in OS_METADATA_NAMES


def folder_entries(folder: Path, dataset: str) -> list[Path]:
    """Sorted entries of ``folder`` without OS metadata; the metadata that was ignored is logged by name."""
    entries = sorted(folder.iterdir())
    ignored = [path.name for path in entries if is_os_metadata(path)]
    if ignored:
        logger.warning("%s: ignored OS metadata in %s: %s", dataset, folder, ", ".join(ignored))
    return [path for path in entries if not is_os_metadata(path)]


def list_files(
    folder: Path,
    extensions: Iterable[str],
    dataset: str,
    expected_layout: str,
    subfolders: Iterable[str] = (),
) -> list[Path]:
    """Sorted files of ``folder`` whose suffix is in ``extensions`` (case-insensitive, e.g. ``{".png", ".bmp"}``).

    Nothing is dropped silently: any other file and any sub-folder not named in ``subfolders`` (read elsewhere, e.g.
    DAGM's ``Label/``) raise :class:`DatasetLayoutError` naming it. Only OS metadata (see :func:`is_os_metadata`) is
    ignored, and logged.
    """
    if not folder.is_dir():
        msg = f"{dataset}: folder {folder} does not exist. Expected layout:\n{expected_layout}"
        raise DatasetLayoutError(msg)
    allowed = {extension.lower() for extension in extensions}
    entries = folder_entries(folder, dataset)
    stray_folders = [path.name for path in entries if path.is_dir() and path.name not in set(subfolders)]
    if stray_folders:
        msg = (
            f"{dataset}: sub-folder(s) {', '.join(stray_folders[:5])} in {folder} would not be read (images must lie "
            f"directly in {folder.name}/). Move their images up or remove them. Expected layout:\n{expected_layout}"
        )
        raise DatasetLayoutError(msg)
    files = [path for path in entries if path.is_file()]
    unexpected = [path.name for path in files if path.suffix.lower() not in allowed]
    if unexpected:
        msg = (
            f"{dataset}: unexpected file(s) {', '.join(unexpected[:5])} in {folder} (expected only "
            f"{', '.join(sorted(allowed))} files). Expected layout:\n{expected_layout}"
        )
        raise DatasetLayoutError(msg)
    return files


def require_only_folders(folder: Path, dataset: str, expected_layout: str) -> list[str]:
    """Names of the sub-folders of ``folder``; a file lying directly in it raises :class:`DatasetLayoutError`."""
    entries = folder_entries(folder, dataset)
    stray_files = [path.name for path in entries if not path.is_dir()]
    if stray_files:
        msg = (
            f"{dataset}: file(s) {', '.join(stray_files[:5])} lie directly in {folder} and would not be read (only "
            f"sub-folders belong there). Move them into a sub-folder or remove them. Expected layout:\n{expected_layout}"
        )
        raise DatasetLayoutError(msg)
    return [path.name for path in entries]


def pair_images_with_masks(
    images: Iterable[Path],
    masks: Iterable[Path],
    mask_suffix: str,
    dataset: str,
    expected_layout: str,
) -> list[tuple[Path, Path]]:
    """Match each image to the mask named ``<image stem><mask_suffix>.<any extension>``, one to one.

    Raises :class:`DatasetLayoutError` naming the files for: two images (or two masks) with the same stem (e.g. a
    half-converted ``001.bmp`` + ``001.png``), an image without a mask, or a mask without an image.
    """

    def by_stem(paths: Iterable[Path], suffix: str, kind: str) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for path in paths:
            if not path.stem.endswith(suffix):
                msg = f"{dataset}: {kind} {path} should be named <image name>{suffix}. Expected layout:\n{expected_layout}"
                raise DatasetLayoutError(msg)
            stem = path.stem[: len(path.stem) - len(suffix)] if suffix else path.stem
            if stem in index:
                msg = f"{dataset}: two {kind}s share the name {stem}: {index[stem]} and {path}. Keep one of them."
                raise DatasetLayoutError(msg)
            index[stem] = path
        return index

    image_index = by_stem(images, "", "image")
    mask_index = by_stem(masks, mask_suffix, "mask")
    for kind, missing, present in (("mask", image_index, mask_index), ("image", mask_index, image_index)):
        orphans = [str(missing[stem]) for stem in sorted(missing.keys() - present.keys())]
        if orphans:
            owner = "image" if kind == "mask" else "mask"
            msg = (
                f"{dataset}: {len(orphans)} {owner}(s) without a matching {kind}, e.g. {', '.join(orphans[:3])}. "
                f"Expected layout:\n{expected_layout}"
            )
            raise DatasetLayoutError(msg)
    return [(image_index[stem], mask_index[stem]) for stem in sorted(image_index)]


def check_mask_sizes(pairs: Iterable[tuple[str | Path, str | Path]]) -> None:
    """Raise :class:`ValueError` naming the first (image, mask) pair whose sizes differ (reads headers only)."""
    for image_path, mask_path in pairs:
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            if image.size != mask.size:
                width, height = mask.size
                msg = f"Mask {mask_path} is {width}x{height} but image {image_path} is {image.size[0]}x{image.size[1]}."
                raise ValueError(msg)


def require_category(root: Path, category: str, dataset: str, expected_layout: str) -> Path:
    """``root / category`` if it is a folder; else :class:`DatasetLayoutError` listing the categories found in ``root``."""
    if not root.is_dir():
        msg = f"{dataset} root {root} does not exist or is not a folder. Expected layout:\n{expected_layout}"
        raise DatasetLayoutError(msg)
    category_dir = root / category
    if not category_dir.is_dir():
        found = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
        msg = (
            f"{dataset} root {root} has no category folder {category!r} (found: {', '.join(found) or 'nothing'}). "
            f"Expected layout:\n{expected_layout}"
        )
        raise DatasetLayoutError(msg)
    return category_dir
