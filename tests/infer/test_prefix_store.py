"""Prefixes kept across calls (`hybridlm serve`'s prefix cache): a later prompt that begins with a kept prefix runs
only its rest, and still scores and decodes as it does alone (float64 full forwards, every cached state kind)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.infer import logprobs, prefixes
from hybridlm.infer.prefix_store import PrefixStore
from tests.helpers import record_forwards
from tests.infer.test_decode import PATTERNS, model64
from tests.infer.test_generate import reference_logprobs
from tests.infer.test_logprobs import decodes_as_alone

HEAD = [5, 17, 3, 9, 9, 40, 2, 81, 7, 30, 31, 4]  # 12 tokens: a shared prefix at the test's threshold of 5


@pytest.fixture
def counted(monkeypatch):
    """The (rows, positions) of each forward the model runs."""
    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 5)
    return record_forwards(monkeypatch, model64("M-"))  # (every HybridLM's: the class's forward is wrapped)


def check_scores(model, prompts, scored, k: int = 2) -> None:
    """Each prompt's scores are its float64 full forward's: every token's logprob and top k."""
    for prompt, row in zip(prompts, scored, strict=True):
        reference = reference_logprobs(model, prompt)
        assert len(row) == len(prompt) and row[0] is None
        for i, s in enumerate(row[1:]):
            torch.testing.assert_close(s.logprob, float(reference[i, prompt[i + 1]]), rtol=0, atol=1e-10)
            assert [t for t, _ in s.top] == reference[i].topk(k).indices.tolist() and len(s.top) == k


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_prompt_that_begins_with_a_kept_prefix_runs_only_its_rest(pattern, counted):
    """Two prompts of one call share HEAD: it runs once and is kept. Later prompts that begin with it run only their
    rests (scored, and unscored), yet score and decode as alone; one that shares more with a recent prompt than the
    kept prefix runs the difference from the kept state and keeps the longer prefix too."""
    model = model64(pattern)
    store = PrefixStore(capacity=4)
    first = [[*HEAD, 50, 51], [*HEAD, 60]]
    scored, cache, last = logprobs.prefill_scored(model, first, 2, store)
    check_scores(model, first, scored)
    decodes_as_alone(model, first, cache, last, 3)
    assert list(store.entries) == [tuple(HEAD)] and store.hits == 0
    counted.clear()
    later = [[*HEAD, 70, 71, 72, 73, 74, 75], [1, 2, 3], [*HEAD, 8]]
    scored, cache, last = logprobs.prefill_scored(model, later, 2, store)
    # the prompt that shares nothing, then the two rests (lengths 6 and 1) from the kept state: HEAD runs no more
    assert sorted(counted) == [(1, 1), (1, 3), (1, 6)], counted
    assert store.hits == 2 and store.hit_tokens == 2 * len(HEAD)
    check_scores(model, later, scored)
    decodes_as_alone(model, later, cache, last, 3)
    # unscored (a prefill for generation): the kept, scored prefix serves it too
    counted.clear()
    cache, last = prefixes.prefill_shared(model, [[*HEAD, 90, 91]], store)
    assert [s for s in counted if s[1] > 1] == [(1, 2)], counted
    decodes_as_alone(model, [[*HEAD, 90, 91]], cache, last, 3)
    # HEAD + [70, ..., 75] is shared with a recent prompt: those 6 tokens run from HEAD's state and are kept, then
    # the rest; a prompt that shares fewer than 5 more with a recent one (HEAD + [70, 71]) runs from HEAD
    counted.clear()
    deeper = [*HEAD, 70, 71, 72, 73, 74, 75, 5, 6]
    scored, cache, last = logprobs.prefill_scored(model, [deeper], 2, store)
    assert tuple(deeper[:18]) in store.entries and counted == [(1, 6), (1, 2)], counted
    check_scores(model, [deeper], scored)
    decodes_as_alone(model, [deeper], cache, last, 3)
    counted.clear()
    deeper = [*HEAD, 70, 71, 9, 9]
    scored, cache, last = logprobs.prefill_scored(model, [deeper], 2, store)
    assert counted == [(1, 4)], counted
    check_scores(model, [deeper], scored)
    decodes_as_alone(model, [deeper], cache, last, 3)


