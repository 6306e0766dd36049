"""The batching worker of ``hybridlm serve``: one thread owns the model, HTTP handler threads hand it requests.

Generation is not thread-safe (a model runs one cache at a time), so a single thread runs every ``generate`` call.
Each round it takes what is queued, picks the rows whose sampling settings equal those of the oldest waiting row
(one ``generate`` call has one set: temperature, top_k, top_p, min_p, seed, the penalties, the logit bias), at most
``max_batch_size`` of them, and runs them as one left-padded batch; ``max_new_tokens`` is the batch's largest
``max_tokens`` and each row stops at its own through the token callback. This is static batching (this class's default; ``hybridlm serve
--no-continuous-batching``): a request that arrives while a batch runs waits for the whole batch to end.

With ``continuous`` (``hybridlm serve``'s default) the worker keeps one
:class:`~hybridlm.infer.decode.DecodeBatch` running and, before each of its decode steps, admits the waiting rows
that fit (at most ``max_batch_size`` rows decode at once): a joining prompt is prefilled on its own,
:data:`JOIN_CHUNK` tokens per step of the batch, and its state copied into a free slot; a row that ends frees its
slot at once, and the batch's slots follow its rows' count (exactly on the CPU, as a power of two on a GPU). Rows
of any sampling settings share the batch, each settings' rows picked by a sampler of their own. Each row's tokens
are those it takes alone, up to float rounding (batch sizes change the kernels' sums).

A request whose client seeded its sampling runs in batches of its own: one batch draws from one generator, so
another request's rows would change its samples. As in ``hybridlm generate``, its rows past ``max_batch_size``
draw from ``seed`` plus the index of their batch's first row; it runs in a static batch in either mode (its samples
are then ``hybridlm generate``'s with that seed): with continuous batching, once the running batch has drained, and
rows queued after it do not join that batch meanwhile (a steady stream would hold it back for ever).

A request with ``logprobs`` has its batch's ``generate`` report them (the largest k of the batch's rows; each row keeps
its own k most likely, and the rows that did not ask drop theirs); with ``echo`` too, its prompt is scored first, the
batch's echoed prompts in one padded forward (:func:`~hybridlm.infer.logprobs.score_prompts`); where they are all
the batch's prompts that go on (lm-evaluation-harness's loglikelihood requests), that forward is their prefill too
(:func:`~hybridlm.infer.logprobs.prefill_scored`), so they run through the model once. A row with ``max_tokens`` 0
(echo only) ends there, unbatched. Prompts run together that begin with the same
:data:`~hybridlm.infer.prefixes.SHARED_PREFIX` tokens or more (a few-shot task's, a question's choices) run those
once (:func:`~hybridlm.infer.prefixes.prefill_shared`; with continuous batching such joiners are prefilled whole at
admission, not chunk by chunk), and the worker's :class:`~hybridlm.infer.prefix_store.PrefixStore` (``prefix_cache``)
keeps such prefixes' states for later batches: a prompt that begins with a kept prefix runs only its rest, and a
prompt that shares a prefix with a recent one has that prefix run apart and kept.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import queue
import threading
import time
import uuid

import torch

from ..errors import NonFiniteLogitsError
from .api import CompletionRequest, RequestError, logprobs_body, usage
from .completion import Completion
from .cuda_graph import KEPT_GRAPHS, DecodeGraphs
from .decode import DecodeBatch, JoinError
from .device import inferring
from .generate import Sampler, generate
from .logprobs import TokenLogprob, prefill_scored, score_prompts
from .prefix_store import PrefixStore
from .prefixes import keep_answers, prefill_shared

_log = logging.getLogger(__name__)

#: Continuous batching: a prompt that joins a decoding batch is prefilled this many tokens per step of the batch
#: (each step of the others then waits for one chunk, not for a long prompt's whole prefill).
JOIN_CHUNK = 512

#: What the requests still unanswered get when the server stops.
STOPPING = RequestError(503, "the server is stopping; send the request again once it is back")


class Row:
    """One choice of a request: its prompt's ids, its text as it comes, its token count and how it ended."""

    def __init__(self, job: Job, index: int, ids: list[int], completion: Completion, echo: str = "") -> None:
        """``echo``: the text the choice's starts with (the prompt's, with ``echo: true``)."""
        self.job, self.index, self.ids, self.completion, self.echo = job, index, ids, completion, echo
        self.tokens = 0  # tokens picked for it, the one that ended it included (an end of text, a stop's last)
        self.cached = 0  # of its prompt's tokens, those a state the prefix cache kept before stood for
        self.finish: str | None = None  # "stop" or "length" once it has ended
        #: (token id, its scores) of each scored token (the echoed prompt's, then each picked one), with logprobs.
        self.scored: list[tuple[int, TokenLogprob | None]] = []
        #: len(scored) at each streamed piece of text, in order: the tokens its chunk carries the logprobs of.
        self.marks: collections.deque[int] = collections.deque()
        self.sent, self.offset = 0, 0  # scored tokens given so far (a stream's), and the length of their texts

    @property
    def text(self) -> str:
        """The choice's text: the echoed prompt's, then the completion's."""
        return self.echo + self.completion.text

    def logprobs(self, upto: int | None = None, shape=logprobs_body) -> dict | None:
        """The ``logprobs`` object (None unless the request asked for them) of the scored tokens not given yet, up to
        ``scored[upto]`` (default: all): the whole choice's, or a stream chunk's, its tokens since the last chunk's
        (their ``text_offset`` counted from the choice's start). ``shape(scored, piece, offset)`` writes it in its
        API's shape: the completions route's (:func:`~hybridlm.infer.api.logprobs_body`) or the chat route's."""
        if self.job.request.logprobs is None:
            return None
        upto = len(self.scored) if upto is None else upto
        scored, piece = self.scored[self.sent : upto], self.job.piece
        body = shape(scored, piece, self.offset)
        self.sent, self.offset = upto, self.offset + sum(len(piece(token)) for token, _ in scored)
        return body


