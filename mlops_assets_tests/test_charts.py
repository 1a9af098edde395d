"""Pictures for the Dagster UI: the PNG helpers (a palette PNG, a markdown image with a data URI, which
the UI's markdown renders), the rollout chart (its series from the events the serving asset reported,
and the lines it draws), the drift histograms grid, and the drift report published to the version's
MLflow run (the suite's real MLflow on SQLite) and linked through the MLflow UI, never as a file path."""

from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass, field

import dagster as dg
import pytest
from PIL import Image

from mlops_assets.core.monitoring.charts import PNG_SIGNATURE, figure_png, png_markdown
from mlops_assets.core.monitoring.drift import DRIFT, DriftConfig, ReferenceProfile, detect_drift
from mlops_assets.core.monitoring.report import histogram_grid_png, publish_report
from mlops_assets.core.registry import MlflowRegistry
from mlops_assets.core.rollout.charts import rollout_chart_png, rollout_figure, rollout_series
from mlops_assets.defs.serving.assets import rollout_chart_metadata
from mlops_assets.demo.data import CATEGORICAL_FEATURES, NUMERIC_FEATURES, generate_fraud_data

DATA_URI = re.compile(r"^!\[[^\]\n]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def decode(markdown: str) -> Image.Image:
    """The PNG inside a markdown image, decoded (and fully read, so a truncated file fails here)."""
    match = DATA_URI.match(markdown)
    assert match, markdown[:80]
    image = Image.open(io.BytesIO(base64.b64decode(match.group(1), validate=True)))
    image.load()
    assert image.format == "PNG"
    return image


@dataclass
class Status:
    canary_percent: int | None = None


@dataclass
class Event:
    """What the chart reads of a `RolloutEvent`."""

    kind: str
    percent: int | None
    elapsed_s: float
    evidence: dict = field(default_factory=dict)
    status: Status = field(default_factory=Status)


def canary_evidence(canary_errors: int, requests: int, e_error: float, e_met: float) -> dict:
    return {
        "estimates": {
            "canary_error_rate": canary_errors / requests,
            "baseline_error_rate": 0.001,
            "error_rate_ratio": canary_errors / requests / 0.001,  # a ratio is no rate: not drawn
            "canary_slow_share": None,
        },
        "e_values": {"error_slo": e_error, "error_slo_met": e_met},
        "e_value_thresholds": {"error_slo": 400.0, "error_slo_met": 20.0},
        "thresholds": {"max_error_rate": 0.01},
        "p95_slow_share": 0.05,
    }


CANARY = [
    Event("canary_start", 10, 0.0, {"reason": "canary deployed"}),
    Event("step", 25, 30.0, canary_evidence(1, 500, 2.0, 20.0)),
    Event("promote", 100, 75.0, canary_evidence(2, 2000, 0.5, 400.0)),
]


def test_png_helpers_make_a_small_palette_png_in_a_markdown_data_uri():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=72)
    fig.add_subplot().plot(range(100), [math.sin(x / 7) for x in range(100)])
    png = figure_png(fig)
    assert png.startswith(PNG_SIGNATURE) and b"Software" not in png
    image = decode(png_markdown(png, "a [wave]\nover time"))
    assert image.size == (288, 216) and image.mode == "P" and len(image.getcolors()) <= 64
    assert png_markdown(png, "a [wave]\nover time").startswith("![a (wave) over time](data:image/png;base64,")
    with pytest.raises(ValueError):
        png_markdown(b"<svg/>", "not a png")


def test_rollout_series_follows_traffic_rates_limits_and_the_tests_progress():
    series = rollout_series(CANARY)
    assert series.times_s == [0.0, 30.0, 75.0]
    assert series.traffic_percent == [10.0, 25.0, 100.0]
    assert series.rates == {
        "canary_error_rate": [None, 0.002, 0.001],
        "baseline_error_rate": [None, 0.001, 0.001],
        "canary_slow_share": [None, None, None],
    }
    assert series.rate_limits == {"error SLO": 0.01, "slow share at the p95 SLO": 0.05}
    error, met = series.test_progress["error_slo"], series.test_progress["error_slo_met"]
    assert error[0] is None and error[1] == pytest.approx(math.log(2) / math.log(400))
    assert error[2] == pytest.approx(math.log(0.5) / math.log(400))  # evidence the other way: below 0
    assert met[1:] == [pytest.approx(1.0), 1.25]  # at its threshold: the decision; beyond it: clamped


