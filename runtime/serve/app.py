"""The Serve application of an R1Deployment: `build_app` is the import path every Serve config names.

The deployment options (replicas, autoscaling, placement-group bundles, queue limits) come from
`build_serve_config`, the same function that writes the config KubeRay and the local runner deploy, so
`serve.run(build_app(args))` and a config deploy produce the same graph. Routers are set here: they are
code, not configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from r1serve.spec import R1Deployment, parse_r1deployment
from r1serve.spec import constants as C
from r1serve.spec.serve_config import build_serve_config

from .checkpoint import checkpoint_dir
from .ingress import Ingress
from .pool import PoolServer

# Replicas publish routing stats this often; routers add their own in-flight work in between.
ROUTING_STATS_PERIOD_S = 1.0
ROUTING_STATS_TIMEOUT_S = 5.0
ROUTERS = {
    C.PREFILL_DEPLOYMENT: "r1serve.runtime.serve.router:PrefillRouter",
    C.DECODE_DEPLOYMENT: "r1serve.runtime.serve.router:DecodeRouter",
}
# args["engine"] = {"kind": "mock", "token_delay_s": ...} swaps in the mock engine (tests of the graph).
ARG_ENGINE = "engine"


def deployment_options(deployment: R1Deployment) -> dict[str, dict[str, Any]]:
    """Serve deployment options by deployment name, exactly as the Serve config states them."""
    app = build_serve_config(deployment)["applications"][0]
    return {d["name"]: dict(d) for d in app["deployments"]}


def _router_config(name: str) -> RequestRouterConfig:
    return RequestRouterConfig(request_router_class=ROUTERS[name],
                               request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
                               request_routing_stats_timeout_s=ROUTING_STATS_TIMEOUT_S)


def build_app(args: Mapping[str, Any]) -> Application:
    """The graph Ingress -> (PrefillServer ->) DecodeServer for args = {"deployment": <R1Deployment manifest>}."""
    manifest = dict(args[C.APP_ARG_DEPLOYMENT])
    deployment = parse_r1deployment(manifest)
    checkpoint = str(checkpoint_dir(deployment.spec.model))
    engine = args.get(ARG_ENGINE)
    options = deployment_options(deployment)
    pools = deployment.spec.active_pools()

    def pool(name: str, role: str):
        return (serve.deployment(PoolServer).options(**options[name], request_router_config=_router_config(name))
                .bind(manifest, role, checkpoint, engine))

    decode = pool(C.DECODE_DEPLOYMENT, "decode" if "prefill" in pools else "both")
    prefill = pool(C.PREFILL_DEPLOYMENT, "prefill") if "prefill" in pools else None
    ingress = serve.deployment(Ingress).options(**options[C.INGRESS_DEPLOYMENT])
    return ingress.bind(manifest, checkpoint, decode, prefill)
