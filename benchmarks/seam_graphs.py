"""What AOTAutograd hands inductor for fused blocks against the unfused pair, on CPU (no GPU needed).

    python benchmarks/seam_graphs.py                # "*-" against "[*-]"
    python benchmarks/seam_graphs.py "M-" "[M-]"

Builds a tiny model of each pattern, compiles its blocks with ``compile_blocks`` (the seam policy
included) and a backend that records the forward and backward graphs instead of running
inductor, takes one bf16-autocast training step, and prints per graph the tensors saved for the
backward and the counts of the ATen ops that matter at the seam. Equal counts mean the fused
block computes and keeps what the pair does, and any GPU difference is in how inductor groups
the same ops into kernels.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch._dynamo.backends.common import aot_autograd

from hybridlm import HybridLM, ModelConfig
from hybridlm.parallel.execution import compile_blocks

SEAM_OPS = ("add", "mul", "pow", "sum", "mean", "rsqrt", "mm", "_to_copy")


def graphs_of(pattern: str) -> list[tuple[str, torch.fx.GraphModule]]:
    """[(name, graph)] of the compiled blocks' forward and backward graphs, in the order traced."""
    found = []

    def keep(kind):
        def compiler(gm, _inputs):
            found.append((f"graph {len(found)} {kind}", gm))
            return gm.forward

        return compiler

    model = HybridLM(ModelConfig.preset("tiny").replace(pattern=pattern), seed=1)
    compile_blocks(model, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, torch.roll(ids, -1, 1)).loss.backward()
    return found


def summary(gm: torch.fx.GraphModule) -> tuple[int, collections.Counter]:
    """(tensors the graph returns, counts of the seam's op kinds)."""
    ops = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = str(node.target).removeprefix("aten.").split(".")[0]
            if name in SEAM_OPS:
                ops[name] += 1
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return len(out.args[0]), ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patterns", nargs="*", default=["*-", "[*-]"])
    args = ap.parse_args()
    for pattern in args.patterns:
        print(f"## {pattern}")
        total = collections.Counter()
        for name, gm in graphs_of(pattern):
            n_out, ops = summary(gm)
            total += ops if name.endswith("bw") else collections.Counter()
            print(f"  {name}: {n_out} outputs; {dict(sorted(ops.items()))}")
        print(f"  every backward: {dict(sorted(total.items()))}")


if __name__ == "__main__":
    main()
