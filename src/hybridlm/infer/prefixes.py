"""Prompts that begin alike run their shared prefixes once: the prefixes' states are computed once each, then every
prompt runs its rest from a copy of its prefix's state (:meth:`~hybridlm.infer.cache.InferenceCache.place`, exact
for every state kind: Mamba2's and Gated DeltaNet's states are fixed-size, attention's keys and values are copied by
position).

Which prefixes: each prompt's longest prefix shared with another prompt of the call or with one of a
:class:`~hybridlm.infer.prefix_store.PrefixStore`'s recent prompts (lexicographic order puts that partner next to it),
at least :data:`SHARED_PREFIX` tokens and at most all but the prompt's last token (whose logits are the prompt's
own). Prefixes that the prompts' prefixes share in turn (a few-shot task's examples under each question) are states
too, and each prefix runs from the longest state that it begins with (one kept from an earlier call, or one computed
before it in this call), in waves: a wave's prefixes of one length run as one batch. A prefix less than
:data:`SHARED_PREFIX` tokens longer than one it begins with is merged into that one: a forward of a few tokens costs
more than those tokens run once per prompt.
"""

from __future__ import annotations

import collections
import functools
import itertools

import torch

from .cache import InferenceCache
from .device import inference
from .logprobs import PREFILL_CHUNK, TokenLogprob, _scored_forward, pick_logprobs, to_host
from .prefix_store import Entry, PrefixStore

#: Prompts run together that begin with the same tokens, at least this many, run those tokens once: lm-evaluation-
#: harness sends a multiple-choice question's choices as prompts that share the question (and its few-shot examples;
#: sorted by length, then by tokens, so choices of equal length come together), a few-shot task's prompts share the
#: examples, a chat's turns share the conversation so far. Below it, the forwards the split adds cost more than the
#: tokens it saves.
SHARED_PREFIX = 64
#: A forward's cost in positions at least, off the CPU: launching a forward's kernels costs about as much as running
#: this many positions (measured for bench-1.3b on one H100 by ``benchmarks/prefill_cost.py``: 12.4 ms per forward
#: plus 333k positions per second, a forward of 1 to 4,096 positions of one row took 15 to 18 ms; docs/benchmarks.md).
#: Splitting prompts into a shared prefix and rests of several lengths means more forwards, so a plan that would cost
#: more than one forward over the whole prompts is not taken. On the CPU a forward costs its positions.
FORWARD_POSITIONS = 4096


def _common(x, y) -> int:
    return next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))


def shared_prefixes(prompts: list[list[int]], minimum: int, rest: int = 1) -> list[tuple[int, list[int]]]:
    """The prompts that begin with the same ``p`` >= ``minimum`` tokens, as (p, their indices in order), each
    prompt with at least ``rest`` tokens after its group's p (1: the last prefix position's logits predict a token of
    each prompt's own); a prompt that shares fewer with every other is in none. Prompts sorted as sequences put those
    sharing a prefix next to each other, and a run's common prefix is the least one of its neighbours': one level
    (a group whose members share more among some of them gets the least)."""
    # (a prompt too short for such a prefix and its rest would only shorten a group)
    order = sorted((i for i in range(len(prompts)) if len(prompts[i]) - rest >= minimum), key=lambda i: prompts[i])
    runs: list[tuple[int, list[int]]] = []  # (common prefix, indices) of neighbours sharing at least minimum
    for a, b in itertools.pairwise(order):
        common = _common(prompts[a], prompts[b])
        if common < minimum:
            continue
        if runs and runs[-1][1][-1] == a:
            runs[-1] = (min(runs[-1][0], common), runs[-1][1] + [b])
        else:
            runs.append((common, [a, b]))
    return [(min(common, *(len(prompts[i]) - rest for i in members)), sorted(members)) for common, members in runs]


