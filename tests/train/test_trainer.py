"""The trainer: exact resume, gradient accumulation, activation checkpointing, outputs of a run."""

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import hybridlm
from hybridlm.errors import ConfigError, DataError, HybridLMError
from hybridlm.model import label_counts
from hybridlm.train.config import RunConfig
from hybridlm.train.trainer import Trainer, resolve_device
from tests.helpers import rel_err, short_documents

TINY_RUN = [
    "model.pattern=M-[*-]G[ME]",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=48",
    "model.mamba_head_dim=16",
    "model.mamba_state_dim=8",
    "model.mamba_chunk_size=16",
    "model.moe_num_experts=4",
    "model.moe_ffn_hidden_size=24",
    "model.moe_router_score=sigmoid",
    "model.moe_router_expert_bias=true",
    "model.gdn_num_heads=2",
    "model.gdn_head_dim=16",
    "model.gdn_chunk_size=16",
    "data.seq_len=48",
    "train.batch_size=4",
    "train.steps=8",
    "train.log_every=2",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.checkpoint_every=4",
    "optim.warmup_steps=2",
]


def tiny_run(*extra):
    return RunConfig().with_overrides([*TINY_RUN, *extra])


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_is_exact(tmp_path):
    run = tiny_run()
    straight = Trainer(run, run_dir=tmp_path / "a", progress=False)
    straight.run_loop()

    first = Trainer(run, run_dir=tmp_path / "b", progress=False)
    first.run_loop(until=4)
    assert first.step == 4 and not (tmp_path / "b" / "model").exists()
    second = Trainer(run, run_dir=tmp_path / "b", resume=True, progress=False)
    assert second.step == 4
    second.run_loop()

    a, b = weights(straight.model), weights(second.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000004", "step-000008"]


def test_gradient_accumulation_matches_one_batch(tmp_path):
    one = ("train.steps=2", "train.device=cpu")  # float32: bf16 autocast on a GPU rounds above these tolerances
    whole = Trainer(tiny_run(*one), run_dir=tmp_path / "a", progress=False)
    split = Trainer(tiny_run(*one, "train.micro_batch_size=1"), run_dir=tmp_path / "b", progress=False)
    firsts = [t.train_step() for t in (whole, split)]
    # The routing of the step's micro-batches adds up to the whole batch's (the weights are still the same).
    assert firsts[0]["moe_load_imbalance"] == firsts[1]["moe_load_imbalance"] > 1.0
    for t in (whole, split):
        t.train_step()
    # Adam divides by sqrt(v): where a gradient is ~0, float32 summation-order differences between
    # one batch and two micro-batches move a weight by ~1e-6 of an lr of 3e-3, so atol is 1e-5.
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_changes_nothing(tmp_path):
    plain = Trainer(tiny_run(), run_dir=tmp_path / "a", progress=False)
    ac = Trainer(tiny_run("train.activation_checkpointing=true"), run_dir=tmp_path / "b", progress=False)
    assert all(b.activation_checkpointing for b in ac.model.blocks.values())
    for _ in range(2):
        a, b = plain.train_step(), ac.train_step()
        assert a["loss"] == b["loss"]
        assert a["moe_load_imbalance"] == b["moe_load_imbalance"]  # a recomputation's routing is not counted again
    for a, b in zip(plain.model.parameters(), ac.model.parameters()):
        assert torch.equal(a, b)


def test_a_resume_with_another_batch_size_continues_after_the_rows_consumed(tmp_path, caplog):
    """The rows of a step were step * batch_size on: a doubled batch skipped rows 16-31 of the epoch."""
    first = Trainer(tiny_run(), run_dir=tmp_path / "r", progress=False)
    first.run_loop(until=4)
    consumed = {int(r) for s in range(4) for r in first.sampler.global_rows(s)}
    second = Trainer(tiny_run("train.batch_size=8"), run_dir=tmp_path / "r", resume=True, progress=False)
    perm = second.sampler._permutation(0)
    assert second.sampler.position(4) == 16
    assert second.sampler.global_rows(4).tolist() == perm[16:24].tolist()
    assert consumed == set(perm[:16].tolist())
    with caplog.at_level(logging.WARNING, logger="hybridlm.train"):  # rows cut anew: counted in tokens
        third = Trainer(tiny_run("data.seq_len=24"), run_dir=tmp_path / "r", resume=True, progress=False)
    assert third.sampler.position(4) == 32 and "data.seq_len changed from 48 to 24" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_peak_memory_on_the_cpu_is_in_gigabytes(tmp_path):
    """ru_maxrss is in KiB: dividing it by 1e6 gave neither GB nor GiB (2.4 % low)."""
    trainer = Trainer(tiny_run("train.device=cpu"), run_dir=tmp_path / "r", progress=False)
    got = trainer._peak_memory_gb()
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1])
    assert got == pytest.approx(hwm_kib * 1024 / 1e9, rel=0.002)


def test_a_run_leaves_its_outputs(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []  # loss.png's y axis, in the unit the console prints (a byte's, here: nats/token before)
    set_ylabel = Axes.set_ylabel
    monkeypatch.setattr(
        Axes, "set_ylabel", lambda ax, label, *a, **kw: (labels.append(label), set_ylabel(ax, label))[1]
    )
    run_dir = tmp_path / "run"
    summary = Trainer(tiny_run(), run_dir=run_dir, progress=False).run_loop()
    for name in ("config.toml", "metrics.jsonl", "loss.png", "model/config.json", "model/tokenizer.hybridlm.json"):
        assert (run_dir / name).exists(), name
    assert labels == ["loss (nats/byte)"]
    assert summary["val_loss"] < summary["first_val_loss"]
    model = hybridlm.load(run_dir / "model")
    assert model.config.pattern == "M-[*-]G[ME]"
    assert RunConfig.from_toml(run_dir / "config.toml").train.steps == 8
    with pytest.raises(DataError, match="already holds a run"):
        Trainer(tiny_run(), run_dir=run_dir, progress=False)


def test_the_resume_command_quotes_a_folder_a_shell_would_split(tmp_path):
    """The command a stopped run prints is pasted into a shell: "runs/my run" read as two arguments."""
    import shlex

    folder = tmp_path / "my run's"
    trainer = Trainer(tiny_run(), run_dir=folder, progress=False)
    assert shlex.split(trainer.resume_command()) == ["hybridlm", "train", "--resume", str(folder)]
    trainer.world = 2
    assert shlex.split(trainer.resume_command())[-1] == str(folder)


def test_resuming_a_finished_run_says_it_is_complete(tmp_path, capsys):
    """A resume of a run already at train.steps trained nothing and printed only "model saved", as if it had."""
    run = tiny_run("train.steps=2", "train.checkpoint_every=2")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop()
    capsys.readouterr()
    again = Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    assert again.run_loop()["step"] == 2
    out = capsys.readouterr().out
    assert "the run is complete at step 2 (train.steps = 2): nothing to train" in out
    assert "--set train.steps=4" in out


def test_apply_wd_to_qk_layernorm_is_written_to_config_toml_and_resumes_from_it(tmp_path):
    """A resume from the run file a run wrote (as ``hybridlm train --resume`` reads it) decays the q/k norms again;
    one that turns the option off regroups them and keeps every parameter's moments."""
    from hybridlm.train.optim import qk_norm_names

    sets = ["model.pattern=*-", "model.qk_norm=true", "optim.apply_wd_to_qk_layernorm=true", "train.eval_every=100"]
    sets += ["train.steps=3", "train.checkpoint_every=2"]
    Trainer(tiny_run(*sets), run_dir=tmp_path, progress=False).run_loop(until=2)
    assert "apply_wd_to_qk_layernorm = true" in (tmp_path / "config.toml").read_text()
    run = RunConfig.from_toml(tmp_path / "config.toml")
    assert run.optim.apply_wd_to_qk_layernorm is True
    t = Trainer(run, run_dir=tmp_path, resume=True, progress=False)
    assert t.step == 2
    decayed = {id(p) for g in t.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    qk = qk_norm_names(t.model)
    assert len(qk) == 2 and all(id(p) in decayed for n, p in t.model.named_parameters() if n in qk)
    t.run_loop()
    assert t.step == 3
    off = Trainer(
        run.with_overrides(["optim.apply_wd_to_qk_layernorm=false", "train.steps=4"]),
        run_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert off.step == 3
    kept = {id(p) for g in off.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in kept for n, p in off.model.named_parameters() if n in qk)
    assert all("exp_avg" in off.optimizer.state[p] for p in off.model.parameters())
    assert "apply_wd_to_qk_layernorm = false" in (tmp_path / "config.toml").read_text()


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(DataError, match="no checkpoint to resume from"):
        Trainer(tiny_run(), run_dir=tmp_path / "empty", resume=True, progress=False)
    # A run stopped before its first checkpoint (out of memory at step 1): its config.toml is the way back.
    Trainer(tiny_run(), run_dir=tmp_path / "stopped", progress=False)
    again = f"start it anew with --config {tmp_path / 'stopped' / 'config.toml'} and another --run-dir"
    with pytest.raises(DataError, match=re.escape(again)):
        Trainer(tiny_run(), run_dir=tmp_path / "stopped", resume=True, progress=False)
    with pytest.raises(DataError, match="or the config of a run stopped before its first checkpoint"):
        Trainer(tiny_run("train.micro_batch_size=2"), run_dir=tmp_path / "stopped", progress=False)


def test_resume_refuses_other_data_under_the_same_source(tmp_path, monkeypatch):
    """A relative data.source resumed from another directory trained on whatever that directory held there."""
    for where, word in (("a", "alpha"), ("b", "beta")):
        (tmp_path / where).mkdir()
        (tmp_path / where / "c.jsonl").write_text(
            "".join(json.dumps({"text": f"{word} {i} " * 9}) + "\n" for i in range(30))
        )
    run = tiny_run("data.source=c.jsonl", "train.steps=4")
    monkeypatch.chdir(tmp_path / "a")
    Trainer(run, run_dir=tmp_path / "run", progress=False).run_loop(until=4)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(DataError, match=r"data\.source 'c\.jsonl' now holds .* not the corpus this run started with"):
        Trainer(tiny_run("data.source=c.jsonl", "train.steps=8"), run_dir=tmp_path / "run", resume=True, progress=False)
    other = tiny_run(f"data.source={tmp_path / 'b' / 'c.jsonl'}", "train.steps=8")  # named on purpose: the user's call
    assert Trainer(other, run_dir=tmp_path / "run", resume=True, progress=False).step == 4
    monkeypatch.chdir(tmp_path / "a")
    for split in ("train.steps=8", "data.val_fraction=0.2", "data.seed=7"):  # the same corpus, split otherwise too
        run = tiny_run("data.source=c.jsonl", "train.steps=8", split)
        assert Trainer(run, run_dir=tmp_path / "run", resume=True, progress=False).step == 4


def test_resume_refuses_a_corpus_edited_in_place_unless_named(tmp_path, monkeypatch, capsys):
    """An edit that kept the token and document counts (here every 'a' made a 'b') resumed silently; and the
    error's advice, ``--set data.source=PATH`` with the same path, was refused again."""
    from hybridlm.cli import main

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"a line about {i} " * 9}) + "\n" for i in range(30)))
    Trainer(tiny_run("data.source=c.jsonl", "train.steps=4"), run_dir=tmp_path / "run", progress=False).run_loop()
    corpus.write_text(corpus.read_text().replace("a", "b"))
    with pytest.raises(DataError, match=r"now holds other token ids than the run was trained on \(as many: "):
        Trainer(tiny_run("data.source=c.jsonl", "train.steps=8"), run_dir=tmp_path / "run", resume=True, progress=False)
    assert main(["train", "--resume", "run", "--set", "train.steps=6", "--no-progress"]) == 2
    assert "--set data.source=PATH" in capsys.readouterr().err
    assert main(["train", "--resume", "run", "--set", "train.steps=6", "--set", "data.source=c.jsonl"]) == 0


