"""The Hugging Face anchor: transformers' ``NemotronHForCausalLM`` on mamba_ssm's Triton kernels, built from our weights.

mamba-ssm and causal-conv1d are on PyPI only as source packages whose ``import`` needs CUDA
extensions (``selective_scan_cuda``, ``causal_conv1d_cuda``). Built as Python-only wheels
(../shared/reference/gpu_stack.md §1), their Triton SSD kernels run once two stand-ins are
registered: an empty ``selective_scan_cuda`` (Mamba-1 only, never called here) and a
``causal_conv1d_cuda`` whose three entry points run flash-linear-attention's Triton causal conv.
:func:`install_kernels` does that and says which path Hugging Face will take, so every table
states whether the anchor ran on kernels or on transformers' plain-torch Mamba path.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
import torch.nn.functional as F


def _conv_standin() -> types.ModuleType:
    """``causal_conv1d_cuda`` with fla's Triton conv behind the C++ extension's calling convention.

    The extension takes channel-first ``x`` (B, D, L) and writes into preallocated outputs.
    """
    from fla.modules.causal_conv1d.ops import causal_conv1d_bwd, causal_conv1d_fwd

    def fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu):
        if seq_idx is not None or initial_states is not None or final_states_out is not None:
            raise NotImplementedError("the conv stand-in runs unpacked rows without states only")
        y, _ = causal_conv1d_fwd(
            x=x.transpose(1, 2), weight=weight, bias=bias, residual=None, activation="silu" if silu else None
        )
        out.copy_(y.transpose(1, 2))

    def bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, dweight, dbias, dinitial_states, silu):
        gx, gw, gb, _, _ = causal_conv1d_bwd(
            x=x.transpose(1, 2),
            dy=dout.transpose(1, 2).contiguous(),
            dht=None,
            weight=weight,
            bias=bias,
            activation="silu" if silu else None,
        )
        dx.copy_(gx.transpose(1, 2))
        dweight.copy_(gw)
        if dbias is not None:
            dbias.copy_(gb)

    def update(x, conv_state, weight, bias, out, silu, cache_seqlens, conv_state_indices):
        # Decode: x (B, D) or (B, D, T); conv_state (B, D, S) holds the last S inputs (S >= K - 1).
        if cache_seqlens is not None or conv_state_indices is not None:
            raise NotImplementedError("the conv stand-in's update keeps a plain rolling state only")
        squeeze = x.dim() == 2
        xs = x.unsqueeze(-1) if squeeze else x
        K = weight.shape[-1]
        full = torch.cat([conv_state, xs], dim=-1)  # (B, D, S + T)
        T = xs.shape[-1]
        y = F.conv1d(full[..., -(T + K - 1) :].to(weight.dtype), weight.unsqueeze(1), bias, groups=weight.shape[0])
        if silu:
            y = F.silu(y)
        conv_state.copy_(full[..., -conv_state.shape[-1] :])
        out.copy_((y.squeeze(-1) if squeeze else y).to(out.dtype))

    mod = types.ModuleType("causal_conv1d_cuda")
    mod.causal_conv1d_fwd, mod.causal_conv1d_bwd, mod.causal_conv1d_update = fwd, bwd, update
    return mod


_calls = {"mamba_ssm": 0}


def install_kernels() -> str:
    """Make mamba_ssm's Triton kernels importable (call before transformers' NemotronH module is imported).

    Returns what is available; :func:`anchor_path` says afterwards what actually ran.
    """
    try:
        importlib.import_module("mamba_ssm")
    except ImportError:
        try:
            sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
            sys.modules.setdefault("causal_conv1d_cuda", _conv_standin())
            importlib.import_module("mamba_ssm")
            importlib.import_module("causal_conv1d")
        except ImportError as e:
            return f"mamba_ssm not importable ({e})"
    import mamba_ssm
    from mamba_ssm.ops.triton import ssd_combined

    # Count calls of the chunked-scan forward (reached through the module's globals by the fused
    # layer function), so the table can say which path transformers really took.
    inner = ssd_combined._mamba_chunk_scan_combined_fwd

    def counted(*args, **kwargs):
        _calls["mamba_ssm"] += 1
        return inner(*args, **kwargs)

    ssd_combined._mamba_chunk_scan_combined_fwd = counted
    return f"mamba_ssm {mamba_ssm.__version__} importable (causal conv: fla Triton stand-in)"


def anchor_path() -> str:
    """Which Mamba path Hugging Face's model took in the forwards run so far."""
    if _calls["mamba_ssm"]:
        return "mamba_ssm Triton kernels"
    return "transformers' plain-torch Mamba path"


def hf_model(model: torch.nn.Module, dtype: torch.dtype = torch.float32, device: str = "cuda"):
    """transformers' NemotronHForCausalLM holding exactly ``model``'s weights (via our exporter)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from hybridlm.checkpoint.hf_nemotron import export_nemotron_h
    from hybridlm.checkpoint.weights import canonical_state_dict

    cfg, tensors = export_nemotron_h(model.config, canonical_state_dict(model))
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_cfg = NemotronHConfig(**cfg)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):  # initialized on the device (fast), then overwritten with our weights
        hf = NemotronHForCausalLM(hf_cfg)
    # The files say "backbone."; some transformers releases name the module "model." and rename on
    # from_pretrained only. Follow whatever this release's module uses.
    own = next(iter(hf.state_dict()))
    prefix = own.split(".", 1)[0] + "." if not own.startswith("lm_head") else "backbone."
    tensors = {(prefix + k[len("backbone.") :] if k.startswith("backbone.") else k): v for k, v in tensors.items()}
    missing, unexpected = hf.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"Hugging Face model does not match our export: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return hf.to(dtype)
