"""ope.py's files and report, which a reader of its estimators did not come for: each checkpoint read, rebuilt and
checked against the dataset; what each policy's results record beside the estimates (the run, the notes and warnings
its diagnostics call for, a 95% lower bound); its console table and verdict (which estimate to trust) and its JSON
(--out); the ground-truth rollouts (--rollouts) and each row's error; with several policies, which one each estimator
would deploy (policy selection), the DOPE metrics (Fu et al. 2021) against the rollouts, their console summary and the
--plot figure. ope.py calls it; benchmark/ope_validation.py uses the metrics."""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common import Policy, evaluate
from datasets import Dataset, UserError, dataset_dims, load_checkpoint
from ope import (COVERAGE_WARN, ESTIMATORS, MIN_ESS_SHARE, Args, Episodes, OPEError, Target, bootstrap_counts,
                 log_weights, mean_terms, percentile_ci, progress_bar, resample)


# ---- ope.py's files: each checkpoint read, rebuilt and checked against the dataset; each policy's JSON ---------------
def read_checkpoint(path: str, device: str | torch.device = "cpu") -> dict:
    """datasets.load_checkpoint (a missing, corrupt or foreign file is an error, in one line) as an OPEError."""
    try:
        return load_checkpoint(path, device)
    except UserError as e:
        raise OPEError(str(e)) from None


def load_target_policy(path: str, ds: Dataset, device: torch.device) -> Policy:
    """Rebuild a checkpoint with the `load_policy` of the script that saved it, and check it fits the dataset."""
    algo = read_checkpoint(path, device)["algo"]  # load_checkpoint checked it is there
    try:
        module = importlib.import_module(algo)
    except ImportError as e:
        raise OPEError(f"{path}: saved by '{algo}', but there is no {algo}.py to rebuild it ({e})") from e
    policy = module.load_policy(path, device)
    if not isinstance(policy, Policy):
        raise OPEError(f"{algo}.load_policy returned {type(policy).__name__}, not common.Policy")
    obs_dim, act_dim, n_actions = dataset_dims(ds)
    ck = policy.checkpoint if isinstance(policy.checkpoint, dict) else {}
    trained = f"trained on {ck.get('args', {}).get('dataset', '?')}"
    if policy.discrete != ds.discrete or ck.get("n_actions", n_actions) != n_actions:
        raise OPEError(f"{path}: the checkpoint's action space ({'Discrete' if policy.discrete else 'Box'}, "
                       f"n_actions {ck.get('n_actions')}; {trained}) does not match {ds.name} "
                       f"({'Discrete' if ds.discrete else 'Box'}, n_actions {n_actions})")
    if ck.get("obs_dim", obs_dim) != obs_dim or (not ds.discrete and ck.get("act_dim", act_dim) != act_dim):
        raise OPEError(f"{path}: the checkpoint expects obs_dim {ck.get('obs_dim')}, act_dim {ck.get('act_dim')} "
                       f"({trained}); {ds.name} has obs_dim {obs_dim}, act_dim {act_dim}")
    with torch.no_grad():
        a = policy.act(torch.as_tensor(ds.observations[:2], device=device))
    if tuple(a.shape) != ((2,) if ds.discrete else (2, act_dim)):
        raise OPEError(f"{path}: the policy's actions have shape {tuple(a.shape[1:])}, {ds.name} needs "
                       f"{() if ds.discrete else (act_dim,)}")
    return policy


def output_paths(args: Args, dataset: str) -> dict[str, Path]:
    """Each policy's JSON path from --out. A file already there is replaced only if it holds a run with the same
    settings (those that change a number: all but --threads, --plot, --out and the order of the policies)."""
    try:
        paths = {p: Path(args.out.format(policy=p, dataset=re.sub(r"[^\w.-]+", "_", dataset))) for p in args.policy}
    except (KeyError, IndexError, ValueError) as e:
        raise OPEError(f"--out {args.out}: only {{policy}} and {{dataset}} can be filled in ({e!r})") from None
    if len(set(paths.values())) < len(paths):
        raise OPEError(f"--out {args.out} gives several policies the same file: put {{policy}} in it")
    new = json.loads(json.dumps(asdict(args)))
    for path in (p for p in paths.values() if p.exists()):
        try:
            old = json.loads(path.read_text())["args"]
            changed = [f"--{k.replace('_', '-')} {old[k]} there, {v} here" for k, v in new.items()
                       if k in old and k not in ("threads", "plot", "out")
                       and (sorted(v) != sorted(old[k]) if k == "policy" else v != old[k])]
        except (OSError, ValueError, KeyError, TypeError):
            changed = ["not a result of ope.py"]
        if changed:
            raise OPEError(f"{path} exists ({'; '.join(changed)[:200]}): it is not overwritten; write elsewhere with "
                           "--out (e.g. --out '{policy}.run2.ope.json') or remove it")
        print(f"{path} holds a run with the same settings: it will be replaced", flush=True)
    return paths


