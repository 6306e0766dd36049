"""Speculative decoding's picks: greedy equals plain greedy under every logit setting, and speculative sampling
draws each token from the main model's distribution (plain sampling's), whatever the drafts' distribution.

The rollback, the depths' drafts and greedy equality without settings are tested in test_cache.py."""

import itertools

import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.infer.generate import Sampler, nonfinite
from hybridlm.infer.speculative import _Depths, _Picks
from tests.infer.test_cache import model_for

PROMPT = [5, 17, 3, 9]


def _chi_square(counts: dict, expected: dict, n: int) -> float:
    """Pearson's statistic of observed ``counts`` against probabilities ``expected`` over ``n`` draws; an outcome
    outside ``expected``'s support gives inf."""
    if set(counts) - set(expected):
        return float("inf")
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected.items())


def _chi2_tail(df: int) -> float:
    """The chi-square distribution's 1e-4 upper quantile for ``df`` degrees of freedom (Wilson and Hilferty's
    approximation, within 2 % from df 3 up): a right sampler fails one seed in ten thousand, a wrong one (a draft
    kept without the test, a residual not max(p - q, 0)) by a margin of hundreds."""
    z = 3.719  # the normal distribution's 1e-4 upper quantile
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_the_acceptance_rule_gives_the_target_distribution_whatever_the_draft_distribution():
    """Handmade p (the main model's, two window positions and the bonus) and q (the drafts'), far apart: the first
    token has p_0's distribution, the second (where the first draft was kept) p_1's, the bonus p_2's; the first
    draft is kept as often as sum(min(p_0, q_0))."""
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.4, 0.1]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    assert 0.5 * (p[:2] - q).abs().sum(-1).min() > 0.4  # an always-keep rule would be far off
    sampler = Sampler(temperature=1.0, seed=0)
    n = 20_000
    first, second, bonus, kept_first = {}, {}, {}, 0
    for _ in range(n):
        picks = _Picks(sampler, [], 4, torch.device("cpu"))
        drafts = sampler.draw(q).tolist()
        picks.q = [q[:1], q[1:]]
        kept, token, bad, _ = picks.verify(p.log(), drafts)
        assert bad == [0, 0, 0]
        out = [*drafts[:kept], token]
        first[out[0]] = first.get(out[0], 0) + 1
        kept_first += kept >= 1
        if kept >= 1:
            second[out[1]] = second.get(out[1], 0) + 1
        if kept == 2:
            bonus[out[2]] = bonus.get(out[2], 0) + 1
    assert _chi_square(first, dict(enumerate(p[0].tolist())), n) < _chi2_tail(3)
    assert _chi_square(second, dict(enumerate(p[1].tolist())), kept_first) < _chi2_tail(3)
    assert _chi_square(bonus, dict(enumerate(p[2].tolist())), sum(bonus.values())) < _chi2_tail(3)
    rate = float(torch.minimum(p[0], q[0]).sum())
    assert abs(kept_first / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5


def test_speculative_sampling_has_plain_samplings_distribution():
    """Three new tokens from a model whose MTP depth drafts far from its own distribution (total variation 0.8):
    the sequences' frequencies over 3,000 samples fit the exact probabilities of plain sampling (top-3 at
    temperature 0.3, from full forwards), with most drafts refused and some kept."""
    model = model_for("M*/*-")
    sampler = Sampler(temperature=0.3, top_k=3)

    def p(seq: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([seq])).logits[0, -1:]
        return sampler.probabilities(sampler.adjusted(logits, None), nonfinite(logits))[0]

    with torch.no_grad():
        exact, p1 = {}, p(PROMPT)
        for x1 in p1.nonzero()[:, 0].tolist():
            p2 = p([*PROMPT, x1])
            for x2 in p2.nonzero()[:, 0].tolist():
                p3 = p([*PROMPT, x1, x2])
                for x3 in p3.nonzero()[:, 0].tolist():
                    exact[x1, x2, x3] = float(p1[x1] * p2[x2] * p3[x3])
    assert len(exact) == 27
    n, stats = 3000, {}
    out = generate(model, [PROMPT] * n, 3, temperature=0.3, top_k=3, speculative="mtp", seed=0, stats=stats)
    counts = {}
    for row in out:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert 0.1 < stats["acceptance_rate"] < 0.5
    assert _chi_square(counts, exact, n) < _chi2_tail(len(exact) - 1)


@pytest.mark.parametrize(
    "settings",
    [
        dict(repetition_penalty=1.8),
        dict(frequency_penalty=1.5, presence_penalty=0.5),
        dict(logit_bias={7: 0.4, 11: -0.3}),
    ],
    ids=["repetition", "frequency-presence", "logit-bias"],
)
def test_speculative_greedy_with_penalties_and_bias_gives_plain_greedys_tokens(settings, monkeypatch):
    """The penalties read the row's tokens, and a verified position the drafts before it: greedy speculation keeps
    plain greedy's tokens under them (which they change), with the depths' drafts and with drafts that are right
    for two tokens, then wrong (so that kept drafts are in the history of the positions after them)."""
    model = model_for("M[*-]/[*-]/[*-]")
    plain = generate(model, PROMPT, 24, **settings)
    assert plain != generate(model, PROMPT, 24)
    assert generate(model, PROMPT, 24, speculative="mtp", **settings) == plain
    truth = PROMPT + plain

    def oracle(self, tokens, num):
        good = truth[len(tokens) : len(tokens) + num]
        return good[:2] + [(t + 1) % 97 for t in good[2:]]

    monkeypatch.setattr(_Depths, "draft", oracle)
    stats = {}
    assert generate(model, PROMPT, 24, speculative="mtp", stats=stats, **settings) == plain
    assert stats["accepted"] >= 2 * (stats["verify_steps"] - 1)


@pytest.mark.parametrize(
    "settings", [dict(presence_penalty=2.0), dict(frequency_penalty=2.0), dict(repetition_penalty=5.0)]
)
def test_a_verified_position_is_penalized_for_the_drafts_before_it(settings):
    """Window position 1 picks token 1 unless the draft before it (token 1) is penalized: then token 2; the row's
    tokens before the window (token 3, output) are penalized everywhere."""
    logits = torch.tensor([[0.0, 3.0, 0.0, 2.9], [0.0, 2.5, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    picks = _Picks(Sampler(**settings), [0], 4, torch.device("cpu"))
    picks.accept([3])
    assert picks.verify(logits, [1, 2]) == (2, 0, [0, 0, 0], [])
    assert picks.verify(logits, [1, 1]) == (1, 2, [0, 0, 0], [])
    assert _Picks(Sampler(), [0], 4, torch.device("cpu")).verify(logits, [1, 2]) == (1, 1, [0, 0, 0], [])


def test_speculative_sampling_is_seeded_and_a_one_token_top_p_is_greedy():
    model = model_for("M*/*-/*-")
    settings = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2, speculative="mtp", max_new_tokens=16)
    a = generate(model, PROMPT, seed=3, **settings)
    assert a == generate(model, PROMPT, seed=3, **settings)
    assert any(generate(model, PROMPT, seed=s, **settings) != a for s in range(4, 8))
    greedy = generate(model, PROMPT, 16)
    assert generate(model, PROMPT, 16, temperature=1.0, top_p=1e-6, speculative="mtp") == greedy


def test_every_draft_kept_or_refused_at_each_depth(monkeypatch):
    """Two depths, sampled: over a few prompts each number of kept drafts (0, 1, 2) occurs, so each branch of the
    rollback runs under sampling too, and the tokens stay in the vocabulary."""
    model = model_for("M*/*-/*-")
    seen = set()
    verify = _Picks.verify

    def spy(self, logits, drafts, logprobs=None):
        out = verify(self, logits, drafts, logprobs)
        seen.add((len(drafts), out[0]))
        return out

    monkeypatch.setattr(_Picks, "verify", spy)
    for prompt, seed in itertools.product([PROMPT, [1, 2]], range(3)):
        out = generate(model, prompt, 12, temperature=0.7, speculative="mtp", seed=seed)
        assert all(0 <= t < model.config.vocab_size for t in out)
    assert {(2, 0), (2, 1), (2, 2)} <= seen


@pytest.mark.gpu
def test_speculative_sampling_on_gpu_is_seeded_and_keeps_greedy_and_the_target_distribution():
    """On CUDA (the sampler's generator on the device): seeded, a one-token top-p is greedy, greedy with a penalty
    is plain greedy, logprobs are plain decoding's, and the acceptance rule's first token has the target
    distribution."""
    model = model_for("M[*-]M/[*-]/[*-]").cuda()
    settings = dict(temperature=0.8, top_k=20, speculative="mtp", max_new_tokens=16)
    stats = {}
    a = generate(model, PROMPT, seed=3, stats=stats, **settings)
    assert a == generate(model, PROMPT, seed=3, **settings) and stats["verify_steps"] > 0
    assert generate(model, PROMPT, 16, temperature=1.0, top_p=1e-6, speculative="mtp") == generate(model, PROMPT, 16)
    penalty = dict(repetition_penalty=1.8)
    assert generate(model, PROMPT, 16, speculative="mtp", **penalty) == generate(model, PROMPT, 16, **penalty)
    got, want = [], []
    generate(model, PROMPT, 12, speculative="mtp", logprobs=2, callback=lambda r, t, lp: got.append((t, lp)))
    generate(model, PROMPT, 12, logprobs=2, callback=lambda r, t, lp: want.append((t, lp)))
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [lp.logprob for _, lp in got] == pytest.approx([lp.logprob for _, lp in want], abs=1e-4)
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1]], device="cuda")
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], device="cuda")
    sampler = Sampler(temperature=1.0, seed=0, device="cuda")
    n, first = 4000, {}
    for _ in range(n):
        picks = _Picks(sampler, [], 4, torch.device("cuda"))
        picks.q = [q]
        drafts = sampler.draw(q).tolist()
        kept, token, bad, _ = picks.verify(p.log(), drafts)
        assert bad == [0, 0]
        out = drafts[0] if kept else token
        first[out] = first.get(out, 0) + 1
    assert _chi_square(first, dict(enumerate(p[0].tolist())), n) < _chi2_tail(3)


