"""Nothing in a dataset folder is dropped silently: unread files or folders stop setup with an error naming them.

Fixtures copy the real layouts (``tests/data/dataset_layouts.py``) and add what hand-made copies of the datasets contain:
a second nested copy of Crack500's ``traindata``, images in sub-folders of BeanTech/DAGM class folders, files lying
directly in ``test/``. OS metadata alone is ignored, and logged by name.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from anomalib_ext.data import DAGM, BeanTech, Crack500
from anomalib_ext.data.validation import DatasetLayoutError
from tests.data.dataset_layouts import BEANTECH_COUNTS, make_beantech, make_crack500_full, make_dagm


def _setup(datamodule_class: type, root: Path, **kwargs: object) -> object:
    datamodule = datamodule_class(root=root, num_workers=0, **kwargs)
    datamodule.setup()
    return datamodule


def test_crack500_flat_and_nested_traindata_together_is_an_error(tmp_path: Path) -> None:
    root = make_crack500_full(tmp_path)
    shutil.copytree(root / "traindata", root / "traindata_copy")
    (root / "traindata_copy").rename(root / "traindata" / "traindata")
    with pytest.raises(DatasetLayoutError, match=r"both the nested folder traindata/ and 20160222_"):
        _setup(Crack500, root, num_train_images=3)


def test_crack500_nested_traindata_alone_is_read(tmp_path: Path) -> None:
    root = make_crack500_full(tmp_path, nested=True)
    (root / "traindata" / ".DS_Store").write_bytes(b"\0")
    assert len(_setup(Crack500, root, num_train_images=3).test_data) > 0


@pytest.mark.parametrize(
    ("make", "datamodule_class", "arguments", "folder"),
    [
        (make_beantech, BeanTech, {"category": "01"}, "01/test/ko/more"),
        (make_beantech, BeanTech, {"category": "01"}, "01/train/ok/more"),
        (make_dagm, DAGM, {"category": "Class1"}, "Class1/Train/more"),
        (make_dagm, DAGM, {"category": "Class1"}, "Class1/Test/more"),
    ],
    ids=["beantech_test", "beantech_train", "dagm_train", "dagm_test"],
)
def test_images_in_sub_folders_are_an_error(
    tmp_path: Path, make: Callable[[Path], Path], datamodule_class: type, arguments: dict, folder: str
) -> None:
    root = make(tmp_path)
    parent = (root / folder).parent
    (root / folder).mkdir()
    image = next(path for path in parent.iterdir() if path.is_file() and path.suffix.lower() in {".png", ".bmp"})
    shutil.copy(image, root / folder / image.name)
    with pytest.raises(DatasetLayoutError, match=r"sub-folder\(s\) more .*would not be read"):
        _setup(datamodule_class, root, **arguments)


@pytest.mark.parametrize("folder", ["test", "ground_truth", "train"])
def test_beantech_files_directly_in_split_folder_are_an_error(tmp_path: Path, folder: str) -> None:
    root = make_beantech(tmp_path)
    shutil.copy(next((root / "01/test/ko").iterdir()), root / "01" / folder / "stray.bmp")
    with pytest.raises(DatasetLayoutError, match=rf"stray.bmp lie directly in .*{folder}"):
        _setup(BeanTech, root, category="01")


def test_beantech_other_train_folder_is_an_error(tmp_path: Path) -> None:
    root = make_beantech(tmp_path)
    shutil.copytree(root / "01/test/ko", root / "01/train/ko")
    with pytest.raises(DatasetLayoutError, match=r"train holds ko; only ok/ is read"):
        _setup(BeanTech, root, category="01")


def test_os_metadata_is_ignored_and_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_beantech(tmp_path)
    (root / "01/test/.DS_Store").write_bytes(b"\0")
    (root / "01/test/ko/Thumbs.db").write_bytes(b"\0")
    (root / "01/train/ok/__MACOSX").mkdir()
    with caplog.at_level(logging.WARNING, logger="anomalib_ext.data.validation"):
        datamodule = _setup(BeanTech, root, category="01")
    assert len(datamodule.train_data) == BEANTECH_COUNTS["train/ok"]
    logged = caplog.text
    assert "ignored OS metadata" in logged
    assert all(name in logged for name in (".DS_Store", "Thumbs.db", "__MACOSX"))
