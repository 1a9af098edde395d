"""LocalPlatform end to end with real processes: KServe model servers and the traffic router on
127.0.0.1, real MLflow models, real HTTP. Tests run in file order against one InferenceService,
like an operator's session: deploy, canary, tag routes, roll back, promote, faults, crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import psutil
import pytest
from scipy.stats import binomtest

from mlops_assets.core import processes
from mlops_assets.core.serving.manifest import Deployment, ManifestError, build_inference_service
from mlops_assets.core.serving.metrics import ScrapeMetrics
from mlops_assets.core.serving.platform import LocalPlatform, RolloutStateError, UnknownServiceError, http_json
from mlops_assets_tests.conftest import ISVC, MODEL, processes_under
from mlops_assets_tests.helpers import fire, valid_body

pytestmark = [pytest.mark.e2e, pytest.mark.latency]


def manifest_for(version, canary: int | None = None, storage_uri: str | None = None) -> dict:
    return build_inference_service(
        Deployment(
            model_name=MODEL,
            version=version.version,
            storage_uri=storage_uri or version.download_uri,
            run_id=version.run_id,
            canary_percent=canary,
        )
    )


@pytest.fixture(scope="module")
def v1_status(platform, versions):
    return platform.apply(manifest_for(versions["1"]))


def test_first_deploy_takes_all_traffic_even_with_a_canary_percent(platform, versions, v1_status):
    assert v1_status.ready, v1_status.message
    assert v1_status.traffic == [
        {"revisionName": f"{ISVC}-predictor-00001", "percent": 100, "latestRevision": True, "tag": "latest"}
    ]
    assert v1_status.stable_version == "1"
    assert v1_status.url.startswith("http://127.0.0.1:")
    # Applying the same manifest again creates nothing new (idempotent).
    again = platform.apply(manifest_for(versions["1"], canary=30))
    assert again.latest_created == v1_status.latest_created and again.percent_of(v1_status.latest_rolledout) == 100


def test_servers_and_router_listen_on_loopback_only(platform, v1_status):
    directory = platform._dir(ISVC)
    pids = [
        processes.read_record(directory / "router.pid").pid,
        processes.read_record(directory / "revisions" / f"{ISVC}-predictor-00001.pid").pid,
    ]
    for pid in pids:
        proc = psutil.Process(pid)
        connections = getattr(proc, "net_connections", None) or proc.connections
        listening = [c.laddr for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening, f"pid {pid} listens on nothing"
        assert all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_v1_and_v2_protocols_answer_through_the_router(v1_status):
    from mlops_assets.core.serving.payloads import v1_payload, v2_payload
    from mlops_assets.demo.data import FEATURES, generate_fraud_data

    frame = generate_fraud_data(4, seed=9)[FEATURES]
    code, body = http_json(v1_status.predict_url("v1"), v1_payload(frame))
    assert code == 200 and len(body["predictions"]) == 4 and all(0 <= p <= 1 for p in body["predictions"])
    code2, body2 = http_json(v1_status.predict_url("v2"), v2_payload(frame))
    assert code2 == 200 and body2["outputs"][0]["data"] == pytest.approx(body["predictions"])
    # Instances as ordered lists, and integers where the signature says double, are accepted.
    row = [int(x) if isinstance(x, float) else x for x in frame.iloc[0].tolist()]
    code3, body3 = http_json(v1_status.predict_url("v1"), {"instances": [row]})
    assert code3 == 200, body3


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"this is not json", 400, "Unrecognized request format"),
        (b'{"rows": []}', 400, "instances"),
        (b'{"instances": []}', 400, "non-empty"),
        (b'{"instances": [{"amount": 1.0}]}', 400, "missing features"),
        (b'{"instances": [[1, 2, 3]]}', 400, "9 values"),
        (b'{"instances": [1, {"a": 2}]}', 400, "all be objects"),
        (None, 400, "must be numeric"),
        (b'{"inputs": [{"name": "amount", "shape": [1], "datatype": "FP64", "data": [1.0]}]}', 400, "missing features"),
    ],
)
def test_malformed_payloads_get_a_4xx_naming_the_problem(v1_status, body, status, message):
    if body is None:
        row = json.loads(valid_body())["instances"][0] | {"amount": "lots"}
        body = json.dumps({"instances": [row]}).encode()
    url = v1_status.predict_url("v2") if b'"inputs"' in body else v1_status.predict_url("v1")
    ((_, code),) = fire(url, 1, body=body)
    assert code == status
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    with pytest.raises(HTTPError) as err:
        urlopen(Request(url, data=body, headers={"content-type": "application/json"}), timeout=10)
    assert message in err.value.read().decode()
    # The server is still healthy afterwards.
    assert [c for _, c in fire(v1_status.predict_url("v1"), 5)] == [200] * 5


def test_unknown_model_path_is_404(v1_status):
    ((_, code),) = fire(f"{v1_status.url}/v1/models/no-such-model:predict", 1)
    assert code == 404


def test_canary_split_lands_within_statistical_tolerance(platform, versions):
    status = platform.apply(manifest_for(versions["2"], canary=20))
    canary, stable = status.latest_ready, status.latest_rolledout
    assert (status.percent_of(canary), status.percent_of(stable)) == (20, 80)
    assert status.version_of(canary) == "2" and status.version_of(stable) == "1"
    results = fire(status.predict_url(), 2000)
    assert all(code == 200 for _, code in results)
    hits = sum(rev == canary for rev, _ in results)
    # Exact binomial test of the observed share against 20%: p < 1e-4 would be a real bias.
    assert binomtest(hits, len(results), 0.20).pvalue > 1e-4, hits


def test_tag_routes_reach_one_revision_whatever_the_split(platform):
    status = platform.status(ISVC)
    latest, prev = status.latest_ready, status.latest_rolledout
    url = status.predict_url()
    assert {r for r, _ in fire(url.replace(status.url, status.url + "/latest"), 30)} == {latest}
    assert {r for r, _ in fire(url.replace(status.url, status.url + "/prev"), 30)} == {prev}
    assert {r for r, _ in fire(url, 30, headers_for=lambda i: {"x-mlops-tag": "latest"})} == {latest}
    assert {r for r, _ in fire(url, 30, headers_for=lambda i: {"host": f"prev-{ISVC}.mlops.example.com"})} == {prev}


def test_sticky_user_keys_stay_in_one_arm(platform):
    status = platform.status(ISVC)
    results = fire(status.predict_url(), 400, headers_for=lambda i: {"x-user-key": f"user-{i % 40}"})
    arms: dict[int, set] = {}
    for i, (rev, _) in enumerate(results):
        arms.setdefault(i % 40, set()).add(rev)
    assert all(len(revs) == 1 for revs in arms.values())
    assert len({next(iter(r)) for r in arms.values()}) == 2  # both arms are used


def test_changing_the_percent_creates_no_revision(platform):
    before = platform.status(ISVC)
    after = platform.set_canary_percent(ISVC, 50)
    assert after.latest_created == before.latest_created
    assert after.percent_of(after.latest_ready) == 50 and after.percent_of(after.latest_rolledout) == 50


def test_rollback_during_canary_sends_everything_to_the_stable_revision(platform):
    status = platform.rollback(ISVC)
    assert status.canary_percent == 0
    assert status.percent_of(status.latest_rolledout) == 100 and status.percent_of(status.latest_ready) == 0
    assert {r for r, _ in fire(status.predict_url(), 100)} == {status.latest_rolledout}
    # The canary stays reachable through its tag for debugging, as in KServe.
    assert {r for r, _ in fire(status.url + f"/latest/v1/models/{ISVC}:predict", 5)} == {status.latest_ready}


def test_promote_makes_latest_the_rolled_out_revision_and_keeps_the_old_one_warm(platform):
    old_stable = platform.status(ISVC).latest_rolledout
    status = platform.promote(ISVC)
    assert status.latest_rolledout == status.latest_ready and status.stable_version == "2"
    assert status.previous_rolledout == old_stable
    assert status.traffic[0]["percent"] == 100
    assert "canaryTrafficPercent" not in platform.manifest(ISVC)["spec"]["predictor"]
    assert {r for r, _ in fire(status.predict_url(), 50)} == {status.latest_rolledout}
    assert {r for r, _ in fire(status.url + f"/prev/v1/models/{ISVC}:predict", 5)} == {old_stable}


def test_rollback_after_promotion_returns_to_the_previous_revision_instantly(platform):
    status = platform.rollback(ISVC)
    assert status.stable_version == "1" and status.percent_of(status.latest_rolledout) == 100
    assert {r for r, _ in fire(status.predict_url(), 50)} == {status.latest_rolledout}


def test_a_failing_canary_is_seen_in_the_counts_and_never_touches_stable(platform, versions):
    stable_before = platform.status(ISVC)
    metrics = ScrapeMetrics()
    before = metrics.revision_counts(ISVC, stable_before.url)
    status = platform.apply(manifest_for(versions["3"], canary=50))
    canary, stable = status.latest_ready, status.latest_rolledout
    results = fire(status.predict_url(), 400)
    window = {
        rev: counts.minus(before.get(rev, type(counts)())) for rev, counts in metrics.revision_counts(ISVC, status.url).items()
    }
    assert all(code == 500 for rev, code in results if rev == canary)
    assert all(code == 200 for rev, code in results if rev == stable)
    assert window[canary].errors == window[canary].requests == sum(rev == canary for rev, _ in results)
    assert window[stable].errors == 0 and window[stable].requests == sum(rev == stable for rev, _ in results)
    assert window[stable].latency_quantile(0.5) > 0
    platform.rollback(ISVC)


def test_a_revision_that_cannot_start_gets_no_traffic(platform, versions, tmp_path):
    before = platform.status(ISVC)
    bad = manifest_for(versions["2"], canary=10, storage_uri=(tmp_path / "missing-model").as_uri())
    with pytest.raises(processes.ProcessStartError, match="exited during start-up"):
        platform.apply(bad)
    after = platform.status(ISVC)
    assert after.traffic == before.traffic and after.latest_ready == before.latest_ready
    assert after.revisions[after.latest_created]["status"] == "failed"
    assert {c for _, c in fire(after.predict_url(), 20)} == {200}


def test_a_killed_router_is_restarted_by_the_supervisor_on_the_same_url(platform):
    """Nobody reconciles: the supervisor notices within its interval and restarts the router."""
    before = platform.status(ISVC)
    record = processes.read_record(platform._dir(ISVC) / "router.pid")
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20

    def restarts() -> int:
        return platform.supervisor_status().get("services", {}).get(ISVC, {}).get("router", {}).get("restarts", 0)

    already = restarts()
    while restarts() == already and time.monotonic() < deadline:
        time.sleep(0.2)
    after = platform.status(ISVC)
    assert after.ready and after.url == before.url and after.traffic == before.traffic
    assert processes.read_record(platform._dir(ISVC) / "router.pid").pid != record.pid
    assert {c for _, c in fire(after.predict_url(), 20)} == {200}
    assert restarts() == already + 1


def test_a_killed_router_is_reconciled_on_the_same_url_without_losing_state(platform, mlops_home):
    platform.stop_supervisor()  # an explicit reconcile, as after `mlops-assets stop`
    before = platform.status(ISVC)
    record = processes.read_record(platform._dir(ISVC) / "router.pid")
    os.kill(record.pid, signal.SIGKILL)
    time.sleep(0.2)
    fresh = LocalPlatform(home=str(mlops_home))  # as a new Dagster run would see it
    assert not fresh.status(ISVC).ready
    assert fresh.reconcile(ISVC) == ["router"]
    after = fresh.status(ISVC)
    assert after.ready and after.url == before.url and after.traffic == before.traffic
    assert {c for _, c in fire(after.predict_url(), 20)} == {200}


def test_a_taken_port_is_a_clear_error_and_loses_nothing(platform):
    platform.stop_supervisor()  # or it would retry (with backoff) while the port is squatted
    before = platform.status(ISVC)
    port = int(before.url.rsplit(":", 1)[1])
    processes.stop(processes.read_record(platform._dir(ISVC) / "router.pid"))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, like a real server
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(processes.PortInUseError, match=f"127.0.0.1:{port} is already in use"):
            platform.reconcile(ISVC)
        assert platform.status(ISVC).traffic == before.traffic
    assert platform.reconcile(ISVC) == ["router"]
    assert platform.status(ISVC).ready


def test_platform_api_refuses_bad_input_by_name(platform):
    with pytest.raises(UnknownServiceError, match="'nope' does not exist"):
        platform.status("nope")
    with pytest.raises(ManifestError, match="DNS-1035"):
        platform.status("Bad_Name")
    with pytest.raises(ManifestError, match="0-100"):
        platform.set_canary_percent(ISVC, 150)
    with pytest.raises(ManifestError, match="0-100"):
        platform.set_canary_percent(ISVC, True)
    with pytest.raises(ManifestError, match="expected apiVersion"):
        platform.apply({"apiVersion": "v1", "kind": "Pod"})
    assert platform.status(ISVC).ready


def test_rollback_with_nothing_to_return_to_is_refused_and_delete_cleans_up(platform, versions):
    other = build_inference_service(
        Deployment(model_name="fraud_detector_b", version="1", storage_uri=versions["1"].download_uri)
    )
    status = platform.apply(other)
    with pytest.raises(RolloutStateError, match="nothing|no canary"):
        platform.rollback(status.name)
    assert platform.status(status.name).ready
    platform.delete(status.name)
    assert status.name not in platform.list_services()
    with pytest.raises(UnknownServiceError):
        platform.status(status.name)
    with pytest.raises(OSError):
        fire(status.predict_url(), 1)


def test_stop_all_then_reconcile_restores_everything(platform):
    before = platform.status(ISVC)
    stopped = platform.stop_all()
    assert "router" in stopped
    assert not platform.status(ISVC).ready
    platform.reconcile(ISVC)
    after = platform.status(ISVC)
    assert after.ready and after.url == before.url and after.traffic == before.traffic


def test_a_restart_racing_a_delete_leaves_no_process(platform, versions, mlops_home, monkeypatch):
    """A full-suite run once leaked a model server: `delete` stopped the processes, released the
    service lock, then removed the directory, and the supervisor restarted the revision in between.
    Here a restart is attempted at exactly that moment (inside `delete`'s removal): it must find the
    service gone and start nothing, and a start that does outlive its service is stopped."""
    import shutil
    import threading

    from mlops_assets.core.serving import platform as platform_module

    bare = LocalPlatform(home=str(mlops_home), ready_timeout_s=90, supervise=False)
    name = bare.apply(
        build_inference_service(Deployment(model_name="fraud_racer", version="1", storage_uri=versions["1"].download_uri))
    ).name
    platform.stop_supervisor()  # this test is the only one restarting things
    pid_file = bare._dir(name) / "revisions" / f"{name}-predictor-00001.pid"
    old = processes.read_record(pid_file)
    outcome: dict = {}
    real_rmtree = shutil.rmtree

    def rmtree_with_a_restart_in_between(path, *args, **kwargs):
        repairing = threading.Thread(target=lambda: outcome.setdefault("error", _raises(lambda: bare.repair(name))))
        repairing.start()
        deadline = time.monotonic() + 10
        while (processes.read_record(pid_file) or old).pid == old.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        outcome["spawned"] = processes.read_record(pid_file)
        real_rmtree(path, *args, **kwargs)
        outcome["thread"] = repairing

    monkeypatch.setattr(platform_module.shutil, "rmtree", rmtree_with_a_restart_in_between)
    bare.delete(name)
    outcome["thread"].join(timeout=120)
    monkeypatch.undo()
    assert isinstance(outcome["error"], UnknownServiceError), outcome
    spawned = outcome["spawned"]
    assert spawned is None or spawned.pid == old.pid or not processes.is_alive(spawned)
    assert not [p for p in processes_under(mlops_home) if f"/{name}/" in p]
    platform.ensure_supervisor()


def _raises(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - returned for the assertion
        return exc
    return None
