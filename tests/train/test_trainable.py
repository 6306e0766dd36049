"""``train.trainable``: only the parameters its patterns match train (DeepSeek-V3.2's dense warm-up of the DSA indexer);
the others stay bit for bit, with no gradient and no optimizer state; a resume trains the same ones."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.checkpoint.canonical import canonical_name
from hybridlm.errors import ConfigError
from hybridlm.plan.cost import step_flops_share
from hybridlm.train.config import RunConfig
from hybridlm.train.trainable import freeze_others, trainable_names, trainable_patterns
from hybridlm.train.trainer import Trainer
from tests.helpers import MLA_TINY, tiny_config
from tests.train.test_trainer import losses, weights

#: Two DSA layers with the indexer loss (the warm-up's dense attention: top-k above the row length), an MLP, an MoE.
DSA_RUN = [
    "model.pattern=D-[DE]",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=48",
    "model.moe_num_experts=4",
    "model.moe_ffn_hidden_size=24",
    *(f"model.{k}={v}" for k, v in MLA_TINY.items()),
    "model.dsa_indexer_topk=64",
    "model.dsa_indexer_loss_coeff=1.0",
    "data.seq_len=48",
    "train.batch_size=4",
    "train.steps=4",
    "train.log_every=2",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.checkpoint_every=2",
    "optim.warmup_steps=1",
]


def dsa_run(*extra):
    return RunConfig().with_overrides([*DSA_RUN, *extra])


def test_patterns_are_refused_by_name_when_empty_or_unmatched():
    assert trainable_patterns("*.indexer.*") == ["*.indexer.*"]
    assert trainable_patterns([" a ", "b"]) == ["a", "b"]
    for bad, said in (([], "an empty list"), (["x", " "], "pattern 2 is empty")):
        with pytest.raises(ConfigError, match=said) as e:
            trainable_patterns(bad)
        assert e.value.field == "train.trainable"
    config = tiny_config("D-", **MLA_TINY)
    with pytest.raises(ConfigError, match=r"'\*\.indexr\.\*' matches no parameter.*layers\.N\.mixer\.indexer\.wq_b"):
        trainable_names(HybridLM(config, device="meta"), config.parsed, ["*.indexer.*", "*.indexr.*"])
    with pytest.raises(ConfigError, match="trains nothing"):
        RunConfig().with_overrides(["train.trainable=[]"]).validate()


@pytest.mark.parametrize("pattern", ["D-D-", "[D-][D-]"])
def test_patterns_match_canonical_names_whatever_the_fusion(pattern):
    """One pattern freezes the same parameters of a fused and an unfused model (canonical names), wrapped or not."""
    config = tiny_config(pattern, **MLA_TINY)
    model = HybridLM(config, seed=0)
    names = trainable_names(model, config.parsed, ["*.indexer.*", "layers.3.*"])
    assert names == {n for n in (canonical_name(n, config.parsed) for n, _ in model.named_parameters())
                     if ".indexer." in n or n.startswith("layers.3.")}  # fmt: skip
    freeze_others(model, config.parsed, names)
    trained = {canonical_name(n, config.parsed) for n, p in model.named_parameters() if p.requires_grad}
    assert trained == names and "layers.3.mixer.up_proj.weight" in trained


def test_only_the_indexer_trains_and_a_resume_trains_it_on(tmp_path):
    """The dense warm-up: everything but the indexers frozen. The frozen parameters end bit for bit as initialized,
    every indexer weight moved, the optimizer holds state for the indexers' parameters alone, and a resume goes on
    to the same losses as the run straight through."""
    run = dsa_run("train.trainable=*.indexer.*", "optim.moe_expert_bias_rate=0")
    straight = Trainer(run, run_dir=tmp_path / "a", progress=False)
    assert "trained (train.trainable)" in straight.describe()[1]
    # MFU counts the step that runs: the model's forward, the indexers' own backward (plan.cost.step_flops_share)
    every = Trainer(dsa_run(), run_dir=tmp_path / "every", progress=False).flops_per_token
    share = step_flops_share(straight.config, 48, straight.trainable)
    assert straight.flops_per_token == pytest.approx(every * share) and share < 0.5
    assert f"trained (train.trainable), a step {share:.0%} of a full one's FLOPs" in straight.describe()[1]
    start = weights(HybridLM(straight.config, seed=run.train.seed))
    straight.run_loop()
    end = weights(straight.model)
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    indexer = {k for k in start if ".indexer." in k and k.endswith("weight")}
    assert indexer and indexer <= moved and all(".indexer." in k for k in moved), sorted(moved)
    state = {id(p) for p in straight.optimizer.state}
    params = dict(straight.model.named_parameters())
    assert state == {id(p) for n, p in params.items() if ".indexer." in n}
    assert all(p.grad is None for n, p in params.items() if ".indexer." not in n)

    first = Trainer(run, run_dir=tmp_path / "b", progress=False)
    first.run_loop(until=2)
    second = Trainer(run, run_dir=tmp_path / "b", resume=True, progress=False)
    second.run_loop()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    b = weights(second.model)
    assert all(torch.equal(end[k], b[k]) for k in end)

    with pytest.raises(ConfigError, match="trains other parameters than") as e:
        Trainer(run.with_overrides(["train.trainable=*.mixer.*"]), run_dir=tmp_path / "b", resume=True)
    assert e.value.field == "train.trainable"
    with pytest.raises(ConfigError, match="trains other parameters than"):  # (none: every parameter)
        Trainer(run.with_overrides(["train.trainable=none"]), run_dir=tmp_path / "b", resume=True)


def test_the_indexer_loss_is_noted_where_every_indexer_is_frozen(tmp_path):
    """With every DSA indexer frozen the indexer loss is not computed (a frozen indexer's would train nothing): the
    header says its coefficient changes nothing, and only then."""
    said = "model.dsa_indexer_loss_coeff has no effect: train.trainable freezes every DSA indexer"
    for setting, noted in (("layers.1.*", True), ("*.indexer.*", False), ("layers.0.*", False), (None, False)):
        run = dsa_run(*([f"train.trainable={setting}"] if setting else []))
        header = "\n".join(Trainer(run, run_dir=tmp_path / str(setting), progress=False).describe())
        assert (said in header) == noted, (setting, header)


def test_a_loss_that_reaches_no_trained_parameter_is_refused_by_name(tmp_path):
    """Without its loss the indexer gets no gradient: training it alone would step nothing, so the first step says
    why rather than torch's "does not require grad"."""
    run = dsa_run("train.trainable=*.indexer.*", "model.dsa_indexer_loss_coeff=0")
    t = Trainer(run, run_dir=tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="reaches none of the parameters it trains") as e:
        t.run_loop()
    assert e.value.field == "train.trainable"
