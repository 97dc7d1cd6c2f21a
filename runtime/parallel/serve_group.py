"""An expert-parallel group for a Ray Serve replica: its ranks are actors in the replica's own bundles."""

from __future__ import annotations

import logging
from pathlib import Path

from r1serve.spec import R1Deployment
from r1serve.spec.serve_config import build_serve_config

from .group import ExpertParallelGroup, rank_specs

log = logging.getLogger(__name__)


def _rank0_address() -> str:
    """Runs in rank 0's bundle: an address on that node which every rank can reach."""
    import socket

    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def _bundles(deployment: R1Deployment, role: str) -> list[dict[str, float]]:
    """The rank bundles the Serve config reserved for this pool (bundle 0 is the replica itself)."""
    from r1serve.spec import constants as C

    name = C.POOL_DEPLOYMENTS["prefill" if role == "prefill" else "decode"]
    [app] = build_serve_config(deployment)["applications"]
    [pool] = [d for d in app["deployments"] if d["name"] == name]
    return pool["placement_group_bundles"][1:]


def make_ep_group_client(deployment: R1Deployment, role: str, checkpoint: Path,
                         timeout_s: float = 60.0) -> ExpertParallelGroup:
    """Start this replica's `expertParallel` ranks in bundles 1..N of its placement group and return the group
    (an EngineClient). Outside a placement group (e.g. a bare Ray driver) the ranks are scheduled freely."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from r1serve.runtime.serve.engine_factory import engine_config, pool_for, torch_dtype

    from .transport import RayTransport

    pool = pool_for(deployment, role)
    placement_group = ray.util.get_current_placement_group()
    strategy = PlacementGroupSchedulingStrategy(placement_group, 1) if placement_group is not None else None
    bundles = _bundles(deployment, role)
    probe = ray.remote(_rank0_address).options(num_cpus=0, scheduling_strategy=strategy)
    address = ray.get(probe.remote(), timeout=timeout_s)
    device = "cuda" if pool.gpus_per_rank else "cpu"
    dtype = str(torch_dtype(deployment, device)).removeprefix("torch.")
    specs = rank_specs(str(checkpoint), pool.expert_parallel, engine=engine_config(deployment, role), dtype=dtype,
                       device=device, redundant=deployment.spec.experts.redundant, timeout_s=timeout_s,
                       address=address)
    log.info("starting %d %s ranks at %s", pool.expert_parallel, role, address)
    return ExpertParallelGroup(RayTransport(specs, bundles, placement_group=placement_group))
