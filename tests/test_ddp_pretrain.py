"""Distributed pretraining: 2 CPU processes (gloo) take the same step as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from coral_core.model import UNetConfig
from coral_core.phantom import make_phantom
from coral_core.pretrain import PretrainConfig, pretrain

HERE = Path(__file__).parent


def cohort_and_config(method: str):
    """12 slices and a global batch of 12: one epoch is one step. Instance norm, because
    CPU processes have no SyncBatchNorm (on CUDA, DDP pretraining converts BatchNorm to it)."""
    volumes = [make_phantom(s, n_slices=6)[0].array for s in (3, 4)]
    model = UNetConfig(base_filters=4, depth=2, image_size=32, embedding_dim=16, norm="instance")
    cfg = PretrainConfig(method=method, epochs=1, batch_size=12, device="cpu", amp=False, model=model)
    return volumes, cfg


@pytest.mark.parametrize("method", ["coral", "pcl"])
def test_two_processes_take_the_single_process_step(tmp_path, method):
    volumes, cfg = cohort_and_config(method)
    single = pretrain(cfg, volumes)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "ddp_pretrain_worker.py"), str(r), "2", str(tmp_path / "init"),
                          method, str(tmp_path / "ddp.safetensors")], env=env)
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    with safe_open(str(tmp_path / "ddp.safetensors"), framework="pt") as fh:
        ddp = {k: fh.get_tensor(k) for k in fh.keys()}
        ddp_loss = json.loads(fh.metadata()["loss"])
    reference = single.model.state_dict()
    # the last step's gradients stay on the parameters: compare them too (AdamW's first steps
    # hardly depend on the gradients' scale, so equal weights alone would miss a scaling error)
    reference |= {f"grad.{n}": p.grad for n, p in single.model.named_parameters() if p.grad is not None}
    assert ddp.keys() == reference.keys()
    assert any(k.startswith("grad.encoder.") for k in reference)
    moved = 0
    for key, value in reference.items():  # float32 sums in another order: round-off only
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        moved += int(key.startswith("encoder.") and value.dtype.is_floating_point)
    assert moved > 0
    assert np.allclose(ddp_loss, single.history.metrics["loss"], rtol=1e-5)


@pytest.mark.parametrize("cache", [False, True])
def test_torchrun_cli_pretrain_writes_one_checkpoint_and_one_report(tmp_path, cache):
    """What a user types: torchrun with 2 CPU processes; only rank 0 prints and saves. With
    --slice-cache, process 0 writes the slice file and both map it."""
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "coral_core.cli", "pretrain", "--ddp", "--phantom", "2", "--epochs", "1", "--batch-size", "8",
           "--base-filters", "4", "--image-size", "32", "--embedding-dim", "16", "--device", "cpu",
           "--out", str(out), "--json"] + (["--slice-cache", "c.npy"] if cache else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1
    report = json.loads(reports[0])
    assert report["method"] == "coral" and report["processes"] == 2 and np.isfinite(report["final_loss"])
    assert report["slice_cache"] == ("written" if cache else None)
    from coral_core.checkpoint import load_checkpoint

    model, meta = load_checkpoint(out)
    assert meta["training"]["stage"] == "pretrain" and meta["training"]["processes"] == 2 and model.has_direction
    # no resume file, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "c.npy.json"] * cache + ["ddp.safetensors"]


def test_ddp_flag_outside_torchrun_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "coral_core.cli", "pretrain", "--ddp", "--phantom", "2",
                           "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --ddp runs under torchrun")
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
