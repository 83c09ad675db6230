"""A-contrario anomaly segmentation with the Number of False Alarms (NFA) over a max-tree of regions.

Reusable by any model whose latent variables are white Gaussian noise under the null hypothesis H0 (normal data),
e.g. the latents of a normalizing flow. Implements phase 4 of U-Flow (Tailanian et al., 2024, Sec. 3.4):

* Per scale ``l`` with ``C_l`` channels, the score ``S_l(x) = ||z_l(x)||^2 / C_l`` (summed in float64). Candidate
  regions are the 4-connected components of all upper level sets ``{S_l >= lambda}``: the nodes of the max-tree of
  ``S_l`` (``skimage.morphology.max_tree``; equal-valued pixels share one node). Maps smaller than 3 pixels in a
  dimension are padded with a level below every score (the padding joins only the root, whose PFA is set to 1).
* Under H0 ``||z_l(x)||^2 ~ s_l * chi2(nu_l)`` independently per pixel (the paper: ``s_l = 1``, ``nu_l = C_l``; a
  calibrated null, :func:`moment_matched_null`, fits ``s_l, nu_l`` on held-out normal latents), so a region ``R``
  whose minimum is ``m_R`` has ``PFA(R) = P(s chi2_nu >= m_R)^|R|``, bounded with Chernoff (``t = m_R / (s nu)``)::

      log10 PFA(R) = -|R| * (nu / 2) * (t - 1 - ln t) / ln 10     for t > 1,   0 otherwise.

  The bound is vacuous for ``t <= 1``; ``clamp_chernoff=False`` keeps the unclamped published behaviour, which
  flags whole images whose latents are slightly under-dispersed. ``tail="exact"`` replaces the bound by the exact
  tail ``log10 P(chi2_nu >= nu t)`` (scipy's log survival function; the Chernoff value where that underflows), which
  is never larger, so the same regions get a smaller PFA under the same null; regions with ``t <= 1`` keep PFA 1.
* Tree simplification to a fixed point: prune (every leaf branch, the leaf plus its ancestors while each is its
  parent's only child, keeps only its node of smallest log PFA), then repeat {merge; prune} while a merge happens
  (a node whose >= 2 children are all leaves replaces them when its log PFA is <= each child's), then a final
  prune. The leaves left are the detections; their pixels get the leaf's log PFA, all other pixels 0.
* Scales are merged (eq. 8) by bilinear upsampling of each log PFA map and a per-pixel minimum, and
  ``log10 NFA = log10 N_tests + log10 PFA`` with the fixed-polyomino count of eq. 9
  ``N_tests = sum_l N_l * sum_{n=1..N_l} alpha * beta^n / n`` (computed in log space, cached per latent shape), over
  the scales selected for the test only (``scales``; default all, as the paper).

Detections are the pixels where ``log10 NFA < log_nfa_threshold`` (default 0: NFA < 1, i.e. on average at most one
false region per anomaly-free image).

Implementation: the tree work is vectorised with numpy over parent arrays in topological order (node ids follow the
max-tree traversal, so every parent id is smaller than its children's); no per-node pixel sets are built. The
max-tree itself is scikit-image's; it runs in numpy/Cython on CPU and is therefore not part of any exported graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import stats
from skimage.morphology import max_tree
from torch.nn import functional as F  # noqa: N812

POLYOMINO_ALPHA = 0.316915
POLYOMINO_BETA = 4.062570

__all__ = [
    "NFA_TAILS",
    "ComponentTree",
    "a_contrario_segmentation",
    "build_component_tree",
    "chernoff_log10_pfa",
    "detection_leaves",
    "exact_log10_pfa",
    "latent_scores",
    "log10_number_of_tests",
    "moment_matched_null",
    "region_log10_pfa_map",
    "select_scales",
]


@lru_cache(maxsize=64)
def log10_number_of_tests(region_sizes: tuple[int, ...]) -> float:
    """``log10 N_tests`` of eq. 9 for scales with ``N_l = H_l * W_l`` pixels (log-space sums, cached).

    Sanity values: ``(784, 196) -> 476.92`` and ``(196,) -> 118.95``.
    """
    if not region_sizes or any(size < 1 for size in region_sizes):
        msg = f"region_sizes must be positive pixel counts, got {region_sizes}."
        raise ValueError(msg)
    per_scale = []
    for size in region_sizes:
        n = np.arange(1, size + 1, dtype=np.float64)
        log_terms = math.log(POLYOMINO_ALPHA) + n * math.log(POLYOMINO_BETA) - np.log(n)
        per_scale.append(math.log(size) + float(np.logaddexp.reduce(log_terms)))
    return float(np.logaddexp.reduce(np.asarray(per_scale))) / math.log(10.0)


def moment_matched_null(mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Satterthwaite's scaled chi-square ``s * chi2_nu`` with the given mean and variance of ``||z||^2``.

    ``E = s nu`` and ``Var = 2 s^2 nu`` give ``s = Var / (2 E)`` and ``nu = 2 E^2 / Var``; white ``N(0, 1)`` latents
    with ``C`` channels give back ``s = 1``, ``nu = C``.
    """
    mean, variance = mean.double(), variance.double().clamp(min=torch.finfo(torch.float64).tiny)
    return variance / (2 * mean), 2 * mean.square() / variance


