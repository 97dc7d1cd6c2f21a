"""Faults on the local graph, each bounded in time: a KV hand-off that is lost or times out fails its requests
cleanly with UNAVAILABLE and both pools free their blocks; a decode replica, a prefill replica or one rank of a
replica's expert-parallel group killed while requests stream: every affected stream ends promptly with
UNAVAILABLE, or continues elsewhere: retried as it was when it had produced nothing yet, resumed after the
tokens it had sent otherwise; every stream that completes has exactly the tokens of an undisturbed run, Serve
replaces the replica, and new requests succeed."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc
from r1serve.runtime.serve import client, pipeline
from r1serve.spec import constants as C

pytestmark = pytest.mark.slow
REQUESTS = 8
BOUND_S = 30.0
GROW_BACK_S = 10.0  # experts.growBackIntervalSeconds where a test waits for a group to grow back


def request(tokens: int = 8, text: str = "tell me a story") -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))


def run(target: str, req: pb.GenerateRequest,
        first_token: threading.Event | None = None) -> tuple[str, list[int], float]:
    """(final status, token ids received, seconds); `first_token` is set when the first token arrives."""
    start, tokens = time.monotonic(), []
    with grpc.insecure_channel(target) as channel:
        try:
            for response in pb_grpc.InferenceStub(channel).Generate(req, metadata=client.METADATA, timeout=120):
                tokens += response.token_ids
                if first_token is not None and tokens:
                    first_token.set()
            return "OK", tokens, time.monotonic() - start
        except grpc.RpcError as exc:
            return exc.code().name, tokens, time.monotonic() - start


def wait_until(condition, timeout_s: float, message: str):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {message}"
        time.sleep(0.1)
    return value


def wait_idle(graph, timeout_s: float = BOUND_S) -> float:
    start = time.monotonic()
    while True:
        stats = {pool: graph.stats(pool) for pool in ("prefill", "decode")}
        if all(s["running"] == 0 and s["kv_blocks_used"] == 0 for s in stats.values()):
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, stats
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["lost", "timeout"])
def test_failed_kv_handoff_fails_cleanly_and_frees_both_pools(cluster, docs, mode, reliability):
    doc = docs.tiny()
    doc["spec"]["kvTransfer"]["timeoutSeconds"] = 1.0
    cluster.deploy(doc, {"kind": "mock", "token_delay_s": 0.01, "kv_fault": mode})
    start = time.monotonic()
    with ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(lambda _: run(cluster.grpc_target, request()), range(REQUESTS)))
    duration = time.monotonic() - start
    freed = wait_idle(cluster)
    statuses = [r[0] for r in results]
    reliability(f"fault-kv-handoff-{mode}", "fault", what=f"KV hand-off {mode} (injected in the decode "
                f"replica's connector, kvTransfer.timeoutSeconds 1): {REQUESTS} concurrent requests; both "
                f"pools back to 0 KV blocks", requests=REQUESTS, failed=REQUESTS - statuses.count("UNAVAILABLE"),
                failures=f"{statuses.count('UNAVAILABLE')} UNAVAILABLE (expected), slowest "
                f"{max(r[2] for r in results):.1f} s", duration_s=duration, recovery_s=freed)
    assert statuses == ["UNAVAILABLE"] * REQUESTS
    # Each is sent again while the Ingress's retries last (pipeline.RETRIES), every attempt lost the same way.
    retries_s = sum(min(pipeline.RETRY_BACKOFF_S * (a + 1), pipeline.MAX_RETRY_BACKOFF_S)
                    for a in range(pipeline.RETRIES))
    assert all(r[2] < BOUND_S + retries_s for r in results)


def _replica_actor(deployment: str = C.DECODE_DEPLOYMENT):
    """(handle, name) of the deployment's one live replica actor (Serve names replicas after their deployment)."""
    import ray

    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]]
    return ray.get_actor(name, namespace="serve"), name


