"""ope.py: the estimators on a small chain MDP whose value is known exactly (unbiasedness, consistency, DR with a
perfect Q), FQE against linear algebra on a tabular MDP, the padding/bootstrap conventions against loop references,
hand-computed answers through the pipeline (the model-based estimator on a linear MDP, FQE at time limits, clipped
log-ratios, on-policy Box data), the edge cases (zero-probability actions, one episode, policies without a density),
and a smoke run on a trained IQL checkpoint."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ope
from benchmark import ope_report
from common import Policy
from datasets import Dataset, UserError, save_npz
from tests.conftest import ROOT, run_script

# ---------------------------------------------------------------------------------------------------------
# A 4-state chain: start in 0; action 1 moves right (with prob p), action 0 moves left (stays in 0). Entering
# state 3 is terminal; a time limit of H steps cuts the rest. Rewards R[s, a] (+ optional Gaussian noise).
# ---------------------------------------------------------------------------------------------------------
H = 6
R = np.array([[0.0, -0.2], [0.5, -0.2], [1.0, 2.0]])
PI_B = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])  # row 3 (terminal state) is never used
PI_E = np.array([[0.2, 0.8], [0.7, 0.3], [0.3, 0.7], [0.5, 0.5]])


def transitions(p_right: float) -> np.ndarray:
    P = np.zeros((4, 2, 4))
    for s in range(3):
        P[s, 1, s + 1] += p_right
        P[s, 1, s] += 1 - p_right
        P[s, 0, max(s - 1, 0)] = 1.0
    return P


def exact_values(P: np.ndarray, pi: np.ndarray, gamma: float):
    """Finite-horizon dynamic programming: V[t, s] and Q[t, s, a] of pi with H - t steps to go (terminal state 0)."""
    V, Q = np.zeros((H + 1, 4)), np.zeros((H, 4, 2))
    for t in reversed(range(H)):
        Q[t, :3] = R + gamma * P[:3] @ V[t + 1]
        V[t] = (pi * Q[t]).sum(1)
        V[t, 3] = 0.0
    return V, Q


def simulate(P: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.0) -> dict:
    """n episodes of PI_B, as the (n, H) arrays the estimators take, plus states/actions to build a Dataset."""
    state = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    out = {k: np.zeros((n, H)) for k in ("rewards", "log_ratios")}
    out.update(mask=np.zeros((n, H), dtype=bool), s=np.zeros((n, H), dtype=np.int64),
               a=np.zeros((n, H), dtype=np.int64), s2=np.zeros((n, H), dtype=np.int64),
               term=np.zeros((n, H), dtype=bool))
    for t in range(H):
        s = np.minimum(state, 2)
        a = (rng.random(n) < PI_B[s, 1]).astype(np.int64)
        s2 = (rng.random(n)[:, None] > np.cumsum(P[s, a], 1)).sum(1)
        out["mask"][:, t] = alive
        out["rewards"][:, t] = np.where(alive, R[s, a] + noise * rng.standard_normal(n), 0.0)
        out["log_ratios"][:, t] = np.where(alive, np.log(PI_E[s, a]) - np.log(PI_B[s, a]), 0.0)
        out["s"][:, t], out["a"][:, t], out["s2"][:, t], out["term"][:, t] = s, a, s2, alive & (s2 == 3)
        alive = alive & (s2 != 3)
        state = s2
    return out


def q_arrays(sim: dict, Q: np.ndarray, V: np.ndarray):
    """q_sa[i, t] = Q_t(s_t, a_t), v_s[i, t] = V_t(s_t) (time-indexed: the horizon is finite)."""
    t = np.arange(H)[None, :]
    return Q[t, sim["s"], sim["a"]], V[t, sim["s"]]


def chain_dataset(sim: dict) -> Dataset:
    """The simulated episodes as a row-aligned Dataset (one-hot observations, exact behaviour log-probs)."""
    m = sim["mask"]
    eye = np.eye(4, dtype=np.float32)
    last = np.zeros_like(m)
    last[np.arange(len(m)), m.sum(1) - 1] = True
    return Dataset(observations=eye[sim["s"][m]], actions=sim["a"][m], rewards=sim["rewards"][m].astype(np.float32),
                   next_observations=eye[sim["s2"][m]], terminals=sim["term"][m], timeouts=(last & ~sim["term"])[m],
                   behavior_log_probs=np.log(PI_B[sim["s"][m], sim["a"][m]]).astype(np.float32), name="chain")


def table_policy(pi: np.ndarray, with_density: bool = True) -> Policy:
    table = torch.tensor(pi, dtype=torch.float32)
    return Policy(act=lambda o: table[o.argmax(-1)].argmax(-1),
                  dist=(lambda o: torch.distributions.Categorical(probs=table[o.argmax(-1)])) if with_density else None,
                  discrete=True, checkpoint={})


def run_pipeline(ds: Dataset, policy: Policy, smoothing=None, **kw) -> dict:
    coverage_model = kw.pop("coverage_model", None)
    args = ope.Args(policy=["unused"], bootstrap=kw.pop("bootstrap", 50), smoothing_width=smoothing,
                    **{"discount": 0.9, "fqe_steps": 0, "mb_steps": 0, "hidden_dim": 32, **kw})
    torch.manual_seed(0)
    data, stats = ope.device_data(ds, torch.device("cpu"))
    ep = ope.split_episodes(ds)
    target = ope.Target(policy, 2, None, None, smoothing)
    model = None
    if args.mb_steps:
        model = ope.DynamicsEnsemble(args.mb_ensemble, ds.observations.shape[1], 1, 2, stats, args)
        ope.fit_model(model, data, args.mb_ensemble, args.mb_steps, args.learning_rate, args.batch_size)
    return ope.evaluate_policy(ds, ep, target, data, stats, ds.behavior_log_probs.astype(np.float64), args, model,
                               np.random.default_rng(0), coverage_model=coverage_model)


# ---------------------------------------------------------------------------------------------------------
# (1) Unbiasedness and consistency against the exact value
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_is_pdis_and_dr_are_unbiased_over_200_datasets(gamma):
    P = transitions(0.8)
    V, Q = exact_values(P, PI_E, gamma)
    truth = V[0, 0]
    n_sets, n_ep = 200, 50
    sim = simulate(P, n_sets * n_ep, np.random.default_rng(1), noise=0.3)
    q_hat = 0.5 * Q + 0.2  # a deliberately wrong Q̂: DR stays unbiased for any Q̂ with V̂ = E_{pi_e} Q̂
    v_hat = (PI_E[None] * q_hat).sum(-1)
    q_sa, v_s = q_arrays(sim, q_hat, v_hat)
    split = {k: v.reshape(n_sets, n_ep, H) for k, v in dict(**sim, q_sa=q_sa, v_s=v_s).items()}
    estimates = {name: [] for name in ("IS", "PDIS", "DR")}
    for i in range(n_sets):
        r, lr, m = split["rewards"][i], split["log_ratios"][i], split["mask"][i]
        estimates["IS"].append(ope.estimate("IS", r, lr, m, gamma))
        estimates["PDIS"].append(ope.estimate("PDIS", r, lr, m, gamma))
        estimates["DR"].append(ope.estimate("DR", r, lr, m, gamma, split["q_sa"][i], split["v_s"][i]))
    for name, values in estimates.items():
        values = np.array(values)
        se = values.std() / math.sqrt(n_sets)
        assert abs(values.mean() - truth) < 4 * se, (name, values.mean(), truth, se)
        assert se < 0.1 * abs(truth), (name, se)  # the test has power: its tolerance is tight
    assert np.std(estimates["DR"]) < np.std(estimates["IS"])  # the control variate helps even when Q̂ is wrong


def test_weighted_estimators_are_consistent_their_error_shrinks_with_data():
    gamma = 0.9
    P = transitions(0.8)
    V, Q = exact_values(P, PI_E, gamma)
    rng = np.random.default_rng(2)
    errors = {}
    for n_ep in (10, 2000):
        sim = simulate(P, 100 * n_ep, rng, noise=0.3)
        q_sa, v_s = q_arrays(sim, 0.5 * Q, (PI_E[None] * 0.5 * Q).sum(-1))
        errs = {"WIS": [], "WPDIS": [], "WDR": []}
        for i in range(100):
            sl = slice(i * n_ep, (i + 1) * n_ep)
            args = (sim["rewards"][sl], sim["log_ratios"][sl], sim["mask"][sl], gamma, q_sa[sl], v_s[sl])
            for name in errs:
                errs[name].append(ope.estimate(name, *args) - V[0, 0])
        errors[n_ep] = {k: np.abs(v).mean() for k, v in errs.items()}
    for name in ("WIS", "WPDIS", "WDR"):
        assert errors[2000][name] < errors[10][name] / 5, (name, errors)
        assert errors[2000][name] < 0.1 * abs(V[0, 0]), (name, errors)


@pytest.mark.estimators
def test_on_policy_weights_reduce_every_estimator_to_the_average_return():
    # equal weights, unequal lengths: with the carried-weight padding, every IS-type estimate is the mean return
    rng = np.random.default_rng(3)
    lengths = np.array([1, 3, 6, 2, 6])
    mask = np.arange(6)[None] < lengths[:, None]
    rewards = np.where(mask, rng.normal(size=mask.shape), 0.0)
    log_ratios = np.zeros(mask.shape)
    mean_return = (rewards @ 0.9 ** np.arange(6)).mean()
    for name in ("IS", "WIS", "PDIS", "WPDIS"):
        assert ope.estimate(name, rewards, log_ratios, mask, 0.9) == pytest.approx(mean_return)
    assert ope.effective_sample_size(np.zeros(5)) == pytest.approx(5.0)
    assert ope.per_decision_ess(log_ratios, mask, 0.9) == pytest.approx(5.0)


def _random_arrays(seed: int, n: int = 7, horizon: int = 5):
    rng = np.random.default_rng(seed)
    mask = np.arange(horizon)[None] < rng.integers(1, horizon + 1, n)[:, None]
    r, lr, q, v = (np.where(mask, rng.normal(size=mask.shape), 0.0) for _ in range(4))
    return r, lr, q, v, mask


@pytest.mark.estimators
def test_dr_recursive_form_equals_the_unrolled_form():
    r, lr, q, v, mask = _random_arrays(4)
    gamma = 0.8
    total = 0.0
    for i in range(len(r)):  # (1/n) sum_i sum_t gamma^t [w_{0:t} (r_t - Q_t) + w_{0:t-1} V_t], w_{0:-1} = 1
        w_prev = 1.0
        for t in range(int(mask[i].sum())):
            w = w_prev * math.exp(lr[i, t])
            total += gamma**t * (w * (r[i, t] - q[i, t]) + w_prev * v[i, t])
            w_prev = w
    assert ope.estimate("DR", r, lr, mask, gamma, q, v) == pytest.approx(total / len(r))


@pytest.mark.estimators
def test_wpdis_and_wdr_match_loop_references_with_carried_weights():
    r, lr, q, v, mask = _random_arrays(5)
    gamma, n, horizon = 0.8, len(r), r.shape[1]
    log_w = np.cumsum(np.where(mask, lr, 0.0), 1)  # after the end: rho = 1, the weight is carried
    w = np.exp(log_w)
    wpdis = sum(gamma**t * (w[:, t] * r[:, t]).sum() / w[:, t].sum() for t in range(horizon))
    assert ope.estimate("WPDIS", r, lr, mask, gamma) == pytest.approx(wpdis)
    wdr = 0.0
    for t in range(horizon):
        w_hat = w[:, t] / w[:, t].sum()
        w_hat_prev = np.full(n, 1 / n) if t == 0 else w[:, t - 1] / w[:, t - 1].sum()
        wdr += gamma**t * (w_hat * (r[:, t] - q[:, t]) + w_hat_prev * v[:, t]).sum()
    assert ope.estimate("WDR", r, lr, mask, gamma, q, v) == pytest.approx(wdr)


@pytest.mark.estimators
def test_bootstrap_counts_equal_resampling_whole_episodes():
    r, lr, q, v, mask = _random_arrays(6, n=9)
    idx = np.random.default_rng(0).integers(0, 9, 9)
    counts = np.bincount(idx, minlength=9).astype(float)
    for name in ope.WEIGHTED:
        resampled = ope.estimate(name, r[idx], lr[idx], mask[idx], 0.9, q[idx], v[idx])
        assert ope.estimate(name, r, lr, mask, 0.9, q, v, counts=counts) == pytest.approx(resampled), name
        batch = ope.estimate(name, r, lr, mask, 0.9, q, v, counts=np.stack([counts, np.ones(9)]))  # (B, n): B values
        assert batch == pytest.approx([resampled, ope.estimate(name, r, lr, mask, 0.9, q, v)]), name
    assert ope.bootstrap_counts(1, 200, np.random.default_rng(0)) is None  # one episode: no bootstrap
    assert ope.bootstrap_counts(5, 10, np.random.default_rng(0)).sum(1).tolist() == [5] * 10


@pytest.mark.estimators
def test_weights_stay_finite_in_log_space_over_long_horizons():
    # 2000 steps of log-ratio +-0.5: raw products reach e^1000; the self-normalised estimators must not overflow
    rng = np.random.default_rng(7)
    lr = rng.choice([-0.5, 0.5], size=(20, 2000))
    mask = np.ones_like(lr, dtype=bool)
    r = rng.normal(size=lr.shape)
    for name in ("WIS", "WPDIS"):
        assert np.isfinite(ope.estimate(name, r, lr, mask, 0.99))
    assert np.isfinite(ope.estimate("WDR", r, lr, mask, 0.99, r * 0, r * 0))
    assert 1.0 <= ope.effective_sample_size(lr.sum(1)) <= 20.0


# ---------------------------------------------------------------------------------------------------------
# (3) DR with a perfect Q on a deterministic problem: exact, zero variance
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.estimators
def test_dr_and_wdr_with_a_perfect_q_are_exact_with_zero_variance():
    gamma = 0.9
    P = transitions(1.0)  # deterministic transitions and rewards, a fixed start state
    V, Q = exact_values(P, PI_E, gamma)
    sim = simulate(P, 300, np.random.default_rng(8))
    q_sa, v_s = q_arrays(sim, Q, V[:H])
    per_episode = ope.dr_per_episode(sim["rewards"], sim["log_ratios"], q_sa, v_s, sim["mask"], gamma)
    np.testing.assert_allclose(per_episode, V[0, 0], atol=1e-9)  # every single episode gives the exact value
    wdr = ope.estimate("WDR", sim["rewards"], sim["log_ratios"], sim["mask"], gamma, q_sa, v_s)
    assert wdr == pytest.approx(V[0, 0])
    # IS on the same data is not exact: the weights vary from episode to episode
    assert abs(ope.estimate("IS", sim["rewards"], sim["log_ratios"], sim["mask"], gamma) - V[0, 0]) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# (2) FQE on a tabular problem against the exact solution of the empirical MDP
# ---------------------------------------------------------------------------------------------------------
def test_fqe_matches_the_linear_algebra_solution_on_a_tabular_mdp():
    torch.manual_seed(0)
    rng = np.random.default_rng(9)
    n_s, n_a, gamma, n = 5, 2, 0.9, 4000
    P = rng.dirichlet(np.ones(n_s), size=(n_s, n_a))
    Rt = rng.uniform(0, 1, (n_s, n_a))
    pi = rng.dirichlet(np.ones(n_a), size=n_s)
    s, a = rng.integers(0, n_s, n), rng.integers(0, n_a, n)
    s2 = (rng.random(n)[:, None] > np.cumsum(P[s, a], 1)).sum(1)
    # exact Q of the empirical MDP (FQE's fixed point on this data): (I - gamma P̂ Pi) Q = R
    counts = np.zeros((n_s, n_a, n_s))
    np.add.at(counts, (s, a, s2), 1)
    P_hat = counts / counts.sum(2, keepdims=True)
    P_pi = np.einsum("sat,tb->satb", P_hat, pi).reshape(n_s * n_a, n_s * n_a)
    q_exact = np.linalg.solve(np.eye(n_s * n_a) - gamma * P_pi, Rt.reshape(-1)).reshape(n_s, n_a)

    eye = torch.eye(n_s)
    data = dict(obs=eye[s], actions=torch.as_tensor(a), rewards=torch.as_tensor(Rt[s, a], dtype=torch.float32),
                next_obs=eye[s2], terminals=torch.zeros(n))
    stats = dict(obs_mean=torch.zeros(n_s), obs_std=torch.ones(n_s))
    q = ope.QModel(n_s, 1, n_a, stats, scale=1 / (1 - gamma), hidden=64, layers=2)
    pi_t = torch.as_tensor(pi, dtype=torch.float32)
    q, trace = ope.fit_fqe(q, data, pi_t[s2], gamma, steps=3000, tau=0.05, lr=1e-3, batch_size=256,
                           probe=(eye, pi_t))
    with torch.no_grad():
        q_fqe = q.all_actions(eye).numpy()
        v_fqe = q.expected(eye, pi_t).numpy()
    np.testing.assert_allclose(q_fqe, q_exact, atol=0.08)  # values are 4-6
    np.testing.assert_allclose(v_fqe, (pi * q_exact).sum(1), atol=0.08)
    assert len(trace) == 5


# ---------------------------------------------------------------------------------------------------------
# The whole per-policy pipeline on the chain's data, and the edge cases
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain():
    sim = simulate(transitions(0.8), 1500, np.random.default_rng(10), noise=0.3)
    return sim, chain_dataset(sim)


def test_pipeline_reproduces_the_pure_estimators_and_covers_the_truth(chain):
    sim, ds = chain
    res = run_pipeline(ds, table_policy(PI_E), fqe_steps=300, mb_steps=100, bootstrap=100)
    est = res["estimates"]
    args = (sim["rewards"], sim["log_ratios"], sim["mask"], 0.9)
    for name in ("IS", "WIS", "PDIS", "WPDIS"):
        assert est[name]["discounted"] == pytest.approx(ope.estimate(name, *args), rel=1e-4), name
        assert est[name]["values"] == "dist"
    truth = exact_values(transitions(0.8), PI_E, 0.9)[0][0, 0]
    for name in ("IS", "WIS", "PDIS", "WPDIS", "DR", "WDR"):  # DR is unbiased even with a barely trained Q̂
        lo, hi = est[name]["ci_discounted"]
        width = hi - lo
        assert lo - 0.5 * width < truth < hi + 0.5 * width, (name, lo, hi, truth)
    assert est["FQE"]["values"] == "act" and est["FQE"]["undiscounted"] != est["FQE"]["undiscounted"]  # nan
    assert est["MB"]["ci_discounted"] is not None and len(res["diagnostics"]["mb_member_estimates"]) == 5
    d = res["diagnostics"]
    assert 0 < d["ess"] <= ds.episode_ends().size and d["zero_prob_share"] == 0
    # KL(pi_b || pi_e) on the data is -mean log-ratio and must be >= 0 in expectation
    assert d["kl_behavior_target"] == pytest.approx(-d["mean_log_ratio"]) and d["kl_behavior_target"] > 0


def test_the_behaviour_policy_as_target_gives_weight_one_everywhere(chain):
    _, ds = chain
    res = run_pipeline(ds, table_policy(PI_B))
    mean_return = np.mean([(ds.rewards[s: e + 1] * 0.9 ** np.arange(e + 1 - s)).sum()
                           for s, e in zip(np.r_[0, ds.episode_ends()[:-1] + 1], ds.episode_ends())])
    for name in ("IS", "WIS", "PDIS", "WPDIS"):
        assert res["estimates"][name]["discounted"] == pytest.approx(mean_return, rel=1e-5)
    assert res["diagnostics"]["ess_share"] == pytest.approx(1.0)
    assert not res["warnings"]


def test_policy_without_density_skips_importance_sampling_with_a_message(chain):
    _, ds = chain
    res = run_pipeline(ds, table_policy(PI_E, with_density=False), fqe_steps=50)
    for name in ope.WEIGHTED:
        assert res["estimates"][name]["skipped"], name
    assert res["estimates"]["FQE"]["skipped"] is None
    assert any("no density" in n and "--smoothing-width" in n for n in res["notes"])
    # with --smoothing-width: epsilon-greedy, so the weighted estimators run
    res = run_pipeline(ds, table_policy(PI_E, with_density=False), smoothing=0.2, fqe_steps=50)
    assert all(res["estimates"][name]["skipped"] is None for name in ope.WEIGHTED)


def test_zero_probability_dataset_actions_under_the_target_warn(chain):
    _, ds = chain
    res = run_pipeline(ds, table_policy(PI_E, with_density=False), smoothing=0.0)  # purely greedy "smoothing"
    assert res["diagnostics"]["zero_prob_share"] > 0
    assert any("probability 0 under pi_e" in w for w in res["warnings"])
    assert math.isinf(res["diagnostics"]["kl_behavior_target"])


def test_single_episode_gives_estimates_but_no_confidence_interval(chain):
    sim, _ = chain
    one = {k: v[:1] for k, v in sim.items()}
    res = run_pipeline(chain_dataset(one), table_policy(PI_E), fqe_steps=20)
    assert res["estimates"]["WIS"]["discounted"] == pytest.approx((one["rewards"][0] * 0.9 ** np.arange(H)).sum())
    assert all(e["ci_discounted"] is None for e in res["estimates"].values())
    assert any("only 1 episode" in n and "no confidence intervals" in n for n in res["notes"])


def test_zero_probability_logged_action_is_a_clear_error():
    with pytest.raises(ope.OPEError, match="behaviour probability 0"):
        ope.check_behavior_log_probs(np.array([-0.5, -np.inf, -1.0]), "bad")
    ope.check_behavior_log_probs(np.array([-0.5, 1.2]), "ok")  # densities above 1 are fine


def test_rows_out_of_episode_order_are_a_clear_error(chain):
    _, ds = chain
    perm = np.random.default_rng(0).permutation(len(ds))
    shuffled = Dataset(**{k: getattr(ds, k)[perm] for k in ("observations", "actions", "rewards", "next_observations",
                                                            "terminals", "timeouts", "behavior_log_probs")}, name="s")
    with pytest.raises(ope.OPEError, match="not whole episodes in time order"):
        ope.split_episodes(shuffled)


@pytest.mark.estimators
def test_truncated_normal_is_a_density_on_the_box_and_sampling_matches_it():
    loc, scale = torch.tensor([[1.5]]), torch.tensor([[1.0]])
    low, high = torch.tensor([-2.0]), torch.tensor([2.0])
    grid = torch.linspace(-2, 2, 4001)[:, None]
    dens = ope.truncated_normal_log_prob(grid, loc.expand(len(grid), 1), scale.expand(len(grid), 1), low, high).exp()
    assert torch.trapezoid(dens, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-4)
    torch.manual_seed(0)
    x = ope.truncated_normal_sample(loc.expand(20000, 1), scale.expand(20000, 1), low, high)
    assert ((x >= -2) & (x <= 2)).all()
    assert x.mean().item() == pytest.approx(torch.trapezoid(dens * grid[:, 0], grid[:, 0]).item(), abs=0.02)


@pytest.mark.estimators
def test_dope_metrics_helpers():
    assert ope_report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ope_report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ope_report.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    assert ope_report.regret_at_1([3.0, 1.0, 2.0], [50.0, 80.0, 60.0]) == pytest.approx(30.0)
    assert ope_report.regret_at_1([1.0, 3.0, 2.0], [50.0, 80.0, 60.0]) == 0.0


# ---------------------------------------------------------------------------------------------------------
# (4b) Known answers on tiny examples computed by hand (each function against numbers, never against itself)
# ---------------------------------------------------------------------------------------------------------
def _toy():
    """Two episodes, horizon 3, gamma 0.5. Episode 0: 3 steps, rewards 1, 2, 4, ratios rho = 2, 0.5, 2 (cumulative
    w = 2, 1, 2). Episode 1: 2 steps, rewards 3, 1, ratios 0.5, 2 (w = 0.5, 1, then carried: 1). The padded cell
    holds garbage (reward 100, ratio 7, Q̂ = V̂ = 9) that the mask must hide. Returns G = 1 + 0.5*2 + 0.25*4 = 3 and
    3 + 0.5*1 = 3.5."""
    mask = np.array([[True, True, True], [True, True, False]])
    rewards = np.array([[1.0, 2.0, 4.0], [3.0, 1.0, 100.0]])
    log_ratios = np.log([[2.0, 0.5, 2.0], [0.5, 2.0, 7.0]])
    q_sa = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 9.0]])
    v_s = np.array([[0.5, 1.0, 2.0], [1.0, 1.0, 9.0]])
    return rewards, log_ratios, q_sa, v_s, mask


@pytest.mark.estimators
def test_is_wis_pdis_wpdis_give_the_hand_computed_values_on_a_two_episode_example():
    r, lr, _, _, mask = _toy()
    # IS: mean of w_{0:H-1} G = (2 * 3 + 1 * 3.5) / 2 = 4.75
    assert ope.estimate("IS", r, lr, mask, 0.5) == pytest.approx(4.75)
    # WIS: (2 * 3 + 1 * 3.5) / (2 + 1) = 9.5 / 3
    assert ope.estimate("WIS", r, lr, mask, 0.5) == pytest.approx(9.5 / 3)
    # PDIS: episode 0: 2*1 + 0.5*(1*2) + 0.25*(2*4) = 5; episode 1: 0.5*3 + 0.5*(1*1) = 2; mean 3.5
    assert ope.estimate("PDIS", r, lr, mask, 0.5) == pytest.approx(3.5)
    # WPDIS: t=0: (2*1 + 0.5*3) / 2.5 = 1.4; t=1: (1*2 + 1*1) / 2 = 1.5; t=2: (2*4 + 1*0) / 3 = 8/3
    assert ope.estimate("WPDIS", r, lr, mask, 0.5) == pytest.approx(1.4 + 0.5 * 1.5 + 0.25 * 8 / 3)
    # counts (2, 1): episode 0 drawn twice. IS: (2*6 + 3.5) / 3; WIS: (2*6 + 3.5) / (2*2 + 1)
    assert ope.estimate("IS", r, lr, mask, 0.5, counts=np.array([2.0, 1.0])) == pytest.approx(15.5 / 3)
    assert ope.estimate("WIS", r, lr, mask, 0.5, counts=np.array([2.0, 1.0])) == pytest.approx(15.5 / 5)


@pytest.mark.estimators
def test_dr_and_wdr_give_the_hand_computed_values_on_a_two_episode_example():
    r, lr, q, v, mask = _toy()
    # DR backwards, V^(t) = V̂_t + rho_t (r_t + 0.5 V^(t+1) - Q̂_t). Episode 0: t=2: 2 + 2*(4 - 1) = 8;
    # t=1: 1 + 0.5*(2 + 4 - 1) = 3.5; t=0: 0.5 + 2*(1 + 1.75 - 1) = 4. Episode 1: t=1: 1 + 2*(1 - 0) = 3;
    # t=0: 1 + 0.5*(3 + 1.5 - 2) = 2.25.
    np.testing.assert_allclose(ope.dr_per_episode(r, lr, q, v, mask, 0.5), [4.0, 2.25])
    assert ope.estimate("DR", r, lr, mask, 0.5, q, v) == pytest.approx((4.0 + 2.25) / 2)
    counts = np.array([1.0, 3.0])
    assert ope.estimate("DR", r, lr, mask, 0.5, q, v, counts=counts) == pytest.approx((4.0 + 3 * 2.25) / 4)
    # WDR: normalised weights ŵ_-1 = (1/2, 1/2), ŵ_0 = (0.8, 0.2), ŵ_1 = (0.5, 0.5), ŵ_2 = (2/3, 1/3).
    # t=0: 0.8*0 + 0.2*(3-2) + 0.5*0.5 + 0.5*1 = 0.95; t=1: 0.5*1 + 0.5*1 + 0.8*1 + 0.2*1 = 2;
    # t=2: (2/3)*(4-1) + (1/3)*0 + 0.5*2 + 0.5*0 = 3.  WDR = 0.95 + 0.5*2 + 0.25*3 = 2.7
    assert ope.estimate("WDR", r, lr, mask, 0.5, q, v) == pytest.approx(2.7)


@pytest.mark.estimators
def test_self_normalised_estimators_ignore_a_common_huge_log_weight_without_overflow():
    # adding 800 to every episode's first log-ratio multiplies all weights by e^800 (inf in float64 unless shifted):
    # the self-normalised estimators must give exactly the values of the unshifted toy
    r, lr, q, v, mask = _toy()
    big = lr.copy()
    big[:, 0] += 800.0
    assert ope.estimate("WIS", r, big, mask, 0.5) == pytest.approx(9.5 / 3)
    assert ope.estimate("WPDIS", r, big, mask, 0.5) == pytest.approx(1.4 + 0.5 * 1.5 + 0.25 * 8 / 3)
    assert ope.estimate("WDR", r, big, mask, 0.5, q, v) == pytest.approx(2.7)
    small = lr.copy()
    small[:, 0] -= 800.0  # every weight underflows to 0 without the shift
    assert ope.estimate("WIS", r, small, mask, 0.5) == pytest.approx(9.5 / 3)


@pytest.mark.estimators
def test_ess_is_kish_formula_and_per_decision_ess_averages_it_with_discounts():
    # w = 1, 2, 3: (1 + 2 + 3)^2 / (1 + 4 + 9) = 36 / 14, whatever common factor the weights share
    assert ope.effective_sample_size(np.log([1.0, 2.0, 3.0])) == pytest.approx(36 / 14)
    assert ope.effective_sample_size(np.log([1.0, 2.0, 3.0]) + 1000.0) == pytest.approx(36 / 14)
    assert ope.effective_sample_size(np.array([0.0, -800.0, -800.0])) == pytest.approx(1.0)  # one dominates
    assert ope.effective_sample_size(np.full(3, -np.inf)) == 0.0  # no weight at all
    # toy step weights (carried): t=0 (2, 0.5): 2.5^2 / 4.25 = 25/17; t=1 (1, 1): 2; t=2 (2, 1): 9/5.
    # gamma 0.5: (25/17 + 0.5*2 + 0.25*9/5) / (1 + 0.5 + 0.25)
    _, lr, _, _, mask = _toy()
    assert ope.per_decision_ess(lr, mask, 0.5) == pytest.approx((25 / 17 + 1.0 + 0.45) / 1.75)


@pytest.mark.estimators
def test_bootstrap_counts_are_uniform_multinomial_draws_of_n_episodes():
    counts = ope.bootstrap_counts(4, 2000, np.random.default_rng(0))
    assert counts.shape == (2000, 4) and counts.dtype == np.float64
    assert (counts.sum(1) == 4).all()  # each resample draws n episodes
    # each episode is drawn with probability 1/n: mean count 1, variance n * (1/n) * (1 - 1/n) = 0.75
    np.testing.assert_allclose(counts.mean(0), 1.0, atol=0.1)
    np.testing.assert_allclose(counts.var(0), 0.75, atol=0.1)
    assert ope.bootstrap_counts(2, 1, np.random.default_rng(0)).shape == (1, 2)  # two episodes, one resample
    assert ope.bootstrap_counts(5, 0, np.random.default_rng(0)) is None  # no resamples asked
    assert ope.bootstrap_counts(0, 10, np.random.default_rng(0)) is None


@pytest.mark.estimators
def test_percentile_ci_returns_the_2_5_and_97_5_percentiles_of_the_finite_values():
    # 0, 1, ..., 100: the q-th percentile (linear interpolation) is q itself
    assert ope.percentile_ci(np.arange(101.0)) == pytest.approx([2.5, 97.5])
    # two values 1, 2: 1 + 0.025 and 1 + 0.975
    assert ope.percentile_ci(np.array([1.0, 2.0])) == pytest.approx([1.025, 1.975])
    assert ope.percentile_ci(np.array([1.0])) is None  # one value: no interval
    # 18 finite of 20 (90%) is enough, and the non-finite ones are dropped; 17 of 20 is not
    samples = np.arange(20.0)
    samples[[3, 7]] = [np.nan, np.inf]
    finite = np.delete(np.arange(20.0), [3, 7])
    assert ope.percentile_ci(samples) == pytest.approx([np.percentile(finite, 2.5), np.percentile(finite, 97.5)])
    samples[11] = -np.inf
    assert ope.percentile_ci(samples) is None


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@pytest.mark.estimators
def test_box_mass_and_truncated_normal_log_prob_match_the_closed_form():
    loc, scale = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    low, high = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)
    # dim 0: Phi((3 - 0.5)/2) - Phi((-1 - 0.5)/2) = Phi(1.25) - Phi(-0.75); dim 1: Phi(2) - Phi(-2)
    mass = [_phi(1.25) - _phi(-0.75), _phi(2.0) - _phi(-2.0)]
    np.testing.assert_allclose(ope.log_box_mass(loc, scale, low, high).numpy(), np.log(mass), rtol=1e-12)
    # a box with no mass in float64 gives the finite floor log(1e-30), not -inf
    far = ope.log_box_mass(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([50.0]), torch.tensor([60.0]))
    assert far.item() == pytest.approx(math.log(1e-30))
    # log N(x; m, s) = -((x - m)/s)^2 / 2 - log s - log(2 pi)/2, minus log mass, summed over the two dimensions
    x = torch.tensor([2.0, -0.25], dtype=torch.float64)
    expected = sum(-0.5 * ((xi - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi) - math.log(p)
                   for xi, m, s, p in zip([2.0, -0.25], [0.5, -1.0], [2.0, 0.5], mass))
    assert ope.truncated_normal_log_prob(x, loc, scale, low, high).item() == pytest.approx(expected, rel=1e-12)
    batch = ope.truncated_normal_log_prob(torch.stack([x, loc]), loc, scale, low, high)  # (B, d) -> (B,)
    at_loc = sum(-math.log(s) - 0.5 * math.log(2 * math.pi) - math.log(p) for s, p in zip([2.0, 0.5], mass))
    np.testing.assert_allclose(batch.numpy(), [expected, at_loc], rtol=1e-12)


@pytest.mark.estimators
def test_spearman_ranks_with_average_ties_and_regret_edge_cases():
    # x = 1, 1, 2, 3, 3, 3 has average ranks 0.5, 0.5, 2, 4, 4, 4; y = 2, 1, 4, 3, 6, 5 ranks 1, 0, 3, 2, 5, 4
    expected = np.corrcoef([0.5, 0.5, 2, 4, 4, 4], [1, 0, 3, 2, 5, 4])[0, 1]
    assert ope_report.spearman([1, 1, 2, 3, 3, 3], [2, 1, 4, 3, 6, 5]) == pytest.approx(expected)
    assert ope_report.spearman([3, 1, 2], [1, 2, 3]) == pytest.approx(-0.5)  # ranks 2, 0, 1 vs 0, 1, 2
    assert ope_report.spearman([1, 2], [5, 7]) == pytest.approx(1.0)  # two policies suffice
    # average ranks 0.5, 0.5, 2.5, 2.5 (std exactly 1) vs 0, 1, 2, 3: centred (-1, -1, 1, 1) . (-1.5, -0.5, 0.5, 1.5)
    # = 4, over norms 2 * sqrt(5): 2 / sqrt(5), whichever side holds the ties
    assert ope_report.spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(2 / math.sqrt(5))
    assert ope_report.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(2 / math.sqrt(5))
    assert math.isnan(ope_report.spearman([1], [1]))
    assert math.isnan(ope_report.spearman([2, 2, 2], [1, 2, 3]))  # a constant side has no ranking
    assert math.isnan(ope_report.spearman([1, np.nan, 3], [1, 2, 3]))
    assert math.isnan(ope_report.regret_at_1([1.0, np.inf], [5.0, 6.0]))  # a non-finite estimate ranks nothing
    assert ope_report.regret_at_1([2.0, 1.0, 0.0], [7.0, 9.0, 3.0]) == pytest.approx(2.0)  # picks 7, best is 9


# ---------------------------------------------------------------------------------------------------------
# (4c) Known answers through the pipeline: the model-based estimator, FQE at time limits, clipped log-ratios, and
# on-policy Box data (truncated Gaussians)
# ---------------------------------------------------------------------------------------------------------
def episodes_dataset(episodes: list, timeout: bool = True, **kw) -> Dataset:
    """Episodes given as lists of (s, a, r, s') steps, each ended by a time limit (or a terminal)."""
    steps = [step for e in episodes for step in e]
    last = np.concatenate([np.arange(len(e)) == len(e) - 1 for e in episodes])
    obs, actions, rewards, next_obs = (np.array([step[i] for step in steps]) for i in range(4))
    actions = actions.astype(np.int64 if actions.dtype.kind == "i" else np.float32)
    return Dataset(observations=obs.astype(np.float32), actions=actions, rewards=rewards.astype(np.float32),
                   next_observations=next_obs.astype(np.float32), terminals=last & (not timeout),
                   timeouts=last & timeout, name="episodes", **kw)


def always_right() -> Policy:
    """A Discrete policy that always takes action 1 (no density: only FQE and MB value it)."""
    return Policy(act=lambda o: torch.ones(len(o), dtype=torch.long), dist=None, discrete=True, checkpoint={})


def linear_model(r_max: float, logit: float) -> "ope.DynamicsEnsemble":
    """A two-member linear 'ensemble' (n_layers 0) set by hand, on raw units (all normalisers 0 and 1), state (s, z):
    s' = s + 0.2 a - 0.1, z' = z, r = s + z + 0.5 a, termination logit `logit`; states clipped to [-1, 1.25] x [-1, 1],
    rewards to [-1, r_max]."""
    one, zero = torch.ones(2), torch.zeros(2)
    stats = dict(obs_mean=zero, obs_std=one, delta_mean=zero, delta_std=one, r_mean=0.0, r_std=1.0,
                 obs_min=-one, obs_max=torch.tensor([1.25, 1.0]), r_min=-1.0, r_max=r_max)
    model = ope.DynamicsEnsemble(2, 2, 1, 2, stats, ope.Args(policy=["unused"], n_layers=0))
    with torch.no_grad():  # rows: inputs (s, z, a == 0, a == 1); columns: outputs (s' - s, z' - z, r, end logit)
        model.net[0].weight[:] = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [-0.1, 0.0, 0.0, 0.0],
                                               [0.1, 0.0, 0.5, 0.0]])
        model.net[0].bias[:] = torch.tensor([0.0, 0.0, 0.0, logit])
    return model


