"""Model checkpoints: one ``.safetensors`` file, weights plus a JSON description.

The JSON (safetensors metadata key ``coral``) says what the file is and how to rebuild the
model from it alone: format name and version, the architecture, class names, intensity
normalisation and how the model was trained. Loading never unpickles: a legacy ``.pth``
is read only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from importlib import resources
from pathlib import Path

import torch

from coral_core.errors import UserError
from coral_core.fileio import atomic_target
from coral_core.model import UNet, UNetConfig

__all__ = ["save_checkpoint", "load_checkpoint", "describe_checkpoint", "training_summary", "bundled_model_path",
           "pretrained_only", "FORMAT_NAME", "FORMAT_VERSION", "NORMALISATION"]

FORMAT_NAME = "napari-coral"
FORMAT_VERSION = 1
NORMALISATION = {"method": "percentile", "low": 0.5, "high": 99.5, "range": [0.0, 1.0]}
_MAX_HEADER_BYTES = 16 * 1024 * 1024


def bundled_model_path() -> Path:
    """The small CORAL-pretrained, phantom-fine-tuned demo model shipped in the package."""
    return Path(str(resources.files("coral_core") / "assets" / "demo_model.safetensors"))


def pretrained_only(meta: dict) -> bool:
    """Whether a checkpoint's metadata says it comes straight from pretraining: an encoder (and
    projection head) trained on slice positions, whose segmentation head has not been trained."""
    return (meta.get("training") or {}).get("stage") == "pretrain"


def save_checkpoint(
    path: str | os.PathLike, model: UNet, training: dict | None = None, half: bool = False
) -> Path:
    """Write ``model`` with its description, atomically.

    Parameters
    ----------
    training : dict, optional
        Provenance (method, epochs, data, seed, ...), stored as given (JSON-serialisable).
    half : bool
        Store floating tensors as float16 (half the size; loaded back as float32).
    """
    from safetensors.torch import save_file

    from coral_core import __version__

    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "software": {"napari_coral": __version__},
        "architecture": model.config.to_dict(),
        "class_names": list(model.config.class_names),
        "normalisation": NORMALISATION,
        "training": training or {},
    }
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.half()
        tensors[name] = t.contiguous()
    with atomic_target(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"coral": json.dumps(meta)})
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Rebuild a model from a checkpoint file; returns ``(model, metadata)``.

    Anything that is not a well-formed checkpoint of this format raises :class:`UserError`
    with one sentence; no code in the file is ever executed.
    """
    p = Path(path)
    state, meta = _read_checkpoint(p)
    return _model_from(p, state, meta).to(map_location).eval(), meta


def _read_checkpoint(p: Path) -> tuple[dict, dict]:
    """A checkpoint file's tensors, as stored, and its metadata."""
    if p.is_dir():
        models = sorted(f.name for f in p.glob("*.safetensors"))
        which = f" (it holds {', '.join(models[:3])}{', ...' if len(models) > 3 else ''})" if models else ""
        raise UserError(f"{p}: is a folder, not a model{which}; give the model's .safetensors file")
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint file; check the path")
    kind = _image_kind(p)
    if kind:
        raise UserError(f"{p}: this is {kind}, not a model; give a .safetensors model that coral pretrain or "
                        "coral finetune wrote")
    state, meta = _read_legacy(p) if p.suffix in (".pth", ".pt") else _read_safetensors(p)
    if not isinstance(meta, dict):
        raise UserError(f"{p}: checkpoint description is not a JSON object; the file is damaged")
    training = meta.get("training")
    if training is not None and not isinstance(training, dict):  # provenance only: the weights are still good
        import warnings

        warnings.warn(f"{p}: its training record is not a JSON object; the model is read without it", stacklevel=3)
        meta = {**meta, "training": {}}
    return state, meta


def _model_from(p: Path, state: dict, meta: dict) -> UNet:
    """The U-Net that ``meta`` describes, holding ``state``; refused when the tensors do not fit it."""
    config = _config_from(meta, p)
    try:
        with torch.device("meta"):  # shapes only: a damaged header's huge architecture allocates nothing
            expected = UNet(config).state_dict()
    except (RuntimeError, OverflowError) as exc:  # sizes past what torch can count
        raise UserError(f"{p}: checkpoint architecture is invalid ({str(exc)[:80]}); the file is damaged") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        what = (
            f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else f"wrong shapes for {wrong[:3]}"
        )
        raise UserError(f"{p}: tensors do not match the architecture its header describes ({what}); the file is damaged or not a napari-coral model")
    model = UNet(config)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What a checkpoint file holds, as plain values: its classes, architecture, physical scale, size, how its
    weights are stored, and how it was trained (its ``training`` record as saved, and a sentence of it). The file
    is checked as :func:`load_checkpoint` checks it, and is refused in the same sentences."""
    p = Path(path)
    state, meta = _read_checkpoint(p)
    model = _model_from(p, state, meta)
    cfg = model.config
    stored = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    training = meta.get("training") or {}
    return {
        "path": str(p),
        "bytes": p.stat().st_size,
        "weights": "/".join(sorted(stored)) if stored else "unknown",
        "parameters": sum(t.numel() for t in model.parameters()),
        "classes": list(cfg.class_names[1:]),
        "architecture": cfg.to_dict(),
        "pixel_spacing": cfg.pixel_spacing,
        "field_of_view_mm": cfg.image_size * cfg.pixel_spacing if cfg.pixel_spacing is not None else None,
        "canonical_direction": model.has_direction,
        "pretrained_only": pretrained_only(meta),
        "trained": training_summary(training),
        "training": training,
        "software": meta.get("software"),
    }


def training_summary(training: dict) -> str:
    """A checkpoint's ``training`` record in a sentence: what stage made it, from what, on how much."""
    try:
        return _summary(training)
    except (TypeError, ValueError, AttributeError):  # a record edited or written by another program
        return "a training record not in napari-coral's form"