def write_json(path: Path, res: dict) -> None:
    """The policy's --out file: everything, nan and inf as null."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return (float(x) if math.isfinite(x) else None) if isinstance(x, float | np.floating) else x

    path.write_text(json.dumps(clean(res), indent=2))


# ---- One policy: the run, the notes and warnings its rows and diagnostics call for, a 95% lower bound ----------------
def add_run(res: dict, path: str, target: Target, ds: Dataset, args: Args, behavior: str) -> None:
    """What a policy's results record beside the estimates: the run, and a note if it was trained on other data."""
    res.update(policy=path, dataset=ds.name, density=target.density, behavior=behavior, discount=args.discount,
               weight_threshold=args.weight_threshold, args=asdict(args))
    ck = target.policy.checkpoint
    trained_on = ck.get("args", {}).get("dataset") if isinstance(ck, dict) else None
    if trained_on not in (None, ds.name, args.dataset):
        res["notes"].append(f"the policy was trained on {trained_on}, evaluated here on {ds.name}")


def add_notes(res: dict, args: Args, ds: Dataset, ep: Episodes, target: Target) -> None:
    """The notes one policy's rows call for (a bootstrap impossible; FQE's interval and the time limit; the weighted
    rows: no density, clipped ratios, a truncated Gaussian, DR's control variate), then the warnings."""
    d, notes, gamma = res["diagnostics"], res["notes"], args.discount
    if ep.n < 2 and args.bootstrap > 0:
        notes.append(f"only {ep.n} episode: a bootstrap over episodes needs at least 2, so no confidence intervals")
    if d.get("fqe_interval") == "refit":
        notes.append(f"FQE's interval: {args.refit_bootstrap} refits, each on a bootstrap resample of whole episodes "
                     "(refit, the fitting's variance included)")
    cut = ep.n - int(ds.terminals[ep.rows[np.arange(ep.n), ep.lengths - 1]].sum())  # episodes ended by time limit
    horizon = int(ep.lengths.max())
    if args.fqe_steps > 0 and cut and gamma**horizon > 0.05 and not args.fqe_time_limit_terminal:
        notes.append(f"FQE values the infinite-horizon discounted return (it bootstraps through the time limit): "
                     f"{cut} episodes are cut at <= {horizon} steps, gamma^H = {gamma**horizon:.2f}, so FQE adds "
                     "about gamma^H V(s_H), which the finite-horizon IS, MB and rollouts lack: higher where later "
                     "rewards are positive, lower where they are negative (Pendulum). --fqe-time-limit-terminal stops "
                     "it at the cut")
    if target.density is None:
        notes.append(target.skip_reason)
    if "clipped_share" in d:
        lo, hi = args.clip_log_ratio
        notes.append(f"per-step log-ratios clipped to [{lo}, {hi}] ({100 * d['clipped_share']:.1f}% of steps "
                     "clipped): the IS-family estimates are biased by the clipping")
    if d.get("pi_e_mass_inside_box", 1.0) < 0.9:
        notes.append(f"pi_e's Gaussian keeps {100 * d['pi_e_mass_inside_box']:.0f}% of its mass inside the action box "
                     "on dataset states: the 'dist' rows value it truncated to the box (renormalised)")
    if args.fqe_steps > 0 and target.density is not None:
        notes.append("undiscounted DR/WDR use the discounted FQE Q as control variate: still unbiased (any Q̂ is), "
                     "less variance reduction")
    add_warnings(res, args)


