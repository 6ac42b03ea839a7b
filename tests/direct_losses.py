"""The pretraining objectives written straight from LOSSES.md, with no cleverness.

RAL builds the full (a, b, c) tensor, OAL the full (a, b, D) difference tensor: O(N^3)
memory, like the published code. Tests compare the library against these in float64, and
``benchmarks/loss_bench.py`` times them as the baseline.
"""

from __future__ import annotations

import math

import torch

RESOLUTION = 1e-6  # ties: positions equal on a 1e-6 grid give equal distances
EPS = 1e-8


def distances(p):
    q = torch.round(p.double() / RESOLUTION)  # positions on the tie grid
    return (q[:, None] - q[None, :]).abs().to(p.dtype) * RESOLUTION


def unit(z):
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def ral_direct(z, p, tau=0.1, soft_weights=True, kappa=1.0):
    n = z.shape[0]
    u = unit(z)
    s = u @ u.T / tau  # s[a, b]
    d = distances(p)  # d[a, b]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    # in_denominator[a, b, c]: c != a and d[a, c] >= d[a, b]
    in_denominator = (d[:, None, :] >= d[:, :, None]) & not_self[:, None, :]
    s_abc = s[:, None, :].expand(n, n, n).masked_fill(~in_denominator, float("-inf"))
    log_denominator = torch.logsumexp(s_abc, dim=2)  # [a, b]
    l = log_denominator - s
    w = torch.sigmoid(kappa * d) if soft_weights else torch.ones_like(d)
    return (w * l)[not_self].sum() / (n * (n - 1))


def ral_loops(z, p, tau=0.1, soft_weights=True, kappa=1.0):
    """The same definition as Python loops over a, b, c (tiny N only)."""
    n = z.shape[0]
    u = unit(z)
    d = distances(p)
    total = 0.0
    for a in range(n):
        for b in range(n):
            if b == a:
                continue
            s_ab = float(u[a] @ u[b]) / tau
            denominator = sum(
                math.exp(float(u[a] @ u[c]) / tau)
                for c in range(n)
                if c != a and float(d[a, c]) >= float(d[a, b])
            )
            w = 1.0 / (1.0 + math.exp(-kappa * float(d[a, b]))) if soft_weights else 1.0
            total += w * -(s_ab - math.log(denominator))
    return total / (n * (n - 1))


def oal_direct(z, p, v_prog):
    v = v_prog / v_prog.norm()
    diff = z[None, :, :] - z[:, None, :]  # diff[a, b] = z_b - z_a, (N, N, D)
    length = diff.norm(dim=2)
    cosine = (diff @ v) / length.clamp_min(EPS)
    cosine = torch.where(length > EPS, cosine, torch.zeros_like(cosine))
    ordered = p[:, None] < p[None, :]
    if not ordered.any():
        return (z.sum() + v_prog.sum()) * 0.0
    return -cosine[ordered].sum() / ordered.sum()


def supcon_direct(z, positive, tau=0.1, tau_base=0.07):
    n = z.shape[0]
    u = unit(z)
    s = u @ u.T / tau
    per_anchor = []
    for a in range(n):
        others = [c for c in range(n) if c != a]
        log_norm = torch.logsumexp(s[a, others], dim=0)
        positives = [b for b in others if positive[a, b]]
        if not positives:
            continue
        per_anchor.append(torch.stack([s[a, b] - log_norm for b in positives]).mean())
    if not per_anchor:
        return z.sum() * 0.0
    return -(tau / tau_base) * torch.stack(per_anchor).mean()
