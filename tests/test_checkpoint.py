"""Checkpoints rebuild the model from the file alone and refuse anything unsafe or damaged."""

import json
import os
import pickle
import struct

import pytest
import torch

from coral_core.checkpoint import describe_checkpoint, load_checkpoint, save_checkpoint
from coral_core.errors import UserError
from coral_core.model import UNetConfig, build_model, for_classes, resize_head

SMALL = UNetConfig(base_filters=4, depth=2, image_size=32, embedding_dim=8)


def _model():
    torch.manual_seed(0)
    m = build_model(SMALL)
    m.canonical_direction.copy_(torch.nn.functional.normalize(torch.randn(8), dim=0))
    return m.eval()


def test_round_trip_gives_the_same_outputs_and_metadata(tmp_path):
    m = _model()
    path = save_checkpoint(tmp_path / "m.safetensors", m, {"method": "coral", "epochs": 3})
    loaded, meta = load_checkpoint(path)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
        torch.testing.assert_close(loaded.embed(x), m.embed(x))
    assert meta["format"] == "napari-coral" and meta["version"] == 1
    assert meta["architecture"]["base_filters"] == 4 and meta["training"]["method"] == "coral"
    assert meta["class_names"] == ["background", "RV", "myocardium", "LV"]
    assert loaded.has_direction


def test_half_precision_file_is_smaller_and_loads_as_float32(tmp_path):
    m = _model()
    full = save_checkpoint(tmp_path / "f.safetensors", m)
    half = save_checkpoint(tmp_path / "h.safetensors", m, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    assert next(loaded.parameters()).dtype == torch.float32
    assert describe_checkpoint(half)["weights"] == "float16" and describe_checkpoint(full)["weights"] == "float32"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit(marker)}, fh)
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(path)
    torch.save({"state_dict": {"x": _Exploit(marker)}}, tmp_path / "evil2.pth")
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(tmp_path / "evil2.pth")
    assert not marker.exists()


def test_legacy_plain_tensor_pth_loads(tmp_path):
    m = _model()
    torch.save({"state_dict": m.state_dict(), "config": SMALL.to_dict()}, tmp_path / "old.pth")
    loaded, _ = load_checkpoint(tmp_path / "old.pth")
    torch.testing.assert_close(loaded.state_dict()["decoder.head.weight"], m.state_dict()["decoder.head.weight"])
    half = {k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}
    torch.save({"state_dict": half, "config": SMALL.to_dict()}, tmp_path / "half.pth")
    info = describe_checkpoint(tmp_path / "half.pth")
    assert info["weights"] == "float16" and info["parameters"] == sum(t.numel() for t in m.parameters())


def test_damaged_files_are_refused_with_a_sentence(tmp_path):
    good = save_checkpoint(tmp_path / "good.safetensors", _model()).read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="trunc.safetensors"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "absurd.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(UserError, match="claims"):
        load_checkpoint(tmp_path / "absurd.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="too short"):
        load_checkpoint(tmp_path / "empty.safetensors")


def test_an_image_given_as_the_model_is_named_as_an_image(tmp_path):
    import numpy as np

    from coral_core.volume import save_volume

    save_volume(tmp_path / "scan.nii.gz", np.zeros((4, 8, 8), np.float32), np.eye(4))
    save_volume(tmp_path / "scan.nrrd", np.zeros((4, 8, 8), np.float32), np.eye(4))
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "scan.nii.gz").read_bytes())
    (tmp_path / "nrrd.safetensors").write_bytes((tmp_path / "scan.nrrd").read_bytes())
    for name, kind in (("scan.nii.gz", "a NIfTI image"), ("renamed.safetensors", "a gzip-compressed file"),
                       ("nrrd.safetensors", "an NRRD image")):
        with pytest.raises(UserError, match=f"{name}: this is {kind}, not a model; give a .safetensors model"):
            load_checkpoint(tmp_path / name)
    # a checkpoint (its JSON header begins at byte 8, which the image check looks at first) still loads
    good = save_checkpoint(tmp_path / "good.safetensors", _model()).read_bytes()
    assert good[8:9] == b"{"
    loaded, _ = load_checkpoint(tmp_path / "good.safetensors")
    assert loaded.config.base_filters == SMALL.base_filters


def _rewrite_meta(src, dst, change):
    from safetensors.torch import load_file, save_file

    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["coral"])
    change(meta)
    save_file(load_file(str(src)), str(dst), metadata={"coral": json.dumps(meta)})


