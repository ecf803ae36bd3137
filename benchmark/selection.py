"""Budgeted policy selection (Jackson et al. 2025, "A Clean Slate for Offline Reinforcement Learning", Unifloral):
how many online evaluation episodes it takes to pick a good policy out of K trained with sampled hyperparameters,
with a UCB bandit alone and with the bandit seeded by an off-policy estimate (ope.py's FQE or MB). docs/selection.md.

    python benchmark/selection.py train --methods iql --datasets pendulum-medium --policies 16 --total-steps 2000
    python benchmark/selection.py analyse benchmark/results/selection

(named selection.py, not select.py: a benchmark/select.py would shadow Python's own `select` module, which
subprocess imports, whenever benchmark/ is first on the path, as it is when a script here runs.)

`train` (slow; resumable; one torch thread per process): for each method and dataset, P policies, policy i trained
by the method's script with hyperparameters drawn from the method's ranges (METHODS) and seed i + 1, saved with
--save-model, then run for --episodes episodes (seeds seed + 100 + j, as `--load-model` does) and written to
policies/{method}__{dataset}__{i}.json as soon as it is scored; then one `ope.py` call values all P (the same
behaviour and dynamics models for every arm) and its FQE and MB estimates are added to those files, with the
dataset's calibration (calibration/{dataset}.json: FQE estimates a discounted return, the bandit's arms pay
normalized scores; the map between the two is a least-squares line fitted on the dataset's own episodes).

`analyse` (fast; numpy on those JSON files): for each method and dataset, draws K of the P policies many times,
runs the bandit on each draw, where a pull is one episode's normalized score drawn (with replacement) from the
chosen policy's recorded episodes, and after every pull n records the true score (mean over all its recorded
episodes) of the policy the bandit then rates best. Writes selection.md, selection.json and selection.png.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmark" / "results" / "selection"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# ---- Methods: an algorithm and a sampling range per hyperparameter, fixed across datasets --------------------------

@dataclass(frozen=True)
class Range:
    """A hyperparameter's sampling range: uniform on [low, high], or log-uniform when `log`."""

    low: float
    high: float
    log: bool = False

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        return float(rng.uniform(self.low, self.high))


# Unifloral's IQL sweep (configs/unifloral/iql.yaml) is beta in {0.5, 3, 10} and expectile in {0.5, 0.7, 0.9}; the
# ranges below span those grids and this project's defaults (beta 0.3 on the discrete data, docs/iql.md; CQL alpha
# 1 Discrete / 5 Box; BCQ threshold 0.3, phi 0.05). The flag names are the scripts' own (underscores as dashes).
METHODS: dict[str, tuple[str, dict[str, Range]]] = {
    "iql": ("iql", {"beta": Range(0.3, 10.0, log=True), "expectile": Range(0.5, 0.9),
                    "learning_rate": Range(1e-4, 1e-3, log=True)}),
    "cql": ("cql", {"cql_alpha": Range(0.5, 10.0, log=True), "actor_lr": Range(3e-5, 3e-4, log=True),
                    "critic_lr": Range(1e-4, 1e-3, log=True)}),
    # bcq_threshold acts on Discrete data only, phi on Box only: both are drawn, the script uses its one
    "bcq": ("bcq", {"bcq_threshold": Range(0.05, 0.5), "phi": Range(0.02, 0.5, log=True)}),
}
OPE_FLAGS = "--fqe-steps 10000 --fqe-tau 0.01 --mb-steps 5000 --bootstrap 200"


def sample_hyperparameters(method: str, index: int, seed: int) -> dict[str, float]:
    """Policy `index`'s hyperparameters: drawn from its own stream, so adding policies leaves the earlier ones, and
    every dataset gets the same P settings."""
    rng = np.random.default_rng([seed, index])
    return {name: float(f"{r.sample(rng):.6g}") for name, r in METHODS[method][1].items()}  # 6 significant digits


# ---- train: the scripts, the evaluation of each saved policy, ope.py ------------------------------------------------

def policy_path(out: Path, method: str, dataset: str, index: int) -> Path:
    return out / "policies" / f"{method}__{dataset}__{index:02d}.json"


