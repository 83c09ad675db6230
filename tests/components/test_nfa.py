"""Tests of the a-contrario tree NFA segmentation component."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from anomalib_ext.components.nfa import (
    a_contrario_segmentation,
    build_component_tree,
    chernoff_log10_pfa,
    detection_leaves,
    exact_log10_pfa,
    latent_scores,
    log10_number_of_tests,
    moment_matched_null,
    region_log10_pfa_map,
)
from tests.components.nfa_reference import reference_segmentation

# 4x4 hand-checkable map. Upper level sets: the whole image at level 1 (root); a 2x2 block at level 4 whose three
# pixels at level 5 form its only child; a vertical pair at level 3; a single pixel at level 2.
HAND_SCORE = np.array(
    [
        [5.0, 5.0, 1.0, 1.0],
        [5.0, 4.0, 1.0, 3.0],
        [1.0, 1.0, 1.0, 3.0],
        [2.0, 1.0, 1.0, 1.0],
    ],
)
BLOCK_4 = np.zeros((4, 4), dtype=bool)
BLOCK_4[:2, :2] = True
BLOCK_5 = BLOCK_4.copy()
BLOCK_5[1, 1] = False
PAIR_3 = np.zeros((4, 4), dtype=bool)
PAIR_3[1:3, 3] = True
PIXEL_2 = np.zeros((4, 4), dtype=bool)
PIXEL_2[3, 0] = True


def _node_by_level(tree, level: float) -> int:
    (index,) = np.flatnonzero(tree.level == level)
    return int(index)


def test_number_of_tests_sanity_values() -> None:
    assert log10_number_of_tests((28 * 28, 14 * 14)) == pytest.approx(476.92, abs=0.01)
    assert log10_number_of_tests((14 * 14,)) == pytest.approx(118.95, abs=0.01)


def test_chernoff_bound_clamp() -> None:
    level = np.array([0.5, 1.0, 2.0])
    clamped = chernoff_log10_pfa(level, np.array([10, 10, 10]), channels=4)
    assert clamped[0] == 0.0
    assert clamped[1] == 0.0
    assert clamped[2] == pytest.approx(-10 * 2 * (1 - math.log(2)) / math.log(10))
    unclamped = chernoff_log10_pfa(level, np.array([10, 10, 10]), channels=4, clamp=False)
    assert unclamped[0] < 0.0  # the vacuous bound of the published code


def test_hand_checkable_tree() -> None:
    tree = build_component_tree(HAND_SCORE)
    assert sorted(tree.level.tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    root, block4, block5, pair3, pixel2 = (_node_by_level(tree, v) for v in (1.0, 4.0, 5.0, 3.0, 2.0))
    assert root == 0
    assert tree.parent[root] == root
    assert tree.parent[block5] == block4
    assert tree.parent[block4] == tree.parent[pair3] == tree.parent[pixel2] == root
    assert dict(zip(tree.level.tolist(), tree.area.tolist(), strict=True)) == {1.0: 16, 4.0: 4, 5.0: 3, 3.0: 2, 2.0: 1}
    assert (tree.pixel_node.reshape(4, 4) == block5)[BLOCK_5].all()


def test_hand_checkable_prune_and_merge() -> None:
    tree = build_component_tree(HAND_SCORE)
    root, block4, block5, pair3, pixel2 = (_node_by_level(tree, v) for v in (1.0, 4.0, 5.0, 3.0, 2.0))
    log_pfa = np.zeros(tree.parent.size)
    # prune keeps the more significant node of the branch (block5 -> block4); the root does not beat its children
    log_pfa[[root, block4, block5, pair3, pixel2]] = [-1.0, -5.0, -3.0, -2.0, -4.0]
    kept = detection_leaves(tree.parent, log_pfa)
    assert set(np.flatnonzero(kept)) == {block4, pair3, pixel2}
    # a root at least as significant as all of its (leaf) children absorbs them
    log_pfa[root] = -6.0
    assert set(np.flatnonzero(detection_leaves(tree.parent, log_pfa))) == {root}
    # ties along a branch keep the leaf (argmin from the leaf upwards); ties at a merge let the parent absorb
    log_pfa[:] = -1.0
    log_pfa[root] = 0.0
    assert set(np.flatnonzero(detection_leaves(tree.parent, log_pfa))) == {block5, pair3, pixel2}
    log_pfa[root] = -1.0
    assert set(np.flatnonzero(detection_leaves(tree.parent, log_pfa))) == {root}


def test_hand_checkable_log_pfa_map() -> None:
    channels = 2
    result = region_log10_pfa_map(HAND_SCORE, channels)

    def bound(t: float, area: int) -> float:
        return -area * channels / 2 * (t - 1 - math.log(t)) / math.log(10)

    # level 5 (area 3) beats level 4 (area 4) in its branch; the root (t = 1) has log PFA 0 and merges nothing
    assert bound(5, 3) < bound(4, 4)
    expected = np.zeros((4, 4))
    expected[BLOCK_5] = bound(5, 3)
    expected[PAIR_3] = bound(3, 2)
    expected[PIXEL_2] = bound(2, 1)
    np.testing.assert_allclose(result, expected)


@pytest.mark.parametrize("clamp", [True, False])
def test_identical_to_straightforward_reference(clamp: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(6):
        latents = [
            torch.randn(2, 64, 16, 16, generator=generator) * (1.0 + 0.05 * trial),
            torch.randn(2, 96, 8, 8, generator=generator) * 1.05,
        ]
        latents[0][0, :, 3:7, 4:9] += 1.5
        latents[1][1, :, 5:8, 0:3] += 1.5
        log_nfa, mask = a_contrario_segmentation(latents, (32, 32), clamp_chernoff=clamp)
        expected_log_nfa, expected_mask = reference_segmentation(latents, (32, 32), clamp_chernoff=clamp)
        assert mask.any()
        assert torch.equal(mask, expected_mask)
        torch.testing.assert_close(log_nfa, expected_log_nfa)


def test_integer_ties_identical_to_reference() -> None:
    """Plateaus (many equal scores) exercise the canonical-node merging of the max-tree."""
    generator = torch.Generator().manual_seed(1)
    latents = [torch.randint(1, 4, (3, 1, 12, 12), generator=generator).float()]
    log_nfa, _ = a_contrario_segmentation(latents, (12, 12))
    expected, _ = reference_segmentation(latents, (12, 12))
    assert log_nfa.unique().numel() > 3
    torch.testing.assert_close(log_nfa, expected)


def test_h0_false_alarms_at_most_one_region_per_image() -> None:
    generator = torch.Generator().manual_seed(2)
    n_images = 50
    regions = 0
    for _ in range(n_images // 10):
        latents = [torch.randn(10, 816, 28, 28, generator=generator), torch.randn(10, 192, 14, 14, generator=generator)]
        _, masks = a_contrario_segmentation(latents, (112, 112))
        regions += sum(ndimage.label(mask.numpy())[1] for mask in masks)
    assert regions / n_images <= 1.0


def test_under_dispersed_latents_not_flagged_with_clamp() -> None:
    generator = torch.Generator().manual_seed(3)
    latents = [
        torch.randn(8, 816, 28, 28, generator=generator) * math.sqrt(0.9),
        torch.randn(8, 192, 14, 14, generator=generator) * math.sqrt(0.9),
    ]
    _, clamped = a_contrario_segmentation(latents, (56, 56))
    assert not clamped.flatten(1).all(dim=1).any()
    _, unclamped = a_contrario_segmentation(latents, (56, 56), clamp_chernoff=False)
    assert unclamped.flatten(1).all(dim=1).any()  # the published behaviour flags such images whole


def test_planted_region_is_detected() -> None:
    generator = torch.Generator().manual_seed(4)
    latents = [torch.randn(1, 256, 28, 28, generator=generator), torch.randn(1, 256, 14, 14, generator=generator)]
    latents[0][..., 10:18, 12:22] += 1.0
    latents[1][..., 5:9, 6:11] += 1.0
    planted = torch.zeros(112, 112, dtype=torch.bool)
    planted[40:72, 48:88] = True
    _, mask = a_contrario_segmentation(latents, (112, 112))
    intersection = (mask[0] & planted).sum().item()
    union = (mask[0] | planted).sum().item()
    assert intersection / union >= 0.8


def test_threshold_and_output_size() -> None:
    latents = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    log_nfa, mask = a_contrario_segmentation(latents, 20, log_nfa_threshold=1e9)
    assert log_nfa.shape == mask.shape == (2, 20, 20)
    assert log_nfa.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents_raise(bad: float) -> None:
    latents = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)]
    latents[1][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        a_contrario_segmentation(latents, (16, 16))


def test_mismatched_scales_raise() -> None:
    with pytest.raises(ValueError, match="same batch size"):
        a_contrario_segmentation([torch.randn(2, 4, 8, 8), torch.randn(3, 8, 4, 4)], (16, 16))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        a_contrario_segmentation([torch.randn(2, 4, 8, 8), torch.randn(8, 4, 4)], (16, 16))
    with pytest.raises(ValueError, match="non-empty list"):
        a_contrario_segmentation([], (16, 16))


def _regions_per_image(masks: torch.Tensor) -> list[int]:
    return [ndimage.label(mask.numpy())[1] for mask in masks]


@pytest.mark.parametrize("variance", [0.7, 1.3])
def test_calibrated_null_on_miscalibrated_latents(variance: float) -> None:
    """Latents of variance 0.7 / 1.3 (paper-like channels): chi2 flags nothing / (almost) whole images; the
    moment-matched null fitted on held-out normal latents keeps <= 1 false region per image and still finds a planted
    shifted region (that chi2 misses when under-dispersed)."""
    generator = torch.Generator().manual_seed(5)
    shapes = [(816, 14), (192, 7)]

    def latents(count: int) -> list[torch.Tensor]:
        return [torch.randn(count, c, h, h, generator=generator) * math.sqrt(variance) for c, h in shapes]

    squared = [z.double().square().sum(dim=1).flatten() for z in latents(8)]  # held-out normal images
    scale, dof = moment_matched_null(torch.stack([q.mean() for q in squared]), torch.stack([q.var() for q in squared]))
    null = list(zip(scale.tolist(), dof.tolist(), strict=True))
    assert scale.tolist() == pytest.approx([variance] * 2, rel=0.1)
    assert dof.tolist() == pytest.approx([c for c, _ in shapes], rel=0.15)

    normal = latents(10)
    _, chi2_masks = a_contrario_segmentation(normal, (28, 28))
    _, calibrated_masks = a_contrario_segmentation(normal, (28, 28), null=null)
    assert np.mean(_regions_per_image(calibrated_masks)) <= 1.0
    if variance > 1:
        assert chi2_masks.flatten(1).float().mean(dim=1).median() > 0.9  # chi2 flags (almost) whole images
    else:
        assert not chi2_masks.any()

    planted = latents(1)
    planted[0][..., 3:7, 4:9] += math.sqrt(variance)
    planted[1][..., 2:4, 2:5] += math.sqrt(variance)
    truth = torch.zeros(28, 28, dtype=torch.bool)
    truth[6:14, 8:18] = True
    _, mask = a_contrario_segmentation(planted, (28, 28), null=null)
    assert (mask[0] & truth).sum() / (mask[0] | truth).sum() >= 0.5


def test_white_latents_give_back_the_chi2_null() -> None:
    scale, dof = moment_matched_null(torch.tensor([16.0]), torch.tensor([32.0]))  # chi2_16: mean 16, variance 32
    assert scale.item() == pytest.approx(1.0)
    assert dof.item() == pytest.approx(16.0)
    latents = [torch.randn(2, 16, 8, 8) * 1.4, torch.randn(2, 8, 4, 4)]
    expected = a_contrario_segmentation(latents, (16, 16))
    actual = a_contrario_segmentation(latents, (16, 16), null=[(1.0, 16.0), (1.0, 8.0)])
    for want, got in zip(expected, actual, strict=True):
        assert torch.equal(want, got)


def test_scale_selection_counts_tests_over_selected_scales() -> None:
    latents = [torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]
    log_nfa, _ = a_contrario_segmentation(latents, (16, 16), scales=[1, 2])
    assert log_nfa.max().item() == pytest.approx(log10_number_of_tests((64, 16)), abs=1e-3)
    latents[0][..., 4:12, 4:12] += 3.0  # a strong anomaly seen only by the dropped scale
    _, mask = a_contrario_segmentation(latents, (16, 16), scales=[-2, -1])
    assert not mask.any()
    with pytest.raises(ValueError, match="distinct indices"):
        a_contrario_segmentation(latents, (16, 16), scales=[3])
    with pytest.raises(ValueError, match="positive"):
        a_contrario_segmentation(latents, (16, 16), null=[(1.0, 4.0)])


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (1, 5), (2, 2)])
def test_maps_thinner_than_three_pixels(shape: tuple[int, int]) -> None:
    """scikit-image's max-tree fails or is wrong on a side of 2: such maps are padded below every score."""
    score = np.ones(shape)
    score.flat[0] = 5.0
    score.flat[-1] = 3.0
    result = region_log10_pfa_map(score, channels=4)
    expected = np.zeros(shape)
    expected.flat[0] = chernoff_log10_pfa(np.array([5.0]), np.array([1]), 4)[0]
    expected.flat[-1] = chernoff_log10_pfa(np.array([3.0]), np.array([1]), 4)[0]
    np.testing.assert_allclose(result, expected)


