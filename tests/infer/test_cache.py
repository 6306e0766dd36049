"""Cached decoding against the no-cache forward, for every mixer kind, fused blocks and MTP patterns."""

import collections
import copy
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hybridlm import HybridLM, ModelConfig, generate
from hybridlm.infer import speculative
from hybridlm.infer.cache import InferenceCache
from hybridlm.infer.generate import left_pad, prefill
from hybridlm.infer.speculative import _Depths
from hybridlm.layers.cache import KVState
from hybridlm.ops.dispatch import paths_used, reset_paths
from tests.helpers import MLA_TINY, rel_err, tiny_config

PATTERNS = ["M", "G", "*", "-", "E", "MG*-E", "[M-]G[*E]", "[GE]M*/[*-]", "M[*-]/G/G"]
PROMPTS = [[5, 17, 3, 9, 40, 2, 11], [1], list(range(3, 26))]
#: CPU (torch step and scan), and CUDA (the Triton step kernels on strided window slices, the
#: Triton scan), with the absolute tolerance of each: tf32x3 products on the GPU.
DEVICES = [pytest.param("cpu", 1e-5, id="cpu"), pytest.param("cuda", 1e-4, id="cuda", marks=pytest.mark.gpu)]


def model_for(pattern: str, **kw) -> HybridLM:
    # rope makes attention position-dependent, so a wrong position in the cache shows.
    mla = MLA_TINY if "+" in pattern or "D" in pattern else {}  # tiny latent sizes (test_cache_mla.py)
    return HybridLM(tiny_config(pattern, position_embedding="rope", **{**mla, **kw}), seed=1).eval()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_greedy_equals_the_no_cache_loop(pattern):
    model = model_for(pattern)
    for prompt in PROMPTS:
        assert generate(model, prompt, max_new_tokens=12) == generate(model, prompt, 12, use_cache=False)


def assert_prefill_then_steps_match(model, static: bool) -> None:
    """A prefill of 13 positions, then 8 one-token steps (eager or static), in a buffer of 29: the full forward's
    logits to 1e-5."""
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = InferenceCache.for_model(model, 2, 29)
    cache.static = static
    got = [model(ids[:, :13], cache=cache).logits]
    for t in range(13, 21):
        got.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_steps_gives_the_full_forward_logits(pattern, static):
    """Both decode steps: eager (attention over the positions written) and static (the whole buffer,
    masked: what a CUDA graph replays), in a buffer longer than the sequence."""
    model = model_for(pattern)
    assert_prefill_then_steps_match(model, static)


