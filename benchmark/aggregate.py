"""Read the TensorBoard logs of a benchmark folder; write the results table, speed table and learning curves.

    python benchmark/aggregate.py benchmark/results/small
    python benchmark/aggregate.py benchmark/results/choosing --stats-only   # only the across-datasets section

Writes `results.md` (final normalized score, mean +- std over seeds, and the best evaluation during training,
labelled as such; across the datasets every algorithm ran, the IQM and mean with stratified-bootstrap 95% intervals,
and each pair's probability of improvement: benchmark/stats.py), the steps/second of each algorithm, `curves.png`
(one panel per dataset, one line per algorithm, a band of +- one std over seeds; d3rlpy's runs dashed in the colour
of ours) and `profiles.png` (performance profiles of the final scores, with 95% bands) into the folder. When the
folder has d3rlpy runs (`run.py --with-d3rlpy`), results.md ends with a side-by-side table of scores and speeds.
Also writes `scores.json`, every run's evaluation curve and speed: with results.md, curves.png, config.json and
done/ it is what gets committed (the TensorBoard logs in runs/ and logs/ are not). Runs recorded there whose logs
are not in runs/ (a fresh clone, a new machine) are kept, so aggregating again after new runs loses none.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from run import is_box
from stats import bootstrap_ci, iqm, mean, performance_profile_ci, probability_of_improvement_ci
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def recorded_runs(folder: Path) -> list[dict]:
    """The runs in the folder's scores.json (written by the last aggregation), as load_runs gives them; speed and
    wall time NaN where scores.json has none (written before it recorded them)."""
    path = folder / "scores.json"
    if not path.exists():
        return []
    return [dict(r, steps=np.array(r["steps"]), score=np.array(r["score"]), sps=nan_if_none(r.get("sps")),
                 wall=nan_if_none(r.get("wall_s"))) for r in json.loads(path.read_text())]


def nan_if_none(x: float | None) -> float:
    """A number read back from scores.json: None (JSON null, unknown) as NaN."""
    return float("nan") if x is None else float(x)


def load_runs(folder: Path) -> list[dict]:
    """One dict per run: each run folder `{dataset}__{algo}-{tag}__{seed}__{time}` with its eval curve and mean SPS,
    and each run of scores.json whose logs are gone (runs/ is not committed). A run both logged and recorded is
    taken from its logs, unless the record goes further (finished() keeps the longest of each seed)."""
    runs = recorded_runs(folder)  # first: on equal length, the logged run (later in the list) wins
    for run in sorted((folder / "runs").glob("*")):
        dataset, exp_name, seed, _ = run.name.split("__")
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
        tags = acc.Tags()["scalars"]
        if "eval/normalized_score" not in tags:
            continue
        ev = acc.Scalars("eval/normalized_score")
        sps = [e.value for e in acc.Scalars("charts/SPS")] if "charts/SPS" in tags else []
        runs.append(dict(algo=exp_name.split("-")[0], dataset=dataset, seed=int(seed),
                         steps=np.array([e.step for e in ev]), score=np.array([e.value for e in ev]),
                         sps=float(np.median(sps)) if sps else float("nan"),
                         wall=ev[-1].wall_time - acc.FirstEventTimestamp()))
    return finished(runs)


def finished(runs: list[dict]) -> list[dict]:
    """Drop runs that are still going or were killed: a redone seed keeps its longest run, and a run whose last
    evaluation is short of the longest run of its algorithm and dataset is left out, with a printed note."""
    by_seed: dict[tuple[str, str, int], dict] = {}
    for r in runs:  # sorted by folder name, so on ties the later run wins
        key = (r["dataset"], r["algo"], r["seed"])
        if key not in by_seed or r["steps"][-1] >= by_seed[key]["steps"][-1]:
            by_seed[key] = r
    longest: dict[tuple[str, str], int] = defaultdict(int)
    for (dataset, algo, _), r in by_seed.items():
        longest[dataset, algo] = max(longest[dataset, algo], int(r["steps"][-1]))
    kept = []
    for (dataset, algo, seed), r in by_seed.items():
        if r["steps"][-1] < longest[dataset, algo]:
            print(f"left out {algo} on {dataset}, seed {seed}: last evaluation at step {r['steps'][-1]} of "
                  f"{longest[dataset, algo]} (still running, or killed)")
        else:
            kept.append(r)
    return kept


def data_score(dataset: str) -> float:
    """The normalized score of the dataset's own episodes (its behaviour policy), NaN when unknown."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from datasets import BUILTIN_NAMES, load_dataset

    if dataset not in BUILTIN_NAMES:
        return float("nan")
    ds = load_dataset(dataset)
    return float(ds.normalized_score(ds.episode_returns().mean()))


