"""Fine-tuning a (pretrained) U-Net on the few slices a user annotated.

Only annotated slices enter the loss: unannotated slices of a volume are not read as
background. Within a slice, label -1 marks pixels to ignore. The loss is cross-entropy
plus soft Dice over the foreground classes.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from coral_core.augment import FINETUNE_TRANSLATE, AugmentConfig, augment_batch
from coral_core.data import LabelledSlices
from coral_core.errors import UserError
from coral_core.levers import Levers, apply_levers, contiguous_layout
from coral_core.model import UNet
from coral_core.resume import ResumeState
from coral_core.training import (
    History, StepCallback, TrainingRun, accumulate, check_optimiser_settings, fit_cpu_batch, training_bytes_per_image,
)

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "segmentation_loss", "class_balance_weights",
           "annotated_from_labels"]


@dataclass
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3  # 1e-3 scored 0.05 Dice lower from random and from CORAL init (docs/results.md)
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    # Weight the cross-entropy by sqrt(inverse class frequency) in each batch (class_balance_weights).
    balance_classes: bool = False
    validate_every: int = 25
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    # shifts of up to a quarter of the input (FINETUNE_TRANSLATE), wider than pretraining's: the annotated
    # slices show the anatomy at one place, other scans (and a physical-scale model's squares) elsewhere
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(translate=FINETUNE_TRANSLATE))
    levers: Levers = field(default_factory=Levers)
    # Weight of the CORAL loss on the fine-tuning images' slices (no labels needed), added to the
    # segmentation loss so that the embedding keeps its slice order across subjects. Only for a
    # model with a canonical direction (CORAL-pretrained), or for any model when finetune() is given
    # unlabelled volumes (semi-supervised); 0 turns it off. Without it, fine-tuning
    # left the ordinal consistency negative in 3 of 4 phantom runs; with 0.1 it stayed at 0.99 with
    # the same Dice (docs/results.md), at about 1.7x the fine-tuning time (1.3x on every other step).
    embedding_weight: float = 0.1
    embedding_batch: int = 8  # slices per step for that loss (two views each)
    # That loss on every k-th step only, at k times the weight. With 2, four phantom runs kept the
    # same consistency and fine-tuned 21-24% faster, but the Dice was lower in 2 of the 3 runs that
    # did not collapse and on the demo's held-out subject (docs/results.md): 1 stays the default.
    embedding_every: int = 1
    # Augmented views per slice for that loss: 2 (as in pretraining) or 1, half the images. One view
    # fine-tuned 20% faster with the same consistency, but its Dice fell by 0.093 in one of four
    # phantom runs (docs/results.md): 2 stays the default.
    embedding_views: int = 2
    # Train the decoder and head only: the encoder's weights stay as they came (its BatchNorm
    # statistics still follow the fine-tuning images). A diagnostic of what a pretrained encoder
    # holds (docs/results.md), and an option when the encoder should not move. The embedding is the
    # encoder's, so it is kept without the CORAL loss above.
    freeze_encoder: bool = False
    # The encoder's learning rate as a fraction of ``lr`` (discriminative fine-tuning): below 1 a
    # pretrained encoder moves less than the decoder and head, between freezing it (freeze_encoder)
    # and training it like the rest (1, the default). The projection head and the CORAL loss's
    # direction keep ``lr``.
    encoder_lr_scale: float = 1.0
    # The encoder frozen for this many first steps, then trained with the rest (linear probing, then fine-
    # tuning: the decoder and head first learn on the pretrained features, so that their first, random
    # gradients do not reach the encoder). The CORAL loss above waits for it too. 0: trained from the start.
    encoder_frozen_steps: int = 0

    def __post_init__(self) -> None:
        # nested settings may arrive as plain dicts (a job spec sent to a child process)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if isinstance(self.levers, dict):
            self.levers = Levers(**self.levers)
        if self.embedding_weight < 0 or self.embedding_batch < 2 or self.embedding_every < 1:
            raise UserError("--embedding-weight must be >= 0, the embedding batch >= 2 and its interval >= 1")
        if self.embedding_views not in (1, 2):
            raise UserError("embedding_views (augmented views per slice for the embedding loss) must be 1 or 2")
        if self.steps < 1 or self.batch_size < 1:
            raise UserError("fine-tuning needs --steps >= 1 and a batch size >= 1")
        check_optimiser_settings(self.lr, self.weight_decay)
        if self.encoder_frozen_steps < 0:
            raise UserError("the encoder's frozen steps must be 0 (trained from the start) or more")
        if not (self.encoder_lr_scale > 0 and np.isfinite(self.encoder_lr_scale)):
            raise UserError("the encoder's learning-rate scale must be a number above 0; to keep the encoder as it "
                            "is, freeze it instead")
        if self.lr * self.encoder_lr_scale > 1:
            raise UserError(f"the encoder's learning rate, {self.lr:g} x {self.encoder_lr_scale:g}, would be above 1; "
                            "give a smaller learning-rate scale")


@dataclass
class FinetuneResult:
    model: UNet
    history: History


def annotated_from_labels(labels: np.ndarray) -> list[int]:
    """Slices whose label slice has any foreground (the CLI's default annotated slices)."""
    return [int(i) for i in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))]


