"""Triton decode-step kernels (SSD state update, from raw dt too; Gated DeltaNet's step; conv carry-over) against
float64 recurrences.

On CPU they run in Triton's interpreter (float32 inputs); on a GPU compiled, and the ``gpu`` test
checks bf16 inputs at the decode shapes of ``bench-1.3b``.
"""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.conv import causal_conv1d_reference
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.ssd import ssd_reference
from hybridlm.ops.step import causal_conv1d_with_state, gdn_step, mamba2_step, ssd_step
from tests.helpers import assert_rel_close, rel_err, runs_triton_kernels

pytestmark = runs_triton_kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ssd_inputs(b, L, h, p, G, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, L, h, 2 * p, generator=g)
    x = wide[..., p:]  # strided along p's neighbours, as a split of the conv output is
    dt = F.softplus(torch.randn(b, L, h, generator=g) - 1)
    A = -torch.rand(h, generator=g) * 3
    B, C = torch.randn(b, L, G, n, generator=g), torch.randn(b, L, G, n, generator=g)
    D = torch.randn(h, generator=g)
    init = torch.randn(b, h, p, n, generator=g)
    cast = [t.to(DEV, dtype) for t in (x, B, C)]
    return cast[0], dt.to(DEV), A.to(DEV), cast[1], cast[2], D.to(DEV), init.to(DEV)


@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 3, 2, 5), (1, 2, 70, 1, 16)])  # p = 70: two tiles of head channels
def test_triton_ssd_steps_equal_the_float64_recurrence(with_d, shape):
    b, h, p, G, n = shape
    L = 6
    x, dt, A, B, C, D, init = ssd_inputs(b, L, h, p, G, n)
    D = D if with_d else None
    ref, ref_state = ssd_reference(
        *(t.double() for t in (x, dt, A, B, C)), D=None if D is None else D.double(), initial_state=init.double()
    )
    state, ys = init.clone(), []
    reset_paths()
    with use_kernels("triton"):
        for t in range(L):
            y, out_state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D=D, inplace=True)
            assert out_state is state and y.dtype == x.dtype and y.shape == (b, h, p)
            ys.append(y)
    assert paths_used()["ssd_step"] == "triton"
    assert_rel_close(torch.stack(ys, 1), ref, 1e-5, "y")
    assert_rel_close(state, ref_state, 1e-5, "state")


@pytest.mark.parametrize(("block_p", "warps"), [(16, 4), (32, 8)])
def test_triton_ssd_steps_at_other_tile_settings_equal_the_float64_recurrence(monkeypatch, block_p, warps):
    """The settings ``benchmarks/step_kernel.py`` times against the default (SSD_STEP_BLOCK_P, SSD_STEP_WARPS) compute
    the same steps: 70 head channels in tiles of 16 or 32 (the last one partial), from raw dt too."""
    from hybridlm.ops import step_triton

    monkeypatch.setattr(step_triton, "SSD_STEP_BLOCK_P", block_p)
    monkeypatch.setattr(step_triton, "SSD_STEP_WARPS", warps)
    test_triton_ssd_steps_equal_the_float64_recurrence(True, (1, 2, 70, 1, 16))
    test_triton_mamba2_steps_from_raw_dt_equal_the_float64_recurrence((1, 2, 70, 1, 16), 0.05)


