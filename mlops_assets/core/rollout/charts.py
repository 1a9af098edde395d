"""A rollout over time as one picture: the candidate's traffic share, its rates against their limits, and
how far each sequential test has come towards its decision.

Why this design
---------------
The rollout's asset events already carry everything (each `RolloutEvent` has the time, the candidate's
share and the analysis's evidence), but as numbers in one event after another; what a platform engineer
wants to see is the shape: when traffic moved, which rate rose, which test was about to fire. So the
orchestrator keeps the events it reported, with the evidence of every analysed window in between
(`RolloutContext.observe`: not asset events, since a canary watched every 2 s would make hundreds), and
hands them here at the end.

Three panels share the time axis:
- traffic: the candidate's share of user traffic, as the platform set it at each event (a shadow's
  candidate gets mirrored copies only, so its share stays 0 until it is promoted);
- rates: the cumulative estimates the evidence carries (canary vs baseline error and slow shares, a
  shadow's flip rate, an A/B test's conversion rates), with the declared limits dashed;
- tests: each anytime-valid test as log(e-value) / log(its threshold), the share of the way to its
  decision. A test fires when its line reaches 1, whatever its own threshold, so tests with thresholds
  from 20 to 10^4 fit one linear axis. Tests that guard promotion (names ending in `_met`) are dashed.

Only the tests that moved most are drawn (at most six), so the legend stays readable.

The analyses restart their clock when a phase starts (a shadow followed by a canary): times that go
back are continued from the previous phase's last time, so the axis is the rollout's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlops_assets.core.monitoring.charts import figure_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_TESTS = 6
#: Clamp of the tests' progress: below 0 the evidence points the other way; above 1 the test has fired.
PROGRESS_RANGE = (-0.5, 1.25)
DECISION_COLOURS = {"promote": "#2ca02c", "rollback": "#d62728", "reconcile_rollback": "#d62728"}
#: The declared limits drawn over the rates: (the evidence's dict holding it, or None for the top level, key, label).
_LIMITS = (
    ("thresholds", "max_error_rate", "error SLO"),
    ("tolerances", "max_error_rate", "error SLO"),
    ("tolerances", "max_flip_rate", "flip tolerance"),
    # A canary's slow share above this means its p95 latency is above the SLO.
    (None, "p95_slow_share", "slow share at the p95 SLO"),
)


@dataclass
class RolloutSeries:
    """The numbers the chart draws, one entry per event or window sample (None: that one did not say)."""

    times_s: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    traffic_percent: list[float] = field(default_factory=list)
    rates: dict[str, list[float | None]] = field(default_factory=dict)
    rate_limits: dict[str, float] = field(default_factory=dict)
    #: log(e) / log(threshold) per test; 1 is the decision.
    test_progress: dict[str, list[float | None]] = field(default_factory=dict)

    def _add(self, table: dict[str, list[float | None]], name: str, value: float | None) -> None:
        column = table.setdefault(name, [None] * (len(self.times_s) - 1))
        column.append(value)


def rollout_series(events: Iterable) -> RolloutSeries:
    """The series of the rollout's events (objects with `kind`, `percent`, `elapsed_s`, `evidence` and
    `status`, as `RolloutEvent`), in the order they were reported."""
    series = RolloutSeries()
    offset, last, percent = 0.0, 0.0, 0.0
    for event in events:
        elapsed = float(event.elapsed_s or 0.0)
        if elapsed + offset < last:  # a new phase restarted its clock
            offset = last - elapsed
        last = elapsed + offset
        if event.percent is not None:
            percent = float(event.percent)
        elif getattr(event.status, "canary_percent", None) is not None:
            percent = float(event.status.canary_percent)
        evidence = event.evidence or {}
        series.times_s.append(last)
        series.kinds.append(event.kind)
        series.traffic_percent.append(percent)
        for name, value in _rates(evidence).items():
            series._add(series.rates, name, value)
        for name, value in _progress(evidence).items():
            series._add(series.test_progress, name, value)
        for table in (series.rates, series.test_progress):
            for column in table.values():
                if len(column) < len(series.times_s):
                    column.append(None)
        series.rate_limits.update(_limits(evidence))
    return series


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None


def _rates(evidence: dict) -> dict[str, float | None]:
    estimates = evidence.get("estimates")
    if isinstance(estimates, dict):
        return {k: _number(v) for k, v in estimates.items() if k.endswith(("_rate", "_share"))}
    # An A/B test reports its two conversion rates at the top level.
    return {k: _number(evidence[k]) for k in ("rate_a", "rate_b") if k in evidence}


def _limits(evidence: dict) -> dict[str, float]:
    limits = {}
    for where, key, label in _LIMITS:
        holder = evidence if where is None else evidence.get(where)
        value = _number(holder.get(key)) if isinstance(holder, dict) else None
        if value is not None:
            limits[label] = value
    return limits


def _progress(evidence: dict) -> dict[str, float | None]:
    e_values = evidence.get("e_values")
    if not isinstance(e_values, dict):
        return {}
    bounds = {**(evidence.get("e_value_thresholds") or {}), **(evidence.get("reject_e_value_thresholds") or {})}
    pass_bound = _number(evidence.get("pass_e_value_threshold"))
    progress = {}
    for name, e in e_values.items():
        bound = _number(bounds.get(name)) or (pass_bound if name.endswith("_met") else None)
        e = _number(e)
        if bound is None or bound <= 1.0 or e is None:
            continue
        value = math.log(e) / math.log(bound) if e > 0 else PROGRESS_RANGE[0]
        progress[name] = min(max(value, PROGRESS_RANGE[0]), PROGRESS_RANGE[1])
    return progress


def _shown_tests(series: RolloutSeries) -> list[str]:
    def reach(name: str) -> float:
        return max((v for v in series.test_progress[name] if v is not None), default=PROGRESS_RANGE[0])

    return sorted(series.test_progress, key=lambda name: (-reach(name), name))[:MAX_TESTS]


def rollout_chart_png(series: RolloutSeries, title: str) -> bytes:
    """The three panels as a small palette PNG."""
    return figure_png(rollout_figure(series, title))


def rollout_figure(series: RolloutSeries, title: str) -> Figure:
    """The three panels: traffic, rates with their limits, the tests' progress (each line labelled by its series)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 6.0), dpi=72)
    traffic, rates, tests = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.2, 1.4]})
    t = series.times_s
    traffic.step(t, series.traffic_percent, where="post", color="#1f77b4", marker="o", markersize=3, label="traffic")
    traffic.set_ylim(-5, 105)
    traffic.set_ylabel("candidate\ntraffic %", fontsize=8)
    traffic.set_title(title, fontsize=9)

    for name, values in sorted(series.rates.items()):
        if any(v is not None for v in values):
            rates.plot(t, _nan([None if v is None else v * 100 for v in values]), marker=".", markersize=4, label=name)
    for label, limit in sorted(series.rate_limits.items()):
        rates.axhline(limit * 100, color="grey", linestyle="--", linewidth=1)
        rates.annotate(label, (1.0, limit * 100), xycoords=("axes fraction", "data"), fontsize=7, ha="right", va="bottom")
    rates.set_ylabel("rate %", fontsize=8)
    _legend(rates)

    for name in _shown_tests(series):
        style = "--" if name.endswith("_met") else "-"
        tests.plot(t, _nan(series.test_progress[name]), marker=".", markersize=4, linestyle=style, label=name)
    tests.axhline(1.0, color="black", linewidth=1)
    tests.annotate("decision", (1.0, 1.0), xycoords=("axes fraction", "data"), fontsize=7, ha="right", va="bottom")
    tests.set_ylim(*PROGRESS_RANGE)
    tests.set_ylabel("log e / log threshold", fontsize=8)
    tests.set_xlabel("seconds since the rollout started", fontsize=8)
    _legend(tests)

    for ax in (traffic, rates, tests):
        ax.tick_params(labelsize=7)
        for when, kind in zip(t, series.kinds, strict=True):
            if kind in DECISION_COLOURS:
                ax.axvline(when, color=DECISION_COLOURS[kind], linewidth=1.2, alpha=0.7)
    fig.tight_layout(pad=0.6)
    return fig


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best", ncol=2, framealpha=0.7)
