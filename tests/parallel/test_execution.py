"""Execution choices applied from outside the model change how it runs, never what it computes."""

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.parallel.execution import apply_activation_checkpointing, compile_blocks
from hybridlm.parallel.pipeline import build_stage
from tests.helpers import (
    MLA_TINY,
    assert_rel_close,
    interpreter_only,
    runs_triton_kernels,
    subprocess_env,
    tiny_config,
)


def _loss_and_grads(model, ids):
    loss = model(ids, torch.roll(ids, -1, 1)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "router_losses",
    [
        dict(moe_aux_loss_coeff=0.01),
        # the per-sequence balancing loss and the z-loss, each counted once too
        dict(moe_aux_loss_coeff=0.01, moe_aux_loss_type="seq_aux_loss", moe_z_loss_coeff=0.001),
    ],
)
def test_activation_checkpointing_is_exact(router_losses):
    config = tiny_config("M-[*E]G-/[*-]", **router_losses)
    ids = torch.randint(0, 97, (2, 21))
    plain = HybridLM(config, seed=1)
    ac = apply_activation_checkpointing(HybridLM(config, seed=1))
    names_before = [n for n, _ in HybridLM(config, seed=1).named_parameters()]
    assert [n for n, _ in ac.named_parameters()] == names_before  # no wrapper prefixes
    (la, ga), (lb, gb) = _loss_and_grads(plain, ids), _loss_and_grads(ac, ids)
    assert torch.equal(la, lb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_activation_checkpointing_is_exact_with_mla_and_dsa():
    """The DSA top-k selection is recomputed identically, and the indexer loss is counted once."""
    config = tiny_config("M-[DE]+/[D-]", **MLA_TINY, dsa_indexer_loss_coeff=0.1, moe_aux_loss_coeff=0.01)
    ids = torch.randint(0, 97, (2, 21))
    (la, ga), (lb, gb) = (
        _loss_and_grads(HybridLM(config, seed=1), ids),
        _loss_and_grads(apply_activation_checkpointing(HybridLM(config, seed=1)), ids),
    )
    assert torch.equal(la, lb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_pipeline_stage_keeps_global_block_names():
    stage = build_stage(tiny_config("M-|[*-]G|E-"), 1, 3)
    assert list(stage.blocks) == ["2", "3"] and stage.embeddings is None and stage.norm_f is None
    assert {n.split(".")[1] for n, _ in stage.named_parameters()} == {"2", "3"}


def test_a_stage_of_an_empty_segment_builds_with_no_parameters():
    """The pattern language allows an empty segment between '|'s (hybridlm pattern shows its rank with no
    blocks); building that stage gave a bare StopIteration (training refuses it: nothing to save)."""
    stage = build_stage(tiny_config("M-||*-"), 1, 3)
    assert list(stage.blocks) == [] and not list(stage.parameters())


def test_every_stage_knows_it_is_not_the_whole_model():
    # The first stage keeps the embedding, the last keeps norm_f and the head: each lacks something.
    config = tiny_config("M-|[*-]G|E-")
    assert HybridLM(config).is_whole
    assert not any(build_stage(config, rank, 3).is_whole for rank in range(3))
    assert build_stage(config, 0, 1).is_whole  # one stage is the whole model


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    config = tiny_config("M-[*-]G[ME]")
    ids = torch.randint(0, 97, (2, 21))
    eager = HybridLM(config, seed=2)
    compiled = compile_blocks(HybridLM(config, seed=2))
    (la, ga), (lb, gb) = _loss_and_grads(eager, ids), _loss_and_grads(compiled, ids)
    assert_rel_close(lb, la, 1e-5, "loss")
    for n in ga:
        assert_rel_close(gb[n], ga[n], 1e-4, n)


def test_selective_activation_checkpointing_is_exact_and_per_kind():
    import pytest

    from hybridlm.parallel.execution import parse_ac_policy

    config = tiny_config("M-[*-]G[ME]")
    ids = torch.randint(0, config.vocab_size, (2, 19))
    ref = HybridLM(config, seed=1)
    ref(ids, ids).loss.backward()
    for policy in ("selective", "M=selective,*=full,G=none"):
        model = apply_activation_checkpointing(HybridLM(config, seed=1), policy)
        if policy != "selective":
            kinds = {
                b.symbols: (b.activation_checkpointing, b.checkpoint_context_fn is not None)
                for b in model.blocks.values()
            }
            assert kinds["M"] == (True, True) and kinds["*-"] == (True, False) and kinds["G"] == (False, False)
            assert kinds["ME"] == (True, True)  # a fused block takes its sequence mixer's policy
            assert kinds["-"] == (True, False)  # not named: recomputed whole
        model(ids, ids).loss.backward()
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(p.grad, q.grad), (policy, name)
    with pytest.raises(ValueError, match="'Q' is not a layer symbol"):
        parse_ac_policy("Q=full")
    with pytest.raises(ValueError, match="'some' is not one of"):
        parse_ac_policy("M=some")
    with pytest.raises(ValueError, match="'M' is named twice"):  # the last one won without a word
        parse_ac_policy("M=full,*=none,M=none")


@runs_triton_kernels
@interpreter_only  # on a GPU, tests/train/test_trainer.py's recomputation test runs the kernels
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_is_exact_on_the_kernels(policy):
    """The GPU's kernel paths (here in Triton's interpreter) under recomputation: each custom op's
    backward must read its saved tensors once, and recomputing must give the stored values. The
    Mamba2 core op read them three times (CheckpointError in every eager GPU run with it)."""
    from hybridlm.ops.dispatch import use_kernels

    config = tiny_config("M-[*-]G[ME]")
    ids = torch.randint(0, config.vocab_size, (2, 19))
    with use_kernels("triton"):
        ref = HybridLM(config, seed=1)
        ref(ids, ids).loss.backward()
        model = apply_activation_checkpointing(HybridLM(config, seed=1), policy)
        model(ids, ids).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_selective_checkpointing_keeps_the_attention_output():
    """Under "selective" the backward recomputes norms and the like, not attention (on CPU SDPA is
    ``_scaled_dot_product_flash_attention_for_cpu``): its forward runs once per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket.__name__)
            self.calls[name] = self.calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    config = tiny_config("*-")
    ids = torch.randint(0, config.vocab_size, (2, 19))
    model = apply_activation_checkpointing(HybridLM(config, seed=1), "selective")
    with Count() as count:
        model(ids, ids).loss.backward()
    forwards = {k: v for k, v in count.calls.items() if "scaled_dot_product" in k and "backward" not in k}
    assert forwards and all(v == 1 for v in forwards.values()), forwards


def test_selective_checkpointing_keeps_float8_matmuls_and_is_exact():
    """Under "selective" a float8 linear layer's forward matmul is saved like a bf16 one, not run again in the
    backward: checkpointing's dispatch mode sees it as ``mm`` on torchao's float8 tensors (the ``_scaled_mm`` below
    runs inside torchao's subclass), which the policy's ``mm`` entry keeps. Three float8 matmuls per layer and step
    (forward, input and weight gradients), and the loss and gradients of the float8 model without checkpointing,
    bit for bit."""
    pytest.importorskip("torchao")
    from torch.utils._python_dispatch import TorchDispatchMode

    from hybridlm.ops.float8 import apply_float8

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            float8 = any(type(a).__name__ == "Float8TrainingTensor" for a in args)
            self.calls += func.overloadpacket.__name__ == "mm" and float8
            return func(*args, **(kwargs or {}))

    config = tiny_config("*-M-")
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = HybridLM(config, seed=1)
    layers = len(apply_float8(plain, "tensorwise"))
    loss, grads = _loss_and_grads(plain, ids)
    model = HybridLM(config, seed=1)
    apply_float8(model, "tensorwise")
    apply_activation_checkpointing(model, "selective")
    with Count() as count:
        got, got_grads = _loss_and_grads(model, ids)
    assert layers > 0 and count.calls == 3 * layers
    assert torch.equal(got, loss) and all(torch.equal(got_grads[n], g) for n, g in grads.items())


def _train_and_evaluate_at_two_shapes(model: HybridLM) -> None:
    """A training step and an evaluation forward at batch 2, then 3: every graph a block kind may need."""
    for batch in (2, 3):
        ids = torch.randint(0, 97, (batch, 9))
        model.train()
        model(ids, torch.roll(ids, -1, 1)).loss.backward()
        model.eval()
        with torch.no_grad():
            model(ids)


def test_compiled_blocks_keep_a_graph_per_kind_mode_and_shape():
    """Many block kinds, each traced for training and evaluation and at a second batch shape, stay
    compiled: dynamo's per-code-object cap (8 graphs by default) would otherwise send the later
    blocks to eager mode. ``fail_on_recompile_limit_hit`` turns that fallback into an error."""
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    config = tiny_config("-*E[*-][*E]-")
    model = HybridLM(config, seed=0)
    with dynamo_config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
        compile_blocks(model, backend="eager")  # tracing only (fast); raises the limit for 5 kinds
        _train_and_evaluate_at_two_shapes(model)
    torch._dynamo.reset()


def test_models_compiled_one_after_another_stay_compiled():
    """The graphs of models compiled earlier in the process count against dynamo's cap on
    ``Block.forward``: a later model's blocks must still fit (on an H100, a float8 run compiled after
    two others ran blocks eagerly, and its losses left the compiled run's)."""
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    with dynamo_config.patch(fail_on_recompile_limit_hit=True, recompile_limit=1):
        # The same kinds traced again for another backend (as another compile mode or float8's layers would be).
        for backend in ("eager", "aot_eager"):
            model = HybridLM(tiny_config("-*E[*-]"), seed=0)
            compile_blocks(model, backend=backend)
            _train_and_evaluate_at_two_shapes(model)
    torch._dynamo.reset()


def _graph_breaks(model: HybridLM, ids: torch.Tensor, kernels: str) -> dict[str, list[str]]:
    """Each block kind's graph breaks, as dynamo traces the block on the inputs the model gives it."""
    from hybridlm.ops.dispatch import use_kernels

    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a)) for n, b in model.blocks.items()]
    model(ids, torch.roll(ids, -1, 1))
    for h in hooks:
        h.remove()
    torch._dynamo.reset()
    breaks = {}
    with use_kernels(kernels):
        for name, block in model.blocks.items():
            found = torch._dynamo.explain(block)(*inputs[name])
            breaks[block.symbols] = [str(r.reason).splitlines()[0] for r in found.break_reasons]
    torch._dynamo.reset()
    return breaks


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=[runs_triton_kernels, interpreter_only])])
@pytest.mark.parametrize("pattern", ["M-G-*-[*-][M-][G-]", "+-D-[D-]", "+-D-[D-] with the indexer loss"])
def test_compiled_blocks_have_no_graph_breaks(pattern, kernels):
    """A graph break splits a compiled block (and its CUDA graphs) in parts. Under torch 2.11 and
    Python 3.11 the Mamba2 core's ``dataclasses.astuple`` broke every Mamba2 block five times (the
    triton case fails there on that code; torch 2.13 traces it). On the CPU, MoE's per-expert loop
    needs the counts on the host, a break by design; the GPU test covers MoE. DSA with its indexer loss runs
    its checkpointed chunks and the loss target's op inside the block."""
    pattern, _, loss = pattern.partition(" with ")
    model = HybridLM(tiny_config(pattern, **MLA_TINY, dsa_indexer_loss_coeff=0.5 if loss else 0.0), seed=0)
    breaks = _graph_breaks(model, torch.randint(0, 97, (2, 24)), kernels)
    assert breaks and not any(breaks.values()), breaks


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["M-G-*-E[*E][M-][GE]", "+-D-[DE]", "+-D-[DE] with the indexer loss"])
def test_gpu_compiled_blocks_have_no_graph_breaks(pattern):
    """The GPU's paths (Triton kernels, grouped_mm experts, bf16 autocast) trace without a break; DSA's indexer loss
    runs its target's kernels."""
    from hybridlm.ops.dispatch import paths_used, reset_paths

    pattern, _, loss = pattern.partition(" with ")
    config = tiny_config(pattern, **MLA_TINY, dsa_indexer_loss_coeff=0.5 if loss else 0.0)
    model = HybridLM(config, seed=0).cuda()
    reset_paths()
    with torch.autocast("cuda", torch.bfloat16):
        breaks = _graph_breaks(model, torch.randint(0, 97, (2, 256), device="cuda"), "auto")
    assert breaks and not any(breaks.values()), breaks
    # The blocks' eager forward took the GPU's paths (a dispatch falling back to torch traced only the reference).
    kernels = ("mamba2_core", "gated_delta", "add_rms_norm") if "M" in pattern else ("add_rms_norm",)
    kernels += ("index_scores", "index_topk") if "D" in pattern else ()
    kernels += ("index_target",) if loss else ()
    used = paths_used()
    assert {op: used.get(op) for op in kernels} == dict.fromkeys(kernels, "triton"), used
    assert used.get("moe_experts") == "grouped_mm", used


