"""Named model configurations: preset name -> :class:`~hybridlm.config.ModelConfig` fields (pure Python).

Build one with ``ModelConfig.preset(name, **overrides)``. Only the fields that differ from the
dataclass defaults are listed.
"""

from __future__ import annotations

from typing import Any

#: Named configurations. Shapes of the published models follow their Hugging Face configs;
#: attention uses no position embedding, as Hugging Face's NemotronH computes it.
PRESETS: dict[str, dict[str, Any]] = {
    # Every layer kind but '+' and 'D' (which cannot share a pattern with '*'), small enough for CPU tests.
    "tiny": dict(
        pattern="M-[*-]G-[ME]M*E/[*-]",
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_state_dim=16,
        mamba_num_groups=2,
        mamba_chunk_size=16,
        moe_num_experts=4,
        moe_top_k=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_ffn_hidden_size=32,
        gdn_num_heads=2,
        gdn_head_dim=16,
    ),
    # nvidia/Nemotron-H-8B-Base-8K.
    "nemotron-h-8b": dict(
        pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        vocab_size=131072,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=21504,
        mlp_activation="relu2",
        mamba_num_heads=128,
        mamba_head_dim=64,
        mamba_state_dim=128,
        mamba_num_groups=8,
    ),
    # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B.
    "nemotron-3-nano-30b-a3b": dict(
        pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        vocab_size=131072,
        hidden_size=2688,
        num_attention_heads=32,
        num_query_groups=2,
        head_dim=128,
        mlp_activation="relu2",
        mamba_num_heads=64,
        mamba_head_dim=64,
        mamba_state_dim=128,
        mamba_num_groups=8,
        moe_num_experts=128,
        moe_top_k=6,
        moe_ffn_hidden_size=1856,
        moe_shared_expert_ffn_hidden_size=3712,
        moe_router_score="sigmoid",
        moe_router_expert_bias=True,
        moe_routed_scaling=2.5,
        moe_norm_topk_prob=True,
        moe_aux_loss_coeff=1e-4,
        moe_aux_loss_type="seq_aux_loss",  # Megatron's Nemotron-3 Nano recipe balances each sequence
    ),
    # Qwen/Qwen3-Next-80B-A3B's shapes (what `convert --from qwen3-next` makes of its config.json; its MTP layer,
    # which the import adds from the weights as '/*E', is left out): Gated DeltaNet and gated attention, each
    # followed by a MoE layer of 512 experts (top-10, softmax) with a gated shared expert, zero-centred norms.
    "qwen3-next-80b-a3b": dict(
        pattern="GEGEGE*E" * 12,
        vocab_size=151936,
        hidden_size=2048,
        norm_eps=1e-6,
        norm_zero_centered=True,
        num_attention_heads=16,
        num_query_groups=2,
        head_dim=256,
        position_embedding="rope",
        rope_theta=10_000_000,
        rotary_percent=0.25,
        qk_norm=True,
        attention_output_gate=True,
        mlp_activation="swiglu",
        moe_num_experts=512,
        moe_top_k=10,
        moe_ffn_hidden_size=512,
        moe_shared_expert_ffn_hidden_size=512,
        moe_shared_expert_gate=True,
        gdn_num_heads=16,
        gdn_num_value_heads=32,
        gdn_value_head_dim=128,
    ),
    # The GPU benchmark's model: 1.25B parameters, NemotronH-like.
    "bench-1.3b": dict(
        pattern="M-M-M-M*-M-M-M-M*-M-M-M-",
        vocab_size=131072,
        hidden_size=2048,
        num_attention_heads=16,
        num_query_groups=4,
        head_dim=128,
        ffn_hidden_size=8192,
        mlp_activation="relu2",
        mamba_num_heads=64,
        mamba_head_dim=64,
        mamba_state_dim=128,
        mamba_num_groups=8,
    ),
    # The GPU benchmark's MoE hybrid: bench-1.3b with every MLP replaced by 64 experts (top-6,
    # sigmoid router with expert bias, a shared expert): 3.93B parameters, 1.25B active per token
    # (embeddings and head included; 11 MoE layers of 6 routed experts plus the shared one).
    "bench-moe-1b": dict(
        pattern="MEMEMEM*EMEMEMEM*EMEMEME",
        vocab_size=131072,
        hidden_size=2048,
        num_attention_heads=16,
        num_query_groups=4,
        head_dim=128,
        mlp_activation="relu2",
        mamba_num_heads=64,
        mamba_head_dim=64,
        mamba_state_dim=128,
        mamba_num_groups=8,
        moe_num_experts=64,
        moe_top_k=6,
        moe_ffn_hidden_size=1024,
        moe_shared_expert_ffn_hidden_size=2048,
        moe_router_score="sigmoid",
        moe_router_expert_bias=True,
        moe_routed_scaling=2.5,
        moe_norm_topk_prob=True,
        moe_aux_loss_coeff=1e-4,
    ),
}
