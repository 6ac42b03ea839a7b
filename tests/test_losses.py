"""The CORAL objectives and baselines against their direct definitions (LOSSES.md)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from coral_core.losses import (
    CoralLoss,
    GCLLoss,
    PCLLoss,
    SimCLRLoss,
    gcl_positive_mask,
    oal_loss,
    partition_index,
    pcl_positive_mask,
    ral_loss,
    simclr_positive_mask,
    supcon_loss,
)
from direct_losses import oal_direct, ral_direct, ral_loops, supcon_direct

RTOL = 1e-9


def tied_positions(n: int, levels: int, generator: torch.Generator) -> torch.Tensor:
    """Positions on a coarse dyadic grid: exact in binary, so many exact ties."""
    return torch.randint(0, levels, (n,), generator=generator).double() / levels


def assert_close(actual, expected, rtol=RTOL, atol=1e-13):
    """Max-norm relative error; ``atol`` only matters where the reference is exactly 0
    (e.g. the N = 2 RAL gradient), where float64 rounding leaves ~1e-16."""
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).abs().max()
    scale = expected.abs().max()
    assert err <= rtol * scale + atol, f"error {err:.3e} vs reference scale {scale:.3e}"


def value_and_grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves)
    return out, grads


# --------------------------------------------------------------------------- RAL


def test_ral_direct_form_agrees_with_plain_loops():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 6):
        z = torch.randn(n, 5, generator=g, dtype=torch.float64)
        p = tied_positions(n, 3, g)
        for soft in (True, False):
            assert ral_direct(z, p, 0.2, soft).item() == pytest.approx(ral_loops(z, p, 0.2, soft), rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64, 300])
@pytest.mark.parametrize("soft_weights", [True, False])
def test_ral_matches_direct_form_values_and_gradients(n, soft_weights):
    g = torch.Generator().manual_seed(n)
    temperatures = (0.05, 0.1, 0.5) if n <= 64 else (0.1,)
    for tau in temperatures:
        z = torch.randn(n, 8, generator=g, dtype=torch.float64) * 3.0
        p = tied_positions(n, max(2, n // 4), g)
        kappa = 1.0 if tau != 0.5 else 2.5
        ours, g_ours = value_and_grads(lambda z_: ral_loss(z_, p, tau, soft_weights, kappa), z)
        ref, g_ref = value_and_grads(lambda z_: ral_direct(z_, p, tau, soft_weights, kappa), z)
        assert_close(ours, ref)
        assert_close(g_ours[0], g_ref[0])


def test_ral_counts_every_tied_slice_in_the_denominator():
    # Anchor 0 sits in the middle; slices 1 and 2 are equally far on either side. With ties
    # handled, l_01 and l_02 share one denominator that holds both.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    p = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    assert_close(ral_loss(z, p), ral_direct(z, p))
    p_untied = torch.tensor([0.5, 0.25, 0.875], dtype=torch.float64)
    assert abs(ral_loss(z, p).item() - ral_loss(z, p_untied).item()) > 1e-3


def test_ral_treats_float32_slice_positions_equidistant_as_ties():
    # (i+1)/S in float32 makes neighbours on either side differ by an ulp; they still tie.
    g = torch.Generator().manual_seed(1)
    n_slices = 10
    z = torch.randn(n_slices, 6, generator=g, dtype=torch.float64)
    p32 = (torch.arange(n_slices) + 1).float() / n_slices
    p64 = (torch.arange(n_slices) + 1).double() / n_slices
    assert_close(ral_loss(z, p32), ral_loss(z, p64), rtol=1e-12)


# --------------------------------------------------------------------------- OAL


@pytest.mark.parametrize("n", [2, 3, 9, 40, 300])
def test_oal_matches_direct_form_values_and_gradients(n):
    g = torch.Generator().manual_seed(100 + n)
    z = torch.randn(n, 16, generator=g, dtype=torch.float64) * 2.0 + 5.0  # off-centre on purpose
    p = tied_positions(n, max(2, n // 3), g)
    v = torch.randn(16, generator=g, dtype=torch.float64)
    ours, g_ours = value_and_grads(lambda z_, v_: oal_loss(z_, p, v_), z, v)
    ref, g_ref = value_and_grads(lambda z_, v_: oal_direct(z_, p, v_), z, v)
    assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b)


def test_oal_never_builds_an_n_by_n_by_d_tensor():
    n, d = 96, 64
    z = torch.randn(n, d, requires_grad=True)
    p = torch.rand(n)
    loss = CoralLoss(d)
    with LargestTensor() as largest:
        out = loss(z, p)
        out.total.backward()
    assert largest.numel <= 2 * n * n < n * n * d, largest.numel


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


# --------------------------------------------------------------------------- CORAL module


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_coral_loss_is_ral_plus_alpha_oal_with_direction_gradient(alpha):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 2, 12, generator=g, dtype=torch.float64)  # (B, V, D)
    p = tied_positions(6, 3, g)
    loss = CoralLoss(12, temperature=0.2, alpha=alpha).double()
    out = loss(z, p)
    flat = z.transpose(0, 1).reshape(12, 12)
    flat_p = p.repeat(2)
    v = loss.direction.detach().clone().requires_grad_(True)
    ref = ral_direct(flat, flat_p, 0.2) + alpha * oal_direct(flat, flat_p, v)
    assert_close(out.total, ref)
    assert_close(out.ral, ral_direct(flat, flat_p, 0.2))
    out.total.backward()
    ref.backward()
    assert_close(loss.direction.grad, v.grad)
    assert isinstance(out.ral, torch.Tensor) and isinstance(out.oal, torch.Tensor)


def test_view_major_flattening():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    p = torch.rand(4, generator=g, dtype=torch.float64)
    manual = torch.cat([z[:, 0], z[:, 1], z[:, 2]])
    assert_close(ral_loss(z, p), ral_direct(manual, p.repeat(3)))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="positions of shape"):
        ral_loss(torch.randn(4, 2, 8), torch.rand(8))
    with pytest.raises(ValueError, match="direction must have shape"):
        oal_loss(torch.randn(4, 8), torch.rand(4), torch.randn(7))


# --------------------------------------------------------------------------- edge cases


def _finite_everywhere(z, p, dim):
    z = z.clone().requires_grad_(True)
    loss = CoralLoss(dim)
    out = loss(z, p)
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(out.ral) and torch.isfinite(out.oal)
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss.direction.grad).all()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cases_stay_finite(dtype):
    d = 8
    out = _finite_everywhere(torch.randn(2, d, dtype=dtype), torch.tensor([0.1, 0.9]), d)
    assert out.oal.item() != 0.0
    out = _finite_everywhere(torch.randn(5, d, dtype=dtype), torch.full((5,), 0.5), d)
    assert out.oal.item() == 0.0  # all positions equal: no ordered pair
    z = torch.randn(6, d, dtype=dtype)
    z[2] = 0.0
    _finite_everywhere(z, torch.linspace(0.1, 1.0, 6), d)
    identical = torch.randn(1, d, dtype=dtype).repeat(6, 1)
    out = _finite_everywhere(identical, torch.linspace(0.1, 1.0, 6), d)
    assert out.oal.item() == 0.0  # no difference vector has a direction


def test_oal_stays_finite_when_features_nearly_coincide():
    # float32 features of norm ~100 whose differences are ~1e-4: the Gram form cancels badly
    # (some squared distances come out 0 or negative), yet loss and gradients stay finite.
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1, 32, generator=g) * 100
    z = (base + 1e-4 * torch.randn(24, 32, generator=g)).requires_grad_(True)
    v = torch.randn(32, generator=g, requires_grad=True)
    loss = oal_loss(z, torch.linspace(0.1, 1.0, 24), v)
    loss.backward()
    assert -1.0 <= loss.item() <= 1.0
    assert torch.isfinite(z.grad).all() and torch.isfinite(v.grad).all()


def test_oal_zero_length_pairs_match_direct_form():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64)
    z[3] = z[5]
    z[0] = 0.0
    p = torch.linspace(0.1, 0.9, 7, dtype=torch.float64)
    v = torch.randn(4, generator=g, dtype=torch.float64)
    ours, g_ours = value_and_grads(lambda z_, v_: oal_loss(z_, p, v_), z, v)
    ref, g_ref = value_and_grads(lambda z_, v_: oal_direct(z_, p, v_), z, v)
    assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b, rtol=1e-7)


@pytest.mark.parametrize("tau", [0.01, 0.1])
def test_float32_and_bf16_autocast_agree_with_float64(tau):
    g = torch.Generator().manual_seed(5)
    z64 = torch.randn(128, 32, generator=g, dtype=torch.float64) * 10
    p = tied_positions(128, 16, g)
    ref = ral_direct(z64, p, tau)
    ours32 = ral_loss(z64.float(), p.float(), tau)
    assert ours32.dtype == torch.float32
    assert_close(ours32, ref, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf16 = z64.to(torch.bfloat16)
        out = CoralLoss(32, temperature=tau)(z_bf16, p.float())
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    # bf16 features carry ~3 significant digits; the loss on them is computed in float32.
    assert_close(out.ral, ral_direct(z64.to(torch.bfloat16).double(), p, tau), rtol=1e-5)


def test_ral_memory_is_quadratic_not_cubic():
    n = 200
    z = torch.randn(n, 16, requires_grad=True)
    with LargestTensor() as largest:
        ral_loss(z, torch.rand(n)).backward()
    assert largest.numel <= 2 * n * n


# --------------------------------------------------------------------------- SupCon baselines


@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5])
def test_supcon_matches_direct_form_for_each_baseline(tau):
    g = torch.Generator().manual_seed(21)
    n_slices, n_views = 8, 2
    z = torch.randn(n_slices, n_views, 10, generator=g, dtype=torch.float64)
    flat = z.transpose(0, 1).reshape(-1, 10)
    p = tied_positions(n_slices, 5, g)
    parts = partition_index(torch.arange(n_slices), n_slices)
    masks = {
        "simclr": simclr_positive_mask(n_slices, n_views),
        "pcl": pcl_positive_mask(p, 0.3, n_views),
        "gcl": gcl_positive_mask(parts, n_views),
    }
    modules = {
        "simclr": SimCLRLoss(tau)(z),
        "pcl": PCLLoss(0.3, tau)(z, p),
        "gcl": GCLLoss(tau)(z, parts),
    }
    for name, mask in masks.items():
        ours, g_ours = value_and_grads(lambda z_: supcon_loss(z_, mask, tau), flat)
        ref, g_ref = value_and_grads(lambda z_: supcon_direct(z_, mask, tau), flat)
        assert_close(ours, ref)
        assert_close(g_ours[0], g_ref[0])
        assert_close(modules[name], ref)


def test_supcon_skips_anchors_without_positives():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True  # only two anchors have a positive
    ours, (grad,) = value_and_grads(lambda z_: supcon_loss(z_, mask), z)
    assert torch.isfinite(ours) and torch.isfinite(grad).all()
    assert_close(ours, supcon_direct(z, mask))
    none = supcon_loss(z.requires_grad_(True), torch.zeros(6, 6, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert torch.isfinite(z.grad).all()


def test_mask_helpers():
    m = simclr_positive_mask(3, 2)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(3):
        expected[i, i + 3] = expected[i + 3, i] = True
    assert torch.equal(m & ~torch.eye(6, dtype=torch.bool), expected)
    assert partition_index(torch.arange(8), 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert partition_index(torch.arange(6), 6).tolist() == [0, 0, 1, 2, 2, 3]
    p = torch.tensor([0.1, 0.15, 0.5])
    assert pcl_positive_mask(p, 0.1).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