def test_blocks_with_auxiliary_losses_share_one_compiled_graph(monkeypatch):
    """Each MoE block appends its load-balancing loss to the forward's list. Traced inside the
    compiled block, that append made dynamo guard on the list's length, so every MoE block got a
    graph of its own, and past the recompile limit the rest ran eagerly (seen on the H200 with
    ``bench-moe-1b``). Six blocks of one kind must fit the limit ``compile_blocks`` sets for one
    kind, and every block's loss is still counted once."""
    import torch._dynamo.config as dynamo_config

    from hybridlm.layers.moe import Experts

    # The expert path without a host sync, as grouped_mm is on CUDA (the CPU loop splits by
    # counts on the host, a graph break that would hide the guard this test is about).
    monkeypatch.setattr(Experts, "forward", Experts.dense)
    torch._dynamo.reset()
    config = tiny_config("EEEEEE", moe_aux_loss_coeff=0.01)
    ids = torch.randint(0, 97, (2, 9))
    eager = HybridLM(config, seed=0)(ids, torch.roll(ids, -1, 1))
    model = HybridLM(config, seed=0)
    with dynamo_config.patch(fail_on_recompile_limit_hit=True, recompile_limit=1):
        compile_blocks(model, backend="eager")  # raises the limit to what one block kind needs
        out = model(ids, torch.roll(ids, -1, 1))
    torch._dynamo.reset()
    assert_rel_close(out.aux_loss, eager.aux_loss, 1e-6, "aux loss")
    assert_rel_close(out.loss, eager.loss, 1e-6, "loss")