def add_warnings(res: dict, args: Args) -> None:
    """The warnings one policy's diagnostics call for: FQE unsettled, the coverage check, the model ensemble's
    disagreement; for the weighted rows a low ESS, actions pi_e never takes and weights that overflow."""
    d, warn, gamma, trace = res["diagnostics"], res["warnings"], args.discount, res["diagnostics"].get("fqe_trace", [])
    if len(trace) >= 2 and abs(trace[-1] - trace[-2]) > 0.05 * max(abs(trace[-1]), 1e-6):
        warn.append(f"FQE has not settled: its estimate moved {trace[-2]:.2f} -> {trace[-1]:.2f} over the last 20% "
                    f"of training; its target network makes about steps x tau = {args.fqe_steps * args.fqe_tau:.3g}"
                    f" Bellman backups, the effective horizon 1/(1-gamma) is {1 / max(1 - gamma, 1e-9):.0f}: raise "
                    "--fqe-steps (DOPE used 1M)")
    share, member = d.get("low_coverage_share"), np.array(d.get("mb_member_estimates", []), dtype=np.float64)
    if share is not None and share > COVERAGE_WARN:
        warn.append(f"{100 * share:.0f}% of pi_e's action mass on dataset states lies where the fitted behaviour "
                    "density is below its 5th percentile on the data's actions (5% for the data's own "
                    "actions): FQE and MB extrapolate there; do not trust their values")
    if len(member) > 1 and member.std() > 0.2 * max(abs(member.mean()), 1e-6):
        warn.append(f"the model ensemble disagrees: member estimates {np.round(member, 2).tolist()}")
    if "ess" not in d:  # no weighted rows (the policy has no density)
        return
    if d["ess_share"] < MIN_ESS_SHARE:
        warn.append(f"effective sample size {d['ess']:.1f} is {100 * d['ess_share']:.1f}% of the {d['n_episodes']} "
                    f"episodes (< {100 * MIN_ESS_SHARE:.0f}%; per-decision ESS {d['per_decision_ess']:.1f}): a "
                    "few episodes carry the weight; do not trust IS ... WDR here (rows below it show no interval)")
    if d["zero_prob_share"] > 0:
        warn.append(f"{100 * d['zero_prob_share']:.2f}% of dataset actions have probability 0 under pi_e: "
                    "their episodes get weight 0 (the weighted estimates rest on the others), KL is infinite")
    if d["max_log10_weight"] > 300:
        warn.append(f"the largest episode weight is 10^{d['max_log10_weight']:.0f}: IS and PDIS overflow "
                    "float64 (inf/nan); the self-normalised estimators still work")


# A high-confidence lower bound for IS (Thomas, Theocharous, Ghavamzadeh 2015): for X_i >= 0 and a clip c,
# with probability >= 1 - delta, E[X] >= mean(min(X, c)) - 7 c ln(2/delta) / (3(n-1))
#                                         - (1/n) sqrt(2 ln(2/delta) / (n-1) * (n sum Y^2 - (sum Y)^2)).
def hcope_bound(x: np.ndarray, c: float, delta: float, n_range: int | None = None) -> float:
    """The bound on x (Y = min(x, c)); `n_range`: predicted for n_range samples (the paper's choice of c)."""
    x = np.asarray(x, dtype=np.float64)
    n, m = len(x), n_range or len(x)
    y = np.minimum(x, c)
    log_term = math.log(2.0 / delta)
    spread = max(n * (y**2).sum() - y.sum() ** 2, 0.0)
    if n_range is None:
        return float(y.mean() - 7 * c * log_term / (3 * (n - 1)) - math.sqrt(2 * log_term / (n - 1) * spread) / n)
    return float(y.mean() - 7 * c * log_term / (3 * (m - 1)) - math.sqrt(2 * log_term / (m * n * (n - 1)) * spread))


def hcope_lower_bound(x: np.ndarray, delta: float, rng: np.random.Generator, pre_share: float = 0.05) -> float:
    """A 1 - delta lower bound on E[X] (X >= 0): c chosen on a random `pre_share` of x, the bound on the others."""
    x = np.asarray(x, dtype=np.float64)
    order = rng.permutation(len(x))
    n_pre = max(int(round(pre_share * len(x))), 2)
    pre, post = x[order[:n_pre]], x[order[n_pre:]]
    if len(post) < 2:
        return float("nan")
    candidates = np.unique(np.concatenate([pre, [pre.mean()]]))
    candidates = candidates[candidates > 0] if (candidates > 0).any() else np.array([1.0])
    c = max(candidates, key=lambda cc: hcope_bound(pre, cc, delta, n_range=len(post)))
    return hcope_bound(post, float(c), delta)


