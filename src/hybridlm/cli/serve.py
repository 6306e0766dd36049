"""``hybridlm serve``: a trained model behind an OpenAI-compatible completions endpoint (``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``). The requests are checked by
:mod:`hybridlm.infer.api` (chat: :mod:`hybridlm.infer.chat`, with the model's chat template), batched by
:mod:`hybridlm.infer.batching` and answered by :mod:`hybridlm.infer.server`; this module reads the flags, loads the
model and runs the server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

#: ``--max-new-tokens-limit``'s default: the largest ``max_tokens`` a request may ask for (attention's cache holds
#: prompt + max_tokens positions per row from the start, so this bounds what one request can make the server hold).
DEFAULT_MAX_NEW_TOKENS_LIMIT = 2048
DEFAULT_PORT = 8000


def template_kwargs_option(text: str | None) -> dict:
    """``--chat-template-kwargs``'s JSON object (none: {}); UsageError naming the flag otherwise."""
    from ..errors import UsageError
    from ..infer.chat_template import check_variables

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        why = f"not JSON ({e.msg} at character {e.pos}); give an object, such as '{{\"enable_thinking\": false}}'"
        raise UsageError(f"--chat-template-kwargs {text[:60]}: {why}") from None
    try:
        return check_variables(value)
    except ValueError as e:
        raise UsageError(f"--chat-template-kwargs {text[:60]}: {e}") from None


def chat_template_options(ap: argparse.ArgumentParser, use: str, kwargs_use: str) -> None:
    """--chat-template and --chat-template-kwargs: the template ``serve`` and ``chat`` render a conversation with
    (``use``: what it is for) and its own switches (``kwargs_use``: how they are used)."""
    ap.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help=f"a Jinja chat template for {use}, in place of the model folder's (a model hybridlm trained with the "
        "byte tokenizer has none; the folder's special tokens are still given to it)",
    )
    ap.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help=f"a JSON object of the chat template's own switches, {kwargs_use} "
        """(e.g. '{"enable_thinking": false}' for Qwen3's template)""",
    )


def chat_template_check(args: argparse.Namespace) -> tuple[bool, str]:
    """--chat-template's rule, as a (holds, message) pair: a file."""
    return (
        args.chat_template is None or Path(args.chat_template).is_file(),
        f"--chat-template {args.chat_template}: no such file (a Jinja chat template)",
    )


def chat_option(args: argparse.Namespace, path: Path, tokenizer, template_kwargs: dict):
    """The :class:`~hybridlm.infer.chat.Chat` of model folder ``path`` with ``--chat-template`` (None: the folder's
    own template, if any) and ``template_kwargs`` (``--chat-template-kwargs``); UsageError naming what is wrong."""
    from ..errors import UsageError
    from ..infer.chat import load_chat
    from ..infer.chat_template import ChatFileError, ChatTemplateError

    try:
        template_file = None if args.chat_template is None else Path(args.chat_template)
        return load_chat(path, tokenizer, template_file, template_kwargs)
    except ChatFileError as e:  # (not the template's: another one would not help)
        raise UsageError(str(e)) from None
    except ChatTemplateError as e:
        why = f"--chat-template: {e}" if args.chat_template else f"{e} (--chat-template FILE replaces it)"
        raise UsageError(why) from None


def check_model_args(args: argparse.Namespace, checks) -> tuple:
    """Refuse bad options by their flags before the model is loaded: ``checks`` (the command's own (holds, message)
    pairs), then --chat-template, --threads, --chat-template-kwargs, --device, --dtype and --cuda-graph, as ``serve``
    and ``chat`` take them: (the ``torch.device`` to run on, the parameter dtype (None: the checkpoint's),
    ``--chat-template-kwargs``'s object)."""
    from ..errors import UsageError
    from ..ops.dispatch import check_device
    from . import device_option, dtype_option
    from .generate import thread_checks

    for ok, message in (*checks, chat_template_check(args), *thread_checks(args.threads)):
        if not ok:
            raise UsageError(message)
    template_kwargs = template_kwargs_option(args.chat_template_kwargs)
    device = device_option("--device", args.device)
    dtype = dtype_option("--dtype", args.dtype)
    check_device(device)  # kernels forced to Triton on the CPU: refused before the model loads
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device (--device cuda), not {device}")
    return device, dtype, template_kwargs