def test_compile_blocks_spells_a_mode_out_as_options_beside_the_cpu_options(monkeypatch):
    """torch.compile refuses ``mode`` together with ``options``; on CPU compile_blocks always passes
    options (scalar C++ code), so a mode such as train.compile_mode's must become its options."""
    from hybridlm.model import Block

    seen = []
    monkeypatch.setattr(Block, "compile", lambda self, **kw: seen.append(kw))
    model = HybridLM(tiny_config("M-*"), seed=0)
    compile_blocks(model, mode="max-autotune-no-cudagraphs")
    assert len(seen) == 3 and all("mode" not in kw for kw in seen)
    assert seen[0]["options"]["cpp.simdlen"] == 1 and seen[0]["options"]["max_autotune"] is True
    compile_blocks(model)
    assert seen[-1] == {"options": {"cpp.simdlen": 1}}


def _saved_and_grads(model, ids):
    """(shape, dtype) of each distinct tensor the forward keeps for the backward, the loss and the
    gradients, under bf16 autocast (the trainer's GPU setting; here on the CPU)."""
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), tuple(t.shape), t.dtype)] = (tuple(t.shape), t.dtype)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = _loss_and_grads(model, ids)
    return sorted(saved.values(), key=str), loss, grads


def test_compiled_fused_blocks_keep_the_seam_sum_with_save_seams():
    # Unfused blocks keep h = x + attention(x) as the MLP block's input; a compiled fused block
    # keeps the bf16 attention output instead and recomputes h in its backward, unless
    # save_seams: then it keeps what the unfused pair keeps, and computes the same bits.
    torch._dynamo.reset()
    overrides = dict(hidden_size=64, num_attention_heads=2, num_query_groups=1, head_dim=32, ffn_hidden_size=128)
    ids = torch.randint(0, 97, (2, 64))
    runs = {
        name: _saved_and_grads(compile_blocks(HybridLM(tiny_config(p, **overrides), seed=3), save_seams=s), ids)
        for name, p, s in (("unfused", "*-*-", False), ("fused", "[*-][*-]", False), ("saved", "[*-][*-]", True))
    }
    (u_saved, u_loss, u_grads), (f_saved, _, _), (s_saved, s_loss, s_grads) = runs.values()
    moe = compile_blocks(HybridLM(tiny_config("[*-][*E]", **overrides)), backend="eager", save_seams=True)
    assert [b.seam_context_fn is not None for b in moe.blocks.values()] == [True, False]  # MoE: left alone
    h = ((2, 64, 64), torch.float32)
    assert u_saved.count(h) > f_saved.count(h)  # without save_seams the fused blocks recompute h
    assert s_saved == u_saved
    assert torch.equal(s_loss, u_loss)
    assert len(s_grads) == len(u_grads)
    for (n, a), b in zip(u_grads.items(), s_grads.values()):  # the same layers in the same order
        assert torch.equal(b, a), n


