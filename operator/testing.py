"""Test doubles of the operator, like kopf.testing: an in-process Kubernetes API server and the operator in a thread.

Needs the `test` extra (kmock). Used by tests/operator and benchmarks/operator.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import aiohttp.web
import attrs
import kmock
import yaml

APPLY = "application/apply-patch+yaml"
R1D = "r1serve.io/v1alpha1/r1deployments"
RAYSERVICES = "ray.io/v1/rayservices"
RAYCLUSTERS = "ray.io/v1/rayclusters"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what kmock applies for every PATCH)."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    merged = dict(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(base.get(key), value)
    return merged


def _is_apply(request: kmock.Request) -> bool:
    return request.headers.get("Content-Type", "").startswith(APPLY)


def _without_version(obj: dict) -> dict:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


def _sees(view: Any, request: kmock.Request) -> bool:
    """kmock's `request in view`, without replaying the whole request history through the
    filters (which makes every request cost O(requests so far))."""
    while not isinstance(view, kmock.Root):
        if isinstance(view, kmock.Filter):
            if not view.criteria(request):
                return False
        elif not isinstance(view, kmock.Priority):
            return request in view  # slices, groups, exclusions: kmock's own answer
        view = view._source
    return True


@attrs.define(kw_only=True)
class _FastMatching(kmock.RawHandler):
    """RawHandler's reaction matching, linear in the reactions instead of the history."""

    async def _handle(self, request: kmock.Request) -> Any:
        def order(payload: Any) -> tuple[float, ...]:
            return tuple(-p for p in payload.priorities) + (0,) * (depth - len(payload.priorities))

        depth = max((len(p.priorities) for p in self._payloads), default=0)
        for payload in sorted(self._payloads, key=order):
            if not payload._disabled.is_set() and _sees(payload._source, request):
                try:
                    return await payload(request)
                except kmock.ReactionMismatchError:
                    payload._disabled.set()
                except NotImplementedError:
                    pass
        raise NotImplementedError("no reaction matches the request")