def test_resume_refuses_a_tokenizer_replaced_at_its_path_unless_named(tmp_path, monkeypatch, capsys):
    """A tokenizer.json replaced at its path (retrained at the same size: here the same words, other ids) was blamed on
    the corpus ("data.source ... now holds other token ids"), and that error's advice, ``--set data.source=PATH``,
    went on training the model on ids it had not learned. The same tokenizer saved with other spacing is the same."""
    tokenizers = pytest.importorskip("tokenizers")
    from hybridlm.cli import main

    def save(ids):
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(ids, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok.save("tok.json", pretty=False)

    monkeypatch.chdir(tmp_path)
    words = [f"w{i}" for i in range(20)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": " ".join(words[i:] * 3)}) + "\n" for i in range(20)))
    save({"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}})
    run = ("data.source=c.jsonl", "data.tokenizer=tok.json", "model.vocab_size=32")
    Trainer(tiny_run(*run, "train.steps=2"), run_dir=tmp_path / "run", progress=False).run_loop()
    (tmp_path / "tok.json").write_text(json.dumps(json.loads((tmp_path / "tok.json").read_text()), indent=4))
    assert Trainer(tiny_run(*run, "train.steps=3"), run_dir=tmp_path / "run", resume=True, progress=False).step == 2
    save({"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(reversed(words))}})  # as many tokens, other ids
    for named in ([], ["--set", "data.source=c.jsonl"]):  # naming the corpus anew does not change what the model knows
        assert main(["train", "--resume", "run", "--set", "train.steps=3", "--no-progress", *named]) == 2
        err = capsys.readouterr().err
        assert "data.tokenizer 'tok.json' (data.eos_token 'auto') is not the tokenizer this run was trained" in err
        assert "--set data.tokenizer=PATH" in err
    assert main(["train", "--resume", "run", "--set", "train.steps=3", "--set", "data.tokenizer=tok.json"]) == 0


def test_a_resume_that_sets_another_jsonl_field_reads_it_as_named(tmp_path, monkeypatch, capsys):
    """``--set data.jsonl_field=body`` at a resume names other data as on purpose as ``data.source`` does: it was
    refused as a changed corpus, and the advice named data.source, which the user had not changed."""
    from hybridlm.cli import main

    monkeypatch.chdir(tmp_path)
    docs = ({"text": f"a line about {i} " * 9, "body": f"another body {i} " * 7} for i in range(30))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    Trainer(tiny_run("data.source=c.jsonl", "train.steps=2"), run_dir=tmp_path / "run", progress=False).run_loop()
    capsys.readouterr()
    assert main(["train", "--resume", "run", "--set", "train.steps=3", "--set", "data.jsonl_field=body"]) == 0
    assert "body" in (tmp_path / "run" / "config.toml").read_text()


def test_the_corpus_fingerprint_samples_a_large_corpus_and_ignores_the_array_type():
    from hybridlm.train.data import TokenStream

    ids = np.arange(100_000) % 257
    stream = TokenStream(ids.astype(np.uint16), np.array([0, len(ids)]))
    assert stream.fingerprint() == TokenStream(ids.astype(np.int64), stream.doc_starts).fingerprint()
    edited = ids.copy()
    edited[50_000] += 1
    assert TokenStream(edited, stream.doc_starts).fingerprint() != stream.fingerprint()  # all read: caught
    sampled = TokenStream(edited, stream.doc_starts).fingerprint(block=16, blocks=4)  # runs at 0 … 99,984
    assert sampled == stream.fingerprint(block=16, blocks=4)  # the documented gap: between the runs
    edited[99_990] += 1
    assert TokenStream(edited, stream.doc_starts).fingerprint(block=16, blocks=4) != sampled


def test_a_resume_that_would_delete_a_file_in_model_is_refused_before_training(tmp_path):
    """The export at the end replaces model/: a file of the user's there is refused at the start, not after
    the steps (and a run folder that is a file is named as one)."""
    from hybridlm import CheckpointError

    Trainer(tiny_run("train.steps=4"), run_dir=tmp_path / "run", progress=False).run_loop()
    (tmp_path / "run" / "model" / "README.md").write_text("notes")
    with pytest.raises(CheckpointError, match=r"model: replacing it would delete README\.md"):
        Trainer(tiny_run("train.steps=8"), run_dir=tmp_path / "run", resume=True, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="a file, not a folder"):
        Trainer(tiny_run(), run_dir=tmp_path / "file", progress=False)


def test_cuda_graph_compile_mode_is_refused_off_cuda(tmp_path):
    """reduce-overhead records CUDA graphs: on CPU the trainer refuses it, naming the field, before any step."""
    run = tiny_run("train.compile=true", "train.compile_mode=reduce-overhead", "train.device=cpu")
    with pytest.raises(ConfigError, match=r"train\.compile_mode: 'reduce-overhead' records CUDA graphs"):
        Trainer(run, run_dir=tmp_path / "a", progress=False)


@pytest.mark.parametrize(
    ("sets", "error"),
    [
        (["train.compile=true", "train.compile_mode=reduce-overhead", "train.device=cpu"], r"records CUDA graphs"),
        (["parallel.pp=2"], r"parallel\.pp: 2 does not divide the 1 processes"),
    ],
)
def test_a_refused_layout_never_reads_the_corpus(tmp_path, monkeypatch, sets, error):
    """The layout's checks ran after the whole corpus was tokenized (minutes for a large one)."""
    from hybridlm.train import trainer as trainer_module

    def reading(*args, **kwargs):
        raise AssertionError("the corpus was read before the layout was checked")

    monkeypatch.setattr(trainer_module, "load_corpus", reading)
    with pytest.raises(HybridLMError, match=error):
        Trainer(tiny_run("model.pattern=M-|M-", *sets), run_dir=tmp_path / "a", progress=False)


@pytest.mark.parametrize(
    ("sets", "error"),
    [
        (["model.vocab_size=100"], r"^model\.vocab_size 100 is smaller than the tokenizer's 257"),
        ([f"model.vocab_size={10**11}"], r"^model\.vocab_size: the model's .* parameters need .* GiB per process"),
    ],
)
def test_a_model_refused_by_its_size_never_reads_the_corpus(tmp_path, monkeypatch, sets, error):
    """A vocabulary smaller than the tokenizer's, or a model too large for the device, was refused only after the
    whole corpus was tokenized (minutes for a large one), though only the tokenizer decides it."""
    from hybridlm.train import trainer as trainer_module

    def reading(*args, **kwargs):
        raise AssertionError("the corpus was read before the model was checked")

    monkeypatch.setattr(trainer_module, "load_corpus", reading)
    with pytest.raises(HybridLMError, match=error):
        Trainer(tiny_run(*sets), run_dir=tmp_path / "a", progress=False)


def test_a_batch_too_large_to_gather_is_refused_by_name_before_the_corpus_is_read(tmp_path, monkeypatch):
    """train.batch_size=10**23 passed every check: the run read the corpus, evaluated, then grew a list of row
    indices until the kernel killed the process (all of a 23 GiB machine's memory)."""
    from hybridlm.train import trainer as trainer_module

    def reading(*args, **kwargs):
        raise AssertionError("the corpus was read before the batch was checked")

    monkeypatch.setattr(trainer_module, "load_corpus", reading)
    with pytest.raises(
        ConfigError, match=r"train\.batch_size: 1,000,000,000,000,000,000 rows .* GiB per process"
    ):  # (10**23 itself is now refused as more than 64 bits)
        Trainer(tiny_run(f"train.batch_size={10**18}"), run_dir=tmp_path / "a", progress=False)


def test_auto_compile_mode_records_cuda_graphs_only_where_they_can_run(tmp_path):
    """The default compile mode, "auto", is plain compiled blocks on CPU (CUDA graphs need CUDA)."""
    assert RunConfig().train.compile_mode == "auto"
    t = Trainer(tiny_run("train.compile=true", "train.device=cpu"), run_dir=tmp_path / "a", progress=False)
    assert t.compile_mode == "default" and not t.cuda_graphs
    assert "compiled blocks" in t.describe()[-1] and "reduce-overhead" not in t.describe()[-1]


def test_float8_training_on_the_cpu_stays_close_and_saves_the_plain_layout(tmp_path):
    """train.float8: the blocks' linear layers in float8 (emulated on the CPU), said in the header; the losses stay
    near the float32 run's, and the saved model is the plain model's names and shapes (it loads without torchao)."""
    pytest.importorskip("torchao")
    plain = Trainer(tiny_run("train.device=cpu"), run_dir=tmp_path / "plain", progress=False)
    plain.run_loop()
    t = Trainer(tiny_run("train.device=cpu", "train.float8=tensorwise"), run_dir=tmp_path / "f8", progress=False)
    device_line = next(line for line in t.describe() if line.startswith("device"))
    assert (
        f"float8 matmuls (tensorwise, {t.float8_layers} linear layers) (emulated on the CPU: far slower, for tests)"
        in device_line
    )
    assert t.float8_layers > 0 and "float8" not in next(ln for ln in plain.describe() if ln.startswith("device"))
    assert sum(type(m).__name__ == "Float8Linear" for m in t.model.modules()) == t.float8_layers
    t.run_loop()
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "f8")
    assert a.keys() == b.keys()
    for step, loss in a.items():
        assert b[step] == pytest.approx(loss, rel=2e-2), step
        assert b[step] != loss  # the float8 matmuls did run
    saved = hybridlm.load(tmp_path / "f8" / "model")
    assert {k: v.shape for k, v in saved.state_dict().items()} == {
        k: v.shape for k, v in plain.model.state_dict().items()
    }


def test_float8_auto_filter_converts_only_the_layers_large_enough_to_gain(tmp_path):
    """train.float8_auto_filter: with an MLP of 1,040 channels, tensorwise takes each up_proj (1,040 outputs) and leaves
    the rest (torchao's thresholds: ops.float8.slower_in_float8); the header says so."""
    pytest.importorskip("torchao")
    from hybridlm.ops.float8 import float8_linears

    sets = ("train.device=cpu", "train.float8=tensorwise", "model.ffn_hidden_size=1040")
    every = Trainer(tiny_run(*sets), run_dir=tmp_path / "all", progress=False)
    t = Trainer(tiny_run(*sets, "train.float8_auto_filter=true"), run_dir=tmp_path / "some", progress=False)
    taken = [name for name, m in t.model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert taken == float8_linears(hybridlm.HybridLM(t.config, device="meta"), "tensorwise", auto_filter=True)
    assert taken and all(name.endswith(".up_proj") for name in taken)
    assert t.float8_layers == len(taken) < every.float8_layers
    device_line = next(line for line in t.describe() if line.startswith("device"))
    assert f"float8 matmuls (tensorwise, {len(taken)} linear layers, small ones left out)" in device_line


@pytest.mark.parametrize(
    ("sets", "error"),
    [
        ([], r"train\.float8: float8 training needs torchao .*pip install torchao"),
        (
            ["model.pattern=M-", "model.hidden_size=24", "model.mamba_num_groups=1"],
            r"train\.float8: no linear layer in the blocks has both",
        ),
        (["train.float8_auto_filter=true"], r"train\.float8: every linear layer in the blocks is too small to gain"),
    ],
)
def test_float8_that_cannot_run_is_refused_before_the_corpus_is_read(tmp_path, monkeypatch, sets, error):
    import sys

    from hybridlm.train import trainer as trainer_module

    def reading(*args, **kwargs):
        raise AssertionError("the corpus was read before train.float8 was checked")

    monkeypatch.setattr(trainer_module, "load_corpus", reading)
    if not sets:  # torchao missing
        monkeypatch.setitem(sys.modules, "torchao", None)
        monkeypatch.setitem(sys.modules, "torchao.float8", None)
    else:
        pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match=error):
        Trainer(tiny_run("train.float8=tensorwise", *sets), run_dir=tmp_path / "a", progress=False)


def test_a_float8_run_resumes_exactly_and_a_resume_may_turn_float8_off(tmp_path):
    """torchao's dynamic scales keep no history, so a float8 run stopped and resumed is the uninterrupted run bit
    for bit; the parameters are the same tensors with or without float8, so a resume may change train.float8."""
    pytest.importorskip("torchao")
    run = tiny_run("train.device=cpu", "train.float8=tensorwise", "train.steps=4", "train.checkpoint_every=2")
    straight = Trainer(run, run_dir=tmp_path / "a", progress=False)
    straight.run_loop()
    Trainer(run, run_dir=tmp_path / "b", progress=False).run_loop(until=2)
    second = Trainer(run, run_dir=tmp_path / "b", resume=True, progress=False)
    second.run_loop()
    a, b = weights(straight.model), weights(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    off = Trainer(tiny_run("train.device=cpu", "train.steps=6"), run_dir=tmp_path / "b", resume=True, progress=False)
    assert off.step == 4 and off.float8_layers == 0
    off.run_loop()
    assert sorted(losses(tmp_path / "b")) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_compiled_float8_blocks_train_as_the_eager_ones_on_the_cpu(tmp_path):
    """train.compile with train.float8: the compiled blocks fuse torchao's scaling and casts, and may keep float8
    copies of the layers' inputs for the backward; the losses stay those of the eager float8 run (to float32
    rounding: 5e-5 measured over 4 steps). Slow: compiling on the CPU takes about 100 s on 2 cores."""
    pytest.importorskip("torchao")
    runs = {}
    for compiled in ("false", "true"):
        sets = ("train.device=cpu", "train.float8=tensorwise", f"train.compile={compiled}", "train.steps=4")
        Trainer(tiny_run(*sets), run_dir=tmp_path / compiled, progress=False).run_loop()
        runs[compiled] = losses(tmp_path / compiled)
    assert runs["true"].keys() == runs["false"].keys() == {1, 2, 3, 4}
    for step, loss in runs["false"].items():
        assert runs["true"][step] == pytest.approx(loss, rel=2e-4), step


def test_float8_on_a_gpu_without_float8_tensor_cores_is_refused_with_its_name(monkeypatch):
    """A GPU older than compute capability 8.9 (an A100 is 8.0) has no float8 matmuls: the check names the card and
    its capability instead of letting torchao fail in the first step. The CUDA queries are stubbed, so it runs on
    the CPU."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    run = tiny_run("train.float8=rowwise")
    stub = SimpleNamespace(run=run, device=torch.device("cuda", 0))
    meta = hybridlm.HybridLM(run.model_config(257), device="meta")
    with pytest.raises(ConfigError, match=r"train\.float8: .*8\.9 or later.*A100-SXM4-80GB is 8\.0: set it to 'none'"):
        Trainer._check_float8(stub, meta)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    pytest.importorskip("torchao")
    from hybridlm.ops.float8 import float8_linears

    assert Trainer._check_float8(stub, meta) == len(float8_linears(meta)) > 0


@pytest.mark.gpu
def test_float8_on_the_gpu_trains_close_to_bf16_and_the_same_under_cuda_graphs(tmp_path):
    """On a GPU with float8 tensor cores: tensorwise and rowwise float8 stay near the bf16 run's losses, and
    CUDA graphs (compile mode "auto" in one process) replay the float8 steps to plain compiled blocks' losses."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs float8 tensor cores with row-wise scales (compute capability 9.0+)")
    pytest.importorskip("torchao")
    runs = {}
    for recipe, mode in (("none", "auto"), ("tensorwise", "auto"), ("tensorwise", "default"), ("rowwise", "auto")):
        t = Trainer(
            tiny_run("train.compile=true", f"train.compile_mode={mode}", f"train.float8={recipe}", "train.steps=16"),
            run_dir=tmp_path / f"{recipe}-{mode}",
            progress=False,
        )
        assert t.cuda_graphs == (mode == "auto") and (t.float8_layers > 0) == (recipe != "none")
        t.run_loop()
        runs[recipe, mode] = losses(tmp_path / f"{recipe}-{mode}")
    bf16 = runs["none", "auto"]
    for step, loss in runs["tensorwise", "default"].items():
        assert runs["tensorwise", "auto"][step] == pytest.approx(loss, rel=1e-4), step
    for recipe in ("tensorwise", "rowwise"):
        got = runs[recipe, "auto"]
        print(recipe, {s: f"{got[s]:.4f}/{bf16[s]:.4f}" for s in bf16})
        assert got.keys() == bf16.keys()
        assert all(got[s] == pytest.approx(bf16[s], rel=3e-2) for s in bf16), recipe
        assert any(got[s] != bf16[s] for s in bf16)


#: Qwen3-Next's parts over the tiny run: Gated DeltaNet and gated attention fused with MoE layers whose shared
#: expert is gated, zero-centred norms, an MTP depth, no expert bias (the expert-load counting alone).
QWEN3_NEXT_LIKE = (
    "model.pattern=[GE]G-[*E]/[*E]",
    "model.attention_output_gate=true",
    "model.qk_norm=true",
    "model.moe_shared_expert_ffn_hidden_size=16",
    "model.moe_shared_expert_gate=true",
    "model.norm_zero_centered=true",
    "model.moe_router_expert_bias=false",
)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [(), QWEN3_NEXT_LIKE], ids=["tiny", "qwen3-next-like"])
def test_auto_compile_mode_on_one_gpu_is_cuda_graphs_with_the_same_losses(tmp_path, extra):
    """On one CUDA device "auto" replays the compiled blocks as CUDA graphs (train and evaluation),
    and trains to the same losses as plain compiled blocks; the MoE layers' load imbalance is logged the same."""
    runs, loads = {}, {}
    for mode in ("auto", "default"):
        t = Trainer(
            tiny_run("train.compile=true", f"train.compile_mode={mode}", *extra),
            run_dir=tmp_path / mode,
            progress=False,
        )
        assert t.cuda_graphs == (mode == "auto")
        t.run_loop()
        runs[mode] = losses(tmp_path / mode)
        loads[mode] = [r.get("moe_load_imbalance") for r in t.metrics.history if "loss" in r]
    assert runs["auto"].keys() == runs["default"].keys()
    # (Not bit for bit: under bf16 autocast the two compile modes' kernels round apart, and steps carry it on; measured
    # up to 1.0e-5 apart at step 3 on an H100, so within 1e-4 as the float8 test's same comparison.)
    for step, loss in runs["default"].items():
        assert runs["auto"][step] == pytest.approx(loss, rel=1e-4), step
    # (The same routing at the first step; later a near-tie may route one token otherwise, as losses differ by 1e-5.)
    assert all(x is not None and x >= 1 for x in loads["auto"] + loads["default"]) and loads["auto"][
        0
    ] == pytest.approx(loads["default"][0])


@pytest.mark.gpu
def test_global_balancing_over_micro_batches_trains_the_same_under_cuda_graphs_and_checkpointing(tmp_path):
    """moe_aux_loss_type = "global_aux_loss" with two micro-batches a step: the running count (kept out of the compiled
    graphs) trains the same eagerly, with plainly compiled blocks, replayed as CUDA graphs, and graphed with the blocks
    recomputed under checkpointing, to 1e-4: compiled and eager kernels round otherwise (on an H100 these runs
    differed by up to 5e-5, and with "aux_loss" by up to 3e-5). A recomputation that
    counted its micro-batch again would shift the second micro-batch's balancing; the CPU tests check it exactly."""
    runs = {}
    common = ("model.moe_aux_loss_coeff=0.1", "model.moe_aux_loss_type=global_aux_loss", "train.micro_batch_size=2")
    for name, extra in (
        ("eager", ("train.compile=false",)),
        ("compiled", ("train.compile=true", "train.compile_mode=default")),
        ("graphs", ("train.compile=true", "train.compile_mode=auto")),
        (
            "graphs-checkpointed",
            ("train.compile=true", "train.compile_mode=auto", "train.activation_checkpointing=true"),
        ),
    ):
        t = Trainer(tiny_run(*common, *extra), run_dir=tmp_path / name, progress=False)
        assert t.cuda_graphs == name.startswith("graphs")
        t.run_loop()
        runs[name] = losses(tmp_path / name)
        assert all(r["aux_loss"] > 0 for r in t.metrics.history if "loss" in r)
    for name, base, tol in (
        ("graphs-checkpointed", "graphs", 1e-4),
        ("graphs", "eager", 1e-4),
        ("compiled", "eager", 1e-4),
    ):
        assert runs[name].keys() == runs[base].keys()
        for step, loss in runs[base].items():
            assert runs[name][step] == pytest.approx(loss, rel=tol), (name, base, step)


@pytest.mark.gpu
def test_the_peak_memory_logged_is_the_runs_own(tmp_path):
    """peak_mem_gb read torch's peak since the process started: a run after other work in the same process (a
    notebook's second run) logged the largest peak of any of them."""
    big = torch.empty(3 * 10**9, dtype=torch.uint8, device="cuda")
    del big
    t = Trainer(tiny_run("train.steps=2", "train.log_every=1"), run_dir=tmp_path / "a", progress=False)
    t.run_loop()
    peaks = [r["peak_mem_gb"] for r in t.metrics.history if "peak_mem_gb" in r]
    assert peaks and 0 < max(peaks) < 1.5, peaks


def test_evaluation_runs_without_autograd(tmp_path):
    """Validation forwards build no autograd graph (memory), and take the no-gradient kernels."""
    t = Trainer(tiny_run(), run_dir=tmp_path / "a", progress=False)
    seen, forward = [], t.model.forward

    def spy(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    t.model.forward = spy
    assert t.evaluate() is not None
    assert seen and not any(seen)


def test_trainer_gives_the_cuda_allocator_expandable_segments_unless_the_environment_says(tmp_path, monkeypatch):
    from hybridlm.train.trainer import CUDA_ALLOC_CONF, configure_cuda_allocator

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # so that the test's end restores what was there
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(
        torch.cuda, "is_initialized", lambda: False
    )  # as in a fresh process (earlier tests may use CUDA)
    Trainer(tiny_run("train.steps=1"), run_dir=tmp_path / "a", progress=False)
    assert CUDA_ALLOC_CONF == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's setting wins
    Trainer(tiny_run("train.steps=1"), run_dir=tmp_path / "b", progress=False)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")  # too late once CUDA runs: nothing set, and the answer says so
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert configure_cuda_allocator().startswith("unset (CUDA was in use")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_train_device_gives_each_torchrun_process_its_gpu(monkeypatch):
    """'cuda' without an index takes the process's LOCAL_RANK (torch.cuda.set_device refused it: "Expected a
    torch.device with a specified index"); one GPU named for every process of a machine is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda:3")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="every process on this machine on one GPU") as e:
        resolve_device("cuda:1")
    assert e.value.field == "train.device"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # one process: the GPU it names
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DataError, match="no CUDA device"):
        resolve_device("cuda")


def test_train_device_names_a_gpu_this_machine_has(monkeypatch):
    """cuda:3 on a machine of 2 GPUs, or a torchrun process whose LOCAL_RANK has no GPU (--nproc_per_node above the
    GPUs), reached torch.cuda.set_device: "CUDA error: invalid device ordinal", reported as a possible bug."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for index in (3, 2):  # (GPUs count from 0: cuda:2 is the first index a machine of 2 lacks)
        with pytest.raises(ConfigError, match=rf"^train\.device: 'cuda:{index}': this machine has 2 CUDA device\(s\)$"):
            resolve_device(f"cuda:{index}")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for spec in ("auto", "cuda"):
        with pytest.raises(ConfigError, match=rf"^train\.device: '{spec}' gives each process .*nproc_per_node 2\)$"):
            resolve_device(spec)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")


def _uneven_corpus(path):
    """Ten documents of 61 characters, then 300 of one: rows of the first part hold 47 or 48 labelled tokens of
    48, rows of the second (a document boundary every other token) 24."""
    docs = [f"{i:02d} long text " + "a" * 48 for i in range(10)] + ["x"] * 300
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_gradient_accumulation_weights_micro_batches_by_their_labelled_tokens(tmp_path):
    """The accumulated gradient is the whole batch's: each micro-batch's loss scaled by its share of the
    step's labelled tokens. Unscaled, the gradient was micro-batches times too large (AdamW hides it, the
    gradient norm does not); scaled by rows, micro-batches with fewer labelled tokens weighed too much."""
    corpus = _uneven_corpus(tmp_path / "c.jsonl")
    one = ("train.steps=2", "train.device=cpu", f"data.source={corpus}", "data.val_fraction=0")
    whole = Trainer(tiny_run(*one), run_dir=tmp_path / "a", progress=False)
    split = Trainer(tiny_run(*one, "train.micro_batch_size=1"), run_dir=tmp_path / "b", progress=False)
    labelled = [
        (whole.train_rows.rows(whole.sampler.local_rows(s))["labels"] != -100).sum(dim=1).tolist() for s in (0, 1)
    ]
    assert all(max(n) - min(n) >= 10 for n in labelled), labelled  # the micro-batches differ
    for _ in range(2):
        a, b = whole.train_step(), split.train_step()
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def _step_gradients(trainer):
    """Train one step; returns its metrics and the gradients the optimizer stepped with (after clipping)."""
    grads = {}
    hook = trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    )
    values = trainer.train_step()
    hook.remove()
    return values, grads


# Two MTP depths weighing as much as the main head.
MTP_RUN = (
    "model.pattern=M-*-/*-/*-",
    "model.mtp_loss_scale=1",
    "train.device=cpu",
    "data.val_fraction=0",
    "train.steps=2",
)


@pytest.mark.parametrize("micro_batch_size", [2, 1])  # 2 and 4 micro-batches of the 4 rows
def test_mtp_losses_do_not_depend_on_the_micro_batch_split(tmp_path, micro_batch_size):
    """Each head's loss is weighted by the micro-batch's share of that head's labels: the MTP depths were
    weighted by the main head's share, and on short documents their mean moved by ~14 % with the split."""
    corpus = short_documents(tmp_path / "c.jsonl")
    one = (*MTP_RUN, f"data.source={corpus}")
    whole = Trainer(tiny_run(*one), run_dir=tmp_path / "a", progress=False)
    split = Trainer(
        tiny_run(*one, f"train.micro_batch_size={micro_batch_size}"), run_dir=tmp_path / "b", progress=False
    )
    for step in range(2):
        batch = whole.train_rows.rows(whole.sampler.local_rows(step))
        counts = label_counts(batch["labels"], 2, batch["doc_ids"])  # (rows, main + 2 depths)
        share = counts[:, 2] / counts[:, 0]  # the last depth's labels per main-head label, row by row
        assert share.max() - share.min() > 0.3, counts
        (a, ga), (b, gb) = _step_gradients(whole), _step_gradients(split)
        for key in ("loss", "lm_loss", "mtp_loss_1", "mtp_loss_2", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (step, key)
        for name, g in ga.items():
            assert rel_err(gb[name], g) <= 1e-5, (step, name, rel_err(gb[name], g))
    # The gradients agree to ~3e-6; AdamW's g / sqrt(v) turns that into up to ~2e-6 of a weight where g is ~0
    # (as in test_gradient_accumulation_matches_one_batch), hence the atol.
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


def test_the_auxiliary_losses_are_logged(tmp_path):
    """metrics.jsonl holds aux_loss, the weighted MoE balancing (and DSA indexer) losses of the step, as Megatron
    logs its load-balancing loss: only the total was logged, where it hid among the heads' losses."""
    corpus = short_documents(tmp_path / "c.jsonl")
    extra = ("model.pattern=M-*E/*E", "model.moe_num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=32")
    run = tiny_run(*MTP_RUN[1:], *extra, "model.moe_aux_loss_coeff=0.1", f"data.source={corpus}")
    t = Trainer(run, run_dir=tmp_path / "a", progress=False)
    batch = t.train_rows.rows(t.sampler.local_rows(0))
    # With gradients on: the auxiliary losses are computed only where a backward may follow.
    want = t.model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"])
    t.run_loop()
    row = next(json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)
    assert want.aux_loss.item() > 0.01 and row["aux_loss"] == pytest.approx(want.aux_loss.item(), rel=1e-4)
    assert row["loss"] == pytest.approx(row["lm_loss"] + row["mtp_loss_1"] + row["aux_loss"], rel=1e-6)
    plain = Trainer(
        tiny_run(*MTP_RUN[1:], *extra, f"data.source={corpus}"), run_dir=tmp_path / "b", progress=False
    ).train_step()
    assert "aux_loss" not in plain  # no coefficient: no auxiliary loss
    z_only = Trainer(
        tiny_run(*MTP_RUN[1:], *extra, "model.moe_z_loss_coeff=0.1", f"data.source={corpus}"),
        run_dir=tmp_path / "c",
        progress=False,
    ).train_step()
    assert z_only["aux_loss"] > 0  # the router z-loss alone is an auxiliary loss too


def test_the_global_balancing_counts_each_steps_micro_batches_from_nothing(tmp_path):
    """moe_aux_loss_type = "global_aux_loss" in one process with two micro-batches a step: the trainer gives the routers
    running counts (parallel.execution.StepCounts) and starts them afresh at every step, so after any step each
    router holds exactly that step's routed pairs (rows x positions x top_k), and two forwards' counts."""
    run = tiny_run(
        "model.moe_aux_loss_coeff=0.1", "model.moe_aux_loss_type=global_aux_loss", "train.micro_batch_size=2"
    )
    t = Trainer(run, run_dir=tmp_path / "a", progress=False)
    assert len(t.step_counts) == 1  # the one MoE layer's router
    for _ in range(2):
        assert t.train_step()["aux_loss"] > 0
        (routed,) = t.step_counts
        assert len(routed.used) == 2 and routed.total.sum().item() == 4 * 48 * t.config.moe_top_k


def test_the_moe_load_imbalance_is_logged_for_models_with_moe_layers(tmp_path):
    """moe_load_imbalance: the step's largest ratio of one expert's routed tokens (top-k choices) to its layer's
    mean, over every MoE layer; each layer's in TensorBoard. Counted here from the routers' own top-k output."""
    extra = ("model.pattern=ME[*E]/E", "train.steps=2", "train.device=cpu", "data.val_fraction=0")
    t = Trainer(tiny_run(*extra), run_dir=tmp_path / "a", progress=False)
    chosen: dict[str, list[torch.Tensor]] = {}
    for name, m in t.model.named_modules():
        if name.endswith("mixer") and hasattr(m, "gate"):
            m.gate.register_forward_hook(lambda r, a, out, name=name: chosen.setdefault(name, []).append(out[2]))
    values = t.train_step()
    want = {}
    for name, tag in [
        ("blocks.1.layers.0.mixer", "layer_1"),
        ("blocks.2.layers.1.mixer", "layer_3"),
        ("mtp.0.blocks.0.layers.0.mixer", "mtp_0_layer_0"),
    ]:
        counts = torch.bincount(torch.cat(chosen[name]).reshape(-1), minlength=4).double()
        assert counts.sum() == 4 * 48 * 2  # every token of the step's rows, top_k = 2, counted once
        want[f"moe/load_imbalance/{tag}"] = (counts.max() / counts.mean()).item()
    assert t.moe_layer_load == want and values["moe_load_imbalance"] == max(want.values()) > 1.0
    t.run_loop()
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "moe_load_imbalance" in r] == [2]  # (step 1 ran above, unlogged)
    assert not any(k.startswith("moe/") for r in rows for k in r)  # each layer's in TensorBoard only
    with contextlib.suppress(ImportError):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
        events.Reload()
        assert {tag for tag in events.Tags()["scalars"] if tag.startswith("moe/")} == set(want)
    plain = Trainer(tiny_run("model.pattern=M-*", *extra[1:]), run_dir=tmp_path / "b", progress=False)
    assert "moe_load_imbalance" not in plain.train_step() and plain.moe_layer_load == {}


def test_aux_loss_holds_the_dsa_indexer_loss_and_none_of_the_weighted_mtp_depths(tmp_path):
    """aux_loss is the DSA indexer's weighted loss too (a coefficient set, no MoE layer; a large one: the indexer starts close to attention), and the MTP depths'
    losses leave it as the total weighs them: mtp_loss_scale times their mean (here 0.5 over two depths)."""
    from tests.helpers import MLA_TINY

    corpus = short_documents(tmp_path / "c.jsonl")
    mla = [f"model.{k}={v}" for k, v in MLA_TINY.items()]
    sets = ("model.pattern=M-D-/-/-", "model.mtp_loss_scale=0.5", "model.dsa_indexer_loss_coeff=1000", *mla)
    t = Trainer(tiny_run(*MTP_RUN[1:], *sets, f"data.source={corpus}"), run_dir=tmp_path / "a", progress=False)
    batch = t.train_rows.rows(t.sampler.local_rows(0))
    want = t.model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"])  # (gradients on: aux computed)
    row = t.train_step()
    t.close()
    assert want.aux_loss.item() > 1e-4 and row["aux_loss"] == pytest.approx(want.aux_loss.item(), rel=1e-4)
    mtp = 0.5 * (row["mtp_loss_1"] + row["mtp_loss_2"]) / 2
    assert row["loss"] == pytest.approx(row["lm_loss"] + mtp + row["aux_loss"], rel=1e-6)


def test_each_mtp_depth_s_loss_is_logged(tmp_path):
    """metrics.jsonl holds mtp_loss_1 .. mtp_loss_D, the step's loss of each depth over its labels (as Megatron
    logs "mtp_d loss"): only the total and the main head's were logged, so a depth that stopped learning hid."""
    corpus = short_documents(tmp_path / "c.jsonl")
    t = Trainer(
        tiny_run(*MTP_RUN, f"data.source={corpus}", "train.micro_batch_size=1"), run_dir=tmp_path / "a", progress=False
    )
    batch = t.train_rows.rows(t.sampler.local_rows(0))
    with torch.no_grad():
        want = t.model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"])
    t.run_loop()
    row = next(json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)
    assert [row["mtp_loss_1"], row["mtp_loss_2"]] == pytest.approx([x.item() for x in want.mtp_losses], rel=1e-5)
    assert row["loss"] == pytest.approx(row["lm_loss"] + (row["mtp_loss_1"] + row["mtp_loss_2"]) / 2, rel=1e-5)
    plain = Trainer(tiny_run("train.device=cpu", "train.steps=1"), run_dir=tmp_path / "b", progress=False).train_step()
    assert not any(k.startswith("mtp_loss") for k in plain)


def test_an_mtp_depth_without_labels_in_the_step_adds_zero_not_nan(tmp_path):
    """Documents of one character: no MTP depth has a label anywhere (the next token of every labelled
    position is in the next document). Their terms are 0, so the loss is the main head's."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": c}) + "\n" for c in "abcdefgh" * 40))
    one = (*MTP_RUN, f"data.source={corpus}")
    whole = Trainer(tiny_run(*one), run_dir=tmp_path / "a", progress=False)
    split = Trainer(tiny_run(*one, "train.micro_batch_size=1"), run_dir=tmp_path / "b", progress=False)
    batch = whole.train_rows.rows(whole.sampler.local_rows(0))
    counts = label_counts(batch["labels"], 2, batch["doc_ids"])
    assert (counts[:, 0] > 0).all() and (counts[:, 1:] == 0).all(), counts
    (a, ga), (b, gb) = _step_gradients(whole), _step_gradients(split)
    assert a["loss"] == a["lm_loss"] and b["loss"] == b["lm_loss"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert all(torch.isfinite(g).all() for g in [*ga.values(), *gb.values()])
    assert all(g.abs().sum() == 0 for n, g in ga.items() if n.startswith("mtp."))  # nothing to learn there


def test_console_averages_cover_the_steps_since_the_previous_row(tmp_path):
    """loss_avg and lm_loss_avg (like tokens_per_s) average the steps since the last console row: a window
    never reset averaged everything since the start of the run."""
    run_dir = tmp_path / "run"
    Trainer(tiny_run("train.steps=6", "train.eval_every=6"), run_dir=run_dir, progress=False).run_loop()
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert [s for s in sorted(rows) if "loss_avg" in rows[s]] == [2, 4, 6]
    for step in (2, 4, 6):
        for key in ("loss", "lm_loss"):
            window = [rows[s][key] for s in (step - 1, step)]
            assert rows[step][f"{key}_avg"] == pytest.approx(sum(window) / 2, rel=1e-6), (step, key)


def test_validation_loss_is_the_main_heads_without_mtp(tmp_path):
    """Validation reports the main head's next-token loss: with MTP depths the total loss (which adds
    mtp_loss_scale times their mean) made it depend on the scale."""
    mtp = ("model.pattern=M-[*-]G[ME]/*-", "train.device=cpu")
    plain = Trainer(tiny_run(*mtp, "model.mtp_loss_scale=0"), run_dir=tmp_path / "a", progress=False)
    scaled = Trainer(tiny_run(*mtp, "model.mtp_loss_scale=1"), run_dir=tmp_path / "b", progress=False)
    assert len(scaled.model.mtp) == 1
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        assert torch.equal(a, b)
    assert scaled.evaluate() == pytest.approx(plain.evaluate(), rel=1e-6)
    # The main head's, not the MTP depth's (which the comparison above cannot tell apart: both trainers have one).
    from hybridlm.train.evaluation import evaluate_corpus

    main = evaluate_corpus(plain.model, plain.val_rows, plain.local_batch, plain.run.train.eval_batches)
    assert abs(main.loss - main.losses()[1]) > 1e-3 * main.loss  # (the two heads' losses differ)
    assert plain.evaluate() == pytest.approx(main.loss, rel=1e-6)


def test_mfu_counts_forward_and_backward_per_device(tmp_path):
    """MFU is tokens/s per process × 3 × forward flops / peak: it dropped the 3 (fwd+bwd) or the / world."""
    trainer = Trainer(tiny_run("train.device=cpu"), run_dir=tmp_path / "r", progress=False)
    model_flops = float(trainer.model.flops_per_token(trainer.run.data.seq_len))
    assert trainer.flops_per_token == pytest.approx(3 * model_flops)
    # Two processes' worth of tokens through one: the rest of the step is faked (no process group here).
    trainer.peak_flops, trainer.world = 1e12, 2

    def step():
        trainer.step += 1
        return {"loss": 1.0, "lm_loss": 1.0}

    trainer.train_step, trainer.evaluate, trainer.save_checkpoint = step, lambda: None, lambda: None
    trainer.run_loop(until=2)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "mfu" in r)
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] / 2 * 3 * model_flops / 1e12, rel=1e-9)


def test_the_header_counts_one_step_and_one_thread_in_the_singular(tmp_path, monkeypatch):
    """Counts of one are singular in the header ("1 steps" and "(1 threads)" read as typos); others stay plural."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    lines = Trainer(tiny_run("train.steps=1", "train.device=cpu"), run_dir=tmp_path / "a", progress=False).describe()
    assert any(line.endswith("tokens/step · 1 step") for line in lines), lines
    assert any(line.startswith("device  cpu (1 thread) ·") for line in lines), lines
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lines = Trainer(tiny_run("train.steps=2", "train.device=cpu"), run_dir=tmp_path / "b", progress=False).describe()
    assert any(line.endswith(" · 2 steps") for line in lines) and any("(2 threads)" in line for line in lines)


def test_the_header_shows_active_parameters_for_a_model_with_moe_layers(tmp_path):
    """MoE models are known by total and active parameters ("30B-A3B"): the model line gives both, the active
    count being what one token uses (hybridlm.counting); a model without MoE layers keeps its one count."""
    trainer = Trainer(tiny_run("train.steps=1", "train.device=cpu"), run_dir=tmp_path / "a", progress=False)
    model = hybridlm.HybridLM(trainer.config, device="meta")
    total, active = float(model.num_params()) / 1e6, float(model.num_params(active=True)) / 1e6
    assert active < total
    (line,) = [line for line in trainer.describe() if line.startswith("model   ")]
    assert f" · {total:.2f}M parameters ({active:.2f}M active) · hidden " in line, line
    dense_run = tiny_run("train.steps=1", "train.device=cpu", "model.pattern=M-[*-]")
    dense = Trainer(dense_run, run_dir=tmp_path / "b", progress=False)
    (line,) = [line for line in dense.describe() if line.startswith("model   ")]
    dense_total = float(hybridlm.HybridLM(dense.config, device="meta").num_params()) / 1e6
    assert "active" not in line and f" · {dense_total:.2f}M parameters · hidden " in line, line


def test_a_run_folder_inside_a_text_folder_source_is_refused(tmp_path):
    """The run's metrics.jsonl landed among the corpus's files: the first run trained, and its resume (or any run
    on that folder) failed with "run/metrics.jsonl:1: not a JSON object with a 'text' field"."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"document number {i} " * 20)
    for run_dir in (corpus / "run", corpus):
        with pytest.raises(DataError, match=r"the run folder is inside data\.source .*choose a --run-dir outside it"):
            Trainer(tiny_run(f"data.source='{corpus}'"), run_dir=run_dir, progress=False)
    assert sorted(p.name for p in corpus.iterdir()) == [f"{i}.txt" for i in range(8)]
    Trainer(tiny_run(f"data.source='{corpus}'", "train.steps=1"), run_dir=tmp_path / "run", progress=False).run_loop()


def test_an_init_std_that_overflows_the_weights_is_refused_by_name(tmp_path):
    """model.init_std=1e308 made every weight inf: ten skipped steps later the run stopped as diverged, advising to
    "lower optim.lr and start again", which could not help."""
    with pytest.raises(ConfigError, match=r"^model\.init_std: 1e\+308 makes the initial weights overflow to inf"):
        Trainer(tiny_run("model.init_std=1e308"), run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_a_validation_split_far_above_val_fraction_is_noted(tmp_path):
    """The split holds out whole documents, at least one: data.val_fraction 0.05 of 3 documents held out a third of
    the corpus, which only the header's token counts showed."""
    for docs, noted in ((3, True), (60, False)):
        (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"{i} words " * 30}) + "\n" for i in range(docs)))
        run = tiny_run(f"data.source={tmp_path / 'c.jsonl'}", "data.val_fraction=0.05", "train.steps=1")
        lines = Trainer(run, run_dir=tmp_path / f"run{docs}", progress=False).describe()
        note = "note    data.val_fraction 0.05 held out 1 of 3 documents, 33% of the tokens (the split takes whole"
        assert any(line.startswith(note) for line in lines) == noted, lines
        assert any("held out" in line for line in lines) == noted, lines


def test_a_training_split_shorter_than_a_row_says_the_split_took_it(tmp_path):
    """Where data.val_fraction holds out the long documents, the training split is short though the corpus is
    not: the error said only to shorten data.seq_len, not that the split (fraction, seed) took the text."""
    from hybridlm.train.data import load_corpus, split
    from hybridlm.train.tokenizer import ByteTokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a" * 200, "b", "c", "d"]))
    stream = load_corpus(str(corpus), ByteTokenizer())
    seed = next(s for s in range(100) if split(stream, 0.25, s)[1].num_tokens > 100)  # the long one held out
    run = tiny_run("train.device=cpu", f"data.source={corpus}", "data.val_fraction=0.25", f"data.seed={seed}")
    with pytest.raises(DataError, match=r"the training split \(6 tokens in 3 document\(s\)\).*lower data\.val_"):
        Trainer(run, run_dir=tmp_path / "run", progress=False)


def test_a_warning_repeated_at_every_step_is_shown_once(tmp_path):
    """Python shows a warning once per place (the "default" action) until the filters change: a change of them at
    every step (to quiet torch's scheduler warning after a skipped first step) showed it at every step again."""
    import warnings

    t = Trainer(tiny_run("train.steps=4"), run_dir=tmp_path, progress=False)
    t.model.register_forward_hook(lambda *_: warnings.warn("the same warning at every step", UserWarning, stacklevel=1))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        t.run_loop()
    assert [str(w.message) for w in shown].count("the same warning at every step") == 1


def test_a_resume_that_ends_at_its_checkpoint_plots_no_rows_past_it(tmp_path, monkeypatch):
    """A run killed after step 4 with its last checkpoint at 2, resumed with train.steps=2 (complete there):
    its loss curve still drew the killed run's steps 3 and 4."""
    import shutil

    import hybridlm.train.trainer as trainer

    run = tiny_run("train.steps=4", "train.checkpoint_every=2", "train.log_every=1")
    Trainer(run, run_dir=tmp_path, progress=False).run_loop()
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "model")
    plotted = []
    monkeypatch.setattr(trainer, "plot_losses", lambda rows, *a: plotted.extend(rows))
    again = Trainer(
        tiny_run("train.steps=2", "train.checkpoint_every=2"), run_dir=tmp_path, resume=True, progress=False
    )
    assert again.run_loop()["step"] == 2
    assert plotted and max(r["step"] for r in plotted) == 2


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_grad_clip_bounds_the_gradient_the_optimizer_steps_with(tmp_path, clip):
    """After one step AdamW's first moment is (1 - beta1) times the gradient it was given: its global norm is
    optim.grad_clip where the gradient's (the reported grad_norm, taken before clipping) is larger, and the
    gradient's own with optim.grad_clip = 0 (no clipping)."""
    t = Trainer(tiny_run(f"optim.grad_clip={clip}"), run_dir=tmp_path, progress=False)
    out = t.train_step()
    assert out["grad_norm"] > 10 * 1e-3
    moment = torch.sqrt(sum(s["exp_avg"].double().pow(2).sum() for s in t.optimizer.state.values()))
    want = clip if clip else out["grad_norm"]
    assert moment.item() / (1 - t.run.optim.beta1) == pytest.approx(want, rel=1e-3)


