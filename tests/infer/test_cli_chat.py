"""`hybridlm chat`: messages from standard input answered as the library's conversation answers them, each turn
running only what it adds, the commands, and the refusals made before the model loads."""

import contextlib
import io
import json
import os
import pty
import select
import signal
import sys
import time

import pytest
import torch

from hybridlm import save
from hybridlm.cli import main
from hybridlm.infer.chat import Chat
from hybridlm.infer.conversation import KEPT_STATES, Conversation
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import subprocess_env
from tests.infer.test_conversation import MESSAGES, TEMPLATE, ascii_model

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(a model folder without a chat template, a template file, the model)."""
    root = tmp_path_factory.mktemp("chat")
    model = ascii_model(dtype=torch.float32)
    save(model, root / "model", extra_files=TOKENIZER.files())
    (root / "chat.jinja").write_text(TEMPLATE.text)
    return root / "model", root / "chat.jinja", model


def chat(monkeypatch, capsys, stdin: str, *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["chat", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_names_the_commands_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--system", "--chat-template", "--chat-template-kwargs", "--max-new-tokens", "--greedy", "--seed"):
        assert flag in out
    assert "/reset" in out and "/exit" in out and f"default: {KEPT_STATES}" in out


def test_piped_messages_are_answered_as_the_conversation_answers_them_each_turn_from_the_last(
    folder, monkeypatch, capsys
):
    path, template, model = folder
    stdin = "".join(f"{m}\n" for m in MESSAGES[:2])
    flags = (str(path), "--chat-template", str(template), "--greedy", "--max-new-tokens", "20", "--system", "Hi.")
    code, out, err = chat(monkeypatch, capsys, stdin, *flags)
    reference = Conversation(
        model, TOKENIZER, Chat(TEMPLATE, frozenset({TOKENIZER.eos_id})), system="Hi.", max_new_tokens=20
    )
    expected = [reference.reply(m) for m in MESSAGES[:2]]
    assert code == 0 and out == "".join(turn.text + "\n" for turn in expected)
    stats = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 2 and "cut at --max-new-tokens 20" in stats[0]
    assert f"{expected[1].run_tokens} run ({expected[1].kept_tokens} from a kept state)" in stats[1]
    assert expected[1].kept_tokens > 0


def test_stop_strings_end_answers(folder, monkeypatch, capsys):
    path, template, model = folder
    reference = Conversation(model, TOKENIZER, Chat(TEMPLATE, frozenset({TOKENIZER.eos_id})), max_new_tokens=20)
    free = reference.reply(MESSAGES[0]).text
    flags = ("--chat-template", str(template), "--greedy", "--max-new-tokens", "20", "--stop", free[4:6])
    code, out, err = chat(monkeypatch, capsys, MESSAGES[0] + "\n", str(path), *flags)
    assert code == 0 and out == free[: free.index(free[4:6])] + "\n" and "cut at" not in err


def test_commands_continued_lines_blocks_and_a_message_that_begins_with_a_slash(folder, monkeypatch, capsys):
    path, template, model = folder
    stdin = (
        "/help\n/nope\nfirst line\\\nsecond line\n/reset Be kind.\n//etc is a folder\n"
        '"""\npasted /line\n\nand more\n"""\n"""one"""\n"""left open\\\n/exit\n'
    )
    code, out, err = chat(
        monkeypatch, capsys, stdin, str(path), "--chat-template", str(template), "--greedy", "--max-new-tokens", "6"
    )
    assert code == 0 and "/reset [TEXT]" in err and "unknown command /nope" in err and "(a new conversation)" in err
    reference = Conversation(model, TOKENIZER, Chat(TEMPLATE, frozenset({TOKENIZER.eos_id})), max_new_tokens=6)
    answers = [reference.reply("first line\nsecond line").text]
    reference.reset("Be kind.")
    for text in ("/etc is a folder", "pasted /line\n\nand more", "one", "left open\\\n/exit"):  # (the end: sent)
        answers.append(reference.reply(text).text)
    assert out == "".join(a + "\n" for a in answers) and err.count("[prompt") == 5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "has no chat template"),
        (("--chat-template", "/no/such.jinja"), "no such file"),
        (("--chat-template-kwargs", "[1]"), "--chat-template-kwargs"),
        (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
        (("--prefix-cache", "-1"), "--prefix-cache must be >= 0"),
        (("--greedy", "--temperature", "0.5"), "contradict"),
        (("--top-p", "0"), "--top-p"),
        (("--stop", ""), "--stop: an empty string"),
        (("--draft-tokens", "1"), "--draft-tokens needs --speculative mtp"),
        (("--speculative", "mtp", "--cuda-graph"), "--cuda-graph does not work with --speculative mtp"),
        (("--speculative", "mtp"), "has no MTP depths"),
    ],
)
def test_bad_flags_and_a_model_without_a_template_are_refused_before_the_model_loads(
    folder, monkeypatch, capsys, flags, message
):
    path, _, _ = folder
    monkeypatch.setattr("hybridlm.checkpoint.weights.load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = chat(monkeypatch, capsys, "hello\n", str(path), *flags)
    assert code == 2 and message in err, err


def test_a_template_that_refuses_a_system_message_is_refused_by_its_flag(folder, monkeypatch, capsys, tmp_path):
    path, _, _ = folder
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    monkeypatch.setattr("hybridlm.checkpoint.weights.load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = chat(monkeypatch, capsys, "hello\n", str(path), "--chat-template", str(strict), "--system", "x")
    assert code == 2 and "refuses a conversation with a system message (--system): no system role" in err
    monkeypatch.undo()
    code, _, err = chat(
        monkeypatch, capsys, "/reset Be kind.\nhi\n", str(path), "--chat-template", str(strict), "--max-new-tokens", "2"
    )  # (in a conversation it is said, and the conversation goes on)
    assert code == 0 and "no system role; the conversation goes on" in err and err.count("[prompt") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal")
def test_on_a_terminal_ctrl_c_stops_an_answer_or_drops_a_line_and_ctrl_d_leaves(folder):
    path, template, _ = folder
    command = [sys.executable, "-m", "hybridlm.cli", "chat", str(path), "--chat-template", str(template), "--greedy"]
    pid, fd = pty.fork()
    if pid == 0:  # (the child: the command on the terminal, Ctrl-C's SIGINT at its default even where the suite
        # ignores it by now: Python installs its handler only for a signal not ignored at its start)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ.update(subprocess_env())
        os.execv(sys.executable, [*command, "--max-new-tokens", "1000000", "--device", "cpu"])
    seen, cursor = "", 0

    def until(text: str, seconds: float = 60) -> None:
        """Read the terminal until ``text`` shows after what was waited for before."""
        nonlocal seen, cursor
        end = time.monotonic() + seconds
        while text not in seen[cursor:] and time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(fd, 4096).decode(errors="replace")
        assert text in seen[cursor:], seen[-500:]
        cursor = seen.index(text, cursor) + len(text)

    try:
        until(">>> ")
        os.write(fd, b"hello there\r")
        until("hello there\r\n")
        time.sleep(0.5)  # (answering, a million tokens at most)
        os.write(fd, b"\x03")
        until("(answer stopped; it stays in the conversation as shown)")
        until(">>> ")
        os.write(fd, b"half typed")
        until("half typed")
        # CPython's readline waits for keys in a select() without a timeout and looks at signals only when a signal
        # interrupts it: a SIGINT that lands just before the wait (a loaded machine deschedules the process there)
        # is kept until Enter. So Ctrl-C again until it is answered (one answer: Python keeps one pending SIGINT).
        for _ in range(12):
            os.write(fd, b"\x03")
            with contextlib.suppress(AssertionError):
                until("(Ctrl-D or /exit leaves)", seconds=5)
                break
        else:
            until("(Ctrl-D or /exit leaves)", seconds=0)
        # Ctrl-D once the prompt shows: readline has set the terminal raw by then, where it is a key it reads; sent
        # while the terminal was still in its line mode, the end of input it made was lost
        until(">>> ")
        os.write(fd, b"\x04")
    finally:  # (a child still answering after the test failed is killed, not waited for)
        end, status = time.monotonic() + 30, None
        while status is None and time.monotonic() < end:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else None
            time.sleep(0.05)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen[-500:]


def test_ctrl_c_with_messages_piped_in_stops_the_command(folder, monkeypatch, capsys):
    path, template, _ = folder

    def interrupted(self, text, write=None):
        write("so far")
        raise KeyboardInterrupt

    monkeypatch.setattr(Conversation, "reply", interrupted)
    code, out, err = chat(monkeypatch, capsys, "hi\nnever\n", str(path), "--chat-template", str(template))
    assert code == 130 and out == "so far\n" and "interrupted" in err


def test_save_writes_a_chat_completions_body_that_messages_goes_on_with(folder, monkeypatch, capsys, tmp_path):
    path, template, model = folder
    flags = (str(path), "--chat-template", str(template), "--greedy", "--max-new-tokens", "8")
    saved = tmp_path / "conversation.json"
    code, out, err = chat(monkeypatch, capsys, f"{MESSAGES[0]}\n/save {saved}\n/save\n", *flags, "--system", "Hi.")
    body = json.loads(saved.read_text())
    assert code == 0 and f"(3 messages written to {saved})" in err and "/save FILE (/help" in err
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant"]
    assert body["messages"][2]["content"] == out[:-1]
    # A conversation whose last message is the user's: answered first, then the piped messages.
    body["messages"].append({"role": "user", "content": MESSAGES[1]})
    saved.write_text(json.dumps(body))
    code, out, err = chat(monkeypatch, capsys, f"{MESSAGES[2]}\n", *flags, "--messages", str(saved))
    reference = Conversation(model, TOKENIZER, Chat(TEMPLATE, frozenset({TOKENIZER.eos_id})), max_new_tokens=8)
    reference.messages = body["messages"][:3]
    answers = [reference.reply(MESSAGES[1]).text, reference.reply(MESSAGES[2]).text]
    assert code == 0 and out == f"{answers[0]}\n{answers[1]}\n" and f"(3 messages from {saved})" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('[{"role": "tool", "content": "x"}]', "messages[0].role must be one of system, user, assistant"),
        ("[]", "must be a non-empty list"),
    ],
)
def test_a_bad_messages_file_is_refused_before_the_model_loads(folder, monkeypatch, capsys, tmp_path, content, message):
    path, template, _ = folder
    file = tmp_path / "m.json"
    if content is not None:
        file.write_text(content)
    monkeypatch.setattr("hybridlm.checkpoint.weights.load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = chat(monkeypatch, capsys, "", str(path), "--chat-template", str(template), "--messages", str(file))
    assert code == 2 and f"--messages {file}: " in err and message in err, err
    code, _, err = chat(monkeypatch, capsys, "", str(path), "--messages", str(file), "--system", "x")
    assert code == 2 and "--system and --messages" in err


def test_speculative_turns_are_the_conversations_and_say_their_acceptance(monkeypatch, capsys, tmp_path):
    """--speculative mtp answers as the library's speculative conversation (greedy: a plain conversation's tokens),
    the second turn from the first's kept states, and each turn's line says how many drafts the depths made and
    kept."""
    model = ascii_model("M[*-]G-/[*-]", dtype=torch.float32)
    save(model, tmp_path / "model", extra_files=TOKENIZER.files())
    (tmp_path / "chat.jinja").write_text(TEMPLATE.text)
    stdin = "".join(f"{m}\n" for m in MESSAGES[:2])
    flags = ("--chat-template", str(tmp_path / "chat.jinja"), "--greedy", "--max-new-tokens", "16")
    code, out, err = chat(monkeypatch, capsys, stdin, str(tmp_path / "model"), *flags, "--speculative", "mtp")
    reference = Conversation(model, TOKENIZER, Chat(TEMPLATE, frozenset({TOKENIZER.eos_id})), max_new_tokens=16)
    assert code == 0 and out == "".join(reference.reply(m).text + "\n" for m in MESSAGES[:2])
    stats = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 2 and all("MTP acceptance" in line for line in stats)
    assert "(0 from a kept state)" in stats[0] and "(0 from a kept state)" not in stats[1]
