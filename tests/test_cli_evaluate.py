"""`hybridlm eval`: the loss it prints is the model's forward on the corpus's packed rows, every token once."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hybridlm
from hybridlm import HybridLM
from hybridlm.cli import main
from hybridlm.train.config import RunConfig
from hybridlm.train.data import eval_rows
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import short_documents, tiny_config

DOCS = ["The with statement.", "", "Assignment statements bind names to objects.", "x = 1\n", "A longer text " * 5]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A float32 byte-tokenized model with one MTP depth."""
    path = tmp_path_factory.mktemp("ck") / "model"
    return hybridlm.save(
        HybridLM(tiny_config("M[*-]/[*-]", vocab_size=257), seed=0), path, extra_files=ByteTokenizer().files()
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def run(capsys, *argv):
    bar = () if "--progress" in argv else ("--no-progress",)
    code = main(["eval", *map(str, argv), "--device", "cpu", *bar])
    out = capsys.readouterr()
    return code, out.out, out.err


def evaluated(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def stream():
    """The corpus's token ids and each one's document, built here from the documents themselves."""
    tokens = [t for d in DOCS for t in [*d.encode(), ByteTokenizer.eos_id]]
    docs = [i for i, d in enumerate(DOCS) for _ in range(len(d.encode()) + 1)]
    return np.array(tokens), np.array(docs)


@torch.no_grad()
def direct(model, starts, length):
    """Summed nats and labels of the main head and the MTP depth over rows starting at stream positions
    ``starts``, each ``length`` inputs long (shorter where the stream ends), from the forward's logits."""
    tokens, docs = stream()
    sums, counts = [0.0, 0.0], [0, 0]
    for s in starts:
        end = min(s + length, len(tokens) - 1)
        out = model(torch.from_numpy(tokens[s:end])[None], doc_ids=torch.from_numpy(docs[s:end])[None])
        for head, logits in enumerate([out.logits, *out.mtp_logits]):
            logp = F.log_softmax(logits[0].double(), dim=-1)
            for t in range(end - s - head):  # depth d predicts the token d + 1 places on, inside the row
                p = s + t
                if docs[p + 1 + head] == docs[p]:  # no label crosses into another document
                    sums[head] -= float(logp[t, tokens[p + 1 + head]])
                    counts[head] += 1
    return sums, counts


def test_loss_is_the_forward_on_every_row_and_the_tail_each_token_once(checkpoint, corpus, capsys):
    """Batches of 3 rows leave a short last batch, and the tail row is shorter than --seq-len: summed per token,
    the loss is the float64 forward's on the same rows, and each token but the first is scored once (those that
    start a document are no label)."""
    r = evaluated(capsys, checkpoint, "--data", corpus, "--seq-len", SEQ_LEN, "--batch-size", 3, "--dtype", "float64")
    tokens, _ = stream()
    n = len(tokens)
    assert (n - 1) % SEQ_LEN and ((n - 1) // SEQ_LEN) % 3  # (the cases the test is about)
    model = hybridlm.load(checkpoint, dtype=torch.float64)
    sums, counts = direct(model, range(0, n - 1, SEQ_LEN), SEQ_LEN)
    assert r["tokens"] == counts[0] == n - len(DOCS)
    assert r["rows"] == -(-(n - 1) // SEQ_LEN) and r["whole_corpus"] is True
    assert r["loss"] == pytest.approx(sums[0] / counts[0], rel=1e-12)
    assert r["perplexity"] == pytest.approx(math.exp(sums[0] / counts[0]), rel=1e-12)
    assert r["mtp"][0]["tokens"] == counts[1]
    assert r["mtp"][0]["loss"] == pytest.approx(sums[1] / counts[1], rel=1e-12)
    # A document's first byte is no label (nothing crosses a boundary), and its end is no byte.
    labelled_bytes = sum(len(d.encode()) - 1 for d in DOCS if d)
    assert r["bytes"] == labelled_bytes
    assert r["bits_per_byte"] == pytest.approx(sums[0] / math.log(2) / labelled_bytes, rel=1e-12)
    assert (r["dtype"], r["device"]) == ("float64", "cpu")


def test_batches_take_evenly_spaced_rows_and_leave_the_tail(checkpoint, corpus, capsys):
    r = evaluated(
        capsys,
        checkpoint,
        "--data",
        corpus,
        "--seq-len",
        SEQ_LEN,
        "--batch-size",
        2,
        "--batches",
        2,
        "--dtype",
        "float64",
    )
    tokens, _ = stream()
    picked = eval_rows((len(tokens) - 1) // SEQ_LEN, 4) * SEQ_LEN  # the trainer's choice of validation rows
    sums, counts = direct(hybridlm.load(checkpoint, dtype=torch.float64), picked, SEQ_LEN)
    assert (r["rows"], r["whole_corpus"], r["tokens"]) == (4, False, counts[0])
    assert r["loss"] == pytest.approx(sums[0] / counts[0], rel=1e-12)


def test_batches_that_take_every_row_still_leave_the_tail_as_the_trainer_does(checkpoint, corpus, capsys):
    """--batches K of more rows than the corpus has took every row and the tail, where the trainer's validation at
    train.eval_batches = K (all rows of a small validation split) reads whole rows only: the two losses differed."""
    tokens, _ = stream()
    n_rows = (len(tokens) - 1) // SEQ_LEN
    r = evaluated(capsys, checkpoint, "--data", corpus, "--seq-len", SEQ_LEN, "--batch-size", 2, "--batches", n_rows)
    sums, counts = direct(hybridlm.load(checkpoint), eval_rows(n_rows, 2 * n_rows) * SEQ_LEN, SEQ_LEN)
    assert (r["rows"], r["whole_corpus"], r["tokens"]) == (n_rows, False, counts[0])
    assert r["loss"] == pytest.approx(sums[0] / counts[0], rel=1e-6)


def test_json_keys_and_the_table(checkpoint, corpus, capsys):
    r = evaluated(capsys, checkpoint, "--data", corpus, "--seq-len", SEQ_LEN)
    assert list(r) == [
        "checkpoint",
        "data",
        "split",
        "corpus_tokens",
        "corpus_documents",
        "seq_len",
        "batch_size",
        "rows",
        "whole_corpus",
        "tokens",
        "loss",
        "perplexity",
        "bytes",
        "bits_per_byte",
        "mtp",
        "dtype",
        "device",
    ]
    assert list(r["mtp"][0]) == ["depth", "tokens", "loss", "perplexity"] and r["dtype"] == "float32"
    assert r["split"] is None
    code, out, err = run(capsys, checkpoint, "--data", corpus, "--seq-len", SEQ_LEN)
    assert code == 0 and err == ""  # no bar off a terminal
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("MTP"))
    assert lines["loss"] == f"{r['loss']:.4f} nats/token" and lines["perplexity"] == f"{r['perplexity']:.3f}"
    assert lines["tokens"] == f"{r['tokens']:,}" and lines["bits/byte"].startswith(f"{r['bits_per_byte']:.4f}")
    assert f"MTP depth 1  loss {r['mtp'][0]['loss']:.4f} nats/token" in out
    code, again, err = run(capsys, checkpoint, "--data", corpus, "--seq-len", SEQ_LEN, "--progress")
    assert code == 0 and again == out and "evaluating: 100%|" in err and "2/2" in err  # 8 rows in one batch, the tail


def test_a_prepared_corpus_evaluates_as_its_source(checkpoint, corpus, tmp_path, capsys):
    assert main(["prepare", str(corpus), str(tmp_path / "tokens"), "--no-progress"]) == 0
    capsys.readouterr()
    want = evaluated(capsys, checkpoint, "--data", corpus, "--seq-len", SEQ_LEN)
    got = evaluated(capsys, checkpoint, "--data", tmp_path / "tokens", "--seq-len", SEQ_LEN)
    assert {k: v for k, v in got.items() if k != "data"} == {k: v for k, v in want.items() if k != "data"}


def test_a_run_directory_and_a_converted_hugging_face_folder_evaluate_alike(corpus, tmp_path, capsys):
    """As generate reads them: a run's exported model/, and a folder converted from NemotronH."""
    config = tiny_config("M-*-", vocab_size=257).replace(position_embedding="none")
    model = hybridlm.save(HybridLM(config, seed=1), tmp_path / "model", extra_files=ByteTokenizer().files())
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(model, tmp_path / "run" / "model")
    for argv in (["--to", "nemotron-h"], ["--from", "nemotron-h"]):
        src, dst = (model, tmp_path / "hf") if argv[0] == "--to" else (tmp_path / "hf", tmp_path / "back")
        assert main(["convert", str(src), str(dst), *argv]) == 0
    capsys.readouterr()
    want = evaluated(capsys, model, "--data", corpus, "--seq-len", SEQ_LEN)
    for path, read in ((tmp_path / "run", tmp_path / "run" / "model"), (tmp_path / "back", tmp_path / "back")):
        got = evaluated(capsys, path, "--data", corpus, "--seq-len", SEQ_LEN)
        assert (got["checkpoint"], got["tokens"], got["loss"]) == (str(read), want["tokens"], want["loss"]), path


def test_a_training_state_is_refused_as_generate_refuses_it(checkpoint, corpus, tmp_path, capsys):
    from hybridlm.checkpoint.training_state import save_training_state

    state = save_training_state(tmp_path / "run" / "checkpoints" / "step-000001", hybridlm.load(checkpoint), step=1)
    assert main(["generate", str(state), "--prompt", "x"]) == 2
    refused = capsys.readouterr().err
    code, _, err = run(capsys, state, "--data", corpus)
    assert code == 2 and err == refused and "a training-state checkpoint of the run" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{d}/missing", "--data", "{corpus}"], "error: {d}/missing: "),
        (["{ck}", "--data", "{corpus}", "--seq-len", "1000"], "error: --seq-len: --data {corpus} ("),
        (
            ["{d}/small", "--data", "{corpus}", "--tokenizer", "byte"],
            "error: --tokenizer byte has 257 token ids (end of text 256), more than the model's vocabulary of 200: "
            "the model was not trained with this tokenizer",
        ),
        (["{ck}", "--data", "{d}/nothing.txt"], "error: --data: {d}/nothing.txt does not exist"),
        (
            ["{ck}", "--data", "{corpus}", "--batches", "0"],
            "error: --batches must be a positive count or 'all', got '0'",
        ),
        (
            ["{ck}", "--data", "{corpus}", "--batches", "x"],
            "error: --batches must be a positive count or 'all', got 'x'",
        ),
        (["{ck}", "--data", "{corpus}", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        (["{ck}", "--data", "{corpus}", "--seq-len", "0"], "error: --seq-len must be >= 1, got 0"),
        (["{ck}", "--data", "{corpus}", "--dtype", "int8"], "error: --dtype must be a floating torch.dtype"),
    ],
)
def test_errors_name_their_flag(checkpoint, corpus, tmp_path, capsys, argv, message):
    hybridlm.save(HybridLM(tiny_config("M-", vocab_size=200), seed=0), tmp_path / "small")  # no tokenizer of its own
    code, out, err = run(capsys, *(a.format(d=tmp_path, ck=checkpoint, corpus=corpus) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith(message.format(d=tmp_path, corpus=corpus)), err


def test_an_mtp_depth_without_labels_has_no_loss_rather_than_zero(checkpoint, corpus, capsys):
    """At --seq-len 1 no MTP label fits in a row: its loss was reported as 0.0 and its perplexity as 1.0, a
    perfect score, where there is none to report."""
    r = evaluated(capsys, checkpoint, "--data", corpus, "--seq-len", 1, "--batches", 2)
    assert r["tokens"] > 0 and r["loss"] is not None
    assert r["mtp"] == [{"depth": 1, "tokens": 0, "loss": None, "perplexity": None}]
    code, out, _ = run(capsys, checkpoint, "--data", corpus, "--seq-len", 1, "--batches", 2)
    assert code == 0 and "MTP depth 1  no labels in these rows (depth 1 needs --seq-len above 1)" in out


def test_a_loss_that_is_not_finite_keeps_its_bits_per_byte_line(corpus, tmp_path, capsys):
    """Damaged weights (a NaN final norm) under the byte tokenizer: the bits/byte line was left out, as for a
    tokenizer.json, whose pieces have no fixed bytes, and the losses read "not finite nats/token"."""
    model = HybridLM(tiny_config("M[*-]/[*-]", vocab_size=257), seed=0)
    with torch.no_grad():
        model.norm_f.weight.fill_(math.nan)
    path = hybridlm.save(model, tmp_path / "nan", extra_files=ByteTokenizer().files())
    r = evaluated(capsys, path, "--data", corpus, "--seq-len", SEQ_LEN)
    assert r["loss"] is None and r["bits_per_byte"] is None and r["bytes"] > 0
    code, out, _ = run(capsys, path, "--data", corpus, "--seq-len", SEQ_LEN)
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("MTP"))
    assert code == 0 and lines["loss"] == "not finite" and lines["bits/byte"] == f"not finite ({r['bytes']:,} bytes)"
    assert "MTP depth 1  loss not finite, perplexity not finite" in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run (its folder, and the folder it was started from) whose config.toml names its corpus by a
    relative path, with its val_loss at the last step: 30% of the documents held out, rows of 24 tokens."""
    base = tmp_path_factory.mktemp("trained")
    short_documents(base / "c.jsonl")
    logged = train_small(base, "data.source=c.jsonl", "model.pattern=M-*-")
    val_loss = [m["val_loss"] for m in logged if m.get("step") == 2 and "val_loss" in m]
    return base / "run", base, val_loss[0]


def train_small(base, *sets: str) -> list[dict]:
    """Train a small model from folder ``base`` into ``base/run`` (2 steps, rows of 24 tokens, 30% of the documents
    held out, evaluated at the last step) with ``sets`` (the corpus, the pattern) on top; its metrics.jsonl records."""
    sets = (
        *sets,
        "data.seq_len=24",
        "data.val_fraction=0.3",
        "train.batch_size=2",
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_batches=3",
        "train.device=cpu",  # (eval runs on the CPU too: on a CUDA machine, bf16 autocast would differ from it)
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.mamba_head_dim=16",
    )
    argv = ["train", *(x for s in sets for x in ("--set", s)), "--run-dir", "run", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        assert main(argv) == 0
    return [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]


def test_the_runs_validation_rows_give_its_logged_val_loss(trained, capsys, monkeypatch):
    """What docs/training.md promises: eval of a run's model on its validation split at the run's seq_len (the
    default for a run), batch_size and eval_batches is the val_loss the trainer logged for the same weights. The
    relative data.source is read from the current directory, as a resume reads it; --data naming it gives the same."""
    run_dir, base, val_loss = trained
    monkeypatch.chdir(base)
    capsys.readouterr()
    r = evaluated(capsys, run_dir, "--split", "val", "--batch-size", 2, "--batches", 3)
    assert (r["data"], r["split"], r["seq_len"], r["rows"]) == ("c.jsonl", "val", 24, 6)
    assert r["loss"] == pytest.approx(val_loss, rel=1e-6)
    again = evaluated(capsys, run_dir, "--split", "val", "--data", base / "c.jsonl", "--batch-size", 2, "--batches", 3)
    assert {**again, "data": "c.jsonl"} == r
    code, out, _ = run(capsys, run_dir, "--split", "val", "--batch-size", 2, "--batches", 3)
    assert code == 0 and f"c.jsonl, the run's validation split ({r['corpus_tokens']:,} tokens" in out, out


def test_split_train_reads_the_documents_the_run_trained_on(trained, capsys, monkeypatch):
    """Every token of the documents split kept for training, each counted once as a label but a document's first."""
    from hybridlm.train.data import TokenStream, split

    run_dir, base, _ = trained
    monkeypatch.chdir(base)
    docs = [json.loads(line)["text"] for line in (base / "c.jsonl").read_text().splitlines()]
    # split's choice, read off a stream whose document i is the single token i
    kept, _ = split(TokenStream(np.arange(len(docs)), np.arange(len(docs) + 1)), 0.3, 0)
    tokens = sum(len(docs[i].encode()) + 1 for i in kept.doc_offsets)
    r = evaluated(capsys, run_dir, "--split", "train")
    assert (r["split"], r["corpus_documents"], r["corpus_tokens"]) == ("train", kept.num_docs, tokens)
    assert r["whole_corpus"] is True and r["tokens"] == tokens - kept.num_docs


def test_split_is_refused_where_there_is_none(trained, checkpoint, tmp_path, capsys, monkeypatch):
    """A model folder that is no run (a run's model/ among them), a run without a validation split, and the run
    named from another directory, where its relative data.source names nothing."""
    from hybridlm.train.config import RunConfig

    run_dir, base, _ = trained
    shutil.copytree(run_dir / "model", tmp_path / "whole" / "model")
    whole = RunConfig.from_toml(run_dir / "config.toml").with_overrides(["data.val_fraction=0"])
    (tmp_path / "whole" / "config.toml").write_text(whole.to_toml())
    monkeypatch.chdir(base)
    cases = [
        ([run_dir], "error: eval needs --data SOURCE (the corpus to evaluate), or --split val|train"),
        ([checkpoint, "--split", "val"], f"error: --split val: {checkpoint} is not a training run directory ("),
        (
            [run_dir / "model", "--split", "train"],
            f"give its run directory {run_dir}, or evaluate a corpus with --data SOURCE",
        ),
        (
            [tmp_path / "whole", "--split", "val"],
            f"error: --split val: the run {tmp_path / 'whole'} held out no validation split (data.val_fraction = 0",
        ),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and message in err, (argv, err)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, run_dir, "--split", "val")
    assert code == 2 and err == f"error: data.source of {run_dir / 'config.toml'}: c.jsonl does not exist\n"


def test_a_run_directory_is_read_at_its_seq_len(trained, capsys):
    """--seq-len's default for a run directory is the run's data.seq_len (24), not 256, also with --data."""
    run_dir, base, _ = trained
    r = evaluated(capsys, run_dir, "--data", base / "c.jsonl", "--batches", 1, "--batch-size", 1)
    assert r["seq_len"] == 24 and r["rows"] == 1 and 0 < r["tokens"] <= 24


def test_a_loss_that_is_not_finite_is_null_in_the_json(checkpoint, corpus, capsys, monkeypatch):
    """JSON has no Infinity or NaN (json.dumps writes them, strict readers refuse the object): null instead."""
    from hybridlm.train import evaluation

    def diverged(*args, **kwargs):
        return evaluation.Evaluation(rows=1, whole=True, loss_sums=[math.inf, math.nan], tokens=[5, 3], bytes=10)

    monkeypatch.setattr(evaluation, "evaluate_corpus", diverged)
    code, out, err = run(capsys, checkpoint, "--data", corpus, "--seq-len", SEQ_LEN, "--json")
    assert code == 0, err

    def refuse(constant):
        raise ValueError(f"{constant} in the JSON")

    r = json.loads(out, parse_constant=refuse)
    assert (r["loss"], r["perplexity"], r["bits_per_byte"]) == (None, None, None)
    assert (r["mtp"][0]["loss"], r["mtp"][0]["perplexity"]) == (None, None)


@pytest.fixture(scope="module", params=[None, "[0.2, 0.8]"], ids=["by-rows", "weighted"])
def blended(tmp_path_factory, request):
    """A finished run on a blend of two corpora weighted by their training rows (no data.weights) or by
    data.weights, of a model with one MTP depth, as ``trained`` is otherwise, with its metrics at the last step."""
    base = tmp_path_factory.mktemp("blended")
    weights = [] if request.param is None else [f"data.weights={request.param}"]
    short_documents(base / "c.jsonl")
    (base / "d.jsonl").write_text("".join(json.dumps({"text": f"line {i} of d " * 6}) + "\n" for i in range(30)))
    logged = train_small(base, 'data.source=["c.jsonl", "d.jsonl"]', *weights, "model.pattern=M-*-/*-")
    return base / "run", base, next(m for m in logged if m.get("step") == 2 and "val_loss" in m)


def test_a_blended_run_s_split_is_each_source_s_and_their_weighted_mean(blended, capsys, monkeypatch):
    """The run's validation rows give its logged val_loss (the mean weighted by the training mix) and each source's
    val_loss/<name>; every other key is the blend's (counts summed); the table lists the sources."""
    run_dir, base, logged = blended
    monkeypatch.chdir(base)
    capsys.readouterr()
    r = evaluated(capsys, run_dir, "--split", "val", "--batch-size", 2, "--batches", 3)
    assert r["data"] == ["c.jsonl", "d.jsonl"] and [s["name"] for s in r["sources"]] == ["c", "d"]
    assert r["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    for s in r["sources"]:
        assert s["loss"] == pytest.approx(logged[f"val_loss/{s['name']}"], rel=1e-6)
        assert list(s)[:3] == ["name", "data", "weight"]
    assert sum(s["weight"] for s in r["sources"]) == pytest.approx(1.0)
    assert r["loss"] == pytest.approx(sum(s["weight"] * s["loss"] for s in r["sources"]), rel=1e-12)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    for key in ("corpus_tokens", "corpus_documents", "rows", "tokens", "bytes"):
        assert r[key] == sum(s[key] for s in r["sources"]), key
    # The MTP depth's loss and the bits per byte are weighted as the main loss is (the run's own weights, if any).
    mtp = sum(s["weight"] * s["mtp"][0]["loss"] for s in r["sources"])
    assert r["mtp"][0]["loss"] == pytest.approx(mtp, rel=1e-12) and r["mtp"][0]["tokens"] > 0
    bpb = sum(s["weight"] * s["bits_per_byte"] for s in r["sources"])
    assert r["bits_per_byte"] == pytest.approx(bpb, rel=1e-12)
    if RunConfig.from_toml(run_dir / "config.toml").data.weights is not None:
        assert [s["weight"] for s in r["sources"]] == pytest.approx([0.2, 0.8], rel=1e-12)
    one = evaluated(capsys, run_dir, "--split", "val", "--data", base / "d.jsonl", "--batch-size", 2, "--batches", 3)
    assert "sources" not in one and one["loss"] == pytest.approx(logged["val_loss/d"], rel=1e-6)
    code, out, _ = run(capsys, run_dir, "--split", "val", "--batch-size", 2, "--batches", 3)
    assert code == 0 and "a blend of 2 sources, the run's validation split" in out
    assert re.search(r"^source d +weight [\d.]+: loss \d+\.\d{4} nats/token, .* · d\.jsonl$", out, re.M), out


def test_split_refuses_data_that_is_not_the_run_s_corpus(trained, corpus, capsys, monkeypatch):
    """The run's split of another corpus means nothing: --data with --split was read, split and evaluated. The
    run's own corpus named from elsewhere (an absolute path) is the same corpus (test above)."""
    run_dir, base, _ = trained
    monkeypatch.chdir(base)
    code, out, err = run(capsys, run_dir, "--split", "val", "--data", corpus)
    assert code == 2 and out == ""
    assert err.startswith(f"error: --split val: --data {corpus} is not a corpus the run split (its data.source is ")
    assert "c.jsonl): the run's validation split of another corpus means nothing" in err


def test_split_refuses_data_that_is_none_of_a_blend_s_sources(blended, corpus, capsys, monkeypatch):
    run_dir, base, _ = blended
    monkeypatch.chdir(base)
    code, out, err = run(capsys, run_dir, "--split", "train", "--data", corpus)
    assert code == 2 and out == "" and "is not a corpus the run split (its sources: c.jsonl, d.jsonl)" in err
