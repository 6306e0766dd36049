"""Float8 linear layers for training (``train.float8``): which of the model's layers take them, and the swap.

torchao's ``Float8Linear`` runs a layer's three matmuls (forward, input gradient, weight gradient)
in float8 with dynamic scales: inputs and weights cast to e4m3, output gradients to e5m2, each
scaled onto the format's range per tensor ("tensorwise") or per row ("rowwise"). torchao is an
optional kernel package, so only this module imports it; everything else calls the functions here.
"""

from __future__ import annotations

import contextlib
import logging
import re

from torch import nn

#: ``train.float8`` values: "none", or a torchao float8 training recipe for the blocks' linear layers.
#: "tensorwise": one scale per tensor (the fastest); "rowwise": one per row of each operand (closer
#: to bf16, slower casts).
FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Only errors from the loggers ``names`` while inside."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def slower_in_float8(recipe: str, out_features: int, in_features: int) -> bool:
    """Whether a (``out_features`` N, ``in_features`` K) linear layer is too small to gain from ``recipe``'s float8
    matmuls: the thresholds of torchao's H100 tables (its README's tensorwise and rowwise performance sections, and
    ``_auto_filter_for_recipe``, which torchtitan's ``auto_filter_small_kn`` uses), where the casts and scaling cost
    more than the float8 matmuls save. Heuristics from one GPU: measure your own model."""
    if recipe == "tensorwise":
        return in_features <= 4096 and out_features <= 1024
    return out_features <= 2048 or in_features <= 1024 or (out_features <= 4096 and in_features <= 2048)


def float8_linears(model: nn.Module, recipe: str = "tensorwise", auto_filter: bool = False) -> list[str]:
    """Names (in ``model``) of the blocks' ``nn.Linear`` layers that float8 training takes.

    Left in the model's precision: layers with a dimension that is not a multiple of 16 (float8
    matmuls, ``torch._scaled_mm``, need it; e.g. the shared-expert gate's single output), DeepSeek
    sparse attention's indexer (its scores are kept in float32, as DeepSeek's own), and everything
    outside the blocks: embedding, output head, MTP projections. MoE experts (grouped GEMMs on plain
    parameters) and the router (a parameter) are not ``nn.Linear`` and stay as they are. With
    ``auto_filter`` (``train.float8_auto_filter``), also the layers :func:`slower_in_float8` under ``recipe``.
    """
    in_blocks = re.compile(r"^(mtp\.\d+\.)?blocks\.")
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear  # not a subclass: the output head is one, and already-converted layers
        and in_blocks.match(name)
        and ".indexer." not in name
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
        and not (auto_filter and slower_in_float8(recipe, m.out_features, m.in_features))
    ]


def require_float8_linears(model: nn.Module, recipe: str = "tensorwise", auto_filter: bool = False) -> list[str]:
    """:func:`float8_linears` of ``model`` (a :class:`~hybridlm.model.HybridLM`); ValueError, naming the hidden size,
    where there is none: float8 training would change nothing, so training and the planner refuse it alike."""
    if names := float8_linears(model, recipe, auto_filter):
        return names
    if auto_filter and float8_linears(model, recipe):
        raise ValueError(
            f"every linear layer in the blocks is too small to gain from {recipe} float8 matmuls (torchao's H100 "
            f"thresholds; model.hidden_size {model.config.hidden_size}): turn train.float8_auto_filter off to "
            "convert them anyway, or leave float8 off"
        )
    raise ValueError(
        "no linear layer in the blocks has both dimensions multiples of 16, which float8 matmuls need "
        f"(model.hidden_size {model.config.hidden_size})"
    )


def apply_float8(model: nn.Module, recipe: str, auto_filter: bool = False) -> list[str]:
    """Swap the blocks' linear layers (:func:`float8_linears`, ``auto_filter`` as there) for torchao's ``Float8Linear``.

    Their matmuls then run in float8 (e4m3 inputs and weights, e5m2 output gradients, scaled per
    ``recipe``: see :data:`FLOAT8_RECIPES`), as Megatron-LM trains Nemotron-H with Transformer
    Engine. Parameters and their names do not change (the weights stay in the model's dtype and are
    cast at each matmul), so checkpoints, optimizer state and FSDP are as without. Call before
    activation checkpointing, compile and FSDP (torchtitan's order). Returns the converted names.

    Raises ImportError (with how to install it) where torchao is missing.
    """
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"{recipe!r} is not one of {', '.join(FLOAT8_RECIPES)}")
    if recipe == "none":
        return []
    float8 = torchao_float8()
    chosen = set(float8_linears(model, recipe, auto_filter))
    float8.convert_to_float8_training(
        model,
        config=float8.Float8LinearConfig.from_recipe_name(recipe),
        module_filter_fn=lambda module, name: name in chosen,
    )
    return sorted(chosen)


def torchao_float8():
    """``torchao.float8``; ImportError, saying how to install it, where torchao is missing."""
    try:
        # torchao's import logs a warning for each of its compiled extensions that does not match the
        # installed torch or device (float8 training uses none of them), and torch 2.13's pytree one for
        # each Enum torchao registers as a constant (deprecated there, harmless): neither is the user's.
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            import torchao.float8
    except ImportError as e:
        raise ImportError(
            f"float8 training needs torchao ({e}): pip install torchao, or hybridlm's extra: pip install 'hybridlm[float8]'"
        ) from e
    # An old torchao imports but lacks the recipes by name (its float8 API moved between releases): say so here,
    # not as an AttributeError from inside the trainer.
    if not hasattr(getattr(torchao.float8, "Float8LinearConfig", None), "from_recipe_name"):
        version = getattr(torchao, "__version__", "of unknown version")
        raise ImportError(
            f"torchao {version} has no float8 training recipes (Float8LinearConfig.from_recipe_name): "
            "pip install 'torchao>=0.18', or hybridlm's extra: pip install 'hybridlm[float8]'"
        )
    return torchao.float8
