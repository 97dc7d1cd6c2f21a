"""Test doubles of the operator, like kopf.testing: an in-process Kubernetes API server, the operator in a
thread or a process.

Needs the `test` extra (kmock). Used by tests/operator and benchmarks/operator.py; not part of the product.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml

APPLY = "application/apply-patch+yaml"
JSON_PATCH = "application/json-patch+json"
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


def merge_diff(before: Any, after: Any) -> Any:
    """The RFC 7386 merge patch that turns `before` into `after` (lists are replaced whole)."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return after
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        if key not in before or before[key] != value:
            patch[key] = merge_diff(before.get(key), value)
    return patch


@attrs.frozen
class PatchRefused(kmock.KubernetesError):
    """What the API server answers to a JSON patch it cannot apply, a failed `test` included."""

    status: int = 422
    reason: str = "Invalid"
    message: str = "the JSON patch could not be applied"


def _is_apply(request: kmock.Request) -> bool:
    return request.headers.get("Content-Type", "").startswith(APPLY)


def _without_version(obj: dict) -> dict:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


@attrs.define(eq=False)
class Hold:
    """One API request stopped on its way into the FakeApiServer until the test lets it through or
    drops it; `reached` is set once the request arrived: the way to kill the operator in a chosen call."""

    matches: Callable[[kmock.Request], bool]
    reached: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    request: kmock.Request | None = attrs.field(default=None, init=False)
    _let_go: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _dropped: bool = attrs.field(default=False, init=False)
    task: asyncio.Future | None = attrs.field(default=None, init=False)  # serving it, shielded

    def release(self) -> None:
        """Serve the request: it had reached the server before its client died."""
        self._let_go.set()

    def drop(self) -> None:
        """Answer 503 without serving it: the request never got through."""
        self._dropped = True
        self._let_go.set()

    async def wait(self, timeout: float = 60.0) -> kmock.Request:
        """The held request, once it has arrived."""
        try:
            await asyncio.wait_for(self.reached.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for the held request") from None
        assert self.request is not None
        return self.request


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
    - a JSON patch (RFC 6902) is applied as such, and one that fails (a `test` included) answers 422;
    - the status subresource: /status writes only status, the main resource never does;
    - the garbage collector: deleting an owner deletes the objects that reference its uid, and an
      object written while all its owners are gone is deleted at once;
    - `hold()` stops a chosen request until the test releases or drops it.
    """

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    # (resource, namespace, name) -> time.monotonic() of the first creation: benchmarks read it.
    created_at: dict[tuple[str, str | None, str], float] = attrs.field(factory=dict, init=False)
    # Long runs keep only the latest `keep_requests` requests for assertions (kmock keeps all),
    # counting every one in `request_count`.
    keep_requests: int | None = None
    request_count: int = attrs.field(default=0, init=False)
    # uid -> key of the object stamped with it, for the garbage collector's owner look-ups.
    _uids: dict[str, tuple[Any, str | None, str | None]] = attrs.field(factory=dict, init=False)
    _holds: list[Hold] = attrs.field(factory=list, init=False)
    _all_holds: list[Hold] = attrs.field(factory=list, init=False)

    def hold(self, resource: str, method: str, *, name: str | None = None,
             subresource: str | None = None,
             where: Callable[[kmock.Request], bool] | None = None) -> Hold:
        """Stop the next request with this method on this resource (and name, subresource,
        `where(request)` when given) until the returned Hold is released or dropped."""
        wanted = kmock.resource(resource)
        held = Hold(lambda r: r.resource == wanted and r.method.value == method.upper()
                    and (name is None or r.name == name) and r.subresource == subresource
                    and (where is None or where(r)))
        self._holds.append(held)
        self._all_holds.append(held)
        return held

    def drop_holds(self) -> None:
        """Drop every held request and stop holding (a server shutting down must not wait on them)."""
        self._holds.clear()
        for held in self._all_holds:
            held.drop()

    async def _serve_held(self, held: Hold, request: kmock.Request) -> Any:
        held.request = request
        held.reached.set()
        await held._let_go.wait()
        if held._dropped:
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                 "reason": "ServiceUnavailable", "code": 503}, status=503)
        return await self._serve(request)

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
        held = next((h for h in self._holds if h.matches(request)), None)
        if held is None:
            return await self._serve(request)
        self._holds.remove(held)
        # A real API server finishes a request it has received even when its client is gone, but
        # aiohttp's test server cancels the handler on disconnect: shield it.
        held.task = asyncio.ensure_future(self._serve_held(held, request))
        return await asyncio.shield(held.task)

    async def _serve(self, request: kmock.Request) -> Any:
        if self.keep_requests and len(self._requests) > 2 * self.keep_requests:
            del self._requests[:-self.keep_requests]
        resource = request.resource
        if resource is not None and resource.plural and request.action is not None \
                and resource not in self.resources:
            raise kmock.KubernetesResourceNotFoundError()
        if request.action == kmock.action.UPDATE \
                and request.headers.get("Content-Type", "").startswith(JSON_PATCH):
            # kmock merges every PATCH body: hand it the merge patch with the same result.
            request = self._as_merge_patch(request)
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
        elif request.action in (kmock.action.CREATE, kmock.action.UPDATE) \
                and request.subresource is None:
            await self._collect_if_orphaned(request)
        return response

    def _as_merge_patch(self, request: kmock.Request) -> kmock.Request:
        current = self._current(request)
        if current is None:
            raise kmock.KubernetesObjectNotFoundError()
        try:
            after = jsonpatch.apply_patch(current, request.data)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise PatchRefused(message=f"the JSON patch could not be applied: {exc}") from None
        return attrs.evolve(request, data=merge_diff(current, after))

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
        await self._collect_if_orphaned(request)
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
        uid = str(uuid.uuid4())
        self._uids[uid] = (resource, namespace or meta.get("namespace"), meta.get("name"))
        meta.update(uid=uid, resourceVersion=str(next(self._versions)),
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

    def _uid_live(self, uid: str | None) -> bool:
        key = self._uids.get(uid or "")
        if key is None or key not in self.objects or self.objects[key].deleted:
            return False
        return self.objects[key].get("metadata", {}).get("uid") == uid

    async def _collect_if_orphaned(self, request: kmock.Request) -> None:
        # A write that lands after its owner's deletion (say, from an operator killed mid-call)
        # leaves a dangling owner reference; Kubernetes' garbage collector deletes such objects.
        current = self._current(request)
        refs = ((current or {}).get("metadata") or {}).get("ownerReferences") or []
        if not refs or any(self._uid_live(ref.get("uid")) for ref in refs):
            return
        async with self._lock:
            obj = self.objects[(request.resource, request.namespace, request.name)]
            raw = obj.raw
            obj.delete()
            await self._buses[request.resource].put({"type": "DELETED", "object": raw})
        await self._collect_garbage(raw["metadata"].get("uid"))

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
        try:
            yield server
        finally:
            server.drop_holds()


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


class OperatorProcess:
    """`python -m r1serve.operator` in a child process against a FakeApiServer (served over HTTP),
    as in its pod: unlike a thread, it can be SIGKILLed in the middle of an API call."""

    def __init__(self, server: FakeApiServer, workdir: Path, *argv: str) -> None:
        self.server, self.workdir, self.argv = server, workdir, argv
        self.process: asyncio.subprocess.Process | None = None
        self.log = workdir / f"operator-{id(self):x}.log"

    def _watches(self) -> int:
        kinds = {kmock.resource(R1D), kmock.resource(RAYSERVICES)}
        return sum(1 for r in self.server if r.action == kmock.action.WATCH and r.resource in kinds)

    async def start(self, timeout: float = 120.0) -> Self:
        """Start it and wait until it watches R1Deployments and RayServices."""
        kubeconfig = self.workdir / "kubeconfig"
        write_kubeconfig(kubeconfig, str(self.server.url).rstrip("/"))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONSAFEPATH": "1"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        before = self._watches()
        with self.log.open("a") as log:
            # cwd away from the repository root, whose operator/ would shadow the stdlib.
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "r1serve.operator", "--liveness", "", *self.argv,
                env=env, cwd=self.workdir, stdout=log, stderr=asyncio.subprocess.STDOUT)
        await eventually(lambda: self._watches() >= before + 2 or self.process.returncode is not None,
                         timeout=timeout, message="the operator process to watch")
        assert self.process.returncode is None, f"the operator exited:\n{self.log_tail()}"
        return self

    async def kill(self) -> None:
        """SIGKILL: no clean-up, no goodbye to the API server, requests in flight cut off."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            await self.process.wait()

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (kopf says goodbye through the API, served by this event loop)."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                await self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) \
            if self.log.exists() else ""

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
