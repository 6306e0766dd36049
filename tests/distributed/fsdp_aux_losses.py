"""Run under torchrun (gloo, CPU): the auxiliary losses of an FSDP2-sharded model are those of the
unsharded one (every MoE block's and DSA indexer's, not only the first block's).

Usage: fsdp_aux_losses.py OUT.json PATTERN; rank 0 writes {"plain": ..., "sharded": ...}.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

from hybridlm import HybridLM
from hybridlm.parallel.execution import apply_fsdp
from tests.helpers import MLA_TINY, tiny_config

warnings.filterwarnings("ignore")


def main(out: str, pattern: str) -> None:
    dist.init_process_group("gloo")
    mla = MLA_TINY if "D" in pattern or "+" in pattern else {}
    config = tiny_config(pattern, moe_aux_loss_coeff=0.01, dsa_indexer_loss_coeff=0.1, **mla)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(dist.get_rank()))
    plain = HybridLM(config, seed=0)(ids, torch.roll(ids, -1, 1)).aux_loss
    model = apply_fsdp(HybridLM(config, seed=0))  # the default mesh: on the parameters' device (CPU)
    result = model(ids, torch.roll(ids, -1, 1))
    result.loss.backward()  # a training step's backward runs through the sharded blocks
    sharded = result.aux_loss
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"plain": plain.item(), "sharded": sharded.item()}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)
