"""``hybridlm generate`` end to end, its default against flags that turn its fast paths off: the command as a user
runs it (a process that loads a model folder, decodes and prints), so that what its defaults buy is measured where
they are decided, not only in the library.

    python benchmarks/cli_generate.py --device cuda --preset bench-1.3b      # CUDA graphs by default vs --no-cuda-graph

A model of ``--preset`` (random weights, ``--dtype``) is saved once with the byte tokenizer into a temporary folder;
each setting then runs ``python -m hybridlm.cli generate`` on it, ``--rounds`` times taking turns, for one prompt
(streamed) and for ``--batch`` prompts in one batch, greedy, ``--new-tokens`` each. The table gives the command's
wall time and the decode rate it prints (median of the rounds), and whether every setting printed the same text
(bf16 near-ties may part them; the tests check graphs against eager steps in float32). Results belong in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hybridlm import HybridLM, ModelConfig, save
from hybridlm.train.tokenizer import ByteTokenizer

#: The settings timed: (name, the flags they add). The first is the command's default.
SETTINGS = (("default", ()), ("--no-cuda-graph", ("--no-cuda-graph",)))

DECODE = re.compile(r"decode ([\d,]+) tokens? at ([\d,.]+) tok/s")


def build(folder: Path, preset: str, dtype: torch.dtype) -> None:
    """Save a random ``preset`` model in ``dtype`` with the byte tokenizer's files at ``folder``."""
    config = ModelConfig.preset(preset)
    # (the byte tokenizer's 257 ids must fit: a preset of fewer, such as tiny, gets them)
    config = dataclasses.replace(config, vocab_size=max(config.vocab_size, 257))
    model = HybridLM(config, seed=0, dtype=dtype)
    save(model, folder, extra_files=ByteTokenizer().files())


def run(
    folder: Path, device: str, prompts: list[str], new_tokens: int, flags: tuple[str, ...]
) -> tuple[float, float, str]:
    """One ``hybridlm generate`` process: (wall seconds, decode tok/s it printed, its stdout)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(prompts) + "\n")
    argv = [sys.executable, "-m", "hybridlm.cli", "generate", str(folder), "--prompts-file", f.name]
    argv += ["--batch-size", str(len(prompts)), "--max-new-tokens", str(new_tokens), "--greedy", "--device", device]
    start = time.perf_counter()
    done = subprocess.run([*argv, *flags], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    Path(f.name).unlink()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv + list(flags))} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    rate = DECODE.search(done.stderr)
    return seconds, float(rate[2].replace(",", "")) if rate else float("nan"), done.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-1.3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=8, help="prompts of the batched rows (default: 8)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    shapes = {"1 prompt": [prompt], f"{args.batch} prompts": [f"{i}: {prompt}" for i in range(args.batch)]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        t0 = time.perf_counter()
        build(folder, args.preset, dtype)
        print(
            f"{args.preset} ({args.dtype}) saved in {time.perf_counter() - t0:.1f} s; {args.new_tokens} greedy tokens"
        )
        print("\n| prompts | setting | wall s | decode tok/s | same text as the default |")
        print("|---|---|---:|---:|:---:|")
        for shape, prompts in shapes.items():
            walls: dict[str, list[float]] = {name: [] for name, _ in SETTINGS}
            rates: dict[str, list[float]] = {name: [] for name, _ in SETTINGS}
            texts: dict[str, str] = {}
            for r in range(args.rounds):
                order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
                for name, flags in order:
                    wall, rate, text = run(folder, args.device, prompts, args.new_tokens, flags)
                    walls[name].append(wall)
                    rates[name].append(rate)
                    texts.setdefault(name, text)
            for name, _ in SETTINGS:
                same = "yes" if texts[name] == texts[SETTINGS[0][0]] else "no"
                wall, rate = statistics.median(walls[name]), statistics.median(rates[name])
                print(f"| {shape} | {name} | {wall:.2f} | {rate:,.1f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