def test_wrong_shapes_and_unknown_version_are_refused(tmp_path):
    src = save_checkpoint(tmp_path / "good.safetensors", _model())
    _rewrite_meta(src, tmp_path / "v9.safetensors", lambda m: m.update(version=9))
    with pytest.raises(UserError, match="version 9 is not supported"):
        load_checkpoint(tmp_path / "v9.safetensors")
    _rewrite_meta(src, tmp_path / "shape.safetensors", lambda m: m["architecture"].update(base_filters=8))
    with pytest.raises(UserError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "shape.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError, match="no napari-coral description"):
        load_checkpoint(tmp_path / "foreign.safetensors")


def test_a_damaged_description_is_refused_in_a_sentence_or_read_without_its_training_record(tmp_path):
    """What benchmarks/fuzz_readers.py found: an architecture field of the wrong type or size, or a description that
    is not a JSON object, raised NumPy's or torch's errors (a huge base_filters asked for terabytes before the tensors
    were compared); a training record that is not an object stopped the model from loading at all. The first are one
    sentence, as `coral info` prints them; a model with a broken training record loads, with a warning, and is
    described as having none; a record of unexpected field types is summarised as such."""
    import subprocess
    import sys

    src = save_checkpoint(tmp_path / "good.safetensors", _model(), {"stage": "finetune", "steps": 5})
    for name, change, fragment in (
        ("negative", lambda m: m["architecture"].update(base_filters=-1), "base_filters must be a whole number"),
        ("text", lambda m: m["architecture"].update(in_channels="1"), "in_channels must be a whole number"),
        ("names", lambda m: m["architecture"].update(class_names=5), "class_names must be a list of names"),
        ("spacing", lambda m: m["architecture"].update(pixel_spacing=[1]), "pixel_spacing must be a number"),
        ("large", lambda m: m["architecture"].update(base_filters=2**20), "do not match the architecture"),
        ("huge", lambda m: m["architecture"].update(base_filters=2**40), "checkpoint architecture is invalid"),
    ):
        _rewrite_meta(src, tmp_path / f"{name}.safetensors", change)
        for read in (load_checkpoint, describe_checkpoint):
            with pytest.raises(UserError, match=fragment):
                read(tmp_path / f"{name}.safetensors")
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(src)), str(tmp_path / "list.safetensors"), metadata={"coral": "[1, 2]"})
    with pytest.raises(UserError, match="list.safetensors: checkpoint description is not a JSON object; the file is"):
        load_checkpoint(tmp_path / "list.safetensors")
    _rewrite_meta(src, tmp_path / "record.safetensors", lambda m: m.update(training=[1, 2]))
    with pytest.warns(UserWarning, match="record.safetensors: its training record is not a JSON object; the model is "
                                         "read without it"):
        model, meta = load_checkpoint(tmp_path / "record.safetensors")
    assert meta["training"] == {} and model.config == SMALL
    _rewrite_meta(src, tmp_path / "odd.safetensors", lambda m: m["training"].update(images=5, slices=3))
    odd = describe_checkpoint(tmp_path / "odd.safetensors")
    assert odd["trained"] == "a training record not in napari-coral's form"
    proc = subprocess.run([sys.executable, "-m", "coral_core.cli", "info", tmp_path / "record.safetensors"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "its training record is not a JSON object" in proc.stderr
    assert "record.safetensors: no training record" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "coral_core.cli", "info", tmp_path / "huge.safetensors"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "huge.safetensors: checkpoint architecture is invalid" in proc.stderr


def test_for_classes_keeps_the_head_of_the_same_classes_and_draws_one_for_others():
    m = _model()
    with torch.no_grad():
        m.decoder.head.weight.normal_()
        m.decoder.head.bias.normal_()
    names = m.config.class_names
    assert for_classes(m, names) is m  # the same classes: the model itself
    renamed = for_classes(m, [n.upper() for n in names])  # a spelling: the same head, the names as given
    assert renamed.config.class_names == [n.upper() for n in names]
    assert all(torch.equal(a, b) for a, b in zip(renamed.state_dict().values(), m.state_dict().values()))
    new = for_classes(m, ["background", "liver", names[2], "spleen"])
    assert new.config.class_names == ["background", "liver", names[2], "spleen"] and new.decoder.head.out_channels == 4
    assert not torch.equal(new.decoder.head.weight[2], m.decoder.head.weight[2])  # a new head throughout
    torch.testing.assert_close(new.encoder.blocks[0][0].weight, m.encoder.blocks[0][0].weight)
    torch.testing.assert_close(new.canonical_direction, m.canonical_direction)
    # the same request gives the same model (a stopped fine-tuning of it continues), whatever the global seed
    torch.manual_seed(123)
    again = for_classes(m, ["background", "liver", names[2], "spleen"])
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), new.state_dict().values()))
    assert not torch.equal(for_classes(m, new.config.class_names, seed=1).decoder.head.weight, new.decoder.head.weight)
    fresh = for_classes(m, names, fresh=True)  # a pretrained model's head was never trained: a new one
    assert not torch.equal(fresh.decoder.head.weight, m.decoder.head.weight) and fresh.config.class_names == names


def test_resize_head_keeps_the_pretrained_encoder():
    m = _model()
    r = resize_head(m, 3)
    assert r.config.n_classes == 3 and r.decoder.head.out_channels == 3
    torch.testing.assert_close(r.encoder.blocks[0][0].weight, m.encoder.blocks[0][0].weight)
    torch.testing.assert_close(r.canonical_direction, m.canonical_direction)
    assert r(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)
