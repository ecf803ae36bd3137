"""OPE validation at scale (docs/ope.md, "Validation"): on each dataset, train policies of widely different quality
(checkpoints along IQL, CQL and BCQ training, behaviour cloning, and CQL without its term, the alpha = 0 failure),
value every one with each ope.py estimator from the data alone and with real rollouts, and keep the .ope.json files.

    python benchmark/ope_validation.py --dataset lunarlander-medium   # train (once, resumable), then ope.py
    python benchmark/ope_validation.py --summary                       # results.md from the committed JSON

Runs in benchmark/results/ope-validation/ (training runs in runs/, not committed); each dataset's JSON files are
copied to json/{dataset}/ and committed. One torch thread per process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmark" / "results" / "ope-validation"
sys.path.insert(0, str(ROOT))
from benchmark.ope_report import dope_metrics  # noqa: E402 (the summary applies today's metrics and threshold)
from ope import COVERAGE_WARN  # noqa: E402

# (label, script, flags, total steps, checkpoint every): 11-12 policies per dataset, from bad to good
BOX = [("iql", "iql", [], 12000, 3000), ("bc", "iql", ["--beta", "0"], 6000, 3000),
       ("sac", "cql", ["--cql-alpha", "0"], 6000, 2000), ("bcq", "bcq", [], 6000, 3000)]
# hopper (docs/mujoco.md): IQL with the authors' locomotion reward scaling; its episodes run to 1,000 steps. BCQ is
# left out: its model rollouts (10 VAE candidates per state, 5 models x 3,994 start states) took 7-12 s a step here,
# 40-70 min a policy
HOPPER = [("iql", "iql", ["--reward-scaling", "return-range"], 12000, 3000), ("bc", "iql", ["--beta", "0"], 6000, 3000),
          ("sac", "cql", ["--cql-alpha", "0"], 6000, 2000)]
POLICIES = {
    "lunarlander-medium": [("iql-beta0.3", "iql", ["--beta", "0.3"], 12000, 3000),
                           ("iql-beta3", "iql", ["--beta", "3"], 6000, 1500),
                           ("dqn", "cql", ["--cql-alpha", "0"], 10000, 2500)],
    "pendulum-medium": BOX,
    "lunarlander-continuous-medium": BOX,
    "hopper-medium": HOPPER,
}
# FQE budgets as the earlier six-policy validation (docs/ope.md); greedy/deterministic policies (CQL Discrete, BCQ)
# have no density, so IS ... WDR value them smoothed (--smoothing-width 0.1), and so do the rollouts (sample)
OPE_FLAGS = ["--mb-steps", "5000", "--rollouts", "20", "--rollout-action", "sample", "--fqe-action", "sample",
             "--smoothing-width", "0.1"]
FQE = {"lunarlander-medium": ["--fqe-steps", "20000", "--fqe-tau", "0.02"],
       "pendulum-medium": ["--fqe-steps", "10000", "--fqe-tau", "0.01"],
       "lunarlander-continuous-medium": ["--fqe-steps", "20000", "--fqe-tau", "0.02"],
       "hopper-medium": ["--fqe-steps", "20000", "--fqe-tau", "0.02"]}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def checkpoints(dataset: str) -> dict[str, str]:
    """Train each policy family once (skipped when its last checkpoint exists); {label/stepN: checkpoint path}."""
    found = {}
    for label, script, flags, steps, every in POLICIES[dataset]:
        pattern = f"runs/{dataset}__ope-{label}__1__*/{script}_step{{}}.pt"
        if not glob.glob(str(OUT / pattern.format(steps))):
            cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset", dataset, *flags, "--total-steps",
                   str(steps), "--checkpoint-every", str(every), "--save-model", "--eval-every", str(every),
                   "--exp-name", f"ope-{label}", "--seed", "1"]
            print("train:", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=OUT, env=ENV, check=True, stdout=subprocess.DEVNULL)
        for step in range(every, steps + 1, every):
            found[f"{label}/step{step}"] = sorted(glob.glob(str(OUT / pattern.format(step))))[-1]
    return found


def validate(dataset: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    policies = checkpoints(dataset)
    cmd = [sys.executable, str(ROOT / "ope.py"), "--dataset", dataset, *FQE[dataset], *OPE_FLAGS,
           *[x for p in policies.values() for x in ("--policy", p)]]
    print("ope:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=OUT, env=ENV, check=True)
    dest = OUT / "json" / dataset
    dest.mkdir(parents=True, exist_ok=True)
    for label, path in policies.items():
        shutil.copy(f"{path}.{dataset}.ope.json", dest / (label.replace("/", "__") + ".ope.json"))
    command = " ".join(["python", *cmd[1:]]).replace(f"{ROOT}/", "")  # run from the project root
    (dest / "command.txt").write_text(command + "\n")


def summary() -> str:
    """A DOPE-metrics table per dataset and each policy's truth, FQE estimate and coverage share."""
    lines = ["# OPE validation", "",
             "Regenerate: `python benchmark/ope_validation.py --dataset D` for each dataset below, then "
             "`python benchmark/ope_validation.py --summary`. Metrics as DOPE (Fu et al. 2021) on discounted values "
             "min-max normalised by the true ones, +- std over 1000 resamples of the policies; points: the normalized "
             "score lost by deploying the estimator's pick. The metrics are recomputed by today's "
             "`dope_metrics` (benchmark/ope_report.py) from the estimates and truth stored in the JSON.", ""]
    for dest in sorted((OUT / "json").iterdir()):
        res = {p.name.removesuffix(".ope.json").replace("__", "/"): json.loads(p.read_text())
               for p in sorted(dest.glob("*.ope.json"))}
        lines += [f"## {dest.name} ({len(res)} policies)", "",
                  "| estimator | mean abs. error | Spearman | norm. regret@1 | norm. regret@3 | regret@1, points |",
                  "|---|---|---|---|---|---|"]
        for name, m in dope_metrics(res).items():
            if m["skipped"]:
                lines.append(f"| {name} | left out: {m['skipped']} | | | | |")
                continue
            cells = [f"{m[k]:.2f} ± {m['std'][k]:.2f}" if m[k] is not None else "n/a"
                     for k in ("abs_error", "spearman", "regret_at_1", "regret_at_3")]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['regret_at_1_points']:.1f} |")
        lines += ["", "| policy | truth, normalized | truth, discounted | FQE, discounted | low-coverage share | "
                  f"coverage warning (> {100 * COVERAGE_WARN:.0f}%) |", "|---|---|---|---|---|---|"]
        for label, r in sorted(res.items(), key=lambda kv: kv[1]["truth"]["discounted"]):
            fqe, cov = r["estimates"]["FQE"], r["diagnostics"].get("low_coverage_share")
            warn = cov is not None and cov > COVERAGE_WARN  # ope.py's warning at today's threshold
            lines.append(f"| {label} | {r['truth']['normalized']:.1f} | {r['truth']['discounted']:.1f} | "
                         f"{fqe['discounted']:.1f} | " + (f"{100 * cov:.1f}%" if cov is not None else "n/a")
                         + f" | {'yes' if warn else ''} |")
        lines.append("")
    return "\n".join(lines)


