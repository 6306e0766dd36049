"""``hybridlm serve``'s batching: how many tokens per second K concurrent clients get, batched (statically or
continuously) or not.

    python benchmarks/serve.py                       # CPU, embedded default model, 8 clients
    python benchmarks/serve.py --clients 16 --max-tokens 64 --device cuda
    python benchmarks/serve.py --preset bench-1.3b --device cuda --cuda-graph --clients 16 --max-tokens 64
    python benchmarks/serve.py --continuous --stagger 0.05 --spread      # requests arriving apart, of mixed lengths

The embedded default model of ``hybridlm train`` (random weights, byte tokenizer) is served in this process on a
free localhost port, as ``hybridlm serve`` serves it (the same ``BatchWorker`` and ``CompletionServer``). K client
threads each send one greedy request at once (different prompts of ``--prompt-len`` bytes, ``--max-tokens`` new
tokens at most each), with ``--max-batch-size 1`` (one request after another: what a server without batching
does) and with ``--max-batch-size K`` (K times ``--n``), the two taking turns ``--repeat`` times (default 3; the
median round of each is shown: the host may be shared). The table gives the wall time from the first request sent
to the last answer read, the completion tokens per second over all clients, the mean latency of one request and the
number of batches the worker ran (``generate`` calls; continuous: batches started) and, with ``--cuda-graph``, the
decode graphs it captured (the warm-up request's kept out: a shape captured once is replayed); it checks that every round of
both settings answered the same texts (exit status 1 if not, in float32: greedy decoding of a row alone and in a
left-padded batch agrees up to near-ties; in bf16 the count of equal texts is shown). ``--preset NAME`` serves a
model preset (random weights, bf16 on CUDA; the byte tokenizer's ids are its first 257) in place of the embedded
default; ``--cuda-graph`` adds both settings with each batch's decode step replayed as a CUDA graph (``hybridlm
serve --cuda-graph``); ``--score`` sends lm-evaluation-harness's loglikelihood request in place of a completion
(``echo``, ``logprobs: 1``, one new token: the prompt's tokens scored). ``--continuous`` adds the batched settings
with continuous batching (``hybridlm serve --continuous-batching``: a request joins the running batch at its next step);
``--stagger S`` sends client i's request i * S seconds after the first (not all at once), and ``--spread`` asks
client i for ``max_tokens * (i % 4 + 1) / 4`` new tokens (short requests beside long ones: a static batch holds
the short ones' slots until its longest row ends). The table also gives the 90th percentile of the latency, and with
``--stream`` (the answers streamed) the mean time from sending a request to its first text. ``--choices N`` makes the
prompts multiple-choice questions as lm-evaluation-harness sends them: each question's text followed by N different
8-character endings, one request per choice (``--clients`` / N questions; with N = ``--clients``, a few-shot
task's prompts: one long shared prefix), and adds the batched settings with the shared prefixes run once per batch
(``hybridlm serve --prefix-cache 0``: no states kept for later batches) and once per prompt
(``prefixes.SHARED_PREFIX`` out of reach) beside the default (run once, kept); ``--n N`` asks for N choices per
request (the API's ``n``: pass@k's samples; greedy here, so N equal texts), with the same settings added.
``--turns T`` makes each client hold a conversation of T turns, one request after another: each turn's prompt is
the last turn's prompt, its answer and a new :data:`MESSAGE`-character message, sent as token ids (the answers a
greedy ``generate`` of each prompt alone gives, computed before the timing: a random model's bytes are no text to
send back), with the same settings added; the table then counts the prompts that began with a kept state (a kept
answer: the turn runs only what it adds).
Results belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time

import torch

from hybridlm import HybridLM, ModelConfig, generate
from hybridlm.infer import prefixes
from hybridlm.infer.batching import BatchWorker
from hybridlm.infer.prefixes import SHARED_PREFIX
from hybridlm.infer.server import CompletionServer
from hybridlm.train.config import DEFAULT_MODEL
from hybridlm.train.data import builtin_documents
from hybridlm.train.tokenizer import ByteTokenizer

#: How the settings run prompts' shared prefixes: ``hybridlm serve``'s default (once, their states kept for later
#: batches: ``--prefix-cache 8``), once per batch (``--prefix-cache 0``), or once per prompt (as before either).
SHARING = {"kept": "run once, kept", "batch": "run once per batch", "none": "run per prompt"}
#: ``--choices``: characters that tell a question's choices apart (each prompt's last ones).
ENDING = 8
#: ``--turns``: characters of each later turn's new message.
MESSAGE = 64


def prompts(count: int, length: int, choices: int = 1) -> list[str]:
    """``count`` different prompts of ``length`` characters, cut from the built-in corpus (ASCII text); with
    ``choices`` > 1, questions of that many prompts each, which share all but their last :data:`ENDING` characters."""
    text = " ".join(builtin_documents("pydoc"))
    text = text.encode("ascii", "ignore").decode()
    if choices == 1:
        return [text[i * length : (i + 1) * length] for i in range(count)]
    stem = length - ENDING
    endings = text[count * length :]
    return [
        text[(i // choices) * stem : (i // choices + 1) * stem] + endings[i * ENDING : (i + 1) * ENDING]
        for i in range(count)
    ]


def conversations(model, tokenizer, texts: list[str], turns: int, max_tokens: int) -> list[list[list[int]]]:
    """Each client's ``turns`` prompts (token ids): the first its text, each later one the last prompt, the tokens a
    greedy ``generate`` of it alone takes (the end of text included, as a chat's end of turn is) and a new
    :data:`MESSAGE`-character message cut from the built-in corpus."""
    corpus = " ".join(builtin_documents("pydoc")).encode("ascii", "ignore").decode()[::-1]  # (not the first texts)
    out = []
    for i, text in enumerate(texts):
        ids, convo = tokenizer.encode(text), []
        for t in range(turns):
            convo.append(ids)
            if t + 1 < turns:
                answer = generate(model, ids, max_tokens, eos_id=tokenizer.eos_id)
                message = corpus[(i * turns + t) * MESSAGE : (i * turns + t + 1) * MESSAGE]
                ids = ids + answer + tokenizer.encode(message)
        out.append(convo)
    return out


#: ``--score``'s fields: lm-evaluation-harness's loglikelihood request (the prompt's tokens scored, one new token).
SCORE = {"echo": True, "logprobs": 1, "seed": 1234}


def ask(
    port: int, prompt: str | list[int], max_tokens: int, extra: dict | None = None, delay: float = 0.0
) -> tuple[str, float, int, float]:
    """One greedy completion (``extra``: more fields; ``"stream": True`` reads it as server-sent events), sent after
    ``delay`` seconds: (its text, seconds from sending to the answer read, its completion tokens, seconds to its
    first text: the whole answer's unstreamed)."""
    time.sleep(delay)
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **(extra or {})}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if not body.get("stream") or response.status != 200:
        answer = json.loads(response.read())
        conn.close()
        if "error" in answer:
            raise RuntimeError(answer["error"]["message"])
        latency = time.perf_counter() - start
        text = "\n---\n".join(c["text"] for c in answer["choices"])  # (n > 1: every choice, in order)
        return text, latency, answer["usage"]["completion_tokens"], latency
    text, first, tokens = "", None, 0
    for line in response:  # "data: {chunk}" lines, then "data: [DONE]"
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        for choice in chunk["choices"]:
            if choice["text"] and first is None:
                first = time.perf_counter() - start
            text += choice["text"]
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    latency = time.perf_counter() - start
    return text, latency, tokens, latency if first is None else first


def serve_round(
    model,
    texts: list[str],
    max_tokens: int,
    max_batch: int,
    cuda_graph: bool = False,
    extra: dict | None = None,
    sharing: str = "kept",
    continuous: bool = False,
    stagger: float = 0.0,
    spread: bool = False,
) -> dict:
    """Serve ``model`` with ``max_batch`` rows per batch; send every prompt of ``texts`` from its own thread, at once
    or ``stagger`` seconds apart (``sharing``: :data:`SHARING`'s keys; ``spread``: mixed lengths). A prompt that is a
    list of turns (token-id lists) is a conversation: its turns are sent one after another, each once the last is
    answered."""
    prefixes.SHARED_PREFIX = 10**9 if sharing == "none" else SHARED_PREFIX
    tokenizer = ByteTokenizer()
    kept = 8 if sharing == "kept" else 0
    worker = BatchWorker(model, tokenizer, max_batch, cuda_graph=cuda_graph, continuous=continuous, prefix_cache=kept)
    server = CompletionServer(
        ("127.0.0.1", 0),
        worker,
        "bench",
        encode=tokenizer.encode,
        vocab_size=model.config.vocab_size,
        max_tokens_limit=max_tokens,
    )
    lengths = [lengths_for(max_tokens, i, spread) for i in range(len(texts))]
    worker.start()
    serving = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serving.start()
    port = server.server_address[1]
    results: list = [None] * len(texts)

    failures: list[str] = []

    def client(i: int) -> None:
        try:
            if isinstance(texts[i], str):
                results[i] = [ask(port, texts[i], lengths[i], extra, i * stagger)]
            else:
                turns = enumerate(texts[i])
                results[i] = [ask(port, turn, lengths[i], extra, i * stagger * (t == 0)) for t, turn in turns]
        except Exception as e:  # (the round is reported as failed, the other settings still run)
            failures.append(f"client {i}: {e}")

    try:
        ask(port, "a warm-up", max_tokens, extra)  # a warm-up request: first-call costs out of the timing
        worker.batches = 0
        hits = worker.prefixes.hits if worker.prefixes else 0
        captures = worker.graphs.captures if worker.graphs else 0
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.shutdown()
        server.stop()
        serving.join()
        prefixes.SHARED_PREFIX = SHARED_PREFIX
    if failures:
        raise RuntimeError(f"{len(failures)} client(s) failed, the first: {failures[0]}")
    answers = [r for turns in results for r in turns]
    return {
        "peak": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "texts": [r[0] for r in answers],
        "wall": wall,
        "latency": sum(r[1] for r in answers) / len(answers),
        "p90": sorted(r[1] for r in answers)[min(len(answers) - 1, (9 * len(answers)) // 10)],
        "ttft": sum(r[3] for r in answers) / len(answers),
        "batches": worker.batches,
        "tokens": sum(r[2] for r in answers),
        "hits": (worker.prefixes.hits if worker.prefixes else 0) - hits,
        "captures": (worker.graphs.captures if worker.graphs else 0) - captures,
    }


def lengths_for(max_tokens: int, i: int, spread: bool) -> int:
    """Client ``i``'s max_tokens: ``max_tokens``, or with ``spread`` a quarter, a half, three quarters or all of it."""
    return max(1, max_tokens * (i % 4 + 1) // 4) if spread else max_tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent requests (default: 8)")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt characters = tokens (default: 256)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: 32; 1 with --score)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="rounds of each setting, taking turns; the median is shown (default: 3)"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu; bf16 on CUDA)")
    ap.add_argument("--preset", default=None, help="serve this model preset (random weights) in place of the default")
    ap.add_argument("--cuda-graph", action="store_true", help="also time both settings with CUDA-graphed decoding")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument(
        "--score",
        action="store_true",
        help="send lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 1) instead",
    )
    ap.add_argument("--continuous", action="store_true", help="also time the batched settings with continuous batching")
    ap.add_argument("--stagger", type=float, default=0.0, help="seconds between the clients' requests (default: 0)")
    ap.add_argument("--spread", action="store_true", help="client i asks for max_tokens * (i %% 4 + 1) / 4 tokens")
    ap.add_argument("--stream", action="store_true", help="stream the answers; the table adds the time to first text")
    ap.add_argument(
        "--choices",
        type=int,
        default=1,
        help="questions of N choices: prompts that share all but their last 8 characters (default: 1)",
    )
    ap.add_argument("--n", type=int, default=1, help="choices per request (the API's n; default: 1)")
    ap.add_argument(
        "--turns", type=int, default=1, help="a conversation of T turns per client, one after another (default: 1)"
    )
    args = ap.parse_args(argv)
    if args.score:
        args.max_tokens = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig.preset(args.preset) if args.preset else ModelConfig(**{**DEFAULT_MODEL, "vocab_size": 257})
    model = HybridLM(config, seed=0, device=device).to(dtype).eval()
    if args.choices < 1 or args.clients % args.choices or (args.choices > 1 and args.prompt_len <= ENDING):
        ap.error(f"--choices must divide --clients, and with several choices --prompt-len exceed {ENDING} characters")
    if args.turns < 1 or (args.turns > 1 and (args.score or args.choices > 1 or args.n > 1 or args.spread)):
        ap.error("--turns must be >= 1, and more than 1 only without --score, --choices, --n and --spread")
    texts = prompts(args.clients, args.prompt_len, args.choices)
    if args.turns > 1:
        texts = conversations(model, ByteTokenizer(), texts, args.turns, args.max_tokens)
    # (max batch size, CUDA graph, sharing of prompt prefixes, continuous batching)
    graphs = [False, True] if args.cuda_graph else [False]
    rows = args.clients * args.n  # (the batched settings take every choice of every request at once)
    settings = [(b, g, "kept", False) for g in graphs for b in (1, rows)]
    if args.continuous:
        settings += [(rows, g, "kept", True) for g in graphs]
    shares = args.choices > 1 or args.n > 1 or args.turns > 1
    if shares:
        settings += [(rows, False, "batch", cont) for cont in (False, True)[: 1 + args.continuous]]
        settings.append((rows, False, "none", False))
    runs: dict[tuple[int, bool, str, bool], list[dict]] = {s: [] for s in settings}
    extra = SCORE if args.score else None
    if args.n > 1:
        extra = {**(extra or {}), "n": args.n}
    if args.stream:
        extra = {**(extra or {}), "stream": True, "stream_options": {"include_usage": True}}
    failed: dict[tuple[int, bool, str, bool], str] = {}  # a setting whose round failed runs no more rounds
    for _ in range(args.repeat):  # the settings take turns, so a busy moment of the host hits all alike
        for (b, g, sharing, cont), done in runs.items():
            if (b, g, sharing, cont) in failed:
                continue
            try:
                done.append(
                    serve_round(model, texts, args.max_tokens, b, g, extra, sharing, cont, args.stagger, args.spread)
                )
            except RuntimeError as e:
                failed[(b, g, sharing, cont)] = str(e)
                print(f"failed: --max-batch-size {b}, {'continuous' if cont else 'static'}, graph {g}, {sharing}: {e}")
    if (1, False, "kept", False) in failed:
        return 1
    rounds = {s: sorted(done, key=lambda r: r["wall"])[len(done) // 2] for s, done in runs.items() if s not in failed}
    name = args.preset or "embedded default model"
    print(
        f"hybridlm serve, {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, "
        f"{str(dtype).removeprefix('torch.')}, {device}, {torch.get_num_threads()} threads): {args.clients} "
        f"concurrent greedy requests, {args.prompt_len}-token prompts, at most {args.max_tokens} new tokens each"
        f"{' (client i: max_tokens * (i % 4 + 1) / 4)' if args.spread else ''}"
        f"{f', sent {args.stagger} s apart' if args.stagger else ''}"
        f"{f', questions of {args.choices} choices (the last {ENDING} characters differ)' if args.choices > 1 else ''}"
        f"{f', {args.n} choices per request (n)' if args.n > 1 else ''}"
        f"{f', conversations of {args.turns} turns ({MESSAGE}-token messages after the first)' if args.turns > 1 else ''}"
        f"{' (lm-evaluation-harness loglikelihood requests: echo, logprobs 1)' if args.score else ''}\n"
    )
    print(f"median of {args.repeat} rounds each, taking turns\n")
    reference = rounds[(1, False, "kept", False)]
    scored = " shared prefixes | prompts from kept states |" if shares else ""
    ttft = " mean time to first text s |" if args.stream else ""
    peak = " peak GiB |" if device.type == "cuda" else ""  # (the model's weights included)
    captured = " graphs captured |" if args.cuda_graph else ""
    print(
        f"| --max-batch-size | batching | CUDA graph |{scored} batches |{captured} wall s | completion tokens/s | "
        f"mean latency s | p90 latency s |{ttft}{peak} same texts |"
    )
    print(
        "|---:|:---:|:---:|"
        + ":---:|---:|" * bool(scored)
        + "---:|" * (1 + bool(captured))
        + "---:|---:|---:|---:|"
        + "---:|" * (bool(ttft) + bool(peak))
        + "---:|"
    )
    for (b, g, sharing, cont), r in rounds.items():
        same = sum(x == y for x, y in zip(r["texts"], reference["texts"], strict=True))
        how = f" {SHARING[sharing]} | {r['hits']} |" if scored else ""
        first = f"{r['ttft']:.2f} | " if args.stream else ""
        first += f"{r['peak']:.1f} | " if peak else ""
        graphs = f" {r['captures']} |" if captured else ""
        print(
            f"| {b} | {'continuous' if cont else 'static'} | {'yes' if g else 'no'} |{how} {r['batches']} |{graphs} "
            f"{r['wall']:.2f} | {r['tokens'] / r['wall']:,.1f} | {r['latency']:.2f} | {r['p90']:.2f} | "
            f"{first}{same} of {len(r['texts'])} |"
        )
    for (b, g, sharing, cont), r in rounds.items():
        if (b, g, sharing, cont) != (1, False, "kept", False):
            label = f"--max-batch-size {b}" + (" --continuous-batching" if cont else "")
            label += (" --cuda-graph" if g else "") + (
                "" if sharing == "kept" else f", shared prefixes {SHARING[sharing]}"
            )
            print(f"{label} / one at a time: {reference['wall'] / r['wall']:.2f}x the throughput")
    same = all(r["texts"] == reference["texts"] for done in runs.values() for r in done) and not failed
    print(f"same texts in every round of every setting: {'yes' if same else 'no'}")
    return 0 if same or dtype != torch.float32 else 1


if __name__ == "__main__":
    sys.exit(main())
