"""The lightning indexer's kernels (scores, top-k, the indexer loss's target) against their references: Triton's
interpreter on CPU, compiled on the GPU; the top-k exactly, ties included; the scores and the target against float64,
and in a DSA layer against the torch path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.layers import DSA
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.indexer import (
    index_scores,
    index_scores_reference,
    indexer_target,
    indexer_target_reference,
    select_topk,
    select_topk_reference,
)
from tests.helpers import assert_rel_close, rel_err, requires_triton, runs_triton_kernels, tiny_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def indexer_inputs(B, T, S, n, d, seed=0, device=DEV):
    """q (B, T, n, d) as a slice of a wider tensor (strided heads), w (B, T, n), k (B, S, d), float32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, n, d + 5, generator=g)[..., :d]
    w = torch.randn(B, T, n, generator=g)
    k = torch.randn(B, S, d, generator=g)
    return q.to(device), w.to(device), k.to(device)


def test_reference_diagonal_writes_minus_inf_after_it_only():
    q, w, k = indexer_inputs(2, 5, 9, 3, 4, device="cpu")
    full = index_scores_reference(q, w, k)
    for diagonal in (0, 3, -2):
        part = index_scores_reference(q, w, k, diagonal)
        after = torch.arange(9)[None, :] > torch.arange(5)[:, None] + diagonal
        assert torch.isinf(part[:, after]).all() and (part[:, after] < 0).all()
        assert torch.equal(part[:, ~after], full[:, ~after])


@runs_triton_kernels
@pytest.mark.parametrize(
    "shape",
    # ragged tiles; exact; d < 16; three query tiles, whole key tiles after the diagonal skipped in each
    [(2, 37, 53, 3, 20), (1, 70, 130, 2, 16), (1, 64, 64, 1, 128), (2, 5, 3, 4, 8), (1, 300, 320, 2, 16)],
)
@pytest.mark.parametrize("diagonal", [None, 0, 29])
def test_scores_kernel_matches_float64(shape, diagonal):
    """The kernel's scores within 4x the float32 reference's error of float64 (and 1e-6), -inf exactly after the
    diagonal, and the kernel's path recorded."""
    q, w, k = indexer_inputs(*shape, seed=sum(shape))
    exact = index_scores_reference(q.double(), w.double(), k.double(), diagonal)
    reset_paths()
    with use_kernels("triton"):
        got = index_scores(q, w, k, diagonal)
    assert paths_used() == {"index_scores": "triton"}
    assert got.dtype == torch.float32 and got.shape == exact.shape
    finite = exact.isfinite()
    assert torch.equal(got.isfinite(), finite) and (got[~finite] < 0).all()
    ref32 = index_scores_reference(q, w, k, diagonal)
    err, err32 = rel_err(got[finite], exact[finite]), rel_err(ref32[finite], exact[finite])
    assert err <= max(4 * err32, 1e-6), f"kernel {err:.3g} against float32 reference {err32:.3g}"


