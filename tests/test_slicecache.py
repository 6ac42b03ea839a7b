"""The on-disk pretraining slice set (``coral pretrain --slice-cache``)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from coral_core import slicecache
from coral_core.data import PretrainSlices
from coral_core.errors import UserError
from coral_core.phantom import make_phantom
from coral_core.volume import save_volume


def _volumes():
    return [make_phantom(s, n_slices=n)[0].array for s, n in ((1, 5), (2, 7))]


def _is_mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether ``tensor``'s memory is a mapping of the file ``path`` (Linux's /proc; True elsewhere)."""
    maps = "/proc/self/maps"
    if not os.path.exists(maps):
        return True
    ptr = tensor.data_ptr()
    for line in open(maps):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) >= 6 and fields[-1] == str(path) and lo <= ptr < hi:
            return True
    return False


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mapped_slices_are_the_slices_in_memory(tmp_path, dtype):
    path = tmp_path / "c.npy"
    key = slicecache.cache_key([], 2, 0, 32, dtype)
    slicecache.write_cache(path, key, _volumes(), 32, ["a", "b"], [(5, 64, 64), (7, 64, 64)])
    data, description = slicecache.open_cache(path, key)
    memory = PretrainSlices(_volumes(), 32, dtype=getattr(torch, dtype))
    assert data.images.dtype == memory.images.dtype and torch.equal(data.images, memory.images)
    for name in ("positions", "partitions", "volume_ids"):
        assert torch.equal(getattr(data, name), getattr(memory, name)), name
    assert description["names"] == ["a", "b"] and description["image_size"] == 32
    assert _is_mapped_from(data.images, path) and not _is_mapped_from(memory.images, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "c.npy.json"]  # no temporary file left


def test_other_inputs_or_settings_or_a_damaged_file_are_not_reused(tmp_path):
    image = tmp_path / "v.nii.gz"
    save_volume(image, make_phantom(3, n_slices=6)[0].array, np.eye(4))
    path = tmp_path / "c.npy"
    key = slicecache.cache_key([image], 0, 0, 32, "float32")
    slicecache.write_cache(path, key, [make_phantom(3, n_slices=6)[0].array], 32, ["v"], [(6, 64, 64)])
    assert slicecache.open_cache(path, key) is not None
    assert slicecache.open_cache(path, slicecache.cache_key([image], 0, 0, 48, "float32")) is None  # size
    assert slicecache.open_cache(path, slicecache.cache_key([image], 0, 0, 32, "float16")) is None  # storage
    assert slicecache.open_cache(path, slicecache.cache_key([image], 2, 0, 32, "float32")) is None  # phantoms
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the input was rewritten
    assert slicecache.open_cache(path, slicecache.cache_key([image], 0, 0, 32, "float32")) is None
    key = slicecache.cache_key([image], 0, 0, 32, "float32")
    slicecache.write_cache(path, key, [make_phantom(3, n_slices=6)[0].array], 32, ["v"], [(6, 64, 64)])
    path.write_bytes(path.read_bytes()[:200])  # truncated
    assert slicecache.open_cache(path, key) is None
    for damaged in ("{not json", "[]", json.dumps({"key": key})):  # not JSON, not an object, fields missing
        slicecache.description_path(path).write_text(damaged)
        assert slicecache.open_cache(path, key) is None


def test_a_failed_rewrite_leaves_no_valid_looking_cache(tmp_path, monkeypatch):
    """The old description goes before the new array is written, so an array stopped half-way
    (or left from other inputs) is never taken for the new one; no temporary file is left."""
    path = tmp_path / "c.npy"
    old = slicecache.cache_key([], 2, 0, 32, "float32")
    slicecache.write_cache(path, old, _volumes(), 32, ["a", "b"], [(5, 64, 64), (7, 64, 64)])
    import coral_core.data as data_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(data_module, "resize_slices", broken)
    with pytest.raises(OSError):
        slicecache.write_cache(path, slicecache.cache_key([], 2, 1, 32, "float32"), _volumes(), 32, ["a", "b"],
                               [(5, 64, 64), (7, 64, 64)])
    assert slicecache.open_cache(path, old) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy"]
    with pytest.raises(UserError, match="ending in .npy"):
        slicecache.check_cache_path(tmp_path / "c.bin")


def _pretrain(tmp_path, *extra):
    cmd = [sys.executable, "-m", "coral_core.cli", "pretrain", str(tmp_path / "v.nii.gz"), "--phantom", "1",
           "--epochs", "1", "--batch-size", "8", "--base-filters", "4", "--image-size", "32",
           "--embedding-dim", "16", "--device", "cpu", "--out", str(tmp_path / "m.safetensors"), "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 or extra[-1:] == ("x.bin",), proc.stderr[-3000:]
    return proc


def test_cli_writes_the_cache_once_then_maps_it_to_the_same_training(tmp_path):
    save_volume(tmp_path / "v.nii.gz", make_phantom(5, n_slices=10)[0].array, np.diag([1.5, 1.5, 8.0, 1.0]))
    plain = json.loads(_pretrain(tmp_path).stdout)
    first = json.loads(_pretrain(tmp_path, "--slice-cache", "c.npy").stdout)
    second = json.loads(_pretrain(tmp_path, "--slice-cache", "c.npy").stdout)
    assert (plain["slice_cache"], first["slice_cache"], second["slice_cache"]) == (None, "written", "reused")
    assert plain["final_loss"] == first["final_loss"] == second["final_loss"]
    assert first["volumes"] == second["volumes"] == 2
    bad = _pretrain(tmp_path, "--slice-cache", "x.bin")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --slice-cache x.bin")
