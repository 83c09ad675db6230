"""BeanTech Anomaly Detection dataset (BTAD, Mishra et al. 2021) read as it is extracted by hand.

Anomalib's stock :class:`~anomalib.data.BTech` converts every ``.bmp`` to ``.png`` only when it downloads the archive
itself, and its sample builder always looks for ``<stem>.png`` masks; a hand-extracted copy of category ``03`` (bmp
images *and* bmp masks) then has masks it cannot find. This module pairs images and masks by file stem whatever their
extensions (``.bmp`` or ``.png``, any mix, any case), so the official archive, Anomalib's converted copy and a partly
converted copy all work. Layout (one folder per category ``01``, ``02``, ``03``)::

    <root>/<category>/train/ok/0000.bmp            (01: bmp images, png masks; 02: png + png; 03: bmp + bmp)
    <root>/<category>/test/ok/0000.bmp
    <root>/<category>/test/ko/0000.bmp
    <root>/<category>/ground_truth/ko/0000.png     (same stem as the image)

Any other ``test/<defect>`` folder with its ``ground_truth/<defect>`` twin is read as a further defect type.
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
    pair_images_with_masks,
    require_category,
    require_only_folders,
    require_paths,
)

logger = logging.getLogger(__name__)

CATEGORIES = ("01", "02", "03")
EXTENSIONS = (".bmp", ".png")
NORMAL_FOLDER = "ok"
EXPECTED_LAYOUT = """<root>/<category>/train/ok/*.bmp|png
<root>/<category>/test/ok/*.bmp|png
<root>/<category>/test/ko/*.bmp|png
<root>/<category>/ground_truth/ko/*.bmp|png   (one mask per test/ko image, same file stem)
(category in 01, 02, 03; bmp and png may be mixed)"""


def _defect_folders(category_dir: Path) -> list[str]:
    """Names of the defect folders of ``test/``; each must have its ``ground_truth/`` twin and vice versa."""

    def subfolders(parent: Path) -> set[str]:
        return set(require_only_folders(parent, "BeanTech", EXPECTED_LAYOUT)) if parent.is_dir() else set()

    test_dir, mask_dir = category_dir / "test", category_dir / "ground_truth"
    train_folders = subfolders(category_dir / "train")
    if train_folders != {NORMAL_FOLDER}:
        msg = (
            f"BeanTech: {category_dir / 'train'} holds {', '.join(sorted(train_folders - {NORMAL_FOLDER}))}; only "
            f"ok/ is read (training uses normal images only). Expected layout:\n{EXPECTED_LAYOUT}"
        )
        raise DatasetLayoutError(msg)
    test_defects = subfolders(test_dir) - {NORMAL_FOLDER}
    mask_defects = subfolders(mask_dir) - {NORMAL_FOLDER}  # an all-black ground_truth/ok adds nothing
    for folder, twin in [(test_dir / name, mask_dir / name) for name in sorted(test_defects - mask_defects)] + [
        (mask_dir / name, test_dir / name) for name in sorted(mask_defects - test_defects)
    ]:
        msg = f"BeanTech: {folder} has no counterpart {twin}. Expected layout:\n{EXPECTED_LAYOUT}"
        raise DatasetLayoutError(msg)
    if not test_defects:
        msg = f"BeanTech: {test_dir} has no defect folder (ko). Expected layout:\n{EXPECTED_LAYOUT}"
        raise DatasetLayoutError(msg)
    return sorted(test_defects)


def make_beantech_dataset(category_dir: Path, split: str | Split | None = None) -> pd.DataFrame:
    """Samples of one BTAD category: ``image_path``, ``mask_path`` ("" for normal images), ``label_index``, ``split``.

    Raises :class:`DatasetLayoutError` for a missing folder, a stray non-image file, an image without a mask (or the
    reverse) and two files with the same stem; :class:`ValueError` for an unreadable file or a mask whose size
    differs from its image's.
    """
    require_paths(category_dir, ["train/ok", "test/ok"], "BeanTech", EXPECTED_LAYOUT)
    rows = [
        ("train", NORMAL_FOLDER, path, "")
        for path in list_files(category_dir / "train/ok", EXTENSIONS, "BeanTech", EXPECTED_LAYOUT)
    ]
    rows += [
        ("test", NORMAL_FOLDER, path, "")
        for path in list_files(category_dir / "test/ok", EXTENSIONS, "BeanTech", EXPECTED_LAYOUT)
    ]
    for defect in _defect_folders(category_dir):
        images = list_files(category_dir / "test" / defect, EXTENSIONS, "BeanTech", EXPECTED_LAYOUT)
        masks = list_files(category_dir / "ground_truth" / defect, EXTENSIONS, "BeanTech", EXPECTED_LAYOUT)
        pairs = pair_images_with_masks(images, masks, "", "BeanTech", EXPECTED_LAYOUT)
        rows += [("test", defect, image, mask) for image, mask in pairs]
    samples = pd.DataFrame(
        [(str(category_dir), split_name, label, str(image), str(mask)) for split_name, label, image, mask in rows],
        columns=["path", "split", "label", "image_path", "mask_path"],
    )
    samples["label_index"] = (samples.label != NORMAL_FOLDER).astype(int) * int(LabelName.ABNORMAL)
    if split:
        samples = samples[samples.split == Split(split).value].reset_index(drop=True)
    check_images_readable(samples.image_path)
    defective = samples[samples.label_index == LabelName.ABNORMAL]
    check_images_readable(defective.mask_path)
    check_mask_sizes(zip(defective.image_path, defective.mask_path, strict=True))
    samples.attrs["task"] = "segmentation"
    return samples


class BeanTechDataset(AnomalibDataset):
    """One split of one BTAD category (see the module docstring for the layout).

    Args:
        root: folder holding ``01``, ``02``, ``03``.
        category: ``"01"``, ``"02"`` or ``"03"``.
        augmentations: augmentations applied to image (and mask).
        split: ``"train"``, ``"test"`` or ``None`` for both.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/BTech",
        category: str = "01",
        augmentations: Transform | None = None,
        split: str | Split | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.category = category
        self.split = split
        self.samples = make_beantech_dataset(
            require_category(Path(root), category, "BeanTech", EXPECTED_LAYOUT), split=split
        )


class BeanTech(AnomalibDataModule):
    """BTAD datamodule that accepts bmp and png images and masks in any mix (unlike stock ``BTech``, no download).

    Trains on ``train/ok``; tests on ``test/ok`` and ``test/ko`` with masks from ``ground_truth/ko``. Arguments are those
    of Anomalib's :class:`~anomalib.data.BTech`.

    Args:
        root: folder holding the category folders ``01``, ``02``, ``03``.
        category: ``"01"``, ``"02"`` or ``"03"``.
        train_batch_size, eval_batch_size, num_workers, *_augmentations, test_split_mode, test_split_ratio,
        val_split_mode, val_split_ratio, seed: as in Anomalib's :class:`~anomalib.data.BTech`.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/BTech",
        category: str = "01",
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
        self.train_data = BeanTechDataset(root=self.root, category=self.category, split=Split.TRAIN)
        self.test_data = BeanTechDataset(root=self.root, category=self.category, split=Split.TEST)
        logger.info(
            "BeanTech %s: %d train images, %d normal + %d defective test images.",
            self.category,
            len(self.train_data),
            int((self.test_data.samples.label_index == LabelName.NORMAL).sum()),
            int((self.test_data.samples.label_index == LabelName.ABNORMAL).sum()),
        )
