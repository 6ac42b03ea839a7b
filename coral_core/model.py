"""2-D U-Net with a projection head for slice embeddings.

The encoder is what CORAL pretrains; the projection head maps its pooled bottleneck to the
embedding space the pretraining losses act on (and that the embedding panel shows); the
decoder and segmentation head are trained during fine-tuning.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetConfig", "UNet", "build_model", "plain_config", "with_pixel_spacing"]


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; stored in every checkpoint.

    ``base_filters`` 16 suits a CPU; the CORAL paper uses 48.
    """

    in_channels: int = 1
    n_classes: int = 4
    base_filters: int = 16
    depth: int = 4  # number of down-sampling steps
    embedding_dim: int = 128  # projection-head output size
    norm: str = "batch"  # "batch" or "instance"
    image_size: int = 128  # slices are resampled to this square size
    class_names: list[str] = field(default_factory=lambda: ["background", "RV", "myocardium", "LV"])
    # mm per pixel of the input: the model sees a square of image_size x pixel_spacing mm of a slice at a time
    # (coral_core.data.FieldOfView); None: each slice resized whole, its field of view setting the scale
    pixel_spacing: float | None = None

    def __post_init__(self) -> None:
        for name in ("in_channels", "n_classes", "base_filters", "depth", "embedding_dim", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.class_names, (list, tuple)) or not all(isinstance(n, str) for n in self.class_names):
            raise ValueError(f"class_names must be a list of names, got {self.class_names!r}")
        if self.pixel_spacing is not None and (isinstance(self.pixel_spacing, bool)
                                               or not isinstance(self.pixel_spacing, numbers.Real)):
            raise ValueError(f"pixel_spacing must be a number of millimetres, got {self.pixel_spacing!r}")
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', got {self.norm!r}")
        if len(self.class_names) != self.n_classes:
            raise ValueError(f"{len(self.class_names)} class names given for {self.n_classes} classes")
        if self.image_size % (2**self.depth):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**depth = {2**self.depth}")
        if self.pixel_spacing is not None and not self.pixel_spacing > 0:
            raise ValueError(f"pixel_spacing must be above 0 mm, got {self.pixel_spacing}")

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["pixel_spacing"] is None:  # left out, so models without one are stored as before
            del out["pixel_spacing"]
        return out


def with_pixel_spacing(model: "UNet", mm: float | None) -> "UNet":
    """A copy of ``model`` (the same weights) whose config has ``pixel_spacing`` ``mm``: a physical scale
    given to a model without one (:class:`coral_core.data.FieldOfView`)."""
    from dataclasses import replace

    new = UNet(replace(model.config, pixel_spacing=mm))
    new.load_state_dict(model.state_dict())
    return new.to(next(model.parameters()).device)


def plain_config(config) -> dict:
    """A dataclass config (a PretrainConfig, a FinetuneConfig) as plain values, any UNetConfig in it as
    :meth:`UNetConfig.to_dict` gives it: the settings that name a resume file stay those of earlier
    versions for a model without a pixel spacing."""
    out = asdict(config)
    for f in fields(config):
        if isinstance(getattr(config, f.name), UNetConfig):
            out[f.name] = getattr(config, f.name).to_dict()
    return out


class ChannelPaddedConv2d(nn.Conv2d):
    """A Conv2d whose input and weight are padded by zero channels to a multiple of 8 before
    the convolution: the same result (the extra channels add exact zeros), with the parameters
    of the plain Conv2d. cuDNN's tensor-core kernels want channel counts in multiples of 8; with
    a single input channel it falls back to slow kernels. Set by the ``pad_channels`` lever
    (:func:`coral_core.levers.set_channel_padding`), which also turns it back."""

    padded_layout = "contiguous"  # or "channels_last": the layout the padded input is given

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        extra = -self.in_channels % 8
        if extra:
            layout = torch.channels_last if self.padded_layout == "channels_last" else torch.contiguous_format
            input = F.pad(input, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=layout)
            weight = F.pad(weight, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=layout)
        return super()._conv_forward(input, weight, bias)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.InstanceNorm2d(channels, affine=True)


