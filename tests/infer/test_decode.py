"""A decode batch whose rows come and go (continuous batching) against each row decoded alone."""

import copy
import dataclasses

import pytest
import torch

from hybridlm import HybridLM, ModelConfig, generate
from hybridlm.infer.cache import InferenceCache, _tensors
from hybridlm.infer.cuda_graph import GraphedDecodeStep
from hybridlm.infer.decode import DecodeBatch, left_pad
from hybridlm.infer.generate import Sampler
from tests.helpers import MLA_TINY, rel_err, tiny_config
from tests.infer.test_cache import BF16_PATTERNS, REALISTIC

#: Every kind of cached state: Mamba2's and GDN's fixed-size ones, attention's KV, MLA's latents, DSA's indexer keys.
PATTERNS = ["[M-]G[*E]", "M+G-", "GD-M"]


def model64(pattern: str) -> HybridLM:
    mla = MLA_TINY if "+" in pattern or "D" in pattern else {}
    return HybridLM(tiny_config(pattern, position_embedding="rope", **mla), seed=1).eval().cast(torch.float64)


def prompts(*lengths: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for n in lengths]


def join_as_room_frees(batch: DecodeBatch, ps, limits, waiting: list[int], on_step=None) -> list:
    """Admit the prompts ``ps[i]`` for ``i`` in ``waiting`` (to take ``limits[i]`` tokens) as the batch has room,
    stepping it (then calling ``on_step()``) until every row has ended; returns their rows, in admission order."""
    rows = []
    while batch.live or waiting:
        take = waiting[: batch.room]
        if take:
            rows += batch.admit([ps[i] for i in take], [limits[i] for i in take], [None] * len(take))
            waiting = waiting[len(take) :]
        batch.step()
        if on_step is not None:
            on_step()
    return rows


def check_logits(model, batch: DecodeBatch) -> None:
    """Each live row's next-token logits are the full forward's over its prompt and tokens alone."""
    with torch.no_grad():
        for row in batch.rows:
            if row is not None:
                full = model(torch.tensor([row.prompt + row.out])).logits[0, -1]
                torch.testing.assert_close(batch.logits[row.slot], full, rtol=0, atol=1e-11)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_rows_joining_a_running_batch_decode_as_each_row_alone(pattern, static, monkeypatch):
    """A float64 model, three slots, a cache of 8 positions at first. A is admitted alone (its slot's neighbours
    free); after 3 steps B, longer than every position cached (padding put in front), and C join; A ends at its
    limit and D takes its slot (the positions before B's dropped); the cache grows at each admission. At every step
    each live row's logits are its full forward's, and each row's tokens are those generate gives it alone.
    ``static``: the masked whole-buffer decode step a CUDA graph replays."""
    monkeypatch.setattr(InferenceCache, "static", static)
    model = model64(pattern)
    a, b, c, d = prompts(4, 11, 2, 6)
    with torch.no_grad():
        batch = DecodeBatch(model, 3, 8, Sampler())
        (ra,) = batch.admit([a], [6], [None])
        assert ra.slot == 0 and batch.grown == 1  # 4 + 6 > 8
        for _ in range(3):
            check_logits(model, batch)
            batch.step()
        assert batch.cache.offset == 4 + 3
        rb, rc = batch.admit([b, c], [5, 9], [None, None])
        assert (rb.slot, rc.slot) == (1, 2) and batch.cache.offset == 11  # B's 11 positions end at the offset
        assert batch.grown == 2  # 11 positions, then C's 9 tokens: 20 > 12
        while batch.rows[0] is not None:
            check_logits(model, batch)
            batch.step()
        assert len(ra.out) == 6 and batch.free == [0]
        (rd,) = batch.admit([d], [7], [None])
        assert (rb.slot, rc.slot, rd.slot) == (0, 1, 2)  # the cache grew: the live rows moved to the first slots
        # Every position before B's first was dropped: B (11 + its tokens so far) is the longest row.
        assert batch.cache.offset == len(b) + len(rb.out)
        while batch.live:
            check_logits(model, batch)
            batch.step()
    assert batch.grown == 3  # D's 7 tokens after B's 14 positions: 21 > 20
    for row, prompt, limit in ((ra, a, 6), (rb, b, 5), (rc, c, 9), (rd, d, 7)):
        assert row.out == generate(model, prompt, limit)


