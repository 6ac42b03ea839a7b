"""coral_core: the headless engine of napari-coral (no Qt imports anywhere in this package)."""

__version__ = "0.1.0.dev0"
