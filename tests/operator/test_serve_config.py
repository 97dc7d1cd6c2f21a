"""The Serve config: one pure function, deterministic, only keys Ray Serve knows, the same in the RayService."""

import copy
import importlib
import sys
import types
from pathlib import Path

import pytest
import yaml

from r1serve.operator.render import render_rayservice
from r1serve.spec import constants as C
from r1serve.spec import load_r1deployment, quantity
from r1serve.spec.serve_config import (
    build_serve_config,
    local_ray_resources,
    nodes_per_replica,
    ranks_per_node,
    serve_config_yaml,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))

# Serve's config schemas silently ignore unknown keys (NOTES.md), so a typo such as
# `max_replica` would deploy with a default: every key we write must be one of these
# (Ray 2.60 ServeDeploySchema, ApplicationSchema, DeploymentSchema, AutoscalingConfig).
ALLOWED = {
    "config": {"proxy_location", "http_options", "grpc_options", "logging_config",
               "applications", "target_capacity"},
    "http_options": {"host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s",
                     "ssl_certfile", "ssl_keyfile", "ssl_ca_certs"},
    "grpc_options": {"port", "grpc_servicer_functions", "request_timeout_s", "enable_reflection"},
    "application": {"name", "route_prefix", "import_path", "runtime_env", "deployments", "args",
                    "logging_config", "external_scaler_enabled", "autoscaling_policy"},
    "deployment": {"name", "num_replicas", "max_ongoing_requests", "max_queued_requests",
                   "user_config", "autoscaling_config", "graceful_shutdown_wait_loop_s",
                   "graceful_shutdown_timeout_s", "health_check_period_s",
                   "health_check_timeout_s", "ray_actor_options", "placement_group_bundles",
                   "placement_group_strategy", "max_replicas_per_node", "logging_config",
                   "request_router_config"},
    "autoscaling_config": {"min_replicas", "initial_replicas", "max_replicas",
                           "target_ongoing_requests", "look_back_period_s", "upscale_delay_s",
                           "downscale_delay_s", "downscale_to_zero_delay_s", "upscaling_factor",
                           "downscaling_factor", "aggregation_function", "policy",
                           "metrics_interval_s"},
    "policy": {"policy_function", "policy_kwargs"},
    "ray_actor_options": {"runtime_env", "num_cpus", "num_gpus", "memory", "resources",
                          "accelerator_type"},
}
STRATEGIES = {"PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"}


def _unknown_keys(config: dict) -> list[str]:
    unknown = [f"config.{k}" for k in set(config) - ALLOWED["config"]]
    for section in ("http_options", "grpc_options"):
        unknown += [f"{section}.{k}" for k in set(config[section]) - ALLOWED[section]]
    for app in config["applications"]:
        unknown += [f"application.{k}" for k in set(app) - ALLOWED["application"]]
        unknown += [f"application.autoscaling_policy.{k}"
                    for k in set(app.get("autoscaling_policy", {})) - ALLOWED["policy"]]
        for dep in app["deployments"]:
            where = f"deployments[{dep['name']}]"
            unknown += [f"{where}.{k}" for k in set(dep) - ALLOWED["deployment"]]
            scaling = dep.get("autoscaling_config", {})
            unknown += [f"{where}.autoscaling_config.{k}"
                        for k in set(scaling) - ALLOWED["autoscaling_config"]]
            unknown += [f"{where}.policy.{k}"
                        for k in set(scaling.get("policy", {})) - ALLOWED["policy"]]
            unknown += [f"{where}.ray_actor_options.{k}"
                        for k in set(dep.get("ray_actor_options", {})) - ALLOWED["ray_actor_options"]]
    return unknown


def test_allowed_keys_match_ray_when_installed():
    schema = pytest.importorskip("ray.serve.schema")
    config = pytest.importorskip("ray.serve.config")
    models = {"config": schema.ServeDeploySchema, "http_options": schema.HTTPOptionsSchema,
              "grpc_options": schema.gRPCOptionsSchema, "application": schema.ServeApplicationSchema,
              "deployment": schema.DeploymentSchema, "autoscaling_config": config.AutoscalingConfig,
              "policy": config.AutoscalingPolicy}
    for section, model in models.items():
        assert ALLOWED[section] <= set(model.model_fields), section


def _aggregated():
    doc = copy.deepcopy(TINY)
    doc["spec"]["disaggregation"] = False
    del doc["spec"]["prefill"]
    return load_r1deployment(doc)