@pytest.mark.estimators
def test_model_rollout_of_a_known_linear_model_gives_the_hand_computed_returns():
    s0, right = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), always_right().act  # z = 0 throughout
    disc, undisc = ope.model_rollout(linear_model(r_max=2.0, logit=-50.0), right, s0, 2, 5, 0.9)
    # from s0 = 0: s = 0, .1, .2, .3, .4 and r = s + .5; from s0 = 1: s = 1, 1.1, 1.2, then 1.25 twice (1.3 and 1.4
    # clipped to the data's largest state), r = 1.5, 1.6, 1.7, 1.75, 1.75
    d = 0.9 ** np.arange(5)
    r0, r1 = np.array([0.5, 0.6, 0.7, 0.8, 0.9]), np.array([1.5, 1.6, 1.7, 1.75, 1.75])
    np.testing.assert_allclose(disc, [[r0 @ d, r1 @ d]] * 2, rtol=1e-5)  # (members, initial states)
    np.testing.assert_allclose(undisc, [[r0.sum(), r1.sum()]] * 2, rtol=1e-5)
    # rewards clipped to the data's largest reward 0.75: 0.5, 0.6, 0.7, 0.75, 0.75
    disc, _ = ope.model_rollout(linear_model(r_max=0.75, logit=-50.0), right, s0[:1], 2, 5, 0.9)
    np.testing.assert_allclose(disc, [[np.array([0.5, 0.6, 0.7, 0.75, 0.75]) @ d]] * 2, rtol=1e-5)
    # termination probability 1: the reward of the step that ends the episode counts, nothing after it
    disc, undisc = ope.model_rollout(linear_model(r_max=2.0, logit=50.0), right, s0, 2, 5, 0.9)
    np.testing.assert_allclose(disc, [[0.5, 1.5]] * 2, rtol=1e-6)
    np.testing.assert_allclose(undisc, [[0.5, 1.5]] * 2, rtol=1e-6)