class ConvBlock(nn.Sequential):
    """(3x3 conv, norm, ReLU) twice."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
        )


class Encoder(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        widths = [cfg.base_filters * 2**i for i in range(cfg.depth + 1)]
        self.widths = widths
        self.blocks = nn.ModuleList(
            [ConvBlock(cfg.in_channels, widths[0], cfg.norm)]
            + [ConvBlock(widths[i], widths[i + 1], cfg.norm) for i in range(cfg.depth)]
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps from full resolution down to the bottleneck."""
        skips = [self.blocks[0](x)]
        for block in self.blocks[1:]:
            skips.append(block(self.pool(skips[-1])))
        return skips


class Decoder(nn.Module):
    def __init__(self, cfg: UNetConfig, widths: list[int]) -> None:
        super().__init__()
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(cfg.depth))]
        )
        self.blocks = nn.ModuleList(
            [ConvBlock(2 * widths[i], widths[i], cfg.norm) for i in reversed(range(cfg.depth))]
        )
        self.head = nn.Conv2d(widths[0], cfg.n_classes, 1)

    def forward(self, skips: list[Tensor]) -> Tensor:
        x = skips[-1]
        for up, block, skip in zip(self.up, self.blocks, reversed(skips[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class ProjectionHead(nn.Sequential):
    """Global average pool of the bottleneck, then a 2-layer MLP, always in float32: under bf16
    autocast the embedding would otherwise carry bf16's 8-bit mantissa into the losses, whose
    temperature-scaled similarities magnify it. The head is a tiny part of the work."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c_in, c_in),
            nn.ReLU(inplace=True),
            nn.Linear(c_in, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


class UNet(nn.Module):
    """2-D U-Net: ``forward`` gives class logits, ``embed`` per-slice embeddings.

    ``canonical_direction`` is the unit direction CORAL pretraining learned in embedding
    space (all zeros when the model was not CORAL-pretrained).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, self.encoder.widths)
        self.projection = ProjectionHead(self.encoder.widths[-1], config.embedding_dim)
        self.register_buffer("canonical_direction", torch.zeros(config.embedding_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def embed(self, x: Tensor) -> Tensor:
        """(B, embedding_dim) projection-head outputs."""
        return self.projection(self.encoder(x)[-1])

    @property
    def has_direction(self) -> bool:
        return bool(self.canonical_direction.abs().sum() > 0)


def build_model(config: UNetConfig | None = None) -> UNet:
    """A freshly initialised :class:`UNet`."""
    return UNet(config or UNetConfig())


def resize_head(model: UNet, n_classes: int, class_names: list[str] | None = None) -> UNet:
    """A copy of ``model`` with a new, freshly initialised segmentation head for ``n_classes``.

    Encoder, decoder body, projection head and canonical direction are kept: this is how a
    pretrained model (or one trained for other classes) starts fine-tuning on new labels.
    """
    from dataclasses import replace

    names = class_names or ["background"] + [f"class {c}" for c in range(1, n_classes)]
    new = UNet(replace(model.config, n_classes=n_classes, class_names=names))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.head.")}
    new.load_state_dict(state, strict=False)
    return new.to(next(model.parameters()).device)


def for_classes(model: UNet, class_names: list[str], fresh: bool = False, seed: int = 0) -> UNet:
    """``model`` set up to fine-tune on ``class_names`` (background first). The same classes (names matched
    without regard to case, in order) keep the head, spelled as given; other classes get a new head drawn from
    ``seed``, so the same request gives the same model (a stopped fine-tuning of it can be continued), whatever the
    global generator's state. ``fresh``: a new head in any case (a pretrained model's head was never trained).
    Keeping the trained rows of the classes ``model`` already has scored lower on held-out phantoms
    (benchmarks/new_classes.py, docs/results.md), so no row is kept."""
    from dataclasses import replace

    old = [name.strip().casefold() for name in model.config.class_names]
    new_names = [name.strip() for name in class_names]
    if not fresh and new_names == model.config.class_names:
        return model
    if not fresh and old == [name.casefold() for name in new_names]:
        new = UNet(replace(model.config, class_names=new_names))
        new.load_state_dict(model.state_dict())
        return new.to(next(model.parameters()).device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resize_head(model, len(new_names), new_names)
