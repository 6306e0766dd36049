"""Top-p filtering: the sorted reference against the definition in float64, the Triton kernel against the reference
(Triton's interpreter on CPU, compiled on the GPU), and the kernel at a real vocabulary in a CUDA graph."""

import pytest
import torch

from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.top_p import top_p_filter, top_p_filter_reference
from tests.helpers import runs_triton_kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def mass_before(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B, V) float64: each token's probability mass before it in top-p's order (decreasing logits, the
    lower id first among equal ones), summed directly, without a sort."""
    x = logits.double()
    p = x.softmax(-1)
    ids = torch.arange(x.shape[-1], device=x.device)
    # ahead[b, i, j]: token j comes before token i
    ahead = (x[:, None, :] > x[:, :, None]) | ((x[:, None, :] == x[:, :, None]) & (ids[None, :] < ids[:, None]))
    return (ahead * p[:, None, :]).sum(-1)


def kept_by_definition(logits: torch.Tensor, top_p: float, margin: float) -> torch.Tensor:
    """(B, V) bool: the tokens top-p keeps, from :func:`mass_before`; asserts that no token's mass before it lies
    within ``margin`` of ``top_p`` (where float32 sums in another order may decide otherwise)."""
    before = mass_before(logits)
    finite = logits.isfinite()
    gap = (before - top_p).abs()[finite]
    assert gap.numel() == 0 or gap.min() > margin, f"a token's mass before it is within {margin} of top_p"
    kept = (before < top_p) & finite
    kept[torch.arange(len(logits)), logits.double().argmax(-1)] = True  # (the first token always)
    return kept


def rows(b: int, v: int, scale: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """(b, v) logits rounded to bf16 (ties, as a model's logits have them), on DEV."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, generator=g) * scale).bfloat16().to(dtype).to(DEV)


def top_p_clear_of(logits: torch.Tensor, wanted: float, margin: float) -> float:
    """A top_p near ``wanted`` that no row's mass before a token comes within ``margin`` of."""
    before = mass_before(logits).flatten().sort().values
    for step in range(200):
        p = wanted + (step // 2 + 1) * margin * 3 * (1 if step % 2 else -1) if step else wanted
        if 0 < p < 1 and (before - p).abs().min() > margin:
            return p
    raise AssertionError("no top_p clear of the masses")


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])
def test_reference_keeps_the_defined_set(scale):
    """The sorted reference in float64 keeps each token whose mass before it (decreasing logits, lower id first among
    ties) is below top_p: nearly all tied at scale 0.05, spread at 6."""
    x = rows(4, 300, scale, seed=1, dtype=torch.float64)
    for wanted in (0.1, 0.5, 0.9, 0.99):
        top_p = top_p_clear_of(x, wanted, 1e-9)
        kept = top_p_filter_reference(x, top_p).isfinite()
        assert torch.equal(kept, kept_by_definition(x, top_p, 1e-9)), (scale, top_p)


@pytest.fixture(params=["few rows", "many rows"])
def ways(request, monkeypatch):
    """The kernel's cuts a pass: as for a few rows (16), or as for many (4) at these small sizes."""
    if request.param == "many rows":
        from hybridlm.ops import top_p_triton

        monkeypatch.setattr(top_p_triton, "MANY_LOGITS", 0)
    return request.param


@runs_triton_kernels
@pytest.mark.parametrize(
    "b,v,scale",
    [(1, 1, 1.0), (3, 7, 1.0), (5, 300, 0.05), (2, 700, 2.0), (1, 4096 + 37, 1.0)],  # the last: several segments
)
def test_kernel_keeps_the_references_set(b, v, scale, ways):
    x = rows(b, v, scale, seed=v)
    for wanted in (1e-30, 0.3, 0.9, 0.999):
        tiny = wanted < 1e-3  # (only the first token is kept: the mass before it, 0, is below top_p)
        top_p = wanted if tiny else top_p_clear_of(x, wanted, 1e-5)
        reset_paths()
        with use_kernels("triton"):
            out = top_p_filter(x, top_p)
        assert paths_used() == {"top_p": "triton"}
        kept = kept_by_definition(x, top_p, 0.0 if tiny else 1e-5)
        assert torch.equal(out.isfinite(), kept), (b, v, top_p)
        assert torch.equal(out[kept], x[kept])  # the kept logits unchanged, the others -inf
        assert (out[~kept] == float("-inf")).all()


