"""How many tokens a request may generate: the one rule every entry point applies, in one wording."""

from __future__ import annotations

from .outputs import RequestError


def room_after(prompt_len: int, max_model_len: int) -> int:
    """Tokens left to generate after a prompt (at least 1, so that a default never hides a too-long prompt)."""
    return max(max_model_len - prompt_len, 1)


def check_fits(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """A prompt leaves room to generate, and the prompt plus max_tokens fits the context; else RequestError
    naming `prompt` or `max_tokens`."""
    if prompt_len >= max_model_len:
        raise RequestError("prompt", f"has {prompt_len} tokens; the model's context is {max_model_len}, "
                                     "leaving no room to generate")
    total = prompt_len + max_tokens
    if total > max_model_len:
        raise RequestError("max_tokens", f"the prompt ({prompt_len} tokens) plus {max_tokens} tokens to generate "
                                         f"is {total} tokens, more than the model's context of {max_model_len}")
