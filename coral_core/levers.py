"""Speed levers: switches that make the engine faster on a GPU and change results by
rounding at most. Importing this module does not import torch (the CLI's parser uses it)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Levers", "COMPILE_MODES", "LEVER_VARIANTS", "apply_levers", "apply_layout", "apply_compile",
           "contiguous_layout", "set_channel_padding", "fits_on_device", "cpu_has_amx", "AUTO_COMPILE_MIN_WORK", "for_inference"]


COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")


# "auto" compiles pretraining on a CUDA GPU when the run's work, steps x slices per step x
# pixels per slice, is at least this. On the H100 (2026-11-27, docs/performance.md) the 352 px,
# 48-filter embedder at batch 64 ran 507.1 slices/s with channels_last and 773.8 compiled:
# 0.044 s saved per step, against about 25 s of compiling, so it paid for itself after about
# 600 steps = 4.6e9 slice-pixels. Twice that, as a margin: how the saving scales to other
# image and batch sizes is not measured.
AUTO_COMPILE_MIN_WORK = 10**10


@dataclass
class Levers:
    """Speed levers that change results by rounding at most.

    A lever is on by default only where ``coral bench speed --levers`` showed that it helps
    (docs/performance.md has the tables):

    * ``channels_last``: keeps convolution weights and activations in NHWC layout.
      None (the default) means on for the CPU and CUDA GPUs, where it was measured: on this
      project's 2-core CPU 1.3x for pretraining, 1.9x for inference and 1.2x for fine-tuning;
      on an H100 1.81x, 1.20x and 1.14x (the last inside the run-to-run spread).
    * ``compile``: ``torch.compile`` mode, "off", or "auto" (the default): "default" for
      pretraining runs on a CUDA GPU long enough to win back the compiling (see
      ``AUTO_COMPILE_MIN_WORK``; on an H100 1.53x over channels_last alone), off for everything
      else, since compiling costs tens of seconds up front, more than a volume's inference or
      a 200-step fine-tuning takes.
      Should compiling fail under "auto", the run goes on eagerly with a warning.
      "reduce-overhead" also captures CUDA graphs.
    * ``data_on_device``: keeps every pretraining slice on the device when the slices take at
      most a quarter of its free memory, so a step needs no host-to-device copy. Otherwise a
      step gathers its batch on the host. Off by default: 1.04x on an H100, for GPU memory
      that a large cohort needs elsewhere.
    * ``prefetch``: pretraining fetches the next step's batch while the current step computes:
      with the slices on the host it gathers them into pinned memory and queues their copy to
      the GPU, and (with ``data_on_device`` too) no step's index copy waits for the GPU. It
      matters on CUDA only; on the CPU it reorders work and changes nothing else. Off by
      default: on an H100 it measured 0.53x the defaults in one run and 1.13x in a profile of
      three steps; which holds is not known yet.
    * ``cudnn_benchmark``: lets cuDNN time its convolution algorithms for each new input shape
      and keep the fastest (``torch.backends.cudnn.benchmark``, process-wide, CUDA only).
      Off by default: on an H100 1.03x for pretraining, 1.06-1.09x for inference, and a
      fine-tuning 3.4x slower (it times every new shape again).
    * ``pad_channels``: a convolution with fewer than 8 input channels (the first one, on a
      one-channel image) is computed with its input and weight padded by zero channels to 8:
      the same sums, in the tensor-core kernels that cuDNN has for 8 channels. The parameters
      keep their shapes. On an H100 the one-channel first convolution took 7.2 ms of a 92 ms
      pretraining step (forward at 2.8 TFLOP/s). Off by default: not measured yet.
    * ``defer_metrics``: pretraining reads each step's loss back to the host once the next step
      is queued, not at once, so the GPU has that step to run while the host waits, and the
      host launches step k + 2 while the GPU runs k + 1. The same losses, weights and stops
      (a stop asked for during step k comes after step k + 1); each report comes one step
      later. On an H100 the GPU sat idle 16-19 ms of each 92-96 ms pretraining step with the
      defaults, much of it while the host waited for the loss and then launched the next
      step's small kernels. Off by default: not measured yet.
    * ``cpu_bf16``: bfloat16 autocast on the CPU (CUDA runs take the configs' ``amp`` flag, bf16
      autocast, as they always did). None (the default) means on where the CPU has AMX tiles, the
      matrix units that run bf16 convolutions natively; off on any other CPU, where bf16 was slower
      than float32 (this Xeon with oneDNN capped at AVX-512 with bf16: 0.75-0.97x; at AVX2: about
      0.1x; docs/performance.md). On this project's 2-core Xeon with AMX, on top of the other
      defaults: 1.8-2.4x for pretraining, 2.0-2.3x for inference, 1.8-2.1x for fine-tuning; over
      four seeds of the demo's chain the held-out Dice and the embedding's consistency were those
      of float32 (one float32 seed fine-tuned worse), and float32 models segmented alike on 99.98%
      of voxels. In the
      low-label benchmark's small setting bf16 pretraining gained less over random init (docs/
      results.md), so that benchmark runs in float32 unless asked.
    * ``fuse_batchnorm``: inference runs a copy of the model whose BatchNorm layers are folded
      into the convolutions before them (one pass less over every activation). None (the
      default) means on for the CPU and off elsewhere until measured. On this project's CPU,
      on top of channels_last, four pairs of runs gave +18%, +20%, +17% and -1% at 256 x 256
      and +3%, +4%, -6% and +8% at 128 (runs differ by 15-20%); alone, 1.25-1.41x.
    """

    channels_last: bool | None = None
    compile: str = "auto"
    data_on_device: bool = False
    prefetch: bool = False
    cudnn_benchmark: bool = False
    fuse_batchnorm: bool | None = None
    cpu_bf16: bool | None = None
    pad_channels: bool = False
    defer_metrics: bool = False

    def channels_last_on(self, device: torch.device) -> bool:
        """Whether channels_last applies on ``device`` (None: on the CPU and CUDA, where it was measured)."""
        return self.channels_last if self.channels_last is not None else device.type in ("cpu", "cuda")

    def fuse_batchnorm_on(self, device: torch.device) -> bool:
        """Whether inference folds BatchNorm into the convolutions on ``device`` (None: on the CPU)."""
        return self.fuse_batchnorm if self.fuse_batchnorm is not None else device.type == "cpu"

    def cpu_bf16_on(self, device: torch.device) -> bool:
        """Whether a run on ``device`` autocasts to bfloat16 on the CPU (None: where it has AMX)."""
        if device.type != "cpu":
            return False
        return self.cpu_bf16 if self.cpu_bf16 is not None else cpu_has_amx()

    def compile_mode(self, device: torch.device, pretraining: bool = False, work: float = 0) -> str:
        """The ``torch.compile`` mode for a run on ``device`` ("off": eager); whether it is
        ``pretraining`` and its ``work`` (steps x slices per step x pixels per slice) decide
        what "auto" means."""
        if self.compile != "auto":
            return self.compile
        long_pretraining = pretraining and work >= AUTO_COMPILE_MIN_WORK
        return "default" if device.type == "cuda" and long_pretraining else "off"

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            from coral_core.errors import UserError

            raise UserError(f"--compile {self.compile}: unknown mode; use one of {', '.join(COMPILE_MODES)}")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), which run bfloat16
    convolutions natively."""
    import torch

    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a private probe: absent or failing means no
        return False