def _decode_actor():
    return _replica_actor(C.DECODE_DEPLOYMENT)


def test_killed_decode_replica_resumes_its_streams_elsewhere_and_is_replaced(cluster, docs, reliability):
    """Streams of the killed replica had output: the Ingress resumes each (prompt plus the tokens already
    sent) on the replacement; the client sees no error, no repeated and no missing token."""
    import ray

    cluster.deploy(docs.tiny(), {"kind": "mock", "token_delay_s": 0.05})
    assert run(cluster.grpc_target, request(4))[0] == "OK"
    undisturbed = run(cluster.grpc_target, request(400))
    assert undisturbed[0] == "OK" and len(undisturbed[1]) == 400
    handle, old_id = _decode_actor()
    started = [threading.Event() for _ in range(REQUESTS)]
    with ThreadPoolExecutor(REQUESTS) as pool:
        futures = [pool.submit(run, cluster.grpc_target, request(400), event) for event in started]
        wait_until(lambda: all(e.is_set() for e in started), BOUND_S, "every stream's first token")
        killed_at = time.monotonic()
        ray.kill(handle, no_restart=True)
        results = [f.result(timeout=BOUND_S + 30) for f in futures]
    ended_after = time.monotonic() - killed_at
    # Serve notices the dead replica and starts another; a new request then succeeds.
    recovery_start = time.monotonic()
    while True:
        status = run(cluster.grpc_target, request(4))[0]
        try:
            _, new_id = _decode_actor()
        except ValueError:
            new_id = None
        if status == "OK" and new_id not in (None, old_id):
            break
        assert time.monotonic() - recovery_start < 120, status
        time.sleep(0.5)
    recovery = time.monotonic() - killed_at
    wrong = [r for r in results if (r[0], r[1]) != ("OK", undisturbed[1])]
    reliability("fault-decode-replica-killed", "fault", what=f"decode replica actor killed (ray.kill) while "
                f"{REQUESTS} streams of 400 tokens were running; then a new request", requests=REQUESTS,
                failed=len(wrong), failures="none: every stream was resumed on the replacement after the tokens "
                f"it had sent and completed equal to an undisturbed run, the last {ended_after:.1f} s after the "
                "kill" if not wrong else ", ".join(f"{r[0]} after {len(r[1])} tokens" for r in wrong),
                duration_s=ended_after, recovery_s=recovery)
    assert not wrong, [(r[0], len(r[1])) for r in wrong]
    assert ended_after < BOUND_S + 90
    wait_idle(cluster, 60)


def test_requests_sent_as_the_decode_replica_dies_are_retried_transparently(cluster, docs, reliability):
    """Requests that reach the dead replica before any output are sent again by the Ingress and complete."""
    import ray

    cluster.deploy(docs.tiny(), {"kind": "mock", "token_delay_s": 0.05})
    wait_idle(cluster, 60)
    handle, _ = _decode_actor()
    ray.kill(handle, no_restart=True)
    start = time.monotonic()
    with ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(lambda _: run(cluster.grpc_target, request(8)), range(REQUESTS)))
    statuses = [r[0] for r in results]
    reliability("fault-decode-killed-before-first-token", "fault", what=f"decode replica killed, then {REQUESTS} "
                "requests sent at once (none has an output yet): the Ingress retries them on the replacement",
                requests=REQUESTS, failed=REQUESTS - statuses.count("OK"),
                failures=", ".join(s for s in statuses if s != "OK") or "none",
                duration_s=time.monotonic() - start, recovery_s=max(r[2] for r in results))
    assert statuses == ["OK"] * REQUESTS, statuses
    assert all(len(r[1]) == 8 for r in results)


def _wait_replaced(cluster, deployment: str, old_name: str, timeout_s: float = 120.0) -> None:
    """Until Serve runs a replica other than `old_name` and a new request succeeds through it."""
    def replaced() -> bool:
        try:
            _, name = _replica_actor(deployment)
        except ValueError:  # none, or the old one and its replacement at once
            return False
        return name != old_name and run(cluster.grpc_target, request(4))[0] == "OK"

    wait_until(replaced, timeout_s, f"a replacement {deployment} replica that serves")


