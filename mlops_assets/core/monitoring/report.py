"""Human-readable views of a `DriftReport`: a self-contained HTML page, small PNGs for the Dagster UI, and
both published as artifacts of the served version's MLflow run.

Why this design
---------------
The HTML page must open anywhere a drift asset's output ends up (an artifact store, an e-mail, a laptop
offline), so it is a single file: inline CSS, no JavaScript, no fonts or scripts from a CDN, and each
histogram a PNG embedded as base64. PNGs come from matplotlib's Agg renderer through `Figure` objects
(not `pyplot`), so nothing touches a global backend or needs a display, and every figure is freed as soon
as it is encoded. Histograms are small (about 5 x 2.4 inches at 80 dpi, 15-25 kB each) and are drawn
from the profile's sorted reference values (bin counts by `np.searchsorted` on the bin edges) and from the
current column, so the page costs well under a second for the project's 9 features.

Numeric histograms share one set of 40 bins between reference and current, spanning the 0.5-99.5th
percentiles of both samples; values outside are counted in the outer bins so that mass does not silently
vanish. Bars show the share of each sample's rows, so samples of different sizes compare directly.
Categorical features show the share per category, the most frequent 15, with categories never seen in
training labelled "(new)".

The Dagster UI gets two pictures embedded in the materialization (see `charts.py` for why a data URI):
the effect sizes, and the histograms of up to 12 features in one grid (drifted first, then by effect),
drawn at 64 dpi and palette-reduced so each stays at a few tens of kB in the event log. The page itself
is logged to the MLflow run of the version being served (`publish_report`), next to the training data it
was compared with, and linked through the MLflow UI: a `file://` link opens nothing from the Dagster UI's
page and names a file on whichever machine (or pod) wrote it.

matplotlib is imported inside the functions: the Dagster code location must not pay for it at load time.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mlops_assets.core.monitoring.charts import figure_png
from mlops_assets.core.monitoring.drift import (
    DRIFT,
    INVALID_TYPE,
    MISSING,
    NO_DRIFT,
    CategoricalProfile,
    DriftReport,
    FeatureDrift,
    ReferenceProfile,
    category_counts,
    numeric_values,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from mlops_assets.core.registry import MlflowRegistry

BINS = 40
TOP_CATEGORIES = 15
MAX_GRID_FEATURES = 12  # the UI's picture: drifted and largest effects first; the HTML report has all
GRID_COLUMNS = 3
REFERENCE_COLOUR = "#8c8c8c"
CURRENT_COLOUR = "#1f77b4"
DRIFT_COLOUR = "#d62728"
UNTESTED_COLOUR = "#e3b505"


def render_html(report: DriftReport, profile: ReferenceProfile, current: pd.DataFrame, path: str | Path) -> Path:
    """Write a self-contained HTML drift report (summary table + one histogram per feature) to `path`."""
    path = Path(path)
    sections = []
    for feature in report.features:
        png = _feature_histogram_png(feature, profile, current)
        sections.append(
            f'<div class="feature {html.escape(feature.verdict)}"><h3>{html.escape(feature.feature)} '
            f'<span class="verdict">{html.escape(feature.verdict)}</span></h3>'
            f'<img class="hist" alt="histogram of {html.escape(feature.feature)}" src="data:image/png;base64,{png}">'
            f"<p>{html.escape(feature.message or '')}</p></div>"
        )
    summary = report.summary()
    issues = "".join(f"<li>{html.escape(issue)}</li>" for issue in report.issues)
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Drift report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
td.l, th.l {{ text-align: left; }}
tr.drift td {{ background: #fbe3e3; }}
tr.untested td {{ background: #fdf5d9; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; margin-top: 1em; }}
.feature {{ border: 1px solid #ddd; padding: 0.5em; width: 420px; }}
.feature.drift {{ border-color: {DRIFT_COLOUR}; }}
.feature h3 {{ margin: 0 0 0.3em 0; font-size: 1em; }}
.feature p {{ font-size: 0.8em; margin: 0.3em 0 0 0; }}
.verdict {{ font-weight: normal; color: #555; }}
</style></head><body>
<h1>Drift report: {html.escape(report.dataset_verdict)}</h1>
<p>{summary["n_drifted"]} of {summary["n_tested"]} tested features drifted (share {report.drift_share:.2f};
dataset threshold {report.config.drift_share_threshold}). Reference {report.n_reference:,} rows, current
{report.n_current:,} rows. A feature drifts when its Benjamini-Hochberg adjusted p-value is at most
{report.config.alpha} and its effect size reaches its floor (numeric: Wasserstein-1 / reference std &ge;
{report.config.min_effect_numeric}; categorical: Jensen-Shannon distance &ge; {report.config.min_effect_categorical}).</p>
{f"<ul>{issues}</ul>" if issues else ""}
{_summary_table(report)}
<div class="grid">{"".join(sections)}</div>
</body></html>
"""
    path.write_text(body, encoding="utf-8")
    return path


def drift_plot_png(report: DriftReport, path: str | Path) -> Path:
    """One PNG bar chart of effect sizes, drifted features in red, each feature's floor marked."""
    path = Path(path)
    path.write_bytes(effect_sizes_png(report))
    return path


