"""Run under torchrun (gloo, CPU): train with the Trainer for each job, in one process group.

Usage: pipeline_train.py JOBS.json, where JOBS.json lists {"set": [...], "run_dir": ..., "resume": bool,
"until": int | null}. Each job's metrics land in its run directory, its model (at the last step) in
<run_dir>/model; rank 0 also writes <run_dir>/params.json: the parameter count each rank holds.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch.distributed as dist

from hybridlm.train.config import RunConfig
from hybridlm.train.trainer import Trainer

warnings.filterwarnings("ignore")


def main(jobs_file: str) -> None:
    dist.init_process_group("gloo")
    for job in json.loads(Path(jobs_file).read_text()):
        run = RunConfig().with_overrides(job["set"])
        trainer = Trainer(run, run_dir=job["run_dir"], resume=job.get("resume", False), progress=False)
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, sum(getattr(p, "_local_tensor", p).numel() for p in trainer.model.parameters()))
        if dist.get_rank() == 0:
            with open(f"{job['run_dir']}/params.json", "w") as f:
                json.dump(counts, f)
        trainer.run_loop(until=job.get("until"))
    dist.barrier()  # every rank is done; leave as `hybridlm train` does (hybridlm.cli.entry)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