def test_mb_fits_a_deterministic_linear_mdp_and_its_estimate_is_the_hand_computed_return():
    # s' = s + 0.2 a - 0.1 and r = s + 0.5 a, 5 steps from s0 in {0, 1} (time limit, no terminal); the behaviour acts
    # at random, plus a few always-right episodes so the data's range covers where pi_e (always right) goes.
    # A linear model (--n-layers 0) can fit this exactly; pi_e's return from s0 is sum_t 0.9^t (s0 + 0.1 t + 0.5).
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(300):
        s, steps = float(i % 2), []
        for _ in range(5):
            a = 1 if i < 10 else int(rng.integers(2))
            steps.append(([s], a, s + 0.5 * a, [s + 0.2 * a - 0.1]))
            s += 0.2 * a - 0.1
        episodes.append(steps)
    ds = episodes_dataset(episodes, behavior_log_probs=np.full(1500, np.log(0.5), dtype=np.float32))
    res = run_pipeline(ds, always_right(), mb_steps=3000, mb_ensemble=2, n_layers=0, learning_rate=1e-2,
                       bootstrap=0)
    d = 0.9 ** np.arange(5)
    value = np.mean([(s0 + 0.1 * np.arange(5) + 0.5) @ d for s0 in ds.observations[ds.episode_ends() - 4, 0]])
    undisc = np.mean([(s0 + 0.1 * np.arange(5) + 0.5).sum() for s0 in ds.observations[ds.episode_ends() - 4, 0]])
    mb = res["estimates"]["MB"]
    assert mb["values"] == "act" and res["diagnostics"]["mb_horizon"] == 5
    assert mb["discounted"] == pytest.approx(value, rel=1e-3), (mb["discounted"], value)  # fits to about 2e-4
    assert mb["undiscounted"] == pytest.approx(undisc, rel=1e-3)
    np.testing.assert_allclose(res["diagnostics"]["mb_member_estimates"], value, rtol=1e-3)


