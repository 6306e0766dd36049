"""Inference entry points run with autograd off and the model's CUDA device current, whatever the calling thread's
settings (a serving worker's thread has grad mode on and cuda:0 current)."""

import contextlib
import threading
from types import SimpleNamespace

import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.infer import device as device_module
from hybridlm.infer import prefixes
from hybridlm.infer.batching import BatchWorker
from hybridlm.infer.decode import DecodeBatch
from hybridlm.infer.device import inference, inferring
from hybridlm.infer.generate import Sampler
from hybridlm.infer.logprobs import prefill_scored, score_prompts
from hybridlm.infer.prefix_store import PrefixStore
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import tiny_config
from tests.infer.test_batching import drain, request


class OnCuda1(torch.nn.Module):
    """A model whose parameters say they are on cuda:1 (none is here)."""

    def parameters(self, recurse: bool = True):
        yield SimpleNamespace(device=torch.device("cuda", 1))


def test_inference_turns_autograd_off_and_makes_the_models_cuda_device_current(monkeypatch):
    made = []

    @contextlib.contextmanager
    def current(device):
        made.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", current)
    with inference(OnCuda1()):
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and made == [torch.device("cuda", 1)]
    cpu = HybridLM(tiny_config("M-"), seed=0)
    with inference(cpu):  # (nothing made current for a model off CUDA)
        assert not torch.is_grad_enabled()
    holder = SimpleNamespace(model=OnCuda1())
    assert inferring(lambda self: torch.is_grad_enabled())(holder) is False and len(made) == 2


def test_every_entry_point_runs_under_inference(monkeypatch):
    """generate, prompt scoring, shared-prefix prefills, the decode batch and the serving worker each enter
    :func:`inference` of their model (the test counts them; a GPU test below runs them on cuda:1)."""
    monkeypatch.setattr(prefixes, "SHARED_PREFIX", 4)
    model = HybridLM(tiny_config("M-"), seed=0).eval()
    entered = []
    real = device_module.inference

    @contextlib.contextmanager
    def counted(m):
        entered.append(m)
        with real(m):
            yield

    monkeypatch.setattr(device_module, "inference", counted)
    for module in ("generate", "prefixes"):
        monkeypatch.setattr(f"hybridlm.infer.{module}.inference", counted)

    def enters(call) -> None:
        before = len(entered)
        call()
        assert len(entered) > before and all(m is model for m in entered)

    prompts = [[5, 6, 7, 8], [9, 10]]
    enters(lambda: generate(model, prompts, 2))
    enters(lambda: score_prompts(model, prompts, 1))
    enters(lambda: prefill_scored(model, prompts, 1))
    enters(lambda: prefixes.prefill_shared(model, [[*range(9), 1], [*range(9), 2]], PrefixStore()))
    batch = DecodeBatch(model, 1, 0, Sampler())
    enters(lambda: batch.admit([[1, 2]], [1], [None]))
    enters(batch.step)
    worker = BatchWorker(model, ByteTokenizer(), 2, continuous=True)
    worker.submit(request({"prompt": "hi", "max_tokens": 1}))
    monkeypatch.setattr(DecodeBatch, "step", lambda self: None)  # (the worker's own entry, not the batch's)
    monkeypatch.setattr(DecodeBatch, "admit", lambda self, *a, **k: None)
    enters(worker.step)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_worker_thread_serves_a_model_on_the_second_gpu():
    """Continuous batching on cuda:1, from a thread of its own (cuda:0 current there): the rows decode as
    ``generate`` decodes them on that device."""
    tokenizer = ByteTokenizer()
    model = HybridLM(tiny_config("M[*-]G", vocab_size=257), seed=0, device="cuda:1").eval()
    worker = BatchWorker(model, tokenizer, 4, continuous=True)
    jobs = [worker.submit(request({"prompt": p, "max_tokens": 5})) for p in ("hello", "a longer prompt")]
    thread = threading.Thread(target=drain, args=(worker,))
    thread.start()
    thread.join()
    for job, prompt in zip(jobs, ("hello", "a longer prompt")):
        expected = generate(model, tokenizer.encode(prompt), 5, eos_id=tokenizer.eos_id)
        assert job.rows[0].completion.text == tokenizer.decode(expected)
