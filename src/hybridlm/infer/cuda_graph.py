"""The decode step captured once as a CUDA graph and replayed for every token.

A decode step launches hundreds of small kernels for one token per row; on a GPU, launch overhead
then dominates. With the cache's ``static`` set, every mixer's decode step has static shapes
(attention over the whole preallocated buffer, masked) and reads the position from the cache's
device tensors (``offset_t``, ``next_pos``), so the whole step can be recorded once.
"""

from __future__ import annotations

import torch

from .cache import InferenceCache


class GraphedDecodeStep:
    """``step(tokens (B, 1)) -> logits (B, V)``, replaying a captured ``model(tokens, cache=cache)``.

    Capture runs the step (two warm-ups and the recording); the cache's states and positions are restored
    afterwards, but its ``static`` stays set (every later decode step of it, replayed or eager, attends over
    the whole buffer, masked: the same results). The graph is tied to ``cache``'s buffers: build a new
    one for a new cache.
    """

    def __init__(self, model: torch.nn.Module, cache: InferenceCache) -> None:
        device = cache.offset_t.device
        if device.type != "cuda":
            raise ValueError("cuda_graph needs the model and cache on a CUDA device")
        cache.check_room(1)
        self.model, self.cache = model, cache
        cache.static = True  # from now on every decode step of this cache, replayed or not
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        snap = cache.snapshot()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (lazy inits, autotuning)
                    self._run()
                    cache.restore(snap)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()
        except RuntimeError as e:
            # e.g. a layer that reads a tensor on the host (MoE's portable expert loop).
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed; run without cuda_graph ({e})") from e
        finally:
            cache.restore(snap)

    def _run(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.cache, logits_to_keep=1).logits[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.check_room(1)
        self.tokens.copy_(tokens)
        self.graph.replay()  # advances offset_t and next_pos on the device
        self.cache.offset += 1
        return self.logits.clone()