def test_killed_prefill_replica_spares_decoding_streams_and_retries_prefilling_ones(cluster, docs, reliability):
    """Streams already decoding do not touch the prefill pool again and finish intact; requests sitting in the
    killed prefill replica have produced nothing, so the Ingress retries them on its replacement."""
    import ray

    decoding, prefilling = REQUESTS, 4
    cluster.deploy(docs.tiny(), {"kind": "mock", "token_delay_s": 0.05, "prefill_delay_s": 3.0})
    wait_idle(cluster, 60)
    long, short = request(200, "a long story"), request(8, "a short story")
    expected = {200: run(cluster.grpc_target, long)[1], 8: run(cluster.grpc_target, short)[1]}
    assert [len(expected[200]), len(expected[8])] == [200, 8]
    handle, old_name = _replica_actor(C.PREFILL_DEPLOYMENT)
    started = [threading.Event() for _ in range(decoding)]
    with ThreadPoolExecutor(decoding + prefilling) as pool:
        streams = [pool.submit(run, cluster.grpc_target, long, event) for event in started]
        wait_until(lambda: all(e.is_set() for e in started), BOUND_S, "every long stream's first token")
        waiting = [pool.submit(run, cluster.grpc_target, short) for _ in range(prefilling)]
        wait_until(lambda: cluster.stats("prefill")["running"] == prefilling, BOUND_S,
                   "the short requests inside the prefill replica")
        killed_at = time.monotonic()
        ray.kill(handle, no_restart=True)
        retried = [f.result(timeout=BOUND_S + 60) for f in waiting]
        retried_after = time.monotonic() - killed_at
        spared = [f.result(timeout=BOUND_S + 60) for f in streams]
    _wait_replaced(cluster, C.PREFILL_DEPLOYMENT, old_name)
    recovery = time.monotonic() - killed_at
    results = spared + retried
    wrong = [r for r, n in zip(results, [200] * decoding + [8] * prefilling) if (r[0], r[1]) != ("OK", expected[n])]
    reliability("fault-prefill-replica-killed", "fault", what=f"prefill replica actor killed (ray.kill) while "
                f"{decoding} streams of 200 tokens were decoding and {prefilling} requests sat in its prefill; "
                "then a new request", requests=len(results), failed=len(wrong),
                failures=f"none: the {decoding} decoding streams completed unchanged, the {prefilling} prefilling "
                f"requests were retried on the replacement and completed {retried_after:.1f} s after the kill"
                if not wrong else ", ".join(f"{r[0]} after {len(r[1])} tokens" for r in wrong),
                duration_s=retried_after, recovery_s=recovery)
    assert not wrong, [(r[0], len(r[1])) for r in wrong]
    assert retried_after < BOUND_S + 60
    wait_idle(cluster, 60)


def _running_decode_replicas() -> set[str]:
    """Names of the decode replica actors, once every one of them is RUNNING in Serve's eyes (empty while a
    replica is starting or stopping: its actor exists but it does not serve)."""
    import ray
    from ray import serve

    running = serve.status().applications[C.SERVE_APP_NAME].deployments[C.DECODE_DEPLOYMENT].replica_states.get(
        "RUNNING", 0)
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"#{C.DECODE_DEPLOYMENT}#" in a["name"]}
    return names if len(names) == running else set()


def _rank_actors(replica_name: str) -> list[dict]:
    """The live expert-parallel rank actors a replica started (Ray records each actor's owner's address)."""
    import ray

    actors = [a for a in ray.state.actors().values() if a["State"] == "ALIVE"]
    [replica] = [a for a in actors if a["Name"] == replica_name]
    return [a for a in actors if a["ActorClassName"] == "_RankActor"
            and a["OwnerAddress"]["Port"] == replica["Address"]["Port"]]


