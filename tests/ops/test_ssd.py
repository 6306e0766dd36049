"""Chunked SSD scan against the float64 step recurrence, forward and backward."""

import pytest
import torch

from hybridlm.ops.ssd import segsum, ssd_chunked, ssd_chunked_torch, ssd_reference
from tests.helpers import assert_rel_close


def inputs(b, seqlen, h, p, g, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seqlen, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, seqlen, h, generator=gen) - 1.0)
    A = -torch.exp(torch.rand(h, generator=gen) * 2.0)
    B = torch.randn(b, seqlen, g, n, generator=gen)
    C = torch.randn(b, seqlen, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return x, dt, A, B, C, D


def docs(b, seqlen, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        cuts = sorted(torch.randint(1, seqlen, (3,), generator=gen).tolist())
        row = torch.zeros(seqlen, dtype=torch.long)
        for c in cuts:
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("seqlen", [1, 7, 16, 37])  # shorter, equal, and not a multiple of the chunk
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_forward_and_backward_match_recurrence(seqlen, packed, dtype):
    """float64 inputs scan in float64 (they were upcast to float32 only: 1e-7 off the recurrence)."""
    b, h, p, g, n, chunk = 2, 4, 6, 2, 5, 8
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    x, dt, A, B, C, D = inputs(b, seqlen, h, p, g, n, seed=seqlen)
    seq_idx = docs(b, seqlen, seed=seqlen) if packed and seqlen > 1 else None
    init = torch.randn(b, h, p, n)
    leaves = [t.to(dtype).clone().requires_grad_() for t in (x, dt, A, B, C, D, init)]
    y, final = ssd_chunked(
        *leaves[:5], chunk, D=leaves[5], seq_idx=seq_idx, initial_state=leaves[6], return_final_state=True
    )
    assert y.dtype == final.dtype == dtype
    ref_leaves = [t.double().clone().requires_grad_() for t in (x, dt, A, B, C, D, init)]
    y_ref, final_ref = ssd_reference(*ref_leaves[:5], D=ref_leaves[5], seq_idx=seq_idx, initial_state=ref_leaves[6])
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(final, final_ref, tol, "final state")

    gy, gs = torch.randn_like(y), torch.randn_like(final)
    torch.autograd.backward([y, final], [gy, gs])
    torch.autograd.backward([y_ref, final_ref], [gy.double(), gs.double()])
    for name, t, r in zip(["x", "dt", "A", "B", "C", "D", "init"], leaves, ref_leaves):
        assert_rel_close(t.grad, r.grad, tol, f"grad {name}")


def test_packed_equals_separate_documents():
    b, seqlen, h, p, g, n = 1, 29, 4, 4, 2, 3
    x, dt, A, B, C, D = inputs(b, seqlen, h, p, g, n, seed=3)
    seq_idx = torch.tensor([[0] * 9 + [1] * 13 + [2] * 7])
    y = ssd_chunked(x, dt, A, B, C, 8, D=D, seq_idx=seq_idx)
    start = 0
    for length in (9, 13, 7):
        sl = slice(start, start + length)
        alone = ssd_chunked(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], 8, D=D)
        assert_rel_close(y[:, sl], alone, 1e-6, f"document at {start}")
        start += length


def test_segsum_tolerates_minus_infinity():
    a = torch.tensor([0.0, -1.0, float("-inf"), -2.0])
    s = segsum(a)
    assert torch.isneginf(s[3, 0]) and torch.isneginf(s[2, 1])
    assert s[3, 2] == -2.0 and s[1, 0] == -1.0 and s[0, 0] == 0.0
    assert not torch.isnan(s).any()


def test_torch_path_is_float32_under_autocast():
    x, dt, A, B, C, D = inputs(1, 40, 4, 8, 2, 8, seed=5)
    plain = ssd_chunked_torch(x, dt, A, B, C, 16, D=D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ssd_chunked_torch(x, dt, A, B, C, 16, D=D)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


def test_bad_chunk_size_and_initial_state_are_refused_by_name():
    x, dt, A, B, C, _ = inputs(1, 8, 4, 2, 2, 3, seed=0)
    # (b, h, n, p) instead of (b, h, p, n): as many elements, so only the check stops it being read transposed
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 4, 3, 2\), expected \(1, 4, 2, 3\)"):
        ssd_chunked(x, dt, A, B, C, 4, initial_state=torch.zeros(1, 4, 3, 2))
    for chunk in (0, -4):
        with pytest.raises(
            ValueError, match=rf"chunk_size must be a positive integer \(positions per chunk\), got {chunk}"
        ):
            ssd_chunked(x, dt, A, B, C, chunk)


def test_a_float_chunk_size_is_refused_by_name():
    """64.0 passed the ``< 1`` check and failed inside the padding: "pad(): ... type must be tuple of ints"."""
    x, dt, A, B, C, _ = inputs(1, 8, 4, 2, 2, 3, seed=0)
    for chunk in (4.0, 2.5, True):
        with pytest.raises(ValueError, match=rf"ssd: chunk_size must be a positive integer .*, got {chunk}$"):
            ssd_chunked(x, dt, A, B, C, chunk)


def test_bf16_inputs_give_y_in_bf16_and_the_state_in_float32():
    """y comes back in the dtype of x (the layer's next ops are bf16), the final state in float32."""
    x, dt, A, B, C, D = inputs(2, 20, 4, 6, 2, 5, seed=6)
    xb, Bb, Cb = (t.bfloat16() for t in (x, B, C))
    y, final = ssd_chunked(xb, dt, A, Bb, Cb, 8, D=D, return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref, final_ref = ssd_reference(xb, dt, A, Bb, Cb, D=D)
    assert_rel_close(y, y_ref, 1e-2, "y")  # bf16 rounding of the result
    assert_rel_close(final, final_ref, 1e-5, "final state")


def extreme_inputs():
    """What a trained model can reach, for a chunk of 8: a dt·A of -1e4 inside a chunk (its decays underflow to 0,
    and a scan that differenced cumulative sums would lose the chunk's later decays to cancellation), dt = 0 (no
    decay, no input), a head with A = 0, and documents of one position inside a chunk.

    Returns (x, dt, A, B, C, D) and seq_idx (1, 29)."""
    x, dt, A, B, C, D = inputs(1, 29, 3, 4, 1, 5, seed=9)
    A = A.clone()
    A[2] = 0.0
    dt = dt.clone()
    dt[0, 3, :2] = 1e4 / A[:2].abs()  # dt·A = -1e4 at one step of the first chunk
    dt[0, 12:15] = 0.0
    seq_idx = torch.tensor([[0] * 9 + [1] + [2] * 6 + [3] + [4] * 12])  # length-1 documents at 9 and 16
    return (x, dt, A, B, C, D), seq_idx


def test_extreme_step_sizes_keep_float32_accuracy_and_finite_gradients():
    """The plain-torch scan on :func:`extreme_inputs`: float32 accuracy, forward and every gradient."""
    (x, dt, A, B, C, D), seq_idx = extreme_inputs()
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    y, final = ssd_chunked_torch(*leaves[:5], 8, D=leaves[5], seq_idx=seq_idx, return_final_state=True)
    ref = [t.double().clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    y_ref, final_ref = ssd_reference(*ref[:5], D=ref[5], seq_idx=seq_idx)
    assert_rel_close(y, y_ref, 1e-5, "y")
    assert_rel_close(final, final_ref, 1e-5, "final state")
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.double())
    for name, t, r in zip(["x", "dt", "A", "B", "C", "D"], leaves, ref):
        assert_rel_close(t.grad, r.grad, 1e-5, f"grad {name}")
