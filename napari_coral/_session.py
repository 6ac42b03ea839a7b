"""Per-viewer state shared by the dock widgets: the current model and where it came from.

No Qt here: widgets subscribe with ``session.subscribe(callback)`` and are told when the
model changes.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from coral_core.checkpoint import bundled_model_path, load_checkpoint, pretrained_only
from coral_core.model import UNet

_SESSIONS: "weakref.WeakKeyDictionary[object, CoralSession]" = weakref.WeakKeyDictionary()


def data_home() -> Path:
    """Where autosaved annotations and trained models go (``NAPARI_CORAL_HOME`` overrides)."""
    home = Path(os.environ.get("NAPARI_CORAL_HOME", Path.home() / ".napari-coral"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def file_name_part(name: str, limit: int = 100) -> str:
    """A layer's name as part of a file name: letters, digits, '-' and '_' kept, anything else '_', cut to ``limit``
    bytes of UTF-8 (a file name holds 255, and the part comes with a time stamp and a suffix); "layer" for a name
    left empty."""
    part = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return part.encode()[:limit].decode(errors="ignore") or "layer"


def keep_model(path: str | os.PathLike, kind: str, name: str) -> Path:
    """Copy a model a plugin job trained into ``data_home()/models`` as ``KIND-NAME-TIMESTAMP.safetensors``
    (atomically; a second in the same second gets ``-2``, ...), where it stays until the user deletes it:
    a model trained in the plugin is not lost when another one replaces it unsaved."""
    import shutil
    import time

    from coral_core.fileio import atomic_target

    folder = data_home() / "models"
    folder.mkdir(exist_ok=True)
    stem = f"{kind}-{file_name_part(name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = folder / f"{stem}.safetensors", 2
    while target.exists():
        target, n = folder / f"{stem}-{n}.safetensors", n + 1
    with atomic_target(target) as tmp:
        shutil.copyfile(path, tmp)
    return target


def keep_model_sentence(path: str | os.PathLike, kind: str, name: str) -> str:
    """:func:`keep_model`, told as a status line's sentence; a full or read-only disk is said, not raised
    (the model is still used, and Save model still offered)."""
    try:
        return f"The model is kept in {keep_model(path, kind, name)}."
    except OSError as exc:
        return f"Could not keep a copy of the model ({exc}); save it with Save model."


MODELS_REMEMBERED = 5  # models a session keeps in memory to go back to (the demo model's 2 M parameters: 8 MB each)


@dataclass
class CoralSession:
    model: UNet | None = None
    meta: dict = field(default_factory=dict)
    source: str = "none"
    annotated: dict[str, list] = field(default_factory=dict)  # image layer name -> annotated slices
    # Segment's "Keep each class's largest piece": every segmentation (Segment's, Fine-tune's re-segmenting) follows it
    largest_component: bool = False
    # weak references to the Fine-tune panels' counters: Labels layer -> its annotated slices, or None
    annotation_counters: list = field(default_factory=list)
    # the models replaced, (model, meta, source), the latest last: Previous model goes back to them
    history: list = field(default_factory=list)
    _listeners: list[Callable[[], None]] = field(default_factory=list)

    def ensure_model(self) -> UNet:
        """The current model, loading the bundled demo model on first use."""
        if self.model is None:
            self.use_bundled_model()
        return self.model

    def use_bundled_model(self) -> None:
        model, meta = load_checkpoint(bundled_model_path())
        self.set_model(model, meta, "bundled demo model")

    def set_model(self, model: UNet, meta: dict, source: str) -> None:
        """Make ``model`` the current one; the one it replaces is remembered (the last
        :data:`MODELS_REMEMBERED`), for :meth:`previous_model`."""
        if self.model is not None and model is not self.model:
            self.history.append((self.model, self.meta, self.source))
            del self.history[:-MODELS_REMEMBERED]
        self._show(model, meta, source)

    def previous_model(self) -> bool:
        """Go back to the model the current one replaced (again: the one before it); False when there is none."""
        if not self.history:
            return False
        self._show(*self.history.pop())
        return True

    def _show(self, model: UNet, meta: dict, source: str) -> None:
        self.model, self.meta, self.source = model.eval(), meta, source
        for listener in list(self._listeners):
            listener()

    def annotated_in(self, labels_layer) -> list:
        """The slices a Fine-tune panel counts as annotated in ``labels_layer`` (numbers, or (frame, slice)
        pairs in a cine); none when no open panel watches it. Segmenting into the layer keeps them."""
        for ref in list(self.annotation_counters):
            count = ref()
            if count is None:
                self.annotation_counters.remove(ref)
                continue
            try:
                slices = count(labels_layer)
            except RuntimeError:  # Qt deleted the panel
                self.annotation_counters.remove(ref)
                continue
            if slices:
                return slices
        return []

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def describe(self) -> str:
        if self.model is None:
            return "no model loaded yet (the bundled demo model is used)"
        cfg = self.model.config
        classes = ", ".join(cfg.class_names[1:])
        # a pretrained-only model's head and class names are placeholders: fine-tuning gives it its classes
        text = f"{self.source}: " + ("" if self.pretrained_only else f"{cfg.n_classes - 1} classes ({classes}), ")
        text += f"input {cfg.image_size} px"
        if cfg.pixel_spacing is not None:  # a physical scale: the square of a slice it sees at a time
            text += f" at {cfg.pixel_spacing:g} mm (a {cfg.image_size * cfg.pixel_spacing:g} mm square of a slice at a time)"
        return text + (" (pretrained only: fine-tune it before segmenting)" if self.pretrained_only else "")

    @property
    def pretrained_only(self) -> bool:
        """Whether the current model comes straight from pretraining, its segmentation head untrained."""
        return self.model is not None and pretrained_only(self.meta)


def session_for(viewer) -> CoralSession:
    """The one session of a viewer (created on first use)."""
    if viewer not in _SESSIONS:
        _SESSIONS[viewer] = CoralSession()
    return _SESSIONS[viewer]
