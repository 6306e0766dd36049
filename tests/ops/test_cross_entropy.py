"""Chunked linear cross entropy equals the head + float32 cross entropy it replaces."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM
from hybridlm.ops.cross_entropy import _accumulate_product, linear_cross_entropy
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from tests.helpers import assert_bf16_within, assert_rel_close, runs_triton_kernels, tiny_config


def test_linear_cross_entropy_matches_full_logits_forward_and_backward():
    torch.manual_seed(1)
    h = torch.randn(3, 37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 53, (3, 37))
    labels[0, :5] = -100
    labels[2, -1] = -100
    ref = F.cross_entropy((h @ w.T).reshape(-1, 53), labels.reshape(-1), ignore_index=-100)
    gh, gw = torch.autograd.grad(ref, (h, w))
    for chunk in (7, 64, 1000):  # several chunks, a ragged last chunk, one chunk
        loss = linear_cross_entropy(h, w, labels, chunk=chunk)
        ah, aw = torch.autograd.grad(loss * 1.0, (h, w))
        assert_rel_close(loss, ref, 1e-12, f"loss, chunk {chunk}")
        assert_rel_close(ah, gh, 1e-12, f"dh, chunk {chunk}")
        assert_rel_close(aw, gw, 1e-12, f"dW, chunk {chunk}")
    # Without gradients (evaluation) the same value, and no labels at all gives 0, not NaN.
    with torch.no_grad():
        assert_rel_close(linear_cross_entropy(h, w, labels, chunk=5), ref, 1e-12, "no-grad loss")
        assert linear_cross_entropy(h, w, torch.full_like(labels, -100)).item() == 0.0


def test_model_fused_loss_equals_logits_loss_with_mtp_and_tied_head():
    for tied in (False, True):
        config = tiny_config("M[*-]/[*-]/[*-]", tie_embeddings=tied)
        a, b = HybridLM(config, seed=0), HybridLM(config, seed=0)
        ids = torch.randint(0, config.vocab_size, (2, 29))
        labels = torch.roll(ids, -1, 1)
        doc_ids = torch.tensor([[0] * 11 + [1] * 18, [0] * 29])
        out_a = a(ids, labels, doc_ids=doc_ids)
        out_b = b(ids, labels, doc_ids=doc_ids, return_logits=False)
        assert out_b.logits is None and out_b.mtp_logits == []
        assert len(out_b.mtp_losses) == 2
        for x, y in zip([out_a.loss, out_a.lm_loss, *out_a.mtp_losses], [out_b.loss, out_b.lm_loss, *out_b.mtp_losses]):
            assert_rel_close(y, x, 1e-6, "loss")
        out_a.loss.backward()
        out_b.loss.backward()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert_rel_close(q.grad, p.grad, 1e-5, name)


# --------------------------------------------------------------------------------------------------
# the Triton kernel (Triton's interpreter on CPU, compiled on the GPU)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@runs_triton_kernels
@pytest.mark.parametrize("V", [53, 4096 + 7])  # one partial block; two blocks, the last ragged
def test_triton_cross_entropy_rows_match_float64(V):
    from hybridlm.ops.cross_entropy_triton import cross_entropy_rows_triton

    torch.manual_seed(3)
    n = 9
    logits = (3 * torch.randn(n, V, device=DEV)).float()
    labels = torch.randint(0, V, (n,), device=DEV)
    labels[2] = -100
    labels[5] = V - 1
    ref = logits.double()
    lse = torch.logsumexp(ref, -1)
    valid = labels != -100
    ref_loss = (lse - ref.gather(1, labels.clamp(min=0)[:, None])[:, 0]) * valid
    ref_grad = torch.softmax(ref, -1)
    ref_grad[torch.arange(n), labels.clamp(min=0)] -= 1
    ref_grad *= valid[:, None]
    reset_paths()
    loss = cross_entropy_rows_triton(logits, labels, -100, write_grad=False)
    assert paths_used() == {"cross_entropy": "triton"}
    assert_rel_close(loss, ref_loss, 1e-6, "loss, no grad")
    buf = logits.clone()
    loss = cross_entropy_rows_triton(buf, labels, -100, write_grad=True)
    assert_rel_close(loss, ref_loss, 1e-6, "loss")
    assert_rel_close(buf, ref_grad, 1e-6, "grad written over the logits")
    assert torch.all(buf[2] == 0)  # an ignored row has no gradient
    # A label outside the vocabulary is not read: that row's loss is NaN, the others are unchanged.
    bad = labels.clone()
    bad[0], bad[1] = V, -3
    loss = cross_entropy_rows_triton(logits.clone(), bad, -100, write_grad=True)
    assert torch.isnan(loss[:2]).all()
    assert_rel_close(loss[2:], ref_loss[2:], 1e-6, "loss beside out-of-range labels")


@runs_triton_kernels
def test_linear_cross_entropy_triton_path_equals_torch_path():
    torch.manual_seed(4)
    h = torch.randn(2, 23, 16, device=DEV, requires_grad=True)
    w = torch.randn(4096 + 11, 16, device=DEV, requires_grad=True)
    labels = torch.randint(0, w.shape[0], (2, 23), device=DEV)
    labels[1, :4] = -100
    results = {}
    for mode in ("torch", "triton"):
        reset_paths()
        with use_kernels(mode):
            loss = linear_cross_entropy(h, w, labels, chunk=10)
            results[mode] = [loss, *torch.autograd.grad(loss, (h, w))]
            with torch.no_grad():
                results[mode].append(linear_cross_entropy(h, w, labels, chunk=10))
        assert paths_used() == {"cross_entropy": mode}
    for name, a, e in zip(["loss", "dh", "dW", "no-grad loss"], results["triton"], results["torch"]):
        assert_rel_close(a, e, 1e-5, name)


@pytest.mark.gpu
def test_gpu_linear_cross_entropy_bf16_kernel_within_twice_the_torch_path():
    # The trainer's shape: 4,096 tokens in one chunk, a 131,072 vocabulary, bf16 matmuls. Both paths
    # round the logits to bf16 (the GEMM's output), so the kernel is judged against the torch path
    # fed the same bf16 inputs, each measured against float64 on the exact inputs.
    n, d, V = 4096, 2048, 131072
    torch.manual_seed(5)
    h = torch.randn(n, d, device="cuda") / 4
    w = torch.randn(V, d, device="cuda") / 8
    labels = torch.randint(0, V, (n,), device="cuda")
    labels[:100] = -100
    results = {}
    for mode in ("triton", "torch"):
        hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
        reset_paths()
        with use_kernels(mode):
            loss = linear_cross_entropy(hb, wb, labels)
            results[mode] = [loss, *torch.autograd.grad(loss, (hb, wb))]
        assert paths_used()["cross_entropy"] == mode
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.T, labels, ignore_index=-100)
    exact = [ref, *torch.autograd.grad(ref, (hd, wd))]
    for name, a, e, rr in zip(["loss", "dh", "dW"], results["triton"], exact, results["torch"]):
        assert_bf16_within(a, e, rr, 2.0, f"linear cross entropy {name}")


@pytest.mark.gpu
def test_gpu_head_gradient_summed_over_chunks_in_float32():
    # The head's weight gradient is a float32 sum of per-chunk bf16 products. On CUDA one GEMM per
    # chunk adds into the sum (addmm with a float32 out_dtype), so no chunk's product is rounded to
    # bf16 first: the sum equals float64's to float32 accuracy, where rounding each product to bf16
    # would be off by about 1e-3 of the largest entry.
    torch.manual_seed(6)
    chunks = [(torch.randn(512, 1024, device="cuda").bfloat16(), torch.randn(1024, 256, device="cuda").bfloat16())]
    chunks += [(a * 0.5, b) for a, b in chunks * 3]
    acc = torch.full((512, 256), float("nan"), device="cuda")  # the first chunk must not read it
    for i, (a, b) in enumerate(chunks):
        _accumulate_product(acc, a, b, first=i == 0)
    exact = sum(a.double() @ b.double() for a, b in chunks)
    err = ((acc.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 1e-5, f"float32 sum of chunk products off by {err:.2e} of the largest entry"


def test_head_gradient_sum_starts_from_the_first_chunk():
    # The sum's buffer is allocated uninitialized: the first chunk overwrites it, NaNs included.
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    acc = torch.full((6, 4), float("nan"))
    _accumulate_product(acc, a, b, first=True)
    _accumulate_product(acc, a, b, first=False)
    assert torch.equal(acc, a @ b + a @ b)


def test_linear_cross_entropy_under_autocast_takes_bf16_logits_and_a_float32_softmax():
    # Under bf16 autocast the head's matmul runs in bf16 (as the unfused head would) and the
    # log-sum-exp, loss and softmax run in float32 on those logits: the result is the float64 cross
    # entropy of the bf16 logits, with or without gradients.
    torch.manual_seed(7)
    h = torch.randn(2, 13, 16, requires_grad=True)
    w = torch.randn(41, 16, requires_grad=True)
    labels = torch.randint(0, 41, (2, 13))
    labels[0, :3] = -100
    logits = (h.detach().bfloat16() @ w.detach().bfloat16().T).double()
    ref = F.cross_entropy(logits.reshape(-1, 41), labels.reshape(-1), ignore_index=-100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, chunk=5)
        with torch.no_grad():
            loss_eval = linear_cross_entropy(h, w, labels, chunk=5)
    assert loss.dtype == loss_eval.dtype == torch.float32
    assert_rel_close(loss, ref, 1e-6, "loss")
    assert_rel_close(loss_eval, ref, 1e-6, "no-grad loss")
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.dtype == gw.dtype == torch.float32


def test_linear_cross_entropy_of_no_tokens_has_zero_gradients(monkeypatch):
    # The head's gradient sum is allocated uninitialized; with no token at all no chunk overwrites it.
    # Uninitialized memory may happen to be zeros, so every torch.empty here hands out NaNs instead.
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    h = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(41, 16, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and gh.shape == (0, 16)
    assert torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize("frozen", ["weight", "h"])
def test_a_frozen_side_gets_no_gradient_computed_or_kept(frozen):
    """A frozen head (train.trainable) needs no (V, H) float32 dW, a head trained on frozen layers' output no dh: the
    forward computes and saves only the gradient asked for, which is bitwise the one both sides get."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 11, 8, generator=gen, requires_grad=True)
    w = torch.randn(29, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 29, (2, 11), generator=gen)
    both = torch.autograd.grad(linear_cross_entropy(h, w, labels, chunk=5), (h, w))
    one = (h, w.detach()) if frozen == "weight" else (h.detach(), w)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = linear_cross_entropy(*one, labels, chunk=5)
    big = [shape for shape in saved if shape]  # (the mean's divisor is a scalar)
    assert big == ([(22, 8)] if frozen == "weight" else [(29, 8)])  # dh (tokens, H) or dW (V, H), not both
    (grad,) = torch.autograd.grad(loss, one[0] if frozen == "weight" else one[1])
    assert torch.equal(grad, both[0] if frozen == "weight" else both[1])


def test_a_second_derivative_is_refused_not_wrong():
    """The backward scales the dh / dW the forward stored, so differentiating it again followed only the
    incoming gradient (here 2 * loss) and dropped the loss's own Hessian: a silently wrong result. Now autograd
    refuses it."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (6,), generator=gen)
    (dh,) = torch.autograd.grad(linear_cross_entropy(h, w, labels, chunk=4).square(), h, create_graph=True)
    with pytest.raises(RuntimeError):  # (autograd finds no differentiable path back: once_differentiable)
        torch.autograd.grad(dh.square().sum(), h)


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_a_chunk_that_is_not_a_positive_integer_is_refused(chunk):
    """A negative chunk ran no chunk: a loss of 0 and an uninitialized dW (1e33 here); 0 failed inside range()."""
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (4,))
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="chunk must be a positive integer"):
            linear_cross_entropy(h, w, labels, chunk=chunk)