def lower_bound(rewards: np.ndarray, log_ratios: np.ndarray, mask: np.ndarray, gamma: float, stats: dict, seed: int,
                exact: bool) -> dict:
    """diagnostics.hcope: a 95% lower bound on the discounted value from IS (Thomas et al. 2015), the returns mapped to
    [0, 1] by the data's reward range over the longest episode, so that X_i = w_i (G_i - g_lo) / (g_hi - g_lo) >= 0.
    It rests on E[w] = 1 (`log_ratios` unclipped) and on a known pi_b (`exact`): with a fitted one it is approximate."""
    disc = gamma ** np.arange(rewards.shape[1])
    g_lo, g_hi = min(stats["r_min"], 0.0) * disc.sum(), max(stats["r_max"], 0.0) * disc.sum()
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.exp(log_weights(log_ratios, mask)[:, -1]) * ((rewards @ disc) - g_lo) / max(g_hi - g_lo, 1e-12)
    lb = hcope_lower_bound(x, 0.05, np.random.default_rng(seed)) if np.isfinite(x).all() else float("nan")
    bound, returns = g_lo + (g_hi - g_lo) * lb, rewards @ disc
    return dict(delta=0.05, lower_bound_discounted=bound, data_discounted=float(returns.mean()),
                smallest_observed_discounted=float(returns.min()), vacuous=not bound >= returns.min(),
                approximate=None if exact else "pi_b is fitted: the guarantee assumes the true pi_b")


# ---- One policy on the console: its table, and the verdict (which estimate to trust) ---------------------------------
def cell(x, width: int = 9, prec: int = 2) -> str:
    """x right-aligned in `width`: a number, an interval [low, high], text, or n/a (None, nan)."""
    if isinstance(x, list | tuple):
        x = f"[{x[0]:.{prec}f}, {x[1]:.{prec}f}]"
    elif x is None or (isinstance(x, float) and math.isnan(x)):
        x = "n/a"
    return f"{x:>{width}}" if isinstance(x, str) else f"{x:>{width}.{prec}f}"


def format_table(path: str, res: dict) -> str:
    """One policy's table; the JSON has all of it and more (the CIs' Monte-Carlo error, FQE's trace, MB's members)."""
    d, truth = res["diagnostics"], res.get("truth")
    behavior = "ESTIMATED (fitted, see above)" if res["behavior"].startswith("ESTIMATED") else res["behavior"]
    lines = [f"== {path}", f"   pi_e: {res['density'] or 'no density'}; behaviour: {behavior}"]
    if "ess" in d:
        lines.append(f"   KL(pi_b||pi_e) {d['kl_behavior_target']:.3f} nats/step, top episode holds "
                     f"{100 * d['top_episode_weight_share']:.0f}% of the weight, ESS {d['ess']:.1f}/{d['n_episodes']}, "
                     f"per-decision ESS {d['per_decision_ess']:.1f}")
    lines.append(f"   {'estimator':<9} {'policy':<6} {'discounted':>10} {'95% CI':>20} {'undisc.':>9} "
                 f"{'normalized':>10} {'95% CI':>18} {'ESS':>7}" + (" |  err disc |err norm|" if truth else ""))
    for name, e in {**res["estimates"], **({"truth": truth} if truth else {})}.items():
        if e.get("skipped"):
            lines.append(f"   {name:<9} skipped: {e['skipped'][:90]}")
            continue
        no_ci = "no CI: ESS low !" if e.get("unreliable") else None
        row = (f"   {name:<9} {e['values']:<6} {cell(e['discounted'], 10)} {cell(no_ci or e['ci_discounted'], 20)} "
               f"{cell(e['undiscounted'], 9, 1)} {cell(e['normalized'], 10, 1)} "
               f"{cell(no_ci or e['ci_normalized'], 18, 1)}")
        if name == "truth":
            row += f"   ({truth['episodes']} rollout episode{'s' if truth['episodes'] > 1 else ''})"
        else:
            row += " " + cell(e["ess"], 7, 1)
            if truth:  # * marks a row that values another policy than the rollouts ran
                flag = "*" if e["values"] != truth["values"] else " "
                row += f" | {cell(e['error_discounted'])}{flag} {cell(e['abs_error_normalized'], 9, 1)}"
        lines.append(row)
    if any(e["unreliable"] for e in res["estimates"].values()):
        lines.append(f"   ! ESS below {100 * MIN_ESS_SHARE:.0f}% of the episodes: no interval (it would be "
                     "meaningless), and the row is left out of the rank metrics")
    if d.get("low_coverage_share") is not None:
        lines.append(f"   coverage: {100 * d['low_coverage_share']:.1f}% of pi_e's action mass where the data are thin "
                     f"(the data's own actions: 5%; a warning above {100 * COVERAGE_WARN:.0f}%)")
    if "hcope" in d:
        h = d["hcope"]
        verdict = "better than" if h["lower_bound_discounted"] > h["data_discounted"] else "not shown better than"
        approx = " (APPROXIMATE: pi_b is fitted, the guarantee assumes it known)" if h.get("approximate") else ""
        useless = (f" VACUOUS (below the smallest observed return, {h['smallest_observed_discounted']:.2f}: the "
                   "weights are too uneven to bound anything);" if h.get("vacuous") else ";")
        lines.append(f"   95% lower bound on the discounted value{approx}: {cell(h['lower_bound_discounted'], 0)}"
                     f"{useless} the data's {h['data_discounted']:.2f}: pi_e is {verdict} the data with 95% confidence")
    return "\n".join(lines + [f"   note: {n}" for n in res["notes"]] + [f"   WARNING: {w}" for w in res["warnings"]])


