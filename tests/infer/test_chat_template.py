"""Chat templates: found in a model folder where transformers finds them, rendered and tokenized as its
``apply_chat_template(add_generation_prompt=True)`` renders and tokenizes them (a tokenizer built here, no download)."""

import json

import pytest

from hybridlm.infer.chat_template import (
    RESERVED_VARIABLES,
    ChatTemplate,
    ChatTemplateError,
    check_variables,
    find_chat_template,
    special_token_texts,
)
from hybridlm.train.tokenizer import ByteTokenizer, HFTokenizer

#: Added special tokens of the test tokenizer, ids 257 on (bytes are 0-255, <|endoftext|> 256).
SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>"]

#: Qwen-like ChatML: a system message first or a default one, namespace, tojson (HTML characters kept), tools.
CHATML = """{%- if tools %}
{{- '<|im_start|>system\\n# Tools\\n' }}{{- tools | tojson }}{{- '<|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant. ' + {"when": "<now> & é"} | tojson + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

#: Llama-2/Mistral-like: the BOS token written by the template, turns that must alternate, eos_token after answers.
INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

#: Loop controls, and block tags on lines of their own, indented: trim_blocks and lstrip_blocks decide the spacing.
LOOPS = """{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    {% if loop.index > 4 %}
        {% break %}
    {% endif %}
<{{ message.role }}>
{{ message.content }}
{% endfor %}
{% if add_generation_prompt %}
<assistant>
{% endif %}"""

#: Llama-3-like: bos_token, strftime_now's date, the system message taken out of the list and trimmed, `tools` and
#: `documents` tested against none (null as transformers passes them, not undefined), a namespace counter, loop.last,
#: a name, a generation block with a set inside, dict() through tojson, eos_token on the path not taken.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|im_start|>system\\n" }}
{%- if tools is not none %}{{- "Tools: " + tools | tojson }}{%- endif %}
{%- if documents is not none %}{{- "Documents: " + documents | tojson }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" + system_message + "<|im_end|>" }}
{%- set ns = namespace(users=0, last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.users = ns.users + 1 %}{%- set ns.last_user = loop.index0 %}{%- endif %}
    {{- '<|im_start|>' + message['role'] + ('(' + message.name + ')' if message.name is defined else '') + '\\n' }}
    {%- if message.role == 'assistant' %}
        {%- generation %}{% set text = message['content'] | trim %}{{ text }}{% endgeneration %}
    {%- else %}
        {{- message['content'] | trim }}
    {%- endif %}
    {{- '<|im_end|>' if not loop.last else '<|im_end|>\\n' }}
{%- endfor %}
{{- dict(users=ns.users) | tojson }}{{ ns.last_user }}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n\\n' }}{%- else %}{{- eos_token }}{%- endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "déjà vu? <b>"},
    ],
    [{"role": "user", "content": str(i)} if i % 2 == 0 else {"role": "assistant", "content": "ok"} for i in range(7)],
]


def tokenizer_json() -> str:
    """Byte-level BPE (bytes 0-255, <|endoftext|> 256) with :data:`SPECIALS` added, and a post-processor that puts
    <s> before every text it encodes with special tokens: a chat prompt must not get a second one."""
    tok = json.loads(ByteTokenizer().hf_files()["tokenizer.json"])
    for i, text in enumerate(SPECIALS, 257):
        token = {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False}
        tok["added_tokens"].append(token | {"normalized": False, "special": True})
        tok["model"]["vocab"][text] = i
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [259], "tokens": ["<s>"]}},
    }
    return json.dumps(tok)


def model_folder(path, template: str, where: str = "tokenizer_config.json"):
    """A folder as ``convert --from`` leaves the tokenizer files: tokenizer.json, tokenizer_config.json (special
    tokens as a string and as an AddedToken object) and the template in the file ``where`` names."""
    path.mkdir(exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
    }
    if where == "tokenizer_config.json":
        config["chat_template"] = template
    elif where == "chat_template.json":
        (path / where).write_text(json.dumps({"chat_template": template}))
    else:
        (path / where).write_text(template)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def ours(path) -> ChatTemplate:
    found = find_chat_template(path)
    assert found is not None
    return ChatTemplate(*found, special_token_texts(path))


@pytest.mark.parametrize(
    ("template", "where"),
    [
        (CHATML, "tokenizer_config.json"),
        (INST, "chat_template.jinja"),
        (LOOPS, "tokenizer_config.json"),
        (LLAMA3, "chat_template.jinja"),
    ],
    ids=["chatml", "inst", "loops", "llama3"],
)
def test_rendered_text_and_ids_are_transformers_apply_chat_template(tmp_path, template, where):
    transformers = pytest.importorskip("transformers")
    path = model_folder(tmp_path / "model", template, where)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    template_, tokenizer = ours(path), HFTokenizer(path / "tokenizer.json", "</s>")
    for messages in CONVERSATIONS[:2] if template is INST else CONVERSATIONS:
        if template is INST and messages[0]["role"] == "system":
            messages = messages[1:]
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template_.render(messages) == text
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tokenizer.encode(text) == ids
        # As training writes a conversation out (hybridlm prepare): no generation prompt.
        whole = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert template_.render(messages, add_generation_prompt=False) == whole
    if template is INST:  # one <s>, the template's: the tokenizer's own would double it
        assert ids[0] == 259 and ids.count(259) == 1 and ids.count(260) == 1  # (and </s> after the answer)


def test_the_templates_own_refusal_is_its_message(tmp_path):
    template = ours(model_folder(tmp_path / "model", INST))
    with pytest.raises(ChatTemplateError, match=r"^Conversation roles must alternate user/assistant"):
        template.render([{"role": "assistant", "content": "first"}])


def test_the_folder_files_are_searched_in_transformers_order(tmp_path):
    path = model_folder(tmp_path / "model", "config's")
    assert find_chat_template(path) == ("config's", f"{path / 'tokenizer_config.json'}'s chat_template")
    (path / "chat_template.json").write_text(json.dumps({"other": 1}))  # no template there: the next file's
    assert find_chat_template(path)[0] == "config's"
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "json's"}))
    assert find_chat_template(path)[0] == "json's"
    (path / "chat_template.jinja").write_text("jinja's")
    assert find_chat_template(path) == ("jinja's", str(path / "chat_template.jinja"))


def test_named_templates_take_the_default_and_a_folder_without_one_has_none(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    assert find_chat_template(path) is None  # a model hybridlm trained
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert find_chat_template(path) is None
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert find_chat_template(path)[0] == "plain"
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ChatTemplateError, match=r"lists \['tool_use'\] but no 'default'"):
        find_chat_template(path)


def test_a_file_that_holds_no_readable_template_is_named(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: chat_template must be a string or a list"):
        find_chat_template(path)
    (path / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")  # not UTF-8
    with pytest.raises(ChatTemplateError, match=r"chat_template.jinja: cannot read the chat template"):
        find_chat_template(path)


@pytest.mark.parametrize("saved_by_transformers_4_34_on", [False, True], ids=["older", "newer"])
def test_special_tokens_are_the_ones_transformers_reads(tmp_path, saved_by_transformers_4_34_on):
    # A newer tokenizer_config.json (with added_tokens_decoder) is read alone; with an older one,
    # special_tokens_map.json takes over the tokens it names.
    path = model_folder(tmp_path / "model", "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}]")
    if saved_by_transformers_4_34_on:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {"259": {"content": "<s>", "special": True}}
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    legacy = {"bos_token": "<|im_start|>", "pad_token": {"content": "<|im_end|>"}}
    (path / "special_tokens_map.json").write_text(json.dumps(legacy))
    expected = (
        {"bos_token": "<s>", "eos_token": "</s>"}
        if saved_by_transformers_4_34_on
        else {"bos_token": "<|im_start|>", "eos_token": "</s>", "pad_token": "<|im_end|>"}
    )
    assert special_token_texts(path) == expected
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    messages = [{"role": "user", "content": "x"}]
    assert ours(path).render(messages) == theirs.apply_chat_template(messages, tokenize=False)


def test_a_template_that_does_not_compile_is_named_with_its_line():
    with pytest.raises(ChatTemplateError, match=r"^here: not a valid Jinja template \(line 2: "):
        ChatTemplate("ok\n{% for %}", "here")


def test_generation_blocks_render_their_body_and_the_sandbox_holds():
    template = ChatTemplate("{% generation %}{{ messages[0].content }}{% endgeneration %}", "t")
    assert template.render([{"role": "user", "content": "x"}]) == "x"
    for escape in (
        "{{ messages.__class__.__mro__ }}",
        "{% set ns = namespace(__x=1) %}",
        "{% set ns = namespace() %}{% set ns.__x = 1 %}",
        "{{ messages.append(1) }}",
    ):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(escape, "t").render([])


def test_a_template_that_fails_on_the_messages_is_a_chat_template_error():
    # A template's own bug (adding a number to a string) is the request's 400, not the server's 500.
    with pytest.raises(ChatTemplateError, match=r"^TypeError: can only concatenate str"):
        ChatTemplate("{{ messages[0].content + 1 }}", "t").render([{"role": "user", "content": "x"}])


#: Qwen3-like: an assistant's reasoning_content written back only after the last user turn, an empty think block
#: opened when enable_thinking is false, and gpt-oss's name for the reasoning (``thinking``) read too.
QWEN3 = """{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and loop.index0 > ns.last_user and message.reasoning_content is defined %}
        {{- '<|im_start|>assistant\\n<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' + message.content }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
    {%- endif %}
    {{- ('[' + message.thinking + ']' if message.thinking is defined else '') + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{% endif %}
{%- endif %}
{{- eos_token + (style | tojson if style is defined else '') }}"""


def test_extra_variables_and_reasoning_content_render_as_transformers_keywords(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = model_folder(tmp_path / "model", QWEN3)
    theirs, template = transformers.AutoTokenizer.from_pretrained(str(path)), ours(path)
    answered = {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
    for messages in ([{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "2+2?"}, answered]):
        for extra in ({}, {"enable_thinking": False}, {"enable_thinking": True}, {"eos_token": "<E>", "style": [1]}):
            # The route gives the reasoning under transformers' two names, as check_messages does (transformers 5.25
            # aliases reasoning_content as thinking itself; 5.17, the GPU image's, does not: both get both names).
            given = [m | {"thinking": m["reasoning_content"]} if "reasoning_content" in m else m for m in messages]
            text = theirs.apply_chat_template(given, tokenize=False, add_generation_prompt=True, **extra)
            assert template.render(given, extra) == text, extra
    assert "<think>\n2+2\n</think>\n\n4[2+2]" in text and text.endswith("<E>[1]")
    assert template.render(messages, {"enable_thinking": False}).endswith("<think>\n\n</think>\n\n</s>")


def test_extra_variables_are_a_json_object_without_the_routes_own_names():
    assert check_variables({"enable_thinking": False, "bos_token": "x"}) == {"enable_thinking": False, "bos_token": "x"}
    for bad in ([], "x", None, 1):
        with pytest.raises(ValueError, match="must be a JSON object of template variables"):
            check_variables(bad)
    for name in RESERVED_VARIABLES:
        with pytest.raises(ValueError, match=f"^'{name}' is not a template variable one may set"):
            check_variables({"enable_thinking": True, name: 1})
    # Given anyway, the route's own values win: the served prompt never changes by them.
    template = ChatTemplate("{{ add_generation_prompt }}{{ messages | length }}{{ tools }}", "t")
    assert (
        template.render([{"role": "user", "content": "x"}], {"add_generation_prompt": False, "tools": 1}) == "True1None"
    )
