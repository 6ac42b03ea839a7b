"""`napari-coral`: open napari with the phantom sample and the four widgets docked."""

from __future__ import annotations

import sys


def open_viewer(show: bool = True):
    import napari

    viewer = napari.Viewer(title="napari-coral", show=show)
    viewer.open_sample("napari-coral", "phantom")
    for name in ("Model", "Segment", "Fine-tune", "Embedding"):
        viewer.window.add_plugin_dock_widget("napari-coral", name)
    return viewer


def main(argv: list[str] | None = None) -> int:
    import napari

    open_viewer()
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
