"""Does a training step give the same bits twice? Which gradients differ, by layer kind, when it does not.

    python benchmarks/repeatability.py --preset bench-moe-1b --pattern "M-*-G-E-[*E]" --batch 2 --seq 4096

A resume is bitwise the uninterrupted run on CPU in float32 (tests/train/test_trainer.py); on a GPU every op whose
kernel adds with atomics in whatever order they land (torch lists them in ``torch.use_deterministic_algorithms``)
breaks that. This builds the preset's model with ``--pattern`` (float32 master weights, bf16 autocast on CUDA,
packed rows with three documents, as the trainer runs them), runs forward + backward twice from the same weights on
the same batch, eager then with compiled blocks, and prints whether the losses and every gradient are the same bits.
Where they are not, the differing gradients are grouped by layer kind (canonical names with the layer number
dropped: ``layers.*.mixer.in_proj.weight``), with their largest difference relative to the gradient's largest entry.
"""

from __future__ import annotations

import argparse
import re

import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.checkpoint.canonical import canonical_name
from hybridlm.parallel.execution import compile_blocks


def packed_batch(batch: int, seq: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    doc = (torch.arange(seq) >= seq // 3).long() + (torch.arange(seq) >= 2 * seq // 3).long()
    doc = doc.expand(batch, seq).contiguous()
    labels = ids[:, 1:].clone()
    labels[:, :-1][doc[:, 1:] != doc[:, :-1]] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": doc}.items()}


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward from cleared gradients: (loss, canonical name -> gradient)."""
    model.zero_grad(set_to_none=True)
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], return_logits=False)
    out.loss.backward()
    pattern = model.config.parsed
    grads = {
        canonical_name(n.replace("_orig_mod.", ""), pattern): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return out.loss.detach(), grads


def compare(label: str, first, second) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    differ: dict[str, list[float]] = {}
    for name, a in grads_a.items():
        b = grads_b[name]
        if not torch.equal(a, b):
            kind = re.sub(r"\.\d+\.", ".*.", name)
            rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
            differ.setdefault(kind, []).append(rel)
    same_loss = torch.equal(loss_a, loss_b)
    print(
        f"{label}: loss {'the same bits' if same_loss else f'differs by {(loss_a - loss_b).abs().item():.3g}'}; "
        f"{len(grads_a) - sum(map(len, differ.values()))} of {len(grads_a)} gradients the same bits"
    )
    if differ:
        print("| gradients that differ (layer kind) | tensors | largest difference / largest entry |")
        print("|---|---|---|")
        for kind, rels in sorted(differ.items()):
            print(f"| {kind} | {len(rels)} | {max(rels):.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-moe-1b")
    ap.add_argument("--pattern", default=None, help="the preset's pattern unless given")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    args = ap.parse_args()
    config = ModelConfig.preset(args.preset, **({"pattern": args.pattern} if args.pattern else {}))
    model = HybridLM(config, seed=0, device=args.device)
    batch = packed_batch(args.batch, args.seq, config.vocab_size, args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{where} · torch {torch.__version__} · {args.preset} with pattern {config.pattern} · {args.batch} x {args.seq}"
    )
    compare("eager", step(model, batch), step(model, batch))
    if not args.no_compile:
        compile_blocks(model)
        step(model, batch)  # compiles
        compare("compiled blocks", step(model, batch), step(model, batch))


if __name__ == "__main__":
    main()