@pytest.mark.parametrize("pattern", [*PATTERNS, "+D"])
def test_an_empty_window_adds_nothing_to_the_cache(pattern):
    """Zero new tokens give (B, 0, V) logits, as the uncached forward does (Mamba2's stepped path crashed),
    and leave the states as they were."""
    model = model_for(pattern)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = InferenceCache.for_model(model, 2, 12)
    model(ids[:, :8], cache=cache)
    assert model(ids[:, :0], cache=cache).logits.shape == (2, 0, 97)
    torch.testing.assert_close(model(ids[:, 8:], cache=cache).logits, full[:, 8:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("pattern", ["M*G-", "+D-"])
def test_a_cache_of_another_dtype_serves_every_mixer(pattern, static):
    """A bf16 cache under a float32 model (InferenceCache's ``dtype``): each mixer reads its state back in
    the model's dtype (attention compared a float32 query with bf16 keys and failed)."""
    model = model_for(pattern)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = InferenceCache.for_model(model, 2, 12, dtype=torch.bfloat16)
    cache.static = static
    got = torch.cat(
        [model(ids[:, :6], cache=cache).logits, *(model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 9))], 1
    )
    torch.testing.assert_close(got, full, rtol=0, atol=1e-3)  # keys and values rounded to bf16 (seen: 1.4e-4)


def poison_unwritten(cache: InferenceCache) -> int:
    """Fill every attention buffer's positions from ``cache.offset`` on with NaN; returns how many buffers."""
    n = 0
    for state in cache.states.values():
        for name, buf in vars(state).items():
            if name in ("k", "v"):  # (B, kv_heads, S, d)
                buf[:, :, cache.offset :] = float("nan")
            elif name in ("c_kv", "k_pe", "index_k") and buf is not None:  # (B, S, d)
                buf[:, cache.offset :] = float("nan")
            n += name in ("k", "v", "c_kv", "k_pe", "index_k") and buf is not None
    return n


@pytest.mark.parametrize("pattern", ["*", "[M-]G[*E]", "*/[*-]"])
@pytest.mark.parametrize("padded", [False, True])
def test_an_eager_decode_step_reads_only_the_positions_written(pattern, padded):
    """Eager decoding attends over the filled prefix, not the preallocated rest: NaN there changes nothing,
    so a step's cost follows the tokens produced, not max_new_tokens."""
    model = model_for(pattern)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    caches = [InferenceCache.for_model(model, 2, 64) for _ in range(2)]
    for cache in caches:
        if padded:
            cache.set_padding(torch.tensor([[False] * 4 + [True] * 5, [True] * 9]))
        model(ids, cache=cache)
    assert poison_unwritten(caches[1]) > 0
    for t in range(5):
        step = ids[:, t : t + 1]
        clean, poisoned = (model(step, cache=c).logits for c in caches)
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunked_prefill_equals_one_shot_prefill(pattern):
    model = model_for(pattern)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    one = InferenceCache.for_model(model, 2, 31)
    whole = model(ids, cache=one).logits
    chunked = InferenceCache.for_model(model, 2, 31)
    parts = [model(ids[:, i : i + 7], cache=chunked).logits for i in range(0, 30, 7)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-5)
    for mixer, state in one.states.items():  # and the states it leaves behind (KV, conv, SSM/GDN)
        for a, b in zip(vars(state).values(), vars(chunked.states[mixer]).values()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    step = torch.tensor([[4], [8]])
    torch.testing.assert_close(model(step, cache=chunked).logits, model(step, cache=one).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_batch_of_different_lengths_gives_each_prompt_its_own_tokens(pattern):
    model = model_for(pattern)
    batch = generate(model, PROMPTS, max_new_tokens=10, prefill_chunk_size=5)
    assert batch == [generate(model, p, max_new_tokens=10) for p in PROMPTS]
    # Prefilled one token at a time, padding goes through the step path: still masked.
    short = [PROMPTS[0], PROMPTS[1]]
    assert generate(model, short, 4, prefill_chunk_size=1) == [generate(model, p, 4) for p in short]


@pytest.mark.parametrize("pattern", ["M", "G", "*", "[M-]G[*E]"])
def test_padding_never_reaches_states_or_logits(pattern):
    """A short row next to a long one: whatever the padding ids, its states and logits are those of the row alone."""
    model = model_for(pattern)
    rows = [[7, 8, 9], list(range(10, 30))]
    alone = InferenceCache.for_model(model, 1, 40)
    ref = model(torch.tensor([rows[0]]), cache=alone).logits[:, -1]
    for pad_id in (0, 50):
        ids, valid = left_pad(rows, "cpu")
        ids[~valid] = pad_id
        cache = InferenceCache.for_model(model, 2, 40)
        cache.set_padding(valid)
        logits = prefill(model, ids, cache, chunk_size=6)  # padding spans several chunks
        torch.testing.assert_close(logits[:1], ref, rtol=0, atol=1e-5)
        for mixer, state in alone.states.items():
            if hasattr(state, "recurrent"):
                torch.testing.assert_close(cache.states[mixer].conv[:1], state.conv, rtol=0, atol=1e-6)
                torch.testing.assert_close(cache.states[mixer].recurrent[:1], state.recurrent, rtol=0, atol=1e-6)
        torch.testing.assert_close(cache.next_pos, torch.tensor([3, 20]))


@pytest.mark.parametrize("chunk_size", [6, 1])
def test_a_padded_row_decodes_as_the_row_alone(chunk_size):
    """The prefill gave a padded row's tokens the positions one past their own: invisible in its prefill
    logits under RoPE (relative), but its first decoding step then sat one position off (3e-4 in the
    logits; greedy tokens of a tiny model did not change)."""
    model = model_for("[M-]G[*E]")
    rows = [[7, 8, 9], list(range(10, 30))]
    alone = InferenceCache.for_model(model, 1, 40)
    model(torch.tensor([rows[0]]), cache=alone)
    ref = model(torch.tensor([[33]]), cache=alone).logits[:, -1]
    ids, valid = left_pad(rows, "cpu")
    cache = InferenceCache.for_model(model, 2, 40)
    cache.set_padding(valid)
    prefill(model, ids, cache, chunk_size=chunk_size)
    logits = model(torch.tensor([[33], [33]]), cache=cache).logits[:, -1]
    torch.testing.assert_close(logits[:1], ref, rtol=0, atol=1e-5)


def test_padding_must_be_on_the_left():
    model = model_for("M")
    cache = InferenceCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match="left"):
        cache.set_padding(torch.tensor([[True, False, True]]))
    for bad in (torch.ones(1, 0, dtype=torch.bool), torch.ones(3, dtype=torch.bool)):  # IndexError, unpacking
        with pytest.raises(ValueError, match=r"padding mask must be \(batch, prompt length\)"):
            cache.set_padding(bad)
    with pytest.raises(ValueError, match="cache holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="one document per row"):
        model(ids, cache=cache, doc_ids=torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="labels need the logits"):
        model(ids, labels=ids, cache=cache)
    with pytest.raises(KeyError, match="built for other mixers"):
        model(ids, cache=InferenceCache.for_model(model_for("M"), 1, 8))
    assert cache.offset == 0  # refused forwards leave the cache as it was


@pytest.mark.parametrize("pattern", ["[GE]M*/[*-]", "M[*-]/G/G", "*M/M/M/M"])
def test_speculative_greedy_equals_plain_greedy(pattern):
    model = model_for(pattern)
    for prompt in PROMPTS:
        stats = {}
        spec = generate(model, prompt, max_new_tokens=15, speculative="mtp", stats=stats)
        assert spec == generate(model, prompt, max_new_tokens=15)
        assert stats["verify_steps"] > 0 and 0 <= stats["acceptance_rate"] <= 1


def test_speculative_decode_tokens_count_as_plain_decoding_does():
    """Guards against speculative decoding counting the prefill's first token as a decode token."""
    model = model_for("M[*-]/[*-]/[*-]")
    for prompt in PROMPTS[:2]:
        plain_stats, spec_stats = {}, {}
        plain = generate(model, prompt, max_new_tokens=8, stats=plain_stats)
        assert generate(model, prompt, max_new_tokens=8, speculative="mtp", stats=spec_stats) == plain
        assert spec_stats["decode_tokens"] == plain_stats["decode_tokens"] == len(plain) - 1


def test_speculative_accepts_good_drafts_and_rolls_back_bad_ones(monkeypatch):
    """Drafts that are right for a while then wrong: accepted ones are kept, the first wrong one rolls back."""
    model = model_for("M[*-]G/[*-]/[*-]/[*-]")
    prompt = [3, 1, 4, 1, 5]
    plain = generate(model, prompt, max_new_tokens=20)
    truth = prompt + plain

    def oracle(self, tokens, num):
        n = len(tokens)
        good = truth[n : n + num]
        return good[:2] + [(t + 1) % 97 for t in good[2:]]  # two right, then wrong

    monkeypatch.setattr(_Depths, "draft", oracle)
    stats = {}
    assert generate(model, prompt, max_new_tokens=20, speculative="mtp", stats=stats) == plain
    assert stats["accepted"] > 0 and stats["accepted"] < stats["drafted"]
    assert stats["verify_steps"] < 20


def test_mtp_drafts_are_the_depths_predictions_of_the_full_forward():
    model = model_for("M*/[*-]M/[*-]M/[*-]M")
    tokens = [9, 2, 7, 4, 4, 1]
    depths = _Depths(model, 40)
    cache = InferenceCache.for_model(model, 1, 40)
    out = model(torch.tensor([tokens[:-1]]), cache=cache)
    depths.feed_main(model.norm_f(out.hidden_states))

    def expected(seq, k):
        drafts = []
        for j in range(k):
            logits = model(torch.tensor([seq + drafts])).mtp_logits[j]
            drafts.append(int(logits[0, len(seq) - 2].argmax()))
        return drafts

    assert depths.draft(tokens, 3) == expected(tokens, 3)
    # Two more tokens become known (as after a verification that accepted one draft).
    more = [11, 30]
    out = model(torch.tensor([[tokens[-1], more[0]]]), cache=cache)
    depths.feed_main(model.norm_f(out.hidden_states))
    tokens += more
    assert depths.draft(tokens, 3) == expected(tokens, 3)


def test_sampling_is_seeded_per_batch_and_top_p_one_token_is_greedy():
    model = model_for("M*")
    a = generate(model, PROMPTS, 8, temperature=1.0, top_k=10, seed=4)
    assert a == generate(model, PROMPTS, 8, temperature=1.0, top_k=10, seed=4)
    assert generate(model, PROMPTS, 8, temperature=1.0, top_p=1e-6) == generate(model, PROMPTS, 8)


def test_callback_streams_and_stops_rows():
    model = model_for("M*")
    seen = []

    def cb(row, token):
        seen.append((row, token))
        return row == 0 and len([r for r, _ in seen if r == 0]) == 3

    out = generate(model, PROMPTS[:2], 6, callback=cb)
    assert len(out[0]) == 3 and len(out[1]) == 6
    assert [t for r, t in seen if r == 1] == out[1]


def test_repetition_penalty_changes_greedy_choices_consistently():
    model = model_for("M*")
    plain = generate(model, PROMPTS[0], 20)
    pen = generate(model, PROMPTS[0], 20, repetition_penalty=5.0)
    assert pen == generate(model, PROMPTS[0], 20, repetition_penalty=5.0, use_cache=False)
    assert len(set(pen)) >= len(set(plain))


def test_bad_arguments_say_what_is_wrong():
    model = model_for("M")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 2], [500]], 3)
    with pytest.raises(ValueError, match="MTP depths"):
        generate(model, [1, 2], 3, speculative="mtp")
    with pytest.raises(ValueError, match="cuda_graph is not supported with speculative"):
        generate(model_for("M/M"), [1, 2], 3, temperature=1.0, speculative="mtp", cuda_graph=True)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1, 2], 3, top_p=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            generate(model, [1, 2], 3, cuda_graph=True)
    assert speculative.mtp_generate.__doc__