def test_evaluation_is_the_mean_loss_over_every_labelled_validation_token(tmp_path):
    """The validation loss weighs each part by its labelled tokens: the mean over all of them, as one forward
    over every evaluated row gives (not a sum, nor a mean, of the parts' means: here the parts, one row each,
    hold different numbers of labelled tokens)."""
    from hybridlm.train.data import eval_rows

    corpus = _uneven_corpus(tmp_path / "c.jsonl")
    run = tiny_run("train.device=cpu", f"data.source={corpus}", "data.val_fraction=0.5", "train.micro_batch_size=1")
    t = Trainer(run, run_dir=tmp_path / "run", progress=False)
    rows = eval_rows(t.val_rows.num_rows, t.run.train.eval_batches * t.local_batch * t.dp)
    batch = t.val_rows.rows(rows)
    labelled = (batch["labels"] != -100).sum(dim=1).tolist()
    assert len(labelled) > 1 and max(labelled) - min(labelled) >= 10, labelled
    t.model.eval()
    with torch.no_grad():
        want = t.model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"]).lm_loss.item()
    t.model.train()
    assert t.evaluate() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("platform, unit", [("linux", 1024), ("darwin", 1)])
def test_peak_cpu_memory_reads_ru_maxrss_in_the_platform_s_unit(monkeypatch, platform, unit):
    """ru_maxrss is KiB on Linux and bytes on macOS, where `mem` showed 1024x the process's peak."""
    import resource
    import types

    from hybridlm.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=3_000_000))
    fake = types.SimpleNamespace(device=torch.device("cpu"))
    assert Trainer._peak_memory_gb(fake) == pytest.approx(3_000_000 * unit / 1e9)


