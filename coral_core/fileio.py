"""Atomic file writes: a result appears complete under its name, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from coral_core.errors import UserError

__all__ = ["atomic_target", "check_output_path"]


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output whose folder is missing or not writable, before any work is done."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{p}: is a folder; give a file name for the output")
    if not parent.is_dir():
        raise UserError(f"{parent}: output folder does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent}: output folder is not writable; choose another location")
    return p


def same_file(a: str | os.PathLike, b: str | os.PathLike | None) -> bool:
    """Whether two names are one existing file (links and relative names included)."""
    try:
        return b is not None and Path(a).is_file() and os.path.samefile(a, b)
    except OSError:  # missing, or not reachable: not this file
        return False


def check_not_an_input(path: str | os.PathLike, inputs) -> None:
    """Refuse an output that is one of the files the command reads (the same file, by any name): writing it
    would replace the user's scan, labels or model with what the command makes (``coral segment scan.nii.gz
    --out scan.nii.gz``). ``inputs``: paths, or ``None`` for an option not given."""
    out = Path(path)
    for given in inputs:
        if same_file(out, given):
            what = "is also an input of this command" if Path(given) == out else f"is the same file as the input {given}"
            raise UserError(f"{out}: {what}; give the output another name, so that the input is not replaced")


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception (Ctrl-C included) the temporary file is removed and ``path`` is left as
    it was. ``suffix`` is kept on the temporary name for writers that pick a format by it.
    """
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix or "".join(p.suffixes[-2:]), dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