@pytest.mark.parametrize("pattern", ["M", "G", "*", "+", "-"])
def test_a_cached_forward_refuses_an_input_of_another_batch_size(pattern):
    """A cache holds one state per row: other rows are refused by number, not by a mixer's shape error."""
    model = model_for(pattern)
    for cache_rows, input_rows in ((2, 1), (1, 2)):
        cache = InferenceCache.for_model(model, cache_rows, 8)
        with pytest.raises(ValueError, match=f"the input has {input_rows} row.s.; the cache was made for {cache_rows}"):
            model(torch.ones(input_rows, 3, dtype=torch.long), cache=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_decode_on_gpu(dtype, monkeypatch):
    model = HybridLM(tiny_config("M[*-]G-", position_embedding="rope"), seed=1, device="cuda", dtype=dtype).eval()
    graph_stats, eager_stats = {}, {}
    graphed = generate(model, PROMPTS, max_new_tokens=16, cuda_graph=True, stats=graph_stats)
    eager = generate(model, PROMPTS, max_new_tokens=16, stats=eager_stats)
    if dtype == torch.float32:  # eager attends over the positions written only: the same tokens
        assert eager == graphed
    monkeypatch.setattr(InferenceCache, "static", True)
    assert generate(model, PROMPTS, max_new_tokens=16) == graphed  # same kernels, replayed: bitwise the same
    assert graph_stats["decode_tokens"] == eager_stats["decode_tokens"]


@pytest.mark.parametrize(("device", "atol"), DEVICES)
@pytest.mark.parametrize("window", [2, 3, 4])
def test_short_windows_stepped_equal_the_chunked_scan(window, device, atol, monkeypatch):
    """Mamba2 runs a cached window of at most ``STEPPED_WINDOW`` tokens position by position with
    the step; the chunked scan over the same window gives the same logits and states."""
    from hybridlm.layers import mamba2

    model = model_for("M[*-]M").to(device)
    ids = torch.randint(0, 97, (2, 9 + window), generator=torch.Generator().manual_seed(window)).to(device)
    caches = []
    for stepped in (True, False):
        monkeypatch.setattr(mamba2, "STEPPED_WINDOW", 4 if stepped else 1)
        cache = InferenceCache.for_model(model, 2, 9 + window)
        model(ids[:, :9], cache=cache)
        reset_paths()
        caches.append((model(ids[:, 9:], cache=cache).logits, cache))
        # The window took the path named (on the device's kernels): a window that never took the step
        # compared the chunked scan with itself.
        ran, others = ("mamba2_step", ("ssd",)) if stepped else ("ssd", ("mamba2_step", "ssd_step"))
        used = paths_used()
        assert used.get(ran) == ("triton" if device == "cuda" else "torch"), (stepped, used)
        assert not any(other in used for other in others), (stepped, used)
    (a, ca), (b, cb) = caches
    torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for mixer, state in ca.states.items():
        for x, y in zip(vars(state).values(), vars(cb.states[mixer]).values()):
            torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize(("device", "atol"), DEVICES)
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_rollback_keeps_the_recorded_prefix_of_a_window(keep, device, atol):
    """After a recorded 4-token window, rolling back to its first ``keep`` positions leaves the cache
    as if only those had run: states, offsets, and the next step's logits."""
    model = model_for("M[*-]M").to(device)
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(keep)).to(device)
    rolled, direct = InferenceCache.for_model(model, 1, 14), InferenceCache.for_model(model, 1, 14)
    for cache in (rolled, direct):
        model(ids[:, :9], cache=cache)
    snap = rolled.snapshot()
    rolled.record_positions()
    model(ids[:, 9:13], cache=rolled)
    assert rolled.rollback(snap, keep) and rolled.trail is None
    model(ids[:, 9 : 9 + keep], cache=direct)
    assert rolled.offset == direct.offset == 9 + keep and torch.equal(rolled.next_pos, direct.next_pos)
    for mixer, state in direct.states.items():
        for x, y in zip(vars(state).values(), vars(rolled.states[mixer]).values()):
            if isinstance(state, KVState):  # beyond the offset a KV buffer holds stale, hidden slots
                x, y = x[:, :, : direct.offset], y[:, :, : direct.offset]
            torch.testing.assert_close(y, x, rtol=0, atol=atol / 10)
    step = ids[:, 13:14]
    torch.testing.assert_close(model(step, cache=rolled).logits, model(step, cache=direct).logits, rtol=0, atol=atol)


def test_rollback_without_a_recorded_trail_restores_the_snapshot():
    """Gated DeltaNet keeps no per-position state: rollback refuses, leaving the snapshot for a re-run."""
    model = model_for("G*")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = InferenceCache.for_model(model, 1, 12)
    model(ids[:, :8], cache=cache)
    snap = cache.snapshot()
    before = {m: [t.clone() for t in vars(s).values()] for m, s in cache.states.items()}
    cache.record_positions()
    model(ids[:, 8:11], cache=cache)
    assert not cache.rollback(snap, 2) and cache.offset == 8 and cache.trail is None
    gdn = next(m for m in cache.states if type(m).__name__ != "Attention" and hasattr(cache.states[m], "recurrent"))
    assert all(torch.equal(a, b) for a, b in zip(before[gdn], vars(cache.states[gdn]).values()))


def test_restore_rewinds_the_device_offset_too():
    """Guards against restore() leaving offset_t (the CUDA-graph write slot) past the snapshot."""
    model = model_for("M*")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = InferenceCache.for_model(model, 1, 12)
    model(ids[:, :5], cache=cache)
    snap = cache.snapshot()
    model(ids[:, 5:9], cache=cache)
    assert cache.offset == 9 and int(cache.offset_t) == 9
    cache.restore(snap)
    assert cache.offset == 5 and int(cache.offset_t) == 5