@pytest.mark.parametrize("time_limit_terminal", [False, True])
def test_fqe_through_a_time_limit_and_stopped_at_it_by_hand(time_limit_terminal):
    # two states visited in turn, s0 (reward 1) -> s1 (reward 2) -> s0 ..., each episode cut by the time limit after
    # s1. Bootstrapping through the cut, Q(s0) = 1 + g Q(s1), Q(s1) = 2 + g Q(s0): Q(s0) = (1 + 2g) / (1 - g^2)
    # = 2 / 0.75 at g = 0.5. With --fqe-time-limit-terminal the cut ends the episode: Q(s0) = 1 + 2g = 2.
    s0, s1 = [1.0, 0.0], [0.0, 1.0]
    rng = np.random.default_rng(0)
    ds = episodes_dataset([[(s0, int(rng.integers(2)), 1.0, s1), (s1, int(rng.integers(2)), 2.0, s0)]
                           for _ in range(100)], behavior_log_probs=np.full(200, np.log(0.5), dtype=np.float32))
    res = run_pipeline(ds, table_policy(PI_B[:2]), discount=0.5, fqe_steps=2000, fqe_tau=0.05, learning_rate=1e-3,
                       fqe_time_limit_terminal=time_limit_terminal, bootstrap=0)
    expected = 2.0 if time_limit_terminal else 2.0 / 0.75
    assert res["estimates"]["FQE"]["discounted"] == pytest.approx(expected, abs=2e-3)  # it converges to about 1e-6
    # the finite-horizon value of the data (what IS values here: pi_e = pi_b) is 1 + 0.5 * 2 = 2
    assert res["estimates"]["WIS"]["discounted"] == pytest.approx(2.0)


