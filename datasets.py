"""Offline RL datasets: built-in recipes (generated locally, no download), `.npz` files and Minari ids.

    python datasets.py lunarlander-medium        # print a report on one dataset
    python datasets.py --all                      # report every built-in dataset
    python datasets.py --list                     # list the built-in names

A dataset is row-aligned transitions (s, a, r, s', terminal, timeout). A *terminal* is a true end of the
MDP (no bootstrapping from s'); a *timeout* is a time-limit cut (s' is a real state, bootstrapping continues).
Every built-in dataset also stores `behavior_log_probs`: the exact log-density (Box) or log-probability
(Discrete) of each stored action under the behaviour policy that produced it; `ope.py` needs these.

Behaviour policies are one family, parameterised per episode by (eps, sigma):
    with probability eps:   an action drawn uniformly from the action space
    otherwise (Box):        the expert action plus Gaussian noise of std sigma * (high - low) / 2,
                            *truncated* to the action box by resampling (so the density is exact)
    otherwise (Discrete):   the expert action
random: eps = 1;  expert: small noise;  medium: eps tuned so the return sits 30-60% of the way from
random to expert;  medium-expert: half medium episodes, half expert;  mixed: eps annealed from 1 to the
medium value across episodes (the analogue of a learning run's replay buffer).

The MuJoCo locomotion datasets (hopper, halfcheetah and walker2d on Gymnasium v5; qualities random, medium,
medium-replay, expert and medium-expert) follow D4RL's recipe instead: SAC actors trained by
tools/train_behaviour.py and stored in behaviour_policies/ (docs/datasets.md).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

class UserError(ValueError):
    """A mistake in the user's input that they can fix (a flag, a file, a dataset): the scripts print its message
    in one or two lines on stderr and exit with status 1, without a traceback (common.setup's hook)."""


RECIPE_VERSION = 1  # bump when a recipe changes: cached files of other versions are not reused
ARRAY_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


@dataclass
class Dataset:
    """Row-aligned offline transitions plus the metadata needed to evaluate policies on them."""

    observations: np.ndarray  # (N, obs_dim) float32
    actions: np.ndarray  # (N, act_dim) float32 for Box, (N,) int64 for Discrete
    rewards: np.ndarray  # (N,) float32
    next_observations: np.ndarray  # (N, obs_dim) float32
    terminals: np.ndarray  # (N,) bool: true MDP end, do not bootstrap
    timeouts: np.ndarray  # (N,) bool: time-limit cut, do bootstrap
    behavior_log_probs: np.ndarray | None = None  # (N,) float32, log pi_b(a|s) when known
    env_id: str | None = None
    env_kwargs: dict = field(default_factory=dict)
    ref_min_score: float | None = None  # mean return of the random policy (normalized score 0)
    ref_max_score: float | None = None  # mean return of the expert policy (normalized score 100)
    name: str = ""

    @property
    def metadata(self) -> dict:
        return dict(env_id=self.env_id, env_kwargs=self.env_kwargs, ref_min_score=self.ref_min_score,
                    ref_max_score=self.ref_max_score, name=self.name)

    @property
    def discrete(self) -> bool:
        return np.issubdtype(self.actions.dtype, np.integer)

    def __len__(self) -> int:
        return len(self.rewards)

    def episode_ends(self) -> np.ndarray:
        """Indices of the last transition of each episode (a terminal, a timeout, or the last row)."""
        done = self.terminals | self.timeouts
        done[-1] = True
        return np.flatnonzero(done)

    def episode_returns(self) -> np.ndarray:
        ends = self.episode_ends()
        csum = np.concatenate([[0.0], np.cumsum(self.rewards, dtype=np.float64)])
        return csum[ends + 1] - csum[np.concatenate([[0], ends[:-1] + 1])]

    def normalized_score(self, ret: float | np.ndarray) -> float | np.ndarray:
        """D4RL normalized score: 100 * (R - random) / (expert - random)."""
        if self.ref_min_score is None or self.ref_max_score is None:
            return float("nan")
        return 100.0 * (ret - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


# ---------------------------------------------------------------------------------------------------------
# Scripted experts: deterministic controllers, obs -> action (before behaviour noise)
# ---------------------------------------------------------------------------------------------------------
def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """Energy-pumping swing-up, then a PD stabiliser near upright (Pendulum-v1: theta_dd = 15 sin(th) + 3u)."""
    cos_th, sin_th, th_dot = obs
    th = math.atan2(sin_th, cos_th)  # 0 is upright
    if cos_th > 0.8:  # near upright: PD on angle and velocity
        u = -10.0 * th - 2.0 * th_dot
    else:  # pump energy E = 0.5 th_dot^2 + 15 cos(th) towards the upright-at-rest value 15
        energy = 0.5 * th_dot**2 + 15.0 * cos_th
        u = 2.0 * np.sign(th_dot * (15.0 - energy) + 1e-6)
    return np.clip(np.array([u], dtype=np.float32), -2.0, 2.0)


def cartpole_expert(obs: np.ndarray) -> int:
    """Linear controller on (x, x_dot, theta, theta_dot): push towards the side the pole falls to."""
    return int(0.1 * obs[0] + 0.5 * obs[1] + 10.0 * obs[2] + 2.0 * obs[3] > 0.0)


def _lunar_heuristic(continuous: bool) -> Callable[[np.ndarray], np.ndarray | int]:
    from gymnasium.envs.box2d.lunar_lander import heuristic

    class _Flag:  # the heuristic only reads env.unwrapped.continuous
        unwrapped = type("U", (), {"continuous": continuous})()

    if continuous:
        return lambda obs: np.asarray(heuristic(_Flag, obs), dtype=np.float32)
    return lambda obs: int(heuristic(_Flag, obs))


# ---------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnvRecipe:
    env_id: str
    env_kwargs: dict
    expert: Callable[[], Callable]  # builds the expert controller
    expert_eps: float  # eps of the expert policy (Discrete: a little noise keeps every log-prob finite)
    sigma: float  # Box: Gaussian noise std around the expert, as a fraction of the action half-range
    medium_eps: float  # eps of the medium policy (tuned: 30-60% of the random->expert gap)
    size: int  # transitions per dataset (whole episodes, at least this many)
    ref_min_score: float  # mean return of the random policy (measured, see `measure_reference_scores`)
    ref_max_score: float  # mean return of the expert policy


ENVS: dict[str, EnvRecipe] = {
    # reference scores: `measure_reference_scores(env)` over 200 episodes each (seed 12345), rounded
    "pendulum": EnvRecipe("Pendulum-v1", {}, lambda: pendulum_expert, expert_eps=0.0, sigma=0.1, medium_eps=0.6,
                          size=100_000, ref_min_score=-1226.0, ref_max_score=-151.2),
    "cartpole": EnvRecipe("CartPole-v1", {}, lambda: cartpole_expert, expert_eps=0.05, sigma=0.0, medium_eps=0.5,
                          size=100_000, ref_min_score=23.0, ref_max_score=500.0),
    "lunarlander": EnvRecipe("LunarLander-v3", {}, lambda: _lunar_heuristic(False), expert_eps=0.02,
                             sigma=0.0, medium_eps=0.4, size=100_000, ref_min_score=-178.7, ref_max_score=221.4),
    "lunarlander-continuous": EnvRecipe("LunarLander-v3", {"continuous": True}, lambda: _lunar_heuristic(True),
                                        expert_eps=0.0, sigma=0.1, medium_eps=0.4,
                                        size=100_000,
                                        ref_min_score=-222.4, ref_max_score=279.6),
}
QUALITIES = ("random", "medium", "expert", "medium-expert", "mixed")
CLASSIC_NAMES = tuple(f"{env}-{q}" for env in ENVS for q in QUALITIES)  # BUILTIN_NAMES adds the MuJoCo ones below


class BehaviorPolicy:
    """eps-uniform mixture around a scripted expert; `act` returns (action, exact log-prob of that action)."""

    def __init__(self, space: gym.Space, expert: Callable, eps: float, sigma: float, rng: np.random.Generator):
        self.space, self.expert, self.eps, self.rng = space, expert, eps, rng
        self.discrete = isinstance(space, gym.spaces.Discrete)
        if not self.discrete:
            self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
            self.std = sigma * (self.high - self.low) / 2.0
            self.log_uniform = -float(np.sum(np.log(self.high - self.low)))

    def act(self, obs: np.ndarray) -> tuple[np.ndarray | int, float]:
        uniform = self.rng.random() < self.eps
        if self.discrete:
            a = int(self.rng.integers(int(self.space.n))) if uniform else self.expert(obs)
            return a, self.log_prob(obs, a)
        mean = np.clip(np.asarray(self.expert(obs), dtype=np.float64), self.low, self.high)
        if uniform:
            a = self.rng.uniform(self.low, self.high)
        else:  # truncated normal by rejection: exact, and cheap because the mean lies inside the box
            a = mean + self.std * self.rng.standard_normal(mean.shape)
            while np.any(bad := (a < self.low) | (a > self.high)):
                a[bad] = mean[bad] + self.std[bad] * self.rng.standard_normal(int(bad.sum()))
        a = a.astype(np.float32)  # the log-prob is that of the float32 action actually stored
        return a, self.log_prob(obs, a)

    def log_prob(self, obs: np.ndarray, a: np.ndarray | int) -> float:
        """log pi_b(a|s): eps * uniform + (1 - eps) * (point mass on the expert action | truncated normal)."""
        if self.discrete:
            n = int(self.space.n)
            return math.log(self.eps / n + (1.0 - self.eps) * (int(a) == self.expert(obs)))
        a = np.asarray(a, dtype=np.float64)
        mean = np.clip(np.asarray(self.expert(obs), dtype=np.float64), self.low, self.high)
        gauss = 0.0 if self.eps == 1.0 else math.exp(self._truncnorm_logpdf(a, mean))
        return math.log(self.eps * math.exp(self.log_uniform) + (1.0 - self.eps) * gauss)

    def _truncnorm_logpdf(self, a: np.ndarray, mean: np.ndarray) -> float:
        """Sum over dimensions of log N(a; mean, std) / P(low <= x <= high)."""
        z = (a - mean) / self.std
        cdf = np.vectorize(lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))))
        mass = cdf((self.high - mean) / self.std) - cdf((self.low - mean) / self.std)
        return float(np.sum(-0.5 * z**2 - np.log(self.std) - 0.5 * math.log(2 * math.pi) - np.log(mass)))


