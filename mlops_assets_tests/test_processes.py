"""The local process supervisor: pid files that survive their creator, recycled-pid safety,
port conflicts and start-up failures reported with the log."""

from __future__ import annotations

import socket
import sys

import pytest

from mlops_assets.core import processes


def test_spawned_process_is_tracked_and_stopped(tmp_path):
    port = processes.free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    record = processes.spawn(cmd, port=port, pid_file=tmp_path / "x.pid", log_file=tmp_path / "x.log")
    processes.wait_http(record, "/", 20, "http.server")
    assert processes.read_record(tmp_path / "x.pid") == record
    assert processes.is_alive(record)
    processes.stop(record)
    assert not processes.is_alive(record)


def test_a_recycled_pid_is_not_mistaken_for_our_server(tmp_path):
    import os

    fake = processes.ProcessRecord(pid=os.getpid(), port=1, cmd=["python", "-m", "mlops_assets.servers.router", "x"], log="")
    assert not processes.is_alive(fake)


def test_port_in_use_names_the_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(processes.PortInUseError, match=f"127.0.0.1:{port}"):
            processes.ensure_port_free(port)


def test_a_process_that_dies_at_start_up_reports_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom: bad config'); sys.exit(3)"]
    record = processes.spawn(cmd, port=processes.free_port(), pid_file=tmp_path / "y.pid", log_file=tmp_path / "y.log")
    with pytest.raises(processes.ProcessStartError, match="boom: bad config"):
        processes.wait_http(record, "/", 20, "doomed server")


def test_corrupt_pid_files_read_as_absent(tmp_path):
    (tmp_path / "z.pid").write_text("{not json")
    assert processes.read_record(tmp_path / "z.pid") is None
    assert processes.read_record(tmp_path / "missing.pid") is None
