"""Figures written by the CLI (matplotlib, Agg backend: no display and no Qt needed)."""

from __future__ import annotations

import os

import numpy as np

from coral_core.embedding import Trajectory
from coral_core.fileio import atomic_target

__all__ = ["save_overlay_png", "save_trajectory_png", "save_trajectory_panels_png"]

LABEL_COLOURS = ["none", "#1f77b4", "#ffbf00", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(*args, **kwargs)


def save_overlay_png(
    path: str | os.PathLike,
    image: np.ndarray,
    rows: dict[str, np.ndarray],
    n_slices: int = 6,
    class_names: list[str] | None = None,
    title: str = "",
) -> None:
    """A grid of evenly spaced slices: the image, then one row per label volume over it."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    idx = np.linspace(0, image.shape[0] - 1, min(n_slices, image.shape[0])).round().astype(int)
    n_rows = 1 + len(rows)
    plt, fig = _figure(figsize=(2.2 * len(idx), 2.3 * n_rows))
    n_labels = max([int(r.max()) for r in rows.values()] + [1]) + 1
    cmap = ListedColormap(LABEL_COLOURS[:n_labels])
    for j, k in enumerate(idx):
        for r, (name, lab) in enumerate([("image", None), *rows.items()]):
            ax = fig.add_subplot(n_rows, len(idx), r * len(idx) + j + 1)
            ax.imshow(image[k], cmap="gray")
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab[k], 0), cmap=cmap, vmin=0, vmax=n_labels - 1, alpha=0.5, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {k}", fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    if class_names:
        handles = [Patch(color=LABEL_COLOURS[c], label=class_names[c]) for c in range(1, min(n_labels, len(class_names)))]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


POSITION_LABEL = "slice position (first slice 0, last 1)"


def _draw_trajectories(ax, trajectories: list[Trajectory], score: float, has_direction: bool, title: str = ""):
    """Each volume's slices joined in order and coloured by position; returns the scatter."""
    sc = None
    for t in trajectories:
        ax.plot(t.xy[:, 0], t.xy[:, 1], "-", color="0.6", lw=0.8, zorder=1)
        sc = ax.scatter(t.xy[:, 0], t.xy[:, 1], c=t.positions, cmap="viridis", vmin=0, vmax=1, s=18, zorder=2)
        # beside the first slice's point, not on it
        ax.annotate(t.name, t.xy[0], xytext=(5, 5), textcoords="offset points", fontsize=7, color="0.3")
    ax.axhline(0, color="k", lw=0.5, ls=":")
    # the units are the model's own and often small: a shared power of ten keeps the tick labels apart
    ax.ticklabel_format(style="sci", axis="both", scilimits=(-2, 3))
    axis = "CORAL direction" if has_direction else "first principal component"
    ax.set_xlabel(f"projection on {axis}")
    ax.set_ylabel("principal component of the rest")
    ax.set_title(f"{title}{': ' if title else ''}ordinal consistency {score:.2f}", fontsize=10)
    return sc


def save_trajectory_png(path: str | os.PathLike, trajectories: list[Trajectory], score: float, has_direction: bool) -> None:
    """Each volume's slices joined in order, coloured by position, with the first axis drawn."""
    plt, fig = _figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    sc = _draw_trajectories(ax, trajectories, score, has_direction, "slice-embedding trajectories")
    fig.colorbar(sc, ax=ax, label=POSITION_LABEL)
    fig.tight_layout()
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def save_trajectory_panels_png(path: str | os.PathLike, panels: list[tuple[str, list[Trajectory], float, bool]], title: str = "") -> None:
    """Several methods' trajectories side by side: ``(name, trajectories, score, has_direction)`` each."""
    plt, fig = _figure(figsize=(5.6 * len(panels) + 0.8, 5.0))
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    sc = None
    for ax, (name, trajectories, score, has_direction) in zip(axes, panels):
        sc = _draw_trajectories(ax, trajectories, score, has_direction, name)
    fig.colorbar(sc, ax=axes, label=POSITION_LABEL)
    if title:
        fig.suptitle(title, fontsize=11)
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
