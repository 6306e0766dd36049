"""``hybridlm generate``: prompts from arguments, files or standard input, streamed or batched, with stop
strings; every option checked by its flag before the model is loaded."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..infer.completion import Completion

#: ``--temperature`` without the flag (and without ``--greedy``): the CLI samples by default.
DEFAULT_TEMPERATURE = 0.8


def _read_prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Prompts from --prompt (repeatable) and --prompts-file (one per line, or JSONL with "prompt"/"text"), each
    with where it was given (``--prompt number 2``, ``file:line``); a byte-order mark at the file's start is not text."""
    import codecs
    import json
    from pathlib import Path

    from ..errors import UsageError
    from ..train.data import decode_line
    from ..train.formats import JSON_LINES

    prompts = [(p, f"--prompt number {i}") for i, p in enumerate(args.prompt or [], start=1)]
    if args.prompts_file == "":  # (an unset shell variable): not "no file", which would drop it silently
        raise UsageError("--prompts-file: empty; name a file, or - for standard input")
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:  # "-": standard input; also pipes and devices
            raw = sys.stdin.buffer.read() if args.prompts_file == "-" else path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"--prompts-file {path}: no such file") from None
        except OSError as e:
            raise UsageError(f"--prompts-file {path}: cannot read it ({e.strerror})") from None
        jsonl = path.suffix.lower() in JSON_LINES  # as corpora: .jsonl and .ndjson, in any case
        raw = raw.removeprefix(codecs.BOM_UTF8)
        for n, raw_line in enumerate(raw.splitlines(), start=1):  # \n, \r\n and \r end a line
            line = decode_line(raw_line, f"{path}:{n}")
            if not line.strip():
                continue
            if jsonl or line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as e:  # also an integer of over 4,300 digits; nesting past json's
                    reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e) or type(e).__name__
                    raise UsageError(f"{path}:{n}: not a JSON object ({reason})") from None
                field = next((k for k in ("prompt", "text") if k in record), None) if isinstance(record, dict) else None
                text = record[field] if field else None
                if not isinstance(text, str):  # "prompt" is read where both are given: its own value is named
                    got = f', not {json.dumps(text)[:40]} in "{field}"' if field else ""
                    raise UsageError(f'{path}:{n}: a JSONL record needs a string "prompt" or "text" field{got}')
                prompts.append((text, f"{path}:{n}"))
            else:
                prompts.append((line, f"{path}:{n}"))
    for text, where in prompts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes the locale could not decode, or JSON's \ud800 escapes
            raise UsageError(f"{where}: not UTF-8 text (a lone surrogate)") from None
    if not prompts and args.prompts_file:  # (asked for a prompt, the user would look for a typo in the flag)
        raise UsageError(f"--prompts-file {args.prompts_file}: no prompt in it (it is empty or holds blank lines only)")
    if not prompts:
        raise UsageError("give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def stop_option(ap: argparse.ArgumentParser, what: str, more: str = "") -> None:
    """--stop (repeatable): strings that end ``what`` (``more``: said after the flag's rules), read by
    :func:`stop_strings`."""
    ap.add_argument(
        "--stop",
        action="append",
        help=rf"stop {what} at this string, in which a special token's text matches where the model picks that token "
        rf"(repeatable; not printed; \n, \t, \r and \\ are read as escapes){more}",
    )


def stop_strings(args: argparse.Namespace) -> list[str]:
    r"""``--stop``'s strings with the escapes \n, \t, \r and \\ read as the characters they name (a shell passes
    them as typed); UsageError for an empty one."""
    from ..errors import UsageError

    stops = [_unescape(s) for s in args.stop or []]
    if not all(stops):
        raise UsageError("--stop: an empty string would end every text at once")
    return stops


def _unescape(stop: str) -> str:
    r"""``--stop`` with the escapes \n, \t, \r and \\ read as the characters they name."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m[1]], stop)


def thread_checks(threads: int | None) -> tuple[tuple[bool, str], ...]:
    """``--threads``'s rules, as (holds, message) pairs: ``generate`` and ``serve`` check them with their others."""
    from ..train.config import MAX_THREADS

    return (
        (threads is None or threads >= 1, f"--threads must be >= 1, got {threads}"),
        (  # torch starting 100,000 threads crashed the process (a segmentation fault, no message)
            threads is None or threads <= MAX_THREADS,
            f"--threads must be at most {MAX_THREADS}, got {threads}",
        ),
    )


def run_options(ap: argparse.ArgumentParser) -> None:
    """--threads and --no-verify: how ``generate`` and ``serve`` load and run a model."""
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument(
        "--no-verify", action="store_true", help="skip the SHA-256 check of the weight files (a damaged file loads)"
    )


def cuda_graph_option(ap: argparse.ArgumentParser, what: str) -> None:
    """--cuda-graph / --no-cuda-graph of ``generate``, ``chat`` and ``serve`` (``what``: what the graph replays).
    Left out (None), graphs are on where the model runs on CUDA (:func:`cuda_graph_on`)."""
    ap.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"{what} (default: on where the model runs on CUDA, unless a first short capture fails, which is said; "
        "--no-cuda-graph: every decode step eager)",
    )


