"""MSFlow torch parts: flow shapes and invertibility, exact log-determinants, maps, score and loss."""

from __future__ import annotations

import copy

import pytest
import torch

from anomalib_ext.components.nfa import a_contrario_segmentation
from anomalib_ext.components.task_pretraining import default_feature_layers
from anomalib_ext.models.msflow.anomaly_map import AnomalyMapGenerator
from anomalib_ext.models.msflow.loss import MSFlowLoss
from anomalib_ext.models.msflow.torch_model import FusionFlow, MSFlowModel, parallel_flow


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move trainable parameters away from their (near-identity) initialisation; fixed permutations stay intact."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def tiny_model() -> MSFlowModel:
    torch.manual_seed(0)
    model = MSFlowModel("efficientnet_lite0", pre_trained=False, flow_blocks=(1, 2, 2), positional_channels=8)
    _perturb(model.parallel_flows)
    _perturb(model.fusion_flow)
    return model


def test_default_layers_are_the_stride_4_8_16_taps() -> None:
    assert default_feature_layers("wide_resnet50_2") == ["layer1", "layer2", "layer3"]
    assert default_feature_layers("efficientnet_lite0") == ["blocks.1", "blocks.2", "blocks.4"]


def test_paper_architecture_defaults() -> None:
    model = MSFlowModel("resnet18", pre_trained=False)
    assert [len(flow.module_list) for flow in model.parallel_flows] == [2, 5, 8]
    block = model.parallel_flows[0].module_list[0]
    assert block.clamp == pytest.approx(1.9)
    assert block.conditional and block.condition_channels == 64
    assert model.anomaly_map_generator.top_k == pytest.approx(0.03)


def test_parallel_flow_shapes_invertibility_and_log_det() -> None:
    torch.manual_seed(0)
    flow = parallel_flow(channels=6, n_blocks=3, condition_channels=4, clamp=1.9)
    _perturb(flow)
    features, condition = torch.randn(2, 6, 5, 7), torch.randn(2, 4, 5, 7)
    latents, log_det = flow(features, c=[condition])
    assert latents.shape == features.shape
    assert log_det.shape == (2,)
    assert torch.isfinite(log_det).all()
    assert not torch.allclose(latents, features, atol=1e-3)
    reconstructed, reverse_log_det = flow(latents, c=[condition], rev=True)
    assert torch.allclose(reconstructed, features, atol=1e-4)
    assert torch.allclose(reverse_log_det, -log_det, atol=1e-3)


def test_fusion_flow_is_invertible_and_its_log_det_is_exact() -> None:
    torch.manual_seed(0)
    fusion = FusionFlow([2, 3, 4]).double()
    _perturb(fusion, scale=0.3)
    shapes = [(1, 2, 4, 4), (1, 3, 2, 2), (1, 4, 1, 1)]
    sizes = [torch.Size(shape).numel() for shape in shapes]
    features = [torch.randn(shape, dtype=torch.float64) for shape in shapes]

    latents, log_det = fusion(features)
    assert [z.shape for z in latents] == [f.shape for f in features]
    reconstructed, reverse_log_det = fusion(latents, rev=True)
    for original, restored in zip(features, reconstructed, strict=True):
        assert torch.allclose(original, restored, atol=1e-6)
    assert torch.allclose(reverse_log_det, -log_det)

    def flat_map(flat: torch.Tensor) -> torch.Tensor:
        parts = [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]
        return torch.cat([z.flatten() for z in fusion(parts)[0]])

    jacobian = torch.autograd.functional.jacobian(flat_map, torch.cat([f.flatten() for f in features]))
    assert torch.slogdet(jacobian).logabsdet.item() == pytest.approx(log_det.item(), abs=1e-6)


