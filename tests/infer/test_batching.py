"""The batching worker of `hybridlm serve`, run a round at a time on the test's thread (no sockets)."""

import logging
import threading

import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.errors import NonFiniteLogitsError
from hybridlm.infer.api import parse_request
from hybridlm.infer.batching import BatchWorker
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import record_forwards, tiny_config

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0).eval()


def request(body: dict, batch: int = 8):
    return parse_request(
        {"temperature": 0, **body},
        model_name="tiny",
        encode=TOKENIZER.encode,
        vocab_size=257,
        max_tokens_limit=100,
        max_batch_size=batch,
    )


def events(job) -> list[tuple]:
    out = []
    while not job.events.empty():
        out.append(job.events.get())
    return out


def solo(model, prompt: str, n: int, tokenizer=TOKENIZER) -> list[int]:
    return generate(model, tokenizer.encode(prompt), n, eos_id=tokenizer.eos_id)


def test_requests_of_equal_settings_run_as_one_batch_each_to_its_own_length(model):
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    a = worker.submit(request({"prompt": "hello", "max_tokens": 7}))
    b = worker.submit(request({"prompt": ["a", "longer prompt"], "max_tokens": 3}))
    assert worker.step() and not worker.step()
    assert worker.batches == 1
    for job, prompts, n in ((a, ["hello"], 7), (b, ["a", "longer prompt"], 3)):
        assert [kind for kind, *_ in events(job)][-1] == "done"
        for row, prompt in zip(job.rows, prompts):
            # Left-padded in a batch, a row's logits differ from its own by float rounding only (1e-7 here).
            assert row.completion.text == TOKENIZER.decode(solo(model, prompt, n))
            assert row.finish == "length" and row.tokens == n
    assert b.usage() == {
        "prompt_tokens": 14,
        "completion_tokens": 6,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_other_settings_and_rows_past_the_batch_size_wait_for_the_next_batch(model):
    worker = BatchWorker(model, TOKENIZER, max_batch_size=2)
    a = worker.submit(request({"prompt": ["a", "b", "c"], "max_tokens": 2}))
    b = worker.submit(request({"prompt": "d", "max_tokens": 2, "repetition_penalty": 1.5}))
    c = worker.submit(request({"prompt": "e", "max_tokens": 2}))
    ran = []
    worker.generate = lambda model, rows, **kw: ran.append(len(rows)) or generate(model, rows, **kw)
    while worker.step():
        pass
    assert ran == [2, 2, 1]  # a's first two; a's third with c (equal settings); b alone
    assert all(events(job)[-1][0] == "done" for job in (a, b, c))
    assert [row.completion.text for row in a.rows] == [TOKENIZER.decode(solo(model, p, 2)) for p in "abc"]


def test_a_stop_string_and_the_end_of_text_end_a_row_with_stop(model):
    text = TOKENIZER.decode(solo(model, "hi", 12))
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    stop = text[5:7]
    job = worker.submit(request({"prompt": "hi", "max_tokens": 12, "stop": [stop]}))
    worker.step()
    row = job.rows[0]
    assert row.finish == "stop" and row.completion.text == text[: text.index(stop)] and row.tokens < 12
    # A tokenizer whose end of text is the model's first pick: the row ends there, without its text.
    first = solo(model, "hi", 1)[0]
    ending = ByteTokenizer()
    ending.eos_id = first
    worker = BatchWorker(model, ending, max_batch_size=8)
    job = worker.submit(request({"prompt": "hi", "max_tokens": 5}))
    worker.step()
    assert events(job) == [("finish", 0, "stop"), ("done", None, None)]
    assert job.rows[0].completion.text == "" and job.usage()["completion_tokens"] == 1


def test_a_streamed_row_sends_its_text_in_pieces_before_its_finish(model):
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    job = worker.submit(request({"prompt": ["hi", "yo"], "max_tokens": 6, "stream": True}))
    worker.step()
    got = events(job)
    for index, prompt in enumerate(["hi", "yo"]):
        pieces = [value for kind, i, value in got if kind == "text" and i == index]
        assert "".join(pieces) == TOKENIZER.decode(solo(model, prompt, 6)) and all(pieces)
        finish = got.index(("finish", index, "length"))
        assert all(i != index for kind, i, _ in got[finish + 1 :])
    assert got[-1] == ("done", None, None)


def test_a_streamed_character_of_several_byte_tokens_is_sent_whole(model):
    """A byte-level model picks "€" as three tokens: no piece of the stream is a part of it (a replacement character
    sent would stay in the client's text), with stop strings to watch for or without."""
    text = "a€😀é"

    def scripted(model, rows, max_new_tokens, callback, **kw):  # picks text's bytes, one a token
        for token in text.encode()[:max_new_tokens]:
            if callback(0, token):
                break

    worker = BatchWorker(model, TOKENIZER, max_batch_size=8, generate=scripted)
    for stop in (None, ["xyz"]):
        job = worker.submit(request({"prompt": "p", "max_tokens": len(text.encode()), "stream": True, "stop": stop}))
        worker.step()
        got = events(job)
        pieces = [value for kind, _, value in got if kind == "text"]
        assert "".join(pieces) == text, pieces
        assert got[-2:] == [("finish", 0, "length"), ("done", None, None)]


def test_a_client_gone_stops_its_rows_and_no_other(model):
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    gone = worker.submit(request({"prompt": "hi", "max_tokens": 40, "stream": True}))
    other = worker.submit(request({"prompt": "yo", "max_tokens": 40, "stream": True}))
    completion = gone.rows[0].completion
    write = completion.write
    completion.write = lambda piece: (write(piece), gone.cancel())  # it leaves after its first piece of text
    worker.step()
    assert worker.batches == 1 and gone.rows[0].tokens < 5 and gone.rows[0].finish is None
    assert other.rows[0].tokens == 40 and other.rows[0].completion.text == TOKENIZER.decode(solo(model, "yo", 40))
    assert not worker.open  # (the gone one was kept there, for ever: a server leaked each client that left)
    # Its rows not run yet are dropped, unrun.
    waiting = worker.submit(request({"prompt": "hi", "max_tokens": 3}))
    waiting.cancel()
    assert not worker.step() and worker.batches == 1


def test_a_failed_batch_answers_its_requests_with_500_and_the_next_batch_runs(model):
    calls = []

    def failing(model, rows, **kw):
        calls.append(len(rows))
        if len(calls) == 1:
            raise NonFiniteLogitsError(1, "the logits for new token 1 are not finite")
        return generate(model, rows, **kw)

    worker = BatchWorker(model, TOKENIZER, max_batch_size=8, generate=failing)
    a = worker.submit(request({"prompt": "a", "max_tokens": 2}))
    b = worker.submit(request({"prompt": ["b", "c"], "max_tokens": 2}))
    worker.step()
    (kind, _, error_a), (_, _, error_b) = events(a)[-1], events(b)[-1]
    assert kind == "error" and error_a.status == error_b.status == 500
    assert error_b.message == "choice 0: the logits for new token 1 are not finite"  # batch row 1 is b's first
    assert "another request in the same batch" in error_a.message and "send it again" in error_a.message
    assert error_a.body()["error"]["type"] == "server_error"
    c = worker.submit(request({"prompt": "c", "max_tokens": 2}))
    worker.step()
    assert events(c)[-1][0] == "done" and calls == [3, 1]


def test_a_seeded_sample_runs_alone_and_repeats(model):
    """One batch draws from one generator: the same seeded request from two clients, queued together, would draw
    other samples than alone if their rows shared a batch."""
    body = {"prompt": ["x", "y", "z"], "max_tokens": 8, "temperature": 1.0, "seed": 7}
    texts = []
    for before in ([], [body], [{**body, "seed": None}]):
        worker = BatchWorker(model, TOKENIZER, max_batch_size=2)
        for other in before:  # queued first
            worker.submit(request(other, batch=2))
        job = worker.submit(request(body, batch=2))
        while worker.step():
            pass
        texts.append([row.completion.text for row in job.rows])
    assert texts[0] == texts[1] == texts[2]
    # Its rows past the batch size draw from seed + their batch's first index, as hybridlm generate's do.
    ids = [TOKENIZER.encode(p) for p in "xyz"]
    expected = generate(model, ids[:2], 8, 1.0, eos_id=256, seed=7) + generate(
        model, ids[2:], 8, 1.0, eos_id=256, seed=9
    )
    assert texts[0] == [TOKENIZER.decode(e[: len(e) - (e[-1] == 256)]) for e in expected]


def test_stopping_answers_every_open_request_with_503(model):
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    job = worker.submit(request({"prompt": "a"}))
    worker.stop()
    assert events(job)[-1][2].status == 503
    late = worker.submit(request({"prompt": "a"}))
    assert events(late)[-1][2].status == 503 and not worker.step()


def test_a_failure_outside_generation_answers_500_and_the_worker_goes_on(model):
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    run = worker._run
    worker._run = lambda batch: (setattr(worker, "_run", run), 1 / 0)  # fails once, as a bug would
    worker.start()
    try:
        first = worker.submit(request({"prompt": "a", "max_tokens": 2}))
        kind, _, error = first.events.get(timeout=10)
        assert kind == "error" and error.status == 500 and "ZeroDivisionError" in error.message
        second = worker.submit(request({"prompt": "a", "max_tokens": 2}))
        assert [second.events.get(timeout=10)[0] for _ in range(2)] == ["finish", "done"]
    finally:
        worker.stop(timeout=10)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_worker_asks_generate_for_the_cuda_graph_it_was_given(model, cuda_graph):
    """``hybridlm serve --cuda-graph`` reaches every batch's ``generate`` call (the capture itself: the GPU tests)."""
    seen = []

    def recording(model, rows, max_new_tokens, callback, **kw):
        seen.append(kw["cuda_graph"])
        callback(0, 65)

    worker = BatchWorker(model, TOKENIZER, max_batch_size=8, generate=recording, cuda_graph=cuda_graph)
    worker.submit(request({"prompt": "p", "max_tokens": 1}))
    worker.step()
    assert seen == [cuda_graph]


def test_a_batch_asks_for_its_largest_logprobs_and_leaves_out_rows_of_no_new_tokens(model):
    """Requests of equal settings share a batch whatever their logprobs: generate is asked for the largest k (a row
    that asked for none gets none); an echoed prompt with max_tokens 0 is scored and ended without a row in it."""
    seen = []

    def recording(model, rows, max_new_tokens, callback, **kw):
        seen.append((rows, kw.get("logprobs")))
        scores = generate(model, rows, 1, logprobs=kw["logprobs"], callback=lambda r, t, lp: got.append((r, t, lp)))
        for r, token in enumerate(scores):
            callback(r, token[0], got[r][2])

    got = []
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8, generate=recording)
    plain = worker.submit(request({"prompt": "a", "max_tokens": 1}))
    two = worker.submit(request({"prompt": "bc", "max_tokens": 1, "logprobs": 2}))
    one = worker.submit(request({"prompt": "f", "max_tokens": 1, "logprobs": 1}))  # its own k, not the batch's
    prompt_only = worker.submit(request({"prompt": "de", "max_tokens": 0, "echo": True, "logprobs": 5}))
    assert worker.step() and not worker.step() and worker.batches == 1
    assert seen == [([[97], [98, 99], [102]], 2)]
    assert plain.rows[0].logprobs() is None and plain.rows[0].finish == "length"
    ((token, scores),) = two.rows[0].scored
    assert token == got[1][1] and scores == got[1][2] and len(scores.top) == 2
    ((token, scores),) = one.rows[0].scored
    assert token == got[2][1] and scores.logprob == got[2][2].logprob and scores.top == got[2][2].top[:1]
    row = prompt_only.rows[0]
    assert row.finish == "length" and row.tokens == 0 and row.text == "de"
    assert [t for t, _ in row.scored] == [100, 101] and row.scored[0][1] is None and len(row.scored[1][1].top) == 5
    assert [kind for kind, *_ in events(prompt_only)] == ["finish", "done"]