def test_cpu_processes_of_one_machine_are_checked_against_its_memory_together(monkeypatch):
    """torchrun's CPU processes share the host's memory: each was checked alone against all of it, so two
    processes needing 60 % each started and were killed by the kernel (torchrun: "Signal 9") instead of refused."""
    from types import SimpleNamespace

    from hybridlm.train import trainer as trainer_module

    run = RunConfig()
    stub = SimpleNamespace(
        device=torch.device("cpu"), world=2, num_params=10**9, config=run.model_config(), run=run, local_batch=4
    )
    monkeypatch.setattr(trainer_module, "_host_memory", lambda: int(16e9 * 0.6))  # each process's half: 8 GB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process here (the others on other machines): it fits
    Trainer._check_model_fits(stub)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"per process to train .*\(14\.9 GiB for the 2 processes on this machine\)"):
        Trainer._check_model_fits(stub)
    # The rows of a step are gathered on the host by every process (also on GPUs).
    need = 6 * 8 * 4 * (run.data.seq_len + 1)
    monkeypatch.setattr(trainer_module, "_host_memory", lambda: int(need * 1.5))
    stub.device = torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^train\.batch_size: .* for the 2 processes on this machine"):
        Trainer._check_batch_fits(stub)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    Trainer._check_batch_fits(stub)