def prefix_plan(
    prompts: list[list[int]], minimum: int, others: list[list[int]] = ()
) -> tuple[dict[tuple[int, ...], list[int]], list[tuple[int, ...]]]:
    """Which prefixes of ``prompts`` run once (see the module): (prefix -> the indices of the prompts that run their
    rests from it, the prefixes whose states are computed, shortest first: those and the prefixes they share).
    ``others``: earlier prompts, shared with but not run."""
    # (tuples: the store's recent prompts are tuples already, and tuple() of one is that one, not a copy)
    seqs = [tuple(p) for p in prompts] + [tuple(p) for p in others]
    order = sorted((i for i in range(len(seqs)) if len(seqs[i]) >= minimum), key=lambda i: seqs[i])
    near = [_common(seqs[a], seqs[b]) for a, b in itertools.pairwise(order)]
    deepest = {}  # prompt -> its longest prefix shared with another sequence (and a token after it)
    for at, i in enumerate(order):
        if i < len(prompts):
            d = min(max(near[at - 1] if at else 0, near[at] if at < len(near) else 0), len(seqs[i]) - 1)
            if d >= minimum:
                deepest[i] = tuple(seqs[i][:d])
    keys = sorted(set(deepest.values()), key=len)
    # (the prefixes the keys share: a whole key may be one, its own state then the others' start)
    nodes = set(keys) | {keys[m[0]][:c] for c, m in shared_prefixes(keys, minimum, rest=0)}
    kept: list[tuple[int, ...]] = []  # shortest first; a node within ``minimum`` of one it begins with joins it
    merged = {}
    for node in sorted(nodes, key=len):
        base = max((b for b in kept if node[: len(b)] == b), key=len, default=None)
        if base is not None and len(node) - len(base) < minimum:
            merged[node] = base
        else:
            kept.append(node)
    groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
    for i in sorted(deepest):
        groups[merged.get(deepest[i], deepest[i])].append(i)
    return dict(groups), kept


def prefill_shared(
    model: torch.nn.Module,
    prompts: list[list[int]],
    store: PrefixStore | None = None,
    chunk_size: int = PREFILL_CHUNK,
) -> tuple[InferenceCache, torch.Tensor] | None:
    """Prefill ``prompts`` (non-empty) with the prefixes they share run once (see the module): (a cache that holds
    them left-padded, as one forward over them all would, and the (B, V) logits of their last positions), which
    ``generate(prefilled=...)`` and :meth:`~hybridlm.infer.decode.DecodeBatch.admit` decode from; None where nothing
    is shared (a plain prefill costs the same). ``store``: its kept prefixes stand for their forward, its recent
    prompts are shared with, and the prefixes run are kept (the prompts are remembered even where None is
    returned). ``chunk_size``: positions per forward at most."""
    plan = _plan(prompts, None, store, _overhead(model))
    if not any(plan):
        return None
    with inference(model):
        rows = list(range(len(prompts)))
        _, cache, last = run_prompts(
            model, prompts, [p[1:] for p in prompts], None, rows, True, store, plan, chunk_size
        )
    return cache, last


def _plan(
    inputs: list[list[int]], k: int | None, store: PrefixStore | None, overhead: int = 0
) -> tuple[dict, dict, list]:
    """:func:`prefix_plan` of ``inputs`` beside the store's recent prompts, and the inputs in no group that begin
    with a kept prefix (index -> its :class:`~hybridlm.infer.prefix_store.Entry`); nothing shared where that costs
    more than one forward over them all, each forward counted as ``overhead`` positions at least
    (:func:`_cost`). The store then remembers the inputs."""
    recent = list(store.recent) if store is not None else []
    groups, nodes = prefix_plan(inputs, SHARED_PREFIX, recent)
    hits = {}
    held = {}  # each group's longest kept prefix: its state's computation starts there (_states)
    for key in list(groups):  # (a prefix less than SHARED_PREFIX past a kept one is that one, as in prefix_plan)
        entry = held[key] = None if store is None else store.lookup(key, k, proper=False)
        if entry is not None and len(key) - len(entry.tokens) < SHARED_PREFIX:
            hits.update(dict.fromkeys(groups.pop(key), entry))
    # A prompt's own kept state (a chat's last answer) stands for its group's prefix where it is at least as long.
    group_of = {r: key for key, members in groups.items() for r in members}
    for r in range(len(inputs)):
        entry = None if r in hits or store is None else store.lookup(inputs[r], k)
        if entry is not None and (r not in group_of or len(entry.tokens) >= len(group_of[r])):
            hits[r] = entry
    groups = {key: kept for key, members in groups.items() if (kept := [r for r in members if r not in hits])}
    nodes = [node for node in nodes if any(key[: len(node)] == node for key in groups)]
    if store is not None:
        store.seen(inputs)
    if (groups or hits) and _cost(inputs, groups, hits, nodes, overhead, store is not None) >= _cost(
        inputs, {}, {}, [], overhead
    ):
        groups, hits, nodes = {}, {}, []
    if store is not None:
        reused = dict.fromkeys(range(len(inputs)), 0)
        reused.update((r, len(held[key].tokens)) for key, rs in groups.items() if held[key] is not None for r in rs)
        reused.update((r, len(entry.tokens)) for r, entry in hits.items())
        store.last_kept = list(reused.values())
    return groups, hits, nodes


