"""The engine's synchronous core: admit requests, step the model, stream outputs, hand off KV."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from r1serve.runtime.model.kernels import KERNEL_CHOICES, resolve_kernels
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.model.uploads import upload
from r1serve.runtime.tokenizer import Tokenizer

from .block_manager import BlockManager
from .description import format_engine
from .limits import check_fits
from .model_runner import HostCopy, ModelRunner, RunnerPaths
from .outputs import EngineStats, KVHandoff, RequestError, RequestOutput, Role
from .request_state import RequestState
from .sampler import sample
from .sampling import SamplingParams
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from .sequence import Sequence, SequenceStatus
from .speculative import accept_greedy, accept_sampled, draft_token, vocab_probs

ROLES = ("both", "prefill", "decode")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    role: Role = "both"
    num_blocks: int = 1024
    block_size: int = 16
    max_batch_tokens: int = 2048
    max_running: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    reasoning: bool = True  # split R1's <think>...</think> from the answer
    kernels: str = "auto"  # auto: Triton kernels on CUDA, the torch path on CPU; or torch, triton
    overlap: bool | None = None  # read each step's tokens back one call later (None: on CUDA only)
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (on CUDA with the Triton kernels)
    # A prefill engine's hand-offs keep their latents on its device, for a decode rank to read them
    # there (rank to rank); otherwise they are copied to host memory.
    handoff_on_device: bool = False
    # Rank to rank: how many bytes of latents a prefill rank may hold unread before it admits no new
    # prompt (None: as many as its own paged cache holds).
    max_parked_bytes: int | None = None
    # A rank of an expert-parallel group that survives a lost rank: each seeded request's output carries its
    # generator's state, so that a survivor can continue the request exactly if this rank is lost.
    report_generator_state: bool = False
    # Speculative decoding with the checkpoint's MTP module as the draft model: draft tokens verified per
    # decode step (0: off). Greedy output is the same with it as without; sampled output keeps its distribution.
    speculative_tokens: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)} (got {self.role!r})")
        for name in ("num_blocks", "block_size", "max_batch_tokens", "max_running"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive (got {getattr(self, name)})")
        if self.max_parked_bytes is not None and self.max_parked_bytes <= 0:
            raise ValueError(f"max_parked_bytes: must be positive (got {self.max_parked_bytes})")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len: must be at least 2 (got {self.max_model_len})")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels: must be one of {', '.join(KERNEL_CHOICES)} (got {self.kernels!r})")
        if self.speculative_tokens not in (0, 1):
            raise ValueError(f"speculative_tokens: must be 0 (off) or 1: one MTP draft token per step "
                             f"(got {self.speculative_tokens})")


def runner_paths(config: EngineConfig, device: torch.device) -> RunnerPaths:
    """The kernel path and graph setting an engine runs with on `device` (auto resolved here)."""
    kernels = resolve_kernels(config.kernels, device)
    # A prefill engine never runs decode-only steps: graphs would only take memory.
    graphs = config.cuda_graphs and device.type == "cuda" and config.role != "prefill"
    if graphs and kernels != "triton":
        # The torch MoE path reads per-expert counts back to the host, which a graph cannot capture.
        log.warning("cuda_graphs is on but the kernels are the torch path; decode steps run eagerly")
        graphs = False
    return RunnerPaths(kernels=kernels, cuda_graphs=graphs)


def _rows_of(tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tokens[rows] on the device without waiting for it (indexing with a list copies it synchronously)."""
    if rows == list(range(tokens.shape[0])):
        return tokens
    return tokens.index_select(0, upload(rows, tokens.device, torch.long))


@dataclass
class _Launched:
    """A step on the device: its chunks, those that sample a token, and the tokens (device and host copy)."""

    chunks: list[ScheduledChunk]
    completing: list[ScheduledChunk]
    tokens: torch.Tensor | None
    host: HostCopy | None
    decoding: bool  # every chunk decoded one token, so the next step can follow from `tokens`