def test_echoed_prompts_are_scored_together_each_at_its_own_k(model, monkeypatch):
    """The batch's echoed prompts run as one padded forward at their largest k; each request keeps its own k most
    likely, and its scores are the prompt's alone (up to the padding's float rounding)."""
    from hybridlm.infer import batching, logprobs

    calls = []
    monkeypatch.setattr(
        batching, "score_prompts", lambda m, p, k, store: calls.append((p, k)) or logprobs.score_prompts(m, p, k, store)
    )
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    jobs = [
        worker.submit(request({"prompt": text, "max_tokens": 0, "echo": True, "logprobs": k}))
        for text, k in (("hello there", 1), ("yo", 4))
    ]
    worker.submit(request({"prompt": "no scores", "max_tokens": 0, "echo": True}))
    assert worker.step() and calls == [([TOKENIZER.encode("hello there"), TOKENIZER.encode("yo")], 4)]
    for job, k in zip(jobs, (1, 4)):
        row = job.rows[0]
        alone = logprobs.prompt_logprobs(model, row.ids, k)
        assert [t for t, _ in row.scored] == row.ids and row.scored[0][1] is None
        for (_, got), want in zip(row.scored[1:], alone[1:]):
            assert len(got.top) == k and [t for t, _ in got.top] == [t for t, _ in want.top]
            assert got.logprob == pytest.approx(want.logprob, abs=1e-5)


