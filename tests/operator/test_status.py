"""Status aggregation (pure): KubeRay's view of the RayService becomes phase, conditions, replicas and events."""

import copy
from pathlib import Path

import pytest
import yaml

from r1serve.operator.status import (
    RAYSERVICE_SILENCE_S,
    Observed,
    aggregate,
    failure,
    invalid_spec,
    kuberay_missing_message,
    status_silence_left,
)
from r1serve.spec import load_r1deployment

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


@pytest.fixture
def tiny():
    return load_r1deployment(EXAMPLES / "tiny.yaml")


def _rayservice(status: dict, generation: int = 1, source_generation: int | None = 1) -> dict:
    meta = {"name": "tiny", "namespace": "default", "generation": generation}
    if source_generation is not None:
        meta["annotations"] = {"r1serve.io/source-generation": str(source_generation)}
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": meta,
            "status": {**status, "observedGeneration": generation}}


def _cluster(prefill_pods: int, decode_pods: int) -> dict:
    return {"spec": {"workerGroupSpecs": [{"groupName": "prefill", "replicas": prefill_pods},
                                          {"groupName": "decode", "replicas": decode_pods}]}}


def _conditions(status: dict) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_no_rayservice_status_yet_is_pending(tiny, kuberay_world):
    update = aggregate(tiny, Observed(_rayservice(kuberay_world.status(None))), generation=1,
                       previous=None, now=NOW)
    assert update.changed and update.status["phase"] == "Pending"
    assert _conditions(update.status) == {
        "Ready": ("False", "WaitingForRayCluster"), "Progressing": ("True", "WaitingForRayCluster"),
        "Degraded": ("False", "WaitingForRayCluster")}
    assert update.status["decode"] == {"replicas": 0, "readyReplicas": 0, "desiredReplicas": 1,
                                       "summary": "0/1"}
    assert update.status["endpoints"] == {"grpc": "tiny.default.svc:9000",
                                          "http": "http://tiny.default.svc:8000"}
    assert [(e.type, e.reason) for e in update.events] == [("Normal", "Pending")]


def test_running_application_with_ready_pods_is_ready(tiny, kuberay_world):
    pods = kuberay_world.pods("r1-abcde", "prefill", 1, 1) + kuberay_world.pods(
        "r1-abcde", "decode", 2, 2)
    observed = Observed(_rayservice(kuberay_world.status("RUNNING")), _cluster(1, 2), tuple(pods))
    update = aggregate(tiny, observed, generation=1, previous={"phase": "Progressing"}, now=NOW)
    status = update.status
    assert status["phase"] == "Ready" and status["observedGeneration"] == 1
    assert _conditions(status)["Ready"] == ("True", "Serving")
    assert status["prefill"] == {"replicas": 1, "readyReplicas": 1, "desiredReplicas": 1,
                                 "summary": "1/1"}
    # tiny's decode pool: 2 CPU ranks fit one pod, so 2 pods are 2 replicas.
    assert status["decode"]["summary"] == "2/2"
    assert [(e.type, e.reason) for e in update.events] == [("Normal", "Ready")]


def test_first_deploy_on_the_pending_cluster_is_progressing(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("DEPLOYING", pending=True))
    assert aggregate(tiny, Observed(rs), generation=1, previous=None, now=NOW
                     ).status["phase"] == "Progressing"


def test_unhealthy_deployment_degrades_with_a_warning(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("RUNNING", deployments={
        "Ingress": "HEALTHY", "PrefillServer": "UNHEALTHY", "DecodeServer": "HEALTHY"}))
    update = aggregate(tiny, Observed(rs), generation=1, previous={"phase": "Ready"}, now=NOW)
    assert update.status["phase"] == "Degraded"
    assert _conditions(update.status)["Degraded"] == ("True", "Unhealthy")
    assert _conditions(update.status)["Ready"] == ("True", "Serving")  # still answers requests
    assert update.status["prefill"]["readyReplicas"] == 0
    [event] = update.events
    assert (event.type, event.reason) == ("Warning", "Unhealthy")
    assert "PrefillServer: UNHEALTHY" in event.message


