"""The engine's HTTP helper against a real server on 127.0.0.1: answers of every status come back,
and every way of not answering is one `HttpUnavailableError`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlops_assets.core import http
from mlops_assets.core.http import HttpUnavailableError
from mlops_assets.core.processes import free_port

RELEASE = threading.Event()  # set at teardown: handlers that stall stop stalling


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("X-Probe", "yes")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/ok":
            self._send(200, b'{"status": "success", "n": 3}')
        elif self.path == "/missing":
            self._send(404, b'{"error": "no such thing"}')
        elif self.path == "/broken":
            self._send(503, b"<html><body>upstream down</body></html>", "text/html")
        elif self.path == "/html":
            self._send(200, b"<!doctype html><html><body>login</body></html>", "text/html")
        elif self.path == "/garbage":
            self._send(200, b"\xff\xfe\x00not json")
        elif self.path == "/truncated":
            self._send(200, b'{"status": "succ', length=4096)  # then the connection closes
        elif self.path == "/stall":
            RELEASE.wait(10)  # the client has given up by then: nothing to send
        elif self.path == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"{")
            self.wfile.flush()
            RELEASE.wait(10)

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        echo = {"method": "POST", "content_type": self.headers.get("Content-Type"), "body": data.decode()}
        self._send(201 if self.path == "/created" else 422 if self.path == "/refuse" else 200, json.dumps(echo).encode())

    def do_DELETE(self):
        self._send(204, b"")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    RELEASE.clear()
    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        httpd.block_on_close = False  # the stalled handlers are released below, not joined
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
        RELEASE.set()
        httpd.shutdown()


@pytest.fixture
def closed_port() -> int:
    return free_port()  # free: nothing listens there


def test_a_2xx_answer_with_status_headers_and_body(server):
    response = http.request(f"{server}/ok", timeout=5)
    assert response.ok and response.status == 200
    assert response.headers["content-type"] == "application/json" and response.headers["x-probe"] == "yes"
    assert response.json() == {"status": "success", "n": 3}
    assert http.get_json(f"{server}/ok", timeout=5) == {"status": "success", "n": 3}


def test_json_bodies_are_posted_with_their_content_type(server):
    echo = http.post_json(f"{server}/created", {"share": 0.5}, timeout=5)
    assert echo == {"method": "POST", "content_type": "application/json", "body": '{"share": 0.5}'}
    # A body without a method is a POST (as urllib does); an explicit method wins.
    assert http.request(f"{server}/echo", body=b"", timeout=5).json()["method"] == "POST"
    assert http.request(f"{server}/gone", method="DELETE", timeout=5).status == 204
    own = http.request(f"{server}/echo", json_body=[1], headers={"content-type": "application/x-ndjson"}, timeout=5)
    assert own.json()["content_type"] == "application/x-ndjson"


@pytest.mark.parametrize(("path", "status"), [("/missing", 404), ("/broken", 503)])
def test_4xx_and_5xx_are_answers_not_errors(server, path, status):
    response = http.request(f"{server}{path}", timeout=5)
    assert not response.ok and response.status == status
    assert response.body  # the error page is read, not lost
    with pytest.raises(HttpUnavailableError, match=f"answered HTTP {status}") as info:
        http.get_json(f"{server}{path}", timeout=5)
    assert info.value.status == status


def test_a_refused_post_is_an_answer_too(server):
    assert http.request(f"{server}/refuse", json_body={}, timeout=5).status == 422
    with pytest.raises(HttpUnavailableError, match="answered HTTP 422"):
        http.post_json(f"{server}/refuse", {}, timeout=5)


def test_a_refused_connection_is_unavailable(closed_port):
    url = f"http://127.0.0.1:{closed_port}/ok"
    with pytest.raises(HttpUnavailableError, match=f"GET {url}: URLError: .*[Rr]efused") as info:
        http.request(url, timeout=5)
    assert info.value.status is None
    assert isinstance(info.value, OSError)  # callers' `except OSError` keeps covering it


def test_a_server_that_does_not_answer_in_time_is_unavailable(server):
    with pytest.raises(HttpUnavailableError, match="timed out"):
        http.request(f"{server}/stall", timeout=0.3)


def test_a_body_that_stops_arriving_is_unavailable(server):
    with pytest.raises(HttpUnavailableError, match="timed out"):
        http.request(f"{server}/slow-body", timeout=0.3)


def test_a_truncated_body_is_unavailable(server):
    with pytest.raises(HttpUnavailableError, match="IncompleteRead"):
        http.request(f"{server}/truncated", timeout=5)


@pytest.mark.parametrize("path", ["/html", "/garbage"])
def test_html_or_garbage_where_json_is_asked_is_unavailable(server, path):
    response = http.request(f"{server}{path}", timeout=5)
    assert response.ok  # a plain request takes any body ...
    with pytest.raises(HttpUnavailableError, match="not JSON") as info:
        http.get_json(f"{server}{path}", timeout=5)  # ... JSON is asked for here
    assert info.value.status == 200


@pytest.mark.parametrize("url", ["", "/metrics", "http://127.0.0.1:notaport/"])
def test_a_url_that_cannot_be_sent_is_unavailable(url):
    with pytest.raises(HttpUnavailableError):
        http.request(url, timeout=1)