def plot(path: Path) -> None:
    """One panel per dataset: FQE's and MB's discounted estimates against the truth, coloured by coverage share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = sorted((OUT / "json").iterdir())
    fig, axes = plt.subplots(1, len(folders), figsize=(4.6 * len(folders), 4.2), squeeze=False)
    for ax, dest in zip(axes[0], folders):
        res = [json.loads(p.read_text()) for p in sorted(dest.glob("*.ope.json"))]
        truth = [r["truth"]["discounted"] for r in res]
        cov = [100 * (r["diagnostics"].get("low_coverage_share") or 0.0) for r in res]
        edge = ["red" if c > 100 * COVERAGE_WARN else "k" for c in cov]  # ope.py warns for the red-edged ones
        for name, marker in (("FQE", "o"), ("MB", "s")):
            est = [r["estimates"][name]["discounted"] for r in res]
            sc = ax.scatter(truth, est, c=cov, marker=marker, cmap="viridis", vmin=0, vmax=12, label=name,
                            edgecolors=edge, linewidths=[1.5 if e == "red" else 0.5 for e in edge])
        lo, hi = min(truth), max(truth)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="estimate = truth")
        ax.set_title(f"{dest.name} ({len(res)} policies)", fontsize=9)
        ax.set_xlabel("true discounted return (20 rollouts)")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("estimate from the data, discounted")
    fig.subplots_adjust(wspace=0.3)
    fig.suptitle(f"OPE from the data against the truth; red edge: ope.py's coverage warning (share > "
                 f"{100 * COVERAGE_WARN:.0f}%)", fontsize=10)
    fig.colorbar(sc, ax=axes[0].tolist(), label="low-coverage share, %")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=POLICIES, action="append", default=[])
    p.add_argument("--summary", action="store_true", help="write results.md from json/ (and print it)")
    a = p.parse_args()
    if not a.dataset and not a.summary:
        p.error("give --dataset (repeatable) and/or --summary")
    for d in a.dataset:
        validate(d)
    if a.summary:
        text = summary()
        (OUT / "results.md").write_text(text + "\n")
        print(text)
        plot(ROOT / "docs" / "img" / "ope-validation.png")
        print("wrote docs/img/ope-validation.png")
