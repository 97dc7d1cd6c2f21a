"""One rank of an expert-parallel group: its engine, stepping in lockstep with the other ranks."""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.outputs import RemoteLatents, RequestError
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.tokenizer import Tokenizer

from .layout import ExpertParallelLayout, GroupConfig, join_group, leave_group
from .placement import ExpertPlacement, balanced_placement

log = logging.getLogger(__name__)

# Each rebalance weighs the load seen since the previous one fully and older load by this factor per
# rebalance: a decayed window that follows traffic as it shifts.
LOAD_DECAY = 0.5


class PendingPlacement:
    """A rebalance the ranks agreed on, whose incoming experts load on a thread while the rank keeps stepping;
    every rank switches to it at the first step boundary where all have loaded theirs."""

    def __init__(self, epoch: int, placements: dict[int, ExpertPlacement], load):
        self.epoch, self.placements = epoch, placements
        self.staged: dict | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._load, args=(load,), daemon=True, name="r1serve-expert-load")
        self._thread.start()

    def _load(self, load) -> None:
        try:
            self.staged = load()
        except BaseException as exc:  # noqa: BLE001 - reported to the step loop, which fails the rank
            self.error = exc

    @property
    def loaded(self) -> bool:
        if self.error is not None:
            raise RuntimeError(f"loading experts for rebalance {self.epoch} failed: {self.error}") from self.error
        return self.staged is not None


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs to build itself (picklable)."""

    group: GroupConfig
    checkpoint: str
    engine: EngineConfig = EngineConfig()
    dtype: str = "float32"
    device: str = "cpu"
    redundant: int = 0
    options: dict[str, Any] = field(default_factory=dict)


class Parking(Protocol):
    """Where a prefill rank keeps hand-off latents until a decode rank reads them (transport.DirectLatents,
    GlooLatents). A decode rank gives its own a `cached_tokens` probe where it has one (GlooLatents): the latents
    of a prefix its cache holds are then not sent again."""

    def park(self, latents: torch.Tensor) -> RemoteLatents: ...

    def waiting_bytes(self) -> int: ...


class RankWorker:
    """Owns the rank's model (attention and dense weights, plus its own experts) and its engine.

    Commands arrive on `inbox` as tuples; outputs leave on `outbox` as ("outputs", rank, [RequestOutput]),
    ("rejected", rank, request_id, field, message), ("stats", rank, stats) or ("failed", rank, text).
    """

    def __init__(self, spec: RankSpec, parking: Parking | None = None):
        self.spec = spec
        # Rank to rank: a prefill rank keeps each hand-off's latents on its device and hands on a reference.
        self._parking = parking if spec.engine.role == "prefill" else None
        self.rank, self.world_size = spec.group.rank, spec.group.world_size
        join_group(spec.group, spec.device)
        config_dir = Path(spec.checkpoint)
        from r1serve.runtime.model.config import ModelConfig

        config = ModelConfig.from_file(config_dir)
        # A group of one rank (a GPU pool with expertParallel 1) holds every expert itself: no dispatch.
        self.layout = ExpertParallelLayout(config, self.rank, self.world_size, spec.redundant) \
            if self.world_size > 1 else None
        self.model = DeepseekV3ForCausalLM.from_checkpoint(
            config_dir, getattr(torch, spec.dtype), spec.device, experts=self.layout, progress=False
        )
        # The all-to-all sizes its exchanges on the host, which a CUDA graph cannot capture: the decode
        # steps of a rank that dispatches run eagerly.
        engine_config = spec.engine if self.layout is None else replace(spec.engine, cuda_graphs=False)
        engine_config = replace(engine_config, handoff_on_device=self._parking is not None)
        self.engine = LLMEngine(self.model, Tokenizer.from_dir(config_dir), engine_config)
        self._park_limit = engine_config.max_parked_bytes or self.engine.cache_bytes
        if parking is not None and spec.engine.role == "decode" and hasattr(parking, "cached_tokens"):
            parking.cached_tokens = self.engine.cached_prefix_tokens  # a prefix it holds is not sent again
        self._rebalance_wanted = 0  # the newest rebalance epoch asked of this rank
        self._rebalance_done = 0  # the newest epoch the ranks agreed on and planned
        self._pending: PendingPlacement | None = None
        self._load_window: dict[int, torch.Tensor] = {}
        self._stop = False

    def expert_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.model.moe_layers() for p in m.experts.parameters())

    def run(self, inbox, outbox, idle_wait_s: float = 0.01) -> None:
        """The lockstep loop. Every iteration all ranks agree (one all-reduce) whether any has work, a
        rebalance is due or the group stops; then every rank runs exactly one forward, empty if idle."""
        try:
            busy = False
            while True:
                self._apply_commands(inbox, outbox, block=not busy, wait_s=idle_wait_s)
                self._bound_admission()
                loading = int(self._pending is not None and not self._pending.loaded)
                flags = torch.tensor([int(self.engine.has_work), self._rebalance_wanted, int(self._stop), loading])
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[2]:
                    break
                if self._pending is not None and not flags[3]:
                    self._switch(outbox)  # every rank has its incoming experts: all switch at this boundary
                if self._pending is None and int(flags[1]) > self._rebalance_done:
                    self.plan_rebalance(int(flags[1]), outbox)
                busy = bool(flags[0])
                if busy:
                    outputs = self.engine.step(lockstep=True)
                    if self._parking is not None:
                        for out in outputs:
                            if out.handoff is not None:
                                out.handoff.latents = self._parking.park(out.handoff.latents)
                        self._bound_admission()
                    if outputs:
                        outbox.put(("outputs", self.rank, outputs))
        except Exception as exc:  # noqa: BLE001 - a broken collective or rank must be reported, not hang
            log.exception("rank %d failed", self.rank)
            outbox.put(("failed", self.rank, f"rank {self.rank}: {type(exc).__name__}: {exc}"))
            outbox.put(("outputs", self.rank, self.engine.fail_all(f"expert-parallel group failed: {exc}")))
        finally:
            leave_group()

    def _bound_admission(self) -> None:
        """Beyond the bound of unread hand-off latents, new prompts wait for decode ranks to read them."""
        if self._parking is not None:
            self.engine.hold_admission(self._parking.waiting_bytes() >= self._park_limit)

    def _apply_commands(self, inbox, outbox, block: bool, wait_s: float) -> None:
        try:
            command = inbox.get(timeout=wait_s) if block else inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command, outbox)
            try:
                command = inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple, outbox) -> None:
        kind = command[0]
        try:
            if kind == "add":
                _, request_id, prompt, params, resumed = command
                self.engine.add_request(request_id, prompt, params, resumed)
            elif kind == "handoff":
                outputs = self.engine.add_handoff(command[1])
                outbox.put(("outputs", self.rank, outputs))
            elif kind == "abort":
                out = self.engine.abort(command[1])
                if out is not None:
                    outbox.put(("outputs", self.rank, [out]))
            elif kind == "stats":
                stats = self.engine.stats()
                if self._parking is not None:
                    stats = replace(stats, handoff_bytes_waiting=self._parking.waiting_bytes())
                outbox.put(("reply", self.rank, stats))
            elif kind == "prefix_hashes":
                outbox.put(("reply", self.rank, self.engine.cached_prefix_hashes(command[1])))
            elif kind == "describe":
                outbox.put(("reply", self.rank, self.engine.describe()))
            elif kind == "load":
                dispatchers = self.layout.dispatchers if self.layout is not None else {}
                load = {layer: d.total_load.tolist() for layer, d in dispatchers.items()}
                outbox.put(("reply", self.rank, load))
            elif kind == "placements":
                layers = self.layout.placements if self.layout is not None else {}
                placements = {layer: p.physical_to_logical for layer, p in layers.items()}
                outbox.put(("reply", self.rank, placements))
            elif kind == "rebalance":
                self._rebalance_wanted = max(self._rebalance_wanted, command[1])
            elif kind == "stop":
                self._stop = True
        except RequestError as exc:
            outbox.put(("rejected", self.rank, command[1] if kind == "add" else command[1].request_id,
                        exc.field, str(exc)))

    def plan_rebalance(self, epoch: int, outbox) -> None:
        """Collective, between steps: add every rank's expert load since the last rebalance to the decayed
        window, compute the same balanced placement everywhere, and start loading the experts this rank
        gains on a thread (the rank keeps stepping). A layer whose window is empty keeps its placement."""
        self._rebalance_done = epoch
        changed: dict[int, ExpertPlacement] = {}
        for layer, placement in (self.layout.placements.items() if self.layout is not None else ()):
            load = self.layout.dispatcher(layer).take_load()
            dist.all_reduce(load)
            window = self._load_window.get(layer)
            window = load.double() if window is None else window * LOAD_DECAY + load.double()
            self._load_window[layer] = window
            if not window.any():
                continue
            new = balanced_placement(window.tolist(), self.world_size, self.layout.redundant)
            if new != placement:
                changed[layer] = new
        if not changed:
            outbox.put(("rebalanced", self.rank, epoch, False))
            return
        incoming = {layer: new.rank_experts(self.rank) for layer, new in changed.items()}
        delay = float(self.spec.options.get("expert_load_delay_s", 0.0))  # tests: a load that takes a while

        def load():
            if delay:
                time.sleep(delay)
            return self.model.stage_experts(self.spec.checkpoint, incoming)

        self._pending = PendingPlacement(epoch, changed, load)

    def _switch(self, outbox) -> None:
        pending, self._pending = self._pending, None
        for layer, new in pending.placements.items():
            self.model.install_experts(layer, new.rank_experts(self.rank), *pending.staged[layer])
            self.layout.placements[layer] = new
            self.layout.dispatcher(layer).set_placement(new)
        log.info("rank %d: rebalance %d switched %d layer(s) after %.2fs of loading", self.rank, pending.epoch,
                 len(pending.placements), time.monotonic() - pending.started)
        outbox.put(("rebalanced", self.rank, pending.epoch, True))


def rank_main(spec: RankSpec, inbox, outbox, parking: Parking | None = None) -> None:
    """Entry point of a rank process; `parking` keeps a prefill rank's hand-off latents for a decode rank."""
    torch.set_num_threads(max(1, spec.options.get("threads", 1)))
    try:
        worker = RankWorker(spec, parking)
    except Exception:  # noqa: BLE001
        outbox.put(("failed", spec.group.rank, traceback.format_exc(limit=3)))
        leave_group()
        return
    outbox.put(("ready", spec.group.rank, worker.expert_bytes()))
    worker.run(inbox, outbox)
