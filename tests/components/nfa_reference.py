"""Straightforward per-node-pixel-set implementation of the tree NFA: the correctness reference.

Written for clarity, not speed: explicit Python sets of pixels per region, dictionaries of children, and the
simplification steps applied node by node exactly as described in the digest (prune; while merge(): prune; prune).
``tests/components/test_nfa.py`` checks that the vectorised component gives identical masks, and
``benchmarks/nfa_speed.py`` times both.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.morphology import max_tree
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.components.nfa import latent_scores, log10_number_of_tests


class ReferenceTree:
    """Component tree as dictionaries: ``parent``, ``children`` and ``pixels`` (a set per node)."""

    def __init__(self, score: np.ndarray, channels: int, clamp: bool) -> None:
        parent_pixel, traversal = max_tree(score, connectivity=1)
        parent_pixel = parent_pixel.ravel()
        flat = score.ravel()
        self.order: list[int] = []  # canonical pixels, parents first
        self.parent: dict[int, int] = {}
        own_pixels: dict[int, set[int]] = {}
        for pixel in traversal.tolist():
            up = int(parent_pixel[pixel])
            if up != pixel and flat[up] == flat[pixel]:
                own_pixels[up].add(pixel)  # same level: joins its canonical pixel's node
                continue
            self.order.append(pixel)
            self.parent[pixel] = up
            own_pixels[pixel] = {pixel}
        self.root = self.order[0]
        self.children: dict[int, list[int]] = {node: [] for node in self.order}
        for node in self.order[1:]:
            self.children[self.parent[node]].append(node)
        self.pixels: dict[int, set[int]] = {}
        for node in reversed(self.order):
            region = set(own_pixels[node])
            for child in self.children[node]:
                region |= self.pixels[child]
            self.pixels[node] = region
        self.log_pfa: dict[int, float] = {}
        for node in self.order:
            t = min(flat[p] for p in self.pixels[node])
            bound = -len(self.pixels[node]) * (channels / 2) * (t - 1 - math.log(t)) / math.log(10)
            self.log_pfa[node] = 0.0 if (clamp and t <= 1) else bound

    def remove(self, node: int) -> None:
        """Delete ``node``; its children are attached to its parent (a removed root hands over to its only child)."""
        kids = self.children.pop(node)
        if node == self.root:
            assert len(kids) == 1
            self.root = kids[0]
            self.parent[kids[0]] = kids[0]
        else:
            up = self.parent[node]
            self.children[up].remove(node)
            for kid in kids:
                self.parent[kid] = up
                self.children[up].append(kid)
        del self.parent[node]

    def leaves(self) -> list[int]:
        return [node for node in self.order if node in self.children and not self.children[node]]

    def branch(self, leaf: int) -> list[int]:
        nodes = [leaf]
        while nodes[-1] != self.root and len(self.children[self.parent[nodes[-1]]]) == 1:
            nodes.append(self.parent[nodes[-1]])
        return nodes

    def prune(self) -> None:
        for leaf in self.leaves():
            nodes = self.branch(leaf)
            keep = nodes[int(np.argmin([self.log_pfa[n] for n in nodes]))]
            for node in nodes:
                if node != keep:
                    self.remove(node)

    def merge(self) -> bool:
        merged = False
        candidates = [n for n in self.order if n in self.children and len(self.children[n]) > 1]
        for node in candidates:
            kids = list(self.children[node])
            if any(self.children[kid] for kid in kids):
                continue
            if self.log_pfa[node] <= min(self.log_pfa[kid] for kid in kids):
                merged = True
                for kid in kids:
                    self.remove(kid)
        return merged

    def log_pfa_map(self, shape: tuple[int, int]) -> np.ndarray:
        self.prune()
        while self.merge():
            self.prune()
        self.prune()
        result = np.zeros(shape[0] * shape[1])
        for leaf in self.leaves():
            result[list(self.pixels[leaf])] = self.log_pfa[leaf]
        return result.reshape(shape)


def reference_segmentation(
    latents: list[torch.Tensor],
    output_size: tuple[int, int],
    log_nfa_threshold: float = 0.0,
    clamp_chernoff: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`anomalib_ext.components.nfa.a_contrario_segmentation`, computed the slow way."""
    per_image = []
    for image_index in range(latents[0].shape[0]):
        scale_maps = []
        for latent in latents:
            score = latent_scores(latent)[image_index]  # the same per-pixel score definition
            tree = ReferenceTree(score, int(latent.shape[1]), clamp_chernoff)
            scale_map = torch.from_numpy(tree.log_pfa_map(score.shape))[None, None]
            scale_maps.append(F.interpolate(scale_map, size=output_size, mode="bilinear", align_corners=False))
        per_image.append(torch.cat(scale_maps, dim=1).amin(dim=1))
    log_pfa = torch.cat(per_image)
    log_nfa = log_pfa + log10_number_of_tests(tuple(int(z.shape[-2] * z.shape[-1]) for z in latents))
    return log_nfa.float(), log_nfa < log_nfa_threshold
