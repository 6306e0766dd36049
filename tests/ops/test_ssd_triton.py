"""The Triton SSD kernels (in Triton's interpreter on CPU) against the float64 step recurrence.

Forward, final state and every gradient, with document resets inside a chunk and at a chunk start,
lengths that are not a multiple of the chunk, groups < heads, several tiles per chunk; the dispatch
switch; ``torch.compile`` over the op. GPU tests check bf16 at L = 4096 against the float64 reference.
"""

import pytest
import torch

from hybridlm.ops import ssd_triton
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.ssd import ssd_chunked, ssd_reference
from tests.helpers import assert_bf16_within, assert_rel_close, runs_triton_kernels
from tests.ops.test_ssd import extreme_inputs, inputs

pytestmark = runs_triton_kernels
#: The CPU tests below run the kernels on CPU tensors, in Triton's interpreter (conftest.py).
INTERPRETER_ONLY = True
NAMES = ["x", "dt", "A", "B", "C", "D", "init"]


def run(fn, tensors, chunk, seq_idx, gy, gs):
    """Forward + backward of ``fn`` on copies of ``tensors``: (y, final, grads)."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    x, dt, A, B, C, D, init = leaves
    y, final = fn(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx, initial_state=init, return_final_state=True)
    torch.autograd.backward([y, final], [gy.to(y.dtype), gs.to(final.dtype)])
    return y, final, [t.grad for t in leaves]


def reference(x, dt, A, B, C, chunk, D=None, seq_idx=None, initial_state=None, return_final_state=True):
    return ssd_reference(x, dt, A, B, C, D=D, seq_idx=seq_idx, initial_state=initial_state)


def check_against_reference(b, seqlen, h, p, g, n, chunk, seq_idx, seed=0):
    tensors = [*inputs(b, seqlen, h, p, g, n, seed), torch.randn(b, h, p, n)]
    gy, gs = torch.randn(b, seqlen, h, p), torch.randn(b, h, p, n)
    y, final, grads = run(ssd_triton.ssd_chunked_triton, tensors, chunk, seq_idx, gy, gs)
    y_ref, final_ref, grads_ref = run(reference, [t.double() for t in tensors], chunk, seq_idx, gy, gs)
    assert_rel_close(y, y_ref, 2e-6, "y")
    assert_rel_close(final, final_ref, 2e-6, "final state")
    for name, gr, gr_ref in zip(NAMES, grads, grads_ref):
        assert_rel_close(gr, gr_ref, 2e-5, f"grad {name}")


@pytest.mark.parametrize("packed", [False, True])
def test_matches_recurrence(packed):
    # l = 37, chunk 8: a partial last chunk; resets inside chunk 0 (at 5) and at chunk 2's start (16).
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(2, 37, dtype=torch.long)
        seq_idx[0, 5:] += 1
        seq_idx[0, 16:] += 1
        seq_idx[1, 30:] += 1
    check_against_reference(2, 37, 4, 6, 2, 5, 8, seq_idx)


def test_several_tiles_per_chunk(monkeypatch):
    # chunk 40 in tiles of 16 (the last one partial), l = 95; one group for all heads.
    monkeypatch.setattr(ssd_triton, "BLOCK_Q", 16)
    monkeypatch.setattr(ssd_triton, "BLOCK_Q_BWD", 16)
    seq_idx = torch.zeros(1, 95, dtype=torch.long)
    seq_idx[0, 23:] += 1  # inside chunk 0, in its second tile
    seq_idx[0, 40:] += 1  # at chunk 1's start
    seq_idx[0, 57:] += 1
    check_against_reference(1, 95, 2, 16, 1, 16, 40, seq_idx, seed=1)


@pytest.mark.parametrize(("bwd", "dx"), [(32, 16), (16, 32)])
def test_dx_tiles_of_its_own(monkeypatch, bwd, dx):
    # dx's tiles and state blocks differ from the other backward kernels' (C·B is written in their
    # tiles, read in dx's); chunk 40, n = 40 in blocks of 16 for dx (the last partial).
    monkeypatch.setattr(ssd_triton, "BLOCK_Q_BWD", bwd)
    monkeypatch.setattr(ssd_triton, "DX_BLOCK_Q", dx)
    monkeypatch.setattr(ssd_triton, "DX_BLOCK_N", 16)
    seq_idx = torch.zeros(1, 95, dtype=torch.long)
    seq_idx[0, 23:] += 1
    seq_idx[0, 40:] += 1
    check_against_reference(1, 95, 2, 16, 1, 40, 40, seq_idx, seed=3)


def test_extreme_step_sizes_keep_float32_accuracy():
    """A step's dt·A of -1e4 (:func:`extreme_inputs`): its log-decay is clamped at -128 before the chunk's cumulative
    sums, whose differences are the decays. Unclamped, every later sum of the chunk sat near -1e4, where float32's
    spacing is 1e-3, and y and every gradient were 1e-4 off. Now y and the state meet the plain-torch scan's bar (1e-5), the gradients
    the bar of the other tests here (2e-5)."""
    (x, dt, A, B, C, D), seq_idx = extreme_inputs()
    tensors = [x, dt, A, B, C, D, torch.randn(1, 3, 4, 5)]
    gy, gs = torch.randn(1, 29, 3, 4), torch.randn(1, 3, 4, 5)
    y, final, grads = run(ssd_triton.ssd_chunked_triton, tensors, 8, seq_idx, gy, gs)
    y_ref, final_ref, grads_ref = run(reference, [t.double() for t in tensors], 8, seq_idx, gy, gs)
    assert_rel_close(y, y_ref, 1e-5, "y")
    assert_rel_close(final, final_ref, 1e-5, "final state")
    for name, gr, gr_ref in zip(NAMES, grads, grads_ref):
        assert_rel_close(gr, gr_ref, 2e-5, f"grad {name}")


def test_state_wider_than_one_block():
    # n = 70: the backward's state products and dB / dC run over two blocks of n (64 + a partial 6).
    seq_idx = torch.zeros(1, 40, dtype=torch.long)
    seq_idx[0, 21:] += 1
    check_against_reference(1, 40, 2, 8, 1, 70, 16, seq_idx, seed=3)


def test_optional_arguments_and_dispatch():
    b, seqlen, h, p, g, n = 1, 20, 2, 4, 1, 3
    x, dt, A, B, C, _ = inputs(b, seqlen, h, p, g, n, seed=2)
    reset_paths()
    with use_kernels("triton"):
        y = ssd_chunked(x, dt, A, B, C, 8)  # no D, no initial state, no final state
    assert paths_used()["ssd"] == "triton"
    with use_kernels("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, 8), y, rtol=0, atol=0)  # autocast changes nothing
    with use_kernels("torch"):
        y_torch = ssd_chunked(x, dt, A, B, C, 8)
    assert paths_used()["ssd"] == "torch"
    ssd_chunked(x, dt, A, B, C, 8)  # auto: CPU tensors run the torch path
    assert paths_used()["ssd"] == "torch"
    y_ref, _ = ssd_reference(x.double(), dt.double(), A.double(), B.double(), C.double())
    assert_rel_close(y, y_ref, 2e-6, "y (triton)")
    assert_rel_close(y_torch, y_ref, 2e-6, "y (torch)")


def test_bad_shapes_are_named():
    x, dt, A, B, C, _ = inputs(1, 8, 4, 2, 2, 3, seed=0)
    with pytest.raises(ValueError, match="dt has shape"):
        ssd_chunked(x, dt[:, :4], A, B, C, 4)
    with pytest.raises(ValueError, match="not a multiple of 3 groups"):
        ssd_chunked(x, dt, A, B.repeat(1, 1, 2, 1)[:, :, :3], C.repeat(1, 1, 2, 1)[:, :, :3], 4)


def test_torch_compile_matches_eager():
    b, seqlen, h, p, g, n = 1, 19, 2, 4, 1, 3
    tensors = [*inputs(b, seqlen, h, p, g, n, seed=4), torch.randn(b, h, p, n)]
    seq_idx = torch.tensor([[0] * 7 + [1] * 12])
    gy, gs = torch.randn(b, seqlen, h, p), torch.randn(b, h, p, n)

    def fn(x, dt, A, B, C, chunk, D, seq_idx, initial_state, return_final_state):
        y, final = ssd_chunked(
            x * 1.0, dt, A, B, C, chunk, D=D, seq_idx=seq_idx, initial_state=initial_state, return_final_state=True
        )
        return y * 2.0, final

    # fullgraph: the dispatch and the op trace without a graph break (the op is one opaque node).
    with use_kernels("triton"):
        eager = run(fn, tensors, 8, seq_idx, gy, gs)
        compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), tensors, 8, seq_idx, gy, gs)
    names = ["y", "final", *NAMES]
    for name, a, e in zip(names, [compiled[0], compiled[1], *compiled[2]], [eager[0], eager[1], *eager[2]]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=f"compiled vs eager: {name}")


def bf16_check(device, packed, b, seqlen, h, p, g, n, chunk, cuts, seed=0):
    """x, B, C and dy in bf16 (dt, A, D float32, as the Mamba2 layer passes them): every output within
    2x the error of the float64 reference fed the same rounded inputs."""
    tensors = [*inputs(b, seqlen, h, p, g, n, seed), torch.randn(b, h, p, n)]
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(b, seqlen, dtype=torch.long)
        for row, row_cuts in enumerate(cuts):
            for cut in row_cuts:
                seq_idx[row, cut:] += 1
        seq_idx = seq_idx.to(device)
    tensors = [t.to(device) for t in tensors]
    gy = torch.randn(b, seqlen, h, p).bfloat16().to(device)
    gs = torch.randn(b, h, p, n).to(device)
    low = [t.bfloat16() if i in (0, 3, 4) else t for i, t in enumerate(tensors)]
    y, final, grads = run(ssd_triton.ssd_chunked_triton, low, chunk, seq_idx, gy, gs)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    exact = run(reference, [t.double() for t in tensors], chunk, seq_idx, gy.double(), gs.double())
    rounded = run(reference, [t.double() for t in low], chunk, seq_idx, gy.double(), gs.double())
    assert_bf16_within(y, exact[0], rounded[0], what="y")
    assert_bf16_within(final, exact[1], rounded[1], what="final state")
    for name, gr, ge, grr in zip(NAMES, grads, exact[2], rounded[2]):
        assert_bf16_within(gr, ge, grr, what=f"grad {name}")


@pytest.mark.parametrize("split", [None, "FWD_STATE_SINGLE_PRODUCT", "DB_STATE_SINGLE_PRODUCT", "DBC_W_SINGLE_PRODUCT"])
def test_bf16_inputs_small(monkeypatch, split):
    # The products that only one output sees run as one bf16 product by default; split: one of
    # them back in two (the float32 factor as hi + lo), so both paths stay tested.
    if split:
        monkeypatch.setattr(ssd_triton, split, False)
    bf16_check("cpu", True, 1, 70, 4, 32, 2, 32, 32, [[20, 32]])


# --------------------------------------------------------------------------------------------------
# GPU: bf16 at a realistic length, against the float64 reference


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_bf16_within_twice_the_rounded_reference(packed):
    # bench-like widths at L = 4096; packed: several documents per row, cuts inside chunks, at a
    # chunk start (1024) and on consecutive positions (1500, 1501).
    cuts = [[700, 1024, 2900], [129, 1500, 1501, 3333]]
    bf16_check("cuda", packed, 2, 4096, 8, 64, 2, 128, 128, cuts)


@pytest.mark.gpu
def test_pipelining_stages_leave_the_outputs_bitwise_unchanged(monkeypatch):
    # The *_STAGES settings are tuned for speed alone (the comments beside them say so): prefetching
    # loads must not change a product or a sum. bf16 at L = 4096, packed, bench-like widths.
    tensors = [t.cuda() for t in (*inputs(2, 4096, 8, 64, 2, 128, 0), torch.randn(2, 8, 64, 128))]
    low = [t.bfloat16() if i in (0, 3, 4) else t for i, t in enumerate(tensors)]
    seq_idx = torch.zeros(2, 4096, dtype=torch.long, device="cuda")
    seq_idx[:, 1000:] += 1
    gy, gs = torch.randn(2, 4096, 8, 64, device="cuda").bfloat16(), torch.randn(2, 8, 64, 128, device="cuda")
    knobs = ["STATE_STAGES", "SCAN_STAGES", "DX_STAGES", "W_STAGES", "BWD_STAGES"]
    outs = []
    for stages in (1, 2, 3):
        for knob in knobs:
            monkeypatch.setattr(ssd_triton, knob, stages)
        y, final, grads = run(ssd_triton.ssd_chunked_triton, low, 128, seq_idx, gy, gs)
        outs.append([y, final, *grads])
    for stages, out in zip((2, 3), outs[1:]):
        for name, a, e in zip(["y", "final", *NAMES], out, outs[0]):
            assert torch.equal(a, e), f"{name} with {stages} stages differs from 1 stage"


def test_mamba2_mixer_same_on_both_paths():
    # The layer hands the op strided views of one projection (x, B, C from a split) and float32 dt.
    from hybridlm.layers import Mamba2Mixer
    from tests.helpers import tiny_config
    from tests.layers.test_mixers import context, make
    from tests.ops.test_ssd import docs

    config = tiny_config("M")
    layer = make(Mamba2Mixer, config, seed=3)
    seq_idx = docs(2, 21, seed=5)
    ctx, _ = context(config, 2, 21, seq_idx)
    x = torch.randn(2, 21, config.hidden_size)
    g = torch.randn(2, 21, config.hidden_size)
    results = {}
    for mode in ("torch", "triton"):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with use_kernels(mode):
            y = layer(xi, ctx)
        y.backward(g)
        results[mode] = [y, xi.grad] + [p.grad.clone() for p in layer.parameters()]
    names = ["y", "x"] + [n for n, _ in layer.named_parameters()]
    for name, a, e in zip(names, results["triton"], results["torch"]):
        assert_rel_close(a, e, 1e-5, f"mixer {name}")


def test_custom_op_registration():
    # torch.library.opcheck: schema, fake (meta) impl vs real outputs, autograd registration, and
    # AOT dispatch, for the forward op and its backward op.
    b, seqlen, h, p, g, n = 1, 11, 2, 4, 1, 3
    x, dt, A, B, C, D = inputs(b, seqlen, h, p, g, n, seed=6)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6])
    init = torch.randn(b, h, p, n)
    args = [t.requires_grad_() for t in (x, dt, A, B, C, D)] + [seq_idx, init.requires_grad_(), 4]
    torch.library.opcheck(torch.ops.hybridlm.ssd_chunk_scan, args)
    dy, dfinal = torch.randn(b, seqlen, h, p), torch.randn(b, h, p, n)
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    _, states = torch.ops.hybridlm.ssd_chunk_scan(*plain)
    torch.library.opcheck(torch.ops.hybridlm.ssd_chunk_scan_bwd, [dy, dfinal, states, *plain])