def grouped(folder: Path) -> tuple[list[dict], dict[tuple[str, str], list[dict]], list[str], list[str]]:
    """The folder's finished runs, grouped by (dataset, algorithm), and the sorted algorithms and datasets."""
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"no finished runs with evaluations under {folder}/runs or in {folder}/scores.json")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["dataset"], r["algo"])].append(r)
    return runs, groups, sorted({r["algo"] for r in runs}), sorted({r["dataset"] for r in runs})


def stats_only(folder: Path) -> None:
    """--stats-only: (re)write only the "Across datasets" section of an existing results.md, and profiles.png,
    leaving its tables and scores.json as they are. For folders whose logs are gone: their tables came from the
    logs, and scores.json keeps 4 decimals per evaluation, which can move a mean's last printed digit; its runs
    may also lack the speeds of the speed table."""
    _, groups, algos, datasets = grouped(folder)
    across = across_datasets(groups, algos, datasets, folder / "profiles.png")
    path = folder / "results.md"
    text = path.read_text()
    start = text.find("\n\n## Across datasets\n")
    if start >= 0:  # drop the previous section, up to the next heading
        end = text.find("\n\n## ", start + 2)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    at = text.find("\n\n## Speed")
    text = text[:at + 1] + across + text[at + 1:] if at >= 0 else text + across
    path.write_text(text)
    print(across)


def main(folder: Path) -> None:
    runs, groups, algos, datasets = grouped(folder)

    scores = {d: data_score(d) for d in datasets}
    lines = ["| dataset | data | " + " | ".join(f"{a} final | {a} best (during training)" for a in algos) + " |",
             "|---|---|" + "---|---|" * len(algos)]
    for d in datasets:
        cells = [f"{scores[d]:.1f}"]
        for a in algos:
            g = groups.get((d, a), [])
            if not g:
                cells += ["", ""]
                continue
            final = np.array([r["score"][-1] for r in g])
            best = np.array([r["score"].max() for r in g])
            cells += [f"{final.mean():.1f} ± {final.std():.1f} (n={len(g)}, {g[0]['steps'][-1]} steps)",
                      f"{best.mean():.1f} ± {best.std():.1f}"]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    speed = ["| algorithm | action space | median steps/s per run | runs | mean wall time per run |",
             "|---|---|---|---|---|"]
    for a in algos:
        for kind, box in (("Box", True), ("Discrete", False)):
            g = [r for r in runs if r["algo"] == a and is_box(r["dataset"]) == box and np.isfinite(r["sps"])]
            if g:
                speed.append(f"| {a} | {kind} | {np.median([r['sps'] for r in g]):.0f} | {len(g)} | "
                             f"{np.mean([r['wall'] for r in g]) / 60:.1f} min |")
    unknown = sum(not np.isfinite(r["sps"]) for r in runs)
    if unknown:  # logs without charts/SPS, or records of a scores.json written before it kept speeds
        speed.append(f"\nRuns without a speed record (logs without charts/SPS, or a scores.json written before it "
                     f"kept speeds): {unknown}.")
    across = across_datasets(groups, algos, datasets, folder / "profiles.png")
    text = (f"# Results: {folder.name}\n\nNormalized score (0 = the random, 100 = the expert reference return: "
            "the scripted expert's on the classic-control and LunarLander data, D4RL's on MuJoCo; docs/datasets.md), "
            "final evaluation, mean ± std over seeds; 'data' is the dataset's own score; 'best' is the best "
            "evaluation during training (optimistic, "
            "for reference only).\n\n" + "\n".join(lines) + "\n" + across + "\n## Speed (gradient steps per second, "
            "one torch thread per run, runs in parallel)\n\n" + "\n".join(speed) + "\n"
            + side_by_side(runs, groups, datasets, scores))
    (folder / "results.md").write_text(text)
    # every run's evaluation curve, small enough to commit: the numbers behind the docs' tables without the logs
    (folder / "scores.json").write_text(json.dumps(
        [dict(algo=r["algo"], dataset=r["dataset"], seed=r["seed"], steps=r["steps"].tolist(),
              score=[round(float(x), 4) for x in r["score"]], sps=finite_or_none(r["sps"], 1),
              wall_s=finite_or_none(r["wall"], 0)) for r in runs], indent=0))
    print(text)
    plot(groups, algos, datasets, scores, folder / "curves.png")


