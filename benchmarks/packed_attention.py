"""One attention layer's training step (forward and backward) by attention path, time and memory, paths taking turns.

    python benchmarks/packed_attention.py --preset bench-1.3b --pattern + --shape 4x4096      # MLA at DeepSeek's heads
    python benchmarks/packed_attention.py --preset bench-1.3b --pattern '*' --shape 4x4096    # attention, for scale
    python benchmarks/packed_attention.py --pattern D                                          # DSA (its top-k: 2048)
    python benchmarks/packed_attention.py --pattern D --set dsa_indexer_loss_coeff=0.01        # DSA with its indexer loss
    python benchmarks/packed_attention.py --pattern + --set num_attention_heads=32 --documents 8
    python benchmarks/packed_attention.py --pattern D --rounds 3 --profile --profile-rows 25   # DSA's kernels

One ``--pattern`` mixer (``+`` MLA, ``D`` DSA or ``*`` attention) of the preset's sizes, bf16 weights on CUDA, run
eagerly (the FlexAttention kernel compiled, as the ops run it), over rows cut into ``--documents`` equal documents:

- ``flex``: the layer as it runs, FlexAttention under the documents' block mask (``ops.attention.causal_attention``;
  DSA: under its selection's, ``masked_attention``);
- ``dense mask``: the same rows through SDPA under the dense (B, 1, L, L) mask, kernels for attention forced to torch
  (what MLA and DSA ran before they took FlexAttention);
- ``causal``: rows without documents, SDPA with cuDNN's kernel first, as ``causal_attention`` asks (DSA: FlexAttention
  under its selection, which is causal);
- ``causal, SDPA's order``: the same with SDPA choosing its own backend (what MLA ran before; not for DSA);
- ``flex, indexer on torch`` (DSA only): ``flex`` with the indexer's scores and top-k on their torch references
  (``ops.indexer``: per-head products, a sort), what DSA ran before its indexer kernels;
- ``flex, loss's products in float32`` (DSA only): ``flex`` with the indexer loss's backward taking its products into
  q and k in the forward's precision (``indexer_triton.PRODUCTS_16BIT`` = None), as it did before a bf16 model's took
  them in TF32 (the same as ``flex`` without the loss).

Per path: the median step over ``--rounds`` turns, the peak memory above what was allocated before the step, and the
attention kernel the dispatch recorded. The layer's projections are the same in every path; only attention differs.
``--profile``: then the ``flex`` step's kernels by GPU time (where a step's time goes).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from kernel_profile import top_kernels  # this folder is on the path when run as a script
from knobs import model_fields

from hybridlm import ModelConfig
from hybridlm.model import HybridLM
from hybridlm.ops import attention as attention_ops
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels

MIB = 2**20


@contextlib.contextmanager
def sdpa_default_order():
    """``causal_attention``'s rows without documents through plain SDPA (its own backend choice)."""
    before = attention_ops._sdpa_causal

    def plain(q, k, v, gqa, scale):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)

    attention_ops._sdpa_causal = plain
    try:
        yield
    finally:
        attention_ops._sdpa_causal = before


@contextlib.contextmanager
def float32_loss_products():
    """The indexer loss's backward with its products into q and k in the forward's precision, whatever the model's."""
    from hybridlm.ops import indexer_triton

    before = indexer_triton.PRODUCTS_16BIT
    indexer_triton.PRODUCTS_16BIT = None
    try:
        yield
    finally:
        indexer_triton.PRODUCTS_16BIT = before


PATHS = {  # name: (documents?, context that chooses the path)
    "flex": (True, contextlib.nullcontext),
    "dense mask": (True, lambda: use_kernels("auto,attention=torch")),
    "causal": (False, contextlib.nullcontext),
    "causal, SDPA's order": (False, sdpa_default_order),
    "flex, indexer on torch": (True, lambda: use_kernels("auto,index_scores=torch,index_topk=torch")),
    "flex, loss's products in float32": (True, float32_loss_products),
}
DSA_ONLY = ("flex, indexer on torch", "flex, loss's products in float32")
NOT_FOR = {"D": ("causal, SDPA's order",), "+": DSA_ONLY, "*": DSA_ONLY}


