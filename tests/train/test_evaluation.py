"""Loss sums over packed rows: any batch size, a short last batch and a shorter tail add up to one corpus loss."""

import math

import numpy as np
import pytest
import torch

from hybridlm import HybridLM
from hybridlm.train.data import PackedRows, TokenStream
from hybridlm.train.evaluation import evaluate_corpus, loss_sums, perplexity, weighted_mean
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    return HybridLM(tiny_config("M[*-]/[*-]", vocab_size=64), seed=0, dtype=torch.float64)


def _rows(seq_len: int) -> PackedRows:
    rng = np.random.default_rng(0)
    lengths = [9, 1, 23, 5, 14, 30]  # a document of its end token alone, too
    tokens = np.concatenate([np.append(rng.integers(0, 63, n - 1), 63) for n in lengths])
    return PackedRows(TokenStream(tokens, np.concatenate([[0], np.cumsum(lengths)])), seq_len)


def test_loss_sums_are_the_models_means_times_their_labels(model):
    batch = _rows(8).rows(np.arange(4))
    out = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"])
    sums = loss_sums(model, batch)
    assert sums.shape == (2, 2) and sums.dtype == torch.float64
    assert sums[1, 0] == (batch["labels"] != -100).sum()
    torch.testing.assert_close(sums[0] / sums[1], torch.stack([out.lm_loss, *out.mtp_losses]))


def test_any_batch_size_gives_the_same_loss_and_counts(model):
    """One row per forward, or 3 (a short last batch of 2), or all at once: sums per token, not means per batch,
    so the loss does not depend on the split."""
    rows = _rows(10)  # 82 tokens: 8 rows and a tail of 1
    assert rows.num_rows == 8 and rows.tail()["labels"].shape == (1, 1)
    results = [evaluate_corpus(model, rows, b) for b in (1, 3, 8)]
    for r in results:
        assert (r.rows, r.whole, r.tokens[0]) == (9, True, 82 - 6)
        assert r.tokens == results[0].tokens
        assert r.losses() == pytest.approx(results[0].losses(), rel=1e-12)
    assert results[0].bytes is None and model.training  # its mode given back


def test_batches_limit_the_rows_and_count_bytes_where_ids_are_bytes(model):
    rows = _rows(10)
    r = evaluate_corpus(model, rows, 2, batches=2, token_bytes=[1] * 63 + [0])
    labels = rows.rows(np.array([0, 2, 5, 7]))["labels"]  # eval_rows(8, 4): evenly spaced, no tail
    assert (r.rows, r.whole, r.tokens[0]) == (4, False, int((labels != -100).sum()))
    assert r.bytes == int(((labels != -100) & (labels != 63)).sum())


def test_batches_that_take_every_row_of_a_corpus_without_a_tail_are_whole(model):
    """82 tokens in rows of 9: 9 rows and no tail, so 3 batches of 3 evaluate every label, as all rows do."""
    rows = _rows(9)
    assert rows.num_rows == 9 and rows.tail() is None
    r = evaluate_corpus(model, rows, 3, batches=3)
    assert (r.rows, r.whole, r.tokens) == (9, True, evaluate_corpus(model, rows, 9).tokens)


def test_the_forwards_run_in_eval_mode():
    """MoE routers count expert load in training mode only: an evaluation of a training model must not add to it."""
    model = HybridLM(tiny_config("M*-", vocab_size=64), seed=0, dtype=torch.float64)
    modes = []
    hook = model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    evaluate_corpus(model, _rows(10), 4)
    hook.remove()
    assert modes == [False] * 3 and model.training  # 2 batches of 4 rows, then the tail


def test_perplexity_past_float64s_range_is_inf_not_an_overflow_error():
    assert perplexity(0.0) == 1.0 and perplexity(709.0) == pytest.approx(math.exp(709.0))
    assert perplexity(710.0) == math.inf and perplexity(1e6) == math.inf


def test_a_blend_s_weighted_mean_is_none_where_a_source_has_none():
    """A source without labels (its loss None) or without counted bytes (bits per byte None) leaves the blend's
    value unknown: None, not a TypeError, nor a mean of the others."""
    assert weighted_mean([1.0, 3.0], np.array([0.25, 0.75])) == 2.5
    assert weighted_mean([1.0, None], [0.5, 0.5]) is None and weighted_mean([None, 2.0], [0.5, 0.5]) is None
