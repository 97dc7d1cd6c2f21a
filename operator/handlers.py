"""kopf handlers: reconcile R1Deployments into KubeRay objects and follow KubeRay's status.

The API calls go through kube_api."""

import contextvars
import datetime
import json
import logging
import ssl
import threading
import urllib.request
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from r1serve.operator import constants as K
from r1serve.operator import render, rollout
from r1serve.operator import status as S
from r1serve.operator.config import OperatorConfig
from r1serve.operator.kube_api import KubeApi
from r1serve.spec import R1Deployment, SpecError, expert_load, parse_r1deployment
from r1serve.spec import constants as C

# Reading the scaling status from the Serve application must not hold up a reconcile for long.
SCALING_STATUS_TIMEOUT_S = 2.0

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A kopf Body (or API dict) as plain nested dicts."""
    return {key: body[key] for key in body}


def _deployment(owner: Mapping[str, Any]) -> R1Deployment:
    """The typed spec, from the name, namespace and spec alone: nothing renders the resource's
    labels or annotations (kopf's own annotations would make every render differ)."""
    meta = owner.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    doc = {"apiVersion": K.R1D_API_VERSION, "kind": K.R1D_KIND,
           "metadata": {"name": meta.get("name"), "namespace": namespace},
           "spec": owner.get("spec") or {}}
    deployment = parse_r1deployment(doc, origin=f"{namespace}/{meta.get('name')}")
    render.check_for_kubernetes(deployment)
    return deployment


def _status_lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    # Reconcile and the RayService watch refresh the same status from different threads; one
    # at a time per R1Deployment, each reading the other's result, posts every event once.
    return memo.status_locks.setdefault((namespace, name), threading.Lock())


def _publish(memo: kopf.Memo, namespace: str, name: str, compute) -> None:
    """Under the object's lock: read the live R1Deployment, compute, write, post events."""
    with _status_lock(memo, namespace, name):
        owner = memo.api.get_r1deployment(namespace, name)
        if owner is None or (owner.get("metadata") or {}).get("deletionTimestamp"):
            return
        update = compute(owner)
        if update.changed:
            memo.api.patch_status(namespace, name, update.status)
        for event in update.events:
            kopf.event(owner, type=event.type, reason=event.reason, message=event.message)


def _refresh_status(memo: kopf.Memo, owner: Mapping[str, Any], deployment: R1Deployment,
                    rayservice: Mapping[str, Any] | None) -> None:
    namespace, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    cluster = S.cluster_name(rayservice)
    observed = S.Observed(
        rayservice=rayservice,
        raycluster=memo.api.get_raycluster(namespace, cluster) if cluster else None,
        pods=tuple(memo.api.list_pods(namespace, cluster)) if cluster else (),
        scaling=_scaling_status(deployment, rayservice),
    )
    _publish(memo, namespace, name, lambda live: S.aggregate(
        deployment, observed, generation=live["metadata"].get("generation"),
        previous=live.get("status"), now=_now(), silence_s=S.RAYSERVICE_SILENCE_S))
    _keep_expert_load(memo, owner, deployment, observed.scaling)
    if rayservice is not None:
        _look_again_if_silent(memo, rayservice)


def _keep_expert_load(memo: kopf.Memo, owner: Mapping[str, Any], deployment: R1Deployment,
                      scaling: Mapping[str, Any] | None) -> None:
    """Write the expert load the pools' replicas reported into the R1Deployment's ConfigMap (r1serve.spec.
    expert_load), when newer than the last written; a pool that reported nothing keeps what the ConfigMap has."""
    reported = {role: entry["expertLoad"] for role, entry in ((scaling or {}).get("pools") or {}).items()
                if (entry or {}).get("expertLoad")}
    uid = owner["metadata"].get("uid")
    if not reported or not uid:
        return
    newest = max(float(entry["at"]) for entry in reported.values())
    if memo.expert_load_kept.get(uid, 0.0) >= newest:
        return
    namespace = owner["metadata"]["namespace"]
    current = memo.api.get_configmap(namespace, expert_load.configmap_name(deployment.metadata.name)) or {}
    data = {**(current.get("data") or {}),
            **{expert_load.pool_key(role): str(entry["load"]) for role, entry in reported.items()}}
    size = sum(len(k) + len(v) for k, v in data.items())
    if size > expert_load.MAX_BYTES:
        log.warning("not keeping the expert load of %s/%s: %d bytes exceed a ConfigMap's %d", namespace,
                    deployment.metadata.name, size, expert_load.MAX_BYTES)
        return
    memo.api.apply(render.expert_load_configmap(deployment, uid, data))
    memo.expert_load_kept[uid] = newest


def _look_again_if_silent(memo: kopf.Memo, rayservice: Mapping[str, Any]) -> None:
    """A RayService that KubeRay never answers brings no further event: look at it again once its
    silence would name KubeRay in the status."""
    left = S.status_silence_left(rayservice, _now(), S.RAYSERVICE_SILENCE_S)
    meta = rayservice.get("metadata") or {}
    uid = meta.get("uid")
    if left is None or left <= 0 or not uid:
        return
    with memo.silence_lock:
        if uid in memo.silence_timers:
            return
        # One second more: both timestamps are whole seconds. kopf.event reads kopf's context
        # variables, which only the handler's thread carries.
        timer = threading.Timer(left + 1, contextvars.copy_context().run, (
            _look_again, memo, meta.get("namespace"), meta.get("name"), uid))
        timer.daemon = True
        memo.silence_timers[uid] = timer
    timer.start()


def _look_again(memo: kopf.Memo, namespace: str, name: str, uid: str) -> None:
    """The timer's second look: refresh the status of a RayService still without one."""
    with memo.silence_lock:
        memo.silence_timers.pop(uid, None)
    try:
        rayservice = memo.api.find_rayservice(namespace, name)
        if rayservice is None or rayservice["metadata"].get("uid") != uid \
                or rayservice.get("status"):
            return  # gone, replaced or answered: its own events refresh the status
        live = _live_owner(memo, rayservice)
        if live is not None:
            _refresh_status(memo, live[0], live[1], rayservice)
    except Exception:  # nothing retries a timer; the RayService's next event refreshes anyway
        log.exception("could not look again at RayService %s/%s", namespace, name)


# With api.tls the endpoint serves the resource's own certificate, which the operator has no CA for (it
# never reads Secrets). The status document is public, read-only scaling data, so it is read over TLS
# without verifying the peer rather than not at all.
_STATUS_TLS = ssl.create_default_context()
_STATUS_TLS.check_hostname, _STATUS_TLS.verify_mode = False, ssl.CERT_NONE


def _scaling_status(deployment: R1Deployment, rayservice: Mapping[str, Any] | None) -> dict | None:
    """The Serve application's scaling status (the pool policies' decisions), or None.

    Read only while the application runs; any failure just leaves the decisions out of the status.
    """
    where, app = S.active_application(rayservice) if rayservice else (None, {})
    if where != "activeServiceStatus" or app.get("status") != "RUNNING":
        return None
    url = render.endpoints(deployment)["http"] + C.SCALING_STATUS_ROUTE
    try:
        with urllib.request.urlopen(url, timeout=SCALING_STATUS_TIMEOUT_S, context=_STATUS_TLS) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        log.debug("could not read %s", url, exc_info=True)
        return None


def _fail(memo: kopf.Memo, owner: Mapping[str, Any], deployment: R1Deployment, reason: str,
          message: str) -> None:
    namespace, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    _publish(memo, namespace, name, lambda live: S.failure(
        deployment, reason=reason, message=message, generation=live["metadata"].get("generation"),
        previous=live.get("status"), now=_now()))


def _apply_worker_bounds(memo: kopf.Memo, owner: Mapping[str, Any],
                         rayservice: Mapping[str, Any]) -> None:
    """Copy the spec's worker-group bounds into the RayService's active RayCluster, which KubeRay
    1.7 leaves with the old ones (r1serve.operator.rollout). Not while a pending cluster exists:
    KubeRay builds that one from the new spec, and the active one goes.

    Best effort: the children are applied whatever happens here, so no failure of it fails the
    reconcile; the next RayService event looks again.
    """
    status = rayservice.get("status") or {}
    cluster = (status.get("activeServiceStatus") or {}).get("rayClusterName")
    if not cluster or (status.get("pendingServiceStatus") or {}).get("rayClusterName"):
        return
    namespace, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    try:
        # Reconcile and the RayService watch both get here: one at a time, each rendering the
        # spec as it is now (an older event's spec would patch older bounds back) against the
        # cluster as it is now, so the second finds nothing to do and the event is posted once.
        with _status_lock(memo, namespace, name):
            live = memo.api.get_r1deployment(namespace, name)
            if live is None or (live.get("metadata") or {}).get("deletionTimestamp"):
                return
            wanted = render.render_rayservice(_deployment(live), config=memo.config)
            raycluster = memo.api.get_raycluster(namespace, cluster)
            patch = rollout.worker_bounds_patch(wanted, raycluster or {})
            if not patch.operations:
                return
            memo.api.json_patch_raycluster(namespace, cluster, patch.operations)
    except SpecError:
        return  # reconcile reports an invalid spec
    except ApiException as exc:
        # 404: the cluster is gone; 422: its worker groups moved since the read.
        log.log(logging.WARNING if exc.status not in (404, 422) else logging.INFO,
                "%s/%s: worker bounds of RayCluster %s not patched (%s %s)", namespace, name,
                cluster, exc.status, exc.reason)
        if exc.status == 403:
            kopf.event(owner, type="Warning", reason="Forbidden", message=(
                f"cannot patch RayCluster {cluster}: the operator's role lacks patch on "
                "rayclusters (reinstall its RBAC); new worker bounds wait for the next cluster"))
        return
    kopf.event(owner, type="Normal", reason="WorkerBoundsApplied", message=(
        f"worker pod bounds of RayCluster {cluster}: {'; '.join(patch.changes)}"))


def _apply_children(memo: kopf.Memo, owner: Mapping[str, Any],
                    deployment: R1Deployment) -> dict[str, Any]:
    """Apply the RayService, then the Services; returns the RayService as the server has it."""
    api, config, meta = memo.api, memo.config, owner["metadata"]
    rayservice, *services = render.render_children(
        deployment, config=config, owner_uid=meta["uid"], generation=meta.get("generation"))
    try:
        applied = api.apply(rayservice)
    except ApiException as exc:
        if exc.status == 404:
            # The namespace exists (the R1Deployment lives there), so the type is missing.
            message = S.kuberay_missing_message(config.kuberay_retry_seconds)
            _fail(memo, owner, deployment, "KubeRayNotInstalled", message)
            raise kopf.TemporaryError(message, delay=config.kuberay_retry_seconds) from None
        _raise_for(memo, owner, deployment, exc)
    for service in services:
        try:
            api.apply(service)
        except ApiException as exc:
            _raise_for(memo, owner, deployment, exc)
    return applied


def _raise_for(memo: kopf.Memo, owner: Mapping[str, Any], deployment: R1Deployment,
               exc: ApiException) -> None:
    message = f"the API server refused an object: {exc.status} {exc.reason}: {exc.body}"[:2000]
    if exc.status in (400, 422):
        # Invalid as written: only a new spec can help, which brings a new reconcile anyway.
        _fail(memo, owner, deployment, "ApplyRejected", message)
        raise kopf.PermanentError(message) from None
    if exc.status == 403:
        # Missing RBAC is fixed by an administrator, not by the spec: keep retrying.
        _fail(memo, owner, deployment, "Forbidden", message)
        raise kopf.TemporaryError(message, delay=60) from None
    raise kopf.TemporaryError(f"applying children failed: {exc.status} {exc.reason}",
                              delay=10) from None


def _load(memo: kopf.Memo, owner: Mapping[str, Any]) -> R1Deployment:
    try:
        return _deployment(owner)
    except SpecError as exc:
        # The CRD's schema and CEL rules catch nearly everything; this is the rest.
        meta, problems = owner["metadata"], exc.problems
    _publish(memo, meta["namespace"], meta["name"], lambda live: S.invalid_spec(
        problems, generation=live["metadata"].get("generation"),
        previous=live.get("status"), now=_now()))
    raise kopf.PermanentError(f"invalid R1Deployment: {'; '.join(problems)}")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's bookkeeping under r1serve.io annotations and build the API client."""
    prefix = K.KOPF_ANNOTATION_PREFIX
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration")
    settings.persistence.finalizer = f"{prefix}/finalizer"
    # `kubectl describe` shows the operator's own events, not kopf's per-handler chatter.
    settings.posting.loggers = False
    settings.execution.max_workers = 16
    if "config" not in memo:
        memo.config = OperatorConfig.from_env()
    if "api" not in memo:
        memo.api = KubeApi.from_environment()
    memo.status_locks = {}
    memo.silence_lock, memo.silence_timers = threading.Lock(), {}
    memo.expert_load_kept = {}  # R1Deployment uid -> time of the newest load written (the ConfigMap is the store)


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_: Any) -> None:
    """Stop the pending second looks and close the API client's connection pool."""
    for timer in list(memo.get("silence_timers", {}).values()):
        timer.cancel()
    if "api" in memo:
        memo.api.close()


