"""Traffic-router overhead: latency and throughput of the aiohttp router vs the model server directly.

What it measures: the cost of `mlops_assets/serving/router.py` (the local KServe-style traffic
router, an aiohttp reverse proxy with Prometheus counters) in front of one KServe model server
(`mlops_assets/serving/model_server.py`) serving the real `fraud_detector` MLflow model.

Baseline: the same requests sent straight to the model server's port (no router). Both paths
hit the same model-server process, so `added = routed - direct` is what the router costs.
Targets: p50 added <= 1 ms and throughput ratio (routed / direct) >= 0.9.

How:
* Set-up uses the project's own code: train and register `fraud_detector` (5,000 rows) in a
  temporary MLflow, `LocalPlatform.apply()` an InferenceService, which starts the model server
  and the router as the platform does in production-like local runs. `stop_all()` always runs.
* Body: `v1_payload()` of one row of `generate_fraud_data(1, seed=1)`, POSTed as JSON.
* (a) Latency: one keep-alive `http.client` connection per target, sequential requests, strictly
  interleaved per request (direct, routed, then routed, direct, ...) so that drift, GC and noise
  from other processes fall on both paths equally; warm-up first, then PAIRS of each. p50 and p99
  per path; added = routed - direct (the median of the paired differences is printed as a check).
* (b) Throughput: closed-loop load, CONCURRENCY requests in flight, for DURATION seconds per
  phase, in the order direct, routed, routed, direct (ABBA, so a linear drift cancels), each phase
  preceded by a short warm-up at the same concurrency (the router opens its upstream pool then).
  requests/s per path = all requests of its two phases / their time; ratio = routed / direct.

Fairness on 2 cores: the model server is CPU-bound (one process, ~1 core at saturation), and the
router and the load generator share what is left, so the load generator must be cheap or it, not
the router, decides the result. `wrk` (C, epoll; ~1% of a core here) is used when on PATH
(`apt-get install wrk`); otherwise (or with `--client python`) a pure-Python closed loop on aiohttp
`ClientSession` + `TCPConnector` under uvloop (~3% of a core at this request rate). Either way the
generator stays far below the spare core, which is verified: CPU used by the router, the model
server and the client is read from /proc during each phase and printed as ms of CPU per request.
The router's CPU per request is the most direct measure of its cost: it is what the router would
take away from model servers on a fully loaded node. We do not pin processes to cores (taskset):
the platform does not, and pinning would hide the contention the router really causes.

Run: python bench/router_overhead.py [--pairs 2500] [--duration 10] [--concurrency 16] [--client auto|wrk|python]
Final line: router_overhead p50_added_ms=<x> p99_added_ms=<y> throughput_ratio=<router/direct>
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- helpers ------------------------------------------------------------------------------------
def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_s() -> float:
    return time.process_time()


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def established_to(port: int) -> int:
    """Number of ESTABLISHED loopback TCP connections whose remote end is `port`."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        remote, state = parts[2], parts[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            n += 1
    return n