def _with_tls():
    doc = copy.deepcopy(TINY)
    doc["spec"]["api"]["tls"] = {"secretName": "tiny-tls"}
    return doc


CONFIG_SOURCES = [*EXAMPLE_FILES, "tls"]


def _load(source):
    return load_r1deployment(_with_tls() if source == "tls" else source)


@pytest.mark.parametrize("path", CONFIG_SOURCES, ids=lambda p: getattr(p, "name", p))
def test_only_keys_ray_serve_knows(path):
    config = build_serve_config(_load(path))
    assert _unknown_keys(config) == []
    for dep in config["applications"][0]["deployments"]:
        assert dep.get("placement_group_strategy", "PACK") in STRATEGIES


def _policies_importable(monkeypatch):
    """Serve imports policy functions while validating; stand in for the runtime's module
    until it exists (its import path is all this config decides)."""
    try:
        importlib.import_module(C.PREFILL_POLICY.split(":")[0])
    except ImportError:
        module = types.ModuleType(C.PREFILL_POLICY.split(":")[0])
        for path in (C.PREFILL_POLICY, C.DECODE_POLICY):
            setattr(module, path.split(":")[1], lambda ctx: (ctx.current_num_replicas, {}))
        package = types.ModuleType(module.__name__.rsplit(".", 1)[0])
        package.__path__ = []
        monkeypatch.setitem(sys.modules, package.__name__, package)
        monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.mark.parametrize("path", CONFIG_SOURCES, ids=lambda p: getattr(p, "name", p))
def test_validates_against_ray_serve_schema_when_ray_is_installed(path, monkeypatch):
    schema = pytest.importorskip("ray.serve.schema")
    _policies_importable(monkeypatch)
    config = build_serve_config(_load(path))
    parsed = schema.ServeDeploySchema.model_validate(config)
    [app] = parsed.applications
    assert [d.name for d in app.deployments] == [
        d["name"] for d in config["applications"][0]["deployments"]]


def test_yaml_is_deterministic_and_sorted():
    deployment = load_r1deployment(EXAMPLES / "r1-production.yaml")
    text = serve_config_yaml(deployment)
    assert text == serve_config_yaml(load_r1deployment(EXAMPLES / "r1-production.yaml"))
    assert yaml.safe_load(text) == build_serve_config(deployment)
    assert text == yaml.safe_dump(yaml.safe_load(text), sort_keys=True, width=1 << 16)


def test_application_shape():
    config = build_serve_config(load_r1deployment(EXAMPLES / "tiny.yaml"))
    assert config["grpc_options"] == {
        "port": 9000, "grpc_servicer_functions": list(C.GRPC_SERVICER_FUNCTIONS)}
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    [app] = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (
        C.SERVE_APP_NAME, "/", "r1serve.runtime.serve.app:build_app")
    names = [d["name"] for d in app["deployments"]]
    assert names == ["Ingress", "PrefillServer", "DecodeServer"]


def test_pool_deployments_follow_the_spec():
    deployment = load_r1deployment(EXAMPLES / "r1-production.yaml")
    deps = {d["name"]: d for d in build_serve_config(deployment)["applications"][0]["deployments"]}
    prefill, decode = deps["PrefillServer"], deps["DecodeServer"]
    assert prefill["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
        "upscale_delay_s": 30.0, "downscale_delay_s": 900.0,
        "policy": {"policy_function": C.PREFILL_POLICY,
                   "policy_kwargs": {"target_queued_tokens": 65536}}}
    assert decode["autoscaling_config"]["policy"] == {
        "policy_function": C.DECODE_POLICY,
        "policy_kwargs": {"target_ongoing_requests": 1536, "target_kv_cache_usage": 0.85}}
    assert (prefill["max_ongoing_requests"], prefill["max_queued_requests"]) == (64 + 512, 512)
    # Bundle 0 holds the replica actor; then one bundle per expert-parallel rank.
    bundles = prefill["placement_group_bundles"]
    assert len(bundles) == 33 and bundles[0] == {"CPU": 1.0}
    assert bundles[1] == {"CPU": 12.0, "GPU": 1.0, "r1serve_prefill_rank": 1.0}
    assert prefill["ray_actor_options"] == {"num_cpus": 1.0}
    # A replica being scaled away finishes its running sequences first.
    assert (decode["graceful_shutdown_timeout_s"], decode["graceful_shutdown_wait_loop_s"]) == (900.0, 2.0)
    assert len(decode["placement_group_bundles"]) == 145
    # 32 and 144 GPUs never fit one 8-GPU node.
    assert prefill["placement_group_strategy"] == decode["placement_group_strategy"] == "PACK"


