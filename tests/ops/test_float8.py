"""Float8 linear layers (``ops.float8``, ``train.float8``): which layers are taken, and each one's three matmuls
against the float64 matmuls of its operands rounded to float8."""

import pytest
import torch

from hybridlm import HybridLM
from tests.helpers import MLA_TINY, tiny_config


def _loss_and_grads(model, ids):
    loss = model(ids, torch.roll(ids, -1, 1)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _float8_config():
    # hidden 32; the shared expert's gate (one output), Mamba2's in_proj (2*64 + 2*16 + 4 = 164 outputs) and MTP's
    # eh_proj (outside the blocks) stay; attention, MLP, shared-expert and GDN projections are taken.
    return tiny_config("M-[*E]G-/*-", moe_shared_expert_ffn_hidden_size=32, moe_shared_expert_gate=True)


def test_float8_takes_the_blocks_linear_layers_with_dimensions_in_sixteens():
    pytest.importorskip("torchao")
    from torch import nn

    from hybridlm.ops.float8 import apply_float8, float8_linears

    model = HybridLM(_float8_config(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_float8(model, "tensorwise")
    assert names == sorted(float8_linears(HybridLM(_float8_config(), device="meta")))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    taken = {n for n, k in kinds.items() if k == "Float8Linear"}
    assert taken == set(names)
    for name in (
        "blocks.2.layers.0.mixer.q_proj",
        "blocks.2.layers.0.mixer.o_proj",
        "blocks.2.layers.1.mixer.shared_experts.up_proj",
        "blocks.3.layers.0.mixer.in_proj_qkvz",
        "blocks.3.layers.0.mixer.out_proj",
        "blocks.1.layers.0.mixer.down_proj",
        "mtp.0.blocks.0.layers.0.mixer.k_proj",
    ):
        assert name in taken, name
    for name in (
        "blocks.0.layers.0.mixer.in_proj",  # 164 outputs
        "blocks.2.layers.1.mixer.shared_expert_gate",  # one output
        "mtp.0.eh_proj",  # outside the blocks
        "lm_head",
    ):
        assert kinds[name] != "Float8Linear", name
    # Names, values and so checkpoints are unchanged: the weights stay in the model's dtype.
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_the_auto_filter_leaves_out_what_torchaos_h100_thresholds_do():
    """``slower_in_float8`` states torchao's thresholds (``_auto_filter_for_recipe``, torchtitan's auto_filter_small_kn)
    without importing torchao (the planner runs without it): pinned to the installed torchao's, over a grid of shapes
    about every threshold, so a torchao release that moves one is caught."""
    pytest.importorskip("torchao")
    from torch import nn

    from hybridlm.ops.float8 import slower_in_float8, torchao_float8

    auto = getattr(torchao_float8(), "_auto_filter_for_recipe", None)
    if auto is None:
        pytest.skip("this torchao has no _auto_filter_for_recipe")
    sizes = (512, 1024, 1040, 2048, 2064, 4096, 4112, 8192)
    for recipe in ("tensorwise", "rowwise"):
        theirs = auto(recipe, filter_fqns=[])
        for n in sizes:
            for k in sizes:
                layer = nn.Linear(k, n, bias=False, device="meta")
                assert slower_in_float8(recipe, n, k) == (not theirs(layer, "x")), (recipe, n, k)


def test_the_auto_filter_takes_only_bench_13bs_large_layers():
    """On bench-1.3b (hidden 2,048): tensorwise leaves out only the (512, 2,048) key and value projections; rowwise
    keeps only Mamba2's in_proj and the MLP's up_proj (the two with more than 4,096 outputs); a tiny model keeps
    nothing."""
    from hybridlm import ModelConfig
    from hybridlm.ops.float8 import float8_linears, require_float8_linears

    def kinds(names):
        return {name.rsplit(".", 1)[1] for name in names}

    model = HybridLM(ModelConfig.preset("bench-1.3b"), device="meta")
    every = float8_linears(model)
    for recipe, kept in (("tensorwise", {"in_proj", "out_proj", "q_proj", "o_proj", "up_proj", "down_proj"}),
                         ("rowwise", {"in_proj", "up_proj"})):  # fmt: skip
        taken = float8_linears(model, recipe, auto_filter=True)
        assert set(taken) < set(every) and kinds(taken) == kept, recipe
        assert kinds(set(every) - set(taken)) == kinds(every) - kept, recipe
    tiny = HybridLM(tiny_config("M-*-"), device="meta")
    assert float8_linears(tiny) and not float8_linears(tiny, "tensorwise", auto_filter=True)
    with pytest.raises(ValueError, match=r"too small to gain from tensorwise float8 .*float8_auto_filter off"):
        require_float8_linears(tiny, "tensorwise", auto_filter=True)


def test_float8_leaves_dsa_indexer_in_its_precision():
    pytest.importorskip("torchao")
    from hybridlm.ops.float8 import apply_float8

    sixteens = dict(q_lora_rank=16, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=16, v_head_dim=16)
    sixteens |= dict(dsa_indexer_n_heads=16, dsa_indexer_head_dim=16)
    model = HybridLM(tiny_config("D-+-", **{**MLA_TINY, **sixteens}), seed=0)
    names = apply_float8(model, "tensorwise")
    assert "blocks.0.layers.0.mixer.q_b_proj" in names and "blocks.2.layers.0.mixer.kv_b_proj" in names
    assert not any(".indexer." in n for n in names)  # its wq_b and wk would qualify


def _e4m3_or_e5m2(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` scaled by one float32 factor onto ``dtype``'s range, rounded to it, and scaled back (in float64)."""
    top = torch.finfo(dtype).max
    scale = (top / t.detach().abs().max().double().clamp(min=1e-12)).float()
    return (t.detach().float() * scale).clamp(-top, top).to(dtype).double() / scale.double()


@pytest.mark.parametrize("name", ["blocks.2.layers.0.mixer.q_proj", "blocks.1.layers.0.mixer.down_proj"])
def test_a_float8_linear_is_the_float64_matmul_of_its_operands_rounded_to_float8(name):
    """Tensorwise float8: inputs and weights rounded to e4m3, output gradients to e5m2, each scaled by one factor
    onto the format's range; the three matmuls of forward and backward then exact in float64 up to float32 rounding,
    and far from the unrounded matmuls."""
    pytest.importorskip("torchao")
    from hybridlm.ops.float8 import apply_float8

    model = HybridLM(tiny_config("M-*-"), seed=0)
    apply_float8(model, "tensorwise")
    lin = model.get_submodule(name)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    x = torch.randn(3, 7, lin.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = lin(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    w = lin.weight
    want = {
        "output": (y, _e4m3_or_e5m2(x, e4) @ _e4m3_or_e5m2(w, e4).T, x.detach() @ w.detach().T),
        "input gradient": (x.grad, _e4m3_or_e5m2(g, e5) @ _e4m3_or_e5m2(w, e4), g @ w.detach()),
        "weight gradient": (
            w.grad,
            _e4m3_or_e5m2(g, e5).flatten(0, 1).T @ _e4m3_or_e5m2(x, e4).flatten(0, 1),
            g.flatten(0, 1).T @ x.detach().flatten(0, 1),
        ),
    }
    for what, (got, ref, unrounded) in want.items():
        err = (got.double() - ref).abs().max() / ref.abs().max()
        off = (unrounded.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-6 and off > 1e-3, (what, err.item(), off.item())


def test_a_float8_model_trains_close_to_the_float32_one():
    pytest.importorskip("torchao")
    from hybridlm.ops.float8 import apply_float8

    config = _float8_config()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    la, ga = _loss_and_grads(HybridLM(config, seed=1), ids)
    model = HybridLM(config, seed=1)
    apply_float8(model, "tensorwise")
    lb, gb = _loss_and_grads(model, ids)
    assert abs(lb - la) / la < 1e-2
    for n, g in ga.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), gb[n].flatten(), dim=0)
        assert cos > 0.95, (n, cos.item())


def test_float8_refuses_an_unknown_recipe_and_says_how_to_get_torchao(monkeypatch):
    import sys

    from hybridlm.ops.float8 import apply_float8

    model = HybridLM(tiny_config("M-*-"), seed=0)
    with pytest.raises(ValueError, match="'fp8' is not one of none, tensorwise, rowwise"):
        apply_float8(model, "fp8")
    assert apply_float8(model, "none") == []
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ImportError, match=r"float8 training needs torchao .*pip install torchao"):
        apply_float8(model, "tensorwise")


def test_getting_torchao_prints_none_of_its_import_warnings():
    """torch 2.13 logs a deprecation warning for each Enum torchao registers as a pytree constant, and torchao one
    for each compiled extension that does not match torch: noise in a training run's output, none of it the user's.
    In a fresh process, where the import really runs."""
    pytest.importorskip("torchao")
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    code = "from hybridlm.ops.float8 import torchao_float8; torchao_float8(); print('ok')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert done.stderr == ""


def test_a_torchao_without_the_float8_recipes_is_refused_with_the_version_to_install(monkeypatch):
    """An old torchao imports, but its float8 API lacked the recipes by name: an ImportError naming the version, which
    the trainer turns into its train.float8 error, instead of an AttributeError in the middle of building."""
    import sys
    import types

    from hybridlm.ops.float8 import torchao_float8

    old = types.ModuleType("torchao")
    old.__version__ = "0.5.0"
    old.float8 = types.ModuleType("torchao.float8")
    old.float8.Float8LinearConfig = type("Float8LinearConfig", (), {})
    monkeypatch.setitem(sys.modules, "torchao", old)
    monkeypatch.setitem(sys.modules, "torchao.float8", old.float8)
    with pytest.raises(
        ImportError, match=r"torchao 0\.5\.0 has no float8 training recipes .*pip install 'torchao>=0\.18'"
    ):
        torchao_float8()
