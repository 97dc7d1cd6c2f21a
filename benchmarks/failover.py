"""From an expert-parallel rank's death to serving again: a group that goes on without the rank
(experts.onRankFailure: degrade) against starting a whole new group (what restart costs at the least); then
what growing back to the full size costs the streams running meanwhile.

    python benchmarks/failover.py [--ranks 4] [--requests 8] [--tokens 48] [--timeouts 3,10] [--headroom 2]
                                  [--record]

A group of `--ranks` CPU ranks (gloo, local processes) runs the tiny random checkpoint; `--requests` greedy
streams start at once and one rank is SIGKILLed once the first has streamed 4 tokens. For each collective
timeout the table splits the time from the kill until the group serves again: until the group hears of the loss,
until every survivor has reported (a survivor that was waiting on another survivor, not on the dead rank, waits
out its collective timeout), and forming the new group (rendezvous, placement, loading the lost experts). It
also gives the gap each moved request saw between its last token before the kill and its next one, and checks
that every stream finished with the tokens of an undisturbed run. The baseline, measured in the same run: the
start-up of a new group of the same size, which a replaced replica needs before its first token (Serve's own
replacement adds its health-check period and the replica's scheduling on top).

Growing back (experts.growBackIntervalSeconds, 1 s here): while `--requests` fresh streams run, the lost rank
is started again, loads its model, and every rank switches to the full group at one step boundary. The second
table gives the time from the respawn to the full group, the switch itself (survivors leave, join, take their
experts), the longest gap a stream saw across the switch against its median gap between tokens, and whether
every stream still equals an undisturbed run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record  # noqa: E402

from r1serve.runtime.engine.engine import EngineConfig  # noqa: E402
from r1serve.runtime.engine.sampling import SamplingParams  # noqa: E402
from r1serve.runtime.model.tiny import make_tiny  # noqa: E402
from r1serve.runtime.parallel.group import ExpertParallelGroup  # noqa: E402
from r1serve.runtime.parallel.layout import Failover  # noqa: E402

SECTION = "failover"
ENGINE = EngineConfig(num_blocks=512, block_size=16, max_running=64)
KILL_AFTER = 4


GROW_BACK_S = 1.0


def start(checkpoint: str, ranks: int, timeout_s: float, headroom: int) -> tuple[ExpertParallelGroup, float]:
    began = time.monotonic()
    group = ExpertParallelGroup.in_processes(checkpoint, ranks, engine=ENGINE, timeout_s=timeout_s,
                                             failover=Failover(headroom_slots=headroom),
                                             grow_back_interval_s=GROW_BACK_S)
    return group, time.monotonic() - began


async def streams(group, requests: int, tokens: int, victim: int | None, prefix: str = "s"
                  ) -> tuple[dict, float | None, dict]:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    killed: dict[str, float] = {}
    arrivals: dict[str, list[float]] = {}

    async def one(i: int):
        request_id = f"{prefix}{i}"
        out_tokens, times = [], []
        async for out in group.generate(request_id, list(range(100 + 5 * i, 130 + 5 * i)), params):
            if out.error:
                raise RuntimeError(f"{request_id}: {out.error}")
            out_tokens += out.token_ids
            times.append(time.monotonic())
            if i == 0 and victim is not None and not killed and len(out_tokens) >= KILL_AFTER:
                os.kill(group._transport.procs[victim].pid, signal.SIGKILL)
                killed["at"] = time.monotonic()
        arrivals[request_id] = times
        return f"s{i}", out_tokens

    results = dict(await asyncio.gather(*(one(i) for i in range(requests))))
    return results, killed.get("at"), arrivals


def grow_back_row(group, requests: int, tokens: int, reference: dict) -> list[str]:
    """Fresh streams until the group has grown back (their tokens against the reference's first ones)."""
    rounds = []
    while not group.regrowths:
        results, _, arrivals = asyncio.run(streams(group, requests, tokens, None, prefix=f"g{len(rounds)}-"))
        rounds.append((results, arrivals))
        if len(rounds) > 60:
            raise RuntimeError("the group did not grow back")
    [grew] = group.regrowths
    results, arrivals = rounds[-1]
    equal = sum(results[r] == reference[r][:tokens] for r in results)
    across, usual = [], []
    for times in arrivals.values():
        gaps = [(a, b - a) for a, b in zip(times, times[1:])]
        usual += [g for _, g in gaps]
        across += [g for a, g in gaps if a <= grew["served_at"] and a + g >= grew["sent_at"]]
    return [f"{grew['seconds']:.2f} s", f"{grew['starting_seconds']:.2f} s", f"{grew['switching_seconds']:.2f} s",
            f"{max(across):.2f} s" if across else "— (between streams)", f"{statistics.median(usual):.3f} s",
            f"{equal}/{len(results)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--timeouts", default="3,10", help="collective timeouts to compare, in seconds")
    parser.add_argument("--headroom", type=int, default=2, help="experts.failoverHeadroomSlots")
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()
    timeouts = [float(t) for t in args.timeouts.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(make_tiny(Path(tmp) / "tiny", seed=7))
        rows, grow_rows = [], []
        for timeout_s in timeouts:
            reference_group, startup_s = start(checkpoint, args.ranks, timeout_s, args.headroom)
            try:
                reference, _, _ = asyncio.run(streams(reference_group, args.requests, args.tokens, None))
            finally:
                reference_group.shutdown()
            group, _ = start(checkpoint, args.ranks, timeout_s, args.headroom)
            try:
                results, killed_at, arrivals = asyncio.run(streams(group, args.requests, args.tokens, 1))
                [reform] = group.reforms
                grow_rows.append([f"{timeout_s:g} s", *grow_back_row(group, args.requests, args.tokens, reference)])
            finally:
                group.shutdown()
            equal = sum(results[r] == reference[r] for r in reference)
            gaps = [max((b - a for a, b in zip(times, times[1:]) if a <= reform["served_at"] and b >= killed_at),
                        default=0.0)
                    for times in arrivals.values() if any(t > reform["served_at"] for t in times)]
            to_serving = reform["served_at"] - killed_at
            rows.append([f"{timeout_s:g} s", f"{reform['detected_at'] - killed_at:.2f} s",
                         f"{reform['reporting_seconds']:.2f} s", f"{reform['forming_seconds']:.2f} s",
                         f"{reform['experts_loaded']}", f"**{to_serving:.2f} s**",
                         f"{statistics.median(gaps):.2f} / {max(gaps):.2f} s", f"{startup_s:.2f} s",
                         f"{startup_s / to_serving:.2f}x", f"{equal}/{len(reference)}"])

    headers = ["collective timeout", "kill → loss heard", "→ every survivor reported", "→ formed, experts loaded",
               "experts loaded", "kill → serving", "stream gap at the kill (median / max)",
               "new group start-up (baseline)", "start-up / degrade", "streams equal to undisturbed"]
    table = markdown_table(headers, rows)
    print(table)
    grow_table = markdown_table(
        ["collective timeout", "respawn → full group", "→ respawned rank loaded", "→ every rank switched",
         "longest stream gap across the switch", "median gap between tokens", "streams equal to undisturbed"],
        grow_rows)
    print(grow_table)
    if args.record:
        record(SECTION, "## Expert-parallel failover: going on without a dead rank vs a new group\n\n"
               f"{args.ranks} CPU ranks (gloo, local processes), tiny random checkpoint, {args.requests} greedy "
               f"streams of {args.tokens} tokens; rank 1 SIGKILLed after {KILL_AFTER} tokens of the first; "
               f"experts.failoverHeadroomSlots {args.headroom}.\n\n" + table + "\n\n"
               "What dominates: waiting for every survivor to report. Survivors that exchange with the dead rank "
               "fail at once (connection reset); one that was waiting on another survivor is not woken when that "
               "survivor leaves the broken group (gloo keeps the failed group's links open) and waits out the "
               "collective timeout. Forming the new group and loading the lost experts is a small share.\n\n"
               f"Growing back ({GROW_BACK_S:g} s after the loss), {args.requests} fresh streams running:\n\n"
               + grow_table + "\n\n"
               "What dominates: the respawned rank building its model (a process start and the checkpoint's "
               "non-expert weights). The streams do not wait for that; they pause only for the switch, while "
               "every rank leaves its group, joins the full one and takes the experts the new placement gives it "
               "(read ahead on a thread while it kept serving).")


if __name__ == "__main__":
    main()
