"""The classes a fine-tuning in the plugin trains, and how each Labels layer's values become them.

No Qt here. The Fine-tune panel's **Classes** box lists the foreground classes to train, by name; left empty,
they are the current model's (a pretrained-only model has none yet: then the labels layer's own, or
``class 1``, ``class 2``, ... as painted). A layer that names its classes (a DICOM SEG, an RT structure set, a
label file that names them, a segmentation of ours) and holds every listed name gives those classes by name,
renumbered 1, 2, ... in the listed order, its other labels background, as ``coral finetune --structures`` picks
them from a file; otherwise label value n is class n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coral_core.dicomlabels import alternatives, find_structures
from coral_core.errors import UserError


def parse_classes(text: str) -> list[str] | None:
    """The Classes box's names ("liver, spleen"; "Heart|Cor" for a class a layer may name either way), or None
    when it is empty."""
    names = [name.strip() for name in text.split(",") if alternatives(name)]
    if not names:
        return None
    seen: set[str] = set()
    for one in (one for name in names for one in alternatives(name)):
        if one.casefold() in seen:
            raise UserError(f"Classes: {one!r} is listed twice; name each class once")
        seen.add(one.casefold())
    if "background" in seen:
        raise UserError("Classes: list the foreground classes only (label 0 is always background), e.g. liver, spleen")
    if len(names) > 254:
        raise UserError(f"Classes: {len(names)} classes listed; a model holds at most 254 besides background")
    return names


@dataclass
class ClassPlan:
    """What a fine-tuning trains: ``names`` (background first), and for each labels layer (by name) its
    ``{value: class}`` when its classes are picked by name, or None when its label values are the classes."""

    names: list[str]
    mappings: dict[str, dict[int, int] | None]
    typed: bool  # listed in the Classes box (else the model's, or for a pretrained-only model the layer's)
    entries: list[str]  # the foreground classes as asked for, "Heart|Cor" for a class of two names, to pick from files

    def convert(self, lab: np.ndarray, layer: str, name: str | None = None) -> np.ndarray:
        """A snapshot of ``layer``'s labels (``name``: the scan it is, "LAYER frame T" in a cine) as the
        plan's classes: picked by name (other labels background), or checked to hold no label beyond them."""
        low = int(lab.min(initial=0))
        if low < 0:  # as an index it would pick a class from the end of the table below
            raise UserError(f"labels layer {name or layer!r} uses label {low}; labels are 0 (background) or a class's "
                            "value from 1 up: paint those voxels with 0 or a class")
        mapping = self.mappings.get(layer)
        if mapping is not None:
            lut = np.zeros(max(int(lab.max(initial=0)), max(mapping)) + 1, np.uint8)
            for value, cls in mapping.items():
                lut[value] = cls
            return lut[lab]
        top = int(lab.max(initial=0))
        if top >= len(self.names):
            n = len(self.names) - 1
            classes = f"{n} class{'es' if n != 1 else ''} ({', '.join(self.names[1:])})"
            advice = ("add a name for each label painted (label 1 takes the first name)" if self.typed else
                      "paint with those labels, or list the classes to train under Classes")
            raise UserError(f"labels layer {name or layer!r} uses label {top} but "
                            f"{'Classes names' if self.typed else 'the model has'} {classes}; {advice}")
        return lab

    def picked(self) -> list[str]:
        """The class names picked by name from some layer (renumbered), else an empty list."""
        return self.names[1:] if any(m is not None for m in self.mappings.values()) else []