def _streams_killing(cluster, story, rank_actor: dict) -> tuple[list, float]:
    """REQUESTS streams of `story` at once; `rank_actor` SIGKILLed once each has its first token. Returns every
    stream's (status, tokens, seconds) and when the kill happened."""
    started = [threading.Event() for _ in range(REQUESTS)]
    with ThreadPoolExecutor(REQUESTS) as pool:
        futures = [pool.submit(run, cluster.grpc_target, story, event) for event in started]
        wait_until(lambda: all(e.is_set() for e in started), 60, "every stream's first token")
        killed_at = time.monotonic()
        os.kill(rank_actor["Pid"], signal.SIGKILL)
        return [f.result(timeout=120) for f in futures], killed_at


def test_killed_expert_parallel_rank_fails_its_replica_and_its_streams_resume_on_the_other_replica(
        cluster, docs, served_checkpoint, reliability):
    """Real engine, one pool of two replicas, each an EP group of 2 ranks, experts.onRankFailure: restart. SIGKILL
    one rank of one replica: the group fails its streams within seconds (its other rank never finishes the step,
    the group watches its ranks), the Ingress resumes each on the other replica after the tokens it had sent, and
    every stream completes with exactly the greedy tokens of an undisturbed run; Serve's health check replaces the
    failed replica, and new requests succeed."""
    import ray

    doc = docs.single_pool()
    doc["spec"]["decode"].update(replicas={"min": 2, "max": 2}, expertParallel=2)
    doc["spec"].setdefault("experts", {})["onRankFailure"] = "restart"
    doc["spec"]["decode"]["autoscaling"] = {"targetOngoingRequests": 4}
    doc["spec"]["workers"] = {"resources": {"cpu": "1", "memory": "1Gi"}}
    cluster.deploy(doc)
    tokens = 120
    story = request(tokens, "the expert-parallel story")
    reference = run(cluster.grpc_target, story)
    assert reference[0] == "OK" and len(reference[1]) == tokens
    replicas = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == "serve" and f"#{C.DECODE_DEPLOYMENT}#" in a["name"])
    assert len(replicas) == 2
    victim_replica = replicas[0]
    victim = wait_until(lambda: _rank_actors(victim_replica), BOUND_S, "the replica's rank actors")
    assert len(victim) == 2
    results, killed_at = _streams_killing(cluster, story, victim[1])
    ended_after = time.monotonic() - killed_at
    wait_until(lambda: len(names := _running_decode_replicas()) == 2 and victim_replica not in names, 180,
               "Serve to replace the failed replica")
    recovery = time.monotonic() - killed_at
    assert run(cluster.grpc_target, story)[1] == reference[1]
    # The failed replica's surviving rank went with it: no rank actor outlives its replica.
    states = {a["ActorID"]: a["State"] for a in ray.state.actors().values()}
    assert {states[rank["ActorID"]] for rank in victim} == {"DEAD"}
    wrong = [r for r in results if (r[0], r[1]) != ("OK", reference[1])]
    reliability("fault-ep-rank-killed", "fault", what=f"one of the 2 ranks of one decode replica's expert-parallel "
                f"group SIGKILLed while {REQUESTS} greedy streams of {tokens} tokens ran on 2 replicas (real tiny "
                "model); then new requests", requests=REQUESTS, failed=len(wrong),
                failures="none: the failed replica's streams were resumed on the other replica after the tokens "
                f"they had sent; all {REQUESTS} completed equal to an undisturbed run, the last "
                f"{ended_after:.1f} s after the kill" if not wrong else
                ", ".join(f"{r[0]} after {len(r[1])} tokens" for r in wrong),
                duration_s=max(r[2] for r in results), recovery_s=recovery)
    assert not wrong, [(r[0], len(r[1]), r[1] == reference[1][:len(r[1])]) for r in wrong]
    assert ended_after < BOUND_S + 60
    assert all(len(r[1]) < tokens for r in results if r[0] == "UNAVAILABLE")


