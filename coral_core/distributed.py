"""Helpers for running the pretraining losses under ``torch.distributed``.

Each process holds a local batch. The losses all-gather features (with gradient) so that
every process computes the loss terms of *its own* anchors against the *global* batch:
memory per process is O(N_local * N_global) and the sum of the per-process values (and of
their gradients) equals the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "gather_with_grad", "all_reduce_sum"]


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _block_sizes(n_local: int, device: torch.device) -> list[int]:
    """Number of rows every process contributes, in rank order."""
    mine = torch.tensor([n_local], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _gather_blocks(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather blocks whose first dimension may differ between processes (gloo and NCCL
    need equal shapes, so blocks are padded to the largest and trimmed after)."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded)
    return torch.cat([b[:n] for b, n in zip(blocks, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], offset: int) -> torch.Tensor:  # type: ignore[override]
        ctx.offset, ctx.n_local = offset, x.shape[0]
        return _gather_blocks(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Every process produced a gradient for the whole gathered batch; the gradient of the
        # global loss for this process's rows is the sum of those gradients over processes.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.n_local], None, None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every process (rank order), keeping the autograd graph.

    Parameters
    ----------
    x : Tensor
        Local rows, shape (n_local, ...). ``n_local`` may differ between processes.

    Returns
    -------
    gathered : Tensor
        Shape (N_global, ...). Gradients flowing into any row are summed over processes and
        delivered to the process that owns that row.
    offset : int
        Index of this process's first row in ``gathered``.

    Without an initialised multi-process group this is the identity with offset 0.
    """
    if not is_distributed():
        return x, 0
    sizes = _block_sizes(x.shape[0], x.device)
    offset = sum(sizes[: dist.get_rank()])
    if x.requires_grad:
        return _GatherWithGrad.apply(x, sizes, offset), offset
    return _gather_blocks(x, sizes), offset


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes without gradient (identity when not distributed)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
