"""Pipeline stage selection: which blocks a pipeline rank (and virtual stage) builds.

This module does not import :mod:`.parser` (the parser imports it): a stage is selected from
any object with the few attributes of a parsed pattern listed in :class:`ParsedBlocks`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from .errors import PatternError

logger = logging.getLogger("hybridlm.pattern")


class ParsedBlocks(Protocol):
    """What stage selection reads from a :class:`~hybridlm.pattern.HybridPattern`."""

    @property
    def main(self) -> str: ...
    @property
    def blocks(self) -> tuple[str, ...]: ...
    @property
    def segments(self) -> tuple[tuple[str, ...], ...]: ...
    @property
    def block_layer_offsets(self) -> tuple[int, ...]: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_layers(self) -> int: ...


@dataclass(frozen=True)
class PatternStage:
    """The blocks one pipeline rank (and virtual stage) builds.

    Attributes:
        blocks: the stage's block strings, in order (a fused group is one string).
        block_offset: number of main-stack blocks before this stage.
        layer_offset: canonical index of the stage's first layer (= canonical layers before it).
        pp_rank, pp_size, vp_stage: the arguments the stage was selected with.
        segment: index of the ``|`` segment this stage is, or ``None`` for an automatic split
            (or the whole model).
        is_first: the stage holds the start of the main stack (it owns the embedding).
        is_last: the stage holds the end of the main stack (it owns the final norm, the
            output head and the MTP depths).
    """

    blocks: tuple[str, ...]
    block_offset: int
    layer_offset: int
    pp_rank: int
    pp_size: int
    vp_stage: int | None
    segment: int | None
    is_first: bool
    is_last: bool

    @property
    def layers(self) -> str:
        """Canonical layer symbols of this stage."""
        return "".join(self.blocks)

    @property
    def num_layers(self) -> int:
        return sum(len(b) for b in self.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def _check_int(value: object, name: str, minimum: int, text: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PatternError(f"{name} must be an integer >= {minimum}, got {value!r}", text, None)


def select_stage(
    p: ParsedBlocks,
    pp_rank: int,
    pp_size: int,
    vp_stage: int | None,
    first: int | None,
    last: int | None,
    warn: bool = True,
) -> PatternStage:
    """See :meth:`HybridPattern.stage`; ``warn=False`` silences the automatic-split warnings."""
    text = str(p)
    _check_int(pp_size, "pp_size", 1, text)
    _check_int(pp_rank, "pp_rank", 0, text)
    if pp_rank >= pp_size:
        raise PatternError(f"pp_rank {pp_rank} is out of range for pp_size {pp_size}", text, None)
    if vp_stage is not None:
        _check_int(vp_stage, "vp_stage", 0, text)
    for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is not None:
            _check_int(value, name, 0, text)

    segments = p.segments
    n_seg = len(segments)
    offsets = p.block_layer_offsets

    def make(start: int, stop: int, segment: int | None, is_first: bool, is_last: bool) -> PatternStage:
        blocks = p.blocks[start:stop]
        layer_offset = offsets[start] if start < len(offsets) else p.num_layers
        return PatternStage(blocks, start, layer_offset, pp_rank, pp_size, vp_stage, segment, is_first, is_last)

    if n_seg > 1 and (first is not None or last is not None):
        raise PatternError(
            "Cannot specify num_layers_in_first_pipeline_stage or num_layers_in_last_pipeline_stage "
            "(first_stage_layers / last_stage_layers) when the pattern contains pipe ('|') separators: "
            "the pipeline layout is already explicitly defined by the pipe separators",
            text,
            p.main.index("|"),
        )

    if n_seg == 1 and pp_size > 1:
        return _auto_split(p, text, pp_rank, pp_size, vp_stage, first, last, make, warn)

    if pp_size == 1 and (first is not None or last is not None):
        raise PatternError(
            "first_stage_layers / last_stage_layers size the first and last of several pipeline stages; with "
            "pp_size 1 the one stage holds every block",
            text,
            None,
        )
    if pp_size == 1 and vp_stage is None:
        # One rank without virtual stages holds the whole model, which is no segment. (A deliberate
        # deviation from Megatron where the pattern has '|': it builds only segment 0 here.)
        return make(0, p.num_blocks, None, True, True)

    if n_seg > 1 and n_seg % pp_size != 0:
        raise PatternError(
            f"The number of pipe-delimited segments ({n_seg}) in the pattern must be evenly divisible by "
            f"pipeline-model-parallel-size ({pp_size})",
            text,
            None,
        )
    index = (vp_stage or 0) * pp_size + pp_rank
    if index >= n_seg:
        raise PatternError(
            f"Pipeline segment index {index} (pp_rank={pp_rank}, vp_stage={vp_stage}) is out of range for "
            f"{n_seg} segments",
            text,
            None,
        )
    start = sum(len(seg) for seg in segments[:index])
    return make(start, start + len(segments[index]), index, index == 0, index == n_seg - 1)


def _auto_split(p, text, pp_rank, pp_size, vp_stage, first, last, make, warn):
    """Megatron's legacy split of a pattern without ``|`` over ``pp_size`` ranks."""
    if vp_stage is not None:
        raise PatternError(
            "Virtual pipeline parallelism (vp_stage != None) is not supported when the pattern has no pipe "
            "('|') separators. Add '|' separators to define explicit pipeline/virtual-pipeline stage boundaries",
            text,
            None,
        )
    if warn:
        _warn_auto_split(p)
    n = p.num_blocks
    if first is None and last is None:
        if n % pp_size:
            raise PatternError(
                f"Number of layers ({n} blocks) must be evenly divisible by pipeline-model-parallel-size "
                f"({pp_size}) when no pipe separators are specified in the pattern",
                text,
                None,
            )
        per = n // pp_size
        return make(pp_rank * per, (pp_rank + 1) * per, None, pp_rank == 0, pp_rank == pp_size - 1)

    f, lst = first or 0, last or 0
    middle = n - f - lst
    middle_stages = pp_size - (first is not None) - (last is not None)
    if middle < 0 or (middle_stages == 0 and middle != 0):
        # Deliberate deviation: Megatron silently drops or duplicates blocks here.
        raise PatternError(
            f"first_stage_layers={first} and last_stage_layers={last} do not tile the {n} blocks over "
            f"{pp_size} pipeline stages: blocks would be dropped or duplicated",
            text,
            None,
        )
    if middle_stages > 0 and middle % middle_stages:
        raise PatternError(
            f"Middle layers ({middle}) must be evenly divisible by middle pipeline stages ({middle_stages})",
            text,
            None,
        )
    is_first, is_last = pp_rank == 0, pp_rank == pp_size - 1
    if first is not None and is_first:
        return make(0, f, None, True, is_last)
    if last is not None and is_last:
        return make(n - lst, n, None, is_first, True)
    per = middle // middle_stages
    start = (pp_rank - (1 if first is not None else 0)) * per + f
    return make(start, start + per, None, is_first, is_last)


def _warn_auto_split(p: ParsedBlocks) -> None:
    logger.warning(
        "DEPRECATION: Using a hybrid layer pattern without pipe ('|') separators with "
        "pipeline_model_parallel_size > 1 is deprecated; the blocks are split by count, not by compute. "
        "Add '|' separators to the pattern to define the pipeline stages explicitly."
    )
    if any(len(b) > 1 for b in p.blocks):
        logger.warning(
            "The automatic pipeline split counts a fused block as one block although it does the work of two "
            "layers; stages may be unbalanced. Use '|' to place the stage boundaries."
        )