def test_each_row_keeps_its_own_k_and_rows_of_no_new_tokens_first_leave_the_others_their_tokens(model):
    """A batch's generate is asked for the largest k, but a row that asked for 1 gets 1 (not another request's 3); an
    echoed prompt of max_tokens 0 queued first is out of generate's rows, so row 0's tokens go to the next one."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    prompt_only = worker.submit(request({"prompt": "de", "max_tokens": 0, "echo": True, "logprobs": 2}))
    one = worker.submit(request({"prompt": "a", "max_tokens": 3, "logprobs": 1}))
    three = worker.submit(request({"prompt": "bc", "max_tokens": 3, "logprobs": 3}))
    assert worker.step() and not worker.step() and worker.batches == 1
    assert prompt_only.rows[0].finish == "length" and prompt_only.rows[0].tokens == 0
    for job, prompt, k in ((one, "a", 1), (three, "bc", 3)):
        (row,) = job.rows
        assert row.completion.text == TOKENIZER.decode(solo(model, prompt, 3)) and row.tokens == 3
        assert [len(scores.top) for _, scores in row.scored] == [k] * 3


def test_a_batch_that_fails_after_a_row_of_no_new_tokens_names_the_row_generate_ran(model):
    """generate's row 0 is the first row it ran, not the echoed prompt of max_tokens 0 before it in the batch."""

    def failing(model, rows, **kw):
        raise NonFiniteLogitsError(0, "the logits for new token 1 are not finite")

    worker = BatchWorker(model, TOKENIZER, max_batch_size=8, generate=failing)
    prompt_only = worker.submit(request({"prompt": "de", "max_tokens": 0, "echo": True}))
    running = worker.submit(request({"prompt": "a", "max_tokens": 2}))
    worker.step()
    assert [kind for kind, *_ in events(prompt_only)] == ["finish", "done"]
    kind, _, error = events(running)[-1]
    assert kind == "error" and error.message == "choice 0: the logits for new token 1 are not finite"


