"""What training only some parameters (``train.trainable``) saves in a step, measured beside what `hybridlm plan` counts.

    python benchmarks/frozen_step.py --preset bench-1.3b --shape 4x4096               # on a GPU
    python benchmarks/frozen_step.py --preset bench-1.3b --pattern 'M-M-*-M-' --shape 1x2048 --device cpu --steps 2
    python benchmarks/frozen_step.py --trainable 'layers.*' --trainable 'mtp.*'    # patterns of your own

One model of the preset (its pattern or ``--pattern``), compiled blocks under bf16 autocast on the GPU as training
runs them (``--no-compile``: eager; on the CPU float32, eager), one forward + backward of the loss per step (no
optimizer: what the patterns change is the backward) on rows of ``--documents`` documents. For each
``train.trainable`` setting (by default: everything; the layers only, embedding and head frozen; the second half of
the layers; the last layer; the MTP depths, if any) it prints the median step time and the peak memory above the
model, each also over the run that trains everything, beside the plan's estimate of the same ratios
(``plan.cost.estimate_costs(trainable=...)``: its roofline time, its FLOPs, and its memory above the float32 model:
activations, the loss's working chunk, bf16 weight copies and the trained parameters' gradients).
"""

from __future__ import annotations

import argparse

import torch
from knobs import model_fields  # this folder is on the path when run as a script

from hybridlm import ModelConfig
from hybridlm.errors import ConfigError
from hybridlm.model import HybridLM
from hybridlm.parallel.execution import compile_blocks
from hybridlm.plan.cost import BF16, FP32, estimate_costs, stage_memory
from hybridlm.plan.measure import _timed
from hybridlm.train.trainable import freeze_others, trainable_names

MIB = 2**20


def default_settings(config: ModelConfig) -> list[str | None]:
    """Everything (None), the layers only, the second half of the layers, the last layer, and the MTP depths."""
    n = config.parsed.num_layers
    half = ",".join(f"layers.{i}.*" for i in range(n // 2, n))
    settings = [None, "layers.*", half, f"layers.{n - 1}.*"]
    return settings + (["mtp.*"] if config.parsed.mtp_depths else [])


def _shown(setting: str | None) -> str:
    """A setting as a table shows it: consecutive ``layers.N.*`` as one range."""
    if setting is None:
        return "everything"
    layers = [
        int(p[7:-2]) for p in setting.split(",") if p.startswith("layers.") and p.endswith(".*") and p[7:-2].isdigit()
    ]
    if len(layers) > 2 and len(layers) == setting.count(",") + 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]} to {layers[-1]}"
    return setting


def _names(model: HybridLM, config: ModelConfig, setting: str | None) -> frozenset[str] | None:
    if setting is None:
        return None
    return trainable_names(model, config.parsed, setting.split(","))


def measure(
    config: ModelConfig, setting: str | None, batch: int, seq: int, device: str, compiled: bool, documents: int,
    steps: int,
) -> tuple[float, float, float, float, float]:  # fmt: skip
    """(median seconds of a step, peak bytes above the model (CUDA; 0: not measured), estimated seconds, estimated FLOPs,
    estimated bytes above the model) of one forward + backward with ``setting`` as train.trainable."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # (the last setting's model is gone: its cached blocks would count in this one's peak)
    model = HybridLM(config, device=dev, seed=0)
    names = _names(model, config, setting)
    if names is not None:
        freeze_others(model, config.parsed, names)
    if compiled:
        compile_blocks(model)
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=dev, generator=gen)
    doc_ids = (torch.arange(seq, device=dev) * max(documents, 1) // seq).expand(batch, seq)
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(ids, labels=ids, doc_ids=doc_ids, return_logits=False).loss
        loss.backward()

    step()  # (compiles)
    model.zero_grad(set_to_none=True)  # (the base: the model and its inputs, no gradients)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    seconds = _timed(step, dev, steps)
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else 0.0
    costs = estimate_costs(config, seq, batch, trainable=names)
    items = (costs.embedding, *costs.blocks, costs.head, *costs.mtp)
    memory = stage_memory(costs, 0, len(costs.blocks), True, True)
    # The state less what is no step's peak here: the float32 weights (the model) and AdamW's two moments (no step).
    moments = costs.state_bytes_per_param - BF16 - 2 * FP32
    above = memory["state_bytes"] - FP32 * memory["params"] - moments * (memory["params"] - memory["gradless"])
    above += memory["act_bytes"] + memory["work_bytes"]
    return seconds, peak, sum(i.time_s for i in items), sum(i.flops for i in items), above


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--pattern", default=None, help="layers in place of the preset's (its sizes kept)")
    ap.add_argument("--shape", default="4x4096", help="BxL of the step")
    ap.add_argument("--documents", type=int, default=4, help="documents a row")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a model field (JSON values)")
    ap.add_argument(
        "--trainable", action="append", default=None, metavar="PATTERNS",
        help="a train.trainable setting, comma-separated globs ('all': everything); repeatable; default: see above",
    )  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager blocks (training compiles them on the GPU)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps a setting (the median is shown)")
    args = ap.parse_args(argv)
    B, L = (int(x) for x in args.shape.lower().split("x"))
    fields = {"pattern": args.pattern} if args.pattern else {}
    config = ModelConfig.preset(args.preset, **fields, **model_fields(args.set))
    compiled = not args.no_compile and args.device.startswith("cuda")
    settings = (
        default_settings(config) if args.trainable is None else [None if s == "all" else s for s in args.trainable]
    )
    if settings[0] is not None:
        settings.insert(0, None)  # (the ratios' base)
    where = f"{args.device}{f' ({torch.cuda.get_device_name(args.device)})' if args.device.startswith('cuda') else ''}"
    print(
        f"{args.preset}{f' ({args.pattern})' if args.pattern else ''}{''.join(f', {x}' for x in args.set)} {B}x{L}, "
        f"{args.documents} documents a row, on {where}, {'compiled' if compiled else 'eager'} blocks, one forward + "
        f"backward a step, median of {args.steps}"
    )
    print(
        "\n| train.trainable | ms a step | peak MiB | time / all | plan's time / all | plan's FLOPs / all | peak / all "
        "| plan's memory / all |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    base = None
    for setting in settings:
        try:
            got = measure(config, setting, B, L, args.device, compiled, args.documents, args.steps)
        except ConfigError as e:  # (a pattern this model has no parameter for: said, and the next one timed)
            print(f"| {_shown(setting)} | {e} | | | | | | |", flush=True)
            continue
        base = base or got
        print(
            f"| {_shown(setting)} | {got[0] * 1e3:,.1f} | {f'{got[1] / MIB:,.0f}' if got[1] else 'n/a'} | "
            f"{got[0] / base[0]:.3f} | "
            f"{got[2] / base[2]:.3f} | {got[3] / base[3]:.3f} | {f'{got[1] / base[1]:.3f}' if got[1] else 'n/a'} | "
            f"{got[4] / base[4]:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
