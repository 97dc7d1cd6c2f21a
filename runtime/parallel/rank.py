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

from .layout import (
    ExpertParallelLayout,
    Failover,
    GroupConfig,
    free_tcp_address,
    join_group,
    leave_group,
    store_barrier,
)
from .placement import ExpertPlacement, PlacementError, balanced_placement, survivor_placement

log = logging.getLogger(__name__)

# Each rebalance weighs the load seen since the previous one fully and older load by this factor per
# rebalance: a decayed window that follows traffic as it shifts.
LOAD_DECAY = 0.5


class PendingPlacement:
    """A rebalance the ranks agreed on, whose incoming experts load on a thread while the rank keeps stepping;
    every rank switches to it at the first step boundary where all have loaded theirs."""

    def __init__(self, epoch: int, placements: dict[int, ExpertPlacement], load):
        self.epoch, self.placements = epoch, placements
        self.what = getattr(self, "what", f"rebalance {epoch}")
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
            raise RuntimeError(f"loading experts for {self.what} failed: {self.error}") from self.error
        return self.staged is not None


class PendingGrow(PendingPlacement):
    """The group growing back: respawned ranks wait at `address` for the survivors, who read the experts they
    will hold and do not hold yet on a thread while they keep stepping, then all switch at one step boundary."""

    def __init__(self, generation: int, members: tuple[int, ...], address: str, epoch: int,
                 placements: dict[int, ExpertPlacement], load):
        self.generation, self.members, self.address, self.after_epoch = generation, members, address, epoch
        self.what = f"growing back into group {generation}"
        super().__init__(generation, placements, load)


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
    failover: Failover = Failover()
    # MoE layer -> load per expert that earlier replicas saw (r1serve.spec.expert_load): the group starts from
    # the placement it implies instead of the uniform one.
    expert_load: dict[int, list[float]] | None = None
    # A rank that joins a running group (it grows back after a loss): the group's members, as first-group
    # numbers in group order, the generation it joins and every layer's placement (physical_to_logical). It
    # builds its model first and joins once the survivors are told to switch.
    weights: str = "dequantized"  # how an FP8 checkpoint's weights are held (the model's `weights`)
    members: tuple[int, ...] | None = None
    joins: int = 0
    placements: dict[int, tuple[int, ...]] | None = None

    @property
    def first_rank(self) -> int:
        """The number the rank keeps through every group: its rank in the group first formed."""
        return self.members[self.group.rank] if self.members else self.group.rank


class Parking(Protocol):
    """Where a prefill rank keeps hand-off latents until a decode rank reads them (transport.DirectLatents,
    GlooLatents, IpcLatents). A decode rank gives its own a `cached_tokens` probe where it has one
    (GlooLatents, IpcLatents): the latents of a prefix its cache holds are then not sent again."""

    def park(self, latents: torch.Tensor) -> RemoteLatents: ...

    def waiting_bytes(self) -> int: ...


