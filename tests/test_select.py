"""Known answers for benchmark/selection.py's analysis (the UCB bandit, how an OPE prior enters it, the summary), and
an end-to-end smoke run of its train stage."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
from selection import (  # noqa: E402
    METHODS,
    draw_arms,
    episodes_within,
    priors_of,
    run_bandit,
    sample_hyperparameters,
    selection_curves,
    spearman,
)


def constant_arms(values, episodes=10):
    """Policies whose every episode scores the same: the bandit learns an arm's true score in one pull."""
    return np.repeat(np.asarray(values, dtype=float)[:, None], episodes, axis=1)


def test_the_bandit_picks_the_best_hand_made_arm_once_every_arm_is_pulled():
    scores = constant_arms([1.0, 5.0, 3.0])
    arms = np.tile(np.arange(3), (200, 1))
    picks = run_bandit(scores, arms, 6, np.random.default_rng(0))
    assert (picks[:, 3:] == 1).all()  # the first 3 pulls try each arm once (never-pulled arms come first)
    # no episode yet: a uniform pick; one episode: the one arm tried, in random order
    for n in (0, 1):
        assert set(picks[:, n]) == {0, 1, 2} and abs(scores.mean(1)[picks[:, n]].mean() - 3.0) < 0.4
    # two episodes: the better of two arms, each pair equally likely: (5 + 3 + 5) / 3
    assert abs(scores.mean(1)[picks[:, 2]].mean() - 13 / 3) < 0.4


def test_the_prior_counts_as_pseudo_episodes_of_its_value():
    # greedy (scale 0) on two arms: A pays 10, its prior says 20; B pays 14, its prior says 12. With weight w, A is
    # pulled while (20 w + 10 n) / (w + n) > 12, i.e. n < 4 w; then B (whose mean, (12 w + 14) / (w + 1), stays
    # above A's) is rated best from n = 4 w + 1 on, and at n = 4 w the two tie (a coin flip)
    scores, arms, prior = constant_arms([10.0, 14.0]), np.tile(np.arange(2), (100, 1)), np.array([20.0, 12.0])
    for w in (1, 2):
        picks = run_bandit(scores, arms, 12, np.random.default_rng(1), prior, w, scale=0.0)
        assert (picks[:, :4 * w] == 0).all() and (picks[:, 4 * w + 1:] == 1).all(), (w, picks[0])
        assert set(picks[:, 4 * w]) == {0, 1}
    # no prior weight: the plain bandit, which tries both and then keeps B
    assert (run_bandit(scores, arms, 4, np.random.default_rng(1), prior, 0.0)[:, 2:] == 1).all()


def noisy_arms():
    """8 policies 10 points apart (0 ... 70), each episode 30 points above or below: one episode does not tell them
    apart."""
    true = np.arange(8) * 10.0
    return true, true[:, None] + np.where(np.arange(100) % 2 == 0, 30.0, -30.0)[None, :]


def test_a_right_prior_saves_episodes_and_a_wrong_one_costs_them():
    true, scores = noisy_arms()
    res = selection_curves(scores, {"right": true.copy(), "wrong": true[::-1].copy()}, k=8, max_pulls=200,
                           draws=300, seed=0, prior_weights=(5.0,))
    plain, right, wrong = (res["curves"][k] for k in ("bandit", "right prior, weight 5", "wrong prior, weight 5"))
    assert right["mean"][0] == 70.0 and wrong["mean"][0] == 0.0  # n = 0: the pick of OPE alone
    assert abs(plain["mean"][0] - 35.0) < 3  # no prior, no episode: a random policy of the K
    assert right["episodes_within"] == 0 and plain["episodes_within"] is not None and plain["episodes_within"] > 8
    assert wrong["episodes_within"] is None  # it never gets within 5 points in 200 episodes ...
    assert (wrong["mean"][1:] < plain["mean"][1:]).all()  # ... and stays below the plain bandit all the way
    assert (right["mean"] >= plain["mean"]).all()
    assert res["best_of_k"] == 70.0 and res["mean_of_k"] == 35.0  # K = P: every draw holds every policy


def test_selection_is_deterministic_under_its_seed():
    true, scores = noisy_arms()
    a, b, c = (selection_curves(scores, {"fqe": true + 5}, k=4, max_pulls=30, draws=100, seed=s) for s in (3, 3, 4))
    for label in a["curves"]:
        np.testing.assert_array_equal(a["curves"][label]["mean"], b["curves"][label]["mean"])
    assert not np.array_equal(a["curves"]["bandit"]["mean"], c["curves"]["bandit"]["mean"])