def test_half_precision_latents_are_squared_in_float64() -> None:
    latent = torch.full((1, 4, 3, 3), 300.0, dtype=torch.float16)  # 300^2 overflows float16
    np.testing.assert_allclose(latent_scores(latent), np.full((1, 3, 3), 90000.0))
    log_nfa, mask = a_contrario_segmentation([latent], (3, 3))
    assert mask.all()


def test_per_position_null_scale() -> None:
    """A per-position ``s_l(x)``: ones give the scalar null back; a position whose scale absorbs a planted shift is
    no longer detected there."""
    generator = torch.Generator().manual_seed(6)
    latents = [torch.randn(1, 64, 8, 8, generator=generator)]
    latents[0][..., 2:5, 2:5] *= 2.0
    _, scalar = a_contrario_segmentation(latents, (8, 8), null=[(1.0, 64.0)])
    _, ones = a_contrario_segmentation(latents, (8, 8), null=[(np.ones((8, 8)), 64.0)])
    assert torch.equal(scalar, ones)
    assert scalar[0, 2:5, 2:5].sum() >= 5
    scale = np.ones((8, 8))
    scale[2:5, 2:5] = 4.0
    _, absorbed = a_contrario_segmentation(latents, (8, 8), null=[(scale, 64.0)])
    assert not absorbed.any()


