"""Speed levers: switches that make the engine faster on a GPU and change results by
rounding at most. Importing this module does not import torch (the CLI's parser uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Levers", "COMPILE_MODES", "LEVER_VARIANTS", "apply_levers", "apply_layout", "apply_compile",
           "contiguous_layout", "fits_on_device"]


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass
class Levers:
    """Speed levers that change results by rounding at most.

    A lever is on by default only where ``coral bench speed --levers`` showed that it helps.
    So far that is channels_last on the CPU (docs/performance.md). No GPU has run the
    benchmark yet, so on a GPU every lever is off by default.

    * ``channels_last``: keeps convolution weights and activations in NHWC layout.
      None (the default) means on for the CPU and off elsewhere. On this project's 2-core CPU
      it measured 1.3x for pretraining, 1.9x for inference and 1.2x for fine-tuning.
      Tensor-core GPU kernels prefer NHWC too, but that is not yet measured.
    * ``compile``: ``torch.compile`` mode, or "off". "reduce-overhead" also captures CUDA
      graphs. Compiling costs time up front (tens of seconds), so it only pays off in long runs.
    * ``data_on_device``: keeps every pretraining slice on the device when the slices take at
      most a quarter of its free memory, so a step needs no host-to-device copy. Otherwise a
      step gathers its batch on the host.
    """

    channels_last: bool | None = None
    compile: str = "off"
    data_on_device: bool = False

    def channels_last_on(self, device: torch.device) -> bool:
        """Whether channels_last applies on ``device`` (None: on the CPU only, where it was measured)."""
        return self.channels_last if self.channels_last is not None else device.type == "cpu"

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            from coral_core.errors import UserError

            raise UserError(f"--compile {self.compile}: unknown mode; use one of {', '.join(COMPILE_MODES)}")


def apply_layout(module: torch.nn.Module, levers: Levers | None) -> torch.nn.Module:
    """Convert ``module`` to channels_last in place when the levers ask for it on the device
    its parameters are on (``levers`` None: the defaults)."""
    import torch

    levers = levers or Levers()
    device = next(module.parameters()).device
    if levers.channels_last_on(device):
        module.to(memory_format=torch.channels_last)
    return module


def apply_compile(module: torch.nn.Module, levers: Levers | None):
    """``torch.compile(module)`` in the levers' mode, or ``module`` itself when compile is off."""
    import torch

    if levers is None or levers.compile == "off":
        return module
    return torch.compile(module, mode=None if levers.compile == "default" else levers.compile)


def apply_levers(module: torch.nn.Module, levers: Levers | None):
    """Both of the above: the callable to run (``module`` converted in place)."""
    return apply_compile(apply_layout(module, levers), levers)


def contiguous_layout(module: torch.nn.Module) -> torch.nn.Module:
    """Undo channels_last (weights back in the default layout, e.g. before saving)."""
    import torch

    return module.to(memory_format=torch.contiguous_format)


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.25) -> bool:
    """Whether ``nbytes`` take at most ``fraction`` of the device's free memory (CUDA), or
    any amount on the CPU (where the data already is)."""
    import torch

    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


# What `coral bench speed --levers` compares: each lever alone, then all together
# ("data_on_device" concerns pretraining only).
LEVER_VARIANTS: dict[str, Levers] = {
    "none": Levers(channels_last=False),
    "channels_last": Levers(channels_last=True),
    "data_on_device": Levers(channels_last=False, data_on_device=True),
    "compile": Levers(channels_last=False, compile="default"),
    "compile reduce-overhead": Levers(channels_last=False, compile="reduce-overhead"),
    "all (compile default)": Levers(channels_last=True, compile="default", data_on_device=True),
}