def original_fusion_parameters(channels: list[int]) -> int:
    """Parameters of MSFlow's published fusion flow (cool-xuan/msflow), from its architecture.

    Two coupling subnets; each takes the conditioning halves ``c_i`` (total ``C``) and has conv3x3 C -> C/4, LayerNorm(C/4),
    conv3x3 C/4 -> C, and per scale a conv3x3 c_i -> c_i for s and another for t. Permutations have no parameters.
    """
    halves = [c // 2 for c in channels]
    total, hidden = sum(halves), sum(halves) // 4
    mix = (9 * total * hidden + hidden) + 2 * hidden + (9 * hidden * total + total)
    per_scale = 2 * sum(9 * c * c + c for c in halves)
    return 2 * (mix + per_scale)


def test_fusion_flow_parameter_count_at_wide_resnet50_2_shapes_is_the_originals() -> None:
    fusion = FusionFlow([256, 512, 1024])  # wide_resnet50_2 layer1..3
    count = sum(p.numel() for p in fusion.parameters())
    assert count == original_fusion_parameters([256, 512, 1024]) == 19_618_368


def test_fusion_flow_structure_residual_add_per_scale_convs_and_permutation() -> None:
    torch.manual_seed(0)
    fusion = FusionFlow([8, 12, 16])
    _perturb(fusion, scale=0.3)
    subnet = fusion.first_pass
    conv_in, norm, _, conv_out, last = subnet.mix
    assert (conv_in.in_channels, conv_in.out_channels, conv_in.kernel_size) == (18, 4, (3, 3))
    assert norm.normalized_shape == (4,) and (conv_out.out_channels, conv_out.kernel_size) == (18, (3, 3))
    assert isinstance(last, torch.nn.ReLU)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in subnet.scale_convs] == [
        (4, 4, (3, 3)),
        (6, 6, (3, 3)),
        (8, 8, (3, 3)),
    ]
    conditions = [torch.randn(2, 4, 16, 16), torch.randn(2, 6, 8, 8), torch.randn(2, 8, 4, 4)]

    # residual add: each scale's own half plus the upsampled cross-scale mixture computed on the coarsest grid
    pooled = torch.cat([torch.nn.functional.adaptive_avg_pool2d(c, (4, 4)) for c in conditions], dim=1)
    mixed = subnet.mix(pooled).split([4, 6, 8], dim=1)
    for fused, condition, part in zip(subnet.fused_conditions(conditions), conditions, mixed, strict=True):
        upsampled = torch.nn.functional.interpolate(
            part, size=condition.shape[-2:], mode="bilinear", align_corners=True
        )
        assert torch.allclose(fused, condition + upsampled)

    # per-scale s/t carry the finest scale's detail: a one-pixel change moves s there, not a whole coarse cell
    s_before = subnet(conditions)[0][0]
    changed = [c.clone() for c in conditions]
    changed[0][:, :, 9, 9] += 3.0
    delta = (subnet(changed)[0][0] - s_before).abs().amax(dim=(0, 1))
    assert delta[9, 9] > 10 * delta[13, 13]  # 4 px away only the pooled mixture reaches: 16x weaker

    # a fixed random permutation per scale, applied before the coupling (and stored in the state dict)
    permutations = [p.permutation for p in fusion.permutations]
    assert all(not torch.equal(p, torch.arange(len(p))) for p in permutations)
    assert all(f"permutations.{i}.permutation" in fusion.state_dict() for i in range(3))
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 12, 4, 4), torch.randn(2, 16, 2, 2)]
    unpermuted = copy.deepcopy(fusion)
    for permutation in unpermuted.permutations:
        permutation.permutation.copy_(torch.arange(len(permutation.permutation)))
        permutation.inverse.copy_(torch.arange(len(permutation.inverse)))
    expected, _ = unpermuted([x[:, p] for x, p in zip(features, permutations, strict=True)])
    for output, reference in zip(fusion(features)[0], expected, strict=True):
        assert torch.allclose(output, reference)
    assert torch.equal(FusionFlow([8, 12, 16]).permutations[2].permutation, fusion.permutations[2].permutation)


def test_model_encode_decode_round_trip(tiny_model: MSFlowModel) -> None:
    features = [torch.randn(2, c, s, s) for c, s in zip(tiny_model.feature_extractor.out_dims, (8, 4, 2), strict=True)]
    latents, log_det = tiny_model.encode(features)
    assert torch.isfinite(log_det).all()
    for original, restored in zip(features, tiny_model.decode(latents), strict=True):
        assert torch.allclose(original, restored, atol=1e-4)