@pytest.mark.parametrize("pattern", ["M[*-]M/[*-]/[*-]/[*-]", "M[*-]G/[*-]/[*-]/[*-]"])
def test_partly_right_drafts_keep_the_prefix_by_rollback_or_rerun(pattern, monkeypatch):
    """Three drafts, the first right: without Gated DeltaNet the cache rolls back to the accepted
    prefix from the verify window's recorded states (no re-run); with it, the prefix is re-run.
    Both give plain greedy's tokens."""
    model = model_for(pattern)
    prompt = [3, 1, 4, 1, 5]
    plain = generate(model, prompt, max_new_tokens=20)
    truth = prompt + plain

    def oracle(self, tokens, num):
        good = truth[len(tokens) : len(tokens) + num]
        return good[:1] + [(t + 1) % 97 for t in good[1:]]

    monkeypatch.setattr(_Depths, "draft", oracle)
    forwards, rollbacks = [], []
    monkeypatch.setattr(type(model), "forward", _counting(type(model).forward, forwards))
    monkeypatch.setattr(InferenceCache, "rollback", _counting(InferenceCache.rollback, rollbacks))
    stats = {}
    assert generate(model, prompt, max_new_tokens=20, speculative="mtp", stats=stats) == plain
    assert len(rollbacks) > 3
    # One prefill chunk, one verify per round, plus a re-run for each rollback that refused.
    reruns = 0 if "G" not in pattern else len(rollbacks)
    assert len(forwards) == 1 + stats["verify_steps"] + reruns


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_draft_tokens_limits_the_drafts_per_round():
    model = model_for("M[*-]/[*-]/[*-]")
    prompt = [7, 3, 9, 2]
    plain = generate(model, prompt, max_new_tokens=12)
    for n in (1, 2, 5):
        stats = {}
        assert generate(model, prompt, 12, speculative="mtp", draft_tokens=n, stats=stats) == plain
        assert stats["drafted"] <= min(n, 3) * stats["verify_steps"]
    with pytest.raises(ValueError, match="draft_tokens"):
        generate(model, prompt, 3, draft_tokens=2)
    with pytest.raises(ValueError, match="draft_tokens"):
        generate(model, prompt, 3, speculative="mtp", draft_tokens=0)


@pytest.mark.gpu
@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_speculative_greedy_equals_plain_greedy_on_gpu(draft_tokens):
    model = model_for("M[*-]M/[*-]/[*-]/[*-]").cuda()
    for prompt in PROMPTS:
        stats = {}
        spec = generate(model, prompt, 15, speculative="mtp", draft_tokens=draft_tokens, stats=stats)
        assert spec == generate(model, prompt, 15)
        assert stats["verify_steps"] > 0