def uses_uvloop(pid: int) -> bool:
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class CpuMeter:
    """CPU used by the router, the model server and this process (the client) over a phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.c0 = {k: cpu_s(p) for k, p in self.pids.items()}
        self.s0 = self_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.used = {k: cpu_s(p) - self.c0[k] for k, p in self.pids.items()}
        self.used["client"] = self_cpu_s() - self.s0

    def add_external_client(self, seconds: float) -> None:
        self.used["client"] = self.used.get("client", 0.0) + seconds

    def per_request_ms(self, requests: int) -> str:
        return " ".join(f"{k}={v / max(requests, 1) * 1e3:.3f}" for k, v in self.used.items())

    def percent(self) -> str:
        return " ".join(f"{k}={v / self.elapsed * 100:.0f}%" for k, v in self.used.items())


# ---- set-up -------------------------------------------------------------------------------------
def start_service():
    from mlops_assets import processes
    from mlops_assets.models.data import FEATURES, generate_fraud_data
    from mlops_assets.models.registry import MlflowRegistry
    from mlops_assets.models.training import train_and_register
    from mlops_assets.serving.manifest import Deployment, build_inference_service
    from mlops_assets.serving.payloads import v1_payload
    from mlops_assets.serving.platform import LocalPlatform

    home = tempfile.mkdtemp(prefix="mlops-router-bench-")
    os.makedirs(f"{home}/mlflow")
    platform = LocalPlatform(home=home)
    try:
        t0 = time.perf_counter()
        reg = MlflowRegistry(tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db", artifact_root=f"{home}/mlflow/artifacts")
        v = train_and_register(reg, "fraud_detector", n_rows=5000)
        t1 = time.perf_counter()
        status = platform.apply(
            build_inference_service(Deployment(model_name="fraud_detector", version=v.version, storage_uri=v.download_uri))
        )
        t2 = time.perf_counter()
        revision = status.latest_rolledout
        port = status.revisions[revision]["port"]
        directory = Path(home) / "serving" / status.name
        router_rec = processes.read_record(directory / "router.pid")
        model_rec = processes.read_record(directory / "revisions" / f"{revision}.pid")
        frame = generate_fraud_data(1, seed=1)[FEATURES]
        svc = {
            "home": home,
            "direct": f"http://127.0.0.1:{port}/v1/models/fraud-detector:predict",
            "routed": status.predict_url("v1"),
            "body": json.dumps(v1_payload(frame)).encode(),
            "model_port": port,
            "pids": {"router": router_rec.pid, "model_server": model_rec.pid},
        }
        print(f"set-up: trained+registered v{v.version} in {t1 - t0:.1f}s, platform.apply in {t2 - t1:.1f}s")
        print(f"direct: {svc['direct']}\nrouted: {svc['routed']}")
        print(f"router pid {router_rec.pid} (uvloop loaded: {uses_uvloop(router_rec.pid)}), model server pid {model_rec.pid}")
        return platform, svc
    except BaseException:
        platform.stop_all()
        shutil.rmtree(home, ignore_errors=True)
        raise


# ---- (a) latency --------------------------------------------------------------------------------
class KeepAlive:
    def __init__(self, url: str, body: bytes) -> None:
        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.path, self.body = u.path, body
        self.headers = {"content-type": "application/json", "connection": "keep-alive"}

    def post(self) -> tuple[float, int, http.client.HTTPResponse]:
        t0 = time.perf_counter()
        self.conn.request("POST", self.path, self.body, self.headers)
        resp = self.conn.getresponse()
        resp.read()
        return time.perf_counter() - t0, resp.status, resp

    def close(self) -> None:
        self.conn.close()


def latency(svc: dict, pairs: int, warmup: int) -> tuple[float, float]:
    direct, routed = KeepAlive(svc["direct"], svc["body"]), KeepAlive(svc["routed"], svc["body"])
    try:
        for _ in range(warmup):
            direct.post()
            routed.post()
        _, _, r = routed.post()
        _, _, d = direct.post()
        assert r.getheader("x-mlops-revision") and not d.getheader("x-mlops-revision"), "routed path must go through the router"
        upstream_before = established_to(svc["model_port"]) - 1  # minus our own direct connection
        lat = {"direct": [], "routed": []}
        bad = 0
        with CpuMeter(svc["pids"]) as meter:
            for i in range(pairs):
                order = (("direct", direct), ("routed", routed)) if i % 2 == 0 else (("routed", routed), ("direct", direct))
                for name, client in order:
                    dt, code, _ = client.post()
                    bad += code != 200
                    lat[name].append(dt)
        upstream_after = established_to(svc["model_port"]) - 1
    finally:
        direct.close()
        routed.close()
    if bad:
        raise SystemExit(f"{bad} non-200 responses during the latency run")
    diffs = sorted(r - d for d, r in zip(lat["direct"], lat["routed"]))
    stats = {}
    print(f"\n(a) latency: {pairs} sequential keep-alive requests per path, interleaved per request, after {warmup} warm-up each")
    for name in ("direct", "routed"):
        s = sorted(lat[name])
        stats[name] = (percentile(s, 50) * 1e3, percentile(s, 99) * 1e3)
        print(f"  {name:6s}: p50={stats[name][0]:.3f} ms  p90={percentile(s, 90) * 1e3:.3f} ms  p99={stats[name][1]:.3f} ms"
              f"  mean={statistics.fmean(s) * 1e3:.3f} ms")
    p50_added = stats["routed"][0] - stats["direct"][0]
    p99_added = stats["routed"][1] - stats["direct"][1]
    print(f"  added : p50={p50_added:.3f} ms  p99={p99_added:.3f} ms  (median of paired differences {percentile(diffs, 50) * 1e3:.3f} ms)")
    print(f"  CPU ms per routed+direct pair: {meter.per_request_ms(pairs)}  (the router works only for the routed half)")
    print(f"  router->model-server keep-alive connections: {upstream_before} before, {upstream_after} after the run")
    return p50_added, p99_added


# ---- (b) throughput -----------------------------------------------------------------------------
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_run(url: str, body: bytes, concurrency: int, duration: float, script: Path) -> dict:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--latency", "-s", str(script), url]
    before = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    after = os.times()
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {q: float(v) * _WRK_UNITS[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    return {
        "requests": total - (int(bad.group(1)) if bad else 0),
        "errors": (int(bad.group(1)) if bad else 0),
        "socket_errors": errors.group(1) if errors else "",
        "p50_ms": lat.get("50", float("nan")),
        "p99_ms": lat.get("99", float("nan")),
        "client_cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system),
    }


async def _aiohttp_load(url: str, body: bytes, concurrency: int, duration: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json"}) as session:
        stop = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with session.post(url, data=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "socket_errors": "",
        "p50_ms": percentile(latencies, 50) * 1e3 if latencies else float("nan"),
        "p99_ms": percentile(latencies, 99) * 1e3 if latencies else float("nan"),
        "client_cpu_s": 0.0,  # counted by CpuMeter as this process's own CPU
    }


def python_run(url: str, body: bytes, concurrency: int, duration: float) -> dict:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_aiohttp_load(url, body, concurrency, duration))


def throughput(svc: dict, client: str, concurrency: int, duration: float, warmup_s: float) -> float:
    use_wrk = client == "wrk" or (client == "auto" and shutil.which("wrk"))
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--client wrk but wrk is not on PATH (apt-get install wrk)")
    script = Path(svc["home"]) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(svc['body'].decode())}\n"
    )

    def one(url: str, seconds: float) -> dict:
        if use_wrk:
            return wrk_run(url, svc["body"], concurrency, seconds, script)
        return python_run(url, svc["body"], concurrency, seconds)

    print(f"\n(b) throughput: closed loop, {concurrency} in flight, {duration:g}s per phase, order direct/routed/routed/direct, "
          f"client={'wrk' if use_wrk else 'python aiohttp+uvloop'}")
    totals = {"direct": [0, 0.0], "routed": [0, 0.0]}
    for name in ("direct", "routed", "routed", "direct"):
        one(svc[name], warmup_s)
        with CpuMeter(svc["pids"]) as meter:
            res = one(svc[name], duration)
        meter.add_external_client(res["client_cpu_s"])
        if res["errors"] or res["socket_errors"]:
            print(f"  WARNING {name}: {res['errors']} non-200, socket errors: {res['socket_errors']}")
        totals[name][0] += res["requests"]
        totals[name][1] += meter.elapsed
        print(f"  {name:6s}: {res['requests'] / meter.elapsed:7.1f} req/s  p50={res['p50_ms']:.2f} ms p99={res['p99_ms']:.2f} ms"
              f"  CPU {meter.percent()}  CPU ms/request {meter.per_request_ms(res['requests'])}")
    rps = {k: n / t for k, (n, t) in totals.items()}
    ratio = rps["routed"] / rps["direct"]
    print(f"  overall: direct={rps['direct']:.1f} req/s routed={rps['routed']:.1f} req/s ratio={ratio:.3f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2500, help="timed sequential requests per path")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per path before the latency run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput phase")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="seconds of warm-up load before each throughput phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    args = parser.parse_args()

    # SIGTERM (e.g. `timeout`) must still reach the finally below that stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"router_overhead: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    platform, svc = start_service()
    try:
        p50_added, p99_added = latency(svc, args.pairs, args.warmup)
        ratio = throughput(svc, args.client, args.concurrency, args.duration, args.warmup_s)
    finally:
        stopped = platform.stop_all()
        shutil.rmtree(svc["home"], ignore_errors=True)
        print(f"\nstopped: {', '.join(stopped)}")
    verdict = "met" if p50_added <= 1.0 and ratio >= 0.9 else "NOT met"
    print(f"targets (p50 added <= 1 ms, throughput ratio >= 0.9): {verdict}")
    print(f"router_overhead p50_added_ms={p50_added:.3f} p99_added_ms={p99_added:.3f} throughput_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