def test_a_batch_of_prompts_alone_runs_no_generation_and_logs_no_failure(model, caplog):
    """Echoed prompts of max_tokens 0 only: scored and answered, with no generate call (an empty batch's would fail,
    and log "generation failed" for a request answered well)."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8, generate=lambda *a, **k: pytest.fail("generate ran"))
    job = worker.submit(request({"prompt": "de", "max_tokens": 0, "echo": True, "logprobs": 1}))
    with caplog.at_level(logging.ERROR):
        assert worker.step()
    assert [kind for kind, *_ in events(job)] == ["finish", "done"] and not caplog.records


def test_a_prompt_that_cannot_be_scored_is_named_by_its_choice_and_the_others_may_be_sent_again(model, monkeypatch):
    """Non-finite logits while scoring the batch's echoed prompts: that request's answer names its choice, as a
    generation's does; the other requests of the batch (scored or not) are told to send again, and none is left
    unanswered."""
    from hybridlm.infer import batching

    def failing(model, prompts, k, store):  # the second echoed prompt (the second choice of "two")
        raise NonFiniteLogitsError(1, "the logits at prompt position 2 are not finite")

    monkeypatch.setattr(batching, "score_prompts", failing)
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8)
    plain = worker.submit(request({"prompt": "a", "max_tokens": 2}))
    two = worker.submit(request({"prompt": ["bc", "defg"], "max_tokens": 1, "echo": True, "logprobs": 1}))
    assert worker.step()
    for job, words in ((two, "choice 1: the logits at prompt position 2 are not finite"), (plain, "send it again")):
        ((kind, _, error),) = events(job)
        assert kind == "error" and error.status == 500 and words in error.message, error.message


# -- continuous batching ---------------------------------------------------------------------------------------


def drain(worker) -> int:
    steps = 0
    while worker.step():
        steps += 1
    return steps


def test_continuous_rows_join_a_running_batch_and_each_gets_its_own_text(model):
    """Requests sent while a batch decodes join it at the next step (no wait for the batch's end), whatever their
    sampling settings: each settings' rows are picked by a sampler of their own. Each row's text is its own alone
    (a sample of top_k 1 is the greedy one; a penalty counts the row's own tokens only)."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    a = worker.submit(request({"prompt": "hello", "max_tokens": 20}))
    for _ in range(3):
        assert worker.step()
    assert a.rows[0].tokens == 3
    b = worker.submit(request({"prompt": ["a", "longer prompt"], "max_tokens": 5, "repetition_penalty": 1.5}))
    c = worker.submit(request({"prompt": "hi", "max_tokens": 4, "temperature": 1.0, "top_k": 1}))
    assert worker.step()
    assert [row.tokens for row in b.rows + c.rows] == [1, 1, 1] and a.rows[0].tokens == 4
    assert worker.joined == 3 and worker.batches == 1 and len(worker.samplers) == 3
    assert len({id(row.sampler) for row in worker.running.held}) == 3  # b's two rows share one
    drain(worker)
    assert worker.batches == 1 and worker.running is None and not worker.open
    for job, prompts, n, penalty in ((a, ["hello"], 20, 1.0), (b, ["a", "longer prompt"], 5, 1.5), (c, ["hi"], 4, 1.0)):
        assert [kind for kind, *_ in events(job)][-1] == "done"
        for row, prompt in zip(job.rows, prompts):
            alone = generate(model, TOKENIZER.encode(prompt), n, eos_id=256, repetition_penalty=penalty)
            assert row.completion.text == TOKENIZER.decode(alone)
            assert row.finish == "length" and row.tokens == n
    assert b.usage() == {
        "prompt_tokens": 14,
        "completion_tokens": 10,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


@pytest.mark.parametrize("continuous", [False, True], ids=["static", "continuous"])
def test_frequency_and_presence_penalties_min_p_and_logit_bias_reach_the_rows_that_asked(model, continuous):
    """A request's frequency and presence penalties (min_p, logit_bias) are its rows' alone: in either batching mode each
    text is what ``generate`` gives its prompt with those settings, and a request without them, queued beside, is
    unchanged."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=continuous)
    penalties = {"frequency_penalty": -1.5, "presence_penalty": -0.5}  # (repeats favoured: the counts show at once)
    a = worker.submit(request({"prompt": ["a", "longer prompt"], "max_tokens": 8, **penalties}))
    b = worker.submit(request({"prompt": "hi", "max_tokens": 8}))
    sampled = {"temperature": 1.5, "seed": 3, "min_p": 0.9}  # (seeded: a static batch of its own in either mode)
    c = worker.submit(request({"prompt": "yo", "max_tokens": 8, **sampled}))
    first = generate(model, TOKENIZER.encode("hey"), 1)[0]
    d = worker.submit(request({"prompt": "hey", "max_tokens": 8, "logit_bias": {str(first): -100, "33": 5}}))
    drain(worker)
    biased = {"logit_bias": {first: -100, 33: 5}}
    for job, settings in ((a, penalties), (b, {}), (c, sampled), (d, biased)):
        assert [kind for kind, *_ in events(job)][-1] == "done"
        for row in job.rows:
            alone = generate(model, row.ids, 8, eos_id=256, **settings)
            assert row.completion.text == TOKENIZER.decode(alone)
    assert a.rows[0].completion.text != TOKENIZER.decode(generate(model, a.rows[0].ids, 8, eos_id=256))
    assert first not in TOKENIZER.encode(d.rows[0].completion.text)[:1]


@pytest.mark.parametrize("continuous", [False, True], ids=["static", "continuous"])
def test_ignore_eos_runs_to_max_tokens_and_stop_token_ids_end_a_choice(model, continuous):
    """vLLM's extensions: with ``ignore_eos`` the end of text (forced here by a logit bias) ends nothing, and the
    choice takes all its ``max_tokens`` (none of them text); without it the same request ends at the first token.
    ``stop_token_ids`` end a choice where the model picks one, none of the text, as the end of text does."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=continuous)
    forced = {"prompt": "hi", "max_tokens": 6, "logit_bias": {"256": 100}}
    ignoring = worker.submit(request({**forced, "ignore_eos": True}))
    ending = worker.submit(request(forced))
    greedy = generate(model, TOKENIZER.encode("hey"), 8, eos_id=256)
    stopped = worker.submit(request({"prompt": "hey", "max_tokens": 8, "stop_token_ids": [greedy[3]]}))
    drain(worker)
    assert (ignoring.rows[0].tokens, ignoring.rows[0].finish, ignoring.rows[0].completion.text) == (6, "length", "")
    assert (ending.rows[0].tokens, ending.rows[0].finish) == (1, "stop")
    row = stopped.rows[0]
    upto = greedy[: greedy.index(greedy[3])]
    assert row.finish == "stop" and row.tokens == len(upto) + 1 and row.completion.text == TOKENIZER.decode(upto)


def test_continuous_rows_past_the_batch_size_take_the_slots_rows_leave(model):
    """Three rows for two slots: the third starts when the first one ends, before the second has."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=2, continuous=True)
    short = worker.submit(request({"prompt": "a", "max_tokens": 2}))
    long = worker.submit(request({"prompt": "b", "max_tokens": 9}))
    late = worker.submit(request({"prompt": "c", "max_tokens": 3}))
    worker.step()
    worker.step()  # short ends
    assert short.rows[0].finish == "length" and late.rows[0].tokens == 0
    worker.step()
    assert late.rows[0].tokens == 1 and long.rows[0].finish is None
    drain(worker)
    assert worker.batches == 1 and worker.joined == 1
    for job, prompt, n in ((short, "a", 2), (long, "b", 9), (late, "c", 3)):
        assert job.rows[0].completion.text == TOKENIZER.decode(solo(model, prompt, n))


def test_continuous_stops_ends_and_client_departures_free_their_slots(model):
    """The end of text and a stop string end a row with "stop"; a client that goes away ends its row at its next
    token; the others run on to their own lengths."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    text = TOKENIZER.decode(solo(model, "yo", 12))
    stop = worker.submit(request({"prompt": "yo", "max_tokens": 12, "stop": [text[4:6]]}))
    gone = worker.submit(request({"prompt": "hi", "max_tokens": 40, "stream": True}))
    other = worker.submit(request({"prompt": "ok", "max_tokens": 30}))
    worker.step()
    gone.cancel()
    drain(worker)
    assert stop.rows[0].finish == "stop" and stop.rows[0].completion.text == text[:4]
    assert gone.rows[0].tokens <= 2 and gone.rows[0].finish is None
    assert other.rows[0].tokens == 30 and other.rows[0].completion.text == TOKENIZER.decode(solo(model, "ok", 30))
    assert not worker.open and worker.running is None


def test_continuous_a_seeded_sample_runs_in_a_static_batch_as_generate_samples_it(model):
    body = {"prompt": ["x", "y"], "max_tokens": 6, "temperature": 1.0, "seed": 7}
    worker = BatchWorker(model, TOKENIZER, max_batch_size=2, continuous=True)
    job = worker.submit(request(body, batch=2))
    assert worker.step() and worker.running is None  # one generate call
    expected = generate(model, [TOKENIZER.encode(p) for p in "xy"], 6, 1.0, eos_id=256, seed=7)
    assert [row.completion.text for row in job.rows] == [
        TOKENIZER.decode(e[: len(e) - (e[-1] == 256)]) for e in expected
    ]


def test_continuous_logprobs_and_echo_as_the_static_batch_gives_them(model):
    """Echoed prompts are scored when they join, a row of max_tokens 0 ends there, each row keeps its own k."""
    answers = {}
    for continuous in (False, True):
        worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=continuous)
        jobs = [
            worker.submit(request({"prompt": "de", "max_tokens": 0, "echo": True, "logprobs": 2})),
            worker.submit(request({"prompt": "a", "max_tokens": 3, "logprobs": 1})),
            worker.submit(request({"prompt": "bc", "max_tokens": 2, "logprobs": 3, "echo": True})),
        ]
        drain(worker)
        answers[continuous] = [
            [(t, None if s is None else (s.top, round(s.logprob, 5))) for t, s in job.rows[0].scored] for job in jobs
        ]
    assert answers[True] == answers[False]
    assert [len(a) for a in answers[True]] == [2, 3, 4]


def test_continuous_a_failed_step_answers_every_row_of_the_batch_and_the_next_batch_runs(model, monkeypatch):
    from hybridlm.infer.decode import DecodeBatch

    step = DecodeBatch.step
    fails = [True]

    def failing(self):
        if fails.pop() if fails else False:
            raise NonFiniteLogitsError(1, "the logits for new token 1 are not finite")
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", failing)
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    a = worker.submit(request({"prompt": "a", "max_tokens": 2}))
    b = worker.submit(request({"prompt": ["b", "c"], "max_tokens": 2}))
    worker.step()
    (kind, _, error_a), (_, _, error_b) = events(a)[-1], events(b)[-1]
    assert kind == "error" and error_b.message == "choice 0: the logits for new token 1 are not finite"
    assert "send it again" in error_a.message and worker.running is None
    c = worker.submit(request({"prompt": "c", "max_tokens": 2}))
    drain(worker)
    assert events(c)[-1][0] == "done" and worker.batches == 2


def test_continuous_a_row_that_cannot_join_is_answered_and_the_running_rows_go_on(model, monkeypatch):
    from hybridlm.infer.decode import DecodeBatch

    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    running = worker.submit(request({"prompt": "a", "max_tokens": 5}))
    worker.step()
    admit = DecodeBatch.admit
    monkeypatch.setattr(DecodeBatch, "admit", lambda *a, **k: 1 / 0)
    joining = worker.submit(request({"prompt": "b", "max_tokens": 5}))
    worker.step()
    monkeypatch.setattr(DecodeBatch, "admit", admit)
    drain(worker)
    kind, _, error = events(joining)[-1]
    assert kind == "error" and error.status == 500 and "ZeroDivisionError" in error.message
    assert running.rows[0].completion.text == TOKENIZER.decode(solo(model, "a", 5))


def test_continuous_stopping_answers_the_running_and_waiting_rows_with_503(model):
    worker = BatchWorker(model, TOKENIZER, max_batch_size=1, continuous=True)
    running = worker.submit(request({"prompt": "a", "max_tokens": 50}))
    waiting = worker.submit(request({"prompt": "b", "max_tokens": 5}))
    worker.step()
    worker.stop()
    assert not worker.step()
    assert events(running)[-1][2].status == 503 and events(waiting)[-1][2].status == 503


def test_continuous_a_seeded_request_is_not_held_back_by_rows_queued_after_it(model):
    """A seeded sample waits for the running batch to drain (it runs in a static batch of its own); requests queued
    after it do not join meanwhile (a steady stream of them would hold it back for ever), and run after it."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    first = worker.submit(request({"prompt": "a", "max_tokens": 6}))
    worker.step()
    seeded = worker.submit(request({"prompt": "b", "max_tokens": 3, "temperature": 1.0, "seed": 3}))
    later = worker.submit(request({"prompt": "c", "max_tokens": 3}))
    while first.rows[0].finish is None:
        worker.step()
        assert later.rows[0].tokens == 0 and seeded.rows[0].tokens == 0
    worker.step()
    assert seeded.rows[0].finish is not None and later.rows[0].tokens == 0
    drain(worker)
    assert worker.batches == 3 and worker.joined == 0 and later.rows[0].finish == "length"


def test_continuous_a_long_prompt_joins_in_chunks_and_one_that_fails_to_is_answered_alone(model, monkeypatch):
    """A prompt joining a decoding batch is prefilled JOIN_CHUNK tokens per step (the running row takes a token at
    each); one whose prefill fails is answered with 500, and the running row goes on to its own text."""
    from hybridlm.infer import batching, decode

    monkeypatch.setattr(batching, "JOIN_CHUNK", 4)
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    running = worker.submit(request({"prompt": "a", "max_tokens": 12}))
    worker.step()
    joining = worker.submit(request({"prompt": "a prompt of 20 bytes", "max_tokens": 3}))
    for made in (2, 3, 4, 5, 6):  # 20 bytes: 5 chunks of 4, the last one's step picks its first token
        worker.step()
        assert running.rows[0].tokens == made
    assert joining.rows[0].tokens == 1
    prefill = decode._Joining.prefill
    monkeypatch.setattr(decode._Joining, "prefill", lambda self, model, size: 1 / 0)
    failing = worker.submit(request({"prompt": "bbbbbbbbbb", "max_tokens": 3}))
    worker.step()
    monkeypatch.setattr(decode._Joining, "prefill", prefill)
    drain(worker)
    kind, _, error = events(failing)[-1]
    assert kind == "error" and error.status == 500 and "ZeroDivisionError" in error.message
    assert "JoinError" not in error.message
    assert running.rows[0].completion.text == TOKENIZER.decode(solo(model, "a", 12))
    assert joining.rows[0].completion.text == TOKENIZER.decode(solo(model, "a prompt of 20 bytes", 3))


def test_an_echoed_prompt_is_scored_by_its_prefill_one_forward_for_lm_evals_request(model, monkeypatch):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 1): with static and with continuous
    batching its prompts run through the model once (scored as they are prefilled; static batching ran them twice,
    to score them, then to prefill them); the answers are the same."""
    counted = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: counted.append(1) or forward(self, *a, **k))
    body = {"prompt": ["The cat sat", "on the mat"], "max_tokens": 1, "echo": True, "logprobs": 1, "seed": 1234}
    answers, forwards = {}, {}
    for continuous in (False, True):
        worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=continuous)
        job = worker.submit(request(body))
        counted.clear()
        drain(worker)
        forwards[continuous] = len(counted)
        answers[continuous] = [
            [(t, None if s is None else (s.top, round(s.logprob, 5))) for t, s in row.scored] for row in job.rows
        ]
    assert forwards == {False: 1, True: 1}
    assert answers[True] == answers[False] and [len(a) for a in answers[True]] == [12, 11]


