"""Exactness and behaviour tests of the patch auto-encoders, their dense scorers, the OC-SVM head and the restoration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.svm import OneClassSVM
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from anomalib_ext.models.patch_vqvae.anomaly_map import (
    centre_pixel_reconstruction,
    grid_positions,
    linear_interpolation_matrix,
    patch_ssim,
    reflect_pad_for_patches,
    sample_inverse_cdf,
    uniform_draws,
)
from anomalib_ext.models.patch_vqvae.torch_model import (
    OneClassSVMHead,
    PatchAutoencoderModel,
    VectorQuantizer,
    centre_dependency,
    check_patch_geometry,
)

PATCH = 27  # smallest patch the paper's layers decode exactly (latent 5 x 5); the paper's 63 is checked separately
PRIOR = {"prior_dim": 16, "prior_layers": 1, "prior_heads": 2, "prior_feedforward": 32, "prior_dropout": 0.0}


def _model(quantized: bool = True, scorer: str = "reconstruction", **kwargs) -> PatchAutoencoderModel:
    """An eval-mode model with non-trivial BatchNorm statistics (so the exactness tests cover them)."""
    torch.manual_seed(0)
    model = PatchAutoencoderModel(quantized=quantized, scorer=scorer, patch_size=PATCH, num_codes=16, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _all_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Brute force: the patch centred on every pixel of the reflect-padded image, raster order: ``[H*W, 3, P, P]``."""
    padded = reflect_pad_for_patches(image, patch_size)
    patches = padded.unfold(2, patch_size, 1).unfold(3, patch_size, 1)[0]  # [3, H, W, P, P]
    return patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, patch_size, patch_size)


def test_paper_geometry() -> None:
    assert check_patch_geometry(63, (5, 3, 3, 3), (1, 1, 3, 1)) == 17
    assert centre_dependency(63, (5, 3, 3, 3), (1, 1, 3, 1)) == (6, 10)  # the 5 x 5 latent block of the digest
    model = PatchAutoencoderModel(quantized=True, scorer="restoration")
    assert model.encoder(torch.zeros(2, 3, 63, 63)).shape == (2, 16, 17, 17)
    assert model.decoder(torch.zeros(2, 16, 17, 17)).shape == (2, 3, 63, 63)
    assert model.quantizer.num_codes == 1024
    assert sum(isinstance(m, torch.nn.TransformerEncoderLayer) for m in model.prior.modules()) == 8


@pytest.mark.parametrize("patch_size", [26, 29, 21])
def test_bad_patch_sizes_raise(patch_size: int) -> None:
    with pytest.raises(ValueError, match="patch_size"):
        PatchAutoencoderModel(quantized=False, patch_size=patch_size)


def test_training_image_smaller_than_patch_raises() -> None:
    with pytest.raises(ValueError, match="at least 27 x 27"):
        _model().random_patches(torch.rand(1, 3, 40, 26), 4)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (12, 40), (32, 32)])