@runs_triton_kernels
def test_kernel_splits_a_tied_boundary_by_id_across_segments(ways):
    """Seven tokens tie at the boundary, spread over the row's four segments: top_p falls after two and a half of
    them, so the three with the lowest ids are kept, wherever they lie."""
    v = 2048
    x = torch.full((1, v), -30.0)
    x[0, 1500] = 2.0
    tied = [1900, 40, 1024, 700, 1030, 2047, 300]
    x[0, tied] = 1.0
    x = x.to(DEV)
    p = x.double().softmax(-1)[0]
    top_p = float(p[1500] + 2.5 * p[40])
    with use_kernels("triton"):
        out = top_p_filter(x, top_p)
    assert out[0].isfinite().nonzero().flatten().tolist() == [40, 300, 700, 1500]
    ref = top_p_filter_reference(x, top_p)
    assert torch.equal(out.isfinite(), ref.isfinite())


@runs_triton_kernels
def test_kernel_on_dropped_tokens_strided_rows_and_bf16(ways):
    """Rows with -inf (top-k's or min-p's dropped tokens), one with a single finite token and one of -inf only, read
    through a row stride wider than the vocabulary, in bf16 (returned in bf16)."""
    wide = rows(4, 600, 2.0, seed=7, dtype=torch.bfloat16)
    x = wide[:, 50:550]
    x[0, ::3] = float("-inf")
    x[1, :] = float("-inf")
    x[1, 123] = -4.0
    x[2, :] = float("-inf")
    assert x.stride(0) == 600
    top_p = top_p_clear_of(x[[0, 3]], 0.8, 1e-4)
    with use_kernels("triton"):
        out = top_p_filter(x, top_p)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out.isfinite(), top_p_filter_reference(x.double(), top_p).isfinite())
    assert out[1].isfinite().nonzero().flatten().tolist() == [123]
    assert not out[2].isfinite().any()
    with use_kernels("triton"):
        assert top_p_filter(x[:0], 0.5).shape == (0, 500)


def test_the_passes_narrow_the_keys_to_one():
    """WAYS cuts a pass part the keys left in WAYS + 1 pieces: from the keys between -inf's and +inf's, passes(WAYS)
    passes leave one, and the pass before the last at most WAYS + 1, so the last pass's cuts hold every key left."""
    pytest.importorskip("triton")
    from hybridlm.ops import top_p_triton as k

    for ways, n in ((k.WAYS_FEW_ROWS, 8), (k.WAYS_MANY_ROWS, 14)):
        width, widths = k.KEY_HI - k.KEY_LO, []
        for _ in range(k.passes(ways)):
            width = -(-width // (ways + 1))
            widths.append(width)
        assert len(widths) == n and widths[-1] == 1 and widths[-2] <= ways + 1
    bits = torch.tensor([float("-inf"), float("inf")]).view(torch.int32).tolist()
    assert [(bits[0] ^ 0x7FFFFFFF) - 1, bits[1] + 1] == [k.KEY_LO, k.KEY_HI]  # (a negative float's lower bits flipped)


def test_dispatch_runs_the_reference_off_cuda_and_for_float64():
    x = torch.randn(2, 50)
    reset_paths()
    top_p_filter(x, 0.5)
    assert paths_used() == {"top_p": "torch"}
    if torch.cuda.is_available():
        reset_paths()
        top_p_filter(x.cuda().double(), 0.5)
        assert paths_used() == {"top_p": "torch"}
        top_p_filter(x.cuda(), 0.5)
        assert paths_used() == {"top_p": "triton"}
    with pytest.raises(ValueError, match=r"\(batch, vocab\)"):
        top_p_filter(x[0], 0.5)


def assert_a_top_p_prefix(out: torch.Tensor, x: torch.Tensor, top_p: float, tol: float) -> int:
    """``out`` keeps, in each row of ``x``, a prefix of top-p's order whose end differs from the float64 set's only
    over tokens whose mass before them lies within ``tol`` of ``top_p``; returns how many rows differ at all."""
    order = x.double().sort(dim=-1, descending=True, stable=True)
    probs = order.values.softmax(-1)
    before = probs.cumsum(-1) - probs
    kept = out.isfinite().gather(1, order.indices).long()
    assert (kept[:, 1:] <= kept[:, :-1]).all(), "the kept tokens are not the most likely ones"
    n = kept.sum(-1)
    n_ref = ((before < top_p).long().sum(-1)).clamp(min=1)
    ids = torch.arange(x.shape[-1], device=x.device)
    between = (ids >= torch.minimum(n, n_ref)[:, None]) & (ids < torch.maximum(n, n_ref)[:, None])
    assert ((before - top_p).abs() <= tol)[between].all(), "a kept set ends where float64's clearly does not"
    return int((n != n_ref).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 64])