def test_a_joining_row_gets_its_own_repetition_penalty_and_logprobs():
    """The penalty of a row that joins counts its own prompt and tokens only (not its slot's last row's), and its
    logprobs are those it has alone."""
    model = model64("M*G")
    a, b, c = prompts(9, 3, 5, seed=4)
    alone = {}
    for name, prompt in (("b", b), ("c", c)):
        got = []
        out = generate(
            model, prompt, 6, repetition_penalty=1.5, logprobs=2, callback=lambda r, t, lp, got=got: got.append(lp)
        )
        alone[name] = (out, got)
    seen = {"b": [], "c": []}
    with torch.no_grad():
        batch = DecodeBatch(model, 2, 32, Sampler(repetition_penalty=1.5))
        batch.admit([a], [2], [None])
        batch.step()
        batch.step()  # a ends: both slots are free, slot 0 last held a
        callbacks = [lambda t, lp: seen["b"].append(lp), lambda t, lp: seen["c"].append(lp)]
        rb, rc = batch.admit([b, c], [6, 6], callbacks, [None, 2])
        assert rb.slot == 0
        while batch.live:
            batch.step()
    assert rb.out == alone["b"][0] and rc.out == alone["c"][0]
    assert seen["b"] == [None] * 6  # it did not ask
    for got, want in zip(seen["c"], alone["c"][1]):
        assert [i for i, _ in got.top] == [i for i, _ in want.top]
        assert got.logprob == pytest.approx(want.logprob, abs=1e-12)


def test_rows_that_join_and_move_keep_their_own_output_counts():
    """Frequency and presence penalties count each row's own output: a row that joins the slot another row held
    starts from no counts, rows of another sampler (no penalty) share the batch, and the counts move with their rows
    when the batch's slots shrink; every row takes the tokens it takes alone (float64)."""
    model = model64("M*G")
    ps = prompts(9, 3, 5, 7, 4, seed=6)
    limits = [3, 12, 10, 11, 5]
    penalized = Sampler(frequency_penalty=-1.5, presence_penalty=-0.5)  # (repeats favoured: counts show at once)
    samplers = [penalized, penalized, Sampler(), penalized, penalized]
    with torch.no_grad():
        batch = DecodeBatch(model, 1, 0, penalized, max_slots=4, power_of_two=True)
        rows = batch.admit(ps[:4], limits[:4], [None] * 4, samplers=samplers[:4])
        while len(rows[0].out) < limits[0]:
            batch.step()
        freed, grown = rows[0].slot, batch.grown
        rows += batch.admit(ps[4:], limits[4:], [None], samplers=samplers[4:])
        batch.step()  # (placed: the slot the first row held, the batch neither grown nor shrunk)
        assert rows[4].slot == freed and batch.grown == grown and len(batch.rows) == 4
        while batch.live:
            batch.step()
    assert batch.counts is not None and batch.grown > grown  # (the rows moved as the slots shrank)
    for row, prompt, limit, sampler in zip(rows, ps, limits, samplers):
        settings = dict(frequency_penalty=sampler.frequency_penalty, presence_penalty=sampler.presence_penalty)
        assert row.out == generate(model, prompt, limit, **settings)
    for i in (1, 3, 4):  # (the penalty changed what they picked)
        assert rows[i].out != generate(model, ps[i], limits[i]), i


