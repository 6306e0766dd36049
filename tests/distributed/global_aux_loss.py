"""Run under torchrun (gloo, CPU): ``moe_aux_loss_type = "global_aux_loss"`` on each data-parallel rank's own rows is
the micro-batch loss of all the ranks' rows together: the ranks' losses average to the one-process "aux_loss" of
the whole batch, and their router gradients (each rank's loss weighted by its share of the rows, as the trainer
weighs it) sum to that loss's gradient; also with every block recomputed under activation checkpointing (the
all-reduce of the counts then runs again in the backward).

Usage: global_aux_loss.py OUT.json; rank 0 writes {"whole", "local_mean", "eager": {...}, "checkpointed": {...}}.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

from hybridlm import HybridLM
from hybridlm.parallel.execution import apply_activation_checkpointing, share_expert_counts
from tests.helpers import rel_err, tiny_config

warnings.filterwarnings("ignore")


def aux_and_router_grads(model: HybridLM, ids: torch.Tensor, weight: float) -> tuple[float, list[torch.Tensor]]:
    """The model's aux loss on ``ids``, and its routers' weight gradients from ``weight`` times it."""
    out = model(ids, torch.roll(ids, -1, 1))
    (out.aux_loss * weight).backward()
    grads = [m.gate.weight.grad.clone() for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    return out.aux_loss.item(), grads


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = tiny_config("M-E[*E]", moe_aux_loss_coeff=0.01, moe_aux_loss_type="global_aux_loss", init_std=0.5)
    rows = [torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    whole, whole_grads = aux_and_router_grads(
        HybridLM(config.replace(moe_aux_loss_type="aux_loss"), seed=0), torch.cat(rows), 1.0
    )
    local, _ = aux_and_router_grads(HybridLM(config.replace(moe_aux_loss_type="aux_loss"), seed=0), rows[rank], 1.0)
    result = {"whole": whole, "local_mean": None}
    mean = torch.tensor(local / world)
    dist.all_reduce(mean)
    result["local_mean"] = mean.item()
    for name, wrap in (("eager", lambda m: m), ("checkpointed", apply_activation_checkpointing)):
        model = wrap(HybridLM(config, seed=0))
        share_expert_counts(model, dist.group.WORLD)
        aux, grads = aux_and_router_grads(model, rows[rank], 1.0 / world)
        aux_mean = torch.tensor(aux / world)
        dist.all_reduce(aux_mean)
        for g in grads:
            dist.all_reduce(g)
        result[name] = {"aux_mean": aux_mean.item(), "grad_err": max(map(rel_err, grads, whole_grads))}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