@kopf.on.resume(K.R1D_GROUP, K.R1D_VERSION, K.R1D_PLURAL)
@kopf.on.create(K.R1D_GROUP, K.R1D_VERSION, K.R1D_PLURAL)
@kopf.on.update(K.R1D_GROUP, K.R1D_VERSION, K.R1D_PLURAL)
def reconcile(body: kopf.Body, reason: kopf.Reason, memo: kopf.Memo, old: Any = None,
              new: Any = None, **_: Any) -> None:
    """Render the children, apply them (idempotently) and recompute the status."""
    owner = _plain(body)
    deployment = _load(memo, owner)
    rayservice = _apply_children(memo, owner, deployment)
    _refresh_status(memo, owner, deployment, rayservice)
    _apply_worker_bounds(memo, owner, rayservice)
    if reason == kopf.Reason.CREATE:
        kopf.event(owner, type="Normal", reason="Created",
                   message=f"applied RayService {rayservice['metadata']['name']} and Service "
                   f"{render.service_name(deployment)}")
    elif reason == kopf.Reason.UPDATE and _spec_of(old) != _spec_of(new):
        kopf.event(owner, type="Normal", reason="Updated", message=(
            f"applied generation {owner['metadata'].get('generation')}; KubeRay rolls it out"))
    elif reason == kopf.Reason.UPDATE:
        log.debug("%s/%s: a metadata edit, nothing new to apply",
                  owner["metadata"].get("namespace"), owner["metadata"].get("name"))


