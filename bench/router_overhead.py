"""Traffic-router overhead: latency and throughput of the aiohttp router vs the model server directly.

What it measures: the cost of `mlops_assets/servers/router.py` (the local KServe-style traffic
router, an aiohttp reverse proxy with Prometheus counters) in front of one KServe model server
(`mlops_assets/servers/model_server.py`) serving the real `fraud_detector` MLflow model.

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
* (b) Throughput: closed-loop load, CONCURRENCY (16) requests in flight, which saturates the
  model server, after a short warm-up per path (the router opens its upstream pool then). Phases
  of DURATION seconds run in ROUNDS rounds of direct, routed, routed, direct (ABBA, so a linear
  drift cancels within each round). requests/s per path = all its requests / all its phase time;
  ratio = routed / direct (the per-round ratios are printed too). Why 3 rounds of 4 s rather
  than 2 x 10 s: on this VM the model server's own CPU cost per request drifts by 10-20% over
  tens of seconds (seen with direct-only phases too), so more, shorter alternations average that
  out better for the same time.

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

Reading the numbers: the model server needs ~8 ms of CPU per 1-row request (pandas + the sklearn
pipeline), so it saturates one core at ~120-130 req/s and the throughput ratio mainly tells
whether the router takes CPU away from it; its per-phase rate varies by several percent on its
own, hence the ABBA order. The sequential latency is the sensitive figure: every routed request
wakes the (idle) router twice, and on this 2-vCPU VM a wake-up of a cold process is expensive.

Experiment: `--compare bench/router_tuned.py` also starts another router implementation on the
same routes file and measures it as a third path ("candidate") in the same interleaved rounds and
ABBA phases (A B C C B A); the final line still describes the project's router.

Run: python bench/router_overhead.py [--pairs 2000] [--duration 4] [--rounds 3] [--concurrency 16] [--client auto|wrk|python]
                                     [--compare bench/router_tuned.py]
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
import urllib.request
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
    from mlops_assets.core import processes
    from mlops_assets.core.registry import MlflowRegistry
    from mlops_assets.core.serving.manifest import Deployment, build_inference_service
    from mlops_assets.core.serving.payloads import v1_payload
    from mlops_assets.core.serving.platform import LocalPlatform
    from mlops_assets.demo.data import FEATURES, generate_fraud_data
    from mlops_assets.demo.training import train_and_register

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


def latency(svc: dict, paths: list[str], pairs: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Sequential requests, interleaved per request across `paths`; returns {path: (p50_ms, p99_ms)}."""
    clients = {name: KeepAlive(svc[name], svc["body"]) for name in paths}
    try:
        for _ in range(warmup):
            for client in clients.values():
                client.post()
        for name, client in clients.items():
            _, _, resp = client.post()
            assert bool(resp.getheader("x-mlops-revision")) == (name != "direct"), f"{name}: wrong path (x-mlops-revision)"
        upstream_before = established_to(svc["model_port"]) - 1  # minus our own direct connection
        lat: dict[str, list[float]] = {name: [] for name in paths}
        bad = 0
        with CpuMeter(svc["pids"]) as meter:
            for i in range(pairs):
                k = i % len(paths)  # rotate the order so that every path takes every position equally
                for name in paths[k:] + paths[:k]:
                    dt, code, _ = clients[name].post()
                    bad += code != 200
                    lat[name].append(dt)
        upstream_after = established_to(svc["model_port"]) - 1
    finally:
        for client in clients.values():
            client.close()
    if bad:
        raise SystemExit(f"{bad} non-200 responses during the latency run")
    print(f"\n(a) latency: {pairs} sequential keep-alive requests per path, interleaved per request, after {warmup} warm-up each")
    stats = {}
    for name in paths:
        s = sorted(lat[name])
        stats[name] = (percentile(s, 50) * 1e3, percentile(s, 99) * 1e3)
        print(
            f"  {name:9s}: p50={stats[name][0]:.3f} ms  p90={percentile(s, 90) * 1e3:.3f} ms  p99={stats[name][1]:.3f} ms"
            f"  mean={statistics.fmean(s) * 1e3:.3f} ms"
        )
    for name in paths[1:]:
        diffs = sorted(r - d for d, r in zip(lat["direct"], lat[name], strict=True))
        p50, p99 = stats[name][0] - stats["direct"][0], stats[name][1] - stats["direct"][1]
        paired = percentile(diffs, 50) * 1e3
        print(f"  added by {name}: p50={p50:.3f} ms  p99={p99:.3f} ms  (median of paired differences {paired:.3f} ms)")
    print(f"  CPU ms per round of {len(paths)} requests: {meter.per_request_ms(pairs)}  (each router serves 1 request per round)")
    print(f"  keep-alive connections from routers to the model server: {upstream_before} before, {upstream_after} after the run")
    return stats


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


