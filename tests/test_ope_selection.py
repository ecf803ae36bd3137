"""ope.py's output a practitioner acts on: no interval where the effective sample size makes it meaningless, DOPE's
policy-selection metrics on hand cases (and only on rows that value the policy the rollouts ran), FQE and time
limits."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import common
import ope
from benchmark import ope_report
from tests.conftest import run_script
from tests.test_ope import PI_B, chain, run_pipeline, table_policy  # noqa: F401 (chain is a fixture)

FAR = np.array([[0.99, 0.01], [0.01, 0.99], [0.99, 0.01], [0.5, 0.5]])  # far from the uniform behaviour policy


def test_rows_with_too_small_an_ess_get_no_interval_and_say_why(chain):  # noqa: F811
    _, ds = chain
    res = run_pipeline(ds, table_policy(FAR))
    d, est = res["diagnostics"], res["estimates"]
    assert d["ess_share"] < ope.MIN_ESS_SHARE  # a handful of episodes carry the weight
    for name in ("IS", "WIS"):
        assert est[name]["unreliable"].startswith(f"ESS {d['ess']:.1f} < 10% of")
        assert est[name]["ci_discounted"] is None and est[name]["ci_normalized"] is None
    table = ope_report.format_table("far.pt", {**res, "behavior": "logged", "density": "categorical",
                                               "weight_threshold": 100})
    assert "no CI: ESS low !" in table and "left out of the rank metrics" in table
    # the behaviour policy itself: every weight is 1, ESS = n, intervals as usual
    res = run_pipeline(ds, table_policy(PI_B))
    assert all(res["estimates"][n]["unreliable"] is None and res["estimates"][n]["ci_discounted"] is not None
               for n in ("IS", "WIS", "PDIS", "WPDIS"))


def test_the_ess_gate_sits_at_min_ess_share_and_keeps_low_ess_rows_out_of_selection_and_dope(chain):  # noqa: F811
    _, ds = chain
    terms, counts = ope.mean_terms(np.arange(20.0)), ope.bootstrap_counts(20, 200, np.random.default_rng(0))
    # 20 episodes: the gate is at MIN_ESS_SHARE * 20 = 2 effective episodes
    ok = ope.table_row(ds, ope.Row("dist", terms, terms, 2.0), counts, 20, [], "IS")
    low = ope.table_row(ds, ope.Row("dist", terms, terms, 1.9), counts, 20, [], "IS")
    assert ok["unreliable"] is None and ok["ci_discounted"] is not None and ok["ci_mc_error"] is not None
    assert low["unreliable"] == "ESS 1.9 < 10% of 20 episodes"
    assert low["ci_discounted"] is None and low["ci_undiscounted"] is None and low["ci_mc_error"] is None
    assert low["discounted"] == ok["discounted"] == pytest.approx(9.5)  # the estimate itself is still reported
    # end to end: a policy far from the data gets low-ESS IS and WIS rows (and a warning), which keeps IS and WIS out
    # of the selection and the DOPE metrics; the behaviour policy's own rows are fine
    results = {"far": run_pipeline(ds, table_policy(FAR)), "b": run_pipeline(ds, table_policy(PI_B))}
    assert any(w.startswith("effective sample size") for w in results["far"]["warnings"])
    for i, res in enumerate(results.values()):
        res["truth"] = dict(values="dist", discounted=float(i), normalized=float("nan"), undiscounted=float(i))
    sel, dope = ope_report.policy_selection(results), ope_report.dope_metrics(results)
    for name in ("IS", "WIS"):
        assert results["far"]["estimates"][name]["unreliable"] and not results["b"]["estimates"][name]["unreliable"]
        assert sel[name]["skipped"] == "no usable estimate for 1 of 2 policies"
        assert dope[name]["skipped"] == "ESS too low for 1 of 2 policies"


def test_normalized_regret_at_k_by_hand():
    true = [0.0, 10.0, 4.0, 8.0]  # spread 10
    est = [5.0, 1.0, 9.0, 7.0]  # ranks policies 2, 3, 0, 1
    assert ope_report.normalized_regret_at_k(est, true, 1) == pytest.approx((10 - 4) / 10)
    assert ope_report.normalized_regret_at_k(est, true, 2) == pytest.approx((10 - 8) / 10)
    assert ope_report.normalized_regret_at_k(est, true, 4) == 0.0
    assert np.isnan(ope_report.normalized_regret_at_k(est, [1.0] * 4, 1))  # no spread: undefined


def _results(estimates: dict[str, list], values: dict[str, str] | None = None, unreliable: str | None = None):
    true_d, true_n = [0.0, 5.0, 10.0], [10.0, 30.0, 90.0]
    out = {}
    for i in range(3):
        est = {}
        for name in ope.ESTIMATORS:
            if name in estimates:
                est[name] = dict(discounted=estimates[name][i], values=(values or {}).get(name, "act"), skipped=None,
                                 unreliable=unreliable if name == "IS" else None)
            else:
                est[name] = dict(discounted=None, values=None, skipped="not run", unreliable=None)
        out[f"p{i}"] = dict(truth=dict(values="act", discounted=true_d[i], normalized=true_n[i], undiscounted=0.0),
                            estimates=est)
    return out


def test_dope_metrics_on_a_hand_case():
    m = ope_report.dope_metrics(_results({"FQE": [1.0, 9.0, 4.0]}))["FQE"]
    # normalised by the truth's range [0, 10]: truth (0, .5, 1), estimate (.1, .9, .4)
    assert m["abs_error"] == pytest.approx((0.1 + 0.4 + 0.6) / 3)
    assert m["spearman"] == pytest.approx(1 - 6 * (0 + 1 + 1) / (3 * (9 - 1)))  # ranks (0, 2, 1) vs (0, 1, 2)
    assert m["regret_at_1"] == pytest.approx(1.0 - 0.5)  # it deploys policy 1 (true .5) instead of policy 2 (1)
    assert m["regret_at_1_points"] == pytest.approx(90.0 - 30.0)
    assert m["regret_at_3"] is None  # three policies: the top 3 always hold the best
    assert m["std"]["abs_error"] > 0  # the bootstrap over policies moves it
    perfect = ope_report.dope_metrics(_results({"FQE": [0.0, 5.0, 10.0]}))["FQE"]
    assert perfect["abs_error"] == 0 and perfect["spearman"] == pytest.approx(1) and perfect["regret_at_1"] == 0


def test_estimates_above_twice_the_true_range_are_capped_as_dope():
    m = ope_report.dope_metrics(_results({"FQE": [0.0, 5.0, 100.0]}))["FQE"]
    assert m["abs_error"] == pytest.approx((0 + 0 + (2.0 - 1.0)) / 3)  # 100 -> 10 (normalised), capped at 2


def test_rows_that_value_another_policy_or_have_low_ess_are_left_out():
    res = _results({"FQE": [1.0, 9.0, 4.0], "IS": [0.0, 5.0, 10.0], "DR": [0.0, 5.0, 10.0]}, values={"DR": "dist"},
                   unreliable="ESS 1.2 < 10% of 50 episodes")
    m = ope_report.dope_metrics(res)
    assert m["FQE"]["skipped"] is None
    assert "--rollout-action sample" in m["DR"]["skipped"]
    assert m["IS"]["skipped"].startswith("ESS too low for 3 of 3")
    assert m["MB"]["skipped"].startswith("skipped for 3 of 3")


@pytest.mark.parametrize("flag", [False, True])
def test_fqe_can_treat_time_limits_as_terminal(chain, monkeypatch, flag):  # noqa: F811
    _, ds = chain
    seen = {}
    real = ope.fit_fqe

    def spy(q, data, *a, **kw):
        seen["terminals"] = data["terminals"].numpy().astype(bool)
        return real(q, data, *a, **kw)

    monkeypatch.setattr(ope, "fit_fqe", spy)
    res = run_pipeline(ds, table_policy(PI_B), fqe_steps=10, fqe_time_limit_terminal=flag)
    expected = ds.terminals | ds.timeouts if flag else ds.terminals
    np.testing.assert_array_equal(seen["terminals"], expected)
    assert ds.timeouts.any() and not np.array_equal(ds.terminals, ds.terminals | ds.timeouts)
    note = [n for n in res["notes"] if n.startswith("FQE values the infinite-horizon")]
    assert bool(note) != flag  # the note says what the flag would change, and goes when it is on
    if note:
        assert "lower where they are negative" in note[0]


def test_policy_selection_ranks_recommends_and_says_when_it_cannot_tell():
    def row(d, ci):
        return dict(discounted=d, ci_discounted=ci, skipped=None, unreliable=None)

    skipped = dict(discounted=None, ci_discounted=None, skipped="not run", unreliable=None)
    results = {p: dict(estimates={n: skipped for n in ope.ESTIMATORS}) for p in ("a", "b", "c")}
    results["a"]["estimates"]["FQE"] = row(5.0, [4.0, 6.0])
    results["b"]["estimates"]["FQE"] = row(8.0, [5.5, 9.0])  # the pick; a's interval reaches 6 > 5.5: a tie
    results["c"]["estimates"]["FQE"] = row(1.0, [0.0, 2.0])  # clearly worse
    sel = ope_report.policy_selection(results)
    assert sel["FQE"]["ranking"] == ["b", "a", "c"] and sel["FQE"]["recommended"] == "b"
    assert sel["FQE"]["cannot_tell_apart"] == ["a"]
    assert sel["IS"]["skipped"] == "no usable estimate for 3 of 3 policies"
    assert not sel["FQE"]["low_coverage"]  # no coverage check ran
    # the pick's coverage warning fired: the selection says so (for FQE and MB, which extrapolate; IS does not)
    for share, flagged in ((0.3, True), (0.01, False)):
        results["b"]["diagnostics"] = {"low_coverage_share": share}
        sel = ope_report.policy_selection(results)
        assert sel["FQE"]["low_coverage"] == flagged
        assert ("its coverage warning fired" in ope_report.format_summary({"selection": sel})) == flagged


def test_hcope_bound_by_hand():
    x = np.array([0.2, 0.4, 0.6, 1.0])
    # c = 0.5: Y = (.2, .4, .5, .5), mean .4; n sum Y^2 - (sum Y)^2 = 4 * .7 - 1.6^2 = .24; ln(2 / .05) = ln 40
    expected = 0.4 - 7 * 0.5 * math.log(40) / (3 * 3) - math.sqrt(2 * math.log(40) / 3 * 0.24) / 4
    assert ope_report.hcope_bound(x, 0.5, 0.05) == pytest.approx(expected)
    # the held-out prediction of the bound on m = 100 samples: m in the range term, 1 / (m n (n - 1)) under the root
    predicted = 0.4 - 7 * 0.5 * math.log(40) / (3 * 99) - math.sqrt(2 * math.log(40) / (100 * 4 * 3) * 0.24)
    assert ope_report.hcope_bound(x, 0.5, 0.05, n_range=100) == pytest.approx(predicted)


def test_hcope_lower_bound_holds_and_tightens_with_data():
    rng = np.random.default_rng(0)
    # heavy-tailed importance-weighted returns with mean 1: X = w * g, w ~ lognormal(-0.5, 1), g in [0, 1], E g = .5
    def sample(n):
        return rng.lognormal(-0.5, 1.0, n) * rng.uniform(0, 1, n) * 2.0

    bounds = [ope_report.hcope_lower_bound(sample(300), 0.05, rng) for _ in range(100)]
    assert np.mean(np.array(bounds) <= 1.0) >= 0.95  # a 95% lower bound on the true mean 1
    assert ope_report.hcope_lower_bound(sample(20000), 0.05, rng) > 0.6  # and an informative one with enough data


def test_the_pipeline_reports_the_lower_bound_against_the_data(chain):  # noqa: F811
    _, ds = chain
    res = run_pipeline(ds, table_policy(PI_B))
    h = res["diagnostics"]["hcope"]
    ends = ds.episode_ends()
    data = np.mean([(ds.rewards[s: e + 1] * 0.9 ** np.arange(e + 1 - s)).sum()
                    for s, e in zip(np.r_[0, ends[:-1] + 1], ends)])
    assert h["data_discounted"] == pytest.approx(data, rel=1e-6)
    assert h["lower_bound_discounted"] < data  # pi_e = pi_b cannot be shown better than itself
    table = ope_report.format_table("b.pt", {**res, "behavior": "logged", "density": "categorical",
                                             "weight_threshold": 100})
    assert "not shown better than the data with 95% confidence" in table


class _KnownBehaviour:
    """A stand-in for the fitted behaviour model: pi_b(1|s) = 0.01 and pi_b(0|s) = 0.99 in every state."""

    def log_prob(self, obs, actions):
        return torch.log(torch.where(actions == 1, 0.01, 0.99))


@pytest.mark.parametrize("p_rare,expected", [(0.7, 0.7), (0.01, 0.01), (0.0, 0.0)])
def test_low_coverage_share_is_the_policy_mass_on_actions_the_data_rarely_takes(p_rare, expected):
    actions = torch.tensor([0] * 96 + [1] * 4)
    obs = torch.zeros(100, 4)
    obs[:, 0] = 1.0  # every row in state 0 (one-hot)
    data = dict(obs=obs, actions=actions)
    pi = np.array([[1 - p_rare, p_rare]] * 4)
    target = ope.Target(table_policy(pi), 2, None, None, None)
    # the 5th percentile of log pi_b on the data's actions is log 0.99 (only 4% are the rare action): action 1 is
    # "low density", so the share is pi_e's probability of action 1
    share = ope.low_coverage_share(_KnownBehaviour(), target, data, "sample", 1)
    assert share == pytest.approx(expected)


@pytest.mark.parametrize("share,warned", [(0.30, True), (0.06, True), (0.05, False), (0.01, False)])
def test_the_coverage_warning_fires_above_the_datas_own_share(chain, monkeypatch, share, warned):  # noqa: F811
    # the data's own actions put 5% of their mass below the 5th percentile by construction; the warning fires above
    # that (docs/ope.md: 8 of the validation's 34 policies had 6.1-11.9%, all alpha = 0; the other 26 0-4.4%)
    _, ds = chain
    monkeypatch.setattr(ope, "low_coverage_share", lambda *a, **k: share)
    res = run_pipeline(ds, table_policy(PI_B), coverage_model=_KnownBehaviour(), bootstrap=0)
    assert res["diagnostics"]["low_coverage_share"] == share
    hits = [w for w in res["warnings"] if "FQE and MB extrapolate" in w]
    assert len(hits) == warned
    if warned:
        assert hits[0].startswith(f"{100 * share:.0f}% of pi_e's action mass")


def test_tail_mc_error_is_the_spread_of_the_endpoints_over_batches():
    # ten batches, batch k = 0..100 shifted by k: endpoints 2.5 + k and 97.5 + k; std of 0..9 (ddof 1) / sqrt(10)
    samples = np.concatenate([np.arange(101.0) + k for k in range(10)])
    assert ope.tail_mc_error(samples) == pytest.approx(np.std(np.arange(10.0), ddof=1) / math.sqrt(10))
    assert ope.tail_mc_error(np.ones(1000)) == 0.0


def test_non_finite_bootstrap_resamples_are_counted_in_a_note(chain):  # noqa: F811
    _, ds = chain
    res = run_pipeline(ds, table_policy(PI_B), bootstrap=40)
    assert all(e["ci_mc_error"] is not None and e["ci_mc_error"] >= 0 for n, e in res["estimates"].items()
               if n in ("IS", "WIS"))
    assert not any("bootstrap resamples were not finite" in n for n in res["notes"])


@pytest.mark.parametrize("flag,value", [("discount", 1.5), ("threads", 0), ("fqe_tau", 0.0), ("bc_folds", 0)])
def test_out_of_range_flags_are_refused_before_any_work(flag, value):
    args = ope.Args(policy=["does-not-exist.pt"], **{flag: value})  # the range check comes before reading files
    with pytest.raises(ope.UserError, match=f"--{flag.replace('_', '-')} .* is out of range"):
        ope.main(args)


def test_ground_truth_rollouts_leave_the_random_streams_alone(chain):  # noqa: F811
    # the chain's 4-dim observations and 2 actions fit CartPole: a sampled policy, run for real
    _, ds = chain
    ds = dataclasses.replace(ds, env_id="CartPole-v1")
    target = ope.Target(table_policy(PI_B), 2, None, None, None)
    args = ope.Args(policy=["unused"], rollouts=3, rollout_action="sample", bootstrap=50, discount=0.9)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    truth = ope_report.ground_truth(ds, target, args, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)  # so no later estimate depends on --rollouts
    assert truth["values"] == "dist" and truth["episodes"] == 3
    ev = common.evaluate(ds, target.sample, 3, args.seed + 100, torch.device("cpu"), discount=args.discount)
    assert truth["discounted"] == pytest.approx(ev.discounted_returns.mean())
    assert truth["undiscounted"] == pytest.approx(ev.returns.mean())
    assert truth["ci_discounted"][0] <= truth["discounted"] <= truth["ci_discounted"][1]
    with pytest.raises(ope.OPEError, match="no env_id"):
        ope_report.ground_truth(dataclasses.replace(ds, env_id=None), target, args, torch.device("cpu"))


def test_the_lower_bound_uses_the_unclipped_ratios(chain):  # noqa: F811
    # Thomas et al.'s bound rests on E[w] = 1, which clipping breaks: --clip-log-ratio moves the IS rows, not the bound
    _, ds = chain
    plain = run_pipeline(ds, table_policy(FAR))
    clipped = run_pipeline(ds, table_policy(FAR), clip_log_ratio=(-0.5, 0.5))
    assert clipped["diagnostics"]["clipped_share"] > 0.5
    assert clipped["estimates"]["IS"]["discounted"] != pytest.approx(plain["estimates"]["IS"]["discounted"])
    assert clipped["diagnostics"]["hcope"] == plain["diagnostics"]["hcope"]


@pytest.mark.parametrize("behavior", ["auto", "logged", "fitted"])
def test_the_lower_bound_is_labelled_approximate_when_pi_b_is_fitted(chain, behavior):  # noqa: F811
    # the guarantee assumes the true pi_b (the dataset's logged log-probs); with a fitted one the table, the JSON
    # and docs/ope.md call it approximate
    _, ds = chain
    res = run_pipeline(ds, table_policy(PI_B), behavior=behavior)
    approximate = res["diagnostics"]["hcope"]["approximate"]
    assert bool(approximate) == (behavior == "fitted")
    table = ope_report.format_table("b.pt", {**res, "behavior": "x", "density": "categorical", "weight_threshold": 100})
    assert ("lower bound on the discounted value (APPROXIMATE: pi_b is fitted" in table) == (behavior == "fitted")


def _permuted(results: dict, order: list[int]) -> dict:
    keys = list(results)
    return {keys[i]: results[keys[i]] for i in order}


def test_dope_metrics_do_not_depend_on_the_order_of_the_policies():
    # issue: the policies were ranked by a stable argsort of the capped estimates, so tied estimates picked the
    # first-listed policy: FQE [22, 25, 2.5] against truth [0, 10, 3] is capped to [2, 2, .25] after normalisation,
    # and regret@1 was 1.0 listed this way, 0.0 with the first two swapped
    res = _results({"FQE": [22.0, 25.0, 2.5], "MB": [4.0, 4.0, 1.0]})
    for r, t in zip(res.values(), [0.0, 10.0, 3.0]):
        r["truth"]["discounted"] = t
    base = ope_report.dope_metrics(res)
    # ranked on the uncapped estimates, FQE deploys policy 1 (estimate 25, the true best)
    assert base["FQE"]["regret_at_1"] == 0.0 and base["FQE"]["spearman"] == pytest.approx(0.5)
    assert base["FQE"]["abs_error"] == pytest.approx((2.0 + 1.0 + 0.05) / 3)  # the cap stays in the error
    # a true tie (MB: 4, 4, 1): the estimator cannot tell policies 0 and 1 apart and is charged the worse of them
    assert base["MB"]["regret_at_1"] == pytest.approx(1.0)
    assert ope_report.regret_at_1([4.0, 4.0, 1.0], [0.0, 10.0, 3.0]) == pytest.approx(10.0)
    for order in ([1, 0, 2], [2, 1, 0], [1, 2, 0]):
        assert ope_report.dope_metrics(_permuted(res, order)) == base, order


def test_the_regret_bootstrap_normalises_by_the_resamples_best_as_dope():
    # DOPE's normalized_regret divides by the largest of the (task-normalised) true values in the resample, not by
    # the resample's own max - min: with truth (0, .5, 1), a resample of policies 1 and 2 where the estimator picks
    # policy 1 loses (1 - .5) / 1 = .5 (max - min would give 1)
    v_true, v_est = np.array([0.5, 1.0]), np.array([2.0, 1.0])
    assert ope_report.set_metrics(v_est, v_true)[2] == pytest.approx(0.5)
    assert ope_report.normalized_regret_at_k(v_est, v_true, 1) == pytest.approx(1.0)  # a set on its own: max - min
    assert np.isnan(ope_report.set_metrics(v_est, np.zeros(2))[2])  # only the worst policy drawn: undefined (DOPE 0/0)


@pytest.mark.slow
def test_the_order_of_the_policy_flags_changes_no_number(tmp_path):
    # every policy's estimates start from the same random streams: the policies before it (and so the order of the
    # --policy flags) change none of its numbers; two copies of one checkpoint get the same numbers
    run_script("iql.py", "--dataset", "cartpole-medium", "--total-steps", "100", "--eval-episodes", "0",
               "--batch-size", "32", "--log-every", "100", "--save-model", "--device", "cpu", cwd=tmp_path)
    ckpt = next((tmp_path / "runs").glob("*/iql.pt"))
    out = {}
    for order in ("ab", "ba"):
        (tmp_path / order).mkdir()
        for name in order:
            shutil.copy(ckpt, tmp_path / order / f"{name}.pt")
        args = ope.Args(policy=[str(tmp_path / order / f"{name}.pt") for name in order], dataset="cartpole-medium",
                        fqe_steps=200, mb_steps=100, mb_ensemble=2, hidden_dim=32, bc_steps=100, bootstrap=20,
                        device="cpu")
        out[order] = {name: json.dumps(ope.main(args)[str(tmp_path / order / f"{name}.pt")]["estimates"],
                                       sort_keys=True) for name in order}
    assert out["ab"] == out["ba"]
    assert out["ab"]["a"] == out["ab"]["b"]


def test_a_lower_bound_below_every_observed_return_is_called_vacuous(chain):  # noqa: F811
    _, ds = chain
    for pi, vacuous in ((FAR, True), (PI_B, False)):
        res = run_pipeline(ds, table_policy(pi))
        h = res["diagnostics"]["hcope"]
        assert h["vacuous"] == vacuous == (h["lower_bound_discounted"] < h["smallest_observed_discounted"])
        table = ope_report.format_table("p.pt", {**res, "behavior": "x", "density": "categorical",
                                                 "weight_threshold": 100})
        assert ("VACUOUS (below the smallest observed return" in table) == vacuous


def _policy_result(fqe_settled=True, mb_agrees=True, ess=1.6, share=0.03):
    est = {n: dict(discounted=1.0, ci_discounted=[0.5, 1.5], values="dist", skipped=None, ess=ess,
                   unreliable=None if ess >= 80.1 else f"ESS {ess} < 10% of 801 episodes") for n in ope.WEIGHTED}
    est["FQE"] = dict(discounted=52.25, ci_discounted=[50.0, 54.5], values="act", skipped=None, unreliable=None)
    est["MB"] = dict(discounted=-9.0, ci_discounted=[-12.0, -6.0], values="act", skipped=None, unreliable=None)
    warnings = ([] if fqe_settled else ["FQE has not settled: its estimate moved"]) + (
        [] if mb_agrees else ["the model ensemble disagrees: member estimates [1, 2]"])
    return dict(estimates=est, warnings=warnings, behavior="logged exact log pi_b(a|s) from the dataset",
                diagnostics=dict(ess=ess, n_episodes=801, low_coverage_share=share))


def test_the_closing_line_says_which_estimate_to_trust_and_why():
    # the README's example: IS ... WDR withheld (ESS 1.6 of 801), MB's models disagree, FQE settled: trust FQE
    line = ope_report.closing_line(_policy_result(mb_agrees=False))
    assert line == ("verdict: trust FQE: 52.25 discounted (95% CI 50.00 to 54.50, start states only), the value of "
                    "'act'; it settled and pi_e stays where the data are (coverage 3.0%); not the others: IS ... WDR "
                    "rest on an ESS of 1.6 of 801 episodes; MB has models that disagree")
    # enough effective episodes: the weighted rows come first, WDR
    assert ope_report.closing_line(_policy_result(ess=300.0)).startswith(
        "verdict: trust WDR: 1.00 discounted (95% CI 0.50 to 1.50), the value of 'dist'; its weights spread over 300 "
        "effective episodes of 801, with the exact pi_b")
    # FQE unsettled: MB if its models agree; if not, none, and what to do
    assert ope_report.closing_line(_policy_result(fqe_settled=False)).startswith("verdict: trust MB: -9.00")
    assert ope_report.closing_line(_policy_result(fqe_settled=False, mb_agrees=False)) == (
        "verdict: trust none of the estimates: IS ... WDR rest on an ESS of 1.6 of 801 episodes; FQE has not settled; "
        "MB has models that disagree; raise --fqe-steps until FQE settles")
    # the policy leaves the data: FQE and MB extrapolate, nothing from the data can be trusted
    line = ope_report.closing_line(_policy_result(share=0.12))
    assert line.startswith("verdict: trust none") and "FQE extrapolates (12% of pi_e's actions where the data" in line
    assert line.endswith("only running it (--rollouts N) can tell its value")
    refit = _policy_result(mb_agrees=False)
    refit["diagnostics"]["fqe_interval"] = "refit"  # --refit-bootstrap: the interval includes the fitting's variance
    assert ope_report.closing_line(refit).startswith(
        "verdict: trust FQE: 52.25 discounted (95% CI 50.00 to 54.50), the")
    # a trace can barely move because FQE has made few backups: fewer than the effective horizon is not settled
    few = _policy_result(mb_agrees=False)
    few["args"] = dict(fqe_steps=200, fqe_tau=0.02, discount=0.99)
    assert ope_report.closing_line(few) == (
        "verdict: trust none of the estimates: IS ... WDR rest on an ESS of 1.6 of 801 episodes; FQE made about 4 "
        "Bellman backups (--fqe-steps x --fqe-tau) for an effective horizon of 100; MB has models that disagree; "
        "raise --fqe-steps until FQE settles")
    few["args"]["fqe_steps"] = 20_000
    assert ope_report.closing_line(few).startswith("verdict: trust FQE")
    # --no-coverage: no share to read
    line = ope_report.closing_line(_policy_result(share=None))
    assert "; it settled and no coverage check ran; not the others" in line