def _cost(inputs, groups: dict, hits: dict, nodes: list, overhead: int, kept: bool = False) -> int:
    """The positions a plan runs, each forward counted as ``overhead`` at least: the prompts run whole (one
    left-padded batch), the prefixes' states (not counted where ``kept``: kept, they serve later calls too), and the
    rests (a batch per length)."""

    def forward(rows: int, positions: int) -> int:
        return max(rows * positions, overhead) if rows else 0

    start = {r: len(key) for key, members in groups.items() for r in members}
    start.update({r: len(entry.tokens) for r, entry in hits.items()})
    alone = [len(x) for r, x in enumerate(inputs) if r not in start]
    cost = forward(len(alone), max(alone, default=0))
    if not kept:
        fresh = [n for n in nodes if not any(len(b) < len(n) and n[: len(b)] == b for b in nodes)]
        cost += forward(len(fresh), max(map(len, fresh), default=0))
        added = collections.Counter(
            len(n) - max(len(b) for b in nodes if len(b) < len(n) and n[: len(b)] == b) for n in nodes if n not in fresh
        )
        cost += sum(forward(rows, length) for length, rows in added.items())
    rests = collections.Counter(len(inputs[r]) - p for r, p in start.items())
    return cost + sum(forward(rows, length) for length, rows in rests.items())


def run_prompts(
    model: torch.nn.Module,
    inputs: list[list[int]],
    targets: list[list[int]],
    k: int | None,
    names: list[int],
    keep: bool,
    store: PrefixStore | None = None,
    plan: tuple | None = None,
    chunk_size: int = PREFILL_CHUNK,
) -> tuple[list[list[TokenLogprob]], InferenceCache | None, torch.Tensor]:
    """``_scored_forward``'s results for ``inputs`` (each scored against the next input tokens: ``targets[row][j] ==
    inputs[row][j + 1]`` where both exist; ``k`` None: nothing scored, a prefill) with their shared prefixes run once
    (see the module). The cache (``keep``; else None) holds every row left-padded, as one forward over them all
    would. ``store``: as :func:`prefill_shared`'s. ``plan``: :func:`_plan`'s for these inputs, where made already.
    ``chunk_size``: positions per forward at most, unscored."""
    groups, hits, nodes = _plan(inputs, k, store, _overhead(model)) if plan is None else plan
    if not groups and not hits:
        return _scored_forward(model, inputs, targets, k, names, chunk_size=chunk_size)
    n = len(inputs)
    scores: list[list[TokenLogprob]] = [[] for _ in inputs]
    held: list[tuple[InferenceCache, int]] = [None] * n  # type: ignore[list-item]  # the cache and row holding each
    last: list[torch.Tensor] = [None] * n  # type: ignore[list-item]  # the (V,) logits of its last position
    # (a prefix's errors name the first prompt that runs its rest from it, or from a longer one)
    first = {
        node: min((names[m[0]] for key, m in groups.items() if key[: len(node)] == node), default=0) for node in nodes
    }
    run = functools.partial(_run, chunk_size=chunk_size)
    states, kept_before = _states(model, nodes, first, k, store, hits, run)
    placed = [(r, states[key]) for key, members in groups.items() for r in members] + list(hits.items())
    if store is not None:
        used = [entry for _, entry in placed if id(entry) in kept_before]
        store.hits += len(used)
        store.hit_tokens += sum(len(entry.tokens) for entry in used)
    alone = [r for r in range(n) if r not in dict(placed)]
    if alone:
        got, cache, end = run(
            model, [names[r] for r in alone], [inputs[r] for r in alone], [targets[r] for r in alone], k
        )
        for i, r in enumerate(alone):
            scores[r], held[r], last[r] = got[i], (cache, i), end[i]
    # Every other prompt's rest from its prefix's state, the rests of one length as one batch; the prefix's last
    # logits score each one's own next token.
    by_length = collections.defaultdict(list)
    for r, entry in placed:
        scores[r] = _scores_of(entry, k, inputs[r][len(entry.tokens)])
        by_length[len(inputs[r]) - len(entry.tokens)].append((r, entry))
    for group in by_length.values():
        rows = [r for r, _ in group]
        got, cache, end = run(
            model,
            [names[r] for r in rows],
            [inputs[r] for r in rows],
            [targets[r] for r in rows],
            k,
            [e for _, e in group],
        )
        for i, r in enumerate(rows):
            scores[r] += got[i]
            held[r], last[r] = (cache, i), end[i]
    if not keep:
        return scores, None, torch.stack(last)
    P = max(len(row) for row in inputs)
    cache = InferenceCache.for_model(model, n, P)
    cache.shift(P)
    for r, (source, i) in enumerate(held):
        cache.place(source, i, r, len(inputs[r]))
    return scores, cache, torch.stack(last)