def closing_line(res: dict) -> str:
    """Which of one policy's estimates to trust and why, or that none can be and what to do; from the data alone
    (the rollouts, when run, only check it): the IS family with a usable ESS, else FQE, else MB, each only without a
    warning against it."""
    est, d, warned = res["estimates"], res["diagnostics"], " ".join(res["warnings"])
    share = d.get("low_coverage_share")
    thin = share is not None and share > COVERAGE_WARN
    doubts = {"IS ... WDR": [f"rest on an ESS of {d['ess']:.1f} of {d['n_episodes']} episodes" if "ess" in d else
                             "need a density of pi_e (--smoothing-width)"],
              "FQE": ["has not settled"] * ("FQE has not settled" in warned),
              "MB": ["has models that disagree"] * ("ensemble disagrees" in warned)}
    a = res.get("args", {})
    backups, horizon = a.get("fqe_steps", 0) * a.get("fqe_tau", 1.0), 1 / max(1 - a.get("discount", 0.0), 1e-9)
    if a and backups < horizon:  # a trace that barely moves over a few backups is not settled
        doubts["FQE"].append(f"made about {backups:.0f} Bellman backups (--fqe-steps x --fqe-tau) for an effective "
                             f"horizon of {horizon:.0f}")
    for name in ("FQE", "MB"):
        if thin:
            doubts[name].append(f"extrapolates ({100 * share:.0f}% of pi_e's actions where the data are thin)")
        doubts[name] = ["was not run"] if est[name]["skipped"] else doubts[name]
    pick = next((n for n in ("WDR", "WPDIS") if not est[n]["skipped"] and not est[n]["unreliable"]), None)
    if pick is not None:
        why = f"its weights spread over {est[pick]['ess']:.0f} effective episodes of {d['n_episodes']}" + (
            " (pi_b fitted: approximate)" if res["behavior"].startswith("ESTIMATED") else ", with the exact pi_b")
        doubts.pop("IS ... WDR")
    else:
        pick = next((n for n in ("FQE", "MB") if not doubts[n]), None)
        where = "no coverage check ran" if share is None else "pi_e stays where the data are"
        why = (f"it settled and {where}" + (f" (coverage {100 * share:.1f}%)" if share is not None else "")
               if pick == "FQE" else f"its models agree and {where}")
        doubts.pop(pick, None)
    doubt = "; ".join(f"{n} {' and '.join(w)}" for n, w in doubts.items() if w)
    if pick is None:
        todo = "raise --fqe-steps until FQE settles" if doubts["FQE"] and not thin else (
            "the data do not cover this policy: only running it (--rollouts N) can tell its value")
        return f"verdict: trust none of the estimates: {doubt}; {todo}"
    e, refit = est[pick], pick == "FQE" and d.get("fqe_interval") == "refit"
    ci = (f" (95% CI {e['ci_discounted'][0]:.2f} to {e['ci_discounted'][1]:.2f}"
          + (", start states only)" if pick in ("FQE", "MB") and not refit else ")") if e["ci_discounted"] else "")
    return (f"verdict: trust {pick}: {e['discounted']:.2f} discounted{ci}, the value of '{e['values']}'; {why}"
            + (f"; not the others: {doubt}" if doubt else ""))


