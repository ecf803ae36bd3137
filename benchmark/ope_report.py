"""ope.py's report on several policies: which one each estimator would deploy (policy selection), the DOPE metrics
(Fu et al. 2021) of each estimator against the rollouts, their console summary and the --plot figure. ope.py
imports it when it evaluates several policies or is given --plot; benchmark/ope_validation.py uses the metrics."""

from pathlib import Path

import numpy as np

from ope import COVERAGE_WARN, ESTIMATORS, cell, normalized_regret_at_k, regret_at_1, spearman


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
