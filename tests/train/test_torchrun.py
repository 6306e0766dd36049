"""`hybridlm train` under torchrun: data parallel with FSDP2 (gloo, CPU) follows the one-process run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.checkpoint.weights import canonical_state_dict, read_config, read_tensors
from hybridlm.cli import main
from tests.helpers import run_failure, subprocess_env

RUN = [
    "--set",
    "train.device=cpu",  # gloo on the CPU, on a machine with GPUs too
    "--set",
    "model.pattern=M-[*E]",
    "--set",
    "model.hidden_size=64",
    "--set",
    "model.num_attention_heads=2",
    "--set",
    "model.moe_num_experts=4",
    "--set",
    "model.moe_router_score=sigmoid",
    "--set",
    "model.moe_router_expert_bias=true",
    "--set",
    "model.ffn_hidden_size=128",
    "--set",
    "data.seq_len=64",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.steps=6",
    "--set",
    "train.log_every=3",
    "--set",
    "train.eval_every=6",
    "--set",
    "train.checkpoint_every=3",
    "--no-progress",
]


def step_values(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def step_losses(run_dir: Path) -> dict[int, float]:
    return step_values(run_dir, "loss")


def train_two(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    """``hybridlm train ARGS --run-dir RUN_DIR`` as two processes under torchrun; asserted to succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hybridlm.cli"]
    r = subprocess.run(
        [*cmd, "train", *args, "--run-dir", str(run_dir)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, run_failure(r)
    return r


@pytest.mark.multiprocess
def test_two_processes_follow_one(tmp_path):
    env = subprocess_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hybridlm.cli",
        "train",
        *RUN,
        *("--set", "train.micro_batch_size=8"),  # more than each process's 4 rows: noted, not refused
        "--run-dir",
        str(tmp_path / "two"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, run_failure(r)
    assert "train.micro_batch_size 8 is more than the 4 rows each of the 2 data-parallel processes" in r.stdout
    assert main(["train", *RUN, "--run-dir", str(tmp_path / "one")]) == 0
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert two.keys() == one.keys() == set(range(1, 7))
    for step in one:
        assert abs(two[step] - one[step]) <= 2e-4 * one[step], (step, two[step], one[step])
    # The routed tokens are counted over both processes' rows: the one-process step's load imbalance.
    load_two, load_one = (step_values(tmp_path / d, "moe_load_imbalance") for d in ("two", "one"))
    assert load_two.keys() == load_one.keys() == set(range(1, 7)) and load_two[1] == load_one[1] > 1.0
    for step in load_one:  # later steps' weights differ at ~1e-6: a near-tied token may route otherwise
        assert load_two[step] == pytest.approx(load_one[step], rel=2e-2), (step, load_two[step], load_one[step])
    # The two-process run's checkpoint resumes in one process.
    assert main(["train", "--resume", str(tmp_path / "two"), "--set", "train.steps=8", "--no-progress"]) == 0
    assert max(step_losses(tmp_path / "two")) == 8


@pytest.mark.multiprocess
def test_two_processes_evaluate_rows_that_do_not_split_evenly(tmp_path):
    """71 validation rows, one per forward: one rank runs 36 forwards, the other 35 and one of padding
    (every FSDP forward is collective: unequal counts hung). The loss is the one-process loss."""
    run = [
        *("--set", "train.device=cpu", "--set", "data.seq_len=250", "--set", "train.micro_batch_size=1"),
        *("--set", "train.steps=1", "--set", "model.hidden_size=32", "--set", "model.num_attention_heads=2"),
        *("--set", "model.ffn_hidden_size=64", "--set", "model.mamba_head_dim=16", "--set", "model.mamba_state_dim=16"),
        "--no-progress",
    ]
    train_two(run, tmp_path / "two")
    assert main(["train", *run, "--run-dir", str(tmp_path / "one")]) == 0

    def val_losses(run_dir: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}

    two, one = val_losses(tmp_path / "two"), val_losses(tmp_path / "one")
    assert two.keys() == one.keys() == {0, 1}
    assert two[0] == pytest.approx(one[0], rel=1e-6) and two[1] == pytest.approx(one[1], rel=2e-4)


@pytest.mark.multiprocess
def test_bf16_data_parallel_keeps_the_float32_parameters(tmp_path):
    """FSDP gathers parameters in bf16 but leaves the ones the model keeps in float32 (A_log, D, dt_bias, the
    router) whole on every rank: float32 in the forward (they were gathered in bf16), their gradients summed
    over the ranks, the gradient norm counting each copy once; the checkpoint resumes in one process."""
    root = Path(__file__).resolve().parents[2]
    script = root / "tests/distributed/fsdp_fp32_parameters.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    out, run_dir = tmp_path / "out.json", tmp_path / "run"
    r = subprocess.run(
        [*cmd, str(out), str(run_dir)], env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, run_failure(r)
    got = json.loads(out.read_text())
    names = {"blocks.0.layers.0.mixer." + n for n in ("A_log", "D", "dt_bias")} | {
        "blocks.2.layers.1.mixer.gate.weight"
    }
    assert got["dtypes"] == dict.fromkeys(names, "torch.float32")
    assert got["equal_copies"] == dict.fromkeys(names, True)  # each rank saw other rows: only the sum keeps them equal
    norm, full, twice = got["norm"]
    assert abs(norm - full) <= 1e-6 * full and abs(twice - full) > 3e-6 * full, got["norm"]  # seen: 1.2e-7, 6.2e-6
    resume = ["--set", "train.steps=6", "--set", "train.device=cpu", "--no-progress"]
    assert main(["train", "--resume", str(run_dir), *resume]) == 0
    assert max(step_losses(run_dir)) == 6


@pytest.mark.multiprocess
def test_two_processes_train_a_blend_as_one(tmp_path):
    """Each data-parallel rank takes its slice of the blend's rows (as of a single corpus), and each source's
    validation loss is summed over both ranks: the one-process run's losses, val_loss/<name> included."""
    (tmp_path / "code.jsonl").write_text(
        "".join(json.dumps({"text": f"def f{i}(x): return x + {i}\n" * 6}) + "\n" for i in range(40))
    )
    blend = [
        *("--set", f'data.source=["builtin:pydoc", "{tmp_path / "code.jsonl"}"]', "--set", "data.weights=[0.4, 0.6]"),
        *("--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=2"),
    ]
    train_two([*RUN, *blend], tmp_path / "two")
    assert main(["train", *RUN, *blend, "--run-dir", str(tmp_path / "one")]) == 0
    for key in ("loss", "val_loss", "val_loss/pydoc", "val_loss/code"):
        two, one = step_values(tmp_path / "two", key), step_values(tmp_path / "one", key)
        assert two.keys() == one.keys() and len(one) >= 1, key
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=2e-4), (key, step)


@pytest.mark.multiprocess
def test_two_processes_balance_experts_over_both_ranks_with_the_global_loss(tmp_path):
    """moe_aux_loss_type = "global_aux_loss" under torchrun: the trainer gives the routers the sum of both ranks'
    routed-token counts, so two processes of 4 rows log the balancing loss of one process's 8 rows to 1e-6 (the
    local "aux_loss" of 4 rows each differs by 2e-4 here: the reducer's absence would fail this)."""
    run = [*RUN, "--set", "model.moe_aux_loss_coeff=0.1", "--set", "model.init_std=0.3", "--set", "train.steps=1"]
    run += ["--set", "train.eval_every=1", "--set", "model.moe_aux_loss_type=global_aux_loss"]
    train_two(run, tmp_path / "two")
    assert main(["train", *run, "--run-dir", str(tmp_path / "one")]) == 0
    (two,), (one,) = (step_values(tmp_path / d, "aux_loss").values() for d in ("two", "one"))
    assert one > 0.1 and abs(two - one) <= 1e-6 * one, (two, one)


@pytest.mark.multiprocess
def test_two_processes_train_only_what_train_trainable_names(tmp_path):
    """FSDP shards frozen parameters as it shards the rest (train.trainable): the two-process run follows the one-process
    one, its frozen tensors end as the one-process run's (as initialized), and its checkpoint resumes in one process."""
    frozen_run = [*RUN, "--set", 'train.trainable=["layers.2.*", "norm_f.*"]', "--set", "optim.moe_expert_bias_rate=0"]
    assert "trained (train.trainable)" in train_two(frozen_run, tmp_path / "two").stdout
    assert main(["train", *frozen_run, "--run-dir", str(tmp_path / "one")]) == 0
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert two.keys() == one.keys() == set(range(1, 7))
    for step in one:
        assert abs(two[step] - one[step]) <= 2e-4 * one[step], (step, two[step], one[step])
    a, b = (read_tensors(tmp_path / d / "model") for d in ("two", "one"))
    trained = {k for k in a if k.startswith(("layers.2.", "norm_f."))}
    config = read_config(tmp_path / "one" / "model")
    init = canonical_state_dict(HybridLM(config, seed=0))  # (train.seed's default)
    assert trained and all(torch.equal(a[k], b[k]) and torch.equal(a[k], init[k]) for k in a if k not in trained)
    assert not any(torch.equal(a[k], init[k]) for k in trained)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in trained)
    assert main(["train", "--resume", str(tmp_path / "two"), "--set", "train.steps=8", "--no-progress"]) == 0
    assert max(step_losses(tmp_path / "two")) == 8
