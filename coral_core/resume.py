"""Saving and restoring a training run mid-way, so ``--resume`` continues where it stopped.

A resume file is a safetensors file (no pickle) next to the run's output, written atomically
every so often and when the run is stopped. It holds the weights of every trained module,
the optimiser's moment tensors, the random generators' states as tensors, and as JSON
metadata the step, the optimiser's and scheduler's plain settings and a fingerprint of the
run's options. A resumed run repeats the uninterrupted one exactly (on the same device).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from coral_core.errors import UserError
from coral_core.fileio import atomic_target

__all__ = ["ResumeState", "resume_path"]

FORMAT = "napari-coral-resume/1"


def resume_path(out: str | os.PathLike) -> Path:
    """Where the run writing ``out`` keeps its progress: ``model.safetensors`` -> ``model.resume.safetensors``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(f"{stem}.resume.safetensors")


def _plain(value):
    """JSON-ready copy of an optimiser/scheduler setting (tuples become lists; functions, which torch 2.2's
    OneCycleLR keeps in its state and its constructor makes again, left out)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


class ResumeState:
    """The resume file of one run.

    Parameters
    ----------
    path : path
        The file (see :func:`resume_path`).
    fingerprint : dict
        The options that must match for a resume to make sense (method, sizes, seed...).
    every : int
        Save every ``every`` steps (0: only when asked, e.g. on stop or at an epoch's end).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, every: int = 0) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.every = every

    def exists(self) -> bool:
        return self.path.is_file()

    def save(
        self,
        step: int,
        modules: dict[str, nn.Module],
        optimiser: torch.optim.Optimizer,
        scheduler,
        generators: dict[str, torch.Generator],
        extra: dict | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        from safetensors.torch import save_file

        flat: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                flat[f"module.{name}.{key}"] = value.detach().cpu().contiguous()
        opt = optimiser.state_dict()
        opt_plain: dict[str, dict] = {}
        for idx, slots in opt["state"].items():
            for key, value in slots.items():
                if isinstance(value, torch.Tensor):
                    flat[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    opt_plain.setdefault(str(idx), {})[key] = _plain(value)
        for name, g in generators.items():
            flat[f"rng.{name}"] = g.get_state().cpu()
        for name, value in (tensors or {}).items():
            flat[f"extra.{name}"] = value.detach().cpu().contiguous()
        meta = {
            "format": FORMAT,
            "step": step,
            "fingerprint": self.fingerprint,
            "param_groups": _plain(opt["param_groups"]),
            "optim_plain": opt_plain,
            "scheduler": _plain(scheduler.state_dict()) if scheduler is not None else None,
            "extra": extra or {},
        }
        with atomic_target(self.path, suffix=".safetensors") as tmp:
            save_file(flat, str(tmp), metadata={"resume": json.dumps(meta)})

    def load(
        self,
        modules: dict[str, nn.Module],
        optimiser: torch.optim.Optimizer,
        scheduler,
        generators: dict[str, torch.Generator],
    ) -> tuple[int, dict, dict[str, torch.Tensor]]:
        """Restore everything in place; returns (step, extra, extra tensors)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("resume", "null"))
                flat = {k: fh.get_tensor(k) for k in fh.keys()}
        except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
            raise UserError(f"{self.path}: not a readable resume file ({exc}); delete it to start afresh") from None
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise UserError(f"{self.path}: damaged resume file ({type(exc).__name__}); delete it to start afresh") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{self.path}: not a napari-coral resume file; delete it or choose another --out")
        if meta["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in set(meta["fingerprint"]) | set(self.fingerprint)
                          if meta["fingerprint"].get(k) != self.fingerprint.get(k))
            raise UserError(
                f"{self.path}: was written by a run with other options ({', '.join(diff)}); "
                "resume with the same options, or delete it to start afresh"
            )
        try:
            for name, module in modules.items():
                prefix = f"module.{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})
            state: dict[int, dict] = {}
            for key, value in flat.items():
                if key.startswith("optim."):
                    _, idx, slot = key.split(".", 2)
                    state.setdefault(int(idx), {})[slot] = value
            for idx, slots in meta["optim_plain"].items():
                state.setdefault(int(idx), {}).update(slots)
            groups = meta["param_groups"]
            for g in groups:
                if "betas" in g:
                    g["betas"] = tuple(g["betas"])
            optimiser.load_state_dict({"state": state, "param_groups": groups})
            if scheduler is not None and meta["scheduler"] is not None:
                scheduler.load_state_dict(meta["scheduler"])
            for name, g in generators.items():
                g.set_state(flat[f"rng.{name}"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"{self.path}: does not fit this run ({str(exc).splitlines()[0]}); delete it to start afresh") from None
        extra_t = {k[len("extra."):]: v for k, v in flat.items() if k.startswith("extra.")}
        return int(meta["step"]), meta["extra"], extra_t

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
