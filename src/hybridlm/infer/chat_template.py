"""A model folder's chat template: where it is found, and the text it renders for a conversation.

A folder converted from Hugging Face keeps its tokenizer files (``checkpoint/hf_files.py``'s ``AUX_FILES``), and its
chat template is in one of them, looked up in transformers' order: ``chat_template.jinja``, else
``chat_template.json``'s ``"chat_template"``, else ``tokenizer_config.json``'s ``"chat_template"`` (a string, or a
list of ``{"name", "template"}`` whose ``"default"`` is taken). A model hybridlm trained with the byte tokenizer has
none (one trained with a tokenizer.json keeps the files beside it, its template among them).

Rendering is transformers' ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``, so a
served model sees the prompts it was fine-tuned on: the same Jinja environment (sandboxed and immutable, blocks
trimmed, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a ``tojson`` that leaves HTML characters alone,
``{% generation %}`` blocks accepted), and the same variables (``messages``, ``tools`` and ``documents`` null,
``add_generation_prompt``, the named special tokens of ``tokenizer_config.json``, and the extra variables a caller
passes, as ``apply_chat_template(..., **kwargs)`` passes them: ``enable_thinking``). Templates are code from the
Hub: the sandbox keeps them from Python's internals, as transformers' does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from ..checkpoint.io import read_json

JINJA_NAME = "chat_template.jinja"
JSON_NAME = "chat_template.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
#: The special tokens transformers gives a template by name (its ``special_tokens_map``), as in tokenizer_config.json.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: Names an extra template variable may not take: the variables the route sets itself (``messages``, and ``tools``,
#: ``documents`` and ``add_generation_prompt`` at their served values), and apply_chat_template's arguments that are no
#: template variables (``continue_final_message``, ``chat_template``, ``tokenize``). transformers binds such a keyword
#: to its own argument (``messages`` is a TypeError there), so passing it to the template would render what
#: transformers never renders. A special token's name is allowed: transformers lets a keyword replace it.
RESERVED_VARIABLES = (
    "messages",
    "add_generation_prompt",
    "tools",
    "documents",
    "continue_final_message",
    "chat_template",
    "tokenize",
)


class ChatTemplateError(ValueError):
    """A template that cannot be read or compiled (at start-up), or that refuses a conversation (per request)."""


class ChatFileError(ChatTemplateError):
    """A file of the model folder read beside the template (the special tokens' tokenizer_config.json and
    special_tokens_map.json, generation_config.json's end of turn) that cannot be read: another template
    (``--chat-template``) does not replace it."""


def find_chat_template(folder: Path) -> tuple[str, str] | None:
    """(template text, where it was read) of model folder ``folder``, or None where it has none (see the module).
    ChatTemplateError for a file that is there but holds no readable template: serving without it would answer
    every chat request as if the model had none."""
    if (folder / JINJA_NAME).is_file():
        return read_template_file(folder / JINJA_NAME), str(folder / JINJA_NAME)
    for name in (JSON_NAME, TOKENIZER_CONFIG_NAME):
        file = folder / name
        if not file.is_file():
            continue
        template = _read_json(file).get("chat_template")
        if template is None:
            continue
        where = f"{file}'s chat_template"
        if isinstance(template, list):  # named templates ("default", "tool_use", "rag"): the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template, where = named.get("default"), f"{where} named 'default'"
            if template is None:
                raise ChatTemplateError(f"{file}: chat_template lists {sorted(map(str, named))} but no 'default'")
        if not isinstance(template, str):
            raise ChatTemplateError(f"{file}: chat_template must be a string or a list of {{name, template}}")
        return template, where
    return None


def read_template_file(file: Path) -> str:
    """The Jinja text of ``file``; ChatTemplateError naming it where it cannot be read."""
    try:
        return file.read_text(encoding="utf-8")
    except OSError as e:
        raise ChatTemplateError(f"{file}: cannot read the chat template ({e.strerror or e})") from None
    except UnicodeDecodeError as e:  # (which has no strerror)
        raise ChatTemplateError(
            f"{file}: cannot read the chat template (not UTF-8: {e.reason} at byte {e.start})"
        ) from None


def special_token_texts(folder: Path) -> dict[str, str]:
    """The named special tokens (:data:`NAMED_TOKENS` -> text) a template of ``folder`` reads, where transformers'
    tokenizer reads them: tokenizer_config.json's where it lists ``added_tokens_decoder`` (as transformers saves it
    since 4.34; special_tokens_map.json is not read then), else special_tokens_map.json's over tokenizer_config.json's
    (an older folder, which transformers still loads so). A token is a string or an ``AddedToken`` object (its
    ``"content"``). ChatFileError for a file that is not a JSON object."""
    config, legacy = folder / TOKENIZER_CONFIG_NAME, folder / SPECIAL_TOKENS_MAP_NAME
    settings = _read_json(config, ChatFileError) if config.is_file() else {}
    if "added_tokens_decoder" not in settings and legacy.is_file():
        settings = {**settings, **_read_json(legacy, ChatFileError)}
    found: dict[str, str] = {}
    for key in NAMED_TOKENS:
        value = settings.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found[key] = value
    return found


def check_variables(value) -> dict:
    """``value`` as extra template variables: a JSON object (name -> JSON value) with no name of
    :data:`RESERVED_VARIABLES`; ValueError saying which, for the caller to name its field or flag."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object of template variables, got {json.dumps(value)[:60]}")
    reserved = [k for k in value if k in RESERVED_VARIABLES]
    if reserved:
        raise ValueError(
            f"{reserved[0]!r} is not a template variable one may set (the route sets messages, tools, documents and "
            "add_generation_prompt itself; continue_final_message, chat_template and tokenize are not served)"
        )
    return dict(value)


