"""A model's next-token loss over packed rows, summed per head, so that batches of any size add up to the
corpus's loss: the trainer's validation and ``hybridlm eval`` count it alike."""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from dataclasses import dataclass

import torch

from ..model import IGNORE_INDEX, label_counts
from .data import PackedRows, eval_rows


def loss_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each head's summed next-token loss and the labels it was scored on.

    The model returns each head's mean; multiplied back by its label count it becomes a sum, which parts of
    any size (a short last batch, a shorter tail row) add up exactly, where averaging their means would weigh
    a part of few labels like a full one.

    Args:
        model: a :class:`~hybridlm.HybridLM` that holds the output head (the whole model, or its FSDP form).
        batch: ``input_ids``, ``labels`` and ``doc_ids``, each (B, L) int64 on the model's device
            (:meth:`~hybridlm.train.data.PackedRows.rows`).

    Returns:
        (2, 1 + depths) float64 on the model's device: row 0 the loss sums in nats (the main head, then each
        MTP depth), row 1 the labels of each. A head without labels adds 0 over 0.
    """
    out = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], return_logits=False)
    counts = label_counts(batch["labels"], model.config.parsed.mtp_depths, batch["doc_ids"]).sum(0).double()
    return torch.stack([torch.stack([out.lm_loss, *out.mtp_losses]).double() * counts, counts])


@dataclass
class Evaluation:
    """What :func:`evaluate_corpus` found.

    Attributes:
        rows: forwards' rows, the shorter tail row counted as one.
        whole: every label of the corpus was evaluated, exactly once (every row, and the tail where there is one).
        loss_sums: summed loss in nats, of the main head, then of each MTP depth.
        tokens: labels of the main head, then of each MTP depth (a depth has fewer: it stops d tokens before
            each document's end and each row's).
        bytes: UTF-8 bytes of the main head's labels, where the tokenizer's ids each stand for fixed bytes
            (the byte tokenizer), else None.
    """

    rows: int
    whole: bool
    loss_sums: list[float]
    tokens: list[int]
    bytes: int | None = None

    def losses(self) -> list[float | None]:
        """Mean nats per label: the main head's, then each MTP depth's; None for a head without labels (an MTP
        depth d at rows of d tokens or fewer), whose 0 over 0 would read as a perfect score."""
        return [s / n if n else None for s, n in zip(self.loss_sums, self.tokens)]

    @property
    def loss(self) -> float | None:
        return self.losses()[0]

    @property
    def bits_per_byte(self) -> float | None:
        """The main head's nats over all its labels (document ends too), in bits, per byte of text labelled."""
        return self.loss_sums[0] / math.log(2) / self.bytes if self.bytes else None


def weighted_mean(values: list[float | None], weights) -> float | None:
    """``sum(w * v)`` of a blend's per-source ``values`` (losses, bits per byte) under its normalised ``weights``
    (D,): the value expected of a row drawn as training draws them. None where a source has none (no labels)."""
    if any(v is None for v in values):
        return None
    return float(sum(w * v for w, v in zip(weights, values)))


def perplexity(loss: float) -> float:
    """``exp(loss)``; inf past float64's range (a loss above 709.78) rather than an OverflowError."""
    return math.exp(loss) if loss < 709.78 else math.inf


@torch.no_grad()
def evaluate_corpus(
    model: torch.nn.Module,
    rows: PackedRows,
    batch_size: int,
    batches: int | None = None,
    token_bytes: list[int] | None = None,
    progress: bool = False,
) -> Evaluation:
    """The model's next-token loss on ``rows``, ``batch_size`` rows per forward, in eval mode.

    Args:
        model: a :class:`~hybridlm.HybridLM`, on the device the rows are moved to.
        rows: the corpus's packed rows.
        batch_size: rows per forward; the last batch holds the rest, and its labels count as many as any.
        batches: at most this many batches, of rows spread evenly over the corpus (:func:`eval_rows`, the
            trainer's choice: the same rows each time), whole rows only as the trainer reads them, also where
            they are every row; None: every row, then the tokens after the last whole row as one shorter row
            (:meth:`PackedRows.tail`), so that every label counts exactly once.
        token_bytes: (vocab,) the UTF-8 bytes each id stands for, where that is fixed (the byte tokenizer's
            :meth:`~hybridlm.train.tokenizer.ByteTokenizer.token_bytes`); None: bytes not counted.
        progress: a progress bar on stderr, one step per forward.
    """
    index = eval_rows(rows.num_rows, rows.num_rows if batches is None else batches * batch_size)
    # Not the tail with ``batches``, even where they take every row: the trainer's validation, whose val_loss the
    # same rows must give, never reads it (with a small validation split, train.eval_batches often takes all rows).
    rest = rows.tail()
    whole = len(index) == rows.num_rows and (batches is None or rest is None)
    tail = rest if batches is None else None
    parts = itertools.chain(
        (rows.rows(index[i : i + batch_size]) for i in range(0, len(index), batch_size)), [tail] if tail else []
    )
    device = next(model.parameters()).device
    depths = model.config.parsed.mtp_depths
    sums = torch.zeros(2, 1 + depths, dtype=torch.float64, device=device)  # summed on the device: no sync per batch
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    table = None if token_bytes is None else torch.tensor(token_bytes, dtype=torch.int64, device=device)
    total = -(-len(index) // batch_size) + (tail is not None)
    was_training = model.training
    model.eval()  # MoE routers count expert load in training mode only
    bar = contextlib.nullcontext()
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="evaluating", unit="batch", file=sys.stderr)
    try:
        with bar:
            for part in parts:
                part = {k: v.to(device) for k, v in part.items()}
                sums += loss_sums(model, part)
                if table is not None:
                    labels = part["labels"]
                    nbytes += table[labels.clamp(min=0)].masked_fill(labels == IGNORE_INDEX, 0).sum()
                if progress:
                    bar.update()
    finally:
        model.train(was_training)
    return Evaluation(
        rows=len(index) + (tail is not None),
        whole=whole,
        loss_sums=sums[0].tolist(),
        tokens=[int(n) for n in sums[1].tolist()],
        bytes=None if table is None else int(nbytes),
    )
