"""The MoE layer's load-balancing loss against its formula, computed here from the router weight alone."""

import pytest
import torch

from hybridlm import ModelConfig
from hybridlm.layers.moe import MoE
from tests.helpers import assert_rel_close, rel_err
from tests.layers.test_mixers import make


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_is_the_switch_formula(score):
    """coeff * E * sum_e f_e * P_e, with f_e the share of the T * k routed pairs that go to expert e and P_e
    the mean over tokens of e's probability (sigmoid scores normalised over experts first). Tests compared
    the loss only with itself: a loss k times too large, or unnormalised sigmoid scores, passed."""
    config = ModelConfig.preset("tiny").replace(
        moe_num_experts=6, moe_top_k=2, moe_router_score=score, moe_aux_loss_coeff=0.01, moe_router_expert_bias=False
    )
    layer = MoE(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 9, config.hidden_size, generator=gen)
    aux_losses = []
    layer(x, None, aux_losses)
    (aux,) = aux_losses

    logits = x.reshape(-1, config.hidden_size) @ layer.gate.weight.T
    probs = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    chosen = probs.topk(2, dim=-1).indices  # no bias, no groups: the two best scores
    probs = probs / probs.sum(-1, keepdim=True)
    share = torch.bincount(chosen.reshape(-1), minlength=6).double() / (18 * 2)
    expected = 0.01 * 6 * (share * probs.double().mean(0)).sum()
    torch.testing.assert_close(aux.double(), expected, rtol=1e-6, atol=0)


