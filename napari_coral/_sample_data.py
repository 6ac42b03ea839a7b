"""npe2 sample data: one phantom subject and its ground-truth labels."""

from __future__ import annotations

from coral_core.phantom import LABEL_NAMES, make_phantom
from napari_coral._layers import volume_to_layer


def phantom_sample():
    image, labels = make_phantom(2026)
    img = volume_to_layer(image, as_labels=False, name="phantom")
    lab = volume_to_layer(labels, as_labels=True, name="phantom ground truth")
    lab[1]["features"] = {"class": list(LABEL_NAMES)}
    return [img, lab]
