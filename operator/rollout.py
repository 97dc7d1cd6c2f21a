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
    both have (matched by groupName) whose minReplicas or maxReplicas differ; empty when none do,
    and when the cluster does not run as rendered but for its bounds (runs_as_rendered).

    Each group's operations first test its groupName at the index read, so a list that changed
    in between makes the server refuse the whole patch instead of bounding the wrong group.
    """
    rendered = rayservice.get("spec", {}).get("rayClusterConfig", {})
    running = raycluster.get("spec") or {}
    if not runs_as_rendered(rendered, running):
        return BoundsPatch()
    wanted = {group.get("groupName"): group for group in rendered.get("workerGroupSpecs") or []}
    operations: list[dict[str, Any]] = []
    changes: list[str] = []
    for index, live in enumerate(running.get("workerGroupSpecs") or []):
        name = live.get("groupName")
        before = tuple(live.get(key) for key in _BOUND_KEYS)
        after = tuple(wanted[name].get(key) for key in _BOUND_KEYS)
        if before == after or None in after:
            continue
        path = f"/spec/workerGroupSpecs/{index}"
        operations.append({"op": "test", "path": f"{path}/groupName", "value": name})
        # "replace" needs the key to exist; the CRD defaults both, but a hand-made cluster may lack them.
        operations += [{"op": "replace" if key in live else "add", "path": f"{path}/{key}",
                        "value": value} for key, value in zip(_BOUND_KEYS, after)]
        changes.append(f"{name} {_span(before)} -> {_span(after)}")
    return BoundsPatch(tuple(operations), tuple(changes))


def _covers(live: Any, wanted: Any) -> bool:
    """Whether `live` holds every value of `wanted`; keys only `live` has (defaults the API server
    or KubeRay filled in) do not count."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            key in live and _covers(live[key], value) for key, value in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(live, list) and len(live) == len(wanted)
                and all(_covers(a, b) for a, b in zip(live, wanted)))
    return live == wanted


def runs_as_rendered(rendered: Mapping[str, Any], live: Mapping[str, Any]) -> bool:
    """Whether the running cluster (`live`, a RayCluster's spec) is the rendered rayClusterConfig
    but for worker bounds: only then are the rendered bounds its own. Otherwise they count pods
    of another cluster (a new one KubeRay is about to build, or with upgradeStrategy None never
    builds) and would over- or under-size this one. Worker groups are matched by name; a group
    only the rendering has is one KubeRay appends by itself."""
    wanted, running = _hashed(dict(rendered)), _hashed(dict(live))
    wanted_groups = {g.get("groupName"): g for g in wanted.pop("workerGroupSpecs")}
    running_groups = {g.get("groupName"): g for g in running.pop("workerGroupSpecs")}
    return (_covers(running, wanted) and running_groups.keys() <= wanted_groups.keys()
            and all(_covers(group, wanted_groups[name]) for name, group in running_groups.items()))


def _span(bounds: tuple[Any, ...]) -> str:
    low, high = ("?" if value is None else value for value in bounds)
    return f"{low}..{high}"