def test_killed_expert_parallel_rank_is_left_behind_and_its_replica_serves_every_stream_on_then_grows_back(
        cluster, docs, served_checkpoint, reliability):
    """Real engine, one replica, an EP group of 2 ranks, experts.onRankFailure: degrade with the headroom to hold
    every expert on one rank. SIGKILL one rank mid-stream: the replica is not replaced; the survivor forms a group
    of one, loads the lost experts, and every stream completes with exactly the greedy tokens of an undisturbed
    run; the replica says it serves with 1 of 2 ranks (stats and `r1serve status`), and takes new requests. After
    experts.growBackIntervalSeconds the lost rank starts again in its bundle and the replica serves with both."""
    import httpx

    doc = docs.single_pool()
    doc["spec"]["decode"].update(replicas={"min": 1, "max": 1}, expertParallel=2)
    doc["spec"].setdefault("experts", {}).update(onRankFailure="degrade", failoverHeadroomSlots=8,
                                                 growBackIntervalSeconds=GROW_BACK_S)
    doc["spec"]["workers"] = {"resources": {"cpu": "1", "memory": "1Gi"}}
    cluster.deploy(doc)
    tokens = 120
    story = request(tokens, "the expert-parallel story goes on")
    reference = run(cluster.grpc_target, story)
    assert reference[0] == "OK" and len(reference[1]) == tokens
    [replica] = wait_until(_running_decode_replicas, BOUND_S, "the decode replica")
    victim = wait_until(lambda: _rank_actors(replica), BOUND_S, "the replica's rank actors")
    assert len(victim) == 2
    results, killed_at = _streams_killing(cluster, story, victim[1])
    ended_after = time.monotonic() - killed_at
    wrong = [r for r in results if (r[0], r[1]) != ("OK", reference[1])]
    stats = cluster.stats("decode")

    def degraded_replicas():
        return httpx.get(f"{cluster.http_url}{C.SCALING_STATUS_ROUTE}", timeout=30).json()[
            "pools"]["decode"]["degradedReplicas"]

    what = (f"one of the 2 ranks of the decode replica's expert-parallel group SIGKILLed while {REQUESTS} greedy "
            f"streams of {tokens} tokens ran (real tiny model, experts.onRankFailure degrade, "
            f"growBackIntervalSeconds {GROW_BACK_S:g}); then new requests")
    if wrong:
        reliability("fault-ep-rank-left-behind", "fault", what=what, requests=REQUESTS, failed=len(wrong),
                    failures=", ".join(f"{r[0]} after {len(r[1])} tokens" for r in wrong),
                    duration_s=max(r[2] for r in results), recovery_s=ended_after)
    assert not wrong, [(r[0], len(r[1]), r[1] == reference[1][:len(r[1])]) for r in wrong]
    status = wait_until(degraded_replicas, BOUND_S, "the replica to report itself degraded")
    assert _running_decode_replicas() == {replica}  # not replaced
    assert (stats["ranks_alive"], stats["ranks"]) == (1, 2)
    assert status == [{"replica": status[0]["replica"], "ranksAlive": 1, "ranks": 2}]
    assert run(cluster.grpc_target, story)[1] == reference[1]
    # Growing back: a new rank actor in the lost one's bundle, the same replica serving with both ranks.
    wait_until(lambda: cluster.stats("decode")["ranks_alive"] == 2, GROW_BACK_S + BOUND_S + 60,
               "the replica's group to grow back")
    grown_after = time.monotonic() - killed_at
    assert _running_decode_replicas() == {replica}
    ranks = _rank_actors(replica)
    assert len(ranks) == 2 and victim[1]["ActorID"] not in {r["ActorID"] for r in ranks}
    assert run(cluster.grpc_target, story)[1] == reference[1]
    wait_until(lambda: not degraded_replicas(), BOUND_S, "the replica to stop reporting itself degraded")
    reliability("fault-ep-rank-left-behind", "fault", what=what, requests=REQUESTS, failed=0,
                failures="none: the survivor went on alone with every expert; all streams completed equal to an "
                f"undisturbed run, the last {ended_after:.1f} s after the kill, on the same replica, which grew "
                f"back to 2 ranks {grown_after:.1f} s after the kill", duration_s=max(r[2] for r in results),
                recovery_s=grown_after)


