"""The dtype a matmul really runs in, for code that calls kernels autocast does not cover."""

from __future__ import annotations

import torch


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on for ``x``'s device, else ``x``'s own dtype.

    ``grouped_mm`` and the chunked head + loss cast their operands explicitly to this, so they
    compute as an autocast-covered ``F.linear`` would.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