@pytest.mark.estimators
def test_clipped_log_ratios_give_the_hand_computed_is_estimates():
    # two steps per episode, pi_b = (0.5, 0.5) and pi_e = (0.9, 0.1) in both states; reward 1 for action 0, 3 for 1.
    # Ratios: 1.8 for action 0 (log 0.59, inside [-1, 1]), 0.2 for action 1 (log -1.61, clipped to -1: e^-1).
    # Per-step clipping: (a0, a1) = (0, 0): w = 1.8^2, G = 1 + 0.9; (1, 0): w = 1.8 / e, G = 3 + 0.9;
    # (1, 1): w = e^-2, G = 3 + 2.7; (0, 1): w = 1.8 / e, G = 1 + 2.7. Three copies of each episode.
    s0, s1 = [1.0, 0.0], [0.0, 1.0]
    pairs = [(0, 0), (1, 0), (1, 1), (0, 1)] * 3
    ds = episodes_dataset([[(s0, a0, 1.0 + 2 * a0, s1), (s1, a1, 1.0 + 2 * a1, s0)] for a0, a1 in pairs],
                          timeout=False, behavior_log_probs=np.full(24, np.log(0.5), dtype=np.float32))
    pi_e = np.array([[0.9, 0.1], [0.9, 0.1]])
    w = np.array([1.8**2, 1.8 / math.e, math.exp(-2), 1.8 / math.e])
    g = np.array([1.9, 3.9, 5.7, 3.7])
    res = run_pipeline(ds, table_policy(pi_e), clip_log_ratio=(-1.0, 1.0))
    assert res["estimates"]["IS"]["discounted"] == pytest.approx((w @ g) / 4)
    assert res["estimates"]["WIS"]["discounted"] == pytest.approx((w @ g) / w.sum())
    # PDIS: reward t weighted by the clipped ratios up to t: step 0 by 1.8 or e^-1, step 1 by the product
    first = np.array([1.8, 1 / math.e, 1 / math.e, 1.8])
    r0, r1 = np.array([1.0, 3.0, 3.0, 1.0]), np.array([1.0, 1.0, 3.0, 3.0])
    assert res["estimates"]["PDIS"]["discounted"] == pytest.approx((first @ r0 + 0.9 * w @ r1) / 4)
    assert res["diagnostics"]["clipped_share"] == pytest.approx(0.5)  # the action-1 steps
    assert any("clipped to [-1.0, 1.0] (50.0% of steps clipped)" in n for n in res["notes"])
    # unclipped, the action-1 ratio is 0.2: a different estimate
    w_raw = np.array([1.8**2, 1.8 * 0.2, 0.04, 1.8 * 0.2])
    assert run_pipeline(ds, table_policy(pi_e))["estimates"]["IS"]["discounted"] == pytest.approx((w_raw @ g) / 4)