def throughput(
    svc: dict, paths: list[str], client: str, concurrency: int, duration: float, rounds: int, warmup_s: float
) -> dict[str, float]:
    """Closed-loop load per path; `rounds` ABBA rounds of `duration`-second phases. Returns {path: requests/s}."""
    use_wrk = client == "wrk" or (client == "auto" and shutil.which("wrk"))
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--client wrk but wrk is not on PATH (apt-get install wrk)")
    script = Path(svc["home"]) / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(svc["body"].decode())}\n'
    )

    def one(url: str, seconds: float) -> dict:
        if use_wrk:
            return wrk_run(url, svc["body"], concurrency, seconds, script)
        return python_run(url, svc["body"], concurrency, seconds)

    order = paths + paths[::-1]
    print(
        f"\n(b) throughput: closed loop, {concurrency} in flight, {rounds} rounds of {'/'.join(order)}, {duration:g}s per phase, "
        f"client={'wrk' if use_wrk else 'python aiohttp+uvloop'}"
    )
    for name in paths:  # the router opens its upstream connections here
        one(svc[name], warmup_s)
    totals = {name: [0, 0.0] for name in paths}
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        this_round = {name: [0, 0.0] for name in paths}
        for name in order:
            with CpuMeter(svc["pids"]) as meter:
                res = one(svc[name], duration)
            meter.add_external_client(res["client_cpu_s"])
            if res["errors"] or res["socket_errors"]:
                print(f"  WARNING {name}: {res['errors']} non-200, socket errors: {res['socket_errors']}")
            for acc in (totals[name], this_round[name]):
                acc[0] += res["requests"]
                acc[1] += meter.elapsed
            print(
                f"  r{r + 1} {name:9s}: {res['requests'] / meter.elapsed:6.1f} req/s  p50={res['p50_ms']:.1f} ms "
                f"p99={res['p99_ms']:.1f} ms  CPU {meter.percent()}  CPU ms/request {meter.per_request_ms(res['requests'])}"
            )
        per_round.append({name: n / t for name, (n, t) in this_round.items()})
    rps = {name: n / t for name, (n, t) in totals.items()}
    for name in paths[1:]:
        ratios = [rr[name] / rr["direct"] for rr in per_round]
        print(f"  {name}/direct per round: {' '.join(f'{x:.3f}' for x in ratios)}  (median {statistics.median(ratios):.3f})")
    print(
        "  overall: "
        + " ".join(f"{name}={v:.1f} req/s" for name, v in rps.items())
        + "  ratios: "
        + " ".join(f"{name}/direct={rps[name] / rps['direct']:.3f}" for name in paths[1:])
    )
    return rps


# ---- a candidate router (experiments) -----------------------------------------------------------
def start_candidate(svc: dict, script: str) -> subprocess.Popen:
    """Run another router implementation (e.g. bench/router_tuned.py) on the platform's routes."""
    from mlops_assets.core import processes

    directory = Path(svc["home"]) / "serving" / "fraud-detector"
    port = processes.free_port()
    config = Path(svc["home"]) / "candidate.json"
    config.write_text(json.dumps({"isvc": "fraud-detector", "routes_file": str(directory / "routes.json"), "port": port}))
    log = open(Path(svc["home"]) / "candidate.log", "wb")
    proc = subprocess.Popen([sys.executable, script, str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"candidate router {script} did not start; see {log.name}") from None
            time.sleep(0.2)
    svc["candidate"] = f"http://127.0.0.1:{port}/v1/models/fraud-detector:predict"
    svc["pids"]["candidate"] = proc.pid
    print(f"candidate: {script} on port {port}, pid {proc.pid} (uvloop loaded: {uses_uvloop(proc.pid)})")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="timed sequential requests per path")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per path before the latency run")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per throughput phase")
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds of throughput phases")
    parser.add_argument(
        "--warmup-s", type=float, default=2.0, help="seconds of warm-up load per path before the throughput phases"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--compare",
        metavar="ROUTER_SCRIPT",
        help="also measure another router implementation, e.g. bench/router_tuned.py (experiment)",
    )
    args = parser.parse_args()

    # SIGTERM (e.g. `timeout`) must still reach the finally below that stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"router_overhead: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    platform, svc = start_service()
    candidate = None
    try:
        paths = ["direct", "routed"]
        if args.compare:
            candidate = start_candidate(svc, args.compare)
            paths.append("candidate")
        lat = latency(svc, paths, args.pairs, args.warmup)
        rps = throughput(svc, paths, args.client, args.concurrency, args.duration, args.rounds, args.warmup_s)
    finally:
        if candidate is not None:
            candidate.terminate()
            try:
                candidate.wait(10)
            except subprocess.TimeoutExpired:
                candidate.kill()
                candidate.wait()
        stopped = platform.stop_all()
        shutil.rmtree(svc["home"], ignore_errors=True)
        print(f"\nstopped: {', '.join(stopped + (['candidate'] if candidate is not None else []))}")
    p50_added = lat["routed"][0] - lat["direct"][0]
    p99_added = lat["routed"][1] - lat["direct"][1]
    ratio = rps["routed"] / rps["direct"]
    if candidate is not None:
        c50, c99, cratio = (
            lat["candidate"][0] - lat["direct"][0],
            lat["candidate"][1] - lat["direct"][1],
            rps["candidate"] / rps["direct"],
        )
        print(f"candidate {args.compare}: p50_added_ms={c50:.3f} p99_added_ms={c99:.3f} throughput_ratio={cratio:.3f}")
    verdict = "met" if p50_added <= 1.0 and ratio >= 0.9 else "NOT met"
    print(f"project router, targets (p50 added <= 1 ms, throughput ratio >= 0.9): {verdict}")
    print(f"router_overhead p50_added_ms={p50_added:.3f} p99_added_ms={p99_added:.3f} throughput_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
