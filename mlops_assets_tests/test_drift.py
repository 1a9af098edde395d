"""Tests of feature drift detection (`mlops_assets.core.monitoring.drift`) and its reports (`.report`).

What they pin down:
- the statistics are the textbook ones: KS statistic and p-value against `scipy.stats.ks_2samp(method="asymp")`,
  Wasserstein-1 against `scipy.stats.wasserstein_distance`, chi-squared against `scipy.stats.chi2_contingency`
  on an independently built contingency table, Benjamini-Hochberg against statsmodels' `fdr_bh`;
- the decision rule does what it is for, in seeded simulations: on healthy data with 50 features at most 5%
  of days raise any alarm, while an uncorrected p < 0.05 rule alarms on most days; a 0.3 SD shift is
  found; a tiny shift at a huge sample size is significant but not called drift;
- every bad input gets a clear verdict or a ValueError, never a crash or a silent "no drift";
- on the project's own generator, two healthy samples do not drift and a 0.5 shift does;
- the HTML report is self-contained (no URL, no script) with one histogram per feature.
All seeded; most of the time goes to the 200-day false-alarm simulation.

The decisions are tested with the thresholds they were written for, `CONFIG` (numeric floor 0.1, dataset drift at
half the features), passed explicitly; the production defaults (`DriftConfig()`, what the drift assets run) are
checked on the same simulated days and in `test_production_defaults`.
"""

from __future__ import annotations

import json
import math
import pickle
import zlib

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from mlops_assets.core.monitoring.drift import (
    ALL_NULL,
    CONSTANT,
    DRIFT,
    EXACT_KS_MAX_N,
    INSUFFICIENT_DATA,
    INVALID_TYPE,
    MISSING,
    NO_DRIFT,
    DriftConfig,
    ReferenceProfile,
    benjamini_hochberg,
    detect_drift,
)
from mlops_assets.core.monitoring.report import drift_plot_png, render_html
from mlops_assets.demo.data import CATEGORICAL_FEATURES, FEATURES, NUMERIC_FEATURES, generate_fraud_data

#: Numeric floor 0.1 (Evidently's threshold, as a floor) and dataset drift at half the tested features.
CONFIG = DriftConfig(min_effect_numeric=0.1, drift_share_threshold=0.5)


def one_feature(reference: np.ndarray, current: np.ndarray, config: DriftConfig = CONFIG, kind: str = "numeric"):
    """Drift result of a single feature `x` (numeric or categorical)."""
    ref = pd.DataFrame({"x": reference})
    cur = pd.DataFrame({"x": current})
    profile = ReferenceProfile.from_frame(ref, ["x"] if kind == "numeric" else [], ["x"] if kind == "categorical" else [])
    return detect_drift(profile, cur, config).feature("x")


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with the reference implementations
# ---------------------------------------------------------------------------------------------------------------------

KS_CASES = {
    "normal_unequal_sizes": lambda rng: (rng.normal(size=500), rng.normal(0.1, 1.0, size=700)),
    "normal_2000_shifted": lambda rng: (rng.normal(size=2000), rng.normal(0.3, 1.0, size=2000)),
    "poisson_ties": lambda rng: (rng.poisson(3, 3000).astype(float), rng.poisson(3.2, 1500).astype(float)),
    "rounded_ties_and_scale": lambda rng: (np.round(rng.normal(size=1200), 1), np.round(rng.normal(0, 1.3, size=900), 1)),
    "small_samples": lambda rng: (rng.exponential(size=30), rng.exponential(1.5, size=45)),
    "with_nulls": lambda rng: (
        np.where(rng.random(2000) < 0.1, np.nan, rng.normal(size=2000)),
        np.where(rng.random(1000) < 0.3, np.nan, rng.normal(0.2, 1.0, size=1000)),
    ),
    # Effective size above EXACT_KS_MAX_N with n_e D^2 in [2.2, 370): the closed-form p-value branch.
    "large_closed_form_branch": lambda rng: (rng.normal(size=40_000), rng.normal(0.05, 1.0, size=30_000)),
}


