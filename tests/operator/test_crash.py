"""The operator SIGKILLed in the middle of a reconcile, then restarted: it converges, nothing duplicated,
nothing orphaned.

The operator runs as a child process (r1serve_testing.fake_api.OperatorProcess) against the
in-process API server; `kube.hold(...)` stops a chosen API call, the test kills the operator while
that call is open, then lets the call fail (dropped: it never got through) or land (released: it
had reached the server before the kill), and starts a fresh operator.
"""

import asyncio
import copy
import itertools
import time
from pathlib import Path

import kmock
import pytest
import yaml

from r1serve.operator import render
from r1serve.operator.config import OperatorConfig
from r1serve.spec import parse_r1deployment

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
R1D, RAYSERVICES, SERVICES, EVENTS = (
    "r1serve.io/v1alpha1/r1deployments", "ray.io/v1/rayservices", "v1/services", "v1/events")
R1D_URL = "/apis/r1serve.io/v1alpha1/namespaces/default/r1deployments"
MERGE = {"Content-Type": "application/merge-patch+json"}
# The update of scenario 2: new replica bounds for the RayService, a new port for both children.
UPDATE = {"spec": {"decode": {"replicas": {"min": 1, "max": 3}},
                   "api": {"grpcPort": 9100, "httpPort": 8000}}}
CONVERGE_S = 60.0


def _document(name: str = "tiny") -> dict:
    doc = copy.deepcopy(TINY)
    doc["metadata"] = {"name": name, "namespace": "default"}
    return doc


async def _create(kube, name: str = "tiny") -> dict:
    response = await kube.post(R1D_URL, json=_document(name))
    assert response.status in (200, 201), await response.text()
    return await response.json()