def test_set_padding_refuses_a_used_cache_and_a_row_without_a_real_token():
    model = model_for("M*")
    cache = InferenceCache.for_model(model, 2, 8)
    with pytest.raises(ValueError, match="every row needs at least one real token"):
        cache.set_padding(torch.tensor([[False, False, False], [True, True, True]]))
    model(torch.ones(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="must be called on an empty cache, before prefill"):
        cache.set_padding(torch.tensor([[False, True], [True, True]]))
    assert not cache.has_padding and cache.offset == 3


def test_rollback_keeps_a_whole_recorded_window():
    """``keep`` may be the window's length: the states recorded after its last position (as if no draft failed)."""
    test_rollback_keeps_the_recorded_prefix_of_a_window(4, "cpu", 1e-5)


def test_rollback_keeping_nothing_is_the_snapshot_and_keeping_more_than_ran_is_refused():
    """keep=0 read the state after the window's *last* position (trail[-1]), so Mamba2 kept every rejected
    token; a keep past the window advanced the offset over positions never written. Now: the snapshot, and
    a ValueError that leaves the cache as it was."""
    test_rollback_keeps_the_recorded_prefix_of_a_window(0, "cpu", 1e-5)
    model = model_for("M*")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = InferenceCache.for_model(model, 1, 12)
    model(ids[:, :6], cache=cache)
    snap = cache.snapshot()
    cache.record_positions()
    model(ids[:, 6:9], cache=cache)
    for keep in (4, -1):
        with pytest.raises(ValueError, match="rollback keeps 0 to 3 positions"):
            cache.rollback(snap, keep)
    assert cache.offset == 9 and cache.trail is not None
    assert cache.rollback(snap, 3) and cache.offset == 9


def test_rollback_refuses_a_trail_that_misses_positions_since_the_snapshot():
    """Two forwards after record_positions, the first chunked (5 tokens: nothing recorded), the second stepped
    (2 recorded): rollback read those 2 as the window's first positions and kept the state after position 6 as
    the state after position 1. Now it refuses (False, the snapshot restored) and the caller re-runs."""
    model = model_for("M*")
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    cache, direct = InferenceCache.for_model(model, 1, 14), InferenceCache.for_model(model, 1, 14)
    for c in (cache, direct):
        model(ids[:, :6], cache=c)
    snap = cache.snapshot()
    cache.record_positions()
    model(ids[:, 6:11], cache=cache)
    model(ids[:, 11:13], cache=cache)
    assert not cache.rollback(snap, 2) and cache.offset == 6
    model(ids[:, 6:8], cache=cache)
    model(ids[:, 6:8], cache=direct)
    step = ids[:, 8:9]
    torch.testing.assert_close(model(step, cache=cache).logits, model(step, cache=direct).logits, rtol=0, atol=1e-5)


def test_rollback_of_a_window_that_was_not_recorded_restores_the_snapshot():
    """No record_positions before the window: rollback refuses (False) and leaves the snapshot for a re-run."""
    model = model_for("M[*-]M")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    cache, direct = InferenceCache.for_model(model, 1, 12), InferenceCache.for_model(model, 1, 12)
    for c in (cache, direct):
        model(ids[:, :6], cache=c)
    snap = cache.snapshot()
    model(ids[:, 6:9], cache=cache)
    assert not cache.rollback(snap, 2) and cache.offset == 6 and cache.trail is None
    step = ids[:, 6:8]
    torch.testing.assert_close(model(step, cache=cache).logits, model(step, cache=direct).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pattern", ["M*G", "+D"])
def test_a_cache_keeps_attention_state_in_its_dtype_and_recurrent_state_in_float32_or_float64(pattern):
    """InferenceCache's ``dtype`` (default: the model's) is the dtype of keys, values, latents and convolution
    windows; recurrent states are float32 whatever it is, but float64 in a float64 cache (the ops' accumulation
    dtype: a float64 model's states were float32, its decoding 1e-8 off its forward)."""
    model = model_for(pattern)
    for dtype, want in ((None, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)):
        cache = InferenceCache.for_model(model, 1, 8, dtype=dtype)
        seen = 0
        for state in cache.states.values():
            for name, t in vars(state).items():
                if name == "recurrent":
                    assert t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                elif name in ("k", "v", "c_kv", "k_pe", "conv"):
                    assert t.dtype == want, (name, t.dtype)
                    seen += 1
        assert seen >= 2


def test_a_float64_model_decodes_exactly_as_its_full_forward():
    """Every kind of layer and an MTP depth, in float64: prefill, a 3-token window (Mamba2's stepped path) and
    one-token steps give the full forward's logits to float64 rounding (the main stack's and the depth's). The
    norms, scans, steps and recurrent states computed in float32 whatever the model: 4e-8 apart."""
    model = model_for("[M-]G[*E]/G[*-]M").cast(torch.float64)  # as HybridLM(dtype=float64): A_log, D float32
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(4))
    windows = [(0, 9), (9, 12), *((t, t + 1) for t in range(12, 17))]
    with torch.no_grad():
        full = model(ids)
        cache, hidden, got = InferenceCache.for_model(model, 2, 17), [], []
        for a, b in windows:
            out = model(ids[:, a:b], cache=cache)
            got.append(out.logits)
            hidden.append(model.norm_f(out.hidden_states))
        torch.testing.assert_close(torch.cat(got, 1), full.logits, rtol=0, atol=1e-12)
        # Depth 1 at position t reads h_t and the token t + 1: positions 0..15, cached as _Depths runs them.
        hidden, depth, got = torch.cat(hidden, 1), InferenceCache.for_mtp_depth(model, 1, 2, 16), []
        for a, b in [(0, 9), (9, 12), *((t, t + 1) for t in range(12, 16))]:
            ctx = model.make_context(2, b - a, ids.device, depth.position_ids(b - a))
            ctx.cache = depth
            h, _ = model.mtp[0](hidden[:, a:b], model.embeddings(ids[:, a + 1 : b + 1]), ctx)
            depth.advance(b - a)
            got.append(model.head(h))
        torch.testing.assert_close(torch.cat(got, 1), full.mtp_logits[0][:, :16], rtol=0, atol=1e-12)


def test_an_mtp_depth_cache_is_asked_for_by_its_1_based_depth():
    """Depth 0 (counted from 0) indexed ``model.mtp[-1]``: the last depth's cache, silently; one past the last was a
    bare IndexError."""
    model = model_for("M-/*-/*-")
    cache = InferenceCache.for_mtp_depth(model, 1, 1, 8)
    assert set(cache.states) == {model.mtp[0].blocks["0"].layers[0].mixer}
    for bad in (0, 3, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"depth is 1-based, got .*; the model has depths 1\.\.2"):
            InferenceCache.for_mtp_depth(model, bad, 1, 8)
    with pytest.raises(ValueError, match="the model has no MTP depths"):
        InferenceCache.for_mtp_depth(model_for("M-"), 1, 1, 8)


def test_a_cache_takes_its_dtype_by_name_and_refuses_sizes_by_name():
    """``dtype="bfloat16"`` (as ``HybridLM(dtype=...)`` takes it) failed inside ``torch.zeros`` ("argument 'dtype'
    must be torch.dtype, not str"), and so did a negative or float ``max_len``, naming no argument."""
    model = model_for("M*")
    cache = InferenceCache.for_model(model, 2, 8, dtype="bfloat16")
    assert cache.state(model.blocks["1"].layers[0].mixer).k.dtype == torch.bfloat16
    for name, args in (("batch", (-1, 8)), ("max_len", (2, -1)), ("max_len", (2, 8.0)), ("batch", (True, 8))):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 0, got"):
            InferenceCache.for_model(model, *args)
    with pytest.raises(ValueError, match=r"dtype must be a floating torch\.dtype"):
        InferenceCache.for_model(model, 2, 8, dtype="int64")


@pytest.mark.parametrize(
    ("model_dtype", "cache_dtype"),
    [(torch.float64, torch.float32), (torch.float32, torch.float64)],
    ids=["float64-model-float32-cache", "float32-model-float64-cache"],
)
def test_a_cache_of_another_precision_than_the_model_decodes_in_place(model_dtype, cache_dtype):
    """The steps compute in float64 where the input or the state is float64, and write the result back into the
    cache's state in that state's dtype: float64 products met a float32 state in place under a float64 model."""
    model = model_for("MG*").to(model_dtype)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = InferenceCache.for_model(model, 2, 9, dtype=cache_dtype)
    got = [model(ids[:, :6], cache=cache).logits]
    got += [model(ids[:, t : t + 1], cache=cache).logits for t in (6, 7, 8)]
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=0, atol=1e-5)
    assert all(s.recurrent.dtype == cache_dtype for s in cache.states.values() if hasattr(s, "recurrent"))


def test_a_finished_batch_stops_decoding(monkeypatch):
    """Once every row has stopped (eos_id, callback), no more decode steps run: at most the one queued ahead."""
    model = model_for("M*")
    eos = generate(model, PROMPTS[0], 1)[0]
    forwards = []
    monkeypatch.setattr(type(model), "forward", _counting(type(model).forward, forwards))
    out = generate(model, PROMPTS[:2], 50, eos_id=eos, callback=lambda row, token: row == 1 and token is not None)
    assert out[0] == [eos] and len(out[1]) == 1
    assert len(forwards) <= 2  # the prefill, and the step queued before the host read the first tokens


def test_speculative_drafts_never_run_past_max_new_tokens(monkeypatch):
    """A round drafts at most the tokens still wanted after the main model's own pick: with drafts that are
    always right, every drafted token is used (drafted + one pick per round = the new tokens after the first)."""
    model = model_for("M[*-]/[*-]/[*-]")
    prompt = [3, 1, 4, 1, 5]
    truth = prompt + generate(model, prompt, max_new_tokens=30)
    monkeypatch.setattr(_Depths, "draft", lambda self, tokens, num: truth[len(tokens) : len(tokens) + num])
    for n in range(2, 12):
        stats = {}
        assert generate(model, prompt, n, speculative="mtp", stats=stats) == truth[len(prompt) : len(prompt) + n]
        assert stats["accepted"] == stats["drafted"] and stats["drafted"] + stats["verify_steps"] == n - 1, (n, stats)


def test_the_depths_pass_over_the_prompt_runs_only_the_depths_that_will_draft(monkeypatch):
    """Three new tokens leave one to draft (depth 1) after the prefill's pick and the round's own; two leave none:
    the pass over the prompt runs only the depths that will draft, not every depth over the whole prompt for drafts
    never asked for."""
    model = model_for("M[*-]/[*-]/[*-]")
    ran, run = [], _Depths._run
    monkeypatch.setattr(_Depths, "_run", lambda self, d, h, tokens: ran.append(d) or run(self, d, h, tokens))
    for n, depths in ((2, set()), (3, {0})):
        ran.clear()
        assert generate(model, PROMPTS[2], n, speculative="mtp") == generate(model, PROMPTS[2], n)
        assert set(ran) == depths, (n, ran)


