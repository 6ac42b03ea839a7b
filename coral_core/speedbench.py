"""Speed of the engine where users feel it, next to a baseline run the way the published code runs.

Three measurements, each taken for our engine and for the baseline in the same process, on
the same data and model:

* pretraining throughput (slices/s, two views per slice), end to end per step: taking the
  batch from the preloaded slices, moving it to the device, augmenting, forward, CORAL loss,
  backward, optimiser step; measured over the steps after a warm-up;
* inference throughput (slices/s) of :func:`coral_core.infer.segment_volume` on a volume
  whose slices are the model's input size (NumPy in, labels of the volume's shape out);
* fine-tuning wall time for a number of steps on a few annotated slices.

The baseline is configured like the published CORAL/PCL code: float32, eager, and the same
augmentation transforms applied slice by slice on the CPU before the batch moves to the device.
It uses our loss (the published O(N^3) form would measure the loss, which
``benchmarks/loss_bench.py`` already does) so that the difference is the engine's.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from coral_core.augment import AugmentConfig, augment_batch
from coral_core.data import PretrainSlices, resize_slices
from coral_core.device import resolve_device
from coral_core.errors import UserError
from coral_core.finetune import FinetuneConfig, finetune, segmentation_loss
from coral_core.infer import segment_volume
from coral_core.levers import AUTO_COMPILE_MIN_WORK, LEVER_VARIANTS, Levers
from coral_core.losses import CoralLoss
from coral_core.model import UNet, UNetConfig, build_model
from coral_core.pretrain import PretrainConfig, pretrain

__all__ = [
    "SpeedConfig", "run_speed", "format_speed_table", "model_flops", "peak_flops", "measure_pretrain",
    "measure_inference", "measure_finetune", "LEVER_VARIANTS", "run_levers", "format_levers_table",
]

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU.
_PEAK_BF16 = {"H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H200": 989.4e12,
              "A100": 312e12}


@dataclass
class SpeedConfig:
    """The defaults are the GPU protocol (issue 6); :meth:`quick` fits a 2-core CPU."""

    image_size: int = 352
    base_filters: int = 48
    pretrain_batch: int = 64
    pretrain_steps: int = 30  # timed steps, after the warm-up
    warmup_steps: int = 5
    infer_sizes: tuple[int, ...] = (352, 512)
    infer_slices: int = 200
    infer_batch: int = 50
    repeats: int = 3  # inference passes timed (the median is reported), after one warm-up pass
    finetune_steps: int = 200
    finetune_slices: int = 3
    finetune_batch: int = 8
    finetune_size: int = 128  # the bundled demo model's input size
    finetune_base_filters: int = 16
    baseline: bool = True
    device: str = "auto"
    peak_tflops: float | None = None  # overrides the table above (MFU); CPUs have no entry
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    levers: Levers = field(default_factory=Levers)  # ours only; the baseline is eager fp32

    @classmethod
    def quick(cls, **overrides) -> "SpeedConfig":
        base = dict(image_size=128, base_filters=16, pretrain_batch=16, pretrain_steps=8, warmup_steps=2,
                    infer_sizes=(128, 256), infer_slices=32, infer_batch=16, repeats=2)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, when known (for MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def model_flops(config: UNetConfig, training: bool) -> float:
    """FLOPs of one slice through the model: the embedder, forward and backward, for
    pretraining; the full U-Net forward for inference (counted by PyTorch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(config)
    x = torch.zeros(1, config.in_channels, config.image_size, config.image_size, requires_grad=training)
    with FlopCounterMode(display=False) as counter:
        if training:
            model.embed(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return float(counter.get_total_flops())


def _cohort(n_slices: int, seed: int) -> list[np.ndarray]:
    """Phantom volumes with at least ``n_slices`` slices in all (the content does not change speed)."""
    from coral_core.phantom import make_phantom

    volumes = _COHORTS.setdefault(seed, [])  # the same phantoms in the same order: a prefix is a smaller cohort
    total, i = 0, 0
    while total < n_slices:
        if i == len(volumes):
            volumes.append(make_phantom(seed + i)[0].array)
        total += volumes[i].shape[0]
        i += 1
    return volumes[:i]


_COHORTS: dict[int, list[np.ndarray]] = {}  # a sweep measures the same cohorts many times


# --------------------------------------------------------------------------- pretraining


def _pretrain_ours(cfg: SpeedConfig, volumes: list[np.ndarray], model_cfg: UNetConfig,
                   step_seconds: list[float] | None = None) -> float:
    stamps: list[float] = []
    n_slices = sum(v.shape[0] for v in volumes)
    steps = cfg.warmup_steps + cfg.pretrain_steps
    epochs = -(-(steps + 1) // max(1, n_slices // cfg.pretrain_batch))
    stop = threading.Event()

    def on_step(step, total, metrics):  # metrics are floats: the step has finished on the device
        stamps.append(time.perf_counter())
        if len(stamps) > steps:
            stop.set()

    # what a long run does: under "auto" it compiles on a GPU, which this short one would not
    device = resolve_device(cfg.device)
    levers = replace(cfg.levers, compile=cfg.levers.compile_mode(device, pretraining=True, work=AUTO_COMPILE_MIN_WORK))
    pre = PretrainConfig(method="coral", epochs=epochs, batch_size=cfg.pretrain_batch, seed=cfg.seed,
                         device=cfg.device, model=model_cfg, augment=cfg.augment, levers=levers)
    pretrain(pre, volumes, on_step, stop)
    timed = stamps[cfg.warmup_steps : steps + 1]
    if step_seconds is not None:
        step_seconds.extend(np.diff(timed).tolist())
    return cfg.pretrain_batch * (len(timed) - 1) / (timed[-1] - timed[0])


def _pretrain_baseline(cfg: SpeedConfig, volumes: list[np.ndarray], model_cfg: UNetConfig, device) -> float:
    torch.manual_seed(cfg.seed)
    data = PretrainSlices(volumes, model_cfg.image_size)
    model = build_model(model_cfg).to(device).train()
    loss_fn = CoralLoss(model_cfg.embedding_dim).to(device)
    params = list(model.encoder.parameters()) + list(model.projection.parameters()) + list(loss_fn.parameters())
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    cpu_gen = torch.Generator().manual_seed(cfg.seed)
    stamps = []
    for step in range(cfg.warmup_steps + cfg.pretrain_steps + 1):
        idx = torch.randint(0, len(data), (cfg.pretrain_batch,), generator=cpu_gen)
        # slice by slice on the CPU, as a Dataset's __getitem__ would, two views each
        views = [augment_batch(data.images[i : i + 1], config=cfg.augment, generator=cpu_gen)[0]
                 for _ in range(2) for i in idx.tolist()]
        x = torch.cat(views).to(device)
        z = model.embed(x)
        features = z.view(2, cfg.pretrain_batch, -1).transpose(0, 1)
        loss = loss_fn(features, data.positions[idx].to(device)).total
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        float(loss.detach())  # the published loop logs the loss every step
        stamps.append(time.perf_counter())
    timed = stamps[cfg.warmup_steps :]
    return cfg.pretrain_batch * (len(timed) - 1) / (timed[-1] - timed[0])


# --------------------------------------------------------------------------- inference


def _segment_baseline(model: UNet, volume: np.ndarray, device, batch_size: int) -> np.ndarray:
    out = np.zeros(volume.shape, dtype=np.uint8)
    slices = resize_slices(volume, model.config.image_size)
    with torch.no_grad():
        for start in range(0, len(slices), batch_size):
            logits = model(slices[start : start + batch_size].to(device))
            logits = F.interpolate(logits, size=volume.shape[1:], mode="bilinear", align_corners=False)
            out[start : start + batch_size] = logits.argmax(1).cpu().numpy()
    return out


def _median_seconds(fn: Callable[[], object], repeats: int, device) -> float:
    fn()  # warm-up: kernels chosen, memory pools filled
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------- fine-tuning


def _finetune_baseline(cfg: SpeedConfig, model: UNet, image, labels, slices, device) -> None:
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model).to(device).train()
    x_all = resize_slices(image, model.config.image_size, slices)
    y_all = F.interpolate(torch.from_numpy(labels[slices]).float()[:, None], size=x_all.shape[-2:],
                          mode="nearest")[:, 0].long()
    optimiser = torch.optim.AdamW(model.parameters(), lr=FinetuneConfig.lr, weight_decay=1e-4)
    cpu_gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.finetune_steps):
        idx = torch.randint(0, len(x_all), (cfg.finetune_batch,), generator=cpu_gen).tolist()
        pairs = [augment_batch(x_all[i : i + 1], y_all[i : i + 1], cfg.augment, cpu_gen) for i in idx]
        x = torch.cat([p[0] for p in pairs]).to(device)
        y = torch.cat([p[1] for p in pairs]).to(device)
        loss = segmentation_loss(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        float(loss.detach())


# --------------------------------------------------------------------------- the run


def measure_pretrain(cfg: SpeedConfig, step_seconds: list[float] | None = None) -> tuple[float, float | None]:
    """Pretraining slices/s at ``cfg.image_size`` and ``cfg.pretrain_batch``: ours, and the
    baseline's (None without ``cfg.baseline``). ``step_seconds``, if given, receives the wall
    time of each of our timed steps (the rate is their mean; a stall shows in their spread)."""
    device = resolve_device(cfg.device)
    model_cfg = UNetConfig(base_filters=cfg.base_filters, image_size=cfg.image_size)
    volumes = _cohort(cfg.pretrain_batch * 4, cfg.seed)
    ours = _pretrain_ours(cfg, volumes, model_cfg, step_seconds)
    return ours, _pretrain_baseline(cfg, volumes, model_cfg, device) if cfg.baseline else None


def measure_inference(cfg: SpeedConfig, size: int) -> tuple[float, float | None]:
    """Seconds to segment ``cfg.infer_slices`` slices of ``size`` x ``size`` (median of
    ``cfg.repeats``): ours, and the baseline's (None without ``cfg.baseline``)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = build_model(UNetConfig(base_filters=cfg.base_filters, image_size=size, n_classes=4)).to(device).eval()
    volume = np.random.default_rng(cfg.seed).random((cfg.infer_slices, size, size), dtype=np.float32)
    ours = _median_seconds(lambda: segment_volume(net, volume, device, cfg.infer_batch, levers=cfg.levers),
                           cfg.repeats, device)
    if not cfg.baseline:
        return ours, None
    # the levers converted ``net`` in place; the baseline runs a copy in the default layout
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    return ours, _median_seconds(lambda: _segment_baseline(plain, volume, device, cfg.infer_batch), cfg.repeats, device)


def measure_finetune(cfg: SpeedConfig, coral_model: bool = False) -> tuple[float, float | None]:
    """Wall seconds of ``cfg.finetune_steps`` fine-tuning steps on ``cfg.finetune_slices``
    slices of a phantom (what a user waits for, compiling included when it is on): ours, and
    the baseline's (None without ``cfg.baseline``). ``coral_model``: the model has a canonical
    direction, as a CORAL-pretrained one does, so our fine-tuning also keeps its embedding."""
    from coral_core.phantom import make_phantom

    device = resolve_device(cfg.device)
    image, labels = (v.array for v in make_phantom(cfg.seed + 1000))
    slices = np.linspace(1, image.shape[0] - 2, cfg.finetune_slices).round().astype(int).tolist()
    torch.manual_seed(cfg.seed)
    net = build_model(UNetConfig(base_filters=cfg.finetune_base_filters, image_size=cfg.finetune_size, n_classes=4))
    if coral_model:
        net.canonical_direction.copy_(F.normalize(torch.randn(net.config.embedding_dim), dim=0))
    ft = FinetuneConfig(steps=cfg.finetune_steps, batch_size=cfg.finetune_batch, validate_every=0, seed=cfg.seed,
                        device=cfg.device, augment=cfg.augment, levers=cfg.levers)
    _sync(device)
    t = time.perf_counter()
    finetune(ft, net, [image], [labels], [slices])
    _sync(device)
    ours = time.perf_counter() - t
    if not cfg.baseline:
        return ours, None
    t = time.perf_counter()
    _finetune_baseline(cfg, net, image, labels, slices, device)
    _sync(device)
    return ours, time.perf_counter() - t


def run_speed(cfg: SpeedConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Measure everything; returns ``{"rows": [...], "config": {...}, "device": ...}``."""
    say = progress or (lambda text: None)
    device = resolve_device(cfg.device)
    peak = peak_flops(device, cfg.peak_tflops)
    rows = []

    def row(task, size, unit, ours, baseline, flops_per_item=None):
        r = {"task": task, "size": size, "unit": unit, "ours": ours, "baseline": baseline,
             "speedup": (ours / baseline if unit == "slices/s" else baseline / ours) if baseline else None}
        if flops_per_item and unit == "slices/s":
            r["tflops"] = ours * flops_per_item / 1e12
            r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
        rows.append(r)
        say(format_speed_table({"rows": [r]}, header=False))  # each row as it comes: a run stopped early still reports

    model_cfg = UNetConfig(base_filters=cfg.base_filters, image_size=cfg.image_size)
    say(f"pretraining: {cfg.image_size} px, {cfg.base_filters} filters, batch {cfg.pretrain_batch}")
    ours, base = measure_pretrain(cfg)
    # two views per slice: a slice costs two embedder passes
    row("pretrain", cfg.image_size, "slices/s", ours, base, 2 * model_flops(model_cfg, training=True))

    for size in cfg.infer_sizes:
        say(f"inference at {size} px, {cfg.infer_slices} slices")
        ours_s, base_s = measure_inference(cfg, size)
        flops = model_flops(UNetConfig(base_filters=cfg.base_filters, image_size=size, n_classes=4), training=False)
        row("inference", size, "slices/s", cfg.infer_slices / ours_s, cfg.infer_slices / base_s if base_s else None,
            flops)
        row("segment volume", size, "s", ours_s, base_s)

    say(f"fine-tuning {cfg.finetune_steps} steps on {cfg.finetune_slices} slices")
    ours_s, base_s = measure_finetune(cfg)
    row(f"fine-tune {cfg.finetune_steps} steps", cfg.finetune_size, "s", ours_s, base_s)
    say("fine-tuning a CORAL model (its embedding kept)")
    ours_s, _ = measure_finetune(replace(cfg, baseline=False), coral_model=True)
    row("fine-tune, CORAL model", cfg.finetune_size, "s", ours_s, None)

    return {"rows": rows, "config": asdict(cfg), "device": _device_info(device, peak)}


def _device_info(device: torch.device, peak: float | None = None) -> dict:
    return {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "peak_tflops": peak / 1e12 if peak else None}


# --------------------------------------------------------------------------- levers

def run_levers(cfg: SpeedConfig, variants: list[str] | None = None,
               progress: Callable[[str], None] | None = None) -> dict:
    """Our engine with each speed lever switched on, next to none, in one process: pretraining
    slices/s, inference slices/s at each of ``cfg.infer_sizes``, and fine-tuning wall seconds for
    the variants that do not compile (a lever that concerns only pretraining or only inference is
    measured there alone). ``cfg.levers`` is ignored."""
    say = progress or (lambda text: None)
    device = resolve_device(cfg.device)
    names = list(variants or LEVER_VARIANTS)
    unknown = [n for n in names if n not in LEVER_VARIANTS]
    if unknown:
        raise UserError(f"unknown lever variant {unknown[0]!r}; choose from {', '.join(map(repr, LEVER_VARIANTS))}")
    rows = []
    for name in names:
        levers = LEVER_VARIANTS[name]
        run = replace(cfg, levers=levers, baseline=False)
        say(f"levers: {name}")
        torch._dynamo.reset()  # each variant compiles afresh: no graphs carried over
        row = {"levers": name, "pretrain_slices_s": None, "finetune_s": None}
        row.update({f"inference_{size}_slices_s": None for size in cfg.infer_sizes})
        if name not in _INFERENCE_ONLY:
            steps: list[float] = []
            row["pretrain_slices_s"], _ = measure_pretrain(run, steps)
            # the spread of the timed steps: a one-off stall (a recompile, say) shows in the slowest
            row["pretrain_step_ms"] = {"median": 1e3 * float(np.median(steps)), "min": 1e3 * min(steps),
                                       "max": 1e3 * max(steps)}
        if name not in _PRETRAINING_ONLY:
            for size in cfg.infer_sizes:
                seconds, _ = measure_inference(run, size)
                row[f"inference_{size}_slices_s"] = cfg.infer_slices / seconds
            # Compiling alone took 11-20 s for the fine-tuning model on a 2-core CPU: more than the
            # whole 10 s GPU target for 200 steps, so compiled fine-tuning is not measured.
            if levers.compile_mode(device) == "off" and name not in _INFERENCE_ONLY:
                row["finetune_s"], _ = measure_finetune(run)
        rows.append(row)
        spread = row.get("pretrain_step_ms")
        say(f"levers {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))
            + (f"; pretraining step ms median {spread['median']:.1f}, min {spread['min']:.1f}, max {spread['max']:.1f}"
               if spread else ""))
    return {"rows": rows, "config": asdict(cfg), "device": _device_info(device)}


_PRETRAINING_ONLY = {"data_on_device", "prefetch", "defaults + prefetch", "defaults + defer_metrics",
                     "defaults + prefetch + defer_metrics"}  # levers that change nothing else
_INFERENCE_ONLY = {"fuse_batchnorm", "defaults + fuse_batchnorm"}


def format_levers_table(result: dict) -> str:
    base = next((r for r in result["rows"] if r["levers"] == "none"), None)

    def cell(r, key, fmt, higher_is_better=True):
        value = r.get(key)
        if value is None:
            return "-"
        text = fmt.format(value)
        if base is not None and base.get(key) and r is not base:
            ratio = value / base[key] if higher_is_better else base[key] / value
            text += f" ({ratio:.2f}x)"
        return text

    sizes = result["config"]["infer_sizes"]
    head = (f"{'levers':<26}{'pretrain slices/s':>20}" + "".join(f"{f'infer sl/s @{size}':>20}" for size in sizes)
            + f"{'fine-tune s':>18}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['levers']:<26}{cell(r, 'pretrain_slices_s', '{:.1f}'):>20}"
                     + "".join(f"{cell(r, f'inference_{size}_slices_s', '{:.1f}'):>20}" for size in sizes)
                     + f"{cell(r, 'finetune_s', '{:.2f}', False):>18}")
    return "\n".join(lines)


def format_speed_table(result: dict, header: bool = True) -> str:
    head = f"{'task':<22}{'size':>6}{'unit':>10}{'ours':>12}{'baseline':>12}{'speed-up':>10}{'TFLOP/s':>10}{'MFU':>8}"
    lines = [head, "-" * len(head)] if header else []
    for r in result["rows"]:
        fmt = (lambda v: f"{v:.1f}") if r["unit"] == "slices/s" else (lambda v: f"{v:.3f}")
        base = fmt(r["baseline"]) if r["baseline"] else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        tflops = f"{r['tflops']:.2f}" if r.get("tflops") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"{r['task']:<22}{r['size']:>6}{r['unit']:>10}{fmt(r['ours']):>12}{base:>12}{speedup:>10}"
                     f"{tflops:>10}{mfu:>8}")
    return "\n".join(lines)