def test_a_huge_batch_with_pipeline_microbatches_that_do_not_split_it_is_refused_at_once(monkeypatch, tmp_path):
    """The hint for parallel.microbatches tried every row count up to the batch: 2**62 rows (refused as too
    large to gather only afterwards) or 2**40 (a host that holds them) spun for hours before any error."""
    import signal

    from hybridlm.train import trainer as trainer_module

    def too_slow(signum, frame):
        raise TimeoutError("the set-up did not refuse the batch within 10 s")

    monkeypatch.setattr(trainer_module, "_dist", lambda device: (0, 2))  # rank 0 of 2: dp 1 x pp 2
    monkeypatch.setattr(trainer_module.dist, "broadcast_object_list", lambda box, src: None)
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        pipeline = ["model.pattern=M-|*-", "parallel.pp=2", "parallel.microbatches=3"]
        with pytest.raises(ConfigError, match=r"^train\.batch_size: 4,611,686,018,427,387,904 rows"):
            Trainer(tiny_run(*pipeline, f"train.batch_size={2**62}"), run_dir=tmp_path / "a", progress=False)
        monkeypatch.setattr(trainer_module, "_host_memory", lambda: 2**80)
        with pytest.raises(ConfigError, match=r"^parallel\.microbatches: 3 micro-batches do not split .* or 4 or 8 "):
            Trainer(tiny_run(*pipeline, f"train.batch_size={2**40}"), run_dir=tmp_path / "b", progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left behind


def test_the_microbatches_hint_lists_the_square_root_of_a_square_batch(monkeypatch, tmp_path):
    """The batch's divisors are found up to its square root: that root itself (4 of 16) is one of them."""
    from hybridlm.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_dist", lambda device: (0, 2))  # rank 0 of 2: dp 1 x pp 2
    monkeypatch.setattr(trainer_module.dist, "broadcast_object_list", lambda box, src: None)
    run = tiny_run("model.pattern=M-|*-", "parallel.pp=2", "parallel.microbatches=3", "train.batch_size=16")
    with pytest.raises(ConfigError, match=r"--set parallel\.microbatches=2 or 4 or 8 or 16, or a train\.batch_size"):
        Trainer(run, run_dir=tmp_path / "run", progress=False)


def test_a_run_that_fails_closes_its_metrics_file_writer_and_bar(tmp_path):
    """An error inside the loop (out of memory, a full disk) closes metrics.jsonl, the TensorBoard writer
    (its writer thread and unwritten points) and the progress bar: in a notebook each failed run left them
    open, and the next run's bar was drawn under the dead one."""
    t = Trainer(tiny_run("train.steps=4", "train.device=cpu"), run_dir=tmp_path / "run", progress=True)
    step = t.train_step

    def fails_at_step_2():
        if t.step == 2:
            raise RuntimeError("out of memory (simulated)")
        return step()

    t.train_step = fails_at_step_2
    with pytest.raises(RuntimeError, match="simulated"):
        t.run_loop()
    assert t.metrics._jsonl.closed
    assert t.metrics._bar.disable  # tqdm's close
    if t.metrics._tb is not None:
        assert t.metrics._tb.all_writers is None  # SummaryWriter's close
    assert not (tmp_path / "run" / ".hybridlm.pid").exists()


def test_train_threads_hold_inside_the_run_only(tmp_path):
    """``train.threads`` is the run's (its set-up and loop), not the process's: torch.set_num_threads is
    process-wide, and a notebook that trained with threads = 1 went on with one thread for everything."""
    before = torch.get_num_threads()
    n = 1 if before > 1 else 2
    t = Trainer(
        tiny_run("train.steps=1", f"train.threads={n}", "train.device=cpu"), run_dir=tmp_path / "r", progress=False
    )
    assert torch.get_num_threads() == before
    seen, step = [], t.train_step
    t.train_step = lambda: (seen.append(torch.get_num_threads()), step())[1]
    t.run_loop()
    assert seen == [n] and torch.get_num_threads() == before


def test_a_second_run_loop_is_refused_with_the_way_on(tmp_path):
    """run_loop(until=N) ends the trainer's run (metrics closed, folder freed): a second run_loop wrote its first
    row to the closed metrics.jsonl ("ValueError: I/O operation on closed file") after training a step unlocked."""
    run = tiny_run("train.steps=4", "train.device=cpu", "train.eval_every=100")
    t = Trainer(run, run_dir=tmp_path / "r", progress=False)
    t.run_loop(until=2)
    with pytest.raises(RuntimeError, match=r"run_loop already ended, at step 2; .*resume=True"):
        t.run_loop()
    assert t.step == 2  # nothing trained
    again = Trainer(run, run_dir=tmp_path / "r", resume=True, progress=False)
    assert again.run_loop()["step"] == 4


def test_close_frees_a_trainer_whose_loop_never_ran(tmp_path):
    """Only run_loop's end closed the metrics and freed the folder: a trainer built and dropped (a notebook cell
    run again, a harness reading describe()) kept its TensorBoard writer thread, metrics.jsonl and the folder's
    lock (fd and file) for the life of the process. close() ends it as the loop's end would."""
    import threading

    from hybridlm.train import rundir

    threads = set(threading.enumerate())  # (a count would move with threads of earlier tests that end meanwhile)
    corpus = short_documents(tmp_path / "c.jsonl")  # (a small corpus: the set-up is all this test runs)
    t = Trainer(tiny_run("train.device=cpu", f"data.source={corpus}"), run_dir=tmp_path / "r", progress=False)
    t.close()
    assert t.metrics._jsonl.closed
    if t.metrics._tb is not None:  # (tensorboard installed)
        assert t.metrics._tb.all_writers is None
    assert set(threading.enumerate()) <= threads  # the writer's thread joined
    assert (tmp_path / "r").resolve() not in rundir._HELD and not (tmp_path / "r" / rundir.LOCK_FILE).exists()
    t.close()  # twice: nothing more to free
    with pytest.raises(RuntimeError, match=r"closed before its run_loop ran; build a new one: Trainer\(run, run_dir="):
        t.run_loop()
    assert Trainer(t.run, run_dir=tmp_path / "r", progress=False).run_loop(until=1)["step"] == 1  # as it says


def test_an_evaluation_that_raises_leaves_the_model_in_training_mode(tmp_path, monkeypatch):
    """Ctrl-C during trainer.evaluate() (a notebook) left the model in eval mode, and a run_loop after it trained
    in eval mode: the MoE routers count tokens for the expert biases in training mode only, so they never moved."""
    corpus = short_documents(tmp_path / "c.jsonl")
    t = Trainer(tiny_run("train.device=cpu", f"data.source={corpus}"), run_dir=tmp_path / "r", progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(t.model, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.evaluate()
    assert all(m.training for m in t.model.modules())
    t.close()


# -- fine-tuning: train.init_from ------------------------------------------------------------------


def _saved_model(path, dtype=torch.bfloat16, seed=7, **fields):
    """A hybridlm checkpoint of TINY_RUN's model (seeded otherwise than the trainer's own initialization), saved in
    ``dtype``; returns its folder."""
    from hybridlm.model import HybridLM

    config = tiny_run().model_config(257)
    model = HybridLM(config.replace(**fields) if fields else config, seed=seed).cast(dtype)
    return hybridlm.save(model, path)


def init_run(path, *extra):
    """TINY_RUN's data and training with ``train.init_from=path`` and the embedded default [model] table, which
    must not override the checkpoint's config."""
    sets = [s for s in TINY_RUN if not s.startswith("model.")]
    return RunConfig().with_overrides([*sets, "train.device=cpu", f"train.init_from={path}", *extra])


def test_a_run_with_init_from_starts_from_exactly_the_saved_weights(tmp_path, capsys):
    from hybridlm.checkpoint.weights import canonical_state_dict

    folder = _saved_model(tmp_path / "init")
    (folder / "tokenizer.json").write_text("{}")  # (as a converted folder holds: the run's byte tokenizer is noted)
    corpus = short_documents(tmp_path / "c.jsonl")
    t = Trainer(init_run(folder, f"data.source={corpus}"), run_dir=tmp_path / "r", progress=False)
    want = canonical_state_dict(hybridlm.load(folder, dtype=torch.float32))
    got = canonical_state_dict(t.model)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k  # bf16 values, float32 model
    assert t.config == hybridlm.load(folder).config
    t.run_loop(until=1)
    out = capsys.readouterr().out
    assert f"init    weights from {folder} (train.init_from)" in out
    assert "holds a tokenizer.json, but data.tokenizer is 'byte'" in out and f"data.tokenizer={folder}/tok" in out


def test_init_from_loads_into_another_fusion_of_the_same_layers(tmp_path):
    from hybridlm.checkpoint.weights import canonical_state_dict

    folder = _saved_model(tmp_path / "init")
    corpus = short_documents(tmp_path / "c.jsonl")
    run = init_run(folder, f"data.source={corpus}", "model.pattern=M-*-|GME")
    t = Trainer(run, run_dir=tmp_path / "r", progress=False)
    assert t.config.parsed.blocks == ("M", "-", "*", "-", "G", "M", "E")
    want, got = canonical_state_dict(hybridlm.load(folder, dtype=torch.float32)), canonical_state_dict(t.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    t.close()


def test_the_first_step_s_loss_is_the_saved_model_s_on_that_batch(tmp_path):
    folder = _saved_model(tmp_path / "init", dtype=torch.float32)
    corpus = short_documents(tmp_path / "c.jsonl")
    t = Trainer(init_run(folder, f"data.source={corpus}"), run_dir=tmp_path / "r", progress=False)
    batch = t.train_rows.rows(t.sampler.local_rows(0))
    with torch.no_grad():
        want = hybridlm.load(folder)(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"]).lm_loss
    fresh = Trainer(tiny_run("train.device=cpu", f"data.source={corpus}"), run_dir=tmp_path / "f", progress=False)
    first, random_first = t.train_step()["lm_loss"], fresh.train_step()["lm_loss"]
    assert first == pytest.approx(float(want), rel=1e-6) and abs(random_first - first) > 1e-3
    t.close()
    fresh.close()


def test_a_resume_does_not_read_init_from_again(tmp_path):
    folder = _saved_model(tmp_path / "init")
    corpus = short_documents(tmp_path / "c.jsonl")
    first = Trainer(init_run(folder, f"data.source={corpus}", "model.init_std=0.01"), run_dir=tmp_path / "r")
    first.run_loop(until=4)
    folder.rename(tmp_path / "gone")  # the init folder may be gone at a resume: the run's checkpoint holds all
    run = RunConfig.from_toml(tmp_path / "r" / "config.toml")
    assert run.train.init_from == str(folder) and run.model_config() == first.config
    second = Trainer(run, run_dir=tmp_path / "r", resume=True, progress=False)
    assert second.step == 4 and second.config == first.config and second.config.init_std == 0.01
    assert second.run_loop()["step"] == 8


def test_a_float8_init_folder_is_checked_and_loaded_into_the_float32_model(tmp_path):
    """A float8 folder (an FP8 checkpoint converted) crashed the finiteness check with torch's NotImplementedError
    ("isfinite" not implemented for 'Float8_e4m3fn'); its values start the float32 model, a nan in it is named."""
    from hybridlm.checkpoint.weights import canonical_state_dict
    from hybridlm.model import HybridLM

    model = HybridLM(tiny_run().model_config(257), seed=7).to(torch.float8_e4m3fn)
    folder = hybridlm.save(model, tmp_path / "init")
    corpus = short_documents(tmp_path / "c.jsonl")
    t = Trainer(init_run(folder, f"data.source={corpus}"), run_dir=tmp_path / "r", progress=False)
    want, got = canonical_state_dict(model), canonical_state_dict(t.model)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()) for k in want)
    t.close()
    model.embeddings.weight.data[3, 1] = float("nan")
    hybridlm.save(model, tmp_path / "nan")
    with pytest.raises(
        HybridLMError, match=r"^train\.init_from: .*/nan: not finite \(inf or nan\): embeddings\.weight$"
    ):
        Trainer(init_run(tmp_path / "nan", f"data.source={corpus}"), run_dir=tmp_path / "r2", progress=False)


def test_init_from_is_refused_at_the_resume_of_a_run_that_did_not_start_from_it(tmp_path):
    """Set at a resume of a run started without it, train.init_from loaded no weights and the folder's config (its
    init_std and mtp_loss_scale here) silently replaced the run's own model fields."""
    corpus = short_documents(tmp_path / "c.jsonl")
    first = Trainer(tiny_run("train.device=cpu", f"data.source={corpus}"), run_dir=tmp_path / "r", progress=False)
    first.run_loop(until=4)
    folder = _saved_model(tmp_path / "init", dtype=torch.float32, init_std=0.01, mtp_loss_scale=0.5)
    run = RunConfig.from_toml(tmp_path / "r" / "config.toml").with_overrides([f"train.init_from={folder}"])
    before = (tmp_path / "r" / "config.toml").read_text()
    with pytest.raises(ConfigError, match=r"^train\.init_from: .*/init: .*/r did not start from an init folder"):
        Trainer(run, run_dir=tmp_path / "r", resume=True, progress=False)
    assert (tmp_path / "r" / "config.toml").read_text() == before


@pytest.mark.parametrize(
    ("case", "error"),
    [
        (
            "vocabulary",
            r"^train\.init_from: .*/init: the checkpoint's vocabulary of 100 tokens is smaller than the "
            r"257 of data\.tokenizer 'byte'",
        ),
        (
            "shape",
            r"^train\.init_from: .*/init does not fit the model:\n(.|\n)*embeddings\.weight: .* has \(257, 32\), model "
            r"has \(257, 64\)(.|\n)*\(the model is .*/init's config\.json with the run's model\.hidden_size on top",
        ),
        ("checksum", r"^train\.init_from: .*checksum mismatch"),
        ("nan", r"^train\.init_from: .*/init: not finite \(inf or nan\): embeddings\.weight$"),
    ],
)
def test_an_init_folder_that_cannot_start_the_run_is_refused_before_the_corpus_is_read(
    tmp_path, monkeypatch, case, error
):
    from hybridlm.train import trainer as trainer_module

    def reading(*args, **kwargs):
        raise AssertionError("the corpus was read before the init folder was checked")

    monkeypatch.setattr(trainer_module, "load_corpus", reading)
    if case == "nan":
        from hybridlm.model import HybridLM

        model = HybridLM(tiny_run().model_config(257))
        model.embeddings.weight.data[3, 1] = float("nan")
        folder = hybridlm.save(model, tmp_path / "init")
    else:
        folder = _saved_model(tmp_path / "init", **({"vocab_size": 100} if case == "vocabulary" else {}))
    extra = ["model.hidden_size=64"] if case == "shape" else []
    if case == "checksum":
        file = next(folder.glob("*.safetensors"))
        data = bytearray(file.read_bytes())
        data[-1] ^= 1
        file.write_bytes(bytes(data))
    with pytest.raises(HybridLMError, match=error):
        Trainer(init_run(folder, *extra), run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


# -- blends of sources ---------------------------------------------------------------------------


def _code_corpus(path, letter="x"):
    """A small JSONL corpus unlike pydoc's English (40 documents), ``letter`` in every one (to edit in place)."""
    path.write_text(
        "".join(json.dumps({"text": f"def f{i}({letter}): return {letter} + {i}\n" * 3}) + "\n" for i in range(40))
    )
    return path


def _metrics(run_dir):
    """metrics.jsonl's rows without what depends on the clock or the machine."""
    clock = {"time", "tokens_per_s", "peak_mem_gb", "mfu"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in clock} for r in rows]


def test_a_one_source_list_trains_as_the_plain_source_bitwise(tmp_path):
    """data.source = ["builtin:pydoc"] is data.source = "builtin:pydoc": the same rows, losses, validation (no
    per-source keys) and checkpoint record of the data, so either resumes the other."""
    plain = Trainer(tiny_run("train.steps=4"), run_dir=tmp_path / "a", progress=False)
    listed = Trainer(tiny_run('data.source=["builtin:pydoc"]', "train.steps=4"), run_dir=tmp_path / "b", progress=False)
    assert listed.data_identity == plain.data_identity and listed.describe()[2] == plain.describe()[2]
    # The record of every checkpoint before blends, which a hybridlm of then reads at a resume.
    assert sorted(plain.data_identity) == ["docs", "fingerprint", "source", "tokenizer", "tokens"]
    assert plain.data_identity["source"] == "builtin:pydoc"
    for t in (plain, listed):
        t.run_loop()
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert not any(k.startswith("val_loss/") for r in _metrics(tmp_path / "b") for k in r)


def test_a_blend_trains_on_its_sources_and_logs_each_one_s_validation_loss(tmp_path):
    """Each step's rows come from the sources as the blend places them; val_loss is the mean of the sources' own
    validation losses weighted by the mix, each logged as val_loss/<name>; the header lists the sources."""
    from hybridlm.train.evaluation import evaluate_corpus

    code = _code_corpus(tmp_path / "code.jsonl")
    run = tiny_run(
        f'data.source=["builtin:pydoc", "{code}"]', "data.weights=[0.25, 0.75]", "train.steps=4", "train.device=cpu"
    )
    t = Trainer(run, run_dir=tmp_path / "r", progress=False)
    header = "\n".join(t.describe())
    assert "data    a blend of 2 sources" in header
    assert f"source  pydoc · weight 0.25 · {t.train_sets[0].num_rows:,} train rows" in header
    assert f"source  code · weight 0.75 · {t.train_sets[1].num_rows:,} train rows" in header
    assert re.search(r"code · .* · (\d[\d.e-]*) epochs in the run · " + re.escape(str(code)), header)
    rows = np.concatenate([t.sampler.global_rows(s) for s in range(4)])
    assert (rows >= t.train_sets[0].num_rows).sum() == 12  # 3/4 of 16 rows from code.jsonl
    batch = t.train_rows.rows(t.sampler.local_rows(0))
    first = t.sampler.global_rows(0)
    for i, r in enumerate(first.tolist()):
        d = int(r >= t.train_sets[0].num_rows)
        own = t.train_sets[d].rows(np.array([r - d * t.train_sets[0].num_rows]))
        assert torch.equal(batch["input_ids"][i], own["input_ids"][0])
    t.run_loop()
    logged = [r for r in _metrics(tmp_path / "r") if "val_loss" in r]
    assert [r["step"] for r in logged] == [0, 4]
    for r in logged:
        assert r["val_loss"] == pytest.approx(0.25 * r["val_loss/pydoc"] + 0.75 * r["val_loss/code"], rel=1e-12)
        assert r["val_loss/pydoc"] != r["val_loss/code"]
    for name, val in zip(t.source_names, t.val_sets):
        own = evaluate_corpus(t.model, val, t.local_batch, t.run.train.eval_batches)
        assert logged[-1][f"val_loss/{name}"] == pytest.approx(own.loss, rel=1e-6)


def test_a_blend_resumes_exactly_and_refuses_a_source_edited_in_place(tmp_path, monkeypatch, caplog):
    """A resume replays the uninterrupted run's rows; a source whose data changed under its name is refused, named
    (unless named on purpose); other weights are taken, with a warning."""
    monkeypatch.chdir(tmp_path)
    code = _code_corpus(tmp_path / "code.jsonl")
    blend = ['data.source=["builtin:pydoc", "code.jsonl"]', "data.weights=[0.5, 0.5]", "train.steps=4"]
    Trainer(tiny_run(*blend), run_dir=tmp_path / "a", progress=False).run_loop()
    Trainer(tiny_run(*blend), run_dir=tmp_path / "b", progress=False).run_loop(until=2)
    Trainer(tiny_run(*blend), run_dir=tmp_path / "b", resume=True, progress=False).run_loop()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert [r for r in _metrics(tmp_path / "a") if "val_loss" in r] == [
        r for r in _metrics(tmp_path / "b") if "val_loss" in r
    ]
    longer = [*blend, "train.steps=6"]
    Trainer(tiny_run(*longer), run_dir=tmp_path / "b", progress=False, resume=True).close()
    _code_corpus(code, letter="y")  # as many tokens and documents, other ids
    name = re.escape("""--set data.source='["builtin:pydoc", "code.jsonl"]'""")  # the whole list, to paste
    with pytest.raises(DataError, match=r"data\.source 'code\.jsonl' now holds other token ids .*" + name):
        Trainer(tiny_run(*longer), run_dir=tmp_path / "b", resume=True, progress=False)
    named = Trainer(tiny_run(*longer), run_dir=tmp_path / "b", resume=True, progress=False, data_named=True)
    assert named.step == 4
    named.close()
    _code_corpus(code)
    with caplog.at_level(logging.WARNING, logger="hybridlm.train"):  # the same mix, written otherwise: no warning
        Trainer(tiny_run(*longer, "data.weights=[3, 3]"), run_dir=tmp_path / "b", resume=True, progress=False).close()
    assert "the blend changed at the resume" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="hybridlm.train"):
        Trainer(
            tiny_run(*longer, "data.weights=[0.2, 0.8]"), run_dir=tmp_path / "b", resume=True, progress=False
        ).close()
    assert "the blend changed at the resume" in caplog.text


def test_a_single_source_checkpoint_resumes_as_a_list_and_is_compared_in_a_blend(tmp_path, monkeypatch, caplog):
    """A checkpoint of one source (the record every run wrote before blends) resumes with the source as a list of
    one, and a blend that adds a source compares the recorded one by its name and warns that the blend changed
    (one corpus for another, or the same one listed, is no blend changing: no warning)."""
    monkeypatch.chdir(tmp_path)
    code = _code_corpus(tmp_path / "code.jsonl")
    Trainer(tiny_run("data.source=code.jsonl", "train.steps=2"), run_dir=tmp_path / "r", progress=False).run_loop()
    changed = "the blend changed at the resume"
    with caplog.at_level(logging.WARNING, logger="hybridlm.train"):
        listed = tiny_run('data.source=["code.jsonl"]', "train.steps=3")
        Trainer(listed, run_dir=tmp_path / "r", resume=True, progress=False).close()
        other = tiny_run("data.source=builtin:pydoc", "train.steps=3")
        Trainer(other, run_dir=tmp_path / "r", resume=True, progress=False, data_named=True).close()
        assert changed not in caplog.text
        blend = tiny_run('data.source=["code.jsonl", "builtin:pydoc"]', "train.steps=3")
        Trainer(blend, run_dir=tmp_path / "r", resume=True, progress=False).close()
    assert changed in caplog.text
    _code_corpus(code, letter="y")
    with pytest.raises(DataError, match=r"data\.source 'code\.jsonl' now holds other token ids"):
        Trainer(blend, run_dir=tmp_path / "r", resume=True, progress=False)


def test_a_blend_naming_one_file_twice_through_a_link_is_refused(tmp_path, monkeypatch):
    """data.source's validation sees text only: the trainer refuses the same file reached through another path (a
    symbolic link, an absolute path), naming both, before the corpus is read."""
    monkeypatch.chdir(tmp_path)
    _code_corpus(tmp_path / "code.jsonl")
    (tmp_path / "link.jsonl").symlink_to("code.jsonl")
    for other in ("link.jsonl", str(tmp_path / "code.jsonl")):
        run = tiny_run(f'data.source=["code.jsonl", "builtin:pydoc", "{other}"]')
        with pytest.raises(DataError, match=rf"data\.source: '{re.escape(other)}' \(source 3\) is 'code\.jsonl'"):
            Trainer(run, run_dir=tmp_path / "r", progress=False)