def test_deploy_failure_fails(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("DEPLOY_FAILED", message="ImportError: r1serve"))
    update = aggregate(tiny, Observed(rs), generation=1, previous=None, now=NOW)
    assert update.status["phase"] == "Failed"
    assert update.events[0].type == "Warning" and "ImportError" in update.events[0].message


def test_rollout_keeps_serving_while_progressing(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("RUNNING", upgrading=True), source_generation=2)
    update = aggregate(tiny, Observed(rs), generation=2, previous=None, now=NOW)
    assert update.status["phase"] == "Progressing"
    assert _conditions(update.status)["Ready"] == ("True", "Serving")
    assert update.status["observedGeneration"] == 2


def test_observed_generation_comes_from_what_was_applied(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("RUNNING"), source_generation=3)
    update = aggregate(tiny, Observed(rs), generation=5, previous=None, now=NOW)
    assert update.status["observedGeneration"] == 3


def test_unchanged_status_writes_and_posts_nothing(tiny, kuberay_world):
    observed = Observed(_rayservice(kuberay_world.status("RUNNING")), _cluster(1, 1),
                        tuple(kuberay_world.pods("r1-abcde", "decode", 1, 1)
                              + kuberay_world.pods("r1-abcde", "prefill", 1, 1)))
    first = aggregate(tiny, observed, generation=1, previous=None, now=NOW)
    again = aggregate(tiny, observed, generation=1, previous=copy.deepcopy(first.status),
                      now=LATER)
    assert not again.changed and again.events == ()
    # Transition times stay put while a condition keeps its status.
    assert {c["lastTransitionTime"] for c in again.status["conditions"]} == {NOW}


def test_scaling_is_recorded_and_announced(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("RUNNING"))
    before = aggregate(tiny, Observed(rs, _cluster(1, 1)), generation=1, previous=None, now=NOW)
    after = aggregate(tiny, Observed(rs, _cluster(1, 2)), generation=1,
                      previous=before.status, now=LATER)
    assert after.status["decode"]["desiredReplicas"] == 2
    assert after.status["lastScaleDecision"] == {"pool": "decode", "fromReplicas": 1,
                                                 "toReplicas": 2, "time": LATER}
    assert [(e.reason, e.message) for e in after.events] == [("Scaled", "decode: 1 -> 2 replicas")]


def test_the_pool_shows_the_policy_decision_and_the_event_gives_its_reason(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("RUNNING"))
    scaling = {"pools": {"decode": {"lastScaleDecision": {
        "pool": "decode", "current": 1, "desired": 2, "signal": "running + waiting sequences",
        "value": 20.0, "target": 8, "reason": "running + waiting sequences: 20.0 per replica > target 8",
        "at": 0.0}}}}
    before = aggregate(tiny, Observed(rs, _cluster(1, 1)), generation=1, previous=None, now=NOW)
    after = aggregate(tiny, Observed(rs, _cluster(1, 2), scaling=scaling), generation=1,
                      previous=before.status, now=LATER)
    assert after.status["decode"]["lastScaleDecision"] == {
        "fromReplicas": 1, "toReplicas": 2, "signal": "running + waiting sequences", "value": 20.0,
        "target": 8.0, "reason": "running + waiting sequences: 20.0 per replica > target 8",
        "time": "1970-01-01T00:00:00Z"}
    assert "lastScaleDecision" not in after.status["prefill"]
    assert [(e.reason, e.message) for e in after.events] == [
        ("Scaled", "decode: 1 -> 2 replicas (running + waiting sequences: 20.0 per replica > target 8)")]