def step(model: HybridLM, x: torch.Tensor, doc_ids: torch.Tensor | None, grad: torch.Tensor) -> None:
    """One forward and backward of the model's only mixer on ``x`` (B, L, H), and of its auxiliary loss if it has one
    (DSA's indexer loss, with ``--set dsa_indexer_loss_coeff=...``)."""
    ctx = model.make_context(x.shape[0], x.shape[1], x.device, doc_ids=doc_ids)
    mixer = model.blocks["0"].layers[0].mixer
    aux = []
    y = mixer(x, ctx, aux) if getattr(mixer, "has_aux_loss", False) else mixer(x, ctx)
    torch.autograd.backward([y, *aux], [grad, *(torch.ones_like(a) for a in aux)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--pattern", default="+", help="the one mixer: + (MLA), D (DSA) or * (attention)")
    ap.add_argument("--shape", default="4x4096", help="BxL")
    ap.add_argument("--documents", type=int, default=4, help="equal documents a row for the packed paths")
    ap.add_argument("--rounds", type=int, default=7, help="steps of each path, taking turns; medians")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a model field (repeatable; JSON values)"
    )
    ap.add_argument("--profile", action="store_true", help="then the flex step's kernels by GPU time")
    ap.add_argument("--profile-rows", type=int, default=20, metavar="N", help="kernels listed (--profile)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("packed_attention.py times CUDA kernels: no CUDA device here")
    if args.pattern not in ("+", "D", "*"):
        raise SystemExit(f"--pattern must be '+' (MLA), 'D' (DSA) or '*' (attention), not {args.pattern!r}")
    B, L = (int(v) for v in args.shape.lower().split("x"))
    config = ModelConfig.preset(args.preset, pattern=args.pattern, **model_fields(args.set))
    model = HybridLM(config, seed=0, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(B, L, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    grad = torch.randn(B, L, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
    doc_ids = (torch.arange(L, device="cuda") * args.documents // L).expand(B, L)

    paths = {k: v for k, v in PATHS.items() if k not in NOT_FOR[args.pattern]}
    times: dict[str, list[float]] = {name: [] for name in paths}
    peaks, kernels = {}, {}
    for r in range(args.rounds + 1):  # round 0 warms up (compiles FlexAttention and the block-mask builder)
        for name, (packed, choose) in (paths if r % 2 else dict(reversed(paths.items()))).items():
            with choose():
                model.zero_grad(set_to_none=True)
                x.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                reset_paths()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(model, x, doc_ids if packed else None, grad)
                end.record()
                torch.cuda.synchronize()
            if r:
                times[name].append(start.elapsed_time(end))
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated() - base)
                used = paths_used()  # (DSA: its indexer's scores and top-k too)
                kernels[name] = ", ".join(used[op] for op in ("attention", "index_scores", "index_topk") if op in used)

    print(
        f"{args.preset} '{args.pattern}'{''.join(f', {s}' for s in args.set)}, {B}x{L}, bf16, "
        f"{args.documents} documents a row for the packed paths, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, medians of {args.rounds}"
    )
    print(
        "\n| path | kernels (attention, indexer) | ms a step | peak MiB above the inputs | vs flex |\n|---|---|---:|---:|---:|"
    )
    ref = statistics.median(times["flex"])
    for name in paths:
        ms = statistics.median(times[name])
        print(f"| {name} | {kernels[name]} | {ms:.2f} | {peaks[name] / MIB:,.0f} | {ms / ref:.2f}x |")
    if args.profile:
        top_kernels(lambda: step(model, x, doc_ids, grad), "flex step", rows=args.profile_rows)


if __name__ == "__main__":
    main()
