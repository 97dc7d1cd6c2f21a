"""The operator against an in-process Kubernetes API: create, update, status, delete, restart, no KubeRay."""

import asyncio
import copy
import logging
from pathlib import Path

import pytest
import yaml

from r1serve.spec import load_r1deployment
from r1serve.spec.serve_config import serve_config_yaml

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
R1D, RAYSERVICES, SERVICES = "r1serve.io/v1alpha1/r1deployments", "ray.io/v1/rayservices", "v1/services"
RAYCLUSTERS = "ray.io/v1/rayclusters"
R1D_URL = "/apis/r1serve.io/v1alpha1/namespaces/default/r1deployments"
RS_URL = "/apis/ray.io/v1/namespaces/default/rayservices"


async def _create(kube, doc=None) -> dict:
    response = await kube.post(R1D_URL, json=copy.deepcopy(doc or TINY))
    assert response.status in (200, 201), await response.text()
    return await response.json()


def _r1d(kube, name="tiny") -> dict:
    return kube.live(R1D, "default", name) or {}


def _phase(kube, name="tiny") -> str | None:
    return (_r1d(kube, name).get("status") or {}).get("phase")


def _reasons(kube, name="tiny") -> list[str]:
    return [e["reason"] for e in kube.events_for(name)]


async def _created(kube, wait_for) -> dict:
    """Wait for the children and the first status of tiny; return the RayService."""
    await wait_for(lambda: kube.live(SERVICES, "default", "tiny"), message="the Service")
    await wait_for(lambda: _phase(kube) == "Pending", message="phase Pending")
    await wait_for(lambda: "Created" in _reasons(kube), message="the Created event")
    return kube.live(RAYSERVICES, "default", "tiny")


async def test_create_applies_owned_children(kube, operator_thread, wait_for):
    async with operator_thread():
        owner = await _create(kube)
        rayservice = await _created(kube, wait_for)
    service = kube.live(SERVICES, "default", "tiny")
    for child in (rayservice, service):
        [ref] = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "R1Deployment", "tiny", owner["metadata"]["uid"], True)
    assert rayservice["spec"]["serveConfigV2"] == serve_config_yaml(load_r1deployment(TINY))
    assert [p["port"] for p in service["spec"]["ports"]] == [9000, 8000]
    status = _r1d(kube)["status"]
    assert status["observedGeneration"] == 1
    assert status["endpoints"]["grpc"] == "tiny.default.svc:9000"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "False", "Progressing": "True", "Degraded": "False"}
    # Reconcile and the RayService watch both refresh the status; the event is posted once.
    assert _reasons(kube).count("Pending") == 1 and _reasons(kube).count("Created") == 1


async def test_update_patches_children_in_place(kube, operator_thread, wait_for):
    async with operator_thread():
        await _create(kube)
        before = await _created(kube, wait_for)
        patch = {"spec": {"decode": {"replicas": {"min": 1, "max": 3}},
                          "api": {"grpcPort": 9100, "httpPort": 8000}}}
        response = await kube.patch(f"{R1D_URL}/tiny", json=patch,
                                    headers={"Content-Type": "application/merge-patch+json"})
        assert response.status == 200
        await wait_for(lambda: kube.live(RAYSERVICES, "default", "tiny")["spec"][
            "rayClusterConfig"]["workerGroupSpecs"][1]["maxReplicas"] == 3, message="new bounds")
        await wait_for(lambda: _r1d(kube)["status"]["observedGeneration"] == 2,
                       message="observedGeneration 2")
        await wait_for(lambda: "Updated" in _reasons(kube), message="the Updated event")
        await wait_for(lambda: [p["port"] for p in kube.live(SERVICES, "default", "tiny")[
            "spec"]["ports"]] == [9100, 8000], message="the new gRPC port on the Service")
    after = kube.live(RAYSERVICES, "default", "tiny")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert "port: 9100" in after["spec"]["serveConfigV2"]
    assert after["metadata"]["annotations"]["r1serve.io/source-generation"] == "2"
    # Patched, never deleted and re-created: KubeRay rolls the change out itself.
    assert kube.calls(RAYSERVICES, "DELETE") == [] and kube.calls(SERVICES, "DELETE") == []
    assert kube.calls(RAYSERVICES, "POST") == []


