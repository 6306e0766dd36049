"""Run under torchrun (gloo, CPU): FSDP2-shard a fused model, train, save DCP training state.

Writes <out>/losses.json with the loss of every step; the state is saved after step ``save_at``.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hybridlm import HybridLM
from hybridlm.checkpoint.training_state import save_training_state
from tests.helpers import tiny_config

warnings.filterwarnings("ignore")


def main(out: str, pattern: str, steps: int, save_at: int) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # FSDP's default would be a GPU where there is one
    model = HybridLM(tiny_config(pattern), seed=0)
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (2, 16), generator=gen) for _ in range(steps)]
    losses = []
    for step, ids in enumerate(batches, start=1):
        opt.zero_grad()
        loss = model(ids, torch.roll(ids, -1, 1)).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == save_at:
            save_training_state(f"{out}/state", model, opt, step=step)
    if dist.get_rank() == 0:
        with open(f"{out}/losses.json", "w") as f:
            json.dump(losses, f)
    dist.barrier()  # every rank is done; leave as `hybridlm train` does (hybridlm.cli.entry)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    sys.stdout.flush()
    os._exit(0)
