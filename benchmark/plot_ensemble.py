"""Critic ensembles, the lesson measured (docs/cql.md): no conservative term with 2 and 10 critics, and CQL, on the same
data (the alpha-0 runs keep CQL's deterministic backup, so they are not SAC and SAC-N: docs/cql.md).

    python benchmark/run.py --preset ensemble
    python benchmark/plot_ensemble.py benchmark/results/ensemble --out docs/img/ensemble.png

For each dataset, three panels: the policy's Q at the evaluation start states against the discounted return it
earned there (solid: Q, dashed: earned; seed mean, min-max band); the critics' spread on dataset actions against
on the policy's actions (`diagnostics/q_std_data` solid, `q_std_pi` dashed: the epistemic gap); the normalized
score. A markdown table of the final values (mean ± std over seeds) goes next to the results (ensemble.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from plot_overestimation import curves

ALGOS = {"sac": ("alpha 0, 2 critics (cql.py --cql-alpha 0)", "C3"),
         "sacn": ("alpha 0, 10 critics (--cql-alpha 0 --n-critics 10)", "C2"),
         "cql": ("CQL (alpha 5, 2 critics)", "C0")}
STD_TAGS = {"q_std_data": "diagnostics/q_std_data", "q_std_pi": "diagnostics/q_std_pi"}


def cell(x: np.ndarray) -> str:
    return f"{x.mean():.1f} ± {x.std():.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", default="docs/img/ensemble.png")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r.name.split("__")[0] for r in (a.folder / "runs").iterdir()})
    fig, axes = plt.subplots(len(datasets), 3, figsize=(15, 3.4 * len(datasets)), squeeze=False)
    table = ["| dataset | algorithm | seeds | final normalized score | Q(s0, π(s0)) | discounted return earned | "
             "q_std_data | q_std_pi |", "|---|---|---|---|---|---|---|---|"]
    for row, d in zip(axes, datasets):
        for algo, (label, color) in ALGOS.items():
            if not list((a.folder / "runs").glob(f"{d}__{algo}-*")):
                continue
            c, s = curves(a.folder, d, algo), curves(a.folder, d, algo, STD_TAGS)
            if not len(c["steps"]):  # no finished run yet
                continue
            for ax, data, keys in ((row[0], c, ("q_start", "earned")), (row[1], s, ("q_std_data", "q_std_pi")),
                                   (row[2], c, ("score",))):
                for key, style in zip(keys, ("-", "--")):
                    ax.plot(data["steps"], data[key].mean(0), style, color=color, label=f"{label}: {key}")
                    ax.fill_between(data["steps"], data[key].min(0), data[key].max(0), color=color, alpha=0.15)
            table.append(f"| {d} | {label} | {len(c['score'])} | {cell(c['score'][:, -1])} | "
                         f"{cell(c['q_start'][:, -1])} | {cell(c['earned'][:, -1])} | "
                         f"{cell(s['q_std_data'][:, -1])} | {cell(s['q_std_pi'][:, -1])} |")
        titles = ("the policy's Q at start states (solid) vs the discounted return earned (dashed)",
                  "critics' std on data actions (solid) vs on the policy's (dashed)", "normalized score")
        for ax, title in zip(row, titles):
            ax.set_title(f"{d}\n{title}", fontsize=9)
            ax.set_xlabel("gradient steps")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    (a.folder / "ensemble.md").write_text("\n".join(table) + "\n")
    print("\n".join(table) + f"\nwrote {a.out} and {a.folder / 'ensemble.md'}")


if __name__ == "__main__":
    main()
