"""Decode caches kept with their CUDA graphs (``DecodeGraphs``): a later batch of a kept shape replays the graph
already captured, and decodes as a batch in a new cache does.

On the CPU the capture is replaced by :class:`EagerStep`, which runs the static step a graph records (the whole
buffer, masked) eagerly: what is kept, reused, emptied and dropped is the same; the GPU tests replay real graphs."""

import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.infer import cuda_graph
from hybridlm.infer.batching import BatchWorker
from hybridlm.infer.cache import InferenceCache, _tensors
from hybridlm.infer.cuda_graph import DecodeGraphs
from hybridlm.infer.decode import DecodeBatch
from hybridlm.infer.generate import Sampler
from tests.helpers import tiny_config
from tests.infer.test_batching import TOKENIZER, events, request, solo
from tests.infer.test_decode import PATTERNS, join_as_room_frees, model64, prompts


class EagerStep:
    """What :class:`~hybridlm.infer.cuda_graph.GraphedDecodeStep` replays, run eagerly (no CUDA here): the cache's
    static step."""

    def __init__(self, model, cache: InferenceCache) -> None:
        self.model, self.cache = model, cache
        cache.static = True

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, cache=self.cache, logits_to_keep=1).logits[:, -1]


@pytest.fixture
def eager_capture(monkeypatch):
    monkeypatch.setattr(cuda_graph, "GraphedDecodeStep", EagerStep)


def state_tensors(cache: InferenceCache) -> list[torch.Tensor]:
    return [t for state in cache.states.values() for _, t, _ in _tensors(state, state)]


def decode(model, graphs: DecodeGraphs, rows: list[list[int]], limits: list[int], max_slots: int | None = None):
    """Rows admitted together into a graphed batch, stepped to their end, the batch closed: their tokens, and the
    batch (its cache given back)."""
    batch = DecodeBatch(model, len(rows), 0, Sampler(), cuda_graph=True, graphs=graphs, max_slots=max_slots)
    with torch.no_grad():
        out = batch.admit(rows, limits, [None] * len(rows))
        while batch.live:
            batch.step()
    batch.close()
    return [row.out for row in out], batch


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_cleared_cache_holds_what_a_new_one_holds_in_the_same_tensors(pattern):
    """``clear`` empties a used cache in place (the graph captured over its tensors stays valid): every state zero,
    no position, no padding, and a forward into it gives what a forward into a new cache gives."""
    model = model64(pattern)
    used = InferenceCache.for_model(model, 2, 16)
    with torch.no_grad():
        used.set_padding(torch.tensor([[False, True, True], [True, True, True]]))
        model(torch.tensor([[0, 4, 5], [6, 7, 8]]), cache=used)
        used.release(0)
        before = [t.data_ptr() for t in state_tensors(used)]
        assert any(bool(t.any()) for t in state_tensors(used)) and used.has_padding
        used.clear()
        assert [t.data_ptr() for t in state_tensors(used)] == before
        new = InferenceCache.for_model(model, 2, 16)
        for a, b in zip(state_tensors(used), state_tensors(new), strict=True):
            assert torch.equal(a, b)
        assert (used.offset, int(used.offset_t), used.has_padding, used.trail) == (0, 0, False, None)
        assert torch.equal(used.valid, new.valid) and torch.equal(used.next_pos, new.next_pos)
        ids = torch.tensor([[9, 10, 11, 12], [13, 14, 15, 16]])
        torch.testing.assert_close(model(ids, cache=used).logits, model(ids, cache=new).logits, rtol=0, atol=0)


def test_a_later_batch_of_a_kept_shape_replays_the_graph_and_decodes_as_in_a_new_cache(eager_capture):
    """Two batches of one shape (3 rows rounded to 4 slots, positions to 64): the second takes the first's cache,
    emptied, and its step (one capture for both), and gives the tokens it gives in a cache of its own and those each
    row takes alone."""
    model = model64("[M-]G*")
    graphs = DecodeGraphs(model)
    first, batch = decode(model, graphs, prompts(5, 9, 3), [4, 6, 2])
    assert (len(batch.rows), graphs.captures, graphs.entries) == (4, 1, 1)
    later = prompts(7, 2, 11, seed=8)
    again, _ = decode(model, graphs, later, [5, 3, 6])
    assert (graphs.captures, graphs.reused, graphs.entries) == (1, 1, 1)
    alone, _ = decode(model, DecodeGraphs(model), later, [5, 3, 6])
    assert again == alone == [generate(model, p, n) for p, n in zip(later, [5, 3, 6])]
    assert first == [generate(model, p, n) for p, n in zip(prompts(5, 9, 3), [4, 6, 2])]


def test_batches_whose_rows_and_positions_round_alike_capture_once(eager_capture):
    """Batches as ``generate(graphs=...)`` runs them (a server's static batches, a chat's turns; ``generate`` itself
    is CUDA-only with a graph): those whose rows and positions round to one shape capture once, another shape its
    own; the tokens are those of generate without a graph."""
    model = model64("M*G-")
    graphs = DecodeGraphs(model)
    calls = [(prompts(10, 20), 8), (prompts(30, 4, seed=5), 12), (prompts(70), 8)]
    for rows, n in calls:
        got, _ = decode(model, graphs, rows, [n] * len(rows))
        assert got == [generate(model, p, n) for p in rows]
    # 2 rows x 64 positions twice, then 1 row x 128
    assert (graphs.captures, graphs.reused) == (2, 1)
    assert sorted(graphs.kept) == [(1, 128), (2, 64)]


