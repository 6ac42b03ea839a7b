"""The wheel users install from the napari hub: what it holds, and that the installed package works on its own.

The tests build the wheel from this checkout, unpack-install it into a folder of its own, and run it from there with
the checkout out of the way: the npe2 manifest napari finds through the entry point, the bundled demo model, and a
segmentation with it through the `coral` command."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = out.glob("napari_coral-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with the installed copy first on the path, run outside the checkout (whose editable install is
    still on the path behind it: the checks below say which copy answered)."""
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_wheel_holds_both_packages_the_manifest_and_the_model_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = next(t for t in tops if t.endswith(".dist-info"))
    assert tops == {"coral_core", "napari_coral", dist_info}, tops
    assert "napari_coral/napari.yaml" in names
    assert "coral_core/assets/demo_model.safetensors" in names
    for package in ("coral_core", "napari_coral", "napari_coral/_widgets"):
        assert f"{package}/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # every module of the checkout is in the wheel
    sources = {p.relative_to(REPO).as_posix() for pkg in ("coral_core", "napari_coral") for p in (REPO / pkg).rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))

    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode())
    assert dict(entry_points["napari.manifest"]) == {"napari-coral": "napari_coral:napari.yaml"}
    assert dict(entry_points["console_scripts"]) == {
        "coral": "coral_core.cli:main", "napari-coral": "napari_coral.__main__:main",
    }
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Classifier: Framework :: napari" in metadata
    assert "Requires-Dist: torch" in metadata
    assert "# napari-coral" in metadata  # the README is the hub's description


def test_installed_manifest_is_found_through_the_entry_point_and_every_command_imports(installed, tmp_path):
    script = """
import json, sys
from importlib.metadata import distributions
from pathlib import Path
import npe2

(dist,) = [d for d in distributions(path=[sys.argv[1]]) if d.metadata["Name"] == "napari-coral"]
(ep,) = [e for e in dist.entry_points if e.group == "napari.manifest"]
module, _, resource = ep.value.partition(":")
manifest = npe2.PluginManifest.from_distribution("napari-coral")
manifest.validate_imports()
import napari_coral, coral_core
print(json.dumps({
    "module": module, "resource": resource,
    "napari_coral": napari_coral.__file__, "coral_core": coral_core.__file__,
    "name": manifest.name,
    "commands": sorted(c.id for c in manifest.contributions.commands),
    "widgets": sorted(w.display_name for w in manifest.contributions.widgets),
    "readers": [r.filename_patterns for r in manifest.contributions.readers],
}))
"""
    proc = _run_installed(installed, tmp_path, "-c", script, str(installed))
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert (found["module"], found["resource"]) == ("napari_coral", "napari.yaml")
    for package in ("napari_coral", "coral_core"):
        assert Path(found[package]).is_relative_to(installed), found[package]
    assert found["name"] == "napari-coral"
    assert found["widgets"] == ["Embedding", "Fine-tune", "Model", "Segment"]
    assert "*.nii.gz" in found["readers"][0]
    assert len(found["commands"]) == 9


def test_installed_coral_segments_with_its_own_bundled_model(installed, tmp_path):
    make = """
import sys
from coral_core.phantom import make_phantom
from coral_core.volume import save_like
from coral_core.checkpoint import bundled_model_path
image, labels = make_phantom(7)
save_like(sys.argv[1], image.array, image)
save_like(sys.argv[2], labels.array, image)
print(bundled_model_path())
"""
    proc = _run_installed(installed, tmp_path, "-c", make, "image.nii.gz", "truth.nii.gz")
    assert proc.returncode == 0, proc.stderr
    model = Path(proc.stdout.strip())
    assert model.is_file() and model.is_relative_to(installed), model
    proc = _run_installed(installed, tmp_path, "-m", "coral_core.cli", "segment", "image.nii.gz", "--out", "pred.nii.gz", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shape"] == [18, 128, 128]
    proc = _run_installed(installed, tmp_path, "-m", "coral_core.cli", "evaluate", "pred.nii.gz", "truth.nii.gz", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mean_dice"] > 0.8
