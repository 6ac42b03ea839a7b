"""Pretraining objectives: CORAL (RAL + OAL) and the contrastive baselines (SimCLR, PCL, GCL).

Definitions follow ``LOSSES.md``. Notation: ``N`` feature vectors ``z_a`` (projection-head
outputs, dimension ``D``) with relative slice positions ``p_a``. Features may be given as
(N, D) with positions (N,), or as (B, V, D) -- V augmented views of B slices -- with positions
(B,); the latter is flattened view-major (all first views, then all second views).

All losses are computed in float32 (float64 inputs stay float64) with autocast disabled, so
they are safe to call on bf16/fp16 features produced under autocast.

Every loss can run under ``torch.distributed`` (``distributed=True``): features are gathered
with gradient, each process computes the terms of its own anchors against the global batch,
and returns its *share*: the sum of the shares over processes is the global loss, and the sum
of their gradients is the global gradient. (DDP averages gradients over processes, so a
trainer multiplies the share by the world size before ``backward``.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from coral_core import distributed as cdist

__all__ = [
    "ral_loss",
    "oal_loss",
    "supcon_loss",
    "CoralLoss",
    "CoralLossOutput",
    "SimCLRLoss",
    "PCLLoss",
    "GCLLoss",
    "simclr_positive_mask",
    "pcl_positive_mask",
    "gcl_positive_mask",
    "partition_index",
    "flatten_views",
]

#: Positions are rounded to this grid before distances are taken, so that two slices equally
#: far from an anchor on either side tie even when their float positions differ by rounding.
#: Relative positions lie in [0, 1]; real slice spacings are orders of magnitude larger.
DISTANCE_RESOLUTION = 1e-6

#: A difference vector z_b - z_a shorter than this has no direction; its OAL term is 0.
OAL_EPS = 1e-8


# --------------------------------------------------------------------------- inputs


def flatten_views(features: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Bring ``features`` to (N, D) and ``positions`` to (N,).

    (B, V, D) features are flattened view-major and their (B,) positions repeated V times.
    """
    if features.dim() == 3:
        n_slices, n_views, _ = features.shape
        if positions.shape != (n_slices,):
            raise ValueError(
                f"features of shape {tuple(features.shape)} need positions of shape "
                f"({n_slices},), got {tuple(positions.shape)}"
            )
        return features.transpose(0, 1).reshape(n_views * n_slices, -1), positions.repeat(n_views)
    if features.dim() == 2:
        if positions.shape != (features.shape[0],):
            raise ValueError(
                f"features of shape {tuple(features.shape)} need positions of shape "
                f"({features.shape[0]},), got {tuple(positions.shape)}"
            )
        return features, positions
    raise ValueError(f"features must be (N, D) or (B, V, D), got shape {tuple(features.shape)}")


def _loss_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu", "mps", "xpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _grid_distances(p_rows: Tensor, p_cols: Tensor) -> Tensor:
    """Distances in units of DISTANCE_RESOLUTION as exact integers, so ties are exact."""
    q_rows = torch.round(p_rows.double() / DISTANCE_RESOLUTION).long()  # (n,)
    q_cols = torch.round(p_cols.double() / DISTANCE_RESOLUTION).long()  # (N,)
    return (q_rows[:, None] - q_cols[None, :]).abs()  # (n, N)


@dataclass
class _Batch:
    """One process's anchors against the (possibly gathered) whole batch."""

    z: Tensor  # (N, D) every feature vector, loss dtype
    p: Tensor  # (N,) positions, loss dtype
    offset: int  # index of this process's first anchor in z
    n_anchors: int  # number of anchors owned by this process

    @property
    def z_anchor(self) -> Tensor:
        return self.z[self.offset : self.offset + self.n_anchors]  # (n, D)

    @property
    def p_anchor(self) -> Tensor:
        return self.p[self.offset : self.offset + self.n_anchors]  # (n,)

    def self_mask(self) -> Tensor:
        """(n, N) boolean, True where the column is the anchor itself."""
        rows = torch.arange(self.n_anchors, device=self.z.device)
        mask = torch.zeros(self.n_anchors, self.z.shape[0], dtype=torch.bool, device=self.z.device)
        mask[rows, rows + self.offset] = True
        return mask