def test_seam_region_run_eagerly_is_a_plain_checkpoint():
    # A backend that runs the traced graph as it is (or a graph break in the block) runs the seam
    # region as an eager checkpoint: there it recomputes rather than caching every op's output
    # (a cache that refused F.rms_norm's own in-place add of eps), with the same values.
    torch._dynamo.reset()
    config = tiny_config("M[*-][G-]")
    ids = torch.randint(0, 97, (2, 21))
    (la, ga), (lb, gb) = (
        _loss_and_grads(m, ids)
        for m in (HybridLM(config, seed=2), compile_blocks(HybridLM(config, seed=2), backend="eager"))
    )
    assert torch.equal(la, lb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
    torch._dynamo.reset()


def test_save_seams_drops_only_torchs_in_place_notice():
    # torch prints a notice once per process when a checkpoint with a context_fn is compiled; the
    # seam regions are ours and checked, so compile_blocks drops that message, and only that one.
    import logging

    compile_blocks(HybridLM(tiny_config("[*-]"), seed=0), backend="eager")
    notices = logging.getLogger("torch._higher_order_ops.wrap")

    def passes(msg):
        return notices.filter(logging.LogRecord(notices.name, logging.WARNING, __file__, 1, msg, None, None))

    assert not passes("\nDetected that context_fn is passed to torch.utils.checkpoint under torch.compile.\nPlease ...")
    assert passes("some other warning")


@pytest.mark.multiprocess
@pytest.mark.parametrize("pattern", ["M-E-[*E]/[*E]", "D-[DE]"])
def test_fsdp_keeps_every_blocks_auxiliary_loss(tmp_path, pattern):
    """FSDP2 hands each sharded block copies of its dataclass arguments: a loss put into the shared
    context was lost after the first block. Blocks return theirs; two ranks give one process's sum."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import run_failure

    root = Path(__file__).resolve().parents[2]
    env = subprocess_env()
    script = root / "tests/distributed/fsdp_aux_losses.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    r = subprocess.run(
        [*cmd, str(tmp_path / "out.json"), pattern], env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, run_failure(r)
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["plain"] > 0 and abs(got["sharded"] - got["plain"]) <= 1e-6 * got["plain"], got


@pytest.mark.multiprocess
def test_the_global_balancing_loss_of_two_ranks_is_the_whole_batchs(tmp_path):
    """moe_aux_loss_type = "global_aux_loss" with the routed-token counts summed over two ranks
    (share_expert_counts): the ranks' losses average to the one-process loss of both ranks' rows, their weighted
    router gradients sum to its gradient, eagerly and recomputed under activation checkpointing; the plain loss
    of each rank's own rows averages to something else (so a reducer that did nothing would fail)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import run_failure

    script = Path(__file__).resolve().parents[2] / "tests/distributed/global_aux_loss.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    r = subprocess.run([*cmd, str(tmp_path / "out.json")], env=subprocess_env(), capture_output=True, text=True,
                       timeout=180)  # fmt: skip
    assert r.returncode == 0, run_failure(r)
    got = json.loads((tmp_path / "out.json").read_text())
    whole = got["whole"]
    assert abs(got["local_mean"] - whole) > 1e-3 * whole, got
    for how in ("eager", "checkpointed"):
        assert abs(got[how]["aux_mean"] - whole) <= 1e-6 * whole and got[how]["grad_err"] <= 1e-5, (how, got)


