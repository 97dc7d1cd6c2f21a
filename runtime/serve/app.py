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
from .engine_factory import EngineSource
from .ingress import Ingress
from .pool import PoolServer
from .pool_plan import PoolPlan, plan_pools

# Replicas publish routing stats this often; routers add their own in-flight work in between.
ROUTING_STATS_PERIOD_S = 1.0
ROUTING_STATS_TIMEOUT_S = 5.0
ROUTERS = {
    C.PREFILL_DEPLOYMENT: "r1serve.runtime.serve.router:PrefillRouter",
    C.DECODE_DEPLOYMENT: "r1serve.runtime.serve.router:DecodeRouter",
}
# args["engine"]: an EngineSource as a mapping, e.g. {"kind": "mock", "token_delay_s": 0.01}, for testing
# the serving layers without a model (engine_factory.py says what each field does).
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
    """The graph Ingress -> (PrefillServer ->) DecodeServer for args = {"deployment": <R1Deployment manifest>}.

    The manifest is parsed here, once; the deployments are bound the parsed resource and each pool its plan."""
    deployment = parse_r1deployment(dict(args[C.APP_ARG_DEPLOYMENT]))
    source = EngineSource.from_args(args.get(ARG_ENGINE), where=f"args.{ARG_ENGINE}")
    checkpoint = str(checkpoint_dir(deployment.spec.model))
    options = deployment_options(deployment)
    plans = plan_pools(deployment, options)

    def pool(plan: PoolPlan):
        return (serve.deployment(PoolServer)
                .options(**options[plan.deployment], request_router_config=_router_config(plan.deployment))
                .bind(plan, deployment, checkpoint, source))

    decode = pool(plans["decode"])
    prefill = pool(plans["prefill"]) if "prefill" in plans else None
    ingress = serve.deployment(Ingress).options(**options[C.INGRESS_DEPLOYMENT])
    return ingress.bind(deployment, checkpoint, decode, prefill)