# ---- Validation (--rollouts): the policy run in the environment, each estimate's error -------------------------------
def ground_truth(ds: Dataset, target: Target, args: Args, device: torch.device, label: str = "") -> dict:
    """--rollouts: the policy --rollout-action names, run in the dataset's environment (episode i seeded
    seed + 100 + i, the same for every policy), with its 95% CI. common.evaluate runs it on a forked torch stream and
    the CI has its own numpy stream, so no estimate of this or a later policy depends on --rollouts."""
    if ds.env_id is None:
        raise OPEError(f"{ds.name}: no env_id in the dataset metadata, so --rollouts cannot run the policy")
    with progress_bar(args.rollouts, f"ground-truth rollouts {label}".rstrip(), unit="episode") as bar:
        ev = evaluate(ds, target.act if args.rollout_action == "act" else target.sample, args.rollouts,
                      args.seed + 100, device, discount=args.discount, on_episode=bar.update)
    boot = bootstrap_counts(args.rollouts, args.bootstrap, np.random.default_rng([args.seed, 2]))
    ci_d, ci_u = (percentile_ci(resample(mean_terms(x), boot)) if boot is not None else None
                  for x in (ev.discounted_returns, ev.returns))
    return dict(values="act" if args.rollout_action == "act" or target.density is None else "dist",
                episodes=args.rollouts, discounted=float(ev.discounted_returns.mean()),
                undiscounted=float(ev.returns.mean()), normalized=float(ds.normalized_score(ev.returns.mean())),
                ci_discounted=ci_d, ci_normalized=[float(ds.normalized_score(x)) for x in ci_u] if ci_u else None)


def add_truth(res: dict, truth: dict) -> None:
    """The rollouts' value in a policy's results, and each estimate's error against it."""
    res["truth"] = truth
    for e in res["estimates"].values():
        if not e["skipped"]:
            e["error_discounted"] = e["discounted"] - truth["discounted"]
            e["abs_error_normalized"] = abs(e["normalized"] - truth["normalized"])


# ---- The run's end: the summary of several policies, each JSON, the figure, the timings, the verdicts ----------------
def write_results(results: dict[str, dict], out: dict[str, Path], rollouts: int, plot: str | None,
                  timed: Phases) -> None:
    """With several policies the selection (and with rollouts the DOPE metrics) in every result and on the console;
    then each policy's JSON, the --plot figure, the run's timings and each policy's verdict, last."""
    if len(results) > 1:
        selection = policy_selection(results)
        metrics = dict(policies=list(results), **dope_metrics(results)) if rollouts > 0 else None
        for res in results.values():
            res.update(selection=selection, **({"dope_metrics": metrics} if metrics else {}))
        print(format_summary(res))
    for path, res in results.items():
        write_json(out[path], res)
        print(f"wrote {out[path]}")
    if plot:
        plot_estimates(plot, results)
        print(f"wrote {plot}" + ("" if rollouts > 0 else " (no --rollouts: no ground truth on it)"))
    print(f"ope.py: done in {duration(time.time() - timed.t_start)} ("
          + ", ".join(f"{k} {duration(v)}" for k, v in timed.seconds.items()) + ")", flush=True)
    for path, res in results.items():  # the closing line(s): which estimate to trust
        print(res["verdict"] if len(results) == 1 else f"{path}: {res['verdict']}", flush=True)


class Phases:
    """The wall time of each phase of a run: `timed(phase, fn, *a)` returns fn(*a) and adds its time to the phase's."""

    def __init__(self):
        self.t_start, self.seconds = time.time(), {}

    def __call__(self, phase: str, fn, *a, **kw):
        t0 = time.time()
        out = fn(*a, **kw)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.time() - t0
        return out


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


