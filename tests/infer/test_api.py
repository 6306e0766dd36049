"""The completions request of `hybridlm serve`: every field checked by name, OpenAI's defaults, refusals."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridlm.infer.api import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    MAX_LOGPROBS,
    MAX_STOPS,
    RequestError,
    Sampling,
    logprobs_body,
    parse_request,
    read_json,
)
from hybridlm.infer.logprobs import TokenLogprob
from hybridlm.train.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


def parse(body: dict, limit: int = 64, batch: int = 8):
    return parse_request(
        body, model_name="tiny", encode=TOKENIZER.encode, vocab_size=257, max_tokens_limit=limit, max_batch_size=batch
    )


def refused(body: dict, status: int = 400) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.status == status
    assert e.value.body()["error"]["type"] == "invalid_request_error"
    return e.value


def test_defaults_are_openais_and_greedy_settings_batch_whatever_else_is_given():
    request = parse({"prompt": "hi", "model": "tiny"})
    assert request.prompts == [[104, 105]] and request.max_tokens == DEFAULT_MAX_TOKENS == 16
    assert request.sampling == Sampling(DEFAULT_TEMPERATURE, 0, 1.0, 1.0, None) and DEFAULT_TEMPERATURE == 1.0
    assert request.stops == [] and not request.stream and not request.include_usage
    assert request.stop_ids == frozenset()  # a prompt is no conversation: the end of document alone ends it
    # Greedy reads neither top_k, top_p nor the seed: two greedy requests differing there run together.
    a = parse({"prompt": "a", "temperature": 0, "top_k": 5, "top_p": 0.5, "seed": 3}).sampling
    assert a == parse({"prompt": "b", "temperature": 0.0}).sampling == Sampling(0.0, 0, 1.0, 1.0, None)
    assert not a.seeded and parse({"prompt": "a", "seed": 3}).sampling.seeded
    nulls = parse({"prompt": "hi", "max_tokens": None, "temperature": None, "stop": None, "n": None, "echo": None})
    assert nulls.max_tokens == 16 and nulls.sampling.temperature == 1.0
    # A server whose --max-new-tokens-limit is below the default takes a request without max_tokens, at the limit.
    assert parse({"prompt": "hi"}, limit=8).max_tokens == 8
    assert parse({"prompt": "hi", "max_tokens": None}, limit=8).max_tokens == 8


def test_prompts_are_text_texts_token_ids_or_lists_of_them():
    assert parse({"prompt": ["ab", ""]}).prompts == [[97, 98], []]
    assert parse({"prompt": [5, 6]}).prompts == [[5, 6]]
    assert parse({"prompt": [[5], [6, 7]]}).prompts == [[5], [6, 7]]
    assert parse({"prompt": "€"}).prompts == [list("€".encode())]
    for bad in ([], [[]], ["a", 5], [True], {"text": "a"}, 5, [1.5]):
        assert refused({"prompt": bad}).param == "prompt", bad
    assert "outside the vocabulary [0, 257)" in refused({"prompt": [[1], [257]]}).message
    # (a negative id taken here failed in generate, and with it every other request of its batch)
    assert "token ids [-1] are outside" in refused({"prompt": [[1], [-1]]}).message
    assert "prompt[1]" in refused({"prompt": [[1], [257]]}).message
    assert "lone surrogate" in refused({"prompt": "\ud800"}).message
    assert refused({"max_tokens": 3}).message.startswith("prompt: missing")


@pytest.mark.parametrize(
    "field, value",
    [
        ("best_of", 3),
        ("suffix", "x"),
    ],
)
def test_fields_that_would_change_the_result_are_refused_by_name(field, value):
    error = refused({"prompt": "hi", field: value})
    assert error.param == field and error.message.startswith(f"{field}: only ")


def test_frequency_and_presence_penalties_are_taken_in_openais_range_and_part_batches():
    """OpenAI's two penalties are served (greedy rows too), checked by name in [-2, 2]; rows of other penalties do
    not batch together, and a request without them passes none on."""
    sampling = parse({"prompt": "hi", "temperature": 0, "frequency_penalty": 0.5, "presence_penalty": -1}).sampling
    assert sampling == Sampling(0.0, 0, 1.0, 1.0, None, frequency_penalty=0.5, presence_penalty=-1.0)
    assert sampling.options() == {"frequency_penalty": 0.5, "presence_penalty": -1.0}
    assert sampling != parse({"prompt": "hi", "temperature": 0}).sampling
    assert parse({"prompt": "hi", "frequency_penalty": 0, "presence_penalty": None}).sampling.options() == {}
    assert parse({"prompt": "hi", "presence_penalty": 2}).sampling.options() == {"presence_penalty": 2.0}
    for field in ("frequency_penalty", "presence_penalty"):
        for value, says in ((2.5, "must be in [-2.0, 2.0], got 2.5"), (-3, "got -3"), ("1", "must be a number")):
            error = refused({"prompt": "hi", field: value})
            assert error.param == field and says in error.message, error.message


def test_min_p_is_taken_for_sampled_rows_and_checked_by_name():
    """min_p (an extension, as vLLM's): sampled rows keep it, greedy ones drop it (argmax reads none of the filters),
    and a value outside [0, 1] is refused by name."""
    assert parse({"prompt": "hi", "min_p": 0.1}).sampling.options() == {"min_p": 0.1}
    assert (
        parse({"prompt": "hi", "min_p": 0.1, "temperature": 0}).sampling
        == parse({"prompt": "a", "temperature": 0}).sampling
    )
    for value, says in ((1.5, "min_p must be in [0, 1], got 1.5"), ("x", "min_p: must be a number")):
        error = refused({"prompt": "hi", "min_p": value})
        assert error.param == "min_p" and says in error.message, error.message


def test_logit_bias_maps_token_ids_to_biases_in_openais_range():
    """logit_bias: a JSON object of token ids (strings, as JSON keys are) to numbers in [-100, 100], at most 300 of
    them; equal biases batch together (a hashable tuple in id order), and each bad entry is refused by name."""
    sampling = parse({"prompt": "hi", "temperature": 0, "logit_bias": {"50": -100, "7": 2.5}}).sampling
    assert sampling.logit_bias == ((7, 2.5), (50, -100.0)) and sampling.options() == {
        "logit_bias": {7: 2.5, 50: -100.0}
    }
    assert sampling == parse({"prompt": "x", "temperature": 0, "logit_bias": {"7": 2.5, "50": -100.0}}).sampling
    assert parse({"prompt": "hi", "logit_bias": {}}).sampling.options() == {}
    for value, says in (
        ([1, 2], "must be an object of token ids to biases"),
        ({"257": 1}, '"257" is not a token id (an integer in [0, 257))'),
        ({"-1": 1}, '"-1" is not a token id'),
        ({"x": 1}, '"x" is not a token id'),
        ({"5": 101}, "the bias of token 5 must be a number in [-100, 100], got 101"),
        ({"5": "1"}, "the bias of token 5 must be a number"),
        ({str(i): 1 for i in range(301)}, "at most 300 tokens, got 301"),
    ):
        error = refused({"prompt": "hi", "logit_bias": value})
        assert error.param == "logit_bias" and says in error.message, error.message


def test_stop_token_ids_and_ignore_eos_are_vllms_extensions_checked_by_name():
    request = parse({"prompt": "hi", "stop_token_ids": [5, 9, 5], "ignore_eos": True})
    assert request.stop_ids == frozenset({5, 9}) and request.ignore_eos
    plain = parse({"prompt": "hi", "stop_token_ids": None, "ignore_eos": None})
    assert plain.stop_ids == frozenset() and not plain.ignore_eos
    for field, value, says in (
        ("stop_token_ids", 5, "must be a list of at most 256 token ids, got 5"),
        ("stop_token_ids", [1, 257], "257 is not a token id (an integer in [0, 257))"),
        ("stop_token_ids", [True], "true is not a token id"),
        ("stop_token_ids", list(range(257)), "at most 256"),
        ("ignore_eos", 1, "must be true or false, got 1"),
    ):
        error = refused({"prompt": "hi", field: value})
        assert error.param == field and says in error.message, error.message


def test_fields_at_their_neutral_values_and_the_user_are_taken():
    neutral = dict(n=1, best_of=1, logprobs=None, echo=False, suffix=None, presence_penalty=0.0, frequency_penalty=0)
    assert parse({"prompt": "hi", "logit_bias": {}, "user": "someone", **neutral}).prompts == [[104, 105]]


def test_what_lm_evaluation_harness_sends_is_taken():
    """Its local-completions payload for generation, with HumanEval's five stop strings (the Codex paper's) and the
    end of text it adds to a task's: six, over OpenAI's four."""
    stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "<|endoftext|>"]
    body = {"prompt": ["def f():", "x = "], "model": "tiny", "max_tokens": 64, "temperature": 0, "stop": stops}
    request = parse({**body, "seed": 1234})
    assert request.stops == stops and request.prompts[1] == [120, 32, 61, 32] and request.max_tokens == 64
    assert parse({"prompt": "a", "stop": ["s"] * MAX_STOPS}).stops == ["s"] * MAX_STOPS


def test_an_unknown_field_is_refused_not_ignored():
    error = refused({"prompt": "hi", "max_new_tokens": 5})
    assert error.param == "max_new_tokens" and "unknown field" in error.message and "max_tokens" in error.message


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("max_tokens", -1, "integer in [1, 64]"),
        ("max_tokens", 0, "integer in [1, 64], got 0"),
        ("logprobs", MAX_LOGPROBS + 1, "null or an integer in [0, 20]"),
        ("logprobs", -1, "null or an integer in [0, 20]"),
        ("logprobs", 1.5, "null or an integer in [0, 20]"),
        ("logprobs", True, "null or an integer in [0, 20], got true"),
        ("logprobs", "1", "null or an integer in [0, 20]"),
        ("echo", "yes", "true or false"),
        ("echo", 1, "true or false"),
        ("max_tokens", 65, "integer in [1, 64]"),
        ("max_tokens", 1.5, "integer"),
        ("max_tokens", True, "integer"),
        ("max_tokens", "5", "integer"),
        ("temperature", -0.5, ">= 0"),
        ("temperature", "0.5", "a number"),
        ("top_p", 0, "in (0, 1]"),
        ("top_p", 1.5, "in (0, 1]"),
        ("top_k", -1, "an integer >= 0"),
        ("top_k", 2.5, "an integer"),
        ("repetition_penalty", 0, "> 0"),
        ("seed", 2**63, "integer in"),
        ("seed", 1.0, "an integer"),
        ("stream", "yes", "true or false"),
        ("stream", 1, "true or false"),
        ("stop", 5, "a string or a list"),
        ("stop", ["s"] * (MAX_STOPS + 1), f"at most {MAX_STOPS}"),
        ("stop", ["a", 1], "a string or a list of strings"),
        ("stop", [""], "empty string"),
        ("stream_options", {"include_usage": True}, "only read with stream"),
        ("stream_options", {"other": True}, "include_usage"),
        ("stream_options", {"include_usage": "yes"}, "include_usage must be true or false"),
        ("user", 5, "a string"),
        ("model", 5, "a string"),
    ],
)
def test_wrong_types_and_values_are_refused_naming_the_field(field, value, words):
    error = refused({"prompt": "hi", field: value})
    assert error.param == field and words in error.message, error.message


def test_what_lm_evaluation_harness_sends_to_score_is_taken():
    """Its local-completions payload for loglikelihood (multiple choice): token ids, echo, logprobs 1, one token; and
    echo with no new token (the prompt scored alone), which without echo is refused."""
    body = {"model": "tiny", "prompt": [[104, 105], [1]], "temperature": 0, "max_tokens": 1, "logprobs": 1}
    request = parse({**body, "seed": 1234, "echo": True})
    assert (request.echo, request.logprobs, request.max_tokens, request.prompts) == (True, 1, 1, [[104, 105], [1]])
    assert parse({"prompt": "hi", "echo": True, "max_tokens": 0}).max_tokens == 0
    assert refused({"prompt": "hi", "echo": True, "max_tokens": -1}).message.endswith("integer in [0, 64], got -1")
    assert parse({"prompt": "hi", "logprobs": 0, "stream": True}).logprobs == 0
    assert parse({"prompt": "hi", "logprobs": MAX_LOGPROBS}).logprobs == MAX_LOGPROBS  # (vLLM's limit: taken)


def test_the_logprobs_object_is_openais_with_the_picked_token_in_its_top_dict():
    """The first echoed token has no logprob; a top dict holds the k most likely and the picked token where it is not
    among them; two ids of one text (here 2 and 3 read as "?") keep the higher logprob; offsets count texts."""
    pieces = {1: "a", 2: "?", 3: "?", 4: "bc", 5: "d"}
    scored = [
        (1, None),
        (4, TokenLogprob(-2.0, ((3, -1.5), (2, -1.0)))),  # (not most likely first: the dict keeps -1.0 for "?")
        (5, TokenLogprob(-0.5, ((5, -0.5),))),
    ]
    assert logprobs_body(scored, pieces.__getitem__, offset=3) == {
        "tokens": ["a", "bc", "d"],
        "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {"?": -1.0, "bc": -2.0}, {"d": -0.5}],
        "text_offset": [3, 4, 6],
    }
    # As topk gives them, most likely first: the later, lower one of a shared text does not replace the higher.
    sorted_top = [(5, TokenLogprob(-0.5, ((2, -0.2), (3, -0.4), (5, -0.5))))]
    assert logprobs_body(sorted_top, pieces.__getitem__)["top_logprobs"] == [{"?": -0.2, "d": -0.5}]


def test_another_models_name_is_not_found_and_the_stream_options_go_with_a_stream():
    error = refused({"prompt": "hi", "model": "gpt-4"}, status=404)
    assert error.code == "model_not_found" and "'tiny'" in error.message and error.param == "model"
    request = parse({"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}, "stop": "\n"})
    assert request.stream and request.include_usage and request.stops == ["\n"]


def test_a_seed_whose_later_batches_would_overflow_is_refused():
    """Rows past max_batch_size draw from seed + their batch's first index, as hybridlm generate's batches do."""
    top = 2**63 - 1
    assert parse({"prompt": ["a"] * 8, "seed": top}, batch=8).sampling.seed == top
    assert "at most" in refused({"prompt": ["a"] * 9, "seed": top}).message
    assert parse({"prompt": ["a"] * 9, "seed": top, "temperature": 0}).sampling.seed is None  # (greedy: unread)


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{", "not valid JSON"),
        (b'{"prompt": NaN}', "NaN is not JSON"),
        (b"\xff", "not valid JSON"),
        (b"[1]", "a JSON object, got list"),
        (b"", "not valid JSON"),
    ],
)
def test_a_body_that_is_no_json_object_is_a_400(body, words):
    with pytest.raises(RequestError) as e:
        read_json(body)
    assert e.value.status == 400 and words in e.value.message
    assert json.loads(json.dumps(e.value.body()))["error"]["param"] is None


def test_n_choices_per_prompt_are_rows_in_order_and_bad_counts_are_refused_by_name():
    """n: each prompt n times in a row (choice i * n + j is prompt i's j-th), as OpenAI and vLLM number them; an
    integer in [1, 128], a bool or a float refused naming n; the seed's range counts every choice."""
    request = parse({"prompt": ["ab", "c"], "n": 3, "temperature": 0.7})
    assert request.n == 3 and request.prompts == [[97, 98]] * 3 + [[99]] * 3
    assert parse({"prompt": "ab"}).n == 1
    for bad in (0, 129, True, 2.0, "2", -1):
        error = refused({"prompt": "hi", "n": bad})
        assert error.param == "n" and "must be an integer in [1, 128]" in error.message, bad
    assert parse({"prompt": "hi", "n": 128}).prompts == [[104, 105]] * 128
    from hybridlm.infer.generate import SEED_RANGE

    # with 8 rows per batch, 9 choices start a second batch at seed + 8
    assert refused({"prompt": "hi", "n": 9, "temperature": 1, "seed": SEED_RANGE[1] - 7}).param == "seed"
    assert parse({"prompt": "hi", "n": 8, "temperature": 1, "seed": SEED_RANGE[1]}).n == 8


# -- any body: a request or a 4xx naming a field, never another exception ---------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
_FIELD_VALUES = {
    "prompt": st.one_of(st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=5), _JSON),
    "n": st.one_of(st.integers(1, 4), st.integers(-2, 200), _JSON),
    "max_tokens": st.one_of(st.integers(0, 64), st.integers(-2, 100), _JSON),
    "temperature": st.one_of(st.floats(0, 2), st.floats(-1, 3, allow_nan=False), _JSON),
    "top_p": st.one_of(st.floats(0.01, 1), st.floats(-1, 2, allow_nan=False), _JSON),
    "top_k": st.one_of(st.integers(0, 257), st.integers(-2, 300), _JSON),
    "repetition_penalty": st.one_of(st.floats(0.5, 2), st.floats(-2, 3, allow_nan=False), _JSON),
    "frequency_penalty": st.one_of(st.floats(-2, 2), st.floats(-3, 3, allow_nan=False), _JSON),
    "presence_penalty": st.one_of(st.floats(-2, 2), st.integers(-3, 3), _JSON),
    "min_p": st.one_of(st.floats(0, 1), st.floats(-1, 2, allow_nan=False), _JSON),
    "logit_bias": st.one_of(
        st.dictionaries(st.integers(-2, 300).map(str), st.floats(-120, 120, allow_nan=False), max_size=3), _JSON
    ),
    "seed": st.one_of(st.integers(0, 2**31), st.integers(-(2**65), 2**65), _JSON),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(max_size=3), max_size=18), _JSON),
    "stream": st.one_of(st.booleans(), _JSON),
    "stream_options": st.one_of(st.just({"include_usage": True}), _JSON),
    "echo": st.one_of(st.booleans(), _JSON),
    "logprobs": st.one_of(st.integers(0, 5), st.integers(-2, 25), _JSON),
    "stop_token_ids": st.one_of(st.lists(st.integers(-2, 300), max_size=3), _JSON),
    "ignore_eos": st.one_of(st.booleans(), _JSON),
    "model": st.one_of(st.just("tiny"), _JSON),
    "best_of": _JSON,
    "user": _JSON,
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {"prompt": st.one_of(st.text(min_size=1, max_size=12), _FIELD_VALUES["prompt"])},
        optional={k: v for k, v in _FIELD_VALUES.items() if k != "prompt"},
    ),
    st.one_of(st.just({}), st.dictionaries(st.text(max_size=5), _JSON, max_size=2)),
)
def test_any_body_is_a_request_or_a_client_error_naming_its_field(fields, extra):
    """Whatever a client sends (the known fields with any JSON value, unknown fields beside them), parse_request
    returns a request or raises a 4xx RequestError whose param, where it names one, is a field of the body; no other
    exception escapes (it would answer 500)."""
    body = {**extra, **fields}
    try:
        request = parse(body)
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message
        assert e.param is None or e.param in body or e.param == "prompt", (e.param, body)
        json.dumps(e.body())
    else:
        assert request.prompts and all(isinstance(t, int) for p in request.prompts for t in p)
        assert len(request.prompts) % request.n == 0 and (0 if request.echo else 1) <= request.max_tokens <= 64