@pytest.mark.parametrize("case", sorted(KS_CASES))
def test_ks_and_wasserstein_agree_with_scipy(case: str) -> None:
    rng = np.random.default_rng(zlib.crc32(case.encode()))  # hash() is salted per process; crc32 is not
    reference, current = KS_CASES[case](rng)
    result = one_feature(reference, current)
    ref, cur = reference[~np.isnan(reference)], current[~np.isnan(current)]
    expected = stats.ks_2samp(ref, cur, method="asymp")
    assert result.test == "ks"
    assert abs(result.statistic - expected.statistic) <= 1e-9
    en = len(ref) * len(cur) / (len(ref) + len(cur))
    if en <= EXACT_KS_MAX_N:
        assert result.p_value == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
    else:
        assert 2.2 <= round(en) * expected.statistic**2 < 370  # really the closed-form branch
        assert result.p_value == pytest.approx(expected.pvalue, rel=2e-3)
    w1 = stats.wasserstein_distance(ref, cur)
    assert result.effect_size == pytest.approx(w1 / np.std(ref), rel=1e-9)
    assert result.n_reference == len(ref) and result.n_current == len(cur)
    assert result.null_share == pytest.approx(1 - len(cur) / len(current))


@pytest.mark.parametrize("levels", [["a", "b", "c", "d"], ["yes", "no"]])
def test_chi2_agrees_with_chi2_contingency_and_reports_unseen_categories(levels: list[str]) -> None:
    rng = np.random.default_rng(3)
    reference = rng.choice(levels, size=1500, p=np.linspace(1, 2, len(levels)) / np.linspace(1, 2, len(levels)).sum())
    current = rng.choice(levels + ["new_level"], size=800, p=[*(0.95 / len(levels) for _ in levels), 0.05])
    result = one_feature(reference, current, kind="categorical")
    # Independent construction of the 2 x K table: pandas crosstab of (sample, value).
    table = pd.crosstab(np.r_[np.zeros(len(reference)), np.ones(len(current))], np.r_[reference, current].astype(str)).to_numpy()
    chi2, p, _, _ = stats.chi2_contingency(table)
    assert result.test == "chi2"
    assert result.statistic == pytest.approx(chi2, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-9, abs=1e-300)
    assert result.unseen_categories == ["new_level"]
    assert "never seen in training" in result.message
    shares = table / table.sum(axis=1, keepdims=True)
    mid = shares.mean(axis=0)
    js = math.sqrt((stats.entropy(shares[0], mid, base=2) + stats.entropy(shares[1], mid, base=2)) / 2)
    assert result.effect_size == pytest.approx(js, rel=1e-9)


def test_chi2_yates_correction_for_two_categories_matches_scipy() -> None:
    """With K = 2 (dof 1) chi2_contingency applies Yates' correction; the result must be the same."""
    reference = np.array(["a"] * 600 + ["b"] * 400)
    current = np.array(["a"] * 270 + ["b"] * 230)
    result = one_feature(reference, current, kind="categorical")
    chi2, p, dof, _ = stats.chi2_contingency(np.array([[600, 400], [270, 230]]))
    assert dof == 1
    assert result.statistic == pytest.approx(chi2, rel=1e-12) and result.p_value == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("size", [1, 2, 7, 50, 300])
def test_benjamini_hochberg_matches_statsmodels(size: int) -> None:
    rng = np.random.default_rng(size)
    p = rng.random(size) ** 3
    if size > 5:
        p[:3] = p[3]  # ties
        p[4] = 0.0
        p[5] = 1.0
    expected = multipletests(p, alpha=0.05, method="fdr_bh")[1]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=0, atol=1e-12)


def test_benjamini_hochberg_rejects_invalid_p_values() -> None:
    for bad in ([0.1, np.nan], [-0.1], [1.5]):
        with pytest.raises(ValueError, match="p_values"):
            benjamini_hochberg(bad)
    assert benjamini_hochberg([]).size == 0


# ---------------------------------------------------------------------------------------------------------------------
# Seeded simulations: false alarms, power, tiny shifts
# ---------------------------------------------------------------------------------------------------------------------