def _depth_drafts(model, seq: list[int], k: int) -> list[int]:
    """The drafts the first ``k`` MTP depths make after ``seq``, from full forwards (greedy)."""
    drafts: list[int] = []
    for j in range(k):
        logits = model(torch.tensor([seq + drafts])).mtp_logits[j]
        drafts.append(int(logits[0, len(seq) - 2].argmax()))
    return drafts


@pytest.mark.parametrize("pattern", ["M[*-]/[*-]/[*-]", "M[*-]G/[*-]/[*-]"], ids=["rolled-back", "re-run"])
def test_a_session_serves_a_prompt_that_begins_with_its_tokens_as_a_fresh_generation(pattern, monkeypatch):
    """An answer stopped inside a verify window whose drafts were all taken (right drafts, a callback that stops at
    the 5th token) leaves the caches holding exactly its tokens but the last: a prompt that goes on from them runs
    only what it adds, in caches grown to fit (copied, not re-run), and gives a fresh generation's tokens, the depths
    drafting as from a full forward. Another prompt starts the session over. Both rollback paths: Mamba2 steps
    through a window and keeps its per-position states, Gated DeltaNet has none and the kept positions re-run."""
    from hybridlm.infer.speculative import SpeculativeSession

    model = model_for(pattern)
    truth = PROMPT + generate(model, PROMPT, 12)
    monkeypatch.setattr(_Depths, "draft", lambda self, tokens, num: truth[len(tokens) : len(tokens) + num])
    session, stats, made = SpeculativeSession(), {}, []

    def fifth(row, token):  # stop at the 5th token: inside the second round's window of three
        made.append(token)
        return len(made) == 5

    first = generate(model, PROMPT, 12, speculative="mtp", speculative_session=session, stats=stats, callback=fifth)
    assert first == truth[len(PROMPT) : len(PROMPT) + 5] and stats["accepted"] == stats["drafted"] > 0
    assert session.tokens == PROMPT + first and session.cache.offset == len(session.tokens) - 1 and session.kept == 0
    monkeypatch.undo()
    longer = [*PROMPT, *first, 3, 5, 8]
    small = session.cache.max_len
    stats = {}
    again = generate(model, longer, small, speculative="mtp", speculative_session=session, stats=stats)
    assert again == generate(model, longer, small) and session.kept == len(PROMPT) + len(first) - 1
    assert stats["prefill_tokens"] == 4 and session.cache.max_len > small  # the answer's last token, three new
    tokens = session.tokens
    assert session.depths.draft(tokens, 2) == _depth_drafts(model, tokens, 2)
    other = [9, *longer]
    assert generate(model, other, 6, speculative="mtp", speculative_session=session) == generate(model, other, 6)
    assert session.kept == 0 and session.tokens[: len(other)] == other
    # Another model (its states are not these) starts the session over too, whatever the prompt.
    twin = HybridLM(model.config, seed=7).eval()
    tokens = session.tokens
    assert generate(twin, tokens, 4, speculative="mtp", speculative_session=session) == generate(twin, tokens, 4)
    assert session.kept == 0