class Job:
    """A request in the worker's hands, and the events its HTTP handler reads from ``events``, in order:

    * ``("text", index, piece)``: new text of choice ``index`` (streamed requests only; with logprobs, its row's
      ``marks`` has len(scored) at that piece);
    * ``("finish", index, reason)``: choice ``index`` ended, ``"stop"`` or ``"length"``;
    * ``("done", None, None)``: every choice ended (their texts are in ``rows``), or
      ``("error", None, RequestError)``: the request failed. Nothing follows either.
    """

    def __init__(self, request: CompletionRequest, tokenizer, specials: dict[str, int], piece) -> None:
        """``piece(token)``: a token id's text (the logprobs' token texts: the worker's :attr:`BatchWorker.piece`)."""
        self.request, self.piece = request, piece
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.taken = time.perf_counter()  # (when the worker took it: its latency's and first token's start)
        self.first_token: float | None = None  # when its first token was picked
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False  # the client went away: its rows stop at their next token
        self.closed = False  # done or failed: nothing more is sent
        echoes = [tokenizer.decode(ids) if request.echo else "" for ids in request.prompts]
        self.rows = [  # (a streamed echo is the completion's heading: sent before its first text, or at its end)
            Row(
                self,
                i,
                ids,
                Completion(tokenizer, request.stops, request.stream, ids, echo, specials, self._writer(i)),
                echo,
            )
            for i, (ids, echo) in enumerate(zip(request.prompts, echoes))
        ]
        # Rows of equal settings batch together (a static batch has one end of text: ignore_eos or not); a seeded
        # sampled request only with itself (see the module).
        self.key = (request.sampling, request.ignore_eos, self if request.sampling.seeded else None)

    def _writer(self, index: int):
        return functools.partial(self._text, index)

    def _text(self, index: int, piece: str) -> None:
        if self.request.logprobs is not None:
            row = self.rows[index]
            row.marks.append(len(row.scored))
        self.emit("text", index, piece)

    def emit(self, kind: str, index: int | None = None, value=None) -> None:
        self.events.put((kind, index, value))

    def cancel(self) -> None:
        """The client is gone (called from its handler's thread): its rows stop at their next token."""
        self.cancelled = True

    def fail(self, error: RequestError) -> None:
        if not self.closed:
            self.closed = True
            self.emit("error", None, error)

    def usage(self) -> dict:
        """``usage``: the prompts' tokens as given (an empty prompt counts none; each prompt once, whatever its ``n``
        choices, as OpenAI and vLLM count them), of them those the prefix cache's kept states stood for, and the
        tokens picked."""
        prompts = self.rows[:: self.request.n]
        return usage(sum(len(r.ids) for r in prompts), sum(r.tokens for r in self.rows), sum(r.cached for r in prompts))