def finite_or_none(x: float, digits: int) -> float | None:
    """x rounded for scores.json, or None (JSON null) where unknown."""
    return round(float(x), digits) if np.isfinite(x) else None


def side_by_side(runs: list[dict], groups: dict, datasets: list[str], scores: dict) -> str:
    """Our scripts next to d3rlpy's (runs named d3rlpy_{algo}): final score and steps/second, '' if none."""
    ours = [a for a in ("iql", "cql", "bcq") if any(r["algo"] == f"d3rlpy_{a}" for r in runs)]
    if not ours:
        return ""

    def cell(d: str, a: str) -> str:
        g = groups.get((d, a), [])
        final = np.array([r["score"][-1] for r in g])
        return f"{final.mean():.1f} ± {final.std():.1f} (n={len(g)})" if g else "-"

    lines = ["| dataset | data | " + " | ".join(f"{a} | d3rlpy {a}" for a in ours) + " |",
             "|---|---|" + "---|---|" * len(ours)]
    lines += [f"| {d} | {scores[d]:.1f} | " + " | ".join(f"{cell(d, a)} | {cell(d, f'd3rlpy_{a}')}" for a in ours)
              + " |" for d in datasets]
    speed = ["| algorithm | action space | ours steps/s | d3rlpy steps/s | ours / d3rlpy |", "|---|---|---|---|---|"]
    for a in ours:
        for kind, box in (("Box", True), ("Discrete", False)):
            sps = [np.median([r["sps"] for r in runs if r["algo"] == name and is_box(r["dataset"]) == box
                              and np.isfinite(r["sps"])] or [np.nan]) for name in (a, f"d3rlpy_{a}")]
            if np.isfinite(sps).any():
                ours_s, theirs_s, ratio = (f"{x:{f}}" if np.isfinite(x) else "-"
                                           for x, f in ((sps[0], ".0f"), (sps[1], ".0f"), (sps[0] / sps[1], ".2f")))
                speed.append(f"| {a} | {kind} | {ours_s} | {theirs_s} | {ratio} |")
    return ("\n## Side by side with d3rlpy\n\nFinal normalized score, mean ± std over seeds ('-': no run; d3rlpy "
            "has no discrete IQL). Same data, gradient steps, batch size, network sizes, hyperparameters and "
            "evaluation episodes (benchmark/d3rlpy_run.py lists what is matched and what cannot be).\n\n"
            + "\n".join(lines) + "\n\nMedian steps/second per run, from the runs above (same machine, same "
            "session, interleaved in one queue: rough ratios, as the load varies with what runs beside).\n\n"
            + "\n".join(speed) + "\n")


BOOT_REPS, BOOT_SEED = 10_000, 0  # stratified-bootstrap resamples for the intervals, and their fixed seed


