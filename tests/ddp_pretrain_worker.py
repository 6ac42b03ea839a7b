"""One process of the 2-process DDP pretraining test (run by tests/test_ddp_pretrain.py).

usage: python ddp_pretrain_worker.py RANK WORLD INIT_FILE METHOD OUTPUT.safetensors
"""

import json
import sys

import torch.distributed as dist
from safetensors.torch import save_file

from test_ddp_pretrain import cohort_and_config

from coral_core.pretrain import pretrain


def main(rank: int, world: int, init_file: str, method: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    volumes, cfg = cohort_and_config(method)
    result = pretrain(cfg, volumes)
    if rank == 0:
        tensors = {k: v.contiguous() for k, v in result.model.state_dict().items()}
        tensors |= {f"grad.{n}": p.grad.contiguous() for n, p in result.model.named_parameters() if p.grad is not None}
        save_file(tensors, output,
                  metadata={"loss": json.dumps(list(map(float, result.history.metrics["loss"])))})
    dist.barrier()  # rank 0 may still be writing: nobody tears the connections down under a peer
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
