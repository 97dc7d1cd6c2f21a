"""The operator's ClusterRole grants what the operator calls, and nothing it never calls.

Every request the operator makes against the in-process API during a full life cycle (create, KubeRay
status naming a RayCluster, an update of the worker bounds, a RayService and a Service deleted by hand, restart,
delete) is reduced to (group, resource, verb) and compared with the generated rules.
"""

import copy
from pathlib import Path

import pytest
import yaml

from r1serve.operator.manifests import build_rbac

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

TINY = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml").read_text())
R1D_URL = "/apis/r1serve.io/v1alpha1/namespaces/default/r1deployments"
RS_URL = "/apis/ray.io/v1/namespaces/default/rayservices"
RC_URL = "/apis/ray.io/v1/namespaces/default/rayclusters"
RAYSERVICES, SERVICES, R1D = "ray.io/v1/rayservices", "v1/services", "r1serve.io/v1alpha1/r1deployments"
RAYCLUSTERS = "ray.io/v1/rayclusters"
# Calls the test itself makes while playing user and KubeRay: marked with this header.
TEST_CLIENT = {"X-Test-Client": "1"}
# Verbs granted for API discovery / verbs a client may use that a test run need not exercise.
MAY_BE_UNUSED = {
    # kopf lists and watches namespaces only under --namespace globs; tests run cluster-wide
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
    # server-side apply of an absent object needs create; the call itself is a PATCH
    ("ray.io", "rayservices", "create"), ("", "services", "create"),
    # the expert load is written once Serve replicas report it, which the in-process API has none to do
    # (tests/cluster/test_operator_server.py writes it with the operator's own ServiceAccount)
    ("", "configmaps", "get"), ("", "configmaps", "create"), ("", "configmaps", "patch"),
}


def granted() -> set[tuple[str, str, str]]:
    [role] = [obj for obj in build_rbac() if obj["kind"] == "ClusterRole"]
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def verb(request) -> str:
    action, method = request.action.value.lower(), request.method.value
    if action == "watch" or (action == "list" and str(request.params.get("watch", "")).lower() in ("true", "1")):
        return "watch"
    return {"list": "list", "fetch": "get", "create": "create", "delete": "delete"}.get(
        action, "patch" if method == "PATCH" else "update")


def used(kube) -> set[tuple[str, str, str]]:
    calls = set()
    for request in kube:
        if request.resource is None or not request.resource.plural or request.action is None \
                or request.headers.get("X-Test-Client"):
            continue
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        calls.add((request.resource.group or "", resource, verb(request)))
    return calls


async def test_role_matches_the_calls_the_operator_makes(kube, operator_thread, wait_for, reliability,
                                                         kuberay_world):
    merge = {"Content-Type": "application/merge-patch+json", **TEST_CLIENT}

    async def life_cycle():
        response = await kube.post(R1D_URL, json=copy.deepcopy(TINY), headers=TEST_CLIENT)
        assert response.status in (200, 201)
        await wait_for(lambda: kube.live(SERVICES, "default", "tiny"), message="the Service")
        await wait_for(lambda: (kube.live(R1D, "default", "tiny").get("status") or {}).get("phase"),
                       message="a status")
        # Play KubeRay: an active RayCluster, whose bounds the update below must reach.
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                   "metadata": {"name": "tiny-abcde", "namespace": "default"},
                   "spec": kube.live(RAYSERVICES, "default", "tiny")["spec"]["rayClusterConfig"]}
        response = await kube.post(RC_URL, json=copy.deepcopy(cluster), headers=TEST_CLIENT)
        assert response.status in (200, 201)
        response = await kube.patch(f"{RS_URL}/tiny/status", json={"status": kuberay_world.status(
            "RUNNING", cluster="tiny-abcde")}, headers=merge)
        assert response.status == 200
        patch = {"spec": {"decode": {"replicas": {"min": 1, "max": 3}}}}
        response = await kube.patch(f"{R1D_URL}/tiny", json=patch, headers=merge)
        assert response.status == 200
        await wait_for(lambda: kube.live(RAYSERVICES, "default", "tiny")["spec"]["rayClusterConfig"][
            "workerGroupSpecs"][1]["maxReplicas"] == 3, message="the update")
        await wait_for(lambda: kube.live(RAYCLUSTERS, "default", "tiny-abcde")["spec"][
            "workerGroupSpecs"][1]["maxReplicas"] == 3, message="the bounds in the RayCluster")
        response = await kube.delete(f"{RS_URL}/tiny", headers=TEST_CLIENT)
        assert response.status == 200
        await wait_for(lambda: kube.live(RAYSERVICES, "default", "tiny"), message="the RayService back")
        response = await kube.delete("/api/v1/namespaces/default/services/tiny", headers=TEST_CLIENT)
        assert response.status == 200
        await wait_for(lambda: kube.live(SERVICES, "default", "tiny"), message="the Service back")

    async with operator_thread():
        await life_cycle()
    async with operator_thread():  # a restart: relists everything
        await wait_for(lambda: kube.live(RAYSERVICES, "default", "tiny"), message="steady")
        response = await kube.delete(f"{R1D_URL}/tiny", headers=TEST_CLIENT)
        assert response.status == 200
        await wait_for(lambda: kube.live(R1D, "default", "tiny") is None, message="the R1Deployment gone")

    calls, rules = used(kube), granted()
    missing, unused = calls - rules, rules - calls - MAY_BE_UNUSED
    reliability("access-operator-rbac", "access", what="every API request the operator made over a life cycle "
                "(create, status naming a RayCluster, update of its bounds, RayService and Service deleted by "
                "hand, restart, delete), as "
                f"(group, resource, verb), against its ClusterRole's {len(rules)} grants", requests=len(calls),
                failed=len(missing) + len(unused),
                failures=f"missing {sorted(missing)}, unused {sorted(unused)}" if missing or unused else
                f"none: {len(calls)} distinct calls, all granted; {len(rules - calls)} grants unused by design "
                "(discovery and first-apply create)")
    assert calls - rules == set(), "the operator calls what its role does not grant"
    assert rules - calls - MAY_BE_UNUSED == set(), "the role grants what the operator never calls"