def test_prefixes_shared_with_recent_prompts_are_found_and_kept(counted):
    """A prompt alone shares nothing in its call; the next one, alone too, shares a prefix with it: that prefix runs
    apart and is kept, and the third prompt runs only its rest. score_prompts reads and keeps them too."""
    model = model64("M+G-")
    store = PrefixStore()
    a, b, c = [*HEAD, 1, 2], [*HEAD, 3], [*HEAD, 4, 5, 6]
    assert prefixes.prefill_shared(model, [a], store) is None and store.recent[-1] == tuple(a)
    counted.clear()
    cache, last = prefixes.prefill_shared(model, [b], store)
    assert sorted(counted) == [(1, 1), (1, 12)] and list(store.entries) == [tuple(HEAD)], counted
    decodes_as_alone(model, [b], cache, last, 3)
    counted.clear()
    scored = logprobs.score_prompts(model, [c, a], 3, store)
    # scored calls need the prefix's scores: the kept entry was prefilled unscored, so HEAD runs again (and is kept
    # with its scores), once for both prompts, then their rests (score_prompts runs each prompt but its last token)
    assert sorted(counted) == [(1, 1), (1, 2), (1, 12)] and store.entries[tuple(HEAD)].k == 3, counted
    check_scores(model, [c, a], scored, 3)
    counted.clear()
    scored = logprobs.score_prompts(model, [c], 2, store)  # k 2 <= the kept 3: served
    assert counted == [(1, 2)] and store.hits >= 1, counted
    check_scores(model, [c], scored, 2)
    counted.clear()
    logprobs.score_prompts(model, [c], 4, store)  # k 4 > 3: the kept scores cannot serve it, HEAD runs
    assert sum(n for _, n in counted) == len(c) - 1, counted


def test_the_store_keeps_the_most_recently_used_and_finds_the_longest_prefix():
    from hybridlm.infer.prefix_store import Entry

    store = PrefixStore(capacity=2)

    def entry(tokens, k=None):
        return Entry(tuple(tokens), None, torch.zeros(1), [] if k is not None else None, k)

    store.put(entry([1, 2]))
    store.put(entry([1, 2, 3, 4], k=2))
    assert store.lookup([1, 2, 3, 4, 5], None).tokens == (1, 2, 3, 4)  # the longest
    assert store.lookup([1, 2, 3, 4], None).tokens == (1, 2)  # proper: a token must be left
    assert store.lookup([1, 2, 3, 4], None, proper=False).tokens == (1, 2, 3, 4)
    assert store.lookup([1, 2, 3, 4, 5], 3) is None  # neither serves k 3: (1, 2) is unscored, the other scored at 2
    assert store.lookup([1, 2, 3, 4, 5], 2).tokens == (1, 2, 3, 4)  # scored at 2: serves k <= 2
    assert store.lookup([9, 1, 2], None) is None
    store.lookup([1, 2, 7], None)  # (1, 2) used last: (1, 2, 3, 4) goes first
    store.put(entry([5, 6]))
    assert list(store.entries) == [(1, 2), (5, 6)]
    with pytest.raises(ValueError, match="capacity, positions and max_bytes must be >= 1"):
        PrefixStore(capacity=0)
    # positions: the kept prefixes' total; the least recently used go first, and one longer than all is not kept
    store = PrefixStore(capacity=8, positions=6)
    for tokens in ([1, 2], [3, 4, 5], [6, 7]):
        store.put(entry(tokens))
    assert list(store.entries) == [(3, 4, 5), (6, 7)]
    store.put(entry(range(7)))
    assert list(store.entries) == [(3, 4, 5), (6, 7)]
    # max_bytes: the kept entries' bytes (their caches' and logits'), the least recently used going first, and one
    # larger than all not kept
    store = PrefixStore(capacity=8, max_bytes=40)
    for tokens, size in (([1], 4), ([2], 3), ([3], 2)):
        store.put(Entry((tokens[0],), None, torch.zeros(size)))  # 16, 12 and 8 bytes
    assert list(store.entries) == [(1,), (2,), (3,)] and store.nbytes == 36
    store.lookup([1, 5], None)  # (1,) used last: (2,) goes first
    store.put(Entry((4,), None, torch.zeros(2)))
    assert list(store.entries) == [(3,), (1,), (4,)] and store.nbytes == 32
    store.put(Entry((5,), None, torch.zeros(11)))
    assert list(store.entries) == [(3,), (1,), (4,)]
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        PrefixStore(max_bytes=0)