def _truncated_normal_log_density(x: float, loc: float, scale: float, low: float, high: float) -> float:
    """log of N(loc, scale^2) truncated to [low, high] at x, from the error function (independent of ope.py)."""
    def cdf(z):
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    z = (x - loc) / scale
    return -0.5 * z * z - math.log(scale * math.sqrt(2 * math.pi)) - math.log(cdf((high - loc) / scale)
                                                                                - cdf((low - loc) / scale))


@pytest.mark.estimators
def test_on_policy_box_data_give_weight_one_and_is_equals_the_average_return():
    # pi_e(.|s) = N(0.8 s, 0.5^2) truncated to the box [-0.5, 1]; the data are drawn from exactly that policy (by
    # rejection, independently of ope.py) with its exact log-density as behaviour log-probabilities. Every importance
    # weight is then 1 and every IS-type estimate is the data's mean return. The box keeps only ~70-90% of the
    # Gaussian's mass, so a density that ignored the truncation would give weights far from 1.
    rng = np.random.default_rng(0)
    low, high, scale = -0.5, 1.0, 0.5
    episodes, log_pb = [], []
    for _ in range(200):
        s, steps = float(rng.uniform(-1, 1)), []
        for _ in range(4):
            a = rng.normal(0.8 * s, scale)
            while not low <= a <= high:
                a = rng.normal(0.8 * s, scale)
            s32, a32 = np.float32(s), np.float32(a)
            log_pb.append(_truncated_normal_log_density(float(a32), 0.8 * float(s32), scale, low, high))
            steps.append(([s], [a], -s * s - 0.1 * a * a, [0.7 * s + 0.3 * a]))
            s = float(np.float32(0.7 * s + 0.3 * a))
        episodes.append(steps)
    ds = episodes_dataset(episodes, behavior_log_probs=np.array(log_pb))
    policy = Policy(act=lambda o: (0.8 * o).clamp(low, high), discrete=False, checkpoint={},
                    dist=lambda o: torch.distributions.Independent(torch.distributions.Normal(0.8 * o, scale), 1))
    data, stats = ope.device_data(ds, torch.device("cpu"))
    target = ope.Target(policy, None, torch.tensor([low]), torch.tensor([high]), None, probe_obs=data["obs"][:1])
    args = ope.Args(policy=["unused"], discount=0.9, bootstrap=50, fqe_steps=0, mb_steps=0)
    res = ope.evaluate_policy(ds, ope.split_episodes(ds), target, data, stats, ds.behavior_log_probs, args, None,
                              np.random.default_rng(0))
    d = res["diagnostics"]
    assert target.density == "Gaussian pi(.|s) truncated to the action box" and d["pi_e_mass_inside_box"] < 0.9
    assert abs(d["mean_log_ratio"]) < 1e-6 and abs(d["max_log10_weight"]) < 1e-5  # every weight is 1
    assert d["ess_share"] == pytest.approx(1.0)
    ends = ds.episode_ends()
    mean_return = np.mean([(ds.rewards[s: e + 1] * 0.9 ** np.arange(e + 1 - s)).sum()
                           for s, e in zip(np.r_[0, ends[:-1] + 1], ends)])
    for name in ("IS", "WIS", "PDIS", "WPDIS"):
        assert res["estimates"][name]["discounted"] == pytest.approx(mean_return, rel=1e-5), name
    assert res["estimates"]["IS"]["undiscounted"] == pytest.approx(ds.rewards.sum() / 200, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# (4d) --refit-bootstrap: FQE's interval from refits on resamples of whole episodes
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.estimators
def test_resampled_rows_are_the_rows_of_whole_episodes_with_multiplicity():
    ep = ope.Episodes(rows=np.array([[0, 1, 2], [3, 4, 0], [5, 0, 0]]),
                      mask=np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=bool))
    assert ope.resampled_rows(ep, np.array([0.0, 2.0, 1.0])).tolist() == [3, 4, 3, 4, 5]
    assert ope.resampled_rows(ep, np.array([3.0, 0.0, 0.0])).tolist() == [0, 1, 2] * 3
    assert ope.resampled_rows(ep, np.ones(3)).tolist() == [0, 1, 2, 3, 4, 5]  # padding (row 0) never read