class BatchWorker:
    """Runs queued requests on ``model`` in batches (see the module). ``submit`` from any thread; ``start`` runs
    the loop on a thread of its own, ``step`` one round on the caller's (tests)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int,
        generate=generate,
        cuda_graph: bool = False,
        continuous: bool = False,
        prefix_cache: int = 8,
        kept_graphs: int = KEPT_GRAPHS,
        prefix_cache_bytes: int | None = None,
        speculative: str | None = None,
        draft_tokens: int | None = None,
    ) -> None:
        """``prefix_cache``: the prompt prefixes whose states are kept across batches, at most (0: none; see the
        module); ``prefix_cache_bytes``: the memory they may hold together, at most (None: bounded by their count
        and positions only; :class:`~hybridlm.infer.prefix_store.PrefixStore`). ``kept_graphs``: with ``cuda_graph``,
        the decode caches of ended batches kept with their graphs (:class:`~hybridlm.infer.cuda_graph.DecodeGraphs`).
        ``speculative="mtp"`` (``draft_tokens`` a round): the model's MTP depths draft, as ``generate`` drafts, in
        static batches whose prompts run one at a time (not with ``continuous`` or ``cuda_graph``); instead of the
        prefix cache, the state after the last prompt that ran alone and its
        answer is kept (:class:`~hybridlm.infer.speculative.SpeculativeSession`: a chat's next turn runs what it
        adds; ``prefix_cache`` 0: none)."""
        if speculative is not None and (continuous or cuda_graph):
            raise ValueError(
                "speculative decoding runs static batches without CUDA graphs: leave continuous and cuda_graph off"
            )
        self.model, self.tokenizer, self.max_batch_size, self.generate = model, tokenizer, max_batch_size, generate
        self.speculative: dict = {}
        if speculative is not None:
            from .speculative import SpeculativeSession

            self.speculative = dict(speculative=speculative, draft_tokens=draft_tokens)
            self.session = SpeculativeSession() if prefix_cache else None
            prefix_cache = 0
        self.prefixes = PrefixStore(prefix_cache, max_bytes=prefix_cache_bytes) if prefix_cache else None
        self.cuda_graph = cuda_graph  # each batch's decode step replayed as a CUDA graph
        # (its caches and graphs kept when a batch ends: each shape captured once, not once per batch)
        self.graphs = DecodeGraphs(model, kept_graphs) if cuda_graph else None
        self.continuous = continuous  # rows join a running batch between its steps (see the module)
        self.running: DecodeBatch | None = None  # continuous batching: the batch decoding now
        self.samplers: dict = {}  # its samplers, by the settings (Sampling) of their rows
        self.joined = 0  # rows that joined a batch already decoding
        self.specials = tokenizer.special_tokens()
        # An empty prompt starts from the end-of-text token, as generate starts it.
        self._start = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
        # A token's text, for logprobs' dicts: each id decoded once (at most the vocabulary; read by handler threads)
        self.piece = functools.lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))
        self.queue: queue.Queue = queue.Queue()  # Jobs; None only wakes the loop
        self.pending: list[Row] = []  # rows taken from the queue, not run yet, oldest first
        self.open: set[Job] = set()  # submitted and not answered yet
        self.lock = threading.Lock()  # (no job is queued once the stop has failed the open ones)
        self.stopping = threading.Event()
        self.batches = 0  # batches run (two requests in one batch count once)
        # What GET /metrics reports (read by handler threads: each an int the worker's thread alone writes)
        self.counts: collections.Counter = collections.Counter()
        self.running_rows = 0  # rows of the batch decoding now
        self.thread: threading.Thread | None = None

    def submit(self, request: CompletionRequest) -> Job:
        job = Job(request, self.tokenizer, self.specials, self.piece)
        with self.lock:
            if self.stopping.is_set():
                job.fail(STOPPING)
            else:
                self.open.add(job)
                self.queue.put(job)
                self.counts.update(requests=1, choices=len(job.rows), prompt_tokens=job.usage()["prompt_tokens"])
        return job

    def metrics(self) -> list[tuple[str, str, str, float]]:
        """What ``GET /metrics`` serves: (name, Prometheus type, help, value) of each counter and gauge."""
        # (read from a handler's thread while the worker's changes them: each read once, whole, by one C call)
        store, batch, graphs = self.prefixes, self.running, self.graphs
        running = self.running_rows if batch is None else len(batch.held)
        kept = list(store.entries.items()) if store else []
        return [
            ("requests_total", "counter", "Requests taken (completions and chat).", self.counts["requests"]),
            ("choices_total", "counter", "Choices taken (prompts times n).", self.counts["choices"]),
            ("requests_failed_total", "counter", "Requests answered with 500.", self.counts["failed"]),
            ("requests_finished_total", "counter", "Requests answered whole.", self.counts["finished"]),
            (
                "request_seconds_total",
                "counter",
                "Seconds from taking a request to its end, summed over the requests finished (over "
                "requests_finished_total: the mean latency).",
                self.counts["request_seconds"],
            ),
            ("first_tokens_total", "counter", "Requests whose first token was picked.", self.counts["first_tokens"]),
            (
                "first_token_seconds_total",
                "counter",
                "Seconds from taking a request to its first token, summed (over first_tokens_total: the mean time to "
                "first token).",
                self.counts["first_token_seconds"],
            ),
            ("prompt_tokens_total", "counter", "Prompt tokens of the requests taken.", self.counts["prompt_tokens"]),
            ("generation_tokens_total", "counter", "Tokens picked.", self.counts["generation_tokens"]),
            ("batches_total", "counter", "Batches run (continuous batching: batches started).", self.batches),
            ("rows_joined_total", "counter", "Rows that joined a batch already decoding.", self.joined),
            (
                "speculative_drafted_tokens_total",
                "counter",
                "Tokens the MTP depths drafted (hybridlm serve --speculative).",
                self.counts["drafted"],
            ),
            (
                "speculative_accepted_tokens_total",
                "counter",
                "Drafted tokens the model kept (over speculative_drafted_tokens_total: the acceptance rate).",
                self.counts["accepted"],
            ),
            ("rows_waiting", "gauge", "Rows taken from the queue and not run yet.", len(self.pending)),
            ("rows_running", "gauge", "Rows of the batch running now.", running),
            (
                "prefix_cache_hits_total",
                "counter",
                "Prompts that began with a kept prefix.",
                store.hits if store else 0,
            ),
            (
                "prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens that kept prefixes stood for.",
                store.hit_tokens if store else 0,
            ),
            ("prefix_cache_entries", "gauge", "Prefixes kept.", len(kept)),
            ("prefix_cache_positions", "gauge", "Positions the kept prefixes hold.", sum(len(t) for t, _ in kept)),
            ("prefix_cache_bytes", "gauge", "Memory the kept prefixes hold, in bytes.", sum(e.nbytes for _, e in kept)),
            (
                "decode_graph_captures_total",
                "counter",
                "Decode steps captured as CUDA graphs (on CUDA; a batch of a kept shape replays one).",
                graphs.captures if graphs else 0,
            ),
            (
                "decode_graphs_kept",
                "gauge",
                "Decode caches of ended batches kept with their CUDA graphs.",
                graphs.entries if graphs else 0,
            ),
        ]

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="hybridlm-serve-worker", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the running batch at its next token and answer every open request with 503 :data:`STOPPING`."""
        with self.lock:
            self.stopping.set()
            self.queue.put(None)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        if self.thread is None or not self.thread.is_alive():
            self._fail_open()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step(block=True)
            except Exception as e:  # (a bug outside generate): no handler may wait for ever on its request
                _log.error("the batching worker failed: %s: %s", type(e).__name__, e, exc_info=e)
                self.pending = []
                self._fail_open(RequestError(500, f"the server failed: {type(e).__name__}: {e}"))
        self._fail_open()

    def _fail_open(self, error: RequestError = STOPPING) -> None:
        with self.lock:
            jobs, self.open = self.open, set()
        for job in jobs:
            job.fail(error)

    @inferring  # (grad mode and the current CUDA device are per thread: the worker's thread sets them itself)
    def step(self, block: bool = False) -> bool:
        """Take what is queued (waiting for a request where ``block`` and none is pending or decoding) and run one
        batch, or with continuous batching one step of the running batch (its waiting rows admitted first); False
        when there was nothing to run."""
        try:
            wait = block and not self.pending and self.running is None
            while True:
                job = self.queue.get(block=wait)
                wait = False
                if job is not None:
                    self.pending.extend(job.rows)
        except queue.Empty:
            pass
        for row in self.pending:
            if row.job.cancelled:
                row.job.closed = True  # (nobody reads its events)
        self.pending = [row for row in self.pending if not row.job.closed]
        if self.stopping.is_set() or not (self.pending or self.running):
            return False
        # (a seeded request runs in a static batch, its samples those of ``hybridlm generate`` with its seed)
        if self.continuous and (self.running or not self.pending[0].job.request.sampling.seeded):
            self._decode()
        else:
            key = self.pending[0].job.key
            batch = [row for row in self.pending if row.job.key == key][: self.max_batch_size]
            taken = {id(row) for row in batch}
            self.pending = [row for row in self.pending if id(row) not in taken]
            self._run(batch)
        with self.lock:  # (a job whose client went away is never closed: nobody reads it, it must not stay here)
            self.open = {job for job in self.open if not (job.closed or job.cancelled)}
        return True

    def _run(self, batch: list[Row]) -> None:
        """Static batching: the rows of ``batch`` in one ``generate`` call."""
        sampling = batch[0].job.request.sampling
        seed = sampling.seed + batch[0].index if sampling.seeded else sampling.seed
        live = batch  # the rows generate runs, whose indices a NonFiniteLogitsError names
        # Where every row that goes on is an echoed, scored prompt (lm-evaluation-harness's loglikelihood requests),
        # the scoring forward is their prefill too and generate starts from its cache: they run through the model
        # once. (A batch that also holds other prompts scores and prefills apart: one left-padded prefill for all.)
        keep = not self.speculative and all(
            (r.job.request.echo and r.job.request.logprobs is not None) or not r.job.request.max_tokens for r in batch
        )
        self.batches += 1
        stats: dict = {}  # (speculation's drafted and accepted tokens)
        try:
            prepared = self._prepare(batch, keep)
            if prepared is None:
                return
            live, prefilled = prepared
            ks = [row.job.request.logprobs for row in live if row.job.request.logprobs is not None]
            # (passed only where asked: a generate given in place of the library's need not know the options)
            options = {"logprobs": max(ks)} if ks else {}
            options.update(sampling.options())
            if prefilled is not None and prefilled[0] == live:
                options["prefilled"] = prefilled[1:]
            # Prompts that begin with a kept state, or share a prefix with recent prompts, run it once, and each
            # row's state at its end is kept (a chat's next turn begins with it); without the prefix cache, generate
            # shares the batch's own prefixes itself.
            if self.prefixes is not None:
                options["prefix_store"] = self.prefixes
            if self.graphs is not None:
                options["graphs"] = self.graphs
            if self.speculative:
                options |= self.speculative | {"stats": stats}
                if self.session is not None and len(live) == 1:  # (a session holds one prompt's state)
                    options["speculative_session"] = self.session
            self.running_rows = len(live)

            def on_token(r: int, token: int, scores=None) -> bool:
                row = live[r]
                if row.tokens == 0:  # the prompts are prefilled by now: what the prefix cache stood for, per prompt
                    row.cached = self._kept(r, row.cached)
                return self._on_token(row, token, scores)

            if live:
                self.generate(
                    self.model,
                    [row.ids or self._start for row in live],
                    max_new_tokens=max(row.job.request.max_tokens for row in live),
                    temperature=sampling.temperature,
                    top_k=sampling.top_k,
                    top_p=sampling.top_p,
                    eos_id=None if batch[0].job.request.ignore_eos else self.tokenizer.eos_id,
                    seed=seed,
                    repetition_penalty=sampling.repetition_penalty,
                    callback=on_token,
                    cuda_graph=self.cuda_graph,
                    **options,
                )
        except Exception as e:  # answered, and the server goes on with the next batch
            self._failed(live, e)
            return
        finally:
            self.running_rows = 0
            self.counts.update(drafted=stats.get("drafted", 0), accepted=stats.get("accepted", 0))
        for row in live:  # (each row stops at its own max_tokens: this only catches a row generate cut short)
            if row.finish is None and not (row.job.closed or row.job.cancelled or self.stopping.is_set()):
                self._end(row, "length")

    def _prepare(self, rows: list[Row], keep: bool = False) -> tuple[list[Row], tuple | None] | None:
        """Score the echoed prompts of ``rows`` that ask for logprobs (one forward for them all, at their largest
        k; each keeps its own k) and end the rows of no new tokens. Returns (the rows left to generate, None), or
        None where the scoring failed (every row answered). ``keep``, where every echoed prompt goes on to new
        tokens: the scoring forward runs over the whole prompts and is their prefill too (lm-evaluation-harness's
        loglikelihood request then runs through the model once), the second item then (those rows, the cache that
        holds them, their last logits)."""
        echoed = [row for row in rows if row.job.request.echo and row.job.request.logprobs is not None]
        prefilled = None
        if echoed:
            k = max(row.job.request.logprobs for row in echoed)
            keep = keep and all(row.ids and row.job.request.max_tokens > 0 for row in echoed)
            try:
                if keep:
                    scored, cache, last = prefill_scored(self.model, [row.ids for row in echoed], k, self.prefixes)
                    prefilled = (echoed, cache, last)
                else:
                    scored = score_prompts(self.model, [row.ids for row in echoed], k, self.prefixes)
            except NonFiniteLogitsError as e:  # its row counts in echoed: that choice is named, the others resent
                self._failed(echoed + [row for row in rows if row not in echoed], e)
                return None
            for i, (row, scores) in enumerate(zip(echoed, scored)):
                row.cached = self._kept(i)
                own = row.job.request.logprobs
                row.scored = [(t, s if s is None else s.most_likely(own)) for t, s in zip(row.ids, scores)]
        for row in rows:
            if row.job.request.max_tokens == 0:  # the prompt alone
                self._end(row, "length")
        return [row for row in rows if row.finish is None], prefilled

    # -- continuous batching -----------------------------------------------------------------------

    def _decode(self) -> None:
        """Continuous batching: admit the waiting rows that fit into the running batch (starting one where none
        runs), then run one decode step."""
        batch = self.running
        if batch is None:
            greedy = Sampler(device=next(self.model.parameters()).device)  # (every row brings its own)
            batch = DecodeBatch(
                self.model,
                1,
                0,
                greedy,
                cuda_graph=self.cuda_graph,
                max_slots=self.max_batch_size,
                join_chunk=JOIN_CHUNK,
                on_end=None if self.prefixes is None else keep_answers(self.model, self.prefixes),
                graphs=self.graphs,
            )
            self.running, self.samplers = batch, {}
            self.batches += 1
        # Only rows queued before a seeded one, which runs in a static batch of its own once this one has drained:
        # joining rows would hold it back for ever under a steady stream.
        unseeded = itertools.takewhile(lambda row: not row.job.request.sampling.seeded, self.pending)
        join = list(unseeded)[: batch.room]
        if join:
            taken = {id(row) for row in join}
            self.pending = [row for row in self.pending if id(row) not in taken]
            self._admit(batch, join)
        try:
            if batch.live:
                batch.step()
        except JoinError as e:  # its prompts could not join: their requests answered, the batch goes on
            self._failed([row.tag for row in e.rows], e.__cause__)
        except Exception as e:  # every request of the batch answered; the next one starts afresh
            self._failed([None if row is None else row.tag for row in batch.rows], e)
            self.running = None
            return
        if not batch.live:
            batch.close()
            self.running = None

    def _sampler(self, sampling) -> Sampler:
        """The running batch's sampler for ``sampling``'s settings (its rows picked together; unseeded, so the
        generator's seed is the process's)."""
        if sampling not in self.samplers:
            device = next(self.model.parameters()).device
            self.samplers[sampling] = Sampler(
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
                sampling.repetition_penalty,
                None,
                device,
                **sampling.options(),
            )
        return self.samplers[sampling]

    def _admit(self, batch: DecodeBatch, rows: list[Row]) -> None:
        """Prefill ``rows`` into ``batch`` (echoed prompts scored by the same forward); a failure (out of memory)
        answers them, the batch's own rows go on."""
        try:
            prepared = self._prepare(rows, keep=True)
            if prepared is None:
                return
            live, prefilled = prepared
            joining = batch.live
            # Samplers no row of the batch uses any more are dropped: a batch that never drains would otherwise keep
            # one for every settings it ever saw.
            used = {id(row.sampler) for row in batch.held}
            self.samplers = {key: s for key, s in self.samplers.items() if id(s) in used}
            scored, others = [], live
            if prefilled is not None:
                scored, cache, last = prefilled
                others = [row for row in live if row not in scored]
            groups = [(scored, None if prefilled is None else (cache, last)), (others, None)]
            if others:  # prompts that share a prefix run it once (prefilled whole, not chunk by chunk)
                groups[1] = (
                    others,
                    prefill_shared(self.model, [row.ids or self._start for row in others], self.prefixes),
                )
                for i, row in enumerate(others):
                    row.cached = self._kept(i)
            for group, done in groups:
                if group:
                    batch.admit(
                        [row.ids or self._start for row in group],
                        [row.job.request.max_tokens for row in group],
                        [functools.partial(self._on_token, row) for row in group],
                        [row.job.request.logprobs for row in group],
                        tags=group,
                        samplers=[self._sampler(row.job.request.sampling) for row in group],
                        prefilled=done,
                    )
            self.joined += len(live) if joining else 0
        except Exception as e:  # (a JoinError's message is its cause's)
            self._failed(rows, e.__cause__ if isinstance(e, JoinError) else e)

    def _kept(self, index: int, default: int = 0) -> int:
        """Of prompt ``index`` of the prefill just run, the positions a state the prefix cache held before stood for
        (:attr:`~hybridlm.infer.prefix_store.PrefixStore.last_kept`), or the speculative session (a prompt alone);
        ``default`` without either."""
        if self.speculative:
            return self.session.kept if self.session is not None and self.running_rows == 1 else default
        kept = self.prefixes.last_kept if self.prefixes is not None else []
        return kept[index] if index < len(kept) else default

    def _on_token(self, row: Row, token: int, scores: TokenLogprob | None = None) -> bool:
        """``generate``'s callback: True ends the row (its end, its own max_tokens, a gone client, a stop).
        ``scores``: the token's, where the batch asked for logprobs."""
        job = row.job
        if job.closed or job.cancelled or self.stopping.is_set():
            return True
        row.tokens += 1
        self.counts["generation_tokens"] += 1
        if job.first_token is None:
            job.first_token = time.perf_counter()
            self.counts["first_tokens"] += 1
            self.counts["first_token_seconds"] += job.first_token - job.taken
        k = job.request.logprobs
        if k is not None:  # (every token picked: the end of text and a stop's last too)
            # Its own k most likely, not the batch's largest k (which another request in the batch set).
            row.scored.append((token, None if scores is None else scores.most_likely(k)))
        # The end-of-document token ends the text and is none of it, as in ``hybridlm generate`` (unless the request
        # ignores it); so do a chat model's end of turn and the request's stop_token_ids (its stop_ids).
        eos = token == self.tokenizer.eos_id and not job.request.ignore_eos
        if eos or token in job.request.stop_ids or row.completion.add(token):
            self._end(row, "stop")
            return True
        if row.tokens >= job.request.max_tokens:
            self._end(row, "length")
            return True
        return False

    def _end(self, row: Row, reason: str) -> None:
        row.finish = reason
        row.completion.finish()  # a streamed row's held-back characters
        job = row.job
        job.emit("finish", row.index, reason)
        if all(r.finish for r in job.rows):
            job.closed = True
            self.counts["finished"] += 1
            self.counts["request_seconds"] += time.perf_counter() - job.taken
            job.emit("done")

    def _failed(self, batch: list[Row | None], error: Exception) -> None:
        """Answer every request of a failed batch (None: an empty slot) with 500; the one whose logits were not
        finite is named by its choice, the others are told they can be sent again."""
        _log.error("generation failed: %s: %s", type(error).__name__, error, exc_info=error)
        if self.graphs is not None and _out_of_memory(error):  # (the next batch gets the memory kept caches held)
            self.graphs.clear()
        owner = batch[error.row] if isinstance(error, NonFiniteLogitsError) and error.row < len(batch) else None
        for job in dict.fromkeys(row.job for row in batch if row is not None):
            self.counts["failed"] += not job.closed
            if owner is None:
                message = f"generation failed: {type(error).__name__}: {error}"
            elif job is owner.job:
                message = f"choice {owner.index}: {error.message}"
            else:
                message = f"generation failed for another request in the same batch ({error.message}); send it again"
            job.fail(RequestError(500, message))


def _out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is the device running out of memory."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        error = error.__cause__
    return False