def rollout_episodes(recipe: EnvRecipe, eps_schedule: Callable[[int], float], n_transitions: int, seed: int,
                     n_episodes: int | None = None) -> dict[str, np.ndarray]:
    """Run whole episodes of the behaviour policy until `n_transitions` (or `n_episodes`) are collected.
    `eps_schedule(episode_index)` gives each episode's share of uniform-random actions."""
    env = gym.make(recipe.env_id, **recipe.env_kwargs)
    rng = np.random.default_rng(seed)
    expert = recipe.expert()
    keys = (*ARRAY_KEYS, "behavior_log_probs")
    buf: dict[str, list] = {k: [] for k in keys}
    episode, steps = 0, 0
    bar = tqdm(total=n_transitions, unit="transition", desc="  rollouts", leave=False, mininterval=1.0,
               disable=n_episodes is not None or n_transitions < 10_000)  # only the long generations show a bar
    while (steps < n_transitions) if n_episodes is None else (episode < n_episodes):
        policy = BehaviorPolicy(env.action_space, expert, eps_schedule(episode), recipe.sigma, rng)
        obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
        done = False
        while not done:
            a, logp = policy.act(obs)
            next_obs, r, term, trunc, _ = env.step(a)
            for k, v in zip(keys, (obs, a, r, next_obs, term, trunc, logp)):
                buf[k].append(v)
            obs, done, steps = next_obs, term or trunc, steps + 1
        bar.update(min(steps, n_transitions) - bar.n)
        episode += 1
    bar.close()
    env.close()
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    dtypes = dict(actions=np.int64 if discrete else np.float32, terminals=bool, timeouts=bool)
    return {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in buf.items()}