def test_continuous_samplers_of_settings_no_row_uses_are_dropped(model):
    """A batch that never drains keeps samplers only for the settings of its rows (one per settings, not one per
    request seen)."""
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    worker.submit(request({"prompt": "a", "max_tokens": 30}))
    worker.step()
    for penalty in (1.1, 1.2, 1.3, 1.4):
        worker.submit(request({"prompt": "b", "max_tokens": 1, "repetition_penalty": penalty}))
        worker.step()
        worker.step()
    assert worker.running is not None and len(worker.samplers) <= 2


def test_continuous_a_prompt_that_cannot_be_prefilled_when_it_joins_is_named_by_its_cause(model, monkeypatch):
    """A prompt prefilled whole at admission (no row decoding; in a cache of its own, its slots rounded up as on a
    GPU) whose prefill fails: 500 with the failure's own message, not the wrapper's."""
    from hybridlm.infer import decode

    monkeypatch.setattr(decode._Joining, "prefill", lambda self, model, size: 1 / 0)
    monkeypatch.setattr(decode.DecodeBatch, "_round", lambda self, rows: rows + 1)
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    first = worker.submit(request({"prompt": "a", "max_tokens": 3}))
    drain(worker)
    kind, _, error = events(first)[-1]
    assert kind == "error" and error.message == "generation failed: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("continuous", [False, True])
