"""Build every Triton kernel of ``hybridlm.ops`` for the H200 (sm_90) on a machine without a GPU.

Each op's real launcher runs on CPU tensors at ``bench-1.3b``'s widths, forward and backward, with
the kernel launches captured instead of run; each captured launch is then compiled for sm_90 with
its own constexprs, warps and argument types, and its registers, spilled bytes (stack) and shared
memory are read from the cubin. So a kernel the compiler rejects, or one that spills, shows up
here and not first on the GPU machine. Needs a real Triton (no ``TRITON_INTERPRET``)::

    python benchmarks/kernel_build.py            # a table of every kernel, bf16 and float32 inputs
    python benchmarks/kernel_build.py --dtypes bf16 --ops ssd
    python benchmarks/kernel_build.py --host-ops   # torch ops and Triton launches per fwd + bwd instead
    python benchmarks/kernel_build.py --ops ssd --dtypes bf16 --set ssd_triton.DX_BLOCK_Q=16 --set ssd_triton.DX_BLOCK_N=32

The host launches every one of those per layer and step, so their count is the host-side cost a
custom op adds (``--host-ops`` counts aten ops with a dispatch mode, the launches as captured).
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import knobs

#: torch dtype -> Triton's pointer element type.
_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def capture(fn: Callable[[], object]) -> list[tuple[object, dict, dict]]:
    """Run ``fn`` with every Triton launch recorded instead of run: [(kernel, {param: value}, options)]."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        for p in self.params:  # defaults of parameters the launcher left out
            if p.name not in values and p.default is not inspect.Parameter.empty:
                values[p.name] = p.default
        options = {k: v for k, v in kwargs.items() if k not in names}
        launches.append((self, values, options))

    from hybridlm.ops import dispatch

    # The launches are recorded, not run: 'triton' on CPU tensors is what this script needs, which the
    # dispatch refuses outside the interpreter (the first launch would fail).
    saved, check = JITFunction.run, dispatch._check_interpreted
    JITFunction.run, dispatch._check_interpreted = record, lambda what, where: None
    try:
        fn()
    finally:
        JITFunction.run, dispatch._check_interpreted = saved, check
    return launches


def _arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def build(kernel, values: dict, options: dict, arch: int = 90):
    """Compile one captured launch for ``sm_<arch>``; returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {p.name: values.get(p.name) for p in kernel.params if p.is_constexpr or values.get(p.name) is None}
    sig = {p.name: "constexpr" if p.name in consts else _arg_type(values[p.name]) for p in kernel.params}
    opts = {k: options[k] for k in ("num_warps", "num_stages") if k in options}
    return triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32), options=opts)


def resources(compiled) -> dict[str, int]:
    """Registers per thread, spilled bytes per thread (stack) and shared memory of a compiled kernel."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():  # a Triton without NVIDIA's tools: the build still counts, the figures are unknown
        return {"regs": -1, "stack": -1, "shared": int(compiled.metadata.shared)}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if "REG:" in ln), "")
    fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return {
        "regs": int(fields.get("REG", -1)),
        "stack": int(fields.get("STACK", -1)),
        "shared": int(compiled.metadata.shared),
    }


# -- the ops, at bench-1.3b widths (short sequences: the constexprs do not depend on the length) --------


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() if t.is_floating_point() else t for t in tensors]


def _backward(out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
    """Backward from every output that needs it (the values are whatever the skipped launches left)."""
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs if o.requires_grad], [torch.ones_like(o) for o in outs if o.requires_grad])


