"""Pure status aggregation: RayService (+ its RayCluster and pods) -> R1Deployment status and events."""

import dataclasses
import datetime
import math
from collections.abc import Mapping
from typing import Any

from r1serve.operator import constants as K
from r1serve.operator.render import endpoints, rayservice_name
from r1serve.spec import constants as C
from r1serve.spec.model import Pool, R1Deployment, Role
from r1serve.spec.serve_config import nodes_per_replica

# Serve deployment states in which the pool's running replicas take traffic.
_SERVING_STATES = {"HEALTHY", "UPSCALING", "DOWNSCALING"}
_BROKEN_STATES = {"UNHEALTHY", "DEPLOY_FAILED"}
_WARNING_PHASES = {"Degraded", "Failed"}
# Phases whose desired replicas are no count of a running cluster (Failed writes 0, Pending shows
# the spec's or a cluster still coming up): the first count after them is no scale decision.
_UNCOUNTED_PHASES = {"Pending", "Failed"}
# KubeRay writes a RayService's status within seconds; none for this long means that no KubeRay
# controller acts on it (its CRDs can be installed while the operator is not running).
RAYSERVICE_SILENCE_S = 120.0
NO_STATUS_REASON = "KubeRayNotResponding"


@dataclasses.dataclass(frozen=True)
class Observed:
    """What the operator read from the API about one R1Deployment's children."""

    rayservice: Mapping[str, Any] | None = None
    raycluster: Mapping[str, Any] | None = None
    pods: tuple[Mapping[str, Any], ...] = ()
    # The Serve application's scaling status (GET /r1serve/v1/status): per pool, the policies'
    # last decisions with their reasons; None when it could not be read.
    scaling: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the R1Deployment."""

    type: str      # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class StatusUpdate:
    """The status to write (only when `changed`) and the events the transition deserves."""

    status: dict[str, Any]
    events: tuple[Event, ...]
    changed: bool


@dataclasses.dataclass(frozen=True)
class _Verdict:
    phase: str
    reason: str
    message: str
    serving: bool


def _conditions_of(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    status = (obj or {}).get("status") or {}
    return {c.get("type"): c for c in status.get("conditions") or []}


def active_application(rayservice: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """('activeServiceStatus' | 'pendingServiceStatus' | None, the r1serve app's status)."""
    status = rayservice.get("status") or {}
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        apps = (status.get(key) or {}).get("applicationStatuses") or {}
        if C.SERVE_APP_NAME in apps:
            return key, apps[C.SERVE_APP_NAME] or {}
    return None, {}


def cluster_name(rayservice: Mapping[str, Any] | None) -> str | None:
    """The RayCluster serving now (or, on the first deploy, the one being brought up)."""
    status = (rayservice or {}).get("status") or {}
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        name = (status.get(key) or {}).get("rayClusterName")
        if name:
            return name
    return None


def _broken_deployments(app: Mapping[str, Any]) -> list[str]:
    statuses = app.get("serveDeploymentStatuses") or {}
    return [f"{name}: {info.get('status')}" + (f" ({info['message']})" if info.get("message") else "")
            for name, info in sorted(statuses.items()) if info.get("status") in _BROKEN_STATES]


def _parse_time(value: Any) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def status_silence_left(rayservice: Mapping[str, Any], now: str,
                        silence_s: float = RAYSERVICE_SILENCE_S) -> float | None:
    """Seconds until a RayService still without status counts as unattended by KubeRay (<= 0:
    it does now); None once it has a status, or without a creation time to measure from."""
    if rayservice.get("status"):
        return None
    created = _parse_time((rayservice.get("metadata") or {}).get("creationTimestamp"))
    current = _parse_time(now)
    if created is None or current is None:
        return None
    return silence_s - (current - created).total_seconds()


def _assess(rayservice: Mapping[str, Any] | None, now: str, silence_s: float) -> _Verdict:
    if rayservice is None:
        return _Verdict("Pending", "RayServiceMissing", "the RayService is not created yet", False)
    where, app = active_application(rayservice)
    state = app.get("status")
    if where is None or not state:
        left = status_silence_left(rayservice, now, silence_s)
        if left is not None and left <= 0:
            return _Verdict("Pending", NO_STATUS_REASON, f"the RayService has had no status for "
                            f"{silence_s:g} s: is the KubeRay operator running?", False)
        return _Verdict("Pending", "WaitingForRayCluster",
                        "KubeRay is starting the Ray cluster and the Serve application", False)
    serving = where == "activeServiceStatus" and state == "RUNNING"
    detail = app.get("message") or ""
    if state == "DEPLOY_FAILED":
        return _Verdict("Failed", "DeployFailed", detail or "the Serve application failed to "
                        "deploy", False)
    broken = _broken_deployments(app)
    if state == "UNHEALTHY" or broken:
        return _Verdict("Degraded", "Unhealthy", "; ".join(broken) or detail or
                        "the Serve application is unhealthy", serving)
    rs_status = rayservice.get("status") or {}
    upgrading = _conditions_of(rayservice).get("UpgradeInProgress", {}).get("status") == "True"
    generation = (rayservice.get("metadata") or {}).get("generation")
    stale = generation is not None and rs_status.get("observedGeneration") not in (None, generation)
    if serving and (upgrading or stale):
        return _Verdict("Progressing", "RollingOut", "KubeRay is rolling out the new spec while "
                        "the current one keeps serving", True)
    if serving and rs_status.get("numServeEndpoints") == 0:
        return _Verdict("Progressing", "WaitingForEndpoints", "the application runs but no "
                        "Serve proxy is ready to take traffic yet", False)
    if serving:
        return _Verdict("Ready", "ApplicationRunning", "the Serve application is running", True)
    return _Verdict("Progressing", "Deploying", f"the Serve application is {state}", False)


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _desired_pods(raycluster: Mapping[str, Any] | None, role: Role) -> int | None:
    groups = ((raycluster or {}).get("spec") or {}).get("workerGroupSpecs") or []
    for group in groups:
        if group.get("groupName") == role and group.get("replicas") is not None:
            return int(group["replicas"])
    return None


def pool_status(role: Role, pool: Pool, observed: Observed, app: Mapping[str, Any],
                last_desired: int | None = None) -> dict:
    """Replicas of one pool, counted in expert-parallel groups (pods / pods per replica).

    The desired count is the RayCluster's; unread, the last one read (`last_desired`), else the
    spec's initial replicas.
    """
    per_replica = nodes_per_replica(pool)
    pods = [p for p in observed.pods
            if (p.get("metadata") or {}).get("labels", {}).get(K.KUBERAY_GROUP_LABEL) == role
            and not (p.get("metadata") or {}).get("deletionTimestamp")]
    desired_pods = _desired_pods(observed.raycluster, role)
    if desired_pods is not None:
        desired = math.ceil(desired_pods / per_replica)
    else:
        desired = last_desired if last_desired is not None else pool.replicas.effective_initial
    serve_state = ((app.get("serveDeploymentStatuses") or {})
                   .get(C.POOL_DEPLOYMENTS[role]) or {}).get("status")
    ready = sum(1 for p in pods if _pod_ready(p)) // per_replica
    ready = min(ready, desired) if serve_state in _SERVING_STATES else 0
    status = {"replicas": len(pods) // per_replica, "readyReplicas": ready,
              "desiredReplicas": desired, "summary": f"{ready}/{desired}"}
    decision = scale_decision(observed.scaling, role)
    if decision is not None:
        status["lastScaleDecision"] = decision
    connector = kv_connector(observed.scaling, role)
    if connector is not None:
        status["kvConnector"] = connector
    weights = weight_format(observed.scaling, role)
    if weights is not None:
        status["weights"] = weights
    degraded = degraded_replicas(observed.scaling, role)
    if degraded:
        status["degradedReplicas"] = degraded
    return status


def degraded_replicas(scaling: Mapping[str, Any] | None, role: Role) -> list[dict[str, Any]]:
    """The pool's replicas whose expert-parallel group lost ranks and serves on without them (experts.
    onRankFailure: degrade), as they report it in the status board."""
    entries = (((scaling or {}).get("pools") or {}).get(role) or {}).get("degradedReplicas") or []
    return [{"replica": str(e["replica"]), "ranksAlive": int(e["ranksAlive"]), "ranks": int(e["ranks"])}
            for e in entries]


RANKS_LOST_REASON = "RanksLost"


def _ranks_lost(pools: Mapping[str, dict]) -> str | None:
    """What the Degraded condition says while replicas serve with fewer ranks, else None."""
    parts = [f"{role}: replica {d['replica']} serves with {d['ranksAlive']} of {d['ranks']} ranks"
             for role, pool in pools.items() for d in pool.get("degradedReplicas") or []]
    return "; ".join(parts) if parts else None


def kv_connector(scaling: Mapping[str, Any] | None, role: Role) -> str | None:
    """The KV connector the pool's replicas resolved (kvTransfer.connector with `auto` resolved where they
    run), as they report it in the status board; None for a pool that hands nothing off, or before any
    replica reported."""
    engine = (((scaling or {}).get("pools") or {}).get(role) or {}).get("engine") or {}
    return str(engine["kvConnector"]) if engine.get("kvConnector") else None


def weight_format(scaling: Mapping[str, Any] | None, role: Role) -> str | None:
    """How the pool's replicas hold the weights (model.weights with `auto` resolved where they run), as they
    report it in the status board; None before any replica reported."""
    engine = (((scaling or {}).get("pools") or {}).get(role) or {}).get("engine") or {}
    return str(engine["weights"]) if engine.get("weights") else None


def scale_decision(scaling: Mapping[str, Any] | None, role: Role) -> dict[str, Any] | None:
    """The pool policy's last replica-count change, as the R1Deployment status shows it."""
    entry = (((scaling or {}).get("pools") or {}).get(role) or {}).get("lastScaleDecision")
    if not entry:
        return None
    decision = {"fromReplicas": int(entry["current"]), "toReplicas": int(entry["desired"]),
                "signal": str(entry["signal"]), "value": round(float(entry["value"]), 3),
                "target": round(float(entry["target"]), 3), "reason": str(entry["reason"])}
    if entry.get("at") is not None:
        decision["time"] = datetime.datetime.fromtimestamp(
            float(entry["at"]), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return decision


def _condition(kind: str, true: bool, reason: str, message: str, generation: int | None,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> dict[str, Any]:
    status = "True" if true else "False"
    before = previous.get(kind) or {}
    # Kubernetes convention: the time moves only when the status flips.
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    condition = {"type": kind, "status": status, "reason": reason, "message": message,
                 "lastTransitionTime": since or now}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _conditions(verdict: _Verdict, generation: int | None, previous: Mapping[str, Any],
                now: str, ranks_lost: str | None = None) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    ready_reason = "Serving" if verdict.serving else verdict.reason
    degraded = _condition("Degraded", verdict.phase in _WARNING_PHASES, verdict.reason, verdict.message,
                          generation, before, now)
    if ranks_lost is not None and degraded["status"] == "False":  # serving, with replicas short of ranks
        degraded = _condition("Degraded", True, RANKS_LOST_REASON, ranks_lost, generation, before, now)
    return [
        _condition("Ready", verdict.serving, ready_reason, verdict.message, generation, before, now),
        _condition("Progressing", verdict.phase in ("Pending", "Progressing"), verdict.reason,
                   verdict.message, generation, before, now),
        degraded,
    ]


def _scaling(pools: dict[str, dict], previous: Mapping[str, Any], now: str
             ) -> tuple[dict[str, Any] | None, list[Event]]:
    """Only a change between two counts read from the RayCluster scaled anything: a count not read
    keeps the last one (pool_status), and none is taken over from Pending or Failed."""
    decision, events = previous.get("lastScaleDecision"), []
    if previous.get("phase") in _UNCOUNTED_PHASES:
        return decision, events
    for role, current in pools.items():
        before = (previous.get(role) or {}).get("desiredReplicas")
        after = current["desiredReplicas"]
        if before is not None and before != after:
            decision = {"pool": role, "fromReplicas": before, "toReplicas": after, "time": now}
            why = (current.get("lastScaleDecision") or {}).get("reason")
            events.append(Event("Normal", "Scaled", f"{role}: {before} -> {after} replicas"
                                + (f" ({why})" if why else "")))
    return decision, events


def _generation(rayservice: Mapping[str, Any] | None, fallback: int | None) -> int | None:
    annotations = ((rayservice or {}).get("metadata") or {}).get("annotations") or {}
    value = annotations.get(K.ANNOTATION_SOURCE_GENERATION)
    return int(value) if value is not None and str(value).isdigit() else fallback


def _finish(deployment: R1Deployment | None, verdict: _Verdict, pools: dict[str, dict],
            generation: int | None, previous: Mapping[str, Any], now: str,
            extra_events: list[Event]) -> StatusUpdate:
    status: dict[str, Any] = {"phase": verdict.phase}
    if generation is not None:
        status["observedGeneration"] = generation
    ranks_lost = _ranks_lost(pools)
    status["conditions"] = _conditions(verdict, generation, previous, now, ranks_lost)
    status.update(pools)
    if deployment is not None:
        status["endpoints"] = endpoints(deployment)
        status["rayService"] = rayservice_name(deployment)
    decision, events = _scaling(pools, previous, now)
    if decision is not None:
        status["lastScaleDecision"] = decision
    if previous.get("phase") != verdict.phase:
        warning = verdict.phase in _WARNING_PHASES or verdict.reason == NO_STATUS_REASON
        events.insert(0, Event("Warning" if warning else "Normal",
                               verdict.reason if warning else verdict.phase, verdict.message))
    before = {c.get("type"): c for c in previous.get("conditions") or []}.get("Degraded") or {}
    if ranks_lost is not None and (before.get("reason"), before.get("message")) != (RANKS_LOST_REASON, ranks_lost):
        events.append(Event("Warning", RANKS_LOST_REASON, ranks_lost))
    events += extra_events
    # Only our own keys count: anything else under status is not ours to rewrite.
    changed = any(previous.get(key) != value for key, value in status.items())
    return StatusUpdate(status, tuple(events), changed)


def aggregate(deployment: R1Deployment, observed: Observed, *, generation: int | None,
              previous: Mapping[str, Any] | None, now: str,
              silence_s: float = RAYSERVICE_SILENCE_S) -> StatusUpdate:
    """The R1Deployment status that the observed children imply.

    `generation` is the R1Deployment generation used when the RayService carries no
    source-generation annotation; `previous` is the current status (None when unset); `silence_s`
    is how long a RayService may go without status before KubeRay is named as the likely cause.
    """
    previous = previous or {}
    verdict = _assess(observed.rayservice, now, silence_s)
    _, app = active_application(observed.rayservice) if observed.rayservice else (None, {})
    # A RayCluster read that failed once must not turn into a drop to the spec's initial count
    # and a "scale" back up on the next read.
    counting = previous.get("phase") not in _UNCOUNTED_PHASES
    pools = {role: pool_status(role, pool, observed, app, last_desired=(
        (previous.get(role) or {}).get("desiredReplicas") if counting else None))
        for role, pool in deployment.spec.active_pools().items()}
    # Pending is not a warning phase, so a change of reason under it posts no phase event.
    extra = ([Event("Warning", verdict.reason, verdict.message)]
             if verdict.reason == NO_STATUS_REASON and previous.get("phase") == verdict.phase
             and _reason_of(previous) != verdict.reason else [])
    return _finish(deployment, verdict, pools, _generation(observed.rayservice, generation),
                   previous, now, extra)


def failure(deployment: R1Deployment, *, reason: str, message: str, generation: int | None,
            previous: Mapping[str, Any] | None, now: str) -> StatusUpdate:
    """Status when the children cannot be applied at all (e.g. KubeRay is not installed)."""
    previous = previous or {}
    verdict = _Verdict("Failed", reason, message, False)
    pools = {role: {"replicas": 0, "readyReplicas": 0, "desiredReplicas": 0, "summary": "0/0"}
             for role in deployment.spec.active_pools()}
    # The phase event fires once; a changed reason under the same phase deserves its own.
    extra = ([Event("Warning", reason, message)]
             if previous.get("phase") == "Failed" and _reason_of(previous) != reason else [])
    return _finish(deployment, verdict, pools, generation, previous, now, extra)


def invalid_spec(problems: list[str], *, generation: int | None,
                 previous: Mapping[str, Any] | None, now: str) -> StatusUpdate:
    """Status of a resource whose spec the model refuses (it slipped past the CRD's rules)."""
    message = "; ".join(problems)[:1000]
    previous = previous or {}
    extra = ([Event("Warning", "InvalidSpec", message)]
             if previous.get("phase") == "Failed" and _reason_of(previous) != "InvalidSpec" else [])
    return _finish(None, _Verdict("Failed", "InvalidSpec", message, False), {}, generation,
                   previous, now, extra)


def _reason_of(status: Mapping[str, Any]) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("reason")
    return None


def kuberay_missing_message(retry_seconds: float) -> str:
    """What to tell the user when the RayService CRD is absent."""
    return (f"the KubeRay CRD {K.RAYSERVICE_CRD}/{K.RAY_VERSION} is not installed: install the "
            f"KubeRay operator {K.KUBERAY_VERSION} (the r1serve-operator chart's kuberay "
            f"dependency, or `helm install kuberay-operator kuberay/kuberay-operator --version "
            f"{K.KUBERAY_VERSION}`); retrying every {retry_seconds:g}s")
