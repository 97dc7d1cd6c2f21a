"""Request admission shared by both APIs: model name, prompt (text, token ids or chat) and length checks."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from r1serve.runtime.engine import sampling
from r1serve.runtime.engine.limits import check_fits, room_after
from r1serve.runtime.engine.outputs import RequestError
from r1serve.runtime.tokenizer import Tokenizer, TokenizerError
from r1serve.spec import R1Deployment

from .errors import ServeError, Status, classify, invalid

Api = Literal["grpc", "chat", "completion"]
# max_tokens when the client sets none, per API; None: the rest of the context (as vLLM's chat API).
# Each is lowered to what the context leaves after the prompt.
DEFAULT_MAX_TOKENS: dict[Api, int | None] = {
    "grpc": sampling.DEFAULT_MAX_TOKENS,  # the engine's own default
    "chat": None,
    "completion": 16,  # OpenAI's default for /v1/completions
}


@dataclass(frozen=True)
class ModelFacts:
    name: str
    max_model_len: int
    vocab_size: int
    dtype: str


class Frontend:
    """Validates and tokenizes requests in the Ingress, so pools only ever see well-formed work."""

    def __init__(self, deployment: R1Deployment, checkpoint: Path):
        self.tokenizer = Tokenizer.from_dir(checkpoint)
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        self.facts = ModelFacts(
            name=deployment.served_model_name,
            max_model_len=min(deployment.spec.model.max_model_len, int(config["max_position_embeddings"])),
            vocab_size=int(config["vocab_size"]),
            dtype=deployment.spec.model.dtype,
        )

    def check_model(self, model: Any, param: str = "model") -> None:
        if model in (None, ""):
            return
        if model != self.facts.name:
            raise ServeError(Status.NOT_FOUND, f"{param}: the model {model!r} does not exist; this server "
                             f"serves {self.facts.name!r}", param)

    def encode_text(self, text: Any, param: str) -> list[int]:
        if not isinstance(text, str):
            raise invalid(param, f"must be a string (got {type(text).__name__})")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise invalid(param, "is empty")
        return ids

    def encode_chat(self, messages: Any, param: str) -> list[int]:
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
            raise invalid(param, "must be a non-empty list of messages with role and content")
        try:
            return self.tokenizer.encode_chat([dict(m) if isinstance(m, Mapping) else m for m in messages])
        except TokenizerError as exc:
            raise invalid(param, str(exc)) from None

    def check_token_ids(self, ids: Any, param: str) -> list[int]:
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not ids:
            raise invalid(param, "must be a non-empty list of token ids")
        vocab = self.facts.vocab_size
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise invalid(param, f"each id must be an integer in [0, {vocab}) (got {token!r})")
        return list(ids)

    def max_tokens(self, api: Api, requested: Any, prompt: list[int]) -> Any:
        """What the client asked for, or its API's default lowered to what the context leaves."""
        if requested is not None:
            return requested
        room = room_after(len(prompt), self.facts.max_model_len)
        default = DEFAULT_MAX_TOKENS[api]
        return room if default is None else min(default, room)

    def check_lengths(self, prompt: list[int], max_tokens: int, fields: Mapping[str, str]) -> None:
        """The engine's rule for prompt plus max_tokens, checked before the request reaches a pool; errors
        name the fields as `fields` (the engine's names -> the API's) says."""
        try:
            check_fits(len(prompt), max_tokens, self.facts.max_model_len)
        except RequestError as exc:
            raise classify(exc, fields=fields) from None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
