"""MSFlow flow parameter counts at wide_resnet50_2 shapes: this implementation beside the original's published design.

Channels 256 / 512 / 1024 (wide_resnet50_2 layer1..3), 2 / 5 / 8 AllInOne blocks, 64 positional channels; random weights,
no backbone and no download (the flows do not depend on the input size). Trainable parameters are counted. The original's counts are computed from its
architecture (cool-xuan/msflow): parallel flows of AllInOne blocks whose subnet is conv3x3 (in -> in) -> LayerNorm ->
ReLU -> conv3x3 (in -> out), and a fusion coupling with two subnets, each conv3x3 (C -> C/4) -> LayerNorm -> ReLU ->
conv3x3 (C/4 -> C) on the pooled conditioning halves (C channels in all) plus per-scale conv3x3 c_i -> c_i for s and t.

    python benchmarks/msflow_parameters.py
"""

from __future__ import annotations

from anomalib_ext.models.msflow.torch_model import (
    DEFAULT_FLOW_BLOCKS,
    DEFAULT_POSITIONAL_CHANNELS,
    FusionFlow,
    parallel_flow,
)

CHANNELS = (256, 512, 1024)


def conv3x3(inputs: int, outputs: int) -> int:
    return 9 * inputs * outputs + outputs


def original_parallel(channels: int, blocks: int, condition: int = DEFAULT_POSITIONAL_CHANNELS) -> int:
    """AllInOne block: subnet on the (c - c//2) + condition channels -> 2 (c//2); global scale and offset per channel."""
    inputs, outputs = channels - channels // 2 + condition, 2 * (channels // 2)
    subnet = conv3x3(inputs, inputs) + 2 * inputs + conv3x3(inputs, outputs)
    return blocks * (subnet + 2 * channels)


def original_fusion(channels: tuple[int, ...]) -> int:
    halves = [c // 2 for c in channels]
    total = sum(halves)
    mix = conv3x3(total, total // 4) + 2 * (total // 4) + conv3x3(total // 4, total)
    return 2 * (mix + 2 * sum(conv3x3(c, c) for c in halves))


def count(module: object) -> int:
    """Trainable parameters (FrEIA's AllInOne blocks also hold their fixed c x c permutation as a frozen Parameter)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)  # type: ignore[attr-defined]


def main() -> None:
    ours_parallel = [
        count(parallel_flow(c, n, DEFAULT_POSITIONAL_CHANNELS, 1.9))
        for c, n in zip(CHANNELS, DEFAULT_FLOW_BLOCKS, strict=True)
    ]
    theirs_parallel = [original_parallel(c, n) for c, n in zip(CHANNELS, DEFAULT_FLOW_BLOCKS, strict=True)]
    ours_fusion, theirs_fusion = count(FusionFlow(list(CHANNELS))), original_fusion(CHANNELS)
    print("| flow | this implementation | original (from its architecture) | ratio |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    rows = [
        (f"parallel, {c} ch, {n} blocks", o, t)
        for (c, n), o, t in zip(
            zip(CHANNELS, DEFAULT_FLOW_BLOCKS, strict=True), ours_parallel, theirs_parallel, strict=True
        )
    ]
    rows += [("fusion", ours_fusion, theirs_fusion)]
    rows += [("total", sum(ours_parallel) + ours_fusion, sum(theirs_parallel) + theirs_fusion)]
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:,} | {theirs:,} | {ours / theirs:.4f} |")  # noqa: T201


if __name__ == "__main__":
    main()