def _rendered(owner: dict) -> list[dict]:
    """What the operator must have applied for this R1Deployment, as it is now."""
    meta = owner["metadata"]
    deployment = parse_r1deployment({
        "apiVersion": owner["apiVersion"], "kind": owner["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                     "labels": dict(meta.get("labels") or {})},
        "spec": owner["spec"]})
    return render.render_children(deployment, config=OperatorConfig.from_env(),
                                  owner_uid=meta["uid"], generation=meta.get("generation"))


def _audit(kube, names: list[str]) -> list[str]:
    """Every way the cluster differs from `names` fully reconciled: missing or stale children,
    duplicates, children without exactly one controller reference to their live owner, strays."""
    problems = []
    owners = {name: kube.live(R1D, "default", name) for name in names}
    problems += [f"R1Deployment {name} is missing" for name, owner in owners.items() if not owner]
    uids = {owner["metadata"]["uid"]: name for name, owner in owners.items() if owner}
    expected: dict[str, set[str]] = {RAYSERVICES: set(), SERVICES: set()}
    for owner in filter(None, owners.values()):
        for resource, want in zip((RAYSERVICES, SERVICES), _rendered(owner), strict=True):
            name = want["metadata"]["name"]
            expected[resource].add(name)
            live = kube.live(resource, "default", name)
            if live is None:
                problems.append(f"{resource} {name} is missing")
            elif live["spec"] != want["spec"]:
                problems.append(f"{resource} {name} does not match its R1Deployment's spec")
    for resource, names_wanted in expected.items():
        for child in kube.all_live(resource):
            name, refs = child["metadata"]["name"], child["metadata"].get("ownerReferences") or []
            if name not in names_wanted:
                problems.append(f"{resource} {name} is a stray (duplicate or orphan)")
            if len(refs) != 1 or not refs[0].get("controller") or uids.get(refs[0]["uid"]) != name:
                problems.append(f"{resource} {name} has owner references {refs}")
    known = {kmock.resource(r) for r in (R1D, RAYSERVICES, SERVICES, EVENTS)}
    problems += [f"unexpected {resource} {name}" for (resource, _, name), obj in kube.objects.items()
                 if resource not in known and not obj.deleted]
    return problems


def _settled(kube, names: list[str]) -> bool:
    """Children applied as rendered and the status written for the current generation."""
    for name in names:
        status = (kube.live(R1D, "default", name) or {}).get("status") or {}
        generation = kube.live(R1D, "default", name)["metadata"]["generation"]
        if status.get("phase") != "Pending" or status.get("observedGeneration") != generation:
            return False
    return not _audit(kube, names)


def _reasons(kube, name: str = "tiny") -> list[str]:
    return [e["reason"] for e in kube.events_for(name)]


def _child_writes(kube) -> list[str]:
    """Children created (POST) or deleted by anyone: the operator only ever applies (PATCH)."""
    return [f"{r.method.value} {r.url.path}" for resource in (RAYSERVICES, SERVICES)
            for method in ("POST", "DELETE") for r in kube.calls(resource, method)]


async def _kill_in(operator, held) -> None:
    """Once the operator is inside the held call, SIGKILL it."""
    await held.wait()
    await operator.kill()


async def _restart(kube, operator_process, names: list[str], wait_for) -> tuple[object, float]:
    """A fresh operator process; seconds from its start to every name settled."""
    start = time.monotonic()
    operator = await operator_process().start()
    await wait_for(lambda: _settled(kube, names), timeout=CONVERGE_S,
                   message=f"convergence after the restart: {_audit(kube, names)}")
    return operator, time.monotonic() - start


def _record(reliability, name: str, what: str, names: list[str], problems: list[str],
            recovery: float, duration: float, note: str = "") -> None:
    reliability(name, "fault", what=what, requests=len(names), failed=len(problems),
                failures="; ".join(problems) or f"none: no duplicate, orphan or stale object{note}",
                duration_s=duration, recovery_s=recovery)


async def test_killed_between_rayservice_and_service(kube, operator_process, wait_for,
                                                     reliability):
    began = time.monotonic()
    operator = await operator_process().start()
    held = kube.hold(SERVICES, "PATCH")
    owner = await _create(kube)
    await _kill_in(operator, held)
    assert kube.live(RAYSERVICES, "default", "tiny") and not kube.live(SERVICES, "default", "tiny")
    held.drop()

    restarted, recovery = await _restart(kube, operator_process, ["tiny"], wait_for)
    await wait_for(lambda: "Created" in _reasons(kube), message="the Created event")
    assert await restarted.stop() == 0, restarted.log_tail()
    problems = _audit(kube, ["tiny"]) + _child_writes(kube)
    _record(reliability, "fault-operator-killed-before-service", "operator SIGKILLed after applying "
            "the RayService, before the Service; restarted: seconds from its start to children and "
            "status settled", ["tiny"], problems, recovery, time.monotonic() - began)
    assert problems == []
    assert kube.live(R1D, "default", "tiny")["metadata"]["uid"] == owner["metadata"]["uid"]
    assert _reasons(kube).count("Created") == 1


def _kopf_record(request) -> bool:
    """kopf's own bookkeeping write, after the handler succeeded: the last handled spec."""
    annotations = ((request.data or {}).get("metadata") or {}).get("annotations") or {}
    return any(key.endswith("last-handled-configuration") for key in annotations)


UPDATE_HOLDS = {
    # RayService updated, Service not.
    "service-apply": lambda kube: kube.hold(SERVICES, "PATCH"),
    # RayService updated, the status still at generation 1 (the first status write of the update,
    # from the reconcile or from the RayService watch, whichever comes first).
    "status-patch": lambda kube: kube.hold(R1D, "PATCH", subresource="status"),
    # The handler finished; kopf had not recorded it, so the restart runs the update again.
    "kopf-record": lambda kube: kube.hold(R1D, "PATCH", where=_kopf_record),
}


def _state_at_kill(kube) -> tuple[str, list[int], int]:
    """(RayService source generation, Service ports, status.observedGeneration)."""
    rayservice = kube.live(RAYSERVICES, "default", "tiny")
    ports = [p["port"] for p in kube.live(SERVICES, "default", "tiny")["spec"]["ports"]]
    status = kube.live(R1D, "default", "tiny")["status"]
    return (rayservice["metadata"]["annotations"]["r1serve.io/source-generation"], ports,
            status["observedGeneration"])


@pytest.mark.parametrize("point", list(UPDATE_HOLDS))
async def test_killed_while_updating(kube, operator_process, wait_for, reliability, point):
    began = time.monotonic()
    operator = await operator_process().start()
    owner = await _create(kube)
    await wait_for(lambda: _settled(kube, ["tiny"]), timeout=CONVERGE_S, message="generation 1")
    await wait_for(lambda: "Created" in _reasons(kube), message="the Created event")
    await wait_for(lambda: kube.live(R1D, "default", "tiny")["metadata"].get("annotations", {}),
                   message="kopf's record of generation 1")
    held = UPDATE_HOLDS[point](kube)
    response = await kube.patch(f"{R1D_URL}/tiny", json=UPDATE, headers=MERGE)
    assert response.status == 200
    await _kill_in(operator, held)
    held.drop()
    source, ports, observed = _state_at_kill(kube)
    assert source == "2"
    if point == "service-apply":
        assert ports == [9000, 8000]
    if point == "status-patch":
        assert observed == 1
    if point == "kopf-record":
        assert (ports, observed) == ([9100, 8000], 2)
    versions = {r: kube.live(r, "default", "tiny")["metadata"]["resourceVersion"]
                for r in (RAYSERVICES, SERVICES)}

    restarted, recovery = await _restart(kube, operator_process, ["tiny"], wait_for)
    assert await restarted.stop() == 0, restarted.log_tail()
    live = kube.live(R1D, "default", "tiny")
    problems = _audit(kube, ["tiny"]) + _child_writes(kube)
    if live["status"]["observedGeneration"] != 2:
        problems.append(f"status.observedGeneration is {live['status']['observedGeneration']}")
    _record(reliability, f"fault-operator-killed-in-update-{point}", "operator SIGKILLed while "
            f"applying a spec update, held at the {point.replace('-', ' ')}; restarted: seconds from "
            "its start to the new generation settled", ["tiny"], problems, recovery,
            time.monotonic() - began)
    assert problems == []
    assert live["metadata"]["generation"] == 2
    assert [p["port"] for p in kube.live(SERVICES, "default", "tiny")["spec"]["ports"]] == [9100, 8000]
    rayservice = kube.live(RAYSERVICES, "default", "tiny")
    assert rayservice["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert rayservice["metadata"]["annotations"]["r1serve.io/source-generation"] == "2"
    if point == "kopf-record":
        # Both children were already right: the repeated update changed neither.
        assert {r: kube.live(r, "default", "tiny")["metadata"]["resourceVersion"]
                for r in versions} == versions


@pytest.mark.parametrize("landed", [False, True], ids=["dropped", "landed"])
async def test_killed_while_its_r1deployment_is_deleted(kube, operator_process, wait_for,
                                                        reliability, landed):
    """No finalizer: the garbage collector deletes the children. The operator is killed inside
    the Service apply while the R1Deployment is deleted; that apply then fails or lands late."""
    began = time.monotonic()
    operator = await operator_process().start()
    held = kube.hold(SERVICES, "PATCH")
    old = await _create(kube)
    await held.wait()
    assert (await kube.delete(f"{R1D_URL}/tiny")).status == 200
    await wait_for(lambda: not kube.live(R1D, "default", "tiny") and
                   not kube.all_live(RAYSERVICES), message="the R1Deployment and its RayService to go")
    await operator.kill()
    if landed:
        held.release()
        await wait_for(lambda: (SERVICES, "default", "tiny") in kube.created_at,
                       message="the late Service apply to land")
    else:
        held.drop()
    await wait_for(lambda: not kube.all_live(SERVICES), message="no Service left behind")

    restarted = await operator_process().start()
    start = time.monotonic()
    # The same name again: fresh children for the new uid, nothing of the old one.
    new = await _create(kube)
    await wait_for(lambda: _settled(kube, ["tiny"]), timeout=CONVERGE_S,
                   message=f"the re-created R1Deployment: {_audit(kube, ['tiny'])}")
    recovery = time.monotonic() - start
    assert await restarted.stop() == 0, restarted.log_tail()
    problems = _audit(kube, ["tiny"]) + _child_writes(kube)
    _record(reliability, f"fault-operator-killed-in-delete-{'landed' if landed else 'dropped'}",
            "operator SIGKILLed inside the Service apply while its R1Deployment was deleted (the apply "
            f"{'landed after the deletion' if landed else 'never got through'}); restarted, the same "
            "name created again: seconds to its children settled", ["tiny"], problems, recovery,
            time.monotonic() - began)
    assert problems == []
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    for resource in (RAYSERVICES, SERVICES):
        [child] = kube.all_live(resource)
        assert child["metadata"]["ownerReferences"][0]["uid"] == new["metadata"]["uid"]


async def test_killed_while_creating_several(kube, operator_process, wait_for, reliability):
    names = [f"r1-{i}" for i in range(5)]
    began = time.monotonic()
    operator = await operator_process().start()
    # The third Service apply: two objects done (or more: others run on), one half-done.
    applies = itertools.count()
    held = kube.hold(SERVICES, "PATCH", where=lambda _: next(applies) == 2)
    created = await asyncio.gather(*(_create(kube, name) for name in names))
    await _kill_in(operator, held)
    half_done = sorted(n for n in names if kube.live(RAYSERVICES, "default", n)
                       and not kube.live(SERVICES, "default", n))
    done = sum(1 for n in names if kube.live(SERVICES, "default", n))
    held.drop()

    restarted, recovery = await _restart(kube, operator_process, names, wait_for)
    assert await restarted.stop() == 0, restarted.log_tail()
    problems = _audit(kube, names) + _child_writes(kube)
    repeated = sum(max(0, _reasons(kube, n).count("Created") - 1) for n in names)
    _record(reliability, "fault-operator-killed-creating-5", f"operator SIGKILLed while creating "
            f"{len(names)} R1Deployments ({done} with both children, {len(half_done)} with a "
            "RayService but no Service yet); "
            "restarted: seconds from its start to all settled", names, problems, recovery,
            time.monotonic() - began,
            note=f"; {repeated} Created events posted twice (at-least-once)" if repeated else "")
    assert problems == []
    assert len(half_done) >= 1 and done >= 2
    for owner in created:
        name = owner["metadata"]["name"]
        for resource in (RAYSERVICES, SERVICES):
            assert kube.live(resource, "default", name)["metadata"]["ownerReferences"][0][
                "uid"] == owner["metadata"]["uid"]
