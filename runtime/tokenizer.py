"""Text <-> token ids and chat-template rendering for a checkpoint directory, matching transformers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["CHAT_ROLES", "THINK_END", "THINK_START", "Tokenizer", "TokenizerError"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers prefers this file over the config's chat_template
THINK_START = "<think>"
THINK_END = "</think>"
CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles DeepSeek-V3/R1's template renders


class TokenizerError(ValueError):
    """A missing or malformed tokenizer file, or chat messages the template cannot render."""


class Tokenizer:
    """A DeepSeek tokenizer: ``tokenizers`` for the BPE, jinja2 for the chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any], *, source: str = "<memory>"):
        self._backend = backend
        self._config = dict(config)
        self._source = source
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._template_text = _template_from_config(config.get("chat_template"))
        self._template: jinja2.Template | None = None
        for role, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token)):
            if token is None or backend.token_to_id(token) is None:
                raise TokenizerError(f"{source}: {role} {token!r} is not in the vocabulary")

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json (and chat_template.jinja if present)."""
        directory = Path(checkpoint_dir)
        tokenizer_path, config_path = directory / TOKENIZER_FILE, directory / CONFIG_FILE
        for path in (tokenizer_path, config_path):
            if not path.is_file():
                raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise TokenizerError(f"{tokenizer_path}: cannot load tokenizer: {e}") from e
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise TokenizerError(f"{config_path}: cannot parse tokenizer config: {e}") from e
        template_path = directory / TEMPLATE_FILE
        if template_path.is_file():
            config["chat_template"] = template_path.read_text(encoding="utf-8")
        return cls(backend, config, source=str(directory))

    @property
    def bos_token_id(self) -> int:
        return self._backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._backend.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def think_start_id(self) -> int:
        return self._required_id(THINK_START)

    @property
    def think_end_id(self) -> int:
        return self._required_id(THINK_END)

    @property
    def chat_template(self) -> str | None:
        return self._template_text

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``, as ``AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`` gives them.

        Whether a BOS is prepended is decided by tokenizer.json's post-processor alone: transformers
        (v5) drops ``add_bos_token`` from tokenizer_config.json whenever tokenizer.json exists. DeepSeek's
        post-processor is plain ByteLevel, so plain text gets no BOS; the chat template writes it instead.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # transformers never applies clean_up_tokenization_spaces to BPE tokenizers, so neither do we.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` the way transformers' ``apply_chat_template(tokenize=False)`` does."""
        if self._template_text is None:
            raise TokenizerError(f"{self._source}: {CONFIG_FILE} has no chat_template")
        plain = _validated_messages(messages)
        if self._template is None:
            self._template = _compile_template(self._template_text)
        try:
            return self._template.render(
                messages=plain,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens(),
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self._source}: chat template failed: {e}") from e

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the rendered text already starts with the BOS text."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def _special_tokens(self) -> dict[str, str]:
        # transformers exposes its special_tokens_map to templates: every named special token that is set.
        names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        found = {name: _token_text(self._config.get(name)) for name in names}
        return {name: text for name, text in found.items() if text is not None}

    def _required_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self._source}: token {token!r} is not in the vocabulary")
        return token_id


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from_config(value: Any) -> str | None:
    # Some configs carry several named templates; transformers uses the one called "default".
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _validated_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise TokenizerError("cannot render an empty conversation")
    return [_validated_message(i, message) for i, message in enumerate(messages)]


def _validated_message(i: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise TokenizerError(f"message {i} is a {type(message).__name__}, not a dict with role and content")
    # Like transformers, drop None values (OpenAI sends tool_calls=None), except content: DeepSeek's template
    # tests `content is none` beside tool_calls, where transformers, having dropped it, crashes.
    plain = {k: v for k, v in message.items() if v is not None or k == "content"}
    role = plain.get("role")
    if role is None:
        raise TokenizerError(f"message {i} has no 'role'")
    if role not in CHAT_ROLES:
        raise TokenizerError(f"message {i} has unknown role {role!r}; expected one of {list(CHAT_ROLES)}")
    if role == "assistant" and "tool_calls" in plain:
        plain.setdefault("content", None)
        content_ok = plain["content"] is None or isinstance(plain["content"], str)
    else:
        content_ok = isinstance(plain.get("content"), str)
    if not content_ok:
        raise TokenizerError(f"message {i} ({role}) has no string 'content'")
    return plain


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(text: str) -> jinja2.Template:
    """The same sandboxed environment transformers builds (chat templates are untrusted code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from e