def _summary(training: dict) -> str:
    stage = training.get("stage")
    if stage == "pretrain":
        word = "subject" if "subjects" in training else "volume"
        volumes = training.get(f"{word}s")
        n = len(volumes) if isinstance(volumes, list) else volumes
        text = f"{training.get('method', 'unknown')} pretraining"
        if training.get("epochs") is not None:
            text += f" for {training['epochs']} epoch{'s' * (training['epochs'] != 1)}"
        return text + (f" on {n} {word}{'s' * (n != 1)}" if isinstance(n, int) else "")
    if stage == "finetune":
        steps = training.get("steps", (training.get("finetune") or {}).get("steps"))
        text = "fine-tuned" + (f" for {steps} steps" if steps is not None else "")
        if "images" in training:
            text += f" on {sum(len(s) for s in training.get('slices', []))} slices of {len(training['images'])} images"
        elif "image" in training:
            text += f" on {len(training.get('slices', []))} slices of {Path(str(training['image'])).name}"
        elif isinstance(training.get("finetune"), dict) and "subjects" in training["finetune"]:
            text += f" on {training['finetune']['subjects']} subjects"
        if isinstance(training.get("structures"), list):  # coral finetune --structures
            text += f" (structures {', '.join(map(str, training['structures']))})"
        if training.get("command"):
            text += f" by {training['command']}"
        pre = training.get("pretrain")
        if isinstance(pre, dict):
            return text + f", from {_summary({'stage': 'pretrain', **pre})}"
        init = training.get("init")
        if init == "random":
            return text + ", from random weights"
        return text + (f", from {Path(str(init)).name}" if init else "")
    return "no training record (a model not written by coral pretrain, coral finetune or the plugin)"


_IMAGE_NAMES = {".nii": "a NIfTI image", ".nii.gz": "a NIfTI image", ".mha": "an MHA image", ".mhd": "an MHD image",
                ".nrrd": "an NRRD image", ".dcm": "a DICOM file", ".npy": "a NumPy array"}


def _image_kind(p: Path) -> str | None:
    """What kind of image ``p`` is, by its name or its first bytes (a volume given where a model belongs),
    else None."""
    name = p.name.lower()
    for ending, kind in _IMAGE_NAMES.items():
        if name.endswith(ending):
            return kind
    with open(p, "rb") as fh:
        head = fh.read(348)
    if head[8:9] == b"{":  # a safetensors file: an 8-byte length, then its JSON header
        return None
    if head[:2] == b"\x1f\x8b":
        return "a gzip-compressed file"
    if head[344:348] in (b"n+1\0", b"ni1\0"):
        return "a NIfTI image"
    if head[:4] == b"NRRD":
        return "an NRRD image"
    if head[:10] == b"ObjectType" or head[:6] == b"NDims ":
        return "an MHA image"
    if head[128:132] == b"DICM":
        return "a DICOM file"
    return None


def _read_safetensors(p: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with open(p, "rb") as fh:
        head = fh.read(8)
    size = p.stat().st_size
    if len(head) < 8:
        raise UserError(f"{p}: file is too short to be a checkpoint; it is truncated or empty")
    header_len = int.from_bytes(head, "little")
    if header_len > min(_MAX_HEADER_BYTES, size - 8) and p.suffix != ".safetensors":  # another kind of file
        raise UserError(f"{p}: not a model file (no safetensors header); give a .safetensors model that coral pretrain "
                        "or coral finetune wrote")
    if header_len > min(_MAX_HEADER_BYTES, size - 8):
        raise UserError(f"{p}: checkpoint header claims {header_len} bytes, more than the file holds; the file is damaged")
    try:
        with open(p, "rb") as fh:
            fh.seek(8)
            header = json.loads(fh.read(header_len))
        meta_json = (header.get("__metadata__") or {}).get("coral")
        state = load_file(str(p))
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError, AttributeError) as exc:
        raise UserError(f"{p}: not a readable safetensors checkpoint ({str(exc)[:100]}); the file is damaged") from None
    if meta_json is None:
        raise UserError(f"{p}: safetensors file has no napari-coral description; it was not written by napari-coral")
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError:
        raise UserError(f"{p}: checkpoint description is not valid JSON; the file is damaged") from None
    return state, meta


def _read_legacy(p: Path) -> tuple[dict, dict]:
    """A ``.pth`` holding ``{"state_dict": ..., "config": {...}}`` or a bare state dict."""
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickle that would build objects or run code
        raise UserError(f"{p}: refused to load this .pth: it is not plain tensors ({str(exc).splitlines()[0][:100]}); convert it to .safetensors") from None
    if not isinstance(obj, dict):
        raise UserError(f"{p}: .pth does not hold a dictionary of tensors")
    state = obj.get("state_dict", obj)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "architecture": obj.get("config", {})}
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return state, meta


def _config_from(meta: dict, p: Path) -> UNetConfig:
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{p}: checkpoint format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise UserError(f"{p}: checkpoint format version {version!r} is not supported (this napari-coral reads up to {FORMAT_VERSION}); upgrade napari-coral")
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise UserError(f"{p}: checkpoint does not describe its architecture")
    known = {f.name for f in fields(UNetConfig)}
    try:
        return UNetConfig(**{k: v for k, v in arch.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{p}: checkpoint architecture is invalid ({exc})") from None
