"""napari-coral: the napari plugin on top of coral_core."""

__version__ = "0.1.0.dev0"
