"""Jobs that span the domains: the end-to-end lifecycle and a read-only look at serving."""

from __future__ import annotations

import dagster as dg

from mlops_assets.core.kube import run_pod_tags

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("monitoring"),
    description="Bring the platform up, train and register a model version, serve its champion.",
    # On a cluster its run pod does what platform_job's and a rollout's do, and trains: an account
    # bound to exactly those two Roles (k8s/base/rbac), and a trainer's resources.
    tags=run_pod_tags(service_account="mlops-lifecycle", cpu="1", memory="2Gi", memory_limit="4Gi"),
)
observe_serving_job = dg.define_asset_job(
    "observe_serving_job",
    selection=dg.AssetSelection.groups("serving"),
    description="Record every InferenceService's traffic and request counts (applies nothing new).",
)

defs = dg.Definitions(jobs=[lifecycle_job, observe_serving_job])