def scores_grads(q, w, k, g, diagonal, dtype, kernels, grad_dtype=None):
    """(dq, dw, dk) of ``index_scores`` from the scores' gradient ``g``, q, w, k and g cast to ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, w, k)]
    with use_kernels(kernels):
        out = index_scores(*leaves, diagonal, grad_dtype)
    return torch.autograd.grad(out, leaves, g.to(dtype))


def assert_scores_grads_close(got, exact, ref32, grad_dtype, factor):
    """dw (and, for float32 gradients, dq and dk) within ``factor`` x the float32 reference's error of float64 (and
    1e-6); for gradients that go on in ``grad_dtype`` (16-bit), dq and dk as close as the float32 reference's rounded
    to it."""
    for name, a, e, r in zip(("dq", "dw", "dk"), got, exact, ref32):
        err, err32 = rel_err(a, e), rel_err(r, e)
        bound = max(factor * err32, 1e-6)
        if grad_dtype is not None and name != "dw":
            bound = max(bound, rel_err(r.to(grad_dtype), e))
        assert err <= bound, f"{name}: kernel {err:.3g} against {bound:.3g} (float32 reference {err32:.3g})"


@runs_triton_kernels
@pytest.mark.parametrize("shape", [(2, 37, 53, 3, 20), (1, 70, 130, 2, 16), (2, 5, 3, 4, 8), (1, 40, 45, 11, 16)])
@pytest.mark.parametrize("diagonal", [None, 0, 29])
@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16])
def test_scores_kernel_gradients_match_float64(shape, diagonal, grad_dtype):
    """The backward kernels' dq, dw and dk within 4x the float32 reference's error of float64 (and 1e-6), for a
    gradient of the scores that is not zero after the diagonal either (those scores are constants: -inf); 11 heads
    make groups of two heads and one of one in the dk kernel (``DK_HEAD_GROUPS`` = 8). For gradients that go on in
    bf16 (their products in TF32 on a GPU), dq and dk as close as the float32 reference's rounded to bf16."""
    q, w, k = indexer_inputs(*shape, seed=sum(shape) + 1)
    B, T, S = shape[0], shape[1], shape[2]
    g = torch.randn(B, T, S, generator=torch.Generator().manual_seed(9)).to(DEV)
    exact = scores_grads(q, w, k, g, diagonal, torch.float64, "torch")
    ref32 = scores_grads(q, w, k, g, diagonal, torch.float32, "torch")
    reset_paths()
    got = scores_grads(q, w, k, g, diagonal, torch.float32, "triton", grad_dtype)
    assert paths_used() == {"index_scores": "triton"}
    assert_scores_grads_close(got, exact, ref32, grad_dtype, 4)