def _seq(b: int, L: int) -> torch.Tensor:
    seq = torch.zeros(b, L, dtype=torch.long)
    seq[:, L // 3 :] += 1
    return seq


def setup_ssd(dtype: torch.dtype, L: int = 512) -> Callable[[], None]:
    from hybridlm.ops.ssd_triton import ssd_chunked_triton

    b, h, p, g, n = 1, 64, 64, 8, 128
    x, B, C = (torch.randn(b, L, *s).to(dtype) for s in ((h, p), (g, n), (g, n)))
    x, dt, A, B, C, D = _leaves(x, torch.rand(b, L, h), -torch.rand(h), B, C, torch.rand(h))
    seq = _seq(b, L)
    return lambda: _backward(ssd_chunked_triton(x, dt, A, B, C, 128, D=D, seq_idx=seq, return_final_state=True))


def setup_conv(dtype: torch.dtype, L: int = 512) -> Callable[[], None]:
    from hybridlm.ops.conv_triton import causal_conv1d_triton

    x, w, bias = _leaves(torch.randn(1, L, 6144).to(dtype), torch.randn(6144, 4), torch.randn(6144))
    seq = _seq(1, L)
    return lambda: _backward(causal_conv1d_triton(x, w, bias, seq_idx=seq, silu=True))


def setup_norm(dtype: torch.dtype, L: int = 512) -> Callable[[], None]:
    from hybridlm.ops.norm_triton import add_rms_norm_triton, gated_rms_norm_triton, rms_norm_triton

    y, z, w = _leaves(torch.randn(1, L, 4096).to(dtype), torch.randn(1, L, 4096).to(dtype), torch.ones(4096))
    x, delta, w2 = _leaves(torch.randn(1, L, 2048), torch.randn(1, L, 2048).to(dtype), torch.ones(2048))
    h = torch.randn(1, L, 2048).to(dtype)

    def run() -> None:
        _backward(gated_rms_norm_triton(y, z, w, 512, 1e-5))
        _backward(add_rms_norm_triton(x, delta, w2, 1e-5))
        with torch.no_grad():
            rms_norm_triton(h, w2, 1e-5)

    return run


def setup_gated_delta(dtype: torch.dtype, L: int = 512) -> Callable[[], None]:
    from hybridlm.ops.gated_delta_triton import gated_delta_rule_triton

    b, h, dk, dv = 1, 16, 128, 128
    q, k, v = (torch.randn(b, L, h, d).to(dtype) for d in (dk, dk, dv))
    leaves = _leaves(q, k, v, -torch.rand(b, L, h), torch.rand(b, L, h))
    seq = _seq(b, L)
    return lambda: _backward(gated_delta_rule_triton(*leaves, seq_idx=seq))


def setup_mamba2_core(dtype: torch.dtype, L: int = 512, one_op: bool = True) -> Callable[[], None]:
    """The Mamba2 core at bench-1.3b's width: the one op, or (``one_op=False``) the composition of
    the conv, SSD and gated-norm ops, each on Triton."""
    from hybridlm.ops.dispatch import use_kernels
    from hybridlm.ops.mamba2_core import Mamba2Dims, Mamba2Weights, mamba2_core, mamba2_core_torch

    dims = Mamba2Dims(64, 64, 8, 128, chunk_size=128, norm_group_size=512, eps=1e-5)
    (zxbcdt,) = _leaves(torch.randn(1, L, dims.d_inner + dims.conv_dim + dims.nheads).to(dtype))
    c, h = dims.conv_dim, dims.nheads
    params = (
        torch.randn(c, 1, 4),
        torch.randn(c),
        torch.randn(h),
        torch.zeros(h),
        torch.ones(h),
        torch.ones(dims.d_inner),
    )
    weights = Mamba2Weights(*_leaves(*params))
    seq = _seq(1, L)
    core = mamba2_core if one_op else mamba2_core_torch

    def run() -> None:
        with use_kernels("triton"):
            _backward(core(zxbcdt, weights, seq, dims))

    return run


def setup_step(dtype: torch.dtype) -> Callable[[], None]:
    """The decode steps at 8 rows: Mamba2's SSD step (dt after softplus, and raw as ``mamba2_step`` gives it), its
    conv step, Gated DeltaNet's step and its output norm (``rms_norm_then_gate``) at bench-1.3b's widths."""
    from hybridlm.ops.norm_triton import rms_norm_then_gate_triton
    from hybridlm.ops.step_triton import conv_step_triton, gdn_step_triton, ssd_step_triton

    b, h, p, g, n = 8, 64, 64, 8, 128
    ssd = (torch.randn(b, h, p).to(dtype), torch.rand(b, h), -torch.rand(h), torch.randn(b, g, n).to(dtype))
    ssd += (torch.randn(b, g, n).to(dtype), torch.zeros(b, h, p, n), torch.rand(h))
    conv = (torch.randn(b, 1, 6144).to(dtype), torch.zeros(b, 3, 6144), torch.randn(6144, 4), None, True)
    hg, d = 16, 128  # Gated DeltaNet: 2048 / 128 heads of 128
    q, k, v = (torch.randn(b, hg, d).to(dtype) for _ in range(3))
    gdn = (q, k, v, torch.randn(b, hg).to(dtype), torch.randn(b, hg).to(dtype), torch.rand(hg), torch.rand(hg))
    gdn += (torch.zeros(b, hg, d, d), d**-0.5)
    gate = (torch.randn(b, 1, hg, d).to(dtype), torch.randn(b, 1, hg, d).to(dtype), torch.ones(d), 1e-6)

    def run() -> None:
        with torch.no_grad():
            ssd_step_triton(*ssd)
            ssd_step_triton(*ssd, dt_bias=torch.rand(h), dt_clamp_min=0.001)
            conv_step_triton(*conv)
            gdn_step_triton(*gdn)
            rms_norm_then_gate_triton(*gate)

    return run


def setup_route(dtype: torch.dtype) -> Callable[[], None]:
    """A MoE layer's routing for inference (float32 logits whatever ``dtype``): bench-moe-1b's (64 experts, top 6,
    sigmoid, expert bias, scaled) and a softmax router of 512 experts, top 10 (Qwen3-Next's)."""
    from hybridlm.ops.routing_triton import route_triton

    small, large = torch.randn(64, 64), torch.randn(64, 512)

    def run() -> None:
        route_triton(small, 6, False, torch.randn(64), True, 2.5)
        route_triton(large, 10, True, None, True, 1.0)

    return run


def setup_top_p(dtype: torch.dtype) -> Callable[[], None]:
    """Top-p filtering of 8 rows of a 131,072-token vocabulary (a sampled decode step's)."""
    from hybridlm.ops.top_p_triton import top_p_filter_triton

    logits = torch.randn(8, 131072).to(dtype)
    return lambda: top_p_filter_triton(logits, 0.9)


def setup_cross_entropy(dtype: torch.dtype) -> Callable[[], None]:
    from hybridlm.ops.cross_entropy_triton import cross_entropy_rows_triton

    logits, labels = torch.randn(64, 131072).to(dtype), torch.randint(0, 131072, (64,))

    def run() -> None:
        cross_entropy_rows_triton(logits.clone(), labels, -100, write_grad=True)
        cross_entropy_rows_triton(logits, labels, -100, write_grad=False)

    return run


def setup_indexer(dtype: torch.dtype) -> Callable[[], None]:
    """DSA's lightning indexer at DeepSeek's sizes (64 heads of 128, top-k 2048) over 256 queries of 4,096 keys: the
    causal scores forward and backward (float32 whatever ``dtype``: the indexer computes in float32; the backward for
    float32 gradients, then for a bf16 model's, its products into q and k in ``PRODUCTS_16BIT``) and the top-k of
    ``dtype`` scores."""
    from hybridlm.ops.indexer_triton import index_scores_triton, select_topk_triton

    q, w, k = (
        t.requires_grad_() for t in (torch.randn(1, 256, 64, 128), torch.randn(1, 256, 64), torch.randn(1, 4096, 128))
    )
    scores, allowed = torch.randn(1, 256, 4096).to(dtype), torch.ones(1, 256, 4096, dtype=torch.bool)

    def run() -> None:
        _backward(index_scores_triton(q, w, k, 3840))  # (the backward: the indexer loss's)
        _backward(index_scores_triton(q, w, k, 3840, coarse_grads=True))
        select_topk_triton(scores, allowed, 2048)
        index_scores_triton(q.detach(), w.detach(), k.detach())  # (a decoding chunk's: no diagonal)

    return run


def setup_indexer_target(dtype: torch.dtype) -> Callable[[], None]:
    """The indexer loss's target at MLA's sizes (16 heads of 192) over 256 queries of 4,096 keys, ``dtype`` q and k,
    causal (a loss chunk's) and not."""
    from hybridlm.ops.indexer_target_triton import indexer_target_triton

    q, k = torch.randn(1, 256, 16, 192).to(dtype), torch.randn(1, 4096, 16, 192).to(dtype)
    valid = torch.ones(1, 256, 4096, dtype=torch.bool)

    def run() -> None:
        indexer_target_triton(q, k, valid, 192**-0.5, 3840)
        indexer_target_triton(q, k, valid, 192**-0.5)

    return run


#: op -> setup(dtype) -> the op's forward + backward (decode: one step), inputs made by the setup.
OPS = {
    "ssd": setup_ssd,
    "conv": setup_conv,
    "norm": setup_norm,
    "gated_delta": setup_gated_delta,
    "step": setup_step,
    "route": setup_route,
    "top_p": setup_top_p,
    "cross_entropy": setup_cross_entropy,
    "indexer": setup_indexer,
    "indexer_target": setup_indexer_target,
    "mamba2_core": setup_mamba2_core,
    "mamba2_composed": lambda dtype: setup_mamba2_core(dtype, one_op=False),
}


def build_all(ops: list[str], dtypes: list[torch.dtype], arch: int = 90) -> list[tuple[str, str, str, dict]]:
    """[(op, dtype, kernel name, resources)] for every distinct launch of ``ops`` at ``dtypes``."""
    rows, seen = [], set()
    for op in ops:
        for dtype in dtypes:
            for kernel, values, options in capture(OPS[op](dtype)):
                compiled = build(kernel, values, options, arch)
                key = (kernel.fn.__name__, compiled.hash)
                if key not in seen:  # the same specialization launched twice
                    seen.add(key)
                    rows.append((op, _TYPES[dtype], kernel.fn.__name__, resources(compiled)))
    return rows


def host_ops(op: str, dtype: torch.dtype) -> tuple[int, int]:
    """(aten ops, Triton launches) of one forward + backward of ``op`` (its inputs' creation left out).

    The aten ops are those the Python code calls (the profiler's aten events whose parent is not
    itself an aten op: ``zeros`` counts once, not also as ``empty`` and ``zero_``).
    """
    from torch.profiler import ProfilerActivity, profile

    run = OPS[op](dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        launches = capture(run)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return len(top), len(launches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of: {', '.join(OPS)}")
    ap.add_argument("--dtypes", default="bf16,fp32", help="input dtypes: bf16, fp32")
    ap.add_argument("--host-ops", action="store_true", help="count aten ops and Triton launches per call instead")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.KNOB=N",
        help="set a tile setting of hybridlm.ops.MODULE first, e.g. ssd_triton.DX_BLOCK_Q=16 (repeatable)",
    )
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernel_build.py compiles kernels: run it without TRITON_INTERPRET=1")
    knobs.apply(args.set)
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        sys.exit(f"unknown ops {sorted(unknown)}; known: {', '.join(OPS)}")
    dtypes = [{"bf16": torch.bfloat16, "fp32": torch.float32}[d] for d in args.dtypes.split(",")]
    if args.host_ops:
        print("| op | inputs | aten ops | Triton launches |")
        print("|---|---|---|---|")
        for op in args.ops.split(","):
            for dtype in dtypes:
                print(f"| {op} | {_TYPES[dtype]} | {' | '.join(map(str, host_ops(op, dtype)))} |", flush=True)
        return
    print("| op | inputs | kernel | registers | spilled bytes | shared bytes |")
    print("|---|---|---|---|---|---|")
    for op, dtype, name, res in build_all(args.ops.split(","), dtypes):
        print(f"| {op} | {dtype} | `{name}` | {res['regs']} | {res['stack']} | {res['shared']} |", flush=True)


if __name__ == "__main__":
    main()