def raw_dt_inputs(b, L, h, seed=0):
    """Raw dt (b, L, h) whose ``dt + dt_bias`` covers softplus's every branch: far below 0 (where log(1 + t) alone
    would round to 0), near 0, near torch's threshold 20 on both sides, and above it; dt_bias, A_log (h,)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.tensor([-40.0, -17.0, -3.0, -0.2, 0.0, 0.7, 4.0, 19.99, 20.0, 20.01, 27.0])
    raw = u[torch.randint(0, len(u), (b, L, h), generator=g)] + torch.randn(b, L, h, generator=g) * 0.01
    dt_bias = torch.randn(h, generator=g) * 0.1
    A_log = torch.randn(h, generator=g).clamp(-3, 1.5)
    return (raw - dt_bias).to(DEV), dt_bias.to(DEV), A_log.to(DEV)


@pytest.mark.parametrize("clamp", [0.0, 0.05])
@pytest.mark.parametrize("shape", [(2, 4, 3, 2, 5), (1, 2, 70, 1, 16)])
def test_triton_mamba2_steps_from_raw_dt_equal_the_float64_recurrence(shape, clamp):
    """``mamba2_step``'s kernel computes dt = softplus(dt + dt_bias) (clamped) and A = -exp(A_log) itself: its steps
    equal the float64 recurrence of the dt and A that torch computes in float64."""
    b, h, p, G, n = shape
    L = 6
    x, _, _, B, C, D, init = ssd_inputs(b, L, h, p, G, n)
    raw, dt_bias, A_log = raw_dt_inputs(b, L, h)
    softplus = F.softplus(raw.double() + dt_bias.double())
    assert (softplus < 1e-8).any() and (softplus > 20).any() and (softplus < 20).any()  # every branch
    dt64 = softplus.clamp(min=clamp)
    ref, ref_state = ssd_reference(
        x.double(), dt64, -torch.exp(A_log.double()), B.double(), C.double(), D=D.double(), initial_state=init.double()
    )
    state, ys = init.clone(), []
    reset_paths()
    with use_kernels("triton"):
        for t in range(L):
            ys.append(mamba2_step(x[:, t], raw[:, t], dt_bias, A_log, B[:, t], C[:, t], state, D, clamp))
    assert paths_used() == {"mamba2_step": "triton"}  # one kernel, not the torch dt and ssd_step
    assert_rel_close(torch.stack(ys, 1), ref, 1e-5, "y")
    assert_rel_close(state, ref_state, 1e-5, "state")


@pytest.mark.parametrize("u", [-40.0, -17.0, -12.0])
def test_triton_mamba2_step_keeps_the_tiny_steps_of_a_very_negative_dt(u):
    """From a zero state without D, y is proportional to dt: where dt + dt_bias is far below 0, softplus is about
    exp(dt + dt_bias), below float32's 2^-24 in 1 + t, and y must still carry it (a plain log(1 + t) gives 0)."""
    x, _, _, B, C, _, init = ssd_inputs(2, 1, 3, 2, 1, 4)
    _, dt_bias, A_log = raw_dt_inputs(2, 1, 3)
    raw = torch.full((2, 3), u, device=DEV) - dt_bias
    dt64 = F.softplus(raw.double() + dt_bias.double())
    ref, _ = ssd_reference(
        x.double(), dt64[:, None], -torch.exp(A_log.double()), B.double(), C.double(), D=None,
        initial_state=torch.zeros_like(init).double(),
    )  # fmt: skip
    with use_kernels("triton"):
        y = mamba2_step(x[:, 0], raw, dt_bias, A_log, B[:, 0], C[:, 0], torch.zeros_like(init))
    assert_rel_close(y, ref[:, 0], 1e-5, "y")


def test_triton_mamba2_step_keeps_a_nan_dt_as_torch_does():
    """A NaN in the raw dt (a damaged row) stays NaN in that row's state and output, as the torch ops keep it (the
    kernel's comparisons rather than min/max, which may drop it); the other rows are untouched by it."""
    x, _, _, B, C, D, init = ssd_inputs(2, 1, 3, 2, 1, 4)
    raw, dt_bias, A_log = raw_dt_inputs(2, 1, 3)
    raw[0, 0, 1] = float("nan")
    outs = {}
    for mode in ("triton", "torch"):
        state = init.clone()
        with use_kernels(mode):
            y = mamba2_step(x[:, 0], raw[:, 0], dt_bias, A_log, B[:, 0], C[:, 0], state, D, 0.01)
        outs[mode] = (y, state)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert torch.equal(got.isnan(), want.isnan()) and got[0, 1].isnan().all() and not got[1].isnan().any()


def test_mamba2_step_refuses_a_misshaped_dt_bias_or_A_log():
    x, _, _, B, C, D, init = ssd_inputs(2, 1, 3, 2, 1, 4)
    raw, dt_bias, A_log = raw_dt_inputs(2, 1, 3)
    for bad in ({"dt_bias": dt_bias[:2]}, {"A_log": A_log[None]}):
        args = {"dt_bias": dt_bias, "A_log": A_log, **bad}
        with pytest.raises(ValueError, match=f"mamba2_step: {next(iter(bad))} has shape"):
            mamba2_step(x[:, 0], raw[:, 0], args["dt_bias"], args["A_log"], B[:, 0], C[:, 0], init, D)


