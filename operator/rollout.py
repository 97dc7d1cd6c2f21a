"""What KubeRay 1.7 does with a changed RayService, and the worker bounds it leaves out of a running cluster."""

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

Effect = Literal["nothing", "serve-config", "scale", "new-cluster", "ignored"]

# KubeRay 1.7's RayService controller, as read in rayservice_controller.go:
#
# - Each RayCluster it creates carries a hash of `rayClusterConfig` in which every worker
#   group's replicas, minReplicas, maxReplicas and scaleStrategy.workersToDelete are blanked
#   (the Ray autoscaler owns those), and the number of worker groups.
# - Same hash: the RayCluster is left as it is. Changed replica bounds are therefore *not*
#   copied into the running RayCluster (the operator does it: worker_bounds_patch below).
# - Same hash once the worker groups appended at the end are dropped: the RayCluster is
#   updated in place (every group, bounds included).
# - Any other difference: a new RayCluster (upgradeStrategy NewCluster, or
#   NewClusterWithIncrementalUpgrade with its feature gate on), or nothing at all (None).
# - Independently, serveConfigV2 is resubmitted to the serving cluster whenever its text
#   differs from what was last submitted: an in-place Serve update.
#
# Nothing else in the RayService (its metadata, upgradeStrategy itself) touches the cluster
# or the application.
_BOUNDS = ("replicas", "minReplicas", "maxReplicas")


def _hashed(cluster: dict[str, Any], groups: int | None = None) -> dict[str, Any]:
    """The part of rayClusterConfig KubeRay hashes, optionally only its first `groups` groups."""
    cluster = copy.deepcopy(cluster)
    workers = cluster.get("workerGroupSpecs", [])[:groups]
    for group in workers:
        for key in _BOUNDS:
            group.pop(key, None)
        group.get("scaleStrategy", {}).pop("workersToDelete", None)
    cluster["workerGroupSpecs"] = workers
    return cluster


def _cluster_kept(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """True when KubeRay keeps the running cluster: only bounds changed or groups appended."""
    if _hashed(before) == _hashed(after):
        return True
    count = len(before.get("workerGroupSpecs", []))
    return (len(after.get("workerGroupSpecs", [])) > count
            and _hashed(after, count) == _hashed(before))


def rollout_effect(before: dict[str, Any], after: dict[str, Any]) -> Effect:
    """What KubeRay 1.7 does when RayService `before` is replaced by `after` (both rendered).

    nothing: neither the cluster nor the Serve config changed. serve-config: only the Serve
    config changed; it is resubmitted to the running cluster. scale: the cluster is kept and
    only its worker groups' replica bounds changed or groups were appended (plus, usually, the
    Serve config). new-cluster: KubeRay builds a new Ray cluster and moves traffic to it.
    ignored: a new cluster would be needed, but upgradeStrategy None keeps the old one as it is.
    """
    old, new = before["spec"], after["spec"]
    if old["rayClusterConfig"] != new["rayClusterConfig"]:
        if not _cluster_kept(old["rayClusterConfig"], new["rayClusterConfig"]):
            strategy = new.get("upgradeStrategy", {}).get("type")
            return "ignored" if strategy == "None" else "new-cluster"
        return "scale"
    if old["serveConfigV2"] != new["serveConfigV2"]:
        return "serve-config"
    return "nothing"


# KubeRay's gap, closed by the operator: the new bounds of a kept cluster copied into the live
# RayCluster. `replicas` stays out: the Ray autoscaler owns it, and KubeRay clamps it into the bounds.
_BOUND_KEYS = ("minReplicas", "maxReplicas")


@dataclasses.dataclass(frozen=True)
class BoundsPatch:
    """An RFC 6902 patch of a RayCluster's worker-group bounds, and what it changes per group."""

    operations: tuple[dict[str, Any], ...] = ()
    changes: tuple[str, ...] = ()   # "prefill 4..16 -> 4..32", for the event


def worker_bounds_patch(rayservice: Mapping[str, Any], raycluster: Mapping[str, Any]) -> BoundsPatch:
    """The patch that gives `raycluster` the worker-group bounds of `rayservice`, for each group
    both have (matched by groupName) whose minReplicas or maxReplicas differ; empty when none do.

    Each group's operations first test its groupName at the index read, so a list that changed
    in between makes the server refuse the whole patch instead of bounding the wrong group.
    """
    wanted = {group.get("groupName"): group for group in
              rayservice.get("spec", {}).get("rayClusterConfig", {}).get("workerGroupSpecs") or []}
    operations: list[dict[str, Any]] = []
    changes: list[str] = []
    for index, live in enumerate((raycluster.get("spec") or {}).get("workerGroupSpecs") or []):
        name = live.get("groupName")
        if name not in wanted:
            continue
        before = tuple(live.get(key) for key in _BOUND_KEYS)
        after = tuple(wanted[name].get(key) for key in _BOUND_KEYS)
        if before == after or None in after or not _same_pod_shape(live, wanted[name]):
            continue
        path = f"/spec/workerGroupSpecs/{index}"
        operations.append({"op": "test", "path": f"{path}/groupName", "value": name})
        # "replace" needs the key to exist; the CRD defaults both, but a hand-made cluster may lack them.
        operations += [{"op": "replace" if key in live else "add", "path": f"{path}/{key}",
                        "value": value} for key, value in zip(_BOUND_KEYS, after)]
        changes.append(f"{name} {_span(before)} -> {_span(after)}")
    return BoundsPatch(tuple(operations), tuple(changes))


# Where a worker group says how big one pod is: Ray's logical resources (ranks per pod) and the
# Ray container's requests and limits.
_POD_SHAPE = (("resources",), ("template", "spec", "containers", 0, "resources"))


def _dig(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _same_pod_shape(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """False when the two groups' pods differ in size: bounds count pods, so the rendered bounds
    are meant for pods of another size than the running cluster's (a new cluster is coming, or
    with upgrade strategy None never comes) and would over- or under-size it."""
    return all(None in (_dig(live, path), _dig(wanted, path)) or
               _dig(live, path) == _dig(wanted, path) for path in _POD_SHAPE)


def _span(bounds: tuple[Any, ...]) -> str:
    low, high = ("?" if value is None else value for value in bounds)
    return f"{low}..{high}"