def test_answers_are_dropped_before_shared_prefixes():
    """A batch's answers push out other answers, not the prefixes shared by prompts (an evaluation's few-shot prefix,
    which every batch begins with); an answer is not kept where only prefixes could make room for it."""
    from hybridlm.infer.prefix_store import Entry

    def entry(tokens, answer=False):
        return Entry(tuple(tokens), None, torch.zeros(1), answer=answer)

    store = PrefixStore(capacity=3)
    store.put(entry([1, 2]))
    for t in range(4):  # answers, each keeping its prompt [1, 2] and its tokens
        store.put(entry([1, 2, 10 + t, 20], answer=True))
    assert list(store.entries) == [(1, 2), (1, 2, 12, 20), (1, 2, 13, 20)]
    assert store.lookup([1, 2, 12, 20, 5], None).tokens == (1, 2, 12, 20)  # used: the other answer goes first
    store.put(entry([3, 4]))
    assert list(store.entries) == [(1, 2), (1, 2, 12, 20), (3, 4)]
    store.put(entry([5, 6]))
    store.put(entry([7, 8], answer=True))
    assert list(store.entries) == [(1, 2), (3, 4), (5, 6)]
    # a conversation's next answer replaces the one it begins with (not a prefix, nor another conversation's)
    store = PrefixStore(capacity=3)
    store.put(entry([1, 2]))
    store.put(entry([1, 2, 3], answer=True))
    store.put(entry([1, 9], answer=True))
    store.put(entry([1, 2, 3, 4, 5], answer=True))
    assert list(store.entries) == [(1, 2), (1, 9), (1, 2, 3, 4, 5)]
    # an answer of a kept prefix's tokens leaves the prefix (and its scores) in place
    scored = Entry((5, 6), None, torch.zeros(1), [], 3)
    store.put(scored)
    store.put(entry([5, 6], answer=True))
    assert store.entries[(5, 6)] is scored and list(store.entries)[-1] == (5, 6)
    # positions too: the answer goes before the least recently used prefix
    store = PrefixStore(capacity=8, positions=7)
    store.put(entry([1, 2]))
    store.put(entry([1, 2, 3], answer=True))
    store.put(entry([4, 5, 6]))
    assert list(store.entries) == [(1, 2), (4, 5, 6)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=6), st.booleans(), st.booleans()), max_size=30),
    st.integers(1, 4),
    st.integers(1, 12),
    st.one_of(st.none(), st.integers(4, 80)),
)
def test_random_puts_and_lookups_keep_the_stores_rules(ops, capacity, positions, max_bytes):
    """Any sequence of puts (prefixes and answers, of sizes in bytes that do not follow their lengths) and lookups:
    the bounds hold; a put entry is kept unless it is longer than the positions or larger than the bytes, or an
    answer that only a prefix's eviction would make room for; a prefix is evicted only where no answer is left; an
    answer put (that fits the bounds alone) leaves no kept answer that it begins with; a lookup gives the longest
    kept entry that the prompt properly begins with."""
    from hybridlm.infer.prefix_store import Entry

    store = PrefixStore(capacity=capacity, positions=positions, max_bytes=max_bytes)
    for tokens, answer, look in ops:
        tokens = tuple(tokens)
        if look:
            fits = [t for t in store.entries if len(t) < len(tokens) and tokens[: len(t)] == t]
            got = store.lookup(tokens, None)
            assert (got is None) == (not fits) and (got is None or len(got.tokens) == max(map(len, fits)))
            continue
        before = dict(store.entries)
        entry = Entry(tokens, None, torch.zeros(1 + 5 * sum(tokens) % 17), answer=answer)  # 4 to 68 bytes
        fits = len(tokens) <= positions and (max_bytes is None or entry.nbytes <= max_bytes)
        store.put(entry)
        kept = store.entries
        assert len(kept) <= capacity and sum(map(len, kept)) <= positions
        assert store.nbytes == sum(e.logits.nbytes for e in kept.values())
        assert max_bytes is None or store.nbytes <= max_bytes
        dropped = [t for t in before if t not in kept]
        if any(not before[t].answer for t in dropped):  # a prefix went: no answer is left, and the new one is kept
            assert not any(e.answer for e in kept.values()) and tokens in kept
        if tokens not in kept:
            assert not fits or answer
        if answer and fits:  # (a put answer replaces the answers it begins with)
            assert not any(e.answer and t != tokens and tokens[: len(t)] == t for t, e in kept.items())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_conversations_next_turn_runs_from_its_kept_answer(pattern, counted):
    """A decode batch given ``keep_answers`` keeps each row's state at its end: the prompt and every token it took
    where a next step ran for the rows still decoding, all but the last where none did. A next turn that begins with
    a prompt and its answer runs only what it adds (not the prefix it shares with the recent prompts), and scores
    and decodes as alone (float64, every cached state kind)."""
    from hybridlm.infer.decode import DecodeBatch
    from hybridlm.infer.generate import Sampler

    model = model64(pattern)
    store = PrefixStore()
    first = [[*HEAD, 50], [*HEAD, 60, 61]]
    with torch.no_grad():
        batch = DecodeBatch(model, 2, 0, Sampler(), on_end=prefixes.keep_answers(model, store))
        rows = batch.admit(first, [2, 5], [None, None])
        while batch.live:
            batch.step()
    # the first row ended while the second went on (its last token ran); the second ended the batch
    ends = [(*first[0], *rows[0].out), (*first[1], *rows[1].out[:-1])]
    assert [e for e in store.entries] == ends and all(e.answer for e in store.entries.values())
    turns = [[*ends[0], 7, 8], [*ends[1], 9]]
    counted.clear()
    cache, last = prefixes.prefill_shared(model, turns, store)
    assert sorted(counted) == [(1, 1), (1, 2)] and store.hits == 2, counted
    decodes_as_alone(model, turns, cache, last, 3)
    counted.clear()
    scored = logprobs.score_prompts(model, turns, 2, store)  # (answers keep no scores: a scored call runs them)
    check_scores(model, turns, scored)
    # generate keeps its rows' answers in the store it is given, and reads it
    from hybridlm import generate

    store = PrefixStore()
    out = generate(model, first[1], 4, prefix_store=store)
    assert list(store.entries) == [(*first[1], *out[:-1])]
    turn = [*first[1], *out, 3, 3]
    counted.clear()
    assert generate(model, turn, 3, prefix_store=store) == generate(model, turn, 3)
    assert counted[0] == (1, 3), counted  # the answer's last token and the turn's own two
    with pytest.raises(ValueError, match="prefix_store keeps and reads the cache's states"):
        generate(model, turn, 3, prefix_store=store, use_cache=False)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), max_size=9), max_size=8),
    st.lists(st.lists(st.integers(0, 2), max_size=9), max_size=4),
    st.integers(1, 3),
)
def test_the_plan_runs_each_prompt_from_a_prefix_it_shares_and_spaces_its_states_apart(prompts, others, minimum):
    """prefix_plan: each grouped prompt begins with its group's prefix (of at least minimum tokens, and has a token
    past it); every prompt that shares minimum tokens with another prompt or earlier one, and has more, is grouped;
    the states computed are the groups' prefixes and prefixes of them, shortest first, each at least minimum tokens
    past any other it begins with."""
    groups, nodes = prefixes.prefix_plan(prompts, minimum, others)
    grouped = [r for members in groups.values() for r in members]
    assert len(grouped) == len(set(grouped))
    for key, members in groups.items():
        assert len(key) >= minimum and key in nodes
        assert all(tuple(prompts[r][: len(key)]) == key and len(prompts[r]) > len(key) for r in members)
    seqs = prompts + others
    for i, p in enumerate(prompts):
        shares = any(
            j != i and len(p) > minimum and len(q) >= minimum and p[:minimum] == q[:minimum] for j, q in enumerate(seqs)
        )
        assert (i in grouped) == shares, (i, groups)
    assert [len(n) for n in nodes] == sorted(len(n) for n in nodes)
    assert all(any(key[: len(n)] == n for key in groups) for n in nodes)
    for a in nodes:
        for b in nodes:
            if len(a) < len(b) and b[: len(a)] == a:
                assert len(b) - len(a) >= minimum, (a, b)


