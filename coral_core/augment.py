"""Batched augmentation on the training device (one affine warp and one intensity pass per batch).

Every sample of a batch gets its own random rotation, scale, translation, gamma,
contrast, brightness and noise, drawn from a ``torch.Generator`` so runs repeat. Labels,
when given, follow the same warp with nearest-neighbour sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["AugmentConfig", "WIDER_ZOOM", "FINETUNE_TRANSLATE", "augment_batch"]


# A fine-tuning zoom range for a model meant for other scans than the annotated one: on phantoms it scored
# +0.028 Dice on other subjects and -0.006 on the annotated one's other slices (docs/results.md). The plugin's
# "For other scans" box; `coral finetune --zoom 0.7,1.4`.
WIDER_ZOOM = (0.7, 1.4)

# The fine-tuning's shift range (a fraction of the input; FinetuneConfig's default, pretraining keeps
# AugmentConfig's 0.08). Measured on phantoms against 0.08 (docs/results.md): at the product's settings +0.022
# Dice on other subjects (13 of 16 fine-tunings) and -0.001 on the annotated subject's own slices; in the
# low-label benchmark +0.019 for random init (32/40) and +0.009 for CORAL's (27/40); and a model with a physical
# scale, which segments a wider slice in overlapping squares, lost 0.04-0.07 Dice in squares at 0.08, none at 0.25.
FINETUNE_TRANSLATE = 0.25


@dataclass
class AugmentConfig:
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.08  # fraction of the image size
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.1
    noise: float = 0.05  # largest Gaussian noise sigma (images are about [0, 1])
    enabled: bool = True


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def augment_batch(
    images: Tensor,
    labels: Tensor | None = None,
    config: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Augment a batch on its own device.

    Parameters
    ----------
    images : Tensor
        (B, C, H, W) float images, intensities about [0, 1].
    labels : Tensor, optional
        (B, H, W) integer labels, warped like the images. Both are padded by reflection, so
        the border of a warped slice looks like a border of a real one and stays supervised.
    config : AugmentConfig
    generator : torch.Generator
        On the images' device; a fresh unseeded one when omitted.

    Returns
    -------
    images, labels
    """
    cfg = config or AugmentConfig()
    if not cfg.enabled:
        return images, labels
    b, device = images.shape[0], images.device
    g = generator or torch.Generator(device=device)

    angle = _uniform(b, -cfg.rotation_deg, cfg.rotation_deg, g, device) * (math.pi / 180)
    scale = _uniform(b, *cfg.scale, g, device)
    shift = _uniform(2 * b, -cfg.translate, cfg.translate, g, device).view(b, 2) * 2  # grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    gamma = _uniform(b, *cfg.gamma, g, device).view(b, 1, 1, 1)
    contrast = _uniform(b, *cfg.contrast, g, device).view(b, 1, 1, 1)
    brightness = _uniform(b, -cfg.brightness, cfg.brightness, g, device).view(b, 1, 1, 1)
    sigma = _uniform(b, 0.0, cfg.noise, g, device).view(b, 1, 1, 1)
    out = out.clamp_min(0).pow(gamma) * contrast + brightness
    out = out + sigma * torch.randn(out.shape, generator=g, device=device, dtype=out.dtype)

    if labels is None:
        return out, None
    warped = F.grid_sample(
        labels.to(images.dtype).unsqueeze(1), grid, mode="nearest", padding_mode="reflection", align_corners=False
    )
    return out, warped.squeeze(1).round().long()
