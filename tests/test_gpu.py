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


#: The ops of ``M-[*-]G[ME]`` that have Triton kernels: under ``auto`` CUDA inputs must run them.
KERNEL_OPS = ("mamba2_core", "causal_conv1d", "ssd", "gated_rms_norm", "add_rms_norm", "gated_delta")


def test_cuda_forward_and_backward_match_cpu():
    from hybridlm.ops.dispatch import paths_used, reset_paths

    config = tiny_config("M-[*-]G[ME]/[*-]", position_embedding="rope", moe_router_score="sigmoid")
    cpu = HybridLM(config, seed=0)
    gpu = HybridLM(config, seed=0, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 97, (2, 37))
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])
    paths = {}
    for name, model, device in (("cpu", cpu, "cpu"), ("cuda", gpu, "cuda")):
        reset_paths()
        out = model(ids.to(device), torch.roll(ids, -1, 1).to(device), doc_ids=doc_ids.to(device))
        out.loss.backward()
        paths[name] = (out, paths_used())
    (a, used_cpu), (b, used_gpu) = paths["cpu"], paths["cuda"]
    # The comparison means something only if the two runs took different paths: the CPU the torch
    # reference, CUDA the Triton kernels (a dispatch falling back to torch on CUDA compared torch with torch).
    assert {op: used_cpu.get(op) for op in KERNEL_OPS} == dict.fromkeys(KERNEL_OPS, "torch"), used_cpu
    assert {op: used_gpu.get(op) for op in KERNEL_OPS} == dict.fromkeys(KERNEL_OPS, "triton"), used_gpu
    assert_rel_close(b.logits.cpu(), a.logits, 1e-4, "logits")
    # 2e-3: the GPU runs float32 products of the Triton SSD as tf32x3 (close to, not equal to,
    # float32) and reduces in other orders; a norm weight's gradient sums many such terms
    # (measured 1.01e-3 on an H200).
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert_rel_close(q.grad.cpu(), p.grad, 2e-3, name)


def test_grouped_mm_experts_match_the_per_expert_loop():
    from hybridlm.ops.dispatch import paths_used, reset_paths

    config = tiny_config("E", hidden_size=64, moe_num_experts=8, moe_ffn_hidden_size=32)
    experts = Experts(config).cuda().bfloat16()
    for p in experts.parameters():  # every one: swiglu's gate_proj too (torch.empty holds garbage)
        torch.nn.init.normal_(p, std=0.1)
    counts = torch.tensor([5, 0, 17, 3, 9, 0, 1, 29], device="cuda")
    xs = torch.randn(int(counts.sum()), 64, device="cuda", dtype=torch.bfloat16)
    reset_paths()
    grouped = experts(xs, counts)
    assert paths_used()["moe_experts"] == "grouped_mm"  # else the loop was compared with itself
    loop = experts.float()(xs.float(), counts)  # float32 takes the per-expert path
    assert paths_used()["moe_experts"] == "loop"
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


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_grouped_mm_runs_under_autocast_with_fp32_master_weights(activation):
    # The trainer's setting: float32 parameters, bf16 autocast. The grouped GEMM must run (no
    # silent per-expert loop), with bf16 rows or float32 rows, and agree with the loop. relu²:
    # autocast runs its square in float32, so the down projection gets float32 rows.
    from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels

    config = tiny_config("E", hidden_size=64, moe_num_experts=8, moe_ffn_hidden_size=32, mlp_activation=activation)
    experts = Experts(config).cuda()
    for p in experts.parameters():  # every one: swiglu's gate_proj too (torch.empty holds garbage)
        torch.nn.init.normal_(p, std=0.1)
    counts = torch.tensor([5, 0, 17, 3, 9, 0, 1, 29], device="cuda")
    xs = torch.randn(int(counts.sum()), 64, device="cuda")
    for rows in (xs, xs.bfloat16()):
        reset_paths()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            grouped = experts(rows, counts)
        assert paths_used()["moe_experts"] == "grouped_mm"
        with use_kernels("torch"), torch.autocast("cuda", dtype=torch.bfloat16):
            loop = experts(rows, counts)
        assert paths_used()["moe_experts"] == "loop"
        assert_rel_close(grouped.float(), loop.float(), 2e-2, "grouped_mm vs loop under autocast")


def experts_float64(experts, xs, counts):
    """The routed experts (relu²) written out in float64, each on its own rows, and the gradients of
    ``out.square().sum()`` with respect to their weights (up_proj, down_proj)."""
    up, down = (p.detach().double().requires_grad_() for p in (experts.up_proj, experts.down_proj))
    rows = torch.split(xs.double(), counts.tolist())
    out = torch.cat([torch.relu(r @ up[e].T).square() @ down[e].T for e, r in enumerate(rows)])
    return out, list(torch.autograd.grad(out.square().sum(), (up, down)))


