"""The engine's one HTTP client: small requests to the project's own servers (routers, model servers,
the payload sink) and to Prometheus, with the standard library only.

An answer is an answer whatever its status: `request` returns 4xx and 5xx as a `Response`, and the
caller decides what a status means (a readiness probe's 503 is "not ready", a smoke request's 400 is
data). Everything that is not an answer (refused, reset, timed out, a malformed URL, a body cut
short, or, from `get_json` / `post_json`, bytes that are not JSON) is one `HttpUnavailableError`.

The router's own upstream pool (servers/router.py, httptools) is separate on purpose: it sits on the
serving path, where this client's one-connection-per-request costs too much.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class HttpUnavailableError(OSError):
    """No usable HTTP answer. An OSError, as urllib's own URLError is, so that callers which treat
    an unreachable server as `OSError` (probes, smoke traffic, best-effort flushes) keep doing so."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        #: The HTTP status when a server did answer, but not with what `get_json` / `post_json` need.
        self.status = status


# Every way urllib fails to deliver an answer, caught in this one place. OSError covers URLError,
# refused and reset connections, DNS failures and socket timeouts (during connect or while reading
# the body); http.client.HTTPException covers a body cut short (IncompleteRead) and a status line
# that is not HTTP; ValueError is a URL urllib cannot even send (an empty or relative one, a bad
# port), which for a caller is as unusable as a refused connection.
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, ValueError)


@dataclass(frozen=True)
class Response:
    url: str
    status: int
    #: Header names in lower case.
    headers: dict[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def checked(self) -> Response:
        """This answer if it is a 2xx; else `HttpUnavailableError` (for callers that need a success)."""
        if not self.ok:
            raise HttpUnavailableError(f"{self.url} answered HTTP {self.status}: {self.text[:200].strip()}", self.status)
        return self

    def json(self) -> Any:
        """The body as JSON; `HttpUnavailableError` if it is not (an HTML error page, garbage)."""
        try:
            return json.loads(self.body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            start = self.text[:80].strip()
            raise HttpUnavailableError(f"the answer is not JSON ({exc}): {start!r}", self.status) from exc


def request(
    url: str,
    *,
    timeout: float,
    method: str | None = None,
    body: bytes | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One request; the answer whatever its status. `method` defaults to POST with a body, GET without;
    `json_body` is sent as JSON (with its content type). `HttpUnavailableError` if there is no answer."""
    all_headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        if not any(name.lower() == "content-type" for name in all_headers):
            all_headers["Content-Type"] = "application/json"
    method = method or ("GET" if body is None else "POST")
    try:
        req = urllib.request.Request(url, data=body, headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Response(url, resp.status, _lower(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:  # a 4xx/5xx: an answer, read it like any other
            with exc:
                return Response(url, exc.code, _lower(exc.headers), exc.read())
    except _TRANSPORT_ERRORS as exc:
        raise HttpUnavailableError(f"{method} {url}: {type(exc).__name__}: {_reason(exc)}") from exc


def get_json(url: str, *, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """The JSON of a 2xx answer to GET `url`; `HttpUnavailableError` for any other status or body."""
    return request(url, timeout=timeout, headers=headers).checked().json()


def post_json(url: str, payload: Any, *, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """POST `payload` as JSON; the JSON of a 2xx answer, `HttpUnavailableError` for anything else."""
    return request(url, timeout=timeout, json_body=payload, headers=headers).checked().json()


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()} if headers is not None else {}


def _reason(exc: BaseException) -> str:
    # URLError hides the socket error in `reason`; name that, not "<urlopen error ...>".
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc) or repr(exc)
