"""Choosing the compute device."""

from __future__ import annotations

import contextlib
import os

import torch

from coral_core.errors import UserError

__all__ = ["resolve_device", "mixed_precision", "DEVICE_CHOICES", "host_memory", "free_host_memory", "cpu_name",
           "OutOfMemoryError"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")

# A device out-of-memory error: torch.OutOfMemoryError where torch has it (2.2 has not), else CUDA's own class.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; a named device must be available."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available here; use --device auto or cpu")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("--device mps: Apple MPS is not available here; use --device auto or cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {name}: unknown device; use one of {', '.join(DEVICE_CHOICES)}")


def mixed_precision(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA or the CPU when ``enabled``; a no-op elsewhere or when not."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()



def host_memory() -> int:
    """The machine's physical memory in bytes (1 TiB when the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def free_host_memory() -> int:
    """Memory the system can give this process now: MemAvailable on Linux, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return host_memory()


def cpu_name() -> str:
    """The CPU's model as the system names it ("Intel(R) Xeon(R) ...", "AMD EPYC"), or the machine
    type where it does not say: float32 results differ in their last bits between CPU models, since
    the math library picks other kernels (other sums' orders) for other instruction sets."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
