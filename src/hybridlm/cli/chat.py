"""``hybridlm chat``: a conversation with a model in the terminal, or over standard input (a message a line), each
answer streamed as it comes and each turn running only what it adds (:mod:`hybridlm.infer.conversation`)."""

from __future__ import annotations

import argparse
import contextlib
import sys

#: Lines that are commands, not messages (``//`` sends a message that begins with ``/``).
COMMANDS = {
    "/help": "these lines",
    "/reset [TEXT]": "start a new conversation (with TEXT as its system message; without: --system's)",
    "/save FILE": "write the conversation as JSON (a chat completions body; --messages reads it back)",
    "/exit": "leave (also /quit, Ctrl-D)",
}
#: The prompts of a terminal: a message's first line, and each line that goes on with it.
PROMPT, MORE = ">>> ", "... "
#: What opens and closes a message of several lines (pasted text), as in Ollama's terminal chat.
QUOTES = '"""'


def _check_args(args: argparse.Namespace):
    """``chat``'s options checked (the sampling flags as ``generate`` checks them, the rest as ``serve`` does:
    :func:`~hybridlm.cli.serve.check_model_args`)."""
    from .generate import sampling_settings, speculative_checks
    from .serve import check_model_args

    sampling_settings(args, {"": args.seed})
    return check_model_args(
        args,
        (
            *speculative_checks(args),
            (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
            (args.prefix_cache >= 0, f"--prefix-cache must be >= 0 (0: none kept), got {args.prefix_cache}"),
            (
                args.system is None or args.messages is None,
                "--system and --messages: give the system message in the conversation's file",
            ),
        ),
    )


def _check_template(chat, path, system: str | None, messages: list[dict] | None = None) -> None:
    """Refuse a model without a chat template, and a template that refuses a conversation as this one begins (a
    system message that some templates do not take, or ``messages``, ``--messages``'s), before the model loads."""
    from ..errors import UsageError
    from ..infer.chat_template import ChatTemplateError

    if chat.template is None:
        raise UsageError(
            f"{path} has no chat template (no chat_template.jinja, chat_template.json or tokenizer_config.json "
            "chat_template; a model hybridlm trained with the byte tokenizer has none): give one with --chat-template "
            "FILE, or continue plain text with hybridlm generate"
        )
    first = messages if messages else [{"role": "system", "content": system}] if system is not None else []
    if not first or first[-1]["role"] != "user":
        first = [*first, {"role": "user", "content": "Hello."}]
    try:
        chat.template.render(first, chat.template_kwargs)
    except ChatTemplateError as e:
        given = " with a system message (--system)" if system is not None else ""
        given = " as --messages begins it" if messages else given
        raise UsageError(f"the chat template ({chat.template.where}) refuses a conversation{given}: {e}") from None


def _read_messages(file: str) -> list[dict]:
    """``--messages``: a conversation to go on with, a JSON list of ``{role, content}`` messages or an object with
    one as ``messages`` (a chat completions body, as ``/save`` writes it), checked as the chat route checks them;
    UsageError naming the file and the message otherwise."""
    import json
    from pathlib import Path

    from ..errors import UsageError
    from ..infer.api import RequestError
    from ..infer.chat import check_messages

    try:
        value = json.loads(Path(file).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UsageError(f"--messages {file}: no such file") from None
    except OSError as e:
        raise UsageError(f"--messages {file}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # (not UTF-8, not JSON)
        raise UsageError(f"--messages {file}: not JSON ({e})") from None
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    try:
        return check_messages(value)
    except RequestError as e:
        raise UsageError(f"--messages {file}: {e.message.removeprefix(f'{e.param}: ')}") from None


def _save(messages: list[dict], file: str) -> None:
    """``/save FILE``: the conversation as a chat completions body ``{"messages": [...]}``, written whole or not at
    all (an existing file replaced only by the finished one)."""
    import json
    from pathlib import Path

    from ..checkpoint.io import replace_file

    # (the template's alias of reasoning_content, "thinking", is the route's to add again, not a key it takes)
    plain = [{k: v for k, v in m.items() if k != "thinking" or "reasoning_content" not in m} for m in messages]
    text = json.dumps({"messages": plain}, indent=2, ensure_ascii=False) + "\n"
    replace_file(Path(file), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _lines(interactive: bool):
    """The messages and commands typed: a line each; a line ending with a backslash goes on on the next (the
    backslash dropped, a newline kept), and a line that begins with :data:`QUOTES` opens a block that a line ending
    with them closes (pasted text: the quotes dropped). Ctrl-C on a terminal drops what is being typed; the end of
    the input ends them (an open block or continued line sent as it is)."""
    while True:
        parts, prompt, block = [], PROMPT, False
        try:
            while True:
                line = input(prompt if interactive else "")
                prompt = MORE
                if not parts and not block and line.startswith(QUOTES):
                    block, line = True, line[len(QUOTES) :]
                    if line.endswith(QUOTES):  # ("""one line""")
                        parts.append(line[: -len(QUOTES)])
                        break
                    if line:  # (a line of its own opens it: not a first empty line)
                        parts.append(line)
                elif block:
                    if line.endswith(QUOTES):
                        if line[: -len(QUOTES)]:  # (as a line of its own closes it)
                            parts.append(line[: -len(QUOTES)])
                        break
                    parts.append(line)
                elif line.endswith("\\"):
                    parts.append(line[:-1])
                else:
                    parts.append(line)
                    break
        except EOFError:
            if interactive:  # (the shell's prompt on a line of its own)
                print(file=sys.stderr)
            if parts:  # (a last line ended with a backslash, or a block was left open)
                yield "\n".join(parts)
            return
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(file=sys.stderr)
            print("(Ctrl-D or /exit leaves)", file=sys.stderr)
            continue
        yield "\n".join(parts)


def _cmd_chat(args: argparse.Namespace) -> int:
    # (--threads is process-wide: it comes back however the command ends, for a caller that runs main() in-process)
    with contextlib.ExitStack() as scope:
        return _chat(args, scope)


def _chat(args: argparse.Namespace, scope: contextlib.ExitStack) -> int:
    from ..checkpoint.weights import load, read_config
    from ..errors import UsageError
    from ..infer.conversation import Conversation
    from ..train.threads import cpu_threads
    from . import model_folder, model_tokenizer, say
    from .generate import check_mtp_depths, cuda_graph_on, logit_bias_option, stop_strings
    from .serve import chat_option

    device, dtype, template_kwargs = _check_args(args)
    stops = stop_strings(args)
    history = None if args.messages is None else _read_messages(args.messages)
    path = model_folder(args.checkpoint, "checkpoint")
    config = read_config(path)
    check_mtp_depths(args, path, config)
    args.logit_bias = logit_bias_option(args.logit_bias, config.vocab_size)
    tokenizer, _ = model_tokenizer(path, config, args.tokenizer, args.eos_token)
    chat = chat_option(args, path, tokenizer, template_kwargs)
    _check_template(chat, path, args.system, history)
    scope.enter_context(cpu_threads(args.threads))
    model = load(path, device=device, dtype=dtype, verify=not args.no_verify)
    conversation = Conversation(
        model,
        tokenizer,
        chat,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        stops=stops,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        min_p=args.min_p,
        logit_bias=args.logit_bias,
        seed=args.seed,
        cuda_graph=cuda_graph_on(model, args.cuda_graph, speculative=bool(args.speculative)),
        kept_states=args.prefix_cache,
        speculative=args.speculative,
        draft_tokens=args.draft_tokens,
    )
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # (line editing and history for input(), where Python has it)
            import readline  # noqa: F401
        say(f"chatting with {path} on {device} (template: {chat.template.where}); /help lists the commands", sys.stderr)
    if history is not None:  # (a last message of the user's is answered first)
        asked = history.pop()["content"] if history[-1]["role"] == "user" else None
        conversation.messages = history
        say(f"({len(history)} messages from {args.messages})", sys.stderr)
        if asked is not None:
            _answer(conversation, asked, interactive, args.max_new_tokens)
    for line in _lines(interactive):
        command, _, rest = line.strip().partition(" ")
        if not line.strip():
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            for name, what in COMMANDS.items():
                say(f"  {name:<14} {what}", sys.stderr)
            say("  //TEXT         send a message that begins with '/'", sys.stderr)
            say(
                f"  a line ending with \\ goes on on the next line; {QUOTES} opens and closes lines pasted as one "
                "message",
                sys.stderr,
            )
        elif command == "/reset":
            system = rest.strip() or args.system
            try:
                _check_template(chat, path, system)
            except UsageError as e:  # (the conversation goes on as it was)
                say(f"{e}; the conversation goes on", sys.stderr)
                continue
            conversation.reset(system)
            say("(a new conversation)", sys.stderr)
        elif command == "/save" and rest.strip():
            _save(conversation.messages, rest.strip())
            say(f"({len(conversation.messages)} messages written to {rest.strip()})", sys.stderr)
        elif line.startswith("/") and not line.startswith("//"):
            usage = "/save FILE" if command == "/save" else f"unknown command {command}"
            say(f"{usage} (/help lists them; //TEXT sends a message that begins with '/')", sys.stderr)
        else:
            _answer(conversation, line[1:] if line.startswith("//") else line, interactive, args.max_new_tokens)
    return 0


def _answer(conversation, text: str, interactive: bool, max_new_tokens: int) -> None:
    """Answer ``text`` on standard output, streamed, then say on stderr what ran; a message the template refuses or
    the tokenizer cannot read is said and not sent. Ctrl-C stops the answer (on a terminal; else the command)."""
    from ..errors import DataError
    from ..infer.chat_template import ChatTemplateError
    from ..infer.completion import write_stdout
    from . import say

    try:
        turn = conversation.reply(text, write=write_stdout)
    except ChatTemplateError as e:
        where = conversation.chat.template.where
        say(f"the chat template ({where}) refuses the conversation with it ({e}); it was not sent", sys.stderr)
        return
    except DataError as e:
        say(f"this message cannot be tokenized ({e}); it was not sent", sys.stderr)
        return
    except KeyboardInterrupt:
        print()
        if not interactive:
            raise
        say("(answer stopped; it stays in the conversation as shown)", sys.stderr)
        return
    print()
    cut = f"; cut at --max-new-tokens {max_new_tokens}" if turn.finish == "length" else ""
    mtp = f"; MTP acceptance {turn.accepted / turn.drafted:.1%} of {turn.drafted} drafts" if turn.drafted else ""
    say(
        f"[prompt {turn.prompt_tokens:,} tokens, {turn.run_tokens:,} run ({turn.kept_tokens:,} from a kept state); "
        f"answer {len(turn.tokens):,} tokens{mtp}; {turn.seconds:.2f} s{cut}]",
        sys.stderr,
    )


def add_chat(sub: argparse._SubParsersAction) -> None:
    from . import model_options
    from .generate import cuda_graph_option, run_options, sampling_options, speculative_options, stop_option
    from .serve import chat_template_options

    ap = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (its chat template; each turn runs only what it adds)",
        description="Hold a conversation with a model: each message (a line of standard input; a line ending with "
        'a backslash goes on on the next; lines between two """ are one) is added to the conversation, which the '
        "model folder's chat template "
        "(or --chat-template's) renders, and the answer is streamed until the model ends its turn. The state after "
        "each answer is kept, so a turn runs only the end of the last answer's turn and the new message "
        "(docs/inference.md). /help lists the commands (/reset, /exit). Ctrl-C stops an answer; Ctrl-D leaves. "
        "Each turn's prompt, positions run and answer length go to stderr. CHECKPOINT is a model directory "
        "(hybridlm checkpoint with its tokenizer) or a training run directory.",
    )
    model_options(ap)
    ap.add_argument("--system", default=None, metavar="TEXT", help="a system message that begins the conversation")
    ap.add_argument(
        "--messages",
        default=None,
        metavar="FILE",
        help="go on with this conversation: a JSON list of {role, content} messages, or a chat completions body "
        "holding one (as /save writes it); a last message of the user's is answered first",
    )
    chat_template_options(ap, "the conversation", "which the template reads beside the messages")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="an answer's tokens at most (default: 1024)")
    stop_option(ap, "an answer", "; e.g. '<|im_end|>' where the tokenizer has no token for the template's end of turn")
    sampling_options(ap, "turn N, from 0, draws from seed + N")
    ap.add_argument(
        "--prefix-cache",
        type=int,
        default=4,  # (Conversation's KEPT_STATES: not imported here, where the parser is built without torch)
        metavar="N",
        help="states kept across turns (the last answer's, the prefixes turns share; default: 4; 0: none, every turn "
        "runs the whole conversation; with --speculative, any but 0 keeps the last answer's states, the main "
        "model's and the MTP depths')",
    )
    speculative_options(ap)
    cuda_graph_option(ap, "replay the decode step as a CUDA graph, kept between turns")
    run_options(ap)
    ap.set_defaults(func=_cmd_chat)
