"""The HTTP side of ``hybridlm serve``: an OpenAI-compatible completions endpoint on the standard library's
``ThreadingHTTPServer``.

Routes: ``POST /v1/completions`` (checked by :func:`~hybridlm.infer.api.parse_request`, run by the
:class:`~hybridlm.infer.batching.BatchWorker`), ``POST /v1/chat/completions`` (the same, the prompt rendered by the
model's chat template: :mod:`hybridlm.infer.chat`), ``GET /v1/models`` and ``/v1/models/NAME`` (the one served model),
``GET /health``, ``GET /metrics`` (Prometheus' text format: :func:`prometheus`), and HEAD where GET is taken. Every
error body is OpenAI's ``{"error": {...}}``. Each connection has a handler thread, which waits on its request's
events; a streamed request is sent as server-sent events (``data: {...}``, then ``data: [DONE]``), and a client
that goes away stops its rows (its handler's write fails, or while it waits it finds the connection closed). There
is no authentication: bind to localhost (the default) or put a proxy that checks clients in front.
"""

from __future__ import annotations

import functools
import json
import queue
import re
import socket
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import chat as chat_api
from .api import RequestError, choice, completion, logprobs_body, parse_request, read_json
from .batching import BatchWorker, Job

#: A request body larger than this is refused (413) before it is read: prompts of a few megabytes fill a batch.
MAX_BODY_BYTES = 16 * 2**20
#: Routes and the methods each takes (another method: 405; another path: 404). HEAD is GET's answer without its
#: body (HTTP asks it of every server, and ``curl -I`` health checks send it).
ROUTES = {
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
    "/v1/models": ("GET", "HEAD"),
    "/health": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
}
MODEL_PREFIX = "/v1/models/"
#: Seconds between looks, while a request waits for its next event, at whether its client has gone away.
POLL_SECONDS = 0.5


def prometheus(metrics: list[tuple[str, str, str, float]], model_name: str) -> str:
    """``metrics`` ((name, type, help, value), as :meth:`BatchWorker.metrics` gives them) in Prometheus' text
    exposition format, each name prefixed ``hybridlm_`` and labelled with the served model's name (as vLLM labels
    its own)."""
    label = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines = []
    for name, kind, text, value in metrics:
        lines += [f"# HELP hybridlm_{name} {text}", f"# TYPE hybridlm_{name} {kind}"]
        lines.append(f'hybridlm_{name}{{model_name="{label}"}} {value}')
    return "\n".join(lines) + "\n"


class CompletionServer(ThreadingHTTPServer):
    """Serves ``worker``'s model as ``model_name``; ``encode`` and ``vocab_size`` check prompts before they queue.

    ``serve_forever`` answers requests; :meth:`stop` answers the open ones (503) and closes the socket.
    """

    daemon_threads = True  # (an idle keep-alive connection's thread must not hold the process at exit)
    #: Connections the kernel holds before they are accepted: socketserver's 5 reset clients that connected at once
    #: (16 concurrent requests, as lm-evaluation-harness's num_concurrent sends them, met "connection reset by peer").
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        worker: BatchWorker,
        model_name: str,
        *,
        encode,
        vocab_size: int,
        max_tokens_limit: int,
        log=None,
        timeout: float = 60.0,
        chat: chat_api.Chat | None = None,
    ) -> None:
        """``log``: a function taking each access line (None: quiet). ``timeout``: seconds a connection may take
        to send its request, and a client to take a streamed chunk. ``chat``: the model's chat template and end of
        turn ids (None: ``/v1/chat/completions`` answers that the model has no template)."""
        self.worker, self.model_name, self.chat = worker, model_name, chat
        self.encode, self.vocab_size, self.max_tokens_limit = encode, vocab_size, max_tokens_limit
        self.log, self.timeout, self.created = log, timeout, int(time.time())
        # Handlers answering a request, until its last byte is written (an error's too: a request the stop fails is
        # answered after its job has ended).
        self.answering: set[_Handler] = set()
        self.answered = threading.Condition()
        if ":" in address[0]:  # an IPv6 address (::1, ::)
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "hybridlm"}

    def stop(self, grace: float = 5.0) -> None:
        """Stop the worker (the running batch at its next token; every open request gets 503), let the handlers
        write those answers (at most ``grace`` seconds), then close the listening socket. Call it once
        ``serve_forever`` has returned (or from another thread after :meth:`shutdown`)."""
        self.worker.stop(timeout=grace)
        deadline = time.monotonic() + grace
        with self.answered:
            while self.answering and time.monotonic() < deadline:
                self.answered.wait(deadline - time.monotonic())
        self.server_close()