def check_experts_train_under_autocast(hidden, ffn, device):
    """Outputs and weight gradients of the experts under bf16 autocast, in both kernel modes, against
    :func:`experts_float64`."""
    from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels

    config = tiny_config("E", hidden_size=hidden, moe_num_experts=4, moe_ffn_hidden_size=ffn)
    experts = Experts(config).to(device)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    counts = torch.tensor([5, 0, 17, 3], device=device)
    xs = torch.randn(int(counts.sum()), hidden, device=device)
    want, want_grads = experts_float64(experts, xs, counts)
    for mode in ("auto", "torch"):
        experts.zero_grad()
        reset_paths()
        with use_kernels(mode), torch.autocast(device, dtype=torch.bfloat16):
            out = experts(xs, counts)
        out.float().square().sum().backward()
        assert paths_used()["moe_experts"] in ("grouped_mm", "loop")
        # bf16 products: the outputs within 2e-2, the gradients (products of bf16 outputs) within 4e-2;
        # measured on CPU autocast up to 8e-3 and 1.5e-2. A wrong expert's weights are off by order 1.
        assert_rel_close(out.float(), want, 2e-2, f"{mode}: experts vs float64")
        for name, got, w in zip(("up_proj", "down_proj"), (experts.up_proj.grad, experts.down_proj.grad), want_grads):
            assert_rel_close(got, w, 4e-2, f"{mode}: d{name} vs float64")


@pytest.mark.parametrize("hidden, ffn", [(36, 20), (64, 20), (36, 32)])
def test_experts_of_any_width_train_under_autocast(hidden, ffn):
    """Widths that are not a multiple of 8 (grouped_mm wants 16-byte aligned strides) train under autocast on
    whichever path the dispatch takes, with the outputs and gradients of the experts written out in float64.
    Compared with the per-expert loop only, the test compared the loop with itself: at these widths ``auto``
    takes the loop too."""
    check_experts_train_under_autocast(hidden, ffn, "cuda")


def test_packed_attention_uses_flex_and_matches_the_dense_mask():
    from hybridlm.ops.attention import causal_attention
    from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels

    B, Hq, Hkv, L, D = 2, 8, 2, 4096, 64
    q = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    seq_idx = torch.zeros(B, L, dtype=torch.long, device="cuda")
    seq_idx[0, 1000:] += 1
    seq_idx[0, 3001:] += 1
    seq_idx[1, 77:] += 1
    reset_paths()
    out = causal_attention(q, k, v, seq_idx)
    assert paths_used()["attention"] == "flex"
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    with use_kernels("torch"):
        ref = causal_attention(qd, kd, vd, seq_idx)
    assert paths_used()["attention"] == "sdpa_dense_mask"
    ref_grads = torch.autograd.grad(ref.square().sum(), (qd, kd, vd))
    assert_rel_close(out.double(), ref, 2e-2, "flex output")
    for g, r, name in zip(grads, ref_grads, "qkv"):
        assert_rel_close(g.double(), r, 3e-2, f"flex d{name}")


def test_an_mtp_depth_in_bf16_at_4096_is_as_close_to_float64_as_the_main_head():
    """bf16 autocast on the Triton kernels at L = 4096: an MTP depth's logits are about as far from the float64
    model's as the main head's (its residual stream kept in float32, as the main stream is). The same forward with
    the depth's stream forced to bf16 (what the depth did before) is run beside it, to show the check can tell."""
    from hybridlm.ops.dispatch import paths_used, reset_paths

    config = tiny_config(
        "M-*-G-/M-*-G-",
        vocab_size=1024,
        hidden_size=256,
        ffn_hidden_size=512,
        num_attention_heads=8,
        num_query_groups=2,
        mamba_num_heads=8,
        mamba_head_dim=64,
        mamba_state_dim=64,
        mamba_num_groups=1,
        mamba_chunk_size=128,
        gdn_num_heads=4,
        gdn_head_dim=64,
        gdn_chunk_size=64,
    )
    model = HybridLM(config, seed=3, device="cuda")
    ids = torch.randint(0, 1024, (2, 4096), generator=torch.Generator().manual_seed(3)).cuda()
    block = model.mtp[0].blocks["0"]

    def forward(bf16_stream: bool):
        hook = block.register_forward_pre_hook(lambda m, args: (args[0].bfloat16(), *args[1:])) if bf16_stream else None
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids)
        if hook is not None:
            hook.remove()
        return out

    reset_paths()
    out, old = forward(False), forward(True)
    assert {paths_used().get(op) for op in ("ssd", "gated_delta")} == {"triton"}, paths_used()
    with torch.no_grad():
        exact = model.double()(ids)

    def err(a, b):
        return float((a.double() - b).norm() / b.norm())

    main, mtp, mtp_bf16 = (
        err(out.logits, exact.logits),
        err(out.mtp_logits[0], exact.mtp_logits[0]),
        err(old.mtp_logits[0], exact.mtp_logits[0]),
    )
    print(f"relative error vs float64: main {main:.3g}, mtp {mtp:.3g}, mtp with a bf16 stream {mtp_bf16:.3g}")
    assert mtp < 1.2 * main
    assert mtp_bf16 > 1.1 * mtp  # else the comparison could not tell the two streams apart at this length
