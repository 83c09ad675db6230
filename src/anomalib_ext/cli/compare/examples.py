"""Lightning callback run inside each cell: keeps a few anomalous test images' maps and masks for the map figures."""

from __future__ import annotations

from pathlib import Path


def _lightning_callback_base() -> type:
    from lightning.pytorch.callbacks import Callback

    return Callback


class ExampleCollector(_lightning_callback_base()):  # type: ignore[misc]
    """Keeps the test outputs of anomalous images and saves ``num_examples`` of them (evenly spaced by path).

    The batches are read at the end of the test epoch, after Anomalib's post-processor has normalised them in place,
    so maps are on the model's normalised scale (0.5 = its threshold) and ``pred_mask`` is the evaluated mask.
    """

    MAX_SIDE = 160

    def __init__(self, path: str, num_examples: int = 3) -> None:
        super().__init__()
        self.path = Path(path)
        self.num_examples = num_examples
        self._batches: list = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
        labels = getattr(outputs, "gt_label", None)
        if self.num_examples > 0 and labels is not None and bool(labels.bool().any()):
            self._batches.append(outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, ARG002
        import numpy as np
        import torch
        import torch.nn.functional as F

        examples = []
        for batch in self._batches:
            if batch.anomaly_map is None:
                continue
            for index in torch.nonzero(batch.gt_label.bool()).flatten().tolist():
                examples.append((str(batch.image_path[index]), batch, index))
        self._batches = []
        if not examples or trainer.global_rank != 0:
            return
        examples.sort(key=lambda item: item[0])
        picks = np.unique(np.linspace(0, len(examples) - 1, min(self.num_examples, len(examples))).round().astype(int))

        def resized(tensor: torch.Tensor | None, size: tuple[int, int], mode: str) -> np.ndarray | None:
            if tensor is None:
                return None
            tensor = tensor.detach().float().cpu().reshape(1, 1, *tensor.shape[-2:])
            return F.interpolate(tensor, size=size, mode=mode)[0, 0].numpy()

        arrays: dict[str, list] = {
            "image_path": [],
            "anomaly_map": [],
            "gt_mask": [],
            "pred_mask": [],
            "pred_score": [],
        }
        for pick in picks:
            path, batch, index = examples[pick]
            height, width = batch.anomaly_map.shape[-2:]
            scale = min(1.0, self.MAX_SIDE / max(height, width))
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            arrays["image_path"].append(path)
            arrays["anomaly_map"].append(resized(batch.anomaly_map[index], size, "bilinear").astype(np.float16))
            gt = None if batch.gt_mask is None else resized(batch.gt_mask[index], size, "nearest")
            arrays["gt_mask"].append(np.zeros(size, bool) if gt is None else gt > 0.5)
            pred = None if batch.pred_mask is None else resized(batch.pred_mask[index], size, "nearest")
            arrays["pred_mask"].append(np.zeros(size, bool) if pred is None else pred > 0.5)
            score = None if batch.pred_score is None else batch.pred_score.reshape(-1)[index]
            arrays["pred_score"].append(float("nan") if score is None else float(score))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            self.path,
            image_path=np.array(arrays["image_path"]),
            anomaly_map=np.stack(arrays["anomaly_map"]),
            gt_mask=np.stack(arrays["gt_mask"]),
            pred_mask=np.stack(arrays["pred_mask"]),
            has_pred_mask=np.array(examples[0][1].pred_mask is not None),
            pred_score=np.array(arrays["pred_score"], dtype=np.float32),
        )