def _micro_batches(config, wrap, compile_backend=None, steps=1):
    """Two micro-batches a step through a model with StepCounts routers (``wrap``: checkpointing or not; then
    compiled with ``compile_backend``): each micro-batch's aux loss, the accumulated router gradients, the counts."""
    from hybridlm.parallel.execution import share_expert_counts

    model = wrap(HybridLM(config, seed=0))
    if compile_backend is not None:
        compile_blocks(model, backend=compile_backend)
    counts = share_expert_counts(model)
    gen = torch.Generator().manual_seed(1)
    aux = []
    for _ in range(steps):
        for c in counts:
            c.reset()
        for _ in range(2):
            ids = torch.randint(0, config.vocab_size, (2, 24), generator=gen)
            out = model(ids, torch.roll(ids, -1, 1))
            out.aux_loss.backward()
            aux.append(out.aux_loss.detach())
    grads = [m.gate.weight.grad.clone() for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    return aux, grads, counts


def test_global_balancing_counts_the_steps_micro_batches_so_far():
    """moe_aux_loss_type = "global_aux_loss" with share_expert_counts (one process): micro-batch m balances with the
    routed-pair counts of micro-batches 1..m (Megatron's running count over its ga_steps), and a step starts from
    nothing: a router's second call is the balancing loss with the first call's counts added, written out here."""
    from hybridlm.layers.moe import Router, balancing_loss
    from hybridlm.parallel.execution import StepCounts

    config = tiny_config("E", moe_aux_loss_coeff=1.0, moe_aux_loss_type="global_aux_loss", moe_num_experts=4)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    xs = torch.randn(2, 12, config.hidden_size, generator=torch.Generator().manual_seed(1))
    router.count_reducer = StepCounts()
    losses = []
    for x in xs:
        aux: list[torch.Tensor] = []
        scores, _, idx = router(x, aux)
        losses.append((aux[0], scores, idx))
    (first, s1, i1), (second, s2, i2) = losses
    counts1 = torch.zeros(1, 4, dtype=torch.long).scatter_add_(1, i1.reshape(1, -1), torch.ones_like(i1.reshape(1, -1)))
    assert torch.equal(first, balancing_loss(s1, i1))  # the first micro-batch: its own counts
    assert torch.equal(second, balancing_loss(s2, i2, reduce_counts=lambda c: c + counts1))
    assert second != balancing_loss(s2, i2)  # (which the running count changes here)
    router.count_reducer.reset()
    aux = []
    router(xs[1], aux)
    assert torch.equal(aux[0], balancing_loss(s2, i2))  # a new step counts from nothing


@pytest.mark.parametrize("compile_backend", [None, "eager"])
def test_a_recomputed_router_balances_with_the_counts_its_forward_used(compile_backend):
    """Under activation checkpointing a router routes again in the backward: it gets the counts its forward used
    (not counted twice), so two micro-batches of two steps give the eager run's aux losses and router gradients,
    also with the blocks compiled (torch.compile leaves the running count out of its graphs)."""
    config = tiny_config("M-E[*E]", moe_aux_loss_coeff=0.01, moe_aux_loss_type="global_aux_loss", init_std=0.5)
    aux, grads, counts = _micro_batches(config, lambda m: m, steps=2)
    assert all(len(c.used) == 2 for c in counts)  # nothing recomputed: each forward's counts left until the reset
    ckpt_aux, ckpt_grads, ckpt_counts = _micro_batches(config, apply_activation_checkpointing, compile_backend, 2)
    assert all(len(c.used) == 0 for c in ckpt_counts)  # each recomputation took its forward's counts
    for a, b in zip(ckpt_aux, aux):
        assert_rel_close(a, b, 1e-6, "aux loss")
    for a, b in zip(ckpt_grads, grads):
        assert_rel_close(a, b, 1e-6, "router gradient")
    plain = config.replace(moe_aux_loss_type="aux_loss")
    assert not torch.allclose(_micro_batches(plain, lambda m: m)[0][1], aux[1])  # the second micro-batch's differs


def test_a_reset_between_a_forward_and_its_recomputation_is_refused():
    from hybridlm.parallel.execution import share_expert_counts

    config = tiny_config("E", moe_aux_loss_coeff=0.01, moe_aux_loss_type="global_aux_loss")
    model = apply_activation_checkpointing(HybridLM(config, seed=0))
    counts = share_expert_counts(model)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    out = model(ids, torch.roll(ids, -1, 1))
    counts[0].reset()
    with pytest.raises(RuntimeError, match="found no forward's counts to use again"):
        out.loss.backward()


def test_clip_grad_norm_never_scales_a_small_gradient_up(monkeypatch):
    """The clip factor is clamped at 1: a gradient whose norm is below max_norm was scaled up to it."""
    from hybridlm.parallel import execution

    monkeypatch.setattr(execution.dist, "all_reduce", lambda t, *a, **k: None)  # one process: sum of one
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([0.3, 0.4])  # norm 0.5
    norm = execution.clip_grad_norm([p], 1.0, torch.device("cpu"))
    assert abs(norm - 0.5) < 1e-6
    assert torch.equal(p.grad, torch.tensor([0.3, 0.4]))
    p.grad = torch.tensor([3.0, 4.0])  # norm 5: clipped down to 1
    assert abs(execution.clip_grad_norm([p], 1.0, torch.device("cpu")) - 5.0) < 1e-5
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8]), atol=1e-5)