def test_rollout_series_continues_the_clock_when_a_phase_restarts_it():
    shadow = {
        "estimates": {"candidate_error_rate": 0.0, "stable_error_rate": 0.0, "flip_rate": 0.01},
        "e_values": {"flip_rate": 3.0, "flip_rate_met": 5.0},
        "reject_e_value_thresholds": {"flip_rate": 250.0},
        "pass_e_value_threshold": 20.0,
        "tolerances": {"max_error_rate": 0.01, "max_flip_rate": 0.02},
    }
    events = [
        Event("shadow_start", 0, 0.0),
        Event("shadow_window", 0, 40.0, shadow),
        Event("shadow_passed", 0, 60.0, shadow),
        Event("canary_start", None, 1.0, status=Status(canary_percent=10)),  # run_canary restarts the clock
        Event("promote", 100, 50.0),
    ]
    series = rollout_series(events)
    assert series.times_s == [0.0, 40.0, 60.0, 60.0, 109.0]
    assert series.traffic_percent == [0.0, 0.0, 0.0, 10.0, 100.0]
    assert series.rate_limits == {"error SLO": 0.01, "flip tolerance": 0.02}
    assert series.test_progress["flip_rate_met"][1] == pytest.approx(math.log(5) / math.log(20))
    assert series.test_progress["flip_rate"][1] == pytest.approx(math.log(3) / math.log(250))


def test_rollout_chart_draws_each_series_and_is_a_small_png():
    series = rollout_series(CANARY)
    fig = rollout_figure(series, "canary of fraud_detector v2: promoted")
    traffic, rates, tests = fig.axes
    assert traffic.get_title() == "canary of fraud_detector v2: promoted"
    assert [line.get_label() for line in traffic.get_lines() if not line.get_label().startswith("_")] == ["traffic"]
    assert {t.get_text() for t in rates.get_legend().get_texts()} == {"canary_error_rate", "baseline_error_rate"}
    assert {t.get_text() for t in tests.get_legend().get_texts()} == {"error_slo", "error_slo_met"}
    limits = sorted(a.get_text() for a in rates.texts)
    assert limits == ["error SLO", "slow share at the p95 SLO"]
    png = rollout_chart_png(series, "canary of fraud_detector v2: promoted")
    image = Image.open(io.BytesIO(png))
    assert image.size == (504, 432) and len(png) < 60_000


def test_serving_asset_chart_metadata_is_an_embedded_image_and_never_fails_the_rollout():
    warnings: list[str] = []
    meta = rollout_chart_metadata(CANARY, "canary of fraud_detector v2: promoted", warnings.append)
    assert isinstance(meta["rollout_chart"], dg.MarkdownMetadataValue)
    decode(meta["rollout_chart"].value)
    assert rollout_chart_metadata([], "unchanged", warnings.append) == {}
    assert rollout_chart_metadata([object()], "broken", warnings.append) == {} and "AttributeError" in warnings[0]


@pytest.fixture(scope="module")
def drifted():
    profile = ReferenceProfile.from_frame(generate_fraud_data(3000, seed=1), NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    current = generate_fraud_data(1000, seed=2, shift=1.0)
    return profile, current, detect_drift(profile, current, DriftConfig())


def test_histogram_grid_shows_drifted_features_first_in_a_small_png(drifted):
    profile, current, report = drifted
    png, drawn = histogram_grid_png(report, profile, current)
    verdicts = {f.feature: f.verdict for f in report.features}
    assert sorted(drawn) == sorted(verdicts) and verdicts[drawn[0]] == DRIFT
    first_other = next((i for i, name in enumerate(drawn) if verdicts[name] != DRIFT), len(drawn))
    assert all(verdicts[name] == DRIFT for name in drawn[:first_other])
    assert all(verdicts[name] != DRIFT for name in drawn[first_other:])
    image = decode(png_markdown(png, "histograms"))
    assert image.size[0] == 3 * 208 and len(png) < 80_000
    few, shown = histogram_grid_png(report, profile, current, max_features=2)
    assert len(shown) == 2 and Image.open(io.BytesIO(few)).size[0] == 2 * 208


def test_report_is_logged_to_the_versions_mlflow_run_and_linked_through_the_mlflow_ui(tmp_path, registry: MlflowRegistry):
    registry = registry.model_copy(update={"ui_url": "http://127.0.0.1:5000"})
    experiment = registry.ensure_experiment("test_charts")
    run_id = registry.client().create_run(experiment).info.run_id
    html, png = tmp_path / "drift-1.html", tmp_path / "drift-1.png"
    html.write_text("<html>report</html>")
    png.write_bytes(PNG_SIGNATURE)
    published = publish_report(registry, run_id, [html, png], "drift/20260101T000000")
    assert published.ui_url == (
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}/artifacts/drift/20260101T000000/drift-1.html"
    )
    logged = registry.client().list_artifacts(run_id, "drift/20260101T000000")
    assert sorted(a.path for a in logged) == ["drift/20260101T000000/drift-1.html", "drift/20260101T000000/drift-1.png"]
    assert published.artifact_uri.endswith(f"{run_id}/artifacts/drift/20260101T000000")
    without_ui = registry.model_copy(update={"ui_url": ""})
    assert publish_report(without_ui, run_id, [html], "drift/again").ui_url == ""
