"""Document block masks: the compiled builder against eager ``create_block_mask`` (CPU tensors)."""

import pytest
import torch

from hybridlm.ops import attention
from hybridlm.ops.attention import document_block_mask

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def eager_mask(seq_idx: torch.Tensor):
    B, L = seq_idx.shape

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (seq_idx[b, q] == seq_idx[b, kv])

    return flex.create_block_mask(mask_mod, B, None, L, L, device=seq_idx.device)


def block_tensors(mask) -> list[torch.Tensor]:
    return [t for t in mask.as_tuple() if isinstance(t, torch.Tensor)]


def test_compiled_document_block_mask_equals_eager_and_is_not_rebuilt_per_batch():
    from torch._dynamo.utils import counters

    B, L = 2, 384  # three blocks of 128 per row
    first = torch.zeros(B, L, dtype=torch.long)
    first[0, 100:] = 1
    first[0, 300:] = 2
    first[1, 200:] = 1
    second = first.clone()
    second[1] = 0  # another layout, same shape: row 1 one document (full blocks below the diagonal)
    got = document_block_mask(first)
    assert flex.create_block_mask in attention._COMPILED  # built by the compiled builder, not eagerly
    frames = counters["frames"]["ok"]
    got2 = document_block_mask(second)
    assert counters["frames"]["ok"] == frames  # the second batch reuses the compiled builder
    for mine, ref in ((got, eager_mask(first)), (got2, eager_mask(second))):
        a, b = block_tensors(mine), block_tensors(ref)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(block_tensors(got), block_tensors(got2)))


def test_flex_attention_under_the_document_block_mask_equals_the_dense_mask(monkeypatch):
    """Position by position, not only block by block: within the diagonal blocks of 128 the block mask
    still allows exactly what ``document_causal_mask`` allows (each query sees itself, no later key,
    nothing of another document), so FlexAttention under it is SDPA under the dense mask."""
    import warnings

    from hybridlm.ops.attention import document_causal_mask

    monkeypatch.setitem(attention._COMPILED, flex.create_block_mask, flex.create_block_mask)  # eager: fast on CPU
    seq_idx = torch.zeros(2, 128, dtype=torch.long)
    seq_idx[0, 50:] = 1
    seq_idx[0, 90:] = 2
    seq_idx[1, 1:] = 1  # a one-token document at the start
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 128, 16, generator=gen)
    k, v = (torch.randn(2, 2, 128, 16, generator=gen) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not the fused kernel
        got = flex.flex_attention(q, k, v, block_mask=document_block_mask(seq_idx), enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=document_causal_mask(seq_idx), enable_gqa=True
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def random_selection(B: int, L: int, seed: int) -> torch.Tensor:
    """(B, L, L) bool: causal, within three documents a row, and about half the keys each query may see dropped (as a
    top-k drops them), every query keeping itself."""
    from hybridlm.ops.attention import document_causal_mask

    gen = torch.Generator().manual_seed(seed)
    seq_idx = torch.zeros(B, L, dtype=torch.long)
    seq_idx[:, L // 3 :] += 1
    seq_idx[0, L // 2 :] += 1
    allowed = document_causal_mask(seq_idx)[:, 0]
    keep = torch.rand(B, L, L, generator=gen) < 0.5
    return allowed & (keep | torch.eye(L, dtype=torch.bool))


def test_compiled_selection_block_mask_equals_eager():
    """The selection's block mask (DSA's top-k on the GPU) from the compiled builder is the eager one's, and a second
    selection of the same shape reuses the compilation."""
    from torch._dynamo.utils import counters

    from hybridlm.ops.attention import selection_block_mask

    first, second = random_selection(2, 384, seed=0), random_selection(2, 384, seed=1)
    got = selection_block_mask(first)
    frames = counters["frames"]["ok"]
    got2 = selection_block_mask(second)
    assert counters["frames"]["ok"] == frames
    for mine, sel in ((got, first), (got2, second)):
        ref = flex.create_block_mask(lambda b, h, q, kv, sel=sel: sel[b, q, kv], 2, None, 384, 384, device=sel.device)
        a, b = block_tensors(mine), block_tensors(ref)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert block_tensors(got)[0].sum() < 2 * 3 * 3  # (key blocks above the diagonal are skipped)


def test_flex_attention_under_the_selection_block_mask_equals_the_dense_mask(monkeypatch):
    """Query by query within the blocks: FlexAttention under the selection's block mask attends exactly the selected
    keys, as SDPA under the dense mask does (masked_attention's two paths), with MLA's value heads of another width
    and its own scale."""
    import warnings

    from hybridlm.ops.attention import masked_attention, selection_block_mask

    monkeypatch.setitem(attention._COMPILED, flex.create_block_mask, flex.create_block_mask)  # eager: fast on CPU
    selected = random_selection(2, 128, seed=2)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 128, 24, generator=gen) for _ in range(2))
    v = torch.randn(2, 3, 128, 16, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not the fused kernel
        got = flex.flex_attention(q, k, v, block_mask=selection_block_mask(selected), scale=0.3)
    torch.testing.assert_close(got, masked_attention(q, k, v, selected, scale=0.3), rtol=1e-5, atol=1e-5)


def test_fused_sdpa_takes_aligned_heads_only():
    q, v = torch.empty(1, 1, 4, 16), torch.empty(1, 1, 4, 8)
    assert attention.fused_sdpa_takes(q, v)
    assert not attention.fused_sdpa_takes(torch.empty(1, 1, 4, 10), v)  # MLA_TINY's query heads
    assert not attention.fused_sdpa_takes(q, torch.empty(1, 1, 4, 5))  # and its value heads
    assert not attention.fused_sdpa_takes(q.double(), v.double())


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [(10, 5), (16, 8), (64, 32)])
def test_causal_attention_of_any_head_sizes_on_gpu(dims):
    """Rows without documents on CUDA in bf16: heads no fused SDPA kernel takes (MLA_TINY's 10 and 5) run SDPA's math
    backend, recorded as ``sdpa_math`` (they failed with "No available kernel"), the others a fused kernel (``sdpa``);
    each against float64 fed the same bf16 inputs (the output's bf16 rounding is about 4e-3 of its values)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from hybridlm.ops.dispatch import paths_used, reset_paths

    d, dv = dims
    gen = torch.Generator("cuda").manual_seed(1)
    q, k = (torch.randn(2, 4, 300, d, device="cuda", generator=gen) for _ in range(2))
    v = torch.randn(2, 4, 300, dv, device="cuda", generator=gen)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    reset_paths()
    got = attention.causal_attention(q, k, v, scale=0.3)
    assert paths_used()["attention"] == ("sdpa" if d % 8 == 0 and dv % 8 == 0 else "sdpa_math")
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, scale=0.3
    )
    assert got.shape == (2, 4, 300, dv) and (got.double() - want).abs().max() < 2e-2
