"""Aggregate statistics across datasets, after Agarwal et al. (2021), "Deep RL at the Edge of the Statistical
Precipice": the interquartile mean (IQM), percentile confidence intervals from a stratified bootstrap (seeds
resampled within each dataset, never across), performance profiles and the probability of improvement.

The scores of one algorithm are a list of arrays, one per dataset ("task"), each holding that dataset's runs
(one normalized score per seed); tasks may have different numbers of runs. Everything is plain numpy and
deterministic under its `seed`. rliable (the authors' library) does the same but is archived, and
scipy.stats.bootstrap has no stratified resampling, so these few functions are written out here and each is
checked against a hand-computed answer in tests/test_stats.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Tasks = Sequence[np.ndarray]  # one 1-D array of run scores per task


def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Interquartile mean along `axis`: the mean of the middle half after cutting floor(n / 4) values off each
    end (scipy.stats.trim_mean(x, 0.25), which rliable uses). IQM of 1..8 is the mean of 3..6 = 4.5."""
    x = np.sort(np.asarray(x, dtype=float), axis=axis)
    n = x.shape[axis]
    cut = int(0.25 * n)
    return np.take(x, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def mean(x: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """The plain mean, with iqm's signature (a statistic for `bootstrap_ci`)."""
    return np.asarray(x, dtype=float).mean(axis=axis)


def stratified_resample(tasks: Tasks, reps: int, rng: np.random.Generator) -> np.ndarray:
    """(reps, total runs): each row draws, for every task independently, as many runs as it has, with replacement,
    from that task's runs only; columns keep the tasks' order (task 0's runs first). A task with one run always
    gives that run: the spread reflects the seeds, never the choice of tasks."""
    blocks = [np.asarray(t, dtype=float)[rng.integers(0, len(t), size=(reps, len(t)))] for t in tasks]
    return np.concatenate(blocks, axis=1)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The (lower, upper) percentile interval of bootstrap `samples` along axis 0."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail], axis=0)
    return lo, hi


def bootstrap_ci(tasks: Tasks, statistic: Callable = iqm, reps: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(point, lower, upper): `statistic` of all runs pooled across tasks, and its stratified-bootstrap percentile
    interval."""
    pooled = np.concatenate([np.asarray(t, dtype=float) for t in tasks])
    samples = statistic(stratified_resample(tasks, reps, np.random.default_rng(seed)), axis=1)
    lo, hi = percentile_ci(samples, level)
    return float(statistic(pooled)), float(lo), float(hi)


def performance_profile(tasks: Tasks, taus: np.ndarray) -> np.ndarray:
    """Fraction of all runs (pooled across tasks) whose score is above each tau (Agarwal et al.'s run-score
    distribution)."""
    pooled = np.concatenate([np.asarray(t, dtype=float) for t in tasks])
    return (pooled[:, None] > np.asarray(taus)[None, :]).mean(axis=0)


def performance_profile_ci(tasks: Tasks, taus: np.ndarray, reps: int = 2_000, seed: int = 0,
                           level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(profile, lower, upper) at each tau, the band from the stratified bootstrap."""
    samples = stratified_resample(tasks, reps, np.random.default_rng(seed))  # (reps, runs)
    fractions = (samples[:, :, None] > np.asarray(taus)[None, None, :]).mean(axis=1)  # (reps, taus)
    lo, hi = percentile_ci(fractions, level)
    return performance_profile(tasks, taus), lo, hi


def prob_greater(x: np.ndarray, y: np.ndarray) -> np.ndarray | float:
    """P(X > Y) for one task: over all pairs (x_i, y_j), 1 when x_i > y_j, 0.5 when tied, 0 when below. Works on
    the last axis, so x (reps, n) and y (reps, m) give one value per row."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diff = x[..., :, None] - y[..., None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-2, -1))


def probability_of_improvement(xs: Tasks, ys: Tasks) -> float:
    """P(X > Y) averaged over tasks (each task counts once, whatever its number of runs); xs[i] and ys[i] are
    the two algorithms' runs on the same task."""
    return float(np.mean([prob_greater(x, y) for x, y in zip(xs, ys, strict=True)]))


def probability_of_improvement_ci(xs: Tasks, ys: Tasks, reps: int = 2_000, seed: int = 0,
                                  level: float = 0.95) -> tuple[float, float, float]:
    """(point, lower, upper): the probability of improvement and its stratified-bootstrap interval (the runs of
    X and of Y each resampled within every task, independently)."""
    rng = np.random.default_rng(seed)
    per_task = []
    for x, y in zip(xs, ys, strict=True):
        rx, ry = stratified_resample([x], reps, rng), stratified_resample([y], reps, rng)
        per_task.append(prob_greater(rx, ry))
    lo, hi = percentile_ci(np.mean(per_task, axis=0), level)
    return probability_of_improvement(xs, ys), float(lo), float(hi)
