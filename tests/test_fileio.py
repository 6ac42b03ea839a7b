"""Atomic writes: complete or absent, never partial, with ordinary permissions."""

import os
import stat

import pytest

from coral_core.errors import UserError
from coral_core.fileio import atomic_target


def test_success_renames_with_umask_permissions(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_target(target) as tmp:
        tmp.write_text("a,b\n")
        assert not target.exists()
    assert target.read_text() == "a,b\n"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_failure_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("previous good model")
    with pytest.raises(KeyboardInterrupt):
        with atomic_target(target) as tmp:
            tmp.write_text("half written")
            raise KeyboardInterrupt
    assert target.read_text() == "previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_unwritable_or_missing_folders_are_refused_up_front(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        with atomic_target(tmp_path / "missing" / "x.csv"):
            pass
    with pytest.raises(UserError, match="is a folder"):
        with atomic_target(tmp_path):
            pass
