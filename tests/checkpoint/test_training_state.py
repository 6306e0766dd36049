"""DCP training state in canonical names: resume under other brackets, other splits, other world sizes."""

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from hybridlm import CheckpointError, HybridLM
from hybridlm.checkpoint.training_state import load_training_state, save_training_state
from tests.helpers import ROOT, run_failure, subprocess_env, tiny_config


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 16), generator=gen) for _ in range(n)]


def step(model, opt, ids):
    opt.zero_grad()
    loss = model(ids, torch.roll(ids, -1, 1)).loss
    loss.backward()
    opt.step()
    return loss.item()


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def untouched(model, opt, sched=None):
    """A check that ``model``, ``opt`` (moments, learning rates), ``sched`` and the RNGs are bitwise as now."""

    def now():
        return {
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "moments": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state],
            "lr": [g["lr"] for g in opt.param_groups],
            "scheduler": None if sched is None else sched.state_dict(),
            "rng": [random.getstate(), torch.get_rng_state()],
        }

    before = now()

    def check():
        after = now()
        assert not (changed := [k for k in before if not _equal(after[k], before[k])]), f"changed: {changed}"

    return check


def stepped(pattern, seed):
    """``make(pattern, seed)`` after one step (on other data than ``batches``'): weights and moments to keep."""
    model, opt, sched = make(pattern, seed)
    step(model, opt, batches(1, seed=2)[0])
    sched.step()
    return model, opt, sched