def test_forward_train_and_eval_outputs(tiny_model: MSFlowModel) -> None:
    images = torch.randn(3, 3, 64, 64)
    tiny_model.train()
    latents, log_det = tiny_model(images)
    assert [z.shape[-1] for z in latents] == [8, 4, 2]  # strides 4/8/16, then MSFlow's 3x3/2 average pooling
    assert log_det.shape == (3,)
    tiny_model.eval()
    with torch.no_grad():
        output = tiny_model(images)
    assert output.anomaly_map.shape == (3, 1, 64, 64)
    assert output.pred_score.shape == (3,)
    assert ((output.pred_score >= 0) & (output.pred_score <= 1)).all()


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_maps_are_bounded_and_not_normalised_per_image(mode: str) -> None:
    """Making one image's anomaly stronger changes neither another image's map nor the same image's other pixels."""
    generator = AnomalyMapGenerator(top_k=0.03, mode=mode)  # type: ignore[arg-type]
    torch.manual_seed(0)
    normal = [0.7 * torch.randn(1, 4, 16, 16), 0.7 * torch.randn(1, 6, 8, 8)]

    def with_anomaly(strength: float) -> list[torch.Tensor]:
        latents = [z.clone() for z in normal]
        latents[0][..., :4, :4] *= strength  # a defect in one corner of the finest scale
        return latents

    weak, strong = with_anomaly(2.0), with_anomaly(4.0)
    maps, _ = generator([torch.cat(pair) for pair in zip(normal, weak, strict=True)], (32, 32))
    strong_map, _ = generator(strong, (32, 32))
    assert ((maps >= 0) & (maps < 1)).all() and ((strong_map >= 0) & (strong_map < 1)).all()
    far = (slice(None), slice(None), slice(12, None), slice(12, None))  # beyond the corner's bilinear footprint
    assert torch.equal(maps[0][far[1:]], maps[1][far[1:]])  # the other image's (and the same pixels') values stay
    assert torch.equal(strong_map[far], maps[1:][far])
    assert (strong_map[..., :6, :6] > maps[1:, ..., :6, :6]).all()  # a stronger anomaly reads higher, in absolute terms

    logp = [-0.5 * (z**2).mean(1, keepdim=True) for z in strong]

    def up(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(tensor, size=(32, 32), mode="bilinear", align_corners=True)

    if mode == "add":  # MSFlow's add map averages the upsampled per-scale likelihoods
        expected = 1 - (up(logp[0].exp()) + up(logp[1].exp())) / 2
    else:  # mul: one minus the geometric mean of the per-scale likelihoods, exp(S / n_scales)
        expected = 1 - torch.exp((up(logp[0]) + up(logp[1])) / 2)
    assert torch.allclose(strong_map, expected)
    with pytest.raises(ValueError, match="anomaly_map"):
        AnomalyMapGenerator(mode="log")  # type: ignore[arg-type]


def test_image_score_is_mean_of_top_three_percent_of_detection_map() -> None:
    generator = AnomalyMapGenerator(top_k=0.03)
    flat = torch.zeros(1, 1, 10, 10)
    defect = flat.clone()
    defect[..., :2, :2] = -4.0  # four pixels with a lower log-likelihood
    scores = generator.image_score(torch.cat([flat, defect]))
    assert scores[0].item() == pytest.approx(0.0)
    # 3 % of 100 pixels = 3 pixels, all inside the defect where A = 1 - exp(-4)
    assert scores[1].item() == pytest.approx(1 - torch.exp(torch.tensor(-4.0)).item())
    with pytest.raises(ValueError, match="top_k"):
        AnomalyMapGenerator(top_k=0)


def test_loss_is_the_un_normalised_negative_log_likelihood() -> None:
    """MSFlow back-propagates the NLL itself (its gradient clip at 2 is tuned for it); per dimension is for logging."""
    latents = [torch.full((2, 2, 2, 2), 2.0), torch.ones(2, 1, 2, 2)]
    log_det = torch.tensor([3.0, 5.0])
    expected = (0.5 * 4 * 8 + 0.5 * 1 * 4) - (3.0 + 5.0) / 2
    loss = MSFlowLoss()(latents, log_det)
    assert loss.item() == pytest.approx(expected)
    assert MSFlowLoss.per_dimension(loss, latents).item() == pytest.approx(expected / (8 + 4))


def test_flow_training_reduces_loss(tiny_model: MSFlowModel) -> None:
    torch.manual_seed(0)
    model = MSFlowModel("efficientnet_lite0", pre_trained=False, flow_blocks=(1, 1, 1), positional_channels=8)
    features = model.extract_features(torch.randn(4, 3, 32, 32))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    loss_function = MSFlowLoss()
    losses = []
    for _ in range(15):
        loss = loss_function(*model.encode(features))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_mismatched_layers_and_blocks_are_rejected() -> None:
    with pytest.raises(ValueError, match="one flow per feature layer"):
        MSFlowModel("efficientnet_lite0", pre_trained=False, flow_blocks=(2, 5))


def test_nfa_mask_option(tiny_model: MSFlowModel) -> None:
    images = torch.randn(2, 3, 96, 96)  # coarsest latent 3x3 (scikit-image's max-tree fails on 2x2 images)
    tiny_model.eval()
    with torch.no_grad():
        plain = tiny_model(images)
        tiny_model.use_nfa_mask = True
        try:
            with_nfa = tiny_model(images)
        finally:
            tiny_model.use_nfa_mask = False
        latents, _ = tiny_model.encode(tiny_model.extract_features(images))
    assert plain.pred_mask is None and plain.pred_label is None
    _, expected_mask = a_contrario_segmentation(latents, (96, 96), log_nfa_threshold=0.0)
    assert with_nfa.pred_mask.dtype == torch.bool and with_nfa.pred_mask.shape == (2, 96, 96)
    assert torch.equal(with_nfa.pred_mask, expected_mask)
    assert torch.equal(with_nfa.pred_label, expected_mask.flatten(1).any(dim=1))
    assert torch.equal(with_nfa.anomaly_map, plain.anomaly_map)


def test_nfa_mask_is_empty_for_white_gaussian_latents() -> None:
    """Under the null hypothesis (latents ~ N(0, I)) the NFA test flags (almost) nothing, unlike a shifted region."""
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(2, 24, 16, 16, generator=generator), torch.randn(2, 40, 8, 8, generator=generator)]
    _, null_mask = a_contrario_segmentation(latents, (64, 64))
    latents[0][1, :, 4:8, 4:8] += 4.0
    _, anomalous_mask = a_contrario_segmentation(latents, (64, 64))
    assert null_mask.float().mean() < 0.01
    assert anomalous_mask[1, 16:32, 16:32].float().mean() > 0.5
