"""Generation speed: cached vs uncached on CPU, and against Hugging Face NemotronH on a GPU.

    python benchmarks/generate.py                                   # CPU, embedded default model
    python benchmarks/generate.py --device cuda --compare-hf        # H200: bench-1.3b vs transformers
    python benchmarks/generate.py --device cuda --mtp-checkpoint DIR  # MTP speculation speed-up
    python benchmarks/generate.py --mtp-checkpoint DIR --mtp-temperatures 0 0.7 1 --rounds 3  # sampled speculation
    python benchmarks/generate.py --mtp-checkpoint DIR --mtp-chat-turns 6 --new-tokens 128   # speculative chat turns
    python benchmarks/generate.py --device cuda --mtp-cost 2 --rounds 3   # what a speculative round costs, bench-1.3b
    python benchmarks/generate.py --device cuda --profile           # the decode step, kernel by kernel
    python benchmarks/generate.py --buffers 64 1024 8192            # a decode step's cost against max_new_tokens
    python benchmarks/generate.py --device cuda --kept-graphs 8     # CUDA-graphed calls: a capture each or kept
    python benchmarks/generate.py --device cuda --sampling-cost 8 --batches 64   # what each sampling setting adds
    python benchmarks/generate.py --device cuda --against auto,mamba2_step=torch  # decode under two kernel settings
    python benchmarks/generate.py --device cuda --against auto,gdn_step=torch --pattern "G-G-G-G*-G-G-G-G*-G-G-G-"

CPU (default): the embedded default model of ``hybridlm train`` (random weights), a 1,024-token
prompt and 256 new greedy tokens, with the cache and with the no-cache reference loop; checks that
both give the same tokens (exit status 1 when they differ) and prints the speed-up.

``--compare-hf``: ``bench-1.3b`` in bf16 (random weights), saved, exported with the
``hybridlm convert --to nemotron-h`` converter and loaded by transformers' ``NemotronHForCausalLM``
in the same process. 512-token prompts, 128 new greedy tokens, batch 1 and 64: decode tokens/s of
both (ours with the decode step replayed as a CUDA graph), and our prefill tokens/s at 32k.

``--buffers N ...``: one decode step of the embedded default model (4 rows, 16-token prompts) in caches
of N positions each, eager (attention over the positions written) and static (over the whole
buffer, masked: what a CUDA graph replays), best of 3 rounds of 32 steps taking turns.

``--kept-graphs K`` (CUDA): K calls of ``generate(cuda_graph=True)`` on ``--preset`` in bf16 (``--batches``' first
size of rows, ``--prompt-len`` random tokens, ``--new-tokens`` each; what a server's batches or a chat's turns run),
each capturing its own graph, and K given one ``DecodeGraphs`` (the first captures, the others replay it), the two
kinds of call taking turns: the median ms of a call of each, the difference the cost of a capture, and whether the
tokens agree.
``--sampling-cost K``: K calls per sampling setting (greedy; the frequency and presence penalties; a logit bias;
top-p sampling, by the kernel and by sorting (``HYBRIDLM_KERNELS=auto,top_p=torch``), with min_p; sampling without
top-p), the settings taking turns (graphed on CUDA, over one ``DecodeGraphs``):
the median ms of a call and its ratio to greedy's, what the settings' per-step work on the (rows, vocabulary) logits
costs.
``--against SETTING``: greedy decoding of ``--preset`` (bf16, decode steps as CUDA graphs; the embedded default in
float32, eagerly, on the CPU) under the default kernels and under ``SETTING`` (a ``HYBRIDLM_KERNELS`` value that rules
one kernel out), ``--rounds`` calls of each taking turns per ``--batches`` size, each setting with its own kept graph
(no capture timed): the median ms a decode step, their ratio, and whether the tokens agree. ``--pattern`` replaces the
preset's layers (e.g. Gated DeltaNet for Mamba2), here and for ``--sampling-cost`` and ``--profile``.
``--mtp-cost D``: what speculation costs where the weights, not the host, should bound a step: ``--preset`` (bf16,
random weights; the embedded default on the CPU) with ``D`` MTP depths appended (``/*-`` each; ``--pattern`` replaces
the whole pattern), one ``--prompt-len`` prompt, ``--new-tokens`` greedy tokens. Plain decoding, graphed (CUDA) and
eager, against speculative rounds of 1..D drafts whose verdicts are forced: every draft kept ("all right") or none
("all wrong"), so that the cost of a round is measured apart from how well a trained depth drafts (the tokens are
then not the model's greedy ones; what a round runs is). ``--rounds`` calls of each, medians: tokens/s, ms a round, and the drafts a round must get right on average
to match plain decoding (``ms a round / ms a plain token - 1``).
Results belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from hybridlm import HybridLM, ModelConfig, generate
from hybridlm.infer.cuda_graph import DecodeGraphs
from hybridlm.ops.dispatch import use_kernels


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ours(model, prompts, new_tokens: int, **kw) -> tuple[list, dict]:
    stats: dict = {}
    out = generate(model, prompts, max_new_tokens=new_tokens, stats=stats, **kw)
    return out, stats


def rate(tokens: float, seconds: float) -> str:
    return f"{tokens / seconds:,.1f}" if seconds > 0 else "-"


# -- CPU: cache vs no cache -------------------------------------------------------------------------


def cpu_bench(args) -> bool:
    """The CPU table; True when the cached and the no-cache loops gave the same tokens."""
    from hybridlm.train.config import DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    config = ModelConfig(**{**DEFAULT_MODEL, "vocab_size": 257})
    model = HybridLM(config, seed=0).eval()
    prompt = torch.randint(0, 256, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    print(
        f"model {config.pattern} ({model.num_params() / 1e6:.1f}M params), prompt {len(prompt)}, "
        f"{args.new_tokens} new tokens, {args.threads} thread(s)"
    )
    rows, results = [], {}
    for name, use_cache in (("cache", True), ("no cache", False)):
        t0 = time.perf_counter()
        out, st = ours(model, prompt, args.new_tokens, use_cache=use_cache)
        total = time.perf_counter() - t0
        results[name] = (out, total)
        rows.append(
            [
                name,
                rate(st["prefill_tokens"], st["prefill_seconds"]),
                rate(st["decode_tokens"], st["decode_seconds"]),
                f"{total:.2f}",
            ]
        )
        print(f"  {name}: {total:.2f} s", flush=True)
    speedup = results["no cache"][1] / results["cache"][1]
    for r, (_, total) in zip(rows, results.values()):  # the unrounded totals, not the table's "total s"
        r.append(f"{results['no cache'][1] / total:.1f}x")
    print()
    print(table(["mode", "prefill tok/s", "decode tok/s", "total s", "speed-up"], rows))
    same = results["cache"][0] == results["no cache"][0]
    print(f"\nsame tokens: {'yes' if same else 'NO'}; cached generation {speedup:.1f}x faster end to end")
    return same


# -- a decode step's cost against the buffer length -------------------------------------------------


def buffer_bench(args, device: torch.device) -> None:
    from hybridlm.infer.cache import InferenceCache
    from hybridlm.infer.generate import prefill
    from hybridlm.train.config import DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    model = HybridLM(ModelConfig(**{**DEFAULT_MODEL, "vocab_size": 257}), seed=0, device=device).eval()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    step = ids[:, :1]
    print(f"model {model.config.pattern}, 4 rows, 16-token prompts, {args.threads} thread(s), {device}")
    rows = []
    with torch.no_grad():
        for n in args.buffers:
            best = {False: float("inf"), True: float("inf")}
            for _ in range(3):
                for static in (False, True):
                    cache = InferenceCache.for_model(model, 4, n)
                    cache.static = static
                    prefill(model, ids, cache, 16)
                    t0 = sync(device)
                    for _ in range(min(32, n - 16)):
                        model(step, cache=cache, logits_to_keep=1)
                    best[static] = min(best[static], (sync(device) - t0) / min(32, n - 16) * 1e3)
            rows.append([f"{n:,}", f"{best[False]:.2f}", f"{best[True]:.2f}", f"{best[True] / best[False]:.2f}"])
    print(table(["buffer positions", "eager ms/step", "static ms/step", "static / eager"], rows))


# -- GPU: against transformers ----------------------------------------------------------------------


def export_to_hf(model, workdir: str) -> str:
    from hybridlm import save
    from hybridlm.checkpoint.hf_nemotron import convert_to_nemotron_h

    src, dst = f"{workdir}/ours", f"{workdir}/hf"
    save(model, src)
    convert_to_nemotron_h(src, dst)  # what `hybridlm convert --to nemotron-h` runs
    return dst


def hf_generate_time(hf, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds of a second (warm) transformers greedy ``generate``, and its new tokens."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    mask = torch.ones_like(ids)
    hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    t0 = sync(ids.device)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    return sync(ids.device) - t0, out[:, ids.shape[1] :].tolist()


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy runs share (bf16 runs may part at a near-tie, then diverge)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def gpu_bench(args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ModelConfig.preset(args.preset)
    model = HybridLM(config, seed=0, device=device, dtype=torch.bfloat16).eval()
    print(
        f"{args.preset}: {config.pattern}, {model.num_params() / 1e9:.2f}B params, bf16, {torch.cuda.get_device_name(device)}"
    )
    hf = None
    if args.compare_hf:
        # Before transformers' NemotronH module is imported: the mamba_ssm stand-ins (hf_anchor.py).
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from hf_anchor import install_kernels

        print(f"Hugging Face: {install_kernels()}")
        try:
            from transformers import NemotronHForCausalLM

            with tempfile.TemporaryDirectory() as tmp:
                path = export_to_hf(model, tmp)
                hf = NemotronHForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        except Exception:
            traceback.print_exc()
            print("transformers comparison skipped (see the error above)")
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device=device)
        prompts = ids.tolist()
        mode = "cuda graph"
        try:
            # The warm-up captures the graph (its positions rounded up to a power of two as the timed call's are)
            # and keeps it: the timed decode replays it, as a server's or a chat's later batches do.
            graphs = DecodeGraphs(model)
            ours(model, prompts, 4, cuda_graph=True, graphs=graphs)
            out, st = ours(model, prompts, args.new_tokens, cuda_graph=True, graphs=graphs)
            mode += "" if graphs.reused else " (captured in the timed call)"
        except Exception:
            traceback.print_exc()
            mode = "eager (graph failed)"
            ours(model, prompts, 4)
            out, st = ours(model, prompts, args.new_tokens)
        our_decode = st["decode_tokens"] / st["decode_seconds"]
        row = [batch, mode, f"{our_decode:,.1f}", rate(st["prefill_tokens"], st["prefill_seconds"])]
        if hf is not None:
            with torch.no_grad():
                t_all, hf_out = hf_generate_time(hf, ids, args.new_tokens)
                t_first, _ = hf_generate_time(hf, ids, 1)
            hf_decode = batch * (args.new_tokens - 1) / max(t_all - t_first, 1e-9)
            row += [
                f"{hf_decode:,.1f}",
                f"{our_decode / hf_decode:.1f}x",
                f"{agreement(out[0], hf_out[0])}/{len(out[0])}",
            ]
        rows.append(row)
        print(f"  batch {batch}: ours {our_decode:,.1f} tok/s", flush=True)
    header = ["batch", "our decode step", "ours decode tok/s", "ours prefill tok/s"]
    if hf is not None:
        header += ["HF decode tok/s", "speed-up", "same leading tokens (row 0)"]
    print(f"\nprompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print(table(header, rows))

    if args.prefill_len:
        from hybridlm.infer.cache import InferenceCache
        from hybridlm.infer.generate import prefill

        ids = torch.randint(0, config.vocab_size, (1, args.prefill_len), device=device)
        times = []
        # The peak printed is the prefill's (with what stays resident: the models), not the batch-64 runs' above.
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            for _ in range(2):
                cache = InferenceCache.for_model(model, 1, args.prefill_len)
                t0 = sync(device)
                prefill(model, ids, cache, args.prefill_len)
                times.append(sync(device) - t0)
                del cache
        print(
            f"\nprefill {args.prefill_len:,} tokens (batch 1): {args.prefill_len / times[-1]:,.0f} tok/s "
            f"({times[-1]:.2f} s), peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        )

    if args.mtp_checkpoint:
        mtp_bench(args, device)


def profile_decode(args, device) -> None:
    """Kernels of one decode step after a ``--prompt-len`` prefill: eager, and replayed as a CUDA graph."""
    config = ModelConfig.preset(args.preset, **({"pattern": args.pattern} if args.pattern else {}))
    model = HybridLM(config, seed=0, device=device, dtype=torch.bfloat16).eval()
    print(f"{args.preset}: {config.pattern}, {model.num_params() / 1e9:.2f}B parameters, bf16")
    for batch in args.batches:
        with torch.no_grad():
            _profile_batch(model, batch, args.prompt_len, device)


def _profile_batch(model, batch: int, prompt_len: int, device) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_profile import top_kernels

    from hybridlm.infer.cache import InferenceCache
    from hybridlm.infer.cuda_graph import GraphedDecodeStep
    from hybridlm.infer.generate import prefill

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    # Room for every step below (each advances the cache; restoring it between steps would add its copies to the
    # profile): 38 eager steps, then 27 replays from the same start.
    cache = InferenceCache.for_model(model, batch, prompt_len + 64)
    prefill(model, ids, cache, prompt_len)
    tokens = ids[:, -1:]
    snap = cache.snapshot()

    def eager():
        return model(tokens, cache=cache, logits_to_keep=1).logits

    def timed(name, fn):
        fn()
        t0 = sync(device)
        for _ in range(20):
            fn()
        print(f"batch {batch}, {name}: {(sync(device) - t0) / 20 * 1e3:.3f} ms per step (wall)")

    top_kernels(eager, f"batch {batch}: eager decode step", rows=40, calls=5)
    timed("eager", eager)
    host_profile(eager, f"batch {batch}: eager decode step")
    cache.restore(snap)
    graphed = GraphedDecodeStep(model, cache)
    top_kernels(lambda: graphed(tokens), f"batch {batch}: decode step as a CUDA graph", rows=40, calls=5)
    timed("graph", lambda: graphed(tokens))


def host_profile(fn, label: str, calls: int = 5, rows: int = 25) -> None:
    """Where the host's time goes in ``calls`` calls of ``fn``: torch's ops and CUDA runtime calls by their own CPU
    time (a synchronization shows as a long ``cudaStreamSynchronize`` or ``cudaMemcpyAsync``), then the Python
    functions by their own time."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    print(f"\n{label}: host ops over {calls} calls")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    print(f"{label}: Python functions over {calls} calls")
    pstats.Stats(pr).sort_stats("tottime").print_stats(rows)