def effect_sizes_png(report: DriftReport) -> bytes:
    """The effect-size bar chart as a small palette PNG (for the file, the report's artifacts and the UI)."""
    from matplotlib.figure import Figure

    features = report.features
    fig = Figure(figsize=(6.5, 0.9 + 0.28 * max(len(features), 1)), dpi=90)
    ax = fig.add_subplot()
    y = np.arange(len(features))[::-1]
    effects = [f.effect_size if math.isfinite(f.effect_size) else 0.0 for f in features]
    colours = [
        DRIFT_COLOUR if f.verdict == DRIFT else REFERENCE_COLOUR if f.verdict == NO_DRIFT else UNTESTED_COLOUR for f in features
    ]
    ax.barh(y, effects, color=colours, height=0.7)
    floors = [f.min_effect for f in features]
    ax.scatter(floors, y, marker="|", s=160, color="black", zorder=3, label="floor")
    labels = [f.feature if f.verdict in (DRIFT, NO_DRIFT) else f"{f.feature} ({f.verdict})" for f in features]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("effect size (numeric: Wasserstein-1 / ref. std; categorical: Jensen-Shannon distance)", fontsize=8)
    ax.set_title(
        f"Drift: {report.dataset_verdict}, {len(report.drifted_features)} of {report.n_tested} tested features "
        f"(red = drift, yellow = not tested)",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def histogram_grid_png(
    report: DriftReport, profile: ReferenceProfile, current: pd.DataFrame, max_features: int = MAX_GRID_FEATURES
) -> tuple[bytes, list[str]]:
    """Reference vs current histograms of up to `max_features` features in one small PNG, drifted features
    first, then by effect size: (png, the features drawn). The HTML report has every feature."""
    from matplotlib.figure import Figure

    ranked = sorted(
        report.features,
        key=lambda f: (f.verdict != DRIFT, -(f.effect_size if math.isfinite(f.effect_size) else -1.0)),
    )[:max_features]
    columns = min(GRID_COLUMNS, max(len(ranked), 1))
    rows = max(1, math.ceil(len(ranked) / columns))
    fig = Figure(figsize=(3.25 * columns, 2.0 * rows), dpi=64)
    for i, feature in enumerate(ranked):
        ax = fig.add_subplot(rows, columns, i + 1)
        _feature_axes(ax, feature, profile, current, fontsize=8)
        ax.set_ylabel("")
        if i:
            legend = ax.get_legend()
            if legend is not None:
                legend.remove()
    fig.tight_layout(pad=0.6)
    return figure_png(fig), [f.feature for f in ranked]


@dataclass(frozen=True)
class PublishedReport:
    """Where a report's files went: the MLflow run's artifact location, and its page in the MLflow UI."""

    artifact_uri: str
    ui_url: str  # "" when the registry knows no UI URL


def publish_report(registry: MlflowRegistry, run_id: str, files: list[Path], artifact_path: str) -> PublishedReport:
    """Log `files` as artifacts of the MLflow run `run_id` under `artifact_path`, and link the first one
    through the MLflow UI (the run's artifacts tab, which previews HTML): a URL that opens from a web page
    and means the same thing on a laptop and on a cluster, unlike a path on the machine that wrote it."""
    client = registry.client()
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path)
    run = client.get_run(run_id)
    artifact_uri = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    if not registry.ui_url:
        return PublishedReport(artifact_uri, "")
    # The UI's own route for an artifact of a run: #/experiments/<id>/runs/<run>/artifacts/<path>.
    page = f"{artifact_path}/{files[0].name}" if files else artifact_path
    ui_url = f"{registry.ui_url.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}/artifacts/{page}"
    return PublishedReport(artifact_uri, ui_url)


def _summary_table(report: DriftReport) -> str:
    head = (
        '<table><tr><th class="l">feature</th><th class="l">kind</th><th class="l">verdict</th><th class="l">test</th>'
        "<th>statistic</th><th>p</th><th>p (BH)</th><th>effect</th><th>floor</th><th>n current</th><th>nulls</th>"
        '<th class="l">unseen categories</th></tr>'
    )
    rows = []
    for f in report.features:
        cls = "drift" if f.verdict == DRIFT else "" if f.verdict == NO_DRIFT else "untested"
        unseen = ", ".join(f.unseen_categories[:10]) + (" ..." if len(f.unseen_categories) > 10 else "")
        rows.append(
            f'<tr class="{cls}"><td class="l">{html.escape(f.feature)}</td><td class="l">{f.kind}</td>'
            f'<td class="l">{html.escape(f.verdict)}</td><td class="l">{f.test or "-"}</td>'
            f"<td>{_num(f.statistic, '.4g')}</td><td>{_num(f.p_value, '.3g')}</td><td>{_num(f.p_value_adjusted, '.3g')}</td>"
            f"<td>{_num(f.effect_size, '.3f')}</td><td>{_num(f.min_effect, 'g')}</td><td>{f.n_current:,}</td>"
            f'<td>{_num(f.null_share, ".1%")}</td><td class="l">{html.escape(unseen)}</td></tr>'
        )
    return head + "".join(rows) + "</table>"


