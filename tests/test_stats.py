"""Known answers for benchmark/stats.py (IQM, stratified bootstrap, performance profiles, probability of
improvement) and the across-datasets section aggregate.py writes with them."""

import json
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
from stats import (  # noqa: E402
    bootstrap_ci,
    iqm,
    mean,
    performance_profile,
    performance_profile_ci,
    prob_greater,
    probability_of_improvement,
    probability_of_improvement_ci,
    stratified_resample,
)


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.arange(1, 9)) == 4.5  # mean of 3..6
    assert iqm(np.arange(8, 0, -1)) == 4.5  # order does not matter
    assert iqm(np.arange(1, 11)) == 5.5  # n = 10: floor(2.5) = 2 cut off each end, mean of 3..8 (scipy's trim_mean)
    assert iqm([1.0, 2.0, 3.0]) == 2.0  # n < 4: nothing is cut
    assert iqm([0, 0, 0, 1000]) == 0.0  # one outlier out of four is cut
    np.testing.assert_array_equal(iqm(np.array([np.arange(1, 9), np.arange(11, 19)]), axis=1), [4.5, 14.5])


def test_stratified_resampling_never_mixes_tasks():
    tasks = [np.array([1.0, 2.0, 3.0]), np.array([10.0]), np.array([100.0, 200.0])]
    rows = stratified_resample(tasks, 500, np.random.default_rng(0))
    assert rows.shape == (500, 6)
    assert np.isin(rows[:, :3], tasks[0]).all() and (rows[:, 3] == 10).all() and np.isin(rows[:, 4:], tasks[2]).all()
    assert set(np.unique(rows[:, :3])) == {1.0, 2.0, 3.0}  # with replacement: every run of the task turns up


def test_bootstrap_of_tasks_with_identical_seeds_has_zero_width():
    tasks = [np.full(3, 5.0), np.full(4, -2.0), np.full(1, 7.0)]
    for stat in (iqm, mean):
        point, lo, hi = bootstrap_ci(tasks, stat, reps=1000, seed=3)
        assert lo == point == hi
    assert bootstrap_ci(tasks, mean, reps=10)[0] == pytest.approx((15 - 8 + 7) / 8)


def test_bootstrap_interval_contains_the_point_and_is_deterministic_under_its_seed():
    rng = np.random.default_rng(1)
    tasks = [rng.normal(m, 10, size=5) for m in (0, 50, 100)]
    a, b, c = bootstrap_ci(tasks, iqm, 2000, seed=7), bootstrap_ci(tasks, iqm, 2000, seed=7), \
        bootstrap_ci(tasks, iqm, 2000, seed=8)
    assert a == b and a != c
    assert a[1] < a[0] < a[2] and a[0] == iqm(np.concatenate(tasks))


def test_performance_profile_counts_runs_strictly_above_tau():
    tasks = [np.array([0.0, 10.0]), np.array([20.0, 30.0])]
    np.testing.assert_array_equal(performance_profile(tasks, np.array([-1, 0, 5, 25, 30])), [1, 0.75, 0.75, 0.25, 0])
    profile, lo, hi = performance_profile_ci([np.full(2, 3.0)], np.array([2.0, 4.0]), reps=100)
    np.testing.assert_array_equal(profile, [1, 0])
    np.testing.assert_array_equal(lo, profile)  # one value, always drawn: a band of zero width
    np.testing.assert_array_equal(hi, profile)


def test_probability_of_improvement_known_cases():
    x = [np.array([1.0, 2.0, 3.0])]
    assert probability_of_improvement(x, x) == 0.5  # identical: every win has a matching loss, ties count half
    assert probability_of_improvement([x[0] + 10], x) == 1.0  # dominated
    assert probability_of_improvement(x, [x[0] + 10]) == 0.0
    assert prob_greater([1.0, 2.0], [2.0, 2.0]) == 0.25  # (1,2) 0, (1,2) 0, (2,2) 0.5, (2,2) 0.5
    # averaged over tasks, each task once whatever its runs: 1 on the first, 0 on the second
    assert probability_of_improvement([np.array([5.0]), np.zeros(4)], [np.array([1.0]), np.ones(2)]) == 0.5
    point, lo, hi = probability_of_improvement_ci([x[0] + 10], x, reps=200)
    assert point == lo == hi == 1.0
    assert probability_of_improvement_ci(x, x, 500, seed=2) == probability_of_improvement_ci(x, x, 500, seed=2)


def write_scores(folder, runs):
    folder.mkdir()
    (folder / "scores.json").write_text(json.dumps(
        [dict(algo=a, dataset=d, seed=s, steps=[10, 20], score=[0.0, v]) for a, d, s, v in runs]))


def test_aggregate_writes_iqm_and_pairs_over_the_datasets_every_algorithm_ran(tmp_path):
    from aggregate import main, stats_only

    runs = [("iql", "a", s, v) for s, v in ((1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0))]
    runs += [("iql", "b", s, v) for s, v in ((1, 5.0), (2, 6.0), (3, 7.0), (4, 8.0))]
    runs += [("d3rlpy_iql", "a", s, 0.0) for s in (1, 2)] + [("d3rlpy_iql", "b", 1, 0.0)]
    runs += [("bcq", "a", 1, 9.0)]  # bcq did not run "b": the IQM is over "a" alone
    write_scores(tmp_path / "f", runs)
    main(tmp_path / "f")
    text = (tmp_path / "f" / "results.md").read_text()
    assert "over the 1 dataset(s) that every algorithm ran (a)" in text and "Left out here" in text, text
    assert "| iql | 4 | 2.5 [" in text, text
    assert "| bcq | 1 | 9.0 (one seed per dataset: no interval) | 9.0 (one seed" in text, text
    assert "| iql | d3rlpy_iql | 2 | 1.00 [1.00, 1.00] |" in text, text  # ours first, over both datasets
    # the left-out "b", for the algorithms that ran it (not bcq): iql's 5..8 have IQM 6.5
    rest = text[text.index("Over those 1 dataset(s)"):text.index("Probability of improvement")]
    assert "| iql | 4 | 6.5 [" in rest and "| d3rlpy_iql | 1 | 0.0 (one seed" in rest and "bcq" not in rest, rest
    assert "| bcq | iql | 1 | 1.00 [1.00, 1.00] |" in text, text
    assert (tmp_path / "f" / "profiles.png").stat().st_size > 0
    assert text.index("## Across datasets") < text.index("## Speed") < text.index("## Side by side")
    # --stats-only on a results.md main() wrote leaves it as it is, and adds the section to one without it
    stats_only(tmp_path / "f")
    assert (tmp_path / "f" / "results.md").read_text() == text
    start, end = text.index("\n\n## Across datasets"), text.index("\n\n## Speed")
    (tmp_path / "f" / "results.md").write_text(text[:start] + text[end:])
    stats_only(tmp_path / "f")
    assert (tmp_path / "f" / "results.md").read_text() == text
