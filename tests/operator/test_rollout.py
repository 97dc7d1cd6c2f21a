"""What KubeRay does with each kind of spec change, checked on the rendering and on the table in
docs/KUBERNETES.md, and the bounds patch the operator adds."""

import copy
import re
from pathlib import Path

import jsonpatch
import pytest
import yaml

from r1serve.operator import constants as K
from r1serve.operator.render import render_rayservice, render_services
from r1serve.operator.rollout import rollout_effect, worker_bounds_patch
from r1serve.spec import SpecError, load_r1deployment

DOC = Path(__file__).resolve().parents[2] / "docs" / "KUBERNETES.md"
IMAGE = "ghcr.io/r1serve/r1serve:0.1.1-gpu"
INCREMENTAL = ("{strategy: NewClusterWithIncrementalUpgrade, clusterUpgradeOptions: "
               "{gatewayClassName: istio, stepSizePercent: 10, intervalSeconds: 60}}")

# (edits as written in the doc's "Change" column, effect). The doc's table must hold exactly
# these rows, so neither the doc nor this table can drift from what the rendering does.
CHANGES = [
    ("`spec.model.source: /models/DeepSeek-R1-0528`", "serve-config"),
    ("`spec.model.maxModelLen: 65536`", "serve-config"),
    ("`spec.model.weights: fp8`", "serve-config"),
    ("`spec.speculative: {method: mtp, numTokens: 1}`", "serve-config"),
    ("`spec.decode.autoscaling.targetOngoingRequests: 64`", "serve-config"),
    ("`spec.kvTransfer.connector: object-store`", "serve-config"),
    ("`spec.experts.rebalanceIntervalSeconds: 300`", "serve-config"),
    ("`spec.experts.onRankFailure: restart`", "serve-config"),
    ("`spec.experts.collectiveTimeoutSeconds: 20`", "serve-config"),
    ("`spec.experts.growBackIntervalSeconds: 120`", "serve-config"),
    ("`spec.experts.failoverHeadroomSlots: 2`", "serve-config"),
    ("`spec.prefill.replicas.max: 8`", "scale"),
    ("`spec.prefill.replicas.min: 2`", "scale"),
    ("`spec.decode.expertParallel: 32`", "scale"),
    ("`spec.decode.expertParallel: 4`", "new-cluster"),
    (f"`spec.workers.image: {IMAGE}`", "new-cluster"),
    ("`spec.workers.resources.memory: 256Gi`", "new-cluster"),
    ("`spec.model.volume: {hostPath: /mnt/nvme/models}`", "new-cluster"),
    ("`spec.workers.nodeSelector: {nvidia.com/gpu.product: NVIDIA-H200}`", "new-cluster"),
    ("`spec.api.grpcPort: 50051`", "new-cluster"),
    ("`spec.workers.podLabels: {team: search}`", "new-cluster"),
    ("`metadata.labels: {team: search}`", "nothing"),
    ("`metadata.annotations: {owner: search}`", "nothing"),
    ("`spec.upgrade.strategy: None`", "nothing"),
    (f"`spec.upgrade: {INCREMENTAL}`", "nothing"),
    (f"`spec.upgrade.strategy: None`, `spec.workers.image: {IMAGE}`", "ignored"),
    (f"`spec.upgrade: {INCREMENTAL}`, `spec.workers.image: {IMAGE}`", "new-cluster"),
]