def text_prompt(checkpoint: str, length: int) -> list[int] | None:
    """The first ``length`` tokens of the built-in corpus's last document, in the checkpoint's
    tokenizer (drafts are accepted on text like the training text, not on random ids); None when
    the checkpoint has no tokenizer."""
    from hybridlm.train.data import builtin_documents
    from hybridlm.train.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(checkpoint)
    except Exception:
        return None
    ids: list[int] = []
    for doc in reversed(builtin_documents("pydoc")):
        ids += tokenizer.encode(doc)
        if len(ids) >= length:
            return ids[:length]
    return ids


def mtp_bench(args, device) -> None:
    from hybridlm import load

    model = load(args.mtp_checkpoint, device=device).eval()
    if device.type == "cuda":
        model.cast(torch.bfloat16)
    ids = text_prompt(args.mtp_checkpoint, args.prompt_len)
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (args.prompt_len,)).tolist()
    if args.mtp_temperatures:  # sampled: seeded calls of each kind taking turns, a row per temperature
        return mtp_sampled(args, model, ids)
    if args.mtp_chat_turns:
        return mtp_chat(args, model, args.mtp_checkpoint)
    _, plain = ours(model, ids, args.new_tokens)
    out_plain, plain = ours(model, ids, args.new_tokens)
    out_spec, spec = ours(model, ids, args.new_tokens, speculative="mtp", draft_tokens=args.draft_tokens)
    if args.mtp_profile:  # where a speculative run's time goes, host side and device side
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            ours(model, ids, min(args.new_tokens, 64), speculative="mtp", draft_tokens=args.draft_tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    a, b = plain["decode_tokens"] / plain["decode_seconds"], spec["decode_tokens"] / spec["decode_seconds"]
    print(
        f"\nMTP speculation ({model.config.parsed.mtp_depths} depths, {args.draft_tokens or 'all'} drafted): plain {a:,.1f} tok/s, speculative {b:,.1f} "
        f"tok/s ({b / a:.2f}x), acceptance {spec['acceptance_rate']:.1%}, same tokens: {out_plain == out_spec}"
    )


def mtp_sampled(args, model, ids: list[int]) -> None:
    """Speculative sampling against plain sampling at each of ``--mtp-temperatures`` (top-p ``--top-p``): ``--rounds``
    seeded calls of each kind taking turns, decode tokens/s summed over them, and the acceptance rate."""
    rows = []
    ours(model, ids, 8)  # (first-call costs out of the timing)
    for t in args.mtp_temperatures:
        settings = dict(temperature=t, top_p=args.top_p) if t > 0 else {}
        made = {False: [0, 0.0], True: [0, 0.0]}
        drafted = accepted = 0
        for seed in range(args.rounds):
            for spec in (False, True):
                kw = dict(speculative="mtp", draft_tokens=args.draft_tokens) if spec else {}
                _, st = ours(model, ids, args.new_tokens, seed=seed, **settings, **kw)
                made[spec][0] += st["decode_tokens"]
                made[spec][1] += st["decode_seconds"]
                drafted, accepted = drafted + st.get("drafted", 0), accepted + st.get("accepted", 0)
        a, b = (made[k][0] / made[k][1] for k in (False, True))
        rows.append([f"{t:g}", f"{a:,.1f}", f"{b:,.1f}", f"{b / a:.2f}x", f"{accepted / max(drafted, 1):.1%}"])
    print(
        f"\nMTP speculation ({model.config.parsed.mtp_depths} depths, {args.draft_tokens or 'all'} drafted), top-p "
        f"{args.top_p} when sampling, {args.rounds} seeded calls of each kind taking turns, {len(ids)}-token prompt, "
        f"{args.new_tokens} new tokens\n"
    )
    print(table(["temperature", "plain tok/s", "speculative tok/s", "ratio", "acceptance"], rows))


def mtp_chat(args, model, checkpoint: str) -> None:
    """``--mtp-chat-turns N``: a conversation of N turns (greedy, ``--new-tokens`` an answer, a ChatML-like template,
    messages cut from the built-in corpus), held three ways side by side: plain with its kept states, speculative
    with its kept session, speculative running every turn whole. Per turn: the positions run and the seconds."""
    from hybridlm.infer.chat import Chat
    from hybridlm.infer.chat_template import ChatTemplate
    from hybridlm.infer.conversation import Conversation
    from hybridlm.train.data import builtin_documents
    from hybridlm.train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    template = ChatTemplate(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        "benchmark",
    )
    chat = Chat(template, frozenset({tokenizer.eos_id}))
    docs = builtin_documents("pydoc")
    messages = [docs[i][:300] for i in range(args.mtp_chat_turns)]
    kinds = {
        "plain, kept states": dict(),
        "speculative, kept session": dict(speculative="mtp", draft_tokens=args.draft_tokens),
        "speculative, every turn whole": dict(speculative="mtp", draft_tokens=args.draft_tokens, kept_states=0),
    }
    talks = {
        name: Conversation(model, tokenizer, chat, max_new_tokens=args.new_tokens, **kw) for name, kw in kinds.items()
    }
    rows, answers = [], {name: [] for name in kinds}
    for turn, text in enumerate(messages):
        cells = [str(turn)]
        for name, talk in talks.items():  # (the three take turns: a drift of the machine moves them alike)
            t = talk.reply(text)
            answers[name].append(t.tokens)
            cells += [f"{t.prompt_tokens:,} / {t.run_tokens:,}", f"{t.seconds:.2f}"]
        rows.append(cells)
    header = ["turn"] + [h for name in kinds for h in (f"{name}: prompt / run", "s")]
    print(f"\nchat of {len(messages)} turns, greedy, {args.new_tokens} new tokens an answer\n")
    print(table(header, rows))
    same = all(a == answers["plain, kept states"] for a in answers.values())
    print(f"\nthe same answers every way: {'yes' if same else 'no'}")


@contextlib.contextmanager
def forced_verdicts(right: bool):
    """Speculation whose rounds keep every draft (``right``) or none: the depths draft, the main model verifies and
    its verdict is read back as always, so a round costs what it would (a refused draft's rollback included), but how
    many drafts are kept is fixed, not a trained depth's. Forcing the drafts' values instead does not work on random
    bf16 weights: their logits are so near one another that the verify window and the decode step pick other tokens
    within a few steps, and every draft after that is wrong."""
    from hybridlm.infer.speculative import _Picks

    verify = _Picks.verify

    def verify_forced(self, logits, drafts, logprobs=None):
        _, pick, flags, infos = verify(self, logits, drafts, logprobs)  # (the token after them: any will do)
        return (len(drafts) if right else 0), pick, flags, infos

    _Picks.verify = verify_forced
    try:
        yield
    finally:
        _Picks.verify = verify


def mtp_cost(args, device) -> None:
    """``--mtp-cost D``: plain decoding against speculative rounds with forced drafts (module docstring)."""
    from hybridlm.train.config import DEFAULT_MODEL

    cuda = device.type == "cuda"
    base = ModelConfig.preset(args.preset) if cuda else ModelConfig(**{**DEFAULT_MODEL, "vocab_size": 257})
    pattern = args.pattern or base.pattern.split("/")[0] + "/*-" * args.mtp_cost
    config = dataclasses.replace(base, pattern=pattern)
    model = HybridLM(config, seed=0, device=device)
    if cuda:
        model.cast(torch.bfloat16)
    model.eval()
    depths = model.config.parsed.mtp_depths
    if depths < 1:
        raise SystemExit(f"error: --mtp-cost needs a pattern with MTP depths ('/'), got {pattern!r}")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=gen).tolist()
    graphs = DecodeGraphs(model) if cuda else None
    plain_kinds = [("plain, decode step graphed", {"cuda_graph": True, "graphs": graphs})] if cuda else []
    plain_kinds.append(("plain, eager", {}))
    settings = [(name, kw, None) for name, kw in plain_kinds]
    for k in range(1, depths + 1):
        for right in (True, False):
            name = f"speculative, {k} draft{'s' if k > 1 else ''} a round, all {'right' if right else 'wrong'}"
            settings.append((name, {"speculative": "mtp", "draft_tokens": k}, right))
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in settings}
    accepted: dict[str, float] = {}
    for r in range(args.rounds + 1):  # (round 0: lazy initialisation, autotuning, the capture; not timed)
        for name, kw, right in settings:
            with contextlib.nullcontext() if right is None else forced_verdicts(right):
                _, st = ours(model, [prompt], args.new_tokens, **kw)
            accepted[name] = st.get("acceptance_rate", float("nan"))
            if r:
                rounds = st.get("verify_steps") or st["decode_tokens"]
                times[name].append((st["decode_tokens"], st["decode_seconds"], rounds))
    print(
        f"\n{args.preset if cuda else 'the embedded default'} + {depths} MTP depth(s), pattern {pattern!r}, "
        f"{'bf16' if cuda else 'float32'}, random weights; batch 1, {args.prompt_len}-token prompt, {args.new_tokens} "
        f"new greedy tokens; {args.rounds} calls of each taking turns, medians\n"
    )

    def median(values):
        return sorted(values)[len(values) // 2]

    plain_ms = {}
    rows = []
    for name, _, right in settings:
        rate_ = median([n / s for n, s, _ in times[name]])
        per_round = median([s / rounds * 1e3 for _, s, rounds in times[name]])
        if right is None:
            plain_ms[name] = per_round
        rows.append([name, f"{rate_:,.1f}", f"{per_round:.2f}", f"{accepted[name]:.1%}" if right is not None else ""])
        if right is not None:  # (the plain rows come first)
            rows[-1] += [f"{per_round / ms - 1:.2f}" for ms in plain_ms.values()]
    if args.mtp_profile:  # where one round's time goes: a call of one-draft rounds, every draft kept
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with forced_verdicts(True), profile(activities=activities) as prof:
            _, st = ours(model, [prompt], args.new_tokens, speculative="mtp", draft_tokens=1)
        print(f"\nprofile of {st['verify_steps']} one-draft rounds, every draft kept:")
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
        if cuda:
            print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=50))
    header = ["decoding", "tok/s", "ms a round (plain: a token)", "drafts kept"]
    header += [f"break-even drafts kept a round, against {name.removeprefix('plain, ')}" for name in plain_ms]
    print(table(header, [row + [""] * (len(header) - len(row)) for row in rows]))


