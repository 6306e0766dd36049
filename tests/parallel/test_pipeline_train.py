"""Pipeline parallelism (gloo, CPU, float32): every layout trains as one process does.

One tiny model exercises everything a stage boundary can break: MoE with a load-balancing loss and
the expert-bias update on a stage before the last, tied embeddings, an MTP depth, packed documents.
The one-process reference uses the same micro-batches (the MoE loss is per micro-batch).
"""

import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.checkpoint.weights import canonical_state_dict, read_config, read_tensors
from hybridlm.cli import main
from hybridlm.errors import ConfigError
from hybridlm.parallel.pipeline import SCHEDULES, build_stage, rank_stages
from hybridlm.train.config import MULTI_STAGE_SCHEDULES, SINGLE_STAGE_SCHEDULES, RunConfig
from hybridlm.train.trainer import Trainer
from tests.helpers import MLA_TINY, ROOT, rel_err, run_failure, short_documents, subprocess_env

BASE = [
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
    "model.moe_aux_loss_coeff=0.01",
    "model.tie_embeddings=true",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.micro_batch_size=2",
    "train.steps=3",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
    "train.device=cpu",  # gloo on the CPU, on a machine with GPUs too
]
P2 = "model.pattern=M[*E]|M-[*-]/[*-]"  # two stages
P4 = "model.pattern=M-|[*E]|M-|[*-]/[*-]"  # four: two virtual stages on each of two ranks
#: Megatron's global balancing, strong enough to show: micro-batch m balances with micro-batches 1..m's counts.
GLOBAL = ("model.moe_aux_loss_type=global_aux_loss", "model.moe_aux_loss_coeff=0.5")
FLOAT8 = "train.float8=tensorwise"
FLOAT8_RUNS = importlib.util.find_spec("torchao") is not None  # (a dev install has it)


