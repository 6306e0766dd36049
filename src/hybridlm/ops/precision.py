"""Precision rules: the dtype a matmul really runs in, and the dtype the plain-torch ops accumulate in."""

from __future__ import annotations

import torch

#: Log-decays (a step's dt·A in the SSD, g in the gated delta rule) below minus this are clamped to it before the
#: Triton kernels' cumulative sums. exp(-128) underflows to 0 in float32 (the smallest float32 is exp(-103.3)), so
#: the decay across such a step is 0 either way; without the clamp, one step of -1e4 left every later cumulative
#: sum of its chunk near -1e4, where float32's spacing (1e-3) makes their differences, the decays, 1e-4 off, and a
#: step of -inf made -inf - -inf = NaN.
LOG_DECAY_FLOOR = 128.0


def accumulation_dtype(*inputs: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """float64 where any of ``inputs`` (tensors or dtypes; None is skipped) is float64, else float32.

    The one rule for the plain-torch ops (norms, scans, decode steps) and the decoding caches'
    recurrent states: bf16 / fp16 have too few mantissa bits for sums of squares and decays, so they
    compute in float32 whatever the input; a float64 model is a reference (an oracle for the
    kernels, the cache, other precisions), and float32 intermediates would cap it at ~1e-7.
    """
    for t in inputs:
        if t is not None and (t if isinstance(t, torch.dtype) else t.dtype) == torch.float64:
            return torch.float64
    return torch.float32


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on for ``x``'s device, else ``x``'s own dtype.

    ``grouped_mm`` and the chunked head + loss cast their operands explicitly to this, so they
    compute as an autocast-covered ``F.linear`` would.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
