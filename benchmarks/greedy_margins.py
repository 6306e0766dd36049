"""How far apart a random-weight model's top two logits are, against how much bf16 moves them.

    python benchmarks/greedy_margins.py --preset bench-1.3b

Two routes of a bf16 model that differ only in rounding (a kernel against its torch reference) pick other greedy
tokens where the top two logits are closer than the routes' error. This measures both on the CPU: a preset's
random-weight model greedily continues a random prompt in float32; then, teacher-forced on that sequence, the same
weights cast to bf16 (``HybridLM.cast``) give logits again. Printed: the gap between the two best float32 logits
at each generated position, bf16's error at those two, and at how many positions bf16's argmax differs.
"""

from __future__ import annotations

import argparse
import time

import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.infer.generate import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    config = ModelConfig.preset(args.preset)
    model = HybridLM(config, seed=args.seed).eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(args.seed))
    P = args.prompt_len
    with torch.no_grad():
        new = generate(model, [prompt.tolist()], max_new_tokens=args.new_tokens)[0]
        seq = torch.tensor([prompt.tolist() + new])
        f32 = model(seq).logits[0, P - 1 : -1].double()  # (new, V): the logits that chose each new token
        model.cast(torch.bfloat16)
        b16 = model(seq).logits[0, P - 1 : -1].double()
    top2 = f32.topk(2, dim=-1)
    gap = top2.values[:, 0] - top2.values[:, 1]
    err = (b16 - f32).abs().gather(1, top2.indices).max(dim=-1).values
    flips = (b16.argmax(-1) != f32.argmax(-1)).nonzero().flatten().tolist()
    n = len(gap)
    print(f"{args.preset}, seed {args.seed}: {P}-token prompt, {n} greedy tokens ({time.perf_counter() - t0:.0f} s)")
    print("| | median | min | max |")
    print("|---|---|---|---|")
    print(f"| float32 top-2 gap | {gap.median():.3g} | {gap.min():.3g} | {gap.max():.3g} |")
    print(f"| bf16's error at the top two | {err.median():.3g} | {err.min():.3g} | {err.max():.3g} |")
    print(
        f"positions where bf16's error exceeds half the gap: {int((2 * err > gap).sum())} of {n}; bf16's argmax "
        f"differs at {len(flips)} of {n} (positions {flips[:10]})"
    )


if __name__ == "__main__":
    main()
