"""Operator benchmark: time from creating R1Deployments to their children applied, and the operator's memory.

    python -P benchmarks/operator.py [--counts 100 1000] [--record]

(`-P` keeps benchmarks/ off sys.path: this file's name would shadow the standard library's
`operator` for anything imported late.) The operator runs as in its pod, `python -m
r1serve.operator`, in a child process against an in-process Kubernetes API
(tests/r1serve_testing/fake_api.py: FakeApiServer, built on kmock) that plays the API server but not
KubeRay: no RayService ever gets a status, so this measures the operator alone. N copies of
examples/tiny.yaml are created 50 at a time; an object's latency runs from its creation to the
creation of its last child (the client Service, applied after the RayService). Memory is the
operator process's resident set: idle after start-up, once every object is reconciled, and peak.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import kmock
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test-support package: the fake API server
from r1serve_testing.fake_api import R1D, api_server, eventually, write_kubeconfig  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
SECTION = "operator"
TINY = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
R1D_URL = "/apis/r1serve.io/v1alpha1/namespaces/default/r1deployments"
BATCH = 50
NOTE = ("The N objects are created within a second or two, so latency is mostly queueing: the "
        "operator drains them at the rate in the table, while the in-process API server shares "
        "the same cores. Memory grows by about 60 KiB per R1Deployment (kopf's per-object state).")


def _memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def _document(index: int) -> dict:
    doc = copy.deepcopy(TINY)
    doc["metadata"] = {"name": f"r1-{index:05d}", "namespace": "default"}
    return doc


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _start_operator(kube, workdir: Path) -> asyncio.subprocess.Process:
    kubeconfig = workdir / "kubeconfig"
    write_kubeconfig(kubeconfig, str(kube.url).rstrip("/"))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONSAFEPATH": "1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    with (workdir / "operator.log").open("w") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "r1serve.operator", "--liveness", "", env=env, cwd=workdir,
            stdout=log, stderr=asyncio.subprocess.STDOUT)
    watching = kmock.resource(R1D)
    await eventually(lambda: any(r.resource == watching and r.action == kmock.action.WATCH
                                 for r in list(kube)[-100:]),
                     timeout=120, message="the operator to watch")
    return process


async def measure(count: int) -> dict:
    """Create `count` R1Deployments and time the operator's work on them."""
    with tempfile.TemporaryDirectory() as tmp:
        async with api_server(keep_requests=500) as kube:
            process = await _start_operator(kube, Path(tmp))
            try:
                return await _run(kube, process, count)
            finally:
                # kopf says goodbye through the API on SIGTERM: keep serving while it does.
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 60)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _run(kube, process: asyncio.subprocess.Process, count: int) -> dict:
    await asyncio.sleep(1.0)  # let start-up allocations settle before the idle reading
    idle = _memory_mib(process.pid)["VmRSS"]
    start = time.monotonic()
    for first in range(0, count, BATCH):
        await asyncio.gather(*(kube.post(R1D_URL, json=_document(i))
                               for i in range(first, min(count, first + BATCH))))
    names = [f"r1-{i:05d}" for i in range(count)]
    await eventually(lambda: all(kube.live("v1/services", "default", n) for n in names),
                     timeout=1800, interval=0.2, message="every Service")
    applied = time.monotonic() - start
    await eventually(lambda: all((kube.live(R1D, "default", n) or {}).get("status")
                                 for n in names),
                     timeout=1800, interval=0.2, message="every status")
    settled = time.monotonic() - start
    memory = _memory_mib(process.pid)
    requests = kube.request_count
    latencies = [kube.created_at[("v1/services", "default", n)]
                 - kube.created_at[(R1D, "default", n)] for n in names]
    return {"count": count, "applied_s": applied, "settled_s": settled,
            "p50": statistics.median(latencies), "p90": _percentile(latencies, 0.9),
            "p99": _percentile(latencies, 0.99), "max": max(latencies),
            "idle_mib": idle, "rss_mib": memory["VmRSS"], "peak_mib": memory["VmHWM"],
            "requests_per_object": requests / count}


def _table(results: list[dict]) -> str:
    headers = ["R1Deployments", "all children applied (s)", "all statuses written (s)",
               "latency p50 / p90 / p99 / max (s)", "objects/s", "operator RSS idle / after / peak (MiB)",
               "API requests per object"]
    rows = [[r["count"], f"{r['applied_s']:.1f}", f"{r['settled_s']:.1f}",
             f"{r['p50']:.2f} / {r['p90']:.2f} / {r['p99']:.2f} / {r['max']:.2f}",
             f"{r['count'] / r['applied_s']:.0f}",
             f"{r['idle_mib']:.0f} / {r['rss_mib']:.0f} / {r['peak_mib']:.0f}",
             f"{r['requests_per_object']:.1f}"] for r in results]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}"


def _record(table: str) -> None:
    command = "python -P " + " ".join(shlex.quote(a) for a in ["benchmarks/operator.py", *sys.argv[1:]])
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    block = (f"<!-- {SECTION}:begin -->\n## Operator: R1Deployments reconciled, and memory\n\n"
             f"{table}\n\n{NOTE}\n\nCommand: `{command}`  \nMachine: {_machine()}  \n"
             f"Recorded: {stamp}\n<!-- {SECTION}:end -->")
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {SECTION}:begin -->.*?<!-- {SECTION}:end -->", re.DOTALL)
    text = (pattern.sub(lambda _: block, text) if pattern.search(text)
            else text.rstrip() + "\n\n" + block + "\n")
    README.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()
    results = [asyncio.run(measure(count)) for count in args.counts]
    table = _table(results)
    print(table)
    print(f"\nmachine: {_machine()}")
    if args.record:
        _record(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