def _prepare(
    features: Tensor, positions: Tensor, distributed: bool, position_dtype: torch.dtype | None = None
) -> _Batch:
    """Flatten views, cast to the loss dtype and, when distributed, gather the global batch.

    ``positions`` may also be any per-row key (slice id, partition); ``position_dtype``
    overrides its dtype (default: the loss dtype).
    """
    features, positions = flatten_views(features, positions)
    dtype = _loss_dtype(features)
    z = features.to(dtype)
    p = positions.to(device=z.device, dtype=position_dtype or dtype)
    n_local = z.shape[0]
    if distributed and cdist.is_distributed():
        z, offset = cdist.gather_with_grad(z)
        p, _ = cdist.gather_with_grad(p.detach())
        return _Batch(z, p, offset, n_local)
    return _Batch(z, p, 0, n_local)


# --------------------------------------------------------------------------- RAL


class _RankingTerms(torch.autograd.Function):
    """sum over rows and k of w_k * (LSE_{g(k)} - s_k), rows sorted from far to near.

    ``s_sorted`` (n, N) similarities per anchor ordered by decreasing distance, the anchor
    itself in the last column (weight 0); LSE_j = log sum_{i <= j} exp(s_i) is the running
    log-sum-exp and g(k) the last column of k's tie group, so LSE_{g(k)} is the log of the
    RAL denominator of term k. The backward is analytic and stays in the log domain:

        d/ds_i = -w_i + sum_{j >= i} W_j exp(s_i - LSE_j),   W_j = sum_{k: g(k) = j} w_k,

    which costs one reverse running log-sum-exp instead of autograd's many elementwise passes.
    """

    @staticmethod
    def forward(ctx, s_sorted: Tensor, group_last: Tensor, weights: Tensor) -> Tensor:  # type: ignore[override]
        running_lse = torch.logcumsumexp(s_sorted, dim=1)  # (n, N)
        terms = running_lse.gather(1, group_last) - s_sorted  # (n, N) l_ab in sorted order
        ctx.save_for_backward(s_sorted, running_lse, group_last, weights)
        return (weights * terms).sum()

    @staticmethod
    def backward(ctx, grad_total: Tensor):  # type: ignore[override]
        s_sorted, running_lse, group_last, weights = ctx.saved_tensors
        group_weight = torch.zeros_like(weights).scatter_add_(1, group_last, weights)  # (n, N) W_j
        log_share = group_weight.log() - running_lse  # (n, N) log(W_j) - LSE_j, -inf where W_j = 0
        log_tail = torch.logcumsumexp(log_share.flip(1), dim=1).flip(1)  # (n, N) over j >= i
        grad = torch.exp(s_sorted + log_tail) - weights  # (n, N)
        return grad * grad_total, None, None


def _ral_sum(b: _Batch, temperature: float, soft_weights: bool, sigmoid_scale: float) -> Tensor:
    """Sum over this process's anchors a and all b != a of w_ab * l_ab.

    For each anchor the other slices are ordered from far to near; a running log-sum-exp of
    s_ac along that order, read at the last member of each tie group, is
    log sum_{c != a, d_ac >= d_ab} exp(s_ac) for every b in the group. O(N^2 log N) time,
    O(N^2) memory.
    """
    u = nn.functional.normalize(b.z, dim=1)  # (N, D)
    s = nn.functional.normalize(b.z_anchor, dim=1) @ u.T / temperature  # (n, N)
    with torch.no_grad():
        d = _grid_distances(b.p_anchor, b.p)  # (n, N) int64
        key = (-d).masked_fill_(b.self_mask(), 1)  # (n, N) far first; the anchor itself last
        key_sorted, order = torch.sort(key, dim=1)  # (n, N)
        group_last = torch.searchsorted(key_sorted, key_sorted, right=True) - 1  # (n, N)
        if soft_weights:
            d_sorted = key_sorted.to(s.dtype).neg_().mul_(DISTANCE_RESOLUTION)  # (n, N)
            weights = torch.sigmoid(sigmoid_scale * d_sorted)
        else:
            weights = torch.ones_like(s)
        weights[:, -1] = 0.0  # the anchor itself: b != a
    return _RankingTerms.apply(s.gather(1, order), group_last, weights)


