"""MoE top-k routing: the Triton kernel (inference) against the torch reference, ``ops.routing.route``.

On CPU the kernel runs in Triton's interpreter; the ``gpu`` test runs it compiled at the routers of ``bench-moe-1b``
and Qwen3-Next.
"""

import pytest
import torch

from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.routing import route
from tests.helpers import assert_rel_close, runs_triton_kernels

pytestmark = runs_triton_kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def both(logits, *args, **kw):
    """(the kernel's result, the reference's) for one routing call, each path asserted."""
    out = {}
    for mode in ("triton", "torch"):
        reset_paths()
        with torch.no_grad(), use_kernels(mode):
            out[mode] = route(logits, *args, **kw)
        assert paths_used() == {"moe_route": mode}
    return out["triton"], out["torch"]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize(("T", "E", "k"), [(5, 64, 6), (3, 40, 1), (2, 512, 10), (0, 16, 2)])
def test_triton_routing_equals_the_reference(score, with_bias, norm, T, E, k):
    g = torch.Generator().manual_seed(E + k)
    wide = torch.randn(T, 2 * E, generator=g)
    logits = wide[:, E:].to(DEV)  # (a strided view: rows 2E apart)
    bias = (torch.randn(E, generator=g) * 0.5).to(DEV) if with_bias else None
    (s, w, i), (s_ref, w_ref, i_ref) = both(logits, k, score, bias, norm_topk_prob=norm, scaling=2.5)
    assert i.dtype == torch.int64 and i.shape == (T, k) and w.shape == (T, k) and s.shape == (T, E)
    assert torch.equal(i, i_ref)  # in topk's order: the largest choice first
    if T:
        assert_rel_close(w, w_ref, 1e-6, "weights")
        assert_rel_close(s, s_ref, 1e-6, "scores")


def test_triton_routing_takes_the_lowest_id_among_equal_scores_and_keeps_a_nan_row_in_range():
    logits = torch.zeros(2, 8, device=DEV)
    logits[0, 5] = 1.0  # then seven equal ones
    logits[1] = float("nan")
    reset_paths()
    with torch.no_grad(), use_kernels("triton"):
        _, w, i = route(logits, 3, "sigmoid")
    assert i[0].tolist() == [5, 0, 1]
    assert ((i[1] >= 0) & (i[1] < 8)).all() and w[1].isnan().all()


def test_routing_keeps_the_reference_for_gradients_and_expert_groups():
    logits = torch.randn(4, 16, device=DEV, requires_grad=True)
    reset_paths()
    with use_kernels("triton"):
        _, w, _ = route(logits, 2, "softmax")
        w.sum().backward()
    assert paths_used() == {"moe_route": "torch"} and logits.grad is not None
    reset_paths()
    with torch.no_grad(), use_kernels("triton"):
        route(logits.detach(), 2, "sigmoid", num_groups=4, topk_groups=2)
    assert paths_used() == {}  # group-limited routing: the reference, no kernel


def test_route_refuses_what_it_cannot_route():
    logits = torch.randn(2, 8)
    for kw, what in (({"top_k": 9}, "top_k 9 of 8"), ({"top_k": 2, "bias": torch.zeros(7)}, "bias \\(7,\\)")):
        with pytest.raises(ValueError, match=what):
            route(logits, **kw)
    with pytest.raises(ValueError, match="score must be"):
        route(logits, 2, "relu")


@pytest.mark.gpu
@pytest.mark.parametrize(("E", "k", "score", "with_bias"), [(64, 6, "sigmoid", True), (512, 10, "softmax", False)])
def test_gpu_routing_at_real_router_sizes(E, k, score, with_bias):
    """bench-moe-1b's router (64 experts, top 6, sigmoid with the expert bias) and Qwen3-Next's (512, top 10,
    softmax), 64 decode rows: the kernel picks the reference's experts, with its weights."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    logits = torch.randn(64, E, device="cuda") * 2
    bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
    (s, w, i), (s_ref, w_ref, i_ref) = both(logits, k, score, bias, norm_topk_prob=True, scaling=2.5)
    assert torch.equal(i.sort(-1).values, i_ref.sort(-1).values)
    assert_rel_close(w.gather(1, i.argsort(-1)), w_ref.gather(1, i_ref.argsort(-1)), 1e-5, "weights")
    assert_rel_close(s, s_ref, 1e-5, "scores")