def _shapes(job: Job, stream: bool = False):
    """(the answer object's builder, a choice's builder, its logprobs object's builder) of ``job``'s API:
    completions, or chat (its chunk and delta where ``stream``)."""
    if isinstance(job.request, chat_api.ChatRequest):
        shapes = (chat_api.chunk, chat_api.delta) if stream else (chat_api.completion, chat_api.choice)
        return (*shapes, chat_api.logprobs_body)
    return completion, choice, logprobs_body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; a streamed response closes its connection at its end
    server: CompletionServer

    def setup(self) -> None:
        self.timeout = self.server.timeout  # (read by StreamRequestHandler.setup)
        super().setup()

    def log_message(self, format: str, *args) -> None:
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} - {format % args}")

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def _route(self, method: str) -> None:
        with self.server.answered:
            self.server.answering.add(self)
        try:
            self._answer(method)
        except OSError:  # the client went away before its answer was written whole (a reset, a broken pipe)
            self.close_connection = True
        finally:
            with self.server.answered:
                self.server.answering.discard(self)
                self.server.answered.notify_all()

    def _answer(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            allowed = ROUTES.get(path, ROUTES["/v1/models"] if path.startswith(MODEL_PREFIX) else None)
            if allowed is None:
                self.close_connection = True  # (a body it may have sent is not read)
                raise RequestError(404, f"no route {path} (this server has {', '.join(ROUTES)})", code="not_found")
            if method not in allowed:
                self.close_connection = True  # (a body it may have sent is not read)
                raise RequestError(405, f"{path} takes {' or '.join(allowed)}, not {method}", code="method_not_allowed")
            if path == "/v1/completions":
                self._complete()
            elif path == "/v1/chat/completions":
                self._complete(chat=True)
            elif path == "/v1/models":
                self._json(200, {"object": "list", "data": [self.server.model_object()]})
            elif path == "/health":
                alive = self.server.worker.thread is not None and self.server.worker.thread.is_alive()
                self._json(200 if alive else 503, {"status": "ok" if alive else "stopped"})
            elif path == "/metrics":
                self._text(prometheus(self.server.worker.metrics(), self.server.model_name))
            elif urllib.parse.unquote(path[len(MODEL_PREFIX) :]) == self.server.model_name:
                self._json(200, self.server.model_object())
            else:
                name = urllib.parse.unquote(path[len(MODEL_PREFIX) :])
                raise RequestError(
                    404, f"this server serves {self.server.model_name!r}, not {name!r}", code="model_not_found"
                )
        except RequestError as e:
            self._json(e.status, e.body(), allow=(", ".join(allowed) if e.status == 405 else None))

    def _body(self) -> bytes:
        """The request body, by its Content-Length (chunked transfer encoding is not read)."""
        keep = self.close_connection  # (as the request line and headers asked: HTTP/1.0, "Connection: close")
        self.close_connection = True  # until the body is read whole: the next request would start inside it
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a request body needs a Content-Length header", code="length_required")
        if not re.fullmatch(r"[0-9]+", length):  # (not str.isdigit: "²" is a digit to it, and no int)
            raise RequestError(400, f"Content-Length {length!r} is not a byte count")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"the body of {int(length):,} bytes is over the limit of {MAX_BODY_BYTES:,}")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            body = b""
        if len(body) < int(length):
            raise RequestError(400, f"the body ended after {len(body)} of its Content-Length {length} bytes")
        self.close_connection = keep
        return body

    def _complete(self, chat: bool = False) -> None:
        server = self.server
        if server.worker.stopping.is_set():
            self.close_connection = True  # (its body is not read)
            raise RequestError(503, "the server is stopping")
        parse = functools.partial(chat_api.parse_chat_request, chat=server.chat) if chat else parse_request
        request = parse(
            read_json(self._body()),
            model_name=server.model_name,
            encode=server.encode,
            vocab_size=server.vocab_size,
            max_tokens_limit=server.max_tokens_limit,
            max_batch_size=server.worker.max_batch_size,
        )
        job = server.worker.submit(request)
        (self._stream if request.stream else self._wait)(job)

    def _next(self, job: Job) -> tuple:
        """``job``'s next event. While none comes, a look every :data:`POLL_SECONDS` at whether the client has
        gone: then the job is cancelled (its rows stop at their next token, or never run) and ConnectionAbortedError
        raised, rather than a batch row spent on an answer nobody reads (a harness that timed out and sent again)."""
        while True:
            try:
                return job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self._client_gone():
                    job.cancel()
                    raise ConnectionAbortedError("the client closed its connection before its answer") from None

    def _client_gone(self) -> bool:
        """Whether the client has closed (or reset) its connection. It sends nothing while it waits for its answer,
        so its socket at end of stream means it is gone (one that shuts down its sending side and waits reads as
        gone too); bytes there are its next request, sent early, and are left to be read."""
        timeout = self.connection.gettimeout()
        self.connection.settimeout(0)  # (a look, not a wait; select() is limited to descriptors below 1024)
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except BlockingIOError:  # nothing to read: still there
            return False
        except OSError:  # a reset
            return True
        finally:
            self.connection.settimeout(timeout)

    def _wait(self, job: Job) -> None:
        while True:
            kind, _, value = self._next(job)
            if kind == "error":
                raise value
            if kind == "done":
                break
        whole, part, scores = _shapes(job)
        choices = [part(row.index, row.text, row.finish) for row in job.rows]
        if job.request.logprobs is not None:
            for body, row in zip(choices, job.rows):
                body["logprobs"] = row.logprobs(shape=scores)
        self._json(200, whole(job.id, job.created, self.server.model_name, choices, job.usage()))

    def _stream(self, job: Job) -> None:
        """Server-sent events: a chunk per piece of text, one per finished choice (its finish_reason), the usage
        where asked, then ``[DONE]``; an error after the headers is sent as an ``{"error": ...}`` event."""
        kind, index, value = self._next(job)  # the first event decides: an error before any text is a status
        if kind == "error":
            raise value
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        name, include = self.server.model_name, job.request.include_usage
        shape, part, scores = _shapes(job, stream=True)
        usage_null = {"usage": None} if include else {}  # (as OpenAI's chunks carry it, null until the last)
        try:
            if isinstance(job.request, chat_api.ChatRequest):  # each choice opens with its role, as OpenAI's do
                for row in job.rows:
                    self._event(shape(job.id, job.created, name, [chat_api.opening(row.index)], None) | usage_null)
            while True:
                if kind == "error":
                    self._event(value.body())
                    break
                if kind == "done":
                    if include:
                        self._event(shape(job.id, job.created, name, [], job.usage()))
                    break
                text, reason = (value, None) if kind == "text" else ("", value)
                body = part(index, text, reason)
                if job.request.logprobs is not None:  # this piece's tokens (all that are left, at its end)
                    row = job.rows[index]
                    body["logprobs"] = row.logprobs(row.marks.popleft() if kind == "text" else None, scores)
                self._event(shape(job.id, job.created, name, [body], None) | usage_null)
                kind, index, value = self._next(job)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away (a reset, a broken pipe, a timeout): its rows stop
            job.cancel()

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long, a method it has no ``do_`` for:
        501) in OpenAI's shape too."""
        self.close_connection = True
        self._json(code, RequestError(code, message or HTTPStatus(code).phrase).body())

    def _json(self, status: int, body: dict, allow: str | None = None) -> None:
        """Answer ``body`` as JSON (its headers alone to a HEAD request)."""
        self._send(status, json.dumps(body).encode(), "application/json", allow)

    def _text(self, text: str) -> None:
        """Answer 200 with Prometheus' text format (its headers alone to a HEAD request)."""
        self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _send(self, status: int, data: bytes, kind: str, allow: str | None = None) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":  # (None: the request line was not read)
            self.wfile.write(data)
        self.wfile.flush()