def test_prompts_that_share_a_prefix_run_it_once_and_answer_as_each_alone(model, monkeypatch, continuous):
    """A few-shot task's requests (one long shared prefix, then each its own question), queued together: the prefix
    runs once for the batch (its forwards take the prefix once, then the rests), and each answer is its prompt's
    alone; a request with nothing shared in the same batch too."""
    from hybridlm.infer import prefixes

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 16)
    shots = "Q: 1+1? A: 2. Q: 2+2? A: 4. "  # 28 bytes
    texts = [shots + "Q: 3+3? A:", shots + "Q: 10+1? A:", "unrelated", shots + "Q: 3+3? A:"]
    shapes = record_forwards(monkeypatch, model)
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=continuous)
    jobs = [worker.submit(request({"prompt": text, "max_tokens": 5})) for text in texts]
    drain(worker)
    prefill = [n for _, n in shapes if n > 1]
    # alone: "unrelated"; the prefix (the shots and "Q: "), then the rests of lengths 7 and 8
    assert sorted(prefill) == [7, 8, 9, 31], shapes
    for job, text in zip(jobs, texts):
        assert job.rows[0].completion.text == TOKENIZER.decode(solo(model, text, 5))


@pytest.mark.parametrize("continuous", [False, True])
def test_n_samples_of_a_long_prompt_prefill_it_once(model, monkeypatch, continuous):
    """A request for n choices of one 70-token prompt (pass@k's samples): the prompt runs once, its last token once
    per choice (the only forward of more than one position: the prompt but its last token, alone); greedy, every
    choice is the prompt's own continuation, and the usage counts the prompt once."""
    text = "def add(a, b):\n    '''Return the sum of a and b integers.'''\n    retur"  # 70 bytes
    assert len(TOKENIZER.encode(text)) == 70
    shapes = record_forwards(monkeypatch, model)
    worker = BatchWorker(model, TOKENIZER, max_batch_size=8, continuous=continuous)
    job = worker.submit(request({"prompt": text, "n": 4, "max_tokens": 5}))
    drain(worker)
    assert [s for s in shapes if s[1] > 1] == [(1, 69)], shapes
    assert [row.completion.text for row in job.rows] == [TOKENIZER.decode(solo(model, text, 5))] * 4
    assert job.usage()["prompt_tokens"] == 70


