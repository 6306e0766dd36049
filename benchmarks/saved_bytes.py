"""What each block kind keeps for its backward, measured in compiled blocks, beside what `hybridlm plan` counts.

    python benchmarks/saved_bytes.py --preset bench-1.3b --shape 4x4096                       # on a GPU
    python benchmarks/saved_bytes.py --preset bench-1.3b --shape 4x4096 --float8 tensorwise
    python benchmarks/saved_bytes.py --preset tiny --shape 2x64 --device cpu
    python benchmarks/saved_bytes.py --preset bench-1.3b --pattern 'G-+-' --shape 4x4096    # other kinds, its sizes
    python benchmarks/saved_bytes.py --preset bench-1.3b --pattern 'D-' --set dsa_indexer_loss_coeff=0.01
    python benchmarks/saved_bytes.py --preset bench-1.3b --pattern 'M*+-' --frozen     # frozen after a trained MLP

One model of one block of each distinct kind of the preset's pattern, at its real sizes, compiled as training compiles
it (``--no-compile``: eager), its linear layers float8 with ``--float8`` (``--float8-auto-filter`` as
``train.float8_auto_filter``); one training step under bf16 autocast on rows cut into ``--documents`` documents each, as
training's packed rows are (on the GPU attention and MLA then take FlexAttention, which keeps no mask, and DSA keeps
its selection for it; on the CPU they keep a dense mask), each block's saved tensors measured by
``hybridlm.plan.measure.saved_bytes``. Prints per block kind the measured MiB, the plan's (its ``act_bytes`` plus the
bf16 copies autocast makes of the weights the block does not run in float8) and their ratio: where the planner's
memory model (``plan.cost._saved_elements``, ``_unsaved``) is off, by kind. On the GPU the kernels are the
Triton ones training runs; on the CPU the plain-torch references, which keep more. ``--frozen``: every block frozen
(``train.trainable``) behind one trained MLP block, so that a gradient passes through them: what a frozen layer keeps
(its linear layers' inputs need not be kept).
"""

from __future__ import annotations

import argparse

import torch
from knobs import model_fields  # this folder is on the path when run as a script

from hybridlm import ModelConfig
from hybridlm.model import HybridLM
from hybridlm.ops.float8 import apply_float8
from hybridlm.parallel.execution import compile_blocks
from hybridlm.plan.cost import BF16, estimate_costs
from hybridlm.plan.measure import saved_bytes
from hybridlm.plan.planner import block_text
from hybridlm.train.trainable import freeze_others, trainable_names

MIB = 2**20


def rows(
    config: ModelConfig,
    batch: int,
    seq: int,
    device: str,
    compiled: bool,
    float8: str,
    auto_filter: bool,
    documents: int = 4,
    frozen: bool = False,
):
    """(block kind, measured bytes, planned bytes) of each distinct block kind of ``config``, its rows cut into
    ``documents`` documents each (0: none, no boundaries given); ``frozen``: each frozen behind a trained MLP."""
    kinds = list(dict.fromkeys(config.parsed.blocks))
    first = 1 if frozen else 0  # (the trained MLP's block, not shown)
    small = config.replace(pattern="".join(block_text(b) for b in ["-"] * first + kinds))
    model = HybridLM(small, seed=0, device=device)
    trainable = trainable_names(model, small.parsed, "layers.0.*") if frozen else None
    freeze_others(model, small.parsed, trainable)
    apply_float8(model, float8, auto_filter)
    if compiled:
        compile_blocks(model)
    ids = torch.randint(
        0, small.vocab_size, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0)
    )
    doc_ids = None
    if documents:  # equal documents (where they end changes no saved size)
        doc_ids = (torch.arange(seq, device=device) * documents // seq).expand(batch, seq)
    measured = saved_bytes(model, ids, doc_ids)[first:]
    planned = estimate_costs(
        small, seq, batch, float8=float8, float8_auto_filter=auto_filter, trainable=trainable
    ).blocks[first:]
    return [
        (kind, got, p.act_bytes + BF16 * (p.params - p.float8_params))  # the bf16 weight copies autocast keeps
        for kind, got, p in zip(kinds, measured, planned)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--shape", default="4x4096", help="BxL of the step")
    ap.add_argument("--pattern", default=None, help="layers in place of the preset's (its sizes kept)")
    ap.add_argument("--documents", type=int, default=4, help="documents a row (0: no boundaries; training has them)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a model field (repeatable; JSON values)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager blocks (training compiles them)")
    ap.add_argument("--float8", default="none", help="train.float8's recipe: none, tensorwise or rowwise")
    ap.add_argument("--float8-auto-filter", action="store_true", help="train.float8_auto_filter")
    ap.add_argument("--frozen", action="store_true", help="each block frozen behind a trained MLP (train.trainable)")
    args = ap.parse_args()
    B, L = (int(x) for x in args.shape.lower().split("x"))
    fields = {"pattern": args.pattern} if args.pattern else {}
    config = ModelConfig.preset(args.preset, **fields, **model_fields(args.set))
    compiled = not args.no_compile
    print(
        f"{args.preset}{f' ({args.pattern})' if args.pattern else ''}{''.join(f', {x}' for x in args.set)} {B}x{L} "
        f"({args.documents} documents a row) on {args.device}, {'compiled' if compiled else 'eager'} blocks, bf16 autocast"
        + (
            f", float8 {args.float8}" + (" (small layers left out)" if args.float8_auto_filter else "")
            if args.float8 != "none"
            else ""
        )
        + (", frozen behind a trained MLP" if args.frozen else "")
    )
    print("\n| block | measured MiB | planned MiB | planned / measured |\n|---|---:|---:|---:|")
    for kind, got, want in rows(
        config, B, L, args.device, compiled, args.float8, args.float8_auto_filter, args.documents, args.frozen
    ):
        print(f"| {kind} | {got / MIB:,.1f} | {want / MIB:,.1f} | {want / got:.3f} |")


if __name__ == "__main__":
    main()
