"""SIGKILL at random moments (inside saves too): no checkpoint is lost, and the run resumed after
every kill ends bitwise equal to an uninterrupted one."""

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridlm.checkpoint.canonical import to_canonical
from hybridlm.checkpoint.safe_dcp import read_dcp_metadata
from hybridlm.checkpoint.training_state import read_trainer_state
from hybridlm.checkpoint.weights import read_tensors
from hybridlm.train.listing import list_checkpoints, step_of
from hybridlm.train.trainer import Trainer
from tests.helpers import subprocess_env
from tests.train.test_trainer import TINY_RUN, tiny_run


def newest_complete_step(run_dir: Path) -> int:
    """The newest checkpoint step; every visible checkpoint folder must be complete."""
    newest = 0
    for path in list_checkpoints(run_dir / "checkpoints"):
        read_dcp_metadata(path)
        assert read_trainer_state(path)["step"] == step_of(path)
        newest = step_of(path)
    return newest


def kill_and_resume(tmp_path: Path, steps: int, kills: int, seed: int) -> None:
    # One thread in the killed runs and in the reference: float32 sums in matmuls depend on how many
    # threads split them, and "bitwise" means the same arithmetic.
    sets = [*TINY_RUN, f"train.steps={steps}", "train.checkpoint_every=1", "train.eval_every=1000", "train.threads=1"]
    sets.append("train.device=cpu")  # the same arithmetic on a machine with GPUs too
    run_dir = tmp_path / "run"
    env = subprocess_env()
    rng = random.Random(seed)
    newest, done = 0, 0
    while True:
        resume = ["--resume", str(run_dir)] if list_checkpoints(run_dir / "checkpoints") else []
        if not resume and run_dir.exists():
            # Killed before its first checkpoint (a slow machine's first step outlasts the wait): a run that can
            # be neither resumed nor replaced, as its error says; the user removes it and starts again.
            shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "hybridlm.cli", "train", "--run-dir", str(run_dir), "--no-progress", *resume]
        cmd += [a for s in sets for a in ("--set", s)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done < kills:
            # Wait for the first step line (start-up is slow), then kill at a random moment after it.
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("step ") or line.startswith("validation loss at step 0"):
                    break
            time.sleep(rng.uniform(0.0, 0.6))
            proc.kill()
            proc.wait()
            done += 1
            now = newest_complete_step(run_dir)
            assert now >= newest, f"kill {done}: checkpoint of step {newest} lost (newest now {now})"
            newest = now
            continue
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        break
    threads = torch.get_num_threads()
    try:
        reference = Trainer(tiny_run(*sets[len(TINY_RUN) :]), run_dir=tmp_path / "ref", progress=False)
        reference.run_loop()
    finally:
        torch.set_num_threads(threads)
    expected = to_canonical(reference.model.state_dict(), reference.config.parsed)
    got = read_tensors(run_dir / "model")
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k


def test_a_few_kills_resume_bitwise(tmp_path):
    kill_and_resume(tmp_path, steps=10, kills=2, seed=0)


@pytest.mark.slow
def test_twenty_kills_resume_bitwise(tmp_path):
    kill_and_resume(tmp_path, steps=40, kills=20, seed=1)