def test_the_worker_runs_the_model_without_autograd_on_its_own_thread(model, monkeypatch):
    """The worker's thread has grad mode on, as every new thread has: its steps turn it off, so a continuous batch's
    logits and the answers the prefix cache keeps hold no graph (each step's activations were kept alive)."""
    from hybridlm.infer import prefixes

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 4)
    worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=True)
    worker.submit(request({"prompt": "a prompt of some length", "max_tokens": 3}))
    seen = []

    def run():
        assert torch.is_grad_enabled()
        worker.step()
        seen.append(worker.running.logits.requires_grad)
        drain(worker)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    kept = list(worker.prefixes.entries.values())
    assert seen == [False] and kept and not any(entry.logits.requires_grad for entry in kept)


@pytest.mark.parametrize("continuous", [False, True])
def test_a_conversations_next_turn_runs_only_what_it_adds_to_the_last_answer(model, monkeypatch, continuous):
    """A chat's next turn begins with the last turn's prompt and answer: the answer's state was kept when its row
    ended, so the turn runs its own tokens alone (those after the kept state), and its answer is its prompt's alone.
    Token-id prompts, as a client that tokenizes sends them; without the cache (0) the turn runs whole."""
    from hybridlm.infer import prefixes

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 16)
    first = TOKENIZER.encode("System: be brief. User: name a colour. Assistant:")  # 49 bytes
    answer = generate(model, first, 4, eos_id=TOKENIZER.eos_id)
    turn = first + answer + TOKENIZER.encode(" User: why? Assistant:")
    shapes = record_forwards(monkeypatch, model)
    for cache in (8, 0):
        worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=continuous, prefix_cache=cache)
        runs = []
        for prompt in (first, turn):
            shapes.clear()
            job = worker.submit(request({"prompt": prompt, "max_tokens": 4}))
            drain(worker)
            runs.append([n for _, n in shapes if n > 1])
            assert job.rows[0].tokens == 4
            expected = generate(model, prompt, 4, eos_id=TOKENIZER.eos_id)
            assert job.rows[0].completion.text == TOKENIZER.decode(expected)
        if cache:
            # the answer's state holds the prompt and its first three tokens (the fourth ended the batch unrun)
            assert runs == [[49], [len(turn) - 52]] and worker.prefixes.hits == 1, runs
        else:
            assert runs == [[49], [len(turn)]], runs