def test_mtp_drafts_of_a_one_token_prompt_use_every_depth_that_can_see_it():
    """Two known tokens: depths 1 and 2 draft (depth 2 reads depth 1's draft); depth 3 has no position yet."""
    model = model_for("M*/[*-]M/[*-]M/[*-]M")
    tokens = [9, 2]
    depths = _Depths(model, 40)
    cache = InferenceCache.for_model(model, 1, 40)
    depths.feed_main(model.norm_f(model(torch.tensor([tokens[:-1]]), cache=cache).hidden_states))
    drafts = []
    for j in range(2):
        drafts.append(int(model(torch.tensor([tokens + drafts])).mtp_logits[j][0, 0].argmax()))
    assert depths.draft(tokens, 3) == drafts


@pytest.mark.parametrize("chunk", [1, 5])
def test_speculative_prefill_runs_in_chunks_and_drafts_as_one_chunk_does(chunk, monkeypatch):
    """prefill_chunk_size bounds the prefill's forwards as in plain decoding, and the depths take the main
    model's hidden states of every chunk, not the last one only: the same drafts as one chunk."""
    model = model_for("M[*-]/[*-]/[*-]")
    prompt = PROMPTS[2]
    one, chunked = {}, {}
    want = generate(model, prompt, 12, speculative="mtp", stats=one)
    widths = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model), "forward", lambda self, ids, **kw: widths.append(ids.shape[1]) or forward(self, ids, **kw)
    )
    assert generate(model, prompt, 12, speculative="mtp", prefill_chunk_size=chunk, stats=chunked) == want
    prefill = -(-len(prompt) // chunk)
    assert sum(widths[:prefill]) == len(prompt) and max(widths[:prefill]) == chunk
    assert want == generate(model, prompt, 12)
    assert (chunked["drafted"], chunked["accepted"]) == (one["drafted"], one["accepted"])


@pytest.mark.parametrize("chunk", [1, 5])
def test_speculative_depths_take_the_prompt_in_prefill_chunks_too(chunk, monkeypatch):
    """The MTP depths' first pass over the prompt (the first round's commit) ran it in one forward whatever
    ``prefill_chunk_size``, the bound the main model's prefill keeps to: every depth forward now takes at most
    ``chunk`` positions, and the output is still plain greedy's."""
    model = model_for("M[*-]/[*-]/[*-]")
    widths, run = [], _Depths._run
    monkeypatch.setattr(
        _Depths, "_run", lambda self, d, h, tokens: widths.append(len(tokens)) or run(self, d, h, tokens)
    )
    want = generate(model, PROMPTS[2], 12)
    assert generate(model, PROMPTS[2], 12, speculative="mtp", prefill_chunk_size=chunk) == want
    assert widths and max(widths) <= chunk, widths


def test_the_depths_pass_over_the_prompt_is_timed_as_prefill(monkeypatch):
    """The depths' first commit, over the whole prompt, ran in the first draft round and was counted in
    decode_seconds, so speculative tokens/s fell with the prompt's length. A clock that only the depths' forwards
    move (one tick per position) now puts exactly the prompt's positions of every depth in prefill_seconds."""
    model = model_for("M[*-]/[*-]/[*-]")  # two depths
    clock, run = [0.0], _Depths._run
    monkeypatch.setattr(speculative, "_sync", lambda device: clock[0])
    monkeypatch.setattr(
        _Depths,
        "_run",
        lambda self, d, h, tokens: clock.__setitem__(0, clock[0] + len(tokens)) or run(self, d, h, tokens),
    )
    prompt, stats = PROMPTS[2], {}
    want = generate(model, prompt, 12)
    assert generate(model, prompt, 12, speculative="mtp", prefill_chunk_size=5, stats=stats) == want
    # depth d (1-based) commits positions 0..len(prompt)-d: those whose tokens, the first new one included, are known
    assert stats["prefill_seconds"] == sum(len(prompt) + 1 - d for d in (1, 2)), stats
    assert stats["decode_seconds"] == clock[0] - stats["prefill_seconds"] > 0


def test_speculative_prefill_copies_the_prompts_hidden_states_a_number_of_times_linear_in_its_length():
    """Counts, not timings. The main model's hidden states waiting for the depths were concatenated once per
    prefill chunk, each time copying all those before: quadratic in the prompt. Over one draft round, the elements
    every ``torch.cat`` touches now grow by the same amount from 64 to 128 tokens as twice from 32 to 64."""
    model = model_for("M[*-]/[*-]/[*-]")
    cat = []
    for n in (32, 64, 128):
        touched = _ElementsTouched()
        with touched:
            generate(model, [7 * t % 97 for t in range(n)], 3, speculative="mtp", prefill_chunk_size=4)  # one round
        cat.append(touched.elements["aten.cat"])
    assert cat[2] - cat[1] == 2 * (cat[1] - cat[0]) > 0, cat


def test_mtp_draft_logits_are_the_full_forward_mtp_logits(monkeypatch):
    """Each depth's cached run (committed positions, then the tentative ones over the drafts) sits at its true
    RoPE positions: the logits behind each draft are the full forward's MTP logits, not just their argmax."""
    model = model_for("M*/[*-]M/[*-]M/[*-]M")
    tokens = [9, 2, 7, 4, 4, 1]
    depths = _Depths(model, 40)
    cache = InferenceCache.for_model(model, 1, 40)
    depths.feed_main(model.norm_f(model(torch.tensor([tokens[:-1]]), cache=cache).hidden_states))
    head, seen = model.head, []
    monkeypatch.setattr(model, "head", lambda h: seen.append(head(h)) or seen[-1])
    for more in ([], [11, 30]):
        if more:  # two more tokens become known (as after a verification that accepted one draft)
            out = model(torch.tensor([[tokens[-1], more[0]]]), cache=cache)
            depths.feed_main(model.norm_f(out.hidden_states))
            tokens += more
        seen.clear()
        drafts = depths.draft(tokens, 3)
        got = list(seen)
        full = model(torch.tensor([tokens + drafts])).mtp_logits
        assert len(got) == 3
        for j, logits in enumerate(got):
            torch.testing.assert_close(logits[0], full[j][0, len(tokens) - 2], rtol=0, atol=1e-5)


def test_speculative_batches_stop_at_eos_and_stream_each_row_as_plain_greedy_does():
    """eos_id ends a row at the first token (from the prefill) or inside a verified window, and the callback
    hears each row under its own index: the same tokens and calls as plain greedy decoding."""
    model = model_for("M[*-]/[*-]/[*-]")
    prompts = [PROMPTS[0], PROMPTS[2]]
    free = generate(model, prompts, 12)
    assert free[1][5] not in free[1][:5]  # row 1 stops inside the verify rounds
    for eos_id in (free[0][0], free[1][5]):
        out, calls = {}, {}
        for spec in (None, "mtp"):
            heard = calls[spec] = []
            out[spec] = generate(
                model, prompts, 12, eos_id=eos_id, speculative=spec, callback=lambda r, t, c=heard: c.append((r, t))
            )
        assert out["mtp"] == out[None] and eos_id in (out[None][0][-1], out[None][1][-1])
        assert sorted(calls["mtp"]) == sorted(calls[None])


#: A small model with every sequence mixer at realistic head sizes (64-channel heads, Mamba2 state 128,
#: DSA selecting 512 keys of thousands): what the bf16 long-sequence check below runs.
REALISTIC = dict(
    vocab_size=4096,
    hidden_size=512,
    num_attention_heads=8,
    num_query_groups=2,
    ffn_hidden_size=1024,
    mamba_num_heads=16,
    mamba_head_dim=64,
    mamba_state_dim=128,
    mamba_num_groups=2,
    gdn_num_heads=4,
    gdn_head_dim=64,
    moe_num_experts=8,
    moe_top_k=2,
    moe_ffn_hidden_size=256,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_head_dim=64,
    qk_pos_emb_head_dim=32,
    v_head_dim=64,
    dsa_indexer_n_heads=4,
    dsa_indexer_head_dim=64,
    dsa_indexer_topk=512,
    position_embedding="rope",
)


def bf16_decode_errors(pattern: str, device: str, length: int, steps: int, **overrides) -> tuple[float, float]:
    """A bf16 model (``cast``: A_log, D and the other sensitive parameters float32) prefills ``length - steps``
    tokens into a cache and decodes ``steps`` one-token steps. Returns the relative errors of the decoded
    logits and of the full bf16 forward's, both against the float64 forward of the same rounded weights."""
    cfg = ModelConfig(pattern=pattern, **{**REALISTIC, **overrides})
    model = HybridLM(cfg, seed=3, device=device).cast(torch.bfloat16).eval()
    reference = copy.deepcopy(model).to(torch.float64)  # the same bf16-rounded weights, exactly
    ids = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        want = reference(ids).logits[:, -steps:]
        full = model(ids).logits[:, -steps:]
        cache = InferenceCache.for_model(model, 2, length)
        model(ids[:, : length - steps], cache=cache)
        got = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(length - steps, length)], 1)
    return rel_err(got, want), rel_err(full, want)


