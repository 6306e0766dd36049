"""The Triton kernels inductor wrote, read back from a log of ``TORCH_LOGS=output_code``.

    TORCH_LOGS=output_code python benchmarks/train_step.py ... > run.log 2>&1
    python benchmarks/inductor_kernels.py run.log --match rms_norm_backward

For each distinct kernel whose name contains ``--match``: its name, its signature, and its loads
and stores (what it reads and writes), so that two compiled graphs' versions of one seam, say a
fused block's and an unfused pair's, can be compared line by line without a profiler.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

KERNEL = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)'''", re.S)


def kernels(text: str, match: str) -> dict[str, str]:
    """{name: source} of the kernels in ``text`` whose name contains ``match`` (first source of each)."""
    found: dict[str, str] = {}
    for name, source in KERNEL.findall(text):
        if match in name:
            found.setdefault(name, source)
    return found


def summary(source: str) -> list[str]:
    """The kernel's ``def`` line and every line that loads or stores, stripped."""
    keep = ("def triton_", "tl.load(", "tl.store(", "rnumel", "xnumel", "r0_numel")
    return [line.strip() for line in source.splitlines() if any(k in line for k in keep)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="a log written with TORCH_LOGS=output_code")
    ap.add_argument("--match", default="", help="keep the kernels whose name contains this")
    args = ap.parse_args()
    found = kernels(args.log.read_text(errors="replace"), args.match)
    if not found:
        raise SystemExit(f"{args.log}: no kernel named like {args.match!r} (was TORCH_LOGS=output_code set?)")
    for name, source in found.items():
        lines = summary(source)
        loads = sum("tl.load(" in line for line in lines)
        stores = sum("tl.store(" in line for line in lines)
        print(f"## {name}: {loads} loads, {stores} stores")
        print("\n".join(f"    {line}" for line in lines))


if __name__ == "__main__":
    main()