@pytest.mark.parametrize("power_of_two", [True, False], ids=["power-of-two", "exact"])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_batch_of_max_slots_takes_as_many_slots_as_its_rows_need(static, power_of_two, monkeypatch):
    """With ``max_slots``, the slots are as many as the rows: a power of two (1, then 4 for 3 rows, then 8), fewer
    once half are free (down to 2 when two rows are left, 1 when one is), or exactly as many (1, 3, 7, one fewer
    at each row's end); the rows move slots exactly: logits and tokens as each row's alone."""
    monkeypatch.setattr(InferenceCache, "static", static)
    model = model64("M*G-")
    ps = prompts(5, 3, 8, 2, 4, 6, 7, seed=5)
    limits = [3, 4, 12, 2, 3, 9, 2]
    rows, slots = [], []
    with torch.no_grad():
        batch = DecodeBatch(model, 1, 0, Sampler(repetition_penalty=1.3), max_slots=8, power_of_two=power_of_two)
        rows += batch.admit(ps[:1], limits[:1], [None])
        slots.append(len(batch.rows))
        batch.step()
        rows += batch.admit(ps[1:3], limits[1:3], [None] * 2)
        slots.append(len(batch.rows))
        batch.step()
        assert batch.room == 5
        rows += batch.admit(ps[3:], limits[3:], [None] * 4)
        slots.append(len(batch.rows))
        while batch.live:
            check_logits(model, batch)
            batch.step()
            slots.append(len(batch.rows))
    if power_of_two:
        assert slots[:3] == [1, 4, 8] and 2 in slots and slots[-1] == 1
    else:
        assert slots[:3] == [1, 3, 7] and slots[3:] == sorted(slots[3:], reverse=True) and slots[-1] == 1
        assert len(set(slots)) >= 5
    for row, prompt, limit in zip(rows, ps, limits):  # (each row's penalty moved with it)
        assert row.out == generate(model, prompt, limit, repetition_penalty=1.3)


def test_positions_no_row_reads_are_dropped_when_a_row_joins():
    """A long row ends; a short one joins: the cache keeps only the longest live row's positions, so eager attention
    reads no more than that (the cache does not grow: no copy into another one did it)."""
    model = model64("M*")
    a, b, c = prompts(10, 2, 3, seed=6)
    with torch.no_grad():
        batch = DecodeBatch(model, 2, 64, Sampler())
        ra, rb = batch.admit([a, b], [3, 20], [None, None])
        while batch.rows[ra.slot] is not None:
            batch.step()
        assert batch.cache.offset == 10 + 3
        (rc,) = batch.admit([c], [2], [None])
        assert batch.grown == 0 and batch.cache.offset == rb.length == 2 + 3
        while batch.live:
            check_logits(model, batch)
            batch.step()
    assert [rb.out, rc.out] == [generate(model, b, 20), generate(model, c, 2)]


def test_admit_refuses_more_rows_than_it_has_room_for_and_a_step_needs_a_row():
    model = model64("M*")
    batch = DecodeBatch(model, 2, 16, Sampler())
    with pytest.raises(ValueError, match="no row to decode"):
        batch.step()
    with pytest.raises(ValueError, match=r"3 prompt\(s\) for room for 2 more row\(s\)"):
        batch.admit(prompts(2, 2, 2), [1] * 3, [None] * 3)


def test_place_and_shift_refuse_what_does_not_fit():
    model = model64("M*")
    with torch.no_grad():
        cache = InferenceCache.for_model(model, 2, 8)
        other = InferenceCache.for_model(model, 1, 8)
        model(torch.tensor([[3, 4, 5]]), cache=other)
        with pytest.raises(ValueError, match=r"place: 3 position\(s\) do not fit: the source holds 3, this cache 0"):
            cache.place(other, 0, 1, 3)
        with pytest.raises(ValueError, match="different mixers"):
            elsewhere = InferenceCache.for_model(model64("G*"), 2, 8)
            elsewhere.shift(3)
            elsewhere.place(other, 0, 0, 3)
        cache.shift(3)
        cache.place(other, 0, 1, 3)
        assert cache.valid[:, :3].tolist() == [[False] * 3, [True] * 3]
        cache.place(other, 0, 1, 2)  # the row's earlier positions become padding
        assert cache.valid[:, :3].tolist() == [[False] * 3, [False, True, True]]
        cache.place(other, 0, 1, 3)
        with pytest.raises(ValueError, match=r"the first 1 position\(s\) hold real tokens"):
            cache.shift(-1)
        with pytest.raises(ValueError, match=r"shift: 6 moves the cached positions \[0, 3\) out of \[0, 8\)"):
            cache.shift(6)
        cache.release(1)
        cache.shift(-3)
        assert cache.offset == 0 and int(cache.offset_t) == 0


