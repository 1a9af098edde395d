"""Helpers the test modules share (fixtures they share are in conftest.py).

- Small real-HTTP clients (aiohttp, keep-alive, bounded concurrency), the project's CLI, declared models.
- The cluster path's stand-ins: `FakeCluster`, kmock (the Kubernetes API server, kmock_server.py) with
  `KServeController`, a stand-in for KServe's controller; the InferenceService names and manifests the
  tests deploy; `FakeClock`.
- `payload_sink`: a real payload sink process on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import attrs
import dagster as dg
import kmock
import pytest

from mlops_assets.core import http, processes
from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.serving.manifest import Deployment, build_inference_service
from mlops_assets.core.serving.payloads import v1_payload
from mlops_assets.defs.models.assets import DECLARATION_KEY
from mlops_assets.demo.data import FEATURES, generate_fraud_data
from mlops_assets_tests.kmock_server import Emulator, KmockServer


def valid_body(rows: int = 1, seed: int = 5) -> bytes:
    return json.dumps(v1_payload(generate_fraud_data(rows, seed=seed)[FEATURES])).encode()


def fire(url: str, n: int, body: bytes | None = None, headers_for=None, concurrency: int = 16) -> list[tuple[str, int]]:
    """Send `n` POSTs; return (revision that served, status) per request, in order."""
    body = body if body is not None else valid_body()

    async def run() -> list[tuple[str, int]]:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

            async def one(i: int) -> tuple[str, int]:
                headers = {"content-type": "application/json", **(headers_for(i) if headers_for else {})}
                async with sem, session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    return resp.headers.get("x-mlops-revision", ""), resp.status

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(run())


ROOT = Path(__file__).resolve().parents[1]


def project_cli(command: str, *args: str, env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run one of the venv's commands (`dagster`, `dg`) from the project root, as a user would."""
    return subprocess.run(
        [str(Path(sys.executable).with_name(command)), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


#: The demo's declaration, as in defs/models/fraud_detector/defs.yaml.
FRAUD = ModelDeclaration(name="fraud_detector", training="mlops_assets.demo.training:train_and_register")


def declared(*declarations: ModelDeclaration) -> dg.RepositoryDefinition:
    """A code location declaring these models, as the sensors read it (the declaration on `models/<name>`)."""
    specs = [dg.AssetSpec(["models", d.name], metadata={DECLARATION_KEY: d.model_dump(mode="json")}) for d in declarations]
    return dg.Definitions(assets=specs).get_repository_def()


# ---- kmock with a stand-in for KServe's controller (the cluster path's tests) -------------------------
NS = "mlops-serving"
NAME = "fraud-detector"
ISVC = kmock.resource("serving.kserve.io", "v1beta1", "inferenceservices")
CANARY = "canaryTrafficPercent"
# KServe's default serviceAnnotationDisallowedList: annotations that never reach the revision template.
NOT_PROPAGATED = ("kubectl.kubernetes.io/last-applied-configuration",)


def rev(n: int) -> str:
    return f"{NAME}-predictor-{n:05d}"


def uri(version: str, note: str = "") -> str:
    return f"s3://mlflow/1/run{version}{note}/artifacts/model"


def manifest_for(version: str, note: str = "", canary: int | None = None) -> dict:
    # The Deployment's default namespace is "mlops"; the platform puts it in its own namespace.
    return build_inference_service(
        Deployment(
            model_name="fraud_detector",
            version=version,
            storage_uri=uri(version, note),
            run_id=f"run{version}",
            canary_percent=canary,
        )
    )


class KServeController:
    """The status KServe (ksvc_reconciler.go, PropagateStatus) and Knative would write, as kmock knows nothing of KServe.

    After each create or patch it cuts a revision `<name>-predictor-0000N` when the revision template changed
    (the predictor minus `canaryTrafficPercent`, plus the annotations and labels KServe copies into the
    template), and a few GETs later it reports the rollout done: the latest revision ready, traffic split per
    `canaryTrafficPercent` between it and the latest rolled-out revision, and a latest revision at 100%
    promoted to `latestRolledoutRevision` (the old one becomes `previousRolledoutRevision`), with the Ready
    condition. A storage URI containing "broken" never becomes ready, as a failing model would not.
    """

    def __init__(self, gets_to_ready: int = 2) -> None:
        self.gets_to_ready = gets_to_ready
        self.revisions: dict[str, dict[str, dict]] = {}  # isvc -> revision -> {template, storage_uri}
        self.statuses: dict[str, list[dict]] = {}  # isvc -> every status written, in order
        self._pending: dict[str, int] = {}

    @staticmethod
    def _template(raw: dict) -> str:
        predictor = copy.deepcopy(raw["spec"]["predictor"])
        predictor.pop(CANARY, None)
        meta = raw["metadata"]
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in NOT_PROPAGATED}
        return json.dumps([predictor, annotations, meta.get("labels") or {}], sort_keys=True)

    def _write(self, obj: kmock.Object, status: dict) -> None:
        obj["status"] = status  # in place: the stored history keeps one version per API write
        self.statuses.setdefault(obj["metadata"]["name"], []).append(copy.deepcopy(status))

    def observed(self, obj: kmock.Object) -> None:
        """After a create or patch: cut a revision if the template changed; start reconciling."""
        raw = copy.deepcopy(obj.raw)
        name = raw["metadata"]["name"]
        revisions = self.revisions.setdefault(name, {})
        status = raw.get("status") or {}
        predictor = status.setdefault("components", {}).setdefault("predictor", {})
        latest = predictor.get("latestCreatedRevision")
        template = self._template(raw)
        if latest is None or revisions[latest]["template"] != template:
            latest = f"{name}-predictor-{len(revisions) + 1:05d}"
            revisions[latest] = {"template": template, "storage_uri": raw["spec"]["predictor"]["model"]["storageUri"]}
            predictor["latestCreatedRevision"] = latest
        message = f'Configuration "{name}-predictor" is waiting for a Revision to become ready.'
        status["conditions"] = [
            {"type": "IngressReady", "status": "True"},
            {"type": "PredictorReady", "status": "Unknown", "reason": "RevisionMissing", "message": message},
            {"type": "Ready", "status": "Unknown", "reason": "RevisionMissing", "message": message},
        ]
        self._pending[name] = self.gets_to_ready
        self._write(obj, status)

    def fetched(self, obj: kmock.Object) -> None:
        """On a GET: after `gets_to_ready` of them the rollout of the observed spec is done."""
        raw = copy.deepcopy(obj.raw)
        name, namespace = raw["metadata"]["name"], raw["metadata"].get("namespace")
        if self._pending.get(name, 0) <= 0:
            return
        self._pending[name] -= 1
        if self._pending[name] > 0:
            return
        status = raw["status"]
        predictor = status["components"]["predictor"]
        created = predictor["latestCreatedRevision"]
        if "broken" in self.revisions[name][created]["storage_uri"]:
            message = f'Revision "{created}" failed with message: container kserve-container exited: model not found.'
            status["conditions"] = [
                {"type": "IngressReady", "status": "True"},
                {"type": "PredictorReady", "status": "False", "reason": "RevisionFailed", "message": message},
                {"type": "Ready", "status": "False", "reason": "RevisionFailed", "message": message},
            ]
            self._write(obj, status)
            return
        predictor["latestReadyRevision"] = created
        percent, rolled = raw["spec"]["predictor"].get(CANARY), predictor.get("latestRolledoutRevision")
        # With serving.kserve.io/enable-tag-routing, Knative tags the targets and gives each its own URL.
        routed = (raw["metadata"].get("annotations") or {}).get("serving.kserve.io/enable-tag-routing") == "true"

        def tagged(tag: str) -> dict:
            return {"tag": tag, "url": f"http://{tag}-{name}-predictor-{namespace}.mlops.example.com"} if routed else {}

        if percent is not None and rolled:
            traffic = [{"revisionName": created, "latestRevision": True, "percent": percent, **tagged("latest")}]
            if percent < 100:
                prev = tagged("prev") or {"tag": "prev"}
                traffic.append({"revisionName": rolled, "latestRevision": False, "percent": 100 - percent, **prev})
        else:
            traffic = [{"revisionName": created, "latestRevision": True, "percent": 100, **tagged("latest")}]
        if rolled != created and traffic[0]["percent"] == 100:
            if rolled:
                predictor["previousRolledoutRevision"] = rolled
            predictor["latestRolledoutRevision"] = created
        predictor["traffic"] = traffic
        # Knative's service URL and address; KServe's ingress reconciler then gives the InferenceService the
        # ingress' urlScheme on the external domain (https in k8s/base/kserve) and a plain-HTTP in-cluster
        # address (ingress_reconciler.go), which is what calls from inside the cluster must use.
        predictor["url"] = f"http://{name}-predictor-{namespace}.mlops.example.com"
        predictor["address"] = {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"}
        status["url"] = f"https://{name}-{namespace}.mlops.example.com"
        status["address"] = {"url": f"http://{name}.{namespace}.svc.cluster.local"}
        status["conditions"] = [{"type": t, "status": "True"} for t in ("IngressReady", "PredictorReady", "Ready")]
        self._write(obj, status)


@attrs.define(kw_only=True)
class KServeAPI(Emulator):
    """kmock's stateful emulator, answering create with 201 and running the controller."""

    controller: KServeController = attrs.field(factory=KServeController)

    async def _handle(self, request: kmock.Request):
        ours = request.resource == ISVC
        if ours and request.action == kmock.action.FETCH:
            async with self._lock:
                key = (ISVC, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    self.controller.fetched(self.objects[key])
        response = await super()._handle(request)
        # A 409 reaction on a create stands for someone else's create, which KServe reconciles all the same.
        written = response.status < 300 or (request.action == kmock.action.CREATE and response.status == 409)
        if ours and request.action in (kmock.action.CREATE, kmock.action.UPDATE) and written:
            name = request.name or request.data["metadata"]["name"]
            async with self._lock:
                self.controller.observed(self.objects[ISVC, request.namespace, name])
        return response


class FakeCluster(KmockServer):
    """kmock with the KServe controller stand-in, plus thread-safe views of its state."""

    def __init__(self, kserve_installed: bool = True, gets_to_ready: int = 2) -> None:
        self.controller = KServeController(gets_to_ready)
        # The CRD: with KServe installed, discovery lists the resource.
        super().__init__(lambda: KServeAPI(controller=self.controller), {ISVC: "InferenceService"} if kserve_installed else {})

    def stored(self, name: str = NAME) -> dict:
        return self.run(lambda api: copy.deepcopy(api.objects[ISVC, NS, name].raw))

    def requests(self, method: str | None = None) -> list[dict]:
        def collect(api: KServeAPI) -> list[dict]:
            return [
                {"method": str(r.method.value), "path": r.url.path, "headers": dict(r.headers), "data": copy.deepcopy(r.data)}
                for r in api
                if method is None or r.method.value == method
            ]

        return self.run(collect)

    def patches(self) -> list[dict]:
        return [r["data"] for r in self.requests("PATCH")]

    def storage_of(self, revision: str, name: str = NAME) -> str:
        return self.run(lambda api: api.controller.revisions[name][revision]["storage_uri"])


class FakeClock:
    """A clock for the rollouts' `clock` and `sleep`: sleeping moves it on, at once."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


#: Istio's VirtualServices, as kmock stores them.
VIRTUALSERVICES = kmock.resource("networking.istio.io", "v1", "virtualservices")


# ---- the payload sink, a real process ---------------------------------------------------------------------
@contextlib.contextmanager
def payload_sink(store: str, timeout_s: float = 60.0) -> Iterator[str]:
    """`python -m mlops_assets.servers.payload_sink` on a free 127.0.0.1 port, writing to `store`: its URL once
    /-/ready answers (the test fails with the sink's stderr if it exits or is not ready in `timeout_s`); stopped
    on exit (SIGTERM, SIGKILL after 15 s)."""
    port = processes.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops_assets.servers.payload_sink", "--port", str(port), "--store", store],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http.request(f"{url}/-/ready", timeout=2).ok:
                break
        except http.HttpUnavailableError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"payload sink did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
