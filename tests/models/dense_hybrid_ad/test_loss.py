"""DenseHybridAD loss: bounded below for every parameter that trains, in every freezing mode; KL 0 at the start."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

from anomalib_ext.models.dense_hybrid_ad import torch_model
from anomalib_ext.models.dense_hybrid_ad.loss import PAPER_BETA, DenseHybridLoss
from anomalib_ext.models.dense_hybrid_ad.torch_model import DenseHybridADModel

SIZE = 16


def small_deeplabv3(num_classes: int = 21, **kwargs: object) -> DeepLabV3:
    """torchvision's DeepLabV3 with the real head (ASPP, 3x3 conv, BN-ReLU-Conv) on a two-conv backbone (stride 2)."""
    del kwargs
    backbone = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
            layer=nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
        )
    )
    return DeepLabV3(IntermediateLayerGetter(backbone, {"layer": "out"}), DeepLabHead(32, num_classes))


def pasted_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two noise images with a pasted negative (a bright rectangle) and its mask."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE)
    outlier_mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    outlier_mask[:, 2:9, 4:12] = True
    images[outlier_mask[:, None].expand_as(images)] += 3.0
    return images, outlier_mask


def train_on_pasted_batch(
    freeze: str, loss_fn: DenseHybridLoss, steps: int, lr: float, stop_below: float = float("-inf")
) -> list[float]:
    """Adam on all trainable parameters of ``freeze`` (model in train mode, as Lightning runs it) on one fixed batch.

    Stops early once the loss falls below ``stop_below``.
    """
    torch.manual_seed(0)
    model = DenseHybridADModel(pre_trained=False, freeze=freeze).train()
    images, outlier_mask = pasted_batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        output = model(images)
        total = loss_fn(output.class_logits, output.outlier_logit, outlier_mask, output.teacher_logits).total
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
        if losses[-1] < stop_below:
            break
    return losses


# Adam steps and learning rate per mode: enough for the loss without the density anchor to fall through the bound.
SCHEDULES = {"all": (200, 0.05), "backbone": (100, 0.01), "none": (100, 0.003)}


@pytest.mark.parametrize("freeze", list(SCHEDULES))
def test_loss_is_bounded_below_for_all_trainable_weights(freeze: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DeepLabV3 head and freezing logic as in the model, on a small backbone so that the runs take seconds."""
    monkeypatch.setattr(torch_model, "deeplabv3_resnet50", small_deeplabv3)
    steps, lr = SCHEDULES[freeze]
    anchored = DenseHybridLoss()
    losses = train_on_pasted_batch(freeze, anchored, steps, lr)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses) >= anchored.lower_bound - 1e-5
    assert losses[-1] < losses[0]  # it still optimises

    # The same run without the density anchor (the previous loss: inlier term + distillation) falls through the bound.
    unanchored = train_on_pasted_batch(freeze, DenseHybridLoss(density_anchor=0.0), steps, lr)
    assert min(unanchored) < anchored.lower_bound - 0.3, min(unanchored)


def test_lower_bound_is_attained_by_the_optimal_log_density_shift() -> None:
    """At Δ = ∓β/(2λ) on outlier/inlier pixels (and a perfect outlier head) the loss equals its lower bound."""
    loss_fn = DenseHybridLoss(distillation_weight=0.0)
    shift = PAPER_BETA / (2 * loss_fn.density_anchor)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    teacher = torch.randn(1, 3, 4, 4)
    logits = teacher + torch.where(mask, -shift, shift)[:, None]
    outlier_logit = torch.where(mask, 1e4, -1e4)[:, None].float()
    assert loss_fn(logits, outlier_logit, mask, teacher).total.item() == pytest.approx(loss_fn.lower_bound, abs=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        loss_fn(logits, outlier_logit, mask, None)


def test_loss_terms_match_equation() -> None:
    torch.manual_seed(0)
    logits, outlier, teacher = torch.randn(1, 3, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 3, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    terms = DenseHybridLoss(beta=0.5, distillation_weight=2.0, density_anchor=0.1)(logits, outlier, mask, teacher)
    delta, z = (torch.logsumexp(logits, 1) - torch.logsumexp(teacher, 1))[0], outlier[0, 0]
    inl, out = ~mask[0], mask[0]
    expected_head = -F.logsigmoid(-z)[inl].mean() - 0.5 * F.logsigmoid(z)[out].mean()
    expected_likelihood = 0.5 * (delta[out].mean() - delta[inl].mean())
    expected_anchor = delta[out].square().mean() + delta[inl].square().mean()
    kl = (
        F.kl_div(logits.log_softmax(1), teacher.log_softmax(1), log_target=True, reduction="none").sum(1)[0][inl].mean()
    )
    assert torch.allclose(terms.outlier_head, expected_head)
    assert torch.allclose(terms.likelihood, expected_likelihood)
    assert torch.allclose(terms.density_anchor, expected_anchor)
    assert torch.allclose(terms.distillation, kl, atol=1e-6)
    expected_total = expected_head + expected_likelihood + 0.1 * expected_anchor + 2.0 * kl
    assert torch.allclose(terms.total, expected_total, atol=1e-6)
    bare = DenseHybridLoss(beta=0.5, inlier_likelihood=False, distillation_weight=0, density_anchor=0)
    paper = bare(logits, outlier, mask).total  # exactly Eq. 1 without a teacher
    expected_paper = expected_head + 0.5 * torch.logsumexp(logits, 1)[0][out].mean()
    assert torch.allclose(paper, expected_paper) and bare.lower_bound == float("-inf")


@pytest.mark.parametrize("freeze", ["all", "backbone", "none"])
def test_student_equals_teacher_at_the_start_in_train_mode(freeze: str) -> None:
    """The segmenter's BatchNorm (and dropout) layers stay in eval mode in train mode: KL = 0 and Δ = 0 at step 0."""
    torch.manual_seed(0)
    model = DenseHybridADModel(pre_trained=False, freeze=freeze).train()
    images, outlier_mask = pasted_batch()
    output = model(images)
    terms = DenseHybridLoss()(output.class_logits, output.outlier_logit, outlier_mask, output.teacher_logits)
    assert terms.distillation.item() == pytest.approx(0.0, abs=1e-6)
    assert terms.density_anchor.item() == pytest.approx(0.0, abs=1e-8)
    torch.testing.assert_close(output.teacher_logits, output.class_logits)
    trainable_bn = model.segmenter.classifier[2]
    assert trainable_bn.weight.requires_grad and not trainable_bn.training  # affine part trains, statistics fixed
