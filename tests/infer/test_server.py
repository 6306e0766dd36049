"""`hybridlm serve`'s HTTP side: a tiny byte-level model served on port 0 in a thread of the test."""

import contextlib
import http.client
import json
import re
import socket
import threading
import time

import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.errors import NonFiniteLogitsError
from hybridlm.infer.batching import BatchWorker, Job
from hybridlm.infer.logprobs import TokenLogprob
from hybridlm.infer.server import CompletionServer, _Handler
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import tiny_config

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0).eval()


@contextlib.contextmanager
def serving(model, start: bool = True, host: str = "127.0.0.1", chat=None, **kw):
    """``model`` served as "tiny" on a free port of ``host`` (``chat``: its chat template); ``kw`` go to the worker."""
    worker = BatchWorker(model, TOKENIZER, kw.pop("max_batch_size", 8), **kw)
    server = CompletionServer(
        (host, 0), worker, "tiny", encode=TOKENIZER.encode, vocab_size=257, max_tokens_limit=64, timeout=2, chat=chat
    )
    if start:
        worker.start()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.stop()
        thread.join()


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as server:
        yield server


def call(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, body bytes) of one request on a new connection."""
    host, port = server.server_address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return out


def complete(server, body: dict):
    status, headers, data = call(server, "POST", "/v1/completions", body)
    return status, json.loads(data) if headers.get("Content-Type") == "application/json" else data


def wait_until(condition, seconds: float = 10.0) -> None:
    """Poll ``condition`` until it holds (a failure, not a hang, if it never does)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def solo(model, prompt: str, n: int) -> str:
    return TOKENIZER.decode(generate(model, TOKENIZER.encode(prompt), n, eos_id=TOKENIZER.eos_id))


