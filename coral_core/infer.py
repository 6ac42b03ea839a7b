"""Inference: segment a volume slice by slice, and embed each slice.

Slices are normalised and resampled to the model's input size on the CPU, then moved to
the device one batch at a time, so the device never holds the whole volume (a volume of any
length is processed in chunks), and a batch that runs out of device memory is split in two. Logits are
resampled back to the slice's own size before the arg-max, so labels have the input's exact
shape.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from coral_core.data import resize_slices
from coral_core.device import mixed_precision
from coral_core.model import UNet

__all__ = ["segment_volume", "iter_segment_volume", "embed_volume"]


def _run_in_batches(model: UNet, volume: np.ndarray, device: torch.device, batch_size: int, fn):
    """Resample the slices on the CPU, then apply ``fn`` to device batches of them, in order.

    Yields ``(start, stop, fn(batch))``. Only one batch is on the device at a time, so any
    number of slices fits; if the device runs out of memory the batch halves and the same
    slices are tried again.
    """
    from coral_core.training import is_out_of_memory

    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    slices = resize_slices(volume, model.config.image_size)  # (S, 1, size, size) on the CPU
    start, size = 0, max(1, batch_size)
    while start < slices.shape[0]:
        stop = min(start + size, slices.shape[0])
        try:
            out = fn(slices[start:stop].to(device, non_blocking=True))
        except Exception as exc:
            if not is_out_of_memory(exc) or size == 1:
                raise
            size //= 2
            out = None
        if out is None:  # outside the except block, so the failed batch's memory can go
            _empty_cache(device)
            continue
        yield start, stop, out
        start = stop


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def iter_segment_volume(model: UNet, volume: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16):
    """Segment batch by batch, yielding ``(slices done, labels)``; ``labels`` (uint8, the
    volume's shape) is complete after the last yield."""
    device = torch.device(device)
    model = model.to(device).eval()
    out = np.zeros(volume.shape, dtype=np.uint8)

    def labels_of(batch: torch.Tensor) -> np.ndarray:
        logits = model(batch)
        logits = F.interpolate(logits.float(), size=volume.shape[1:], mode="bilinear", align_corners=False)
        return logits.argmax(1).to(torch.uint8).cpu().numpy()

    with torch.inference_mode(), mixed_precision(device):
        for start, stop, labels in _run_in_batches(model, volume, device, batch_size, labels_of):
            out[start:stop] = labels
            yield stop, out


def segment_volume(
    model: UNet, volume: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16, progress=None
) -> np.ndarray:
    """Label every slice of a (z, y, x) volume; returns uint8 labels of the same shape.

    ``progress``, if given, is called with (slices done, total).
    """
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for done, labels in iter_segment_volume(model, volume, device, batch_size):
        if progress is not None:
            progress(done, volume.shape[0])
    return labels


def embed_volume(model: UNet, volume: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 32) -> np.ndarray:
    """(S, embedding_dim) float32 projection-head features, one row per slice."""
    device = torch.device(device)
    model = model.to(device).eval()
    with torch.inference_mode(), mixed_precision(device):
        rows = [r for _, _, r in _run_in_batches(model, volume, device, batch_size, lambda b: model.embed(b).float().cpu())]
    return torch.cat(rows).numpy()
