"""The operator as a real process on a real API server, signed in as the ServiceAccount of manifests/rbac.yaml:
owned children that KubeRay's CRDs accept, updates followed, deleted children re-created, SIGKILL survived,
nothing left after deletion."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from r1serve.operator.manifests import NAMESPACE

from .conftest import ROOT, eventually
from .operator_process import Operator, service_account_token

R1D = ("r1serve.io", "v1alpha1")
RAY = ("ray.io", "v1")
MANAGED = "app.kubernetes.io/managed-by=r1serve-operator"

# Each runs the operator as a process against the real server: seconds, not milliseconds.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def operator_token(cluster, operator_install) -> str:
    """A token of the operator's ServiceAccount, as the kubelet would mount it into its pod."""
    return service_account_token(cluster, NAMESPACE, "r1serve-operator")


@pytest.fixture(scope="module")
def operator(cluster, operator_token, kuberay_installed, tmp_path_factory) -> Iterator[Operator]:
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = cluster.plane.token_kubeconfig(workdir / "kubeconfig", operator_token)
    process = Operator(kubeconfig, workdir).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def namespace(cluster) -> str:
    return cluster.new_namespace("op")


def _tiny(namespace: str, name: str) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    return doc


def _get(cluster, group_version, namespace, plural, name):
    try:
        return cluster.custom.get_namespaced_custom_object(*group_version, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _children(cluster, namespace: str) -> tuple[list, list]:
    rayservices = cluster.custom.list_namespaced_custom_object(
        *RAY, namespace, "rayservices", label_selector=MANAGED)["items"]
    services = cluster.core.list_namespaced_service(namespace, label_selector=MANAGED).items
    return rayservices, services


def _children_of(cluster, namespace: str, name: str) -> tuple[list, list]:
    rayservices, services = _children(cluster, namespace)
    return ([r for r in rayservices if r["metadata"]["name"] == name],
            [s for s in services if s.metadata.name == name])


def _wait_for_rayservice(cluster, operator, namespace, name, check=lambda rs: True, what="") -> dict:
    def ready():
        assert operator.alive(), f"the operator exited:\n{operator.tail()}"
        rayservice = _get(cluster, RAY, namespace, "rayservices", name)
        return rayservice if rayservice is not None and check(rayservice) else None
    return eventually(ready, timeout=60, message=f"RayService {name} {what}")


def _worker_group(rayservice: dict, role: str) -> dict:
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return next(group for group in groups if group["groupName"] == role)


@pytest.fixture(scope="module")
def tiny(cluster, operator, namespace) -> dict:
    """The R1Deployment the tests below share, its children created; each test sets what it
    needs (absolute values), so any one runs alone or in any order."""
    return cluster.custom.create_namespaced_custom_object(
        *R1D, namespace, "r1deployments", _tiny(namespace, "tiny"))


def _edit_spec(cluster, namespace: str, name: str, change) -> int:
    """Apply `change(spec)` to the live R1Deployment's spec; returns its new generation.

    A merge patch of the spec, as `kubectl patch` sends it: a full replace would race the
    operator's own writes (status, kopf's annotations) and fail with 409 Conflict.
    """
    spec = _get(cluster, R1D, namespace, "r1deployments", name)["spec"]
    change(spec)
    patched = cluster.custom.patch_namespaced_custom_object(
        *R1D, namespace, "r1deployments", name, {"spec": spec},
        _content_type="application/merge-patch+json")
    return patched["metadata"]["generation"]


def test_the_operator_creates_owned_children_that_kuberay_accepts(cluster, operator, namespace, tiny):
    owner = tiny
    rayservice = _wait_for_rayservice(cluster, operator, namespace, "tiny", what="to be created")
    [reference] = rayservice["metadata"]["ownerReferences"]
    assert (reference["kind"], reference["uid"], reference["controller"]) == (
        "R1Deployment", owner["metadata"]["uid"], True)
    service = eventually(lambda: _children_of(cluster, namespace, "tiny")[1],
                         message="the client Service")
    assert service[0].metadata.owner_references[0].uid == owner["metadata"]["uid"]
    # No KubeRay controller runs: the status says the cluster is pending, written by the operator.
    status = eventually(lambda: (_get(cluster, R1D, namespace, "r1deployments", "tiny") or {})
                        .get("status"), message="the R1Deployment status")
    assert status["phase"] in ("Pending", "Progressing") and status["rayService"] == "tiny"


def test_the_operator_follows_an_update(cluster, operator, namespace, tiny):
    _edit_spec(cluster, namespace, "tiny", lambda spec: spec["decode"].update(
        replicas={"min": 1, "max": 3}))
    _wait_for_rayservice(cluster, operator, namespace, "tiny",
                         lambda rs: _worker_group(rs, "decode")["maxReplicas"] ==
                         3 * _worker_group(rs, "decode")["minReplicas"],
                         what="to follow decode.replicas.max")


def _handled(cluster, namespace: str, name: str, check) -> bool:
    """Whether the operator has handled the live R1Deployment as `check` sees it: kopf records
    the configuration it handled last in an annotation, after its handlers ran."""
    live = _get(cluster, R1D, namespace, "r1deployments", name)
    handled = (live["metadata"].get("annotations") or {}).get(
        "r1serve.io/last-handled-configuration")
    return bool(handled) and check(json.loads(handled))


def _events(cluster, namespace: str, reason: str) -> list:
    return [e for e in cluster.core.list_namespaced_event(namespace).items if e.reason == reason]


def _updated(cluster, namespace: str, generation: int) -> list:
    return [e for e in _events(cluster, namespace, "Updated")
            if e.message.startswith(f"applied generation {generation};")]


@pytest.mark.parametrize("edit", ["label", "annotation"])
def test_a_metadata_edit_changes_no_child_and_announces_nothing(cluster, operator, namespace, tiny,
                                                                edit):
    # `kubectl label r1d tiny example.com/tier=gold`: KubeRay would start a second Ray cluster
    # for any change of the pod templates, so the RayService must not move at all.
    before = _wait_for_rayservice(cluster, operator, namespace, "tiny", what="to exist")["metadata"]
    generation = _get(cluster, R1D, namespace, "r1deployments", "tiny")["metadata"]["generation"]
    section = "labels" if edit == "label" else "annotations"
    cluster.custom.patch_namespaced_custom_object(
        *R1D, namespace, "r1deployments", "tiny",
        {"metadata": {section: {f"example.com/{edit}": "gold"}}})
    eventually(lambda: _handled(cluster, namespace, "tiny", lambda handled: handled.get(
        "metadata", {}).get(section, {}).get(f"example.com/{edit}") == "gold"),
        timeout=60, message=f"the operator to handle the {edit} edit")
    after = _get(cluster, RAY, namespace, "rayservices", "tiny")["metadata"]
    assert (after["generation"], after["resourceVersion"]) == (
        before["generation"], before["resourceVersion"])
    assert f"example.com/{edit}" not in (after.get("labels") or {})
    # Events are posted after the handlers ran, in order: once a later spec edit's Updated is
    # there, one the metadata edit posted would be too. It would name the same generation as the
    # edit that made it (none, for the first generation).
    later = _edit_spec(cluster, namespace, "tiny", lambda spec: spec["decode"].update(
        replicas={"min": 1, "max": spec["decode"].get("replicas", {}).get("max", 1) + 1}))
    eventually(lambda: _updated(cluster, namespace, later), timeout=60,
               message="the later spec edit's Updated event")
    assert len(_updated(cluster, namespace, generation)) == (0 if generation == 1 else 1)


@pytest.mark.parametrize("kind", ["rayservice", "service"])
def test_a_child_deleted_by_hand_is_recreated(cluster, operator, namespace, tiny, kind):
    _wait_for_rayservice(cluster, operator, namespace, "tiny", what="to exist")
    if kind == "rayservice":
        old = _get(cluster, RAY, namespace, "rayservices", "tiny")["metadata"]["uid"]
        cluster.custom.delete_namespaced_custom_object(*RAY, namespace, "rayservices", "tiny")
        _wait_for_rayservice(cluster, operator, namespace, "tiny",
                             lambda rs: rs["metadata"]["uid"] != old, what="to be re-created")
    else:
        old = cluster.core.read_namespaced_service("tiny", namespace).metadata.uid
        cluster.core.delete_namespaced_service("tiny", namespace)
        eventually(lambda: [s for s in _children_of(cluster, namespace, "tiny")[1]
                                   if s.metadata.uid != old],
                   timeout=60, message="the client Service to be re-created")


def test_the_operator_survives_sigkill_and_catches_up(cluster, operator, namespace, tiny,
                                                      reliability):
    _wait_for_rayservice(cluster, operator, namespace, "tiny", what="to exist")
    operator.kill()
    _edit_spec(cluster, namespace, "tiny", lambda spec: spec["decode"].update(
        replicas={"min": 1, "max": 4}))
    started = time.monotonic()
    operator.start()
    _wait_for_rayservice(cluster, operator, namespace, "tiny",
                         lambda rs: _worker_group(rs, "decode")["maxReplicas"] ==
                         4 * _worker_group(rs, "decode")["minReplicas"],
                         what="to follow the edit made while the operator was down")
    recovery = time.monotonic() - started
    rayservices, services = _children_of(cluster, namespace, "tiny")
    reliability("fault-operator-killed-real-api-server", "fault",
                what="operator SIGKILLed on kube-apiserver v1.36 (signed in as its ServiceAccount), "
                "the spec edited while it was down, then restarted | recovery: restart to the "
                "RayService following the edit", requests=1,
                failed=0 if (len(rayservices), len(services)) == (1, 1) else 1,
                failures="" if (len(rayservices), len(services)) == (1, 1) else
                f"{len(rayservices)} RayServices, {len(services)} Services", recovery_s=recovery)
    assert len(rayservices) == 1 and len(services) == 1


def _prefill_bounds(cluster, namespace: str, name: str) -> tuple:
    group = _worker_group({"spec": {"rayClusterConfig": _get(
        cluster, RAY, namespace, "rayclusters", name)["spec"]}}, "prefill")
    return group["replicas"], group["minReplicas"], group["maxReplicas"]


def test_new_bounds_reach_the_active_raycluster(cluster, operator, namespace, tiny):
    _edit_spec(cluster, namespace, "tiny", lambda spec: spec["prefill"].update(
        replicas={"min": 1, "max": 1}))
    _wait_for_rayservice(cluster, operator, namespace, "tiny",
                         lambda rs: _worker_group(rs, "prefill")["maxReplicas"] ==
                         _worker_group(rs, "prefill")["minReplicas"], what="with prefill 1..1")
    # KubeRay 1.7 keeps a running cluster's worker bounds; no KubeRay runs here, so the test
    # plays it: a RayCluster from the RayService, owned by it, named active in its status.
    rayservice = _get(cluster, RAY, namespace, "rayservices", "tiny")
    owner = {"apiVersion": "ray.io/v1", "kind": "RayService", "name": "tiny",
             "uid": rayservice["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    cluster.custom.create_namespaced_custom_object(*RAY, namespace, "rayclusters", {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "tiny-bounds", "ownerReferences": [owner]},
        "spec": rayservice["spec"]["rayClusterConfig"]})
    cluster.custom.patch_namespaced_custom_object_status(
        *RAY, namespace, "rayservices", "tiny",
        {"status": {"activeServiceStatus": {"rayClusterName": "tiny-bounds"}}})
    before = _prefill_bounds(cluster, namespace, "tiny-bounds")
    _edit_spec(cluster, namespace, "tiny", lambda spec: spec["prefill"].update(
        replicas={"min": 1, "max": 3}))
    eventually(lambda: _prefill_bounds(cluster, namespace, "tiny-bounds") == (before[0], 1, 3),
               timeout=60, message=f"prefill bounds 1..3 in the RayCluster (were {before})")
    [event] = eventually(lambda: _events(cluster, namespace, "WorkerBoundsApplied"),
                         message="the WorkerBoundsApplied event")
    assert "tiny-bounds: prefill 1..1 -> 1..3" in event.message
    # The operator's safety net, as this server applies it: a group that moved fails the test op.
    stale = [{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "decode"},
             {"op": "replace", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": 9}]
    with pytest.raises(ApiException) as refused:
        cluster.custom.patch_namespaced_custom_object(*RAY, namespace, "rayclusters", "tiny-bounds",
                                                      stale, _content_type="application/json-patch+json")
    assert refused.value.status == 422


def test_deleting_the_resource_leaves_nothing(cluster, operator, namespace):
    if not cluster.has_controller_manager:
        pytest.skip("garbage collection needs kube-controller-manager in $KUBEBUILDER_ASSETS")
    cluster.custom.create_namespaced_custom_object(
        *R1D, namespace, "r1deployments", _tiny(namespace, "doomed"))
    eventually(lambda: all(_children_of(cluster, namespace, "doomed")), timeout=60,
               message="the RayService and Service of the new R1Deployment")
    cluster.custom.delete_namespaced_custom_object(*R1D, namespace, "r1deployments", "doomed")
    eventually(lambda: _get(cluster, R1D, namespace, "r1deployments", "doomed") is None,
               message="the R1Deployment to be deleted")
    eventually(lambda: _children_of(cluster, namespace, "doomed") == ([], []), timeout=30,
               message="the garbage collector to delete the RayService and the Service")
    assert operator.alive(), operator.tail()


def test_the_kept_expert_load_is_owned_and_deleted_with_the_resource(cluster, operator, operator_token, namespace,
                                                                     tmp_path):
    """The operator's ServiceAccount writes the expert-load ConfigMap (as it does when replicas report load) and
    reads it back; the garbage collector deletes it with the R1Deployment."""
    import kubernetes

    from r1serve.operator.kube_api import KubeApi
    from r1serve.operator.render import expert_load_configmap
    from r1serve.spec import expert_load, load_r1deployment

    owner = cluster.custom.create_namespaced_custom_object(
        *R1D, namespace, "r1deployments", _tiny(namespace, "keeper"))
    kubeconfig = cluster.plane.token_kubeconfig(tmp_path / "kubeconfig", operator_token)
    api = KubeApi(kubernetes.config.new_client_from_config(str(kubeconfig)))
    try:
        deployment = load_r1deployment(_tiny(namespace, "keeper"))
        data = {expert_load.pool_key("decode"): expert_load.encode({1: [3, 1, 2]})}
        api.apply(expert_load_configmap(deployment, owner["metadata"]["uid"], data))
        kept = api.get_configmap(namespace, "keeper-expert-load")
        assert kept["data"] == data
        [reference] = kept["metadata"]["ownerReferences"]
        assert (reference["kind"], reference["uid"], reference["controller"]) == (
            "R1Deployment", owner["metadata"]["uid"], True)
        if not cluster.has_controller_manager:
            pytest.skip("garbage collection needs kube-controller-manager in $KUBEBUILDER_ASSETS")
        cluster.custom.delete_namespaced_custom_object(*R1D, namespace, "r1deployments", "keeper")
        eventually(lambda: api.get_configmap(namespace, "keeper-expert-load") is None, timeout=30,
                   message="the garbage collector to delete the expert-load ConfigMap")
    finally:
        api.close()


def test_the_operator_made_no_call_its_role_forbids(operator):
    # Every call went through the ServiceAccount's role; a 403 would show in the operator's log.
    assert "403" not in operator.log.read_text(errors="replace"), operator.tail()
