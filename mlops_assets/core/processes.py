"""Detached local processes with pid files: the embedded platform's process supervisor.

Every long-lived local process (model servers, routers, the MLflow UI, Prometheus) is started in
its own session so it outlives the Dagster run that started it, writes its log under
`MLOPS_HOME/logs`, and is recorded in a pid file. Liveness checks compare the process's command
line with the recorded one, so a recycled pid is never mistaken for our server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from mlops_assets.core import http

LOOPBACK = "127.0.0.1"


class ProcessStartError(RuntimeError):
    """A local server did not come up; the message carries the tail of its log."""


class PortInUseError(ProcessStartError):
    """The requested 127.0.0.1 port is already bound by another process."""


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    port: int
    cmd: list[str]
    log: str

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def free_port() -> int:
    """An ephemeral loopback port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """No live listener holds 127.0.0.1:`port` (TIME_WAIT leftovers do not count)."""
    try:
        ensure_port_free(port)
    except PortInUseError:
        return False
    return True


def ensure_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves do: TIME_WAIT leftovers are fine, a live listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            raise PortInUseError(f"port {LOOPBACK}:{port} is already in use; stop what holds it or choose another port") from None


def _cmdline(pid: int) -> list[str] | None:
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:  # gone, or not ours to read
        return None
    return cmd or None  # empty: a zombie (or a child that has not exec'd yet, see `spawn`)


def is_alive(record: ProcessRecord) -> bool:
    """True when the recorded pid still runs the recorded command (not a recycled pid)."""
    cmd = _cmdline(record.pid)
    # Compare arguments only, as a suffix: a script's shebang puts its interpreter in front.
    args = record.cmd[1:]
    return cmd is not None and len(cmd) > len(args) and cmd[len(cmd) - len(args) :] == args


def _running(pid: int) -> bool:
    """The pid exists and is not a zombie (used while a fresh child may not have exec'd yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_record(pid_file: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord(**json.loads(pid_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def spawn(cmd: list[str], *, port: int, pid_file: Path, log_file: Path, env: dict | None = None) -> ProcessRecord:
    """Start `cmd` detached (own session), logging to `log_file`, and record it in `pid_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            close_fds=True,
        )
    record = ProcessRecord(pid=proc.pid, port=port, cmd=cmd, log=str(log_file))
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(pid_file)
    # Right after exec, a process's cmdline can read empty for a moment, so `is_alive` would say no: a
    # `stop` then would not stop it, and a supervisor would start a second copy. Return once it reads.
    deadline = time.monotonic() + 5.0
    while not is_alive(record) and _running(record.pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    return record


def log_tail(record: ProcessRecord, lines: int = 20) -> str:
    try:
        return "\n".join(Path(record.log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_http(record: ProcessRecord, path: str, timeout_s: float, what: str) -> None:
    """Poll `path` until it answers 200; fail early, with the log tail, if the process died."""
    deadline = time.monotonic() + timeout_s
    url = record.url + path
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not _running(record.pid):
            raise ProcessStartError(f"{what} exited during start-up; log {record.log}:\n{log_tail(record)}")
        with contextlib.suppress(http.HttpUnavailableError):  # not listening yet
            if http.request(url, timeout=2).status == 200:
                return
        time.sleep(0.2)
    stop(record)
    raise ProcessStartError(f"{what} did not answer {url} within {timeout_s:.0f}s; log {record.log}:\n{log_tail(record)}")


def stop(record: ProcessRecord, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout_s`."""
    if not is_alive(record):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not is_alive(record):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGKILL)
    # SIGKILL is delivered asynchronously: return once the process is gone (reaped, if it is our child).
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not is_alive(record):
            return
        time.sleep(0.05)


def _reap(pid: int) -> None:
    # Only our own children can be reaped; for others this is a harmless ECHILD.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
