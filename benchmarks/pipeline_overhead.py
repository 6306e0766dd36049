"""What the pipeline machinery costs on one device: the trainer's plain step against the same step
through ``PipelineRunner`` with one stage (a ``Schedule1F1B`` over one ``PipelineStage``; one
data-parallel rank, so no FSDP), side by side on the same model, batch and micro-batches.

    python benchmarks/pipeline_overhead.py --preset bench-1.3b --batch 8 --micro 4 --seq 4096

Prints tokens/s of both and their ratio. ``hybridlm train`` keeps the plain step when
``parallel.pp == 1``; this measures what it would lose otherwise. Results belong in
docs/benchmarks.md. Runs on CPU too (``--device cpu``, small shapes) to check it works.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist

from hybridlm import HybridLM, ModelConfig
from hybridlm.model import combine_losses, label_counts
from hybridlm.train.pipeline import PipelineRunner


def batch(vocab: int, rows: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    doc = torch.zeros(rows, seq, dtype=torch.long)
    return {k: v.to(device) for k, v in {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": doc}.items()}


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model field")
    args = ap.parse_args()
    overrides = {k: eval(v, {}) if v[:1].isdigit() else v for k, v in (s.split("=", 1) for s in args.set)}
    config = ModelConfig.preset(args.preset, **overrides)
    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    data = batch(config.vocab_size, args.batch, args.seq, device)
    counts = label_counts(data["labels"], config.parsed.mtp_depths, data["doc_ids"])
    weight = counts / counts.sum(0).clamp(min=1)  # each row's share of each head's labels, as the trainer's

    def measure_plain() -> float:
        model = HybridLM(config, device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

        def plain() -> None:
            for s in range(0, args.batch, args.micro):
                part = {k: v[s : s + args.micro] for k, v in data.items()}
                with autocast():
                    # As the trainer calls it: the chunked head + loss (no float32 logits of the batch).
                    out = model(part["input_ids"], part["labels"], doc_ids=part["doc_ids"], return_logits=False)
                shares = weight[s : s + args.micro].sum(0)
                combine_losses(out.lm_loss, out.mtp_losses, out.aux_loss, config.mtp_loss_scale, shares).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(plain, args.steps, args.warmup, device)

    t_plain = measure_plain()  # its model is freed before the staged one is built
    if device.type == "cuda":
        torch.cuda.empty_cache()

    runner = PipelineRunner(
        config,
        pp=1,
        schedule="1f1b",
        microbatches=args.batch // args.micro,
        local_batch=args.batch,
        seq_len=args.seq,
        seed=0,
        device=device,
        param_dtype=dtype,
        autocast=autocast,
    )
    opt = torch.optim.AdamW(runner.model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

    def staged() -> None:
        runner.forward_backward(data, weight)
        runner.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_stage = timed(staged, args.steps, args.warmup, device)
    tokens = args.batch * args.seq
    print(f"{'path':<28} {'step s':>8} {'tokens/s':>10}")
    print(f"{'plain (pp = 1 today)':<28} {t_plain:8.3f} {tokens / t_plain:10.0f}")
    print(f"{'1 stage, 1f1b':<28} {t_stage:8.3f} {tokens / t_stage:10.0f}")
    print(f"pipeline wrapper / plain tokens/s: {t_plain / t_stage:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
