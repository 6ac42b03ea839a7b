"""Embedding dock widget: every slice as a point, volumes as trajectories, click to navigate."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QFileDialog, QHBoxLayout, QLineEdit, QListWidget, QListWidgetItem, QPushButton, QSpinBox,
                            QVBoxLayout, QWidget)

from coral_core.data import parse_slices
from coral_core.embedding import Trajectory, project_trajectories, suggest_slices, write_trajectory_table
from coral_core.errors import UserError, naming
from napari_coral._layers import LayerArray, show_index, shown_index
from napari_coral._session import session_for
from napari_coral._widgets._common import (DevicePicker, PlotCanvas, VolumeChecklist, alive, failure_text, status_label,
                                           no_volume_text, while_alive)


class EmbeddingWidget(QWidget):
    """Embeds the checked volumes' slices; of a cine series (t, z, y, x), the frame the viewer shows
    when Embed is pressed."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.volumes = VolumeChecklist(napari_viewer, cine=True)
        self.device_picker = DevicePicker()
        self.embed_button = QPushButton("Embed")
        self.embed_button.clicked.connect(self.embed)
        self.suggest_button = QPushButton("Suggest slices")
        self.suggest_button.clicked.connect(self.suggest)
        self.n_suggest = QSpinBox()
        self.n_suggest.setRange(1, 20)
        self.n_suggest.setValue(3)
        self.save_button = QPushButton("Save...")
        self.save_button.setToolTip("Save the plot as a PNG figure, or every slice's point as a CSV table\n"
                                    "(the table and figure coral embed writes)")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._ask_save)
        self.suggest_within = QLineEdit()
        self.suggest_within.setPlaceholderText("suggest within slices: all; e.g. 3-15, where the structures are")
        self.suggest_within.setToolTip(
            "Where a scan reaches past the structures you segment, the slices farthest in the embedding are often\n"
            "those beyond them, which teach a model nothing of the structures: give the slices that hold them.")
        self.suggestions = QListWidget()
        self.suggestions.setMaximumHeight(80)
        self.suggestions.itemClicked.connect(lambda item: self.go_to(item.data(Qt.ItemDataRole.UserRole)[0], item.data(Qt.ItemDataRole.UserRole)[1]))
        self.plot = PlotCanvas(height=3.4, hint="Each slice becomes a point here,\neach volume a line from its first slice to its last.")
        self.status = status_label("Check the volumes to compare and press Embed.")
        row = QHBoxLayout()
        row.addWidget(self.embed_button)
        row.addWidget(self.suggest_button)
        row.addWidget(self.n_suggest)
        row.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.volumes)
        layout.addWidget(self.device_picker)
        layout.addLayout(row)
        layout.addWidget(self.suggest_within)
        layout.addWidget(self.plot.canvas)
        layout.addWidget(self.status)
        layout.addWidget(self.suggestions)

        self.trajectories: list[Trajectory] = []
        self.features: dict[str, np.ndarray] = {}
        self.frames: dict[str, int] = {}  # the frame embedded of each cine layer
        self.score = float("nan")
        self.has_direction = False
        self.worker = None
        self._artists = []
        self._highlight = []
        self.plot.canvas.mpl_connect("pick_event", self._picked)
        napari_viewer.dims.events.current_step.connect(while_alive(self, "_highlight_current"))

    # ------------------------------------------------------------------ computing
    def embed(self):
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        from coral_core.infer import embed_volume

        if not self.embed_button.isEnabled():  # called again while it runs, as its greyed-out button is not
            return None
        names = self.volumes.checked()
        if not names:
            message = no_volume_text(self.viewer, "Check at least one open 3-D image to embed.")
            self.status.setText(message)
            show_error(message)
            return None
        device = self.device_picker.device_or_none(self.status)
        if device is None:
            return None
        model = self.session.ensure_model()
        layers = {n: self.viewer.layers[n] for n in names}
        frames = {n: shown_index(self.viewer, layer)[0] for n, layer in layers.items() if layer.ndim == 4}
        arrays = {n: LayerArray(layer, frame=frames.get(n)) for n, layer in layers.items()}  # read in the worker
        direction = model.canonical_direction.cpu().numpy() if model.has_direction else None

        @thread_worker(ignore_errors=True)  # reported by the errored handler below
        def work():
            feats = {}
            for n, a in arrays.items():
                with naming(n):  # an image a model with a physical scale cannot see at its spacing
                    feats[n] = embed_volume(model, a.read(), device, spacing=a.spacing)
            return feats, project_trajectories(list(feats.values()), list(feats), direction)

        def done(result):
            self.features, (self.trajectories, _, self.score) = result[0], result[1]
            self.frames = frames
            self.has_direction = direction is not None
            self.embed_button.setEnabled(True)
            self.save_button.setEnabled(True)
            self.draw(self.has_direction)

        self.embed_button.setEnabled(False)
        self.status.setText("Embedding slices...")
        self.worker = work()
        self.worker.returned.connect(done)
        self.worker.errored.connect(self._failed)
        self.worker.start()
        return self.worker

    def _failed(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        if not alive(self):
            return
        self.embed_button.setEnabled(True)
        message = f"Embedding failed: {failure_text(exc)}"
        self.status.setText(message)
        show_error(message)

    # ------------------------------------------------------------------ drawing
    def draw(self, has_direction: bool) -> None:
        ax = self.plot.ax
        self.plot.clear()
        self._artists, self._highlight = [], []  # the rings went with the axes' other artists
        for t in self.trajectories:
            ax.plot(t.xy[:, 0], t.xy[:, 1], "-", color="0.65", lw=0.8, zorder=1)
            sc = ax.scatter(t.xy[:, 0], t.xy[:, 1], c=t.positions, cmap="viridis", vmin=0, vmax=1, s=22, zorder=2, picker=True, pickradius=6)
            self._artists.append((sc, t))
            # Beside the first slice's point, not on it (the current-slice ring is drawn there too).
            ax.annotate(self._title(t.name), t.xy[0], xytext=(6, 6), textcoords="offset points", fontsize=7, color="0.3")
        span = max((np.ptp(t.xy[:, 0]) for t in self.trajectories), default=1.0) or 1.0
        label = "CORAL direction" if has_direction else "first principal axis"
        ax.annotate("", xy=(0.35 * span, 0), xytext=(-0.35 * span, 0), arrowprops={"arrowstyle": "->", "color": "crimson", "lw": 1.5})
        ax.text(-0.35 * span, 0, f"{label} ", color="crimson", fontsize=7, va="bottom", ha="left")
        ax.set_title(f"ordinal consistency {_score_text(self.score)}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        self.status.setText(
            "Colour: slice position (dark = first slice). Click a point to go to that slice. "
            + "; ".join(f"{self._title(t.name)}: {_score_text(t.score)}" for t in self.trajectories)
        )
        self._highlight_current()

    def _title(self, name: str) -> str:
        return f"{name} frame {self.frames[name]}" if name in self.frames else name

    def _current_slice(self, name: str) -> int | None:
        """The slice of layer ``name`` the viewer shows; None when it shows another frame of a cine than
        the one embedded."""
        index = shown_index(self.viewer, self.viewer.layers[name])
        if name in self.frames and index[0] != self.frames[name]:
            return None
        return index[-1]

    def _highlight_current(self, *_):
        for artist in self._highlight:
            artist.remove()
        self._highlight = []
        for t in self.trajectories:
            if t.name in self.viewer.layers and self.viewer.layers[t.name].ndim == (4 if t.name in self.frames else 3):
                k = self._current_slice(t.name)
                if k is None:
                    continue
                (ring,) = self.plot.ax.plot(t.xy[k, 0], t.xy[k, 1], "o", ms=11, mfc="none", mec="red", mew=1.6, zorder=3)
                self._highlight.append(ring)
        self.plot.draw()

    # ------------------------------------------------------------------ saving
    def save_results(self, path: str) -> Path | None:
        """Write what the panel shows: a ``.png`` path gets the figure of the trajectories (as ``coral embed --plot``
        draws it), a ``.csv`` path the table of every slice's point (as ``coral embed --out`` writes it); a cine's
        volume is named with its frame. Returns the path written, or None (the status line says why)."""
        from napari.utils.notifications import show_error

        from coral_core.plotting import save_trajectory_png

        p = Path(path)
        trajectories = [dataclasses.replace(t, name=self._title(t.name)) for t in self.trajectories]
        try:
            if not trajectories:
                raise UserError("press Embed first; there is nothing to save yet")
            if p.suffix.lower() == ".png":
                save_trajectory_png(p, trajectories, self.score, self.has_direction)
            elif p.suffix.lower() == ".csv":
                write_trajectory_table(p, trajectories)
            else:
                raise UserError(f"{p.name}: end the name with .png for the figure or .csv for the table")
        except (UserError, OSError) as exc:
            self.status.setText(f"Not saved: {exc}")
            show_error(f"Not saved: {exc}")
            return None
        self.status.setText(f"Saved {p}.")
        return p

    def _ask_save(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(self, "Save the embedding", "coral-embedding.png",
                                                   "Figure (*.png);;Table (*.csv)")
        if path:
            if not Path(path).suffix:  # a name typed without one: the file type chosen in the dialog
                path += ".csv" if "csv" in chosen else ".png"
            self.save_results(path)

    # ------------------------------------------------------------------ navigation
    def go_to(self, name: str, index: int) -> None:
        """Show slice ``index`` of layer ``name`` (of the frame embedded, in a cine) and select that layer."""
        if name not in self.viewer.layers:
            self.status.setText(f"Layer {name!r} is no longer open under that name; press Embed again.")
            return
        layer = self.viewer.layers[name]
        show_index(self.viewer, layer, (self.frames[name], index) if name in self.frames else (index,))
        self.viewer.layers.selection.active = layer

    def _picked(self, event) -> None:
        for artist, t in self._artists:
            if event.artist is artist and len(event.ind):
                self.go_to(t.name, int(event.ind[0]))
                return

    def suggest(self) -> list[tuple[str, int]]:
        """Propose slices to annotate next, farthest in the embedding from those annotated, and list them to jump to."""
        from napari.utils.notifications import show_error

        if not self.features:
            show_error("Press Embed first.")
            return []
        within = self.suggest_within.text().strip()
        try:  # the slices each volume's suggestions may take
            candidates = {name: parse_slices(within, len(feats), self._title(name)) if within else None
                          for name, feats in self.features.items()}
        except UserError as exc:
            show_error(f"Suggest within slices: {exc}")
            self.status.setText(f"Suggest within slices: {exc}")
            return []
        self.suggestions.clear()
        out = []
        for name, feats in self.features.items():
            annotated = self.session.annotated.get(name, [])
            if name in self.frames:  # a cine's (frame, slice) pairs: those of the frame embedded
                annotated = [z for t, z in annotated if t == self.frames[name]]
            for k in suggest_slices(feats, annotated, self.n_suggest.value(), candidates[name]):
                item = QListWidgetItem(f"{self._title(name)}: slice {k}" + (" (farthest from annotated)" if annotated else ""))
                item.setData(Qt.ItemDataRole.UserRole, (name, int(k)))
                self.suggestions.addItem(item)
                out.append((name, int(k)))
        if not out:  # the only ones left are annotated: it said "Suggested 0 slice(s): click one to go there."
            where = "every slice listed under 'suggest within'" if within else "every slice"
            self.status.setText(f"Nothing to suggest: {where} is annotated already, or looks to the model just like "
                                "one that is.")
            return out
        ends = not within and any(k in (0, len(self.features[name]) - 1) for name, k in out)
        self.status.setText(
            f"Suggested {len(out)} slice(s): click one to go there."
            + (" A first or last slice is among them: if the scan reaches past the structures you segment, give the "
               "slices that hold them under 'suggest within' (slices beyond them teach the model nothing of them)."
               if ends else ""))
        return out


def _score_text(score: float) -> str:
    """A score to two decimals, or why there is none (a volume of one slice, or of slices all alike)."""
    return f"{score:.2f}" if math.isfinite(score) else "none (one slice, or all alike)"