def gdn_inputs(B, L, Hk, Hv, dk, dv, dtype=torch.float32, seed=0):
    """Gated DeltaNet's step inputs over L tokens: raw q, k (B, L, Hk, dk) as strided slices of one conv output, v
    (B, L, Hv, dv), raw gates a, b (B, L, Hv) whose a + dt_bias covers softplus's branches (as in raw_dt_inputs),
    A_log, dt_bias (Hv,) and a state (B, Hv, dk, dv)."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(B, L, 2 * Hk * dk + Hv * dv, generator=g)
    q, k, v = torch.split(conv, [Hk * dk, Hk * dk, Hv * dv], dim=-1)
    a, dt_bias, A_log = raw_dt_inputs(B, L, Hv, seed)
    b = torch.randn(B, L, Hv, generator=g) * 3
    state = torch.randn(B, Hv, dk, dv, generator=g) * 0.1
    raw = [t.to(DEV, dtype) for t in (q.view(B, L, Hk, dk), k.view(B, L, Hk, dk), v.view(B, L, Hv, dv), a, b.to(DEV))]
    return (*raw, A_log, dt_bias, state.to(DEV))


def gdn_steps(q, k, v, a, b, A_log, dt_bias, state, mode: str) -> torch.Tensor:
    """Every token of the inputs through ``gdn_step`` under kernels ``mode``: o (B, L, Hv, dv); ``state`` updated."""
    reset_paths()
    with use_kernels(mode):
        o = torch.stack(
            [gdn_step(*(t[:, i] for t in (q, k, v, a, b)), A_log, dt_bias, state) for i in range(q.shape[1])], 1
        )
    assert paths_used() == {"gdn_step": mode}  # one op: with Triton one kernel, not the torch gates and step
    return o


@pytest.mark.parametrize("shape", [(2, 2, 4, 16, 40), (1, 3, 3, 20, 8)])  # dv 40: two blocks, one partial; dk 20
def test_triton_gdn_steps_equal_the_float64_steps(shape):
    """The kernel's steps (l2 norms, gates, the delta rule, one key head serving Hv / Hk value heads) equal the float64
    torch steps, outputs and state."""
    Hk, Hv, dk, dv = shape[1:]
    inputs = gdn_inputs(shape[0], 5, Hk, Hv, dk, dv)
    state64 = inputs[-1].double()
    ref = gdn_steps(*(t.double() for t in inputs[:-1]), state64, "torch")
    state = inputs[-1].clone()
    got = gdn_steps(*inputs[:-1], state, "triton")
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert_rel_close(got, ref, 1e-5, "o")
    assert_rel_close(state, state64, 1e-5, "state")


def test_gdn_step_refuses_misshaped_inputs_by_name():
    *tokens, A_log, dt_bias, state = gdn_inputs(2, 1, 2, 4, 8, 8)
    q, k, v, a, b = (t[:, 0] for t in tokens)
    for name, bad in (("a", a[:, :3]), ("dt_bias", dt_bias[:3]), ("state", state[:1])):
        args = {**dict(q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, state=state), name: bad}
        with pytest.raises(ValueError, match=f"gdn_step: {name} has shape"):
            gdn_step(**args)
    with pytest.raises(ValueError, match="not a multiple of 3 key heads"):
        gdn_step(q[:, :1].expand(2, 3, 8), k[:, :1].expand(2, 3, 8), v, a, b, A_log, dt_bias, state)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("kernel", [2, 4])
def test_triton_conv_steps_equal_the_whole_conv(bias, activation, kernel):
    g = torch.Generator().manual_seed(kernel)
    B, L, C = 2, 7, 1100  # two channel blocks (BLOCK_C is at most 1024), the second partial
    wide = torch.randn(B, L, 2 * C, generator=g).to(DEV)
    x = wide[..., :C]  # a column slice: row stride 2C
    w = (torch.randn(C, kernel, generator=g) / kernel).to(DEV)
    b = torch.randn(C, generator=g).to(DEV) if bias else None
    history = torch.randn(B, kernel - 1, C, generator=g).to(DEV)  # a prefix before x, then its outputs
    full = torch.cat([history, x], 1).double()
    whole = causal_conv1d_reference(full, w.double()[:, None], None if b is None else b.double(), None, activation)
    state, outs = history.clone(), []
    reset_paths()
    with use_kernels("triton"):
        for t in range(L):
            y, out_state = causal_conv1d_with_state(x[:, t : t + 1], state, w, b, activation, inplace=True)
            assert out_state is state and y.shape == (B, 1, C)
            outs.append(y)
    assert paths_used()["conv_step"] == "triton"
    assert_rel_close(torch.cat(outs, 1), whole[:, kernel - 1 :], 1e-6, "conv steps")
    torch.testing.assert_close(state, x[:, L - (kernel - 1) :], rtol=0, atol=0)


@pytest.mark.gpu
def test_bf16_decode_steps_at_bench_shapes_on_gpu():
    """Batch 64, 64 heads × 64, 8 groups, state 128 (``bench-1.3b``), bf16 x, B, C: the kernel's
    error against float64 is at most the float32 torch step's error on the same rounded inputs
    (times 1.5, plus a hair for the final bf16 rounding of y)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    b, h, p, G, n = 64, 64, 64, 8, 128
    x, dt, A, B, C, D, init = ssd_inputs(b, 4, h, p, G, n, dtype=torch.bfloat16)
    ref, _ = ssd_reference(*(t.double() for t in (x, dt, A, B, C)), D=D.double(), initial_state=init.double())
    outs = {}
    for mode in ("triton", "torch"):
        state, ys = init.clone(), []
        with use_kernels(mode):
            for t in range(4):
                ys.append(ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D=D, inplace=True)[0])
        outs[mode] = torch.stack(ys, 1)
    err_triton, err_torch = rel_err(outs["triton"], ref), rel_err(outs["torch"], ref)
    assert err_triton <= 1.5 * err_torch + 1e-3, (err_triton, err_torch)