def test_draws_are_subsets_of_k_distinct_policies():
    arms = draw_arms(16, 8, 500, np.random.default_rng(0))
    assert arms.shape == (500, 8) and all(len(set(row)) == 8 for row in arms) and set(arms.flat) == set(range(16))


def test_episodes_within_is_where_the_gap_stays_within_the_margin():
    assert episodes_within(np.array([10.0, 6, 4, 6, 4, 3]), 5) == 4  # not 2: the gap is back above 5 at 3
    assert episodes_within(np.array([4.0, 3]), 5) == 0
    assert episodes_within(np.array([4.0, 6]), 5) is None  # above at the end of the budget


def test_priors_are_mb_normalized_and_fqe_through_the_calibration_line():
    records = [dict(ope=dict(MB=dict(normalized=50.0), FQE=dict(discounted=-100.0))),
               dict(ope=dict(MB=dict(normalized=70.0), FQE=dict(discounted=-50.0)))]
    priors = priors_of(records, dict(slope=0.5, intercept=100.0))
    np.testing.assert_array_equal(priors["MB"], [50, 70])
    np.testing.assert_array_equal(priors["FQE"], [50, 75])
    assert set(priors_of(records, None)) == {"MB"}  # no calibration: no FQE prior
    assert priors_of([dict(), records[0]], None) == {}  # a policy without estimates: no prior at all
    assert spearman(np.array([1.0, 3, 2]), np.array([10.0, 30, 20])) == pytest.approx(1.0)


def test_hyperparameters_are_drawn_from_the_method_ranges_the_same_for_every_dataset():
    draws = [sample_hyperparameters("iql", i, seed=0) for i in range(64)]
    for name, r in METHODS["iql"][1].items():
        values = np.array([d[name] for d in draws])
        assert (values >= r.low).all() and (values <= r.high).all() and len(set(values)) == 64
    beta = np.log([d["beta"] for d in draws])  # log-uniform: about half below the geometric midpoint
    assert 16 < (beta < np.log(np.sqrt(0.3 * 10))).sum() < 48
    assert sample_hyperparameters("cql", 3, seed=0) == sample_hyperparameters("cql", 3, seed=0)
    assert sample_hyperparameters("cql", 3, seed=0) != sample_hyperparameters("cql", 3, seed=1)


@pytest.mark.slow
def test_train_then_analyse_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(ROOT / "benchmark" / "selection.py")
    train = [sys.executable, script, "train", "--methods", "iql", "--datasets", "pendulum-medium", "--policies", "2",
             "--total-steps", "100", "--episodes", "2", "--out", str(tmp_path), "--ope-flags",
             "--fqe-steps 20 --mb-steps 20 --mb-ensemble 2 --bc-steps 20 --bootstrap 10"]
    proc = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads((tmp_path / "policies" / f"iql__pendulum-medium__{i:02d}.json").read_text()) for i in (0, 1)]
    for i, r in enumerate(records):
        assert r["seed"] == i + 1 and r["eval_seed"] == i + 101 and len(r["normalized"]) == 2
        assert r["hyperparameters"] == sample_hyperparameters("iql", i, 0)
        assert r["ope"]["MB"]["normalized"] is not None and r["ope"]["FQE"]["discounted"] is not None
    cal = json.loads((tmp_path / "calibration" / "pendulum-medium.json").read_text())
    assert cal["discount"] == 0.99 and cal["episodes"] > 0 and 0 < cal["r2"] <= 1
    again = subprocess.run(train, env=env, capture_output=True, text=True, timeout=120)  # resumable: nothing redone
    assert again.returncode == 0 and "policies" not in again.stdout and "ope.py" not in again.stdout, again.stdout
    analyse = [sys.executable, script, "analyse", str(tmp_path), "--k", "2", "--draws", "20", "--max-pulls", "5"]
    proc = subprocess.run(analyse, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "selection.json").read_text())["results"]["iql__pendulum-medium"]
    assert set(out["curves"]) == {"bandit", "MB prior, weight 1", "MB prior, weight 5", "FQE prior, weight 1",
                                  "FQE prior, weight 5"}
    assert (tmp_path / "selection.png").exists() and "### iql on pendulum-medium" in proc.stdout
