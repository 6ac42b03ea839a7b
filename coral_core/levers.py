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

    They are off by default. A lever is switched on by default only when ``coral bench speed
    --levers`` on a GPU shows that it helps, and no GPU has run that benchmark yet.

    * ``channels_last``: keeps convolution weights and activations in NHWC layout, which
      tensor-core kernels prefer.
    * ``compile``: ``torch.compile`` mode, or "off". "reduce-overhead" also captures CUDA
      graphs. Compiling costs time up front (tens of seconds), so it only pays off in long runs.
    * ``data_on_device``: keeps every pretraining slice on the device when the slices take at
      most a quarter of its free memory, so a step needs no host-to-device copy. Otherwise a
      step gathers its batch on the host.
    """

    channels_last: bool = False
    compile: str = "off"
    data_on_device: bool = False

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            from coral_core.errors import UserError

            raise UserError(f"--compile {self.compile}: unknown mode; use one of {', '.join(COMPILE_MODES)}")


def apply_layout(module: torch.nn.Module, levers: Levers | None) -> torch.nn.Module:
    """Convert ``module`` to channels_last in place when the levers ask for it."""
    import torch

    if levers is not None and levers.channels_last:
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
    "none": Levers(),
    "channels_last": Levers(channels_last=True),
    "data_on_device": Levers(data_on_device=True),
    "compile": Levers(compile="default"),
    "compile reduce-overhead": Levers(compile="reduce-overhead"),
    "all (compile default)": Levers(channels_last=True, compile="default", data_on_device=True),
}
