"""The lesson of offline RL in one picture: Q on the policy's own actions with and without CQL's penalty.

    python benchmark/plot_overestimation.py benchmark/results/cql-table benchmark/results/cql-alpha0 \
        --datasets lunarlander-expert lunarlander-medium --out docs/img/cql-alpha0.png

Overestimation is measured on one policy: at each evaluation the scripts log the policy's own value estimate at
the evaluation episodes' start states, Q(s0, pi(s0)) (`eval/q_start`), and the discounted return that policy
actually earned from those states (`eval/discounted_return`). For each dataset the left panel shows both (seed
mean and min-max band; solid: Q, dashed: the return earned) for the runs in each folder; the right panel shows
the normalized score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets import load_dataset  # noqa: E402


EVAL_TAGS = {"q_start": "eval/q_start", "earned": "eval/discounted_return", "score": "eval/normalized_score"}


def curves(folder: Path, dataset: str, algo: str = "", tags: dict[str, str] = EVAL_TAGS) -> dict[str, np.ndarray]:
    """Per seed (runs of `algo` only, when given), at each logged step of the first tag: by default the policy's Q at
    the start states, the discounted return it earned from them, and the normalized score. Runs with fewer logged
    steps than the longest, or (with `algo`) without benchmark/run.py's done marker, are left out (still running, or
    stopped), with a line on stderr."""
    runs = {}
    for run in sorted((folder / "runs").glob(f"{dataset}__{algo + '-' if algo else ''}*")):
        marker = folder / "done" / f"{algo}__{dataset}__{run.name.split('__')[2]}.json"
        if algo and marker.parent.is_dir() and not marker.exists():
            print(f"left out {run.name}: not done ({marker.name} missing)", file=sys.stderr)
            continue
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
        logged = acc.Tags()["scalars"]
        runs[run.name] = [list(acc.Scalars(tag)) if tag in logged else [] for tag in tags.values()]
    length = {name: min(map(len, series)) for name, series in runs.items()}  # evaluations every tag has
    n = max(length.values(), default=0)
    for name in [name for name in runs if length[name] < n]:
        print(f"left out {name}: fewer than {n} evaluations logged (unfinished?)", file=sys.stderr)
        del runs[name]
    out = {k: np.array([[e.value for e in series[i][:n]] for series in runs.values()]) for i, k in enumerate(tags)}
    steps = [e.step for e in next(iter(runs.values()))[0][:n]] if runs else []
    return dict(steps=np.array(steps), **out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cql_folder", type=Path)
    p.add_argument("alpha0_folder", type=Path)
    p.add_argument("--datasets", nargs="+", required=True)
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
            for key, style, what in (("q_start", "-", "Q(s0, pi(s0))"), ("earned", "--", "return earned")):
                row[0].plot(c["steps"], c[key].mean(0), style, color=color, label=f"{label}: {what}")
                row[0].fill_between(c["steps"], c[key].min(0), c[key].max(0), color=color, alpha=0.15)
            row[1].plot(c["steps"], c["score"].mean(0), color=color, label=label)
            row[1].fill_between(c["steps"], c["score"].min(0), c["score"].max(0), color=color, alpha=0.2)
            print(f"{d} {label} ({len(c['score'])} seeds, final): Q(s0, pi(s0)) {c['q_start'][:, -1].mean():.1f} "
                  f"+- {c['q_start'][:, -1].std():.1f}, discounted return earned {c['earned'][:, -1].mean():.1f} "
                  f"+- {c['earned'][:, -1].std():.1f}, score {c['score'][:, -1].mean():.1f} "
                  f"+- {c['score'][:, -1].std():.1f}")
        row[0].set_title(f"{d}\nthe policy's Q at start states vs the discounted return it earned", fontsize=9)
        row[1].set_title(f"{d}\nnormalized score (seed mean, min-max band)", fontsize=9)
        for ax in row:
            ax.set_xlabel("gradient steps")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
