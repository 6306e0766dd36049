"""`hybridlm serve`: flags checked before the model loads, the URL printed, Ctrl-C and SIGTERM."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from hybridlm import HybridLM, generate, save
from hybridlm.checkpoint import weights
from hybridlm.cli import binary_size, main
from hybridlm.infer.cuda_graph import KEPT_GRAPHS
from hybridlm.infer.prefix_store import entry_bytes
from hybridlm.infer.server import CompletionServer
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import ROOT, tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model = HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0)
    save(model, path, extra_files=ByteTokenizer().files())
    return path, model


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def serve_then_ctrl_c(monkeypatch, route: str, *bodies: dict) -> tuple[list[dict], list]:
    """Make ``serve_forever`` answer ``bodies`` posted to ``route`` (``""`` or ``"/chat"``), then stop as Ctrl-C
    stops it: (the answers, the servers), filled once the command has run."""
    answers, servers = [], []
    serve_forever = CompletionServer.serve_forever

    def serve(server):
        servers.append(server)
        thread = threading.Thread(target=serve_forever, args=(server, 0.05))
        thread.start()
        try:
            answers.extend(post(server.url + route, body) for body in bodies)
        finally:
            server.shutdown()
            thread.join()
        raise KeyboardInterrupt

    monkeypatch.setattr(CompletionServer, "serve_forever", serve)
    return answers, servers


def test_help_names_the_flags_and_why_it_listens_on_localhost(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in (
        "--host",
        "--port",
        "--max-batch-size",
        "--max-new-tokens-limit",
        "--threads",
        "--tokenizer",
        "--chat-template",
        "--chat-template-kwargs",
        "--cuda-graph",
        "--dtype",
    ):
        assert flag in out
    assert "127.0.0.1, this machine only" in " ".join(out.split()) and "No authentication" in out


def test_a_missing_checkpoint_and_bad_flags_are_refused_before_the_model_loads(
    checkpoint, capsys, tmp_path, monkeypatch
):
    path, _ = checkpoint
    monkeypatch.setattr(weights, "load", lambda *a, **k: pytest.fail("the weights were read"))
    assert main(["serve", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "nowhere" in capsys.readouterr().err
    for flags, words in (
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
        (["--prefix-cache", "-1"], "--prefix-cache must be >= 0 (0: none kept), got -1"),
        (["--prefix-cache", "0", "--prefix-cache-memory", "1GiB"], "--prefix-cache 0 keeps none: leave one out"),
        (["--kept-graphs", "-1"], "--kept-graphs must be >= 0 (0: none kept), got -1"),
        (["--kept-graphs", "2"], "--kept-graphs keeps decode caches with their CUDA graphs: it needs --cuda-graph"),
        (["--kept-graphs", "2"], "(the default on a CUDA device), not --device cpu"),
        (
            ["--no-cuda-graph", "--kept-graphs", "2"],
            "it needs --cuda-graph (the default on a CUDA device), not --no-cuda-graph",
        ),
        (["--max-new-tokens-limit", "0"], "--max-new-tokens-limit must be >= 1"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--model-name", ""], "--model-name: empty"),
        (["--tokenizer", ""], "--tokenizer"),
        (
            ["--chat-template-kwargs", "{enable_thinking: false}"],
            "--chat-template-kwargs {enable_thinking: false}: not JSON",
        ),
        (["--chat-template-kwargs", "[1]"], "--chat-template-kwargs [1]: must be a JSON object of template variables"),
        (["--chat-template-kwargs", '{"messages": []}'], "'messages' is not a template variable one may set"),
        (["--cuda-graph"], "--cuda-graph needs a CUDA device (--device cuda), not cpu"),
        (["--dtype", "int8"], "--dtype must be a floating torch.dtype the model computes in"),
        (["--draft-tokens", "1"], "--draft-tokens needs --speculative mtp"),
        (["--speculative", "mtp", "--cuda-graph"], "--cuda-graph does not work with --speculative mtp"),
        (["--speculative", "mtp", "--kept-graphs", "2"], "--kept-graphs keeps CUDA graphs, which --speculative mtp"),
        (["--speculative", "mtp"], "has no MTP depths"),
    ):
        assert main(["serve", str(path), "--device", "cpu", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err


def test_a_port_in_use_is_named_by_its_flags(checkpoint, capsys):
    path, _ = checkpoint
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", str(path), "--device", "cpu", "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"--host 127.0.0.1 --port {port}: cannot listen there" in err


def test_it_prints_its_url_serves_and_ctrl_c_stops_it_as_interrupted(checkpoint, capsys, monkeypatch):
    path, model = checkpoint
    answers, servers = serve_then_ctrl_c(monkeypatch, "", {"prompt": "hi", "max_tokens": 5, "temperature": 0})
    limits = ["--max-batch-size", "3", "--max-new-tokens-limit", "9"]
    code = main(["serve", str(path), "--device", "cpu", "--port", "0", "--model-name", "tiny", *limits])
    out, err = capsys.readouterr()
    (server,) = servers
    assert server.worker.max_batch_size == 3 and server.max_tokens_limit == 9
    # Stopped on the way out: the worker (open requests got 503) and the listening socket.
    assert server.worker.stopping.is_set() and not server.worker.thread.is_alive() and server.socket.fileno() == -1
    assert code == 130 and out.startswith("serving tiny at http://127.0.0.1:") and "interrupted" in err
    assert '"POST /v1/completions HTTP/1.1" 200' in err  # the access log
    assert "no chat template: POST /v1/chat/completions answers 400 (--chat-template FILE gives one)" in err
    most = binary_size(server.worker.prefixes.most_bytes(model))
    assert most.endswith(" MiB")  # (a tiny model's)
    kept = f"prefix cache of 8 states (shared prefixes, answers; at most {most} for this model)"
    assert f"batching: continuous (requests join the running batch), at most 3 rows at once, {kept}\n" in err
    assert server.worker.continuous and server.worker.cuda_graph is False  # (the defaults: graphs only on CUDA)
    assert server.worker.prefixes.capacity == 8
    tokens = generate(model, ByteTokenizer().encode("hi"), 5, eos_id=256)
    assert answers[0]["choices"][0]["text"] == ByteTokenizer().decode(tokens) and answers[0]["model"] == "tiny"


def test_prefix_cache_memory_bounds_the_prefix_cache_and_the_start_up_line_says_so(checkpoint, capsys, monkeypatch):
    """--prefix-cache-memory SIZE reaches the store as its byte bound, and the most the start-up line says is that
    bound where it is less than what the entries and positions allow; a size that is none is refused by argparse."""
    path, model = checkpoint
    _, servers = serve_then_ctrl_c(monkeypatch, "", {"prompt": "hi", "max_tokens": 1, "temperature": 0})
    assert main(["serve", str(path), "--device", "cpu", "--port", "0", "--prefix-cache-memory", "1.5MiB"]) == 130
    err = capsys.readouterr().err
    store = servers[0].worker.prefixes
    assert store.max_bytes == 1.5 * 2**20 and store.most_bytes(model) == store.max_bytes
    assert "at most 1.50 MiB for this model, by --prefix-cache-memory)" in err
    with pytest.raises(SystemExit):
        main(["serve", str(path), "--device", "cpu", "--prefix-cache-memory", "lots"])
    assert "'lots' is not a size" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--continuous-batching", "--no-continuous-batching"])
def test_either_batching_serves_what_generate_gives(checkpoint, capsys, monkeypatch, flag):
    """--continuous-batching (the default) or --no-continuous-batching (static batching) reaches the worker, which
    answers a batched request with each prompt's own text."""
    path, model = checkpoint
    body = {"prompt": ["hi", "a longer prompt"], "max_tokens": 5, "temperature": 0}
    answers, servers = serve_then_ctrl_c(monkeypatch, "", body)
    args = ["serve", str(path), "--device", "cpu", "--port", "0", flag, "--prefix-cache", "0"]
    assert main(args) == 130
    continuous = flag == "--continuous-batching"
    worker = servers[0].worker
    assert worker.continuous is continuous and worker.batches == 1 and worker.prefixes is None
    err = capsys.readouterr().err
    how = "continuous (requests join the running batch)" if continuous else "static"
    assert f"batching: {how}, at most 8 rows at once, no prefix cache\n" in err
    tok = ByteTokenizer()
    want = [tok.decode(generate(model, tok.encode(p), 5, eos_id=256)) for p in body["prompt"]]
    assert [c["text"] for c in answers[0]["choices"]] == want


