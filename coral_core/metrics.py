"""Segmentation metrics: per-class Dice and spacing-aware 95th-percentile Hausdorff distance."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["dice_per_class", "mean_over_present", "hd95_per_class", "evaluate_segmentation", "summarise_cases"]


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[int, float]:
    """Dice of each foreground class 1..n_classes-1; NaN where the class is in neither volume."""
    _check_shapes(pred, truth)
    out = {}
    for c in range(1, n_classes):
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out[c] = float("nan") if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95_per_class(
    pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing: tuple[float, ...] | None = None
) -> dict[int, float]:
    """95th percentile of the symmetric surface distances per foreground class, in mm.

    ``spacing`` is the voxel size per axis of the arrays. NaN where the class is absent from
    both volumes, infinity where it is in only one.
    """
    _check_shapes(pred, truth)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * pred.ndim
    out = {}
    for c in range(1, n_classes):
        p, t = pred == c, truth == c
        if not p.any() and not t.any():
            out[c] = float("nan")
            continue
        if not p.any() or not t.any():
            out[c] = float("inf")
            continue
        sp, st = _surface(p), _surface(t)
        dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
        dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
        distances = np.concatenate([dist_to_t[sp], dist_to_p[st]])
        out[c] = float(np.percentile(distances, 95))
    return out


def mean_over_present(dice: dict[int, float]) -> float:
    """The mean of :func:`dice_per_class`'s values over the classes present (not NaN); NaN if none is."""
    present = [d for d in dice.values() if not np.isnan(d)]
    return float(np.mean(present)) if present else float("nan")


def evaluate_segmentation(
    pred: np.ndarray,
    truth: np.ndarray,
    n_classes: int,
    spacing: tuple[float, ...] | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """Dice and HD95 per class and their means over the classes present, as plain numbers."""
    dice = dice_per_class(pred, truth, n_classes)
    hd = hd95_per_class(pred, truth, n_classes, spacing)
    names = class_names or [str(c) for c in range(n_classes)]
    present = [c for c in dice if not np.isnan(dice[c])]
    finite_hd = [hd[c] for c in present if np.isfinite(hd[c])]
    return {
        "dice": {names[c]: dice[c] for c in dice},
        "hd95": {names[c]: hd[c] for c in hd},
        "mean_dice": mean_over_present(dice),
        "mean_hd95": float(np.mean(finite_hd)) if finite_hd else float("nan"),
    }


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")


def _mean_finite(values) -> float:
    finite = [float(v) for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise_cases(results: list[dict]) -> dict:
    """Several cases' :func:`evaluate_segmentation` results in one: each class's Dice averaged over the cases where
    the class is in either file (where its Dice is defined), its HD95 over the cases where it is finite, with
    ``hd95_missed`` counting the cases where it is not (the prediction holds none of a class the reference holds, or
    the reverse; a case that is itself a summary, a cine series' frames, adds its own ``hd95_missed``);
    ``mean_dice`` and ``mean_hd95``: the mean over the cases of each case's own mean."""
    names: list[str] = []
    for r in results:
        names += [n for n in r["dice"] if n not in names]
    dice = {n: _mean_finite([r["dice"].get(n, float("nan")) for r in results]) for n in names}
    hd = {n: [r["hd95"].get(n, float("nan")) for r in results] for n in names}
    return {
        "dice": dice,
        "hd95": {n: _mean_finite(v) for n, v in hd.items()},
        "hd95_missed": {n: int(sum(r["hd95_missed"].get(n, 0) if "hd95_missed" in r else np.isinf(x)
                                   for r, x in zip(results, v))) for n, v in hd.items()},
        "mean_dice": _mean_finite([r["mean_dice"] for r in results]),
        "mean_hd95": _mean_finite([r["mean_hd95"] for r in results]),
    }