@pytest.mark.parametrize("continuous", [False, True])
def test_the_prefix_cache_keeps_a_shared_prefix_for_later_requests(model, monkeypatch, continuous):
    """A conversation's turns, one request at a time: the second shares the first's prompt, which then runs apart
    and is kept; the third runs only its rest. Every answer is its prompt's alone. Without the cache (0) the third
    runs whole."""
    from hybridlm.infer import prefixes

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 16)
    first = "System: be brief. User: name a colour. Assistant:"  # 49 bytes
    texts = [first, first + " red. User: another? Assistant:", first + " blue. User: why? Assistant:"]
    shapes = record_forwards(monkeypatch, model)
    for cache in (8, 0):
        worker = BatchWorker(model, TOKENIZER, max_batch_size=4, continuous=continuous, prefix_cache=cache)
        runs = []
        for text in texts:
            shapes.clear()
            job = worker.submit(request({"prompt": text, "max_tokens": 4}))
            drain(worker)
            runs.append([n for _, n in shapes if n > 1])
            assert job.rows[0].completion.text == TOKENIZER.decode(solo(model, text, 4))
        if cache:
            # the first whole; the second's shared part (the first prompt) apart, then its rest; the third's rest
            assert runs == [[49], [49, 31], [28]] and worker.prefixes.hits == 1, runs
        else:
            assert runs == [[49], [80], [77]], runs


@pytest.fixture(scope="module")
def mtp_model():
    return HybridLM(tiny_config("M[*-]/[*-]/[*-]", vocab_size=257), seed=0).eval()


def test_speculative_serving_answers_as_plain_serving_and_keeps_a_chats_state(mtp_model):
    """--speculative: each request's greedy answer is a plain worker's, its drafts counted for /metrics; a chat's
    next turn (a lone prompt that begins with the last prompt and its answer) runs only what it adds, reported as
    cached tokens; a batch of several prompts runs them one at a time; an echoed prompt's and its answer's logprobs
    are a plain worker's."""
    spec = BatchWorker(mtp_model, TOKENIZER, max_batch_size=4, speculative="mtp")
    plain = BatchWorker(mtp_model, TOKENIZER, max_batch_size=4)
    first = TOKENIZER.encode("System: be brief. User: name a colour. Assistant:")
    answer = generate(mtp_model, first, 6, eos_id=TOKENIZER.eos_id)
    turn = first + answer + TOKENIZER.encode(" User: why? Assistant:")
    for prompt in (first, turn, ["a", "longer prompt"]):
        jobs = [w.submit(request({"prompt": prompt, "max_tokens": 6})) for w in (spec, plain)]
        drain(spec)
        drain(plain)
        assert [r.completion.text for r in jobs[0].rows] == [r.completion.text for r in jobs[1].rows]
        assert events(jobs[0])[-1][0] == "done"
        if prompt is turn:  # the first answer's state: its prompt and all its tokens but the last
            assert jobs[0].usage()["prompt_tokens_details"]["cached_tokens"] == len(first) + 6 - 1
    metrics = {name: value for name, _, _, value in spec.metrics()}
    assert 0 < metrics["speculative_accepted_tokens_total"] <= metrics["speculative_drafted_tokens_total"]
    jobs = [w.submit(request({"prompt": "x", "max_tokens": 4, "logprobs": 2, "echo": True})) for w in (spec, plain)]
    drain(spec)
    drain(plain)
    got, want = (job.rows[0].logprobs() for job in jobs)
    assert got["tokens"] == want["tokens"] and got["top_logprobs"] is not None
    assert got["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], abs=1e-5)  # (the first: None)
    with pytest.raises(ValueError, match="static batches"):
        BatchWorker(mtp_model, TOKENIZER, max_batch_size=4, speculative="mtp", continuous=True)