def _child_versions(kube) -> dict:
    """resourceVersion of the RayService and the Service: unchanged means nothing was written."""
    return {key: kube.live(key, "default", "tiny")["metadata"]["resourceVersion"]
            for key in (RAYSERVICES, SERVICES)}


async def test_metadata_edit_applies_nothing_new_and_announces_nothing(kube, operator_thread,
                                                                       wait_for):
    async with operator_thread():
        await _create(kube)
        await _created(kube, wait_for)
        versions = _child_versions(kube)
        applies = len(kube.calls(RAYSERVICES, "PATCH"))
        edit = {"metadata": {"annotations": {"foo": "bar"}, "labels": {"team": "search"}}}
        await kube.patch(f"{R1D_URL}/tiny", json=edit,
                         headers={"Content-Type": "application/merge-patch+json"})
        # kopf reconciles a metadata edit too; re-applying the children changes nothing.
        await wait_for(lambda: len(kube.calls(RAYSERVICES, "PATCH")) > applies,
                       message="the reconcile of the metadata edit")
        assert _child_versions(kube) == versions
        # Events are posted in order: once the spec change's event is there, the edit's would be.
        await kube.patch(f"{R1D_URL}/tiny", json={"spec": {"decode": {"replicas": {"max": 3}}}},
                         headers={"Content-Type": "application/merge-patch+json"})
        await wait_for(lambda: "Updated" in _reasons(kube), message="the spec change's event")
    assert [e["message"] for e in kube.events_for("tiny") if e["reason"] == "Updated"] == [
        "applied generation 2; KubeRay rolls it out"]


async def test_a_rayservice_nobody_answers_names_kuberay(kube, operator_thread, wait_for,
                                                        monkeypatch):
    from r1serve.operator import status

    # The RayService CRD is there but no KubeRay controller writes its status.
    monkeypatch.setattr(status, "RAYSERVICE_SILENCE_S", 2.0)
    async with operator_thread():
        await _create(kube)
        await _created(kube, wait_for)
        # No event arrives after the RayService's creation: the operator must look again itself.
        await wait_for(lambda: "KubeRayNotResponding" in _reasons(kube), timeout=20,
                       message="the warning naming KubeRay")
    [ready] = [c for c in _r1d(kube)["status"]["conditions"] if c["type"] == "Ready"]
    assert (ready["reason"], ready["message"]) == (
        "KubeRayNotResponding",
        "the RayService has had no status for 2 s: is the KubeRay operator running?")
    assert _phase(kube) == "Pending"


async def test_rayservice_status_drives_r1deployment_status(kube, operator_thread, wait_for,
                                                          kuberay_world):
    async with operator_thread():
        await _create(kube)
        await _created(kube, wait_for)
        # Play KubeRay: a cluster with its worker pods, then a running application.
        cluster = "tiny-abcde"
        await kube.post("/apis/ray.io/v1/namespaces/default/rayclusters", json={
            "apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": cluster, "namespace": "default"},
            "spec": {"workerGroupSpecs": [{"groupName": "prefill", "replicas": 1},
                                          {"groupName": "decode", "replicas": 2}]}})
        for pod in kuberay_world.pods(cluster, "prefill", 1, 1) + kuberay_world.pods(
                cluster, "decode", 2, 2):
            await kube.post("/api/v1/namespaces/default/pods", json=pod)
        await kube.patch(f"{RS_URL}/tiny/status", json={"status": {
            **kuberay_world.status("RUNNING", cluster=cluster), "observedGeneration": 1}},
            headers={"Content-Type": "application/merge-patch+json"})
        await wait_for(lambda: _phase(kube) == "Ready", message="phase Ready")
        status = _r1d(kube)["status"]
        assert (status["prefill"]["summary"], status["decode"]["summary"]) == ("1/1", "2/2")
        await wait_for(lambda: "Ready" in _reasons(kube), message="the Ready event")

        await kube.patch(f"{RS_URL}/tiny/status", json={"status": kuberay_world.status(
            "RUNNING", cluster=cluster, deployments={"Ingress": "HEALTHY",
                                                     "PrefillServer": "HEALTHY",
                                                     "DecodeServer": "UNHEALTHY"})},
            headers={"Content-Type": "application/merge-patch+json"})
        await wait_for(lambda: _phase(kube) == "Degraded", message="phase Degraded")
        await wait_for(lambda: "Unhealthy" in _reasons(kube), message="the warning event")
    [warning] = [e for e in kube.events_for("tiny") if e["reason"] == "Unhealthy"]
    assert warning["type"] == "Warning" and "DecodeServer: UNHEALTHY" in warning["message"]


