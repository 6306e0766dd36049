"""Triton decode-step kernels (SSD state update, conv carry-over) against float64 recurrences.

On CPU they run in Triton's interpreter (float32 inputs); on a GPU compiled, and the ``gpu`` test
checks bf16 inputs at the decode shapes of ``bench-1.3b``.
"""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.conv import causal_conv1d_reference
from hybridlm.ops.dispatch import paths_used, reset_paths, use_kernels
from hybridlm.ops.ssd import ssd_reference
from hybridlm.ops.step import causal_conv1d_with_state, ssd_step
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
