"""The main job on the built-in phantom cohort, end to end.

Unlabelled phantoms -> CORAL pretraining -> fine-tuning on every labelled slice of two
labelled subjects -> segmentation of a held-out subject -> Dice, HD95 and a figure. Subjects
of the three groups come from disjoint seed ranges, so none is seen twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from coral_core.finetune import FinetuneConfig, annotated_from_labels, finetune
from coral_core.infer import segment_volume
from coral_core.levers import Levers
from coral_core.metrics import evaluate_segmentation
from coral_core.model import UNet, UNetConfig
from coral_core.phantom import LABEL_NAMES, make_cohort, make_phantom
from coral_core.plotting import save_overlay_png
from coral_core.pretrain import PretrainConfig, budget_advice, pretrain, pretraining_steps

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

LABELLED_SEED_OFFSET = 1000
HELD_OUT_SEED_OFFSET = 2000


@dataclass
class DemoConfig:
    n_unlabelled: int = 16
    n_labelled: int = 2
    epochs: int = 6
    steps: int = 200
    seed: int = 0
    device: str = "auto"
    base_filters: int = 16
    image_size: int = 128
    cpu_bf16: bool | None = None  # Levers.cpu_bf16: the bundled model was made in float32 (False)


@dataclass
class DemoResult:
    model: UNet
    metrics: dict
    figure: Path
    seconds: float
    training: dict
    pretrain_steps: int = 0  # the optimiser steps of its CORAL pretraining
    pretrain_advice: str = ""  # budget_advice for them: "" at SUGGESTED_STEPS or more


def run_demo(cfg: DemoConfig, out_dir: Path, make_callback: Callable | None = None) -> DemoResult:
    """Run the demo; ``make_callback(stage, total)`` may return a step callback per stage."""
    t0 = time.perf_counter()
    callback = make_callback or (lambda stage, total: None)
    unlabelled = make_cohort(cfg.n_unlabelled, seed=cfg.seed)
    labelled = make_cohort(cfg.n_labelled, seed=cfg.seed + LABELLED_SEED_OFFSET)
    held_out_image, held_out_truth = make_phantom(cfg.seed + HELD_OUT_SEED_OFFSET)

    model_cfg = UNetConfig(base_filters=cfg.base_filters, image_size=cfg.image_size, class_names=list(LABEL_NAMES))
    levers = Levers(cpu_bf16=cfg.cpu_bf16)
    pre_cfg = PretrainConfig(method="coral", epochs=cfg.epochs, seed=cfg.seed, device=cfg.device, model=model_cfg,
                             levers=levers)
    # Pretraining sees every image (labels unused), as a user pretrains on all their scans.
    images = [img.array for img, _ in unlabelled + labelled]
    pre = pretrain(pre_cfg, images, callback("pretrain coral", 0))

    ft_cfg = FinetuneConfig(steps=cfg.steps, seed=cfg.seed, device=cfg.device, levers=levers)
    ft = finetune(
        ft_cfg,
        pre.model,
        [img.array for img, _ in labelled],
        [lab.array for _, lab in labelled],
        [annotated_from_labels(lab.array) for _, lab in labelled],
        callback("fine-tune", cfg.steps),
    )
    pred = segment_volume(ft.model, held_out_image.array, pre.model.canonical_direction.device, levers=levers)
    metrics = evaluate_segmentation(pred, held_out_truth.array, 4, held_out_image.spacing, list(LABEL_NAMES))
    figure = Path(out_dir) / "demo_segmentation.png"
    save_overlay_png(
        figure,
        held_out_image.array,
        {"ground truth": held_out_truth.array, "CORAL": pred},
        class_names=list(LABEL_NAMES),
        title=f"held-out phantom subject: mean Dice {metrics['mean_dice']:.3f}",
    )
    training = {
        "stage": "finetune",
        "command": "coral demo",
        "pretrain": {"method": "coral", "subjects": len(images), "epochs": cfg.epochs, "seed": cfg.seed},
        "finetune": {"subjects": cfg.n_labelled, "steps": cfg.steps},
        "held_out_mean_dice": metrics["mean_dice"],
    }
    n_slices = sum(len(image) for image in images)
    return DemoResult(ft.model, metrics, figure, time.perf_counter() - t0, training,
                      pretraining_steps(n_slices, pre_cfg.batch_size, cfg.epochs),
                      budget_advice(n_slices, pre_cfg.batch_size, cfg.epochs))
