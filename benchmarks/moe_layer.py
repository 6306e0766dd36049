"""One MoE layer, forward + backward: the token permutation in pair order against the former atomic scatter-adds.

    python benchmarks/moe_layer.py --preset bench-moe-1b --tokens 16384 4096

The layer of ``--preset`` (float32 parameters, bf16 autocast, float32 input rows as the trainer's residual
stream), forward and ``backward(dy)`` with every gradient cleared first, eager and compiled, median of
triton's ``do_bench``, the two routes taking turns ``--rounds`` times:

- ``ordered``: the layer as it is (``hybridlm.ops.permute``: rows put back in pair order, each written once, and
  each token's parts summed in choice order in float32);
- ``index_add``: the former route, patched in here: ``x[order // k]`` (autograd's backward a scatter-add), the
  expert outputs times their weights in bf16, ``index_add_`` into the tokens.

Each row also says whether two calls gave the same bits (output and every gradient) and the peak memory of a
call. ``--profile`` prints each route's kernels by GPU time (compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Iterator

import torch

import hybridlm.layers.moe as moe_module
from hybridlm import ModelConfig
from hybridlm.layers.moe import MoE


def index_add_permute(x, order, k, dtype):
    return x[order // k].to(dtype)


def index_add_unpermute(out, weights, order, dtype):
    k = weights.shape[1]
    out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    return torch.zeros(weights.shape[0], out.shape[1], dtype=dtype, device=out.device).index_add_(
        0, order // k, out.to(dtype)
    )


@contextlib.contextmanager
def route(name: str) -> Iterator[None]:
    """Run the layer with the named route (``ordered``: as it is; ``index_add``: the former one)."""
    saved = moe_module.permute_tokens, moe_module.unpermute_tokens
    if name == "index_add":
        moe_module.permute_tokens, moe_module.unpermute_tokens = index_add_permute, index_add_unpermute
    try:
        yield
    finally:
        moe_module.permute_tokens, moe_module.unpermute_tokens = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-moe-1b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 4096])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from triton.testing import do_bench

    config = ModelConfig.preset(args.preset)
    torch.manual_seed(0)
    layer = MoE(config).cuda()
    layer.init_weights(None, 0.02, 0.01)
    compiled = torch.compile(layer)
    print(
        f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {args.preset}: {config.moe_num_experts} "
        f"experts, top {config.moe_top_k}, hidden {config.hidden_size}, expert ffn {config.resolved_moe_ffn_hidden_size}"
    )
    print("| tokens | route | mode | fwd+bwd ms (median of rounds) | same bits twice | peak GiB |")
    print("|---|---|---|---|---|---|")
    for T in args.tokens:
        x = torch.randn(T, config.hidden_size, device="cuda", requires_grad=True)
        dy = torch.randn(T, config.hidden_size, device="cuda")
        for mode, fn in (("eager", layer), ("compiled", compiled)):

            def step(fn=fn, x=x, dy=dy):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = fn(x.unsqueeze(0))
                y.backward(dy.unsqueeze(0))
                return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]

            times: dict[str, list[float]] = {"ordered": [], "index_add": []}
            same, peak = {}, {}
            for name in times:
                with route(name):
                    a = step()
                    torch.cuda.reset_peak_memory_stats()
                    b = step()
                    peak[name] = torch.cuda.max_memory_allocated() / 2**30
                    same[name] = all(torch.equal(u, v) for u, v in zip(a, b))
                    del a, b
            for rnd in range(args.rounds):
                for name in list(times) if rnd % 2 == 0 else list(times)[::-1]:
                    with route(name):
                        times[name].append(do_bench(step, warmup=10, rep=60, return_mode="median"))
            for name, ms in times.items():
                print(f"| {T} | {name} | {mode} | {statistics.median(ms):.2f} | {same[name]} | {peak[name]:.2f} |")
            ratio = statistics.median(a / o for a, o in zip(times["index_add"], times["ordered"]))
            print(f"| {T} | index_add / ordered | {mode} | {ratio:.3f} | | |", flush=True)
            if args.profile and mode == "compiled":
                from torch.profiler import ProfilerActivity, profile

                for name in times:
                    with route(name), profile(activities=[ProfilerActivity.CUDA]) as prof:
                        step()
                        torch.cuda.synchronize()
                    print(f"\n{name}, {T} tokens, compiled: kernels by GPU time")
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
