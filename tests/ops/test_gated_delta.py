"""Chunked gated delta rule against the float64 recurrence, forward and backward."""

import pytest
import torch

from hybridlm.ops.gated_delta import gated_delta_rule_chunked, gated_delta_rule_reference, l2_normalize
from tests.helpers import assert_rel_close
from tests.ops.test_ssd import docs


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