def test_random_calls_sharing_stems_score_and_decode_as_each_prompt_alone(monkeypatch):
    """Calls of random prompts built from a few stems and branches (so prefixes nest and repeat across calls), scored
    and unscored, through one small store per seed: every prompt's scores and decoding are its float64 forward's
    alone; kept prefixes served some of them."""
    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 4)
    model = model64("M+G-")
    hits = 0
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)

        def tokens(n, gen=gen):
            return torch.randint(0, 97, (n,), generator=gen).tolist()

        def pick(n, gen=gen):
            return int(torch.randint(0, n, (1,), generator=gen))

        stems = [tokens(6) for _ in range(2)]
        branches = [[*stems[i % 2], *tokens(5)] for i in range(4)]
        store = PrefixStore(capacity=3, remember=6)
        for call in range(6):
            batch = []
            for _ in range(1 + pick(4)):
                base = [stems, branches, [[]]][pick(3)]
                batch.append([*base[pick(len(base))], *tokens(1 + pick(5))])
            if call % 2:
                cache, last = (
                    prefixes.prefill_shared(model, batch, store) or logprobs.prefill_scored(model, batch, 2)[1:]
                )
            else:
                scored, cache, last = logprobs.prefill_scored(model, batch, 2, store)
                check_scores(model, batch, scored)
            decodes_as_alone(model, batch, cache, last, 2)
        assert len(store.entries) <= 3
        hits += store.hits
    assert hits > 0