def chernoff_log10_pfa(level: np.ndarray, area: np.ndarray, channels: float, clamp: bool = True) -> np.ndarray:
    """Chernoff bound of ``log10 P(chi2_nu >= nu * t)^area`` for regions with normalised minimum ``t = level``.

    ``channels`` is the number of degrees of freedom ``nu`` of the null (``C`` for the paper's ``chi2_C``).

    With ``clamp`` (default) the bound is 0 for ``t <= 1`` where it is vacuous; without it, the formula is used for
    every ``t`` (published reference behaviour).
    """
    t = np.maximum(np.asarray(level, dtype=np.float64), np.finfo(np.float64).tiny)
    log_pfa = -np.asarray(area, dtype=np.float64) * (channels / 2.0) * (t - 1.0 - np.log(t)) / math.log(10.0)
    if clamp:
        log_pfa = np.where(t > 1.0, log_pfa, 0.0)
    return log_pfa


def exact_log10_pfa(level: np.ndarray, area: np.ndarray, channels: float, clamp: bool = True) -> np.ndarray:
    """``log10 P(chi2_nu >= nu * t)^area`` computed exactly (``channels`` = ``nu``, ``level`` = ``t``).

    Never above :func:`chernoff_log10_pfa`; where the exact tail underflows (``log P < -745``) the Chernoff bound is
    used. ``clamp`` (default): 0 for ``t <= 1``, as for the bound.
    """
    t = np.maximum(np.asarray(level, dtype=np.float64), np.finfo(np.float64).tiny)
    area = np.asarray(area, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_tail = stats.chi2.logsf(t * channels, channels)
    bound = chernoff_log10_pfa(t, area, channels, clamp=False)
    log_pfa = np.where(np.isfinite(log_tail), area * log_tail / math.log(10.0), bound)
    if clamp:
        log_pfa = np.where(t > 1.0, log_pfa, 0.0)
    return log_pfa


NFA_TAILS = {"chernoff": chernoff_log10_pfa, "exact": exact_log10_pfa}


@dataclass(frozen=True)
class ComponentTree:
    """Max-tree of a 2-D score map with nodes numbered in topological order (parent id < child id, root = 0).

    Attributes:
        parent: ``[K]`` parent node of each node (the root is its own parent).
        level: ``[K]`` score of the node = minimum of the score over its region.
        area: ``[K]`` number of pixels of the node's region (the node and all its descendants).
        pixel_node: ``[H*W]`` node owning each pixel (the smallest region containing it at its own level).
    """

    parent: np.ndarray
    level: np.ndarray
    area: np.ndarray
    pixel_node: np.ndarray


def build_component_tree(score: np.ndarray) -> ComponentTree:
    """Build the max-tree (4-connectivity) of ``score`` ``[H, W]`` with equal-level pixels merged into one node."""
    parent_pixel, traversal = max_tree(score, connectivity=1)
    parent_pixel = parent_pixel.ravel()
    flat = score.ravel()
    pixels = np.arange(flat.size)
    canonical = (parent_pixel == pixels) | (flat[parent_pixel] != flat)
    canonical_pixels = traversal[canonical[traversal]]  # topological: the root first, parents before children
    node_of_canonical = np.empty(flat.size, dtype=np.int64)
    node_of_canonical[canonical_pixels] = np.arange(canonical_pixels.size)
    # a non-canonical pixel points to the canonical pixel of its own level component
    pixel_node = node_of_canonical[np.where(canonical, pixels, parent_pixel)]
    parent = node_of_canonical[parent_pixel[canonical_pixels]]
    parent[0] = 0
    area = np.bincount(pixel_node, minlength=canonical_pixels.size)
    _accumulate_to_ancestors(parent, area)
    return ComponentTree(parent=parent, level=flat[canonical_pixels], area=area, pixel_node=pixel_node)


def _accumulate_to_ancestors(parent: np.ndarray, values: np.ndarray) -> None:
    """In place: ``values[n] += sum of values over n's descendants`` (children have larger ids than parents)."""
    parent_list = parent.tolist()
    totals = values.tolist()
    for node in range(len(parent_list) - 1, 0, -1):
        totals[parent_list[node]] += totals[node]
    values[:] = totals


def _pointer_jump(pointer: np.ndarray) -> np.ndarray:
    """Follow ``pointer`` to its fixed point for every node (path doubling: O(K log depth))."""
    while True:
        jumped = pointer[pointer]
        if np.array_equal(jumped, pointer):
            return pointer
        pointer = jumped


class _SimplifiedTree:
    """Mutable state of PFA-prune / PFA-merge over a component tree (nodes are removed by clearing ``alive``)."""

    def __init__(self, parent: np.ndarray, log_pfa: np.ndarray) -> None:
        self.parent = parent.copy()
        self.log_pfa = log_pfa
        self.ids = np.arange(parent.size)
        self.alive = np.ones(parent.size, dtype=bool)

    def _children_count(self) -> tuple[np.ndarray, np.ndarray]:
        non_root = self.alive & (self.parent != self.ids)
        return non_root, np.bincount(self.parent[non_root], minlength=self.parent.size)

    def leaves(self) -> np.ndarray:
        _, n_children = self._children_count()
        return self.alive & (n_children == 0)

    def prune(self) -> None:
        """Collapse every leaf branch onto its node of smallest log PFA (ties: the deepest node, as argmin from the leaf)."""
        non_root, n_children = self._children_count()
        joins_parent = non_root & (n_children[self.parent] == 1)
        chain_top = _pointer_jump(np.where(joins_parent, self.parent, self.ids))
        leaf = self.alive & (n_children == 0)
        is_branch_top = np.zeros(self.parent.size, dtype=bool)
        is_branch_top[chain_top[leaf]] = True
        members = np.flatnonzero(self.alive & is_branch_top[chain_top])
        order = np.lexsort((-members, self.log_pfa[members], chain_top[members]))
        members = members[order]
        tops = chain_top[members]
        first = np.ones(members.size, dtype=bool)
        first[1:] = tops[1:] != tops[:-1]
        chosen, chosen_top = members[first], tops[first]
        top_parent = self.parent[chosen_top]
        self.alive[members] = False
        self.alive[chosen] = True
        self.parent[chosen] = np.where(top_parent == chosen_top, chosen, top_parent)

    def merge(self) -> bool:
        """Replace the leaf children of every node whose children are all leaves (>= 2) and no more significant."""
        non_root, n_children = self._children_count()
        leaf = self.alive & (n_children == 0)
        leaf_child = non_root & leaf
        n_inner_children = np.bincount(self.parent[non_root & ~leaf], minlength=self.parent.size)
        min_child_log_pfa = np.full(self.parent.size, np.inf)
        np.minimum.at(min_child_log_pfa, self.parent[leaf_child], self.log_pfa[leaf_child])
        merging = self.alive & (n_children >= 2) & (n_inner_children == 0) & (self.log_pfa <= min_child_log_pfa)
        if not merging.any():
            return False
        self.alive[leaf_child & merging[self.parent]] = False
        return True


def detection_leaves(parent: np.ndarray, log_pfa: np.ndarray) -> np.ndarray:
    """Boolean ``[K]`` mask of the regions kept by PFA-prune / PFA-merge run to a fixed point.

    Order (as in the reference): prune; while merge(): prune; final prune.
    """
    tree = _SimplifiedTree(parent, log_pfa)
    tree.prune()
    while tree.merge():
        tree.prune()
    tree.prune()
    return tree.leaves()


MIN_MAP_SIDE = 3


def region_log10_pfa_map(
    score: np.ndarray, channels: float, clamp_chernoff: bool = True, tail: str = "chernoff"
) -> np.ndarray:
    """Per-pixel ``log10 PFA`` ``[H, W]`` of the detected regions of one score map (0 outside detections).

    ``score`` is the normalised level ``t`` (``||z||^2 / (s nu)``) and ``channels`` the null's ``nu``; ``tail``: the
    region PFA from the Chernoff bound (paper) or the exact chi-square tail (see :data:`NFA_TAILS`). Sides shorter
    than 3 pixels (where scikit-image's max-tree fails or is wrong) are padded with a level below every score, so
    the padding only forms a new root, whose PFA is set to 1.
    """
    height, width = score.shape
    padded = height < MIN_MAP_SIDE or width < MIN_MAP_SIDE
    if padded:
        pad = ((0, max(0, MIN_MAP_SIDE - height)), (0, max(0, MIN_MAP_SIDE - width)))
        score = np.pad(score, pad, constant_values=float(score.min()) - 1.0)
    tree = build_component_tree(score)
    log_pfa = NFA_TAILS[tail](tree.level, tree.area, channels, clamp=clamp_chernoff)
    if padded:
        log_pfa[0] = 0.0  # the root made of the padding is not a region of the map
    kept = detection_leaves(tree.parent, log_pfa)
    ids = np.arange(kept.size)
    owner = _pointer_jump(np.where(kept | (tree.parent == ids), ids, tree.parent))
    node_log_pfa = np.where(kept[owner], log_pfa[owner], 0.0)
    return node_log_pfa[tree.pixel_node].reshape(score.shape)[:height, :width]


def latent_scores(latent: torch.Tensor) -> np.ndarray:
    """``S(x) = ||z(x)||^2 / C`` for latents ``[B, C, H, W]`` as float64 numpy ``[B, H, W]`` (squared in float64)."""
    return latent.detach().to(dtype=torch.float64).square().mean(dim=1).cpu().numpy()


def _validate_latents(latents: Sequence[torch.Tensor]) -> None:
    if isinstance(latents, torch.Tensor) or len(latents) == 0:
        msg = "latents must be a non-empty list of per-scale tensors [B, C_l, H_l, W_l]."
        raise ValueError(msg)
    for index, latent in enumerate(latents):
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or min(latent.shape) < 1:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            msg = f"latents[{index}] must be a non-empty tensor [B, C, H, W], got {shape}."
            raise ValueError(msg)
    if len({latent.shape[0] for latent in latents}) != 1:
        shapes = [tuple(latent.shape) for latent in latents]
        msg = f"All scales must have the same batch size, got shapes {shapes}."
        raise ValueError(msg)


def _checked_scores(latent: torch.Tensor, index: int) -> np.ndarray:
    scores = latent_scores(latent)
    if not np.isfinite(scores).all():  # NaN and inf propagate into the per-pixel sum of squares
        msg = f"latents[{index}] contains NaN or infinite values (or values too large to square); the NFA test needs finite latents."
        raise ValueError(msg)
    return scores


def select_scales(count: int, scales: Sequence[int] | None) -> list[int]:
    """Sorted distinct indices (negative ones allowed) into ``count`` scales; ``None``: all."""
    if scales is None:
        return list(range(count))
    selected = sorted({int(index) % count for index in scales if -count <= int(index) < count})
    if not selected or len(selected) != len(set(scales)):
        msg = f"scales must be distinct indices into the {count} latent scales, got {list(scales)}."
        raise ValueError(msg)
    return selected


def a_contrario_segmentation(
    latents: Sequence[torch.Tensor],
    output_size: tuple[int, int] | int,
    log_nfa_threshold: float = 0.0,
    clamp_chernoff: bool = True,
    null: Sequence[tuple[float, float]] | None = None,
    scales: Sequence[int] | None = None,
    tail: str = "chernoff",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment anomalies in per-scale latents with the tree NFA test (Tailanian et al., 2024, eqs. 5-9).

    Args:
        latents: per-scale latents ``[B, C_l, H_l, W_l]`` (white Gaussian under H0), any order.
        output_size: ``(H, W)`` of the returned maps (or one int for a square).
        log_nfa_threshold: detection threshold on ``log10 NFA`` (``mask = log10 NFA < threshold``; 0 means NFA < 1).
        clamp_chernoff: PFA 1 for regions whose minimum is below the null mean (t <= 1), for either tail.
        null: per scale (same order as ``latents``) the ``(s_l, nu_l)`` of the null ``||z_l||^2 ~ s_l chi2(nu_l)``;
            ``s_l`` a number or a per-position array ``[H_l, W_l]``; ``None``: the paper's ``chi2(C_l)``.
        scales: indices of the scales that enter the test (and ``N_tests``); ``None``: all.
        tail: ``"chernoff"`` (the paper's bound of ``P(chi2_nu >= m)``) or ``"exact"`` (the exact tail; same null,
            never a larger PFA).

    Returns:
        ``log10 NFA`` maps ``[B, H, W]`` (float32, on the latents' device) and boolean masks ``[B, H, W]``.

    Raises:
        ValueError: empty input, a latent that is not 4-D, NaN/inf values, scales with different batch sizes, a
            ``null`` of the wrong length or with non-positive parameters, bad ``scales`` or an unknown ``tail``.
    """
    _validate_latents(latents)
    if tail not in NFA_TAILS:
        msg = f"tail must be one of {tuple(NFA_TAILS)}, got {tail!r}."
        raise ValueError(msg)
    if null is not None and (
        len(null) != len(latents) or not all(np.all(np.asarray(s) > 0) and nu > 0 for s, nu in null)
    ):
        msg = f"null must give a positive (scale, dof) per latent scale ({len(latents)}), got {null}."
        raise ValueError(msg)
    selected = select_scales(len(latents), scales)
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(int(s) for s in output_size)
    device = latents[0].device
    scale_maps = []
    for index in selected:
        latent = latents[index]
        channels = int(latent.shape[1])
        scale, dof = (1.0, float(channels)) if null is None else (np.asarray(null[index][0]), float(null[index][1]))
        levels = _checked_scores(latent, index) * (channels / (scale * dof))  # t = ||z||^2 / (s nu)
        maps = np.stack([region_log10_pfa_map(level, dof, clamp_chernoff, tail) for level in levels])
        scale_maps.append(
            F.interpolate(torch.from_numpy(maps)[:, None], size=size, mode="bilinear", align_corners=False)
        )
    log_pfa = torch.cat(scale_maps, dim=1).amin(dim=1)
    log_n_tests = log10_number_of_tests(tuple(int(latents[i].shape[-2] * latents[i].shape[-1]) for i in selected))
    log_nfa = log_pfa + log_n_tests
    mask = log_nfa < log_nfa_threshold
    return log_nfa.to(device=device, dtype=torch.float32), mask.to(device)
