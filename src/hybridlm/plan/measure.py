"""Measure forward+backward time of each block kind on a device (``hybridlm plan --measure``), and what each block
keeps for its backward (:func:`saved_bytes`, which the cost model's memory is judged by).

One small model holds one block of every distinct kind in the pattern (plus one MTP depth when
the pattern has MTP), at the config's real sizes; each piece is timed alone on random input of
``(micro_batch_size, seq_len, hidden)`` with document ids, as training gives them. On CUDA the blocks
run under bf16 autocast, as training does; with ``float8`` their linear layers are swapped as training
swaps them (``ops.float8.apply_float8``), uncompiled.
"""

from __future__ import annotations

import time

import torch

from ..config import ModelConfig
from ..ops.float8 import apply_float8
from ..pattern.symbols import MTP_SEPARATOR
from .planner import block_text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def measure_times(
    config: ModelConfig,
    seq_len: int,
    micro_batch_size: int = 1,
    device: str | None = None,
    recompute: bool = False,
    repeats: int = 3,
    float8: str = "none",
    float8_auto_filter: bool = False,
) -> dict[str, float]:
    """Median forward+backward seconds of each block kind, ``'embedding'``, ``'head'`` and ``'mtp'``.

    Keys are block strings as in :attr:`HybridPattern.blocks` (``'M'``, ``'*-'``); ``'mtp'`` is
    one MTP depth including its head and loss; ``'head'`` is the final norm, head and loss, both as
    training runs them (``head_loss``: the chunked linear cross entropy, never the whole (B, L, V) logits).
    ``float8``: a ``train.float8`` recipe for the blocks' linear layers (ImportError without torchao), those too
    small to gain left out with ``float8_auto_filter`` (``train.float8_auto_filter``).
    """
    from ..model import HybridLM

    dev = torch.device(device or default_device())
    p = config.parsed
    kinds = list(dict.fromkeys(p.blocks))
    text = "".join(block_text(b) for b in kinds)
    if p.mtp:
        text += MTP_SEPARATOR + p.mtp
    small = config.replace(pattern=text)
    model = HybridLM(small, device=dev)
    apply_float8(model, float8, float8_auto_filter)
    for block in (*model.blocks.values(), *(b for depth in model.mtp for b in depth.blocks.values())):
        block.activation_checkpointing = recompute  # the MTP depths' too, as training recomputes them
    B, L, H = micro_batch_size, seq_len, config.hidden_size
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, L), device=dev, generator=gen)
    x = torch.randn(B, L, H, device=dev, generator=gen)
    # Training always passes its rows' document ids, which send attention through the document-masked path
    # (on CUDA FlexAttention: attention and MLA under the documents' block mask, DSA under its selection's) and the
    # scans through their per-document one: one document per row takes the same kernels.
    ctx = model.make_context(B, L, dev, doc_ids=torch.zeros(B, L, dtype=torch.long, device=dev))
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def train_step(forward) -> float:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast:
                out = forward()
            out.float().sum().backward() if out.dim() else out.backward()

        return _timed(step, dev, repeats)

    times: dict[str, float] = {}
    for i, kind in enumerate(kinds):
        block = model.blocks[str(i)]
        inp = x.detach().requires_grad_(True)
        times[kind] = train_step(lambda block=block, inp=inp: block(inp, ctx)[0])  # (output, auxiliary losses)
    times["embedding"] = train_step(lambda: model.embeddings(ids))
    h = x.detach().requires_grad_(True)
    times["head"] = train_step(lambda: model.head_loss(model.norm_f(h), ids))
    if len(model.mtp):
        depth = model.mtp[0]
        times["mtp"] = train_step(
            lambda: model.head_loss(depth(h, model.embeddings(torch.roll(ids, -1, 1)), ctx)[0], ids)
        )
    return times


def saved_bytes(model, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> list[int]:
    """Bytes each main block of ``model`` (a :class:`~hybridlm.model.HybridLM`) keeps for its backward in one training
    step on ``ids`` (B, L) (``doc_ids`` (B, L): its rows' documents, as training passes them; on the CPU attention,
    MLA and DSA then attend under a dense mask), under bf16 autocast as training runs (compile the blocks first to see what compiled
    training keeps): the distinct tensors packed while the block runs (``torch.autograd.graph.saved_tensors_hooks``),
    its parameters left out (they stay anyway; a bf16 copy autocast makes of one counts). Runs the forward and
    backward; what :func:`hybridlm.plan.cost.estimate_costs` counts as a block's ``act_bytes`` (and its weights'
    bf16 copies) is judged by it (``tests/plan/test_cost.py``, ``benchmarks/saved_bytes.py``)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved: list[dict[int, int]] = [{} for _ in model.blocks]  # per block: storage -> bytes (a tensor saved twice once)
    running: list[int | None] = [None]
    hooks = []
    for i, block in enumerate(model.blocks.values()):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: running.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: running.__setitem__(0, None)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if running[0] is not None and t.data_ptr() not in params:
            saved[running[0]][t.data_ptr()] = t.numel() * t.element_size()
        return t

    try:
        with (
            torch.autocast(ids.device.type, torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            model(ids, labels=ids, doc_ids=doc_ids, return_logits=False).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return [sum(s.values()) for s in saved]