def generate_builtin(name: str, size: int | None = None) -> Dataset:
    """Generate a built-in dataset deterministically (the seed is fixed by the name)."""
    env_name, quality = _split_name(name)
    if env_name in LOCOMOTION:
        return generate_locomotion(env_name, quality, size)
    recipe = ENVS[env_name]
    n = size or recipe.size
    seed = 1000 * list(ENVS).index(env_name) + QUALITIES.index(quality)
    med, exp = recipe.medium_eps, recipe.expert_eps
    if quality == "medium-expert":  # half medium episodes, half expert episodes
        parts = [rollout_episodes(recipe, lambda e: med, n // 2, seed),
                 rollout_episodes(recipe, lambda e: exp, n - n // 2, seed + 100)]
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    elif quality == "mixed":  # eps anneals linearly from 1 (random) to medium over the expected episode count
        n_ep = _expected_episodes(recipe, n, seed)
        arrays = rollout_episodes(recipe, lambda e: 1.0 + (med - 1.0) * min(e / max(n_ep - 1, 1), 1.0), n, seed)
    else:
        eps = {"random": 1.0, "medium": med, "expert": exp}[quality]
        arrays = rollout_episodes(recipe, lambda e: eps, n, seed)
    return Dataset(**arrays, env_id=recipe.env_id, env_kwargs=dict(recipe.env_kwargs),
                   ref_min_score=recipe.ref_min_score, ref_max_score=recipe.ref_max_score, name=name)


def _expected_episodes(recipe: EnvRecipe, n: int, seed: int) -> int:
    """Episodes a random-to-medium mix needs for n transitions (from the mean of the two episode lengths)."""
    lens = [len(rollout_episodes(recipe, lambda e, q=q: q, 0, seed + 7, n_episodes=5)["rewards"]) / 5
            for q in (1.0, recipe.medium_eps)]
    return max(int(n / np.mean(lens)), 1)


def _split_name(name: str) -> tuple[str, str]:
    for envs, qualities in ((ENVS, QUALITIES), (LOCOMOTION, LOCOMOTION_QUALITIES)):
        for q in sorted(qualities, key=len, reverse=True):
            if name.endswith("-" + q) and name[: -len(q) - 1] in envs:
                return name[: -len(q) - 1], q
    raise UserError(f"unknown dataset {name!r}: not a built-in name, an existing .npz file, or a Minari id "
                     f"(namespace/name-vN). Built-in names: {', '.join(BUILTIN_NAMES)}")


def measure_reference_scores(env_name: str, episodes: int = 200, seed: int = 12345) -> tuple[float, float]:
    """Mean return of the random and the expert behaviour policy: how the ref_*_score constants were made."""
    recipe = ENVS[env_name]
    return tuple(float(Dataset(**rollout_episodes(recipe, lambda e, q=eps: q, 0, seed, n_episodes=episodes))
                       .episode_returns().mean()) for eps in (1.0, recipe.expert_eps))


# ---------------------------------------------------------------------------------------------------------
# MuJoCo locomotion (D4RL's recipe): hopper, halfcheetah, walker2d on Gymnasium's v5 environments
# ---------------------------------------------------------------------------------------------------------
# D4RL (Fu et al. 2020) made its locomotion data with SAC: random = uniform actions; expert = a trained SAC actor;
# medium = an actor stopped early, at about a third of the expert's return; medium-replay = the run's replay buffer
# up to the medium checkpoint; medium-expert = the medium and expert data concatenated. Actions are *sampled* from
# the stochastic actor. Here the actors come from tools/train_behaviour.py, committed in behaviour_policies/.
LOCOMOTION = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
LOCOMOTION_QUALITIES = ("random", "medium", "medium-replay", "expert", "medium-expert")
LOCOMOTION_NAMES = tuple(f"{env}-{q}" for env in LOCOMOTION for q in LOCOMOTION_QUALITIES)
LOCOMOTION_SIZE = 1_000_000  # transitions of random, medium and expert (whole episodes); medium-expert has both
N_ENVS = 16  # environments stepped together, one batched actor forward per step
# Mean return of 100 uniform-random episodes on the v5 environments (seed 12345; mujoco 3.2.7, gymnasium 1.4.0;
# standard errors 1.4, 8.2, 0.5), made with
#     python -c "import datasets as D; print({e: D.measure_random_return(e, 100) for e in D.LOCOMOTION})"
# The v5 expert return is the expert file's eval_return_mean (behaviour_policies/{env}-expert.pt).
V5_RANDOM_RETURN = {"hopper": 16.3, "halfcheetah": -291.0, "walker2d": -0.1}
TRAIN_COMMAND = "python tools/train_behaviour.py --env {env}"
# The mujoco the documented datasets and results were made with; requirements.txt pins it, because the same seeds and
# actions give different trajectories under another version (3.17 and 4.0 checked: docs/datasets.md)
MUJOCO_VERSION = "3.2.7"


class SquashedGaussianActor(nn.Module):
    """The behaviour policies' actor (CleanRL's SAC actor): obs -> 256 -> 256 -> (mean, log_std), ReLU, log_std
    squashed by tanh into [LOG_STD_MIN, LOG_STD_MAX]; action = tanh(u), u ~ N(mean, exp(log_std)^2). The locomotion
    action boxes are [-1, 1]^d, so there is no rescaling. tools/train_behaviour.py trains this very class."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean, self.log_std = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        log_std = torch.tanh(self.log_std(h))
        return self.mean(h), self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (log_std + 1)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised action and its log-density (SAC's training path; float32, same formula as below)."""
        mean, log_std = self(obs)
        z = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        u = mean + log_std.exp() * z
        log_jac = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)^2), stable for large |u|
        return torch.tanh(u), (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi) - log_jac).sum(-1)


def tanh_gaussian_log_prob(z: np.ndarray, log_std: np.ndarray, u: np.ndarray) -> np.ndarray:
    """log density of a = tanh(u), u = mean + exp(log_std) * z, in float64: log N(u) - sum log(1 - tanh(u)^2),
    the Jacobian written 2 (log 2 - u - softplus(-2u)) so that it stays exact where tanh(u) rounds to +-1."""
    log_jac = 2.0 * (math.log(2.0) - u - np.logaddexp(0.0, -2.0 * u))
    return np.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi) - log_jac, axis=-1)