def _random_layer(seed: int, **fields) -> MoE:
    config = ModelConfig.preset("tiny").replace(moe_num_experts=6, moe_top_k=2, moe_router_expert_bias=False, **fields)
    layer = MoE(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_the_per_sequence_balancing_loss_is_the_switch_formula_within_each_sequence(score):
    """moe_aux_loss_type = "seq_aux_loss" (DeepSeek-V3's sequence-wise loss, Megatron's seq_aux_loss): the switch
    formula with f_e and P_e taken within each sequence, averaged over the sequences, written out here one
    sequence at a time in float64. It is not the batch's loss on the same tokens (a type ignored fails), and is
    the batch's for one sequence."""
    layer = _random_layer(1, moe_router_score=score, moe_aux_loss_coeff=0.01, moe_aux_loss_type="seq_aux_loss")
    x = torch.randn(3, 7, layer.config.hidden_size, generator=torch.Generator().manual_seed(2))
    aux_losses = []
    layer(x, None, aux_losses)
    (aux,) = aux_losses

    expected = []
    for b in range(3):
        logits = x[b].double() @ layer.gate.weight.double().T  # (7, 6)
        probs = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
        chosen = probs.topk(2, dim=-1).indices
        probs = probs / probs.sum(-1, keepdim=True)
        share = torch.bincount(chosen.reshape(-1), minlength=6).double() / (7 * 2)
        expected.append(0.01 * 6 * (share * probs.mean(0)).sum())
    expected = torch.stack(expected).mean()
    torch.testing.assert_close(aux.double(), expected, rtol=1e-6, atol=0)

    batch = layer.config.replace(moe_aux_loss_type="aux_loss")
    batch_losses, one_seq, one_batch = [], [], []
    layer.config = layer.gate.config = batch
    layer(x, None, batch_losses)
    assert abs(batch_losses[0].item() - aux.item()) > 1e-4 * aux.item()
    layer(x[:1], None, one_batch)
    layer.config = layer.gate.config = batch.replace(moe_aux_loss_type="seq_aux_loss")
    layer(x[:1], None, one_seq)
    assert torch.equal(one_seq[0], one_batch[0])


def test_the_router_z_loss_is_st_moes_formula_and_trains_the_router_alone():
    """moe_z_loss_coeff: coeff * mean over tokens of logsumexp(router logits)^2 (ST-MoE, Megatron-LM's z-loss),
    against float64; its gradient reaches the router's weight (as the formula's does) and no expert. Recorded
    after the balancing loss, each its own entry."""
    layer = _random_layer(3, moe_z_loss_coeff=0.002, moe_aux_loss_coeff=0.01)
    x = torch.randn(2, 9, layer.config.hidden_size, generator=torch.Generator().manual_seed(4))
    aux_losses = []
    layer(x, None, aux_losses)
    balancing, z = aux_losses
    w = layer.gate.weight.detach().double().requires_grad_()
    expected = 0.002 * torch.logsumexp(x.reshape(-1, x.shape[-1]).double() @ w.T, dim=-1).square().mean()
    torch.testing.assert_close(z.double(), expected, rtol=1e-6, atol=0)
    assert balancing.item() > 0 and z.item() != balancing.item()

    z.backward()
    expected.backward()
    assert_rel_close(layer.gate.weight.grad.double(), w.grad, 1e-6, "the router weight's gradient")
    assert all(p.grad is None for p in layer.experts.parameters())


def test_no_router_loss_for_no_tokens():
    """An empty batch records zeros, not 0 / 0 (NaN)."""
    layer = _random_layer(5, moe_z_loss_coeff=0.002, moe_aux_loss_coeff=0.01, moe_aux_loss_type="seq_aux_loss")
    aux_losses = []
    layer(torch.zeros(2, 0, layer.config.hidden_size), None, aux_losses)
    assert [float(a.detach()) for a in aux_losses] == [0.0, 0.0]


def test_moe_weights_are_initialized_as_megatron_does():
    """Router and expert input projections N(0, init_std), expert output projections N(0, init_std / sqrt(layers))
    (Megatron's output_layer_init_method), the selection bias zero. Only the dense layers' scales were checked."""
    from hybridlm import HybridLM

    config = ModelConfig.preset("tiny").replace(
        pattern="EE",
        hidden_size=64,
        moe_num_experts=8,
        moe_ffn_hidden_size=128,
        mlp_activation="swiglu",
        moe_router_expert_bias=True,
        init_std=0.05,
    )
    layer = HybridLM(config, seed=0).blocks["0"].layers[0].mixer
    out_std = 0.05 / 2**0.5

    def std(t):
        return t.float().std().item()

    for name, t, expected in (
        ("gate.weight", layer.gate.weight, 0.05),
        ("experts.up_proj", layer.experts.up_proj, 0.05),
        ("experts.gate_proj", layer.experts.gate_proj, 0.05),
        ("experts.down_proj", layer.experts.down_proj, out_std),
        ("shared_experts.down_proj", layer.shared_experts.down_proj.weight, out_std),
    ):
        assert abs(std(t) / expected - 1) < 0.1, f"{name}: std {std(t):.4g} != {expected:.4g}"
    assert torch.equal(layer.gate.e_score_correction_bias, torch.zeros(8))


def test_no_balancing_loss_without_gradients():
    """The balancing loss is a training term: recorded only with gradients on (an evaluation's loss is the
    cross entropy alone, as documented in MoE.forward). The z-loss likewise."""
    config = ModelConfig.preset("tiny").replace(moe_aux_loss_coeff=0.01)
    layer = MoE(config)
    layer.init_weights(torch.Generator().manual_seed(0), 0.02, 0.01)
    x = torch.randn(2, 5, config.hidden_size)
    for z_loss_coeff, recorded in ((0.0, 1), (0.001, 2)):
        layer.config = layer.gate.config = config.replace(moe_z_loss_coeff=z_loss_coeff)
        aux_losses = []
        with torch.no_grad():
            layer(x, None, aux_losses)
        assert aux_losses == []
        layer(x, None, aux_losses)
        assert len(aux_losses) == recorded


@pytest.mark.parametrize(("groups", "topk_groups", "top_k"), [(4, 2, 3), (4, 3, 4), (2, 2, 3)])
def test_group_limited_routing_keeps_the_best_groups(groups, topk_groups, top_k):
    """Group-limited routing against a float64 computation written out (hf_hybrid.md 2.5.5): a group's score is
    the sum of its two best biased choice scores, the topk_groups best groups stay, top-k picks within them and
    the weights are the unbiased sigmoid scores, renormalized, times the routed scaling. The mixer checks used
    one group of two only, where taking the best group alone is the same."""
    config = ModelConfig.preset("tiny").replace(
        moe_num_experts=8,
        moe_top_k=top_k,
        moe_num_groups=groups,
        moe_topk_groups=topk_groups,
        moe_router_score="sigmoid",
        moe_router_expert_bias=True,
        moe_routed_scaling=2.5,
    )
    layer = MoE(config)
    gen = torch.Generator().manual_seed(groups * 10 + topk_groups)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=gen))
        layer.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=gen))
    x = torch.randn(40, config.hidden_size, generator=gen)
    _, weights, idx = layer.gate(x)

    s = (x.double() @ layer.gate.weight.double().T).sigmoid()
    choice = s + layer.gate.e_score_correction_bias.double()
    per = 8 // groups
    want_idx, want_w = [], []
    for t in range(x.shape[0]):
        group_score = [sorted(choice[t, g * per : (g + 1) * per].tolist())[-2:] for g in range(groups)]
        best = sorted(range(groups), key=lambda g: -sum(group_score[g]))[:topk_groups]
        allowed = [e for e in range(8) if e // per in best]
        chosen = sorted(allowed, key=lambda e: -choice[t, e].item())[:top_k]
        w = s[t, chosen]
        want_idx.append(chosen)
        want_w.append(2.5 * w / w.sum())
    assert idx.tolist() == want_idx
    torch.testing.assert_close(weights.double(), torch.stack(want_w), rtol=1e-5, atol=1e-6)


def test_the_router_computes_in_float32_in_a_bf16_model_and_under_autocast():
    """Routing decides which experts run: NemotronH computes it in float32 (hf_hybrid.md 2.5.5), whatever the
    activations' dtype and under bf16 autocast too."""
    from hybridlm import HybridLM

    model = HybridLM(ModelConfig.preset("tiny").replace(pattern="E"), seed=0, dtype=torch.bfloat16)
    gate = model.blocks["0"].layers[0].mixer.gate
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    want = (x.to(torch.bfloat16).double() @ gate.weight.double().T).softmax(-1)
    scores, _, _ = gate(x.to(torch.bfloat16))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _, _ = gate(x)
    want = (x.double() @ gate.weight.double().T).softmax(-1)
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half()])
def test_an_expert_bias_cast_below_float32_is_refused_at_its_update(cast):
    """``model.to(torch.bfloat16)`` made the expert bias bf16, where from |bias| 0.5 on a step of
    ``optim.moe_expert_bias_rate`` (1e-3) rounded to nothing: balancing stopped without a word.
    ``HybridLM.cast`` keeps it float32, and there it moves by the step."""
    from hybridlm import HybridLM

    config = ModelConfig.preset("tiny").replace(
        pattern="E", moe_num_experts=4, moe_router_score="sigmoid", moe_router_expert_bias=True
    )
    for narrow in (True, False):
        model = HybridLM(config, seed=0)
        layer = model.blocks["0"].layers[0].mixer
        layer.gate.e_score_correction_bias.fill_(0.6)
        cast(model) if narrow else model.cast(torch.bfloat16)
        layer.tokens_per_expert.copy_(torch.tensor([1, 2, 4, 5]))
        if narrow:
            with pytest.raises(TypeError, match=r"rounds a step of 0.001 away: cast the model with HybridLM.cast"):
                layer.update_expert_bias(1e-3)
            layer.update_expert_bias(0.0)  # zeroing the counts alone is fine
            assert layer.tokens_per_expert.sum() == 0
        else:
            layer.update_expert_bias(1e-3)
            want = torch.tensor([0.601, 0.601, 0.599, 0.599])
            assert layer.gate.e_score_correction_bias.dtype == torch.float32
            torch.testing.assert_close(layer.gate.e_score_correction_bias, want, rtol=0, atol=1e-7)