@attrs.define(kw_only=True)
class FakeApiServer(kmock.KubernetesEmulator, _FastMatching):
    """kmock's KubernetesEmulator, made to behave like a real API server where the operator
    depends on it:

    - undeclared resources answer 404 (a cluster without the KubeRay CRDs);
    - objects get uid, resourceVersion, generation and creationTimestamp; a PATCH that changes
      nothing keeps the resourceVersion, a spec change bumps the generation;
    - a server-side apply PATCH of a missing object creates it;
    - the status subresource: /status writes only status, the main resource never does;
    - the garbage collector: deleting an owner deletes the objects that reference its uid.
    """

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    # (resource, namespace, name) -> time.monotonic() of the first creation: benchmarks read it.
    created_at: dict[tuple[str, str | None, str], float] = attrs.field(factory=dict, init=False)
    # Long runs keep only the latest `keep_requests` requests for assertions (kmock keeps all),
    # counting every one in `request_count`.
    keep_requests: int | None = None
    request_count: int = attrs.field(default=0, init=False)

    def install_kuberay(self) -> None:
        """What `helm install kuberay-operator` adds to discovery: the RayService and
        RayCluster types (no controller: tests play KubeRay by writing status)."""
        for plural, kind in ((RAYSERVICES, "RayService"), (RAYCLUSTERS, "RayCluster")):
            self.resources[plural] = kmock.ResourceInfo(
                kind=kind, namespaced=True, verbs=VERBS, subresources={"status"})

    def live(self, resource: str, namespace: str | None, name: str) -> dict | None:
        """The stored object, or None when absent or deleted."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def all_live(self, resource: str) -> list[dict]:
        """Every stored, undeleted object of a resource."""
        wanted = kmock.resource(resource)
        return [obj.raw for (res, _, _), obj in self.objects.items()
                if res == wanted and not obj.deleted]

    def calls(self, resource: str, method: str) -> list[kmock.Request]:
        """Requests so far with this HTTP method on this resource (any namespace or name)."""
        wanted = kmock.resource(resource)
        return [r for r in self if r.resource == wanted and r.method.value == method.upper()]

    def events_for(self, name: str) -> list[dict]:
        """Kubernetes events posted about the object called `name`."""
        return [e for e in self.all_live("v1/events")
                if (e.get("involvedObject") or {}).get("name") == name]

    async def _handle(self, request: kmock.Request) -> Any:
        self.request_count += 1
        if self.keep_requests and len(self._requests) > 2 * self.keep_requests:
            del self._requests[:-self.keep_requests]
        resource = request.resource
        if resource is not None and resource.plural and request.action is not None \
                and resource not in self.resources:
            raise kmock.KubernetesResourceNotFoundError()
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            self._stamp_new(request.data, request.namespace, request.resource)
        elif request.action == kmock.action.UPDATE and isinstance(request.data, dict):
            if self._current(request) is None and _is_apply(request):
                return await self._create_by_apply(request)
            self._prepare_update(request)
        doomed_uid = self._uid_of(request) if request.action == kmock.action.DELETE else None
        response = await super()._handle(request)
        if doomed_uid is not None and self._current(request) is None:
            await self._collect_garbage(doomed_uid)
        return response

    async def _create_by_apply(self, request: kmock.Request) -> Any:
        data = request.data
        self._stamp_new(data, request.namespace, request.resource)
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key in self.objects:
                self.objects[key].create(data)
            else:
                self.objects[key] = data
            await self._buses[request.resource].put({"type": "ADDED", "object": data})
        return aiohttp.web.json_response(data, status=201)

    def _stamp_new(self, data: dict, namespace: str | None, resource: Any) -> None:
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = (f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/"),
               namespace or meta.get("namespace"), meta.get("name"))
        self.created_at.setdefault(key, time.monotonic())
        if namespace:
            meta.setdefault("namespace", namespace)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)),
                    generation=1, creationTimestamp=datetime.datetime.now(
                        datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def _current(self, request: kmock.Request) -> dict | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _uid_of(self, request: kmock.Request) -> str | None:
        current = self._current(request)
        return (current or {}).get("metadata", {}).get("uid")

    def _prepare_update(self, request: kmock.Request) -> None:
        current = self._current(request)
        data = request.data
        if current is None:
            return  # the emulator answers 404
        has_status = "status" in self.resources[request.resource].subresources
        if request.subresource == "status":
            kept = data.get("status")
            data.clear()
            data["status"] = kept
        elif has_status:
            data.pop("status", None)
        after = merge_patch(current, data)
        if _without_version(after) != _without_version(current):
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._versions))
            if after.get("spec") != current.get("spec"):
                meta["generation"] = int(current["metadata"].get("generation") or 1) + 1

    async def _collect_garbage(self, owner_uid: str) -> None:
        async with self._lock:
            doomed = []
            for (resource, _, _), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = obj.get("metadata", {}).get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    raw = obj.raw
                    obj.delete()
                    doomed.append(raw)
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
        for raw in doomed:
            await self._collect_garbage(raw["metadata"].get("uid"))


async def eventually(check: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.05,
                     message: str = "condition") -> Any:
    """Await until `check()` returns something truthy (or raises nothing); fail after timeout.

    The API server runs in this event loop, so waiting must yield to it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, LookupError) as exc:
            last_error = exc
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}") from last_error
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def api_server(*, kuberay: bool = True,
                     keep_requests: int | None = None) -> AsyncIterator[FakeApiServer]:
    """A running FakeApiServer knowing R1Deployments (and KubeRay's types unless told not)."""
    server = FakeApiServer(keep_requests=keep_requests)
    server.resources.load_bundled()
    server.resources[R1D] = kmock.ResourceInfo(
        kind="R1Deployment", namespaced=True, verbs=VERBS, subresources={"status"},
        shortnames={"r1d"})
    if kuberay:
        server.install_kuberay()
    async with server, kmock.Server(server):
        yield server


def write_kubeconfig(path: Path, url: str) -> None:
    """A kubeconfig whose only context points at `url` (token auth, no TLS)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "test"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))


class OperatorThread:
    """`r1serve operator` in a thread with its own event loop; `async with` it in the loop that
    serves the fake API."""

    def __init__(self, *argv: str) -> None:
        from r1serve.operator.main import run_operator

        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(run_operator(
            ["--liveness", "", *argv], stop_flag=self.stop_flag, ready_flag=self.ready_flag)),
            daemon=True)

    async def __aenter__(self) -> Self:
        self.thread.start()
        # kopf is ready once it has logged in and started watching; the API server lives in
        # this event loop, so the wait must not block it.
        await eventually(self.ready_flag.is_set, message="the operator to start")
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "the operator did not stop"
        assert self.result == [0]
