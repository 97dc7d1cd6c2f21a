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
    global _board
    now = time.time()
    body = decision.to_dict()
    key = (decision.current, decision.desired, decision.signal)
    last = _sent.get(decision.pool)
    if last is not None and last[0] == key and now - last[1] < REFRESH_S:
        return
    try:
        _handle().record.remote(body, now)
        _sent[decision.pool] = (key, now)
    except Exception:  # no Ray here (unit tests) or the board is being restarted: try again later
        _board = None
        log.debug("could not publish the scaling decision", exc_info=True)


def publish_engine(pool: str, description: dict[str, str]) -> None:
    """Sends a replica's engine description to the board once, at start-up; never raises."""
    global _board
    try:
        _handle().record_engine.remote(pool, description)
    except Exception:  # no Ray here (unit tests): nothing to show it to
        _board = None
        log.debug("could not publish the engine description", exc_info=True)


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
        }
    return {"pools": pools}


def format_status(status: dict[str, Any]) -> str:
    """`r1serve status` output: one block per pool."""
    lines = []
    for pool, entry in status.get("pools", {}).items():
        desired = entry["desiredReplicas"]
        lines.append(f"{pool}: {entry['currentReplicas']} replicas"
                     + (f", desired {desired}" if desired is not None else ", no decision yet"))
        if entry.get("engine"):
            lines.append(f"  engine: {format_engine(entry['engine'])}")
        for label, key in (("last decision", "lastDecision"), ("last scale change", "lastScaleDecision")):
            d = entry.get(key)
            if d:
                when = time.strftime("%H:%M:%S", time.gmtime(d["at"])) if "at" in d else "?"
                lines.append(f"  {label} ({when} UTC): {d['current']} -> {d['desired']}: {d['signal']} "
                             f"{d['value']:g} in the pool vs target {d['target']:g} per replica; {d['reason']}")
    return "\n".join(lines) if lines else "no pools reported yet"
