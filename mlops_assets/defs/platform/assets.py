"""`platform/*`: the installed pieces, so the UI shows the platform itself beside the models."""

import dagster as dg

from mlops_assets.core.kube import run_pod_tags
from mlops_assets.core.platform.backends import PlatformServices
from mlops_assets.core.serving.platform import ServingPlatform

GROUP = "platform"


def _log(context: dg.AssetExecutionContext, what: str, info: dict) -> None:
    if "created" in info:  # reconciled on a cluster
        context.log.info(
            f"{what}: {info['created']} created, {info['updated']} patched, {info['unchanged']} unchanged "
            f"({info['drifted']} differed from {info['manifests']})"
        )
    else:
        where = info.get("url") or info.get("uri") or info.get("note", "")
        context.log.info(f"{what}: {where}")


def _meta(info: dict) -> dict:
    out = {}
    for key, value in info.items():
        if key == "url" and value:
            out[key] = dg.MetadataValue.url(str(value))
        elif key == "log":
            out[key] = dg.MetadataValue.path(str(value))
        elif key == "objects":  # a markdown table of the live objects, from the cluster backend
            out[key] = dg.MetadataValue.md(str(value))
        else:
            out[key] = value
    return out


@dg.asset(key=["platform", "mlflow_backend_store"], group_name=GROUP, kinds={"mlflow", "sqlite"})
def mlflow_backend_store(
    context: dg.AssetExecutionContext, platform_services: dg.ResourceParam[PlatformServices]
) -> dg.MaterializeResult:
    """MLflow's backend store (runs, registered models, aliases). Locally a SQLite file under
    MLOPS_HOME, created and migrated; on a cluster PostgreSQL, reconciled from k8s/ (desired vs live
    shown as metadata)."""
    info = platform_services.backend_store()
    _log(context, "MLflow backend store", info)
    return dg.MaterializeResult(metadata=_meta(info))


@dg.asset(key=["platform", "artifact_store"], group_name=GROUP, kinds={"mlflow"})
def artifact_store(
    context: dg.AssetExecutionContext, platform_services: dg.ResourceParam[PlatformServices]
) -> dg.MaterializeResult:
    """Where model files and training snapshots live. Locally a directory; on a cluster MinIO,
    reconciled from k8s/."""
    info = platform_services.artifact_store()
    _log(context, "artifact store", info)
    return dg.MaterializeResult(metadata=_meta(info))


@dg.asset(
    key=["platform", "mlflow_server"],
    group_name=GROUP,
    deps=[mlflow_backend_store, artifact_store],
    kinds={"mlflow"},
)
def mlflow_server(
    context: dg.AssetExecutionContext, platform_services: dg.ResourceParam[PlatformServices]
) -> dg.MaterializeResult:
    """The MLflow tracking server, for its UI. Locally bound to 127.0.0.1, one worker, job execution
    off, a running server reused; on a cluster the mlflow Deployment, reconciled from k8s/."""
    info = platform_services.tracking_server()
    _log(context, "MLflow tracking server (UI)", info)
    return dg.MaterializeResult(metadata=_meta(info))


@dg.asset(key=["platform", "prometheus"], group_name=GROUP, kinds={"prometheus"})
def prometheus(context: dg.AssetExecutionContext, platform_services: dg.ResourceParam[PlatformServices]) -> dg.MaterializeResult:
    """Prometheus scraping every router and model server, with the shared alert rules. Locally
    started when the binary is on PATH (Debian package `prometheus`); without it, metrics are read
    straight from the routers. On a cluster the prometheus Deployment, reconciled from k8s/."""
    info = platform_services.prometheus()
    _log(context, "Prometheus", info)
    return dg.MaterializeResult(metadata=_meta(info))


@dg.asset(key=["platform", "kserve"], group_name=GROUP, kinds={"kubernetes"})
def kserve(context: dg.AssetExecutionContext, serving: dg.ResourceParam[ServingPlatform]) -> dg.MaterializeResult:
    """The serving control plane. Locally: the embedded KServe equivalent; materializing reconciles
    every recorded InferenceService (restarts routers or model servers that died)."""
    rows = []
    for name in serving.list_services():
        restarted = serving.reconcile(name)
        status = serving.status(name)
        if restarted:
            context.log.warning(f"{name}: restarted {restarted}")
        rows.append(f"| {name} | {status.ready} | {status.url} | {status.stable_version} | {', '.join(restarted) or '-'} |")
    table = "| InferenceService | ready | URL | stable version | restarted |\n|---|---|---|---|---|\n" + "\n".join(rows)
    return dg.MaterializeResult(
        metadata={
            "implementation": type(serving).__name__,
            "inference_services": len(rows),
            "services": dg.MetadataValue.md(table),
        }
    )


def _ready_check(asset: dg.AssetsDefinition, piece: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="ready",
        blocking=True,
        description="The piece serves: locally its process answers or its store is usable; on a cluster every "
        "workload of the piece has rolled out (current generation observed, all replicas updated and ready, Jobs "
        "complete), waited for with a deadline. Blocking: what depends on it does not run on a piece that is down.",
    )
    def _check(platform_services: dg.ResourceParam[PlatformServices]) -> dg.AssetCheckResult:
        info = dict(platform_services.readiness(piece))
        ready = bool(info.pop("ready"))
        return dg.AssetCheckResult(passed=ready, metadata=_meta(info))

    return _check


READY_CHECKS = [
    _ready_check(mlflow_backend_store, "backend_store"),
    _ready_check(artifact_store, "artifact_store"),
    _ready_check(mlflow_server, "tracking_server"),
    _ready_check(prometheus, "prometheus"),
]

platform_job = dg.define_asset_job(
    "platform_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Install or reconcile the platform pieces (MLflow's stores and server, Prometheus, KServe) and check "
    "that each serves. On a cluster: applies k8s/ and shows desired vs live as metadata.",
    # On a cluster its run pods, and only they, use the ServiceAccount allowed to patch the platform's workloads.
    tags=run_pod_tags(service_account="mlops-platform"),
)

defs = dg.Definitions(
    assets=[mlflow_backend_store, artifact_store, mlflow_server, prometheus, kserve],
    asset_checks=READY_CHECKS,
    jobs=[platform_job],
)