def test_speculative_serving_answers_what_generate_gives_and_says_how_it_batches(capsys, monkeypatch, tmp_path):
    """--speculative mtp reaches the worker (static batches, no prefix cache but the last answer's state), which
    answers a batched request with each prompt's own greedy text; the start-up line says so."""
    path = tmp_path / "model"
    model = HybridLM(tiny_config("M[*-]/[*-]", vocab_size=257), seed=0)
    save(model, path, extra_files=ByteTokenizer().files())
    body = {"prompt": ["hi", "a longer prompt"], "max_tokens": 5, "temperature": 0}
    answers, servers = serve_then_ctrl_c(monkeypatch, "", body)
    assert main(["serve", str(path), "--device", "cpu", "--port", "0", "--speculative", "mtp"]) == 130
    worker = servers[0].worker
    assert not worker.continuous and worker.prefixes is None and worker.session is not None
    err = capsys.readouterr().err
    assert "batching: static, MTP speculation (1 draft a round; a batch's prompts one at a time)" in err
    assert "the last answer's state kept (a chat's next turn runs what it adds)" in err
    tok = ByteTokenizer()
    want = [tok.decode(generate(model, tok.encode(p), 5, eos_id=256)) for p in body["prompt"]]
    assert [c["text"] for c in answers[0]["choices"]] == want


