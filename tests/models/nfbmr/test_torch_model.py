"""Unit tests of the NF-BMR torch parts: SNN tap, TNF flow, BMR / B-PFM mappers, losses and score map."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from anomalib_ext.models.nfbmr.anomaly_map import AnomalyMapGenerator
from anomalib_ext.models.nfbmr.loss import BidirectionalMappingLoss, FlowNLLLoss
from anomalib_ext.models.nfbmr.torch_model import (
    PAPER_BACKBONE,
    PAPER_LAYER,
    BidirectionalFeatureMapping,
    BidirectionalMappingResidual,
    NFBMRModel,
    SourceFeatureExtractor,
    build_target_flow,
)

TINY = {"flow_hidden_channels": 16, "mapper_hidden_channels": 16, "bottleneck_channels": 8}


def _randomise_zero_layers(module: nn.Module) -> None:
    """The flow's last subnet convs start at zero (identity flow); give them weights so that the test means something."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def test_source_extractor_taps_the_named_layer_and_stays_frozen() -> None:
    extractor = SourceFeatureExtractor("efficientnet_lite0", "blocks.4", pre_trained=False)
    assert extractor.probe((64, 64)) == (112, (4, 4))  # lite0 blocks.4: 112 channels, stride 16
    assert extractor.probe((64, 96))[1] == (4, 6)
    assert not any(parameter.requires_grad for parameter in extractor.parameters())
    extractor.train()
    assert not extractor.training


def test_paper_layer_of_efficientnet_b5_is_304_channels_at_stride_32() -> None:
    assert PAPER_BACKBONE == "tf_efficientnet_b5.in1k"  # ImageNet-1k weights, as the paper
    extractor = SourceFeatureExtractor(PAPER_BACKBONE, PAPER_LAYER, pre_trained=False)
    assert extractor.probe((64, 64)) == (304, (2, 2))
    for config in sorted(Path(__file__).parents[3].glob("configs/nfbmr*.yaml")):
        if "textures_cpu" not in config.name:
            assert yaml.safe_load(config.read_text())["model"]["init_args"]["backbone"] == PAPER_BACKBONE, config


def test_anomaly_map_follows_the_scored_image_size_and_the_model_pickles() -> None:
    """Built for 64 px, scored at 96 x 80 (maps and NFA mask at 96 x 80); ``torch.save`` of the whole module works."""
    torch.manual_seed(0)
    model = NFBMRModel((64, 64), "efficientnet_lite0", "blocks.4", pre_trained=False, use_nfa_mask=True, **TINY).eval()
    image = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        output = model(image)
    assert output.anomaly_map.shape == (1, 1, 96, 80) and output.pred_mask.shape == (1, 96, 80)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(image).anomaly_map, output.anomaly_map, rtol=0, atol=0)


def test_unknown_layer_lists_the_available_layers() -> None:
    with pytest.raises(ValueError, match=r"no layer 'layer9'.*Available layers: .*'blocks\.5'"):
        SourceFeatureExtractor("efficientnet_lite0", "layer9", pre_trained=False)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_tnf_is_invertible_with_finite_exact_log_det(kernel_size: int) -> None:
    torch.manual_seed(0)
    flow = build_target_flow(4, (2, 2), coupling_blocks=4, hidden_channels=8, kernel_size=kernel_size)
    _randomise_zero_layers(flow)
    source = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    flow = flow.double()
    target, log_det = flow(source)
    reconstruction, _ = flow(target, rev=True)
    torch.testing.assert_close(reconstruction, source, atol=1e-10, rtol=0)
    assert torch.isfinite(log_det).all() and log_det.shape == (3,)
    assert not torch.allclose(target, source)
    # the log-det equals the brute-force Jacobian's for the first sample
    jacobian = torch.autograd.functional.jacobian(lambda x: flow(x.view(1, 4, 2, 2))[0].flatten(), source[0].flatten())
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jacobian)[1], atol=1e-8, rtol=0)


def test_tnf_structure_permutations_are_fixed_and_leave_numpy_alone() -> None:
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    first = build_target_flow(8, (2, 2), hidden_channels=16, permutation_seed=5)
    assert np.random.rand() == expected_draw  # global numpy state untouched
    second = build_target_flow(8, (2, 2), hidden_channels=16, permutation_seed=5)
    names = [type(module).__name__ for module in first.module_list]
    assert names == ["PermuteRandom", "GLOWCouplingBlock"] * 4
    for a, b in zip(first.module_list[::2], second.module_list[::2], strict=True):
        assert torch.equal(a.perm, b.perm)
    assert not torch.equal(first.module_list[0].perm, first.module_list[2].perm)
    hidden = first.module_list[1].subnet1[0]
    assert hidden.out_channels == 16 and hidden.kernel_size == (3, 3)