def healthy_and_shifted_days(runs: int, n: int, k: int, shift: float, shifted: int, seed: int):
    rng = np.random.default_rng(seed)
    columns = [f"x{i}" for i in range(k)]
    for _ in range(runs):
        reference = pd.DataFrame(dict(zip(columns, rng.normal(size=(k, n)), strict=True)))
        current_values = rng.normal(size=(k, n))
        current_values[:shifted] += shift
        yield ReferenceProfile.from_frame(reference), pd.DataFrame(dict(zip(columns, current_values, strict=True)))


def test_false_alarms_on_healthy_data_stay_below_alpha_while_the_uncorrected_rule_alarms_most_days() -> None:
    """200 healthy days, 50 numeric features, 2,000 vs 2,000 rows. Ours: any drifting feature or dataset drift
    counts as an alarm. The guide: any feature with an uncorrected KS p < 0.05 (expected 1 - 0.95^50 = 92%)."""
    runs = 200
    ours = guide = dataset = production = production_dataset = 0
    defaults = DriftConfig()
    for profile, current in healthy_and_shifted_days(runs, n=2000, k=50, shift=0.0, shifted=0, seed=20261126):
        report = detect_drift(profile, current, CONFIG)
        ours += bool(report.drifted_features) or report.dataset_drift
        dataset += report.dataset_drift
        guide += any(f.p_value < 0.05 for f in report.features)
        # The production defaults decide on the same p-values and effects with their own floor and share.
        drifted = [
            f for f in report.features if f.p_value_adjusted <= defaults.alpha and f.effect_size >= defaults.min_effect_numeric
        ]
        production += bool(drifted)
        production_dataset += len(drifted) / report.n_tested >= defaults.drift_share_threshold
    print(
        f"false-alarm days: ours {ours / runs:.1%} (production defaults {production / runs:.1%}), "
        f"uncorrected KS p<0.05 {guide / runs:.1%}"
    )
    assert ours / runs <= 0.05
    assert dataset == 0
    assert guide / runs >= 0.8
    # Below 0.1 SD the floor removes none of BH's chance discoveries at 2,000 rows, so a feature-level alarm comes on
    # about as many days as with BH alone (17 of these 200); the dataset-level share that fails the check is never reached.
    assert production / runs <= 0.12
    assert production_dataset == 0


def test_power_on_a_0_3_sd_shift_at_2000_rows() -> None:
    """5 of 50 features shifted by 0.3 SD: each is found on (essentially) every day. BH controls the false
    discovery rate, not the chance of any false discovery once real drift is present: a few null features ride
    along (BH's bound is alpha * 45/50 = 4.5% of discoveries; the effect floor removes some of those)."""
    runs, found, false = 30, 0, 0
    for profile, current in healthy_and_shifted_days(runs, n=2000, k=50, shift=0.3, shifted=5, seed=11):
        drifted = set(detect_drift(profile, current, CONFIG).drifted_features)
        found += len(drifted & {f"x{i}" for i in range(5)})
        false += len(drifted - {f"x{i}" for i in range(5)})
    fdp = false / (found + false)
    print(f"power at 0.3 SD, 2,000 vs 2,000 rows: {found / (5 * runs):.1%}; false discoveries {false} ({fdp:.1%})")
    assert found / (5 * runs) >= 0.99
    assert fdp <= 0.05


def test_a_tiny_shift_at_a_huge_sample_is_significant_but_not_drift() -> None:
    rng = np.random.default_rng(5)
    reference, current = rng.normal(size=200_000), rng.normal(0.03, 1.0, size=200_000)
    result = one_feature(reference, current)
    assert result.p_value_adjusted < 1e-6
    assert result.verdict == NO_DRIFT and "negligible" in result.message
    assert one_feature(reference, current, CONFIG.model_copy(update={"min_effect_numeric": 0.01})).verdict == DRIFT