def test_each_pool_shows_the_kv_connector_and_weight_format_its_replicas_resolved(tiny, kuberay_world):
    """kvTransfer.connector auto is resolved where the replicas run; the operator shows what they report."""
    rs = _rayservice(kuberay_world.status("RUNNING"))
    engine = {"device": "cpu", "kernels": "torch", "kvConnector": "gloo", "weights": "dequantized"}
    scaling = {"pools": {"prefill": {"engine": engine}, "decode": {"engine": {**engine, "weights": "fp8"}}}}
    status = aggregate(tiny, Observed(rs, _cluster(1, 1), scaling=scaling), generation=1, previous=None,
                       now=NOW).status
    assert (status["prefill"]["kvConnector"], status["decode"]["kvConnector"]) == ("gloo", "gloo")
    # model.weights auto, resolved where each pool's replicas run: they report what they hold.
    assert (status["prefill"]["weights"], status["decode"]["weights"]) == ("dequantized", "fp8")
    unreported = aggregate(tiny, Observed(rs, _cluster(1, 1)), generation=1, previous=None, now=NOW).status
    assert "kvConnector" not in unreported["decode"] and "weights" not in unreported["decode"]


def test_a_replica_serving_with_fewer_ranks_sets_degraded_with_one_event_and_clears_it(tiny, kuberay_world):
    """experts.onRankFailure degrade: a replica whose expert-parallel group lost a rank keeps serving; the
    R1Deployment stays Ready, and says Degraded (with one Warning event) until no replica reports it."""
    rs = _rayservice(kuberay_world.status("RUNNING"))
    lost = {"pools": {"decode": {"degradedReplicas": [{"replica": "abc", "ranksAlive": 3, "ranks": 4}]}}}
    update = aggregate(tiny, Observed(rs, _cluster(1, 1), scaling=lost), generation=1, previous=None, now=NOW)
    status = update.status
    assert status["decode"]["degradedReplicas"] == [{"replica": "abc", "ranksAlive": 3, "ranks": 4}]
    conditions = _conditions(status)
    assert conditions["Ready"][0] == "True" and conditions["Degraded"] == ("True", "RanksLost")
    [degraded] = [c for c in status["conditions"] if c["type"] == "Degraded"]
    assert degraded["message"] == "decode: replica abc serves with 3 of 4 ranks"
    assert [(e.type, e.reason) for e in update.events if e.reason == "RanksLost"] == [("Warning", "RanksLost")]
    again = aggregate(tiny, Observed(rs, _cluster(1, 1), scaling=lost), generation=1, previous=status, now=LATER)
    assert not [e for e in again.events if e.reason == "RanksLost"]
    replaced = aggregate(tiny, Observed(rs, _cluster(1, 1), scaling={"pools": {}}), generation=1, previous=status,
                         now=LATER).status
    assert _conditions(replaced)["Degraded"][0] == "False" and "degradedReplicas" not in replaced["decode"]


def test_kuberay_missing_fails_with_instructions(tiny):
    message = kuberay_missing_message(60)
    update = failure(tiny, reason="KubeRayNotInstalled", message=message, generation=1,
                     previous=None, now=NOW)
    assert update.status["phase"] == "Failed"
    assert _conditions(update.status)["Ready"] == ("False", "KubeRayNotInstalled")
    assert "rayservices.ray.io" in message and "helm install kuberay-operator" in message
    [event] = update.events
    assert (event.type, event.reason) == ("Warning", "KubeRayNotInstalled")
    again = failure(tiny, reason="KubeRayNotInstalled", message=message, generation=1,
                    previous=update.status, now=LATER)
    assert not again.changed and again.events == ()


def test_aggregated_deployment_reports_only_decode(kuberay_world):
    doc = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    doc["spec"]["disaggregation"] = False
    del doc["spec"]["prefill"]
    update = aggregate(load_r1deployment(doc), Observed(_rayservice(kuberay_world.status(
        "RUNNING", deployments={"Ingress": "HEALTHY", "DecodeServer": "HEALTHY"}))),
        generation=1, previous=None, now=NOW)
    assert "prefill" not in update.status and update.status["phase"] == "Ready"