def test_bmr_shares_one_middle_block_between_both_nets() -> None:
    torch.manual_seed(0)
    bmr = BidirectionalMappingResidual(6, hidden_channels=16, bottleneck_channels=8, blocks_per_side=2)
    assert len(bmr.tmnn.head) == len(bmr.tmnn.tail) == len(bmr.smnn.head) == len(bmr.smnn.tail) == 2
    shared_keys = [key for key in bmr.state_dict() if "shared_block" in key]
    assert shared_keys and all(key.startswith("shared_block.") for key in shared_keys)  # stored once
    assert not any(
        isinstance(module, type(bmr.shared_block)) and module is bmr.shared_block for module in bmr.tmnn.modules()
    )
    source, target = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    _, source_hat, _, target_hat = bmr(source, target)
    shared = list(bmr.shared_block.parameters())
    for output in (source_hat, target_hat):  # both directions run through the shared parameters
        gradients = torch.autograd.grad(output.square().sum(), shared, retain_graph=True, allow_unused=True)
        assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in gradients)
    with torch.no_grad():
        bmr.shared_block.body[0].weight.add_(1.0)
    _, source_hat_after, _, target_hat_after = bmr(source, target)
    assert not torch.allclose(source_hat, source_hat_after) and not torch.allclose(target_hat, target_hat_after)


def test_bpfm_uses_normalised_features_and_a_shared_bottleneck() -> None:
    torch.manual_seed(0)
    bpfm = BidirectionalFeatureMapping(6, hidden_channels=16)
    source, source_hat, target, target_hat = bpfm(3 * torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3))
    torch.testing.assert_close(source.norm(dim=1), torch.ones(2, 3, 3))
    torch.testing.assert_close(target.norm(dim=1), torch.ones(2, 3, 3))
    convs = [m for m in bpfm.source_to_target.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 5 and all(conv.kernel_size == (1, 1) for conv in convs)  # + the shared bottleneck
    assert source_hat.shape == target_hat.shape == (2, 6, 3, 3)


def test_losses_follow_eqs_8_and_11_to_13() -> None:
    target = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # [1, 2, 1, 2]
    log_jacobian = torch.tensor([0.5])
    expected = (0.5 * (1 + 4 + 0 + 1) - 0.5) / 4
    torch.testing.assert_close(FlowNLLLoss()(target, log_jacobian), torch.tensor(expected))
    source, source_hat = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    total, source_loss, target_loss = BidirectionalMappingLoss()(
        source, source_hat, target.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1) + 2
    )
    torch.testing.assert_close(source_loss, torch.tensor(1.0))
    torch.testing.assert_close(target_loss, torch.tensor(4.0))
    torch.testing.assert_close(total, torch.tensor(5.0))


def test_score_map_is_eq_14_upsampled_and_image_score_is_its_max() -> None:
    source, source_hat = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    target, target_hat = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    source_hat[0, :, 0, 1] = 1.0  # ||y - y_hat||^2 = 2 at (0, 1)
    target_hat[0, 0, 1, 1] = 2.0  # ||z - z_hat||^2 = 4 at (1, 1)
    distance = AnomalyMapGenerator.mapping_distance(source, source_hat, target, target_hat)
    torch.testing.assert_close(distance[0, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    output = AnomalyMapGenerator((8, 8))(distance, target)
    assert output.anomaly_map.shape == (1, 1, 8, 8)
    torch.testing.assert_close(output.pred_score, output.anomaly_map.flatten(1).amax(dim=1))
    assert output.pred_mask is None and output.pred_label is None
    torch.testing.assert_close(
        AnomalyMapGenerator.flow_distance(torch.full((1, 4, 1, 1), 2.0)), torch.full((1, 1, 1, 1), 8.0)
    )


def test_model_modes_and_nfa_mask() -> None:
    torch.manual_seed(0)
    image = torch.randn(2, 3, 64, 64)
    nf_only = NFBMRModel((64, 64), "efficientnet_lite0", "blocks.4", pre_trained=False, nf_only=True, **TINY).eval()
    assert nf_only.mapper is None and not nf_only.stage_parameters()["bmr"]
    source = nf_only.extract(image)
    target, _ = nf_only.encode(source)
    with torch.no_grad():
        output = nf_only(image)
    expected = torch.nn.functional.interpolate(target.square().sum(1, keepdim=True) / 2, size=(64, 64), mode="bilinear")
    torch.testing.assert_close(output.anomaly_map, expected)

    bpfm = NFBMRModel((64, 64), "efficientnet_lite0", "blocks.4", pre_trained=False, mapper="bpfm", **TINY)
    assert isinstance(bpfm.mapper, BidirectionalFeatureMapping)
    with pytest.raises(ValueError, match="mapper must be one of"):
        NFBMRModel((64, 64), "efficientnet_lite0", "blocks.4", pre_trained=False, mapper="pfm", **TINY)

    masked = NFBMRModel((64, 64), "efficientnet_lite0", "blocks.4", pre_trained=False, use_nfa_mask=True, **TINY).eval()
    with torch.no_grad():
        output = masked(image)
    assert output.pred_mask.dtype == torch.bool and output.pred_mask.shape == (2, 64, 64)
    torch.testing.assert_close(output.pred_label, output.pred_mask.flatten(1).any(dim=1))
    # a latent far outside N(0, I) in one region is detected there and nowhere else
    latent = torch.randn(1, 112, 8, 8, generator=torch.Generator().manual_seed(1))
    latent[..., :2, :2] *= 4
    detections = masked.anomaly_map_generator(masked.anomaly_map_generator.flow_distance(latent), latent).pred_mask[0]
    assert detections[:8, :8].all() and not detections[32:, 32:].any()