def _bounds(raycluster: dict | None) -> dict:
    return {g["groupName"]: (g["replicas"], g["minReplicas"], g["maxReplicas"])
            for g in (raycluster or {}).get("spec", {}).get("workerGroupSpecs", [])}


async def _play_kuberay(kube, rayservice: dict, cluster: str, status: dict) -> dict:
    """Play KubeRay: a RayCluster built from the RayService as it is, and a RayService status
    naming it; returns the cluster's spec."""
    spec = copy.deepcopy(rayservice["spec"]["rayClusterConfig"])
    await kube.post("/apis/ray.io/v1/namespaces/default/rayclusters", json={
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": cluster, "namespace": "default"}, "spec": copy.deepcopy(spec)})
    await kube.patch(f"{RS_URL}/tiny/status", json={"status": status},
                     headers={"Content-Type": "application/merge-patch+json"})
    return spec


async def test_new_bounds_reach_the_active_raycluster(kube, operator_thread, wait_for, kuberay_world):
    """KubeRay 1.7 leaves a running cluster's worker bounds as they were; the operator patches
    them in, once the cluster is active and no other is pending."""
    merge, cluster = {"Content-Type": "application/merge-patch+json"}, "tiny-abcde"

    async def edit(spec: dict) -> None:
        response = await kube.patch(f"{R1D_URL}/tiny", json={"spec": spec}, headers=merge)
        assert response.status == 200

    async with operator_thread():
        await _create(kube)
        rayservice = await _created(kube, wait_for)
        # The cluster still pending (first deploy).
        await _play_kuberay(kube, rayservice, cluster, kuberay_world.status(
            "DEPLOYING", cluster=cluster, pending=True))
        await edit({"prefill": {"replicas": {"max": 2}}})
        await wait_for(lambda: "Updated" in _reasons(kube), message="the first edit applied")
        assert _bounds(kube.live(RAYCLUSTERS, "default", cluster))["prefill"] == (1, 1, 1)

        # Active now: the RayService's event brings the bounds of the first edit.
        await kube.patch(f"{RS_URL}/tiny/status", json={"status": {
            **kuberay_world.status("RUNNING", cluster=cluster), "pendingServiceStatus": None}},
            headers=merge)
        await wait_for(lambda: _bounds(kube.live(RAYCLUSTERS, "default", cluster))["prefill"] ==
                       (1, 1, 2), message="the bounds once the cluster is active")
        # While it is active, a reconcile brings them at once.
        await edit({"prefill": {"replicas": {"max": 3}}, "decode": {"replicas": {"min": 2, "max": 4}}})
        await wait_for(lambda: _bounds(kube.live(RAYCLUSTERS, "default", cluster)) == {
            "prefill": (1, 1, 3), "decode": (1, 2, 4)}, message="the bounds of the second edit")
        await wait_for(lambda: _reasons(kube).count("WorkerBoundsApplied") == 2,
                       message="an event per patch")
    assert [e["message"] for e in kube.events_for("tiny") if e["reason"] == "WorkerBoundsApplied"] == [
        f"worker pod bounds of RayCluster {cluster}: prefill 1..1 -> 1..2",
        f"worker pod bounds of RayCluster {cluster}: prefill 1..2 -> 1..3; decode 1..2 -> 2..4"]
    [first, second] = [r.data for r in kube.calls(RAYCLUSTERS, "PATCH")]
    assert first[0] == {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "prefill"}
    assert second[3] == {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "decode"}


async def test_bounds_of_a_cluster_about_to_be_replaced_are_left_alone(kube, operator_thread, wait_for,
                                                                       kuberay_world):
    """An image change with replicas.min: KubeRay builds a new cluster with the new bounds; the
    one it replaces must not grow to them meanwhile (it has no pending cluster yet)."""
    merge, cluster = {"Content-Type": "application/merge-patch+json"}, "tiny-abcde"
    async with operator_thread():
        await _create(kube)
        rayservice = await _created(kube, wait_for)
        await _play_kuberay(kube, rayservice, cluster, kuberay_world.status("RUNNING", cluster=cluster))
        before = _bounds(kube.live(RAYCLUSTERS, "default", cluster))
        await kube.patch(f"{R1D_URL}/tiny", json={"spec": {
            "workers": {"image": "example.com/r1serve:next"},
            "decode": {"replicas": {"min": 2, "max": 4}}}}, headers=merge)
        # Reconcile looks at the bounds before it announces the update.
        await wait_for(lambda: "Updated" in _reasons(kube), message="the edit applied")
        assert kube.live(RAYSERVICES, "default", "tiny")["spec"]["rayClusterConfig"][
            "workerGroupSpecs"][-1]["maxReplicas"] != before["decode"][2]
    assert _bounds(kube.live(RAYCLUSTERS, "default", cluster)) == before
    assert "WorkerBoundsApplied" not in _reasons(kube)
    assert kube.calls(RAYCLUSTERS, "PATCH") == []


async def test_bounds_of_a_worker_list_that_moved_are_refused_then_retried(kube, operator_thread, wait_for,
                                                                          kuberay_world, caplog):
    merge, cluster = {"Content-Type": "application/merge-patch+json"}, "tiny-abcde"
    async with operator_thread():
        await _create(kube)
        rayservice = await _created(kube, wait_for)
        spec = await _play_kuberay(kube, rayservice, cluster,
                                   kuberay_world.status("RUNNING", cluster=cluster))
        held = kube.hold(RAYCLUSTERS, "PATCH", name=cluster)
        await kube.patch(f"{R1D_URL}/tiny", json={"spec": {"prefill": {"replicas": {"max": 3}}}},
                         headers=merge)
        await held.wait()
        # The worker groups change places between the operator's read and its patch.
        moved = {"workerGroupSpecs": spec["workerGroupSpecs"][::-1]}
        await kube.patch(f"/apis/ray.io/v1/namespaces/default/rayclusters/{cluster}",
                         json={"spec": moved}, headers=merge)
        held.release()
        # Refused (422); the other look after the apply (reconcile's or the RayService event's,
        # whichever came second) reads the list as it is now.
        await wait_for(lambda: _bounds(kube.live(RAYCLUSTERS, "default", cluster))["prefill"] ==
                       (1, 1, 3), message="the bounds after the refusal")
        await wait_for(lambda: "WorkerBoundsApplied" in _reasons(kube), message="the event")
    assert [r.data[0]["path"] for r in kube.calls(RAYCLUSTERS, "PATCH") if isinstance(r.data, list)] == [
        "/spec/workerGroupSpecs/0/groupName", "/spec/workerGroupSpecs/1/groupName"]
    assert _reasons(kube).count("WorkerBoundsApplied") == 1
    # The refusal is no handler failure (kopf would log one as an error and retry the reconcile).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_delete_leaves_nothing(kube, operator_thread, wait_for):
    async with operator_thread():
        await _create(kube)
        await _created(kube, wait_for)
        response = await kube.delete(f"{R1D_URL}/tiny")
        assert response.status == 200
        await wait_for(lambda: not _r1d(kube), message="the R1Deployment to go")
        await wait_for(lambda: kube.all_live(RAYSERVICES) == [] and
                       kube.all_live(SERVICES) == [], message="the children to go")
    # No finalizer of ours held the deletion up.
    assert not kube.calls(R1D, "PATCH") or all(
        "finalizers" not in (r.data or {}).get("metadata", {}) for r in kube.calls(R1D, "PATCH"))


async def test_restart_duplicates_nothing_and_changes_nothing(kube, operator_thread, wait_for):
    async with operator_thread():
        await _create(kube)
        await _created(kube, wait_for)
    versions = _child_versions(kube)
    applies = len(kube.calls(RAYSERVICES, "PATCH"))
    async with operator_thread():
        # The resumed reconcile re-applies every child once more ...
        await wait_for(lambda: len(kube.calls(RAYSERVICES, "PATCH")) > applies and
                       len(kube.calls(SERVICES, "PATCH")) >= 2, message="the resume")
    # ... which changes nothing and creates nothing.
    assert len(kube.all_live(RAYSERVICES)) == 1 and len(kube.all_live(SERVICES)) == 1
    assert _child_versions(kube) == versions
    assert _reasons(kube).count("Created") == 1 and "Updated" not in _reasons(kube)
    assert kube.calls(RAYSERVICES, "POST") == [] and kube.calls(RAYSERVICES, "DELETE") == []


async def test_rayservice_deleted_by_hand_comes_back(kube, operator_thread, wait_for):
    async with operator_thread():
        await _create(kube)
        before = await _created(kube, wait_for)
        await kube.delete(f"{RS_URL}/tiny")
        await wait_for(lambda: (kube.live(RAYSERVICES, "default", "tiny") or {}).get(
            "metadata", {}).get("uid") not in (None, before["metadata"]["uid"]),
            message="a new RayService")


async def test_service_deleted_by_hand_comes_back(kube, operator_thread, wait_for):
    async with operator_thread():
        await _create(kube)
        await _created(kube, wait_for)
        before = kube.live(SERVICES, "default", "tiny")
        await kube.delete("/api/v1/namespaces/default/services/tiny")
        await wait_for(lambda: (kube.live(SERVICES, "default", "tiny") or {}).get(
            "metadata", {}).get("uid") not in (None, before["metadata"]["uid"]),
            message="a new Service")
    assert kube.live(SERVICES, "default", "tiny")["spec"] == before["spec"]


async def test_missing_kuberay_gives_a_clear_status_then_recovers(
        kube_without_kuberay, operator_thread, wait_for, monkeypatch):
    kube = kube_without_kuberay
    monkeypatch.setenv("R1SERVE_KUBERAY_RETRY_SECONDS", "0.5")
    async with operator_thread():
        await _create(kube)
        await wait_for(lambda: _phase(kube) == "Failed", message="phase Failed")
        [ready] = [c for c in _r1d(kube)["status"]["conditions"] if c["type"] == "Ready"]
        assert ready["reason"] == "KubeRayNotInstalled"
        assert "rayservices.ray.io" in ready["message"] and "KubeRay" in ready["message"]
        await wait_for(lambda: "KubeRayNotInstalled" in _reasons(kube), message="the warning")
        assert kube.live(SERVICES, "default", "tiny") is None  # nothing half-applied

        kube.install_kuberay()
        await wait_for(lambda: kube.live(RAYSERVICES, "default", "tiny"), message="the RayService")
        await wait_for(lambda: _phase(kube) == "Pending", message="recovery to Pending")
        # Desired replicas went from unknown to known: nothing scaled.
        assert "lastScaleDecision" not in _r1d(kube)["status"]
    assert _reasons(kube).count("KubeRayNotInstalled") == 1
    assert "Scaled" not in _reasons(kube)


def _replicas_inverted(spec: dict) -> None:
    spec["prefill"]["replicas"] = {"min": 3, "max": 1}


def _cuda_ipc(spec: dict) -> None:  # valid for `r1serve serve`, refused on Kubernetes
    spec["kvTransfer"] = {"connector": "cuda-ipc"}
    spec["prefill"]["gpusPerRank"] = spec["decode"]["gpusPerRank"] = 1


@pytest.mark.parametrize(("change", "field"), [(_replicas_inverted, "spec.prefill.replicas.min"),
                                               (_cuda_ipc, "spec.kvTransfer.connector: cuda-ipc works only")])
async def test_invalid_spec_past_the_crd_is_reported(kube, operator_thread, wait_for, change, field):
    doc = copy.deepcopy(TINY)
    change(doc["spec"])  # the fake server has no CRD
    async with operator_thread():
        await _create(kube, doc)
        await wait_for(lambda: _phase(kube) == "Failed", message="phase Failed")
        await wait_for(lambda: "InvalidSpec" in _reasons(kube), message="the InvalidSpec event")
    [event] = [e for e in kube.events_for("tiny") if e["reason"] == "InvalidSpec"]
    assert field in event["message"]
    assert kube.all_live(RAYSERVICES) == []


async def test_runs_under_plain_kopf_run(kube, wait_for):
    from kopf.testing import KopfRunner

    # `kopf run -m r1serve.operator.handlers` works too (settings then come from R1SERVE_* env).
    runner = KopfRunner(["run", "--all-namespaces", "--standalone",
                         "-m", "r1serve.operator.handlers"], timeout=30)
    runner.__enter__()
    try:
        await _create(kube)
        await wait_for(lambda: kube.live(SERVICES, "default", "tiny"), message="the children")
        await wait_for(lambda: _phase(kube) == "Pending", message="the status")
    finally:
        # The fake API server lives in this event loop: joining the operator's thread here (as `with runner:`
        # does) would block the server that a handler still in flight waits on, until the join times out.
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert runner.exit_code == 0