def capture_fails(model) -> str | None:
    """Why ``model``'s decode step cannot be captured as a CUDA graph (one short greedy generation, captured), or None
    where it can. It also pays the first capture's lazy set-up and autotuning before the first answer."""
    from ..infer.generate import generate

    try:
        generate(model, [[0]], max_new_tokens=2, cuda_graph=True)
    except RuntimeError as e:  # (a step that reads a tensor on the host; memory)
        return str(e)
    return None


def cuda_graph_on(model, given: bool | None, *ruled_out: bool, speculative: bool = False) -> bool:
    """Whether decode steps replay as CUDA graphs: as ``--cuda-graph`` / ``--no-cuda-graph`` gave it (``given``,
    checked against the device and the other flags already), or, left out (None), where ``model`` runs on CUDA and
    no other flag rules graphs out (``ruled_out``: --no-cache; ``speculative``: --speculative, which also says on
    stderr what that costs on CUDA) once :func:`capture_fails` has found the step capturable; where it is not, a line
    on stderr says why and the steps run eagerly. (Graphs by default: a replayed step is one launch instead of
    hundreds; serving bench-1.3b on an H100 took 2.4 to 6.3 times less time with them, docs/benchmarks.md.)"""
    from . import say

    cuda = next(model.parameters()).device.type == "cuda"
    if speculative and cuda:
        # Measured (benchmarks/generate.py --mtp-cost): a round costs about 12 graphed steps on bench-1.3b.
        say(
            "note: --speculative mtp runs its rounds eagerly (no CUDA graphs): on a GPU that is slower than plain "
            "decoding's graphed steps unless a round keeps many drafts (docs/inference.md: what speculation costs)",
            sys.stderr,
        )
    if given is not None:
        return given
    if not cuda or speculative or any(ruled_out):
        return False
    why = capture_fails(model)
    if why is not None:
        say(f"decoding eagerly (no CUDA graphs): {why}", sys.stderr)
    return why is None


def sampling_settings(args: argparse.Namespace, seeds: dict[str, int]) -> None:
    """Check the flags of :func:`sampling_options` by the API's own rules, named by flag (UsageError), and set
    ``args.temperature`` (0 with ``--greedy``, :data:`DEFAULT_TEMPERATURE` where neither is given). ``seeds``: each
    seed the command draws from, by what an error about it adds (the first seed's: "")."""
    from ..errors import UsageError
    from ..infer.generate import check_sampling

    if args.greedy and args.temperature not in (None, 0):  # greedy decoding would ignore the temperature
        raise UsageError(f"--greedy and --temperature {args.temperature} contradict each other: leave one out")
    args.temperature = 0.0 if args.greedy else DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    for more, seed in seeds.items():
        try:  # the API's own rules, named by flag
            check_sampling(
                args.temperature,
                args.top_k,
                args.top_p,
                args.repetition_penalty,
                seed,
                name=lambda p: "--" + p.replace("_", "-"),
                frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty,
                min_p=args.min_p,
            )
        except ValueError as e:
            raise UsageError(f"{e}{more}") from None
    args.logit_bias = logit_bias_option(args.logit_bias)


