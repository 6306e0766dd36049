"""Run under torchrun (gloo, CPU): gather a pipeline model's canonical tensors on rank 0 (PipelineRunner).

Usage: gather_canonical.py OUT.json PP PATTERN. Rank 0 writes OUT.json: whether the gathered tensors equal
``HybridLM(config, seed=0)``'s bitwise (names in the same order), and the tensors any rank passed through an
object collective (pickled whole, which held a stage several times over); every other rank must return nothing.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

from hybridlm import HybridLM, ModelConfig
from hybridlm.checkpoint.weights import canonical_state_dict
from hybridlm.train.pipeline import PipelineRunner

warnings.filterwarnings("ignore")


def tensors_in(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(tensors_in(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensors_in(v) for v in obj)
    return 0


def main(out_file: str, pp: int, pattern: str) -> None:
    dist.init_process_group("gloo")
    pickled = []
    for name in (
        "gather_object",
        "all_gather_object",
        "send_object_list",
        "broadcast_object_list",
        "scatter_object_list",
    ):
        real = getattr(dist, name)

        def spy(*args, _real=real, **kwargs):
            pickled.append(tensors_in(args) + tensors_in(kwargs))
            return _real(*args, **kwargs)

        setattr(dist, name, spy)
    config = ModelConfig(
        pattern=pattern, vocab_size=64, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, mamba_head_dim=8,
        mamba_state_dim=4, mamba_num_groups=1, mamba_chunk_size=8, tie_embeddings=True,
    )  # fmt: skip
    runner = PipelineRunner(
        config, pp=pp, schedule="1f1b", microbatches=pp, local_batch=pp, seq_len=8, seed=0, device=torch.device("cpu")
    )
    out = runner.gather_canonical()
    sent = [0] * dist.get_world_size()
    dist.all_gather_object(sent, sum(pickled))  # (after the gather: this call's own list holds no tensor)
    if dist.get_rank() == 0:
        ref = canonical_state_dict(HybridLM(config, seed=0))
        same = list(out) == list(ref) and all(
            out[k].dtype == v.dtype and torch.equal(out[k], v) for k, v in ref.items()
        )
        with open(out_file, "w") as f:
            json.dump({"same": same, "tensors_pickled": sent}, f)
    elif out:
        raise AssertionError(f"rank {dist.get_rank()} returned {len(out)} tensors")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    sys.stdout.flush()
    os._exit(0)