def ral_loss(
    features: Tensor,
    positions: Tensor,
    temperature: float = 0.1,
    soft_weights: bool = True,
    sigmoid_scale: float = 1.0,
    *,
    distributed: bool = False,
) -> Tensor:
    """Relational anatomical learning loss (listwise ranking by slice distance).

    Parameters
    ----------
    features : Tensor
        (N, D) or (B, V, D) projection-head outputs.
    positions : Tensor
        (N,) or (B,) relative slice positions.
    temperature : float
        tau in s_ab = cos(z_a, z_b) / tau.
    soft_weights : bool
        Weight each term by sigmoid(sigmoid_scale * d_ab); otherwise weight 1.
    sigmoid_scale : float
        kappa of the soft weights.
    distributed : bool
        Under an initialised process group, return this process's share of the global loss.

    Returns
    -------
    Tensor
        Scalar loss, float32 (float64 for float64 input).
    """
    with _no_autocast(features.device):
        return _ral_mean(_prepare(features, positions, distributed), temperature, soft_weights, sigmoid_scale)


def _ral_mean(b: _Batch, temperature: float, soft_weights: bool, sigmoid_scale: float) -> Tensor:
    """This process's share of L_RAL: its sum over the global number of (a, b) terms."""
    n = b.z.shape[0]
    if n < 2:
        raise ValueError(f"RAL needs at least 2 feature vectors, got {n}")
    return _ral_sum(b, temperature, soft_weights, sigmoid_scale) / (n * (n - 1))


# --------------------------------------------------------------------------- OAL


def _ordered_pair_count(p: Tensor) -> Tensor:
    """Number of ordered pairs (a, b) with p_a < p_b, in O(N log N)."""
    p_sorted, _ = torch.sort(p)
    return torch.searchsorted(p_sorted, p, right=False).sum()


def _oal_sum(b: _Batch, direction: Tensor) -> Tensor:
    """Sum over this process's anchors a and all b with p_a < p_b of cos(z_b - z_a, v).

    ||z_b - z_a|| comes from the Gram matrix of mean-centred features (centring leaves the
    differences unchanged and reduces cancellation); no (N, N, D) tensor is formed.
    """
    v = direction.to(b.z.dtype)
    v = v / v.norm().clamp_min(OAL_EPS)  # (D,)
    centre = b.z.mean(dim=0)  # (D,)
    z_all = b.z - centre  # (N, D)
    z_anchor = b.z_anchor - centre  # (n, D)
    along_all = z_all @ v  # (N,)
    along_anchor = z_anchor @ v  # (n,)
    sq_all = (z_all * z_all).sum(dim=1)  # (N,)
    sq_anchor = (z_anchor * z_anchor).sum(dim=1)  # (n,)
    sq_dist = sq_anchor[:, None] + sq_all[None, :] - 2.0 * (z_anchor @ z_all.T)  # (n, N)
    dist = sq_dist.clamp_min(OAL_EPS * OAL_EPS).sqrt()  # (n, N)
    # Cancellation in the Gram form can underestimate a tiny distance; a cosine is in [-1, 1].
    cosine = ((along_all[None, :] - along_anchor[:, None]) / dist).clamp(-1.0, 1.0)  # (n, N)
    with torch.no_grad():
        counted = (b.p_anchor[:, None] < b.p[None, :]) & (sq_dist > OAL_EPS * OAL_EPS)  # (n, N)
    return torch.where(counted, cosine, torch.zeros_like(cosine)).sum()


def oal_loss(
    features: Tensor, positions: Tensor, direction: Tensor, *, distributed: bool = False
) -> Tensor:
    """Ordinal anatomical learning loss: align z_b - z_a (p_a < p_b) with one direction.

    Parameters
    ----------
    features : Tensor
        (N, D) or (B, V, D) projection-head outputs (raw, not normalised).
    positions : Tensor
        (N,) or (B,) relative slice positions.
    direction : Tensor
        (D,) the un-normalised learnable direction v_prog.
    distributed : bool
        Under an initialised process group, return this process's share of the global loss.

    Returns
    -------
    Tensor
        -mean cos(z_b - z_a, v) over ordered pairs; 0 when no pair has p_a < p_b.
    """
    with _no_autocast(features.device):
        b = _prepare(features, positions, distributed)
        if direction.shape != (b.z.shape[1],):
            raise ValueError(
                f"direction must have shape ({b.z.shape[1]},), got {tuple(direction.shape)}"
            )
        return _oal_mean(b, direction)


def _oal_mean(b: _Batch, direction: Tensor) -> Tensor:
    """This process's share of L_OAL: minus its cosine sum over the global pair count."""
    count = _ordered_pair_count(b.p).clamp_min(1).to(b.z.dtype)
    return -_oal_sum(b, direction) / count


class CoralLossOutput(NamedTuple):
    total: Tensor
    ral: Tensor
    oal: Tensor