def test_inference_accepts_images_smaller_than_a_patch(size: tuple[int, int]) -> None:
    """Anomalib's export probes with 32 x 32 images: small inputs are mirrored (repeatedly) up to whole patches."""
    model = _model()
    image = torch.rand(1, 3, *size)
    padded = reflect_pad_for_patches(image, PATCH)
    assert padded.shape[-2:] == (size[0] + PATCH - 1, size[1] + PATCH - 1)
    if min(size) > PATCH // 2:  # the ordinary reflection where it exists
        torch.testing.assert_close(padded, torch.nn.functional.pad(image, (13, 13, 13, 13), mode="reflect"))
    with torch.no_grad():
        anomaly_map = model.anomaly_map(image)
        centre = model.decoder(model.patch_latents(_all_patches(image, PATCH)))[:, :, PATCH // 2, PATCH // 2]
    expected = (image[0].flatten(1).T - centre).pow(2).sum(1)
    torch.testing.assert_close(anomaly_map.flatten(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(29, 31), (33, 28)])
def test_dense_latents_equal_per_patch_encoder(size: tuple[int, int]) -> None:
    model = _model()
    image = torch.rand(1, 3, *size)
    stride, latent = model.encoder.total_stride, model.latent_size
    with torch.no_grad():
        dense = model.encoder.dense(reflect_pad_for_patches(image, PATCH))[0]
        reference = model.encoder(_all_patches(image, PATCH))
    span = stride * (latent - 1) + 1
    windows = dense.unfold(1, span, 1).unfold(2, span, 1)[:, : size[0], : size[1], ::stride, ::stride]
    windows = windows.permute(1, 2, 0, 3, 4).reshape(reference.shape)
    torch.testing.assert_close(windows, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_centre_pixel_reconstruction_equals_per_patch_decode(quantized: bool) -> None:
    model = _model(quantized=quantized)
    image = torch.rand(2, 3, 28, 29)
    with torch.no_grad():
        dense = model.quantize(model.encoder.dense(reflect_pad_for_patches(image, PATCH)))
        centre = centre_pixel_reconstruction(model.decoder, dense, PATCH, model.latent_size, 3, (28, 29))
        for index in range(2):
            decoded = model.decoder(model.patch_latents(_all_patches(image[index : index + 1], PATCH)))
            reference = decoded[:, :, PATCH // 2, PATCH // 2].reshape(28, 29, 3).permute(2, 0, 1)
            torch.testing.assert_close(centre[index], reference, atol=1e-5, rtol=1e-5)
        expected = (image - centre).pow(2).sum(1, keepdim=True)
        torch.testing.assert_close(model.anomaly_map(image), expected)


def test_vq_straight_through_gradient_and_losses() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=8, code_dim=4)
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantised, indices, codebook_loss, commitment_loss = quantizer(latents)
    torch.testing.assert_close(quantised, quantizer.embed(indices))
    distances = torch.cdist(latents.detach().permute(0, 2, 3, 1).reshape(-1, 4), quantizer.codebook.detach())
    assert torch.equal(indices.flatten(), distances.argmin(1))
    # Straight-through: d(sum z_q)/dz is the identity; the codebook only learns from ||sg[z] - z_q||^2.
    quantised.sum().backward(retain_graph=True)
    torch.testing.assert_close(latents.grad, torch.ones_like(latents))
    assert quantizer.codebook.grad is None
    codebook_loss.backward(retain_graph=True)
    assert quantizer.codebook.grad.abs().sum() > 0
    latents.grad = None
    commitment_loss.backward()
    torch.testing.assert_close(latents.grad, 2 * (latents - quantised).detach() / latents.numel())


def test_vq_training_uses_several_codes() -> None:
    torch.manual_seed(0)
    model = PatchAutoencoderModel(quantized=True, patch_size=PATCH, num_codes=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        patches = torch.rand(16, 3, PATCH, PATCH)
        reconstruction, codebook_loss, commitment_loss, _ = model.reconstruct(patches)
        loss = torch.nn.functional.mse_loss(reconstruction, patches) + codebook_loss + 0.25 * commitment_loss
        optimizer.zero_grad()
        loss.backward()
        assert model.encoder.convs[0].weight.grad.abs().sum() > 0  # the reconstruction gradient reaches the encoder
        optimizer.step()
    with torch.no_grad():  # codes chosen for a fresh training batch (BatchNorm in training mode, as during training)
        _, indices, _, _ = model.quantizer(model.encoder(torch.rand(16, 3, PATCH, PATCH)))
    assert indices.unique().numel() > 1


def _confident_prior_model(code: int, mode: str) -> PatchAutoencoderModel:
    """A restoration model whose prior predicts ``code`` with probability ~1 at every position."""
    model = _model(scorer="restoration", restoration_mode=mode, **PRIOR)
    with torch.no_grad():
        model.prior.head.weight.zero_()
        model.prior.head.bias.fill_(-20.0)
        model.prior.head.bias[code] = 20.0
    return model


@pytest.mark.parametrize("mode", ["sequential", "single_pass"])
def test_restoration_keeps_probable_and_replaces_improbable_codes(mode: str) -> None:
    model = _confident_prior_model(code=5, mode=mode)
    length = model.latent_size**2
    normal = torch.full((3, length), 5)
    uniforms = uniform_draws(0, torch.arange(3), length)
    with torch.no_grad():
        assert torch.equal(model.restore_codes(normal, uniforms), normal)
        anomalous = normal.clone()
        anomalous[0, [2, 7]] = 9
        anomalous[2, -1] = 0
        restored = model.restore_codes(anomalous, uniforms)
    assert torch.equal(restored, normal)


def _restore_per_position(model: PatchAutoencoderModel, codes: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Straightforward reference of the sequential semantics: for j = 1..L, re-run the whole prior on the current
    sequence (restored prefix, input codes after it), read ``p(. | z~_<j)`` at j, resample if ``p(z_j) < tau``."""
    restored = codes.clone()
    for position in range(codes.shape[1]):
        probabilities = model.prior(restored)[:, position].softmax(-1)
        improbable = probabilities.gather(1, codes[:, position, None])[:, 0] < model.restoration_threshold
        draws = sample_inverse_cdf(probabilities, uniforms[:, position])
        restored[:, position] = torch.where(improbable, draws, codes[:, position])
    return restored


def test_sequential_sweep_equals_per_position_loop_for_the_same_draws() -> None:
    """The cached one-sweep restoration = re-running the prior once per position, with the same random numbers."""
    model = _model(
        scorer="restoration",
        restoration_threshold=0.07,
        prior_dim=32,
        prior_layers=3,
        prior_heads=4,
        prior_feedforward=64,
        prior_dropout=0.0,
    ).double()
    with torch.no_grad():
        model.prior.head.weight.mul_(8.0)  # peaked conditionals: both kept and resampled codes occur
        codes = torch.randint(0, 16, (6, model.latent_size**2))
        uniforms = uniform_draws(3, torch.arange(6), codes.shape[1])
        swept = model.restore_codes(codes, uniforms)
        reference = _restore_per_position(model, codes, uniforms)
        model.restoration_mode = "single_pass"
        single = model.restore_codes(codes, uniforms)
    assert torch.equal(swept, reference)
    changed = (swept != codes).float().mean()
    assert 0.05 < changed < 0.95  # a real mix of kept and resampled codes
    assert not torch.equal(swept, single)  # re-conditioning on the restored prefix matters


def test_single_pass_uses_the_teacher_forced_conditionals() -> None:
    """With a prior that copies the previous code, only position 1 is flagged from the input sequence."""
    model = _model(scorer="restoration", restoration_mode="single_pass", **PRIOR)
    length = model.latent_size**2

    def copy_previous(codes: torch.Tensor) -> torch.Tensor:
        previous = torch.cat([torch.full_like(codes[:, :1], 3), codes[:, :-1]], dim=1)
        return torch.nn.functional.one_hot(previous, 16).float() * 40.0 - 20.0

    model.prior.forward = copy_previous
    codes = torch.full((1, length), 3)
    codes[0, 1:] = 7
    restored = model.restore_codes(codes, uniform_draws(0, torch.arange(1), length))
    assert restored[0, 1] == 3
    assert torch.equal(restored[0, 2:], codes[0, 2:])


def test_restoration_map_matches_per_patch_scores_on_the_grid() -> None:
    model = _confident_prior_model(code=5, mode="sequential")
    model.restoration_stride = 4
    image = torch.rand(1, 3, 29, 30)
    with torch.no_grad():
        anomaly_map = model.anomaly_map(image)
        again = model.anomaly_map(image)
        patches = _all_patches(image, PATCH).reshape(29, 30, 3, PATCH, PATCH)
        rows, cols = grid_positions(29, 4), grid_positions(30, 4)
        grid_patches = patches[rows][:, cols].reshape(-1, 3, PATCH, PATCH)
        keys = (rows[:, None] * 30 + cols[None, :]).flatten()
        expected = model.restoration_scores(grid_patches, keys)
    torch.testing.assert_close(anomaly_map, again)  # seeded resampling: deterministic
    torch.testing.assert_close(anomaly_map[0, 0][rows][:, cols].flatten(), expected, atol=1e-5, rtol=1e-4)
    assert anomaly_map.shape == (1, 1, 29, 30)


@pytest.mark.parametrize("mode", ["sequential", "single_pass"])
def test_restoration_map_of_an_image_ignores_batch_neighbours_and_chunking(mode: str) -> None:
    """Random numbers are drawn per image and patch position: batch size, neighbours and chunks change nothing."""
    model = _model(
        scorer="restoration", restoration_mode=mode, restoration_stride=6, restoration_threshold=0.2, **PRIOR
    )
    images = torch.rand(3, 3, 30, 31)
    with torch.no_grad():
        alone = model.anomaly_map(images[1:2])
        model.restoration_chunk_size = 7
        in_batch = model.anomaly_map(images)
        reversed_batch = model.anomaly_map(images.flip(0))
    torch.testing.assert_close(in_batch[1:2], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(reversed_batch[1:2], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(in_batch[0], in_batch[2])


def test_interpolation_and_ssim() -> None:
    positions = grid_positions(10, 4)
    assert positions.tolist() == [0, 4, 8, 9]
    weights = linear_interpolation_matrix(positions, 10)
    values = torch.tensor([0.0, 4.0, 8.0, 9.0])
    torch.testing.assert_close(weights @ values, torch.arange(10.0))
    patch = torch.rand(2, 3, 9, 9)
    torch.testing.assert_close(patch_ssim(patch, patch), torch.ones(2))
    assert (patch_ssim(patch, torch.rand(2, 3, 9, 9)) < 0.5).all()


def test_ocsvm_head_matches_sklearn_and_dense_map_matches_per_patch() -> None:
    torch.manual_seed(0)
    model = _model(quantized=False, scorer="ocsvm")
    training = model.encoder(torch.rand(60, 3, PATCH, PATCH)).detach()
    model.ocsvm.fit(training, nu=0.1)
    features = training.reshape(60, -1).double().numpy()
    reference = OneClassSVM(nu=0.1, gamma="scale").fit(features)
    assert np.isclose(float(model.ocsvm.gamma), reference._gamma, rtol=1e-6)  # noqa: SLF001
    queries = model.encoder(torch.rand(7, 3, PATCH, PATCH)).detach()
    expected = reference.decision_function(queries.reshape(7, -1).double().numpy())
    np.testing.assert_allclose(model.ocsvm.decision_function(queries).numpy(), expected, rtol=1e-4, atol=1e-5)

    image = torch.rand(1, 3, 28, 29)
    with torch.no_grad():
        dense = model.encoder.dense(reflect_pad_for_patches(image, PATCH))
        decision = model.ocsvm.decision(dense, 3, max_elements=5 * 28 * 29)  # several support-vector chunks
        per_patch = model.ocsvm.decision_function(model.encoder(_all_patches(image, PATCH)))
        torch.testing.assert_close(decision.flatten(), per_patch, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.anomaly_map(image), -decision)


def test_ocsvm_gamma_is_sklearns_own_for_a_collapsed_codebook() -> None:
    """Zero variance (every latent equal, e.g. one code used): scikit-learn uses gamma = 1, never inf."""
    latents = torch.ones(30, 2, 3, 3)
    head = OneClassSVMHead((2, 3, 3))
    head.fit(latents, nu=0.5)
    reference = OneClassSVM(nu=0.5, gamma="scale").fit(latents.reshape(30, -1).double().numpy())
    assert float(head.gamma) == reference._gamma == 1.0  # noqa: SLF001
    queries = torch.cat([latents[:2], torch.zeros(1, 2, 3, 3)])
    expected = reference.decision_function(queries.reshape(3, -1).double().numpy())
    np.testing.assert_allclose(head.decision_function(queries).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ocsvm_and_ssim_run_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    head = OneClassSVMHead((16, 5, 5))
    head.fit(torch.randn(80, 16, 5, 5), nu=0.3)
    dense = torch.randn(1, 16, 30, 30)
    first, second = torch.rand(4, 3, 9, 9), torch.rand(4, 3, 9, 9)
    expected = head.decision(dense, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = head.decision(dense, 3)
        actual_ssim = patch_ssim(first.bfloat16(), second)
    assert actual.dtype == actual_ssim.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual_ssim, patch_ssim(first.bfloat16().float(), second))


@pytest.mark.parametrize("scorer", ["reconstruction", "ocsvm", "restoration"])
def test_dense_maps_refuse_training_mode(scorer: str) -> None:
    model = _model(scorer=scorer, **(PRIOR if scorer == "restoration" else {}))
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.anomaly_map(torch.rand(1, 3, 30, 30))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any ATen operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        result = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest:
                self.largest, self.shape = tensor.numel(), tuple(tensor.shape)
        return result


@pytest.mark.parametrize("scorer", ["ocsvm", "restoration"])
def test_dense_maps_stay_within_a_memory_bound_from_the_shapes(scorer: str) -> None:
    """No tensor larger than the padded images (restoration) or the dense latent map and the chunk budget (OC-SVM).

    Before: the restoration scorer materialised every patch of every grid row (``[B, 3, ny, W + P - 1, P, P]``) and
    the OC-SVM map held ``[B, chunk_size, H, W]`` for a fixed number of support vectors whatever B, H and W.
    """
    batch, size = 2, 64
    model = _model(
        quantized=scorer == "restoration",
        scorer=scorer,
        restoration_stride=16,
        **({**PRIOR, "restoration_chunk_size": 4} if scorer == "restoration" else {}),
    )
    if scorer == "ocsvm":
        torch.manual_seed(0)
        model.ocsvm.fit(model.encoder(torch.rand(120, 3, PATCH, PATCH)).detach(), nu=0.9)
        assert model.ocsvm.support_vectors.shape[0] > 100
        model.chunk_elements = 4 * batch * size * size
    padded_images = batch * 3 * (size + PATCH - 1) ** 2
    dense_latents = batch * 16 * (size + PATCH - 1) ** 2
    bound = max(dense_latents, model.chunk_elements) if scorer == "ocsvm" else padded_images
    with torch.no_grad(), _LargestTensor() as probe:
        model.anomaly_map(torch.rand(batch, 3, size, size))
    assert probe.largest <= bound, f"largest tensor {probe.shape} ({probe.largest}) > {bound}"


def test_ocsvm_head_survives_state_dict_round_trip() -> None:
    head = OneClassSVMHead((2, 3, 3))
    head.fit(torch.randn(40, 2, 3, 3), nu=0.2)
    fresh = OneClassSVMHead((2, 3, 3))
    assert not fresh.is_fitted
    fresh.load_state_dict(head.state_dict())
    queries = torch.randn(5, 2, 3, 3)
    torch.testing.assert_close(fresh.decision_function(queries), head.decision_function(queries))


def test_unfitted_ocsvm_and_bad_scorers_raise() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        _model(quantized=False, scorer="ocsvm").anomaly_map(torch.rand(1, 3, 27, 27))
    with pytest.raises(ValueError, match="PatchVQVAE"):
        PatchAutoencoderModel(quantized=False, scorer="restoration", patch_size=PATCH)
    with pytest.raises(ValueError, match="Unknown scorer"):
        PatchAutoencoderModel(quantized=True, scorer="ssim", patch_size=PATCH)