class RankWorker:
    """Owns the rank's model (attention and dense weights, plus its own experts) and its engine.

    Commands arrive on `inbox` as tuples; outputs leave on `outbox` as ("outputs", rank, [RequestOutput]),
    ("rejected", rank, request_id, field, message), ("reply", rank, answer, token) to ("ask", token, question,
    *args), or ("failed", rank, text). A rank
    that may survive a lost peer (Failover.degrades) reports a broken collective as ("broken", rank, generation,
    text, address) and waits for ("reform", generation, members, address, epoch): `members` are the surviving
    ranks' first-group numbers, in their new order, which is how they keep naming themselves. When respawned
    ranks are ready to join, ("grow", generation, members, address, epoch, placements) tells the survivors the
    larger group they switch to together.
    """

    def __init__(self, spec: RankSpec, parking: Parking | None = None):
        self.spec = spec
        # Rank to rank: a prefill rank keeps each hand-off's latents on its device and hands on a reference.
        self._parking = parking if spec.engine.role == "prefill" else None
        self.rank = spec.first_rank
        # First-group numbers of the group's ranks, in order.
        self.members = spec.members or tuple(range(spec.group.world_size))
        self.generation = spec.joins  # how many times the group was formed again (without a lost rank, or grown)
        if not spec.joins:
            join_group(spec.group, spec.device)
        config_dir = Path(spec.checkpoint)
        from r1serve.runtime.model.config import ModelConfig

        config = ModelConfig.from_file(config_dir)
        # A group of one rank (a GPU pool with expertParallel 1) holds every expert itself: no dispatch.
        mtp = bool(spec.engine.speculative_tokens)
        self.layout = ExpertParallelLayout(config, spec.group.rank, self.world_size, spec.redundant,
                                           self._kept_placements(config, mtp), mtp=mtp) \
            if self.world_size > 1 else None
        self.model = DeepseekV3ForCausalLM.from_checkpoint(
            config_dir, getattr(torch, spec.dtype), spec.device, experts=self.layout, progress=False,
            weights=spec.weights,
        )
        if mtp:
            self.model.load_mtp(config_dir)  # its experts placed as a MoE layer's: this rank's share
        # The all-to-all sizes its exchanges on the host, which a CUDA graph cannot capture: the decode
        # steps of a rank that dispatches run eagerly.
        engine_config = spec.engine if self.layout is None else replace(spec.engine, cuda_graphs=False)
        engine_config = replace(engine_config, handoff_on_device=self._parking is not None,
                                report_generator_state=self.layout is not None and spec.failover.degrades)
        self.engine = LLMEngine(self.model, Tokenizer.from_dir(config_dir), engine_config)
        self._park_limit = engine_config.max_parked_bytes or self.engine.cache_bytes
        if parking is not None and spec.engine.role == "decode" and hasattr(parking, "cached_tokens"):
            parking.cached_tokens = self.engine.cached_prefix_tokens  # a prefix it holds is not sent again
        self._rebalance_wanted = 0  # the newest rebalance epoch asked of this rank
        self._rebalance_done = 0  # the newest epoch the ranks agreed on and planned
        self._pending: PendingPlacement | None = None
        self._grow: PendingGrow | None = None
        self._load_window: dict[int, torch.Tensor] = {}
        self._stop = False

    @property
    def world_size(self) -> int:
        return len(self.members)

    def _kept_placements(self, config, mtp: bool) -> dict[int, ExpertPlacement]:
        """The balanced placement of each layer that has kept load (the same on every rank: a pure function),
        or the placements a joining rank was given."""
        kept = self.spec.expert_load or {}
        layers = config.expert_layers(mtp)
        placements = {layer: balanced_placement(load, self.world_size, self.spec.redundant)
                      for layer, load in kept.items() if layer in layers and any(load)}
        for layer, physical in (self.spec.placements or {}).items():
            placements[layer] = ExpertPlacement(config.n_routed_experts, self.world_size, tuple(physical))
        return placements

    def expert_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.model.moe_layers(mtp=True)
                   for p in m.experts.parameters())

    def run(self, inbox, outbox, idle_wait_s: float = 0.01) -> None:
        """Serve until stopped. A collective that fails (a peer died or stopped answering) ends the rank, unless
        it may survive the loss: then it leaves the broken group at once (so peers waiting on it fail fast too),
        reports itself broken and serves on in the group the survivors form, keeping its requests."""
        try:
            if self.spec.joins:  # respawned: the survivors come to meet it once told to grow
                join_group(self.spec.group, self.spec.device)
                self.layout.reform(self.spec.group.rank, self.world_size, self.layout.placements)
                outbox.put(("reformed", self.rank, self.spec.joins, 0))
                store_barrier(f"r1serve/formed/{self.spec.joins}", self.world_size, self.spec.group.meet_timeout_s)
                self._agree_on_rebalances()
            else:
                # Ranks load the model at their own pace: all meet before the first collective, which would time
                # out waiting for the slowest.
                store_barrier("r1serve/started", self.world_size, self.spec.group.meet_timeout_s)
            while True:
                try:
                    self._serve(inbox, outbox, idle_wait_s)
                    return
                except Exception as exc:  # noqa: BLE001 - a broken collective, or a rank that may have died
                    if not (self.spec.failover.degrades and self.layout is not None):
                        raise
                    log.warning("rank %d: the group broke (%s: %s)", self.rank, type(exc).__name__, exc)
                    error = f"{type(exc).__name__}: {exc}"
                leave_group()
                if not self._await_reform(inbox, outbox, error):
                    return
        except Exception as exc:  # noqa: BLE001 - a broken collective or rank must be reported, not hang
            log.exception("rank %d failed", self.rank)
            outbox.put(("failed", self.rank, f"rank {self.rank}: {type(exc).__name__}: {exc}"))
            outbox.put(("outputs", self.rank, self.engine.fail_all(f"expert-parallel group failed: {exc}")))
        finally:
            leave_group()

    def _serve(self, inbox, outbox, idle_wait_s: float) -> None:
        """The lockstep loop. Every iteration all ranks agree (one all-reduce) whether any has work, a
        rebalance is due or the group stops; then every rank runs exactly one forward, empty if idle (with
        speculative decoding, one of the model and one of the MTP layer). A step whose model forward fails leaves
        nothing half done: its tokens were not sampled, and it runs again as it was; one whose MTP forward fails
        has kept its tokens, which go out with the next step."""
        busy = False
        while True:
            self._apply_commands(inbox, outbox, block=not busy, wait_s=idle_wait_s)
            self._bound_admission()
            loading = int(self._pending is not None and not self._pending.loaded)
            grown = self._grow_loaded(outbox)
            flags = torch.tensor([int(self.engine.has_work), self._rebalance_wanted, int(self._stop), loading,
                                  -grown])
            _all_reduce(flags, self.spec.device, dist.ReduceOp.MAX)
            if flags[2]:
                return
            if grown and -int(flags[4]) == grown:
                self._switch_to_grown(outbox)  # in the larger group, the next iteration agrees afresh
                continue
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

    def _await_reform(self, inbox, outbox, error: str) -> bool:
        """Between groups: answer commands (requests queue in the engine) until the controller says which ranks
        form the next group. False when told to stop instead."""
        while not self._stop:  # a stop that came just before the collective failed ends the rank here
            # Where the next group may meet if this rank leads it: an address of its machine the others reach
            # (a Ray rank is told its node's; local processes meet on loopback).
            address = free_tcp_address(self.spec.options.get("host", "127.0.0.1"))
            outbox.put(("broken", self.rank, self.generation, f"rank {self.rank}: {error}", address))
            while True:
                command = inbox.get()
                if command[0] == "stop":
                    return False
                if command[0] != "reform":
                    self._apply(command, outbox)
                    continue
                try:
                    self._reform(*command[1:], outbox)
                    return True
                except PlacementError:
                    raise  # no survivor can take the lost experts: the group ends
                except Exception as exc:  # noqa: BLE001 - another rank was lost while the group formed
                    log.warning("rank %d: forming group %d failed (%s)", self.rank, command[1], exc)
                    leave_group()
                    error = f"{type(exc).__name__}: {exc}"
                    break
        return False

    def _slots_added(self) -> int:
        """Expert slots per rank this rank took on, over those it started with, after earlier losses."""
        first = next(iter(self.layout.placements.values()))
        started = (self.model.config.n_routed_experts + self.spec.redundant) // self.spec.group.world_size
        return first.slots_per_rank - started

    def _reform(self, generation: int, members: tuple[int, ...], address: str, epoch: int, outbox) -> None:
        """Join the survivors' group and place every expert on them (survivor_placement, from the load they
        saw): what a survivor holds stays, what was lost loads from the checkpoint into added slots. A
        rebalance that was under way is dropped; the ranks agree on `epoch` as done."""
        started = time.monotonic()
        alive = [self.members.index(m) for m in members]  # the survivors' ranks in the group that broke
        rank = members.index(self.rank)
        join_group(replace(self.spec.group, world_size=len(members), rank=rank, init_method=address),
                   self.spec.device)
        placements = {}
        for layer, placement in self.layout.placements.items():
            load = self.layout.dispatcher(layer).total_load.clone()
            _all_reduce(load, self.spec.device)
            placements[layer] = survivor_placement(placement, alive, load.tolist(),
                                                   self.spec.failover.headroom_slots, taken=self._slots_added())
        loaded = self.model.regrow_experts(self.spec.checkpoint,
                                           {layer: p.rank_experts(rank) for layer, p in placements.items()})
        self.layout.reform(rank, len(members), placements)
        # Ranks load at their own pace (some have more lost experts, or slower storage): meet again before the
        # first collective, which would otherwise time out waiting for the slowest.
        store_barrier(f"r1serve/formed/{generation}", len(members), self.spec.group.meet_timeout_s)
        self.members, self.generation = tuple(members), generation
        self._pending = self._grow = None
        self._rebalance_done = epoch
        self._rebalance_wanted = max(self._rebalance_wanted, epoch)  # one asked meanwhile still runs
        seconds = time.monotonic() - started
        log.info("rank %d: group %d formed with ranks %s as rank %d of %d in %.2fs (%d experts loaded)",
                 self.rank, generation, list(members), rank, len(members), seconds, loaded)
        outbox.put(("reformed", self.rank, generation, loaded))

    def _plan_grow(self, generation: int, members: tuple[int, ...], address: str, epoch: int,
                   placements: dict[int, tuple[int, ...]]) -> None:
        """Respawned ranks wait to join: read the experts this rank will hold and does not hold now, on a thread
        (what it holds is copied from its own slots at the switch, whatever a rebalance moved meanwhile)."""
        num_experts = self.model.config.n_routed_experts
        grown = {layer: ExpertPlacement(num_experts, len(members), tuple(physical))
                 for layer, physical in placements.items()}
        rank = members.index(self.rank)
        wanted = {(layer, expert) for layer, placement in grown.items() for expert in placement.rank_experts(rank)
                  if expert not in self.layout.placements[layer].rank_experts(self.layout.rank)}
        self._grow = PendingGrow(generation, tuple(members), address, epoch, grown,
                                 lambda: self.model.read_experts(self.spec.checkpoint, wanted))

    def _grow_loaded(self, outbox) -> int:
        """The grow this rank has read its experts for (0: none). Its vote in the step's all-reduce, as a
        negative: a MAX of negatives is minus the MIN, so all switch only once every rank has read its own.
        One that cannot read them drops the grow (it never votes for it, so none switches) and says so."""
        if self._grow is None:
            return 0
        try:
            return self._grow.generation if self._grow.loaded else 0
        except RuntimeError as exc:
            log.warning("rank %d: %s", self.rank, exc)
            outbox.put(("grow-failed", self.rank, self._grow.generation, f"rank {self.rank}: {exc}"))
            self._grow = None
            return 0

    def _switch_to_grown(self, outbox) -> None:
        """At the boundary every rank agreed on: leave this group for the larger one, where the respawned ranks
        wait; hold the grown placement's experts (those staged, those held, the rest read now). A join that
        fails (a respawned rank died meanwhile) breaks this rank as a lost peer would."""
        grow, self._grow = self._grow, None
        started = time.monotonic()
        rank = grow.members.index(self.rank)
        leave_group()
        join_group(replace(self.spec.group, world_size=len(grow.members), rank=rank, init_method=grow.address,
                           meet_timeout_s=self.spec.group.timeout_s), self.spec.device)
        loaded = self.model.regrow_experts(self.spec.checkpoint,
                                           {layer: p.rank_experts(rank) for layer, p in grow.placements.items()},
                                           staged=grow.staged)
        self.layout.reform(rank, len(grow.members), grow.placements)
        store_barrier(f"r1serve/formed/{grow.generation}", len(grow.members), self.spec.group.meet_timeout_s)
        self.members, self.generation = grow.members, grow.generation
        self._pending = None  # a rebalance under way is dropped: every rank switched here
        self._rebalance_done = max(self._rebalance_done, grow.after_epoch)
        self._rebalance_wanted = max(self._rebalance_wanted, grow.after_epoch)
        self._agree_on_rebalances()
        log.info("rank %d: grew back into group %d with ranks %s as rank %d of %d in %.2fs", self.rank,
                 grow.generation, list(grow.members), rank, len(grow.members), time.monotonic() - started)
        outbox.put(("reformed", self.rank, grow.generation, loaded + len(grow.staged)))

    def _agree_on_rebalances(self) -> None:
        """Collective, first thing in a grown group: the respawned ranks take the survivors' rebalance epochs
        (else they alone would plan one the others count as done), and every rank starts a new load window
        (the respawned ones have none; balancing from different windows would place experts differently)."""
        epochs = torch.tensor([self._rebalance_done, self._rebalance_wanted])
        _all_reduce(epochs, self.spec.device, dist.ReduceOp.MAX)
        self._rebalance_done, self._rebalance_wanted = int(epochs[0]), int(epochs[1])
        self._load_window = {}

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
                _, request_id, prompt, params, resumed, *generator_state = command
                self.engine.add_request(request_id, prompt, params, resumed, *generator_state)
            elif kind == "handoff":
                outputs = self.engine.add_handoff(command[1])
                outbox.put(("outputs", self.rank, outputs))
            elif kind == "abort":
                out = self.engine.abort(command[1])
                if out is not None:
                    outbox.put(("outputs", self.rank, [out]))
            elif kind == "ask":  # a question with the asker's token, echoed so the answer meets its question
                outbox.put(("reply", self.rank, self._answer(command[2:]), command[1]))
            elif kind == "rebalance":
                self._rebalance_wanted = max(self._rebalance_wanted, command[1])
            elif kind == "grow":
                self._plan_grow(*command[1:])
            elif kind == "grow-cancel":  # consistent: a switch needs every rank's vote at one boundary
                if self._grow is not None and self._grow.generation == command[1]:
                    self._grow = None
            elif kind == "stop":
                self._stop = True
        except RequestError as exc:
            outbox.put(("rejected", self.rank, command[1] if kind == "add" else command[1].request_id,
                        exc.field, str(exc)))

    def _answer(self, question: tuple):
        """What the controller asked: stats, prefix_hashes, describe, load or placements."""
        kind = question[0]
        if kind == "stats":
            stats = self.engine.stats()
            if self._parking is not None:
                stats = replace(stats, handoff_bytes_waiting=self._parking.waiting_bytes())
            return stats
        if kind == "prefix_hashes":
            return self.engine.cached_prefix_hashes(question[1])
        if kind == "describe":
            return self.engine.describe()
        if kind == "load":
            dispatchers = self.layout.dispatchers if self.layout is not None else {}
            return {layer: d.total_load.tolist() for layer, d in dispatchers.items()}
        if kind == "placements":
            layers = self.layout.placements if self.layout is not None else {}
            return {layer: p.physical_to_logical for layer, p in layers.items()}
        raise ValueError(f"unknown question {kind!r}")

    def plan_rebalance(self, epoch: int, outbox) -> None:
        """Collective, between steps: add every rank's expert load since the last rebalance to the decayed
        window, compute the same balanced placement everywhere, and start loading the experts this rank
        gains on a thread (the rank keeps stepping). A layer whose window is empty keeps its placement."""
        self._rebalance_done = epoch
        changed: dict[int, ExpertPlacement] = {}
        for layer, placement in (self.layout.placements.items() if self.layout is not None else ()):
            load = self.layout.dispatcher(layer).take_load()
            _all_reduce(load, self.spec.device)
            window = self._load_window.get(layer)
            window = load.double() if window is None else window * LOAD_DECAY + load.double()
            self._load_window[layer] = window
            if not window.any():
                continue
            new = balanced_placement(window.tolist(), self.layout.world_size, self.layout.redundant)
            if new != placement:
                changed[layer] = new
        if not changed:
            outbox.put(("rebalanced", self.rank, epoch, False))
            return
        incoming = {layer: new.rank_experts(self.layout.rank) for layer, new in changed.items()}
        delay = float(self.spec.options.get("expert_load_delay_s", 0.0))  # tests: a load that takes a while

        def load():
            if delay:
                time.sleep(delay)
            return self.model.stage_experts(self.spec.checkpoint, incoming)

        self._pending = PendingPlacement(epoch, changed, load)

    def _switch(self, outbox) -> None:
        pending, self._pending = self._pending, None
        for layer, new in pending.placements.items():
            self.model.install_experts(layer, new.rank_experts(self.layout.rank), *pending.staged[layer])
            self.layout.placements[layer] = new
            self.layout.dispatcher(layer).set_placement(new)
        log.info("rank %d: rebalance %d switched %d layer(s) after %.2fs of loading", self.rank, pending.epoch,
                 len(pending.placements), time.monotonic() - pending.started)
        outbox.put(("rebalanced", self.rank, pending.epoch, True))


def _all_reduce(tensor: torch.Tensor, device: str, op=dist.ReduceOp.SUM) -> None:
    """In place, on a host tensor: NCCL reduces only device tensors, so there it goes to the device and back."""
    if dist.get_backend() != "nccl":
        dist.all_reduce(tensor, op=op)
        return
    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=op)
    tensor.copy_(on_device.cpu())


def rank_main(spec: RankSpec, inbox, outbox, parking: Parking | None = None) -> None:
    """Entry point of a rank process; `parking` keeps a prefill rank's hand-off latents for a decode rank."""
    torch.set_num_threads(max(1, spec.options.get("threads", 1)))
    device = torch.device(spec.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # a rank that sees every GPU: kernels (Triton's too) launch on its own
    try:
        worker = RankWorker(spec, parking)
    except Exception:  # noqa: BLE001
        outbox.put(("failed", spec.first_rank, traceback.format_exc(limit=3)))
        leave_group()
        return
    outbox.put(("ready", worker.rank, worker.expert_bytes()))
    worker.run(inbox, outbox)
