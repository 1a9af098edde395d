"""The cluster's payload log: KServe's payload logger -> the payload sink -> object storage -> the drift reports.

Real parts: the payload sink runs as its own process (`python -m mlops_assets.servers.payload_sink`),
and the store is a real MLflow tracking server with `--serve-artifacts` (its artifact proxy; on a
cluster MinIO sits behind it, here a local directory), read back by `KubernetesPlatform.recent_payloads`
through the same proxy. The stand-in: KServe's agent cannot run here, so the test POSTs the CloudEvents
it would send (HTTP binary mode: the request body as data; `ce-type`, `ce-id`, `ce-source`,
`ce-specversion` and the extensions `ce-inferenceservicename`, `ce-namespace`, `ce-component`,
`ce-endpoint` as headers). No Kubernetes API is needed for these calls.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from mlops_assets.core import processes
from mlops_assets.core.platform import services
from mlops_assets.core.serving.kubernetes import KubernetesPlatform, KubernetesPlatformError
from mlops_assets.core.serving.payloads import v1_payload, v2_payload
from mlops_assets.core.serving.wire import store_for
from mlops_assets.demo.data import FEATURES, generate_fraud_data

pytestmark = pytest.mark.e2e

ISVC = "fraud-detector"


def _spawn(cmd: list[str], home: Path, name: str, port: int, health: str, timeout: float) -> processes.ProcessRecord:
    record = processes.spawn(cmd, port=port, pid_file=home / f"{name}.pid", log_file=home / f"{name}.log")
    processes.wait_http(record, health, timeout, name)
    return record


@pytest.fixture(scope="module")
def mlflow_proxy(tmp_path_factory):
    home = tmp_path_factory.mktemp("payload_store")
    port = processes.free_port()
    cmd = services.mlflow_server_command(
        f"sqlite:///{home}/mlflow.db", port, "--serve-artifacts", "--artifacts-destination", (home / "bucket").as_uri()
    )
    record = processes.spawn(
        cmd, port=port, pid_file=home / "mlflow.pid", log_file=home / "mlflow.log", env=services.MLFLOW_SERVER_ENV
    )
    processes.wait_http(record, "/health", 120, "MLflow server")
    yield home, store_for(f"http://127.0.0.1:{port}"), record
    processes.stop(record)


@pytest.fixture
def sink(mlflow_proxy, tmp_path):
    _, store, _ = mlflow_proxy
    port = processes.free_port()
    cmd = [sys.executable, "-m", "mlops_assets.servers.payload_sink", "--port", str(port), "--store", store]
    cmd += ["--sample-rate", "1.0", "--flush-s", "3600"]  # flushed on demand in these tests
    record = _spawn(cmd, tmp_path, "sink", port, "/-/healthy", 60)
    yield f"http://127.0.0.1:{port}"
    processes.stop(record)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def kserve_event(sink: str, body: dict, kind: str = "request", isvc: str = ISVC) -> tuple[int, dict]:
    """What KServe's payload-logger agent sends for one logged request (or response)."""
    return _post(
        sink + "/",
        json.dumps(body).encode(),
        {
            "Content-Type": "application/json",
            "Ce-Specversion": "1.0",
            "Ce-Id": str(uuid.uuid4()),
            "Ce-Type": f"org.kubeflow.serving.inference.{kind}",
            "Ce-Source": f"http://localhost:9081/{isvc}",
            "Ce-Inferenceservicename": isvc,
            "Ce-Namespace": "mlops-serving",
            "Ce-Component": "predictor",
            "Ce-Endpoint": "",
        },
    )


def _metrics(sink: str) -> str:
    return urllib.request.urlopen(f"{sink}/metrics", timeout=10).read().decode()


def test_logged_requests_reach_the_drift_reports_through_object_storage(mlflow_proxy, sink):
    home, store, _ = mlflow_proxy
    frame = generate_fraud_data(60, seed=3)[FEATURES]
    for i in range(0, 40, 4):  # V1 bodies, 4 rows each
        assert kserve_event(sink, v1_payload(frame.iloc[i : i + 4]))[0] == 202
    assert kserve_event(sink, v2_payload(frame.iloc[40:60]))[0] == 202  # one V2 body of 20 rows
    assert kserve_event(sink, {"predictions": [0.1]}, kind="response")[0] == 202  # responses are not logged
    platform = KubernetesPlatform(host="http://127.0.0.1:9", payload_sink_url=sink, payload_store=store)
    current = platform.recent_payloads(ISVC, FEATURES)  # asks the sink to flush first
    assert len(current) == 60
    assert current["amount"].tolist() == frame["amount"].tolist() and current["country"].tolist() == frame["country"].tolist()
    batches = list((home / "bucket" / "payloads" / ISVC).glob("*.jsonl"))
    assert len(batches) == 1 and batches[0].name.split("-")[0].isdigit()
    metrics = _metrics(sink)
    assert f'payload_sink_rows_written_total{{isvc="{ISVC}"}} 11.0' in metrics
    assert f'payload_sink_events_total{{isvc="{ISVC}",outcome="ignored"}} 1.0' in metrics
    # max_rows keeps the newest rows.
    assert platform.recent_payloads(ISVC, FEATURES, max_rows=5)["amount"].tolist() == frame["amount"].tolist()[-5:]


