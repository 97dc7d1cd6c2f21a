"""Autoscaling policies replayed on a step-load trace: a DISCRETE-TIME SIMULATION, not a served model.

What is simulated: a disaggregated deployment (a prefill pool and a decode pool) under a Poisson
trace whose rate steps low -> high -> low. A prefill replica works through its FIFO of prompt tokens
at a fixed rate; a decode replica runs up to `max_running` sequences, one token each per step of
`step_base + step_per_seq * running` seconds. Both figures are calibrated from the tiny engine's
measurements on this CPU (benchmarks/README.md, "Serving layer": 14 ms steps at low load, 42 ms with
~58 running, prefill of a 16-128 token prompt in ~27 ms). New replicas become ready after
`startup_s`; a replica being removed takes no new requests and finishes its running ones first.

What is real: the policies, and Serve's own wrapper around them (`_apply_autoscaling_config`: up/down
delays, factors, the cold-start path) on the simulated clock. Replicas report what
`record_autoscaling_stats` reports, every second, averaged over the look-back window as Serve does.

Compared, in one run: (a) r1serve's queue-depth policies (prefill by queued prompt tokens, decode by
running + waiting sequences), (b) Ray Serve's default policy on ongoing requests per replica (its
default target of 2 for prefill; the same target as ours for decode), (c) fixed replica counts.
Reported: goodput (requests meeting TTFT <= 2 s and TPOT <= 100 ms, per second of trace),
replica-seconds, and time to react (from each load step to the first replica added / removed).

    python benchmarks/autoscale.py --record     # writes benchmarks/autoscale.png and the README section
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, record

PLOT = Path(__file__).resolve().parent / "autoscale.png"
TTFT_S, TPOT_S = 2.0, 0.100


@dataclass(frozen=True)
class Setup:
    dt: float = 0.05
    phases: tuple = ((120.0, 1.0), (240.0, 6.0), (360.0, 1.0))  # (seconds, requests/s)
    prompt_tokens: tuple = (256, 2048)
    output_tokens: tuple = (32, 256)
    prefill_tokens_per_s: float = 2500.0
    step_base: float = 0.014
    step_per_seq: float = 0.00048
    max_running: int = 16
    startup_s: float = 20.0
    bounds: tuple = (1, 4)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    look_back_s: float = 15.0  # above the 10 s metric push interval Serve checks it against
    push_s: float = 1.0
    target_queued_tokens: int = 1000  # under one mean prompt: a replica busy with one prompt is near target
    target_ongoing: int = 12
    fixed: int = 2
    seed: int = 0


@dataclass
class Request:
    arrival: float
    prompt: int
    output: int
    first_token: float | None = None
    done: float | None = None
    produced: float = 0.0


@dataclass
class Replica:
    ready_at: float
    draining: bool = False
    queue: deque = field(default_factory=deque)  # prefill: FIFO; decode: waiting
    running: list = field(default_factory=list)  # decode only
    left: float = 0.0  # prefill: tokens left of the head request
    samples: deque = field(default_factory=deque)

    def load(self, role: str) -> dict[str, float]:
        if role == "prefill":
            queued = self.left + sum(r.prompt for r in list(self.queue)[1:]) if self.queue else 0.0
            return {"queued_prompt_tokens": queued, "ongoing": float(len(self.queue))}
        n = len(self.running) + len(self.queue)
        return {"ongoing_requests": float(n), "kv_cache_usage": 0.0, "ongoing": float(n)}


class Pool:
    def __init__(self, role: str, setup: Setup, policy, initial: int, config):
        self.role, self.setup, self.policy, self.config = role, setup, policy, config
        self.replicas = [Replica(ready_at=0.0) for _ in range(initial)]
        self.target, self.state = initial, {}
        self.replica_seconds = 0.0
        self.history: list[tuple[float, int]] = []
        self.changes: list[tuple[float, int]] = []

    def ready(self, now: float) -> list[Replica]:
        return [r for r in self.replicas if r.ready_at <= now and not r.draining]

    def route(self, request: Request, now: float) -> bool:
        live = self.ready(now)
        if not live:
            return False
        best = min(live, key=lambda r: len(r.queue) + len(r.running))
        if self.role == "prefill" and not best.queue:
            best.left = request.prompt
        best.queue.append(request)
        return True

    def sample(self, now: float) -> None:
        keep = self.setup.look_back_s
        for r in self.ready(now):
            r.samples.append((now, r.load(self.role)))
            while r.samples and r.samples[0][0] < now - keep:
                r.samples.popleft()

    def decide(self, now: float) -> None:
        if self.policy is None:
            return
        live = self.ready(now)
        metrics: dict[str, dict] = {}
        for i, r in enumerate(live):
            for name in r.samples[-1][1] if r.samples else ():
                metrics.setdefault(name, {})[i] = statistics.fmean(s[1][name] for s in r.samples)
        total = sum(metrics.get("ongoing", {}).values())
        ctx = _context(self.role, len(live), self.target, metrics, total, self.setup, self.state, self.config)
        desired, self.state = self.policy(ctx)
        desired = max(self.setup.bounds[0], min(self.setup.bounds[1], int(desired)))
        if desired != self.target:
            self.changes.append((now, desired - self.target))
            self.resize(desired, now)
        self.target = desired

    def resize(self, desired: int, now: float) -> None:
        active = [r for r in self.replicas if not r.draining]
        for _ in range(desired - len(active)):
            self.replicas.append(Replica(ready_at=now + self.setup.startup_s))
        for r in sorted(active, key=lambda r: -r.ready_at)[:max(0, len(active) - desired)]:
            r.draining = True  # finishes what it holds, takes nothing new

    def account(self, now: float) -> None:
        self.replicas = [r for r in self.replicas if not (r.draining and not r.queue and not r.running)]
        self.replica_seconds += len(self.replicas) * self.setup.dt
        self.history.append((now, len(self.ready(now))))


def _context(role, current, target, metrics, total, setup: Setup, state, config):
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    name = "PrefillServer" if role == "prefill" else "DecodeServer"
    return AutoscalingContext(
        deployment_id=DeploymentID(name=name, app_name="r1serve"), deployment_name=name, app_name="r1serve",
        current_num_replicas=current, target_num_replicas=target, running_replicas=[], total_num_requests=total,
        total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=setup.bounds[0], capacity_adjusted_max_replicas=setup.bounds[1],
        policy_state=dict(state), last_scale_up_time=None, last_scale_down_time=None, current_time=None,
        config=config)


def _config(setup: Setup, target_ongoing: float):
    from ray.serve.config import AutoscalingConfig

    return AutoscalingConfig(min_replicas=setup.bounds[0], max_replicas=setup.bounds[1],
                             target_ongoing_requests=target_ongoing, upscale_delay_s=setup.upscale_delay_s,
                             downscale_delay_s=setup.downscale_delay_s, look_back_period_s=setup.look_back_s)


class Clock:
    now = 0.0

    def time(self) -> float:
        return self.now


def simulate(setup: Setup, kind: str, clock: Clock) -> dict:
    from ray.serve import autoscaling_policy as rp

    from r1serve.runtime.serve.autoscaling import DecodePolicy, PrefillPolicy

    wrap = rp._apply_autoscaling_config
    if kind == "queue-depth":
        policies = (wrap(PrefillPolicy(setup.target_queued_tokens)), wrap(DecodePolicy(setup.target_ongoing, 1.0)))
        initial = setup.bounds[0]
    elif kind == "serve-default":
        policies = (wrap(rp.replica_queue_length_autoscaling_policy),) * 2
        initial = setup.bounds[0]
    else:
        policies, initial = (None, None), setup.fixed if kind == "fixed" else setup.bounds[1]
    prefill = Pool("prefill", setup, policies[0], initial, _config(setup, 2))
    decode = Pool("decode", setup, policies[1], initial, _config(setup, setup.target_ongoing))
    rng = random.Random(setup.seed)
    arrivals = _trace(setup, rng)
    requests: list[Request] = []
    pending_prefill: deque = deque()
    handed: deque = deque()
    end = sum(p[0] for p in setup.phases)
    now, next_push = 0.0, 0.0
    while now < end or any(r.done is None for r in requests):
        clock.now = now
        while arrivals and arrivals[0].arrival <= now:
            requests.append(arrivals[0])
            pending_prefill.append(arrivals.popleft())
        _dispatch(prefill, pending_prefill, now)
        _prefill_step(prefill, handed, now, setup)
        _dispatch(decode, handed, now)
        _decode_step(decode, now, setup)
        if now >= next_push:
            for pool in (prefill, decode):
                pool.sample(now)
                pool.decide(now)
            next_push += setup.push_s
        for pool in (prefill, decode):
            pool.account(now)
        now = round(now + setup.dt, 6)
        if now > end + 600:
            break
    return _report(kind, setup, requests, prefill, decode, end)


def _trace(setup: Setup, rng: random.Random) -> deque:
    out, start = deque(), 0.0
    for seconds, rate in setup.phases:
        t = start + rng.expovariate(rate)
        while t < start + seconds:
            out.append(Request(t, rng.randint(*setup.prompt_tokens), rng.randint(*setup.output_tokens)))
            t += rng.expovariate(rate)
        start += seconds
    return out


def _dispatch(pool: Pool, waiting: deque, now: float) -> None:
    while waiting and pool.route(waiting[0], now):
        waiting.popleft()


def _prefill_step(pool: Pool, handed: deque, now: float, setup: Setup) -> None:
    for r in pool.replicas:
        if r.ready_at > now:
            continue
        budget = setup.prefill_tokens_per_s * setup.dt
        while r.queue and budget > 0:
            used = min(budget, r.left)
            r.left -= used
            budget -= used
            if r.left <= 1e-9:
                request = r.queue.popleft()
                request.first_token = now + setup.dt
                handed.append(request)
                r.left = r.queue[0].prompt if r.queue else 0.0


def _decode_step(pool: Pool, now: float, setup: Setup) -> None:
    for r in pool.replicas:
        if r.ready_at > now:
            continue
        while r.queue and len(r.running) < setup.max_running:
            r.running.append(r.queue.popleft())
        if not r.running:
            continue
        tokens = setup.dt / (setup.step_base + setup.step_per_seq * len(r.running))
        for request in r.running:
            request.produced += tokens
            if request.produced >= request.output - 1:
                request.done = now + setup.dt
        r.running = [q for q in r.running if q.done is None]


def _reaction(pool: Pool, at: float, sign: int) -> float | None:
    later = [t - at for t, delta in pool.changes if t >= at and delta * sign > 0]
    return round(min(later), 1) if later else None


def _report(kind: str, setup: Setup, requests: list[Request], prefill: Pool, decode: Pool, end: float) -> dict:
    good = 0
    for r in requests:
        if r.done is None or r.first_token is None:
            continue
        tpot = (r.done - r.first_token) / max(1, r.output - 1)
        good += (r.first_token - r.arrival) <= TTFT_S and tpot <= TPOT_S
    up_at = setup.phases[0][0]
    down_at = up_at + setup.phases[1][0]
    ttft = sorted(r.first_token - r.arrival for r in requests if r.first_token is not None)
    return {
        "kind": kind, "requests": len(requests), "good": good, "goodput": good / end,
        "replica_s": prefill.replica_seconds + decode.replica_seconds,
        "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))] if ttft else None,
        "react_up": (_reaction(prefill, up_at, 1), _reaction(decode, up_at, 1)),
        "react_down": (_reaction(prefill, down_at, -1), _reaction(decode, down_at, -1)),
        "history": (prefill.history, decode.history),
    }


def plot(results: list[dict], setup: Setup) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, index, role in ((axes[0], 0, "prefill"), (axes[1], 1, "decode")):
        for result in results:
            history = result["history"][index][::20]
            ax.step([t for t, _ in history], [n for _, n in history], where="post", label=result["kind"])
        ax.set_ylabel(f"{role} replicas (ready)")
        ax.grid(alpha=0.3)
    start = 0.0
    for seconds, rate in setup.phases:
        axes[0].axvspan(start, start + seconds, alpha=0.05 * rate, color="grey")
        axes[0].text(start + 5, setup.bounds[1] + 0.2, f"{rate:g} req/s", fontsize=8)
        start += seconds
    axes[0].set_ylim(0, setup.bounds[1] + 0.8)
    axes[1].set_xlabel("time (s) - simulated")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle("Step load low -> high -> low: replicas per pool (discrete-time simulation)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the table and plot into benchmarks/README.md")
    args = parser.parse_args(argv)
    from ray.serve import autoscaling_policy as rp

    setup, clock = Setup(), Clock()
    real_time, rp.time = rp.time, clock  # Serve's delay logic reads time.time(): run it on the simulated clock
    try:
        results = [simulate(setup, kind, clock) for kind in ("queue-depth", "serve-default", "fixed", "fixed-max")]
    finally:
        rp.time = real_time
    names = {"queue-depth": "(a) r1serve queue-depth", "serve-default": "(b) Serve default (ongoing requests)",
             "fixed": f"(c) fixed {setup.fixed}+{setup.fixed} replicas",
             "fixed-max": f"(c') fixed {setup.bounds[1]}+{setup.bounds[1]} (peak-sized)"}
    rows = [[names[r["kind"]], f"{r['good']}/{r['requests']}", f"{r['goodput']:.2f}", f"{r['replica_s']:.0f}",
             f"{r['ttft_p90']:.2f}", "/".join("-" if v is None else f"{v:g}" for v in r["react_up"]),
             "/".join("-" if v is None else f"{v:g}" for v in r["react_down"])] for r in results]
    table = markdown_table(["policy", "good/total requests", "goodput req/s", "replica-seconds", "TTFT p90 s",
                            "react up s (prefill/decode)", "react down s (prefill/decode)"], rows)
    print(table)
    plot(results, setup)
    if args.record:
        phases = ", ".join(f"{rate:g} req/s for {s:g} s" for s, rate in setup.phases)
        body = (f"## Autoscaling: step load replayed against the policies (simulation)\n\n"
                f"A discrete-time simulation, not a served model (see the script's docstring): the policies and "
                f"Serve's delay wrapper are the real code on a simulated clock; replica service times are "
                f"calibrated from the tiny engine's figures above. Trace: Poisson, {phases}; prompts "
                f"{setup.prompt_tokens[0]}-{setup.prompt_tokens[1]} tokens, outputs {setup.output_tokens[0]}-"
                f"{setup.output_tokens[1]}. Pools {setup.bounds[0]}-{setup.bounds[1]} replicas, replicas ready "
                f"{setup.startup_s:g} s after being asked for, upscale/downscale delay {setup.upscale_delay_s:g}/"
                f"{setup.downscale_delay_s:g} s, look-back {setup.look_back_s:g} s. Targets: "
                f"{setup.target_queued_tokens} queued prompt tokens and {setup.target_ongoing} sequences per "
                f"replica; Serve's default policy uses its default target of 2 ongoing requests for prefill and "
                f"{setup.target_ongoing} for decode. Goodput counts requests with TTFT <= {TTFT_S:g} s and "
                f"TPOT <= {TPOT_S * 1000:g} ms. Time to react: seconds from each load step to the first "
                f"replica added (up) or removed (down); \"-\" means none.\n\n{table}\n\n![replicas per pool]"
                f"(autoscale.png)")
        record("autoscale", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