# ---- Several policies: which one each estimator would deploy, the DOPE metrics (Fu et al. 2021), the figure ----------
def policy_selection(results: dict[str, dict]) -> dict[str, dict]:
    """Per estimator: the policies ranked by discounted estimate, the pick, and those whose 95% interval overlaps the
    pick's. An estimator with a skipped or low-ESS row for any policy is left out, with the reason."""
    out = {}
    for name in ESTIMATORS:
        rows = {p: r["estimates"][name] for p, r in results.items()}
        bad = [p for p, e in rows.items() if e["skipped"] or e.get("unreliable")]
        if bad:
            out[name] = dict(skipped=f"no usable estimate for {len(bad)} of {len(rows)} policies")
            continue
        ranking = sorted(rows, key=lambda p: -rows[p]["discounted"])
        top = rows[ranking[0]]["ci_discounted"]
        tied = [p for p in ranking[1:] if top is None or rows[p]["ci_discounted"] is None
                or rows[p]["ci_discounted"][1] >= top[0]]
        share = results[ranking[0]].get("diagnostics", {}).get("low_coverage_share")  # FQE and MB extrapolate for it
        out[name] = dict(ranking=ranking, recommended=ranking[0], cannot_tell_apart=tied, skipped=None,
                         low_coverage=name in ("FQE", "MB") and share is not None and share > COVERAGE_WARN)
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); nan if either side is constant or has a nan."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")

    def ranks(v):
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their average rank
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float("nan") if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


def top_k(estimates, true_values, k: int) -> np.ndarray:
    """The estimator's k highest-ranked policies; ties go to the lower true value, so that neither the order of the
    policies nor luck decides (an estimator that cannot tell two policies apart is charged the worse)."""
    return np.lexsort((np.asarray(true_values, dtype=np.float64), -np.asarray(estimates, dtype=np.float64)))[:k]


def regret_at_1(estimates, true_values) -> float:
    """True value of the best policy minus the true value of the one the estimator ranks first."""
    estimates, true_values = np.asarray(estimates, dtype=np.float64), np.asarray(true_values, dtype=np.float64)
    if not np.isfinite(estimates).all():
        return float("nan")
    return float(true_values.max() - true_values[top_k(estimates, true_values, 1)[0]])


def normalized_regret_at_k(estimates, true_values, k: int, floor: float | None = None) -> float:
    """DOPE's normalized regret@k: (best true value - best true value in the estimator's top k) / (best true value -
    floor), floor the smallest true value unless given (0: the top k hold the best policy; 1: the worst)."""
    estimates, true_values = np.asarray(estimates, dtype=np.float64), np.asarray(true_values, dtype=np.float64)
    spread = true_values.max() - (true_values.min() if floor is None else floor)
    if not np.isfinite(estimates).all() or spread <= 0:
        return float("nan")
    return float((true_values.max() - true_values[top_k(estimates, true_values, k)].max()) / spread)


