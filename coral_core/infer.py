"""Inference: segment a volume slice by slice, and embed each slice.

On a CUDA GPU with room for it, the volume moves to the device once and is normalised and
resampled there: on the host, NumPy's percentiles and the resampling of a 200-slice 512 x 512
volume take longer than segmenting it on an H100. Otherwise (the CPU, or a volume too large
for the GPU's free memory) slices are normalised and resampled on the CPU and moved to the
device one batch at a time, so the device never holds the whole volume. Either way a batch
that runs out of device memory is split in two, and logits are resampled back to the slice's
own size before the arg-max, so labels have the input's exact shape.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from coral_core.data import field_of_view, resample_slices, resize_slices
from coral_core.device import mixed_precision
from coral_core.levers import Levers, apply_layout, apply_levers, fits_on_device, for_inference
from coral_core.model import UNet
from coral_core.volume import as_float32, normalise_intensity_tensor

__all__ = ["segment_volume", "iter_segment_volume", "iter_segment_series", "embed_volume", "preprocess_on_device",
           "keep_largest_components"]


# Dtypes moved to the GPU as they are (fewer bytes to copy) and converted to float32 there.
_DEVICE_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.float16, np.float32)
# Device memory the on-device path needs, in units of the volume's float32 size: the volume,
# the sort of its values for the percentiles (values and int64 indices) and the normalised copy.
_DEVICE_COPIES = 6


def preprocess_on_device(volume: np.ndarray, device: torch.device) -> bool:
    """Whether to normalise and resample ``volume`` on ``device``: on a CUDA GPU whose free
    memory holds the work with half to spare."""
    return device.type == "cuda" and fits_on_device(_DEVICE_COPIES * 4 * volume.size, device, fraction=0.5)


def _device_volume(volume: np.ndarray, device: torch.device) -> torch.Tensor:
    """(S, 1, H, W) normalised float32 slices of the whole volume, on ``device``."""
    array = volume if volume.dtype in _DEVICE_DTYPES else as_float32(volume)
    x = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return normalise_intensity_tensor(x).unsqueeze(1)


def _run_in_batches(model: UNet, volume: np.ndarray, device: torch.device, batch_size: int, fn,
                    on_device: bool | None = None):
    """Normalise and resample the slices (on the device or the CPU, see the module's text),
    then apply ``fn`` to device batches of them, in order.

    Yields ``(start, stop, fn(batch))``. ``on_device`` None decides by
    :func:`preprocess_on_device`. If the device runs out of memory the batch halves and the
    same slices are tried again.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    size_px = model.config.image_size
    if on_device is None:
        on_device = preprocess_on_device(volume, device)
    if on_device:
        slices = _device_volume(volume, device)  # resampled batch by batch below

        def batch_of(lo, hi):
            return resample_slices(slices[lo:hi], size_px)
    else:
        slices = resize_slices(volume, size_px)  # (S, 1, size, size) on the CPU

        def batch_of(lo, hi):
            return slices[lo:hi].to(device, non_blocking=True)

    yield from _halving_batches(slices.shape[0], batch_size, lambda lo, hi: fn(batch_of(lo, hi)), device)


def _halving_batches(n: int, batch_size: int, fn, device: torch.device):
    """``(start, stop, fn(start, stop))`` for consecutive batches of ``n`` slices, in order; a batch that
    runs out of device memory halves and the same slices are tried again (down to one slice)."""
    from coral_core.training import is_out_of_memory

    start, size = 0, max(1, batch_size)
    while start < n:
        stop = min(start + size, n)
        try:
            out = fn(start, stop)
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


def iter_segment_volume(model: UNet, volume: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16,
                        on_device: bool | None = None, levers: Levers | None = None, spacing=None):
    """Segment batch by batch, yielding ``(slices done, labels)``; ``labels`` (uint8, the
    volume's shape) is complete after the last yield (before it, with the volume on the GPU,
    it may still be zeros: the labels stay on the device until the last batch). ``on_device``: where to normalise and
    resample (None: on a CUDA GPU when it has room, see :func:`preprocess_on_device`);
    ``levers``: channels_last, ``torch.compile`` and BatchNorm folding (the model is converted in
    place, or a folded copy of it is); ``spacing``: the volume's (z, y, x) or (y, x) spacing in mm, which
    a model with a physical scale needs (:class:`coral_core.data.FieldOfView`: a slice larger than the
    square it sees is segmented in overlapping windows, :func:`_iter_segment_tiles`)."""
    fov = field_of_view(model.config, volume.shape, spacing)
    if fov is not None and not fov.whole:
        if fov.covers:  # a slice no larger than the square: padded to it, one window
            labels = np.zeros(volume.shape, dtype=np.uint8)
            for done, window in iter_segment_volume(model, fov.crop(volume), device, batch_size, on_device, levers):
                if done == volume.shape[0]:
                    labels = fov.paste(window)
                yield done, labels
        else:
            yield from _iter_segment_tiles(model, volume, fov, device, batch_size, levers)
        return
    device = torch.device(device)
    model = model.to(device).eval()
    net = apply_levers(for_inference(model, levers, device), levers)
    out = np.zeros(volume.shape, dtype=np.uint8)
    if on_device is None:
        on_device = preprocess_on_device(volume, device)
    # With the volume on the GPU the labels stay there too and come back in one copy at the end: a
    # copy per batch would make the host wait for each batch before launching the next.
    out_dev = torch.empty(volume.shape, dtype=torch.uint8, device=device) if on_device else None

    def labels_of(batch: torch.Tensor) -> torch.Tensor:
        logits = net(batch)
        logits = F.interpolate(logits.float(), size=volume.shape[1:], mode="bilinear", align_corners=False)
        return logits.argmax(1).to(torch.uint8)

    with torch.inference_mode(), mixed_precision(device, _bf16(device, levers)):
        for start, stop, labels in _run_in_batches(model, volume, device, batch_size, labels_of, on_device):
            if out_dev is None:
                out[start:stop] = labels.cpu().numpy()
            else:
                out_dev[start:stop] = labels
                if stop == volume.shape[0]:
                    out[:] = out_dev.cpu().numpy()
            yield stop, out


# The Gaussian that weights a window's class probabilities: its standard deviation as a fraction of the side.
TILE_SIGMA = 0.125


def _tile_weight(window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(h, w) weights of a window's class probabilities where windows overlap: a Gaussian of TILE_SIGMA of
    the side, so each pixel is decided mostly by the window it lies nearest the centre of (a model sees
    least context at a window's edges), never quite zero."""
    axes = []
    for n in window:
        t = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (t / max(n * TILE_SIGMA, 1.0)) ** 2))
    return (axes[0][:, None] * axes[1][None, :]).clamp_min(1e-3)


def _iter_segment_tiles(model: UNet, volume: np.ndarray, fov, device, batch_size: int, levers: Levers | None):
    """:func:`iter_segment_volume` for a model with a physical scale on slices larger than the square it
    sees: every window of :meth:`coral_core.data.FieldOfView.tiles` is resized to the model's input and
    segmented, its class probabilities resampled back and summed where windows overlap, weighted by
    :func:`_tile_weight`. Intensities are scaled by the central window's percentiles over the volume, the
    square a model trained on such scans saw (on the CPU; each window is resized on the device). Runs batches
    of slices through every window in turn; a batch that runs out of device memory is split in two."""
    from coral_core.volume import intensity_bounds, normalise_intensity

    device = torch.device(device)
    model = model.to(device).eval()
    net = apply_levers(for_inference(model, levers, device), levers)
    size_px = model.config.image_size
    scaled = normalise_intensity(volume, bounds=intensity_bounds(fov.crop(volume)))
    tiles = fov.tiles()
    weight = _tile_weight(fov.window, device)
    out = np.zeros(volume.shape, dtype=np.uint8)

    def labels_of(batch: np.ndarray) -> np.ndarray:
        total = None
        for tile in tiles:
            x = resample_slices(torch.from_numpy(tile.crop(batch, fill=0.0)).unsqueeze(1).to(device), size_px)
            logits = F.interpolate(net(x).float(), size=tile.window, mode="bilinear", align_corners=False)
            probs = logits.softmax(1) * weight
            if total is None:
                total = torch.zeros((batch.shape[0], probs.shape[1], *volume.shape[1:]), device=device)
            (ys, yw, yn), (xs, xw, xn) = tile.spans()
            total[..., ys : ys + yn, xs : xs + xn] += probs[..., yw : yw + yn, xw : xw + xn]
        return total.argmax(1).to(torch.uint8).cpu().numpy()

    with torch.inference_mode(), mixed_precision(device, _bf16(device, levers)):
        for start, stop, labels in _halving_batches(volume.shape[0], batch_size,
                                                    lambda lo, hi: labels_of(scaled[lo:hi]), device):
            out[start:stop] = labels
            yield stop, out


def iter_segment_series(model: UNet, frames, device: torch.device | str = "cpu", batch_size: int = 16,
                        levers: Levers | None = None, spacing=None):
    """:func:`iter_segment_volume` over each (z, y, x) frame of a series (a cine: a (t, z, y, x) array or
    a list of frames of one shape) in turn, yielding ``(slices done over all frames, labels)``;
    ``labels``, uint8 (t, z, y, x), is complete after the last yield; ``spacing`` as there."""
    out = np.zeros((len(frames), *frames[0].shape), dtype=np.uint8)
    for k, frame in enumerate(frames):
        for done, labels in iter_segment_volume(model, frame, device, batch_size, levers=levers, spacing=spacing):
            if done == frame.shape[0]:
                out[k] = labels
            yield k * frame.shape[0] + done, out


def _bf16(device: torch.device, levers: Levers | None) -> bool:
    """bf16 autocast for inference: always on CUDA, on the CPU as the levers say."""
    return device.type == "cuda" or (levers or Levers()).cpu_bf16_on(device)


def segment_volume(
    model: UNet, volume: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16, progress=None,
    on_device: bool | None = None, levers: Levers | None = None, spacing=None,
) -> np.ndarray:
    """Label every slice of a (z, y, x) volume; returns uint8 labels of the same shape.

    ``progress``, if given, is called with (slices done, total); ``on_device``, ``levers`` and
    ``spacing`` as in :func:`iter_segment_volume`.
    """
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for done, labels in iter_segment_volume(model, volume, device, batch_size, on_device, levers, spacing):
        if progress is not None:
            progress(done, volume.shape[0])
    return labels


def embed_volume(model: UNet, volume: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 32,
                 levers: Levers | None = None, spacing=None) -> np.ndarray:
    """(S, embedding_dim) float32 projection-head features, one row per slice (``levers``:
    channels_last and BatchNorm folding; never compiled; ``spacing`` as in :func:`iter_segment_volume`)."""
    fov = field_of_view(model.config, volume.shape, spacing)
    if fov is not None:
        volume = fov.crop(volume)
    device = torch.device(device)
    model = model.to(device).eval()
    net = apply_layout(for_inference(model, levers, device), levers)
    with torch.inference_mode(), mixed_precision(device, _bf16(device, levers)):
        rows = [r for _, _, r in _run_in_batches(model, volume, device, batch_size, lambda b: net.embed(b).float().cpu())]
    return torch.cat(rows).numpy()


def keep_largest_components(labels: np.ndarray, connectivity: int = 3) -> tuple[np.ndarray, int]:
    """Each foreground class's largest connected piece of a (z, y, x) label map, or of every frame of a
    (t, z, y, x) series; its other pieces become background. Returns the labels and how many voxels changed.

    Pieces are connected in 3-D through faces, edges or corners (``connectivity`` 3; 2: faces or edges; 1: faces
    alone), so that a structure whose outline shifts between thick slices stays one piece. For anatomy that is one
    piece per class (the heart's chambers and myocardium), where a stray island is an error; a class of several
    organs (both kidneys) would lose all but one of them.
    """
    from scipy import ndimage

    if labels.ndim == 4:
        frames = [keep_largest_components(frame, connectivity) for frame in labels]
        return np.stack([f for f, _ in frames]), sum(n for _, n in frames)
    out = labels.copy()
    removed = 0
    touching = ndimage.generate_binary_structure(3, connectivity)
    for c in np.unique(labels):
        if c == 0:
            continue
        pieces, n = ndimage.label(labels == c, structure=touching)
        if n < 2:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0  # not class c
        strays = (pieces > 0) & (pieces != int(np.argmax(sizes)))
        out[strays] = 0
        removed += int(strays.sum())
    return out, removed
