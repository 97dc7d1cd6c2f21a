"""What the engine hands to the layers above: streamed outputs, the prefill-to-decode hand-off, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .sampling import SamplingParams
from .stops import FinishReason

Role = Literal["both", "prefill", "decode"]


class RequestError(ValueError):
    """A request the engine refuses; the message names the field and the value."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass
class RequestOutput:
    """One streamed update of a request: what is new since the previous one, and totals so far."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # reasoning + content, as generated
    reasoning: str = ""
    content: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    handoff: KVHandoff | None = None
    # A seeded request's generator after this output's tokens (EngineConfig.report_generator_state): kept by
    # an expert-parallel group to continue the request on another rank, never passed on to the client.
    generator_state: Any = None


@dataclass(frozen=True)
class RemoteLatents:
    """A hand-off's latents left where the prefill rank computed them, for the decode rank that takes the
    hand-off to read (rank to rank); `ref` is the transport's reference to them."""

    ref: Any
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    transport: str


class KVTransferError(RuntimeError):
    """A hand-off's latents could not be received (timed out, or their prefill rank is gone)."""

    @classmethod
    def timed_out(cls, request_id: str, timeout_s: float, note: str = "") -> KVTransferError:
        return cls(f"{request_id}: KV cache not received within {timeout_s:g}s (kvTransfer.timeoutSeconds{note})")

    @classmethod
    def no_longer_held(cls, request_id: str, timeout_s: float) -> KVTransferError:
        """The prefill rank let the latents go before they were asked for (two-sided and shared hand-offs)."""
        return cls(f"{request_id}: KV cache no longer held by its prefill rank (kvTransfer.timeoutSeconds "
                   f"{timeout_s:g}s passed, or it was already taken)")

    @classmethod
    def lost(cls, request_id: str, how: str) -> KVTransferError:
        """`how` follows the words directly: " (gloo): ...", ": ..."."""
        return cls(f"{request_id}: KV cache lost in transfer{how}")


@dataclass
class KVHandoff:
    """A prefilled sequence, moved from a prefill engine to a decode engine.

    latents: [num_layers, len(prompt_token_ids), kv_lora_rank + qk_rope_head_dim], the prompt's cache, from
    token `latents_start` on (the tokens before it are a prefix the decode rank's own cache holds, not sent);
    with speculative decoding one layer more, the MTP module's cache.
    generator_state: the seeded request's RNG after sampling the first token, so decode continues it.
    draft_token_ids: with speculative decoding, a greedy request's draft of the token after the first.
    draft_hidden: with speculative decoding, a sampled request's MTP hidden state [hidden_size] at the prompt's
    last position: the decode engine draws the draft from it with the request's generator, in the order a
    single engine draws (first token, then draft), so a seeded request gives the same tokens either way.
    """

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    params: SamplingParams
    latents: torch.Tensor | RemoteLatents
    generator_state: torch.Tensor | None = None
    cached_tokens: int = 0
    # A resumed request's tokens already streamed to its client: the latents cover the prompt and them.
    resumed_token_ids: list[int] = field(default_factory=list)
    latents_start: int = 0
    draft_token_ids: tuple[int, ...] = ()
    draft_hidden: torch.Tensor | None = None

    @property
    def sequence_token_ids(self) -> list[int]:
        """The sequence as the decode engine holds it: prompt, resumed tokens, first token."""
        return [*self.prompt_token_ids, *self.resumed_token_ids, self.first_token_id]

    @property
    def nbytes(self) -> int:
        if isinstance(self.latents, RemoteLatents):
            return self.latents.nbytes
        return self.latents.numel() * self.latents.element_size()

    def validate(self, num_layers: int, latent_dim: int, hidden_size: int) -> None:
        expected = (num_layers, len(self.prompt_token_ids) + len(self.resumed_token_ids) - self.latents_start,
                    latent_dim)
        if isinstance(self.latents, RemoteLatents):
            raise RequestError("handoff.latents", f"still on the prefill rank ({self.latents.transport}); the "
                                                  "rank taking the hand-off reads them first")
        if tuple(self.latents.shape) != expected:
            why = ""
            if self.latents.shape[0] != num_layers and abs(self.latents.shape[0] - num_layers) == 1:
                why = " (one pool drafts with the MTP layer and the other does not: both need the same setting)"
            raise RequestError("handoff.latents", f"expected shape {expected}, got {tuple(self.latents.shape)}{why}")
        if self.draft_hidden is not None and (tuple(self.draft_hidden.shape) != (hidden_size,)
                                              or not self.draft_hidden.is_floating_point()):
            raise RequestError("handoff.draft_hidden", f"expected a float tensor of shape ({hidden_size},), got "
                                                       f"{self.draft_hidden.dtype} {tuple(self.draft_hidden.shape)}")


@dataclass(frozen=True)
class EngineStats:
    role: Role
    waiting: int  # requests not yet admitted (incl. hand-offs waiting for cache room)
    running: int
    queued_prompt_tokens: int  # prompt tokens waiting or admitted but not yet prefilled
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    preemptions: int
    finished: int
    # Rank to rank: bytes of hand-off latents a prefill rank holds that no decode rank has read yet, and
    # whether that many hold back new prompts (EngineConfig.max_parked_bytes).
    handoff_bytes_waiting: int = 0
    admission_held: bool = False
    # Decode side: prompt tokens of hand-offs whose latents were not sent, a prefix this cache held.
    handoff_tokens_not_sent: int = 0
    # An expert-parallel group: the ranks it started with, and those serving now (fewer after losing one).
    ranks: int = 1
    ranks_alive: int = 1
    # Speculative decoding: draft tokens verified, and those the main model kept.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def draft_acceptance(self) -> float:
        """Draft tokens kept / draft tokens verified (speculative decoding; 0 without drafts)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


class EngineUnavailableError(RuntimeError):
    """The engine can serve nothing more (its step failed, its expert-parallel group lost a rank): the
    request was not refused for what it asked, so a client may retry it on another replica."""