def train_one(out: Path, method: str, dataset: str, index: int, args: argparse.Namespace) -> Path:
    """Train policy `index` (skipped if its checkpoint exists), score it over args.episodes episodes, and write its
    JSON (skipped entirely when that exists)."""
    path = policy_path(out, method, dataset, index)
    if path.exists():
        return path
    script, seed = METHODS[method][0], index + 1
    hps = sample_hyperparameters(method, index, args.seed)
    name = f"sel-{method}-{index:02d}"
    pattern = str(out / "runs" / f"{dataset}__{name}__{seed}__*" / f"{script}.pt")
    t0, trained = time.time(), not glob.glob(pattern)
    if trained:
        cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset", dataset, "--seed", str(seed), "--total-steps",
               str(args.total_steps), "--eval-episodes", "0", "--save-model", "--exp-name", name,
               "--device", args.device, *[x for k, v in hps.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
        run_logged(cmd, out, out / "logs" / f"{path.stem}.train.log")
    checkpoint = sorted(glob.glob(pattern))[-1]
    train_s = round(time.time() - t0) if trained else None  # None: trained by an earlier, interrupted call
    scored = path.with_suffix(".eval.json")
    run_logged([sys.executable, __file__, "evaluate", checkpoint, "--episodes", str(args.episodes), "--seed",
                str(seed + 100), "--device", args.device, "--json", str(scored)], out,
               out / "logs" / f"{path.stem}.eval.log")
    record = dict(method=method, dataset=dataset, index=index, seed=seed, hyperparameters=hps,
                  total_steps=args.total_steps, checkpoint=os.path.relpath(checkpoint, out), train_s=train_s,
                  **json.loads(scored.read_text()))
    write_json(path, record)
    scored.unlink()
    print(f"{path.name}: {record['mean_normalized']:.1f} over {len(record['normalized'])} episodes "
          f"({', '.join(f'{k} {v:g}' for k, v in hps.items())})", flush=True)
    return path


def run_logged(cmd: list[str], cwd: Path, log: Path) -> None:
    """Run `cmd` in `cwd` with one thread, its output to `log`; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {proc.returncode}); log {log}:\n"
                           + log.read_text()[-2000:])


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (a killed run leaves the old file or none, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def evaluate_checkpoint(checkpoint: str, episodes: int, seed: int, device: str) -> dict:
    """Per-episode returns and normalized scores of a saved policy (its script's load_policy, common.evaluate)."""
    import importlib

    import torch

    sys.path.insert(0, str(ROOT))
    from common import evaluate
    from datasets import load_checkpoint, load_dataset, pick_device

    torch.set_num_threads(1)
    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, dev)
    policy = importlib.import_module(ckpt["algo"]).load_policy(checkpoint, dev)
    ds = load_dataset(ckpt["args"]["dataset"])
    t0 = time.time()
    ev = evaluate(ds, policy.act, episodes, seed, dev)
    normalized = np.asarray(ds.normalized_score(ev.returns), dtype=float)
    return dict(eval_seed=seed, eval_s=round(time.time() - t0), returns=[round(float(x), 3) for x in ev.returns],
                normalized=[round(float(x), 3) for x in normalized], mean_normalized=float(normalized.mean()))


def calibration(dataset: str, discount: float) -> dict:
    """The least-squares line from an episode's discounted return to its normalized score, over the dataset's own
    episodes: how an FQE estimate (discounted) becomes a prior in the bandit's units (normalized score)."""
    sys.path.insert(0, str(ROOT))
    from datasets import load_dataset

    ds = load_dataset(dataset)
    ends = ds.episode_ends()
    starts = np.concatenate([[0], ends[:-1] + 1])
    disc = np.array([np.sum(ds.rewards[s:e + 1] * discount ** np.arange(e + 1 - s)) for s, e in zip(starts, ends)])
    norm = np.asarray(ds.normalized_score(ds.episode_returns()), dtype=float)
    slope, intercept = np.polyfit(disc, norm, 1)
    r2 = 1 - np.sum((norm - (slope * disc + intercept)) ** 2) / np.sum((norm - norm.mean()) ** 2)
    return dict(dataset=dataset, discount=discount, slope=float(slope), intercept=float(intercept), r2=float(r2),
                episodes=len(ends))


def ope_json(checkpoint: str) -> list[Path]:
    """ope.py's JSON files for a checkpoint, oldest first: {policy}.ope.json, or {policy}.{dataset}.ope.json as its
    --out names them now (either: this reads whichever ope.py wrote)."""
    return sorted((Path(p) for p in glob.glob(glob.escape(checkpoint) + "*.ope.json")), key=lambda p: p.stat().st_mtime)


def add_ope(out: Path, paths: list[Path], args: argparse.Namespace) -> None:
    """One ope.py call on every policy of `paths` without estimates yet; FQE and MB added to their JSON files."""
    records = {p: json.loads(p.read_text()) for p in paths}
    todo = [p for p, r in records.items() if "ope" not in r]
    if not todo:
        return
    dataset = records[todo[0]]["dataset"]
    checkpoints = [str(out / records[p]["checkpoint"]) for p in todo]
    missing = [c for c in checkpoints if not ope_json(c)]
    if missing:
        cmd = [sys.executable, str(ROOT / "ope.py"), "--dataset", dataset, "--device", args.device,
               *shlex.split(args.ope_flags), *[x for c in missing for x in ("--policy", c)]]
        print(f"ope.py on {len(missing)} {dataset} policies ...", flush=True)
        run_logged(cmd, out, out / "logs" / f"ope__{todo[0].stem.rsplit('__', 1)[0]}__{len(todo)}.log")
    for p, c in zip(todo, checkpoints):
        res = json.loads(ope_json(c)[-1].read_text())
        keep = ("discounted", "undiscounted", "normalized", "ci_discounted", "ci_normalized", "skipped")
        records[p]["ope"] = dict(discount=res["discount"], warnings=res.get("warnings", []),
                                 **{k: {f: res["estimates"][k].get(f) for f in keep} for k in ("FQE", "MB")})
        write_json(p, records[p])
    cal = out / "calibration" / f"{dataset}.json"
    if not cal.exists():
        write_json(cal, calibration(dataset, records[todo[0]]["ope"]["discount"]))


def check_config(out: Path, args: argparse.Namespace) -> None:
    """config.json: what every policy of the folder shares (ranges, steps, episodes, seeds, OPE flags). A folder
    holds one experiment: more methods, datasets or policies may be added to it, but not other settings."""
    fixed = dict(ranges={m: {k: vars(r) for k, r in rs.items()} for m, (_, rs) in METHODS.items()},
                 total_steps=args.total_steps, episodes=args.episodes, seed=args.seed, ope_flags=args.ope_flags)
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in fixed if old.get(k) != fixed[k]]
        if changed:
            raise SystemExit(f"{out} holds an experiment with other {', '.join(changed)} ({path}): use another --out")
        fixed.update(methods=sorted(set(old["methods"]) | set(args.methods)),
                     datasets=sorted(set(old["datasets"]) | set(args.datasets)))
    else:
        fixed.update(methods=sorted(args.methods), datasets=sorted(args.datasets))
    write_json(path, fixed)