def apply_layout(module: torch.nn.Module, levers: Levers | None) -> torch.nn.Module:
    """Convert ``module`` to channels_last in place when the levers ask for it on the device
    its parameters are on, and set cuDNN's autotuning (``levers`` None: the defaults)."""
    import torch

    levers = levers or Levers()
    device = next(module.parameters()).device
    channels_last = levers.channels_last_on(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if device.type == "cuda":  # process-wide: set either way, so one run's choice does not leak into the next
        torch.backends.cudnn.benchmark = levers.cudnn_benchmark
    set_channel_padding(module, levers.pad_channels, channels_last)
    return module


def set_channel_padding(module: torch.nn.Module, on: bool, channels_last: bool = False) -> torch.nn.Module:
    """Turn ``pad_channels`` on or off (set either way, like cuDNN's autotuning) for every
    convolution of ``module`` with fewer than 8 input channels, in place."""
    from torch import nn

    from coral_core.model import ChannelPaddedConv2d

    for conv in module.modules():
        if type(conv) in (nn.Conv2d, ChannelPaddedConv2d) and conv.in_channels % 8 and conv.groups == 1:
            conv.__class__ = ChannelPaddedConv2d if on else nn.Conv2d
            conv.padded_layout = "channels_last" if channels_last else "contiguous"
    return module


def apply_compile(module: torch.nn.Module, levers: Levers | None, pretraining: bool = False, work: float = 0):
    """``torch.compile(module)`` in the mode the levers give for this run (see
    :meth:`Levers.compile_mode`), or ``module`` itself when that is "off". Under "auto" a
    compile that fails on the first call, forward or backward, leaves the run eager, with a warning."""
    import torch

    levers = levers or Levers()
    device = next(module.parameters()).device
    mode = levers.compile_mode(device, pretraining, work)
    if mode == "off":
        return module
    compiled = torch.compile(module, mode=None if mode == "default" else mode)
    return _EagerIfCompileFails(module, compiled) if levers.compile == "auto" else compiled


class _EagerIfCompileFails:
    """Calls the compiled module; if its first call fails (no Triton for this GPU, no C
    compiler, an operator the compiler cannot handle, C++ the compiler wrote and g++ rejects), warns and calls
    the eager one from then on. torch compiles the backward at the first backward, after this call has returned:
    when the first call builds a graph, a forward and backward of its own are tried first (their gradients and
    BatchNorm statistics thrown away), so that a backward that fails to compile is caught too (torch 2.7.1's C++
    for this U-Net's backward did not compile on a CPU with AVX-512). The try has a graph of its own: a second
    backward through the caller's graph (``retain_graph``) gave wrong gradients in torch 2.13's compiled backward."""

    def __init__(self, eager, compiled) -> None:
        self.eager, self.compiled, self.state = eager, compiled, "untried"

    def __call__(self, *args, **kwargs):
        from coral_core.device import OutOfMemoryError

        if self.state == "works":
            return self.compiled(*args, **kwargs)
        if self.state == "failed":
            return self.eager(*args, **kwargs)
        buffers = [(b, b.clone()) for b in self.eager.buffers()]  # BatchNorm's statistics: a failed try undone
        try:
            self._compile_backward(*args, **kwargs)
            self._restore(buffers)
            out = self.compiled(*args, **kwargs)
        except OutOfMemoryError:
            self._restore(buffers)
            raise  # the step's own out-of-memory handling decides
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager module still works
            import warnings

            self._restore(buffers)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(f"torch.compile failed ({reason}); going on without it (--compile off skips trying)",
                          RuntimeWarning, stacklevel=2)
            self.state = "failed"
            return self.eager(*args, **kwargs)
        self.state = "works"
        return out

    def _compile_backward(self, *args, **kwargs) -> None:
        """A forward and backward of the compiled module when gradients are being recorded, the gradients thrown
        away: torch compiles the backward here."""
        import torch

        params = [p for p in self.eager.parameters() if p.requires_grad]
        if not (params and torch.is_grad_enabled()):
            return
        # under DDP the gradients asked for here run no hook: nothing is reduced across processes
        outputs = [t for t in _tensors(self.compiled(*args, **kwargs)) if t.requires_grad]
        if outputs:
            torch.autograd.grad(outputs, params, [torch.ones_like(t) for t in outputs], allow_unused=True)

    @staticmethod
    def _restore(buffers: list) -> None:
        import torch

        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)


