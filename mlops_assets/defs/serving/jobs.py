"""The rollout jobs: one per strategy, plus the rollback. A job's name is what it does.

Each job carries the run tag `mlops-assets/rollout` that tells the serving asset what to do, so
`dagster job launch -j canary_rollout_job` runs a canary (of the `challenger` version, or of the
`version` in its run config) and never silently redeploys the champion.
"""

import dagster as dg

from mlops_assets.core.rollout.policy import Strategy
from mlops_assets.defs.models.assets import ROLE_TAG
from mlops_assets.defs.serving.assets import ROLLBACK, ROLLOUT_TAG

#: The job that rolls a version out with each strategy.
JOB_FOR_STRATEGY: dict[Strategy, str] = {
    Strategy.CANARY: "canary_rollout_job",
    Strategy.BLUE_GREEN: "blue_green_job",
    Strategy.AB_TEST: "ab_test_job",
    Strategy.SHADOW: "shadow_job",
    Strategy.SHADOW_THEN_CANARY: "shadow_then_canary_job",
}
_DESCRIPTIONS = {
    Strategy.CANARY: "Canary: shift traffic to the new version in steps while sequential tests watch its errors and "
    "latency against the stable revision; promote or roll back.",
    Strategy.BLUE_GREEN: "Blue-green: start the new version beside the stable one, validate it with requests, then "
    "switch all traffic at once (the old revision stays warm for a rollback).",
    Strategy.AB_TEST: "A/B test: split traffic between the two versions and promote the new one only if its outcome "
    "metric is better with statistical significance.",
    Strategy.SHADOW: "Shadow: mirror live requests to the new version (users get only the stable version's answers) and "
    "compare both answers on the same inputs: decision flips or prediction divergence, errors and latency; promote "
    "when credibly within the declared tolerances, reject when credibly outside them.",
    Strategy.SHADOW_THEN_CANARY: "Shadow, then canary: the shadow comparison first; when it passes, a canary of the "
    "same revision with real users.",
}
#: The serving asset of every declared model and its champion alias: what a rollout materializes
#: (a run request narrows it to one model).
ROLLOUT_SELECTION = dg.AssetSelection.tag(ROLE_TAG, "serving") | dg.AssetSelection.tag(ROLE_TAG, "champion")

rollout_jobs = [
    dg.define_asset_job(job, selection=ROLLOUT_SELECTION, tags={ROLLOUT_TAG: str(strategy)}, description=_DESCRIPTIONS[strategy])
    for strategy, job in JOB_FOR_STRATEGY.items()
]
rollback_job = dg.define_asset_job(
    "rollback_job",
    selection=ROLLOUT_SELECTION,
    tags={ROLLOUT_TAG: ROLLBACK},
    description="Send traffic back to the previous good revision and point MLflow's champion at it (alert-driven).",
)

defs = dg.Definitions(jobs=[*rollout_jobs, rollback_job])