def test_production_defaults() -> None:
    """`DriftConfig()` is what the drift assets run: a 0.05 SD floor and dataset drift at a fifth of the features.
    A 0.07 SD shift at 50,000 rows drifts under it (and not under a 0.1 floor); 2 of 9 drifting features is dataset drift."""
    defaults = DriftConfig()
    assert (defaults.min_effect_numeric, defaults.drift_share_threshold, defaults.alpha) == (0.05, 0.2, 0.05)
    rng = np.random.default_rng(12)
    reference, current = rng.normal(size=50_000), rng.normal(0.07, 1.0, size=50_000)
    assert one_feature(reference, current, defaults).verdict == DRIFT
    assert one_feature(reference, current).verdict == NO_DRIFT
    profile = ReferenceProfile.from_frame(generate_fraud_data(5000, seed=1), NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    current = generate_fraud_data(5000, seed=2)
    current["amount"] *= 1.5
    current["hour"] = (current["hour"] + 6) % 24
    report = detect_drift(profile, current)
    assert report.config == defaults and set(report.drifted_features) == {"amount", "hour"}
    assert report.dataset_drift and report.drift_share == pytest.approx(2 / len(FEATURES))
    assert not detect_drift(profile, current, CONFIG).dataset_drift


def test_a_noisy_small_batch_is_not_drift_without_significance() -> None:
    """Evidently's rule alone (normalised Wasserstein >= 0.1) fires on noise at 40 rows; the test gate does not."""
    rng = np.random.default_rng(8)
    alarms_ours = alarms_wasserstein_only = 0
    for _ in range(40):
        result = one_feature(rng.normal(size=5000), rng.normal(size=40))
        alarms_ours += result.verdict == DRIFT
        alarms_wasserstein_only += result.effect_size >= 0.1
    assert alarms_ours <= 2 < alarms_wasserstein_only


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear verdict or a ValueError, never a crash or a silent pass
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fraud_profile() -> ReferenceProfile:
    return ReferenceProfile.from_frame(generate_fraud_data(3000, seed=1), NUMERIC_FEATURES, CATEGORICAL_FEATURES)


def test_empty_current_frame_is_insufficient_data_not_no_drift(fraud_profile: ReferenceProfile) -> None:
    report = detect_drift(fraud_profile, generate_fraud_data(10, seed=2).iloc[:0], CONFIG)
    assert {f.verdict for f in report.features} == {INSUFFICIENT_DATA}
    assert report.dataset_verdict == INSUFFICIENT_DATA and not report.dataset_drift
    assert "0 rows" in report.features[0].message
    assert any("insufficient_data" in issue for issue in report.issues)
    # No columns at all: every feature is missing.
    report = detect_drift(fraud_profile, pd.DataFrame(), CONFIG)
    assert {f.verdict for f in report.features} == {MISSING}
    assert report.dataset_verdict == INSUFFICIENT_DATA


def test_tiny_samples_are_insufficient_data(fraud_profile: ReferenceProfile) -> None:
    report = detect_drift(fraud_profile, generate_fraud_data(12, seed=2, shift=2.0), CONFIG)
    assert {f.verdict for f in report.features} == {INSUFFICIENT_DATA}
    assert "min_rows=30" in report.features[0].message
    assert not report.dataset_drift
    # A tiny reference is no better.
    small = ReferenceProfile.from_frame(generate_fraud_data(20, seed=1), NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    assert detect_drift(small, generate_fraud_data(500, seed=2), CONFIG).features[0].verdict == INSUFFICIENT_DATA


def test_all_null_columns_get_their_own_verdict(fraud_profile: ReferenceProfile) -> None:
    current = generate_fraud_data(500, seed=2)
    current["amount"] = np.nan
    current["channel"] = None
    current.loc[:99, "hour"] = np.nan  # 20% nulls: dropped, counted, still tested
    report = detect_drift(fraud_profile, current, CONFIG)
    assert report.feature("amount").verdict == ALL_NULL and "all 500" in report.feature("amount").message
    assert report.feature("channel").verdict == ALL_NULL
    hour = report.feature("hour")
    assert hour.verdict in (NO_DRIFT, DRIFT) and hour.null_share == pytest.approx(0.2) and hour.n_current == 400
    assert "100 null" in hour.message
    # All null in the reference: reported as such, not tested.
    reference = generate_fraud_data(500, seed=1)
    reference["distance_km"] = np.nan
    profile = ReferenceProfile.from_frame(reference, NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    result = detect_drift(profile, generate_fraud_data(500, seed=2), CONFIG).feature("distance_km")
    assert result.verdict == ALL_NULL and "reference" in result.message


def test_constant_columns() -> None:
    ones = np.ones(300)
    both = one_feature(ones, np.ones(200))
    assert both.verdict == CONSTANT and "constant in reference and current" in both.message
    # Constant reference, different current: a real change, tested; the effect is normalised by the pooled std.
    moved = one_feature(ones, np.r_[np.ones(100), np.full(100, 2.0)])
    assert moved.verdict == DRIFT and math.isfinite(moved.effect_size) and "reference is constant" in moved.message
    # Varying reference, constant current: tested, and found.
    frozen = one_feature(np.random.default_rng(1).normal(size=300), np.zeros(200))
    assert frozen.verdict == DRIFT and "current is constant" in frozen.message
    single = one_feature(np.array(["x"] * 100), np.array(["x"] * 80), kind="categorical")
    assert single.verdict == CONSTANT


def test_missing_feature_and_extra_columns_are_reported(fraud_profile: ReferenceProfile) -> None:
    current = generate_fraud_data(500, seed=2).drop(columns=["merchant_risk", "country"]).assign(new_col=1.0)
    report = detect_drift(fraud_profile, current, CONFIG)
    assert report.feature("merchant_risk").verdict == MISSING and report.feature("country").verdict == MISSING
    assert "absent" in report.feature("merchant_risk").message
    assert report.n_tested == len(FEATURES) - 2
    assert any("missing" in issue and "merchant_risk" in issue for issue in report.issues)
    assert any("new_col" in issue for issue in report.issues)


def test_unseen_categories_are_their_own_column_and_drive_drift(fraud_profile: ReferenceProfile) -> None:
    current = generate_fraud_data(2000, seed=2)
    current.loc[:399, "country"] = "XX"  # 20% of rows from a country never seen in training
    result = detect_drift(fraud_profile, current, CONFIG).feature("country")
    assert result.verdict == DRIFT and result.unseen_categories == ["XX"]
    assert "'XX'" in result.message


def test_strings_in_a_numeric_feature_are_invalid_type(fraud_profile: ReferenceProfile) -> None:
    current = generate_fraud_data(500, seed=2)
    current["amount"] = current["amount"].astype(object)
    current.loc[3, "amount"] = "12,50 EUR"
    report = detect_drift(fraud_profile, current, CONFIG)
    result = report.feature("amount")
    assert result.verdict == INVALID_TYPE and "not numeric" in result.message and "12,50 EUR" in result.message
    assert report.feature("hour").verdict in (NO_DRIFT, DRIFT)  # the other features are still tested
    # Numbers stored as strings are parsed, tested, and the coercion is said.
    current["amount"] = generate_fraud_data(500, seed=2)["amount"].astype(str)
    result = detect_drift(fraud_profile, current, CONFIG).feature("amount")
    assert result.verdict == NO_DRIFT and "coerced" in result.message
    # Dates in a numeric feature.
    current["amount"] = pd.Timestamp("2024-01-01")
    assert detect_drift(fraud_profile, current, CONFIG).feature("amount").verdict == INVALID_TYPE


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 0.0),
        ("alpha", 1.5),
        ("alpha", float("nan")),
        ("min_effect_numeric", -0.1),
        ("min_effect_categorical", 1.5),
        ("min_rows", 1),
        ("min_rows", 2.5),
        ("min_rows", True),
        ("drift_share_threshold", 0.0),
        ("drift_share_threshold", "half"),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"for DriftConfig\n{field}\n"):
        DriftConfig(**{field: value})


def test_bad_reference_or_arguments_raise_clear_errors() -> None:
    frame = generate_fraud_data(100, seed=1)
    with pytest.raises(ValueError, match="not in the reference frame: \\['nope'\\]"):
        ReferenceProfile.from_frame(frame, ["amount", "nope"], [])
    with pytest.raises(ValueError, match="declared numeric"):
        ReferenceProfile.from_frame(frame, ["channel"], [])
    with pytest.raises(ValueError, match="both numeric and categorical"):
        ReferenceProfile.from_frame(frame, ["amount"], ["amount"])
    profile = ReferenceProfile.from_frame(frame, NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    with pytest.raises(TypeError, match="DataFrame"):
        detect_drift(profile, frame.to_numpy(), CONFIG)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate column"):
        detect_drift(profile, pd.concat([frame, frame[["amount"]]], axis=1), CONFIG)


# ---------------------------------------------------------------------------------------------------------------------
# The project's own data, serialisation, outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_project_generator_healthy_vs_shifted() -> None:
    profile = ReferenceProfile.from_frame(generate_fraud_data(5000, seed=1), NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    healthy = detect_drift(profile, generate_fraud_data(5000, seed=2), CONFIG)
    assert not healthy.dataset_drift and healthy.drifted_features == []
    assert healthy.n_tested == len(FEATURES)
    shifted = detect_drift(profile, generate_fraud_data(5000, seed=2, shift=0.5), CONFIG)
    assert shifted.dataset_drift and set(shifted.drifted_features) == set(FEATURES)
    assert shifted.drift_share == 1.0


def test_profile_round_trips_through_npz_and_pickle(tmp_path, fraud_profile: ReferenceProfile) -> None:
    current = generate_fraud_data(800, seed=4, shift=0.2)
    expected = detect_drift(fraud_profile, current, CONFIG).to_records()
    from_npz = ReferenceProfile.from_npz(fraud_profile.to_npz(tmp_path / "profile.npz"))
    from_pickle = ReferenceProfile.from_bytes(fraud_profile.to_bytes())
    assert detect_drift(from_npz, current, CONFIG).to_records() == expected
    assert detect_drift(pickle.loads(pickle.dumps(from_pickle)), current, CONFIG).to_records() == expected
    # The running sums are rebuilt, not stored: the pickle holds the sorted values and little else.
    assert len(fraud_profile.to_bytes()) < 1.2 * sum(p.sorted_values.nbytes for p in fraud_profile.numeric.values()) + 10_000


def test_records_and_json_are_table_ready(fraud_profile: ReferenceProfile) -> None:
    current = generate_fraud_data(400, seed=2).drop(columns=["hour"])
    report = detect_drift(fraud_profile, current, CONFIG)
    records = report.to_records()
    assert [r["feature"] for r in records] == FEATURES
    assert {"feature", "verdict", "test", "p_value", "p_value_adjusted", "effect_size", "null_share"} <= set(records[0])
    parsed = json.loads(report.to_json())  # strict JSON: NaN would have raised
    assert parsed["features"][1]["verdict"] == MISSING and parsed["features"][1]["p_value"] is None
    assert parsed["n_tested"] == len(FEATURES) - 1
    assert "| hour | missing |" in report.to_markdown()


def test_html_report_is_self_contained_with_one_histogram_per_feature(tmp_path, fraud_profile: ReferenceProfile) -> None:
    current = generate_fraud_data(1000, seed=2, shift=0.4).drop(columns=["tx_count_24h"])
    current.loc[:, "channel"] = None
    current.loc[:49, "country"] = "XX"
    report = detect_drift(fraud_profile, current, CONFIG)
    path = render_html(report, fraud_profile, current, tmp_path / "drift.html")
    text = path.read_text()
    assert text.count('<img class="hist"') == len(FEATURES)
    for feature in FEATURES:
        assert f"<h3>{feature} " in text
    # No URL of any kind ("://" cannot occur inside base64), no script, no external stylesheet.
    assert "://" not in text and "<script" not in text.lower() and "<link" not in text.lower()
    png = drift_plot_png(report, tmp_path / "drift.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reuse_freed_arrays_applies_once_on_glibc():
    """The allocator tuning is on for the process (glibc here) and idempotent."""
    from mlops_assets.core.monitoring.drift import reuse_freed_arrays

    assert reuse_freed_arrays() is True
    assert reuse_freed_arrays() is True
