"""A mixture of experts' token permutation (``ops.permute``) against its definition: scatter formulas in float64."""

import pytest
import torch

from hybridlm.ops.permute import in_pair_order, permute_tokens, unpermute_tokens


def pairs(T: int, E: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random distinct experts for T tokens -> the order of their pairs grouped by expert."""
    idx = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    return torch.argsort(idx.reshape(-1), stable=True)


def test_rows_in_pair_order_undo_the_grouping():
    gen = torch.Generator().manual_seed(0)
    order = pairs(7, 5, 3, gen)
    x = torch.randn(21, 4, generator=gen)
    assert torch.equal(in_pair_order(x[order], order, 3), x.view(7, 3, 4))


@pytest.mark.parametrize(("T", "E", "k"), [(9, 6, 2), (5, 8, 8), (1, 4, 1), (0, 4, 2)])
def test_forward_and_gradients_are_the_scatter_formulas(T, E, k):
    gen = torch.Generator().manual_seed(T + k)
    order = pairs(T, E, k, gen)
    x = torch.randn(T, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = permute_tokens(x, order, k)
    assert torch.equal(rows, x[order // k])
    out = torch.randn(T * k, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64, requires_grad=True)
    y = unpermute_tokens(out, w, order)
    # The definition: each grouped row scaled by its pair's weight, added into its token.
    expected = torch.zeros(T, 3, dtype=torch.float64).index_add_(0, order // k, out * w.reshape(-1)[order, None])
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: permute_tokens(x, order, k), (x,))
    assert torch.autograd.gradcheck(lambda o, w: unpermute_tokens(o, w, order), (out, w))
    (rows.sum() + y.sum()).backward()  # an empty batch too: zero-row gradients
    assert x.grad.shape == x.shape and out.grad.shape == out.shape and w.grad.shape == w.shape


def test_a_tokens_output_is_its_own_rows_summed_in_choice_order_whatever_the_batch():
    """Batch invariance: token t's output, computed among 64 tokens, is bitwise the output of t alone."""
    gen = torch.Generator().manual_seed(1)
    T, E, k = 64, 16, 6
    idx = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    w = torch.rand(T, k, generator=gen)
    x = torch.randn(T, 32, generator=gen)
    expert_out = torch.randn(E, 32, generator=gen)  # an "expert" adds its own row: rows differ per expert

    def forward(idx, w, x):
        order = torch.argsort(idx.reshape(-1), stable=True)
        rows = permute_tokens(x, order, idx.shape[1]) + expert_out[idx.reshape(-1)[order]]
        return unpermute_tokens(rows, w, order)

    y = forward(idx, w, x)
    for t in (0, 17, 63):
        assert torch.equal(y[t : t + 1], forward(idx[t : t + 1], w[t : t + 1], x[t : t + 1]))
    # ... and the sum runs over j = 0..k-1 in that order, in float32.
    t = 5
    s = torch.zeros(32)
    for j in range(k):
        s = s + w[t, j] * (x[t] + expert_out[idx[t, j]])
    assert torch.equal(y[t], s)


def test_bf16_rows_give_float32_gradients_summed_in_float32():
    """The input's gradient is each token's k bf16 row gradients summed in float32, never rounded to bf16."""
    gen = torch.Generator().manual_seed(2)
    T, E, k, H = 32, 8, 6, 64
    order = pairs(T, E, k, gen)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    rows = permute_tokens(x, order, k, torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, x.detach().to(torch.bfloat16)[order // k])
    g = torch.randn(T * k, H, generator=gen).to(torch.bfloat16)
    rows.backward(g)
    exact = torch.zeros(T, H, dtype=torch.float64).index_add_(0, order // k, g.double())
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), exact, rtol=2e-7, atol=1e-6)
    # Weighted sums: bf16 rows, float32 weights, a float32 output computed in float32.
    w = torch.rand(T, k, generator=gen, requires_grad=True)
    out = torch.randn(T * k, H, generator=gen).to(torch.bfloat16).requires_grad_()
    y = unpermute_tokens(out, w, order, torch.float32)
    ref = torch.zeros(T, H, dtype=torch.float64).index_add_(
        0, order // k, out.detach().double() * w.detach().double().reshape(-1)[order, None]
    )
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert out.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_a_strided_gradient_is_put_in_pair_order_too():
    gen = torch.Generator().manual_seed(3)
    order = pairs(6, 4, 2, gen)
    x = torch.randn(6, 5, generator=gen, requires_grad=True)
    g = torch.randn(5, 12, generator=gen).t()  # (12, 5), strided
    permute_tokens(x, order, 2).backward(g)
    torch.testing.assert_close(x.grad, torch.zeros(6, 5).index_add_(0, order // 2, g), rtol=1e-6, atol=1e-6)