def test_invalid_spec_fails_naming_the_problem():
    update = invalid_spec(["spec.prefill.replicas.min: must be <= max (1) (got 3)"],
                          generation=2, previous={"phase": "Ready"}, now=NOW)
    assert update.status["phase"] == "Failed" and update.status["observedGeneration"] == 2
    assert _conditions(update.status)["Degraded"] == ("True", "InvalidSpec")
    [event] = update.events
    assert (event.type, event.reason) == ("Warning", "InvalidSpec")
    assert "spec.prefill.replicas.min" in event.message


def test_the_operator_reads_the_scaling_status_only_from_a_running_application(tiny, kuberay_world,
                                                                               monkeypatch):
    import io
    import json

    from r1serve.operator import handlers

    asked = []

    def urlopen(url, timeout, context=None):
        asked.append((url, timeout))
        return io.BytesIO(json.dumps({"pools": {}}).encode())

    monkeypatch.setattr(handlers.urllib.request, "urlopen", urlopen)
    running = _rayservice(kuberay_world.status("RUNNING"))
    assert handlers._scaling_status(tiny, running) == {"pools": {}}
    assert asked == [("http://tiny.default.svc:8000/r1serve/v1/status", handlers.SCALING_STATUS_TIMEOUT_S)]
    assert handlers._scaling_status(tiny, _rayservice(kuberay_world.status("DEPLOYING", pending=True))) is None
    assert handlers._scaling_status(tiny, None) is None and len(asked) == 1

    def unreachable(url, timeout, context=None):
        raise OSError("connection refused")

    monkeypatch.setattr(handlers.urllib.request, "urlopen", unreachable)
    assert handlers._scaling_status(tiny, running) is None


def test_the_scaling_status_is_read_over_https_with_the_resources_own_certificate(tiny, kuberay_world, tmp_path,
                                                                                  monkeypatch):
    """With api.tls the Service answers with the resource's certificate, which the operator cannot verify (it
    reads no Secrets); it still gets the status document."""
    import http.server
    import json
    import ssl
    import threading

    from r1serve.operator import handlers
    from r1serve.runtime.serve.self_signed import write_self_signed

    write_self_signed(tmp_path, ("tiny.default.svc",))  # the Service's name, not the address dialled

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"pools": {"decode": {"running": 1}}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Status)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(handlers.render, "endpoints",
                        lambda deployment: {"http": f"https://127.0.0.1:{server.server_port}"})
    try:
        running = _rayservice(kuberay_world.status("RUNNING"))
        assert handlers._scaling_status(tiny, running) == {"pools": {"decode": {"running": 1}}}
    finally:
        server.shutdown()


def test_recovering_from_failed_is_not_a_scale_decision(tiny, kuberay_world):
    failed = failure(tiny, reason="KubeRayNotInstalled", message=kuberay_missing_message(60),
                     generation=1, previous=None, now=NOW)
    rs = _rayservice(kuberay_world.status("RUNNING"))
    recovered = aggregate(tiny, Observed(rs, _cluster(1, 2)), generation=1,
                          previous=failed.status, now=LATER)
    assert recovered.status["decode"]["desiredReplicas"] == 2
    assert "lastScaleDecision" not in recovered.status
    assert "Scaled" not in [e.reason for e in recovered.events]


def test_the_first_count_after_pending_is_not_a_scale_decision(tiny, kuberay_world):
    pending = aggregate(tiny, Observed(_rayservice(kuberay_world.status(None))), generation=1,
                        previous=None, now=NOW)
    rs = _rayservice(kuberay_world.status("RUNNING"))
    running = aggregate(tiny, Observed(rs, _cluster(1, 2)), generation=1,
                        previous=pending.status, now=LATER)
    assert "lastScaleDecision" not in running.status
    assert "Scaled" not in [e.reason for e in running.events]
    # From there on a change is one.
    scaled = aggregate(tiny, Observed(rs, _cluster(1, 3)), generation=1,
                       previous=running.status, now=LATER)
    assert scaled.status["lastScaleDecision"]["fromReplicas"] == 2
    assert [e.reason for e in scaled.events] == ["Scaled"]