class ActorSampler:
    """Batched behaviour actions from a SquashedGaussianActor, noise from a numpy Generator (never a global RNG).
    The log-prob is computed in float64 from the sampled u; the stored action is tanh(u) rounded to float32 (a
    relative change of at most 6e-8, and exactly +-1 where |u| > 9), so recomputing the density from the stored
    action (atanh) agrees only up to that rounding: the stored value is the exact one."""

    def __init__(self, actor: SquashedGaussianActor, rng: np.random.Generator):
        self.actor, self.rng = actor, rng

    def __call__(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            mean, log_std = (x.double().numpy() for x in self.actor(torch.from_numpy(obs)))
        z = self.rng.standard_normal(mean.shape)
        u = mean + np.exp(log_std) * z
        return np.tanh(u).astype(np.float32), tanh_gaussian_log_prob(z, log_std, u)


class UniformSampler:
    """Uniform actions in the box; log-prob -sum log(high - low)."""

    def __init__(self, space: gym.spaces.Box, rng: np.random.Generator):
        self.low, self.high, self.rng = space.low.astype(np.float64), space.high.astype(np.float64), rng
        self.log_prob = -float(np.sum(np.log(self.high - self.low)))

    def __call__(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = self.rng.uniform(self.low, self.high, (len(obs), len(self.low))).astype(np.float32)
        return a, np.full(len(obs), self.log_prob)


class EnvPool:
    """`n` copies of one environment stepped in a Python loop with one batched policy call per step. Each copy
    buffers its running episode; `take` copies a finished episode into the output arrays, so episodes stay whole
    and contiguous (s' of a row is the next row's s). Reset seeds come from `rng`, in a fixed order."""

    def __init__(self, env_id: str, n: int, rng: np.random.Generator):
        self.envs, self.rng = [gym.make(env_id) for _ in range(n)], rng
        self.horizon = self.envs[0].spec.max_episode_steps
        self.ep = _empty_arrays(self.envs[0], (n, self.horizon))
        self.length = np.zeros(n, dtype=np.int64)
        self.obs = np.stack([self._reset(i) for i in range(n)])

    def _reset(self, i: int) -> np.ndarray:
        return self.envs[i].reset(seed=int(self.rng.integers(2**31 - 1)))[0].astype(np.float32)

    def step(self, policy: Callable, idx: Sequence[int]) -> list[int]:
        """One step of the copies `idx`; returns those whose episode ended (terminal or time limit)."""
        actions, log_probs = policy(self.obs[idx])
        ended = []
        for a, logp, i in zip(actions, log_probs, idx):
            next_obs, r, term, trunc, _ = self.envs[i].step(a)
            t, ep = self.length[i], self.ep
            ep["observations"][i, t], ep["actions"][i, t], ep["rewards"][i, t] = self.obs[i], a, r
            ep["next_observations"][i, t] = self.obs[i] = next_obs
            # a terminal is the MDP's end even when the time limit falls on the same step
            ep["terminals"][i, t], ep["timeouts"][i, t], ep["behavior_log_probs"][i, t] = term, trunc and not term, logp
            self.length[i] += 1
            if term or trunc:
                ended.append(i)
        return ended

    def take(self, i: int, out: dict[str, np.ndarray] | None, pos: int, cut: bool = False) -> int:
        """Copy copy i's episode to out[pos:] (None: drop it), start its next episode; return the next free row.
        cut=True: the collection stops inside this episode, whose last row becomes a timeout (s' is a real state)."""
        t = int(self.length[i])
        if out is not None:
            for k, v in self.ep.items():
                out[k][pos:pos + t] = v[i, :t]
            out["timeouts"][pos + t - 1] |= cut
        self.length[i], self.obs[i] = 0, self._reset(i)
        return pos + t

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _empty_arrays(env: gym.Env, rows: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Preallocated transition arrays (filled in place: no lists of rows, no concatenation copies)."""
    obs, act = env.observation_space.shape, env.action_space.shape
    return dict(observations=np.zeros((*rows, *obs), np.float32), actions=np.zeros((*rows, *act), np.float32),
                rewards=np.zeros(rows, np.float32), next_observations=np.zeros((*rows, *obs), np.float32),
                terminals=np.zeros(rows, bool), timeouts=np.zeros(rows, bool),
                behavior_log_probs=np.zeros(rows, np.float32))


def behaviour_dir() -> Path:
    """Folder of the behaviour policy files; override with the OFFLINE_RL_BEHAVIOUR environment variable."""
    return Path(os.environ.get("OFFLINE_RL_BEHAVIOUR", Path(__file__).resolve().parent / "behaviour_policies"))


def save_behaviour_policy(path: str | Path, actor: SquashedGaussianActor, **metadata) -> None:
    """A plain dict: the actor's state_dict plus metadata (env_id, train_env_steps, eval_return_mean, seed, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in actor.state_dict().items()}, **metadata}, tmp)
    os.replace(tmp, path)


def load_behaviour_policy(env_name: str, file_stem: str) -> tuple[SquashedGaussianActor, dict]:
    """The actor in behaviour_dir()/{file_stem}.pt and its metadata; a missing file says how to make it."""
    path = behaviour_dir() / f"{file_stem}.pt"
    if not path.exists():
        cmd = TRAIN_COMMAND.format(env=env_name)
        raise UserError(f"behaviour policy {path} is missing; train and export it with `{cmd}` then `{cmd} --export`"
                        " (hours on a CPU; docs/datasets.md)")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    sd = blob.pop("state_dict")
    hidden, obs_dim = sd["trunk.0.weight"].shape
    actor = SquashedGaussianActor(obs_dim, sd["mean.weight"].shape[0], hidden)
    actor.load_state_dict(sd)
    return actor.eval(), blob


def _locomotion_seed(env_name: str, quality: str) -> int:
    return 1000 * (len(ENVS) + list(LOCOMOTION).index(env_name)) + LOCOMOTION_QUALITIES.index(quality)


def _replay_schedule(env_name: str) -> list[tuple[str | None, int]]:
    """medium-replay's (snapshot file stem or None for uniform, env steps) in the run's order: uniform actions up to
    the first snapshot (the trainer takes it at learning_starts), then snapshot k for the steps the run collected
    between snapshot k and k+1, the last one up to the medium checkpoint."""
    _, meta = load_behaviour_policy(env_name, f"{env_name}-medium")
    steps = [int(s) for s in meta["replay_steps"]] + [int(meta["train_env_steps"])]
    if any(b <= a for a, b in zip(steps[:-1], steps[1:])):
        raise UserError(f"{env_name}-medium.pt: replay_steps {steps[:-1]} must increase up to its step {steps[-1]}")
    return [(None, steps[0])] + [(f"{env_name}-replay-{a:07d}", b - a) for a, b in zip(steps[:-1], steps[1:])]


def behaviour_files(env_name: str, quality: str) -> list[Path]:
    """The behaviour policy files a dataset is made from (none for random)."""
    stems = {"random": [], "medium": ["medium"], "expert": ["expert"], "medium-expert": ["medium", "expert"],
             "medium-replay": ["medium"]}[quality]
    files = [behaviour_dir() / f"{env_name}-{s}.pt" for s in stems]
    if quality == "medium-replay":
        files += [behaviour_dir() / f"{stem}.pt" for stem, _ in _replay_schedule(env_name) if stem is not None]
    return files


def generate_locomotion(env_name: str, quality: str, size: int | None = None) -> Dataset:
    """D4RL's recipe on the v5 environment. random / medium / expert: whole episodes until at least `size` rows
    (default 1M; episodes still running then are dropped); medium-expert: medium(size/2) then expert(size/2), each
    with its own dataset's seed, so it is exactly those two datasets concatenated (default 1M + 1M); medium-replay:
    the training run's first `size` env steps (default: all of them up to the medium checkpoint), replayed."""
    env_id = LOCOMOTION[env_name]
    if note := mujoco_version_note():
        print(note, file=sys.stderr, flush=True)
    if quality == "medium-replay":
        return _generate_replay(env_name, size)
    n = size or (2 if quality == "medium-expert" else 1) * LOCOMOTION_SIZE
    parts = [("medium", n // 2), ("expert", n - n // 2)] if quality == "medium-expert" else [(quality, n)]
    probe = gym.make(env_id)
    out = _empty_arrays(probe, (n + len(parts) * probe.spec.max_episode_steps,))  # whole episodes overshoot n
    pos = 0
    for q, rows in parts:
        rng = np.random.default_rng(_locomotion_seed(env_name, q))
        policy = (UniformSampler(probe.action_space, rng) if q == "random"
                  else ActorSampler(load_behaviour_policy(env_name, f"{env_name}-{q}")[0], rng))
        pool, start, end = EnvPool(env_id, N_ENVS, rng), pos, pos + rows
        bar = tqdm(total=rows, unit="transition", desc=f"  {env_name}-{q}", leave=False, mininterval=1.0,
                   disable=rows < 100_000)
        while pos < end:
            for i in pool.step(policy, range(N_ENVS)):
                pos = pool.take(i, out, pos)
                bar.update(min(pos, end) - start - bar.n)
                if pos >= end:
                    break
        bar.close()
        pool.close()
    return _locomotion_dataset(env_name, f"{env_name}-{quality}", {k: v[:pos] for k, v in out.items()})


def mujoco_version_note() -> str | None:
    """One line saying that generated data will not be the documented datasets, when another mujoco is installed."""
    import mujoco

    if mujoco.__version__ == MUJOCO_VERSION:
        return None
    return (f"note: mujoco {mujoco.__version__} is installed; the datasets and scores in docs/ were made with "
            f"{MUJOCO_VERSION}, and this one will differ from them (pip install mujoco=={MUJOCO_VERSION} to match)")


def _generate_replay(env_name: str, size: int | None) -> Dataset:
    """medium-replay, approximated: the run's buffer was filled by a policy that changed at every gradient step; here
    snapshot k (every --snapshot-every steps) acts for all the steps the run collected between snapshot k and k+1,
    so the policy is piecewise constant. Episodes run on across a snapshot change, as in the run; the N_ENVS episodes
    still running at the end are kept, their last row marked a timeout (a cut, not an MDP end)."""
    env_id, schedule = LOCOMOTION[env_name], _replay_schedule(env_name)
    total = sum(steps for _, steps in schedule) if size is None else min(size, sum(steps for _, steps in schedule))
    rng = np.random.default_rng(_locomotion_seed(env_name, "medium-replay"))
    pool = EnvPool(env_id, N_ENVS, rng)
    out, pos, done = _empty_arrays(pool.envs[0], (total,)), 0, 0
    for stem, steps in schedule:
        policy = (UniformSampler(pool.envs[0].action_space, rng) if stem is None
                  else ActorSampler(load_behaviour_policy(env_name, stem)[0], rng))
        steps = min(steps, total - done)
        while steps > 0:
            k = min(N_ENVS, steps)
            for i in pool.step(policy, range(k)):
                pos = pool.take(i, out, pos)
            steps, done = steps - k, done + k
    for i in range(N_ENVS):
        if pool.length[i]:
            pos = pool.take(i, out, pos, cut=True)
    pool.close()
    return _locomotion_dataset(env_name, f"{env_name}-medium-replay", out)


def _locomotion_dataset(env_name: str, name: str, arrays: dict[str, np.ndarray]) -> Dataset:
    lo, hi = D4RL_REFERENCE[env_name]  # what tables use; report() also shows the v5 normalization
    return Dataset(**arrays, env_id=LOCOMOTION[env_name], ref_min_score=lo, ref_max_score=hi, name=name)


def episode_returns_of(env_id: str, policy: Callable, n_episodes: int, rng: np.random.Generator) -> np.ndarray:
    """Returns of `n_episodes` whole episodes, split evenly over the copies (so short episodes are not favoured)."""
    pool = EnvPool(env_id, min(N_ENVS, n_episodes), rng)
    n = len(pool.envs)
    quota = [n_episodes // n + (i < n_episodes % n) for i in range(n)]
    returns = []
    while active := [i for i in range(n) if quota[i] > 0]:
        for i in pool.step(policy, active):
            returns.append(float(pool.ep["rewards"][i, :pool.length[i]].sum(dtype=np.float64)))
            quota[i] -= 1
            pool.take(i, None, 0)
    pool.close()
    return np.array(returns)


def measure_random_return(env_name: str, episodes: int = 100, seed: int = 12345) -> float:
    """Mean return of uniform-random episodes on the v5 environment: how V5_RANDOM_RETURN was made."""
    rng = np.random.default_rng(seed)
    space = gym.make(LOCOMOTION[env_name]).action_space
    return float(episode_returns_of(LOCOMOTION[env_name], UniformSampler(space, rng), episodes, rng).mean())


BUILTIN_NAMES = CLASSIC_NAMES + LOCOMOTION_NAMES


# ---------------------------------------------------------------------------------------------------------
# Loading: built-in (cached), .npz, Minari; every source is validated the same way
# ---------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where built-in datasets are cached; override with the OFFLINE_RL_DATA environment variable."""
    return Path(os.environ.get("OFFLINE_RL_DATA", Path.home() / ".cache" / "offline-rl-datasets"))


def builtin_cache_path(name: str) -> Path:
    """{name}-r{RECIPE_VERSION}.npz; a MuJoCo dataset's name also carries a digest of its behaviour policy files and
    the mujoco version (simulations differ in the last bits between versions), so retrained weights are not mixed
    up with an old cache."""
    if name in CLASSIC_NAMES:
        return cache_dir() / f"{name}-r{RECIPE_VERSION}.npz"
    import hashlib

    import mujoco

    env_name, quality = _split_name(name)
    digest = hashlib.sha256(mujoco.__version__.encode())
    for f in behaviour_files(env_name, quality):
        if not f.exists():
            load_behaviour_policy(env_name, f.stem)  # raises the error that says how to make it
        digest.update(f.read_bytes())
    return cache_dir() / f"{name}-r{RECIPE_VERSION}-{digest.hexdigest()[:10]}.npz"


MINARI_ID = re.compile(r"([\w-]+/)+[\w-]+-v\d+")  # namespace/name-vN, the namespace possibly nested


def load_dataset(name_or_path: str) -> Dataset:
    """A built-in name (generated once, then cached), a Minari dataset id, or a path to an `.npz`."""
    if name_or_path in BUILTIN_NAMES:
        path = builtin_cache_path(name_or_path)
        if not path.exists():
            t0 = time.time()
            print(f"generating built-in dataset {name_or_path} (once; cached in {path.parent}) ...", flush=True)
            ds = generate_builtin(name_or_path)
            n = len(ds)
            save_npz(ds, path)
            del ds  # free the generated arrays before loading the file: one copy in memory, not two
            print(f"  {n} transitions in {time.time() - t0:.1f}s", flush=True)
        ds = load_npz(path)
    elif MINARI_ID.fullmatch(name_or_path):
        ds = load_minari(name_or_path)
    elif name_or_path.endswith(".npz") or "/" in name_or_path or os.sep in name_or_path or Path(name_or_path).exists():
        ds = load_npz(name_or_path)
    else:
        _split_name(name_or_path)  # raises the error listing valid names
    validate(ds)
    return ds


def env_action_space(ds: Dataset) -> gym.Space:
    """The dataset environment's action space (the environment is closed again)."""
    env = gym.make(ds.env_id, **ds.env_kwargs)
    space = env.action_space
    env.close()
    return space


def action_bounds(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of a Box action space: the environment's when known, else the data's own range."""
    if ds.env_id is not None:
        space = env_action_space(ds)
        return space.low.astype(np.float64), space.high.astype(np.float64)
    low, high = ds.actions.min(0).astype(np.float64), ds.actions.max(0).astype(np.float64)
    return low, np.where(high > low, high, low + 1.0)


def dataset_dims(ds: Dataset) -> tuple[int, int, int | None]:
    """(obs_dim, act_dim, n_actions): n_actions is None for Box; for Discrete it comes from the environment
    when known (the data may not contain every action), act_dim is then 1."""
    if not ds.discrete:
        return ds.observations.shape[1], ds.actions.shape[1], None
    n = int(env_action_space(ds).n) if ds.env_id else int(ds.actions.max()) + 1
    return ds.observations.shape[1], 1, n


def check_ranges(args, ranges: dict[str, str]) -> None:
    """A UserError naming the first flag whose value lies outside its interval, e.g. {"discount": "[0, 1)"}."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        above = lo <= value if interval[0] == "[" else lo < value
        below = value <= hi if interval[-1] == "]" else value < hi
        if not (above and below):  # NaN fails both
            raise UserError(f"--{name.replace('_', '-')} {value} is out of range: it must lie in {interval}")


def check_policy_fits(path: str, ckpt: dict, ds: Dataset) -> None:
    """A UserError when a checkpoint's observation or action space differs from the dataset's environment."""
    have, want = dataset_dims(ds), (ckpt["obs_dim"], ckpt["act_dim"], ckpt["n_actions"])
    if have != want:
        def spaces(obs_dim: int, act_dim: int, n_actions: int | None) -> str:
            return f"{obs_dim}-d observations, " + (f"{n_actions} actions" if n_actions else f"{act_dim}-d actions")
        raise UserError(f"{path} was trained on {ckpt['args']['dataset']} ({spaces(*want)}); {ds.name} has "
                        f"{spaces(*have)}: pass a dataset of the same environment, or drop --dataset")


def format_score(ret: float, norm: float) -> str:
    """'normalized 85.2 (return 230.1)', or just the return when the dataset has no reference scores."""
    return f"return {ret:.1f}" if np.isnan(norm) else f"normalized {norm:.1f} (return {ret:.1f})"


def load_checkpoint(path: str, device: str | torch.device = "cpu", algo: str | None = None) -> dict:
    """torch.load a `--save-model` file (weights only), with a UserError for a missing, corrupt or foreign file."""
    if Path(path).is_dir():
        raise UserError(f"checkpoint {path} is a folder: pass the .pt file in it (runs/<run>/<script>.pt)")
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist (train with --save-model; it is saved in runs/<run>/)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a checkpoint saved by --save-model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "algo" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path}: not a checkpoint saved by --save-model (no 'algo' / 'args' keys)")
    if algo is not None and ckpt["algo"] != algo:
        raise UserError(f"{path} was saved by {ckpt['algo']}.py, not {algo}.py: load it with "
                        f"`python {ckpt['algo']}.py --load-model {path}`")
    return ckpt


def pick_device(device: str) -> torch.device:
    """'auto': CUDA when present, else CPU; else torch.device(device), a UserError if this machine lacks it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda") or (dev.index or 0) >= (torch.cuda.device_count() if dev.type == "cuda" else 1):
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) that torch "
                        f"{torch.__version__} sees; use --device cpu (or auto)")
    return dev


def save_npz(ds: Dataset, path: str | Path) -> None:
    """Write a dataset in the `.npz` layout `load_dataset` reads (arrays plus metadata keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(ds, k) for k in ARRAY_KEYS}
    if ds.behavior_log_probs is not None:
        arrays["behavior_log_probs"] = ds.behavior_log_probs
    meta = {k: np.asarray(v) for k, v in ds.metadata.items() if k != "env_kwargs" and v is not None}
    # write then rename: a killed run never leaves half a cache file, and two runs generating the same dataset at
    # once (two seeds started together) each write their own temporary file; the rename is atomic
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays, **meta, env_kwargs=np.asarray(repr(ds.env_kwargs)))
    os.replace(tmp, path)


def load_npz(path: str | Path) -> Dataset:
    """Read an `.npz` with the arrays in ARRAY_KEYS (+ optional behavior_log_probs) and optional metadata
    keys env_id, env_kwargs (a JSON object or a Python dict literal), ref_min_score, ref_max_score, name."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a dataset file: pass the .npz file itself")
    if not path.exists():
        hint = "" if path.suffix == ".npz" else ", and is neither a built-in name nor a Minari id (namespace/name-vN)"
        raise UserError(f"dataset file {path} does not exist{hint}")
    try:
        with open(path, "rb") as fh:
            is_zip = zipfile.is_zipfile(fh)
        f = np.load(path, allow_pickle=False) if is_zip else None
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if f is None:  # np.load would take it for a pickle and blame "pickled (object) data"
        raise UserError(f"{path}: not a valid .npz file (not a zip archive: truncated, or another format); write "
                        "datasets with np.savez or datasets.save_npz")
    with f:
        if not f.files:
            raise UserError(f"{path} holds no arrays; an offline dataset needs {list(ARRAY_KEYS)}")
        missing = [k for k in ARRAY_KEYS if k not in f]
        if missing:
            raise UserError(f"{path}: missing array(s) {missing}, found {sorted(f.files)}; an offline dataset needs "
                            f"{list(ARRAY_KEYS)} (row-aligned; terminals/timeouts boolean)")
        keys = (*ARRAY_KEYS, "behavior_log_probs", "env_id", "env_kwargs", "ref_min_score", "ref_max_score", "name")
        data = {k: _read_array(f, k, path) for k in keys if k in f}
    meta = {k: _single(data[k], kind, f"{path}: {k}") for k, kind in
            (("env_id", str), ("ref_min_score", float), ("ref_max_score", float)) if k in data}
    return Dataset(**{k: data[k] for k in ARRAY_KEYS}, behavior_log_probs=data.get("behavior_log_probs"),
                   env_kwargs=parse_env_kwargs(str(data["env_kwargs"]), path) if "env_kwargs" in data else {},
                   name=str(data["name"]) if "name" in data else path.stem, **meta)


def _read_array(f: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return f[key]
    except Exception as e:  # numpy will not unpickle an object array (allow_pickle=False); else the zip is damaged
        if "allow_pickle" in str(e):
            raise UserError(f"{path}: array {key!r} holds Python objects (pickled data), which are not loaded, for "
                            "safety; save it as a numeric array, e.g. np.asarray(x, dtype=np.float32)") from None
        raise UserError(f"{path}: array {key!r} cannot be read ({type(e).__name__}: {e}); the file is damaged, "
                        "write it again") from None


def _single(value: np.ndarray, kind: type, what: str) -> str | float:
    """A metadata entry: one value of `kind` (str or float)."""
    try:
        return kind(value.item())
    except (ValueError, TypeError):
        raise UserError(f"{what} must be a single {kind.__name__}, got {value!r:.80}") from None


def parse_env_kwargs(text: str, path: str | Path) -> dict:
    """`env_kwargs` as most tools write it (JSON: {"continuous": true}) or as save_npz does (a Python dict literal)."""
    import ast
    import json

    for parse in (json.loads, ast.literal_eval):
        try:
            kwargs = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(kwargs, dict):
            return kwargs
    raise UserError(f"{path}: env_kwargs must be a JSON object or a Python dict literal such as "
                    f'{{"continuous": true}}, got {text[:80]!r}')


def load_minari(dataset_id: str) -> Dataset:
    """Flatten a Minari dataset into transitions (downloads it if it is not local)."""
    try:
        import minari
    except ImportError as e:
        raise UserError(f"{dataset_id!r} looks like a Minari id, but minari is not installed: "
                          "`pip install minari` (and `pip install 'minari[hdf5]'` for the D4RL-ported datasets)") from e
    try:
        mds = minari.load_dataset(dataset_id, download=True)
    except Exception as e:
        raise UserError(f"could not load Minari dataset {dataset_id!r}: {e}") from e
    if not isinstance(mds.observation_space, gym.spaces.Box):
        raise UserError(f"{dataset_id}: only Box observation spaces are supported, got {mds.observation_space}")
    parts: dict[str, list] = {k: [] for k in ARRAY_KEYS}
    for ep in mds.iterate_episodes():
        obs = np.asarray(ep.observations, dtype=np.float32)  # T+1 observations for T steps
        for k, v in zip(ARRAY_KEYS, (obs[:-1], ep.actions, ep.rewards, obs[1:], ep.terminations, ep.truncations)):
            parts[k].append(np.asarray(v))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    discrete = isinstance(mds.action_space, gym.spaces.Discrete)
    arrays["actions"] = arrays["actions"].astype(np.int64 if discrete else np.float32)
    arrays["rewards"] = arrays["rewards"].astype(np.float32)
    arrays["terminals"], arrays["timeouts"] = arrays["terminals"].astype(bool), arrays["timeouts"].astype(bool)
    spec = mds.spec.env_spec
    meta = getattr(mds.storage, "metadata", {}) or {}
    ref = minari_reference_scores(dataset_id, meta)
    return Dataset(**arrays, env_id=spec.id if spec else None, env_kwargs=dict(spec.kwargs) if spec else {},
                   ref_min_score=ref[0], ref_max_score=ref[1], name=dataset_id)


# D4RL's reference returns (d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE: a uniform-random and an expert SAC policy,
# measured on the v2 environments under mujoco-py). Minari's mujoco/*-v0 sets carry none, and run on Gymnasium v5,
# whose returns are not on the same scale (Walker2d's friction, healthy_reward only while healthy, Ant's 105-D
# observations: see docs/datasets.md); scores normalized with them read only approximately like D4RL's.
D4RL_REFERENCE = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                  "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}


def minari_reference_scores(dataset_id: str, meta: dict) -> tuple[float | None, float | None]:
    """(random, expert) returns for the normalized score: the dataset's own when Minari has them, else D4RL's for
    mujoco/{hopper,halfcheetah,walker2d,ant}/* (approximate, said once), else none (said once)."""
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        return float(meta["ref_min_score"]), float(meta["ref_max_score"])
    parts = dataset_id.split("/")
    if len(parts) == 3 and parts[0] == "mujoco" and parts[1] in D4RL_REFERENCE:
        print(f"note: {dataset_id} has no reference scores; normalizing with D4RL's {parts[1]} returns "
              f"{D4RL_REFERENCE[parts[1]]}, measured on the older v2 environments (approximate on v5)", flush=True)
        return D4RL_REFERENCE[parts[1]]
    print(f"note: {dataset_id} has no reference scores (ref_min_score / ref_max_score), so no normalized score "
          "can be given; raw returns are reported", flush=True)
    return None, None


def validate(ds: Dataset) -> None:
    """Raise a UserError that says what is wrong and how to fix it. The one repair: a per-transition array shaped
    (N, 1) (the CQL authors' loader writes rewards and terminals so) becomes (N,), with a note; anything else that
    could broadcast in a loss is refused, and nothing is truncated. behavior_log_probs must be finite (-inf would be
    an action the behaviour policy could not take) and, for discrete actions, at most 0."""
    for k in (*ARRAY_KEYS, "behavior_log_probs"):
        v = getattr(ds, k)
        if v is not None and (v.ndim == 0 or v.dtype.kind not in "biuf"):  # bool, (unsigned) integer, float
            raise UserError(f"{ds.name}: {k} must be an array of numbers, one row per transition, got {v.dtype} "
                            f"{v.shape}")
    n = len(ds.rewards)
    if n == 0:
        raise UserError(f"{ds.name}: the dataset is empty")
    for k in ("rewards", "terminals", "timeouts", "behavior_log_probs") + (("actions",) if ds.discrete else ()):
        v = getattr(ds, k)
        if v is not None and v.ndim == 2 and v.shape[1] == 1:
            print(f"note: {ds.name}: {k} has shape {v.shape}; using it as ({len(v)},)", flush=True)
            setattr(ds, k, v[:, 0])
        elif v is not None and v.ndim != 1:
            raise UserError(f"{ds.name}: {k} must have one value per transition, shape (N,), got {v.shape}")
    # Box actions are checked against the environment's space below; without one they must at least be (N, dim)
    for k in ("observations", "next_observations") + (("actions",) if ds.env_id is None and not ds.discrete else ()):
        v = getattr(ds, k)
        if v.ndim != 2 or v.dtype == bool:
            fix = " (a 1-D action of a 1-D Box: use actions[:, None])" if k == "actions" and v.ndim == 1 else ""
            raise UserError(f"{ds.name}: {k} must be a real (N, dim) array, got {v.dtype} {v.shape}{fix}")
    rows = {k: len(getattr(ds, k)) for k in ARRAY_KEYS}
    if ds.behavior_log_probs is not None:
        rows["behavior_log_probs"] = len(ds.behavior_log_probs)
    if len(set(rows.values())) != 1:
        raise UserError(f"{ds.name}: arrays must be row-aligned (one row per transition), got lengths {rows}")
    if ds.observations.shape != ds.next_observations.shape:
        raise UserError(f"{ds.name}: observations {ds.observations.shape} and next_observations "
                        f"{ds.next_observations.shape} must both be (N, obs_dim)")
    for k in ("observations", "actions", "rewards", "next_observations"):
        v = getattr(ds, k)
        bad = ~np.isfinite(v if np.issubdtype(v.dtype, np.floating) else v.astype(np.float64))  # no float64 copy
        if bad.any():
            rows_bad = np.unique(np.nonzero(bad)[0])
            raise UserError(f"{ds.name}: {k} has {bad.sum()} NaN/inf value(s), first at row(s) "
                            f"{rows_bad[:5].tolist()}; clean or drop those transitions before training")
    for k in ("terminals", "timeouts"):
        v = getattr(ds, k)
        if v.dtype != bool and not np.isin(v, (0, 1)).all():
            raise UserError(f"{ds.name}: {k} must be boolean (0/1), got values {np.unique(v)[:5]}")
        setattr(ds, k, v.astype(bool))
    if ds.env_id is not None:
        check_against_env(ds)
    lp = ds.behavior_log_probs  # ope.py takes them as the exact log pi_b(a|s) of each logged action
    if lp is None:
        return
    checks = [(np.isnan(lp) | (lp == np.inf), "NaN or +inf", ""),
              (lp == -np.inf, "-inf", ": logged actions the behaviour policy could not have taken (probability 0)"),
              ((lp > 1e-6) & ds.discrete, "above 0",  # up to 1e-6: float rounding of log(1), not an error
               ": a discrete action's probability cannot exceed 1 (were negative log-probabilities stored?)")]
    for bad, what, why in checks:
        if bad.any():
            rows = np.flatnonzero(bad)
            raise UserError(f"{ds.name}: behavior_log_probs is {what} at {len(rows)} row(s), first {rows[:5].tolist()}"
                            f"{why}; fix them, or drop behavior_log_probs (ope.py then fits a behaviour policy)")


def check_against_env(ds: Dataset) -> None:
    """The observation and action shapes, the action dtype and every action against the dataset's environment."""
    try:
        env = gym.make(ds.env_id, **ds.env_kwargs)
    except Exception as e:
        raise UserError(f"{ds.name}: cannot make its environment {ds.env_id} {ds.env_kwargs or ''} "
                        f"({type(e).__name__}: {e}); fix env_id / env_kwargs in the dataset file") from None
    if ds.observations.shape[1:] != env.observation_space.shape:
        raise UserError(f"{ds.name}: observations have shape {ds.observations.shape[1:]} but {ds.env_id} "
                        f"observes {env.observation_space.shape}; is env_id right for this data?")
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        if ds.actions.ndim != 1 or not np.issubdtype(ds.actions.dtype, np.integer):
            raise UserError(f"{ds.name}: {ds.env_id} has a Discrete({space.n}) action space, so actions must be "
                            f"a 1-D integer array, got {ds.actions.dtype} {ds.actions.shape}")
        bad = (ds.actions < space.start) | (ds.actions >= space.start + space.n)
    elif isinstance(space, gym.spaces.Box):
        if ds.discrete:
            raise UserError(f"{ds.name}: {ds.env_id} has a Box action space, so actions must be floats, got "
                            f"{ds.actions.dtype}; store them as actions.astype(np.float32)")
        if ds.actions.shape[1:] != space.shape:
            raise UserError(f"{ds.name}: actions have shape {ds.actions.shape[1:]} but {ds.env_id} "
                            f"expects {space.shape}" + (" (use actions[:, None])" if ds.actions.ndim == 1 else ""))
        bad = ((ds.actions < space.low) | (ds.actions > space.high)).any(axis=1)
    else:
        raise UserError(f"{ds.name}: action space {space} is not supported (Box or Discrete only)")
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{ds.name}: {int(bad.sum())} action(s) lie outside {space} (first at row {i}: "
                        f"{ds.actions[i]}); rescale or clip them yourself if that is what you intend")
    env.close()


# ---------------------------------------------------------------------------------------------------------
# Report: look at the data before choosing an algorithm
# ---------------------------------------------------------------------------------------------------------
def _v5_normalization(name: str, mean_return: float) -> list[str]:
    """The MuJoCo datasets' second normalization: v5 random return (measured) and this repo's expert's v5 return."""
    env_name = _split_name(name)[0]
    lo, path = V5_RANDOM_RETURN[env_name], behaviour_dir() / f"{env_name}-expert.pt"
    lines = ["               ^ with D4RL's reference returns (measured on v2 envs): the one tables use"]
    if not path.exists():
        return lines + [f"  normalized (v5)   n/a   (v5 random {lo:.1f} = 0; no {path} for the expert's v5 return)"]
    hi = float(torch.load(path, weights_only=True)["eval_return_mean"])
    return lines + [f"  normalized (v5) {100 * (mean_return - lo) / (hi - lo):7.1f}   (v5 random {lo:.1f} = 0, "
                    f"this repo's expert {hi:.1f} = 100, from {path.name})"]


def report(ds: Dataset) -> str:
    rets = ds.episode_returns()
    lines = [f"dataset {ds.name}   env {ds.env_id} {ds.env_kwargs or ''}",
             f"  transitions {len(ds):,}   episodes {len(rets):,}   terminals {int(ds.terminals.sum()):,}   "
             f"timeouts {int(ds.timeouts.sum()):,}",
             f"  return       min {rets.min():9.1f}   mean {rets.mean():9.1f}   max {rets.max():9.1f}   "
             f"std {rets.std():8.1f}"]
    if ds.ref_min_score is not None and ds.ref_max_score is not None:
        lines.append(f"  normalized   {float(ds.normalized_score(rets.mean())):9.1f}   "
                     f"(random {ds.ref_min_score:.1f} = 0, expert {ds.ref_max_score:.1f} = 100)")
    if ds.name in LOCOMOTION_NAMES:
        lines += _v5_normalization(ds.name, float(rets.mean()))
    counts, edges = np.histogram(rets, bins=10)
    lines.append("  return histogram")
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"    {lo:9.1f} .. {hi:9.1f}  {'#' * int(round(40 * c / max(counts.max(), 1))):40s} {c}")
    if ds.discrete:
        freq = np.bincount(ds.actions) / len(ds)
        lines.append("  action frequencies  " + "  ".join(f"{a}: {f:.3f}" for a, f in enumerate(freq)))
    else:
        lines.append("  action range per dimension (and share of the box covered: 10 bins per dim)")
        space = gym.make(ds.env_id, **ds.env_kwargs).action_space if ds.env_id else None
        lo, hi = (space.low, space.high) if space is not None else (ds.actions.min(0), ds.actions.max(0))
        for d in range(ds.actions.shape[1]):
            x = ds.actions[:, d]
            bins = np.histogram(x, bins=10, range=(float(lo[d]), float(hi[d])))[0]
            lines.append(f"    dim {d}: [{x.min():6.2f}, {x.max():6.2f}]  mean {x.mean():6.2f}  std {x.std():5.2f}  "
                         f"bins hit {int((bins > 0).sum())}/10")
        if ds.actions.shape[1] <= 6:
            cells = np.floor((ds.actions - lo) / (hi - lo + 1e-12) * 10).clip(0, 9).astype(np.int64)
            occupied = len(np.unique(cells, axis=0))
            lines.append(f"    joint: {occupied}/{10 ** ds.actions.shape[1]} cells of a 10^d grid visited")
    if ds.behavior_log_probs is not None:
        lines.append(f"  behaviour policy: mean -log pi_b(a|s) (entropy estimate) {-ds.behavior_log_probs.mean():.3f} "
                     f"{'nats' if ds.discrete else 'nats (differential)'}")
    else:
        lines.append("  behaviour policy: unknown (no behavior_log_probs); ope.py will fit one")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="datasets.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="a built-in name, an .npz path or a Minari id")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="report every built-in dataset, generating missing ones")
    mode.add_argument("--list", action="store_true", help="list the built-in names, one per line")
    args = p.parse_args(argv)
    if args.names and (args.all or args.list):
        p.error("--all and --list take no dataset names")
    if args.list:
        print("\n".join(BUILTIN_NAMES))
    elif not (args.all or args.names):
        p.print_help()
    else:
        try:
            for name in BUILTIN_NAMES if args.all else args.names:
                try:
                    print(report(load_dataset(name)), end="\n\n")
                except UserError as e:
                    if not args.all or name not in LOCOMOTION_NAMES:
                        raise
                    print(f"skipped {name}: {e}\n", flush=True)  # --all goes on without the untrained ones
        except UserError as e:  # a user mistake: one line, no traceback
            raise SystemExit(f"datasets.py: error: {e}") from None


if __name__ == "__main__":
    main()