class LLMEngine:
    """Continuous batching over a paged latent cache, in one of three roles.

    `both` runs requests from prompt to end; `prefill` runs the prompt, samples the first token and
    returns a KVHandoff instead of streaming; `decode` accepts hand-offs and continues generating.
    """

    def __init__(self, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 *, paths: RunnerPaths | None = None):
        """`paths` overrides how the runner executes (tests and benchmarks); by default it follows config."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        limit = model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len: {config.max_model_len} exceeds the model's context of {limit}")
        self.max_model_len = config.max_model_len or limit
        if config.speculative_tokens and getattr(model, "mtp", None) is None:
            raise ValueError("speculative_tokens: the model has no MTP module loaded (load_mtp, or from_checkpoint "
                             "with speculative_tokens set)")
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_tokens, config.max_running), self.blocks)
        self.runner = ModelRunner(model, config.num_blocks, config.block_size, max_running=config.max_running,
                                  max_model_len=self.max_model_len,
                                  paths=paths or runner_paths(config, model.device),
                                  mtp=bool(config.speculative_tokens))
        log.info("%s engine: %s", config.role, format_engine(self.describe()))
        self.requests: dict[str, RequestState] = {}
        self.pending_handoffs: deque[tuple[RequestState, KVHandoff]] = deque()
        self.handoff_tokens_not_sent = 0
        self.speculative = config.speculative_tokens
        # Verifying drafts needs each step's tokens on the host before the next is planned: no overlap.
        self.overlap = (config.overlap if config.overlap is not None else self.runner.device.type == "cuda") \
            and not self.speculative
        # request -> draft tokens, the distribution they were drawn from (sampled requests), and the length
        # of the sequence they follow
        self.drafts: dict[str, tuple[list[int], torch.Tensor | None, int]] = {}
        self.draft_tokens = self.accepted_draft_tokens = 0
        # Outputs of a step whose tokens were kept before the MTP layer's collective broke: sent with the next.
        self._late: list[RequestOutput] = []
        # Prefill role: a sampled request's MTP hidden state to hand off, its draft drawn on the decode side.
        self._draft_hidden: dict[str, torch.Tensor] = {}
        self._inflight: _Launched | None = None
        self.finished_count = 0

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, config: EngineConfig = EngineConfig(), *,
                        dtype: torch.dtype = torch.float32, device: str = "cpu",
                        weights: str = "dequantized") -> LLMEngine:
        """`weights`: how an FP8 checkpoint's weights are held (fp8, dequantized, auto; see the model)."""
        model = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, dtype, device, progress=False, weights=weights)
        if config.speculative_tokens:
            model.load_mtp(checkpoint)
        return cls(model, Tokenizer.from_dir(checkpoint), config)

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    resumed: tuple[int, ...] | list[int] = (),
                    generator_state: torch.Tensor | bytes | None = None) -> None:
        """`resumed`: a request that lost its replica (or its rank) part-way continues here after the tokens its
        client already has (they are computed again like a preempted sequence's, and not streamed twice); a
        seeded one continues its draws from `generator_state`. A decode engine takes only such requests:
        new prompts come to it as hand-offs."""
        if self.config.role == "decode" and not resumed:
            raise RequestError("role", "a decode engine takes hand-offs (add_handoff), not prompts")
        self._validate(request_id, prompt_token_ids, params, resumed)
        seq = Sequence(request_id, list(prompt_token_ids) + list(resumed), len(prompt_token_ids))
        state = self._state(seq, params)
        state.replay(list(resumed))
        if state.generator is not None and generator_state is not None:
            if isinstance(generator_state, bytes):
                generator_state = torch.frombuffer(bytearray(generator_state), dtype=torch.uint8)
            state.generator.set_state(generator_state)
        self.requests[request_id] = state
        self.scheduler.add(seq)

    def add_handoff(self, handoff: KVHandoff) -> list[RequestOutput]:
        """Take over a prefilled sequence; its first token is streamed at once."""
        if self.config.role == "prefill":
            raise RequestError("role", "a prefill engine cannot continue a hand-off")
        self._validate(handoff.request_id, handoff.prompt_token_ids, handoff.params, handoff.resumed_token_ids)
        handoff.validate(len(self.runner.handed_off_caches), self.model.config.latent_dim,
                         self.model.config.hidden_size)
        self._check_token_ids("handoff.draft_token_ids", handoff.draft_token_ids)
        prompt = list(handoff.prompt_token_ids)
        seq = Sequence(handoff.request_id, prompt + list(handoff.resumed_token_ids), len(prompt))
        state = self._state(seq, handoff.params)
        state.replay(list(handoff.resumed_token_ids))
        seq.token_ids.append(handoff.first_token_id)
        if state.generator is not None and handoff.generator_state is not None:
            state.generator.set_state(handoff.generator_state)
        self.requests[seq.request_id] = state
        out = state.process([handoff.first_token_id])
        if state.finished:
            return [self._retire(state, out)]
        if self.speculative and handoff.draft_token_ids and state.params.is_greedy:
            self.drafts[seq.request_id] = (list(handoff.draft_token_ids), None, seq.num_tokens)
        elif self.speculative and handoff.draft_hidden is not None and not state.params.is_greedy:
            try:
                with torch.inference_mode():
                    logits = self.model.mtp.logits(handoff.draft_hidden.to(self.runner.device, self.model.dtype))
                token, q = draft_token(logits, state.params, state.generator)
            except BaseException:
                self._retire(state, out)  # not taken: its id is free for a retry
                raise
            self.drafts[seq.request_id] = ([token], q[None], seq.num_tokens)
        self.pending_handoffs.append((state, handoff))
        self._admit_handoffs()
        return [out]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; None if it is unknown or already finished."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        self.pending_handoffs = deque((s, h) for s, h in self.pending_handoffs if s is not state)
        return self._retire(state, state.aborted())

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with an error (the model raised): nothing is left holding blocks. Outputs a broken
        step had kept (requests it finished, hand-offs it made) go out first."""
        self._inflight = None
        return self._take_late() + [self._retire(s, s.aborted("error", error)) for s in list(self.requests.values())]

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` this engine's prefix cache holds. Only reads, so a rank's
        transfer thread may ask it while the engine steps (the answer may be stale by admission)."""
        return len(self.blocks.cached_prefix(token_ids)) * self.blocks.block_size

    @property
    def cache_bytes(self) -> int:
        """The paged latent cache's size on the device."""
        return sum(cache.numel() * cache.element_size() for cache in self.runner.handed_off_caches)

    def hold_admission(self, hold: bool) -> None:
        """While held, running sequences continue and waiting ones wait (see Scheduler.admitting)."""
        self.scheduler.admitting = not hold

    @property
    def has_work(self) -> bool:
        inflight = self._inflight is not None and any(not c.seq.is_finished for c in self._inflight.completing)
        return self.scheduler.has_work or bool(self.pending_handoffs) or inflight or bool(self._late)

    # -- stepping ---------------------------------------------------------------------------------

    def step(self, lockstep: bool = False) -> list[RequestOutput]:
        """One scheduling round and forward. With `lockstep` (a data-parallel rank of an expert-parallel
        group) a forward runs even without work, over no tokens, so the group's collectives still match.

        With `overlap` the step's tokens are read back on the next call: a call first launches the next
        decode step straight from the previous step's tokens on the device, then waits for those tokens
        and emits them, so the device computes while the host emits, schedules and prepares.
        """
        if self.speculative:
            return self._step_speculative(lockstep)
        if lockstep or not self.overlap:
            return self._step_now(lockstep)
        outputs: list[RequestOutput] = []
        previous, self._inflight = self._inflight, None
        if previous is not None:
            continued = self._continue_decoding(previous)
            if continued is not None:
                chunks, input_ids = continued
                self._inflight = self._launch(chunks, input_ids=input_ids)
                return self._complete(previous)
            outputs = self._complete(previous)
        self._admit_handoffs()
        chunks = self.scheduler.schedule()
        if chunks:
            self._inflight = self._launch(chunks)
        return outputs

    def _step_now(self, lockstep: bool) -> list[RequestOutput]:
        self._admit_handoffs()
        chunks = self.scheduler.schedule()
        if not chunks:
            if lockstep:
                self.runner.run_empty()
            return []
        return self._complete(self._launch(chunks))

    def _launch(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor | None = None) -> _Launched:
        """Run the forward and sample on the device; nothing here waits for the device."""
        # A chunk that follows the previous step's device tokens (input_ids) is a decode: it samples.
        completing = [c for c in chunks if input_ids is not None or c.completes]
        logits = self.runner.run(chunks, want_logits=[input_ids is not None or c.completes for c in chunks],
                                 input_ids=input_ids)
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.blocks.commit(chunk.seq)
        states = [self.requests[c.seq.request_id] for c in completing]
        tokens = sample(logits, [s.params for s in states], [s.generator for s in states]) if states else None
        decoding = all(c.num_tokens == 1 for c in chunks) and len(completing) == len(chunks)
        return _Launched(chunks, completing, tokens, HostCopy(tokens) if tokens is not None else None, decoding)

    def _continue_decoding(self, previous: _Launched) -> tuple[list[ScheduledChunk], torch.Tensor] | None:
        """The next decode step, launched before the previous step's tokens are known on the host: the
        previous step's sequences continue from its tokens on the device, and sequences that joined since
        with one token to compute (hand-offs admitted meanwhile) from theirs on the host. It needs a
        previous step that only decoded, no prompt to prefill, and room in the cache. Sequences that reach
        max_tokens with the pending token are left out; any other that turns out finished is computed once
        more and dropped. Returns the chunks and their input ids on the device."""
        if not previous.decoding or self.config.role == "prefill":
            return None  # a prefill engine hands its sequences off after their first token
        room = len(self.scheduler.running) < self.config.max_running
        if room and (self.scheduler.waiting or self.pending_handoffs):
            return None  # let the scheduler admit them now (with no room it could not)
        continuing = {id(c.seq) for c in previous.completing}
        joined = [seq for seq in self.scheduler.running if id(seq) not in continuing]
        if any(seq.num_uncomputed_tokens != 1 for seq in joined):
            return None  # a prompt (or a preempted sequence) to prefill: the scheduler's work
        going = [(row, c.seq) for row, c in enumerate(previous.completing)
                 if not c.seq.is_finished
                 and c.seq.num_output_tokens + 1 < self.requests[c.seq.request_id].params.max_tokens]
        seqs = [seq for _, seq in going] + joined
        need = sum(max(0, self.blocks.blocks_needed(seq.num_computed_tokens + 1) - len(seq.block_table))
                   for seq in seqs)
        if not seqs or need > self.blocks.num_free_blocks:
            return None
        for seq in seqs:
            self.blocks.grow(seq, seq.num_computed_tokens + 1)
        ids = _rows_of(previous.tokens, [row for row, _ in going])
        if joined:
            ids = torch.cat([ids, upload([seq.token_ids[-1] for seq in joined], ids.device, torch.long)])
        return [ScheduledChunk(seq, 1) for seq in seqs], ids

    def _complete(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens and emit them (the finished sequences' last, dropped, step aside)."""
        if launched.tokens is None:
            return []
        tokens = launched.host.wait()
        outputs = []
        for chunk, token in zip(launched.completing, tokens):
            state = self.requests.get(chunk.seq.request_id)
            if state is None or state.seq is not chunk.seq or chunk.seq.is_finished:
                continue  # finished or aborted while this step ran
            state.seq.token_ids.append(token)
            self.blocks.commit(state.seq)
            if self.config.role == "prefill":
                outputs.append(self._handoff(state, token))
                continue
            out = state.process([token])
            if self.config.report_generator_state and state.generator is not None:
                out.generator_state = state.generator.get_state().numpy().tobytes()  # bytes: pickled as they are
            outputs.append(self._retire(state, out) if state.finished else out)
        return outputs

    # -- speculative decoding (MTP drafts) ----------------------------------------------------------

    def _step_speculative(self, lockstep: bool = False) -> list[RequestOutput]:
        """One step with draft tokens: a decoding sequence that has a draft runs its last token and the draft
        together, and keeps what `accept_greedy`/`accept_sampled` decide (the main model's logits at both
        positions); then the MTP module runs over every position whose next token is now known, writing its
        own cache (finished sequences' too: their blocks may serve as a later prompt's prefix), and drafts the
        next token of each sequence that goes on decoding. A refused draft's latent stays in the cache beyond
        the computed tokens, to be overwritten by the next step. In an expert-parallel group (`lockstep`) the MTP
        module's experts are placed as a MoE layer's: every rank runs the model once and then the module once
        each step, empty where it has nothing to run, so the collectives of both match."""
        self._admit_handoffs()
        scheduled = self.scheduler.schedule()
        budget = self.config.max_batch_tokens - sum(c.num_tokens for c in scheduled)
        chunks = []
        for chunk in scheduled:
            chunks.append(self._with_draft(chunk, budget))
            budget -= len(chunks[-1][2])
        if not chunks:
            if lockstep:
                self.runner.run_empty()
                self.runner.run_mtp_empty()
            return self._take_late()
        starts, wanted, ids = [], [], []
        for chunk, tokens, drafts in chunks:
            starts.append(len(ids))
            if drafts or chunk.completes:
                wanted.append(list(range(len(ids) + len(tokens) - 1 - len(drafts), len(ids) + len(tokens))))
            else:
                wanted.append([])
            ids.extend(tokens)
        logits, hidden = self.runner.run_with_hidden([c for c, _, _ in chunks], ids, [r for w in wanted for r in w])
        outputs, mtp, handing_off, finishing = [], [], [], []
        row = 0
        for (chunk, tokens, drafts), start, rows in zip(chunks, starts, wanted):
            seq, first = chunk.seq, chunk.seq.num_computed_tokens
            state = self.requests[seq.request_id]
            new = self._tokens_kept(state, logits[row: row + len(rows)], drafts) if rows else []
            row += len(rows)
            computed = len(new) if drafts else chunk.num_tokens  # the draft refused has no place in the cache
            seq.num_computed_tokens += computed
            seq.token_ids.extend(new)
            self.blocks.commit(seq)
            mtp.append((seq, first, computed, start))
            if new and self.config.role == "prefill":
                handing_off.append(state)  # once the MTP module has drafted from the prompt
            elif new:
                out = state.process(new)
                if self.config.report_generator_state and state.generator is not None:
                    out.generator_state = state.generator.get_state().numpy().tobytes()
                outputs.append(out)
                if state.finished:
                    finishing.append((state, out))
        drafted = False
        try:
            self._draft(mtp, hidden, lockstep)
            drafted = True
        finally:
            # The tokens are kept even if the layer's collective broke (a rank of the group was lost): every rank
            # then has run this step's model forward and goes on from there, or runs the step again whole, so
            # each step still runs the model and the layer once on every rank. These outputs go out with the
            # next step; the layer's cache misses this step's positions, which only lowers how many later drafts
            # are kept.
            for state, out in finishing:
                self._retire(state, out)
            outputs += [self._handoff(state, state.seq.token_ids[-1]) for state in handing_off]
            if not drafted:
                self._late += outputs
        return self._take_late() + outputs

    def _take_late(self) -> list[RequestOutput]:
        late, self._late = self._late, []
        return late

    def _with_draft(self, chunk: ScheduledChunk, budget: int) -> tuple[ScheduledChunk, list[int], list[int]]:
        """The chunk to run, its input tokens and the draft tokens among them: none if the sequence has no
        draft for its next token, is not decoding, or has no room (blocks, limits, the step's token budget) for
        it. A draft that waits for room stays for a later step: a seeded request draws each draft once."""
        seq = chunk.seq
        first = seq.num_computed_tokens
        tokens = seq.token_ids[first: first + chunk.num_tokens]
        drafted = self.drafts.get(seq.request_id)
        if drafted is not None and drafted[2] != seq.num_tokens:
            del self.drafts[seq.request_id]  # drafted for another position (the sequence moved on)
            drafted = None
        if drafted is None or chunk.num_tokens != 1 or not chunk.completes:
            return chunk, tokens, []
        drafts = drafted[0]
        params = self.requests[seq.request_id].params
        length = first + 1 + len(drafts)  # every draft verified, and the token after them, stay within limits
        if (seq.num_output_tokens + len(drafts) >= params.max_tokens or length >= self.max_model_len
                or len(drafts) > budget or not self.blocks.can_grow(seq, length)):
            return chunk, tokens, []
        self.blocks.grow(seq, length)
        return ScheduledChunk(seq, 1 + len(drafts)), tokens + drafts, drafts

    def _tokens_kept(self, state: RequestState, logits: torch.Tensor, drafts: list[int]) -> list[int]:
        if not drafts:
            return sample(logits, [state.params], [state.generator]).tolist()
        _, q, _ = self.drafts.pop(state.seq.request_id)
        self.draft_tokens += len(drafts)
        if state.params.is_greedy:
            kept = accept_greedy(logits, drafts)
        else:
            kept = accept_sampled(vocab_probs(logits, state.params), q, drafts, state.generator)
        self.accepted_draft_tokens += len(kept) - 1
        return kept

    def _draft(self, entries: list[tuple[Sequence, int, int, int]], hidden: torch.Tensor, lockstep: bool) -> None:
        """Run the MTP module over each sequence's newly computed positions (t_{i+1} with the main model's
        h_i), and draft the next token of those that go on decoding and have no draft for it yet (a sequence
        computed again after a preemption keeps the one it had)."""
        entries = [e for e in entries if e[2] > 0 and e[0].request_id in self.requests]
        if not entries:
            if lockstep:
                self.runner.run_mtp_empty()
            return
        ids, rows, want = [], [], []
        for seq, first, computed, start in entries:
            ids.extend(seq.token_ids[first + 1: first + computed + 1])
            rows.extend(range(start, start + computed))
            drafted = self.drafts.get(seq.request_id)
            want.append(seq.num_computed_tokens == seq.num_tokens - 1  # decoding next step
                        and not self.requests[seq.request_id].finished
                        and (drafted is None or drafted[2] != seq.num_tokens))
        logits, draft_hidden = self.runner.run_mtp([(seq, first, computed) for seq, first, computed, _ in entries],
                                                   ids, hidden[upload(rows, hidden.device, torch.long)], want)
        drafting = [seq for (seq, _, _, _), w in zip(entries, want) if w]
        for seq, row, h in zip(drafting, logits, draft_hidden):
            state = self.requests[seq.request_id]
            if self.config.role == "prefill" and not state.params.is_greedy:
                # Drawn where the generator goes on, after the first token as in one engine (see _handoff).
                self._draft_hidden[seq.request_id] = h
                continue
            token, q = draft_token(row, state.params, state.generator)
            self.drafts[seq.request_id] = ([token], None if q is None else q[None], seq.num_tokens)

    def _handoff(self, state: RequestState, first_token: int) -> RequestOutput:
        seq = state.seq
        computed = seq.num_tokens - 1  # the prompt, and a resumed request's earlier tokens
        handoff = KVHandoff(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[: seq.prompt_len],
            first_token_id=first_token,
            params=state.params,
            latents=self.runner.read_latents(seq, computed, to_host=not self.config.handoff_on_device),
            generator_state=state.generator.get_state() if state.generator is not None else None,
            cached_tokens=seq.num_cached_tokens,
            resumed_token_ids=seq.token_ids[seq.prompt_len:computed],
            # A greedy request's draft goes along; a sampled one's is drawn on the decode side from the MTP
            # hidden state, where its generator goes on.
            draft_token_ids=tuple(self.drafts.get(seq.request_id, ((), None, 0))[0]) if state.params.is_greedy else (),
            draft_hidden=hidden.cpu() if (hidden := self._draft_hidden.get(seq.request_id)) is not None else None,
        )
        out = state.aborted("stop")
        out.token_ids, out.handoff, out.completion_tokens = [first_token], handoff, seq.num_output_tokens
        return self._retire(state, out)

    def _admit_handoffs(self) -> None:
        """Place waiting hand-offs in the cache, first come first served, while blocks allow."""
        while self.pending_handoffs and len(self.scheduler.running) < self.config.max_running:
            state, handoff = self.pending_handoffs[0]
            seq = state.seq
            if not self.blocks.can_allocate(seq, seq.num_tokens):
                return
            self.pending_handoffs.popleft()
            if self.cached_prefix_tokens(seq.token_ids) < handoff.latents_start:
                # The prefix that was not sent has left this cache since: compute the sequence again, as a
                # preempted one (it keeps its tokens; the next is sampled after them).
                seq.status = SequenceStatus.WAITING
                self.scheduler.waiting.appendleft(seq)
                continue
            self.blocks.allocate(seq, seq.num_tokens)
            start = seq.num_cached_tokens  # a shared prefix already holds these latents
            self.runner.write_latents(seq, start, handoff.latents[:, start - handoff.latents_start:])
            self.handoff_tokens_not_sent += handoff.latents_start
            seq.num_computed_tokens = seq.num_tokens - 1  # the prompt, and a resumed request's earlier tokens
            self.blocks.commit(seq)
            seq.status = SequenceStatus.RUNNING
            self.scheduler.running.append(seq)

    def _retire(self, state: RequestState, out: RequestOutput) -> RequestOutput:
        self.requests.pop(state.seq.request_id, None)
        self.drafts.pop(state.seq.request_id, None)
        self._draft_hidden.pop(state.seq.request_id, None)
        self.scheduler.remove(state.seq)
        self.runner.release(state.seq)
        self.finished_count += 1
        return out

    # -- helpers ----------------------------------------------------------------------------------

    def _state(self, seq: Sequence, params: SamplingParams) -> RequestState:
        return RequestState(seq, params, self.tokenizer, max_model_len=self.max_model_len,
                            reasoning=self.config.reasoning, device=self.runner.device)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams,
                  resumed: tuple[int, ...] | list[int] = ()) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise RequestError("request_id", f"must be a non-empty string (got {request_id!r})")
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise RequestError("sampling_params", f"expected SamplingParams (got {type(params).__name__})")
        vocab = self.model.config.vocab_size
        if not prompt:
            raise RequestError("prompt", "is empty")
        for field, ids in (("prompt_token_ids", prompt), ("resumed_token_ids", resumed)):
            self._check_token_ids(field, ids)
        if len(resumed) >= params.max_tokens:
            raise RequestError("resumed_token_ids", f"{len(resumed)} tokens already sent leave nothing of max_tokens "
                                                    f"({params.max_tokens}) to generate")
        params.check_against(vocab)
        check_fits(len(prompt), params.max_tokens, self.max_model_len)
        total = len(prompt) + params.max_tokens
        if self.blocks.blocks_needed(total) > self.config.num_blocks:
            raise RequestError(
                "max_tokens",
                f"{total} tokens need {self.blocks.blocks_needed(total)} KV blocks; the cache holds "
                f"{self.config.num_blocks} of {self.config.block_size} tokens",
            )

    def _check_token_ids(self, field: str, ids) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(field, f"each id must be an integer in [0, {vocab}) (got {bad!r})")

    def describe(self) -> dict[str, str]:
        return self.runner.describe()

    def cached_prefix_hashes(self, limit: int) -> list[int]:
        """Hashes of the newest `limit` prefix blocks the cache holds (what the prefill router matches)."""
        return self.blocks.cached_hashes(limit)

    def stats(self) -> EngineStats:
        b = self.blocks.stats()
        sched = self.scheduler
        queued = sum(s.num_tokens for s in sched.waiting)
        queued += sum(s.num_uncomputed_tokens for s in sched.running if s.is_prefilling)
        return EngineStats(
            role=self.config.role,
            waiting=len(sched.waiting) + len(self.pending_handoffs),
            running=len(sched.running),
            queued_prompt_tokens=queued,
            kv_blocks_total=b.num_blocks,
            kv_blocks_used=b.used_blocks,
            kv_blocks_free=b.free_blocks,
            prefix_hit_tokens=b.prefix_hit_tokens,
            prefix_query_tokens=b.prefix_query_tokens,
            preemptions=sched.num_preemptions,
            finished=self.finished_count,
            admission_held=not sched.admitting,
            handoff_tokens_not_sent=self.handoff_tokens_not_sent,
            draft_tokens=self.draft_tokens,
            accepted_draft_tokens=self.accepted_draft_tokens,
        )