def logit_bias_option(text: str | None, vocab: int | None = None) -> dict[int, float]:
    """``--logit-bias``'s JSON object of token ids to biases as {id: bias} (none: {}), checked against ``vocab``
    where given; UsageError naming the flag otherwise."""
    import json

    from ..errors import UsageError
    from ..infer.generate import check_logit_bias

    if text is None or isinstance(text, dict):  # (a dict: read already, checked now against the vocabulary)
        value = text or {}
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"--logit-bias {text[:60]}: not JSON ({e.msg}); give an object, such as '{{\"50256\": -100}}'"
            ) from None
        if not isinstance(value, dict):
            raise UsageError(f"--logit-bias {text[:60]}: give a JSON object of token ids to biases") from None
    try:
        ids = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in value.items()}
        return check_logit_bias(ids, vocab)
    except ValueError as e:
        raise UsageError(f"--{e}".replace("--logit_bias", "--logit-bias", 1)) from None


def sampling_options(ap: argparse.ArgumentParser, seed_help: str) -> None:
    """--temperature, --greedy, --top-k, --top-p, --min-p, the three penalties and --seed (``seed_help``: which draws it
    seeds): how ``generate`` and ``chat`` sample, checked by :func:`sampling_settings`."""
    ap.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"sampling temperature; 0 = greedy (default: {DEFAULT_TEMPERATURE}, sampling)",
    )
    ap.add_argument("--greedy", action="store_true", help="pick the most likely token (same as --temperature 0)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: smallest set reaching this probability (1 = all)"
    )
    ap.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        metavar="P",
        help="sample among the tokens at least P times as likely as the most likely one (0 = all)",
    )
    ap.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already seen by this, multiply the negative ones (1 = off)",
    )
    ap.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        metavar="F",
        help="subtract this times each token's count in the text generated so far from its logit (OpenAI's; in [-2, "
        "2], 0 = off)",
    )
    ap.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        metavar="P",
        help="subtract this from the logit of each token the generated text holds (OpenAI's; in [-2, 2], 0 = off)",
    )
    ap.add_argument(
        "--logit-bias",
        default=None,
        metavar="JSON",
        help="a JSON object of token ids to biases added to their logits (OpenAI's logit_bias), e.g. '{\"50256\": -100}' bans a token",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help=f"sampling seed (default 0, so a command repeats its samples: pass another to vary them; {seed_help})",
    )


def speculative_options(ap: argparse.ArgumentParser) -> None:
    """--speculative and --draft-tokens, as ``generate`` and ``chat`` take them."""
    ap.add_argument(
        "--speculative",
        choices=["mtp"],
        default=None,
        help="draft with the model's MTP depths, verify in one forward (greedy: plain greedy's tokens; sampling: its "
        "distribution); its rounds run eagerly, so on a GPU plain decoding with CUDA graphs is faster",
    )
    ap.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        metavar="N",
        help="with --speculative: drafts per round (default, and at most: one per MTP depth)",
    )


def speculative_checks(args: argparse.Namespace) -> tuple[tuple[bool, str], ...]:
    """The (holds, message) checks of :func:`speculative_options`' flags that need no model."""
    return (
        (args.draft_tokens is None or args.speculative, "--draft-tokens needs --speculative mtp"),
        (args.draft_tokens is None or args.draft_tokens >= 1, f"--draft-tokens must be >= 1, got {args.draft_tokens}"),
        (  # generate() refuses the pair whatever the device: here before the device is asked for
            not (args.speculative and args.cuda_graph),
            "--cuda-graph does not work with --speculative mtp: leave one out",
        ),
    )