def test_a_float64_moe_model_routes_in_float64_so_its_cached_decoding_is_its_full_forward():
    """A float64 model is the reference for the caches: the router computed its logits in float32 there, so how
    many tokens one call routed (a decode step against the whole sequence) changed the logits by ~4e-10, not
    float64 rounding. Below float64 it stays float32 (test_the_router_computes_in_float32_in_a_bf16_model...)."""
    from hybridlm import HybridLM
    from hybridlm.infer.cache import InferenceCache
    from tests.helpers import tiny_config

    model = HybridLM(tiny_config("ME", moe_num_experts=3), seed=0, dtype=torch.float64).eval()
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = InferenceCache.for_model(model, 3, 12)
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(12)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-13)
    gate = model.blocks["1"].layers[0].mixer.gate
    assert gate.weight.dtype == torch.float32  # stored in float32, as cast keeps it; computed in float64
    scores, weights, _ = gate(torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert scores.dtype == weights.dtype == torch.float64


def test_a_float64_models_balancing_loss_is_its_formula_in_float64():
    """The routed shares were float32 (``counts.float()``) in a float64 model, the reference for lower precisions:
    its balancing loss was off its float64 formula by ~2e-8 relative, float32 rounding."""
    config = ModelConfig.preset("tiny").replace(
        moe_num_experts=6, moe_top_k=2, moe_router_score="sigmoid", moe_aux_loss_coeff=0.01
    )
    layer = MoE(config).double()
    layer.init_weights(torch.Generator().manual_seed(0), 0.5, 0.5)
    x = torch.randn(3, 7, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    aux_losses = []
    layer(x, None, aux_losses)
    (aux,) = aux_losses

    s = (x.reshape(-1, config.hidden_size) @ layer.gate.weight.T).sigmoid()
    share = torch.bincount(s.topk(2, dim=-1).indices.reshape(-1), minlength=6).double() / (21 * 2)
    expected = 0.01 * 6 * (share * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
    assert aux.dtype == torch.float64
    torch.testing.assert_close(aux, expected, rtol=1e-13, atol=0)


#: name -> (DeepSeek version, experts, groups, topk_groups, top_k, moe_norm_topk_prob)
DEEPSEEK = {
    "v3-groups": (3, 8, 4, 2, 3, True),
    "v3": (3, 8, 1, 1, 2, True),
    "v3-unnormalized": (3, 8, 2, 1, 2, False),
    "v3-16-experts": (3, 16, 4, 3, 5, True),
    "v2-greedy": (2, 8, 1, 1, 3, False),  # DeepSeek-V2: softmax scores, no bias, no renormalization
}


@pytest.mark.parametrize("case", list(DEEPSEEK))
def test_moe_matches_hugging_face_deepseek(case):
    """Our float64 MoE against transformers' DeepseekV3MoE (DeepseekV2Moe) holding the same weights: sigmoid
    (softmax) scores, the selection-only expert bias, group-limited top-k (a group scored by its two best
    biased scores), the unbiased weights, optionally renormalized, times the routed scaling factor, SwiGLU
    experts and a shared expert. Its router computes in float32 whatever the model's dtype: the same experts,
    weights within float32 rounding. (DeepSeek-V2's group-limited routing scores a group by its best expert
    alone, not ours: not compared.)"""
    version, experts, groups, topk_groups, top_k, norm_topk_prob = DEEPSEEK[case]
    name = f"deepseek_v{version}"
    hf_moe = pytest.importorskip(f"transformers.models.{name}.modeling_{name}")
    config = ModelConfig.preset("tiny").replace(
        moe_num_experts=experts,
        moe_top_k=top_k,
        moe_num_groups=groups,
        moe_topk_groups=topk_groups,
        moe_norm_topk_prob=norm_topk_prob,
        moe_router_score="sigmoid" if version == 3 else "softmax",
        moe_router_expert_bias=version == 3,
        moe_routed_scaling=2.5,
        moe_ffn_hidden_size=6,
        moe_shared_expert_ffn_hidden_size=12,
        mlp_activation="swiglu",
    )
    layer = make(MoE, config, seed=experts + groups + topk_groups + top_k).double()
    common = dict(
        hidden_size=config.hidden_size,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=groups,
        topk_group=topk_groups,
        routed_scaling_factor=2.5,
        moe_intermediate_size=6,
        n_shared_experts=2,  # a shared expert of 2 * moe_intermediate_size
        hidden_act="silu",
    )
    if version == 3:
        hcfg = hf_moe.DeepseekV3Config(**common, norm_topk_prob=norm_topk_prob)
    else:
        hcfg = hf_moe.DeepseekV2Config(**common, topk_method="greedy")  # V2 never renormalizes
    hcfg._experts_implementation = "eager"
    hf = (hf_moe.DeepseekV3MoE if version == 3 else hf_moe.DeepseekV2Moe)(hcfg).double()
    ours = layer.state_dict()
    hf_state = {
        "gate.weight": ours["gate.weight"],
        "experts.gate_up_proj": torch.cat([layer.experts.gate_proj, layer.experts.up_proj], dim=1),
        "experts.down_proj": ours["experts.down_proj"],
        **{f"shared_experts.{n}": ours[f"shared_experts.{n}"] for n in hf.shared_experts.state_dict()},
    }
    if version == 3:
        hf_state["gate.e_score_correction_bias"] = ours["gate.e_score_correction_bias"]
    hf.load_state_dict(hf_state, strict=True)
    x = torch.randn(3, 5, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(experts))
    with torch.no_grad():
        _, weights, idx = layer.gate(x.reshape(-1, config.hidden_size))
        _, hf_weights, hf_idx = hf.gate(x)
        # Hugging Face's top-k is unsorted: compare each token's (expert, weight) pairs in expert order.
        order, hf_order = idx.argsort(-1), hf_idx.argsort(-1)
        assert torch.equal(idx.gather(1, order), hf_idx.gather(1, hf_order))
        assert_rel_close(weights.gather(1, order), hf_weights.gather(1, hf_order).double(), 1e-6, "weights")
        assert_rel_close(layer(x), hf(x), 1e-6, "output")


def test_the_shared_expert_gate_scales_the_shared_expert_per_token_by_a_sigmoid():
    """moe_shared_expert_gate (Megatron-LM's field; Qwen3-Next's shared_expert_gate): the layer's output is the
    ungated layer's routed part plus sigmoid(x w) times the shared expert, one scale per token, from a (1, H) weight.
    Written out here in float64 from the same weights, for tokens whose gates span (0, 1)."""
    config = ModelConfig.preset("tiny").replace(
        pattern="E", moe_shared_expert_ffn_hidden_size=16, moe_shared_expert_gate=True
    )
    layer = make(MoE, config, seed=3).double()
    ungated = MoE(config.replace(moe_shared_expert_gate=False)).double()
    ungated.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "shared_expert_gate.weight"})
    assert tuple(layer.shared_expert_gate.weight.shape) == (1, config.hidden_size)
    x = torch.randn(2, 7, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flat = x.reshape(-1, config.hidden_size)
    gate = 1 / (1 + torch.exp(-(flat @ layer.shared_expert_gate.weight[0])))  # (T,)
    assert gate.min() < 0.3 and gate.max() > 0.7  # the gate decides, per token
    shared = layer.shared_experts(flat)
    expected = ungated(x).reshape(-1, config.hidden_size) - shared + gate[:, None] * shared
    assert_rel_close(layer(x).reshape(-1, config.hidden_size), expected, 1e-12)


def test_the_shared_expert_gate_is_drawn_last_and_leaves_every_other_weight_as_without_it():
    """Turning the gate on adds one (1, H) weight, N(0, init_std) as Megatron initializes its gate_weight, drawn
    after every other: the rest of the model is bitwise the model without the gate at the same seed."""
    from hybridlm import HybridLM

    config = ModelConfig.preset("tiny").replace(init_std=0.05)
    gated = HybridLM(config.replace(moe_shared_expert_gate=True), seed=0)
    plain = HybridLM(config, seed=0)
    a, b = gated.state_dict(), plain.state_dict()
    extra = sorted(set(a) - set(b))
    assert extra and all(k.endswith("mixer.shared_expert_gate.weight") for k in extra) and set(b) <= set(a)
    assert all(torch.equal(a[k], b[k]) for k in b)
    w = torch.cat([a[k] for k in extra], dim=1)
    assert abs(w.std().item() / 0.05 - 1) < 0.15


@pytest.mark.gpu
def test_a_compiled_moe_layers_training_step_is_the_eager_one_on_the_gpu():
    """bench-moe-1b's MoE layer (64 experts, top 6, grouped_mm) on 2 x 4096 tokens under bf16 autocast, forward and
    backward compiled and eager: the same output and gradients up to bf16's rounding. A route that wrote the expert
    outputs back in pair order through autograd Functions ran eagerly and made grouped_mm's backward fail compiled
    (a device-side assert: a group's rows not 16-byte aligned), which no CPU test could see."""
    config = ModelConfig.preset("bench-moe-1b")
    torch.manual_seed(0)
    layer = make(MoE, config).cuda()
    x = torch.randn(2, 4096, config.hidden_size, device="cuda")

    def step(fn):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xg)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
        torch.cuda.synchronize()
        return [y.detach().float(), xg.grad] + [p.grad for p in layer.parameters() if p.grad is not None]

    eager, compiled = step(layer), step(torch.compile(layer))
    assert len(eager) == len(compiled) > 3
    errors = [rel_err(a, b) for a, b in zip(compiled, eager, strict=True)]
    print("compiled against eager, relative errors (output, input grad, parameter grads):", errors)
    assert max(errors) <= 5e-2, errors
