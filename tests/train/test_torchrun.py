"""`hybridlm train` under torchrun: data parallel with FSDP2 (gloo, CPU) follows the one-process run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


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
        "--run-dir",
        str(tmp_path / "two"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, run_failure(r)
    assert main(["train", *RUN, "--run-dir", str(tmp_path / "one")]) == 0
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert two.keys() == one.keys() == set(range(1, 7))
    for step in one:
        assert abs(two[step] - one[step]) <= 2e-4 * one[step], (step, two[step], one[step])
    # The two-process run's checkpoint resumes in one process.
    assert main(["train", "--resume", str(tmp_path / "two"), "--set", "train.steps=8", "--no-progress"]) == 0
    assert max(step_losses(tmp_path / "two")) == 8