def check_mtp_depths(args: argparse.Namespace, path, config) -> None:
    """Refuse --speculative for a model (``config``, read from ``path``) without MTP depths, before its weights load."""
    from ..errors import UsageError

    if args.speculative and not config.parsed.mtp_depths:
        raise UsageError(f"--speculative mtp: {path} has no MTP depths (its pattern '{config.pattern}' has no '/')")


def _check_generate_args(args: argparse.Namespace, num_prompts: int):
    """Refuse bad ``hybridlm generate`` options by their flags, before the model is loaded; the ``torch.device``
    to run on (``--device auto`` resolved) and the parameter dtype (None: the checkpoint's)."""
    from ..errors import UsageError
    from . import device_option, dtype_option

    last_start = (max(num_prompts, 1) - 1) // max(args.batch_size, 1) * max(args.batch_size, 1)
    sampling_settings(
        args, {"": args.seed, f" (the last batch draws from --seed + {last_start})": args.seed + last_start}
    )
    checks = (
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
        *thread_checks(args.threads),
        *speculative_checks(args),
        (not (args.speculative and args.no_cache), "--speculative needs the cache: leave out --no-cache"),
        (not (args.cuda_graph and args.no_cache), "--cuda-graph needs the cache: leave out --no-cache"),
    )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    device = device_option("--device", args.device)
    dtype = dtype_option("--dtype", args.dtype)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError("--cuda-graph needs --device cuda")
    from ..ops.dispatch import check_device

    check_device(device)  # kernels forced to Triton on the CPU: refused before the model loads
    return device, dtype


def _print_rows(batch: list[str], rows: list[Completion], stream: bool, separate: bool) -> None:
    """The texts of a batch: a streamed row's rest, or each prompt with its text; a blank line after each
    when several prompts are printed."""
    for prompt, row in zip(batch, rows):
        if stream:
            row.finish()
            print()
        else:
            print(prompt + row.text)
        if separate:
            print()


def _cmd_generate(args: argparse.Namespace) -> int:
    # main() may run in its caller's process (a notebook, a test harness): what the command sets for its length
    # (--threads: torch.set_num_threads is process-wide) comes back however it ends.
    with contextlib.ExitStack() as scope:
        return _generate(args, scope)