def test_take_moves_rows_as_placing_each_does_and_refuses_what_does_not_fit():
    """take: rows of another cache, each with the padding before it, land as place puts them one by one (every
    state tensor equal, the padding and RoPE positions too); too many rows or positions are refused."""
    model = model64("M+G-")
    with torch.no_grad():
        source = InferenceCache.for_model(model, 3, 10)
        ids, valid = left_pad(prompts(4, 7, 2), "cpu")
        source.set_padding(valid)
        model(ids, cache=source)
        lengths = [4, 7, 2]
        placed, taken = (InferenceCache.for_model(model, 2, 12) for _ in range(2))
        for cache in (placed, taken):
            cache.shift(9)  # (two positions of padding before the longest row)
        for row, src in enumerate([2, 1]):
            placed.place(source, src, row, lengths[src])
        taken.take(source, [2, 1], 7)
        for mixer, state in placed.states.items():
            for f in dataclasses.fields(state):
                a, b = getattr(state, f.name), getattr(taken.states[mixer], f.name)
                if a is None:
                    continue
                dim = state.POSITION_DIM.get(f.name)
                if dim is None:
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
                    continue
                # the real positions (row 0's last 2, row 1's 7, ending at 9): the padding before them differs
                # (placed leaves zeros, taken brings the source's, both masked)
                for row, start in ((0, 7), (1, 2)):
                    got, want = b[row].narrow(dim - 1, start, 9 - start), a[row].narrow(dim - 1, start, 9 - start)
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(placed.valid, taken.valid) and torch.equal(placed.next_pos, taken.next_pos)
        with pytest.raises(ValueError, match=r"take: 3 row\(s\) of 7 position\(s\) do not fit"):
            taken.take(source, [0, 1, 2], 7)
        with pytest.raises(ValueError, match=r"take: 1 row\(s\) of 10 position\(s\) do not fit"):
            taken.take(source, [0], 10)


