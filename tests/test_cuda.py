"""CUDA correctness: the same results on a GPU as on the CPU (to the precision each path
promises), for the losses, inference, training and the speed levers.

Skipped where no CUDA GPU is present (this project's CI machine has none). On a machine with
one: ``python -m pytest -q tests/test_cuda.py``, or ``bash benchmarks/gpu_session.sh``, which
runs these tests first and then the GPU benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from coral_core.checkpoint import bundled_model_path, load_checkpoint
from coral_core.finetune import FinetuneConfig, finetune
from coral_core.infer import embed_volume, preprocess_on_device, segment_volume
from coral_core.levers import Levers
from coral_core.losses import CoralLoss, pcl_positive_mask, supcon_loss
from coral_core.model import UNetConfig, build_model
from coral_core.phantom import make_cohort, make_phantom
from coral_core.pretrain import METHODS, PretrainConfig, pretrain
from coral_core.volume import save_volume

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
SMALL = UNetConfig(base_filters=8, depth=3, image_size=64, embedding_dim=32)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("n", [2, 64, 1000])
def test_coral_loss_on_cuda_float32_matches_cpu_float64(n):
    g = torch.Generator().manual_seed(n)
    features = torch.randn(n // 2 if n > 2 else 1, 2, 48, generator=g, dtype=torch.float64)
    positions = torch.randint(0, 12, (features.shape[0],), generator=g).double() / 12  # many ties
    reference = CoralLoss(48).double()
    on_gpu = CoralLoss(48).to(CUDA)
    on_gpu.load_state_dict(reference.state_dict())

    f64 = features.clone().requires_grad_(True)
    out64 = reference(f64, positions)
    out64.total.backward()
    f32 = features.float().to(CUDA).requires_grad_(True)
    out32 = on_gpu(f32, positions.float().to(CUDA))
    out32.total.backward()

    for part in ("total", "ral", "oal"):
        assert _relative_error(getattr(out32, part), getattr(out64, part)) < 1e-4, part
    assert _relative_error(f32.grad, f64.grad) < 1e-3
    assert _relative_error(on_gpu.direction.grad, reference.direction.grad) < 1e-3


def test_supcon_on_cuda_matches_cpu_float64():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(100, 2, 32, generator=g, dtype=torch.float64)
    positions = torch.rand(100, generator=g, dtype=torch.float64)
    mask = pcl_positive_mask(positions, 0.1, n_views=2)
    expected = supcon_loss(features, mask)
    got = supcon_loss(features.float().to(CUDA), mask.to(CUDA))
    assert _relative_error(got, expected) < 1e-4


def test_losses_under_bf16_autocast_are_finite_and_close_to_float32():
    """Features made in bf16 (by a plain bf16 layer; our projection head runs in float32, see
    the end): the loss itself is computed in float32 and stays finite, near the float32 value,
    with finite gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 32).to(CUDA)
    x = torch.randn(512, 64, device=CUDA)
    positions = (torch.arange(256, device=CUDA) % 20 + 1).float() / 20
    loss = CoralLoss(32).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z16 = head(x)
        out16 = loss(z16.view(256, 2, 32), positions)
    assert z16.dtype == torch.bfloat16 and out16.total.dtype == torch.float32
    out16.total.backward()
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(loss.direction.grad).all()
    out32 = loss(head(x).view(256, 2, 32), positions)
    assert abs(out16.total.item() - out32.total.item()) < 2e-2 * abs(out32.total.item()) + 1e-3
    model = build_model(UNetConfig(base_filters=4, depth=2, image_size=32, embedding_dim=16)).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.embed(torch.rand(4, 1, 32, 32, device=CUDA)).dtype == torch.float32


@pytest.fixture(scope="module")
def cohort():
    return [image.array for image, _ in make_cohort(4, seed=3)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_pretrains_on_cuda(cohort, method):
    cfg = PretrainConfig(method=method, epochs=2, batch_size=16, device="cuda", model=SMALL)
    result = pretrain(cfg, cohort)
    losses = result.history.metrics["loss"]
    assert len(losses) > 4 and np.isfinite(losses).all()
    assert next(result.model.parameters()).device.type == CUDA.type
    if method in ("coral", "oal"):
        assert torch.isclose(result.model.canonical_direction.norm(), torch.tensor(1.0, device=CUDA))


def test_speed_levers_pretrain_on_cuda_like_the_default(cohort):
    def run(levers):
        cfg = PretrainConfig(method="coral", epochs=1, batch_size=16, device="cuda", model=SMALL, amp=False,
                             levers=levers)
        return pretrain(cfg, cohort).history.metrics["loss"]

    plain = run(Levers(channels_last=False, compile="off"))
    # fp32 on both sides, but cuDNN runs fp32 convolutions in TF32 by default and each layout or
    # compiled graph may pick another algorithm: rounding of about 1e-3 per step, which training
    # carries along. A real difference (a wrong layout, a dropped term) is far larger.
    np.testing.assert_allclose(run(Levers()), plain, rtol=2e-2)  # the defaults: channels_last on CUDA
    np.testing.assert_allclose(run(Levers(channels_last=True, data_on_device=True)), plain, rtol=2e-2)
    np.testing.assert_allclose(run(Levers(compile="default")), plain, rtol=2e-2)
    np.testing.assert_allclose(run(Levers(pad_channels=True)), plain, rtol=2e-2)
    np.testing.assert_allclose(run(Levers(cudnn_benchmark=True)), plain, rtol=2e-2)
    assert torch.backends.cudnn.benchmark
    np.testing.assert_allclose(run(Levers(channels_last=False, compile="off", prefetch=True)), plain, rtol=2e-2)
    assert not torch.backends.cudnn.benchmark  # each run sets it: one run's choice does not leak
    np.testing.assert_allclose(run(Levers(prefetch=True, data_on_device=True)), plain, rtol=2e-2)
    np.testing.assert_allclose(run(Levers(defer_metrics=True)), plain, rtol=2e-2)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
@pytest.mark.parametrize("on_device", [False, True])
def test_prefetched_batches_are_the_plain_ones(stored, on_device):
    """The ``prefetch`` lever's pinned, non-waiting copies deliver the same slices."""
    from coral_core.pretrain import _Batches

    images = torch.rand(50, 1, 16, 16).to(stored)
    if on_device:
        images = images.to(CUDA)
    plain, pinned = _Batches(images, CUDA, Levers()), _Batches(images, CUDA, Levers(prefetch=True))
    assert pinned.pinned and not plain.pinned
    for seed in range(3):
        idx = torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:12]
        xa, xb = plain(idx, idx.to(CUDA)), pinned(idx, idx.to(CUDA))
        assert xb.dtype == torch.float32 and xb.device.type == "cuda"
        assert torch.equal(xa, xb) and torch.equal(xb.cpu(), images[idx].float().cpu())


