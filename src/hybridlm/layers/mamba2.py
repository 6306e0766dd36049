"""Mamba2 mixer, computed as Megatron-LM and Hugging Face NemotronH compute it.

in_proj -> [z | x | B | C | dt]; causal depthwise conv + SiLU over xBC; dt = softplus(dt + dt_bias);
A = -exp(A_log); the SSD scan with a per-head D skip; gate with SiLU(z), then RMSNorm per group of
d_inner / ngroups channels; out_proj. Parameter names are NemotronH's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.mamba2_core import Mamba2Dims, Mamba2Weights, mamba2_core, mamba2_dt
from ..ops.norm import gated_rms_norm
from ..ops.precision import accumulation_dtype
from ..ops.ssd import ssd_chunked
from ..ops.step import causal_conv1d_with_state, mamba2_step, ssd_step
from .cache import RecurrentState
from .context import SequenceContext
from .conv import CausalConv1d
from .init import dt_bias_init, normal_


class GatedRMSNorm(nn.Module):
    def __init__(self, size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)


#: Cached forwards of at most this many tokens (and no padding) take the one-token step per position.
STEPPED_WINDOW = 4


class Mamba2Mixer(nn.Module):
    """The ``M`` mixer. Input and output (B, L, hidden_size)."""

    keep_fp32 = ("A_log", "D", "dt_bias")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.nheads = c.resolved_mamba_num_heads
        self.headdim = c.mamba_head_dim
        self.ngroups = c.mamba_num_groups
        self.d_state = c.mamba_state_dim
        self.d_inner = c.mamba_d_inner
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = nn.Linear(c.hidden_size, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = CausalConv1d(self.conv_dim, c.mamba_conv_kernel)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, c.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, c.hidden_size, bias=False)
        self.dims = Mamba2Dims(
            self.nheads, self.headdim, self.ngroups, self.d_state, c.mamba_chunk_size, self.norm.group_size,
            self.norm.eps, c.mamba_dt_clamp_min,
        )  # fmt: skip

    def init_cache(self, batch: int, max_len: int, device, dtype) -> RecurrentState:
        """Conv inputs (B, K-1, conv_dim) in ``dtype`` and the SSM state (B, H, P, N) in float32 (float64 for
        a float64 ``dtype``)."""
        K = self.conv1d.weight.shape[-1]
        return RecurrentState.zeros(batch, K, self.conv_dim, (self.nheads, self.headdim, self.d_state), device, dtype)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x: (B, L, hidden) -> (B, L, hidden); with ``ctx.cache``, continues from and updates the cached state."""
        b, seqlen, _ = x.shape
        cache = ctx.cache
        if cache is None:  # training, or a forward without a cache: the core as one op
            weights = Mamba2Weights(
                self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D, self.norm.weight
            )
            return self.out_proj(mamba2_core(self.in_proj(x), weights, ctx.seq_idx, self.dims))
        z, xBC, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        history = None
        state = cache.state(self)
        keep = cache.pad_mask(seqlen)
        if keep is not None:  # padding enters the conv as zeros, as the empty history does
            xBC = xBC * keep.unsqueeze(-1).to(xBC.dtype)
        if cache.trail is not None:  # the conv inputs before and in this window, oldest first
            history = torch.cat([state.conv, xBC], dim=1)
        xBC, _ = causal_conv1d_with_state(xBC, state.conv, self.conv1d.weight, self.conv1d.bias, "silu", inplace=True)
        xs, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        xs = xs.reshape(b, seqlen, self.nheads, self.headdim)
        B = B.reshape(b, seqlen, self.ngroups, self.d_state)
        C = C.reshape(b, seqlen, self.ngroups, self.d_state)
        if seqlen == 1 or (seqlen <= STEPPED_WINDOW and keep is None):
            # One token, or a short window (a speculative verify, an MTP depth's commit): the exact
            # recurrence position by position, fewer ops than a chunked scan over a tiny chunk.
            if keep is not None:  # a padded token (one token only): dt = 0 there
                dt, A = self._dt_and_A(dt, keep)
            ys = []
            for i in range(seqlen):
                x_i, B_i, C_i, S = xs[:, i], B[:, i], C[:, i], state.recurrent
                if keep is None:  # the raw dt: its softplus and A = -exp(A_log) inside the step (one kernel on CUDA)
                    c = self.config.mamba_dt_clamp_min
                    ys.append(mamba2_step(x_i, dt[:, i], self.dt_bias, self.A_log, B_i, C_i, S, self.D, c))
                else:
                    ys.append(ssd_step(x_i, dt[:, i], A, B_i, C_i, S, D=self.D, inplace=True)[0])
                if history is not None:  # the state after position i, for InferenceCache.rollback
                    K1 = state.conv.shape[1]
                    cache.trail.setdefault(self, []).append((history[:, i + 1 : i + 1 + K1], state.recurrent.clone()))
            if seqlen == 1:
                y = ys[0].unsqueeze(1)  # the decode step: a view, no copy
            else:  # no new token at all gives an empty window, as every other mixer does
                y = torch.stack(ys, dim=1) if ys else xs.new_zeros(xs.shape)
        else:  # prefill, a longer prefill chunk, or padding: the chunked scan over the whole window
            dt, A = self._dt_and_A(dt, keep)
            y, ssm = ssd_chunked(
                xs,
                dt,
                A,
                B,
                C,
                self.config.mamba_chunk_size,
                D=self.D,
                initial_state=state.recurrent,
                return_final_state=True,
            )
            state.recurrent.copy_(ssm)
        y = self.norm(y.reshape(b, seqlen, self.d_inner), z)
        return self.out_proj(y)

    def _dt_and_A(self, dt: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw dt (B, L, H) -> (dt (B, L, H) after softplus, A (H,)) as ops.mamba2_core computes them; dt = 0 where
        ``keep`` (B, L) marks padding: no decay and no input, so padding leaves the SSM state as it is."""
        A = -torch.exp(self.A_log.to(accumulation_dtype(dt, self.A_log)))
        dt = mamba2_dt(dt, self.dt_bias, self.config.mamba_dt_clamp_min)
        return (dt, A) if keep is None else (dt * keep.unsqueeze(-1), A)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator | None, std: float, out_std: float) -> None:
        c = self.config
        normal_(self.in_proj.weight, std, gen)
        self.conv1d.init_weights(gen)
        with torch.no_grad():
            self.dt_bias.copy_(
                dt_bias_init(
                    self.nheads, c.mamba_dt_min, c.mamba_dt_max, c.mamba_dt_init_floor, gen, self.dt_bias.device
                )
            )
            self.A_log.copy_(
                torch.log(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16, generator=gen))
            )
        nn.init.ones_(self.D)
        nn.init.ones_(self.norm.weight)
        normal_(self.out_proj.weight, out_std, gen)

    @staticmethod
    def flops_per_token(c: ModelConfig, seq_len: int) -> float:
        """Matmul FLOPs per token of one forward (projections and the chunked scan's products)."""
        h, p, g, n = c.resolved_mamba_num_heads, c.mamba_head_dim, c.mamba_num_groups, c.mamba_state_dim
        d_inner = h * p
        proj = 2 * c.hidden_size * (2 * d_inner + 2 * g * n + h) + 2 * d_inner * c.hidden_size
        if seq_len == 0:  # no sequence: the projections alone
            return proj
        Q = min(c.mamba_chunk_size, seq_len)  # a sequence shorter than a chunk is one chunk of its length (ops/ssd.py)
        padded = math.ceil(seq_len / Q) * Q
        chunks = padded // Q
        # Per padded position: C·B within the chunk (per group), the intra-chunk mix, the chunk's
        # state contribution and the read of the entering state; plus the scan over chunks.
        scan = 2 * Q * n * g + 2 * Q * p * h + 2 * n * p * h + 2 * n * p * h
        scan_total = scan * padded + 2 * (chunks + 1) ** 2 * h * p * n
        return proj + scan_total / seq_len


def mamba2_reference(layer: Mamba2Mixer, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The mixer written with the reference ops (per-document conv, step recurrence), in float64.

    Uses ``layer``'s parameters as they are (cast a ``copy.deepcopy(layer)`` to get
    float64 gradients).
    """
    from ..ops.conv import causal_conv1d_reference
    from ..ops.ssd import ssd_reference

    b, seqlen, _ = x.shape
    zxbcdt = x @ layer.in_proj.weight.T
    z, xBC, dt = torch.split(zxbcdt, [layer.d_inner, layer.conv_dim, layer.nheads], dim=-1)
    xBC = causal_conv1d_reference(xBC, layer.conv1d.weight, layer.conv1d.bias, seq_idx, "silu", x.dtype)
    xs, B, C = torch.split(xBC, [layer.d_inner, layer.ngroups * layer.d_state, layer.ngroups * layer.d_state], -1)
    dt = F.softplus(dt + layer.dt_bias)
    if layer.config.mamba_dt_clamp_min > 0:
        dt = dt.clamp(min=layer.config.mamba_dt_clamp_min)
    y, _ = ssd_reference(
        xs.reshape(b, seqlen, layer.nheads, layer.headdim),
        dt,
        -torch.exp(layer.A_log),
        B.reshape(b, seqlen, layer.ngroups, layer.d_state),
        C.reshape(b, seqlen, layer.ngroups, layer.d_state),
        D=layer.D,
        seq_idx=seq_idx,
        dtype=x.dtype,
    )
    y = y.reshape(b, seqlen, layer.d_inner) * F.silu(z)
    y = y.view(b, seqlen, layer.ngroups, -1)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + layer.norm.eps)
    y = y.reshape(b, seqlen, layer.d_inner) * layer.norm.weight
    return y @ layer.out_proj.weight.T
