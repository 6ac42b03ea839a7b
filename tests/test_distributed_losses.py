"""Distributed losses: 2 CPU processes (gloo) equal one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from coral_core.losses import CoralLoss, GCLLoss, PCLLoss, SimCLRLoss, partition_index

WORKER = Path(__file__).with_name("ddp_worker.py")


def _single_process(data):
    expected = {}
    for name in ("coral", "simclr", "pcl", "gcl"):
        z = data["features"].clone().requires_grad_(True)
        p, parts = data["positions"], data["partitions"]
        if name == "coral":
            loss_fn = CoralLoss(z.shape[-1], temperature=0.2).double()
            with torch.no_grad():
                loss_fn.direction.copy_(data["direction"])
            out = loss_fn(z, p)
            loss = out.total
            expected["coral_ral"], expected["coral_oal"] = out.ral.detach(), out.oal.detach()
        elif name == "simclr":
            loss = SimCLRLoss(0.2)(z)
        elif name == "pcl":
            loss = PCLLoss(0.3, 0.2)(z, p)
        else:
            loss = GCLLoss(0.2)(z, parts)
        loss.backward()
        expected[name] = loss.detach()
        expected[name + "_grad"] = z.grad
        if name == "coral":
            expected["coral_direction_grad"] = loss_fn.direction.grad
    return expected


def test_two_gloo_processes_match_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_slices = 7  # split 3 + 4: unequal blocks on purpose
    data = {
        "features": torch.randn(n_slices, 2, 16, generator=g, dtype=torch.float64),
        "positions": torch.randint(0, 4, (n_slices,), generator=g).double() / 4,
        "partitions": partition_index(torch.arange(n_slices), n_slices),
        "direction": torch.randn(16, generator=g, dtype=torch.float64),
        "bounds": [(0, 3), (3, 7)],
    }
    inputs = tmp_path / "inputs.pt"
    torch.save(data, inputs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(tmp_path / "rendezvous"), str(inputs), str(tmp_path / f"out{r}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    shares = [torch.load(tmp_path / f"out{r}.pt", weights_only=True) for r in range(2)]
    expected = _single_process(data)

    for key in ("coral", "coral_ral", "coral_oal", "simclr", "pcl", "gcl", "coral_direction_grad"):
        total = shares[0][key] + shares[1][key]
        torch.testing.assert_close(total, expected[key], rtol=1e-10, atol=1e-12)
    for key in ("coral_grad", "simclr_grad", "pcl_grad", "gcl_grad"):
        joined = torch.cat([shares[0][key], shares[1][key]])
        torch.testing.assert_close(joined, expected[key], rtol=1e-10, atol=1e-12)
