"""Chunked linear cross entropy equals the head + float32 cross entropy it replaces."""

import torch
import torch.nn.functional as F

from hybridlm import HybridLM
from hybridlm.ops.cross_entropy import linear_cross_entropy
from tests.helpers import assert_rel_close, tiny_config


def test_linear_cross_entropy_matches_full_logits_forward_and_backward():
    torch.manual_seed(1)
    h = torch.randn(3, 37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 53, (3, 37))
    labels[0, :5] = -100
    labels[2, -1] = -100
    ref = F.cross_entropy((h @ w.T).reshape(-1, 53), labels.reshape(-1), ignore_index=-100)
    gh, gw = torch.autograd.grad(ref, (h, w))
    for chunk in (7, 64, 1000):  # several chunks, a ragged last chunk, one chunk
        loss = linear_cross_entropy(h, w, labels, chunk=chunk)
        ah, aw = torch.autograd.grad(loss * 1.0, (h, w))
        assert_rel_close(loss, ref, 1e-12, f"loss, chunk {chunk}")
        assert_rel_close(ah, gh, 1e-12, f"dh, chunk {chunk}")
        assert_rel_close(aw, gw, 1e-12, f"dW, chunk {chunk}")
    # Without gradients (evaluation) the same value, and no labels at all gives 0, not NaN.
    with torch.no_grad():
        assert_rel_close(linear_cross_entropy(h, w, labels, chunk=5), ref, 1e-12, "no-grad loss")
        assert linear_cross_entropy(h, w, torch.full_like(labels, -100)).item() == 0.0


def test_model_fused_loss_equals_logits_loss_with_mtp_and_tied_head():
    for tied in (False, True):
        config = tiny_config("M[*-]/[*-]/[*-]", tie_embeddings=tied)
        a, b = HybridLM(config, seed=0), HybridLM(config, seed=0)
        ids = torch.randint(0, config.vocab_size, (2, 29))
        labels = torch.roll(ids, -1, 1)
        doc_ids = torch.tensor([[0] * 11 + [1] * 18, [0] * 29])
        out_a = a(ids, labels, doc_ids=doc_ids)
        out_b = b(ids, labels, doc_ids=doc_ids, return_logits=False)
        assert out_b.logits is None and out_b.mtp_logits == []
        assert len(out_b.mtp_losses) == 2
        for x, y in zip([out_a.loss, out_a.lm_loss, *out_a.mtp_losses], [out_b.loss, out_b.lm_loss, *out_b.mtp_losses]):
            assert_rel_close(y, x, 1e-6, "loss")
        out_a.loss.backward()
        out_b.loss.backward()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert_rel_close(q.grad, p.grad, 1e-5, name)