def test_graphs_keep_the_most_recent_caches_up_to_keep(eager_capture):
    model = model64("M*")
    graphs = DecodeGraphs(model, keep=2)
    for rows in ([[1]], [[1], [2]], [[1], [2], [3]]):  # slots 1, 2 and 4
        decode(model, graphs, rows, [2] * len(rows))
    assert list(graphs.kept) == [(2, 64), (4, 64)] and graphs.nbytes == sum(
        cache.nbytes for pairs in graphs.kept.values() for cache, _ in pairs
    )
    decode(model, graphs, [[1], [2]], [2, 2])  # (2, 64) reused, and the most recently kept again
    assert list(graphs.kept) == [(4, 64), (2, 64)] and graphs.captures == 3
    none = DecodeGraphs(model, keep=0)
    decode(model, none, [[1]], [2])
    decode(model, none, [[1]], [2])
    assert none.entries == 0 and none.captures == 2
    with pytest.raises(ValueError, match="keep must be an integer >= 0"):
        DecodeGraphs(model, keep=-1)


def test_kept_caches_are_dropped_when_a_new_one_does_not_fit(eager_capture, monkeypatch):
    """Out of memory allocating a new cache: the kept ones are dropped and the allocation is tried once more; with
    nothing kept, the error is raised."""
    model = model64("M*")
    graphs = DecodeGraphs(model)
    decode(model, graphs, [[1]], [2])
    assert graphs.entries == 1
    real, fails = InferenceCache.for_model, [1]

    def tight(cls, *args, **kwargs):
        if fails and graphs.entries:
            fails.pop()
            raise torch.OutOfMemoryError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(InferenceCache, "for_model", classmethod(tight))
    cache, step = graphs.take(2, 64)
    assert (cache.batch, cache.max_len, step, graphs.entries) == (2, 64, None, 0)

    def no_room(cls, *args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(InferenceCache, "for_model", classmethod(no_room))
    with pytest.raises(torch.OutOfMemoryError):
        graphs.take(4, 64)


def test_kept_caches_are_dropped_when_a_capture_runs_out_of_memory(eager_capture, monkeypatch):
    """A capture that runs out of memory (the graph's own pool of activations) drops the kept caches and captures
    again; any other capture failure, or one with nothing kept to drop, is raised."""
    model = model64("M*")
    graphs = DecodeGraphs(model)
    decode(model, graphs, [[1]], [2])
    failures = []

    def failing(model, cache):
        if failures:
            cause = failures.pop()
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed ({cause})") from cause
        return EagerStep(model, cache)

    monkeypatch.setattr(cuda_graph, "GraphedDecodeStep", failing)
    failures.append(torch.OutOfMemoryError("out of memory"))
    cache, _ = graphs.take(2, 64)
    assert graphs.entries == 1 and isinstance(graphs.capture(cache), EagerStep) and graphs.entries == 0
    failures.append(torch.OutOfMemoryError("out of memory"))
    with pytest.raises(RuntimeError, match="capturing the decode step"):  # (nothing kept to drop)
        DecodeGraphs(model).capture(cache)
    decode(model, graphs, [[1]], [2])
    failures.append(ValueError("not capturable"))
    with pytest.raises(RuntimeError, match="capturing the decode step"):
        graphs.capture(cache)
    assert graphs.entries == 1


def test_a_graphed_continuous_batch_keeps_its_slots_and_captures_once_per_shape(eager_capture):
    """Continuous batching with CUDA graphs: rows join and leave a batch of ``max_slots`` slots that never shrinks,
    its positions a power of two, so that the seven rows below capture one graph (eagerly, the batch grows and
    shrinks three times or more); a second run of the batch, given the same graphs, captures none. Each row's tokens
    are those it takes alone."""
    model = HybridLM(tiny_config("M[*-]G-", position_embedding="rope"), seed=1).eval().to(torch.float64)
    ps = prompts(5, 30, 8, 2, 17, 6, 7, seed=5)
    limits = [3, 4, 12, 2, 3, 9, 2]
    graphs = DecodeGraphs(model)

    def run(graph: bool) -> tuple[list[list[int]], DecodeBatch, set[int]]:
        batch = DecodeBatch(
            model,
            1,
            0,
            Sampler(),
            cuda_graph=graph,
            graphs=graphs if graph else None,
            max_slots=4,
            join_chunk=8,
            power_of_two=True,
        )
        with torch.no_grad():
            rows = batch.admit(ps[:1], limits[:1], [None])
            sizes = {len(batch.rows)}
            batch.step()
            rows += batch.admit(ps[1:3], limits[1:3], [None] * 2)

            def seen() -> None:
                sizes.add(len(batch.rows))
                assert not graph or batch.cache.max_len == 64

            rows += join_as_room_frees(batch, ps, limits, list(range(3, len(ps))), seen)
        batch.close()
        return [row.out for row in rows], batch, sizes

    eager, batch, sizes = run(False)
    assert batch.grown >= 3 and len(sizes) >= 2
    graphed, batch, sizes = run(True)
    assert sizes == {4} and graphs.captures == 1 and batch.grown == 0
    assert graphed == eager == [generate(model, p, n) for p, n in zip(ps, limits)]
    run(True)
    assert graphs.captures == 1 and graphs.reused >= 1


def test_close_refuses_a_batch_that_still_holds_rows_and_generate_refuses_graphs_it_cannot_use(eager_capture):
    model = model64("M*")
    batch = DecodeBatch(model, 1, 0, Sampler(), cuda_graph=True)
    with torch.no_grad():
        batch.admit([[1, 2]], [3], [None])
    with pytest.raises(ValueError, match="still holds rows"):
        batch.close()
    graphs = DecodeGraphs(model)
    with pytest.raises(ValueError, match="needs cuda_graph=True"):
        generate(model, [1, 2], 3, graphs=graphs)
    other = model64("M*")
    with pytest.raises(ValueError, match="cuda_graph needs the model on a CUDA device"):
        generate(other, [1, 2], 3, cuda_graph=True, graphs=graphs)


def test_a_continuous_worker_captures_each_shape_once_over_its_batches(eager_capture):
    """``hybridlm serve --cuda-graph --continuous-batching``: two bursts of requests, each its own batch (the first
    drained before the second came), replay one graph; ``/metrics`` counts the capture and the kept cache."""
    model = HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0).eval()
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, cuda_graph=True, continuous=True)
    for burst in (["hello", "world"], ["again", "and", "more"]):
        jobs = [worker.submit(request({"prompt": p, "max_tokens": 5}, batch=4)) for p in burst]
        while worker.step():
            pass
        for job, prompt in zip(jobs, burst):
            assert events(job)[-1][0] == "done"
            assert job.rows[0].completion.text == TOKENIZER.decode(solo(model, prompt, 5))
    metrics = {name: value for name, _, _, value in worker.metrics()}
    assert worker.batches == 2 and metrics["batches_total"] == 2
    assert metrics["decode_graph_captures_total"] == 1 and metrics["decode_graphs_kept"] == 1