def test_gpu_kernel_at_a_real_vocabulary_in_a_cuda_graph(b):
    """A 131,072 vocabulary, the sampler's shifted float32 logits from bf16 ones, peaked rows (a trained model's) and
    flat ones (a random model's): the kernel's set ends where float64's does, but for tokens whose mass before them is
    within 1e-5 of top_p (a flat row's probabilities are 8e-6 apart), as the float32 reference's does; and a CUDA
    graph of it replays on new logits what an eager call gives."""
    v = 131072
    g = torch.Generator(device="cuda").manual_seed(b)
    base = torch.randn(b, v, device="cuda", generator=g)
    x = torch.where(torch.arange(b, device="cuda")[:, None] % 2 == 0, base * 4, base * 0.5)
    x = x.bfloat16().float()
    x = x - x.amax(-1, keepdim=True)
    top_p = 0.9
    reset_paths()
    out = top_p_filter(x, top_p)
    assert paths_used() == {"top_p": "triton"}
    differ = assert_a_top_p_prefix(out, x, top_p, 1e-5)
    differ_ref = assert_a_top_p_prefix(top_p_filter_reference(x, top_p), x, top_p, 1e-5)
    print(f"rows whose kept set differs from float64's: kernel {differ}, float32 reference {differ_ref} of {b}")
    static = x.clone()
    graph = torch.cuda.CUDAGraph()
    top_p_filter(static, top_p)  # (compiled before the capture)
    with torch.cuda.graph(graph):
        replayed = top_p_filter(static, top_p)
    static.copy_(x.flip(0))
    graph.replay()
    assert torch.equal(replayed, top_p_filter(x.flip(0), top_p))


@pytest.mark.gpu
def test_gpu_eager_calls_of_a_few_rows_replay_a_graph_of_the_launches():
    """An eager call of up to GRAPHED_LOGITS logits replays a graph kept for its shape, its rows rounded up to a power
    of two: the launches' output, for another top_p, other logits and fewer rows too, and a returned tensor the next
    call does not write over."""
    from hybridlm.ops import top_p_triton as k

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 50000, device="cuda", generator=g) * 3
    k._graphs.clear()
    first = k.top_p_filter_triton(x, 0.9)
    assert list(k._graphs) == [(x.shape, x.dtype, x.device)]
    direct = torch.empty_like(x)
    k._launch(x, torch.full((), 0.9, device="cuda"), direct)
    assert torch.equal(first, direct)
    kept = first.clone()
    y = x.flip(0).contiguous()
    second = k.top_p_filter_triton(y, 0.5)
    k._launch(y, torch.full((), 0.5, device="cuda"), direct)
    assert torch.equal(second, direct) and len(k._graphs) == 1
    assert torch.equal(first, kept)  # (not written over by the next call)
    third = k.top_p_filter_triton(x[1:], 0.9)  # (three rows: the four-row graph)
    assert torch.equal(third, kept[1:]) and len(k._graphs) == 1
    for rows in range(1, k.KEPT_GRAPHS + 2):
        k.top_p_filter_triton(x[:1].expand(rows, -1), 0.9)
    assert len(k._graphs) == k.KEPT_GRAPHS