@pytest.fixture(scope="module")
def demo():
    model, _ = load_checkpoint(bundled_model_path())
    image, labels = (v.array for v in make_phantom(777))
    return model, image, labels


def test_segmentation_on_cuda_agrees_with_the_cpu(demo):
    model, image, _ = demo
    cpu = segment_volume(model, image, "cpu", batch_size=8)
    assert preprocess_on_device(image, CUDA)
    gpu = segment_volume(model, image, CUDA, batch_size=8)  # bf16, preprocessing on the GPU
    gpu_host = segment_volume(model, image, CUDA, batch_size=8, on_device=False)
    assert len(np.unique(cpu)) == 4
    assert (gpu == cpu).mean() > 0.995  # bf16 moves a few boundary voxels
    assert (gpu == gpu_host).mean() > 0.9999
    emb_cpu = embed_volume(model, image, "cpu")
    emb_gpu = embed_volume(model, image, CUDA)
    cos = (emb_cpu * emb_gpu).sum(1) / (np.linalg.norm(emb_cpu, axis=1) * np.linalg.norm(emb_gpu, axis=1))
    assert cos.min() > 0.99


def test_a_physical_scale_on_cuda_labels_a_wider_field_of_view_as_the_scan(demo):
    """A model with a pixel spacing segments a slice wider than its square in overlapping windows on the
    device: the scan padded off-centre to a wider field of view gets the scan's labels where they overlap,
    background beyond, and the same labels as on the CPU."""
    import dataclasses

    model, image, _ = demo
    scaled = build_model(dataclasses.replace(model.config, pixel_spacing=1.8 * 128 / model.config.image_size))
    scaled.load_state_dict(model.state_dict())
    wide = np.pad(image, ((0, 0), (0, 100), (60, 20)), constant_values=image.min())
    spacing = (10.0, 1.8, 1.8)
    own = segment_volume(scaled, image, CUDA, spacing=spacing)
    padded = segment_volume(scaled, wide, CUDA, spacing=spacing)
    inner = padded[:, :128, 60:188]
    assert (inner == own).mean() > 0.99 and np.count_nonzero(padded) == np.count_nonzero(inner)
    assert (padded == segment_volume(scaled, wide, "cpu", spacing=spacing)).mean() > 0.995  # bf16 on the device
    assert (own == segment_volume(model, image, CUDA)).mean() > 0.9999  # its square is the whole scan


def test_inference_levers_on_cuda_agree_with_eager(demo, tmp_path):
    from coral_core.checkpoint import save_checkpoint

    model, image, _ = demo
    eager = segment_volume(model, image, CUDA, batch_size=8, levers=Levers(channels_last=False, compile="off"))
    for levers in (Levers(channels_last=True), Levers(compile="default"), Levers(compile="reduce-overhead"),
                   Levers(fuse_batchnorm=True), Levers(pad_channels=True), Levers(pad_channels=True, fuse_batchnorm=True)):
        got = segment_volume(model, image, CUDA, batch_size=8, levers=levers)
        assert (got == eager).mean() > 0.999, levers
    # channels_last converted the model in place: it still saves and loads as it was
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model))
    torch.testing.assert_close(loaded.state_dict(), {k: v.cpu() for k, v in model.state_dict().items()})


def test_finetune_on_cuda_learns_the_annotated_slices(demo):
    from coral_core.metrics import dice_per_class

    model, image, labels = demo
    slices = [[3, 7, 11]]
    cfg = FinetuneConfig(steps=60, batch_size=8, device="cuda", validate_every=0)
    result = finetune(cfg, model, [image], [labels], slices)
    assert np.isfinite(result.history.metrics["loss"]).all()
    seg = segment_volume(result.model, image, CUDA)
    dice = dice_per_class(seg[slices[0]], labels[slices[0]], 4)  # foreground classes 1..3
    assert np.nanmean(list(dice.values())) > 0.7


def test_cli_segments_on_cuda(tmp_path):
    pytest.importorskip("nibabel")  # not on the lent GPU machines, which cannot install it
    image, _ = make_phantom(5)
    save_volume(tmp_path / "img.nii.gz", image.array, image.affine)
    proc = subprocess.run(
        [sys.executable, "-m", "coral_core.cli", "segment", tmp_path / "img.nii.gz", "--out", tmp_path / "seg.nii.gz",
         "--device", "cuda", "--json"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["device"].startswith("cuda")
