"""Pre-training step time: synthesis in DataLoader workers vs in the training step (the previous design), same run.

Both modes train the same U-Net (around the offline EfficientNet-Lite0, taps blocks.1/2/4) with the same batches of
normal images and the same DataLoader (``--num-workers`` workers, batch 8); only where the CutPaste / Poisson anomaly is
made differs:

* ``in step``: the workers load plain images; the main process quantises the batch to 8 bits, synthesises every image with
  NumPy / OpenCV and rebuilds the tensors before the forward pass (what ``training_step`` did before);
* ``in workers``: :class:`~anomalib_ext.components.data_synthesis.SyntheticAnomalyDataset` makes the anomaly while the
  previous step computes.

    python benchmarks/msflow_synthesis_speed.py --normal-images <Textures>/gravel/train/good \\
        --poisson-source <Textures>/brick --image-size 256 --steps 12
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomalib_ext.components.data_synthesis import SyntheticAnomalyDataset
from anomalib_ext.components.task_pretraining import (
    NormalImageFolder,
    SyntheticAnomalyGenerator,
    build_segmentation_unet,
    segmentation_loss,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def in_step_synthesis(images: torch.Tensor, generator: SyntheticAnomalyGenerator, rng: np.random.Generator) -> tuple:
    """The previous design: synthesise a loaded batch in the main process."""
    arrays = images.permute(0, 2, 3, 1).numpy()
    outputs, masks = zip(*(generator(np.ascontiguousarray(a), rng) for a in arrays), strict=True)
    return torch.from_numpy(np.stack(outputs)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(masks))


def time_steps(mode: str, generator: SyntheticAnomalyGenerator, args: argparse.Namespace) -> tuple[float, float]:
    """Mean seconds per optimiser step (after ``--warmup`` steps) and, of these, the main process's synthesis seconds."""
    torch.manual_seed(0)
    network = build_segmentation_unet("efficientnet_lite0", pre_trained=True).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    images = NormalImageFolder(args.normal_images, (args.image_size, args.image_size))
    dataset = SyntheticAnomalyDataset(images, generator, seed=0) if mode == "workers" else images
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=args.num_workers, drop_last=True)
    rng = np.random.default_rng(0)
    steps, start, synthesis = 0, 0.0, 0.0
    while steps < args.warmup + args.steps:
        for batch in loader:
            if steps == args.warmup:
                start, synthesis = time.perf_counter(), 0.0
            tick = time.perf_counter()
            anomalous, masks = batch if mode == "workers" else in_step_synthesis(batch, generator, rng)
            synthesis += time.perf_counter() - tick
            loss = segmentation_loss(network, (anomalous - MEAN) / STD, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == args.warmup + args.steps:
                break
    return (time.perf_counter() - start) / args.steps, synthesis / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normal-images", required=True)
    parser.add_argument("--poisson-source", required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(  # noqa: T201
        "| task | in step: s/step (of which synthesis in the training process) | in workers: s/step (of which) | ratio |"
    )
    print("|---|---|---|---|")  # noqa: T201
    for task in ("cutpaste", "poisson"):
        generator = SyntheticAnomalyGenerator(task, source=args.poisson_source if task == "poisson" else None)  # type: ignore[arg-type]
        (step, step_synthesis), (workers, workers_synthesis) = (
            time_steps("step", generator, args),
            time_steps("workers", generator, args),
        )
        print(  # noqa: T201
            f"| {task} | {step:.3f} ({step_synthesis:.3f}) | {workers:.3f} ({workers_synthesis:.3f}) | "
            f"{step / workers:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