def _check_args(args: argparse.Namespace):
    """``serve``'s options checked (:func:`check_model_args`)."""
    from ..errors import UsageError
    from .generate import speculative_checks

    device, dtype, template_kwargs = check_model_args(
        args,
        (
            *speculative_checks(args),
            (
                not (args.speculative and args.kept_graphs is not None),
                "--kept-graphs keeps CUDA graphs, which --speculative mtp does not use: leave one out",
            ),
            (args.max_batch_size >= 1, f"--max-batch-size must be >= 1, got {args.max_batch_size}"),
            (args.prefix_cache >= 0, f"--prefix-cache must be >= 0 (0: none kept), got {args.prefix_cache}"),
            (
                args.prefix_cache_memory is None or args.prefix_cache > 0,
                "--prefix-cache-memory bounds the prefix cache, and --prefix-cache 0 keeps none: leave one out",
            ),
            (
                args.kept_graphs is None or args.kept_graphs >= 0,
                f"--kept-graphs must be >= 0 (0: none kept), got {args.kept_graphs}",
            ),
            (args.max_new_tokens_limit >= 1, f"--max-new-tokens-limit must be >= 1, got {args.max_new_tokens_limit}"),
            (0 <= args.port <= 65535, f"--port must be in [0, 65535] (0: any free port), got {args.port}"),
            (args.model_name != "", "--model-name: empty; leave it out to serve the model as CHECKPOINT"),
        ),
    )
    if args.kept_graphs is not None and (args.cuda_graph is False or device.type != "cuda"):
        why = "--no-cuda-graph" if args.cuda_graph is False else f"--device {device}"
        raise UsageError(
            f"--kept-graphs keeps decode caches with their CUDA graphs: it needs --cuda-graph (the default on a CUDA "
            f"device), not {why}"
        )
    return device, dtype, template_kwargs


def _cmd_serve(args: argparse.Namespace) -> int:
    # (--threads is process-wide: it comes back however the command ends, for a caller that runs main() in-process)
    with contextlib.ExitStack() as scope:
        return _serve(args, scope)


