"""Write docs/phantom.png: one subject of the built-in phantom cohort with its labels.

    python docs/scripts/phantom_figure.py
"""

from pathlib import Path

from coral_core.phantom import LABEL_NAMES, make_phantom
from coral_core.plotting import save_overlay_png

if __name__ == "__main__":
    image, labels = make_phantom(3)
    out = Path(__file__).resolve().parents[1] / "phantom.png"
    save_overlay_png(
        out,
        image.array,
        {"labels": labels.array},
        n_slices=8,
        class_names=list(LABEL_NAMES),
        title=f"phantom subject 3: {image.shape[0]} short-axis slices, base (left) to apex (right)",
    )
    print(out)