def _generate(args: argparse.Namespace, scope: contextlib.ExitStack) -> int:
    from ..checkpoint.weights import load, read_config
    from ..errors import DataError, NonFiniteLogitsError, UsageError
    from ..infer.cuda_graph import DecodeGraphs
    from ..infer.generate import generate
    from ..train.threads import cpu_threads
    from . import model_folder, model_tokenizer

    given = _read_prompts(args)
    prompts = [text for text, _ in given]
    stops = stop_strings(args)
    device, dtype = _check_generate_args(args, len(prompts))
    path = model_folder(args.checkpoint, "checkpoint")
    config = read_config(path)  # the checks below, before the weights are read
    args.logit_bias = logit_bias_option(args.logit_bias, config.vocab_size)
    check_mtp_depths(args, path, config)
    tokenizer, _ = model_tokenizer(path, config, args.tokenizer, args.eos_token)
    special = tokenizer.special_tokens()
    encoded = []
    for text, where in given:  # all of them before the model loads: a prompt it cannot tokenize, named
        try:
            encoded.append(tokenizer.encode(text))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    scope.enter_context(cpu_threads(args.threads))
    model = load(path, device=device, dtype=dtype, verify=not args.no_verify)
    totals = dict(prefill_tokens=0, prefill_seconds=0.0, decode_tokens=0, decode_seconds=0.0, drafted=0, accepted=0)
    # (the batches' decode caches kept with their graphs: a batch of a shape seen before captures nothing)
    graphed = cuda_graph_on(model, args.cuda_graph, args.no_cache, speculative=bool(args.speculative))
    graphs = DecodeGraphs(model, keep=2) if graphed else None
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        ids = encoded[start : start + args.batch_size]
        stream = len(batch) == 1  # one row at a time streams; a batch prints each text when done
        # A streamed prompt is printed with the first token: an error before it leaves stdout empty.
        rows = [Completion(tokenizer, stops, stream, p, text, special) for p, text in zip(ids, batch)]
        stats: dict = {}
        try:
            generate(
                model,
                ids,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                eos_id=tokenizer.eos_id,
                seed=None if args.seed is None else args.seed + start,  # each batch its own random stream
                use_cache=not args.no_cache,
                speculative=args.speculative,
                draft_tokens=args.draft_tokens,
                repetition_penalty=args.repetition_penalty,
                frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty,
                min_p=args.min_p,
                logit_bias=args.logit_bias,
                # The end-of-document token ends the text and is none of it (a tokenizer.json need not mark it
                # special, and then decoding printed its name, '<|endoftext|>', after the text).
                callback=lambda row, token, rows=rows: token != tokenizer.eos_id and rows[row].add(token),
                stats=stats,
                cuda_graph=graphed,
                graphs=graphs,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        except NonFiniteLogitsError as e:  # what came before the bad logits, then the prompt named as it was given
            _print_rows(batch, rows, stream, separate=False)
            raise NonFiniteLogitsError(start + e.row, e.message, where=given[start + e.row][1]) from None
        except KeyboardInterrupt:  # show what this batch has so far (held-back characters too), then stop
            _print_rows(batch, rows, stream, separate=False)
            raise
        _print_rows(batch, rows, stream, separate=len(prompts) > 1)
        for key in totals:
            totals[key] += stats.get(key, 0)
    t = totals
    line = (
        f"prefill {t['prefill_tokens']:,} token{'s' * (t['prefill_tokens'] != 1)} at "
        f"{t['prefill_tokens'] / max(t['prefill_seconds'], 1e-9):,.0f} tok/s, "
        f"decode {t['decode_tokens']:,} token{'s' * (t['decode_tokens'] != 1)} at "
        f"{t['decode_tokens'] / max(t['decode_seconds'], 1e-9):,.1f} tok/s"
    )
    if args.speculative:
        line += f", MTP acceptance {t['accepted'] / max(t['drafted'], 1):.1%} of {t['drafted']} drafts"
    if graphed:
        line += f", decode steps replayed as CUDA graphs ({graphs.captures} captured)"
    print(line, file=sys.stderr)
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    from . import model_options

    ap = sub.add_parser(
        "generate",
        help="generate text from a trained checkpoint (streamed, cached, batched)",
        description="Continue prompts with a trained model (greedy with --temperature 0 or --greedy, else "
        "sampling), with a state cache for every mixer. A single prompt at a time (--batch-size 1) streams its "
        "tokens as they come; larger batches print each text when the batch is done. Prefill and decode "
        "tokens/s go to stderr. CHECKPOINT is a model directory (hybridlm checkpoint with its tokenizer) or a "
        "training run directory.",
    )
    model_options(ap)
    ap.add_argument("--prompt", action="append", help="text to continue (repeat for several prompts)")
    ap.add_argument(
        "--prompts-file",
        default=None,
        help='prompts, one per line, or JSONL (*.jsonl, *.ndjson or lines starting with "{") with a "prompt" or "text" field; '
        "- reads standard input",
    )
    ap.add_argument("--max-new-tokens", type=int, default=200, help="new tokens per prompt at most (default: 200)")
    sampling_options(ap, "each batch of --batch-size prompts draws from seed + its first index")
    stop_option(ap, "a text")
    ap.add_argument(
        "--batch-size", type=int, default=1, help="prompts generated together (left-padded; default: 1, streamed)"
    )
    ap.add_argument("--no-cache", action="store_true", help="rerun the full forward per token (slow reference)")
    speculative_options(ap)
    cuda_graph_option(ap, "replay the decode step as a CUDA graph, a batch of a shape seen before replaying its graph")
    run_options(ap)
    ap.set_defaults(func=_cmd_generate)
