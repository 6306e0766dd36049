"""The lightning indexer's steps on CUDA, reference against kernel, time and error (DeepSeek sparse attention).

    python benchmarks/dsa_indexer.py                        # 4 x 4096, 64 index heads of 128, top-k 2048
    python benchmarks/dsa_indexer.py --shape 1x32768 --heads 64 --dim 128 --topk 2048
    python benchmarks/dsa_indexer.py --tune                 # every kernel's tiles and warps (--tune backward: one)
    python benchmarks/dsa_indexer.py --tune target --attention-heads 16 --attention-dim 192
    python benchmarks/dsa_indexer.py --set indexer_triton.D_CHUNK=64

``scores``: ``index_scores`` over a whole sequence, in the DSA layer's chunks of queries (``dsa.query_chunks``), each
chunk causal (its ``diagonal``): the torch reference (per-head products in float32), then the Triton kernel at each
``INPUT_PRECISION`` (tf32x3, ieee, tf32). Error: max |scores - float64| / max |float64| over the first
``--check-rows`` queries of row 0 (the float64 reference's cost grows with them), beside the float32 reference's.

``scores fwd + bwd``: the indexer loss's pattern, each chunk scored with gradients and its backward run from a
random gradient of the scores (dq, dw, dk; the error: the largest of the three against float64), for float32
gradients (the products into q and k in ``INPUT_PRECISION``) and for gradients that go on in bf16 (``grad_dtype``: in
``PRODUCTS_16BIT``), beside the float32 reference's gradients rounded to bf16.

``top-k``: ``select_topk`` of those scores under the causal mask, the stable sort against the bisection kernel, and
whether the two kept the same keys (they must, exactly).

``loss target``: the indexer loss's target (``indexer_target``: the main attention's probabilities summed over its
``--attention-heads`` heads of ``--attention-dim``, bf16 q and k as MLA makes them) under the causal mask, in the
layer's chunks: the torch reference (every head's float32 logits) against the two-pass kernel.

Inputs are random, as the layer makes them: q and k bf16-rounded then float32 (projections of a bf16 model), k
layer-normed, the head weights scaled by 1/sqrt(n d). Times are medians of ``--rounds`` CUDA-event timings.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from knobs import apply, restore  # this folder is on the path when run as a script

from hybridlm.layers.dsa import query_chunks
from hybridlm.ops import indexer_triton
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.indexer import (
    index_scores,
    index_scores_reference,
    indexer_target,
    indexer_target_reference,
    select_topk,
)

#: (BLOCK_T, BLOCK_S, D_CHUNK, warps, KEYS_FASTEST) settings ``--tune`` times for the scores, and (TOPK_BLOCK, warps)
#: for the top-k.
TUNE = [(128, 64, 64, 8, 1), (128, 64, 64, 8, 0), (128, 64, 128, 8, 1), (128, 64, 32, 8, 1), (64, 32, 64, 4, 1),
        (64, 32, 64, 4, 0), (128, 32, 64, 8, 1), (64, 64, 64, 8, 1)]  # fmt: skip
TUNE_TOPK = [(1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16), (512, 4)]
#: (DQ_BLOCK_T, DQ_BLOCK_S, DK_BLOCK_T, DK_BLOCK_S, warps, DK_HEAD_GROUPS) settings ``--tune`` times for the backward.
TUNE_BWD = [(32, 64, 64, 32, 4, 8), (32, 64, 64, 32, 8, 8), (64, 64, 64, 64, 8, 8), (64, 32, 64, 32, 8, 8),
            (32, 32, 32, 32, 4, 8), (16, 64, 64, 16, 4, 8), (32, 64, 64, 32, 4, 16), (32, 64, 64, 32, 4, 4),
            (64, 32, 128, 32, 8, 8)]  # fmt: skip
#: (LSE_BLOCK_T, LSE_BLOCK_S, LSE_WARPS, PROBS_BLOCK_T, PROBS_BLOCK_S, PROBS_WARPS, D_CHUNK) settings ``--tune`` times
#: for the loss target's two kernels.
TUNE_TARGET = [(64, 64, 4, 128, 64, 8, 64), (64, 64, 4, 64, 64, 4, 64), (128, 64, 8, 64, 64, 4, 64),
               (128, 64, 8, 128, 64, 8, 64), (64, 128, 8, 64, 128, 8, 64), (64, 64, 4, 64, 64, 4, 32),
               (128, 32, 4, 128, 32, 4, 64), (32, 64, 4, 32, 64, 4, 64)]  # fmt: skip


def timed(fn, rounds: int) -> tuple[float, object]:
    """(median ms, last result) of ``fn()`` over ``rounds`` runs after one warm-up."""
    out, times = fn(), []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def chunked_scores(q, w, k, kernels: str) -> torch.Tensor:
    """The whole sequence's causal scores (B, L, L), in the layer's chunks of queries."""
    B, T, n, _ = q.shape
    with use_kernels(kernels):
        parts = [index_scores(q[:, a:b], w[:, a:b], k, a) for a, b in query_chunks(B, T, k.shape[1], n, 4)]
    return torch.cat(parts, 1)


def tune_table(
    knobs: tuple[str, ...], settings: list[tuple[int, ...]], columns: tuple[str, ...], row, module="indexer_triton"
) -> None:
    """A table of ``row()`` (its cells, "a | b") at each setting of the ``knobs`` of ``hybridlm.ops.<module>``."""
    print(f"\n| {' | '.join(knobs)} | {' | '.join(columns)} |\n|{'---:|' * (len(knobs) + len(columns))}")
    for setting in settings:
        old = apply([f"{module}.{name}={v}" for name, v in zip(knobs, setting)])
        cells = " | ".join(map(str, setting))
        try:
            print(f"| {cells} | {row()} |")
        except Exception as e:  # (a setting the compiler refuses, e.g. out of shared memory)
            print(f"| {cells} | failed: {type(e).__name__} |{' |' * (len(columns) - 1)}")
        finally:
            restore(old)


def chunked_scores_backward(q, w, k, g, kernels: str, grad_dtype=None) -> tuple[torch.Tensor, ...]:
    """The indexer loss's pattern: each chunk of queries scored with gradients (causal), then its backward from ``g``
    (B, L, L); returns (dq, dw, dk) of the whole sequence (``grad_dtype``: ``index_scores``')."""
    B, T, n, _ = q.shape
    dq, dw, dk = torch.empty_like(q), torch.empty_like(w), torch.zeros_like(k)
    with use_kernels(kernels):
        for a, b in query_chunks(B, T, k.shape[1], n, 4):
            qa, wa, kk = (
                q[:, a:b].detach().requires_grad_(),
                w[:, a:b].detach().requires_grad_(),
                k.detach().requires_grad_(),
            )
            ga, gw, gk = torch.autograd.grad(index_scores(qa, wa, kk, a, grad_dtype), (qa, wa, kk), g[:, a:b])
            dq[:, a:b], dw[:, a:b] = ga, gw
            dk += gk
    return dq, dw, dk


def chunked_target(qa, ka, allowed, heads: int, kernels: str) -> torch.Tensor:
    """The loss target of the whole sequence (B, L, L) under the causal ``allowed``, in the layer's chunks of queries
    (sized by its ``heads`` index heads), each chunk's diagonal given."""
    B, T = qa.shape[:2]
    with use_kernels(kernels):
        chunks = query_chunks(B, T, ka.shape[1], heads, 4)
        scale = qa.shape[-1] ** -0.5
        return torch.cat([indexer_target(qa[:, a:b], ka, allowed[:, a:b], scale, a) for a, b in chunks], 1)


def backward_error(q, w, k, g, c: int, kernels: str, grad_dtype=None, rounded: bool = False) -> float:
    """The largest of dq's, dw's and dk's max |x - float64| / max |float64| over the first ``c`` queries of row 0
    (``grad_dtype``: ``index_scores``'; ``rounded``: each gradient rounded to bf16 first)."""

    def grads(dtype, mode):
        leaves = [t[:1, :c].detach().to(dtype).requires_grad_() for t in (q, w)] + [
            k[:1].detach().to(dtype).requires_grad_()
        ]
        with use_kernels(mode):
            return torch.autograd.grad(index_scores(*leaves, 0, grad_dtype), leaves, g[:1, :c].to(dtype))

    exact = grads(torch.float64, "torch")
    got = [t.bfloat16() if rounded else t for t in grads(torch.float32, kernels)]
    return max(((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(got, exact))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4x4096", help="BxL")
    ap.add_argument("--heads", type=int, default=64, help="index heads (dsa_indexer_n_heads)")
    ap.add_argument("--dim", type=int, default=128, help="index head size (dsa_indexer_head_dim)")
    ap.add_argument("--topk", type=int, default=2048, help="keys kept per query (dsa_indexer_topk)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check-rows", type=int, default=256, help="queries of row 0 checked against float64")
    ap.add_argument("--attention-heads", type=int, default=16, help="the main attention's heads (loss target)")
    ap.add_argument("--attention-dim", type=int, default=192, help="its query-key head size (MLA: 128 + 64)")
    ap.add_argument("--tune", nargs="?", const="scores,backward,topk,target", default="",
                    help="time the kernels at each of their settings instead (TUNE, TUNE_BWD, TUNE_TOPK, "
                         "TUNE_TARGET; a comma list of scores, backward, topk, target: all four without one)")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.KNOB=N", help="a kernel setting first")
    args = ap.parse_args()
    apply(args.set)
    if not torch.cuda.is_available():
        raise SystemExit("dsa_indexer.py times CUDA kernels: no CUDA device here")
    B, L = (int(v) for v in args.shape.lower().split("x"))
    n, d = args.heads, args.dim
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(B, L, n, d, device="cuda", generator=gen).bfloat16().float()
    k = torch.nn.functional.layer_norm(torch.randn(B, L, d, device="cuda", generator=gen).bfloat16().float(), (d,))
    w = torch.randn(B, L, n, device="cuda", generator=gen) * (n * d) ** -0.5
    allowed = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()[None]
    g = torch.randn(B, L, L, device="cuda", generator=gen) * 1e-3  # (a loss's gradient of the scores)
    qa = torch.randn(B, L, args.attention_heads, args.attention_dim, device="cuda", generator=gen).bfloat16()
    ka = torch.randn(B, L, args.attention_heads, args.attention_dim, device="cuda", generator=gen).bfloat16()
    c = min(args.check_rows, L)
    exact_target = indexer_target_reference(qa[:1, :c].double(), ka[:1].double(), allowed[:, :c], qa.shape[-1] ** -0.5)

    def target_err(target: torch.Tensor) -> float:
        return ((target[:1, :c].double() - exact_target).abs().max() / exact_target.abs().max()).item()

    exact = index_scores_reference(q[:1, :c].double(), w[:1, :c].double(), k[:1].double(), 0)
    finite = exact.isfinite()

    def err(scores: torch.Tensor) -> float:
        got = scores[:1, :c].double()
        return ((got - exact)[finite].abs().max() / exact[finite].abs().max()).item()

    print(
        f"lightning indexer, {B}x{L}, {n} heads of {d}, top-k {args.topk}, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, medians of {args.rounds}\n"
    )
    if args.tune:

        def scores_row() -> str:
            ms, got = timed(lambda: chunked_scores(q, w, k, "auto"), args.rounds)
            return f"{ms:.2f} | {err(got):.2e}"

        def backward_row() -> str:  # (a bf16 model's backward: its products into q and k in PRODUCTS_16BIT)
            ms, _ = timed(lambda: chunked_scores_backward(q, w, k, g, "auto", torch.bfloat16), args.rounds)
            return f"{ms:.2f} | {backward_error(q, w, k, g, c, 'auto', torch.bfloat16):.2e}"

        tables = args.tune.split(",")
        if "scores" in tables:
            tune_table(("BLOCK_T", "BLOCK_S", "D_CHUNK", "SCORE_WARPS", "KEYS_FASTEST"), TUNE, ("ms", "error vs float64"),
                       scores_row)  # fmt: skip
        if "backward" in tables:
            tune_table(("DQ_BLOCK_T", "DQ_BLOCK_S", "DK_BLOCK_T", "DK_BLOCK_S", "BWD_WARPS", "DK_HEAD_GROUPS"),
                       TUNE_BWD, ("fwd + bwd ms", "error vs float64"), backward_row)  # fmt: skip
        if "target" in tables:

            def target_row() -> str:
                ms, got = timed(lambda: chunked_target(qa, ka, allowed, n, "auto"), args.rounds)
                return f"{ms:.2f} | {target_err(got):.2e}"

            tune_table(("LSE_BLOCK_T", "LSE_BLOCK_S", "LSE_WARPS", "PROBS_BLOCK_T", "PROBS_BLOCK_S", "PROBS_WARPS",
                        "D_CHUNK"), TUNE_TARGET, ("ms", "error vs float64"), target_row, "indexer_target_triton")  # fmt: skip
        if "topk" not in tables:
            return
        scores = chunked_scores(q, w, k, "auto")
        want = select_with("torch", scores, allowed, args.topk, n)

        def topk_row() -> str:
            ms, got = timed(lambda: select_with("auto", scores, allowed, args.topk, n), args.rounds)
            return f"{ms:.2f} | {torch.equal(got, want)}"

        tune_table(("TOPK_BLOCK", "TOPK_WARPS"), TUNE_TOPK, ("top-k ms", "same keys as the sort"), topk_row)
        return
    print("| step | path | ms | error vs float64 | note |\n|---|---|---:|---:|---|")
    ms_ref, ref = timed(lambda: chunked_scores(q, w, k, "torch"), args.rounds)
    print(f"| scores | torch reference (float32 products) | {ms_ref:.2f} | {err(ref):.2e} | |")
    before = indexer_triton.INPUT_PRECISION
    try:
        for precision in ("tf32x3", "ieee", "tf32"):
            indexer_triton.INPUT_PRECISION = precision
            reset_paths()
            ms, got = timed(lambda: chunked_scores(q, w, k, "auto"), args.rounds)
            path = paths_used().get("index_scores")
            print(f"| scores | {path} {precision} | {ms:.2f} | {err(got):.2e} | {ms_ref / ms:.2f}x the reference |")
    finally:
        indexer_triton.INPUT_PRECISION = before
    ms_bref, _ = timed(lambda: chunked_scores_backward(q, w, k, g, "torch"), args.rounds)
    print(f"| scores fwd + bwd | torch reference | {ms_bref:.2f} | {backward_error(q, w, k, g, c, 'torch'):.2e} | |")
    print(f"| scores fwd + bwd | torch reference, gradients rounded to bf16 | | "
          f"{backward_error(q, w, k, g, c, 'torch', rounded=True):.2e} | what a bf16 model's projections read |")  # fmt: skip
    for grad_dtype in (None, torch.bfloat16):  # the products into q and k: INPUT_PRECISION, then PRODUCTS_16BIT
        products = indexer_triton.PRODUCTS_16BIT if grad_dtype else indexer_triton.INPUT_PRECISION
        reset_paths()
        ms_bk, _ = timed(lambda dt=grad_dtype: chunked_scores_backward(q, w, k, g, "auto", dt), args.rounds)
        path = paths_used().get("index_scores")
        print(f"| scores fwd + bwd | {path}, gradients {'bf16' if grad_dtype else 'float32'} (products {products}) | "
              f"{ms_bk:.2f} | {backward_error(q, w, k, g, c, 'auto', grad_dtype):.2e} | "
              f"{ms_bref / ms_bk:.2f}x the reference |")  # fmt: skip
    ms_tref, tref = timed(lambda: chunked_target(qa, ka, allowed, n, "torch"), args.rounds)
    print(f"| loss target | torch reference (float32 logits) | {ms_tref:.2f} | {target_err(tref):.2e} | |")
    del tref
    reset_paths()
    ms_tk, tk = timed(lambda: chunked_target(qa, ka, allowed, n, "auto"), args.rounds)
    print(f"| loss target | {paths_used().get('index_target')} two passes | {ms_tk:.2f} | {target_err(tk):.2e} | "
          f"{ms_tref / ms_tk:.2f}x the reference |")  # fmt: skip
    del tk
    ms_sort, by_sort = timed(lambda: select_with("torch", ref, allowed, args.topk, n), args.rounds)
    reset_paths()
    ms_kernel, by_kernel = timed(lambda: select_with("auto", ref, allowed, args.topk, n), args.rounds)
    same = torch.equal(by_sort, by_kernel)
    print(f"| top-k | stable sort (torch) | {ms_sort:.2f} | | |")
    print(f"| top-k | {paths_used().get('index_topk')} bisection | {ms_kernel:.2f} | | {ms_sort / ms_kernel:.2f}x; "
          f"same keys: {same} |")  # fmt: skip
    if not same:
        raise SystemExit(f"top-k: the kernel kept other keys than the sort ({(by_sort != by_kernel).sum().item()})")


def select_with(kernels: str, scores: torch.Tensor, allowed: torch.Tensor, topk: int, heads: int) -> torch.Tensor:
    """The layer's selection in its chunks of queries (of ``heads`` index heads), under ``kernels``."""
    B, T, S = scores.shape
    with use_kernels(kernels):
        chunks = query_chunks(B, T, S, heads, 4)
        return torch.cat([select_topk(scores[:, a:b], allowed[:, a:b], topk) for a, b in chunks], 1)


if __name__ == "__main__":
    main()
