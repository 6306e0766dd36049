"""`hybridlm serve`'s chat completions: the request checked by name, the conversation rendered by the model's
template, the answer and stream in OpenAI's chat shapes, the end of turn, on a tiny byte-level model."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridlm import HybridLM, generate
from hybridlm.infer.api import RequestError, Sampling
from hybridlm.infer.chat import (
    NEUTRAL,
    Chat,
    ChatRequest,
    end_of_turn_ids,
    load_chat,
    parse_chat_request,
)
from hybridlm.infer.chat_template import ChatTemplate, ChatTemplateError
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import tiny_config
from tests.infer import test_server
from tests.infer.test_api import _JSON
from tests.infer.test_server import call

TOKENIZER = ByteTokenizer()
#: A plain-text ChatML: the byte tokenizer has no special tokens.
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = Chat(ChatTemplate(TEMPLATE, "test"), frozenset({TOKENIZER.eos_id}))
HI = [{"role": "user", "content": "hi"}]
PROMPT = "<user>hi</user>\n<assistant>"


def parse(body: dict, chat: Chat | None = CHAT, limit: int = 64):
    return parse_chat_request(
        body, chat, model_name="tiny", encode=TOKENIZER.encode, vocab_size=257, max_tokens_limit=limit, max_batch_size=8
    )


def refused(body: dict, chat: Chat | None = CHAT, status: int = 400):
    with pytest.raises(Exception) as e:
        parse(body, chat)
    assert e.value.status == status, e.value
    return e.value


def test_a_conversation_is_its_rendered_prompt_with_the_shared_fields_read_as_completions_reads_them():
    body = {"messages": HI, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 7}
    request = parse({**body, "stop": "x", "user": "u"})
    assert isinstance(request, ChatRequest) and request.prompts == [TOKENIZER.encode(PROMPT)]
    assert request.sampling == Sampling(0.5, 3, 0.9, 1.1, 7) and request.stops == ["x"]
    assert request.max_tokens == 64  # a chat answer runs to its end of turn, not to 16 tokens
    assert request.stop_ids == CHAT.stop_ids and not request.stream
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    assert parse({"messages": [{"role": "user", "content": parts}]}).prompts == [
        TOKENIZER.encode(PROMPT[:7] + "\n" + PROMPT[7:])
    ]
    # A null key is dropped (a client sends back an answer's message, with tool_calls: null), a name kept.
    again = [*HI, {"role": "assistant", "content": "yo", "tool_calls": None, "name": "bot"}, *HI]
    assert parse({"messages": again}).prompts[0] == TOKENIZER.encode(
        f"<user>hi</user>\n<assistant>yo</assistant>\n{PROMPT}"
    )


def test_max_completion_tokens_or_its_older_name_and_errors_name_the_one_given():
    assert parse({"messages": HI, "max_completion_tokens": 5}).max_tokens == 5
    assert parse({"messages": HI, "max_tokens": 6}).max_tokens == 6
    assert parse({"messages": HI, "max_tokens": 6, "max_completion_tokens": 6}).max_tokens == 6
    assert refused({"messages": HI, "max_completion_tokens": 0}).param == "max_completion_tokens"
    assert "[1, 64], got 0" in refused({"messages": HI, "max_completion_tokens": 0}).message
    assert refused({"messages": HI, "max_tokens": 65}).param == "max_tokens"
    assert "disagree" in refused({"messages": HI, "max_tokens": 5, "max_completion_tokens": 6}).message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("store", True),
        ("modalities", ["text", "audio"]),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(field, value):
    error = refused({"messages": HI, field: value})
    assert error.param == field and "only" in error.message


def test_the_sampling_extensions_are_read_as_the_completions_route_reads_them():
    body = {"messages": HI, "logit_bias": {"1": 2}, "frequency_penalty": 0.5, "presence_penalty": -1, "min_p": 0.1}
    sampling = parse(body).sampling
    assert sampling.options() == {
        "frequency_penalty": 0.5,
        "presence_penalty": -1.0,
        "min_p": 0.1,
        "logit_bias": {1: 2.0},
    }
    assert refused({"messages": HI, "presence_penalty": 3}).param == "presence_penalty"


def test_a_requests_stop_token_ids_end_a_turn_beside_the_models_end_of_turn_ids():
    request = parse({"messages": HI, "stop_token_ids": [7]})
    assert 7 in request.stop_ids and request.stop_ids > frozenset({7})  # (the chat's own too)
    assert parse({"messages": HI}).stop_ids == request.stop_ids - {7}


def test_openais_defaults_written_out_are_taken():
    # What a client may send without being asked to: each of OpenAI's defaults, spelled out.
    defaults = {"n": 1, "logprobs": False, "top_logprobs": 0, "store": False, "modalities": ["text"], "stream": False}
    defaults |= {"temperature": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "tool_choice": "none"}
    assert parse({"messages": HI, **defaults}).sampling == Sampling(1.0, 0, 1.0, 1.0, None)


def test_logprobs_and_top_logprobs_ask_for_the_chosen_and_the_k_most_likely_and_are_checked_by_name():
    assert parse({"messages": HI}).logprobs is None and parse({"messages": HI, "logprobs": False}).logprobs is None
    assert parse({"messages": HI, "logprobs": True}).logprobs == 0
    assert parse({"messages": HI, "logprobs": True, "top_logprobs": 20}).logprobs == 20
    assert parse({"messages": HI, "logprobs": None, "top_logprobs": 0}).logprobs is None  # OpenAI's defaults
    for body, param, words in (
        ({"logprobs": "yes"}, "logprobs", 'must be true or false, got "yes"'),
        ({"logprobs": 1}, "logprobs", "must be true or false, got 1"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "must be null or an integer in [0, 20], got 21"),
        ({"logprobs": True, "top_logprobs": True}, "top_logprobs", "got true"),
        ({"top_logprobs": 2}, "top_logprobs", "2 needs logprobs: true"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs", "2 needs logprobs: true"),
    ):
        error = refused({"messages": HI, **body})
        assert error.param == param and words in error.message, (body, error.message)


def test_neutral_values_are_taken_and_unknown_fields_refused():
    parse({"messages": HI, **NEUTRAL})
    parse({"messages": HI, **dict.fromkeys(NEUTRAL)})
    for field in ("prompt", "echo", "functions", "max_new_tokens"):
        error = refused({"messages": HI, field: 1})
        assert error.param == field and "unknown field" in error.message
    assert refused({"messages": HI, "model": "other"}, status=404).code == "model_not_found"
    assert refused({"messages": HI, "user": 3}).param == "user"  # (read by the completions route's checks)


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        (None, "non-empty list"),
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        (["hi"], "messages[0] must be a {role, content} object"),
        ([{"content": "hi"}], "messages[0].role must be one of system, user, assistant, got null"),
        ([{"role": "developer", "content": "x"}], "send it as system"),
        ([{"role": "tool", "content": "x"}], 'got "tool"'),
        ([{"role": "user"}], "messages[0].content: missing"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "part 'image_url' is not supported"),
        ([{"role": "user", "content": [{"type": "text"}]}], '{"type": "text", "text": STRING}'),
        ([{"role": "user", "content": "x", "tool_call_id": "1"}], "messages[0].tool_call_id is not supported"),
        ([{"role": "user", "content": "\ud800"}], "lone surrogate"),
        ([{"role": "user", "content": "x", "name": "\ud800"}], "messages[0].name is not UTF-8 text"),
        ([{"role": "user", "content": "x", "name": 3}], "messages[0].name must be a string"),
        ([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}], "[0] must be {"),
        ([{"role": "user", "content": "x", "reasoning_content": "r"}], "reasoning_content: only an assistant"),
        ([{"role": "assistant", "content": "x", "reasoning_content": 3}], "reasoning_content must be a string"),
        ([{"role": "assistant", "content": "x", "reasoning": "r"}], "messages[0].reasoning is not supported"),
        ([{"role": "assistant", "content": "x", "thinking": "r"}], "messages[0].thinking is not supported"),
        ([{"role": "assistant", "content": "x", "reasoning_content": "\ud800"}], "reasoning_content is not UTF-8"),
    ],
)
def test_bad_messages_are_refused_naming_the_message_and_key(messages, words):
    error = refused({"messages": messages})
    assert error.param == "messages" and words in error.message, error.message


def test_without_a_template_the_route_says_so_and_the_templates_refusal_is_a_400():
    for chat in (None, Chat(None)):
        error = refused({"messages": HI}, chat)
        assert error.code == "chat_template_missing" and "--chat-template FILE" in error.message
    strict = Chat(ChatTemplate("{{ raise_exception('only one message') if messages | length > 1 }}x", "strict"))
    error = refused({"messages": HI * 2}, strict)
    assert error.message == "messages: the chat template (strict) refused them: only one message"
    assert "rendered them as no text" in refused({"messages": HI}, Chat(ChatTemplate("", "empty"))).message


#: Branches on a switch of its own and writes an assistant's reasoning, as Qwen3's template does.
SWITCHED = Chat(
    ChatTemplate(
        "{% for m in messages %}{{ m.content }}{{ '(' + m.reasoning_content + ')' if m.reasoning_content is defined }}"
        "{% endfor %}{{ 'think:' if enable_thinking | default(true) else 'answer:' }}{{ style | default('') }}",
        "switched",
    ),
    template_kwargs={"enable_thinking": False, "style": "plain"},
)


def test_chat_template_kwargs_override_the_servers_defaults_key_by_key():
    def prompt(**fields) -> str:
        return TOKENIZER.decode(parse({"messages": HI, **fields}, SWITCHED).prompts[0])

    assert prompt() == prompt(chat_template_kwargs=None) == prompt(chat_template_kwargs={}) == "hianswer:plain"
    assert prompt(chat_template_kwargs={"enable_thinking": True}) == "hithink:plain"
    assert prompt(chat_template_kwargs={"style": "!", "unused": [1, {"a": None}]}) == "hianswer:!"
    assert TOKENIZER.decode(parse({"messages": HI, "chat_template_kwargs": {"enable_thinking": False}}).prompts[0]) == (
        PROMPT  # (a template that reads no switch renders as without them)
    )
    again = [*HI, {"role": "assistant", "content": "yo", "reasoning_content": "so"}, *HI]
    assert TOKENIZER.decode(parse({"messages": again}, SWITCHED).prompts[0]) == "hiyo(so)hianswer:plain"
    with pytest.raises(ValueError, match="'messages' is not a template variable"):
        Chat(CHAT.template, template_kwargs={"messages": []})


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([], "must be a JSON object of template variables, got []"),
        ("enable_thinking=false", "must be a JSON object"),
        (True, "must be a JSON object"),
        ({"messages": []}, "'messages' is not a template variable one may set"),
        ({"add_generation_prompt": False}, "'add_generation_prompt' is not a template variable"),
        ({"enable_thinking": True, "tools": []}, "'tools' is not a template variable"),
        ({"tokenize": True}, "'tokenize' is not a template variable"),
    ],
)
def test_bad_chat_template_kwargs_are_refused_by_name(value, words):
    error = refused({"messages": HI, "chat_template_kwargs": value})
    assert error.param == "chat_template_kwargs" and error.message.startswith("chat_template_kwargs: "), error
    assert words in error.message, error.message


def test_a_template_refusal_names_the_kwargs_it_was_given():
    strict = Chat(ChatTemplate("{{ raise_exception('no thinking here') if enable_thinking }}x", "strict"))
    error = refused({"messages": HI, "chat_template_kwargs": {"enable_thinking": True}}, strict)
    assert error.param == "messages"
    assert error.message == (
        'messages: the chat template (strict) refused them with chat_template_kwargs {"enable_thinking": true}: '
        "no thinking here"
    )


def test_the_end_of_turn_ids_are_generation_configs_the_tokenizers_and_its_eos_token(tmp_path):
    assert end_of_turn_ids(tmp_path, TOKENIZER) == {256}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert end_of_turn_ids(tmp_path, TOKENIZER) == {7, 9, 256}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert end_of_turn_ids(tmp_path, TOKENIZER) == {5, 256}

    class Specials(ByteTokenizer):
        def special_tokens(self):
            return {"<|im_end|>": 3}

    assert end_of_turn_ids(tmp_path, Specials(), "<|im_end|>") == {3, 5, 256}
    assert end_of_turn_ids(tmp_path, Specials(), "not special") == {5, 256}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert end_of_turn_ids(tmp_path, TOKENIZER) == {256}
    for bad in ("x", -1, True, [5, False], [[5]]):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ChatTemplateError, match="eos_token_id must be a token id or a list of them"):
            end_of_turn_ids(tmp_path, TOKENIZER)
    (tmp_path / "generation_config.json").write_text("{")  # a ChatTemplateError, which the CLI reports as a usage error
    with pytest.raises(ChatTemplateError, match=r"generation_config\.json"):
        end_of_turn_ids(tmp_path, TOKENIZER)


def test_load_chat_takes_the_given_file_over_the_folders_and_its_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "folder", "bos_token": "<s>"}))
    assert load_chat(tmp_path, TOKENIZER).template.render(HI) == "folder"
    (tmp_path / "mine.jinja").write_text("{{ bos_token }}mine")
    chat = load_chat(tmp_path, TOKENIZER, tmp_path / "mine.jinja")
    assert chat.template.render(HI) == "<s>mine" and chat.template.where == str(tmp_path / "mine.jinja")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_chat(tmp_path, TOKENIZER).template is None
    assert load_chat(tmp_path, TOKENIZER, template_kwargs={"a": 1}).template_kwargs == {"a": 1}


# -- over HTTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0).eval()


def serving(model, chat: Chat | None = CHAT, **kw):
    return test_server.serving(model, chat=chat, **kw)


def chat(server, body: dict):
    status, headers, data = call(server, "POST", "/v1/chat/completions", body)
    return status, json.loads(data) if headers.get("Content-Type") == "application/json" else data


def greedy(model, n: int) -> list[int]:
    return generate(model, TOKENIZER.encode(PROMPT), n, eos_id=TOKENIZER.eos_id)


def test_a_chat_answer_is_the_rendered_prompts_completion_in_openais_shape(model):
    with serving(model) as server:
        status, body = chat(server, {"model": "tiny", "messages": HI, "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "tiny"
    text = TOKENIZER.decode(greedy(model, 12))
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT),
        "completion_tokens": 12,
        "total_tokens": len(PROMPT) + 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    with serving(model) as server:  # n: as many choices of the one conversation (greedy: equal ones)
        status, body = chat(server, {"messages": HI, "max_tokens": 12, "temperature": 0, "n": 2})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [text, text]
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT),
        "completion_tokens": 24,
        "total_tokens": len(PROMPT) + 24,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_a_chat_stream_opens_with_the_role_and_its_deltas_join_to_the_answer(model):
    request = {"messages": HI, "max_completion_tokens": 10, "temperature": 0}
    with serving(model) as server:
        _, whole = chat(server, request)
        status, headers, data = call(
            server,
            "POST",
            "/v1/chat/completions",
            {**request, "stream": True, "stream_options": {"include_usage": True}},
        )
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = data.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""} and choices[0]["finish_reason"] is None
    assert "".join(c["delta"].get("content", "") for c in choices) == whole["choices"][0]["message"]["content"]
    assert choices[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    # Without include_usage, no chunk has a usage key.
    with serving(model) as server:
        data = call(server, "POST", "/v1/chat/completions", {**request, "stream": True})[2]
    chunks = [json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n")[:-2]]
    assert len(chunks) > 2 and not any("usage" in c for c in chunks)


@pytest.mark.parametrize("continuous", [False, True], ids=["static", "continuous"])
def test_the_end_of_turn_id_ends_the_answer_and_is_none_of_its_text(model, tmp_path, continuous):
    tokens = greedy(model, 12)
    k = next(i for i in range(3, 12) if tokens[i] not in tokens[:i])  # the first time the model picks it
    # generation_config.json's list, as an instruct model's folder has it (beside it, an id the model does not pick)
    unpicked = next(i for i in range(256) if i not in tokens)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [unpicked, tokens[k]]}))
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    end_of_turn = load_chat(tmp_path, TOKENIZER, tmp_path / "chat.jinja")
    request = {"messages": HI, "max_tokens": 12, "temperature": 0}
    with serving(model, end_of_turn, continuous=continuous) as server:
        _, body = chat(server, request)
        _, plain = call(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})[::2]
        streamed = call(server, "POST", "/v1/chat/completions", {**request, "stream": True})[2]
    assert body["choices"][0]["message"]["content"] == TOKENIZER.decode(tokens[:k])
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == k + 1
    choices = [json.loads(e.removeprefix("data: "))["choices"][0] for e in streamed.decode().split("\n\n")[:-2]]
    assert "".join(c["delta"].get("content", "") for c in choices) == TOKENIZER.decode(tokens[:k])
    assert choices[-1]["finish_reason"] == "stop"
    assert json.loads(plain)["choices"][0]["text"] == TOKENIZER.decode(tokens)  # the completions route: not a chat


def test_chat_errors_over_http_are_openai_error_bodies(model):
    with serving(model, chat=None) as server:
        status, body = chat(server, {"messages": HI})
        assert status == 400 and body["error"]["code"] == "chat_template_missing"
    with serving(model) as server:
        for request, param in (
            ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages"),
            ({"messages": HI, "prompt": "hi"}, "prompt"),
            ({"messages": HI, "n": 0}, "n"),
        ):
            status, body = chat(server, request)
            assert (
                status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
            )
        status, _, _ = call(server, "GET", "/v1/chat/completions")
        assert status == 405


def test_chat_template_kwargs_over_http_render_the_prompt_the_switch_asks_for(model):
    request = {"messages": HI, "max_tokens": 4, "temperature": 0}
    with serving(model, SWITCHED) as server:
        _, default = chat(server, request)
        _, switched = chat(server, {**request, "chat_template_kwargs": {"enable_thinking": True}})
        status, refusal = chat(server, {**request, "chat_template_kwargs": ["enable_thinking"]})
    for body, prompt in ((default, "hianswer:plain"), (switched, "hithink:plain")):
        tokens = generate(model, TOKENIZER.encode(prompt), 4, eos_id=TOKENIZER.eos_id)
        assert body["choices"][0]["message"]["content"] == TOKENIZER.decode(tokens)
        assert body["usage"]["prompt_tokens"] == len(prompt)
    assert status == 400 and refusal["error"]["param"] == "chat_template_kwargs", refusal


def test_chat_logprobs_are_each_answer_tokens_in_openais_chat_shape_streamed_or_whole():
    """``logprobs: true, top_logprobs: k``: per token of the answer its text, logprob, UTF-8 bytes and the k most
    likely, the values of generate's logprobs on the rendered prompt (a float64 model); a stream's chunks carry their
    own tokens' entries, which join to the whole answer's."""
    model = HybridLM(tiny_config("M[*-]", vocab_size=257), seed=0, dtype=torch.float64).eval()
    want = []
    tokens = generate(
        model, TOKENIZER.encode(PROMPT), 6, eos_id=TOKENIZER.eos_id, logprobs=3, callback=lambda r, t, s: want.append(s)
    )
    request = {"messages": HI, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    with serving(model) as server:
        status, whole = chat(server, request)
        data = call(server, "POST", "/v1/chat/completions", {**request, "stream": True})[2]
    assert status == 200, whole
    (answer,) = whole["choices"]
    content = answer["logprobs"]["content"]
    assert answer["logprobs"]["refusal"] is None and len(content) == len(tokens) == len(want)
    for entry, token, scores in zip(content, tokens, want):
        text = TOKENIZER.decode([token])
        assert entry["token"] == text and entry["logprob"] == scores.logprob
        # (a byte alone of a longer character decodes to U+FFFD: its bytes are not the text's, so none)
        assert entry["bytes"] == (None if 128 <= token < 256 else list(text.encode()))
        assert [e["token"] for e in entry["top_logprobs"]] == [TOKENIZER.decode([i]) for i, _ in scores.top]
        assert [e["logprob"] for e in entry["top_logprobs"]] == [v for _, v in scores.top]
    chunks = [json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n")[:-2]]
    streamed = [c["choices"][0]["logprobs"] for c in chunks]
    assert streamed[0] is None  # the opening chunk (the role)
    assert [e for s in streamed[1:] for e in s["content"]] == content
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer["message"]["content"]


_MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]), "content": _JSON},
        optional={"name": _JSON, "reasoning_content": _JSON, "tool_calls": st.none(), "x": _JSON},
    ),
    _JSON,
)


_VALID_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(min_size=1, max_size=6)}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {
            "messages": st.one_of(
                st.lists(_VALID_MESSAGE, min_size=1, max_size=3), st.lists(_MESSAGE, max_size=4), _JSON
            )
        },
        optional={
            "n": st.one_of(st.integers(1, 4), st.integers(-1, 200), _JSON),
            "max_tokens": st.one_of(st.integers(1, 64), st.integers(-1, 80), _JSON),
            "max_completion_tokens": st.one_of(st.integers(1, 64), st.integers(-1, 80), _JSON),
            "logprobs": st.one_of(st.booleans(), _JSON),
            "top_logprobs": st.one_of(st.integers(0, 5), st.integers(-1, 25), _JSON),
            "chat_template_kwargs": _JSON,
            "temperature": _JSON,
            "stop": _JSON,
            "tools": _JSON,
            "response_format": _JSON,
        },
    ),
    st.one_of(st.just({}), st.dictionaries(st.text(max_size=5), _JSON, max_size=2)),
)
def test_any_chat_body_is_a_request_or_a_client_error_naming_its_field(fields, extra):
    """Whatever a client sends to the chat route, it is a request or a 4xx RequestError naming a field of the body
    (or none); no other exception escapes (it would answer 500)."""
    body = {**extra, **fields}
    try:
        request = parse(body)
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message
        assert e.param is None or e.param in body or e.param in ("messages", "max_tokens"), (e.param, body)
    else:
        assert len(request.prompts) == request.n and request.prompts[0]
