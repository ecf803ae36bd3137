"""Specifications of examples/extrapolation.py, the tabular lesson on extrapolation error: naive fitted Q iteration
keeps the initial value on the pairs the data never shows and acts on it; CQL's conservative term (and only it)
pushes those pairs below every logged one; BCQ and IQL never read them and recover Q* on the logged pairs, values
computed by hand below (gamma = 0.9: Q(s1, left) = 1, Q(s2, wait) = 2, Q(s1, right) = 0 + 0.9 * 2 = 1.8)."""

import importlib.util
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("extrapolation", ROOT / "examples" / "extrapolation.py")
ex = importlib.util.module_from_spec(spec)
sys.modules["extrapolation"] = ex
spec.loader.exec_module(ex)

S1, S2, LEFT, RIGHT, WAIT = ex.S1, ex.S2, ex.LEFT, ex.RIGHT, ex.WAIT


@pytest.fixture
def data():
    return ex.make_dataset()


def test_dataset_logs_left_and_right_at_s1_and_only_wait_at_s2(data):
    assert ex.seen_pairs(data).tolist() == [[True, True, False], [False, False, True]]
    # pi_b(left|s1) = 2/3, pi_b(right|s1) = 1/3, pi_b(wait|s2) = 1; zero on the unseen pairs
    np.testing.assert_allclose(ex.behaviour_policy(data), [[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 1.0]])


def test_true_q_of_the_full_mdp_is_the_hand_computed_one():
    # Q*(s1, wait) = 0 + 0.9 * V*(s1) = 0.9 * 1.8; at s2, left and right end the episode with nothing
    np.testing.assert_allclose(ex.true_q(), [[1.0, 1.8, 1.62], [0.0, 0.0, 2.0]], atol=1e-9)


# (1) Naive FQI: the unseen value is the initial one, leaks through the max, and wins the greedy choice
def test_naive_fqi_keeps_the_initial_value_on_unseen_pairs_and_acts_on_it(data):
    q, action = ex.naive_fqi(data)
    assert q[S1, WAIT] == ex.Q0 and q[S2, LEFT] == ex.Q0 and q[S2, RIGHT] == ex.Q0  # untouched by the data, exactly
    assert action == WAIT
    # the leak: y(s1, right) = 0 + 0.9 * max_a' Q(s2, a') = 0.9 * Q0, not 0.9 * 2
    assert q[S1, RIGHT] == pytest.approx(0.9 * ex.Q0)
    assert q[S1, LEFT] == pytest.approx(1.0) and q[S2, WAIT] == pytest.approx(2.0)


# (2) CQL(H): the conservative term pushes every unseen pair below the logged ones at its state
def test_cql_pushes_the_unseen_action_below_every_logged_action(data):
    q, action = ex.cql(data)
    assert q[S1, WAIT] < min(q[S1, LEFT], q[S1, RIGHT])
    assert max(q[S2, LEFT], q[S2, RIGHT]) < q[S2, WAIT]
    assert action in (LEFT, RIGHT)


def test_cql_with_alpha_zero_is_naive_fqi(data):
    # no conservative term: no gradient ever reaches an unseen pair, and the logged ones reach naive FQI's fixed point
    q, action = ex.cql(data, alpha=0.0)
    assert q[S1, WAIT] == ex.Q0 and q[S2, LEFT] == ex.Q0 and q[S2, RIGHT] == ex.Q0
    np.testing.assert_allclose(q, ex.naive_fqi(data)[0], atol=1e-6)
    assert action == WAIT


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_cql_converges_to_the_stationary_point_of_its_loss_on_logged_pairs(data, alpha):
    # the mean loss is stationary at a logged pair iff n(s, a) (Q - y - alpha) + n(s) alpha softmax_a Q(s, .) = 0,
    # i.e. Q(s, a) = y + alpha * (1 - softmax_a / pi_b(a|s)), with pi_b(left|s1) = 2/3, pi_b(right|s1) = 1/3
    q, _ = ex.cql(data, alpha=alpha, n_steps=20000)
    p1, p2 = ex.softmax(q[S1]), ex.softmax(q[S2])
    y_right = 0.9 * q[S2].max()
    assert q[S1, LEFT] == pytest.approx(1.0 + alpha * (1 - p1[LEFT] / (2 / 3)), abs=1e-6)
    assert q[S1, RIGHT] == pytest.approx(y_right + alpha * (1 - p1[RIGHT] / (1 / 3)), abs=1e-6)
    assert q[S2, WAIT] == pytest.approx(2.0 + alpha * (1 - p2[WAIT]), abs=1e-6)


# (3) Discrete BCQ: the filter keeps the unseen actions out of the target and the policy
def test_bcq_recovers_q_star_on_logged_pairs_and_picks_right(data):
    q, action = ex.bcq(data)
    assert action == RIGHT
    np.testing.assert_allclose([q[S1, LEFT], q[S1, RIGHT], q[S2, WAIT]], [1.0, 1.8, 2.0], atol=1e-9)
    assert q[S1, WAIT] == ex.Q0  # still there, never read


def test_bcq_threshold_above_the_ratio_of_right_leaves_only_left(data):
    # pi_b(right|s1) / pi_b(left|s1) = 0.5: a threshold of 0.6 rules right out of the policy at s1
    q, action = ex.bcq(data, threshold=0.6)
    assert action == LEFT
    assert q[S1, RIGHT] == pytest.approx(1.8)  # its own value is unchanged: s2's only allowed action is wait


# (4) IQL: expectile V over logged actions, Q <- r + gamma V(s'), advantage-weighted policy over logged actions
def test_expectile_known_answers():
    x = np.array([1.0, 1.0, 1.8])
    assert ex.expectile(x, 0.5) == pytest.approx(x.mean())
    # tau = 0.7: v = (0.7 * 1.8 + 0.3 * 2 * 1) / (0.7 + 0.3 * 2) = 1.86 / 1.3
    assert ex.expectile(x, 0.7) == pytest.approx(1.86 / 1.3)
    assert ex.expectile(np.array([2.0]), 0.9) == pytest.approx(2.0)


def test_iql_recovers_q_star_on_logged_pairs_and_picks_right(data):
    q, action = ex.iql(data)
    assert action == RIGHT
    # V(s2) = expectile of {2} = 2, so Q(s1, right) = 0.9 * 2; Q(s1, left) = 1, Q(s2, wait) = 2 (terminal)
    np.testing.assert_allclose([q[S1, LEFT], q[S1, RIGHT], q[S2, WAIT]], [1.0, 1.8, 2.0], atol=1e-9)
    assert q[S1, WAIT] == ex.Q0  # never queried


def test_iql_with_beta_zero_is_behaviour_cloning(data):
    # exp(0 * A) = 1: pi = pi_b, whose most likely action at s1 is left (2/3)
    assert ex.iql(data, beta=0.0)[1] == LEFT


# The lesson as a whole
def test_main_prints_the_four_methods_and_their_actions(capsys):
    ex.main()
    out = capsys.readouterr().out
    for name in ["naive FQI", "CQL(H)", "BCQ", "IQL"]:
        assert name in out
    assert "naive FQI              wait  <- never logged" in out
    assert out.count("right  (logged)") == 3


@pytest.mark.slow
def test_script_runs_in_a_few_seconds(tmp_path):
    start = time.perf_counter()
    out = run_script("examples/extrapolation.py", cwd=tmp_path, timeout=60)
    assert time.perf_counter() - start < 10
    for name in ["naive FQI", "CQL(H)", "BCQ", "IQL"]:
        assert name in out