def _spec_of(essence: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The children are rendered from the spec alone: kopf also reconciles an edit of labels or
    annotations, which re-applies the same objects and changes nothing."""
    return (essence or {}).get("spec") or {}


def _controller_of(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == K.R1D_KIND \
                and ref.get("apiVersion") == K.R1D_API_VERSION:
            return ref
    return None


def _live_owner(memo: kopf.Memo, child: Mapping[str, Any]) -> tuple[dict[str, Any], R1Deployment] | None:
    """The R1Deployment that controls `child` and its spec, or None when there is none to act for:
    no controller, an owner gone or being deleted (the garbage collector takes the child), or an
    invalid spec (reconcile reports it)."""
    ref = _controller_of(child)
    if ref is None:
        return None
    owner = memo.api.get_r1deployment(child.get("metadata", {}).get("namespace"), ref["name"])
    owner_meta = (owner or {}).get("metadata") or {}
    if owner is None or owner_meta.get("uid") != ref.get("uid") \
            or owner_meta.get("deletionTimestamp"):
        return None
    try:
        return owner, _deployment(owner)
    except SpecError:
        return None


@kopf.on.event(K.RAY_GROUP, K.RAY_VERSION, K.RAYSERVICES,
               labels={K.LABEL_MANAGED_BY: K.OPERATOR_NAME})
def rayservice_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo,
                     logger: Any, **_: Any) -> None:
    """Follow KubeRay's status into the owner's status and the bounds into a cluster that became
    active; re-create a RayService deleted by hand."""
    live = _live_owner(memo, body)
    if live is None:
        return
    owner, deployment = live
    rayservice: Mapping[str, Any] | None = _plain(body)
    if event.get("type") == "DELETED":
        logger.info("RayService deleted while its R1Deployment exists; re-creating it")
        rayservice = _apply_children(memo, owner, deployment)
    _refresh_status(memo, owner, deployment, rayservice)
    _apply_worker_bounds(memo, owner, rayservice)


@kopf.on.event("", "v1", "services", labels={K.LABEL_MANAGED_BY: K.OPERATOR_NAME})
def service_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo,
                  logger: Any, **_: Any) -> None:
    """Re-create a client Service deleted by hand (clients would lose the endpoint until the next
    reconcile otherwise); its other events change nothing the operator reports."""
    if event.get("type") != "DELETED":
        return
    live = _live_owner(memo, body)
    if live is None:
        return
    owner, deployment = live
    logger.info("Service deleted while its R1Deployment exists; re-creating it")
    _apply_children(memo, owner, deployment)
