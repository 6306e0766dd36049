"""CUDA checks (marked gpu: they skip, visibly, without a CUDA device)."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.layers.moe import Experts
from tests.helpers import assert_rel_close, tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_cuda_forward_and_backward_match_cpu():
    config = tiny_config("M-[*-]G[ME]/[*-]", position_embedding="rope", moe_router_score="sigmoid")
    cpu = HybridLM(config, seed=0)
    gpu = HybridLM(config, seed=0, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 97, (2, 37))
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])
    a = cpu(ids, torch.roll(ids, -1, 1), doc_ids=doc_ids)
    b = gpu(ids.cuda(), torch.roll(ids, -1, 1).cuda(), doc_ids=doc_ids.cuda())
    assert_rel_close(b.logits.cpu(), a.logits, 1e-4, "logits")
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert_rel_close(q.grad.cpu(), p.grad, 1e-3, name)


def test_grouped_mm_experts_match_the_per_expert_loop():
    config = tiny_config("E", hidden_size=64, moe_num_experts=8, moe_ffn_hidden_size=32)
    experts = Experts(config).cuda().bfloat16()
    torch.nn.init.normal_(experts.up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    counts = torch.tensor([5, 0, 17, 3, 9, 0, 1, 29], device="cuda")
    xs = torch.randn(int(counts.sum()), 64, device="cuda", dtype=torch.bfloat16)
    grouped = experts(xs, counts)
    loop = experts.float()(xs.float(), counts)  # float32 takes the per-expert path
    assert_rel_close(grouped.float(), loop, 2e-2, "grouped_mm vs loop")


def test_bf16_training_run_on_cuda(tmp_path):
    from hybridlm.train.config import RunConfig
    from hybridlm.train.trainer import Trainer

    run = RunConfig().with_overrides(
        ["train.steps=12", "train.log_every=4", "train.eval_every=12", "train.checkpoint_every=12"]
    )
    trainer = Trainer(run, run_dir=tmp_path / "run", progress=False)
    assert trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    summary = trainer.run_loop()
    assert summary["val_loss"] < summary["first_val_loss"] - 1.0
    rows = trainer.metrics.history
    assert any("mfu" in r and 0 < r["mfu"] < 1 for r in rows)
