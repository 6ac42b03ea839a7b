"""One process of the 2-process distributed loss test (run by tests/test_distributed_losses.py).

usage: python ddp_worker.py RANK WORLD INIT_FILE INPUTS.pt OUTPUT.pt

Each rank takes its block of the batch saved in INPUTS.pt, computes every loss with
``distributed=True`` and saves its loss shares and the gradients of its own rows.
"""

import sys

import torch
import torch.distributed as dist

from coral_core.losses import CoralLoss, GCLLoss, PCLLoss, SimCLRLoss


def main(rank: int, world: int, init_file: str, inputs: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = torch.load(inputs, weights_only=True)
    lo, hi = data["bounds"][rank]
    results = {}
    for name in ("coral", "simclr", "pcl", "gcl"):
        z = data["features"][lo:hi].clone().requires_grad_(True)
        p = data["positions"][lo:hi]
        parts = data["partitions"][lo:hi]
        if name == "coral":
            loss_fn = CoralLoss(z.shape[-1], temperature=0.2, distributed=True).double()
            with torch.no_grad():
                loss_fn.direction.copy_(data["direction"])
            out = loss_fn(z, p)
            loss = out.total
            results["coral_ral"] = out.ral.detach()
            results["coral_oal"] = out.oal.detach()
        elif name == "simclr":
            loss = SimCLRLoss(0.2, distributed=True)(z)
        elif name == "pcl":
            loss = PCLLoss(0.3, 0.2, distributed=True)(z, p)
        else:
            loss = GCLLoss(0.2, distributed=True)(z, parts)
        loss.backward()
        results[name] = loss.detach()
        results[name + "_grad"] = z.grad
        if name == "coral":
            results["coral_direction_grad"] = loss_fn.direction.grad
    torch.save(results, output)
    dist.barrier()  # rank 0 may still be writing: nobody tears the connections down under a peer
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