def train(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()  # the subprocesses run in it
    check_config(out, args)
    for dataset in args.datasets:
        for method in args.methods:
            with ThreadPoolExecutor(args.workers) as pool:  # each job is two subprocesses: train, then evaluate
                jobs = [pool.submit(train_one, out, method, dataset, i, args) for i in range(args.policies)]
                try:
                    paths = [job.result() for job in jobs]
                except BaseException:  # the first failure stops the queue (a rerun resumes from the files)
                    pool.shutdown(cancel_futures=True)
                    raise
            if args.ope:
                add_ope(out, paths, args)


# ---- analyse: pure numpy on the JSON files --------------------------------------------------------------------------

def argmax_random(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row-wise argmax, ties broken uniformly at random (an all -inf row picks any column)."""
    best = values == values.max(axis=1, keepdims=True)
    return np.where(best, rng.random(values.shape), -1.0).argmax(axis=1)


def rated_best(counts: np.ndarray, sums: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The arm each bandit rates best: the highest mean (prior pseudo-observations included); an arm with nothing
    observed and no prior is never preferred to one with (with nothing anywhere: a uniform pick)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return argmax_random(np.where(counts > 0, sums / counts, -np.inf), rng)


def run_bandit(scores: np.ndarray, arms: np.ndarray, max_pulls: int, rng: np.random.Generator,
               prior: np.ndarray | None = None, prior_weight: float = 0.0, alpha: float = 2.0,
               scale: float = 1.0) -> np.ndarray:
    """UCB over the K policies of each row of `arms` (D draws x K indices into scores' rows); scores is (P, E),
    the recorded per-episode normalized scores. Pull t (t = 1..max_pulls) plays the arm with the highest
    mean + scale * sqrt(alpha * ln t / count) (an arm never pulled first), and is paid one of its episodes drawn
    at random. With a `prior` (P,), each arm starts with `prior_weight` pseudo-episodes of its prior value, so
    count = prior_weight + pulls and mean = (prior_weight * prior + sum of rewards) / count. Returns (D,
    max_pulls + 1): the index (into scores' rows) of the policy rated best after 0, 1, ... max_pulls pulls."""
    draws, k = arms.shape
    rows = np.arange(draws)
    counts, sums = np.zeros((draws, k)), np.zeros((draws, k))
    if prior is not None and prior_weight > 0:
        counts += prior_weight
        sums += prior_weight * prior[arms]
    picks = np.empty((draws, max_pulls + 1), dtype=int)
    picks[:, 0] = arms[rows, rated_best(counts, sums, rng)]
    for t in range(1, max_pulls + 1):
        with np.errstate(divide="ignore", invalid="ignore"):
            index = np.where(counts > 0, sums / counts + scale * np.sqrt(alpha * np.log(t) / counts), np.inf)
        arm = argmax_random(index, rng)
        reward = scores[arms[rows, arm], rng.integers(0, scores.shape[1], size=draws)]
        counts[rows, arm] += 1
        sums[rows, arm] += reward
        picks[:, t] = arms[rows, rated_best(counts, sums, rng)]
    return picks


def draw_arms(n_policies: int, k: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """`draws` random subsets of k of the n_policies policies (without replacement within a subset)."""
    return np.argsort(rng.random((draws, n_policies)), axis=1)[:, :k]


def episodes_within(gap: np.ndarray, within: float) -> int | None:
    """The first number of episodes from which on the mean gap to the best of the K stays within `within`
    normalized points; None if it never does in the budget."""
    above = np.flatnonzero(gap > within)
    if len(above) == 0:
        return 0
    return None if above[-1] == len(gap) - 1 else int(above[-1] + 1)


def selection_curves(scores: np.ndarray, priors: dict[str, np.ndarray], k: int = 8, max_pulls: int = 200,
                     draws: int = 1000, seed: int = 0, prior_weights: tuple[float, ...] = (1.0,), alpha: float = 2.0,
                     scale: float = 1.0, within: float = 5.0) -> dict:
    """The selection curves of one method on one dataset: the plain bandit and, for each prior and weight, the
    seeded one, all on the same draws of K policies (a paired comparison). Each curve: the mean over draws of the
    true score of the pick after n = 0..max_pulls episodes, its 95% interval (normal approximation over the draws),
    the mean gap to the best of the K, and the episodes until that gap stays within `within` points."""
    true = scores.mean(axis=1)
    arms = draw_arms(len(scores), k, draws, np.random.default_rng([seed, 0]))
    best_of_k = true[arms].max(axis=1)
    variants = {"bandit": (None, 0.0)}
    variants.update({f"{name} prior, weight {w:g}": (p, w) for name, p in priors.items() for w in prior_weights})
    curves = {}
    for label, (prior, weight) in variants.items():
        picks = run_bandit(scores, arms, max_pulls, np.random.default_rng([seed, 1]), prior, weight, alpha, scale)
        picked = true[picks]  # (draws, max_pulls + 1)
        half = 1.96 * picked.std(axis=0, ddof=1) / np.sqrt(draws)
        gap = (best_of_k[:, None] - picked).mean(axis=0)
        curves[label] = dict(mean=picked.mean(axis=0), lo=picked.mean(axis=0) - half, hi=picked.mean(axis=0) + half,
                             gap=gap, episodes_within=episodes_within(gap, within))
    return dict(curves=curves, best_of_k=float(best_of_k.mean()), mean_of_k=float(true.mean()))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected among real-valued estimates)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def load_groups(folder: Path) -> dict[tuple[str, str], list[dict]]:
    """The policy records of the folder, by (method, dataset), in index order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted((folder / "policies").glob("*__*__*.json")):
        r = json.loads(path.read_text())
        groups.setdefault((r["method"], r["dataset"]), []).append(r)
    return groups


def priors_of(records: list[dict], cal: dict | None) -> dict[str, np.ndarray]:
    """Each OPE estimate as a prior in normalized points, where every policy has one: MB's own normalized
    estimate; FQE's discounted estimate through the dataset's calibration line."""
    priors = {}
    if all(r.get("ope", {}).get("MB", {}).get("normalized") is not None for r in records):
        priors["MB"] = np.array([r["ope"]["MB"]["normalized"] for r in records])
    if cal and all(r.get("ope", {}).get("FQE", {}).get("discounted") is not None for r in records):
        priors["FQE"] = np.array([cal["slope"] * r["ope"]["FQE"]["discounted"] + cal["intercept"] for r in records])
    return priors


def analyse(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    groups = load_groups(folder)
    if not groups:
        raise SystemExit(f"no policies/*.json under {folder}: run `selection.py train` first")
    results, md = {}, []
    for (method, dataset), records in sorted(groups.items()):
        if len(records) < args.k:
            print(f"{method} on {dataset}: {len(records)} policies, fewer than K = {args.k}: skipped")
            continue
        n_ep = min(len(r["normalized"]) for r in records)
        scores = np.array([r["normalized"][:n_ep] for r in records])
        cal_path = folder / "calibration" / f"{dataset}.json"
        cal = json.loads(cal_path.read_text()) if cal_path.exists() else None
        priors = priors_of(records, cal)
        res = selection_curves(scores, priors, args.k, args.max_pulls, args.draws, args.seed,
                               tuple(args.prior_weights), args.ucb_alpha, args.ucb_scale, args.within)
        res.update(policies=len(records), episodes=n_ep, calibration=cal, true=scores.mean(axis=1).tolist(),
                   spearman={name: spearman(p, scores.mean(axis=1)) for name, p in priors.items()})
        results[f"{method}__{dataset}"] = res
        md.append(summary_rows(method, dataset, res, args))
    write_outputs(folder, results, md, args)


def summary_rows(method: str, dataset: str, res: dict, args: argparse.Namespace) -> str:
    """One method and dataset's part of selection.md."""
    at = [n for n in (0, args.k, 50, args.max_pulls) if n <= args.max_pulls]
    lines = [f"### {method} on {dataset}\n",
             f"{res['policies']} policies, {res['episodes']} recorded episodes each; K = {args.k}, {args.draws} draws. "
             f"True scores of the policies: {min(res['true']):.1f} to {max(res['true']):.1f}; the best of K "
             f"averages {res['best_of_k']:.1f}, a random one of them {res['mean_of_k']:.1f}."
             + "".join(f" {name}: Spearman {rho:.2f} with the true scores." for name, rho in res["spearman"].items())
             + "\n", "| selection | " + " | ".join(f"after {n} episodes" for n in at)
             + f" | episodes until within {args.within:g} points of the best of K |",
             "|---|" + "---|" * (len(at) + 1)]
    for label, c in res["curves"].items():
        cells = [f"{c['mean'][n]:.1f} [{c['lo'][n]:.1f}, {c['hi'][n]:.1f}]" for n in at]
        e = c["episodes_within"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {e if e is not None else f'> {args.max_pulls}'} |")
    return "\n".join(lines) + "\n"


def write_outputs(folder: Path, results: dict, md: list[str], args: argparse.Namespace) -> None:
    """selection.json (every curve), selection.md (the tables) and selection.png (the curves)."""
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "folder")}
    (folder / "selection.json").write_text(json.dumps(dict(settings=settings, results=results), indent=1,
                                                      default=lambda a: np.round(a, 3).tolist()))
    (folder / "selection.md").write_text(
        f"# Budgeted selection: {folder.name}\n\nTrue score (mean normalized score over all recorded episodes) of "
        f"the policy the bandit rates best after n episodes, mean over {args.draws} random draws of K = {args.k} "
        "policies, 95% interval (normal approximation over the draws). 'bandit': UCB alone (n = 0: a random "
        f"policy); 'X prior, weight w': each arm starts with w pseudo-episodes worth its OPE estimate X (n = 0: "
        f"the pick of OPE alone). UCB alpha {args.ucb_alpha:g}, scale {args.ucb_scale:g} normalized points; seed "
        f"{args.seed}. docs/selection.md.\n\n" + "\n".join(md))
    plot_curves(results, folder / "selection.png")
    print((folder / "selection.md").read_text())


def plot_curves(results: dict, path: Path) -> None:
    """One panel per method and dataset: every selection curve with its band, and the best of K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes.flat, results.items()):
        for i, (label, c) in enumerate(res["curves"].items()):
            n = np.arange(len(c["mean"]))
            ax.plot(n, c["mean"], color=f"C{i}", label=label)
            ax.fill_between(n, c["lo"], c["hi"], color=f"C{i}", alpha=0.2)
        ax.axhline(res["best_of_k"], color="black", ls=":", lw=1, label="best of K")
        ax.set_title(name.replace("__", " on "), fontsize=9)
        ax.set_xlabel("online evaluation episodes")
        ax.set_ylabel("true score of the pick")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = cli.add_subparsers(required=True)
    t = sub.add_parser("train", help="train, score and value P policies per method and dataset (slow, resumable)")
    t.add_argument("--methods", nargs="+", default=["iql"], choices=sorted(METHODS))
    t.add_argument("--datasets", nargs="+", default=["pendulum-medium"])
    t.add_argument("--policies", type=int, default=16, help="P, policies per method and dataset")
    t.add_argument("--total-steps", type=int, default=50_000, help="gradient steps of each policy")
    t.add_argument("--episodes", type=int, default=100, help="evaluation episodes recorded per policy")
    t.add_argument("--seed", type=int, default=0, help="seed of the hyperparameter draws")
    t.add_argument("--workers", type=int, default=1, help="policies trained at once (one core each)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--ope", action=argparse.BooleanOptionalAction, default=True, help="value the policies with ope.py")
    t.add_argument("--ope-flags", default=OPE_FLAGS, help="flags for ope.py (default: %(default)s)")
    t.add_argument("--out", default=str(OUT))
    t.set_defaults(func=train)
    e = sub.add_parser("evaluate", help="per-episode scores of one checkpoint, as JSON")
    e.add_argument("checkpoint")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--seed", type=int, default=101)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", required=True)
    e.set_defaults(func=lambda a: write_json(Path(a.json), evaluate_checkpoint(a.checkpoint, a.episodes, a.seed,
                                                                               a.device)))
    a = sub.add_parser("analyse", help="bandit selection curves from the JSON files (fast)")
    a.add_argument("folder", nargs="?", default=str(OUT))
    a.add_argument("--k", type=int, default=8, help="K, policies the bandit chooses among")
    a.add_argument("--max-pulls", type=int, default=200, help="online episodes, the curve's length")
    a.add_argument("--draws", type=int, default=1000, help="random draws of K policies")
    a.add_argument("--prior-weights", type=float, nargs="+", default=[1.0, 5.0],
                   help="pseudo-episodes each OPE prior counts as")
    a.add_argument("--ucb-alpha", type=float, default=2.0)
    a.add_argument("--ucb-scale", type=float, default=1.0, help="normalized points per unit of the UCB bonus")
    a.add_argument("--within", type=float, default=5.0, help="normalized points from the best of K")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=analyse)
    args = cli.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