def joined_errors(pattern: str, device: str, length: int, steps: int, graph: bool) -> tuple[float, float]:
    """A bf16 model decodes one sequence in row 0 of a two-row cache (100 tokens, at most half of ``length``,
    prefilled alone and placed, then 5 steps); a second one of ``length - steps`` tokens, prefilled alone, joins in row 1 (padding put in front of
    the running row, so that its positions end at the offset), and both decode ``steps`` steps, eager or
    replayed from a CUDA graph. Returns the relative errors against the float64 forward of the same rounded
    weights of the joined row's decoded logits and of the full bf16 forward's."""
    cfg = ModelConfig(pattern=pattern, **REALISTIC)
    model = HybridLM(cfg, seed=3, device=device).cast(torch.bfloat16).eval()
    reference = copy.deepcopy(model).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=gen).to(device)
    first = min(100, length // 2)  # the running row's prompt
    other = torch.randint(0, cfg.vocab_size, (1, first + 5 + steps), generator=gen).to(device)
    with torch.no_grad():
        want = reference(ids).logits[0, -steps:]
        full = model(ids).logits[0, -steps:]
        batch = InferenceCache.for_model(model, 2, length + 8)
        alone = InferenceCache.for_model(model, 1, first)
        model(other[:, :first], cache=alone)
        batch.shift(first)
        batch.place(alone, 0, 0, first)
        batch.release(1)
        for t in range(first, first + 5):
            model(torch.stack([other[:, t], other[:, t]]), cache=batch)  # (row 1 decodes what it is given, unread)
        alone = InferenceCache.for_model(model, 1, length - steps)
        model(ids[:, : length - steps], cache=alone)
        batch.shift(length - steps - batch.offset)
        batch.place(alone, 0, 1, length - steps)
        step = GraphedDecodeStep(model, batch) if graph else (lambda x: model(x, cache=batch).logits[:, -1])
        got = [step(torch.stack([other[:, first + 5 + t], ids[:, length - steps + t]]))[1] for t in range(steps)]
    return rel_err(torch.stack(got), want), rel_err(full, want)


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("pattern", BF16_PATTERNS)
def test_a_bf16_row_joining_at_4096_tokens_is_as_close_to_float64_as_the_full_forward_on_gpu(pattern, graph):
    """A 4,088-token prompt prefilled alone and joined to a running batch (the GPU kernels, realistic head sizes)
    decodes within 1.5x the full bf16 forward's error against float64, plus half a bf16 rounding of the logits,
    eager or replayed from a CUDA graph (the static step's mask over the joined row's padding)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    err_joined, err_full = joined_errors(pattern, "cuda", 4096, 8, graph)
    print(f"{pattern} bf16, joined at 4096 tokens: {err_joined:.3g}, full forward {err_full:.3g} (relative to float64)")
    assert err_joined <= 1.5 * err_full + 2e-3, (err_joined, err_full)


@pytest.mark.parametrize("pattern", BF16_PATTERNS)
def test_a_bf16_row_joining_is_as_close_to_float64_as_the_full_forward_on_cpu(pattern):
    """The same check as the GPU one at a short length on the CPU's torch paths."""
    err_joined, err_full = joined_errors(pattern, "cpu", 48, 4, False)
    assert err_joined <= 1.5 * err_full + 2e-3, (err_joined, err_full)


@pytest.mark.gpu
def test_continuous_batching_with_cuda_graphs_takes_the_tokens_of_the_static_eager_step_on_gpu(monkeypatch):
    """The same joins (prompts of up to 30 tokens prefilled 8 per step) and departures with the decode step replayed
    from a CUDA graph (one capture: the graphed batch keeps its 4 slots and its 64 positions) and run eagerly with the
    static step's shapes (the cache copied into another as the slots change): the same tokens; in float32 those of
    each row alone."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = HybridLM(tiny_config("M[*-]G-", position_embedding="rope"), seed=1, device="cuda").eval()
    ps = prompts(5, 30, 8, 2, 17, 6, 7, seed=5)
    limits = [3, 4, 12, 2, 3, 9, 2]
    outs = {}
    for graph in (True, False):
        monkeypatch.setattr(InferenceCache, "static", not graph)
        with torch.no_grad():
            batch = DecodeBatch(model, 1, 0, Sampler(), cuda_graph=graph, max_slots=4, join_chunk=8)
            rows = batch.admit(ps[:1], limits[:1], [None])
            batch.step()
            rows += batch.admit(ps[1:3], limits[1:3], [None] * 2)
            batch.step()
            rows += join_as_room_frees(batch, ps, limits, list(range(3, len(ps))))
        outs[graph] = [row.out for row in rows]
        assert (batch.graphs.captures == 1 and batch.grown == 0) if graph else batch.grown >= 3
    assert outs[True] == outs[False]
    assert outs[True] == [generate(model, p, n) for p, n in zip(ps, limits)]


def test_a_batch_run_with_grad_mode_on_builds_no_graph():
    """A serving worker's thread has grad mode on (it is per thread): a batch admitted and stepped there, of a model
    whose weights require grad, holds no autograd graph in its logits or cache (which kept every step's activations
    alive for as long as the batch ran, until the GPU ran out of memory), nor in the states its on_end is given."""
    model = HybridLM(tiny_config("M[*-]G", position_embedding="rope"), seed=0).eval()
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    ended = []
    batch = DecodeBatch(
        model, 2, 0, Sampler(), max_slots=2, join_chunk=2, on_end=lambda t, cache, slot, logits: ended.append(logits)
    )
    batch.admit([[5, 6, 7]], [3], [None])
    batch.step()
    batch.admit([[1, 2, 3, 4, 5]], [4], [None])  # (joins in chunks, between steps)
    while batch.live:
        batch.step()
        states = [t for state in batch.cache.states.values() for _, t, _ in _tensors(state, state)]
        assert len(states) >= 5 and not batch.logits.requires_grad and not any(t.requires_grad for t in states)
    assert len(ended) == 2 and not any(t.requires_grad for t in ended)


def test_rows_of_other_samplers_share_a_batch_each_picked_by_its_own():
    """Greedy rows, rows sampled at top_k 1 (greedy again, through the sampling path) and penalized rows in one
    batch, joined at different steps: each row's tokens are those generate gives it alone with its settings."""
    model = model64("M*G")
    ps = prompts(4, 7, 3, 5, seed=8)
    settings = [{}, {"temperature": 1.0, "top_k": 1}, {"repetition_penalty": 1.4}, {"repetition_penalty": 1.4}]
    samplers = [Sampler(**s) for s in settings[:3]]
    with torch.no_grad():
        batch = DecodeBatch(model, 4, 0, Sampler(), max_slots=4)
        rows = batch.admit(ps[:2], [9, 9], [None, None], samplers=samplers[:2])
        batch.step()
        rows += batch.admit(ps[2:], [6, 8], [None, None], samplers=[samplers[2], samplers[2]])
        while batch.live:
            batch.step()
    for row, prompt, kw in zip(rows, ps, settings):
        assert row.out == generate(model, prompt, len(row.out), **kw)
    assert [len(row.out) for row in rows] == [9, 9, 6, 8]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_prompt_joins_in_chunks_while_the_others_decode(static, monkeypatch):
    """With ``join_chunk`` 3, an 11-token prompt admitted while A decodes is prefilled 3 tokens per step: A takes a
    token at each of those steps, and the prompt joins (its slot given) at the step that prefills its last chunk,
    taking its first token there. Both decode as they would alone."""
    monkeypatch.setattr(InferenceCache, "static", static)
    model = model64("M+G-")
    a, b = prompts(5, 11, seed=9)
    with torch.no_grad():
        batch = DecodeBatch(model, 2, 0, Sampler(), max_slots=2, join_chunk=3)
        (ra,) = batch.admit([a], [12], [None])
        batch.step()
        (rb,) = batch.admit([b], [6], [None])
        assert rb.slot is None and batch.room == 0
        for made in (2, 3, 4):  # B's chunks [0, 3), [3, 6), [6, 9)
            batch.step()
            assert len(ra.out) == made and rb.slot is None and not rb.out
        batch.step()  # [9, 11): B joins and takes its first token with A's fifth
        assert len(ra.out) == 5 and rb.slot is not None and len(rb.out) == 1
        while batch.live:
            check_logits(model, batch)
            batch.step()
    assert ra.out == generate(model, a, 12) and rb.out == generate(model, b, 6)


def test_a_joining_prompt_left_alone_is_prefilled_whole_at_the_next_step():
    """When every decoding row has ended, a prompt still joining in chunks is prefilled to its end at once (there is
    nobody to interleave with) and decodes from that step."""
    model = model64("M*")
    a, b = prompts(3, 20, seed=10)
    with torch.no_grad():
        batch = DecodeBatch(model, 2, 0, Sampler(), max_slots=2, join_chunk=4)
        (ra,) = batch.admit([a], [2], [None])
        batch.step()
        (rb,) = batch.admit([b], [3], [None])
        batch.step()  # A's last token, B's first chunk
        assert len(ra.out) == 2 and rb.slot is None
        batch.step()  # B's 16 other tokens at once, and its first token
        assert rb.slot is not None and len(rb.out) == 1
        while batch.live:
            batch.step()
    assert rb.out == generate(model, b, 3)


def test_a_prompt_that_cannot_join_is_dropped_with_a_join_error_and_the_batch_goes_on(monkeypatch):
    from hybridlm.infer import decode

    model = model64("M*")
    a, b = prompts(3, 9, seed=11)
    with torch.no_grad():
        batch = DecodeBatch(model, 2, 0, Sampler(), max_slots=2, join_chunk=4)
        (ra,) = batch.admit([a], [6], [None])
        (rb,) = batch.admit([b], [3], [None])
        prefill = decode._Joining.prefill
        monkeypatch.setattr(decode._Joining, "prefill", lambda self, model, size: 1 / 0)
        with pytest.raises(decode.JoinError, match="ZeroDivisionError") as caught:
            batch.step()
        assert caught.value.rows == [rb] and not batch.joining and batch.room == 1
        monkeypatch.setattr(decode._Joining, "prefill", prefill)
        while batch.live:
            batch.step()
    assert ra.out == generate(model, a, 6) and not rb.out


def test_a_released_row_stays_padding_through_shifts_and_later_steps():
    """A row that ended keeps decoding with the others (on a GPU its slot stays until the batch shrinks): after
    positions are dropped, the positions rolled in past the offset are padding for it, real for a live row. They
    were made real for every row, and a later drop over them was refused as dropping real tokens."""
    model = model64("M*")
    with torch.no_grad():
        cache = InferenceCache.for_model(model, 2, 16)
        model(torch.tensor(prompts(6, 6, seed=12)), cache=cache)
        cache.release(1)
        alone = InferenceCache.for_model(model, 1, 4)
        model(torch.tensor([[1, 2]]), cache=alone)
        cache.place(alone, 0, 0, 2)
        cache.shift(-4)
        for _ in range(3):
            model(torch.tensor([[5], [5]]), cache=cache)
        assert cache.offset == 5 and not cache.valid[1].any() and cache.valid[0, :5].all()
        cache.release(0)
        cache.shift(-5)  # every row ended: all positions dropped
        assert cache.offset == 0


@pytest.mark.parametrize("power_of_two", [True, False], ids=["power-of-two", "exact"])
def test_a_long_stream_of_rows_joining_and_leaving_decodes_each_as_alone(power_of_two):
    """24 rows of random prompt lengths and limits arrive a few at a time (some in chunks) into four slots, end at
    their limits or at an end-of-text id, and leave their slots to later ones: positions are dropped, slots freed
    and taken again, the cache grows and shrinks. At every step each live row's logits are its full forward's, and
    each row's tokens are those it takes alone."""
    model = model64("M+G-")
    rng = torch.Generator().manual_seed(13)
    lengths = torch.randint(1, 14, (24,), generator=rng).tolist()
    limits = torch.randint(1, 12, (24,), generator=rng).tolist()
    arrivals = torch.randint(0, 3, (24,), generator=rng).tolist()  # steps before each next row is sent
    ps = [torch.randint(0, 97, (n,), generator=rng).tolist() for n in lengths]
    eos = 7
    rows, waiting, clock = [], list(range(24)), 0
    with torch.no_grad():
        batch = DecodeBatch(model, 1, 0, Sampler(), (eos,), max_slots=4, power_of_two=power_of_two, join_chunk=5)
        due = 0
        while waiting or batch.live:
            ready = [i for i in waiting[: batch.room] if clock >= due]
            if ready:
                rows += batch.admit([ps[i] for i in ready], [limits[i] for i in ready], [None] * len(ready))
                waiting = waiting[len(ready) :]
                due = clock + arrivals[ready[-1]]
            if batch.live:
                check_logits(model, batch)
                batch.step()
            clock += 1
    assert len(rows) == 24 and batch.grown >= 3
    for row, i in zip(rows, range(24)):
        assert row.out == generate(model, ps[i], limits[i], eos_id=eos), i