@requires_triton
@pytest.mark.parametrize("grad_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_scores_backward_takes_coarse_products_only_for_narrow_gradients(monkeypatch, grad_dtype):
    """``grad_dtype`` reaches the backward op: products in ``PRODUCTS_16BIT`` for a 16-bit one, in the forward's
    precision otherwise (the gates always in the forward's)."""
    from hybridlm.ops import indexer_triton

    seen = []
    real = indexer_triton._scores_bwd_op
    monkeypatch.setattr(indexer_triton, "_scores_bwd_op", lambda *a: seen.append(a[-1]) or real(*a))
    q, w, k = indexer_inputs(1, 3, 4, 2, 16)
    g = torch.randn(1, 3, 4, device=DEV)
    scores_grads(q, w, k, g, None, torch.float32, "triton", grad_dtype)
    assert seen == [grad_dtype in (torch.bfloat16, torch.float16)]


@runs_triton_kernels
@pytest.mark.parametrize("sparse_loss", [False, True])
def test_dsa_indexer_loss_on_the_kernels_matches_the_torch_path(sparse_loss):
    """A DSA layer with its indexer loss (the target's kernels, the scores' backward kernels, in chunks of queries)
    against the torch path: the loss and the indexer's weight gradients."""
    from hybridlm.layers import dsa as dsa_module
    from hybridlm.layers.context import SequenceContext
    from tests.helpers import MLA_TINY
    from tests.layers.test_mixers import make

    config = tiny_config(
        "D",
        **{
            **MLA_TINY,
            "dsa_indexer_topk": 5,
            "dsa_indexer_loss_coeff": 0.5,
            "dsa_indexer_use_sparse_loss": sparse_loss,
        },
    )
    layer = make(DSA, config, seed=4).to(DEV)
    L = 21
    x = torch.randn(2, L, config.hidden_size, device=DEV)
    pos = torch.arange(L, device=DEV).expand(2, L)
    results = {}
    for kernels in ("torch", "auto,index_scores=triton,index_topk=triton,index_target=triton"):
        layer.zero_grad(set_to_none=True)
        aux = []
        reset_paths()
        with use_kernels(kernels), pytest.MonkeyPatch.context() as mp:
            mp.setattr(dsa_module, "INDEXER_CHUNK_BYTES", 2 * 8 * L * config.dsa_indexer_n_heads * 4)  # 3 chunks
            layer(x, SequenceContext(position_ids=pos), aux)
            aux[0].backward()
        used = paths_used()
        assert used["index_scores"] == used["index_target"] == ("torch" if kernels == "torch" else "triton")
        grads = {n: p.grad.clone() for n, p in layer.indexer.named_parameters()}
        results[kernels] = (aux[0].detach(), grads)
    (loss_t, grads_t), (loss_k, grads_k) = results.values()
    assert_rel_close(loss_k, loss_t, 1e-5, "indexer loss")
    for name, grad in grads_t.items():
        assert_rel_close(grads_k[name], grad, 1e-4, f"indexer.{name}.grad")


@requires_triton
@pytest.mark.parametrize("autocast", [False, True])
def test_dsa_layer_asks_coarse_products_under_bf16_autocast_only(monkeypatch, autocast):
    """A DSA layer's indexer loss asks the scores' backward for 16-bit products exactly where its projections compute
    in bf16 (autocast), so their backward rounds q's and k's gradients to bf16 anyway."""
    from hybridlm.layers.context import SequenceContext
    from hybridlm.ops import indexer_triton
    from tests.helpers import MLA_TINY
    from tests.layers.test_mixers import make

    seen = []
    real = indexer_triton._scores_bwd_op
    monkeypatch.setattr(indexer_triton, "_scores_bwd_op", lambda *a: seen.append(a[-1]) or real(*a))
    config = tiny_config("D", **{**MLA_TINY, "dsa_indexer_topk": 3, "dsa_indexer_loss_coeff": 0.5})
    layer = make(DSA, config, seed=1).to(DEV)
    x = torch.randn(1, 7, config.hidden_size, device=DEV)
    aux = []
    with use_kernels("auto,index_scores=triton"), torch.autocast(DEV, torch.bfloat16, enabled=autocast):
        layer(x, SequenceContext(position_ids=torch.arange(7, device=DEV)[None]), aux)
        aux[0].backward()  # (within use_kernels: the checkpointed chunks run again on the same path)
    assert seen and set(seen) == {autocast}


def target_inputs(B, T, S, H, D, diagonal, seed, broadcast=False, dtype=torch.float32):
    """q (B, T, H, D) as a slice of a wider tensor, k (B, S, H, D) (logits of a few units, as attention's are), and a
    valid mask (B or 1, T, S): random keys, none after the diagonal, key 0 always (so every row has one), except one
    row with none at all."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D + 3, generator=g) * 1.5)[..., :D].to(dtype)
    k = torch.randn(B, S, H, D, generator=g).to(dtype)
    valid = torch.rand(1 if broadcast else B, T, S, generator=g) < 0.6
    if diagonal is not None:
        valid &= torch.arange(S)[None, :] <= torch.arange(T)[:, None] + diagonal
    valid[..., 0] = True
    valid[0, min(1, T - 1)] = False
    return q.to(DEV), k.to(DEV), valid.to(DEV)


def test_target_reference_is_each_heads_softmax_averaged():
    """The reference against a row-by-row float64 computation: each head's softmax over the query's valid keys,
    averaged over the heads; zero at keys not valid."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, 9, 3, 5, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 6, 9, generator=g) < 0.5
    valid[..., 3] = True
    got = indexer_target_reference(q, k, valid, 0.7)
    assert got.dtype == torch.float64
    for b in range(2):
        for t in range(6):
            keys = valid[b, t].nonzero().flatten()
            want = torch.zeros(9, dtype=torch.float64)
            want[keys] = torch.stack([(0.7 * k[b, keys, h] @ q[b, t, h]).softmax(0) for h in range(3)]).mean(0)
            assert torch.allclose(got[b, t], want, rtol=1e-12, atol=1e-15)


@runs_triton_kernels
@pytest.mark.parametrize(
    "shape",
    # ragged tiles; MLA's head size (three slices of 64); d < 16; one key; several query and key tiles
    [(2, 37, 53, 3, 20), (1, 70, 130, 2, 192), (2, 5, 3, 4, 8), (1, 9, 1, 2, 16), (1, 150, 140, 3, 10)],
)
@pytest.mark.parametrize("diagonal", [None, 0, 29])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_kernel_matches_float64(shape, diagonal, dtype):
    """The kernels' target within 4x the float32 reference's error of float64 (and 1e-6), both fed the same inputs
    (bf16 ones too: their products are exact in float32), zero at keys not valid and in a row without any (the
    reference's NaN there is left out); broadcast masks; the kernels' path recorded."""
    B, T, S, H, D = shape
    q, k, valid = target_inputs(B, T, S, H, D, diagonal, seed=sum(shape), broadcast=B > 1, dtype=dtype)
    reset_paths()
    with use_kernels("triton"):
        got = indexer_target(q, k, valid, D**-0.5, diagonal)
    assert paths_used() == {"index_target": "triton"}
    assert got.dtype == torch.float32 and got.shape == (B, T, S) and not got.requires_grad
    valid = valid.expand(B, T, S)
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
    rows = valid.any(-1)
    assert not rows.all() and torch.equal(got[~rows], torch.zeros_like(got[~rows]))
    exact = indexer_target_reference(q.double(), k.double(), valid, D**-0.5)[rows]
    ref32 = indexer_target_reference(q, k, valid, D**-0.5)[rows]
    err, err32 = rel_err(got[rows], exact), rel_err(ref32, exact)
    assert err <= max(4 * err32, 1e-6), f"kernel {err:.3g} against float32 reference {err32:.3g}"


@runs_triton_kernels
def test_target_kernel_reads_queries_and_keys_of_two_dtypes():
    """bf16 queries with float32 keys: both read as float32, as the reference computes them."""
    q, k, valid = target_inputs(2, 21, 33, 3, 24, 0, seed=7)
    q = q.bfloat16()
    with use_kernels("triton"):
        got = indexer_target(q, k, valid, 0.2, 0)
    rows = valid.any(-1)
    exact = indexer_target_reference(q.double(), k.double(), valid, 0.2)[rows]
    err, err32 = rel_err(got[rows], exact), rel_err(indexer_target_reference(q, k, valid, 0.2)[rows], exact)
    assert err <= max(4 * err32, 1e-6), f"kernel {err:.3g} against float32 reference {err32:.3g}"


def ties_and_masks(B, T, S, levels, seed, broadcast):
    """Scores on a few levels (many ties, -0.0 beside 0.0) and an allowed mask (B or 1, T, S) with an empty row and
    a full one."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-levels, levels + 1, (B, T, S), generator=g).float() * 0.25).to(DEV)
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g).to(DEV) < 0.5, -0.0, 0.0)
    allowed = (torch.rand(1 if broadcast else B, T, S, generator=g) < 0.6).to(DEV)
    allowed[:, 0] = False
    allowed[:, -1] = True
    return scores, allowed


@runs_triton_kernels
@pytest.mark.parametrize("S", [1, 7, 64, 1100])  # one key; one block; two blocks (the kernel's 1024), ragged
@pytest.mark.parametrize("broadcast", [False, True])
def test_topk_kernel_keeps_the_sorted_set_exactly(S, broadcast):
    """Ties to the earlier key as the stable sort keeps them, rows with no allowed key, fewer than k, k >= S."""
    scores, allowed = ties_and_masks(2, 6, S, levels=3, seed=S, broadcast=broadcast)
    for k in sorted({1, 2, max(1, S // 3), S, S + 5}):
        want = select_topk_reference(scores, allowed, k)
        reset_paths()
        with use_kernels("triton"):
            got = select_topk(scores, allowed, k)
        assert paths_used() == {"index_topk": "triton"}
        assert torch.equal(got, want), f"S={S} k={k}: {(got != want).sum().item()} keys differ"
        counts = got.sum(-1)
        assert torch.equal(counts, allowed.expand_as(got).sum(-1).clamp(max=k))


@runs_triton_kernels
@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 5),
    S=st.integers(1, 90),
    k=st.integers(1, 100),
    spread=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_topk_kernel_property(T, S, k, spread, seed):
    """Any scores (tiny, huge, all equal, negative, bf16-rounded) and masks: exactly the stable sort's set."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(1, T, S, generator=g) * spread).bfloat16().float().to(DEV)
    allowed = (torch.rand(1, T, S, generator=g) < 0.7).to(DEV)
    with use_kernels("triton"):
        got = select_topk(scores, allowed, k)
    assert torch.equal(got, select_topk_reference(scores, allowed, k))


@runs_triton_kernels
def test_topk_kernel_reads_strided_bf16_scores():
    scores, allowed = ties_and_masks(1, 4, 40, levels=50, seed=1, broadcast=False)
    wide = torch.zeros(1, 4, 80, device=DEV, dtype=torch.bfloat16)
    wide[..., ::2] = scores.bfloat16()
    with use_kernels("triton"):
        got = select_topk(wide[..., ::2], allowed, 9)
    assert torch.equal(got, select_topk_reference(scores.bfloat16().float(), allowed, 9))


@runs_triton_kernels
@pytest.mark.parametrize("docs", [False, True])
def test_dsa_layer_selects_alike_on_the_kernels(docs):
    """A DSA layer's forward on the two kernels (causal scores, top-k) against the torch path: the same outputs; its
    cached decoding (a prefill, then one token at a time: scores without a diagonal) too; the kernels' paths
    recorded."""
    from hybridlm.infer.cache import InferenceCache
    from hybridlm.layers.context import SequenceContext, positions_in_segment
    from tests.helpers import MLA_TINY
    from tests.layers.test_mixers import make

    config = tiny_config("D", **{**MLA_TINY, "dsa_indexer_topk": 5})
    layer = make(DSA, config, seed=2).to(DEV)
    L, prefill = 23, 11
    seq_idx = (torch.arange(L, device=DEV) >= 9).long().expand(2, L) if docs else None
    pos = positions_in_segment(seq_idx) if docs else torch.arange(L, device=DEV).expand(2, L)
    x = torch.randn(2, L, config.hidden_size, device=DEV)
    kernels = "auto,index_scores=triton,index_topk=triton"
    with torch.no_grad():
        with use_kernels("torch"):
            want = layer(x, SequenceContext(position_ids=pos, seq_idx=seq_idx))
        reset_paths()
        with use_kernels(kernels):
            got = layer(x, SequenceContext(position_ids=pos, seq_idx=seq_idx))
        assert paths_used()["index_scores"] == paths_used()["index_topk"] == "triton"
        assert_rel_close(got, want, 1e-5, "DSA output on the indexer kernels")
        if docs:
            return
        cache = InferenceCache([layer], 2, L, DEV, torch.float32)
        outs = []
        with use_kernels(kernels):
            for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, L)]:
                outs.append(
                    layer(x[:, start:end], SequenceContext(position_ids=cache.position_ids(end - start), cache=cache))
                )
                cache.advance(end - start)
    assert_rel_close(torch.cat(outs, dim=1), want, 1e-5, "cached decoding on the indexer kernels")