#: Every mixer kind (attention and MLA / DSA do not share a model).
BF16_PATTERNS = ["M-G-*-E-", "M-+-D-GE"]
#: YaRN extending a 1,024-token context by 4: positions past it, the softmax rescaled in MLA / DSA.
YARN = dict(rope_type="yarn", yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=1024)
YARN |= dict(yarn_mscale=0.707, yarn_mscale_all_dim=0.707)


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [{}, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("pattern", BF16_PATTERNS)
def test_bf16_cached_decoding_at_4096_tokens_is_as_close_to_float64_as_the_full_forward_on_gpu(pattern, rope):
    """Realistic sizes and length on the GPU kernels (the Triton scans for the prefill and the full forward,
    the step kernels for the decode): a cached decode after a 4,088-token prefill is within 1.5x the full bf16
    forward's error against float64 (both fed the same rounded weights), plus half a bf16 rounding of the logits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reset_paths()
    err_decode, err_full = bf16_decode_errors(pattern, "cuda", 4096, 8, **rope)
    print(
        f"{pattern} {rope.get('rope_type', 'rope')} bf16 at 4096 tokens: decode {err_decode:.3g}, full forward {err_full:.3g} (relative to float64)"
    )
    used = paths_used()
    assert used.get("mamba2_step") == "triton" and used.get("gdn_step", "triton") == "triton", used
    assert ("G" in pattern) == ("gdn_step" in used) and used.get("moe_route") == "triton", used
    assert err_decode <= 1.5 * err_full + 2e-3, (err_decode, err_full)


@pytest.mark.parametrize("rope", [{}, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("pattern", BF16_PATTERNS)
def test_bf16_cached_decoding_is_as_close_to_float64_as_the_full_forward_on_cpu(pattern, rope):
    """The same check as the GPU one at a short length on CPU's torch paths (a smoke test of the check itself)."""
    err_decode, err_full = bf16_decode_errors(pattern, "cpu", 48, 4, **rope)
    assert err_decode <= 1.5 * err_full + 2e-3, (err_decode, err_full)


def test_a_cache_of_no_rows_or_no_positions_builds_as_the_bound_says():
    """The size check reads ">= 0": zero rows (an empty batch) or zero positions is a cache, not an error."""
    model = model_for("M*G")
    for batch, max_len in ((0, 8), (2, 0), (0, 0)):
        cache = InferenceCache.for_model(model, batch, max_len)
        assert (cache.batch, cache.max_len) == (batch, max_len)


def test_set_padding_refuses_a_mask_of_fewer_rows_than_the_cache():
    """A (1, L) mask on a 2-row cache would broadcast into both rows' ``valid`` and pad the row it never named."""
    cache = InferenceCache.for_model(model_for("M*"), 2, 8)
    with pytest.raises(ValueError, match=r"padding mask \(1, 3\) does not fit a cache of 2 x 8"):
        cache.set_padding(torch.tensor([[False, True, True]]))
    assert not cache.has_padding and bool(cache.valid.all())


def test_padding_masks_end_where_the_padding_ends():
    """No padding (an all-True mask), or every padded position already run: ``pad_mask`` is None and
    ``has_padding`` False, so attention keeps its unmasked causal and decode-step paths."""
    model = model_for("M*")
    cache = InferenceCache.for_model(model, 2, 8)
    cache.set_padding(torch.ones(2, 3, dtype=torch.bool))
    assert not cache.has_padding and cache.pad_mask(3) is None
    cache = InferenceCache.for_model(model, 2, 8)
    cache.set_padding(torch.tensor([[False, True, True], [True, True, True]]))
    assert cache.has_padding and cache.pad_mask(3).tolist() == [[False, True, True], [True, True, True]]
    model(torch.ones(2, 3, dtype=torch.long), cache=cache)
    assert cache.pad_mask(1) is None and cache.next_pos.tolist() == [2, 3]


def test_for_model_builds_the_cache_on_the_device_asked_for():
    """``device=`` (here ``meta``, the one other device a CPU has) places every state and the counters there."""
    model = model_for("M*G")
    cache = InferenceCache.for_model(model, 2, 8, device="meta")
    tensors = [cache.offset_t, cache.valid, cache.next_pos]
    for s in cache.states.values():
        tensors += [t for t in vars(s).values() if isinstance(t, torch.Tensor)]
    assert len(tensors) > 3 and {t.device.type for t in tensors} == {"meta"}


class _ElementsTouched(TorchDispatchMode):
    """Per aten op: how many tensor elements its calls read and write (a view counts its own size)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}, out))
        self.elements[str(func.overloadpacket)] += sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))
        return out


def decode_step_cost(model: HybridLM, prefix: int) -> tuple[int, collections.Counter]:
    """FLOPs and per-op elements of one eager decode step of 2 rows after a prefill of ``prefix`` tokens, in a
    cache of ``2 * prefix`` positions (so that work over the whole buffer grows with the prefix too)."""
    ids = torch.randint(0, 97, (2, prefix + 1), generator=torch.Generator().manual_seed(prefix))
    cache = InferenceCache.for_model(model, 2, 2 * prefix)
    with torch.no_grad():
        model(ids[:, :prefix], cache=cache)
        step = ids[:, prefix:].clone()  # (sliced outside the count)
        flops, touched = FlopCounterMode(display=False), _ElementsTouched()
        with flops, touched:
            model(step, cache=cache, logits_to_keep=1)
    return flops.get_total_flops(), touched.elements


#: Ops that must not grow with the prefix in any decode step: projections, a conv, a rotary table, or a cache grown
#: by concatenation or copied whole would show in one of them (attention's own products are bmm / SDPA).
PREFIX_FREE_OPS = ("aten.mm", "aten.addmm", "aten.convolution", "aten.cos", "aten.sin", "aten.cat", "aten.stack",
                   "aten.clone", "aten.copy_", "aten._to_copy", "aten.cumsum")  # fmt: skip


@pytest.mark.parametrize("pattern", ["MG-", "E", "*-", "+", "D"])
def test_a_decode_step_costs_the_same_at_any_prefix_and_attention_grows_linearly_in_its_products(pattern):
    """Counts, not timings. Mamba2, GDN and MLP steps do as many FLOPs and touch exactly as many elements after 8
    tokens as after 128 (nothing re-runs the prefix, nothing scales with the buffer); MoE does as many FLOPs (which
    expert loops run follows the routing, so its element count does not stay put). Attention, MLA and DSA steps grow
    exactly linearly, op by op (from 32 to 128 tokens 4 times the growth from 8 to 32), and only in the attention
    products: no projection, rotary table or copy of the cache grows (a KV cache grown by torch.cat each step
    is quadratic over a generation)."""
    model = model_for(pattern)
    (f8, e8), (f32, e32), (f128, e128) = (decode_step_cost(model, n) for n in (8, 32, 128))
    if pattern in ("MG-", "E"):
        assert f8 == f32 == f128 > 0
        assert pattern == "E" or e8 == e32 == e128, {op: e128[op] - e8[op] for op in e128 if e128[op] != e8[op]}
        return
    first = {op: e32[op] - e8[op] for op in e128}
    grew = {op: e128[op] - e32[op] for op in e128 if e128[op] != e32[op] or first[op]}
    assert f128 - f32 == 4 * (f32 - f8) and all(g == 4 * first[op] for op, g in grew.items()), (first, grew)
    assert grew and not set(grew) & set(PREFIX_FREE_OPS), (sorted(set(grew) & set(PREFIX_FREE_OPS)), grew)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("pattern", ["[M-]G[*E]", "M+G-", "GD-M"])
def test_a_left_padded_float64_batch_decodes_every_row_as_its_own_full_forward(pattern, static):
    """Three prompts of different lengths, left-padded, prefilled in chunks of 5 (the padding spans chunks; MLA
    and DSA after a prefill, not only step by step), then 5 tokens fed one step at a time: each row's logits at
    every real position are the full forward's over that row's prompt and tokens alone, to float64 rounding. The
    float64 tests above run unpadded rows only, and no other CPU test runs the static step (the CUDA graph's,
    masked by ``cache.valid``) over a padded batch."""
    model = model_for(pattern).cast(torch.float64)
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, 97, (n + 5,), generator=gen).tolist() for n in (3, 12, 8)]
    ids, valid = left_pad([r[:-5] for r in rows], "cpu")
    P = ids.shape[1]
    with torch.no_grad():
        cache = InferenceCache.for_model(model, 3, P + 5)
        cache.set_padding(valid)
        cache.static = static
        got = [model(ids[:, i : i + 5], cache=cache).logits for i in range(0, P, 5)]
        got += [model(torch.tensor([[r[-5 + t]] for r in rows]), cache=cache).logits for t in range(5)]
        got = torch.cat(got, 1)
        for b, row in enumerate(rows):
            full = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(got[b, P + 5 - len(row) :], full, rtol=0, atol=1e-12)


def test_a_sequence_mixer_without_init_cache_is_refused_before_it_decodes_wrong_tokens(monkeypatch):
    """A sequence mixer that has no ``init_cache`` and ignores ``ctx.cache`` (a new mixer whose decode path was
    forgotten) decoded every step from its own token alone: other tokens than the no-cache loop, and no error."""
    from hybridlm.layers import GatedDeltaNet

    model = model_for("G-")
    monkeypatch.delattr(GatedDeltaNet, "init_cache")
    forward = GatedDeltaNet.forward
    monkeypatch.setattr(GatedDeltaNet, "forward", lambda self, x, ctx: forward(self, x, replace(ctx, cache=None)))
    with pytest.raises(NotImplementedError, match=r"^'G' \(Gated DeltaNet\) layers cannot decode with a cache: "):
        generate(model, [PROMPTS[0]], max_new_tokens=4)
    with pytest.raises(NotImplementedError, match=r"^'G' \(Gated DeltaNet\) layers cannot decode with a cache: "):
        InferenceCache.for_mtp_depth(HybridLM(tiny_config("-/G"), seed=0), 1, 1, 8)


def test_a_mixer_without_init_cache_that_asks_for_its_state_is_told_why_it_has_none():
    """The message was "the cache was built for other mixers", for a mixer no cache can hold a state for."""
    from hybridlm.layers import MLP

    cache = InferenceCache([], 1, 4, "cpu", torch.float32)
    with pytest.raises(NotImplementedError, match=r"^MLP reads ctx\.cache but has no init_cache"):
        cache.state(MLP(tiny_config("-")))


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_gated_attention_decodes_as_the_full_forward(static):
    """The output gate is projected from each position's own input: prefill, then steps (eager and static) give
    the full forward's logits, and greedy decoding the no-cache loop's tokens."""
    model = model_for("M[*-]/[*-]", attention_output_gate=True)
    assert_prefill_then_steps_match(model, static)
    assert generate(model, PROMPTS[0], max_new_tokens=8) == generate(model, PROMPTS[0], 8, use_cache=False)