def _feature_histogram_png(feature: FeatureDrift, profile: ReferenceProfile, current: pd.DataFrame) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 2.4), dpi=80)
    _feature_axes(fig.add_subplot(), feature, profile, current, fontsize=9)
    fig.tight_layout()
    return _png_base64(fig)


def _feature_axes(ax: Axes, feature: FeatureDrift, profile: ReferenceProfile, current: pd.DataFrame, fontsize: int) -> None:
    """One feature's reference-vs-current histogram (numeric) or category shares on `ax`."""
    # An invalid column (strings, dates) has no meaningful current histogram: the reference is drawn alone.
    usable = feature.feature in current.columns and feature.verdict not in (MISSING, INVALID_TYPE)
    column = current[feature.feature] if usable else None
    if feature.feature in profile.numeric:
        _numeric_histogram(ax, profile.numeric[feature.feature].sorted_values, column)
    else:
        _categorical_bars(ax, profile.categorical[feature.feature], column, set(feature.unseen_categories))
    effect = f", effect {feature.effect_size:.3f}" if math.isfinite(feature.effect_size) else ""
    ax.set_title(
        f"{feature.feature}: {feature.verdict}{effect}",
        fontsize=fontsize,
        color=DRIFT_COLOUR if feature.verdict == DRIFT else "black",
    )
    ax.tick_params(labelsize=7)
    ax.set_ylabel("share of rows", fontsize=7)
    ax.legend(fontsize=7)


def _numeric_histogram(ax: Axes, reference_sorted: np.ndarray, column: pd.Series | None) -> None:
    current = None
    if column is not None:
        values, n_bad, _ = numeric_values(column)
        if not n_bad:
            current = values[np.isfinite(values)]
    samples = [s for s in (reference_sorted, current) if s is not None and s.size]
    if not samples:
        ax.text(0.5, 0.5, "no values to plot", ha="center", va="center", transform=ax.transAxes)
        ax.plot([], [], color=REFERENCE_COLOUR, label="reference")
        return
    lo = min(_quantile_sorted(reference_sorted, 0.005) if reference_sorted.size else np.inf, _q(current, 0.005))
    hi = max(_quantile_sorted(reference_sorted, 0.995) if reference_sorted.size else -np.inf, _q(current, 0.995, hi=True))
    if not lo < hi:
        lo, hi = lo - 0.5, hi + 0.5  # constant feature: one visible bin around the value
    edges = np.linspace(lo, hi, BINS + 1)
    width = edges[1] - edges[0]
    if reference_sorted.size:
        # Counts from the sorted reference in O(bins log n); the outer bins take the tails beyond the 0.5-99.5% range.
        cuts = np.searchsorted(reference_sorted, edges[1:-1], side="left")
        ref_counts = np.diff(np.concatenate(([0], cuts, [reference_sorted.size])))
        ax.bar(
            edges[:-1],
            ref_counts / reference_sorted.size,
            width=width,
            align="edge",
            color=REFERENCE_COLOUR,
            alpha=0.6,
            label="reference",
        )
    if current is not None and current.size:
        cur_counts, _ = np.histogram(np.clip(current, lo, hi), bins=edges)
        ax.step(
            edges,
            np.concatenate((cur_counts, cur_counts[-1:])) / current.size,
            where="post",
            color=CURRENT_COLOUR,
            label="current",
        )
    else:
        ax.plot([], [], color=CURRENT_COLOUR, label="current (none)")


def _categorical_bars(ax: Axes, ref: CategoricalProfile, column: pd.Series | None, unseen: set[str]) -> None:
    ref_share = dict(zip(ref.categories, ref.counts / max(ref.n, 1), strict=True))
    counts = category_counts(column) if column is not None else {}
    total = sum(counts.values())
    cur_share = {k: v / total for k, v in counts.items()} if total else {}
    categories = sorted(set(ref_share) | set(cur_share), key=lambda c: -max(ref_share.get(c, 0.0), cur_share.get(c, 0.0)))
    categories = categories[:TOP_CATEGORIES]
    x = np.arange(len(categories))
    ax.bar(x - 0.2, [ref_share.get(c, 0.0) for c in categories], width=0.4, color=REFERENCE_COLOUR, label="reference")
    ax.bar(
        x + 0.2,
        [cur_share.get(c, 0.0) for c in categories],
        width=0.4,
        color=CURRENT_COLOUR,
        label="current" if total else "current (none)",
    )
    labels = [f"{c} (new)" if c in unseen else c for c in categories]
    ax.set_xticks(x, [label[:14] for label in labels], rotation=30, ha="right")


def _quantile_sorted(sorted_values: np.ndarray, q: float) -> float:
    return float(sorted_values[min(int(q * sorted_values.size), sorted_values.size - 1)])


def _q(values: np.ndarray | None, q: float, hi: bool = False) -> float:
    if values is None or not values.size:
        return -np.inf if hi else np.inf
    return float(np.quantile(values, q))


def _png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    # No "Software" text chunk: the page should carry no URL at all, not even matplotlib's inside a PNG.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _num(value: float, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)
