"""Self-supervised pretraining of the U-Net encoder: CORAL and the baselines.

Every method sees the same data, model, augmentation and budget: each step draws a batch
of slices, augments each twice on the device, embeds both views with encoder and
projection head, and applies the method's loss. Only the encoder, projection head (and
CORAL's direction) are trained; the decoder is left for fine-tuning.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from coral_core import distributed as cdist
from coral_core.augment import AugmentConfig, augment_batch
from coral_core.data import PretrainSlices
from coral_core.errors import UserError
from coral_core.levers import Levers, apply_compile, apply_layout, contiguous_layout, fits_on_device
from coral_core.losses import CoralLoss, GCLLoss, PCLLoss, SimCLRLoss
from coral_core.model import UNet, UNetConfig, build_model
from coral_core.resume import ResumeState
from coral_core.training import (
    History, StepCallback, TrainingRun, accumulate, check_optimiser_settings, fit_cpu_batch,
    training_bytes_per_image,
)

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "METHODS", "SUGGESTED_STEPS", "pretraining_steps", "budget_advice"]

METHODS = ("coral", "ral", "oal", "pcl", "gcl", "simclr")

# In the low-label benchmark on phantoms (batch 32), CORAL's pretraining improved the fine-tuned Dice only
# after about this many steps: 64 did nothing measurable, 256 little and 1,024 no more than 512, while SimCLR,
# GCL and PCL gained less from the extra steps (docs/results.md, "A longer pretraining over 40 runs" and
# "Steps or slices").
SUGGESTED_STEPS = 500


def pretraining_steps(n_slices: int, batch_size: int, epochs: int) -> int:
    """The optimiser steps of :func:`pretrain` over ``n_slices`` slices: one per (global) batch of the
    slices, rounded down, and at least one, per epoch."""
    batch = min(batch_size, n_slices)
    return max(1, n_slices // max(1, batch)) * epochs


def budget_advice(n_slices: int, batch_size: int, epochs: int, option: str = "--epochs") -> str:
    """For a pretraining of fewer than :data:`SUGGESTED_STEPS` steps, a clause saying how many epochs
    (``option``) would reach them; "" otherwise."""
    steps = pretraining_steps(n_slices, batch_size, epochs)
    if steps >= SUGGESTED_STEPS:
        return ""
    per_epoch = pretraining_steps(n_slices, batch_size, 1)
    return (f"on phantoms CORAL's pretraining helped fine-tuning only after about {SUGGESTED_STEPS} steps "
            f"({option} {-(-SUGGESTED_STEPS // per_epoch)} here; docs/engine.md)")


@dataclass
class PretrainConfig:
    method: str = "coral"
    epochs: int = 10
    batch_size: int = 32  # slices per step; each gives 2 views
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    alpha: float = 1.0  # OAL weight (coral)
    pcl_threshold: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    model: UNetConfig = field(default_factory=UNetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    levers: Levers = field(default_factory=Levers)

    def __post_init__(self) -> None:
        # nested settings may arrive as plain dicts (a job spec sent to a child process)
        if isinstance(self.model, dict):
            self.model = UNetConfig(**self.model)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if isinstance(self.levers, dict):
            self.levers = Levers(**self.levers)
        if self.method not in METHODS:
            raise UserError(f"unknown pretraining method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.epochs < 1 or self.batch_size < 2:
            raise UserError("pretraining needs --epochs >= 1 and a batch size >= 2")
        check_optimiser_settings(self.lr, self.weight_decay)


@dataclass
class PretrainResult:
    model: UNet
    history: History


class _MethodLoss(torch.nn.Module):
    """One call signature for every method: (features (B, 2, D), positions, partitions)."""

    def __init__(self, cfg: PretrainConfig, distributed: bool = False) -> None:
        super().__init__()
        dim, tau = cfg.model.embedding_dim, cfg.temperature
        self.method = cfg.method
        if cfg.method in ("coral", "ral", "oal"):
            alpha = {"coral": cfg.alpha, "ral": 0.0, "oal": 1.0}[cfg.method]
            self.loss = CoralLoss(dim, temperature=tau, alpha=alpha, distributed=distributed)
        elif cfg.method == "pcl":
            self.loss = PCLLoss(cfg.pcl_threshold, tau, distributed=distributed)
        elif cfg.method == "gcl":
            self.loss = GCLLoss(tau, distributed=distributed)
        else:
            self.loss = SimCLRLoss(tau, distributed=distributed)

    def forward(self, features, positions, partitions) -> dict[str, torch.Tensor]:
        if self.method in ("coral", "ral", "oal"):
            out = self.loss(features, positions)
            total = out.oal if self.method == "oal" else out.total
            return {"loss": total, "ral": out.ral, "oal": out.oal}
        if self.method == "pcl":
            return {"loss": self.loss(features, positions)}
        if self.method == "gcl":
            return {"loss": self.loss(features, partitions)}
        return {"loss": self.loss(features)}


class _Embedder(torch.nn.Module):
    """Encoder + projection head as one module (what DDP wraps: the decoder takes no part)."""

    def __init__(self, model: UNet) -> None:
        super().__init__()
        self.encoder, self.projection = model.encoder, model.projection

    forward = UNet.embed  # the same computation, on the same two submodules


class _Batches:
    """A step's slices as float32 on the device. With the ``prefetch`` lever (``ahead``) the loop
    fetches the next step's batch while the current step computes; on a CUDA device the host
    then gathers the slices into pinned memory and their copy is queued without waiting.
    Otherwise the slices are gathered and copied as they come."""

    def __init__(self, images: torch.Tensor, device: torch.device, levers: Levers) -> None:
        self.images, self.device = images, device
        self.ahead = levers.prefetch  # on the CPU too, where it changes nothing but the order of work
        self.pinned = levers.prefetch and device.type == "cuda"

    def __call__(self, idx: torch.Tensor, idx_dev: torch.Tensor) -> torch.Tensor:
        """The slices ``idx`` (indices on the host; ``idx_dev``, the same on the device)."""
        if self.images.device.type != "cpu":  # the slices are on the device already (data_on_device)
            return self.images[idx_dev].float()
        if not self.pinned:
            return self.images[idx].to(self.device, non_blocking=True).float()
        x = torch.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
        torch.index_select(self.images, 0, idx, out=x)
        # the caching host allocator keeps the pinned buffer until its copy has run
        return x.to(self.device, non_blocking=True).float()


def _rank_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """This process's contiguous block of a global batch of ``n`` (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def pretrain(
    config: PretrainConfig,
    volumes: list[np.ndarray | torch.Tensor] | PretrainSlices,
    callback: StepCallback | None = None,
    stop_event: threading.Event | None = None,
    model: UNet | None = None,
    resume: ResumeState | None = None,
) -> PretrainResult:
    """Pretrain an encoder on unlabeled (z, y, x) volumes.

    Parameters
    ----------
    config : PretrainConfig
    volumes : list of ndarray or Tensor, or PretrainSlices
        Unlabeled (z, y, x) volumes; any in-plane size (slices are resampled to the model's size).
        A volume may also come prepared by :func:`coral_core.data.resize_slices`, or the whole set
        as a :class:`coral_core.data.PretrainSlices` at the model's size, as the CLI reads large
        cohorts.
    callback : callable, optional
        ``callback(step, total, metrics)`` after every step.
    stop_event : threading.Event, optional
        Set it to stop after the current step; the model trained so far is returned.
    model : UNet, optional
        Continue from this model instead of a fresh one.
    resume : ResumeState, optional
        Where to keep progress: restored from when it exists, written at every epoch's end,
        every ``resume.every`` steps and when stopped. (The caller removes it when done.)

    Returns
    -------
    PretrainResult
        The model (with ``canonical_direction`` set for CORAL and OAL) and its history.
    """
    ddp, world, rank = cdist.is_distributed(), cdist.world_size(), cdist.rank()
    run = TrainingRun(config.seed, config.device, config.amp, callback if rank == 0 else None, stop_event,
                      resume, saver=rank == 0, levers=config.levers)
    data = volumes if isinstance(volumes, PretrainSlices) else PretrainSlices(volumes, config.model.image_size)
    if data.images.shape[-1] != config.model.image_size:
        raise ValueError(f"the slice set is {data.images.shape[-1]} px; the model takes {config.model.image_size}")
    if len(data) < 2:
        raise UserError("pretraining needs at least 2 slices in total")
    model = (model or build_model(config.model)).to(run.device)
    if ddp and run.device.type == "cuda":  # batch statistics over the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    apply_layout(model, config.levers)
    embedder = _Embedder(model)
    if ddp:
        embedder = torch.nn.parallel.DistributedDataParallel(
            embedder, device_ids=[run.device] if run.device.type == "cuda" else None
        )
    images = data.images
    if config.levers.data_on_device and fits_on_device(images.numel() * images.element_size(), run.device):
        images = images.to(run.device)
    objective = _MethodLoss(config, distributed=ddp).to(run.device)
    params = list(model.encoder.parameters()) + list(model.projection.parameters()) + list(objective.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, len(data))  # the global batch: each process takes a block of it
    if batch < 2 * world:
        raise UserError(f"a global batch of {batch} slices is too small for {world} processes; raise --batch-size")
    steps_per_epoch = pretraining_steps(len(data), batch, 1)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    work = total * batch * config.model.image_size**2  # slice-pixels: whether compiling pays ("auto")
    embedder = apply_compile(embedder, config.levers, pretraining=True, work=work)
    run.track({"model": model, "objective": objective}, optimiser, scheduler)

    step, first_epoch, first_index, order = 0, 0, 0, None
    restored = run.restore()
    if restored is not None:
        step, extra, tensors = restored
        first_epoch, first_index, order = extra["epoch"], extra["index"], tensors.get("order")

    # two views of each of this process's slices go through the network in a step
    fit_cpu_batch(run, -(-batch // world), 2 * training_bytes_per_image(config.model), "slice", " (two views each)",
                  ddp)
    model.train()
    positions, partitions = data.positions.to(run.device), data.partitions.to(run.device)
    fetch = _Batches(images, run.device, config.levers)

    def report(step: int, losses: dict[str, torch.Tensor]) -> None:
        run.report(step, total, {k: float(v) for k, v in losses.items()})  # waits for the step to finish

    pending = None  # with defer_metrics: the last step run, not yet reported
    epoch, i = first_epoch, first_index
    for epoch in range(first_epoch, config.epochs):
        if order is None:
            order = torch.randperm(len(data), generator=run.cpu_generator)
        order_dev = order.to(run.device)  # once an epoch: no step waits for a copy of its indices
        ahead = None  # the next step's batch, when prefetching (within an epoch only)
        for i in range(first_index if epoch == first_epoch else 0, steps_per_epoch):
            if run.should_stop(all_processes=ddp):
                break
            idx, idx_dev = order[i * batch : (i + 1) * batch], order_dev[i * batch : (i + 1) * batch]
            lo, hi = _rank_bounds(len(idx), world, rank)
            x = ahead if ahead is not None else fetch(idx, idx_dev)  # float32 (stored float16, maybe)
            idx_dev, ahead = idx_dev[lo:hi], None
            # Every process draws the augmentation of the whole global batch (same generator
            # state everywhere) and keeps its block: the step equals the single-process one.
            views, _ = augment_batch(torch.cat([x, x]), config=config.augment, generator=run.generator)
            views = views.view(2, len(idx), *views.shape[1:])[:, lo:hi]

            def step_loss(part: slice, weight: float) -> dict[str, torch.Tensor]:
                with run.autocast():
                    z = embedder(views[:, part].flatten(0, 1))  # (2b, D), view-major
                features = z.view(2, -1, z.shape[-1]).transpose(0, 1)  # (b, 2, D)
                losses = objective(features, positions[idx_dev[part]], partitions[idx_dev[part]])
                # Under DDP each process's loss is its share of the global loss and DDP averages
                # gradients, so the share is scaled by the world size (the sum is what we want).
                (weight * world * losses["loss"]).backward()
                return {k: v.detach() for k, v in losses.items()}

            losses = accumulate(run, optimiser, hi - lo, step_loss, distributed=ddp)
            if ddp:
                for p in objective.parameters():  # not in DDP: average its (world-scaled) gradients
                    if p.grad is not None:
                        p.grad = cdist.all_reduce_sum(p.grad) / world
                losses = {k: cdist.all_reduce_sum(v) for k, v in losses.items()}  # shares -> global loss
            optimiser.step()
            scheduler.step()
            if fetch.ahead and i + 1 < steps_per_epoch:  # copied while this step computes
                nxt = slice((i + 1) * batch, (i + 2) * batch)
                ahead = fetch(order[nxt], order_dev[nxt])
            step += 1
            if config.levers.defer_metrics:  # read back once the next step is queued behind this one
                if pending:
                    report(*pending)
                pending = (step, losses)
            else:
                report(step, losses)
            run.save(step, {"epoch": epoch, "index": i + 1}, {"order": order})
        else:
            order = None
            run.save(step, {"epoch": epoch + 1, "index": 0}, force=True)  # every epoch's end
            continue
        break
    if pending:
        report(*pending)
    if run.history.stopped:
        run.save(step, {"epoch": epoch, "index": i}, {"order": order}, force=True)

    if ddp and run.device.type == "cuda":
        model = _plain_batchnorm(model)
    contiguous_layout(model)
    if isinstance(objective.loss, CoralLoss) and config.method != "ral":
        model.canonical_direction.copy_(objective.loss.unit_direction)
    return PretrainResult(model.eval(), run.history)


def _plain_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Undo ``convert_sync_batchnorm`` (same parameters and buffers, no process group)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            _plain_batchnorm(child)
    return module
