"""Chunked gated delta rule against the float64 recurrence, forward and backward."""

import pytest
import torch

from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.gated_delta import (
    gated_delta_rule_chunked,
    gated_delta_rule_chunked_torch,
    gated_delta_rule_reference,
    l2_normalize,
)
from tests.helpers import assert_bf16_within, assert_rel_close, runs_triton_kernels
from tests.ops.test_ssd import docs

try:
    from hybridlm.ops import gated_delta_triton
except ImportError:  # no Triton: those tests skip
    gated_delta_triton = None


@pytest.fixture
def kernel_device(monkeypatch):
    """Where the Triton tests run: the GPU when there is one (with float32-exact products, so the
    float32 tolerances hold), else Triton's interpreter on the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    monkeypatch.setattr(gated_delta_triton, "DOT_PRECISION", "ieee")
    return torch.device("cuda")


def inputs(b, seqlen, h, dk, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(b, seqlen, h, dk, generator=gen))
    k = l2_normalize(torch.randn(b, seqlen, h, dk, generator=gen))
    v = torch.randn(b, seqlen, h, dv, generator=gen)
    g = -torch.nn.functional.softplus(torch.randn(b, seqlen, h, generator=gen))
    beta = torch.rand(b, seqlen, h, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("seqlen", [1, 9, 16, 41])
@pytest.mark.parametrize("packed", [False, True])
def test_forward_and_backward_match_recurrence(seqlen, packed):
    b, h, dk, dv, chunk = 2, 3, 5, 6, 8
    tensors = inputs(b, seqlen, h, dk, dv, seed=seqlen)
    init = torch.randn(b, h, dk, dv)
    seq_idx = docs(b, seqlen, seed=seqlen) if packed and seqlen > 1 else None
    leaves = [t.clone().requires_grad_() for t in (*tensors, init)]
    o, final = gated_delta_rule_chunked(
        *leaves[:5], chunk, seq_idx=seq_idx, initial_state=leaves[5], return_final_state=True
    )
    ref = [t.double().clone().requires_grad_() for t in (*tensors, init)]
    o_ref, final_ref = gated_delta_rule_reference(*ref[:5], seq_idx=seq_idx, initial_state=ref[5])
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(final, final_ref, 1e-5, "final state")
    go, gs = torch.randn_like(o), torch.randn_like(final)
    torch.autograd.backward([o, final], [go, gs])
    torch.autograd.backward([o_ref, final_ref], [go.double(), gs.double()])
    for name, t, r in zip(["q", "k", "v", "g", "beta", "init"], leaves, ref):
        assert_rel_close(t.grad, r.grad, 1e-5, f"grad {name}")


def test_float64_chunked_equals_recurrence():
    """The float64 chunked torch path is an exact reference (the GPU bf16 tests use it at L=4096)."""
    tensors = [t.double() for t in inputs(2, 37, 2, 5, 6, seed=3)]
    seq_idx = docs(2, 37, seed=3)
    o, final = gated_delta_rule_chunked_torch(*tensors, 8, seq_idx=seq_idx, return_final_state=True)
    o_ref, final_ref = gated_delta_rule_reference(*tensors, seq_idx=seq_idx)
    assert o.dtype == torch.float64
    assert_rel_close(o, o_ref, 1e-12, "o")
    assert_rel_close(final, final_ref, 1e-12, "final state")


def test_a_sequence_shorter_than_a_chunk_is_not_padded_to_one():
    """A 5-token window under a chunk of 2**20 computed (Q x Q) decays of 2**40 entries (out of memory); a
    verification window of 3 tokens under the default 64 multiplied 61 rows of zeros. Now one chunk of L."""
    tensors = [t.double() for t in inputs(1, 5, 2, 4, 3, seed=5)]
    seq_idx = docs(1, 5, seed=5)
    o, final = gated_delta_rule_chunked_torch(*tensors, 2**20, seq_idx=seq_idx, return_final_state=True)
    o_ref, final_ref = gated_delta_rule_reference(*tensors, seq_idx=seq_idx)
    assert_rel_close(o, o_ref, 1e-12, "o")
    assert_rel_close(final, final_ref, 1e-12, "final state")


def test_l2_normalize_gives_unit_rows():
    """q and k are normalized to unit length (flash-linear-attention's l2norm): a mean in place of the sum
    made them sqrt(dk) times too long, and both references share this function, so only this test sees it."""
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(l2_normalize(x).norm(dim=-1), torch.ones(3, 7, dtype=torch.float64))
    tiny = torch.full((4,), 1e-4, dtype=torch.float64)  # eps inside the root: sqrt(4e-8 + 1e-6)
    torch.testing.assert_close(l2_normalize(tiny), tiny / (4e-8 + 1e-6) ** 0.5)


def test_an_explicit_scale_is_used():
    """The torch chunked path used 1.0 for any scale given, and no test passed one."""
    tensors = [t.double() for t in inputs(2, 21, 2, 5, 6, seed=4)]
    o_default, _ = gated_delta_rule_reference(*tensors)
    o_ref, _ = gated_delta_rule_reference(*tensors, scale=0.3)
    assert_rel_close(o_ref, o_default * (0.3 / 5**-0.5), 1e-12, "reference")  # o is linear in the query scale
    assert_rel_close(gated_delta_rule_chunked_torch(*tensors, 8, scale=0.3), o_ref, 1e-12, "o")


def test_torch_path_accumulates_in_float32_under_autocast():
    q, k, v, g, beta = inputs(1, 24, 2, 16, 16, seed=4)
    expected = gated_delta_rule_chunked_torch(q, k, v, g, beta, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = gated_delta_rule_chunked_torch(q, k, v, g, beta, 8)
    assert o.dtype == torch.float32
    assert_rel_close(o, expected, 1e-6, "o under autocast")


def test_use_kernels_torch_forces_torch():
    reset_paths()
    with use_kernels("torch"):
        gated_delta_rule_chunked(*inputs(1, 5, 1, 4, 4, seed=0), 8)
    assert paths_used()["gated_delta"] == "torch"


# Resets: row 0 inside the first chunk (5), on a chunk start (16) and inside a later chunk (30);
# row 1 right after the first position (1) and on a chunk start (32). The kernels' chunk is 16.
RESETS = ([5, 16, 30], [1, 32])


def doc_index(seqlen: int) -> torch.Tensor:
    seq_idx = torch.zeros(len(RESETS), seqlen, dtype=torch.long)
    for row, starts in enumerate(RESETS):
        for s in starts:
            seq_idx[row, s:] += 1
    return seq_idx


@runs_triton_kernels
@pytest.mark.parametrize(("seqlen", "packed", "initial"), [(41, True, True), (41, False, False), (32, True, False)])
def test_triton_matches_recurrence(seqlen, packed, initial, kernel_device):
    """Triton against the float64 recurrence: output, final state, every gradient."""
    b, h, dk, dv = 2, 2, 5, 6
    tensors = [t.to(kernel_device) for t in inputs(b, seqlen, h, dk, dv, seed=seqlen)]
    init = torch.randn(b, h, dk, dv, device=kernel_device) if initial else None
    seq_idx = doc_index(seqlen).to(kernel_device) if packed else None
    present = [t for t in (*tensors, init) if t is not None]
    leaves = [t.clone().requires_grad_() for t in present]
    reset_paths()
    with use_kernels("triton"):
        o, final = gated_delta_rule_chunked(
            *leaves[:5], 16, seq_idx=seq_idx, initial_state=leaves[5] if initial else None, return_final_state=True
        )
    assert paths_used()["gated_delta"] == "triton"
    ref = [t.double().clone().requires_grad_() for t in present]
    o_ref, final_ref = gated_delta_rule_reference(*ref[:5], seq_idx=seq_idx, initial_state=ref[5] if initial else None)
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(final, final_ref, 1e-5, "final state")
    go, gs = torch.randn_like(o), torch.randn_like(final)
    torch.autograd.backward([o, final], [go, gs])
    torch.autograd.backward([o_ref, final_ref], [go.double(), gs.double()])
    for name, t, r in zip(["q", "k", "v", "g", "beta", "init"], leaves, ref):
        assert_rel_close(t.grad, r.grad, 1e-5, f"grad {name}")


# Triton's CPU interpreter computes exp(g_i - g_j) on the whole chunk, the masked-out upper triangle too, where
# large decays overflow to inf before tl.where drops them (a GPU does the same without a word).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=runs_triton_kernels)])
def test_full_resets_and_large_log_decays_inside_a_chunk(path, kernel_device):
    """g = -inf (decay 0) and a large |g| inside a chunk, with write strengths 0 and 1: the Triton kernels
    difference cumulative sums of g, where -inf - -inf was NaN and a g of -1e5 left the chunk's later decays
    4e-3 off; the torch path sums decays without differencing (segsum)."""
    b, seqlen, h, dk, dv = 2, 40, 2, 5, 6
    q, k, v, g, beta = (t.to(kernel_device) for t in inputs(b, seqlen, h, dk, dv, seed=8))
    g, beta = g.clone(), beta.clone()
    g[0, 3] = float("-inf")  # inside the first chunk of 16
    g[1, 20] = -1e5  # inside the second, followed by ordinary decays
    g[0, 24:28] = 0.0  # no decay, full writes
    beta[0, 24:28] = 1.0
    beta[1, 30:34] = 0.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    with use_kernels(path):
        o, final = gated_delta_rule_chunked(*leaves, 16, return_final_state=True)
    ref = [t.double().clone().requires_grad_() for t in (q, k, v, g, beta)]
    o_ref, final_ref = gated_delta_rule_reference(*ref)
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(final, final_ref, 1e-5, "final state")
    go = torch.randn_like(o)
    o.backward(go)
    o_ref.backward(go.double())
    for name, t, r in zip(["q", "k", "v", "g", "beta"], leaves, ref):
        assert_rel_close(t.grad, r.grad, 1e-5, f"grad {name}")


@runs_triton_kernels
def test_triton_takes_an_explicit_scale(kernel_device):
    tensors = [t.to(kernel_device) for t in inputs(1, 20, 2, 4, 4, seed=6)]
    with use_kernels("triton"):
        o = gated_delta_rule_chunked(*tensors, 16, scale=0.3)
    o_ref, _ = gated_delta_rule_reference(*tensors, scale=0.3)
    assert_rel_close(o, o_ref, 1e-5, "o")


@runs_triton_kernels
def test_triton_chunk_size_rounds_up(kernel_device):
    """chunk_size 8 runs the kernels with chunks of 16 (tl.dot's least size); the result is the same."""
    tensors = [t.to(kernel_device) for t in inputs(1, 20, 1, 4, 4, seed=5)]
    with use_kernels("triton"):
        o = gated_delta_rule_chunked(*tensors, 8)
    o_ref, _ = gated_delta_rule_reference(*tensors)
    assert gated_delta_triton.kernel_chunk(8) == 16
    assert_rel_close(o, o_ref, 1e-5, "o")


@runs_triton_kernels
def test_triton_compiled_equals_eager(kernel_device):
    """torch.compile sees the kernels as one opaque op with a registered backward (fake impl, no graph break)."""
    tensors = [t.to(kernel_device) for t in inputs(1, 19, 2, 4, 4, seed=6)]
    seq_idx = doc_index(19)[:1].to(kernel_device)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in tensors]
        with use_kernels("triton"):
            o = fn(*leaves, 16, seq_idx=seq_idx)
        o.square().sum().backward()
        return [o.detach()] + [t.grad for t in leaves]

    eager = run(gated_delta_rule_chunked)
    compiled = run(torch.compile(gated_delta_rule_chunked, backend="aot_eager", fullgraph=True))
    for name, c, e in zip(["o", "q", "k", "v", "g", "beta"], compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=f"compiled {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_triton_bf16_error_at_4096(packed):
    """bf16 at L=4096: the kernels' error vs float64 is within 2x that of float64 on the bf16-rounded inputs."""
    seqlen, h, d = 4096, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = l2_normalize(torch.randn(1, seqlen, h, d, device="cuda", generator=gen))
    k = l2_normalize(torch.randn(1, seqlen, h, d, device="cuda", generator=gen))
    v = torch.randn(1, seqlen, h, d, device="cuda", generator=gen)
    g = -torch.nn.functional.softplus(torch.randn(1, seqlen, h, device="cuda", generator=gen) - 3.0)
    beta = torch.rand(1, seqlen, h, device="cuda", generator=gen)
    do = torch.randn(1, seqlen, h, d, device="cuda", generator=gen)
    seq_idx = None
    if packed:  # 6 documents, two of them starting on a chunk boundary
        seq_idx = torch.zeros(1, seqlen, dtype=torch.long, device="cuda")
        for s in (300, 1024, 1500, 2048, 3333):
            seq_idx[:, s:] += 1

    def run(tensors, grad, path):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        with use_kernels(path):
            o = gated_delta_rule_chunked(*leaves, 64, seq_idx=seq_idx)
        o.backward(grad)
        return [o.detach()] + [t.grad for t in leaves]

    bf16 = [t.bfloat16() for t in (q, k, v)] + [g, beta]
    exact = run([t.double() for t in (q, k, v, g, beta)], do.double(), "torch")
    rounded = run([t.double() for t in bf16], do.bfloat16().double(), "torch")
    reset_paths()
    actual = run(bf16, do.bfloat16(), "triton")
    assert paths_used()["gated_delta"] == "triton"
    for name, a, e, r in zip(["o", "q", "k", "v", "g", "beta"], actual, exact, rounded):
        assert_bf16_within(a, e, r.to(a.dtype), 2.0, name)


@runs_triton_kernels
def test_triton_rejects_wide_heads(kernel_device):
    q, k, _, g, beta = [t.to(kernel_device) for t in inputs(1, 4, 1, 4, 4, seed=0)]
    wide = torch.zeros(1, 4, 1, 256, device=kernel_device)
    with use_kernels("triton"), pytest.raises(ValueError, match="head dims up to 128"):
        gated_delta_rule_chunked(q, k, wide, g, beta, 16)


def test_bad_shapes_and_chunk_size_are_refused_by_name():
    q, k, v, g, beta = inputs(1, 8, 2, 4, 3, seed=0)
    with pytest.raises(ValueError, match=r"k has shape \(1, 8, 2, 3\), expected \(1, 8, 2, 4\)"):
        gated_delta_rule_chunked(q, k[..., :3], v, g, beta, 4)
    with pytest.raises(ValueError, match=r"beta has shape \(1, 4, 2\)"):
        gated_delta_rule_chunked(q, k, v, g, beta[:, :4], 4)
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 2, 3, 4\)"):
        gated_delta_rule_chunked(q, k, v, g, beta, 4, initial_state=torch.zeros(1, 2, 3, 4))
    for chunk in (0, -4):
        with pytest.raises(
            ValueError, match=rf"chunk_size must be a positive integer \(positions per chunk\), got {chunk}"
        ):
            gated_delta_rule_chunked(q, k, v, g, beta, chunk)


def test_a_float_chunk_size_is_refused_by_name():
    """64.0 passed the ``< 1`` check and failed inside the padding: "pad(): ... type must be tuple of ints"."""
    q, k, v, g, beta = inputs(1, 8, 2, 4, 3, seed=0)
    for chunk in (4.0, 2.5, True):
        with pytest.raises(
            ValueError, match=rf"gated delta rule: chunk_size must be a positive integer .*, got {chunk}$"
        ):
            gated_delta_rule_chunked(q, k, v, g, beta, chunk)


def test_output_in_the_dtype_of_v_and_the_state_in_float32():
    """The GDN layer feeds float32 (normalized) q, k and bf16 v: o must come back in v's dtype."""
    q, k, v, g, beta = inputs(2, 12, 2, 4, 6, seed=2)
    vb = v.bfloat16()
    o, final = gated_delta_rule_chunked(q, k, vb, g, beta, 8, return_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    o_ref, final_ref = gated_delta_rule_reference(q, k, vb, g, beta)
    assert_rel_close(o, o_ref, 1e-2, "o")  # bf16 rounding of the result
    assert_rel_close(final, final_ref, 1e-5, "final state")


def test_the_dispatcher_passes_an_explicit_scale_on():
    """``gated_delta_rule_chunked`` (what the layer calls) with a scale: that scale, on the torch path too."""
    tensors = inputs(2, 13, 2, 5, 6, seed=7)
    o_ref, _ = gated_delta_rule_reference(*tensors, scale=0.3)
    with use_kernels("torch"):
        assert_rel_close(gated_delta_rule_chunked(*tensors, 8, scale=0.3), o_ref, 1e-5, "o")
