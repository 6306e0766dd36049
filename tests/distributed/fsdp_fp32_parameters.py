"""Run under torchrun (gloo, CPU): a bf16 data-parallel run keeps the model's float32 parameters float32.

FSDP gathers parameters in bf16; the ones ``HybridLM.cast`` keeps in float32 (Mamba2's A_log, D and
dt_bias, the MoE router) stay whole on every rank. The script trains through ``Trainer`` and checks:
their dtype inside the forward, that their gradients are summed over the ranks (the copies stay equal
while the ranks see other rows), and that the gradient norm counts each copy once.

Usage: fsdp_fp32_parameters.py OUT.json RUN_DIR; rank 0 writes what it saw.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

from hybridlm.parallel.execution import clip_grad_norm, reduce_replicated_gradients, replicated
from hybridlm.train.config import RunConfig
from hybridlm.train.trainer import Trainer

warnings.filterwarnings("ignore")

SETS = [
    "model.pattern=M-[*E]",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=128",
    "model.moe_num_experts=4",
    "model.moe_router_score=sigmoid",
    "model.moe_router_expert_bias=true",
    "data.seq_len=64",
    "train.batch_size=8",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.eval_every=4",
    "train.device=cpu",
    "train.precision=bf16",
]


def main(out: str, run_dir: str) -> None:
    t = Trainer(RunConfig().with_overrides(SETS), run_dir=run_dir, progress=False)
    kept = {n: p for n, p in t.model.named_parameters() if replicated(p)}
    seen: dict[str, str] = {}
    for name, module in t.model.named_modules():
        for attr in getattr(module, "keep_fp32", ()):
            if f"{name}.{attr}" in kept:

                def record(mod, args, attr=attr, name=name):
                    seen[f"{name}.{attr}"] = str(mod.get_parameter(attr).dtype)

                module.register_forward_pre_hook(record)

    # One backward as the trainer runs it, then the norm against the full gradients'.
    batch = t._to_device(t.train_rows.rows(t.sampler.local_rows(0)))
    with t._autocast():
        loss = t.model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], return_logits=False).loss
    loss.backward()
    reduce_replicated_gradients(t.model)
    full = [p.grad if replicated(p) else p.grad.full_tensor() for p in t.model.parameters() if p.grad is not None]
    want = float(torch.nn.utils.get_total_norm(full))
    twice = float(torch.nn.utils.get_total_norm([*full, *(p.grad for p in kept.values())]))  # a copy counted twice
    got = clip_grad_norm(t.model.parameters(), float("inf"), t.device, lambda p: t.is_main or not replicated(p))
    t.optimizer.zero_grad(set_to_none=True)

    t.run_loop()
    copies = {}
    for name, p in kept.items():
        box = [None] * dist.get_world_size()
        dist.all_gather_object(box, p.detach())
        copies[name] = all(torch.equal(box[0], other) for other in box[1:])
    if t.is_main:
        with open(out, "w") as f:
            json.dump({"dtypes": seen, "norm": [got, want, twice], "equal_copies": copies}, f)
    t.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)