@pytest.mark.gpu
def test_bf16_mamba2_steps_from_raw_dt_at_bench_shapes_on_gpu():
    """The raw-dt kernel at ``bench-1.3b``'s decode shapes (batch 64, bf16 x, B, C and raw dt, as the in-projection
    gives them): its error against float64 is at most the torch route's (torch dt and A, then the step) on the same
    rounded inputs, times 1.5, plus a hair for the final bf16 rounding of y."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    b, h, p, G, n = 64, 64, 64, 8, 128
    x, _, _, B, C, D, init = ssd_inputs(b, 4, h, p, G, n, dtype=torch.bfloat16)
    raw, dt_bias, A_log = raw_dt_inputs(b, 4, h)
    raw = raw.to(torch.bfloat16)
    dt64 = F.softplus(raw.double() + dt_bias.double())
    ref, _ = ssd_reference(
        x.double(), dt64, -torch.exp(A_log.double()), B.double(), C.double(), D=D.double(), initial_state=init.double()
    )
    outs = {}
    for mode in ("triton", "torch"):
        state, ys = init.clone(), []
        reset_paths()
        with use_kernels(mode):
            for t in range(4):
                ys.append(mamba2_step(x[:, t], raw[:, t], dt_bias, A_log, B[:, t], C[:, t], state, D))
        assert paths_used()["mamba2_step"] == mode
        outs[mode] = torch.stack(ys, 1)
    err_triton, err_torch = rel_err(outs["triton"], ref), rel_err(outs["torch"], ref)
    print(f"raw-dt step at bench shapes: kernel {err_triton:.3g}, torch {err_torch:.3g} (relative to float64)")
    assert err_triton <= 1.5 * err_torch + 1e-3, (err_triton, err_torch)


@pytest.mark.gpu
def test_bf16_gdn_steps_at_qwen3_next_shapes_on_gpu():
    """Qwen3-Next's decode shapes (batch 64, 16 key heads serving 32 value heads, dk = dv = 128), bf16 conv outputs
    and gates: the kernel's error against float64 is at most the torch steps' error on the same rounded inputs, times
    1.5, plus a hair for the final bf16 rounding of o."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    inputs = gdn_inputs(64, 4, 16, 32, 128, 128, dtype=torch.bfloat16)
    state64 = inputs[-1].double()
    ref = gdn_steps(*(t.double() for t in inputs[:-1]), state64, "torch")
    outs = {mode: gdn_steps(*inputs[:-1], inputs[-1].clone(), mode) for mode in ("triton", "torch")}
    err_triton, err_torch = rel_err(outs["triton"], ref), rel_err(outs["torch"], ref)
    print(f"gdn step at Qwen3-Next shapes: kernel {err_triton:.3g}, torch {err_torch:.3g} (relative to float64)")
    assert err_triton <= 1.5 * err_torch + 1e-3, (err_triton, err_torch)
