"""Sampling from a model without a cache: each new token reruns the forward over the whole sequence.

Simple and exact for every mixer; a cached decoder (conv/SSM/KV states) belongs to a later issue.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int | None = 0,
) -> list[int]:
    """Continue ``prompt_ids``.

    Args:
        temperature: 0 picks the most likely token (greedy); otherwise logits are divided by it
            before sampling.
        top_k: sample among the k most likely tokens only (0 = all).
        eos_id: stop after this token.
        seed: seed of the sampling generator (None = nondeterministic).

    Returns:
        The new tokens (without the prompt).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids or [eos_id if eos_id is not None else 0]], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids).logits[0, -1].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    model.train(was_training)
    return new
