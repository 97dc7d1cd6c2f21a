"""The scaling status board: the pool policies' last decisions, readable outside the Serve controller.

The policies run inside the Serve controller, whose state a user cannot read; each decision is sent,
fire-and-forget, to a small detached named actor. The Ingress serves the board at STATUS_ROUTE and
`r1serve status` prints it. Nothing here may fail or slow down a policy.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from r1serve.runtime.engine.description import format_engine
from r1serve.spec import constants as C
from r1serve.spec import expert_load

from .scaling import Decision

log = logging.getLogger(__name__)

BOARD_NAME = "r1serve-scaling-status"
BOARD_NAMESPACE = "r1serve"
STATUS_ROUTE = C.SCALING_STATUS_ROUTE
# Serve's control loop runs every 0.1 s and the signal values move on every tick: a decision is sent
# at once when the counts or the deciding signal change, otherwise at most this often.
REFRESH_S = 1.0

_board: Any = None
_sent: dict[str, tuple[tuple, float]] = {}


class StatusBoard:
    """Holds, per pool, the last decision and the decision behind the last change of the replica count.

    A decision that asks for another count is only a wish until Serve's delay has passed; it becomes
    the pool's `lastScaleDecision` when a later report shows the count changed.
    """

    def __init__(self):
        self.pools: dict[str, dict[str, Any]] = {}

    def record(self, decision: dict, at: float) -> None:
        pool = self.pools.setdefault(decision["pool"], {})
        previous = pool.get("last")
        if previous is not None and previous["current"] != decision["current"] and "wish" in pool:
            pool["lastScaleDecision"] = pool.pop("wish")
        pool["last"] = {**decision, "at": at}
        if decision["desired"] != decision["current"]:
            pool["wish"] = pool["last"]
        else:
            pool.pop("wish", None)

    def record_engine(self, pool: str, description: dict[str, str]) -> None:
        """How the pool's engines run (the last replica to start says; replicas of a pool run alike)."""
        self.pools.setdefault(pool, {})["engine"] = description

    def record_ranks(self, pool: str, replica: str, alive: int, total: int, at: float) -> None:
        """A replica whose expert-parallel group lost ranks and serves on without them (refreshed while so), or
        that grew back to all its ranks (its entry goes)."""
        degraded = self.pools.setdefault(pool, {}).setdefault("degraded", {})
        if alive >= total:
            degraded.pop(replica, None)
            return
        degraded[replica] = {"replica": replica, "ranksAlive": alive, "ranks": total, "at": at}

    def record_drafts(self, pool: str, replica: str, drafts: int, kept: int, at: float) -> None:
        """A replica's speculative decoding: draft tokens verified and kept since it started."""
        self.pools.setdefault(pool, {}).setdefault("drafts", {})[replica] = {"drafts": drafts, "kept": kept,
                                                                            "at": at}

    def record_expert_load(self, pool: str, replica: str, load: str, at: float) -> None:
        """The expert load a replica saw (r1serve.spec.expert_load's encoding), for the operator to keep."""
        self.pools.setdefault(pool, {}).setdefault("expertLoad", {})[replica] = {"load": load, "at": at}

    def get(self) -> dict[str, dict[str, Any]]:
        return self.pools


def _handle() -> Any:
    global _board
    if _board is None:
        import ray

        if not ray.is_initialized():  # outside a Ray process (unit tests): never start a cluster here
            raise RuntimeError("Ray is not initialized")
        actor = ray.remote(num_cpus=0, max_restarts=-1)(StatusBoard)
        _board = actor.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE, lifetime="detached",
                               get_if_exists=True).remote()
    return _board


def publish(decision: Decision) -> None:
    """Sends `decision` to the board when it changed or REFRESH_S passed; never raises."""
    now = time.time()
    body = decision.to_dict()
    key = (decision.current, decision.desired, decision.signal)
    last = _sent.get(decision.pool)
    if last is not None and last[0] == key and now - last[1] < REFRESH_S:
        return
    if _tell("record", body, now):
        _sent[decision.pool] = (key, now)


def _tell(method: str, *args) -> bool:
    """Calls the board's `method`, fire-and-forget; False (never an exception) when the board cannot be reached:
    no Ray here (unit tests), or the board is being restarted (the next call tries again)."""
    global _board
    try:
        getattr(_handle(), method).remote(*args)
        return True
    except Exception:
        _board = None
        log.debug("could not tell the status board (%s)", method, exc_info=True)
        return False


def publish_engine(pool: str, description: dict[str, str]) -> None:
    """Sends a replica's engine description to the board once, at start-up; never raises."""
    _tell("record_engine", pool, description)


def publish_drafts(pool: str, replica: str, drafts: int, kept: int) -> None:
    """Sends a replica's draft-token counts to the board (repeated as they grow); never raises."""
    _tell("record_drafts", pool, replica, drafts, kept, time.time())