def test_refit_bootstrap_interval_comes_from_fqe_refitted_on_resampled_episodes(monkeypatch):
    # 8 episodes of lengths 1-4 whose observation is the episode's index; a stand-in FQE records the rows it is fitted
    # on and values a start state at 10 x its index. Each refit must see whole episodes (the rows of episode i a
    # multiple of its length: counts c_i summing to 8), its estimate must be sum_i c_i 10 i / 8 over the resampled
    # start states, and the reported interval the percentile interval of the refits.
    lengths = np.array([1, 2, 3, 4, 1, 2, 3, 4])
    episodes = [[([float(i)], t % 2, 0.0, [float(i)]) for t in range(n)] for i, n in enumerate(lengths)]
    ds = episodes_dataset(episodes, behavior_log_probs=np.full(lengths.sum(), np.log(0.5), dtype=np.float32))
    fitted_on = []

    class StartValue:
        def expected(self, obs, pi):
            return 10.0 * obs[:, 0]

    def fake_fit_fqe(q, data, next_pi, *args, **kwargs):
        fitted_on.append(data["obs"][:, 0].numpy().astype(np.int64))
        assert len(next_pi) == len(data["obs"])  # pi_e at s' resampled with the rows
        return StartValue(), []

    monkeypatch.setattr(ope, "fit_fqe", fake_fit_fqe)
    res = run_pipeline(ds, always_right(), fqe_steps=10, refit_bootstrap=5, bootstrap=0)
    assert len(fitted_on) == 6 and np.array_equal(fitted_on[0], np.repeat(np.arange(8), lengths))  # the main fit
    refits = res["diagnostics"]["fqe_refit_estimates"]
    assert len(refits) == 5 and res["diagnostics"]["fqe_interval"] == "refit"
    for ids, value in zip(fitted_on[1:], refits):
        counts = np.bincount(ids, minlength=8) / lengths
        assert np.array_equal(counts, np.round(counts)) and counts.sum() == 8, counts  # whole episodes
        assert value == pytest.approx(counts @ (10.0 * np.arange(8)) / 8)
    assert any(not np.array_equal(np.bincount(ids, minlength=8), lengths) for ids in fitted_on[1:])  # resampled
    fqe = res["estimates"]["FQE"]
    assert fqe["discounted"] == pytest.approx(35.0)  # the main fit over every start state
    assert fqe["ci_discounted"] == pytest.approx(ope.percentile_ci(np.array(refits)))
    assert any("refit" in n for n in res["notes"])


def test_refit_bootstrap_changes_no_other_number(chain):
    _, ds = chain
    off = run_pipeline(ds, table_policy(PI_E), fqe_steps=50, mb_steps=50, bootstrap=50)
    on = run_pipeline(ds, table_policy(PI_E), fqe_steps=50, mb_steps=50, bootstrap=50, refit_bootstrap=3)
    assert off["diagnostics"]["fqe_interval"] == "start states only" and on["diagnostics"]["fqe_interval"] == "refit"
    assert on["estimates"]["FQE"]["ci_discounted"] != off["estimates"]["FQE"]["ci_discounted"]
    for name in ope.ESTIMATORS:
        a, b = off["estimates"][name], on["estimates"][name]
        keys = [k for k in a if name != "FQE" or k not in ("ci_discounted", "ci_mc_error")]
        np.testing.assert_equal({k: a[k] for k in keys}, {k: b[k] for k in keys}, err_msg=name)  # MB runs after
    np.testing.assert_equal({k: v for k, v in on["diagnostics"].items() if not k.startswith("fqe_")},
                            {k: v for k, v in off["diagnostics"].items() if not k.startswith("fqe_")})


# ---------------------------------------------------------------------------------------------------------
# (5) Smoke: train IQL briefly, then evaluate the checkpoint end to end; and the input errors of main()
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_iql_checkpoint_end_to_end(tmp_path, chain):
    run_script("iql.py", "--dataset", "cartpole-medium", "--total-steps", "100", "--eval-episodes", "0",
               "--batch-size", "32", "--log-every", "100", "--save-model", "--device", "cpu", cwd=tmp_path)
    ckpt = str(next((tmp_path / "runs").glob("*/iql.pt")))
    out = run_script("ope.py", "--policy", ckpt, "--dataset", "cartpole-medium", "--fqe-steps", "200", "--mb-steps",
                     "100", "--mb-ensemble", "2", "--hidden-dim", "64", "--rollouts", "2", "--bootstrap", "20",
                     "--plot", str(tmp_path / "ope.png"), "--device", "cpu", cwd=tmp_path)
    for name in ope.ESTIMATORS + ("truth",):
        assert f"\n   {name} " in out, name
    assert "(2 rollout episodes)" in out
    assert "\nope.py: done in " in out and "ground-truth rollouts" in out.splitlines()[-2]  # the timing summary
    assert out.splitlines()[-1].startswith("verdict: trust ")  # and the closing line: which estimate to trust
    res = json.loads((tmp_path / (ckpt + ".cartpole-medium.ope.json")).read_text())
    assert set(res["estimates"]) == set(ope.ESTIMATORS) and res["truth"]["episodes"] == 2
    wis, n_episodes = res["estimates"]["WIS"], res["diagnostics"]["n_episodes"]
    assert wis["ess"] > 0  # an interval exactly when the ESS is at least 10% of the episodes
    assert (wis["ci_discounted"] is not None) == (wis["ess"] >= ope.MIN_ESS_SHARE * n_episodes)
    assert not (tmp_path / (ckpt + ".ope.csv")).exists()  # the JSON holds everything
    assert (tmp_path / "ope.png").stat().st_size > 0

    # input errors, each a clear OPEError raised before any fitting
    base = dict(fqe_steps=0, mb_steps=0, device="cpu")
    with pytest.raises(ope.OPEError, match="does not exist"):
        ope.main(ope.Args(policy=[str(tmp_path / "missing.pt")], dataset="cartpole-medium", **base))
    _, ds = chain  # 4-dim observations and 2 actions, like CartPole, but no env: a dataset the policy fits
    bad = Dataset(**{k: getattr(ds, k) for k in ("observations", "actions", "rewards", "next_observations",
                                                 "terminals", "timeouts")},
                  behavior_log_probs=np.where(np.arange(len(ds)) == 3, -np.inf, ds.behavior_log_probs), name="bad")
    save_npz(bad, tmp_path / "bad.npz")
    with pytest.raises(UserError, match="probability 0"):  # datasets.py refuses it at load, ope.py's check in code
        ope.main(ope.Args(policy=[ckpt], dataset=str(tmp_path / "bad.npz"), **base))
    box = Dataset(observations=ds.observations, actions=ds.actions[:, None].astype(np.float32), rewards=ds.rewards,
                  next_observations=ds.next_observations, terminals=ds.terminals, timeouts=ds.timeouts, name="box")
    save_npz(box, tmp_path / "box.npz")
    with pytest.raises(ope.OPEError, match="action space"):
        ope.main(ope.Args(policy=[ckpt], dataset=str(tmp_path / "box.npz"), **base))