def _read_json(file: Path, error: type[ChatTemplateError] = ChatTemplateError) -> dict:
    try:
        return read_json(file, f"{file}: missing")
    except ValueError as e:  # (CheckpointError: not JSON, not an object)
        raise error(str(e)) from None


class ChatTemplate:
    """A compiled chat template and the special tokens it is given (``variables``: :data:`NAMED_TOKENS` -> text).

    ``where`` names it in errors (a file, or a JSON file's key). ChatTemplateError when it does not compile."""

    def __init__(self, text: str, where: str, variables: dict[str, str] | None = None) -> None:
        self.text, self.where, self.variables = text, where, dict(variables or {})
        try:
            self.compiled = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message})") from None

    def render(self, messages: list[dict], extra: dict | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (plain JSON: role, content, ...) with the assistant's turn opened
        (``add_generation_prompt``; False: the conversation as it stands, as training reads it); ChatTemplateError
        with the template's own message where it refuses them (``raise_exception``), or fails on them.

        ``extra``: more variables (checked by :func:`check_variables`), over the special tokens as transformers
        puts its keywords over them (``{**special_tokens_map, **kwargs}``)."""
        served = {
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self.compiled.render({**self.variables, **(extra or {}), **served})
        except jinja2.TemplateError as e:  # raise_exception's, an undefined value used, a sandbox refusal
            raise ChatTemplateError(e.message or type(e).__name__) from None
        except Exception as e:  # a template's own bug on these messages (a TypeError adding a list to a string)
            raise ChatTemplateError(f"{type(e).__name__}: {e}") from None


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as written (transformers' filter).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Dict:
    """``dict`` in a template: a call and ``fromkeys``, and no attribute that reaches the type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses names starting with an underscore: a template must not set what Python's
    internals read."""

    def __init__(*args, **kwargs) -> None:  # (no named self: namespace(self=1) is a template's attribute)
        namespace, values = args[0], dict(*args[1:], **kwargs)
        for name in values:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(namespace, values)

    def __setitem__(self, name, value) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which marks the assistant's text for training masks: rendered as
    its body (a template that has it must compile)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
    )
    return environment
