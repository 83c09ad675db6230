"""Tiny on-disk copies of the Crack500, DAGM 2007 and BTAD layouts (exact names, extensions and nesting, a few KB).

Images are small random textures; masks are crafted so that tests know which pixels (and tiles) are defective.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Crack500 fixture: 31 x 25 px photographs (not divisible by 3: columns [0, 10, 20, 31], rows [0, 8, 16, 25]).
CRACK500_SIZE = (25, 31)  # height, width
# Crack pixels per photograph index (row, col). Photograph 0: pixels on a tile boundary (row 7 is tile row 0, col 10 is
# tile col 1) and in the last pixel (tile r2c2); others: one stroke in the centre tile or a whole row of tiles.
CRACK500_CRACKS = {
    0: [(7, 10), (24, 30)],
    1: [(12, 15)],
    2: [(row, 16) for row in range(25)],
    3: [(12, col) for col in range(31)],
    4: [(0, 0)],
}
CRACK500_NAMES = [f"20160222_0809{second:02d}" for second in (11, 25, 3, 47, 36)]  # sorted order differs from index


def _texture(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(40, 200, size=shape, dtype=np.uint8)


def crack500_mask(index: int, shape: tuple[int, int] = CRACK500_SIZE) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    for row, col in CRACK500_CRACKS[index]:
        mask[row, col] = 255
    return mask


def make_crack500_full(root: Path, nested: bool = False, with_val: bool = True) -> Path:
    """Full-resolution release: ``traindata/<date>_<time>.jpg`` + ``<date>_<time>_mask.png`` (optionally nested)."""
    rng = np.random.default_rng(0)
    folders = {"traindata": CRACK500_NAMES, **({"valdata": CRACK500_NAMES[:2]} if with_val else {})}
    for folder_name, names in folders.items():
        folder = root / folder_name / folder_name if nested else root / folder_name
        folder.mkdir(parents=True)
        for index, name in enumerate(names):
            Image.fromarray(_texture(rng, (*CRACK500_SIZE, 3))).save(folder / f"{name}.jpg", quality=90)
            Image.fromarray(crack500_mask(index)).save(folder / f"{name}_mask.png")
    (root / "testdata").mkdir(exist_ok=True)
    return root


def make_crack500_crops(root: Path) -> Path:
    """Crop release: ``traincrop/<stem>_<x>_<y>.jpg`` + ``<stem>_<x>_<y>.png``; 3 photographs x 2 crops."""
    rng = np.random.default_rng(1)
    for folder_name in ("traincrop", "valcrop", "testcrop"):
        (root / folder_name).mkdir(parents=True)
    for index, name in enumerate(CRACK500_NAMES[:3]):
        for x, y in ((1, 1), (321, 1)):
            stem = f"{name}_{x}_{y}"
            Image.fromarray(_texture(rng, (*CRACK500_SIZE, 3))).save(root / "traincrop" / f"{stem}.jpg")
            Image.fromarray(crack500_mask(index)).save(root / "traincrop" / f"{stem}.png")
    return root


# DAGM fixture: per split, image ids with a defect (1-based ids, 4 images per split).
DAGM_SIZE = 32
DAGM_DEFECTIVE = {"Train": {2}, "Test": {1, 4}}
DAGM_IMAGES_PER_SPLIT = 4


def make_dagm(root: Path, category: str = "Class1") -> Path:
    """``ClassN/{Train,Test}/NNNN.PNG`` + ``Label/Labels.txt`` + ``Label/NNNN_label.PNG`` (8-bit grayscale)."""
    rng = np.random.default_rng(2)
    for split, defective in DAGM_DEFECTIVE.items():
        label_dir = root / category / split / "Label"
        label_dir.mkdir(parents=True)
        lines = ["1"]
        for image_id in range(1, DAGM_IMAGES_PER_SPLIT + 1):
            name = f"{image_id + (0 if split == 'Train' else 500):04d}"
            Image.fromarray(_texture(rng, (DAGM_SIZE, DAGM_SIZE))).save(root / category / split / f"{name}.PNG")
            if image_id in defective:
                mask = np.zeros((DAGM_SIZE, DAGM_SIZE), dtype=np.uint8)
                mask[8:16, 4:20] = 255
                Image.fromarray(mask).save(label_dir / f"{name}_label.PNG")
                lines.append(f"{image_id}\t1\t{name}.PNG\t0\t{name}_label.PNG")
            else:
                lines.append(f"{image_id}\t0\t{name}.PNG\t0\t0")
        (label_dir / "Labels.txt").write_text("\n".join(lines) + "\n")
    return root


# BTAD fixture: extensions of (images, masks) per category as in the release; 3 train, 2 normal test, 2 defective test.
BEANTECH_EXTENSIONS = {"01": ("bmp", "png"), "02": ("png", "png"), "03": ("bmp", "bmp")}
BEANTECH_COUNTS = {"train/ok": 3, "test/ok": 2, "test/ko": 2}
BEANTECH_SIZE = 24


def make_beantech(root: Path) -> Path:
    """``{01,02,03}/{train/ok, test/ok, test/ko, ground_truth/ko}`` with the release's extension per category."""
    rng = np.random.default_rng(3)
    for category, (image_ext, mask_ext) in BEANTECH_EXTENSIONS.items():
        for folder, count in BEANTECH_COUNTS.items():
            (root / category / folder).mkdir(parents=True)
            for number in range(count):
                image = _texture(rng, (BEANTECH_SIZE, BEANTECH_SIZE, 3))
                Image.fromarray(image).save(root / category / folder / f"{number:04d}.{image_ext}")
        (root / category / "ground_truth" / "ko").mkdir(parents=True)
        for number in range(BEANTECH_COUNTS["test/ko"]):
            mask = beantech_mask(number).astype(np.uint8) * 255
            Image.fromarray(mask).save(root / category / "ground_truth" / "ko" / f"{number:04d}.{mask_ext}")
    return root


def beantech_mask(number: int) -> np.ndarray:
    mask = np.zeros((BEANTECH_SIZE, BEANTECH_SIZE), dtype=bool)
    mask[2 + number : 10 + number, 5:12] = True
    return mask
