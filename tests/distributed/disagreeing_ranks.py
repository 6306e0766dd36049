"""Run under torchrun (gloo, CPU): save training states of steps 1 and 2, damage what only rank 1 reads of step 2
(its RNG state), then resume from the newest that loads, as the trainer does.

Usage: disagreeing_ranks.py OUT. Rank 0 writes OUT/resumed.json: per rank, the step it resumed from and the
refusals it met on the way.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint.training_state import load_training_state, save_training_state
from hybridlm.train.listing import load_newest
from tests.helpers import tiny_config

warnings.filterwarnings("ignore")


def main(out: str) -> None:
    dist.init_process_group("gloo")
    model = HybridLM(tiny_config("M-*-"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    paths = [Path(out, f"step-{s}") for s in (1, 2)]
    for s, path in enumerate(paths, start=1):
        opt.zero_grad()
        model(ids, torch.roll(ids, -1, 1)).loss.backward()
        opt.step()
        save_training_state(path, model, opt, step=s)
    if dist.get_rank() == 0:
        state = json.loads((paths[1] / "trainer_state.json").read_text())
        state["rng_python"]["1"] = [3, [1, 2], None]  # not a Python RNG state: only rank 1 reads it
        (paths[1] / "trainer_state.json").write_text(json.dumps(state))
    dist.barrier()

    fresh = HybridLM(tiny_config("M-*-"), seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    refusals = []

    def load(path):
        try:
            return load_training_state(path, fresh, fresh_opt)
        except CheckpointError as e:
            refusals.append(str(e))
            raise

    state, _ = load_newest(paths, load)
    mine = {"step": state["step"], "refusals": refusals}
    resumed = [None] * dist.get_world_size()
    dist.all_gather_object(resumed, mine)
    if dist.get_rank() == 0:
        Path(out, "resumed.json").write_text(json.dumps(resumed))
    dist.barrier()  # every rank is done; leave as `hybridlm train` does (hybridlm.cli.entry)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