def test_exact_tail_values_and_bound() -> None:
    """Exact ``log10 P(chi2_nu >= nu t)^area`` (scipy), never above the Chernoff bound, clamped at ``t <= 1``, and the
    bound where the exact tail underflows."""
    level = np.array([0.5, 1.0, 1.5, 3.0, 10.0])
    area = np.array([4, 4, 4, 2, 1])
    exact = exact_log10_pfa(level, area, channels=20)
    expected = area * stats.chi2.logsf(level * 20, 20) / math.log(10)
    np.testing.assert_allclose(exact[2:], expected[2:])
    assert exact[0] == 0.0
    assert exact[1] == 0.0
    assert (exact[2:] < chernoff_log10_pfa(level, area, 20)[2:]).all()
    np.testing.assert_allclose(exact_log10_pfa(level, area, 20, clamp=False)[:2], expected[:2])
    far = exact_log10_pfa(np.array([1e4]), np.array([3]), channels=20)  # exact tail underflows: Chernoff bound
    np.testing.assert_allclose(far, chernoff_log10_pfa(np.array([1e4]), np.array([3]), 20))


def test_exact_tail_keeps_the_guarantee_and_finds_more() -> None:
    """White chi2 latents: <= 1 false region per image with the exact tail too; a faint planted shift that the
    Chernoff bound leaves undetected is found with the exact tail (same null, same tree)."""
    generator = torch.Generator().manual_seed(11)
    normal = [torch.randn(20, 24, 12, 12, generator=generator)]
    _, masks = a_contrario_segmentation(normal, (12, 12), tail="exact")
    assert np.mean(_regions_per_image(masks)) <= 1.0
    planted = [torch.randn(1, 24, 12, 12, generator=generator)]
    planted[0][..., 4:8, 4:8] *= 1.9
    _, chernoff = a_contrario_segmentation(planted, (12, 12))
    log_nfa, exact = a_contrario_segmentation(planted, (12, 12), tail="exact")
    assert not chernoff.any()
    assert exact[0, 4:8, 4:8].float().mean() > 0.5
    assert log_nfa.min() < 0
    with pytest.raises(ValueError, match="tail must be one of"):
        a_contrario_segmentation(planted, (12, 12), tail="gaussian")