def make(pattern, seed=0):
    model = HybridLM(tiny_config(pattern, moe_router_expert_bias=True), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    return model, opt, sched


@pytest.mark.parametrize("resume_pattern", ["M-*-GE/*-", "M-[*-][GE]/[*-]", "[M-]|*-|[GE]/[*-]"])
def test_resume_under_other_brackets_continues_exactly(tmp_path, resume_pattern):
    data = batches(5)
    model, opt, sched = make("M-[*-][GE]/[*-]")
    for ids in data[:3]:
        step(model, opt, ids)
        sched.step()
    save_training_state(tmp_path / "s", model, opt, sched, step=3, data={"position": 3})
    uninterrupted = [step(model, opt, ids) for ids in data[3:]]

    other, other_opt, other_sched = make(resume_pattern, seed=123)  # different init: everything must come from disk
    extra = load_training_state(tmp_path / "s", other, other_opt, other_sched)
    assert extra["step"] == 3 and extra["data"] == {"position": 3}
    assert other_sched.last_epoch == 3 and other_opt.param_groups[0]["lr"] == 1e-2 / 4
    resumed = [step(other, other_opt, ids) for ids in data[3:]]
    assert resumed == uninterrupted


def test_parameters_without_optimizer_state_resume_without_one(tmp_path):
    """A parameter that never had a gradient has no AdamW state (DSA's indexer without its loss): the
    resumed optimizer gives it none either, and the run continues exactly once it gets gradients."""
    data = batches(5)
    model, opt, sched = make("M-*E")
    frozen = "blocks.2.layers.0.mixer.o_proj.weight"  # no gradient for the first 3 steps

    def train(model, opt, ids, first):
        opt.zero_grad()
        model(ids, torch.roll(ids, -1, 1)).loss.backward()
        if first:
            model.get_parameter(frozen).grad = None
        opt.step()

    for ids in data[:3]:
        train(model, opt, ids, first=True)
    assert model.get_parameter(frozen) not in opt.state
    save_training_state(tmp_path / "s", model, opt, sched, step=3)
    for ids in data[3:]:
        train(model, opt, ids, first=False)

    other, other_opt, other_sched = make("M-*E", seed=123)
    load_training_state(tmp_path / "s", other, other_opt, other_sched)
    assert other.get_parameter(frozen) not in other_opt.state and len(other_opt.state) == len(opt.state) - 1
    for ids in data[3:]:
        train(other, other_opt, ids, first=False)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name


def test_rng_is_restored(tmp_path):
    model, opt, _ = make("M-")
    torch.manual_seed(7)
    save_training_state(tmp_path / "s", model, opt, step=0)
    expected = torch.rand(3)
    torch.manual_seed(8)
    load_training_state(tmp_path / "s", model, opt)
    assert torch.equal(torch.rand(3), expected)


def test_model_only_and_overwrite(tmp_path):
    model, opt, _ = make("M-*-")
    save_training_state(tmp_path / "s", model, step=1)
    save_training_state(tmp_path / "s", model, opt, step=2)  # replaces the first
    fresh, fresh_opt, _ = make("M-*-", seed=9)
    assert load_training_state(tmp_path / "s", fresh, fresh_opt)["step"] == 2
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_refusals(tmp_path):
    model, opt, _ = make("M-*-")
    with pytest.raises(CheckpointError, match="not a training-state directory"):
        load_training_state(tmp_path, model, opt)
    save_training_state(tmp_path / "s", model, opt, step=1)
    bigger, bigger_opt, _ = make("M-*-M-")
    with pytest.raises(CheckpointError, match="cannot load training state"):
        load_training_state(tmp_path / "s", bigger, bigger_opt)


@pytest.mark.multiprocess
def test_torchrun_fsdp_save_then_resume_in_one_process_with_other_brackets(tmp_path):
    """2 ranks, FSDP2-sharded fused model, save; resume unsharded, unfused, in this process."""
    env = subprocess_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests/distributed/fsdp_train_save.py"),
        str(tmp_path),
        "M-[*-][GE]/[*-]",
        "4",
        "2",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, run_failure(r)
    losses = json.loads((tmp_path / "losses.json").read_text())

    model = HybridLM(tiny_config("M-*-GE/*-"), seed=55)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_training_state(tmp_path / "state", model, opt)["step"] == 2
    resumed = [step(model, opt, ids) for ids in batches(4)[2:]]
    for a, b in zip(resumed, losses[2:]):
        assert abs(a - b) <= 1e-5 * abs(b), (resumed, losses)


@pytest.mark.multiprocess
def test_a_checkpoint_one_rank_refuses_is_refused_by_every_rank(tmp_path):
    """Step 2's RNG state of rank 1 is damaged: rank 1 fell back to step 1 while rank 0 loaded step 2, both within
    one collective DCP load, and the ranks went on from different steps. Now every rank falls back, and rank 0
    says which rank refused and why."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests/distributed/disagreeing_ranks.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, run_failure(r)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [rank["step"] for rank in resumed] == [1, 1], resumed
    assert re.search(r"step-2: refused by rank 1 of 2: damaged RNG state", resumed[0]["refusals"][0])
    assert "damaged RNG state" in resumed[1]["refusals"][0]


def test_a_scheduler_other_than_lambda_lr_gets_its_whole_state_back(tmp_path):
    model, opt, _ = make("M-")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step()
        sched.step()
    save_training_state(tmp_path / "s", model, opt, sched, step=5)
    fresh, fresh_opt, _ = make("M-", seed=3)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    load_training_state(tmp_path / "s", fresh, fresh_opt, fresh_sched)
    assert fresh_sched.last_epoch == 5 and fresh_sched.get_last_lr() == sched.get_last_lr() == [1e-2 / 4]


def _sequential(opt):
    S = torch.optim.lr_scheduler
    return S.SequentialLR(opt, [S.LinearLR(opt, 0.5, total_iters=2), S.ExponentialLR(opt, 0.9)], milestones=[2])


_OTHER_SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10),
    "MultiplicativeLR": lambda opt: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda e: 0.9),
    "SequentialLR": _sequential,
}


@pytest.mark.parametrize("kind", list(_OTHER_SCHEDULERS))
def test_a_scheduler_other_than_lambda_lr_continues_at_the_saved_learning_rate(tmp_path, kind):
    """Only a LambdaLR computes its rate from the optimizer's base rates; the others step from the rate the
    optimizer holds, which a resume left at the fresh optimizer's (a StepLR at 1e-2 where it was 2.5e-3), and a
    MultiplicativeLR (it has lr_lambdas too) was put at base * lambda(epoch), one factor for all its steps."""
    model, opt, _ = make("M-")
    sched = _OTHER_SCHEDULERS[kind](opt)
    for ids in batches(5):
        step(model, opt, ids)
        sched.step()
    path = save_training_state(tmp_path / "s", model, opt, sched, step=5)
    fresh, fresh_opt, _ = make("M-", seed=3)
    fresh_sched = _OTHER_SCHEDULERS[kind](fresh_opt)
    load_training_state(path, fresh, fresh_opt, fresh_sched)
    for _ in range(3):
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert fresh_sched.get_last_lr() == sched.get_last_lr()
        for o, s in ((opt, sched), (fresh_opt, fresh_sched)):
            o.step()
            s.step()


def test_a_scheduler_entry_its_own_load_state_dict_refuses_is_a_damaged_checkpoint(tmp_path):
    """A scheduler other than LambdaLR takes its entry through its own load_state_dict, which was called only
    after DCP had filled the model and optimizer: its KeyError escaped as such (the resume did not fall back to
    an older checkpoint) with the model and optimizer already overwritten."""
    from hybridlm.checkpoint.training_state import TRAINER_STATE

    model, opt, _ = make("M-")
    sched = _sequential(opt)
    step(model, opt, batches(1)[0])
    sched.step()
    path = save_training_state(tmp_path / "s", model, opt, sched, step=1)
    state = json.loads((path / TRAINER_STATE).read_text())
    del state["scheduler"]["_schedulers"]
    (path / TRAINER_STATE).write_text(json.dumps(state))
    other, other_opt, _ = stepped("M-", seed=5)
    other_sched = _sequential(other_opt)
    other_sched.step()
    check = untouched(other, other_opt, other_sched)
    with pytest.raises(CheckpointError, match=r"damaged scheduler state in trainer_state\.json.*_schedulers"):
        load_training_state(path, other, other_opt, other_sched)
    check()


@pytest.mark.parametrize("damage", ["python", "python, no object", "torch", "torch, truncated"])
def test_a_damaged_rng_state_is_refused_by_name_before_anything_is_loaded(tmp_path, damage):
    """Refused before DCP fills the model and optimizer in place (and before Python's RNG was set, when torch's
    was the damaged one): model, optimizer, scheduler and RNG stay as they were."""
    from safetensors.torch import load_file, save_file

    from hybridlm.checkpoint.training_state import RNG_STATE, TRAINER_STATE

    model, opt, sched = make("M-")
    step(model, opt, batches(1)[0])
    path = save_training_state(tmp_path / "s", model, opt, sched, step=1)
    if damage.startswith("python"):
        state = json.loads((path / TRAINER_STATE).read_text())
        # A Mersenne Twister state of the wrong length; no JSON object of ranks at all.
        state["rng_python"] = {"0": [3, [1, 2, 3], None]} if damage == "python" else 5
        (path / TRAINER_STATE).write_text(json.dumps(state))
    else:
        rng = load_file(path / RNG_STATE)
        # Not a byte tensor (a TypeError); eight bytes short (a RuntimeError from set_state).
        spoil = (lambda v: v[:-8]) if damage == "torch, truncated" else (lambda v: v.float())
        save_file({k: spoil(v).contiguous() for k, v in rng.items()}, path / RNG_STATE)
    random.random()  # Python's RNG moves on from the saved state
    other, other_opt, other_sched = stepped("M-", seed=5)
    check = untouched(other, other_opt, other_sched)
    with pytest.raises(CheckpointError, match="damaged RNG state"):
        load_training_state(path, other, other_opt, other_sched)
    check()
    load_training_state(path, other, other_opt, other_sched, restore_rng=False)  # the rest of it still loads


def test_a_save_that_fills_the_disk_names_the_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """DCP's torch.save failed with "unexpected pos" (the CLI called it a possible bug), and a failed write
    after DCP's left the hidden folder on the full disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from hybridlm.checkpoint import training_state

    model, opt, sched = make("M-*-")
    step(model, opt, batches(1)[0])
    ok = save_training_state(tmp_path / "step-1", model, opt, sched, step=1)

    def full(*args, **kwargs):
        failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        raise CheckpointException("save failed", {0: (failure, None)})

    with monkeypatch.context() as m:
        m.setattr(dcp, "save", full)
        with pytest.raises(CheckpointError, match=r"\.step-2\.tmp: cannot write it, is the disk full\?"):
            save_training_state(tmp_path / "step-2", model, opt, sched, step=2)
    assert sorted(os.listdir(tmp_path)) == ["step-1"]

    def no_space(tensors, file, **kwargs):  # ENOSPC from a write: Python's OSError names no file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training_state, "save_file", no_space)
    with pytest.raises(OSError, match=r"No space left on device: '.*\.step-2\.tmp/rng\.safetensors'"):
        save_training_state(tmp_path / "step-2", model, opt, sched, step=2)
    assert sorted(os.listdir(tmp_path)) == ["step-1"] and ok.is_dir()


def test_python_rng_is_restored(tmp_path):
    """Python's ``random`` comes back as it was saved, as torch's does (it was validated, then dropped)."""
    import random

    model, opt, _ = make("M-")
    random.seed(7)
    save_training_state(tmp_path / "s", model, opt, step=0)
    expected = [random.random() for _ in range(3)]
    random.seed(8)
    load_training_state(tmp_path / "s", model, opt)
    assert [random.random() for _ in range(3)] == expected


def test_a_save_before_the_first_step_leaves_the_optimizer_untouched_and_loads_into_a_fresh_one(tmp_path):
    """An optimizer that never stepped has no state: saving does not give it one (nor change the weights), the
    folder holds no optimizer entries, and a fresh optimizer loading it stays fresh."""
    from hybridlm.checkpoint.safe_dcp import read_dcp_metadata

    model, opt, _ = make("M-*-")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_training_state(tmp_path / "s", model, opt, step=0)
    assert len(opt.state) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(k.startswith("optim.") for k in read_dcp_metadata(path).state_dict_metadata)
    fresh, fresh_opt, _ = make("M-*-", seed=5)
    assert load_training_state(path, fresh, fresh_opt)["step"] == 0
    assert len(fresh_opt.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_a_model_only_state_loads_with_an_optimizer_that_stays_fresh(tmp_path):
    model, opt, _ = make("M-*-")
    step(model, opt, batches(1)[0])
    path = save_training_state(tmp_path / "s", model, step=1)  # no optimizer
    fresh, fresh_opt, _ = make("M-*-", seed=5)
    load_training_state(path, fresh, fresh_opt)
    assert len(fresh_opt.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_the_config_schema_version_is_not_a_difference_but_an_option_is(tmp_path):
    """model_config's schema_version is no model property; any option that differs is named."""
    from hybridlm.errors import CheckpointMismatchError

    model = make("M-")[0]
    path = save_training_state(tmp_path / "s", model, step=1)
    file = path / "trainer_state.json"
    state = json.loads(file.read_text())
    assert "schema_version" in state["model_config"]
    state["model_config"]["schema_version"] = 999
    file.write_text(json.dumps(state))
    load_training_state(path, HybridLM(model.config, seed=1))
    state["model_config"]["norm_eps"] = 0.5
    file.write_text(json.dumps(state))
    with pytest.raises(CheckpointMismatchError, match=r"model\.norm_eps: checkpoint has 0\.5"):
        load_training_state(path, HybridLM(model.config, seed=1))


#: ModelConfig fields that the first JSON trainer states (commits b5b63f2..c28d675, from before the MLA merge) lack.
_FIELDS_ADDED_SINCE_THE_FIRST_JSON_STATE = (
    *("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"),
    *("dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk"),
    *("dsa_indexer_loss_coeff", "dsa_indexer_use_sparse_loss", "gdn_dt_min", "gdn_dt_max", "gdn_dt_init_floor"),
)


def test_a_state_written_before_a_model_field_existed_resumes_and_compares_it_as_its_default(tmp_path):
    """Such a state was refused as another model ("model.q_lora_rank: checkpoint has None, this run has 512"); a
    field it lacks is its default, as ModelConfig.from_dict reads it, and a run that sets the field otherwise is
    still refused."""
    from hybridlm.errors import CheckpointMismatchError

    model = make("M-")[0]
    path = save_training_state(tmp_path / "s", model, step=1)
    file = path / "trainer_state.json"
    state = json.loads(file.read_text())
    for name in _FIELDS_ADDED_SINCE_THE_FIRST_JSON_STATE:
        del state["model_config"][name]
    file.write_text(json.dumps(state))
    assert load_training_state(path, HybridLM(model.config, seed=1))["step"] == 1
    with pytest.raises(CheckpointMismatchError, match=r"model\.kv_lora_rank: checkpoint has 512, this run has 64"):
        load_training_state(path, HybridLM(model.config.replace(kv_lora_rank=64), seed=1))


def test_a_state_of_the_pickled_format_is_refused_naming_its_file_and_what_to_do(tmp_path):
    """The first hybridlm versions wrote trainer_state.pt (a pickle) beside the DCP files; the refusal said only
    "missing trainer_state.json (an incomplete save, ...)"."""
    model = make("M-")[0]
    path = save_training_state(tmp_path / "s", model, step=1)
    (path / "trainer_state.json").unlink()
    (path / "trainer_state.pt").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt is a pickle .* with the hybridlm that wrote it"):
        load_training_state(path, HybridLM(model.config, seed=1))


def test_a_missing_rng_file_is_named_unless_the_rng_is_not_restored(tmp_path):
    model = make("M-")[0]
    path = save_training_state(tmp_path / "s", model, step=1)
    (path / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing rng\.safetensors"):
        load_training_state(path, model)
    assert load_training_state(path, model, restore_rng=False)["step"] == 1


def _saved_with_scheduler(tmp_path, steps):
    """(training-state folder, scheduler, its trainer_state.json) after ``steps`` steps of an ``M-`` model."""
    model, opt, sched = make("M-")
    for ids in batches(steps):
        step(model, opt, ids)
        sched.step()
    path = save_training_state(tmp_path / "s", model, opt, sched, step=steps)
    return path, sched, json.loads((path / "trainer_state.json").read_text())


def test_a_scheduler_state_without_step_count_resumes_as_after_that_many_steps(tmp_path):
    """_step_count left out of the saved scheduler is last_epoch + 1, as a LambdaLR has after last_epoch steps."""
    path, sched, state = _saved_with_scheduler(tmp_path, 3)
    assert state["scheduler"].pop("_step_count") == sched._step_count
    (path / "trainer_state.json").write_text(json.dumps(state))
    other, other_opt, other_sched = make("M-", seed=1)
    load_training_state(path, other, other_opt, other_sched)
    assert (other_sched.last_epoch, other_sched._step_count) == (sched.last_epoch, sched._step_count)


def test_a_failed_load_leaves_the_optimizer_as_it_was(tmp_path):
    """Reading gives the optimizer a state before DCP fills it: a load that then fails takes it back."""
    model, opt, sched = make("M-")
    step(model, opt, batches(1)[0])
    path = save_training_state(tmp_path / "s", model, opt, sched, step=1)
    data = next(path.glob("*.distcp"))
    data.write_bytes(bytes(64) + data.read_bytes()[64:])  # of full size (a truncated file is refused before)
    fresh, fresh_opt, _ = make("M-", seed=5)
    with pytest.raises(CheckpointError, match="cannot load training state"):
        load_training_state(path, fresh, fresh_opt)
    assert len(fresh_opt.state) == 0


@pytest.mark.parametrize(
    "value", [None, {"last_epoch": "three"}, {"_step_count": 1}, 5, [2], "2", {"last_epoch": float("inf")}]
)
def test_a_damaged_scheduler_entry_is_refused_by_name_and_a_null_one_ignored(tmp_path, value):
    """``"scheduler": null`` is no scheduler state (the scheduler keeps its own); a position that is no integer
    or is missing, or an entry that is no JSON object, is a damaged file, named (not a schedule silently
    restarted), before DCP fills the model and optimizer in place: they, and the scheduler, stay as they were."""
    path, _, state = _saved_with_scheduler(tmp_path, 2)
    (path / "trainer_state.json").write_text(json.dumps(state | {"scheduler": value}))
    other, other_opt, other_sched = stepped("M-", seed=1)
    if value is None:
        load_training_state(path, other, other_opt, other_sched)
        assert other_sched.last_epoch == 1
    else:
        check = untouched(other, other_opt, other_sched)
        with pytest.raises(CheckpointError, match=r"damaged scheduler state in trainer_state\.json"):
            load_training_state(path, other, other_opt, other_sched)
        check()


_BESIDE_THE_TENSORS = {  # damage to trainer_state.json (as a dict) or the folder -> the error
    "step": (lambda path, state: state.update(step=-1), "step must be a non-negative integer"),
    "step as a boolean": (lambda path, state: state.update(step=True), "step must be a non-negative integer, got True"),
    "an invalid pattern": (
        lambda path, state: state["model_config"].update(pattern="M?"),
        r"model: .*pattern: checkpoint has an invalid pattern 'M\?'",
    ),
    "format version": (lambda path, state: state.update(format_version=99), "newer than this hybridlm reads"),
    "another model": (lambda path, state: state["model_config"].update(norm_eps=0.5), r"model\.norm_eps"),
    "no RNG file": (lambda path, state: (path / "rng.safetensors").unlink(), r"missing rng\.safetensors"),
}


@pytest.mark.parametrize("damage", list(_BESIDE_THE_TENSORS))
def test_the_other_refusals_without_tensor_data_leave_everything_as_it_was(tmp_path, damage):
    """Besides a damaged scheduler entry or RNG state (tested above), what else is refused without reading a
    tensor is refused before DCP fills the model and optimizer in place."""
    path, _, state = _saved_with_scheduler(tmp_path, 2)
    spoil, error = _BESIDE_THE_TENSORS[damage]
    spoil(path, state)
    (path / "trainer_state.json").write_text(json.dumps(state))
    other, other_opt, other_sched = stepped("M-", seed=1)
    check = untouched(other, other_opt, other_sched)
    with pytest.raises(CheckpointError, match=error):
        load_training_state(path, other, other_opt, other_sched)
    check()


@pytest.mark.parametrize("damage", ["truncated", "missing", "a folder"])
def test_a_damaged_data_file_is_refused_before_the_model_and_optimizer_are_touched(tmp_path, damage):
    """DCP fills the live tensors in place: a truncated .distcp had overwritten part of the weights and moments
    when the load failed, leaving a direct caller (no fallback) with a half-loaded model."""
    model, opt, _ = make("M-")
    step(model, opt, batches(1)[0])
    path = save_training_state(tmp_path / "s", model, opt, step=1)
    data = path / "__0_0.distcp"
    size = data.stat().st_size
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[: size // 2])
    else:
        data.unlink()
        if damage == "a folder":
            data.mkdir()
    other, other_opt, _ = stepped("M-", seed=5)
    check = untouched(other, other_opt)
    why = {
        "truncated": f"holds {size // 2:,} of {size:,} bytes",
        "missing": "is missing",
        "a folder": "is not a regular",
    }
    with pytest.raises(CheckpointError) as error:
        load_training_state(path, other, other_opt)
    check()
    error.match(re.escape(f"{path}: a damaged training state: __0_0.distcp {why[damage]}"))


@pytest.mark.gpu
def test_the_cuda_rng_state_is_checked_before_and_restored_after_the_tensors(tmp_path):
    """On a machine with CUDA the state holds the CUDA generator's too: a damaged one is refused (checked on a
    throwaway CUDA generator) with the model, optimizer and every generator as they were; a sound one is set."""
    from safetensors.torch import load_file, save_file

    from hybridlm.checkpoint.training_state import RNG_STATE

    model, opt, sched = make("M-")
    step(model, opt, batches(1)[0])
    torch.cuda.manual_seed(11)
    saved_cuda = torch.cuda.get_rng_state()
    path = save_training_state(tmp_path / "s", model, opt, sched, step=1)
    assert "rank0.cuda" in load_file(path / RNG_STATE)
    damaged = save_training_state(tmp_path / "d", model, opt, sched, step=1)
    rng = load_file(damaged / RNG_STATE)
    save_file({**rng, "rank0.cuda": rng["rank0.cuda"][:5]}, damaged / RNG_STATE)  # too short for a CUDA state
    torch.cuda.manual_seed(12)
    moved = torch.cuda.get_rng_state()
    other, other_opt, other_sched = stepped("M-", seed=5)
    check = untouched(other, other_opt, other_sched)
    with pytest.raises(CheckpointError, match="damaged RNG state"):
        load_training_state(damaged, other, other_opt, other_sched)
    check()
    assert torch.equal(torch.cuda.get_rng_state(), moved)
    load_training_state(path, other, other_opt, other_sched)
    assert torch.equal(torch.cuda.get_rng_state(), saved_cuda)


def test_an_optimizer_entry_of_no_known_shape_is_a_damaged_checkpoint(tmp_path):
    """A ``.metadata`` key ``optim.state.X`` without ``<param>.<stat>`` raised a bare TypeError (so a resume
    did not fall back to an older checkpoint); it is a damaged checkpoint, refused by name, nothing touched."""
    import pickle

    from hybridlm.checkpoint.safe_dcp import METADATA_NAME, read_dcp_metadata

    model, opt, sched = make("M-")
    step(model, opt, batches(1)[0])
    path = save_training_state(tmp_path / "s", model, opt, sched, step=1)
    meta = read_dcp_metadata(path)
    entries = meta.state_dict_metadata
    entries["optim.state.nodots"] = next(v for k, v in entries.items() if k.startswith("optim.state."))
    (path / METADATA_NAME).write_bytes(pickle.dumps(meta))
    other, other_opt, other_sched = stepped("M-", seed=5)
    check = untouched(other, other_opt, other_sched)
    with pytest.raises(CheckpointError, match=r"damaged optimizer entries in \.metadata: optim\.state\.nodots"):
        load_training_state(path, other, other_opt, other_sched)
    check()


def test_a_folder_in_place_of_the_rng_file_is_named_as_one(tmp_path):
    """A folder where rng.safetensors belongs was reported as "missing rng.safetensors" (the other files of a
    training state say "not a regular file")."""
    model = make("M-")[0]
    path = save_training_state(tmp_path / "s", model, step=1)
    (path / "rng.safetensors").unlink()
    (path / "rng.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"s/rng\.safetensors: not a regular file"):
        load_training_state(path, model)


def test_ctrl_c_inside_the_load_is_no_damaged_file(tmp_path, monkeypatch):
    """DCP wraps whatever stops its read, KeyboardInterrupt too: Ctrl-C during a load came back as "cannot load
    training state (a damaged file?)", which a caller falling back to an older checkpoint took for one."""
    from hybridlm.checkpoint.safe_dcp import SafeFileSystemReader

    model, opt, _ = make("M-")
    step(model, opt, batches(1)[0])
    path = save_training_state(tmp_path / "s", model, opt, step=1)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SafeFileSystemReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_training_state(path, model, opt)


@pytest.mark.parametrize(
    "field",
    [
        *("init_std", "mtp_loss_scale", "moe_aux_loss_coeff", "dsa_indexer_loss_coeff", "dsa_indexer_use_sparse_loss"),
        *(f"{kind}_dt_{end}" for kind in ("mamba", "gdn") for end in ("min", "max", "init_floor")),
    ],
)
def test_every_initialization_or_loss_field_may_differ_at_a_resume(field):
    """Each field only initialization or the loss reads is left out of the comparison; any other field is named.
    (Listed here, not read from config.TRAINING_ONLY_FIELDS, so that one dropped from it fails; the resume test
    sets only four of them.)"""
    from hybridlm.checkpoint.training_state import config_differences

    config = tiny_config("M-")
    saved = config.to_dict()
    value = saved[field]
    saved[field] = (not value) if isinstance(value, bool) else value * 2 + 0.5
    assert config_differences(saved, config) == []
    saved["norm_eps"] = 0.5
    assert config_differences(saved, config) == [
        f"model.norm_eps: checkpoint has 0.5, this run has {config.norm_eps!r}"
    ]


@pytest.mark.parametrize("saved", ["M-", ["M-"], None])
def test_a_model_config_that_is_no_object_is_not_compared(tmp_path, saved):
    """A trainer state whose model_config is no JSON object is read as one without it (an older save): the
    comparison is skipped, not an AttributeError from calling .get on it."""
    model = make("M-")[0]
    path = save_training_state(tmp_path / "s", model, step=1)
    file = path / "trainer_state.json"
    state = json.loads(file.read_text())
    state["model_config"] = saved
    file.write_text(json.dumps(state))
    assert load_training_state(path, HybridLM(model.config, seed=1))["step"] == 1


@pytest.mark.parametrize("rates", [[0.1, 0.2], ["0.1"]], ids=["two rates for one group", "a string"])
def test_a_scheduler_entry_whose_rates_do_not_fit_the_optimizer_is_a_damaged_checkpoint(tmp_path, rates):
    """A non-LambdaLR scheduler's ``_last_lr`` becomes the optimizer's rates: one per group, each a number, or
    the group left without a rate (zip) or with a string one fails only at the next ``optimizer.step``."""
    model, opt, _ = make("M-")
    step(model, opt, batches(1)[0])
    path = save_training_state(tmp_path / "s", model, opt, torch.optim.lr_scheduler.StepLR(opt, 2), step=1)
    state = json.loads((path / "trainer_state.json").read_text())
    state["scheduler"]["_last_lr"] = rates
    (path / "trainer_state.json").write_text(json.dumps(state))
    other, other_opt, _ = stepped("M-", seed=5)
    other_sched = torch.optim.lr_scheduler.StepLR(other_opt, 2)
    check = untouched(other, other_opt, other_sched)
    with pytest.raises(
        CheckpointError, match=r"damaged scheduler state .*_last_lr is not one rate per parameter group"
    ):
        load_training_state(path, other, other_opt, other_sched)
    check()


def test_a_refusal_after_the_scheduler_entry_was_tried_leaves_the_scheduler_as_it_was(tmp_path):
    """A non-LambdaLR scheduler's entry is tried on the scheduler itself (its own load_state_dict checks it), then
    put back: a damaged RNG state found after that must not leave the scheduler at the checkpoint's position."""
    model, opt, _ = make("M-")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for ids in batches(3):
        step(model, opt, ids)
        sched.step()
    path = save_training_state(tmp_path / "s", model, opt, sched, step=3)
    state = json.loads((path / "trainer_state.json").read_text())
    state["rng_python"] = {"0": [3, [1, 2, 3], None]}
    (path / "trainer_state.json").write_text(json.dumps(state))
    other, other_opt, _ = stepped("M-", seed=5)
    other_sched = torch.optim.lr_scheduler.StepLR(other_opt, step_size=2, gamma=0.5)
    check = untouched(other, other_opt, other_sched)
    with pytest.raises(CheckpointError, match="damaged RNG state"):
        load_training_state(path, other, other_opt, other_sched)
    check()
    assert other_sched.last_epoch == 0


def test_a_save_starts_from_an_empty_temporary_folder(tmp_path):
    """What a killed save left in the hidden temporary folder is not committed with the next save."""
    model = make("M-")[0]
    (tmp_path / ".s.tmp").mkdir()
    (tmp_path / ".s.tmp" / "__1_0.distcp").write_bytes(b"a killed two-rank save's")
    path = save_training_state(tmp_path / "s", model, step=1)
    assert "__1_0.distcp" not in os.listdir(path) and sorted(os.listdir(tmp_path)) == ["s"]


def test_scheduler_values_json_cannot_hold_are_left_out_of_the_saved_state(tmp_path):
    """LambdaLR saves the attributes of a callable-object lambda, and any scheduler saves its attributes: a tensor
    among them failed the save in json.dumps. Left out, the position still resumes."""

    class Halving:  # a lambda object with state, as LambdaLR's state_dict copies its __dict__
        def __init__(self):
            self.base = torch.tensor(0.5)

        def __call__(self, s):
            return float(self.base) ** s

    model, opt, _ = make("M-")
    step(model, opt, batches(1)[0])
    plain = torch.optim.lr_scheduler.StepLR(opt, 2)
    plain.note = torch.tensor(1.0)  # an attribute a subclass or user added
    for sched in (torch.optim.lr_scheduler.LambdaLR(opt, Halving()), plain):
        sched.step()
        path = save_training_state(tmp_path / "s", model, opt, sched, step=1)
        saved = json.loads((path / "trainer_state.json").read_text())["scheduler"]
        assert "lr_lambdas" not in saved and "note" not in saved and saved["last_epoch"] == 1


def test_a_model_on_the_meta_device_is_refused_as_such(tmp_path):
    """Saving a model built on meta failed inside DCP ("Cannot copy out of meta tensor"); loading into one was
    refused as "a damaged file?" (DCP: "Default process group has not been initialized"), a good checkpoint
    taken for a broken one."""
    save_training_state(tmp_path / "s", HybridLM(tiny_config("M-*"), seed=1))
    meta = HybridLM(tiny_config("M-*"), device="meta")
    calls = {
        "cannot load the training state .*/s into the model": lambda: load_training_state(tmp_path / "s", meta),
        "cannot save a training state": lambda: save_training_state(tmp_path / "t", meta),
    }
    says = r"tensors on the meta device, without values \(all \d+ of them: embeddings\.weight, \.\.\.\); allocate the model"
    for doing, call in calls.items():  # (the message is checkpoint.io.refuse_meta's, as for the weights)
        with pytest.raises(ValueError, match=rf"^{doing}: {says} with model\.to_empty") as e:
            call()
        assert not isinstance(e.value, CheckpointError)  # a resume would take it for a damaged checkpoint
    assert sorted(os.listdir(tmp_path)) == ["s"]