# Hand-offs rank to rank over gloo, real engine, expert parallelism on both sides: the decode replica holds every
# ticket for connector.HELD_S before its rank reads the latents, so the tests can fail either side while
# tickets are issued and their latents wait on the prefill ranks.
KV_TIMEOUT_S = 10.0


def _gloo_graph(cluster, docs) -> None:
    cluster.deploy(docs.tiny(kvTransfer={"connector": "gloo", "timeoutSeconds": KV_TIMEOUT_S}), {"kv_fault": "held"})


def _tickets_in_transfer(cluster, count: int) -> None:
    wait_until(lambda: cluster.stats("decode")["handoffs_receiving"] == count, BOUND_S,
               f"{count} hand-offs held by the decode replica")
    assert cluster.stats("prefill")["handoff_bytes_waiting"] > 0  # their latents wait on the prefill ranks


@pytest.mark.parametrize("killed", ["prefill", "decode"])
def test_a_replica_killed_with_gloo_tickets_in_transfer_loses_no_request_and_strands_no_kv(cluster, docs, killed,
                                                                                       reliability):
    """prefill: its ranks die with it, so the decode rank's read of each ticket fails (a transfer error, the
    link to the dead rank dropped) and the Ingress sends the request again. decode: the requests fail before
    any output and are sent again; the abandoned tickets' latents are freed on the prefill ranks when
    kvTransfer.timeoutSeconds passes. Either way every request completes with the undisturbed tokens, and
    both pools end with no used blocks and no parked latents."""
    import ray

    _gloo_graph(cluster, docs)
    wait_idle(cluster, 60)
    story = request(24, "the hand-off story")
    undisturbed = run(cluster.grpc_target, story)
    assert undisturbed[0] == "OK" and len(undisturbed[1]) == 24
    deployment = C.PREFILL_DEPLOYMENT if killed == "prefill" else C.DECODE_DEPLOYMENT
    handle, old_name = _replica_actor(deployment)
    count = 4
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(run, cluster.grpc_target, story) for _ in range(count)]
        _tickets_in_transfer(cluster, count)
        killed_at = time.monotonic()
        ray.kill(handle, no_restart=True)
        results = [f.result(timeout=180) for f in futures]
    ended_after = time.monotonic() - killed_at
    _wait_replaced(cluster, deployment, old_name, 180)
    wait_until(lambda: cluster.stats("prefill")["handoff_bytes_waiting"] == 0, KV_TIMEOUT_S + BOUND_S,
               "no latents parked on the prefill ranks")
    recovery = time.monotonic() - killed_at
    wait_idle(cluster, 60)
    wrong = [r for r in results if (r[0], r[1]) != ("OK", undisturbed[1])]
    reliability(f"fault-gloo-{killed}-killed-in-transfer", "fault", what=f"{killed} replica killed (ray.kill) while "
                f"{count} gloo hand-offs were in transfer (tickets issued, latents parked on the prefill ranks; "
                "real tiny model, expert parallelism on both sides)", requests=count, failed=len(wrong),
                failures="none: each was sent again and completed equal to an undisturbed run, the last "
                f"{ended_after:.1f} s after the kill; no blocks used and no latents parked afterwards"
                if not wrong else ", ".join(f"{r[0]} after {len(r[1])} tokens" for r in wrong),
                duration_s=ended_after, recovery_s=recovery)
    assert not wrong, [(r[0], len(r[1])) for r in wrong]
