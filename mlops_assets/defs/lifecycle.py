"""Jobs that span the domains: the end-to-end lifecycle and a read-only look at serving."""

from __future__ import annotations

import dagster as dg

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("monitoring"),
    description="Bring the platform up, train and register a model version, serve its champion.",
)
observe_serving_job = dg.define_asset_job(
    "observe_serving_job",
    selection=dg.AssetSelection.groups("serving"),
    description="Record every InferenceService's traffic and request counts (applies nothing new).",
)

defs = dg.Definitions(jobs=[lifecycle_job, observe_serving_job])
