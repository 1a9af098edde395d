"""The traffic router under faults, with real processes: each test starts the router as
`python -m mlops_assets.servers.router router.json` in front of small upstream HTTP servers (a few
lines of asyncio, started here as their own processes on 127.0.0.1) and breaks something: kills an
upstream with requests in flight, closes keep-alive connections, sends headers that are not latin-1
or not UTF-8, deeply nested or oversized control bodies, a bad routing table, a dead revision
under a split or behind a tag. A real model server is not needed for any of it: the router only
sees HTTP, so the upstreams answer JSON naming themselves (`served_by`) and which connection and
request on it they served. Every process started here is killed when its test ends."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ISVC = "faulty"

# A tiny HTTP/1.1 keep-alive server: answers every request with JSON naming itself. Paths change how:
# /slow never answers (until killed), /partial sends headers and part of the body then stalls, /eof
# sends a close-delimited body (no content-length). Mode "close-second" closes each connection
# when the second request arrives on it, without answering (a keep-alive connection the server
# dropped: what the router's stale-connection retry is for).
UPSTREAM = r"""
import asyncio, json, sys

port, name, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
connections = 0


async def handle(reader, writer):
    global connections
    connections += 1
    conn, n = connections, 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n += 1
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            path = head.split(b" ")[1].decode()
            if mode == "close-second" and n == 2:
                break
            body = json.dumps({"served_by": name, "path": path, "connection": conn, "request_on_connection": n}).encode()
            if path.startswith("/slow"):
                await asyncio.sleep(3600)
            if path.startswith("/partial"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n" + body)
                await asyncio.sleep(3600)
            if path.startswith("/eof"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
                await writer.drain()
                for i in range(0, len(body), 7):
                    writer.write(body[i : i + 7])
                    await writer.drain()
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Upstream:
    name: str
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@dataclass
class RouterProc:
    port: int
    proc: subprocess.Popen
    log: Path

    def request(self, path: str = "/v1/models/m:predict", body: bytes = b'{"instances": [[1]]}', headers=None, method="POST"):
        """(status, response headers, body) of one request on a new connection."""
        return http_request(self.port, method, path, body, headers)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        status, _, text = self.request("/metrics", None, method="GET")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples
        }

    def post_json(self, path: str, payload) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, _, text = self.request(path, body, {"content-type": "application/json"})
        return status, json.loads(text)


def metric(samples: dict, name: str, **labels) -> float:
    """A sample's value; 0 when the router has not exposed it (e.g. a revision never ejected)."""
    return samples.get((name, frozenset({"isvc": ISVC, **labels}.items())), 0.0)


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = headers or {}
        conn.putrequest(method, path, skip_host="host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)  # bytes values go out as they are
        conn.putheader("content-length", str(len(body or b"")))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def procs():
    """Processes started by a test; all killed when it ends, whatever happened."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
        for proc in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def start_upstream(procs):
    def start(name: str, mode: str = "ok", port: int | None = None) -> Upstream:
        port = port or free_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM, str(port), name, mode], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == b"ready", f"upstream {name} did not start"
        return Upstream(name, port, proc)

    return start


def routes_for(upstreams: dict[str, Upstream | str | int], traffic: dict[str, int], tags: dict[str, str] | None = None) -> dict:
    return {
        "revisions": {name: u.url if isinstance(u, Upstream) else u for name, u in upstreams.items()},
        "traffic": [{"revision": name, "percent": pct} for name, pct in traffic.items()],
        "tags": tags or {},
    }


def launch_router(tmp_path: Path, routes: dict) -> tuple[list[str], Path]:
    port = free_port()
    (tmp_path / "routes.json").write_text(json.dumps(routes))
    config = tmp_path / "router.json"
    config.write_text(json.dumps({"isvc": ISVC, "routes_file": str(tmp_path / "routes.json"), "port": port}))
    return [sys.executable, "-m", "mlops_assets.servers.router", str(config)], tmp_path / "router.log"


@pytest.fixture
def start_router(procs, tmp_path):
    def start(routes: dict) -> RouterProc:
        cmd, log = launch_router(tmp_path, routes)
        port = json.loads(Path(cmd[-1]).read_text())["port"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"router exited: {log.read_text()}"
            try:
                if http_request(port, "GET", "/-/healthz", timeout=2)[0] == 200:
                    return RouterProc(port, proc, log)
            except OSError:
                pass
            assert time.monotonic() < deadline, "router did not come up"
            time.sleep(0.05)

    return start


def fire(router: RouterProc, n: int, concurrency: int = 8, path: str = "/v1/models/m:predict", headers=None):
    """`n` POSTs with `concurrency` in flight: (status, x-mlops-revision, served_by or None) each."""

    def one(_):
        status, resp_headers, body = router.request(path, headers=headers)
        served_by = json.loads(body).get("served_by") if status == 200 else None
        return status, resp_headers.get("x-mlops-revision"), served_by

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def assert_clean_log(router: RouterProc) -> None:
    text = router.log.read_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]


# ---- 1. an upstream that closes ------------------------------------------------------------------
def test_requests_in_flight_fail_fast_with_502_when_the_upstream_dies(start_upstream, start_router):
    a = start_upstream("a")
    router = start_router(routes_for({"a": a}, {"a": 100}))
    paths = ["/slow"] * 4 + ["/partial"] * 2  # no byte back yet / headers and part of the body

    def one(path):
        status, headers, body = router.request(path)
        return status, headers.get("x-mlops-revision"), json.loads(body), time.monotonic()

    with ThreadPoolExecutor(len(paths)) as pool:
        futures = [pool.submit(one, path) for path in paths]
        time.sleep(1.0)  # all six are at the upstream now
        assert not any(f.done() for f in futures)
        killed_at = time.monotonic()
        a.kill()
        results = [f.result(timeout=30) for f in futures]
    for status, revision, body, answered_at in results:
        assert status == 502 and revision == "a", (status, body)
        assert "a" in body["error"]
        assert answered_at - killed_at < 2.0, f"answered {answered_at - killed_at:.1f} s after the upstream died"
    assert metric(router.metrics(), "mlops_router_requests_total", revision="a", code="502") == len(paths)
    assert_clean_log(router)


def test_a_close_delimited_body_is_read_to_the_end(start_upstream, start_router):
    a = start_upstream("a")
    router = start_router(routes_for({"a": a}, {"a": 100}))
    for _ in range(3):  # each answer closes its connection; the next one opens a new one
        status, headers, body = router.request("/eof/v1/models/m:predict")
        assert status == 200 and headers["x-mlops-revision"] == "a"
        assert json.loads(body)["served_by"] == "a"
    # HEAD: the answer has no body whatever its content-length says.
    status, headers, body = router.request(method="HEAD", body=None)
    assert status == 200 and headers["x-mlops-revision"] == "a" and body == b""
    assert router.request()[0] == 200
    assert_clean_log(router)


def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(start_upstream, start_router):
    a = start_upstream("a", mode="close-second")
    router = start_router(routes_for({"a": a}, {"a": 100}))
    served = []
    for _ in range(5):
        status, _, body = router.request()
        assert status == 200, body
        served.append(json.loads(body))
    # Every request after the first went to the pooled connection, which the upstream closed
    # without answering; the router retried it on a new connection, the first request there.
    assert [s["request_on_connection"] for s in served] == [1] * 5
    assert [s["connection"] for s in served] == [1, 2, 3, 4, 5]
    samples = router.metrics()
    assert metric(samples, "mlops_router_requests_total", revision="a", code="200") == 5
    assert metric(samples, "mlops_router_ejections_total", revision="a") == 0
    assert_clean_log(router)


# ---- 2. client errors are 4xx, counted per revision --------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {"x-user-key": "ユーザー".encode()},  # valid UTF-8, not latin-1: a sticky key the split still places
        {"x-user-key": b"\xff\xfeuser"},  # not UTF-8
        {"x-trace": "€uro".encode()},  # any header
        {"x-trace": b"\xc3\x28"},  # an invalid UTF-8 sequence
    ],
    ids=["user-key-not-latin1", "user-key-not-utf8", "header-not-latin1", "header-not-utf8"],
)
def test_header_values_that_are_not_latin1_text_are_a_400_counted_per_revision(start_upstream, start_router, headers):
    a, b = start_upstream("a"), start_upstream("b")
    router = start_router(routes_for({"a": a, "b": b}, {"a": 50, "b": 50}))
    revisions = []
    for _ in range(6):
        status, resp_headers, body = router.request(headers=headers)
        assert status == 400, body
        assert "latin-1" in json.loads(body)["error"]
        revisions.append(resp_headers["x-mlops-revision"])
    assert set(revisions) <= {"a", "b"}
    if "x-user-key" in headers:
        assert len(set(revisions)) == 1  # sticky: one user, one arm
    samples = router.metrics()
    for rev in ("a", "b"):
        assert metric(samples, "mlops_router_requests_total", revision=rev, code="400") == revisions.count(rev)
        assert metric(samples, "mlops_router_requests_total", revision=rev, code="500") == 0
    # A latin-1 value sent as UTF-8 still goes through.
    status, _, _ = router.request(headers={"x-trace": "müller".encode()})
    assert status == 200
    assert_clean_log(router)


def test_deeply_nested_json_on_control_endpoints_is_a_400(start_upstream, start_router):
    a = start_upstream("a")
    router = start_router(routes_for({"a": a}, {"a": 100}))
    very_deep = b"[" * 200_000 + b"]" * 200_000  # beyond Python's recursion limit
    over_limit = json.dumps({"user_key": "u", "success": True, "x": json.loads("[" * 40 + "]" * 40)}).encode()
    for path in ("/-/feedback", "/-/drift", "/-/routes"):
        for body in (very_deep, over_limit):
            status, answer = router.post_json(path, body)
            assert status == 400 and "nested" in answer["error"], (path, answer)
    assert router.post_json("/-/feedback", {"user_key": "u", "success": True}) == (200, {"recorded": 1})
    assert router.post_json("/-/drift", {"share": 0.5, "features": {"x": 0.1}}) == (200, {"recorded": 1})
    assert router.request()[0] == 200
    assert_clean_log(router)


def test_an_oversized_control_body_is_a_413(start_upstream, start_router):
    a = start_upstream("a")
    router = start_router(routes_for({"a": a}, {"a": 100}))
    big = json.dumps([{"user_key": f"user-{i}", "success": True} for i in range(40_000)]).encode()
    assert len(big) > 1 << 20
    for path in ("/-/feedback", "/-/drift", "/-/routes"):
        status, answer = router.post_json(path, big)
        assert status == 413, (path, answer)
    # Without a content-length (chunked), the limit holds as the body arrives.
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=30)
    try:
        conn.request(
            "POST", "/-/feedback", body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]), encode_chunked=True
        )
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
    finally:
        conn.close()
    assert metric(router.metrics(), "mlops_router_feedback_total", revision="a", outcome="success") == 0
    assert_clean_log(router)


# ---- 3. a bad routing table changes nothing -------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://127.0.0.1:port",
        "http://127.0.0.1",
        "http://bad host:80",
        "ftp://127.0.0.1:80",
        8080,
    ],
)
def test_a_bad_routing_table_is_refused_whole_and_the_old_one_keeps_serving(start_upstream, start_router, url):
    a = start_upstream("a")
    router = start_router(routes_for({"a": a}, {"a": 100}))
    bad = routes_for({"a": a, "b": url}, {"a": 50, "b": 50})
    status, answer = router.post_json("/-/routes", bad)
    assert status == 400 and "'b'" in answer["error"], answer
    results = fire(router, 40)
    assert all(r == (200, "a", "a") for r in results), results
    _, _, health = router.request("/-/healthz", None, method="GET")
    assert json.loads(health)["traffic"] == [{"revision": "a", "percent": 100}]
    assert_clean_log(router)


def test_malformed_tables_of_any_shape_are_a_400(start_upstream, start_router):
    a = start_upstream("a")
    router = start_router(routes_for({"a": a}, {"a": 100}))
    for bad in (
        [],
        {"revisions": {"a": a.url}, "traffic": ["a"]},
        {"revisions": {"a": a.url}, "traffic": [{"revision": "a", "percent": True}]},
        {"revisions": {"a": a.url}, "traffic": [{"revision": "a", "percent": 100}], "tags": ["latest"]},
        {"revisions": {"a\r\nx-evil: 1": a.url}, "traffic": [{"revision": "a\r\nx-evil: 1", "percent": 100}]},
        b"not json",
    ):
        status, answer = router.post_json("/-/routes", bad)
        assert status == 400, (bad, answer)
    assert router.request()[0] == 200


def test_a_bad_routes_file_stops_the_router_at_start_with_a_clear_message(start_upstream, tmp_path):
    a = start_upstream("a")
    cmd, _ = launch_router(tmp_path, routes_for({"a": a, "b": "http://127.0.0.1:70000"}, {"a": 50, "b": 50}))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "70000" in done.stderr and "'b'" in done.stderr, done.stderr


# ---- 4. outlier ejection -----------------------------------------------------------------------
def test_a_dead_revision_is_ejected_its_traffic_served_by_the_other_and_readmitted(start_upstream, start_router):
    a, b = start_upstream("a"), start_upstream("b")
    router = start_router(routes_for({"a": a, "b": b}, {"a": 50, "b": 50}))
    warm = fire(router, 40)
    assert {r[1] for r in warm} == {"a", "b"} and all(r[0] == 200 for r in warm)
    # A user the split pins to b (sticky), to aim a request at b after the load below.
    b_user = next(
        f"user-{i}" for i in range(100) if router.request(headers={"x-user-key": f"user-{i}"})[1]["x-mlops-revision"] == "b"
    )
    warm_a = [r[1] for r in warm].count("a")

    b.kill()
    results = fire(router, 200)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    assert all(r[1] == r[2] == "a" for r in results)  # x-mlops-revision names who answered
    # b's user is served by a too; whether b's ejection was still on or just renewed by this
    # request, b is ejected right after it.
    status, headers, _ = router.request(headers={"x-user-key": b_user})
    assert status == 200 and headers["x-mlops-revision"] == "a"
    samples = router.metrics()
    assert metric(samples, "mlops_router_ejections_total", revision="b") >= 1
    assert metric(samples, "mlops_router_revision_ejected", revision="b") == 1
    assert metric(samples, "mlops_router_revision_ejected", revision="a") == 0
    assert metric(samples, "mlops_router_rerouted_requests_total", from_revision="b", to_revision="a") >= 1
    assert metric(samples, "mlops_router_requests_total", revision="a", code="200") >= 201 + warm_a
    assert not [k for k in samples if k[0] == "mlops_router_requests_total" and dict(k[1])["code"] != "200"]
    _, _, health = router.request("/-/healthz", None, method="GET")
    assert "b" in json.loads(health)["ejected"]

    # b comes back on its port: once its ejection is over it answers again and is re-admitted.
    start_upstream("b", port=b.port)
    deadline = time.monotonic() + 60
    while True:
        results = fire(router, 20, concurrency=4)
        assert all(r[0] == 200 for r in results), results
        if any(r[1] == "b" for r in results):
            break
        assert time.monotonic() < deadline, "b was never re-admitted"
        time.sleep(0.5)
    assert metric(router.metrics(), "mlops_router_revision_ejected", revision="b") == 0
    assert_clean_log(router)


def test_a_revision_moved_by_a_new_table_starts_with_a_clean_record(start_upstream, start_router):
    # What the platform does when it restarts a dead revision: a new process, a new port, a new table.
    a, b = start_upstream("a"), start_upstream("b")
    router = start_router(routes_for({"a": a, "b": b}, {"a": 50, "b": 50}))
    b.kill()
    assert all(r[:2] == (200, "a") for r in fire(router, 20))
    assert metric(router.metrics(), "mlops_router_ejections_total", revision="b") >= 1
    b2 = start_upstream("b")
    assert router.post_json("/-/routes", routes_for({"a": a, "b": b2}, {"a": 50, "b": 50}))[0] == 200
    results = fire(router, 40)
    assert all(r[0] == 200 for r in results) and {r[1] for r in results} == {"a", "b"}
    assert metric(router.metrics(), "mlops_router_revision_ejected", revision="b") == 0


def test_no_healthy_revision_left_is_a_fast_503_naming_the_revision(start_upstream, start_router):
    a, b = start_upstream("a"), start_upstream("b")
    router = start_router(routes_for({"a": a, "b": b}, {"a": 50, "b": 50}))
    assert all(r[0] == 200 for r in fire(router, 10))
    a.kill()
    b.kill()
    started = time.monotonic()
    for _ in range(20):
        status, headers, body = router.request()
        assert status == 503, body
        revision = headers["x-mlops-revision"]
        assert revision in ("a", "b") and f"revision {revision}" in json.loads(body)["error"]
    assert time.monotonic() - started < 5.0
    samples = router.metrics()
    assert (
        metric(samples, "mlops_router_requests_total", revision="a", code="503")
        + metric(samples, "mlops_router_requests_total", revision="b", code="503")
        == 20
    )
    assert metric(samples, "mlops_router_revision_ejected", revision="a") == 1
    assert metric(samples, "mlops_router_revision_ejected", revision="b") == 1
    assert_clean_log(router)


def test_a_tag_route_to_a_dead_revision_fails_fast_and_is_never_rerouted(start_upstream, start_router):
    a, b = start_upstream("a"), start_upstream("b")
    router = start_router(routes_for({"a": a, "b": b}, {"a": 100, "b": 0}, tags={"latest": "b", "prev": "a"}))
    assert json.loads(router.request("/latest/v1/models/m:predict")[2])["served_by"] == "b"
    b.kill()
    started = time.monotonic()
    for path, headers in (
        ("/latest/v1/models/m:predict", None),
        ("/v1/models/m:predict", {"x-mlops-tag": "latest"}),
        ("/v1/models/m:predict", {"host": "latest-faulty.local"}),
        ("/latest/v1/models/m:predict", None),  # b is ejected by now: still tried, still not rerouted
    ):
        status, resp_headers, body = router.request(path, headers=headers)
        assert status in (502, 503) and resp_headers["x-mlops-revision"] == "b", (status, body)
        assert "tag routes are not rerouted" in json.loads(body)["error"]
    assert time.monotonic() - started < 5.0
    # The split (all on a) is unaffected, and so is the other tag.
    assert all(r == (200, "a", "a") for r in fire(router, 20))
    assert json.loads(router.request("/prev/v1/models/m:predict")[2])["served_by"] == "a"
    samples = router.metrics()
    assert not [k for k in samples if k[0] == "mlops_router_rerouted_requests_total"]
    assert metric(samples, "mlops_router_requests_total", revision="b", code="503") == 4
    assert_clean_log(router)
