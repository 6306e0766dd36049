"""The stateful / one-step ops of cached decoding against the whole-sequence references."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.conv import causal_conv1d
from hybridlm.ops.gated_delta import gated_delta_rule_reference, l2_normalize
from hybridlm.ops.ssd import ssd_reference
from hybridlm.ops.step import causal_conv1d_with_state, gated_delta_step, ssd_step


def test_conv_in_pieces_and_steps_equals_the_whole_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 6, generator=g)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    whole = causal_conv1d(x, w, b, activation="silu")
    state = torch.zeros(2, 3, 6)
    outs = []
    for piece in (x[:, :5], x[:, 5:6], x[:, 6:7], x[:, 7:]):  # a prefill, two steps, a chunk
        y, state = causal_conv1d_with_state(piece, state, w, b, "silu")
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(state, x[:, -3:])


#: Tolerance of the steps against the float64 recurrences: float32 steps, and float64 ones (which ran in float32
#: too, 1e-7 off: a float64 model decoded no better than a float32 one).
STEP_TOL = {torch.float32: 1e-5, torch.float64: 1e-13}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_ssd_steps_equal_the_float64_recurrence(dtype):
    g = torch.Generator().manual_seed(1)
    b, L, h, p, G, n = 2, 9, 4, 3, 2, 5
    x = torch.randn(b, L, h, p, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, L, h, generator=g, dtype=dtype))
    A = -torch.rand(h, generator=g) * 3  # float32, as a float64 model keeps A_log
    B, C = torch.randn(b, L, G, n, generator=g, dtype=dtype), torch.randn(b, L, G, n, generator=g, dtype=dtype)
    D = torch.randn(h, generator=g)
    init = torch.randn(b, h, p, n, generator=g, dtype=dtype)
    ref, ref_state = ssd_reference(x, dt, A, B, C, D=D, initial_state=init)
    state, ys = init, []
    for t in range(L):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D=D)
        ys.append(y)
    assert state.dtype == dtype
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(torch.stack(ys, 1).double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.double(), ref_state, rtol=tol, atol=tol)
    inplace = init.clone()
    for t in range(L):
        ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], inplace, D=D, inplace=True)
    torch.testing.assert_close(inplace, state, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gated_delta_steps_equal_the_float64_recurrence(dtype):
    g = torch.Generator().manual_seed(2)
    b, L, h, dk, dv = 2, 9, 3, 4, 5
    q = l2_normalize(torch.randn(b, L, h, dk, generator=g, dtype=dtype))
    k = l2_normalize(torch.randn(b, L, h, dk, generator=g, dtype=dtype))
    v = torch.randn(b, L, h, dv, generator=g, dtype=dtype)
    gate = -F.softplus(torch.randn(b, L, h, generator=g, dtype=dtype))
    beta = torch.rand(b, L, h, generator=g, dtype=dtype)
    init = torch.randn(b, h, dk, dv, generator=g, dtype=dtype)
    ref, ref_state = gated_delta_rule_reference(q, k, v, gate, beta, initial_state=init)
    state, outs = init, []
    for t in range(L):
        o, state = gated_delta_step(q[:, t], k[:, t], v[:, t], gate[:, t], beta[:, t], state)
        outs.append(o)
    assert state.dtype == dtype
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(torch.stack(outs, 1).double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.double(), ref_state, rtol=tol, atol=tol)
    inplace = init.clone()
    for t in range(L):
        gated_delta_step(q[:, t], k[:, t], v[:, t], gate[:, t], beta[:, t], inplace, inplace=True)
    torch.testing.assert_close(inplace, state, rtol=0, atol=0)


def test_conv_step_returns_the_dtype_of_x_and_refuses_a_state_of_another_length():
    """A float32 bias under bf16 inputs promoted the one-token output to float32 (the Triton step and
    the docstring give x's dtype); a state whose length is not K-1 is refused by name."""
    x, w, b = torch.randn(2, 1, 8).bfloat16(), torch.randn(8, 4), torch.randn(8)
    for L in (1, 3):
        out, _ = causal_conv1d_with_state(
            torch.randn(2, L, 8).bfloat16(), torch.zeros(2, 3, 8).bfloat16(), w, b, "silu"
        )
        assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"conv_state has shape \(2, 2, 8\), expected \(2, 3, 8\)"):
        causal_conv1d_with_state(x, torch.zeros(2, 2, 8), w, b)


