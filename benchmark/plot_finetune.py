"""Offline-to-online results: normalized score against environment steps, from the `online/normalized_score` curves
the scripts log when --online-steps is set (docs/finetune.md).

    python benchmark/run.py --preset finetune              # the runs (benchmark/results/finetune)
    python benchmark/plot_finetune.py benchmark/results/finetune

Writes `finetune.md` (score at 0, 10k and the last environment step, mean +- std over seeds, per algorithm and
dataset), `finetune.json` (every run's curve) and `finetune.png` (one panel per dataset; the dip after the switch
from offline to online shows right after 0) into the folder.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

LABELS = {"iql": "IQL", "cql": "CQL", "calql": "Cal-QL", "scratch": "online from scratch (SAC / DQN)"}


def load_curves(folder: Path) -> list[dict]:
    """One dict per finished run (a done/ marker): env steps and normalized score, from its TensorBoard folder
    `runs/{dataset}__{algo}-{tag}__{seed}__{time}` when it is on this machine, else from the committed
    finetune.json (the logs are not committed, so a fresh clone rerunning some rows keeps the others)."""
    done = {p.stem for p in (folder / "done").glob("*.json")}
    runs = {}
    for run in sorted((folder / "runs").iterdir()) if (folder / "runs").is_dir() else []:
        dataset, exp_name, seed, _ = run.name.split("__")
        key = f"{exp_name.split('-')[0]}__{dataset}__{seed}"
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
        if key not in done or "online/normalized_score" not in acc.Tags()["scalars"]:
            continue
        ev = list({int(e.step): e for e in acc.Scalars("online/normalized_score")}.values())  # last per env step
        runs[key] = dict(algo=exp_name.split("-")[0], dataset=dataset, seed=int(seed),
                         env_steps=[int(e.step) for e in ev], score=[round(float(e.value), 2) for e in ev])
    saved = json.loads((folder / "finetune.json").read_text()) if (folder / "finetune.json").is_file() else []
    for r in saved:
        key = f"{r['algo']}__{r['dataset']}__{r['seed']}"
        if key in done and key not in runs:
            runs[key] = r
    return [runs[k] for k in sorted(runs)]


def score_at(run: dict, env_step: int) -> float:
    """The evaluation logged at `env_step` (the last one at or before it)."""
    steps = np.array(run["env_steps"])
    i = np.searchsorted(steps, env_step, side="right") - 1
    return run["score"][i] if i >= 0 else float("nan")


def main(folder: Path) -> None:
    runs = load_curves(folder)
    if not runs:
        raise SystemExit(f"no runs with online/normalized_score under {folder}/runs")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["dataset"], r["algo"]].append(r)
    last = max(s for r in runs for s in r["env_steps"])
    marks = [0, 10_000, last]
    lines = ["| dataset | algorithm | seeds | " + " | ".join(f"{m:,} env steps" for m in marks) + " |",
             "|---|---|---|" + "---|" * len(marks)]
    for (d, a), g in sorted(groups.items()):
        cells = []
        for m in marks:
            x = np.array([score_at(r, m) for r in g])
            cells.append("-" if np.isnan(x).any() else f"{x.mean():.1f} ± {x.std():.1f}")
        lines.append(f"| {d} | {LABELS.get(a, a)} | {len(g)} | " + " | ".join(cells) + " |")
    text = ("# Offline-to-online fine-tuning\n\nNormalized score of the evaluation policy against environment steps "
            "of the online phase (0 = the end of offline pre-training; '-': from scratch there is no evaluation "
            "before the first --eval-every steps), mean ± std over seeds.\n\n" + "\n".join(lines) + "\n")
    (folder / "finetune.md").write_text(text)
    (folder / "finetune.json").write_text(json.dumps(runs, indent=0))
    print(text)
    plot(groups, folder / "finetune.png")


def plot(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for d, _ in groups})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for (dd, a), g in sorted(groups.items()):
            if dd != d:
                continue
            n = min(len(r["env_steps"]) for r in g)  # seeds share the evaluation steps
            x = np.array(g[0]["env_steps"][:n])
            y = np.array([r["score"][:n] for r in g])
            ax.plot(x, y.mean(0), label=f"{LABELS.get(a, a)} (n={len(g)})")
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set(title=d, xlabel="environment steps (online phase)", ylabel="normalized score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