def _serve(args: argparse.Namespace, scope: contextlib.ExitStack) -> int:
    from ..checkpoint.weights import load, read_config
    from ..errors import UsageError
    from ..infer.batching import BatchWorker
    from ..infer.prefix_store import entry_bytes
    from ..infer.server import CompletionServer
    from ..train.threads import cpu_threads
    from . import binary_size, model_folder, model_tokenizer, say
    from .generate import capture_fails, check_mtp_depths, cuda_graph_on

    device, dtype, template_kwargs = _check_args(args)
    path = model_folder(args.checkpoint, "checkpoint")
    config = read_config(path)
    check_mtp_depths(args, path, config)
    tokenizer, _ = model_tokenizer(path, config, args.tokenizer, args.eos_token)
    name = args.model_name or args.checkpoint.rstrip("/") or args.checkpoint
    chat = chat_option(args, path, tokenizer, template_kwargs)  # (before the model loads, as a bad flag is)
    scope.enter_context(cpu_threads(args.threads))
    model = load(path, device=device, dtype=dtype, verify=not args.no_verify)
    # (given, a decode step that cannot be captured is refused before the server listens, not in every answer)
    why = capture_fails(model) if args.cuda_graph else None
    if why is not None:
        raise UsageError(f"--cuda-graph: {why}")
    graphed = cuda_graph_on(model, args.cuda_graph, speculative=bool(args.speculative))
    continuous = args.continuous_batching and not args.speculative  # (speculation runs a prompt at a time)
    worker = BatchWorker(
        model,
        tokenizer,
        args.max_batch_size,
        cuda_graph=graphed,
        continuous=continuous,
        prefix_cache=args.prefix_cache,
        prefix_cache_bytes=args.prefix_cache_memory,
        speculative=args.speculative,
        draft_tokens=args.draft_tokens,
        **({} if args.kept_graphs is None else {"kept_graphs": args.kept_graphs}),
    )
    try:
        server = CompletionServer(
            (args.host, args.port),
            worker,
            name,
            encode=tokenizer.encode,
            vocab_size=config.vocab_size,
            max_tokens_limit=args.max_new_tokens_limit,
            log=lambda line: say(line, sys.stderr),
            chat=chat,
        )
    except OSError as e:  # in use, not an address of this machine, a port below 1024 without the right
        reason = e.strerror or str(e)
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there ({reason})") from None
    worker.start()
    try:
        routes = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics"
        say(f"serving {name} at {server.url} ({routes}; Ctrl-C stops)")
        template = chat.template
        say(
            f"chat template: {template.where}"
            if template is not None
            else "no chat template: POST /v1/chat/completions answers 400 (--chat-template FILE gives one)",
            sys.stderr,
        )
        how = "continuous (requests join the running batch)" if continuous else "static"
        if args.speculative:
            drafts = min(args.draft_tokens or len(model.mtp), len(model.mtp))
            how += f", MTP speculation ({drafts} draft{'s' * (drafts > 1)} a round; a batch's prompts one at a time)"
        graphs = ""
        if graphed and worker.graphs.keep:  # (a kept cache: every row's recurrent states, each position's KV)
            row, position = entry_bytes(model)
            graphs = (
                f", decode steps replayed as CUDA graphs (each shape captured once; the caches of the "
                f"{worker.graphs.keep} most recent shapes kept, {row / 2**20:,.1f} MiB a row + {position / 2**10:,.1f} "
                "KiB a row's position each)"
            )
        elif graphed:
            graphs = ", decode steps replayed as CUDA graphs (captured for each batch: --kept-graphs 0)"
        store = worker.prefixes
        kept = (
            f", prefix cache of {args.prefix_cache} states (shared prefixes, answers; at most "
            f"{binary_size(store.most_bytes(model))} for this model"
            f"{'' if args.prefix_cache_memory is None else ', by --prefix-cache-memory'})"
            if store is not None
            else ", the last answer's state kept (a chat's next turn runs what it adds)"
            if args.speculative and args.prefix_cache
            else ", no prefix cache"
        )
        say(f"batching: {how}, at most {args.max_batch_size} rows at once{graphs}{kept}", sys.stderr)
        with contextlib.suppress(OSError):  # (a supervisor reading a pipe waits for this line)
            sys.stdout.flush()
        server.serve_forever()
    finally:  # Ctrl-C, SIGTERM: the open requests get 503, then the socket closes
        server.stop()
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    from . import byte_size, model_options
    from .generate import cuda_graph_option, run_options, speculative_options

    ap = sub.add_parser(
        "serve",
        help="serve a trained checkpoint over HTTP (OpenAI-compatible /v1/completions, /v1/chat/completions)",
        description="Answer OpenAI-style completion requests (POST /v1/completions, POST /v1/chat/completions; "
        "GET /v1/models, GET /health, GET /metrics) with a trained model. Chat requests are rendered by the model "
        "folder's chat template (chat_template.jinja, chat_template.json or tokenizer_config.json, as a model "
        "converted from Hugging Face keeps them), or --chat-template's, and end at the end-of-turn ids "
        "generation_config.json names. One thread runs the model: a request joins the running batch at its next "
        "decode step (continuous batching; --no-continuous-batching: requests queued together with equal sampling "
        "settings run as one batch to its end; docs/inference.md), and on CUDA each step replays a CUDA graph. Prompts that begin alike run what they share once, and --prefix-cache keeps shared "
        "prefixes and answers for later requests (a chat's next turn runs only what it adds). "
        "No authentication: anyone who can reach the port can use the model. "
        "CHECKPOINT is a model directory (hybridlm checkpoint with its tokenizer) or a training "
        "run directory. Ctrl-C or SIGTERM stops it; requests still open get 503.",
    )
    model_options(ap)
    ap.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only: the server checks no credentials; "
        "0.0.0.0 listens on every interface, for anyone who can reach it)",
    )
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: any free one)")
    ap.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="the model's name in /v1/models and the one a request's 'model' may give (default: CHECKPOINT as given)",
    )
    ap.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="rows (prompts) run together at most; more wait for the next batch (default: 8)",
    )
    ap.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS_LIMIT,
        metavar="N",
        help=f"the largest max_tokens a request may ask for, and a chat request's default; the cache holds prompt + "
        f"max_tokens positions per row (default: {DEFAULT_MAX_NEW_TOKENS_LIMIT})",
    )
    chat_template_options(
        ap,
        "POST /v1/chat/completions",
        "the defaults of a request's chat_template_kwargs, which overrides them key by key",
    )
    cuda_graph_option(
        ap,
        "replay each batch's decode step as a CUDA graph; the caches of ended batches are kept with their graphs, so "
        "that each shape (rows and positions, rounded up to powers of two) is captured once (docs/inference.md)",
    )
    ap.add_argument(
        "--kept-graphs",
        type=int,
        default=None,
        metavar="N",
        # (the default is infer.cuda_graph.KEPT_GRAPHS, written out: building the parser imports no torch)
        help="with CUDA graphs: the decode caches of ended batches kept with their graphs, the least recently used "
        "dropped first (default: 4; 0: none, every batch captures its own); a kept cache holds its memory (the start "
        "line says how much)",
    )
    ap.add_argument(
        "--continuous-batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a request joins the running batch at its next decode step, and a row that ends frees its slot at once, "
        "instead of waiting for the whole batch to end; requests of any sampling settings share it (seeded samples "
        "still run in static batches of their own). The default: faster than static batching in every setting "
        "measured, with CUDA graphs too (docs/benchmarks.md). --no-continuous-batching: static batching, a batch of "
        "the queued requests of equal settings runs to its end before the next starts",
    )
    ap.add_argument(
        "--prefix-cache",
        type=int,
        default=8,
        metavar="N",
        help="keep the states after up to N prompt prefixes that requests were seen to share (64 tokens or more: a "
        "few-shot task's examples, a system prompt, a chat so far) and after answers (a prompt and the tokens it "
        "took: a chat's next turn begins with them; dropped first), so that a later prompt that begins with one runs "
        "only its rest (default: 8; 0: none kept, prefixes shared within a batch still run once; docs/inference.md)",
    )
    ap.add_argument(
        "--prefix-cache-memory",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="the memory the prefix cache's states may hold together on the model's device, at most (bytes, or with "
        "a unit: 2GiB, 500MB; the least recently used go first, answers before shared prefixes; default: bounded by "
        "--prefix-cache and 65,536 positions only, whose most the start-up line says)",
    )
    speculative_options(ap)
    ap.epilog = (
        "--speculative mtp: static batches whose prompts run one at a time (no continuous batching, no CUDA "
        "graphs); instead of the prefix cache, the state after the last lone prompt and its answer is kept "
        "(--prefix-cache 0: none), so a chat's next turn runs what it adds. For one user of a model with MTP depths."
    )
    run_options(ap)
    ap.set_defaults(func=_cmd_serve)