def test_drift_gauges_are_exposed_for_the_alert_rules(sink):
    platform = KubernetesPlatform(host="http://127.0.0.1:9", payload_sink_url=sink)
    platform.publish_drift(ISVC, 0.4, {"amount": 0.31, "hour": 0.02})
    platform.publish_drift(ISVC, 0.1, {"amount": 0.05})  # the next report replaces the previous one
    metrics = _metrics(sink)
    assert f'model_drift_share{{isvc="{ISVC}"}} 0.1' in metrics
    assert f'model_drift_score{{feature="amount",isvc="{ISVC}"}} 0.05' in metrics
    assert 'feature="hour"' not in metrics


def test_bad_events_get_a_clear_answer_and_lose_nothing(mlflow_proxy, sink):
    _, store, _ = mlflow_proxy
    status, body = _post(sink + "/", b"{}", {"Ce-Type": "org.kubeflow.serving.inference.request"})
    assert status == 400 and "not a KServe payload-logger event" in body["error"]
    status, body = kserve_event(sink, {}, isvc="Bad_Name")
    assert status == 400 and "ce-inferenceservicename" in body["error"]
    status, body = _post(
        sink + "/", b"not json", {"Ce-Type": "org.kubeflow.serving.inference.request", "Ce-Inferenceservicename": "other"}
    )
    assert status == 400 and "JSON object" in body["error"]
    status, body = _post(sink + "/-/drift/" + ISVC, b'{"share": "x"}', {"Content-Type": "application/json"})
    assert status == 400 and "expected" in body["error"]
    assert kserve_event(sink, v1_payload(generate_fraud_data(3, seed=4)[FEATURES]), isvc="other")[0] == 202
    platform = KubernetesPlatform(host="http://127.0.0.1:9", payload_sink_url=sink, payload_store=store)
    assert len(platform.recent_payloads("other", FEATURES)) == 3
    with pytest.raises(Exception, match="InferenceService name"):
        platform.recent_payloads("../etc", FEATURES)


def test_a_dead_store_keeps_the_batch_and_the_reader_names_the_store(tmp_path, monkeypatch):
    """The sink's store is down: /-/flush answers 503 with the reason, the rows stay buffered (counted)."""
    dead = processes.free_port()
    port = processes.free_port()
    store = store_for(f"http://127.0.0.1:{dead}")
    cmd = [sys.executable, "-m", "mlops_assets.servers.payload_sink", "--port", str(port), "--store", store]
    record = _spawn([*cmd, "--sample-rate", "1.0", "--flush-s", "3600"], tmp_path, "sink", port, "/-/healthy", 60)
    sink = f"http://127.0.0.1:{port}"
    try:
        assert kserve_event(sink, v1_payload(generate_fraud_data(5, seed=5)[FEATURES]))[0] == 202
        status, body = _post(sink + "/-/flush", b"", {})
        assert status == 503 and body["written"][ISVC].startswith("failed:")
        metrics = _metrics(sink)
        assert f'payload_sink_write_failures_total{{isvc="{ISVC}"}} 1.0' in metrics
        assert json.loads(urllib.request.urlopen(f"{sink}/-/healthy", timeout=10).read())["buffered_bytes"] > 0
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the reader's retries are not under test
        platform = KubernetesPlatform(host="http://127.0.0.1:9", payload_sink_url=sink, payload_store=store)
        with pytest.raises(KubernetesPlatformError, match=f"cannot read the payload log of {ISVC} from {store}"):
            platform.recent_payloads(ISVC, FEATURES)
    finally:
        processes.stop(record)


def test_the_cluster_platform_turns_on_kserves_payload_logger():
    """The InferenceService a cluster gets carries `spec.predictor.logger` pointing at the sink."""
    from mlops_assets.core.serving.kubernetes import PAYLOAD_SINK_URL
    from mlops_assets.core.serving.manifest import Deployment, build_inference_service
    from mlops_assets.core.settings import load_settings
    from mlops_assets.defs.resources import build_resources

    environ = {
        "MLOPS_ENV": "kubernetes",
        "MLOPS_PROMETHEUS_URL": "http://prometheus:9090",
        "MLOPS_MLFLOW_TRACKING_URI": "http://mlflow.mlops.svc.cluster.local:5000",
    }
    serving = build_resources(load_settings(environ))["serving"]
    assert serving.payload_sink_url == PAYLOAD_SINK_URL == "http://payload-sink.mlops-serving.svc.cluster.local"
    assert serving.payload_store == "http://mlflow.mlops.svc.cluster.local:5000/api/2.0/mlflow-artifacts/artifacts/payloads"
    manifest = build_inference_service(
        Deployment(model_name="fraud_detector", version="1", storage_uri="s3://mlflow/1/a/artifacts/model")
    )
    assert "logger" not in manifest["spec"]["predictor"]  # the builder stays platform-neutral