def keep_answers(model: torch.nn.Module, store: PrefixStore):
    """A :class:`~hybridlm.infer.decode.DecodeBatch`'s ``on_end`` that keeps each ended row's state in ``store`` as an
    answer (:class:`~hybridlm.infer.prefix_store.Entry` ``answer``): its prompt and the tokens the cache holds, at least
    :data:`SHARED_PREFIX` of them, so that a chat's next turn, which begins with them, runs only what it adds."""

    def on_end(tokens: list[int], cache: InferenceCache, slot: int, logits: torch.Tensor) -> None:
        if SHARED_PREFIX <= len(tokens) <= store.positions:  # (one longer than all the store holds is not copied)
            store.put(Entry.of_row(model, tokens, cache, slot, logits, answer=True))

    return on_end


def _overhead(model: torch.nn.Module) -> int:
    """:data:`FORWARD_POSITIONS` off the CPU, 0 on it (read when a call plans, so a test can set it)."""
    return 0 if next(model.parameters()).device.type == "cpu" else FORWARD_POSITIONS


def _states(model, nodes: list[tuple[int, ...]], first: dict, k: int | None, store: PrefixStore | None, hits, run):
    """The state after each prefix of ``nodes`` (shortest first), as :class:`~hybridlm.infer.prefix_store.Entry`
    objects (kept in ``store``), and the ids of those the store held already (``hits``' too). Each runs from the
    longest state it begins with, kept or computed here (in waves), else from nothing; a wave's prefixes run as one
    batch per length of what they add (those from nothing as one left-padded batch), by ``run`` (:func:`_run`)."""
    ready: dict[tuple[int, ...], Entry] = {}
    for node in nodes:
        entry = None if store is None else store.lookup(node, k, proper=False)
        if entry is not None and len(entry.tokens) == len(node):
            ready[node] = entry
    kept_before = {id(entry) for entry in ready.values()} | {id(entry) for entry in hits.values()}
    todo = [node for node in nodes if node not in ready]
    while todo:
        wave: dict[int, list] = collections.defaultdict(list)  # added length (0: from nothing) -> (node, its base)
        for node in todo:
            inner = max((b for b in nodes if len(b) < len(node) and node[: len(b)] == b), key=len, default=None)
            outer = None if store is None else store.lookup(node, k)
            if inner is not None and inner not in ready and (outer is None or len(outer.tokens) < len(inner)):
                continue  # (its base is computed in a later wave)
            base = ready[inner] if inner is not None and inner in ready else None
            if outer is not None and (base is None or len(outer.tokens) > len(base.tokens)):
                base = outer
            wave[0 if base is None else len(node) - len(base.tokens)].append((node, base))
        for added, members in wave.items():
            bases = None if added == 0 else [base for _, base in members]
            seqs = [list(node) for node, _ in members]
            got, cache, end = run(
                model, [first.get(node, 0) for node, _ in members], seqs, [s[1:] for s in seqs], k, bases
            )
            for i, (node, base) in enumerate(members):
                before = [] if base is None else _scores_of(base, k, node[len(base.tokens)])
                ready[node] = Entry.of_row(model, node, cache, i, end[i], before + got[i], k)
                if store is not None:
                    store.put(ready[node])
        todo = [node for node in todo if node not in ready]
    return ready, kept_before


def _run(model, names, seqs, goals, k, bases: list[Entry] | None = None, chunk_size: int = PREFILL_CHUNK):
    """``_scored_forward`` of ``seqs[i]`` past ``bases[i]``'s tokens (which it begins with; then all of one length
    past them), from a copy of their states, scored against ``goals[i]`` from there; ``bases`` None: whole."""
    if bases is None:
        return _scored_forward(model, seqs, goals, k, names, chunk_size=chunk_size)
    cut = [len(base.tokens) for base in bases]
    front = max(cut)  # (shorter prefixes left-padded to the longest)
    cache = InferenceCache.for_model(model, len(seqs), front + len(seqs[0]) - cut[0])
    cache.shift(front)
    for i, (base, p) in enumerate(zip(bases, cut)):
        cache.place(base.cache, 0, i, p)
    rests, ends = [s[p:] for s, p in zip(seqs, cut)], [t[p:] for t, p in zip(goals, cut)]
    return _scored_forward(model, rests, ends, k, names, cache, cut, chunk_size)


def _scores_of(entry: Entry, k: int | None, following: int) -> list[TokenLogprob]:
    """A prefix's scores at ``k`` (each its k most likely), then the score of ``following``, the token after it,
    from its last logits; none where nothing is scored."""
    if k is None:
        return []
    goal = torch.tensor([following], device=entry.logits.device)
    return [s.most_likely(k) for s in entry.scores] + to_host(
        *(t.tolist() for t in pick_logprobs(entry.logits[None], goal, k))
    )