def test_conv_step_refuses_taps_or_a_bias_of_another_width():
    """The one-token step's dot product broadcast a (1, K) weight or a (1,) bias over every channel (the
    whole-sequence conv refuses them): refused by name."""
    x, state = torch.randn(2, 1, 8), torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d_with_state(x, state, torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        causal_conv1d_with_state(x, state, torch.randn(8, 4), torch.randn(1))


def test_ssd_step_refuses_misshaped_inputs_by_name():
    """The torch step broadcast a one-row B or an (h,) dt over every row of the batch (a silent wrong
    step), and the Triton step reads every input by x's layout; each misfit is now refused by name."""
    b, h, p, g, n = 2, 4, 3, 2, 5
    x, dt, A = torch.randn(b, h, p), torch.rand(b, h), -torch.rand(h)
    B, C, S = torch.randn(b, g, n), torch.randn(b, g, n), torch.zeros(b, h, p, n)
    for kwargs, says in (
        (dict(B=B[:1]), r"B has shape \(1, 2, 5\)"),
        (dict(dt=dt[0]), r"dt has shape \(4,\), expected \(2, 4\)"),
        (dict(B=torch.randn(b, 3, n), C=torch.randn(b, 3, n)), r"B has shape \(2, 3, 5\), expected \(2, g, n\)"),
        (dict(state=S[:, :, :, :4]), r"state has shape \(2, 4, 3, 4\)"),
        (dict(D=torch.ones(1)), r"D has shape \(1,\)"),
    ):
        args = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "state": S, **kwargs}
        with pytest.raises(ValueError, match=says):
            ssd_step(**args)


def test_gated_delta_step_refuses_misshaped_inputs_by_name():
    """The step's einsums and products broadcast a one-row q, an (h,) g or a (b, 1) beta over the batch or the
    heads (a silent wrong step): refused by name."""
    b, h, dk, dv = 2, 3, 4, 5
    q, k, v = torch.randn(b, h, dk), torch.randn(b, h, dk), torch.randn(b, h, dv)
    g, beta, S = -torch.rand(b, h), torch.rand(b, h), torch.zeros(b, h, dk, dv)
    for kwargs, says in (
        (dict(k=k[:1]), r"k has shape \(1, 3, 4\), expected \(2, 3, 4\)"),
        (dict(v=v[:1]), r"v has shape \(1, 3, 5\), expected \(2, 3, 5\)"),
        (dict(g=g[0]), r"g has shape \(3,\), expected \(2, 3\)"),
        (dict(beta=beta[:, :1]), r"beta has shape \(2, 1\)"),
        (dict(state=S[:1]), r"state has shape \(1, 3, 4, 5\)"),
        (dict(q=q[0]), r"q must be \(b, h, dk\)"),
    ):
        args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "state": S, **kwargs}
        with pytest.raises(ValueError, match=says):
            gated_delta_step(**args)


def test_steps_compute_in_float32_under_autocast():
    """Under bf16 autocast the steps' einsums ran in bf16 (the chunked scans turn autocast off): a decoded
    gated-delta state drifted ~1e-3 from the float32 one, 4 orders above its own rounding. Now bitwise equal."""
    g = torch.Generator().manual_seed(3)
    b, h, dk, dv, G, n = 2, 4, 16, 8, 2, 16
    q, k = l2_normalize(torch.randn(b, h, dk, generator=g)), l2_normalize(torch.randn(b, h, dk, generator=g))
    v, gate, beta = torch.randn(b, h, dv, generator=g), -torch.rand(b, h, generator=g), torch.rand(b, h, generator=g)
    S = torch.randn(b, h, dk, dv, generator=g)
    x, dt, A = torch.randn(b, h, dv, generator=g), torch.rand(b, h, generator=g), -torch.rand(h, generator=g)
    B, C, D = torch.randn(b, G, n, generator=g), torch.randn(b, G, n, generator=g), torch.randn(h, generator=g)
    S2 = torch.randn(b, h, dv, n, generator=g)
    plain = gated_delta_step(q, k, v, gate, beta, S), ssd_step(x, dt, A, B, C, S2, D=D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gated_delta_step(q, k, v, gate, beta, S), ssd_step(x, dt, A, B, C, S2, D=D)
    for (a, sa), (u, su) in zip(plain, under):
        assert u.dtype == su.dtype == torch.float32
        torch.testing.assert_close(u, a, rtol=0, atol=0)
        torch.testing.assert_close(su, sa, rtol=0, atol=0)


@pytest.mark.parametrize("silu", [False, True])
def test_a_one_token_conv_step_of_bf16_inputs_keeps_float32_weights(silu):
    """The one-token step rounded float32 weights to bf16 and summed in bf16: 1.8x the output's own rounding off
    the float64 result, where the multi-token conv (the prefill) and the Triton step compute in float32."""
    g = torch.Generator().manual_seed(0)
    B, K, C = 4, 4, 256
    x = torch.randn(B, 1, C, generator=g).bfloat16()
    state = torch.randn(B, K - 1, C, generator=g).bfloat16()
    weight, bias = torch.randn(C, 1, K, generator=g), torch.randn(C, generator=g)
    out, _ = causal_conv1d_with_state(x, state, weight, bias, "silu" if silu else None)
    full = torch.cat([state, x], 1).double()
    ref = (full * weight.double()[:, 0].T).sum(1, keepdim=True) + bias.double()
    ref = F.silu(ref) if silu else ref
    rounding = (ref.bfloat16().double() - ref).abs().max()  # the output's own rounding to bf16
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= rounding * 1.01