def class_balance_weights(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Cross-entropy weights from a batch's labels (-1 ignored): sqrt(total / (present x count))
    for each class present, 0 for the absent ones; equal counts give 1 everywhere."""
    counts = torch.bincount(target[target >= 0], minlength=n_classes)[:n_classes].float()
    present = counts > 0
    share = counts.sum() / (counts.clamp_min(1) * present.sum().clamp_min(1))
    return torch.where(present, share.sqrt(), torch.zeros_like(share))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      balance_classes: bool = False) -> torch.Tensor:
    """Cross-entropy + soft Dice over foreground classes; target -1 is ignored. With
    ``balance_classes`` the cross-entropy is weighted by :func:`class_balance_weights`."""
    logits = logits.float()
    weight = class_balance_weights(target, logits.shape[1]) if balance_classes else None
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=-1)
    if dice_weight == 0:
        return ce
    valid = (target >= 0).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum((0, 2, 3))[1:]
    denom = (probs + onehot).sum((0, 2, 3))[1:]
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + dice_weight * (1 - dice.mean())


def _dice_on(model: UNet, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    model.eval()
    with torch.inference_mode():
        pred = model(images.to(device)).argmax(1).cpu()
    model.train()
    scores = []
    for c in range(1, model.config.n_classes):
        p, t = pred == c, labels == c
        denom = int(p.sum() + t.sum())
        if denom:
            scores.append(2 * int((p & t).sum()) / denom)
    return float(np.mean(scores)) if scores else float("nan")


def finetune(
    config: FinetuneConfig,
    model: UNet,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    annotated_slices: list[list[int]],
    callback: StepCallback | None = None,
    stop_event: threading.Event | None = None,
    validation: tuple[list[np.ndarray], list[np.ndarray], list[list[int]]] | None = None,
    resume: ResumeState | None = None,
    unlabelled: list[np.ndarray] | None = None,
    probe: Callable[[int, UNet], None] | None = None,
    probe_every: int = 0,
) -> FinetuneResult:
    """Fine-tune ``model`` (a copy; the argument is not modified) on annotated slices.

    Parameters
    ----------
    images, labels : list of ndarray
        (z, y, x) volumes and label volumes of the same shapes, or pairs prepared at the model's
        size by :func:`coral_core.data.prepare_labelled` (what ``coral finetune`` passes for
        scans whose size it knows as it reads them).
    annotated_slices : list of list of int
        Per volume, the slices whose labels count.
    callback : callable, optional
        ``callback(step, total, metrics)``; metrics hold ``loss`` and, every
        ``validate_every`` steps when ``validation`` is given, ``val_dice``.
    stop_event : threading.Event, optional
        Set it to stop after the current step.
    validation : (images, labels, slices), optional
        Held-out annotated slices scored with mean foreground Dice.
    resume : ResumeState, optional
        Where to keep progress: restored from when it exists, written every ``resume.every``
        steps and when stopped. (The caller removes it when done.)
    unlabelled : list of ndarray, optional
        More (z, y, x) volumes, without labels, whose slices join the fine-tuning images' in the
        CORAL loss of ``embedding_weight`` (semi-supervised fine-tuning). With them the loss trains
        whatever the init: a model without a canonical direction starts from a random one.
    probe : callable, optional
        ``probe(step, model)``, called every ``probe_every`` steps and after the last, with the model
        in evaluation mode (put back in training mode after): to score a schedule's checkpoints
        without changing it (a probe must not train the model or draw from torch's random numbers).

    Returns
    -------
    FinetuneResult
        The fine-tuned copy and its history (``history.stopped`` if stopped early).
    """
    run = TrainingRun(config.seed, config.device, config.amp, callback, stop_event, resume, levers=config.levers)
    size = model.config.image_size
    n_classes = model.config.n_classes
    for lab in labels:
        if np.prod(lab.shape) and lab.min() < 0:
            raise UserError(f"labels hold the value {int(lab.min())}, below 0 (background); labels are 0 to "
                            f"{n_classes - 1} for this model's {n_classes} classes: fix the labels")
        if np.prod(lab.shape) and lab.max() >= n_classes:
            raise UserError(
                f"labels hold values up to {int(lab.max())} but the model has {n_classes} classes "
                f"(0..{n_classes - 1}); use a model with more classes or fix the labels"
            )
    data = LabelledSlices(images, labels, annotated_slices, size)
    val = LabelledSlices(*validation, size) if validation else None
    model = copy.deepcopy(model).to(run.device).train()
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    net = apply_levers(model, config.levers)
    keep = config.embedding_weight > 0 and (model.has_direction or bool(unlabelled)) and not config.freeze_encoder
    keeper = _EmbeddingKeeper(model, [*images, *(unlabelled or [])], config, run) if keep else None
    optimiser, max_lr = _optimiser(model, config, list(keeper.loss.parameters()) if keeper else [])
    # frozen for the first steps: in the optimiser, without gradients (AdamW skips them, decay included)
    warming = config.encoder_frozen_steps > 0 and not config.freeze_encoder
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=max_lr, total_steps=config.steps,
                                                    pct_start=_warmup_fraction(config.steps))
    if keeper is None:
        run.track({"model": model}, optimiser, scheduler)
    else:
        run.track({"model": model, "embedding": keeper.loss}, optimiser, scheduler,
                  {"embedding_cpu": keeper.cpu_generator, "embedding_device": keeper.generator})
    restored = run.restore()
    done = restored[0] if restored is not None else 0
    fit_cpu_batch(run, config.batch_size, training_bytes_per_image(model.config))
    x_all, y_all = data.images.to(run.device), data.labels.to(run.device)
    step = done
    for step in range(done + 1, config.steps + 1):
        if run.should_stop():
            step -= 1
            break
        encoder_frozen = warming and step <= config.encoder_frozen_steps
        if warming:
            model.encoder.requires_grad_(not encoder_frozen)
        idx = torch.randint(0, len(data), (config.batch_size,), generator=run.cpu_generator).to(run.device)
        x, y = augment_batch(x_all[idx], y_all[idx], config.augment, run.generator)

        def step_loss(part: slice, weight: float) -> dict[str, torch.Tensor]:
            with run.autocast():
                logits = net(x[part])
            loss = segmentation_loss(logits, y[part], config.dice_weight, config.balance_classes)
            (weight * loss).backward()
            return {"loss": loss.detach()}

        loss = accumulate(run, optimiser, len(idx), step_loss)["loss"]
        if keeper is not None and step % config.embedding_every == 0 and not encoder_frozen:
            keeper.backward_or_explain()  # adds its gradients to the segmentation loss's
        optimiser.step()
        scheduler.step()
        metrics = {"loss": float(loss)}
        if val is not None and config.validate_every and (step % config.validate_every == 0 or step == config.steps):
            metrics["val_dice"] = _dice_on(model, val.images, val.labels, run.device)
        if probe is not None and probe_every > 0 and (step % probe_every == 0 or step == config.steps):
            probe(step, model.eval())
            model.train()
        run.report(step, config.steps, metrics)
        run.save(step)
    if run.history.stopped:
        run.save(step, force=True)
    if keeper is not None:
        model.canonical_direction.copy_(keeper.loss.unit_direction)
    model.requires_grad_(True)  # a frozen encoder is frozen for this fine-tuning only
    return FinetuneResult(contiguous_layout(model).eval(), run.history)


def _warmup_fraction(steps: int) -> float:
    """The one-cycle schedule's warm-up, a tenth of the steps. At exactly 10 steps PyTorch's OneCycleLR
    would end the warm-up at step 0, where it started, and divide by zero: there it lasts 1.5 steps."""
    return 0.1 if 0.1 * steps != 1 else 1.5 / steps


def _optimiser(model: UNet, config: FinetuneConfig, extra: list[torch.nn.Parameter]):
    """AdamW over the trainable parameters and ``extra``, and the peak learning rate of each group:
    one group at ``lr``, or with ``encoder_lr_scale`` != 1 the encoder's first at ``lr * scale``."""
    trainable = [p for p in model.parameters() if p.requires_grad] + extra
    if config.encoder_lr_scale == 1 or config.freeze_encoder:
        return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay), config.lr
    encoder = {id(p) for p in model.encoder.parameters()}
    groups = [{"params": [p for p in trainable if id(p) in encoder], "lr": config.lr * config.encoder_lr_scale},
              {"params": [p for p in trainable if id(p) not in encoder], "lr": config.lr}]
    optimiser = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return optimiser, [g["lr"] for g in groups]


class _EmbeddingKeeper:
    """The CORAL loss on every slice of the fine-tuning images, started from the model's
    canonical direction: each step embeds two views of a random batch of slices."""

    def __init__(self, model: UNet, images: list[np.ndarray], config: FinetuneConfig, run) -> None:
        from coral_core.data import PretrainSlices
        from coral_core.losses import CoralLoss

        self.model, self.config, self.run = model, config, run
        self.data = PretrainSlices(images, model.config.image_size)
        self.images = self.data.images.to(run.device)
        self.positions = self.data.positions.to(run.device)
        self.loss = CoralLoss(model.config.embedding_dim).to(run.device)
        # its own random streams: the segmentation batches and their augmentation stay those of a run without it
        self.cpu_generator = torch.Generator().manual_seed(config.seed + 1)
        self.generator = torch.Generator(device=run.device).manual_seed(config.seed + 1)
        with torch.no_grad():  # a model that has none (random init, with unlabelled volumes) starts from a random one
            start = model.canonical_direction if model.has_direction else torch.randn(
                model.config.embedding_dim, generator=self.cpu_generator)
            self.loss.direction.copy_(start)

    def backward(self) -> None:
        n = min(self.config.embedding_batch, len(self.data))
        idx = torch.randperm(len(self.data), generator=self.cpu_generator)[:n].to(self.run.device)
        x = self.images[idx]
        v = self.config.embedding_views
        views, _ = augment_batch(x.repeat(v, 1, 1, 1), config=self.config.augment, generator=self.generator)
        with self.run.autocast():
            z = self.model.embed(views)
        features = z.view(v, n, -1).transpose(0, 1)
        weight = self.config.embedding_weight * self.config.embedding_every  # the same weight per step on average
        (weight * self.loss(features, self.positions[idx]).total).backward()

    def backward_or_explain(self) -> None:
        """:meth:`backward`, with running out of device memory turned into one clear sentence."""
        from coral_core.training import is_out_of_memory

        try:
            self.backward()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise UserError(
                f"the {self.run.device.type} device ran out of memory for the loss that keeps the embedding in "
                "order; fine-tune with --embedding-weight 0, or use --device cpu"
            ) from None
