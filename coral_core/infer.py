"""Inference: segment a volume slice by slice, and embed each slice.

Slices are normalised and resampled to the model's input size on the CPU, then moved to
the device one batch at a time, so the device never holds the whole volume. Logits are
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


def _batches(model: UNet, array: np.ndarray, batch_size: int):
    if array.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {array.shape}")
    slices = resize_slices(array, model.config.image_size)  # (S, 1, size, size) on the CPU
    for start in range(0, slices.shape[0], batch_size):
        yield slices[start : start + batch_size]


def iter_segment_volume(model: UNet, volume: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16):
    """Segment batch by batch, yielding ``(slices done, labels)``; ``labels`` (uint8, the
    volume's shape) is complete after the last yield."""
    device = torch.device(device)
    model = model.to(device).eval()
    out = np.zeros(volume.shape, dtype=np.uint8)
    done = 0
    with torch.inference_mode(), mixed_precision(device):
        for batch in _batches(model, volume, batch_size):
            logits = model(batch.to(device, non_blocking=True))
            logits = F.interpolate(logits.float(), size=volume.shape[1:], mode="bilinear", align_corners=False)
            out[done : done + batch.shape[0]] = logits.argmax(1).to(torch.uint8).cpu().numpy()
            done += batch.shape[0]
            yield done, out


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
    rows = []
    with torch.inference_mode(), mixed_precision(device):
        for batch in _batches(model, volume, batch_size):
            rows.append(model.embed(batch.to(device, non_blocking=True)).float().cpu())
    return torch.cat(rows).numpy()