def test_a_session_is_for_one_speculative_prompt():
    from hybridlm.infer.speculative import SpeculativeSession

    model = model_for("M/*")
    for kwargs in (dict(), dict(speculative="mtp", prompts=[PROMPT, PROMPT])):
        prompts = kwargs.pop("prompts", PROMPT)
        with pytest.raises(ValueError, match="speculative_session"):
            generate(model, prompts, 4, speculative_session=SpeculativeSession(), **kwargs)
    with pytest.raises(ValueError, match="SpeculativeSession"):
        generate(model, PROMPT, 4, speculative="mtp", speculative_session={})


@pytest.mark.parametrize("settings", [dict(), dict(temperature=1.0, top_p=1e-6)], ids=["greedy", "top-p-one"])
@pytest.mark.parametrize("oracle", [False, True], ids=["depths", "right-drafts"])
def test_speculation_reports_the_logprobs_plain_decoding_reports(settings, oracle, monkeypatch):
    """Each token's logprob and top k under speculation (a kept draft's from the verify window, the token after the
    drafts too) are those plain decoding reports for the same tokens, within float rounding (the window's logits
    come from the chunked path); with the depths' drafts (refused here) and with drafts that are right (kept)."""
    model = model_for("M[*-]G/[*-]/[*-]")
    got, want, stats = [], [], {}
    plain = generate(model, PROMPT, 16, logprobs=3, callback=lambda r, t, lp: want.append((t, lp)), **settings)
    if oracle:
        truth = PROMPT + plain
        monkeypatch.setattr(_Depths, "draft", lambda self, tokens, num: truth[len(tokens) : len(tokens) + num])
        settings = dict()  # (right drafts are taken greedily: sampling would need their distribution)
    spec = generate(model, PROMPT, 16, speculative="mtp", logprobs=3, callback=lambda r, t, lp: got.append((t, lp)),
                    stats=stats, **settings)  # fmt: skip
    assert spec == plain and [t for t, _ in got] == spec and len(got) == len(want) == 16
    assert (stats["accepted"] > 0) == oracle
    for (_, a), (_, b) in zip(got, want):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [i for i, _ in a.top] == [i for i, _ in b.top] and len(a.top) == 3
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)


def test_sampled_speculations_logprobs_are_the_full_forwards_for_the_tokens_taken():
    """Sampled, a kept draft and the pick after it differ: each token's reported logprob is the full forward's
    log_softmax at its position, whichever it was, and its top k the forward's k most likely."""
    model = model_for("M[*-]G/[*-]/[*-]")
    got, stats = [], {}
    out = generate(model, PROMPT, 24, temperature=1.0, speculative="mtp", logprobs=2, seed=1, stats=stats,
                   callback=lambda r, t, lp: got.append(lp))  # fmt: skip
    assert 0 < stats["accepted"] < stats["drafted"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPT + out])).logits[0].double(), -1)[len(PROMPT) - 1 : -1]
    for i, (token, scored) in enumerate(zip(out, got)):
        assert scored.logprob == pytest.approx(float(lp[i, token]), abs=1e-5)
        assert [t for t, _ in scored.top] == lp[i].topk(2).indices.tolist()