def test_a_count_not_read_from_the_raycluster_is_not_a_scale_decision(tiny, kuberay_world):
    rs = _rayservice(kuberay_world.status("RUNNING"))
    before = aggregate(tiny, Observed(rs, _cluster(1, 2)), generation=1, previous=None, now=NOW)
    # The RayCluster could not be read: the count falls back to the spec's initial replicas.
    after = aggregate(tiny, Observed(rs), generation=1, previous=before.status, now=LATER)
    assert "lastScaleDecision" not in after.status and after.events == ()
    # ... and keeps the last count read, so reading the same cluster again is no scale either.
    assert after.status["decode"]["desiredReplicas"] == before.status["decode"]["desiredReplicas"]
    again = aggregate(tiny, Observed(rs, _cluster(1, 2)), generation=1, previous=after.status,
                      now=LATER)
    assert "lastScaleDecision" not in again.status and again.events == ()


def _silent_rayservice(created: str = NOW) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": "tiny", "namespace": "default", "generation": 1,
                         "creationTimestamp": created,
                         "annotations": {"r1serve.io/source-generation": "1"}}}


def test_a_rayservice_without_status_for_long_names_kuberay(tiny):
    rs = _silent_rayservice()
    waiting = aggregate(tiny, Observed(rs), generation=1, previous=None,
                        now="2026-01-01T00:01:59Z")
    assert _conditions(waiting.status)["Ready"] == ("False", "WaitingForRayCluster")
    assert status_silence_left(rs, "2026-01-01T00:01:59Z") == 1
    silent = aggregate(tiny, Observed(rs), generation=1, previous=waiting.status,
                       now="2026-01-01T00:02:00Z")
    assert silent.changed and silent.status["phase"] == "Pending"
    assert _conditions(silent.status)["Ready"] == ("False", "KubeRayNotResponding")
    [condition] = [c for c in silent.status["conditions"] if c["type"] == "Ready"]
    assert condition["message"] == (f"the RayService has had no status for "
                                    f"{RAYSERVICE_SILENCE_S:g} s: is the KubeRay operator running?")
    [event] = silent.events
    assert (event.type, event.reason) == ("Warning", "KubeRayNotResponding")
    again = aggregate(tiny, Observed(rs), generation=1, previous=silent.status, now=LATER)
    assert not again.changed and again.events == ()


def test_the_silence_threshold_is_a_parameter(tiny):
    rs = _silent_rayservice()
    update = aggregate(tiny, Observed(rs), generation=1, previous=None,
                       now="2026-01-01T00:00:05Z", silence_s=5)
    assert _conditions(update.status)["Ready"] == ("False", "KubeRayNotResponding")
    assert "no status for 5 s" in update.events[0].message
    assert update.events[0].type == "Warning"
    assert status_silence_left(rs, "2026-01-01T00:00:02Z", silence_s=5) == 3


def test_silence_ends_with_the_first_status(tiny, kuberay_world):
    rs = _silent_rayservice()
    silent = aggregate(tiny, Observed(rs), generation=1, previous=None, now=LATER)
    answered = {**rs, "status": kuberay_world.status("DEPLOYING", pending=True)}
    update = aggregate(tiny, Observed(answered), generation=1, previous=silent.status, now=LATER)
    assert update.status["phase"] == "Progressing"
    assert status_silence_left(answered, LATER) is None
    # Without a creation time there is nothing to measure from.
    assert status_silence_left({"metadata": {}}, LATER) is None