@pytest.mark.gpu
def test_kernels_at_deepseek_sizes_on_gpu():
    """On CUDA at 4096 keys, 64 index heads of 128 (DeepSeek-V3.2's), top-k 2048: the causal scores within twice the
    float32 reference's error of float64 (first 256 queries), and the top-k of the kernel's scores exactly the stable
    sort's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    L, n, d = 4096, 64, 128
    q, w, k = indexer_inputs(1, L, L, n, d, seed=4, device="cuda")
    q, k, w = q.bfloat16().float(), torch.nn.functional.layer_norm(k.bfloat16().float(), (d,)), w * (n * d) ** -0.5
    reset_paths()
    got = index_scores(q, w, k, 0)
    assert paths_used() == {"index_scores": "triton"}
    c = 256
    exact = index_scores_reference(q[:, :c].double(), w[:, :c].double(), k.double(), 0)
    finite = exact.isfinite()
    assert torch.equal(got[:, :c].isfinite(), finite)
    err = rel_err(got[:, :c][finite], exact[finite])
    err32 = rel_err(index_scores_reference(q[:, :c], w[:, :c], k, 0)[finite], exact[finite])
    assert err <= 2 * err32, f"kernel {err:.3g} against float32 reference {err32:.3g}"
    allowed = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()[None]
    kept = select_topk(got, allowed, 2048)
    assert paths_used()["index_topk"] == "triton"
    assert torch.equal(kept, select_topk_reference(got, allowed, 2048))


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16])
def test_scores_gradients_at_deepseek_sizes_on_gpu(grad_dtype):
    """On CUDA at 4096 keys, 64 index heads of 128, the last 256 queries as the loss's last chunk runs them (its
    diagonal given): dw, and dq and dk for float32 gradients, within 4x the float32 reference's error of float64; for
    gradients that go on in bf16 (their products in TF32), dq and dk as close as the reference's rounded to bf16.

    The ReLU's gradient jumps where a product crosses 0, and of these 67M products any rounding puts a few near 0 on
    the other side: with every gate in play dq was 5e-4 off float64 for the float32 reference and 7e-3 for the kernel
    (its gates in ``tf32x3``; measured on an H100), one term of 4096 moved each. So the scores' gradient is zeroed
    where some head's product lies within 1e-5 of |q| |k| of 0 (under 2 % of the pairs), and the test measures the
    products' precision."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    L, n, d, c = 4096, 64, 128, 256
    q, w, k = indexer_inputs(1, c, L, n, d, seed=5, device="cuda")
    q, k, w = q.bfloat16().float(), torch.nn.functional.layer_norm(k.bfloat16().float(), (d,)), w * (n * d) ** -0.5
    g = torch.randn(1, c, L, device="cuda", generator=torch.Generator("cuda").manual_seed(2)) * 1e-3
    p = torch.einsum("bthd,bsd->bths", q.double(), k.double())
    scale = q.double().norm(dim=-1)[..., None] * k.double().norm(dim=-1)[:, None, None, :]
    near = (p.abs() < 1e-5 * scale).any(2)  # (B, T, S): a gate some rounding may flip (tf32x3: ~5e-7 of scale)
    del p, scale
    assert 0 < near.float().mean() < 0.02
    g = g.masked_fill(near, 0.0)
    exact = scores_grads(q, w, k, g, L - c, torch.float64, "torch")
    ref32 = scores_grads(q, w, k, g, L - c, torch.float32, "torch")
    reset_paths()
    got = scores_grads(q, w, k, g, L - c, torch.float32, "auto", grad_dtype)
    assert paths_used() == {"index_scores": "triton"}
    assert_scores_grads_close(got, exact, ref32, grad_dtype, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_target_kernel_at_mla_sizes_on_gpu(sparse):
    """On CUDA at 4096 keys, 16 heads of 192 (MLA's 128 + 64) in bf16, in chunks of 1024 queries each given its
    causal diagonal, over documents (the dense loss) or a top-2048 selection in them (the sparse loss): within twice
    the float32 reference's error of float64, both fed the same bf16 q and k."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    L, H, D, chunk = 4096, 16, 192, 1024
    g = torch.Generator("cuda").manual_seed(3)
    q, k = (torch.randn(1, L, H, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    doc = torch.arange(L, device="cuda") * 3 // L  # three documents
    valid = (torch.ones(L, L, dtype=torch.bool, device="cuda").tril() & (doc[:, None] == doc[None, :]))[None]
    if sparse:
        valid = select_topk(torch.rand(1, L, L, device="cuda", generator=g), valid, 2048)
    reset_paths()
    got = torch.cat(
        [indexer_target(q[:, a : a + chunk], k, valid[:, a : a + chunk], D**-0.5, a) for a in range(0, L, chunk)], 1
    )
    assert paths_used()["index_target"] == "triton"
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
    errs = []
    for a in range(0, L, chunk):  # (float64 logits of every head: 2 GiB a chunk)
        exact = indexer_target_reference(q[:, a : a + chunk].double(), k.double(), valid[:, a : a + chunk], D**-0.5)
        ref32 = indexer_target_reference(q[:, a : a + chunk], k, valid[:, a : a + chunk], D**-0.5)
        errs.append((rel_err(got[:, a : a + chunk], exact), rel_err(ref32, exact)))
    err, err32 = max(e for e, _ in errs), max(e for _, e in errs)
    assert err <= 2 * err32, f"kernel {err:.3g} against float32 reference {err32:.3g}"


@requires_triton
def test_float32_products_fall_back_to_ieee_before_ampere(monkeypatch):
    """Before sm_80 a GPU has no TF32 tensor cores: the indexer's float32 products (scores, and the loss's target of
    float32 q and k) are asked for in IEEE float32 there, tf32x3 from Ampere on; the CPU (the interpreter) keeps
    the setting."""
    from hybridlm.ops import indexer_triton

    for capability, want in (((7, 5), "ieee"), ((8, 0), "tf32x3"), ((9, 0), "tf32x3")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert indexer_triton._precision(torch.device("cuda", 0)) == want, capability
        assert indexer_triton._precision(torch.device("cuda", 0), "tf32") == ("ieee" if want == "ieee" else "tf32")
    assert indexer_triton._precision(torch.device("cpu")) == indexer_triton.INPUT_PRECISION
