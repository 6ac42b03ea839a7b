"""Exceptions for mistakes a user can make and fix: UserError, and the kinds of it a caller may act on."""

import contextlib


class UserError(Exception):
    """A problem with the user's input, stated as one sentence: which file, what is wrong,
    what to do. The CLI prints it as ``error: <sentence>`` and exits with status 2; the
    plugin shows it as a notification."""


class OffGridError(UserError):
    """Labels (a DICOM SEG) whose slices do not lie on the voxel grid of the image given with them."""


class MissingStructureError(UserError):
    """Labels that hold no structure (ROI, segment, named class) of a name asked for: a dataset's case may be left
    out for it."""


class ScaleError(UserError):
    """An image whose pixel spacing a model with a physical scale cannot see it at (not a size, or too far from the
    model's millimetres per pixel). The sentence speaks of "its" pixels: a caller that knows the image's file or layer
    puts its name first."""


@contextlib.contextmanager
def naming(where):
    """Inside it, a :class:`ScaleError` becomes a :class:`UserError` whose sentence names ``where`` (an image's file,
    or a layer) first."""
    try:
        yield
    except ScaleError as exc:
        raise UserError(f"{where}: {exc}") from None