def _doc_section() -> str:
    text = DOC.read_text()
    start = text.index("\n## What a change does\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def doc_base() -> dict:
    """The deployment the doc's table edits: the section's YAML block."""
    [block] = re.findall(r"```yaml\n(.*?)```", _doc_section(), re.S)
    return yaml.safe_load(block)


def doc_rows() -> list[tuple[str, str]]:
    """(Change, Effect) of every row of the doc's table."""
    lines = [line for line in _doc_section().splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["Change", "Effect", "Why"]
    rows = []
    for line in lines[2:]:
        change, effect, _why = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((change, effect))
    return rows


def edited(base: dict, change: str) -> dict:
    """`base` with every `dotted.path: yaml-value` of a Change cell applied."""
    doc = copy.deepcopy(base)
    for edit in re.findall(r"`([^`]+)`", change):
        path, value = edit.split(": ", 1)
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = yaml.safe_load(value)
    return doc


def _render(doc: dict) -> dict:
    return render_rayservice(load_r1deployment(doc), owner_uid="u", generation=1)


@pytest.mark.parametrize("change, effect", CHANGES, ids=[c for c, _ in CHANGES])
def test_change_has_its_effect(change, effect, kuberay_rayservice):
    base = doc_base()
    before, after = _render(base), _render(edited(base, change))
    assert kuberay_rayservice.errors(after) == []
    assert rollout_effect(before, after) == effect


def test_the_doc_table_is_the_tested_table():
    assert doc_rows() == CHANGES


def test_the_table_covers_every_required_field():
    fields = {path for change, _ in CHANGES for path in re.findall(r"`([^:`]+):", change)}
    assert fields >= {
        "spec.model.source", "spec.model.maxModelLen", "spec.decode.autoscaling.targetOngoingRequests",
        "spec.prefill.replicas.max", "spec.prefill.replicas.min", "spec.decode.expertParallel",
        "spec.workers.image", "spec.workers.resources.memory", "spec.model.volume",
        "spec.workers.nodeSelector", "spec.api.grpcPort", "spec.kvTransfer.connector",
        "metadata.labels", "metadata.annotations", "spec.upgrade", "spec.upgrade.strategy"}
    assert {effect for _, effect in CHANGES} == {
        "nothing", "serve-config", "scale", "new-cluster", "ignored"}


# --- The rule itself, on hand-made RayServices.

def _rayservice(groups=(("prefill", 4, 16), ("decode", 2, 4)), image="img:1", serve="a: 1",
                strategy="NewCluster") -> dict:
    workers = [{"groupName": name, "replicas": low, "minReplicas": low, "maxReplicas": high,
                "template": {"spec": {"containers": [{"name": "w", "image": image}]}}}
               for name, low, high in groups]
    return {"metadata": {"name": "r1"}, "spec": {
        "serveConfigV2": serve, "upgradeStrategy": {"type": strategy},
        "rayClusterConfig": {"headGroupSpec": {"template": {}}, "workerGroupSpecs": workers}}}


@pytest.mark.parametrize("after, effect", [
    (_rayservice(), "nothing"),
    (_rayservice(strategy="None"), "nothing"),
    (_rayservice(serve="a: 2"), "serve-config"),
    (_rayservice(groups=(("prefill", 4, 32), ("decode", 2, 4))), "scale"),
    (_rayservice(groups=(("prefill", 4, 16), ("decode", 2, 4), ("extra", 0, 2))), "scale"),
    (_rayservice(groups=(("prefill", 4, 16), ("decode", 2, 4), ("extra", 0, 2)),
                 strategy="None"), "scale"),
    (_rayservice(groups=(("extra", 0, 2), ("prefill", 4, 16), ("decode", 2, 4))), "new-cluster"),
    (_rayservice(groups=(("decode", 2, 4),)), "new-cluster"),
    (_rayservice(image="img:2"), "new-cluster"),
    (_rayservice(image="img:2", strategy="NewClusterWithIncrementalUpgrade"), "new-cluster"),
    (_rayservice(image="img:2", serve="a: 2", strategy="None"), "ignored"),
], ids=["same", "strategy-only", "serve", "bounds", "appended", "appended-under-none",
        "prepended", "removed", "image", "image-incremental", "image-under-none"])
def test_kuberay_rule(after, effect):
    before = _rayservice()
    before["metadata"]["labels"] = {"team": "a"}  # RayService metadata never touches the cluster
    assert rollout_effect(before, after) == effect


# --- spec.upgrade rendered as KubeRay's upgradeStrategy.

def _with_upgrade(upgrade: dict) -> dict:
    return edited(doc_base(), f"`spec.upgrade: {yaml.safe_dump(upgrade, default_flow_style=True).strip()}`")


def test_default_strategy_is_what_was_always_rendered():
    assert _render(doc_base())["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_incremental_upgrade_is_rendered_for_kuberay(kuberay_rayservice):
    doc = _with_upgrade({"strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
        "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30,
        "maxSurgePercent": 25}})
    rayservice = _render(doc)
    assert rayservice["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "maxSurgePercent": 25, "stepSizePercent": 5,
            "intervalSeconds": 30}}
    # KubeRay refuses the incremental strategy without its in-tree autoscaler.
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert kuberay_rayservice.errors(rayservice) == []


def test_max_surge_defaults_to_kuberays_default():
    doc = _with_upgrade({"strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
        "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30}})
    options = _render(doc)["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]
    assert options["maxSurgePercent"] == 100


def test_no_upgrade_strategy_is_rendered(kuberay_rayservice):
    rayservice = _render(_with_upgrade({"strategy": "None"}))
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "None"}
    assert kuberay_rayservice.errors(rayservice) == []


def test_the_upgrade_section_stays_out_of_the_serve_config():
    plain = _render(doc_base())
    incremental = _render(edited(doc_base(), f"`spec.upgrade: {INCREMENTAL}`"))
    assert plain["spec"]["serveConfigV2"] == incremental["spec"]["serveConfigV2"]
    assert "upgrade" not in plain["spec"]["serveConfigV2"]


def test_incremental_upgrade_with_tls_is_refused():
    doc = edited(doc_base(), f"`spec.upgrade: {INCREMENTAL}`, `spec.api.tls: {{secretName: t}}`")
    with pytest.raises(SpecError, match="spec.upgrade.strategy"):
        load_r1deployment(doc)


# --- What r1serve's client Service reaches while two clusters run.

def _pod_template_labels(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [group["template"]["metadata"]["labels"]
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


@pytest.mark.parametrize("change", [f"`spec.workers.image: {IMAGE}`",
                                    f"`spec.upgrade: {INCREMENTAL}`, `spec.workers.image: {IMAGE}`"])
def test_client_service_spans_the_serving_pods_of_both_clusters(change):
    """The client Service selects no cluster: every pod of the old and the new cluster that
    KubeRay marks as serving (ray.io/serve=true) is an endpoint during an upgrade."""
    base = doc_base()
    old, new = load_r1deployment(base), load_r1deployment(edited(base, change))
    assert rollout_effect(render_rayservice(old), render_rayservice(new)) == "new-cluster"
    [service] = render_services(old)
    assert render_services(new) == [service]
    selector = dict(service["spec"]["selector"])
    assert K.KUBERAY_CLUSTER_LABEL not in selector
    assert selector.pop(K.KUBERAY_SERVE_LABEL) == "true"  # set by KubeRay on the pods it creates
    for rayservice in (render_rayservice(old), render_rayservice(new)):
        for labels in _pod_template_labels(rayservice):
            assert selector.items() <= labels.items()
            assert K.KUBERAY_CLUSTER_LABEL not in labels


# --- The bounds KubeRay 1.7 does not copy into a running cluster, patched in by the operator.

def _raycluster(*groups, image="img:1") -> dict:
    """A running cluster as KubeRay built it from `_rayservice`, with these groups and bounds."""
    spec = _rayservice(groups=groups, image=image)["spec"]["rayClusterConfig"]
    return {"metadata": {"name": "r1-abcde"}, "spec": copy.deepcopy(spec)}


def _bounds(index: int, name: str, low: int, high: int, op: str = "replace") -> list[dict]:
    path = f"/spec/workerGroupSpecs/{index}"
    return [{"op": "test", "path": f"{path}/groupName", "value": name},
            {"op": op, "path": f"{path}/minReplicas", "value": low},
            {"op": op, "path": f"{path}/maxReplicas", "value": high}]


_MISSING_BOUNDS = {"spec": {"headGroupSpec": {"template": {}}, "workerGroupSpecs": [
    {"groupName": "prefill", "replicas": 4,
     "template": {"spec": {"containers": [{"name": "w", "image": "img:1"}]}}}]}}
# What the API server or KubeRay adds to a cluster (defaults) is no difference of the rendering.
_WITH_DEFAULTS = _raycluster(("prefill", 4, 16), ("decode", 2, 4))
_WITH_DEFAULTS["spec"]["workerGroupSpecs"][0]["numOfHosts"] = 1
_WITH_DEFAULTS["spec"]["workerGroupSpecs"][0]["scaleStrategy"] = {"workersToDelete": ["p-1"]}


@pytest.mark.parametrize("rendered, live, operations, changes", [
    (_rayservice(), _raycluster(("prefill", 4, 16), ("decode", 2, 4)), [], []),
    (_rayservice(groups=(("prefill", 4, 32), ("decode", 2, 4))),
     _raycluster(("prefill", 4, 16), ("decode", 2, 4)),
     _bounds(0, "prefill", 4, 32), ["prefill 4..16 -> 4..32"]),
    (_rayservice(groups=(("prefill", 8, 32), ("decode", 1, 8))),
     _raycluster(("decode", 2, 4), ("prefill", 4, 16)),
     _bounds(0, "decode", 1, 8) + _bounds(1, "prefill", 8, 32),
     ["decode 2..4 -> 1..8", "prefill 4..16 -> 8..32"]),
    # Only in one of them: KubeRay appends a new group itself, and a group it still runs from
    # an older spec is none of ours to bound.
    (_rayservice(groups=(("prefill", 4, 32), ("extra", 0, 2))), _raycluster(("decode", 2, 4)), [], []),
    # replicas is the Ray autoscaler's: a difference there alone changes nothing.
    (_rayservice(), {"spec": {"workerGroupSpecs": [
        {"groupName": "prefill", "replicas": 9, "minReplicas": 4, "maxReplicas": 16}]}}, [], []),
    (_rayservice(), _MISSING_BOUNDS, _bounds(0, "prefill", 4, 16, op="add"), ["prefill ?..? -> 4..16"]),
    (_rayservice(), {"metadata": {"name": "r1-abcde"}}, [], []),
    # The running cluster is not the rendered one (another image): a new cluster is coming,
    # built with these bounds; the running one keeps its own.
    (_rayservice(groups=(("prefill", 4, 32), ("decode", 2, 4)), image="img:2"),
     _raycluster(("prefill", 4, 16), ("decode", 2, 4)), [], []),
    # A group the running cluster has and the rendering lost: KubeRay replaces the cluster.
    (_rayservice(groups=(("prefill", 4, 32),)),
     _raycluster(("prefill", 4, 16), ("decode", 2, 4)), [], []),
    (_rayservice(groups=(("prefill", 4, 32), ("decode", 2, 4))), _WITH_DEFAULTS,
     _bounds(0, "prefill", 4, 32), ["prefill 4..16 -> 4..32"]),
], ids=["same", "max", "both-reordered", "no-common-group", "replicas-only", "missing-bounds",
        "no-spec", "another-image", "group-removed", "server-defaults"])
def test_worker_bounds_patch(rendered, live, operations, changes):
    patch = worker_bounds_patch(rendered, live)
    assert (list(patch.operations), list(patch.changes)) == (operations, changes)


@pytest.mark.parametrize("change", [c for c, effect in CHANGES if effect == "scale"])
def test_a_scale_change_patched_into_the_cluster_leaves_it_as_rendered(change):
    """The running cluster, built from the rendering before, takes the rendering after: its
    bounds from the patch, only `replicas` left to the Ray autoscaler."""
    base = doc_base()
    before, after = _render(base), _render(edited(base, change))
    cluster = {"spec": copy.deepcopy(before["spec"]["rayClusterConfig"])}
    patched = jsonpatch.apply_patch(cluster, list(worker_bounds_patch(after, cluster).operations))

    def without_replicas(spec: dict) -> dict:
        spec = copy.deepcopy(spec)
        for group in spec["workerGroupSpecs"]:
            del group["replicas"]
        return spec
    assert without_replicas(patched["spec"]) == without_replicas(after["spec"]["rayClusterConfig"])
    assert [g["replicas"] for g in patched["spec"]["workerGroupSpecs"]] == [
        g["replicas"] for g in cluster["spec"]["workerGroupSpecs"]]


@pytest.mark.parametrize("change", ["`spec.decode.expertParallel: 4`",
                                    "`spec.upgrade.strategy: None`, `spec.decode.expertParallel: 4`"])
def test_bounds_for_pods_of_another_size_are_not_patched_into_the_running_cluster(change):
    """4 ranks per pod instead of 8: the decode group's bounds, counted in pods, double, but they
    belong to the new cluster's smaller pods, never to the running one (which with strategy None
    is the only one there will be)."""
    base = doc_base()
    before, after = _render(base), _render(edited(base, change))
    cluster = {"spec": copy.deepcopy(before["spec"]["rayClusterConfig"])}
    decode = [g for g in after["spec"]["rayClusterConfig"]["workerGroupSpecs"]
              if g["groupName"] == "decode"]
    running = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "decode"]
    assert decode[0]["maxReplicas"] != running[0]["maxReplicas"]
    assert worker_bounds_patch(after, cluster).operations == ()


def test_a_worker_list_changed_since_the_read_refuses_the_patch():
    read = _raycluster(("prefill", 4, 16), ("decode", 2, 4))
    patch = worker_bounds_patch(_rayservice(groups=(("prefill", 4, 32), ("decode", 2, 4))), read)
    moved = _raycluster(("decode", 2, 4), ("prefill", 4, 16))
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(moved, list(patch.operations))
