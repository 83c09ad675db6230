"""DAGM 2007 (Wieler & Hahn, 2007): ten synthetic texture classes with weakly labelled defects.

Layout of one class (512 x 512 8-bit grayscale images, uppercase ``.PNG``; normal and defective images share a folder)::

    <root>/Class1/Train/0576.PNG
    <root>/Class1/Train/Label/Labels.txt
    <root>/Class1/Train/Label/0576_label.PNG      (coarse ellipse, defective images only)
    <root>/Class1/Test/...                        (same as Train)

``Labels.txt`` starts with a line ``1``, then one row per image: ``<id> <0|1> <image file> 0 <label file or 0>``.
Following the unsupervised protocol of NF-BMR (Zhang et al. 2024, Sec. 4.1), models train on the *normal* images of
``Train/`` only (the defective ones are counted and logged, not used); the test set is all of ``Test/``. Grayscale
images are read as 3-channel RGB (the gray value repeated) by Anomalib's ``read_image``, so ImageNet backbones work
unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_ext.data.validation import (
    DatasetLayoutError,
    check_images_readable,
    check_mask_sizes,
    list_files,
    require_category,
    require_paths,
)

logger = logging.getLogger(__name__)

CATEGORIES = tuple(f"Class{number}" for number in range(1, 11))
SPLIT_FOLDERS = {"train": "Train", "test": "Test"}
LABELS_FILE = "Labels.txt"
EXPECTED_LAYOUT = """<root>/<category>/Train/NNNN.PNG
<root>/<category>/Train/Label/Labels.txt        (line "1", then rows "<id> <0|1> <image file> 0 <label file or 0>")
<root>/<category>/Train/Label/NNNN_label.PNG    (defective images only)
<root>/<category>/Test/...                      (same as Train)
(category in Class1 .. Class10)"""


def parse_labels_file(labels_file: Path) -> list[tuple[str, int, str | None]]:
    """Rows of a DAGM ``Labels.txt`` as ``(image file, label 0|1, label file or None)``.

    The leading line holding a single number is skipped; a malformed row raises :class:`DatasetLayoutError` naming the
    file and the line number.
    """
    rows: list[tuple[str, int, str | None]] = []
    for number, line in enumerate(labels_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or (number == 1 and len(fields) == 1):
            continue
        if len(fields) != 5 or fields[1] not in {"0", "1"}:
            msg = f"DAGM: {labels_file} line {number} {line!r} is not '<id> <0|1> <image file> 0 <label file or 0>'."
            raise DatasetLayoutError(msg)
        label, mask = int(fields[1]), None if fields[4] == "0" else fields[4]
        if (label == 1) != (mask is not None):
            msg = f"DAGM: {labels_file} line {number} {line!r}: defective rows (1) need a label file, normal rows (0) none."
            raise DatasetLayoutError(msg)
        rows.append((fields[2], label, mask))
    return rows


def _by_lower_name(paths: list[Path]) -> dict[str, Path]:
    """Files keyed by lower-case name: a copy whose ``.PNG`` became ``.png`` still matches ``Labels.txt``."""
    return {path.name.lower(): path for path in paths}


def _read_split(split_dir: Path) -> list[tuple[str, int, str]]:
    """``(image path, label, mask path or "")`` of one ``Train``/``Test`` folder, cross-checked with ``Labels.txt``."""
    label_dir = split_dir / "Label"
    images = _by_lower_name(list_files(split_dir, {".png"}, "DAGM", EXPECTED_LAYOUT, subfolders=["Label"]))
    masks = _by_lower_name(list_files(label_dir, {".png", ".txt"}, "DAGM", EXPECTED_LAYOUT))
    masks.pop(LABELS_FILE.lower(), None)
    labels_file = label_dir / LABELS_FILE
    samples, listed_images, listed_masks = [], set(), set()
    for image_name, label, mask_name in parse_labels_file(labels_file):
        image = images.get(image_name.lower())
        mask = masks.get(mask_name.lower()) if mask_name else None
        if image is None or (mask_name and mask is None):
            missing = split_dir / image_name if image is None else label_dir / str(mask_name)
            msg = f"DAGM: {labels_file} lists {missing}, which does not exist. Expected layout:\n{EXPECTED_LAYOUT}"
            raise DatasetLayoutError(msg)
        if image_name.lower() in listed_images:
            msg = f"DAGM: {labels_file} lists {image_name} twice."
            raise DatasetLayoutError(msg)
        listed_images.add(image_name.lower())
        listed_masks.add(str(mask_name).lower())
        samples.append((str(image), label, str(mask) if mask else ""))
    for kind, found, listed in (("image", images, listed_images), ("label file", masks, listed_masks)):
        unlisted = sorted(str(found[name]) for name in found.keys() - listed)
        if unlisted:
            msg = (
                f"DAGM: {len(unlisted)} {kind}(s) not listed in {labels_file}, e.g. {', '.join(unlisted[:3])}. "
                f"Expected layout:\n{EXPECTED_LAYOUT}"
            )
            raise DatasetLayoutError(msg)
    return samples


def make_dagm_dataset(category_dir: Path, split: str | Split | None = None) -> pd.DataFrame:
    """Samples of one DAGM class: all of ``Test/`` and the normal images of ``Train/``.

    Columns ``image_path``, ``mask_path`` ("" for normal images), ``label_index``, ``split``. The number of defective
    ``Train/`` images left out is stored in ``samples.attrs["excluded_defective_train"]``.
    """
    require_paths(
        category_dir, [f"{folder}/Label/{LABELS_FILE}" for folder in SPLIT_FOLDERS.values()], "DAGM", EXPECTED_LAYOUT
    )
    splits = [split_name for split_name in SPLIT_FOLDERS if not split or Split(split).value == split_name]
    frames = []
    for split_name in splits:
        frame = pd.DataFrame(
            _read_split(category_dir / SPLIT_FOLDERS[split_name]), columns=["image_path", "label_index", "mask_path"]
        )
        frame["split"] = split_name
        frames.append(frame)
    samples = pd.concat(frames, ignore_index=True)
    excluded = (samples.split == "train") & (samples.label_index == LabelName.ABNORMAL)
    samples = samples[~excluded].reset_index(drop=True)
    defective = samples[samples.label_index == LabelName.ABNORMAL]
    check_images_readable(samples.image_path)
    check_images_readable(defective.mask_path)
    check_mask_sizes(zip(defective.image_path, defective.mask_path, strict=True))
    samples.attrs["task"] = "segmentation"
    samples.attrs["excluded_defective_train"] = int(excluded.sum())
    return samples


class DAGMDataset(AnomalibDataset):
    """One split of one DAGM 2007 class (see the module docstring for the layout and protocol).

    Args:
        root: folder holding ``Class1`` .. ``Class10``.
        category: ``"Class1"`` .. ``"Class10"``.
        augmentations: augmentations applied to image (and mask).
        split: ``"train"`` (normal ``Train/`` images), ``"test"`` (all of ``Test/``) or ``None`` for both.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/DAGM",
        category: str = "Class1",
        augmentations: Transform | None = None,
        split: str | Split | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.category = category
        self.split = split
        samples = make_dagm_dataset(require_category(Path(root), category, "DAGM", EXPECTED_LAYOUT), split=split)
        self.excluded_defective_train = samples.attrs["excluded_defective_train"]
        self.samples = samples


class DAGM(AnomalibDataModule):
    """DAGM 2007 datamodule: trains on the normal ``Train/`` images of a class, tests on all of ``Test/``.

    Args:
        root: folder holding ``Class1`` .. ``Class10`` (no download: the dataset needs a registration).
        category: ``"Class1"`` .. ``"Class10"``.
        train_batch_size, eval_batch_size, num_workers, *_augmentations, test_split_mode, test_split_ratio,
        val_split_mode, val_split_ratio, seed: as in Anomalib's :class:`~anomalib.data.MVTecAD`.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/DAGM",
        category: str = "Class1",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.root = Path(root)
        self.category = category

    def _setup(self, _stage: str | None = None) -> None:
        self.train_data = DAGMDataset(root=self.root, category=self.category, split=Split.TRAIN)
        self.test_data = DAGMDataset(root=self.root, category=self.category, split=Split.TEST)
        test_labels = self.test_data.samples.label_index
        logger.info(
            "DAGM %s: %d normal train images (%d defective Train images not used), %d normal + %d defective test images.",
            self.category,
            len(self.train_data),
            self.train_data.excluded_defective_train,
            int((test_labels == LabelName.NORMAL).sum()),
            int((test_labels == LabelName.ABNORMAL).sum()),
        )