def test_dtype_serves_the_checkpoint_in_that_dtype(checkpoint, capsys, monkeypatch):
    """A training run saves float32; --dtype bfloat16 serves it in bf16: the answer is the bf16 model's text."""
    import torch

    path, model = checkpoint
    answers, servers = serve_then_ctrl_c(monkeypatch, "", {"prompt": "hi", "max_tokens": 6, "temperature": 0})
    assert main(["serve", str(path), "--device", "cpu", "--port", "0", "--dtype", "bfloat16"]) == 130
    capsys.readouterr()
    assert next(servers[0].worker.model.parameters()).dtype == torch.bfloat16
    half = HybridLM(model.config, seed=0, dtype=torch.bfloat16)
    half.load_state_dict(model.state_dict())
    tokens = generate(half.eval(), ByteTokenizer().encode("hi"), 6, eos_id=256)
    assert answers[0]["choices"][0]["text"] == ByteTokenizer().decode(tokens)


def test_sigterm_stops_the_process_with_143(checkpoint):
    """The real signal in a process of its own (2 s here: a second interpreter imports torch)."""
    path, _ = checkpoint
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "hybridlm.cli", "serve", str(path), "--device", "cpu", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {path} at http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        # (greedy: a sampled first token is the end of text once in 257 runs, and the answer has one token)
        assert post(url, {"prompt": "hi", "max_tokens": 2, "temperature": 0})["usage"]["completion_tokens"] == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
        assert "interrupted by SIGTERM" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_a_chat_template_file_that_is_missing_or_broken_is_refused_before_the_model_loads(
    checkpoint, capsys, tmp_path, monkeypatch
):
    path, _ = checkpoint
    monkeypatch.setattr(weights, "load", lambda *a, **k: pytest.fail("the weights were read"))
    broken, latin1 = tmp_path / "broken.jinja", tmp_path / "latin1.jinja"
    broken.write_text("{% for m in messages %}")
    latin1.write_bytes("{{ 'déjà' }}".encode("latin-1"))
    for flags, words in (
        (["--chat-template", str(tmp_path / "nowhere.jinja")], "nowhere.jinja: no such file"),
        (["--chat-template", str(tmp_path)], "no such file"),
        (["--chat-template", str(broken)], f"--chat-template: {broken}: not a valid Jinja template"),
        (["--chat-template", str(latin1)], f"--chat-template: {latin1}: cannot read the chat template (not UTF-8"),
    ):
        assert main(["serve", str(path), "--device", "cpu", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    # The folder's own template, broken: named, with the flag that replaces it.
    folder = tmp_path / "model"
    shutil.copytree(path, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    assert main(["serve", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer_config.json's chat_template: not a valid Jinja template" in err, err
    assert err.rstrip().endswith("(--chat-template FILE replaces it)") and len(err.splitlines()) == 1, err
    # A file beside the template that cannot be read is named alone: another template would not mend it.
    (folder / "tokenizer_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    (tmp_path / "good.jinja").write_text("{{ messages }}")
    for flags in ([], ["--chat-template", str(tmp_path / "good.jinja")]):
        assert main(["serve", str(folder), "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err
        why = "eos_token_id must be a token id or a list of them, got '</s>'"
        assert err == f"error: {folder / 'generation_config.json'}: {why}\n", err


def test_chat_is_served_with_the_template_given_and_says_which(checkpoint, capsys, monkeypatch, tmp_path):
    path, model = checkpoint
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}:")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    answers, _ = serve_then_ctrl_c(monkeypatch, "/chat", body)
    assert main(["serve", str(path), "--device", "cpu", "--port", "0", "--chat-template", str(template)]) == 130
    err = capsys.readouterr().err
    assert f"chat template: {template}" in err and '"POST /v1/chat/completions HTTP/1.1" 200' in err
    tokens = generate(model, ByteTokenizer().encode("hi:"), 5, eos_id=256)
    assert answers[0]["choices"][0]["message"]["content"] == ByteTokenizer().decode(tokens)


def test_chat_template_kwargs_are_the_defaults_a_request_overrides(checkpoint, capsys, monkeypatch, tmp_path):
    path, model = checkpoint
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}{{ 'T' if enable_thinking }}{{ mark }}:")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    thinking = {**body, "chat_template_kwargs": {"enable_thinking": True}}
    answers, _ = serve_then_ctrl_c(monkeypatch, "/chat", body, thinking)
    flags = ["--chat-template", str(template), "--chat-template-kwargs", '{"enable_thinking": false, "mark": "m"}']
    assert main(["serve", str(path), "--device", "cpu", "--port", "0", *flags]) == 130
    capsys.readouterr()
    for answer, prompt in zip(answers, ("him:", "hiTm:"), strict=True):
        tokens = generate(model, ByteTokenizer().encode(prompt), 5, eos_id=256)
        assert answer["choices"][0]["message"]["content"] == ByteTokenizer().decode(tokens)
        assert answer["usage"]["prompt_tokens"] == len(prompt)


def test_a_decode_step_that_cannot_be_captured_is_refused_before_the_server_listens(checkpoint, capsys, monkeypatch):
    """--cuda-graph captures one short generation first: its failure is the command's error (exit 2), named by the
    flag, and no server is made (on a CPU machine the capture is stood in for; the GPU test below runs it)."""
    from hybridlm.cli import serve as cli_serve
    from hybridlm.infer import generate as generating

    path, _ = checkpoint
    calls = []

    def failing(model, prompts, max_new_tokens, **kw):
        calls.append(kw)
        raise RuntimeError("capturing the decode step as a CUDA graph failed; run without cuda_graph (boom)")

    monkeypatch.setattr(generating, "generate", failing)
    monkeypatch.setattr(cli_serve, "_check_args", lambda args: (__import__("torch").device("cpu"), None, {}))
    monkeypatch.setattr(CompletionServer, "__init__", lambda *a, **k: pytest.fail("a server was made"))
    assert main(["serve", str(path), "--cuda-graph", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cuda-graph: capturing the decode step as a CUDA graph failed") and "boom" in err
    assert calls == [{"cuda_graph": True}]


def test_a_captured_decode_step_makes_the_worker_replay_graphs(checkpoint, capsys, monkeypatch):
    """Once the capture check passes, --cuda-graph reaches the worker that runs the batches (stood in for on a CPU
    machine, as above; the GPU test below answers requests with it)."""
    from hybridlm.cli import serve as cli_serve
    from hybridlm.infer import generate as generating

    path, _ = checkpoint
    calls = []
    monkeypatch.setattr(generating, "generate", lambda model, prompts, max_new_tokens, **kw: calls.append(kw))
    monkeypatch.setattr(cli_serve, "_check_args", lambda args: (__import__("torch").device("cpu"), None, {}))
    _, servers = serve_then_ctrl_c(monkeypatch, "")
    assert main(["serve", str(path), "--cuda-graph", "--port", "0"]) == 130
    err = capsys.readouterr().err
    assert calls == [{"cuda_graph": True}] and servers[0].worker.cuda_graph is True
    row, position = entry_bytes(servers[0].worker.model)
    assert (
        "decode steps replayed as CUDA graphs (each shape captured once; the caches of the 4 most recent shapes kept, "
        f"{row / 2**20:,.1f} MiB a row + {position / 2**10:,.1f} KiB a row's position each)"
    ) in err
    for keep, said in ((2, "the caches of the 2 most recent shapes kept"), (0, "captured for each batch")):
        assert main(["serve", str(path), "--cuda-graph", "--kept-graphs", str(keep), "--port", "0"]) == 130
        assert said in capsys.readouterr().err and servers[-1].worker.graphs.keep == keep
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert f"(default: {KEPT_GRAPHS}; 0: none, every batch captures its own)" in " ".join(
        capsys.readouterr().out.split()
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "flags",
    [["--cuda-graph", "--no-continuous-batching"], ["--cuda-graph", "--continuous-batching"], []],
    ids=["static", "continuous", "default"],
)
def test_cuda_graph_serving_answers_what_generate_gives_on_gpu(checkpoint, capsys, monkeypatch, flags):
    """On a GPU, CUDA graphs (given, or by default) capture at the start and each batch replays its graph: greedy
    answers (float32, two rows batched and one alone) equal ``generate`` with and without the graph on the same
    device, with static or continuous batching (the default)."""
    path, model = checkpoint
    bodies = [{"prompt": p, "max_tokens": 6, "temperature": 0} for p in (["hi", "a longer prompt"], "yo")]
    answers, servers = serve_then_ctrl_c(monkeypatch, "", *bodies)
    assert main(["serve", str(path), "--device", "cuda", "--port", "0", *flags]) == 130
    err = capsys.readouterr().err
    worker = servers[0].worker
    assert worker.cuda_graph and worker.graphs.captures >= 1 and "decode steps replayed as CUDA graphs" in err
    assert worker.continuous is ("--no-continuous-batching" not in flags)
    gpu = HybridLM(model.config, seed=0, device="cuda")
    gpu.load_state_dict(model.state_dict())
    gpu.eval()
    texts = [c["text"] for a in answers for c in a["choices"]]
    tok = ByteTokenizer()
    for graph in (True, False):
        prompts = ("hi", "a longer prompt", "yo")
        want = [tok.decode(generate(gpu, tok.encode(p), 6, eos_id=256, cuda_graph=graph)) for p in prompts]
        assert texts == want, (graph, texts, want)