def plan_classes(typed: list[str] | None, model_names: list[str], pretrained_only: bool,
                 layers: list[tuple[str, list[str] | None]], top: int | None = None) -> ClassPlan:
    """The :class:`ClassPlan` for the Classes box's names ``typed`` (None: empty), a model with
    ``model_names`` (background first), and the labels ``layers`` as (name, its class names by value or None),
    the chosen one first. ``top``: the largest label in the layers' annotated slices, which numbers the classes
    of a pretrained-only model when the box is empty (None: the first layer's names, else one)."""
    if typed is not None:
        wanted = typed  # entries "A|B" are named by their first name once each layer's mapping is known
    elif pretrained_only:  # its head was never trained: the classes are the labels', named as the layer names them
        own = layers[0][1] if layers and layers[0][1] else ["background"]
        count = top if top is not None else max(len(own) - 1, 1)
        if count < 1:
            raise UserError(f"labels layer {layers[0][0]!r} holds only background in its annotated slices; paint at "
                            "least one foreground class")  # slices listed under Also use slices may be empty
        wanted = [own[v] if v < len(own) else f"class {v}" for v in range(1, count + 1)]
    else:
        wanted = list(model_names[1:])
    mappings = {}
    for layer, layer_names in layers:
        mappings[layer] = _mapping(wanted, layer, layer_names, typed is not None or pretrained_only, model_names)
    picked_from = next(((names, mappings[layer]) for layer, names in layers if mappings[layer] is not None), None)
    if picked_from is not None and typed is not None:  # spelled as the (first) layer they are picked from spells them
        names, mapping = picked_from
        spelled = [names[value].strip() for value, _ in sorted(mapping.items(), key=lambda item: item[1])]
        wanted = [own if len(alternatives(entry)) == 1 else entry for own, entry in zip(spelled, wanted)]
    entries = list(wanted)
    wanted = [alternatives(entry)[0] for entry in wanted]  # "Heart|Cor" is the class Heart
    return ClassPlan(["background", *wanted], mappings, typed is not None, entries)


def _mapping(wanted: list[str], layer: str, layer_names: list[str] | None, chosen: bool,
             model_names: list[str]) -> dict[int, int] | None:
    """``{value: class}`` when the layer names every wanted class (picked by name), None when its values are
    the classes; one sentence when its names contradict the wanted classes."""
    if not layer_names:
        return None
    found = [None if i is None else i + 1 for i in find_structures(layer_names[1:], wanted)]  # label values
    if all(value is not None for value in found):
        mapping = {value: cls for cls, value in enumerate(found, 1)}
        return None if all(v == c for v, c in mapping.items()) and len(layer_names) <= len(wanted) + 1 else mapping
    holds = ", ".join(layer_names[1:])
    if chosen:  # names of the user's own are fine, unless the layer holds some of them under other labels
        clash = [(name, value, cls) for cls, (name, value) in enumerate(zip(wanted, found), 1)
                 if value is not None and value != cls]
        if clash:
            name, value, cls = clash[0]
            missing = [n for n, v in zip(wanted, found) if v is None]
            raise UserError(f"Classes: labels layer {layer!r} holds {name!r} as label {value}, not {cls}, and has no "
                            f"class named {', '.join(map(repr, missing))} (it holds {holds}); list only its classes "
                            "to pick them by name, or list the classes in the order of their labels")
        return None
    differ = [v for v in range(1, len(layer_names))
              if v >= len(model_names) or layer_names[v].strip().casefold() != model_names[v].strip().casefold()]
    if differ:
        raise UserError(f"labels layer {layer!r} names its labels {holds}, not the model's classes "
                        f"({', '.join(model_names[1:])}); list the classes to train under Classes (names it holds "
                        "pick those classes from it)")
    return None


def describe_plan(plan: ClassPlan, model_names: list[str], pretrained_only: bool, layer: str | None) -> str:
    """One line under the Classes box: what label n trains as, and whether the model gets a new head."""
    mapping = plan.mappings.get(layer) if layer else None
    if mapping is not None:
        by_class = {cls: value for value, cls in mapping.items()}
        text = (f"picked by name from {layer!r}: " +
                ", ".join(f"{plan.names[c]} (its label {by_class[c]})" for c in range(1, len(plan.names))) +
                f" as {', '.join(map(str, range(1, len(plan.names))))}; its other labels are background")
    else:
        text = ", ".join(f"{c} {name}" for c, name in enumerate(plan.names[1:], 1))
    same = not pretrained_only and [n.casefold() for n in plan.names] == [n.strip().casefold() for n in model_names]
    if same:
        return text + ("" if plan.typed else " (the model's classes)")
    return text + "; a new head for these classes"