def _tensors(out) -> list:
    """The tensors in a module's output: a tensor, or tuples, lists and dicts of them."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def apply_levers(module: torch.nn.Module, levers: Levers | None):
    """Both of the above for inference and fine-tuning: the callable to run (``module``
    converted in place)."""
    return apply_compile(apply_layout(module, levers), levers)


def for_inference(model: torch.nn.Module, levers: Levers | None, device: torch.device) -> torch.nn.Module:
    """The model inference should run on ``device``: ``model`` itself, or, when the levers fold
    BatchNorm there, an evaluation-mode copy with every (Conv2d, BatchNorm2d) pair of a
    ``Sequential`` replaced by one convolution (``model`` is left as it is). The copy is kept
    and returned again while ``model``'s weights stay the same."""
    import copy

    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not (levers or Levers()).fuse_batchnorm_on(device):
        return model
    signature = _weights_signature(model, device)
    cached = _FOLDED.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                conv, norm = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module._modules[first] = fuse_conv_bn_eval(conv, norm)
                    module._modules[second] = nn.Identity()
    _FOLDED[model] = (signature, fused)
    return fused


# The folded copy of each model, reused while its weights stay the same: folding took 20 ms for
# the bundled demo model on this project's CPU, a fifth of segmenting a 32-slice volume.
_FOLDED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_signature(model, device) -> tuple:
    """What tells a model's weights apart from what they were: each parameter's and buffer's
    storage, in-place version and sum (the sum also catches writes through ``.data``)."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    with torch.no_grad():
        sums = torch.stack([t.detach().double().sum() for t in tensors]).tolist() if tensors else []
    return (str(device), tuple((t.data_ptr(), t._version) for t in tensors), tuple(sums))


def contiguous_layout(module: torch.nn.Module) -> torch.nn.Module:
    """Undo channels_last and channel padding (the model as built, e.g. before saving)."""
    import torch

    return set_channel_padding(module.to(memory_format=torch.contiguous_format), False)


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
# ("data_on_device" and "prefetch" concern pretraining only, "cpu_bf16" the CPU only).
LEVER_VARIANTS: dict[str, Levers] = {
    "none": Levers(channels_last=False, compile="off", fuse_batchnorm=False, cpu_bf16=False),
    "channels_last": Levers(channels_last=True, compile="off", fuse_batchnorm=False, cpu_bf16=False),
    "data_on_device": Levers(channels_last=False, compile="off", data_on_device=True, fuse_batchnorm=False, cpu_bf16=False),
    "compile": Levers(channels_last=False, compile="default", fuse_batchnorm=False, cpu_bf16=False),
    "compile reduce-overhead": Levers(channels_last=False, compile="reduce-overhead", fuse_batchnorm=False, cpu_bf16=False),
    "all (compile default)": Levers(channels_last=True, compile="default", data_on_device=True, fuse_batchnorm=True, cpu_bf16=False),
    "cudnn_benchmark": Levers(channels_last=False, compile="off", cudnn_benchmark=True, fuse_batchnorm=False, cpu_bf16=False),
    "prefetch": Levers(channels_last=False, compile="off", prefetch=True, fuse_batchnorm=False, cpu_bf16=False),
    "fuse_batchnorm": Levers(channels_last=False, compile="off", fuse_batchnorm=True, cpu_bf16=False),
    "cpu_bf16": Levers(channels_last=False, compile="off", fuse_batchnorm=False, cpu_bf16=True),
    "defaults": Levers(),  # what a run gets without options (pretraining: a long run's)
    "defaults + prefetch": Levers(prefetch=True),
    "defaults + cpu_bf16": Levers(cpu_bf16=True),
    "defaults + float32": Levers(cpu_bf16=False),  # the defaults without bf16, on a CPU where it is on by default
    "pad_channels": Levers(channels_last=False, compile="off", pad_channels=True, fuse_batchnorm=False, cpu_bf16=False),
    "defaults + pad_channels": Levers(pad_channels=True),
    "defaults + fuse_batchnorm": Levers(fuse_batchnorm=True),  # BatchNorm folded on a GPU too
    "defaults + defer_metrics": Levers(defer_metrics=True),
    "defaults + prefetch + defer_metrics": Levers(prefetch=True, defer_metrics=True),
}