def torchrun(nproc: int, jobs: list[dict], tmp: Path) -> None:
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = subprocess_env()
    script = ROOT / "tests/distributed/pipeline_train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    r = subprocess.run(
        [*cmd, str(script), str(tmp / "jobs.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, run_failure(r)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def one_process(run_dir: Path, *sets: str) -> Path:
    Trainer(RunConfig().with_overrides([*BASE, *sets]), run_dir=run_dir, progress=False).run_loop()
    return run_dir


def assert_same_run(run: Path, ref: Path, tol: float = 1e-5) -> None:
    a, b = metrics(run), metrics(ref)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in b:
        depths = sorted(k for k in b[step] if k.startswith("mtp_loss_"))  # each MTP depth's, logged as one process does
        assert depths == sorted(k for k in a[step] if k.startswith("mtp_loss_")), (run.name, step)
        for key in ("loss", "lm_loss", "grad_norm", *depths):
            assert abs(a[step][key] - b[step][key]) <= tol * abs(b[step][key]), (run.name, step, key, a[step], b[step])
        # Routed tokens counted on the stage that owns the layer, whichever rank writes the row.
        assert ("moe_load_imbalance" in a[step]) == ("moe_load_imbalance" in b[step]), (run.name, step)
        if "moe_load_imbalance" in b[step]:
            assert a[step]["moe_load_imbalance"] == pytest.approx(b[step]["moe_load_imbalance"], rel=2e-2), (
                run.name,
                step,
            )
    wa, wb = read_tensors(run / "model"), read_tensors(ref / "model")
    assert wa.keys() == wb.keys()
    for k in wb:
        assert rel_err(wa[k], wb[k]) <= tol, (run.name, k, rel_err(wa[k], wb[k]))
    assert_same_val_loss(run, ref, tol)


def val_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def assert_same_val_loss(run: Path, ref: Path, tol: float = 1e-5) -> None:
    """Guards against the stages before the last counting evaluation tokens too (val_loss divided by pp)."""
    a, b = val_losses(run), val_losses(ref)
    assert a.keys() == b.keys() and 3 in b, (run.name, a, b)
    for step in b:
        assert abs(a[step] - b[step]) <= tol * abs(b[step]), (run.name, step, a[step], b[step])


def stage_params(pattern: str, pp: int) -> list[int]:
    """Parameters each pipeline rank's stages hold (whole, before sharding over dp)."""
    config = RunConfig().with_overrides([*BASE, pattern]).model_config(257)
    counts = []
    for r in range(pp):
        stages = rank_stages(config, r, pp)
        vps = [s.vp_stage for s in stages]
        counts.append(
            sum(sum(p.numel() for p in build_stage(config, r, pp, v, device="meta").parameters()) for v in vps)
        )
    return counts


@pytest.mark.multiprocess
def test_pipeline_layouts_and_resume_follow_one_process(tmp_path):
    """gpipe, 1f1b (2 stages) and interleaved-1f1b (2 ranks x 2 virtual stages) on 2 processes, and a run
    that starts with pp=2, continues in one process and ends data-parallel on two."""
    par = "parallel.pp=2"
    jobs = [
        {"set": [*BASE, P2, par, "parallel.schedule=gpipe"], "run_dir": str(tmp_path / "gpipe")},
        {"set": [*BASE, P2, par, "parallel.schedule=1f1b"], "run_dir": str(tmp_path / "1f1b")},
        {"set": [*BASE, P4, par, "parallel.schedule=interleaved-1f1b"], "run_dir": str(tmp_path / "interleaved")},
        {"set": [*BASE, P2, par], "run_dir": str(tmp_path / "moved"), "until": 1},
        # the step's running expert counts (global_aux_loss), each recomputation taking its forward's under 1f1b
        {"set": [*BASE, P2, par, *GLOBAL, "train.activation_checkpointing=true"], "run_dir": str(tmp_path / "global")},
    ]
    if FLOAT8_RUNS:  # float8 linear layers, converted on each rank's meta-built stages; and under FSDP on two ranks
        jobs.append({"set": [*BASE, P2, par, FLOAT8], "run_dir": str(tmp_path / "float8-pp")})
        jobs.append({"set": [*BASE, P2, FLOAT8], "run_dir": str(tmp_path / "float8-dp")})
    torchrun(2, jobs, tmp_path)
    ref2, ref4 = one_process(tmp_path / "ref2", P2), one_process(tmp_path / "ref4", P4)
    for name in ("gpipe", "1f1b"):
        assert_same_run(tmp_path / name, ref2)
    assert_same_run(tmp_path / "interleaved", ref4)
    assert_same_run(tmp_path / "global", one_process(tmp_path / "ref-global", P2, *GLOBAL))
    assert abs(metrics(tmp_path / "global")[1]["loss"] - metrics(ref2)[1]["loss"]) > 1e-6  # the running count matters
    if FLOAT8_RUNS:
        ref8 = one_process(tmp_path / "ref-float8", P2, FLOAT8)
        assert_same_run(tmp_path / "float8-pp", ref8)
        # FSDP sums gradients in another order, and float8 rounding moves a value near a rounding boundary by a
        # float8 step (1/16 of it): 5e-5 measured in one weight after 3 steps (its losses within 1e-5).
        assert_same_run(tmp_path / "float8-dp", ref8, tol=2e-4)
        assert abs(metrics(ref8)[1]["loss"] - metrics(ref2)[1]["loss"]) > 1e-6  # float8 ran

    # Each rank holds only its stages' parameters.
    for name, pattern in (("1f1b", P2), ("interleaved", P4)):
        held = json.loads((tmp_path / name / "params.json").read_text())
        assert held == stage_params(pattern, 2), name
    assert sum(stage_params(P2, 2)) < 2 * sum(stage_params(P2, 1))

    # pp=2 (step 1) -> one process, without brackets (step 2) -> dp=2 with two micro-batches per
    # process, gradients reduced after the second (step 3): the losses of the uninterrupted run.
    unfused = P2.replace("[", "").replace("]", "")
    moved = Trainer(
        RunConfig().with_overrides([*BASE, unfused]), run_dir=tmp_path / "moved", resume=True, progress=False
    )
    assert moved.step == 1
    moved.run_loop(until=2)
    torchrun(2, [{"set": [*BASE, P2], "run_dir": str(tmp_path / "moved"), "resume": True}], tmp_path)
    assert_same_run(tmp_path / "moved", ref2)


@pytest.mark.multiprocess
def test_virtual_stages_run_micro_batch_counts_that_are_no_multiple_of_pp(tmp_path):
    """3 micro-batches over pp 2 with virtual stages: torch's interleaved 1F1B runs them as 1 round of 3,
    looped BFS any count, but the run file asked for a multiple of pp."""
    six = ["train.batch_size=6", "train.micro_batch_size=2", "parallel.pp=2", "parallel.microbatches=3"]
    jobs = [
        {"set": [*BASE, P4, *six, f"parallel.schedule={s}"], "run_dir": str(tmp_path / s)}
        for s in ("interleaved-1f1b", "looped-bfs")
    ]
    torchrun(2, jobs, tmp_path)
    ref = one_process(tmp_path / "ref", P4, "train.batch_size=6", "train.micro_batch_size=2")
    for s in ("interleaved-1f1b", "looped-bfs"):
        assert_same_run(tmp_path / s, ref)


@pytest.mark.multiprocess
def test_data_and_pipeline_parallel_follow_one_process(tmp_path):
    """dp=2 x pp=2 on 4 processes: FSDP2 shards each stage over its two data-parallel ranks."""
    sets = [*BASE, P2, "parallel.pp=2", "parallel.microbatches=2"]
    torchrun(4, [{"set": sets, "run_dir": str(tmp_path / "dp2pp2")}], tmp_path)
    assert_same_run(tmp_path / "dp2pp2", one_process(tmp_path / "ref", P2))
    held = json.loads((tmp_path / "dp2pp2" / "params.json").read_text())  # rank = dp * pp + pp_rank
    whole = stage_params(P2, 2)
    assert [held[0] + held[2], held[1] + held[3]] == whole
    assert all(h < w for h, w in zip(held, whole + whole))


@pytest.mark.multiprocess
def test_init_from_loads_into_pipeline_stages_and_fsdp_shards(tmp_path):
    """train.init_from on 4 processes: dp=2 x pp=2 (each stage's FSDP shards) and dp=4 (FSDP over the whole model)
    start from the folder's weights, and train as one process started from it does."""
    init = f"train.init_from={one_process(tmp_path / 'src', P2) / 'model'}"  # trained weights: no initialization's
    jobs = [
        {"set": [*BASE, init, "parallel.pp=2", "parallel.microbatches=2"], "run_dir": str(tmp_path / "dp2pp2")},
        {"set": [*BASE, init, "model.pattern=M[*E]M-[*-]/[*-]"], "run_dir": str(tmp_path / "dp4")},
    ]
    torchrun(4, jobs, tmp_path)
    ref = one_process(tmp_path / "ref", init)
    for name in ("dp2pp2", "dp4"):
        assert_same_run(tmp_path / name, ref)


@pytest.mark.multiprocess
@pytest.mark.parametrize("trainable", ['["layers.[3-6].*", "mtp.*"]', "layers.[0-2].*"])
def test_pipeline_stages_train_only_what_train_trainable_names(tmp_path, trainable):
    """train.trainable over two stages: the second stage and the MTP depth alone (the first stage, tied embedding
    included, frozen: its backward has nothing to train), or the first stage alone (the last stage's backward passes
    its gradient on, training nothing of its own). As one process does; the frozen tensors as initialized."""
    sets = [P2, f"train.trainable={trainable}", "parallel.pp=2"]
    torchrun(2, [{"set": [*BASE, *sets], "run_dir": str(tmp_path / "pp2")}], tmp_path)
    ref = one_process(tmp_path / "ref", P2, f"train.trainable={trainable}")
    assert_same_run(tmp_path / "pp2", ref)
    got = read_tensors(tmp_path / "pp2" / "model")
    init = canonical_state_dict(HybridLM(read_config(tmp_path / "ref" / "model"), seed=0))  # (train.seed's default)
    trained = {k for k in got if re.match(r"(layers\.[3-6]|mtp)\." if "mtp" in trainable else r"layers\.[0-2]\.", k)}
    frozen = [k for k in got if k not in trained and not k.endswith("e_score_correction_bias")]  # (a buffer: routing)
    assert trained and frozen and [k for k in frozen if not torch.equal(got[k], init[k])] == []
    assert not any(torch.equal(got[k], init[k]) for k in trained if k.endswith("weight") and got[k].dim() > 1)


@pytest.mark.multiprocess
def test_pipeline_stages_that_train_nothing_are_refused_by_name(tmp_path):
    """DSA's indexers alone without their loss: no stage's backward reaches a trained parameter, which the first step
    says (one process: the loss's "does not require grad"; stages: each ran its backward)."""
    mla = [f"model.{k}={v}" for k, v in MLA_TINY.items()]
    sets = ["model.pattern=D-|D-", *mla, "train.trainable=*.indexer.*", "parallel.pp=2"]
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hybridlm.cli"]
    cmd += ["train", *(x for item in [*BASE, *sets] for x in ("--set", item)), "--no-progress"]
    r = subprocess.run([*cmd, "--run-dir", str(tmp_path / "pp")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "train.trainable: '*.indexer.*': the loss reaches none of the parameters it trains" in r.stderr + r.stdout


# Two MTP depths weighing as much as the main head; no MoE, whose balancing loss is per micro-batch.
MTP = ["model.pattern=M-*-|M-*-/*-/*-", "model.mtp_loss_scale=1"]


@pytest.mark.multiprocess
def test_mtp_losses_do_not_depend_on_the_micro_batches(tmp_path):
    """On short documents (MTP labels masked often, unevenly over rows) 1f1b with 2 micro-batches, gpipe with 8
    and two data-parallel ranks with 4 micro-batches each take the step one process takes on the whole batch:
    each head's loss is weighted by the micro-batch's share of that head's labels over all ranks (the MTP
    depths were weighted by the main head's share)."""
    sets = [*BASE, *MTP, f"data.source={short_documents(tmp_path / 'c.jsonl')}"]
    pp = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2", "train.micro_batch_size=4"]
    gpipe = ["parallel.pp=2", "parallel.schedule=gpipe", "parallel.microbatches=8", "train.micro_batch_size=1"]
    jobs = [
        {"set": [*sets, *pp], "run_dir": str(tmp_path / "1f1b")},
        {"set": [*sets, *gpipe], "run_dir": str(tmp_path / "gpipe")},
        {"set": [*sets, "train.micro_batch_size=1"], "run_dir": str(tmp_path / "dp2")},  # pp 1: FSDP over 2
    ]
    torchrun(2, jobs, tmp_path)
    ref = one_process(tmp_path / "ref", *sets[len(BASE) :], "train.micro_batch_size=8")
    for name in ("1f1b", "gpipe", "dp2"):
        assert_same_run(tmp_path / name, ref)


CLI = [
    "--set",
    "model.hidden_size=64",
    "--set",
    "model.num_attention_heads=2",
    "--set",
    "model.ffn_hidden_size=128",
    "--set",
    "data.seq_len=64",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.steps=4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.device=cpu",
    "--no-progress",
]


@pytest.mark.multiprocess
def test_the_export_gathers_one_tensor_at_a_time(tmp_path):
    """gather_canonical pickled each stage whole through gather_object: rank 0 held a stage three times over plus a
    world size x stage buffer (a 1.5 GB model over pp=2: 5.5 GB peak on rank 0, 2.7 GB on rank 1; now 1.8 and 1.1).
    Now no tensor goes through an object collective, and rank 0 still gets the whole model, tied copy once
    (dp 2 x pp 2: FSDP gathers each tensor of a stage, its first rank sends it)."""
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    script, out = ROOT / "tests/distributed/gather_canonical.py", tmp_path / "out.json"
    r = subprocess.run(
        [*cmd, str(script), str(out), "2", "M*|-*/-"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, run_failure(r)
    assert json.loads(out.read_text()) == {"same": True, "tensors_pickled": [0] * 4}


@pytest.mark.multiprocess
def test_torchrun_cli_pipeline_logs_the_losses_of_one_process(tmp_path):
    pattern = ["--set", "model.pattern=M-[*-]|M-M-[*-]"]
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "hybridlm.cli", "train", *pattern, "--set", "parallel.pp=2", *CLI, "--run-dir", str(tmp_path / "pp")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, run_failure(r)
    assert "pp 2" in r.stdout
    assert main(["train", *pattern, *CLI, "--run-dir", str(tmp_path / "one")]) == 0
    pp, one = metrics(tmp_path / "pp"), metrics(tmp_path / "one")
    assert pp.keys() == one.keys() == {1, 2, 3, 4}
    for step in one:
        assert abs(pp[step]["loss"] - one[step]["loss"]) <= 1e-5 * one[step]["loss"], (step, pp[step], one[step])


# -- without processes ----------------------------------------------------------------------------


def test_schedule_names_match_the_run_file_contract():
    assert set(SCHEDULES) == set(SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES)
    assert {"gpipe", "1f1b", "interleaved-1f1b"} <= set(SCHEDULES)


def test_rank_stages_follow_megatron_order():
    config = RunConfig().with_overrides([*BASE, "model.pattern=M-|[*E]|M-|[*-]"]).model_config(257)
    assert [s.segment for s in rank_stages(config, 0, 2)] == [0, 2]
    assert [s.segment for s in rank_stages(config, 1, 2)] == [1, 3]
    assert [s.segment for s in rank_stages(config, 1, 4)] == [1]
    legacy = RunConfig().with_overrides([*BASE, "model.pattern=M-[*E]M"]).model_config(257)
    assert [(s.block_offset, s.num_blocks) for r in (0, 1) for s in rank_stages(legacy, r, 2)] == [(0, 2), (2, 2)]


def test_the_legacy_split_warns_once_per_rank_not_at_every_check(caplog):
    """The run file's check, the trainer's and the build each logged both warnings: 36 lines at pp=4."""
    from hybridlm.parallel.pipeline import build_pipeline_model
    from hybridlm.train.pipeline import check_every_rank_holds_layers

    run = RunConfig().with_overrides([*BASE, "model.pattern=M-[*E]M", "parallel.pp=2"])
    with caplog.at_level(logging.WARNING, logger="hybridlm.pattern"):
        config = run.model_config(257)
        run.validate()
        check_every_rank_holds_layers(config, 2)
        build_pipeline_model(config, 1, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("DEPRECATION" in m for m in messages) == 1
    assert sum("counts a fused block as one" in m for m in messages) == 1


@pytest.mark.parametrize(
    "sets, field",
    [
        (["parallel.pp=0"], "parallel.pp"),
        (["parallel.schedule=zigzag"], "parallel.schedule"),
        (["parallel.microbatches=0"], "parallel.microbatches"),
        (["model.pattern=M-|M-|M-", "parallel.pp=2"], "parallel.pp"),  # 3 segments over 2 ranks
        (["model.pattern=M-M", "parallel.pp=2"], "parallel.pp"),  # legacy split: 3 blocks over 2 ranks
        (["model.pattern=M-|M-|M-|M-", "parallel.pp=2", "parallel.schedule=1f1b"], "parallel.schedule"),
        (["model.pattern=M-|M-|M-|M-", "parallel.pp=2", "parallel.microbatches=5"], "parallel.microbatches"),
        (["model.pattern=M-||M-", "parallel.pp=3"], "model.pattern"),  # rank 1 would hold nothing to save
    ],
)
def test_bad_parallel_settings_name_the_field(sets, field):
    with pytest.raises(ConfigError) as e:
        RunConfig().with_overrides(sets)
    assert e.value.field == field


def test_bad_parallel_settings_exit_2(capsys):
    assert main(["train", "--set", "parallel.schedule=zigzag"]) == 2
    assert "parallel.schedule" in capsys.readouterr().err


def test_default_schedule_interleaves_virtual_stages():
    run = RunConfig().with_overrides(["model.pattern=M-|M-|M-|M-", "parallel.pp=2"])
    assert run.resolved_schedule() == "interleaved-1f1b" and run.parallel.resolved_microbatches() == 4
    assert RunConfig().with_overrides(["model.pattern=M-|M-", "parallel.pp=2"]).resolved_schedule() == "1f1b"


def test_pp_needs_as_many_processes(tmp_path):
    """The checks that need the world size name their field too (one process cannot run pp=2)."""
    run = RunConfig().with_overrides(["model.pattern=M-|M-", "parallel.pp=2"])
    with pytest.raises(ConfigError) as e:
        Trainer(run, run_dir=tmp_path, progress=False)
    assert e.value.field == "parallel.pp" and "--set parallel.pp=1" in str(e.value)  # e.g. to resume in one process


def test_preset_replaces_the_default_model_and_keeps_its_vocabulary():
    run = RunConfig().with_overrides(["model.preset=bench-1.3b"])
    assert run.model == {"preset": "bench-1.3b"}
    config = run.model_config(257)  # the byte tokenizer needs fewer ids than the preset has
    assert config.vocab_size == 131072 and config.num_attention_heads == 16
    # Other model fields still apply on top of the preset, whatever their order on the command line.
    run = RunConfig().with_overrides(["model.hidden_size=128", "model.preset=tiny"])
    assert run.model_config(257).hidden_size == 128 and run.model_config(257).pattern == "M-[*-]G-[ME]M*E/[*-]"
    # Without a preset the tokenizer's vocabulary is the default.
    assert RunConfig().model_config(300).vocab_size == 300


def test_a_later_stage_marks_its_received_activations_as_needing_gradients():
    """torch <= 2.11 leaves a stage's receive buffers without requires_grad when the schedule first
    ran an evaluation (seen on two H200s: "[1] for chunk 0 has gradients None"); the stage marks
    them itself, so the backward has a gradient to send to the previous stage."""
    import torch

    from hybridlm import ModelConfig
    from hybridlm.parallel.pipeline import build_pipeline_model

    config = ModelConfig.preset("tiny").replace(pattern="M-*-|M-M-", vocab_size=64)
    _, (stage,) = build_pipeline_model(config, 1, 2)
    stage.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in stage.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 + (1.0 if p.dim() == 1 else 0.0))
    B, L = 2, 16
    x = torch.randn(B, L, config.hidden_size, generator=gen)  # a receive buffer made without requires_grad
    ids = torch.randint(0, 64, (B, L), generator=gen)
    loss, _ = stage(x, input_ids=ids, labels=ids, doc_ids=torch.zeros(B, L, dtype=torch.long), weight=torch.ones(B, 1))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation leaves the buffer alone
        y = x.detach()
        stage(y, input_ids=ids, labels=ids, doc_ids=torch.zeros(B, L, dtype=torch.long), weight=torch.ones(B, 1))
    assert not y.requires_grad


def test_a_micro_batch_size_hint_names_only_a_count_the_schedule_runs():
    """The trainer suggested parallel.microbatches=1 for 1f1b at pp=2, which the run file then refused."""
    from hybridlm.train.trainer import microbatches_for

    def run(schedule):
        return RunConfig().with_overrides(
            [*BASE, "model.pattern=M-|M-", "parallel.pp=2", f"parallel.schedule={schedule}"]
        )

    assert microbatches_for(run("1f1b"), 8, 8) is None  # 1 micro-batch: 1f1b needs pp
    assert microbatches_for(run("1f1b"), 8, 4) == 2
    assert microbatches_for(run("gpipe"), 8, 8) == 1
    assert microbatches_for(run("gpipe"), 8, 3) is None  # 3 rows do not split 8
    looped = RunConfig().with_overrides([*BASE, "model.pattern=M|-|M|-", "parallel.pp=2"])
    assert microbatches_for(looped, 10, 2) is None  # interleaved-1f1b: 5 do not make 5 // pp = 2 equal rounds
    assert microbatches_for(looped, 6, 2) == 3  # 1 round of 3 (torch runs them; a multiple of pp was asked for)
    assert microbatches_for(looped, 8, 2) == 4


def test_a_later_stage_keeps_a_float32_residual_under_bf16_autocast_as_one_process_does():
    """With one data-parallel rank the trainer sets residual_dtype: the bf16 a stage receives is its residual
    stream's start, which one process keeps in float32 (the embedding's output); left bf16, every block of the
    stage added its output in bf16."""
    import torch

    from hybridlm import ModelConfig
    from hybridlm.parallel.pipeline import build_pipeline_model

    config = ModelConfig.preset("tiny").replace(pattern="M-|M-*-", vocab_size=64)
    _, (stage,) = build_pipeline_model(config, 1, 2)
    stage.to_empty(device="cpu")
    stage.init_weights(0)
    seen = []
    for block in stage.blocks.values():
        block.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    B, L = 1, 16
    ids = torch.zeros(B, L, dtype=torch.long)
    x = torch.randn(B, L, config.hidden_size).to(torch.bfloat16)  # what stage 0 sends under bf16 autocast
    for residual, want in ((None, torch.bfloat16), (torch.float32, torch.float32)):
        stage.residual_dtype, seen[:] = residual, []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            stage(x, input_ids=ids, labels=ids, doc_ids=ids, weight=torch.ones(B, 1))
        assert seen == [want] * len(stage.blocks)


def test_a_stage_after_the_first_refuses_token_ids_alone():
    """The last stage keeps an embedding for a tied head or MTP depths; given token ids alone it embedded them and
    ran its own blocks: the loss of a model without the first stage's, without a word."""
    import torch

    from hybridlm import ModelConfig

    config = ModelConfig.preset("tiny").replace(pattern="M-|M-/*-", vocab_size=64)
    ids = torch.randint(0, 64, (1, 8))
    for tied in (True, False):
        last = build_stage(config.replace(tie_embeddings=tied), 1, 2)
        with pytest.raises(ValueError, match="needs hidden_states on a pipeline stage after the first"):
            last(ids, ids)
        h = torch.randn(1, 8, config.hidden_size)
        assert torch.isfinite(last(ids, ids, hidden_states=h).loss)  # with them, the ids feed the MTP depth
    first = build_stage(config, 0, 2)
    assert first(ids).hidden_states.shape == (1, 8, config.hidden_size)


@pytest.mark.parametrize(
    ("sets", "hint"),
    [
        (["train.batch_size=2"], "--set parallel.microbatches=2, or a train.batch_size that is a multiple of 4"),
        (["train.batch_size=6", "parallel.microbatches=4"], "microbatches=2 or 3 or 6, or a train.batch_size that"),
    ],
)
def test_micro_batches_that_do_not_split_the_rows_name_the_counts_that_do(tmp_path, monkeypatch, sets, hint):
    """The error named the problem only; the micro_batch_size mismatch beside it already said what to set."""
    import hybridlm.train.trainer as trainer

    monkeypatch.setattr(trainer, "_dist", lambda device: (0, 2))  # pipeline rank 0 of 2 (the check needs no peer)
    monkeypatch.setattr(trainer.dist, "broadcast_object_list", lambda box, src: None)  # rank 0's run folder
    run = RunConfig().with_overrides(["model.pattern=M-|M-", "parallel.pp=2", "train.device=cpu", *sets])
    with pytest.raises(ConfigError, match="micro-batches do not split") as e:
        Trainer(run, run_dir=tmp_path / "run", progress=False)
    assert e.value.field == "parallel.microbatches" and hint in str(e.value)


# Layouts beyond the default suite's (slow: several torchrun jobs each; `pytest -m slow` runs them).
P2_ALIKE = "model.pattern=M-[*E]|M-[*-]/[*-]"
P4_ALIKE = "model.pattern=M-|[*E]|M-|[*-]/[*-]"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_empty_end_segments_and_empty_virtual_stage_follow_one_process(tmp_path):
    """A first stage holding only the embedding, a last one holding only norm/head/MTP, and an
    empty *virtual* stage (rank 1's segment 1 in 'M-||...') are accepted by the checks; they must
    also train as one process does."""
    jobs = [
        {"set": [*BASE, "model.pattern=|M-[*E]M-[*-]/[*-]", "parallel.pp=2"], "run_dir": str(tmp_path / "first")},
        {"set": [*BASE, "model.pattern=M-[*E]M-[*-]|/[*-]", "parallel.pp=2"], "run_dir": str(tmp_path / "last")},
        {"set": [*BASE, "model.pattern=M-||[*E]M-|[*-]/[*-]", "parallel.pp=2"], "run_dir": str(tmp_path / "vempty")},
        {"set": [*BASE, P4_ALIKE, "parallel.pp=2", "parallel.schedule=looped-bfs"], "run_dir": str(tmp_path / "bfs")},
    ]
    torchrun(2, jobs, tmp_path)
    ref = one_process(tmp_path / "ref", P2_ALIKE)
    for name in ("first", "last", "vempty", "bfs"):
        assert_same_run(tmp_path / name, ref)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("pp, pattern", [(3, "model.pattern=M-|[*E]M-|[*-]/[*-]"), (4, P4_ALIKE)])
def test_three_and_four_stages_follow_one_process(tmp_path, pp, pattern):
    """Middle ranks are in no tied-embedding group and hold neither embedding nor head."""
    sets = [*BASE, pattern, f"parallel.pp={pp}", "parallel.microbatches=4"]
    torchrun(pp, [{"set": sets, "run_dir": str(tmp_path / "run")}], tmp_path)
    assert_same_run(tmp_path / "run", one_process(tmp_path / "ref", P2_ALIKE))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_pp2_then_dp2_pp2_interleaved_then_dp2(tmp_path):
    """The suite resumes pp 2 -> one process -> dp 2; never into or out of FSDP-sharded stages."""
    run = str(tmp_path / "moved")
    torchrun(2, [{"set": [*BASE, P2_ALIKE, "parallel.pp=2"], "run_dir": run, "until": 1}], tmp_path)
    sets = [*BASE, P4_ALIKE, "parallel.pp=2", "parallel.microbatches=2"]
    torchrun(4, [{"set": sets, "run_dir": run, "until": 2, "resume": True}], tmp_path)
    torchrun(2, [{"set": [*BASE, P2_ALIKE], "run_dir": run, "resume": True}], tmp_path)
    assert_same_run(tmp_path / "moved", one_process(tmp_path / "ref", P2_ALIKE))


def test_a_pipeline_evaluation_that_raises_leaves_every_stage_module_in_training_mode():
    """``PipelineRunner.evaluate`` put its stages back in training mode only when the schedule returned: one that
    raised (Ctrl-C, a peer's failure) left them in eval mode, and a caller that went on trained in it. The Trainer
    restores its rank model, which leaves out the stage modules' own roots; a direct caller restored nothing."""
    import torch

    from hybridlm import ModelConfig
    from hybridlm.parallel.pipeline import build_pipeline_model
    from hybridlm.train.pipeline import PipelineRunner

    runner = object.__new__(PipelineRunner)  # evaluate's parts only: no process group
    runner.config = ModelConfig.preset("tiny").replace(pattern="M-|E|*-|M-/*-", vocab_size=64)
    runner.model, runner.stages = build_pipeline_model(runner.config, 1, 2)  # virtual stages 1 and 3 (the MTP depth)
    assert len(runner.stages) == 2 and len(runner.stages[1].mtp) == 1

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    runner._run = interrupted
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate({"input_ids": ids, "labels": ids, "doc_ids": ids})
    assert [n for m in runner.stages for n, x in m.named_modules() if not x.training] == []