def publish_ranks(pool: str, replica: str, alive: int, total: int) -> None:
    """Sends a degraded replica's ranks to the board (the replica repeats it while it stays degraded, so an entry
    that stops being refreshed is a replica that is gone); never raises."""
    _tell("record_ranks", pool, replica, alive, total, time.time())


def publish_expert_load(pool: str, replica: str, load: str) -> None:
    """Sends the expert load a replica saw to the board; never raises."""
    _tell("record_expert_load", pool, replica, load, time.time())


# A degraded replica refreshes its entry every few seconds (the pool's metrics interval); one this old is gone.
DEGRADED_STALE_S = 60.0
# Replicas offer their expert load every kept_load.OFFER_EVERY_S; one not heard of for this long is gone.
LOAD_STALE_S = 300.0


def pool_expert_load(entry: dict[str, Any], now: float) -> dict[str, Any] | None:
    """The pool's replicas' expert load as one (each weighed equally), with how many said it and when the newest
    did; None before any replica did."""
    fresh = [d for d in (entry.get("expertLoad") or {}).values() if now - d["at"] < LOAD_STALE_S]
    if not fresh:
        return None
    merged = expert_load.merge(expert_load.decode(d["load"]) for d in fresh)
    return {"load": expert_load.encode(merged), "replicas": len(fresh), "at": max(d["at"] for d in fresh)}


def degraded_replicas(entry: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """The pool's replicas serving with fewer ranks than they started with, by name."""
    fresh = [d for d in (entry.get("degraded") or {}).values() if now - d["at"] < DEGRADED_STALE_S]
    return [{k: v for k, v in d.items() if k != "at"} for d in sorted(fresh, key=lambda d: d["replica"])]


async def read_board() -> dict[str, dict[str, Any]]:
    """The board's contents ({} when no policy has published yet)."""
    import ray

    try:
        board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
    except ValueError:
        return {}
    return await board.get.remote()


def pool_status(board: dict[str, dict[str, Any]], running: dict[str, int]) -> dict[str, Any]:
    """The status document: per pool, running replicas, the policy's desired count and its decisions."""
    pools = {}
    for pool in sorted(set(board) | set(running)):
        entry = board.get(pool, {})
        last = entry.get("last")
        pools[pool] = {
            "currentReplicas": running.get(pool, last["current"] if last else 0),
            "desiredReplicas": last["desired"] if last else None,
            "lastDecision": last,
            "lastScaleDecision": entry.get("lastScaleDecision"),
            "engine": entry.get("engine"),
            "degradedReplicas": degraded_replicas(entry, time.time()),
            "expertLoad": pool_expert_load(entry, time.time()),
            "speculative": pool_drafts(entry),
        }
    return {"pools": pools}


def pool_drafts(entry: dict[str, Any]) -> dict[str, Any] | None:
    """Speculative decoding over the pool's replicas: draft tokens verified and kept, and the share kept per
    draft position (one position: one draft token a step); None while no replica drafted."""
    drafts = (entry.get("drafts") or {}).values()
    verified = sum(d["drafts"] for d in drafts)
    if not verified:
        return None
    kept = sum(d["kept"] for d in drafts)
    return {"draftTokens": verified, "keptTokens": kept, "replicas": len(drafts),
            "acceptanceByPosition": {"1": kept / verified}}


def format_status(status: dict[str, Any]) -> str:
    """`r1serve status` output: one block per pool."""
    lines = []
    for pool, entry in status.get("pools", {}).items():
        desired = entry["desiredReplicas"]
        lines.append(f"{pool}: {entry['currentReplicas']} replicas"
                     + (f", desired {desired}" if desired is not None else ", no decision yet"))
        if entry.get("engine"):
            lines.append(f"  engine: {format_engine(entry['engine'])}")
        kept = entry.get("expertLoad")
        if kept:
            when = time.strftime("%H:%M:%S", time.gmtime(kept["at"]))
            lines.append(f"  expert load: reported by {kept['replicas']} replica(s), newest at {when}, kept for "
                         "replicas that start later")
        drafts = entry.get("speculative")
        if drafts:
            lines.append(f"  speculative decoding: {drafts['keptTokens']} of {drafts['draftTokens']} draft tokens "
                         f"kept ({drafts['acceptanceByPosition']['1']:.0%} at draft position 1), over "
                         f"{drafts['replicas']} replica(s)")
        for degraded in entry.get("degradedReplicas") or []:
            lines.append(f"  degraded: replica {degraded['replica']} serves with {degraded['ranksAlive']} of "
                         f"{degraded['ranks']} expert-parallel ranks")
        for label, key in (("last decision", "lastDecision"), ("last scale change", "lastScaleDecision")):
            d = entry.get(key)
            if d:
                when = time.strftime("%H:%M:%S", time.gmtime(d["at"])) if "at" in d else "?"
                lines.append(f"  {label} ({when} UTC): {d['current']} -> {d['desired']}: {d['signal']} "
                             f"{d['value']:g} in the pool vs target {d['target']:g} per replica; {d['reason']}")
    return "\n".join(lines) if lines else "no pools reported yet"