def test_a_greedy_completion_is_generates_text_in_openais_shape(server, model):
    status, body = complete(server, {"model": "tiny", "prompt": "hi", "max_tokens": 12, "temperature": 0})
    assert status == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"text": solo(model, "hi", 12), "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 12,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_several_prompts_are_several_choices_in_order(server, model):
    prompts = ["a", "a much longer prompt", "yo"]
    status, body = complete(server, {"prompt": prompts, "max_tokens": 5, "temperature": 0})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [solo(model, p, 5) for p in prompts]
    assert body["usage"] == {
        "prompt_tokens": 23,
        "completion_tokens": 15,
        "total_tokens": 38,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_a_stream_concatenates_to_the_text_and_ends_with_done(server):
    request = {"prompt": ["hi", "yo"], "max_tokens": 10, "temperature": 0}
    _, whole = complete(server, request)
    status, headers, data = call(
        server, "POST", "/v1/completions", {**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = data.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["object"] for c in chunks} == {"text_completion"}
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == whole["choices"][index]["text"]
        assert [c["finish_reason"] for c in mine][-1] == "length" and mine[-1]["text"] == ""
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.fixture(scope="module")
def server64():
    """A float64 model served: its logprobs are compared with a float64 full forward's."""
    model = HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0, dtype=torch.float64).eval()
    with serving(model) as server:
        yield server


def test_lm_evaluation_harness_scores_a_continuation_by_echo_and_logprobs(server64):
    """Its local-completions loglikelihood request, exactly: the prompt is context + continuation as token ids (one,
    then a batch of two); it reads token_logprobs[ctxlen:-1] (the continuation's: the new token is last) and calls the
    continuation greedy where each of its tokens is the most likely of its top dict."""
    model = server64.worker.model
    context, continuations = TOKENIZER.encode("The cat"), [TOKENIZER.encode(" sat"), TOKENIZER.encode(" zq")]
    body = {"model": "tiny", "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    for prompts in ([context + continuations[0]], [context + c for c in continuations]):
        status, answer = complete(server64, {**body, "prompt": prompts if len(prompts) > 1 else prompts[0]})
        assert status == 200 and len(answer["choices"]) == len(prompts)
        for prompt, choice in zip(prompts, answer["choices"]):
            scores = choice["logprobs"]
            assert len(scores["token_logprobs"]) == len(prompt) + 1 and scores["token_logprobs"][0] is None
            assert scores["top_logprobs"][0] is None and choice["text"].startswith(TOKENIZER.decode(prompt))
            with torch.no_grad():
                reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
            ctxlen = len(context)
            expected = sum(float(reference[i - 1, prompt[i]]) for i in range(ctxlen, len(prompt)))
            assert sum(scores["token_logprobs"][ctxlen:-1]) == pytest.approx(expected, rel=0, abs=1e-9)
            greedy = all(int(reference[i - 1].argmax()) == prompt[i] for i in range(ctxlen, len(prompt)))
            is_greedy = all(
                max(top.values()) == value
                for value, top in zip(scores["token_logprobs"][ctxlen:-1], scores["top_logprobs"][ctxlen:-1])
            )
            assert is_greedy == greedy
            assert all(len(top) in (1, 2) for top in scores["top_logprobs"][1:])
        assert answer["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
        assert answer["usage"]["completion_tokens"] == len(prompts)


def test_echo_starts_the_text_with_the_prompt_and_max_tokens_0_scores_the_prompt_alone(server, model):
    status, body = complete(server, {"prompt": ["hi", "yo"], "max_tokens": 5, "temperature": 0, "echo": True})
    assert status == 200 and [c["text"] for c in body["choices"]] == [p + solo(model, p, 5) for p in ("hi", "yo")]
    assert body["choices"][0]["logprobs"] is None
    status, body = complete(server, {"prompt": "hi there", "max_tokens": 0, "echo": True, "logprobs": 3})
    assert status == 200 and body["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 0,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    (choice,) = body["choices"]
    assert choice["text"] == "hi there" and choice["finish_reason"] == "length"
    scores = choice["logprobs"]
    assert scores["tokens"] == list("hi there") and scores["text_offset"] == list(range(8))
    assert len(scores["token_logprobs"]) == 8 and all(3 <= len(top) <= 4 for top in scores["top_logprobs"][1:])
    status, body = complete(server, {"prompt": "hi", "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_a_stream_with_logprobs_carries_each_chunks_tokens(server):
    """Each chunk the logprobs of the tokens picked since the last one's (the held-back text's too); together, the
    answer's whole logprobs, the echoed prompt's first."""
    request = {"prompt": ["hi", "yo"], "max_tokens": 10, "temperature": 0, "logprobs": 2, "echo": True}
    _, whole = complete(server, request)
    status, _, data = call(server, "POST", "/v1/completions", {**request, "stream": True})
    assert status == 200
    chunks = [json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n")[:-2]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == whole["choices"][index]["text"]
        joined = {key: [x for c in mine for x in c["logprobs"][key]] for key in whole["choices"][index]["logprobs"]}
        assert joined == whole["choices"][index]["logprobs"] and len(joined["tokens"]) == 12


def test_a_streamed_chunks_logprobs_are_its_own_tokens_however_late_the_handler_reads(model, monkeypatch):
    """Each chunk carries the tokens its text came from, not all those picked by the time the handler reads it: here
    every event is queued at the batch's end (a handler far behind), and ASCII tokens make each chunk's text the join
    of its tokens' texts (the first chunk's with the echoed prompt's)."""
    held = []

    def emit(job, kind, index=None, value=None):
        held.append((job, (kind, index, value)))
        if kind in ("done", "error"):
            for j, event in held:
                j.events.put(event)

    def picking(model, rows, max_new_tokens, callback, **kw):  # "abcd", each token 'the most likely'
        for token in b"abcd"[:max_new_tokens]:
            if callback(0, token, TokenLogprob(-0.5, ((token, -0.5),))):
                break

    monkeypatch.setattr(Job, "emit", emit)
    request = {"prompt": "hi", "max_tokens": 4, "logprobs": 1, "echo": True, "stream": True}
    with serving(model, generate=picking) as server:
        status, _, data = call(server, "POST", "/v1/completions", request)
    assert status == 200
    chunks = [json.loads(e.removeprefix("data: "))["choices"][0] for e in data.decode().split("\n\n")[:-2]]
    assert [c["text"] for c in chunks] == ["hia", "b", "c", "d", ""]
    assert [c["logprobs"]["tokens"] for c in chunks] == [["h", "i", "a"], ["b"], ["c"], ["d"], []]
    assert [c["logprobs"]["text_offset"] for c in chunks] == [[0, 1, 2], [3], [4], [5], []]


def test_the_end_of_text_is_a_stop_and_a_stop_string_cuts_the_text(server, model):
    text = solo(model, "hi", 20)
    stop = text[6:8]
    status, body = complete(server, {"prompt": "hi", "max_tokens": 20, "temperature": 0, "stop": stop})
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["text"] == text[: text.index(stop)]
    assert body["usage"]["completion_tokens"] < 20


def test_requests_queued_together_run_as_one_batch(model):
    with serving(model, start=False) as server:
        answers = {}

        def ask(prompt):
            answers[prompt] = complete(server, {"prompt": prompt, "max_tokens": 6, "temperature": 0})

        threads = [threading.Thread(target=ask, args=(p,)) for p in ("one", "two")]
        for t in threads:
            t.start()
        wait_until(lambda: server.worker.queue.qsize() == 2)  # both handlers have queued their requests
        server.worker.start()
        for t in threads:
            t.join()
        assert server.worker.batches == 1
        for prompt in ("one", "two"):
            assert answers[prompt][1]["choices"][0]["text"] == solo(model, prompt, 6)


@pytest.mark.parametrize(
    "raw, status, param, words",
    [
        (b'{"prompt": "hi",', 400, None, "not valid JSON"),
        (b'{"prompt": "hi", "best": 1}', 400, "best", "unknown field"),
        (b'{"prompt": "hi", "n": 200}', 400, "n", "[1, 128]"),
        (b'{"prompt": "hi", "max_tokens": -3}', 400, "max_tokens", "[1, 64]"),
        (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature", "a number"),
        (b'{"prompt": "hi", "model": "other"}', 404, "model", "serves 'tiny'"),
    ],
)
def test_bad_requests_get_openai_error_bodies_naming_the_field(server, raw, status, param, words):
    got, headers, data = call(server, "POST", "/v1/completions", raw=raw)
    error = json.loads(data)["error"]
    assert got == status and error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error" and headers["Content-Type"] == "application/json"


def test_unknown_paths_are_404_and_wrong_methods_405(server):
    status, _, data = call(server, "GET", "/v1/embeddings")
    assert status == 404 and "no route /v1/embeddings" in json.loads(data)["error"]["message"]
    status, headers, data = call(server, "GET", "/v1/completions")
    assert (
        status == 405 and headers["Allow"] == "POST" and "takes POST, not GET" in json.loads(data)["error"]["message"]
    )
    status, headers, _ = call(server, "DELETE", "/v1/models")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_head_answers_gets_status_and_headers_without_the_body(server):
    """HTTP asks HEAD of every server, and a ``curl -I`` health check sends it (it was a 501)."""
    for path in ("/health", "/v1/models", "/v1/models/tiny", "/v1/models/other", "/nowhere"):
        get, _, data = call(server, "GET", path)
        status, headers, body = call(server, "HEAD", path)
        assert (status, body) == (get, b"") and headers["Content-Length"] == str(len(data)), path
    status, headers, body = call(server, "HEAD", "/v1/completions")
    assert (status, headers["Allow"], body) == (405, "POST", b"")
    # (http.client reads no body after HEAD: one sent would be read as the start of the next answer)
    assert raw_request(server, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"\r\n\r\n")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_address_is_served_and_bracketed_in_its_url(model):
    with serving(model, start=False, host="::1") as server:
        port = server.server_address[1]
        assert server.url == f"http://[::1]:{port}/v1"
        connection = http.client.HTTPConnection("::1", port, timeout=10)
        connection.request("GET", "/v1/models")
        assert connection.getresponse().status == 200
        connection.close()


def test_health_is_503_while_the_models_thread_is_not_running(model):
    with serving(model, start=False) as server:
        status, _, data = call(server, "GET", "/health")
    assert status == 503 and json.loads(data) == {"status": "stopped"}


def test_the_model_list_names_the_one_model_and_health_says_ok(server):
    status, _, data = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(data)["data"]] == ["tiny"]
    status, _, data = call(server, "GET", "/v1/models/tiny")
    assert status == 200 and json.loads(data)["object"] == "model"
    assert call(server, "GET", "/v1/models/other")[0] == 404
    status, _, data = call(server, "GET", "/health?verbose=1")
    assert status == 200 and json.loads(data) == {"status": "ok"}


def raw_request(server, data: bytes) -> bytes:
    with socket.create_connection(server.server_address, timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


def test_a_body_shorter_or_longer_than_its_length_or_without_one_is_refused(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    short = raw_request(server, head + b"Content-Length: 40\r\n\r\n" + b'{"prompt": "hi"}')
    assert short.startswith(b"HTTP/1.1 400") and b"ended after 16 of its Content-Length 40 bytes" in short
    assert raw_request(server, head + b"\r\n").startswith(b"HTTP/1.1 411")
    assert raw_request(server, head + b"Content-Length: -1\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw_request(server, head + b"Content-Length: 99999999999\r\n\r\n").startswith(b"HTTP/1.1 413")


def test_a_generation_error_answers_500_and_the_next_request_is_served(model):
    calls = []

    def failing_once(model, rows, **kw):
        calls.append(rows)
        if len(calls) <= 2:
            raise NonFiniteLogitsError(0, "the logits for new token 1 are not finite")
        return generate(model, rows, **kw)

    with serving(model, generate=failing_once) as server:
        status, body = complete(server, {"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert status == 500 and body["error"]["message"] == "choice 0: the logits for new token 1 are not finite"
        # A stream that fails before its first text is answered with the status too, not a 200 and an error event.
        status, body = complete(server, {"prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True})
        assert status == 500 and body["error"]["message"] == "choice 0: the logits for new token 1 are not finite"
        status, body = complete(server, {"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == solo(model, "hi", 3)


def test_a_request_of_more_prompts_than_a_batch_is_answered_whole(model):
    prompts = ["a", "bb", "ccc"]
    with serving(model, max_batch_size=2) as server:
        status, body = complete(server, {"prompt": prompts, "max_tokens": 3, "temperature": 0})
        wait_until(lambda: server.worker.batches == 2)  # (its last row ran with no other request to wake the worker)
    assert status == 200 and [c["text"] for c in body["choices"]] == [solo(model, p, 3) for p in prompts]
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 3


def gated(release: threading.Event):
    """A generate that waits at each token until ``release`` is set."""

    def run(model, rows, **kw):
        callback = kw.pop("callback")

        def wait_then(row, token):
            stop = callback(row, token)
            release.wait(10)
            return stop

        return generate(model, rows, callback=wait_then, **kw)

    return run


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_it_waits_stops_its_row(model, stream):
    """Gone while no event comes (a whole answer, or a stream's next chunk): its handler finds the connection
    closed, not only a failed write, which never came for a whole answer until its last token."""
    release = threading.Event()
    with serving(model, generate=gated(release)) as server:
        try:
            jobs, submit = [], server.worker.submit
            server.worker.submit = lambda request: jobs.append(submit(request)) or jobs[-1]
            body = json.dumps({"prompt": "hi", "max_tokens": 64, "temperature": 0, "stream": stream}).encode()
            with socket.create_connection(server.server_address, timeout=10) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_until(lambda: jobs and jobs[0].rows[0].tokens == 1)  # its first token, then the gate
            wait_until(lambda: jobs[0].cancelled)
        finally:
            release.set()
        wait_until(lambda: not server.answering)
        assert complete(server, {"prompt": "yo", "max_tokens": 2, "temperature": 0})[0] == 200
        assert jobs[0].rows[0].tokens < 64 and jobs[0].rows[0].finish is None and jobs[0] not in server.worker.open


def test_a_client_that_leaves_a_stream_stops_its_row(model):
    before = threading.Event()  # the stream's first chunk is read, and the client gone, before token 2
    with serving(model, max_batch_size=8, generate=gated(before)) as server:
        jobs, submit = [], server.worker.submit
        server.worker.submit = lambda request: jobs.append(submit(request)) or jobs[-1]
        body = json.dumps({"prompt": "hi", "max_tokens": 64, "temperature": 0, "stream": True}).encode()
        with socket.create_connection(server.server_address, timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert s.recv(15) == b"HTTP/1.1 200 OK"
        before.set()
        wait_until(lambda: not server.answering)  # the handler wrote into the closed connection and gave up
        assert complete(server, {"prompt": "yo", "max_tokens": 2, "temperature": 0})[0] == 200
        assert jobs[0].cancelled and jobs[0].rows[0].tokens < 64 and jobs[0].rows[0].finish is None


def slow(started: threading.Event):
    """A generate that says it has started and takes 10 ms a token."""

    def run(model, rows, **kw):
        started.set()
        callback = kw.pop("callback")
        return generate(model, rows, callback=lambda r, t: callback(r, t) or time.sleep(0.01), **kw)

    return run


def test_stopping_the_server_answers_an_open_request_with_503(model):
    started = threading.Event()
    with serving(model, generate=slow(started)) as server:
        answer = {}
        thread = threading.Thread(
            target=lambda: answer.update(r=complete(server, {"prompt": "hi", "max_tokens": 64, "temperature": 0}))
        )
        thread.start()
        assert started.wait(5)
    thread.join()
    status, body = answer["r"]
    assert status == 503 and "stopping" in body["error"]["message"]


def test_stop_returns_once_the_open_requests_answers_are_written(model, monkeypatch):
    """``hybridlm serve`` ends its process when stop returns: an answer not written by then is never sent."""
    written, write = [], _Handler._json

    def slow_write(handler, status, body, allow=None):
        time.sleep(0.2)  # (a handler slower than the worker's stop)
        write(handler, status, body, allow)
        written.append(status)

    started = threading.Event()
    with serving(model, generate=slow(started)) as server:
        monkeypatch.setattr(_Handler, "_json", slow_write)
        thread = threading.Thread(target=complete, args=(server, {"prompt": "hi", "max_tokens": 64, "temperature": 0}))
        thread.start()
        assert started.wait(5)
        server.shutdown()
        server.stop()
        assert written == [503]
    thread.join()


def test_stopping_mid_stream_sends_an_error_event_then_done(model):
    body = json.dumps({"prompt": "hi", "max_tokens": 64, "temperature": 0, "stream": True}).encode()
    with serving(model, generate=slow(threading.Event())) as server:
        s = socket.create_connection(server.server_address, timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"data: " not in got:  # the stream is under way
            piece = s.recv(65536)
            assert piece, got
            got += piece
    with s:
        got += b"".join(iter(lambda: s.recv(65536), b""))
    events = got.split(b"\r\n\r\n", 1)[1].decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["message"].startswith("the server is stopping") and error["type"] == "server_error"
    assert all(json.loads(e.removeprefix("data: "))["choices"] for e in events[:-3])


def test_a_connection_is_kept_alive_across_requests_and_errors_unless_http_1_0(server):
    host, port = server.server_address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    sockets = set()
    for body, status in (
        ({"prompt": "a", "max_tokens": 1}, 200),
        ({"prompt": "a", "n": 0}, 400),
        ({"prompt": "b"}, 200),
    ):
        connection.request("POST", "/v1/completions", body=json.dumps(body))
        sockets.add(connection.sock)  # (http.client opens another connection where the server closed the last)
        response = connection.getresponse()
        assert response.status == status and json.loads(response.read())
        assert response.getheader("Connection") is None
    connection.close()
    assert len(sockets) == 1
    body = b'{"prompt": "a", "max_tokens": 1}'
    with socket.create_connection(server.server_address, timeout=1) as s:  # HTTP/1.0 closes after its answer
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 200") and b'"finish_reason": "length"' in answer


def test_http_servers_own_refusals_are_openai_shaped_too(server):
    status, headers, data = call(server, "OPTIONS", "/v1/completions")
    assert status == 501 and headers["Content-Type"] == "application/json"
    assert json.loads(data)["error"]["type"] == "server_error"
    answer = raw_request(server, b"NONSENSE\r\n\r\n")  # (read as HTTP/0.9: the body alone)
    assert json.loads(answer)["error"]["message"] == "Bad request syntax ('NONSENSE')"


def test_a_content_length_of_other_digits_is_a_400_not_a_crash(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n"
    answer = raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 400") and b"is not a byte count" in answer


def test_continuous_batching_answers_concurrent_requests_as_the_static_server_does(model):
    """Requests of mixed kinds sent 10 ms apart from their own threads (plain, several prompts, a stream with
    logprobs, lm-evaluation-harness's echoed loglikelihood request, a penalized one, a sample of top_k 1) get the
    same texts and logprobs (to float rounding) from a server with continuous batching as from the static one."""
    bodies = [
        {"prompt": "hi", "max_tokens": 12},
        {"prompt": ["a", "a much longer prompt"], "max_tokens": 5},
        {"prompt": "yo", "max_tokens": 9, "logprobs": 2, "stream": True},
        {"prompt": "The cat sat", "max_tokens": 1, "logprobs": 1, "echo": True},
        {"prompt": "ok", "max_tokens": 7, "repetition_penalty": 1.3},
        {"prompt": "so", "max_tokens": 6, "temperature": 1.0, "top_k": 1},
    ]
    answers = {}
    for continuous in (False, True):
        with serving(model, continuous=continuous) as server:
            got = [None] * len(bodies)

            def send(i: int, server=server, got=got) -> None:
                time.sleep(0.01 * i)
                status, _, data = call(server, "POST", "/v1/completions", {"temperature": 0, **bodies[i]})
                assert status == 200
                if bodies[i].get("stream"):
                    chunks = [json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n")[:-2]]
                    choices = [c["choices"][0] for c in chunks]
                    tokens = [lp for c in choices if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
                    got[i] = ["".join(c["text"] for c in choices)], tokens
                else:
                    body = json.loads(data)
                    scores = [lp for c in body["choices"] if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
                    got[i] = [c["text"] for c in body["choices"]], scores

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            answers[continuous] = got
            if continuous:  # (the answers are written as rows end, before the step that ended them returns)
                wait_until(lambda server=server: server.worker.running is None)
    for (texts, scores), (want_texts, want_scores) in zip(answers[True], answers[False], strict=True):
        assert texts == want_texts
        assert scores == pytest.approx(want_scores, abs=1e-5)
    assert answers[True][0][0] == [solo(model, "hi", 12)] and len(answers[True][2][1]) == 9


def test_many_clients_connecting_at_once_are_held_until_accepted(model):
    """32 connections made while the server accepts none (its thread busy, as the model's thread keeps it): the
    kernel holds them all. socketserver's backlog of 5 held 6, and the others' connects timed out (clients saw
    resets and second-long stalls under 16 concurrent requests)."""
    with serving(model, start=False) as server:
        server.shutdown()  # (the accepting loop stopped: nothing takes the connections)
        sockets = []
        try:
            for _ in range(32):
                sockets.append(socket.create_connection(server.server_address[:2], timeout=0.5))
        finally:
            for s in sockets:
                s.close()
    assert len(sockets) == 32


def test_n_samples_per_prompt_are_choices_numbered_prompt_by_prompt_as_generates_seeded_batch(server, model):
    """n: 2 prompts x 3 samples are 6 choices, prompt 0's first (index i * n + j); seeded, they are the samples of
    generate's batch of those 6 rows with that seed; the usage counts each prompt's tokens once; streamed, the
    same texts by index; on the chat route, n choices of one conversation."""
    body = {"prompt": ["ab", "cde"], "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    status, answer = complete(server, body)
    assert status == 200 and [c["index"] for c in answer["choices"]] == list(range(6))
    rows = [TOKENIZER.encode(p) for p in ("ab", "ab", "ab", "cde", "cde", "cde")]
    want = generate(model, rows, 6, temperature=1.0, seed=7, eos_id=TOKENIZER.eos_id)
    assert [c["text"] for c in answer["choices"]] == [
        TOKENIZER.decode([t for t in w if t != TOKENIZER.eos_id]) for w in want
    ]
    assert len({c["text"] for c in answer["choices"][:3]}) > 1  # samples, not one text thrice
    assert answer["usage"]["prompt_tokens"] == 5
    status, _, data = call(server, "POST", "/v1/completions", {**body, "stream": True})
    chunks = [json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n")[:-2]]
    for index in range(6):
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(texts) == answer["choices"][index]["text"]


def _metrics(server) -> dict[str, float]:
    """GET /metrics as {name: value}, each sample checked against Prometheus' text format on the way."""
    status, headers, data = call(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    values, described = {}, set()
    for line in data.decode().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            described.add(line.split()[2])
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\{model_name="tiny"\} (-?[0-9.e+]+)', line)
        assert match, line
        assert match[1] in described  # (its HELP and TYPE come first)
        values[match[1]] = float(match[2])
    return values


@pytest.mark.parametrize("max_tokens", [0, 2])
def test_scored_prompts_report_the_tokens_a_kept_scored_prefix_stood_for(model, monkeypatch, max_tokens):
    """Echoed prompts scored with logprobs (lm-evaluation-harness's requests) reuse a prefix kept from earlier scored
    prompts, and their usage says how many tokens it stood for; with new tokens too (the scoring forward is then
    their prefill)."""
    from hybridlm.infer import prefixes

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 8)
    shared = "a system prompt of some length: "
    with serving(model) as server:
        cached = []
        for end in ("one", "two", "three"):
            body = {"prompt": shared + end, "max_tokens": max_tokens, "echo": True, "logprobs": 1, "temperature": 0}
            status, answer = complete(server, body)
            assert status == 200
            cached.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 0, 32]


def test_metrics_sum_each_request_s_latency_and_time_to_first_token(model):
    """GET /metrics: the requests finished, and the seconds from taking each to its first token and to its end,
    summed (Prometheus counters, as a rate of sums over a rate of counts gives the mean); a request of no new tokens
    finishes without a first token."""
    with serving(model) as server:
        before = _metrics(server)
        assert before["hybridlm_request_seconds_total"] == 0 and before["hybridlm_first_tokens_total"] == 0
        t0 = time.perf_counter()
        for body in (
            {"prompt": ["hi", "yo"], "max_tokens": 4, "temperature": 0},
            {"prompt": "a prompt", "max_tokens": 6, "temperature": 0},
            {"prompt": "scored", "max_tokens": 0, "echo": True, "logprobs": 1},
        ):
            assert complete(server, body)[0] == 200
        wall = time.perf_counter() - t0
        got = _metrics(server)
    assert got["hybridlm_requests_finished_total"] == 3 and got["hybridlm_first_tokens_total"] == 2
    first, whole = got["hybridlm_first_token_seconds_total"], got["hybridlm_request_seconds_total"]
    assert 0 < first < whole <= wall


@pytest.mark.parametrize("continuous", [False, True])
def test_metrics_count_requests_tokens_and_the_prefix_cache_in_prometheus_text(model, monkeypatch, continuous):
    """GET /metrics: requests, choices, prompt and generated tokens as the answers' usage counts them, batches,
    and the prefix cache's hits once a prompt begins with a kept prefix, which that answer's usage reports as
    cached_tokens (OpenAI's prompt_tokens_details), static or continuous batching; HEAD gives its headers alone."""
    from hybridlm.infer import prefixes

    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 8)
    with serving(model, continuous=continuous) as server:
        assert _metrics(server)["hybridlm_requests_total"] == 0
        answers = []
        shared = "a system prompt of some length: "
        for body in (
            {"prompt": ["hi", "yo"], "max_tokens": 3, "temperature": 0, "n": 2},
            {"prompt": shared + "one", "max_tokens": 2, "temperature": 0},
            {"prompt": shared + "two", "max_tokens": 2, "temperature": 0},
            {"prompt": shared + "three", "max_tokens": 2, "temperature": 0},
        ):
            status, answer = complete(server, body)
            assert status == 200
            answers.append(answer)
        # (a request is answered at its last token, before its batch has ended: the worker's last copies and counts)
        got = _metrics(server)
        for _ in range(100):
            if got["hybridlm_rows_running"] == 0:
                break
            time.sleep(0.05)
            got = _metrics(server)
        assert got["hybridlm_requests_total"] == 4 and got["hybridlm_choices_total"] == 4 + 1 + 1 + 1
        assert got["hybridlm_prompt_tokens_total"] == sum(a["usage"]["prompt_tokens"] for a in answers)
        assert got["hybridlm_generation_tokens_total"] == sum(a["usage"]["completion_tokens"] for a in answers)
        assert got["hybridlm_batches_total"] == 4 and got["hybridlm_rows_running"] == 0
        # the second request's prompt ran whole; the third shared its first 32 bytes with it (run apart, kept); the
        # fourth began with them. Each of the three answers is kept too: its prompt and its first token (the second,
        # its last, never ran: each ends at its limit)
        assert got["hybridlm_prefix_cache_hits_total"] == 1 and got["hybridlm_prefix_cache_hit_tokens_total"] == 32
        assert [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers] == [0, 0, 0, 32]
        assert [a["choices"][0]["finish_reason"] for a in answers[1:]] == ["length"] * 3
        kept = [a["usage"]["prompt_tokens"] + 1 for a in answers[1:]]
        assert got["hybridlm_prefix_cache_entries"] == 1 + 3 and got["hybridlm_prefix_cache_positions"] == 32 + sum(
            kept
        )
        store = server.worker.prefixes
        assert got["hybridlm_prefix_cache_bytes"] == store.nbytes == sum(e.nbytes for e in store.entries.values()) > 0
        assert got["hybridlm_requests_failed_total"] == 0
        status, headers, data = call(server, "HEAD", "/metrics")
        assert status == 200 and data == b"" and int(headers["Content-Length"]) > 0