def final_scores(groups: dict, algo: str, tasks: list[str]) -> list[np.ndarray]:
    """The final normalized score of each run of `algo`, one array per dataset in `tasks`."""
    return [np.array([r["score"][-1] for r in groups[(d, algo)]]) for d in tasks]


def across_datasets(groups: dict, algos: list[str], datasets: list[str], profile_path: Path) -> str:
    """results.md's section of aggregate statistics over datasets (Agarwal et al. 2021, benchmark/stats.py): IQM
    and mean of the final scores with stratified-bootstrap 95% intervals, over the datasets every algorithm ran
    (and over the rest for the algorithms that ran all of them);
    the probability of improvement of each pair over the datasets both ran; performance profiles drawn to
    `profile_path`. '' when no dataset was run by every algorithm."""
    order = sorted(algos, key=lambda a: (a.startswith("d3rlpy_"), a))  # ours first: pairs read "ours vs d3rlpy"
    common = [d for d in datasets if all((d, a) in groups for a in algos)]
    if not common:
        return ""
    left_out = [d for d in datasets if d not in common]
    text = (f"\n## Across datasets\n\nFinal normalized score over the {len(common)} dataset(s) that every "
            f"algorithm ran ({', '.join(common)}), all runs pooled: the interquartile mean (IQM, the mean of the "
            "middle half of the runs: robust to one outlying run) and the mean, each with a 95% percentile interval "
            f"from a stratified bootstrap ({BOOT_REPS:,} resamples of the seeds within each dataset, never across; "
            f"seed {BOOT_SEED}), after Agarwal et al. (2021). The interval reflects the spread over seeds on these "
            "datasets, not the choice of datasets; a dataset with one seed adds no width. benchmark/stats.py, "
            "docs/selection.md.\n\n" + iqm_table(groups, order, common))
    if left_out:
        text += f"\nLeft out here (not run by every algorithm): {', '.join(left_out)}.\n"
        # the same statistics over the left-out datasets, for the algorithms that ran all of them (Box CQL
        # skipped in `choosing` still leaves BC against IQL on every Pendulum dataset)
        rest = [a for a in order if all((d, a) in groups for d in left_out)]
        if rest:
            text += (f"\nOver those {len(left_out)} dataset(s), the algorithms that ran all of them, the same "
                     "way:\n\n" + iqm_table(groups, rest, left_out))
    text += pairs_table(groups, order, datasets)
    plot_profiles(groups, order, common, profile_path)
    return text + ("\nPerformance profiles (the fraction of runs whose final normalized score is above tau, with "
                   f"95% stratified-bootstrap bands, over the datasets every algorithm ran): {profile_path.name}.\n")


