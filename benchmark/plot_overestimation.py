"""The lesson of offline RL in one picture: Q on the policy's own actions with and without CQL's penalty.

    python benchmark/plot_overestimation.py benchmark/results/cql-table benchmark/results/cql-alpha0 \
        --datasets lunarlander-expert lunarlander-medium --out docs/img/cql-alpha0.png

For each dataset, the left panel shows mean Q(s, pi(s)) on dataset states over training (seed mean and range) for
the runs in each folder, against the mean discounted return-to-go of the dataset's own states (what a policy as
good as the data would really earn); the right panel shows the normalized score actually obtained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets import Dataset, load_dataset  # noqa: E402


def curves(folder: Path, dataset: str) -> dict[str, np.ndarray]:
    """Per seed: steps, Q(s, pi(s)) = q_data + q_pi_minus_q_data, and the eval score."""
    out: dict[str, list] = {"q_steps": [], "q_pi": [], "eval_steps": [], "score": []}
    for run in sorted((folder / "runs").glob(f"{dataset}__*")):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
        q_data = acc.Scalars("diagnostics/q_data")
        gap = acc.Scalars("diagnostics/q_pi_minus_q_data")
        ev = acc.Scalars("eval/normalized_score")
        out["q_steps"].append([e.step for e in q_data])
        out["q_pi"].append([a.value + b.value for a, b in zip(q_data, gap)])
        out["eval_steps"].append([e.step for e in ev])
        out["score"].append([e.value for e in ev])
    n_q, n_e = min(map(len, out["q_pi"])), min(map(len, out["score"]))
    return dict(q_steps=np.array(out["q_steps"][0][:n_q]), q_pi=np.array([x[:n_q] for x in out["q_pi"]]),
                eval_steps=np.array(out["eval_steps"][0][:n_e]), score=np.array([x[:n_e] for x in out["score"]]))


def discounted_return_to_go(ds: Dataset, gamma: float) -> float:
    """Mean over dataset states of the discounted return the data itself earned from there."""
    rtg, g = np.zeros(len(ds)), 0.0
    ends = ds.terminals | ds.timeouts
    for i in range(len(ds) - 1, -1, -1):
        g = ds.rewards[i] + (0.0 if ends[i] else gamma * g)
        rtg[i] = g
    return float(rtg.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cql_folder", type=Path)
    p.add_argument("alpha0_folder", type=Path)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--out", default="docs/img/cql-alpha0.png")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(a.datasets), 2, figsize=(10, 3.3 * len(a.datasets)), squeeze=False)
    for row, d in zip(axes, a.datasets):
        # cql.py's default alpha and the algorithm that alpha 0 leaves depend on the action space.
        ds = load_dataset(d)
        cql_label, alpha0_label = (("CQL (alpha 1)", "alpha 0: plain double DQN") if ds.discrete
                                   else ("CQL (alpha 5)", "alpha 0: plain SAC"))
        for folder, label, color in ((a.cql_folder, cql_label, "C0"), (a.alpha0_folder, alpha0_label, "C3")):
            c = curves(folder, d)
            row[0].plot(c["q_steps"], c["q_pi"].mean(0), color=color, label=label)
            row[0].fill_between(c["q_steps"], c["q_pi"].min(0), c["q_pi"].max(0), color=color, alpha=0.2)
            row[1].plot(c["eval_steps"], c["score"].mean(0), color=color, label=label)
            row[1].fill_between(c["eval_steps"], c["score"].min(0), c["score"].max(0), color=color, alpha=0.2)
            print(f"{d} {label}: final Q(s, pi(s)) {c['q_pi'][:, -1].mean():.1f}, final score "
                  f"{c['score'][:, -1].mean():.1f} +- {c['score'][:, -1].std():.1f} ({len(c['score'])} seeds)")
        rtg = discounted_return_to_go(ds, a.discount)
        print(f"{d}: the data's mean discounted return-to-go {rtg:.1f}")
        row[0].axhline(rtg, color="black", ls=":", label="data's discounted return-to-go")
        row[0].set_title(f"{d}\nmean Q(s, pi(s)) on dataset states", fontsize=9)
        row[1].set_title(f"{d}\nnormalized score (seed mean, min-max band)", fontsize=9)
        for ax in row:
            ax.set_xlabel("gradient steps")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