def dope_metrics(results: dict[str, dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per estimator over the policy set, as DOPE's code, on discounted values min-max normalised by the true ones:
    mean |error| (estimates capped at 2), Spearman and normalized regret@1 and @3 (on the uncapped estimates), each
    with its std over `n_boot` resamples of the policies (sorted by path: the flags' order changes nothing); and
    regret@1 in normalized-score points. Rows that value another policy than the rollouts ('dist' against 'act'),
    were skipped or have too low an ESS are left out, with the reason."""
    out, paths = {}, sorted(results)
    truth = [results[p]["truth"] for p in paths]
    true_d, true_n = np.array([t["discounted"] for t in truth]), np.array([t["normalized"] for t in truth])
    if np.isnan(true_n).any():  # no reference scores: regret in undiscounted return instead
        true_n = np.array([t["undiscounted"] for t in truth])
    lo, spread = true_d.min(), max(true_d.max() - true_d.min(), 1e-12)
    boot = np.random.default_rng(seed).integers(0, len(paths), (n_boot, len(paths)))
    keys = ("abs_error", "spearman", "regret_at_1", "regret_at_3")  # regret@3 needs more than 3 policies
    for name in ESTIMATORS:
        es = [results[p]["estimates"][name] for p in paths]
        n_skipped, n_low = sum(bool(e["skipped"]) for e in es), sum(bool(e.get("unreliable")) for e in es)
        if n_skipped:
            out[name] = dict(skipped=f"skipped for {n_skipped} of {len(es)} policies")
        elif any(e["values"] != t["values"] for e, t in zip(es, truth)):
            out[name] = dict(skipped=f"values pi_e's distribution, the rollouts ran '{truth[0]['values']}': rerun with "
                                     "--rollout-action sample to score it")
        elif n_low:
            out[name] = dict(skipped=f"ESS too low for {n_low} of {len(es)} policies")
        else:
            est_d = np.array([e["discounted"] for e in es])
            v_true, v_est = (true_d - lo) / spread, (est_d - lo) / spread
            with np.errstate(invalid="ignore"):
                std = np.nanstd(np.array([set_metrics(v_est[i], v_true[i]) for i in boot]), axis=0)
            named = [{k: float(x) if j < 3 or len(paths) > 3 else None for j, (k, x) in enumerate(zip(keys, v))}
                     for v in (set_metrics(v_est, v_true), std)]
            out[name] = dict(named[0], std=named[1], regret_at_1_points=regret_at_1(est_d, true_n), skipped=None)
    return out


def set_metrics(v_est: np.ndarray, v_true: np.ndarray) -> np.ndarray:
    """DOPE's four metrics of a policy set (or a resample of it) on values normalised over the whole set (truth in
    [0, 1]): mean |error| with the estimates capped at 2, Spearman, and normalized regret@1 and @3 divided, as DOPE,
    by the set's largest true value (1 on the whole set)."""
    return np.array([np.abs(np.minimum(v_est, 2.0) - v_true).mean(), spearman(v_est, v_true),
                     normalized_regret_at_k(v_est, v_true, 1, 0.0), normalized_regret_at_k(v_est, v_true, 3, 0.0)])


def format_summary(res: dict) -> str:
    """Policy selection, and the DOPE metrics when the policies have ground truth (from any policy's results)."""
    lines = ["\nPolicy selection (each estimator's pick, and the policies whose 95% interval overlaps its own)"]
    for name, sel in res["selection"].items():
        lines.append(f"   {name:<9} " + (f"left out: {sel['skipped']}" if sel["skipped"] else f"deploy "
                     f"{sel['recommended']} (cannot tell apart from: {', '.join(sel['cannot_tell_apart']) or 'none'})"
                     + (" [its coverage warning fired: FQE and MB extrapolate for it]" if sel.get("low_coverage")
                        else "")))
    if "dope_metrics" in res:
        keys = ("abs_error", "spearman", "regret_at_1", "regret_at_3")
        lines += ["\nDOPE metrics (values min-max normalised by the true ones; +- std over 1000 resamples of the "
                  "policies; points: normalized score lost by the pick)",
                  f"   {'estimator':<9} " + " ".join(f"{k:>15}" for k in keys) + f" {'points':>7}"]
        for name in ESTIMATORS:
            m = res["dope_metrics"][name]
            cells = [f"{cell(m.get(k), 6)} +-{cell(m.get('std', {}).get(k), 5)}" for k in keys]
            lines.append(f"   {name:<9} " + (f"left out: {m['skipped']}" if m["skipped"] else
                                             f"{' '.join(cells)} {cell(m['regret_at_1_points'], 7, 1)}"))
    return "\n".join(lines)


def plot_estimates(path: str, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (policy, res) in zip(axes[0], results.items()):
        rows = [(n, e) for n, e in res["estimates"].items() if not e["skipped"]]
        for kind, color in (("dist", "tab:blue"), ("act", "tab:orange")):  # which policy each row values
            idx = [i for i, (_, e) in enumerate(rows) if e["values"] == kind]
            y = np.array([rows[i][1]["discounted"] for i in idx])
            ci = np.array([rows[i][1]["ci_discounted"] or [v, v] for i, v in zip(idx, y)]).reshape(-1, 2)
            if idx:
                ax.errorbar(idx, y, yerr=np.stack([y - ci[:, 0], ci[:, 1] - y]).clip(0), fmt="o", capsize=4,
                            color=color, label=f"estimate of '{kind}' (95% CI)")
        if res.get("truth"):
            ax.axhline(res["truth"]["discounted"], color="k", label=f"rollouts ({res['truth']['values']})")
            if res["truth"]["ci_discounted"]:
                ax.axhspan(*res["truth"]["ci_discounted"], color="k", alpha=0.1)
        ax.set_xticks(range(len(rows)), [n for n, _ in rows])
        ax.set_title(Path(policy).parent.name[:40] + "/" + Path(policy).name, fontsize=8)
        ax.set_ylabel(f"discounted return (gamma {res['discount']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