def kept_graphs(args, device) -> None:
    model = HybridLM(ModelConfig.preset(args.preset), seed=0, device=device).cast(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (args.batches[0], args.prompt_len), generator=gen).tolist()
    graphs = DecodeGraphs(model)
    times: dict[bool, list[float]] = {False: [], True: []}
    outs: dict[bool, list] = {False: [], True: []}
    generate(model, rows, args.new_tokens, cuda_graph=True)  # (lazy initialisation and autotuning out of the timing)
    for _ in range(args.kept_graphs):
        for kept in (False, True):
            t0 = sync(device)
            outs[kept].append(generate(model, rows, args.new_tokens, cuda_graph=True, graphs=graphs if kept else None))
            times[kept].append(sync(device) - t0)
    each = {kept: sorted(t)[len(t) // 2] * 1e3 for kept, t in times.items()}
    print(
        f"{args.preset} bf16, {args.batches[0]} row(s) x {args.prompt_len} prompt tokens, {args.new_tokens} new tokens, "
        f"{args.kept_graphs} calls of each kind taking turns\n"
    )
    print(
        table(
            ["call", "graphs captured", "median ms a call"],
            [
                ["captures its own graph", args.kept_graphs, f"{each[False]:.1f}"],
                ["DecodeGraphs: kept graph replayed", graphs.captures, f"{each[True]:.1f}"],
            ],
        )
    )
    same = outs[False] == outs[True]
    print(f"\na capture costs {each[False] - each[True]:.1f} ms a call; the same tokens: {'yes' if same else 'no'}")


#: ``--sampling-cost``'s settings: (name, generate's keyword arguments, the kernel setting: None for the default),
#: the first the plain greedy decode.
SAMPLING_SETTINGS = (
    ("greedy", {}, None),
    ("greedy + frequency and presence penalties", {"frequency_penalty": 0.5, "presence_penalty": 0.5}, None),
    ("greedy + logit_bias (8 tokens)", {"logit_bias": {t: -100.0 for t in range(1, 9)}}, None),
    ("sampled (T 1, top-p 0.9)", {"temperature": 1.0, "top_p": 0.9}, None),
    ("sampled (T 1, top-p 0.9), top-p by sorting", {"temperature": 1.0, "top_p": 0.9}, "auto,top_p=torch"),
    ("sampled (T 1, top-p 0.9) + min_p 0.05", {"temperature": 1.0, "top_p": 0.9, "min_p": 0.05}, None),
    ("sampled (T 1), no top-p", {"temperature": 1.0}, None),
)


def decode_model(args, device) -> tuple[HybridLM, bool, str]:
    """The model the decoding tables time: ``--preset`` in bf16 with its decode steps graphed on CUDA, the embedded
    default in float32 on the CPU, ``--pattern``'s layers where given: (model, graphed, a line saying which)."""
    from hybridlm.train.config import DEFAULT_MODEL

    graphed = device.type == "cuda"
    pattern = {"pattern": args.pattern} if args.pattern else {}
    if graphed:
        config = ModelConfig.preset(args.preset, **pattern)
        model = HybridLM(config, seed=0, device=device).cast(torch.bfloat16)
        return model.eval(), True, f"{args.preset} bf16, decode steps as CUDA graphs"
    model = HybridLM(ModelConfig(**{**DEFAULT_MODEL, "vocab_size": 257, **pattern}), seed=0, device=device)
    return model.eval(), False, "the embedded default model, float32"


def sampling_cost(args, device) -> None:
    """What each sampling setting adds to a decode: ``args.sampling_cost`` graphed (on CUDA) calls of ``generate``
    per setting, the settings taking turns, over ``--preset``'s model (bf16 on CUDA; the embedded default in
    float32 on the CPU), one :class:`DecodeGraphs` for all (no capture timed): median ms a call and a token."""
    model, graphed, where = decode_model(args, device)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (args.batches[0], args.prompt_len), generator=gen).tolist()
    options = {"cuda_graph": True, "graphs": DecodeGraphs(model)} if graphed else {}
    times: dict[str, list[float]] = {name: [] for name, _, _ in SAMPLING_SETTINGS}
    outputs: dict[str, list] = {}
    for name, kw, kernels in SAMPLING_SETTINGS:  # (lazy initialisation, the capture, compiling: out of the timing)
        with use_kernels(kernels) if kernels else contextlib.nullcontext():
            outputs[name] = generate(model, rows, args.new_tokens, eos_id=None, seed=0, **options, **kw)
    for _ in range(args.sampling_cost):
        for name, kw, kernels in SAMPLING_SETTINGS:
            with use_kernels(kernels) if kernels else contextlib.nullcontext():
                t0 = sync(device)
                generate(model, rows, args.new_tokens, eos_id=None, seed=0, **options, **kw)
                times[name].append(sync(device) - t0)
    each = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    base = each[SAMPLING_SETTINGS[0][0]]
    print(
        f"{where}, {args.batches[0]} row(s) x {args.prompt_len} prompt tokens, {args.new_tokens} new tokens, "
        f"{args.sampling_cost} calls of each setting taking turns\n"
    )
    print(
        table(
            ["setting", "median ms a call", "ms a new token", "against greedy"],
            [[name, f"{ms:.1f}", f"{ms / args.new_tokens:.3f}", f"{ms / base:.3f}x"] for name, ms in each.items()],
        )
    )
    agree = outputs[SAMPLING_SETTINGS[3][0]] == outputs[SAMPLING_SETTINGS[4][0]]  # (top-p: the kernel, sorting)
    print(f"\ntop-p without sorting against sorting: the same tokens: {'yes' if agree else 'no'}")


def kernels_against(args, device) -> None:
    """The ``--against`` table (see the module's docstring)."""
    model, graphed, where = decode_model(args, device)
    config = model.config
    settings = ("auto", args.against)
    print(f"{config.pattern} ({model.num_params() / 1e9:.2f}B parameters)")
    print(
        f"{where}, "
        f"{args.prompt_len} prompt tokens, {args.new_tokens} new greedy tokens, {args.rounds} calls of each setting "
        "taking turns, medians\n"
    )
    rows = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
        options = {name: {"cuda_graph": True, "graphs": DecodeGraphs(model)} if graphed else {} for name in settings}
        steps: dict[str, list[float]] = {name: [] for name in settings}
        outs = {}
        for r in range(args.rounds + 1):  # (round 0: lazy initialisation, the captures, compiling; not timed)
            for name in settings:
                with use_kernels(name):
                    outs[name], st = ours(model, prompts, args.new_tokens, **options[name])
                if r:
                    steps[name].append(st["decode_seconds"] / (st["decode_tokens"] / batch) * 1e3)
        ms = {name: sorted(t)[len(t) // 2] for name, t in steps.items()}
        same = outs[settings[0]] == outs[settings[1]]
        rows.append([batch, f"{ms['auto']:.3f}", f"{ms[args.against]:.3f}", f"{ms[args.against] / ms['auto']:.3f}x"])
        a, b = outs[settings[0]][0], outs[settings[1]][0]
        rows[-1].append("yes" if same else f"no (row 0: the first {agreement(a, b)} of {len(a)})")
        print(f"  batch {batch}: {ms['auto']:.3f} against {ms[args.against]:.3f} ms a step", flush=True)
    print(table(["batch", "auto: ms a step", f"{args.against}: ms a step", "auto faster by", "same tokens"], rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare-hf", action="store_true", help="also run transformers' NemotronH on the same weights")
    ap.add_argument("--preset", default="bench-1.3b", help="GPU model preset")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 1024 on CPU, 512 on GPU")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 on CPU, 128 on GPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="GPU batch sizes")
    ap.add_argument("--prefill-len", type=int, default=32768, help="GPU prefill length to time (0 = skip)")
    ap.add_argument("--mtp-checkpoint", default=None, help="a checkpoint trained with MTP: speculation speed-up")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument(
        "--mtp-profile", action="store_true", help="with --mtp-checkpoint or --mtp-cost: profile a speculative run"
    )
    ap.add_argument("--draft-tokens", type=int, default=None, help="with --mtp-checkpoint: drafts per round")
    ap.add_argument(
        "--mtp-temperatures",
        type=float,
        nargs="+",
        default=None,
        help="with --mtp-checkpoint: speculative against plain sampling at these temperatures (0: greedy)",
    )
    ap.add_argument("--top-p", type=float, default=1.0, help="with --mtp-temperatures: top-p when sampling")
    ap.add_argument(
        "--mtp-chat-turns",
        type=int,
        default=0,
        metavar="N",
        help="with --mtp-checkpoint: a chat of N turns, plain, speculative from its kept session, speculative whole",
    )
    ap.add_argument(
        "--mtp-cost",
        type=int,
        default=0,
        metavar="D",
        help="the preset with D MTP depths: speculative rounds with forced drafts against plain decoding, then exit",
    )
    ap.add_argument(
        "--profile", action="store_true", help="GPU: the decode step's kernels (eager and graphed), then exit"
    )
    ap.add_argument(
        "--buffers", type=int, nargs="+", default=None, help="time a decode step in caches of these lengths, then exit"
    )
    ap.add_argument(
        "--kept-graphs",
        type=int,
        default=0,
        metavar="K",
        help="CUDA: K graphed calls capturing each against K replaying a kept graph, then exit",
    )
    ap.add_argument(
        "--sampling-cost",
        type=int,
        default=0,
        metavar="K",
        help="K decode calls per sampling setting (penalties, logit_bias, top-p, min_p) against greedy, then exit",
    )
    ap.add_argument(
        "--against",
        default=None,
        metavar="SETTING",
        help="greedy decoding under the default kernels and under this HYBRIDLM_KERNELS setting, taking turns, then exit",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="with --against, --mtp-cost, --mtp-temperatures: timed calls of each setting",
    )
    ap.add_argument(
        "--pattern",
        default=None,
        help="with --against, --sampling-cost or --profile: the model's pattern in place of the preset's",
    )
    args = ap.parse_args(argv)
    if args.against:
        from hybridlm.ops.dispatch import parse_setting

        try:
            parse_setting(args.against, "--against")
        except ValueError as e:
            ap.error(str(e))
    if args.against or args.sampling_cost:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device", file=sys.stderr)
            return 2
        if args.against:
            args.prompt_len, args.new_tokens = args.prompt_len or 512, args.new_tokens or 128
            kernels_against(args, device)
        else:
            args.prompt_len, args.new_tokens = args.prompt_len or 256, args.new_tokens or 64
            sampling_cost(args, device)
        return 0
    if args.mtp_cost:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device", file=sys.stderr)
            return 2
        args.prompt_len, args.new_tokens = args.prompt_len or 512, args.new_tokens or 128
        mtp_cost(args, device)
        return 0
    if args.buffers:
        if min(args.buffers) <= 16:
            ap.error("--buffers: each length must exceed the 16-token prompts")
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device", file=sys.stderr)
            return 2
        buffer_bench(args, torch.device(args.device))
        return 0
    cpu = torch.device(args.device).type == "cpu"
    args.prompt_len = args.prompt_len or (1024 if cpu else 512)
    args.new_tokens = args.new_tokens or (256 if cpu else 128)
    if cpu:
        if not cpu_bench(args):
            print("error: the cached and the no-cache generations differ", file=sys.stderr)
            return 1
        if args.mtp_checkpoint:
            mtp_bench(args, torch.device("cpu"))
    else:
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device", file=sys.stderr)
            return 2
        if args.kept_graphs:
            kept_graphs(args, torch.device(args.device))
        elif args.profile:
            profile_decode(args, torch.device(args.device))
        elif args.mtp_checkpoint and not args.compare_hf:
            mtp_bench(args, torch.device(args.device))
        else:
            gpu_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
