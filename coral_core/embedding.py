"""Slice-embedding trajectories: a 2-D view of per-slice features and how ordered they are.

Each volume becomes a path through feature space, one point per slice in slice order.
The 2-D view has, as its first axis, the projection onto the learned CORAL direction when
the model has one (otherwise the first principal component), and as its second axis the
first principal component of what remains. The ordinal-consistency score is the Spearman
correlation between the first axis and slice position: 1 when every volume runs along that
axis from base to apex.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from coral_core.errors import UserError

__all__ = ["Trajectory", "project_trajectories", "ordinal_consistency", "suggest_slices", "write_trajectory_table",
           "TABLE_COLUMNS"]

TABLE_COLUMNS = ("volume", "slice", "position", "axis1", "axis2", "volume_score")  # write_trajectory_table's


@dataclass
class Trajectory:
    """One volume's slices in the shared 2-D view."""

    name: str
    xy: np.ndarray  # (S, 2)
    positions: np.ndarray  # (S,) relative positions (i + 1) / S
    score: float  # Spearman(first axis, position) of this volume


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def ordinal_consistency(along: np.ndarray, positions: np.ndarray, tol: float = 0.0) -> float:
    """Spearman correlation between the projection on the canonical axis and slice position; NaN for
    fewer than two slices or slices that all project alike (a spread of ``tol`` or less)."""
    if len(along) < 2 or np.ptp(along) <= tol:
        return float("nan")
    return float(spearmanr(along, positions).statistic)


def project_trajectories(
    features: list[np.ndarray], names: list[str] | None = None, direction: np.ndarray | None = None
) -> tuple[list[Trajectory], np.ndarray, float]:
    """Project several volumes' (S_i, D) features into one 2-D view.

    Returns the trajectories, the (2, D) basis of the view, and the score over all volumes
    (Spearman over the pooled slices). Without a direction the first principal component is
    oriented so that the score is not negative.
    """
    names = names or [f"volume {i}" for i in range(len(features))]
    for name, f in zip(names, features):  # NaN features stop the principal axes' SVD with a LinAlgError
        broken = int((~np.isfinite(f)).any(axis=1).sum())
        if broken:
            raise UserError(f"{name}: the model gives NaN or infinite features for {broken} of its {len(f)} slices "
                            "(its weights may hold such values, as after a training that diverged); use another model")
    pooled = np.concatenate(features).astype(np.float64)
    centre = pooled.mean(0)
    centred = pooled - centre
    # Identical slices (a blank scan) differ in their features by float32 rounding alone, about 1e-7 of
    # their size; a spread below 1e-5 of it is no order at all, so it gets no score instead of noise's.
    tol = 1e-5 * float(np.abs(pooled).max(initial=0.0))
    positions = [(np.arange(len(f)) + 1) / len(f) for f in features]
    pooled_pos = np.concatenate(positions)
    if direction is not None and np.linalg.norm(direction) > 0:
        axis1 = _unit(np.asarray(direction, np.float64))
    else:
        axis1 = _principal(centred)
        if ordinal_consistency(centred @ axis1, pooled_pos, tol) < 0:
            axis1 = -axis1
    rest = centred - np.outer(centred @ axis1, axis1)
    axis2 = _principal(rest)
    basis = np.stack([axis1, axis2])  # (2, D)
    trajectories = []
    for name, f, pos in zip(names, features, positions):
        xy = (f.astype(np.float64) - centre) @ basis.T
        trajectories.append(Trajectory(name, xy, pos, ordinal_consistency(xy[:, 0], pos, tol)))
    return trajectories, basis, ordinal_consistency(centred @ axis1, pooled_pos, tol)


def _principal(x: np.ndarray) -> np.ndarray:
    if not np.any(x):
        v = np.zeros(x.shape[1])
        v[0] = 1.0
        return v
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return vt[0]


def suggest_slices(features: np.ndarray, annotated: list[int], k: int = 3,
                   candidates: list[int] | None = None) -> list[int]:
    """Slices to annotate next: greedy farthest-point sampling in feature space, starting from
    the annotated slices (or from the slice nearest the mean), so that the annotations spread over
    the volume's anatomy. On phantoms, fine-tuning on them scored as evenly spaced slices did, and
    better than neighbouring or random ones (benchmarks/suggest_slices.py, docs/results.md).
    ``candidates``: the slices that may be proposed (all when None), e.g. those holding the structures."""
    f = features.astype(np.float64)
    chosen = list(annotated)
    allowed = np.zeros(len(f), bool)
    allowed[list(range(len(f))) if candidates is None else list(candidates)] = True
    if not chosen:
        pool = np.flatnonzero(allowed)
        if not len(pool):
            return []
        chosen = [int(pool[np.argmin(np.linalg.norm(f[pool] - f[pool].mean(0), axis=1))])]
        picks = list(chosen)
    else:
        picks = []
    dist = np.min(np.linalg.norm(f[:, None] - f[chosen][None], axis=2), axis=1)
    dist[~allowed] = 0.0
    while len(picks) < k and dist.max() > 0:
        nxt = int(np.argmax(dist))
        picks.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(f - f[nxt], axis=1))
    return picks[:k]


def write_trajectory_table(path, trajectories: list[Trajectory]) -> None:
    """A CSV row per slice (:data:`TABLE_COLUMNS`: the volume, the slice's index and relative position, its two
    coordinates in the 2-D view, the volume's ordinal consistency), written atomically."""
    import csv

    from coral_core.fileio import atomic_target

    with atomic_target(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE_COLUMNS)
        for t in trajectories:
            for i, ((x, y), p) in enumerate(zip(t.xy, t.positions)):
                writer.writerow([t.name, i, f"{p:.6f}", f"{x:.6f}", f"{y:.6f}", f"{t.score:.6f}"])