@pytest.mark.parametrize("discrete", [True, False])
def test_cross_fitted_behaviour_cloning_recovers_a_known_behaviour_policy(discrete):
    # states s ~ U(-1, 1); Discrete: P(a = 1) = sigmoid(3 s); Box: N(0.5 s, 0.3) truncated to [-1, 1]
    torch.manual_seed(0)
    rng = np.random.default_rng(11)
    n = 6000
    obs = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    low, high = torch.tensor([-1.0]), torch.tensor([1.0])
    loc, scale = torch.as_tensor(0.5 * obs), torch.full((n, 1), 0.3)
    if discrete:
        p1 = 1 / (1 + np.exp(-3 * obs[:, 0]))
        actions = (rng.random(n) < p1).astype(np.int64)
        true_lp = np.log(np.where(actions == 1, p1, 1 - p1))
    else:
        actions = ope.truncated_normal_sample(loc, scale, low, high).numpy()
        true_lp = ope.truncated_normal_log_prob(torch.as_tensor(actions), loc, scale, low, high).numpy()
    ends = np.zeros(n, dtype=bool)
    ends[9::10] = True  # 600 episodes of 10 steps (their order does not matter to behaviour cloning)
    ds = Dataset(observations=obs, actions=actions, rewards=np.zeros(n, np.float32), next_observations=obs,
                 terminals=ends, timeouts=np.zeros(n, dtype=bool), name="bc")
    data, stats = ope.device_data(ds, torch.device("cpu"))
    if not discrete:
        stats.update(low=low, high=high)
    ep = ope.Episodes(rows=np.arange(n).reshape(-1, 10), mask=np.ones((n // 10, 10), dtype=bool))
    args = ope.Args(policy=["unused"], bc_steps=1500, hidden_dim=32, learning_rate=3e-3)
    log_pb, mean_ll, folds = ope.fit_behavior(data, ep, stats, (1, 1, 2 if discrete else None), args,
                                              np.random.default_rng(0))
    assert folds == 2 and np.isfinite(log_pb).all()
    gap = np.abs(log_pb - true_lp).mean()  # nats per action; a state-blind fit would be off by several times more
    assert gap < (0.1 if discrete else 0.15), gap
    assert mean_ll == pytest.approx(true_lp.mean(), abs=0.05)


# ---------------------------------------------------------------------------------------------------------
# Progress bars and the command line's error messages
# ---------------------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for the tqdm bar: records every update."""

    bars: list = []

    def __init__(self, total, desc, unit="step"):
        self.total, self.desc, self.updates = total, desc, []
        _Recorder.bars.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_long_phases_update_their_progress_bar_in_chunks_of_steps(chain, monkeypatch):
    # each fit counts all its steps, in a few updates of PROGRESS_EVERY steps (no host sync per gradient step)
    _, ds = chain
    monkeypatch.setattr(ope, "progress_bar", _Recorder)
    _Recorder.bars = []
    run_pipeline(ds, table_policy(PI_E), fqe_steps=430, mb_steps=210, bootstrap=0, batch_size=32, mb_ensemble=2)
    data, stats = ope.device_data(ds, torch.device("cpu"))
    args = ope.Args(policy=["unused"], bc_steps=210, bc_folds=2, hidden_dim=16, batch_size=32)
    ope.fit_behavior(data, ope.split_episodes(ds), stats, (4, 1, 2), args, np.random.default_rng(0))
    bars = {b.desc.split(" (")[0]: b for b in _Recorder.bars}
    assert set(bars) == {"dynamics models", "FQE", "model rollouts", "behaviour cloning"}, list(bars)
    for name, steps in (("dynamics models", 210), ("FQE", 430), ("behaviour cloning", 420)):
        bar = bars[name]
        assert bar.total == steps and sum(bar.updates) == steps, (name, bar.updates)
        assert len(bar.updates) <= steps // ope.PROGRESS_EVERY + 2, (name, bar.updates)
    assert bars["behaviour cloning"].desc == "behaviour cloning (fold 2/2)"
    assert 1 <= sum(bars["model rollouts"].updates) <= bars["model rollouts"].total == H


def test_progress_bar_shows_total_and_rate_on_stderr(capsys):
    with ope.progress_bar(300, "FQE (policy 1/2)") as bar:
        bar.update(100)
    err = capsys.readouterr().err
    assert "FQE (policy 1/2)" in err and "/300" in err and "step/s" in err


def test_ope_errors_are_user_errors():
    assert issubclass(ope.OPEError, UserError) and issubclass(ope.OPEError, ValueError)
    with pytest.raises(ope.OPEError, match="does not exist"):
        ope_report.read_checkpoint("/no/such/dir/iql.pt")


@pytest.mark.parametrize("case", ["missing", "corrupt", "unknown-dataset"])
def test_command_line_errors_are_one_clean_line(tmp_path, case):
    # a missing or corrupt policy file (OPEError) and a dataset error from datasets.py (UserError): exit 1, the
    # message on stderr as `ope.py: error: ...`, no traceback
    path = tmp_path / "x.pt"
    if case == "corrupt":
        path.write_text("not a checkpoint\n")
    elif case == "unknown-dataset":
        torch.save({"algo": "iql", "args": {"dataset": "no-such-dataset"}}, path)
    proc = subprocess.run([sys.executable, str(ROOT / "ope.py"), "--policy", str(path), "--device", "cpu"],
                          cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "ope.py: error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    expected = {"missing": "does not exist", "corrupt": "not a checkpoint saved by --save-model",
                "unknown-dataset": "unknown dataset 'no-such-dataset'"}[case]
    assert expected in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags,expected", [(["--rollouts", "2"], "no policy to evaluate: pass --policy"),
                                            (["--policy", "x.pt", "--clip-log-ratio", "2", "-6"], "LOW is above HIGH"),
                                            (["--policy", "x.pt", "--mb-horizon", "0"], "--mb-horizon")])
def test_bad_flags_end_in_one_line_without_a_traceback(tmp_path, flags, expected):
    # `ope.py --rollouts 2` without --policy once ended in an IndexError traceback; every bad input is one line
    proc = subprocess.run([sys.executable, str(ROOT / "ope.py"), *flags], cwd=tmp_path, capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr


def test_results_are_never_overwritten_without_a_word(tmp_path, capsys):
    # issue: `<policy>.ope.json` was silently overwritten, even by a run on another dataset. The file is now named by
    # the dataset, and a file there from other settings is refused before any work, pointing to --out
    ckpt = tmp_path / "a.pt"
    torch.save({"algo": "iql", "args": {"dataset": "cartpole-medium"}}, ckpt)
    args = ope.Args(policy=[str(ckpt)], dataset="cartpole-medium", fqe_steps=100, device="cpu")
    paths = ope_report.output_paths(args, "cartpole-medium")
    assert paths == {str(ckpt): tmp_path / "a.pt.cartpole-medium.ope.json"}
    other = ope_report.output_paths(ope.Args(policy=[str(ckpt)], dataset="cartpole-random"), "cartpole-random")
    assert other[str(ckpt)].name == "a.pt.cartpole-random.ope.json"  # another dataset, another file
    hopper = ope_report.output_paths(args, "mujoco/hopper/medium-v0")[str(ckpt)]
    assert hopper.name == "a.pt.mujoco_hopper_medium-v0.ope.json"
    paths[str(ckpt)].write_text(json.dumps({"args": json.loads(json.dumps(dataclasses.asdict(args)))}))
    assert ope_report.output_paths(dataclasses.replace(args, threads=2), "cartpole-medium") == paths  # the same run
    assert "it will be replaced" in capsys.readouterr().out
    with pytest.raises(ope.OPEError, match=r"a.pt.cartpole-medium.ope.json exists \(--fqe-steps 100 there, 200 "
                                           r"here\): it is not overwritten; write elsewhere with --out"):
        ope.main(dataclasses.replace(args, fqe_steps=200))  # refused before any fitting
    paths[str(ckpt)].write_text("{}")
    with pytest.raises(ope.OPEError, match="not a result of ope.py"):
        ope_report.output_paths(args, "cartpole-medium")
    with pytest.raises(ope.OPEError, match="the same file"):
        ope_report.output_paths(dataclasses.replace(args, policy=["a.pt", "b.pt"], out="{dataset}.json"), "x")
    with pytest.raises(ope.OPEError, match="only {policy} and {dataset}"):
        ope_report.output_paths(dataclasses.replace(args, out="{run}.json"), "x")


def test_default_fqe_makes_four_effective_horizons_of_backups():
    # with Polyak rate tau, steps x tau is about the Bellman backups FQE makes; the old default (20,000 x 0.005 = 100,
    # one effective horizon at gamma 0.99) had not settled on the README's example (docs/ope.md, pitfall 3)
    args = ope.Args(policy=["unused"])
    assert args.fqe_steps * args.fqe_tau >= 4 / (1 - args.discount)