def test_small_groups_are_strictly_packed_on_one_node():
    deps = build_serve_config(load_r1deployment(EXAMPLES / "tiny.yaml"))["applications"][0]
    pools = [d for d in deps["deployments"] if d["name"] != "Ingress"]
    assert {d["placement_group_strategy"] for d in pools} == {"STRICT_PACK"}
    assert all("GPU" not in b for d in pools for b in d["placement_group_bundles"])


def test_tls_terminates_https_on_the_mounted_secret():
    options = build_serve_config(_load("tls"))["http_options"]
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (
        "/etc/r1serve/tls/tls.crt", "/etc/r1serve/tls/tls.key")


def test_aggregated_mode_has_only_decode():
    config = build_serve_config(_aggregated())
    assert [d["name"] for d in config["applications"][0]["deployments"]] == [
        "Ingress", "DecodeServer"]


def test_app_args_round_trip_without_labels_or_annotations():
    doc = copy.deepcopy(TINY)
    doc["metadata"]["labels"] = {"team": "a"}
    doc["metadata"]["annotations"] = {"note": "x"}
    deployment = load_r1deployment(doc)
    args = build_serve_config(deployment)["applications"][0]["args"]["deployment"]
    assert args["metadata"] == {"name": "tiny", "namespace": "default"}
    assert load_r1deployment(args).spec == deployment.spec
    # So relabelling does not redeploy the application.
    assert serve_config_yaml(deployment) == serve_config_yaml(load_r1deployment(TINY))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_rayservice_deploys_exactly_the_local_config(path):
    deployment = load_r1deployment(path)
    rayservice = render_rayservice(deployment, owner_uid="uid", generation=4)
    assert rayservice["spec"]["serveConfigV2"] == serve_config_yaml(deployment)
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == build_serve_config(deployment)


@pytest.mark.parametrize("ep, gpus, node, expected", [
    (32, 1, 8, (8, 4)), (144, 1, 8, (8, 18)), (12, 1, 8, (6, 2)), (4, 2, 8, (4, 1)), (2, 0, 8, (2, 1)),
    (7, 1, 8, (7, 1)), (9, 1, 8, (3, 3)), (16, 16, 16, (1, 16)), (1, 1, 8, (1, 1)),
    (32, 1, 4, (4, 8)), (8, 2, 4, (2, 4)), (6, 1, 4, (3, 2)),
])
def test_ranks_are_spread_evenly_over_nodes(ep, gpus, node, expected):
    doc = copy.deepcopy(TINY)
    doc["spec"]["decode"].update(expertParallel=ep, gpusPerRank=gpus, gpusPerNode=node)
    pool = load_r1deployment(doc).spec.decode
    assert (ranks_per_node(pool), nodes_per_replica(pool)) == expected


def test_local_ray_resources_cover_every_replica():
    resources = local_ray_resources(load_r1deployment(EXAMPLES / "tiny.yaml"))
    assert resources == {"r1serve_prefill_rank": 2.0, "r1serve_decode_rank": 4.0}


@pytest.mark.parametrize("text, value", [("8", 8.0), ("500m", 0.5), ("1.5", 1.5), ("2k", 2000.0),
                                         ("1Gi", 2.0**30), ("2e3", 2000.0), (".5", 0.5)])
def test_quantity_to_float(text, value):
    assert quantity.to_float(text) == value


def test_ratio_band_adds_one_application_level_policy_with_both_pools_targets():
    deployment = load_r1deployment(EXAMPLES / "r1-production.yaml")
    [app] = build_serve_config(deployment)["applications"]
    policy = app["autoscaling_policy"]
    spec = deployment.spec
    assert policy["policy_function"] == C.RATIO_POLICY
    assert policy["policy_kwargs"] == {
        "prefill_deployment": C.PREFILL_DEPLOYMENT, "decode_deployment": C.DECODE_DEPLOYMENT,
        "target_queued_tokens": spec.prefill.autoscaling.target_queued_tokens,
        "target_ongoing_requests": spec.decode.autoscaling.target_ongoing_requests,
        "target_kv_cache_usage": spec.decode.autoscaling.target_kv_cache_usage,
        "ratio_min": spec.ratio.min, "ratio_max": spec.ratio.max}
    [tiny_app] = build_serve_config(load_r1deployment(EXAMPLES / "tiny.yaml"))["applications"]
    assert "autoscaling_policy" not in tiny_app  # no spec.ratio: the per-pool policies alone