def test_off_the_cpu_a_plan_of_many_small_forwards_is_not_taken():
    """Each forward costs FORWARD_POSITIONS at least off the CPU: prompts sharing a prefix whose rests have 8
    different lengths (8 forwards) run whole instead, where they share on the CPU (a forward costs its positions);
    8 samples of a long prompt (one rest forward) share off the CPU too, 8 samples of a short one do not; with a
    store, the prefix's state is not counted (it serves later calls too)."""
    head = list(range(100))
    distinct = [[*head, *range(200, 201 + i)] for i in range(8)]  # rests of 1..8 tokens
    assert prefixes._plan(distinct, None, None, 0)[0]
    assert prefixes._plan(distinct, None, None, 512) == ({}, {}, [])
    short, long = [[*head, 7]] * 8, [[*head * 10, 7]] * 8
    # 8 x 101 positions whole (808) against the 100-token prefix and 8 rests of one token (512 + 512 at least)
    assert prefixes._cost(short, *prefixes._plan(short, None, None, 0), 512) == 1024
    assert prefixes._cost(short, {}, {}, [], 512) == 808 and not prefixes._plan(short, None, None, 512)[0]
    assert prefixes._plan(long, None, None, 512)[0]  # 8,008 whole against 1,000 + 512
    plan = prefixes._plan(short, None, None, 0)
    assert prefixes._cost(short, *plan, 512, kept=True) == 512  # (the prefix kept: only the rests count)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_an_entry_costs_its_fixed_states_and_its_positions_and_the_store_says_its_most(pattern):
    """``serve`` says at start-up the most memory its prefix cache can hold: fixed states (Mamba2's, GDN's) per entry,
    attention's keys and values per position; a kept entry holds exactly that."""
    from hybridlm.infer.cache import InferenceCache
    from hybridlm.infer.prefix_store import Entry, entry_bytes

    model = model64(pattern)
    fixed, per_position = entry_bytes(model)
    for n in (1, 7, 64):
        assert InferenceCache.for_model(model, 1, n).nbytes == fixed + n * per_position
    cache = InferenceCache.for_model(model, 2, 20)
    cache.shift(12)  # (as if 12 positions had run)
    entry = Entry.of_row(model, list(range(12)), cache, 1, torch.zeros(97, dtype=torch.float64))
    assert entry.cache.nbytes == fixed + 12 * per_position
    assert PrefixStore(3, positions=100).most_bytes(model) == 3 * fixed + 100 * per_position
    assert entry.nbytes == entry.cache.nbytes + 97 * 8  # (its float64 logits)
    assert PrefixStore(3, positions=100, max_bytes=fixed + 1).most_bytes(model) == fixed + 1
    assert (per_position > 0) == any(s in pattern for s in "*+D") and (fixed > 100) == any(s in pattern for s in "MG")