def iqm_table(groups: dict, order: list[str], tasks: list[str]) -> str:
    """One row per algorithm: its runs on `tasks`, and the IQM and mean of their final scores with
    stratified-bootstrap 95% intervals."""
    rows = ["| algorithm | runs | IQM [95% CI] | mean [95% CI] |", "|---|---|---|---|"]
    for a in order:
        finals = final_scores(groups, a, tasks)
        cells = [fmt_ci(*bootstrap_ci(finals, stat, BOOT_REPS, BOOT_SEED), single=single_seeds(finals))
                 for stat in (iqm, mean)]
        rows.append(f"| {a} | {sum(len(t) for t in finals)} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows) + "\n"


def pairs_table(groups: dict, order: list[str], datasets: list[str]) -> str:
    """The probability of improvement P(X > Y) of each pair of algorithms, over the datasets both ran."""
    rows = ["| X | Y | datasets | P(X > Y) [95% CI] |", "|---|---|---|---|"]
    for i, x in enumerate(order):
        for y in order[i + 1:]:
            both = [d for d in datasets if (d, x) in groups and (d, y) in groups]
            if both:
                ci = probability_of_improvement_ci(final_scores(groups, x, both), final_scores(groups, y, both),
                                                   BOOT_REPS // 5, BOOT_SEED)
                single = single_seeds(final_scores(groups, x, both) + final_scores(groups, y, both))
                rows.append(f"| {x} | {y} | {len(both)} | {fmt_ci(*ci, digits=2, single=single)} |")
    if len(rows) == 2:
        return ""
    return ("\nProbability of improvement: the chance that a run of X scores above a run of Y on the same dataset "
            "(final scores; every pair of their runs compared, ties counting half), averaged over the datasets both "
            f"ran; 0.5 is no difference. 95% interval from a stratified bootstrap ({BOOT_REPS // 5:,} resamples of "
            "each algorithm's seeds within each dataset).\n\n" + "\n".join(rows) + "\n")


def single_seeds(tasks: list[np.ndarray]) -> bool:
    """Whether every dataset has one run: then the seeds' bootstrap has nothing to resample."""
    return all(len(t) == 1 for t in tasks)


def fmt_ci(point: float, lo: float, hi: float, digits: int = 1, single: bool = False) -> str:
    """'12.3 [10.1, 14.0]', or '12.3 (one seed per dataset: no interval)'."""
    if single:
        return f"{point:.{digits}f} (one seed per dataset: no interval)"
    return f"{point:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def plot_profiles(groups: dict, order: list[str], common: list[str], path: Path) -> None:
    """Performance profiles of the final scores on the `common` datasets, one line per algorithm with its 95%
    band; d3rlpy's dashed in the colour of ours, as in curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = {a: final_scores(groups, a, common) for a in order}
    every = np.concatenate([np.concatenate(t) for t in finals.values()])
    taus = np.linspace(every.min() - 1, every.max() + 1, 201)
    base = sorted({a.removeprefix("d3rlpy_") for a in order})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for a in order:
        profile, lo, hi = performance_profile_ci(finals[a], taus, BOOT_REPS // 5, BOOT_SEED)
        colour, ls = f"C{base.index(a.removeprefix('d3rlpy_'))}", "--" if a.startswith("d3rlpy_") else "-"
        ax.plot(taus, profile, color=colour, ls=ls, label=f"{a.replace('_', ' ')} ({sum(map(len, finals[a]))} runs)")
        ax.fill_between(taus, lo, hi, color=colour, alpha=0.15)
    ax.set_xlabel("normalized score tau (final evaluation)")
    ax.set_ylabel("fraction of runs with score > tau")
    ax.set_title(f"{len(common)} dataset(s): {', '.join(common)}" if len(common) <= 3 else f"{len(common)} datasets",
                 fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def plot(groups, algos, datasets, data_scores, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.FuncFormatter below)

    cols = min(4, len(datasets))
    rows = -(-len(datasets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, d in zip(axes.flat, datasets):
        base = sorted({a.removeprefix("d3rlpy_") for a in algos})
        for a in algos:
            g = groups.get((d, a))
            if not g:
                continue
            i, ls = base.index(a.removeprefix("d3rlpy_")), "--" if a.startswith("d3rlpy_") else "-"
            n = min(len(r["score"]) for r in g)
            steps = g[0]["steps"][:n]
            scores = np.stack([r["score"][:n] for r in g])
            ax.plot(steps, scores.mean(0), label=a.replace("_", " "), color=f"C{i}", ls=ls)
            ax.fill_between(steps, scores.mean(0) - scores.std(0), scores.mean(0) + scores.std(0), alpha=0.2,
                            color=f"C{i}")
        if np.isfinite(data_scores[d]):
            ax.axhline(data_scores[d], color="black", lw=1, ls=":", label="data")
        ax.set_title(d, fontsize=9)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalized score")
        ax.axhline(100, color="grey", lw=0.5, ls="--")
        ax.axhline(0, color="grey", lw=0.5, ls="--")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("folder", nargs="?", default="benchmark/results/small", type=Path)
    cli.add_argument("--stats-only", action="store_true",
                     help="only (re)write results.md's 'Across datasets' section and profiles.png")
    opts = cli.parse_args()
    (stats_only if opts.stats_only else main)(opts.folder)