class CoralLoss(nn.Module):
    """L_CORAL = L_RAL + alpha * L_OAL, owning the learnable canonical direction.

    Parameters
    ----------
    dim : int
        Feature dimension D.
    temperature, soft_weights, sigmoid_scale
        As in :func:`ral_loss`.
    alpha : float
        Weight of the OAL term.
    distributed : bool
        Compute this process's share of the global-batch loss (see module docstring).
    """

    def __init__(
        self,
        dim: int,
        temperature: float = 0.1,
        alpha: float = 1.0,
        soft_weights: bool = True,
        sigmoid_scale: float = 1.0,
        *,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.soft_weights = soft_weights
        self.sigmoid_scale = sigmoid_scale
        self.distributed = distributed
        self.direction = nn.Parameter(torch.randn(dim))

    @property
    def unit_direction(self) -> Tensor:
        """The canonical direction v = v_prog / ||v_prog|| (detached)."""
        v = self.direction.detach()
        return v / v.norm().clamp_min(OAL_EPS)

    def forward(self, features: Tensor, positions: Tensor) -> CoralLossOutput:
        with _no_autocast(features.device):
            b = _prepare(features, positions, self.distributed)
            ral = _ral_mean(b, self.temperature, self.soft_weights, self.sigmoid_scale)
            oal = _oal_mean(b, self.direction)
            return CoralLossOutput(ral + self.alpha * oal, ral, oal)

    def extra_repr(self) -> str:
        return (
            f"dim={self.direction.shape[0]}, temperature={self.temperature}, alpha={self.alpha}, "
            f"soft_weights={self.soft_weights}, sigmoid_scale={self.sigmoid_scale}"
        )


# --------------------------------------------------------------------------- SupCon baselines


def _supcon_sums(
    b: _Batch, positive: Tensor, temperature: float, base_temperature: float
) -> tuple[Tensor, Tensor]:
    """Sum over anchors with at least one positive of the per-anchor loss, and their count.

    ``positive`` is (n, N) for this process's anchors; the diagonal is ignored.
    """
    u = nn.functional.normalize(b.z, dim=1)  # (N, D)
    s = nn.functional.normalize(b.z_anchor, dim=1) @ u.T / temperature  # (n, N)
    is_self = b.self_mask()  # (n, N)
    s = s.masked_fill(is_self, float("-inf"))
    log_q = s - torch.logsumexp(s, dim=1, keepdim=True)  # (n, N)
    positive = positive & ~is_self
    n_positive = positive.sum(dim=1)  # (n,)
    mean_log_q = torch.where(positive, log_q, torch.zeros_like(log_q)).sum(dim=1)
    mean_log_q = mean_log_q / n_positive.clamp_min(1)  # (n,)
    has_positive = n_positive > 0
    per_anchor = -(temperature / base_temperature) * mean_log_q
    total = torch.where(has_positive, per_anchor, torch.zeros_like(per_anchor)).sum()
    return total, has_positive.sum()


def _supcon_mean(total: Tensor, count: Tensor, distributed: bool) -> Tensor:
    if distributed:
        count = cdist.all_reduce_sum(count)
    return total / count.clamp_min(1).to(total.dtype)


def supcon_loss(
    features: Tensor,
    positive_mask: Tensor,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> Tensor:
    """Supervised-contrastive loss with an explicit positive mask (single process).

    Parameters
    ----------
    features : Tensor
        (N, D) or (B, V, D) features (flattened view-major).
    positive_mask : Tensor
        (N, N) boolean in the flattened order; entry (a, b) marks b a positive of a. The
        diagonal is ignored. Anchors with no positive are skipped (not NaN).

    Returns
    -------
    Tensor
        -(tau / tau_base) * mean over anchors with positives of mean_{b in P(a)} log q_ab;
        0 when no anchor has a positive.
    """
    with _no_autocast(features.device):
        dummy_positions = torch.zeros(features.shape[0], device=features.device)
        b = _prepare(features, dummy_positions, distributed=False)
        if positive_mask.shape != (b.z.shape[0], b.z.shape[0]):
            raise ValueError(
                f"positive_mask must be ({b.z.shape[0]}, {b.z.shape[0]}), "
                f"got {tuple(positive_mask.shape)}"
            )
        total, count = _supcon_sums(b, positive_mask.to(b.z.device, torch.bool), temperature, base_temperature)
        return _supcon_mean(total, count, distributed=False)


def simclr_positive_mask(n_slices: int, n_views: int = 2, device=None) -> Tensor:
    """(N, N) mask, N = n_views * n_slices (view-major): positives are other views of a slice."""
    slice_id = torch.arange(n_slices, device=device).repeat(n_views)  # (N,)
    return _same_key(slice_id, slice_id)


def pcl_positive_mask(positions: Tensor, threshold: float, n_views: int = 1) -> Tensor:
    """(N, N) mask: positives are the other rows with |p_a - p_b| < threshold."""
    p = positions.repeat(n_views)
    return _closer_than(p, p, threshold)


def gcl_positive_mask(partitions: Tensor, n_views: int = 1) -> Tensor:
    """(N, N) mask: positives are the other rows of the same partition index."""
    k = partitions.repeat(n_views)
    return _same_key(k, k)


def partition_index(slice_index: Tensor, n_slices: Tensor | int, n_partitions: int = 4) -> Tensor:
    """Partition of slice i of S along the slice axis: floor(i * K / S), in [0, K)."""
    n = torch.as_tensor(n_slices, device=slice_index.device)
    return torch.div(slice_index * n_partitions, n, rounding_mode="floor").clamp(0, n_partitions - 1)


def _same_key(rows: Tensor, cols: Tensor) -> Tensor:
    return rows[:, None] == cols[None, :]  # (n, N)


def _closer_than(rows: Tensor, cols: Tensor, threshold: float) -> Tensor:
    return (rows[:, None] - cols[None, :]).abs() < threshold  # (n, N)


class _SupConModule(nn.Module):
    """Shared forward of the baselines: gather, build this process's mask rows, reduce."""

    def __init__(self, temperature: float, base_temperature: float, distributed: bool) -> None:
        super().__init__()
        self.temperature = temperature
        self.base_temperature = base_temperature
        self.distributed = distributed

    def _positive_rows(self, keys_anchor: Tensor, keys_all: Tensor) -> Tensor:
        raise NotImplementedError

    def _reduce(self, features: Tensor, keys: Tensor) -> Tensor:
        """``keys``: one value per flattened row; the subclass turns key pairs into positives."""
        with _no_autocast(features.device):
            b = _prepare(features, keys, self.distributed, position_dtype=torch.float64)
            positive = self._positive_rows(b.p_anchor, b.p)
            total, count = _supcon_sums(b, positive, self.temperature, self.base_temperature)
            return _supcon_mean(total, count, self.distributed and cdist.is_distributed())


class SimCLRLoss(_SupConModule):
    """SimCLR (NT-Xent in SupCon form): the positive of a view is the other view of its slice.

    ``forward(features)`` takes (B, V, D) features.
    """

    def __init__(self, temperature: float = 0.1, base_temperature: float = 0.07, *, distributed: bool = False):
        super().__init__(temperature, base_temperature, distributed)

    def _positive_rows(self, keys_anchor: Tensor, keys_all: Tensor) -> Tensor:
        return _same_key(keys_anchor, keys_all)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 3:
            raise ValueError(f"SimCLR needs (B, V, D) features, got shape {tuple(features.shape)}")
        # A slice identity that stays unique after gathering across processes.
        slice_id = torch.arange(features.shape[0], device=features.device, dtype=torch.float64)
        slice_id = slice_id + cdist.rank() * float(2**32) if self.distributed else slice_id
        return self._reduce(features, slice_id)


class PCLLoss(_SupConModule):
    """Positional contrastive learning: positives are rows with |p_a - p_b| < threshold."""

    def __init__(
        self,
        threshold: float = 0.1,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        *,
        distributed: bool = False,
    ):
        super().__init__(temperature, base_temperature, distributed)
        self.threshold = threshold

    def _positive_rows(self, keys_anchor: Tensor, keys_all: Tensor) -> Tensor:
        return _closer_than(keys_anchor, keys_all, self.threshold)

    def forward(self, features: Tensor, positions: Tensor) -> Tensor:
        return self._reduce(features, positions)


class GCLLoss(_SupConModule):
    """Global contrastive learning: positives share the partition index along the slice axis."""

    def __init__(self, temperature: float = 0.1, base_temperature: float = 0.07, *, distributed: bool = False):
        super().__init__(temperature, base_temperature, distributed)

    def _positive_rows(self, keys_anchor: Tensor, keys_all: Tensor) -> Tensor:
        return _same_key(keys_anchor, keys_all)

    def forward(self, features: Tensor, partitions: Tensor) -> Tensor:
        return self._reduce(features, partitions.to(torch.float64))