def test_a_stage_built_on_meta_initializes_from_the_seed_it_was_built_with():
    """build_stage(..., seed=5, device="meta") then to_empty and init_weights() gave the weights of seed 0 (the stage
    was built without its seed), not those of HybridLM(config, seed=5) that the same call on a device gives."""
    config = tiny_config("M-|[*-]G|E-")
    stage = build_stage(config, 1, 3, seed=5, device="meta")
    assert stage.seed == 5
    stage.to_empty(device="cpu")
    stage.init_weights()
    want = build_stage(config, 1, 3, seed=5).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in stage.state_dict().items())


def test_a_pipeline_ranks_models_initialize_from_the_trainers_seed():
    """build_pipeline_model built the rank's model and stages without the seed (PipelineRunner initialized them from
    train.seed, but their ``seed`` said 0): ``init_weights()`` on them gave seed 0's weights."""
    from hybridlm.parallel.pipeline import build_pipeline_model

    config = tiny_config("M-*-|M-E-")
    rank, stages = build_pipeline_model(config, 1, 2, seed=5)
    assert rank.seed == 5 and all(s.seed == 5 for s in stages)
    rank.to_empty(device="cpu")
    rank.init_weights()
    want = HybridLM(config, seed=5).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in rank.state_dict().items())


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_is_exact_with_gated_attention(policy):
    """The gate's projection is a matmul (kept under "selective"), its sigmoid and product are recomputed:
    the same loss and gradients bitwise."""
    config = tiny_config("M[*-]/[*E]", attention_output_gate=True, position_embedding="rope")
    ids = torch.randint(0, 97, (2, 21))
    (la, ga), (lb, gb) = (
        _loss_and_grads(HybridLM(config, seed=1), ids),
        _loss_and_grads(apply_activation_checkpointing(HybridLM(config, seed=1), policy), ids),
    )
    assert torch.equal(la, lb)
    assert any("gate_proj" in n for n in ga)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_a_meta_built_stage_in_float8_initializes_to_the_plain_stages_weights():
    """PipelineRunner converts its rank's layers on the meta device, before init_sharded materializes them."""
    pytest.importorskip("torchao")
    from hybridlm.ops.float8 import apply_float8
    from hybridlm.parallel.execution import init_sharded
    from hybridlm.parallel.pipeline import build_pipeline_model

    config = tiny_config("M-*-|M-[*-]")
    rank, stages = build_pipeline_model(config, 1, 2, seed=5)
    assert apply_float8(rank, "tensorwise")
    init_sharded(rank, 5, stages, torch.device("cpu"))
    want = HybridLM(config, seed=5).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in rank.state_dict().items())