@pytest.mark.gpu
def test_generate_replays_kept_graphs_with_the_tokens_of_eager_decoding_on_gpu():
    """Real CUDA graphs, float32: four ``generate`` calls given one ``DecodeGraphs`` (2 rows x 64 positions twice, 1 x
    128, 3 rows in 4 slots x 64) capture three graphs and replay one kept, and every call takes the tokens of eager
    decoding; a continuous batch run twice over one ``DecodeGraphs`` captures once."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = HybridLM(tiny_config("M[*-]G-", position_embedding="rope"), seed=1, device="cuda").eval()
    graphs = DecodeGraphs(model)
    calls = [(prompts(10, 20), 8), (prompts(30, 4, seed=5), 12), (prompts(70), 8), (prompts(3, 9, 5, seed=6), 5)]
    for rows, n in calls:
        assert generate(model, rows, n, cuda_graph=True, graphs=graphs) == generate(model, rows, n)
    assert (graphs.captures, graphs.reused) == (3, 1)
    assert sorted(graphs.kept) == [(1, 128), (2, 64), (4, 64)]
    ps, limits = prompts(5, 30, 8, 2, 17, seed=5), [3, 4, 12, 2, 9]
    continuous = DecodeGraphs(model)
    for _ in range(2):
        batch = DecodeBatch(model, 1, 0, Sampler(), cuda_graph=True, graphs=continuous, max_slots=4, join_chunk=8)
        rows = batch.admit(ps[:2], limits[:2], [None] * 2)
        with torch.no_grad():  # (4 slots: the fifth waits for room)
            rows += join_as_room_frees(batch, ps, limits, [2, 3, 4])
        batch.close()
        assert [row.out for row in rows] == [generate(model, p, n) for p, n in zip(ps, limits)]
    assert continuous.captures == 1 and continuous.reused >= 1


def test_a_batch_that_runs_out_of_memory_drops_the_kept_caches_for_the_next(eager_capture):
    """A batch that fails for want of memory (here the static batch's generate; or an error raised from one) is
    answered with 500, and the caches the worker kept are dropped, so that the next batch has their memory; another
    failure keeps them."""
    model = HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0).eval()
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, cuda_graph=True)
    joined = RuntimeError("prefill failed")
    joined.__cause__ = torch.OutOfMemoryError("out of memory")
    for error, kept in ((RuntimeError("boom"), 1), (torch.OutOfMemoryError("out of memory"), 0), (joined, 0)):
        if worker.graphs.entries == 0:
            decode(model, worker.graphs, [[1]], [2])

        def failing(*args, error=error, **kwargs):
            raise error

        worker.generate = failing
        job = worker.submit(request({"prompt": "hi", "max_tokens": 3}, batch=4))
        while worker.step():
            pass
        assert events(job)[-1][0] == "error" and worker.graphs.entries == kept
