"""Thin helpers shared by cql.py, iql.py and bcq.py: data on the device, networks, evaluation, run set-up.

Everything algorithmic lives in the scripts; this file only holds plumbing a reader can skim.
Dataset recipes, loading and validation live in datasets.py (`load_dataset` is re-exported here).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from datasets import BUILTIN_NAMES, Dataset, load_dataset

__all__ = ["BUILTIN_NAMES", "Dataset", "load_dataset", "Policy", "ReplayBuffer", "mlp", "evaluate", "set_seed",
           "pick_device", "make_run", "Progress", "dataset_dims", "return_range_scale"]


@dataclass
class Policy:
    """A trained policy in the environment's units, rebuilt from a `--save-model` checkpoint by a script's
    `load_policy` (what `--load-model` evaluates and what ope.py estimates the value of)."""

    act: Callable[[torch.Tensor], torch.Tensor]
    """raw observations (B, obs_dim) -> the evaluation action: (B, act_dim) floats in the action box, or (B,) ints"""
    dist: Callable[[torch.Tensor], torch.distributions.Distribution] | None
    """raw observations -> pi(.|s) over environment actions (log_prob summed over action dims); None if deterministic"""
    discrete: bool
    checkpoint: dict


class ReplayBuffer:
    """The whole dataset as tensors on `device`; `sample` draws uniformly with replacement, on the device.

    Box actions are stored rescaled to [-1, 1] (the range of a tanh policy); Discrete actions as int64.

    With `normalize_obs`, observations are standardised by the dataset's mean/std (eps 1e-3, as CORL);
    `normalize(obs)` applies the same transform at evaluation time.
    """

    def __init__(self, ds: Dataset, device: torch.device, normalize_obs: bool = False, reward_scale: float = 1.0,
                 reward_bias: float = 0.0):
        def t(x, dtype=torch.float32):
            return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

        self.device, self.size = device, len(ds)
        obs = ds.observations.astype(np.float64)
        self.obs_mean = t(obs.mean(0) if normalize_obs else np.zeros(obs.shape[1]))
        self.obs_std = t(obs.std(0) + 1e-3 if normalize_obs else np.ones(obs.shape[1]))
        self.observations = self.normalize(t(ds.observations))
        self.next_observations = self.normalize(t(ds.next_observations))
        if ds.discrete:
            self.actions = t(ds.actions, torch.long)
        else:  # Box actions are rescaled to [-1, 1] for the networks; `unscale_action` maps policy outputs back
            low, high = action_bounds(ds)
            self.action_center, self.action_half = t((high + low) / 2), t((high - low) / 2)
            self.actions = (t(ds.actions) - self.action_center) / self.action_half
        self.rewards = t(ds.rewards) * reward_scale + reward_bias
        self.terminals = t(ds.terminals)  # only true terminals stop bootstrapping; timeouts do not

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def unscale_action(self, action: torch.Tensor) -> torch.Tensor:
        """[-1, 1] network actions -> the environment's action box."""
        return action * self.action_half + self.action_center

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """(obs, actions, rewards, next_obs, terminals) for `batch_size` random rows, no host round-trip."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return (self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
                self.terminals[idx])


def action_bounds(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of a Box action space: the environment's when known, else the data's own range."""
    if ds.env_id is not None:
        space = gym.make(ds.env_id, **ds.env_kwargs).action_space
        return space.low.astype(np.float64), space.high.astype(np.float64)
    low, high = ds.actions.min(0).astype(np.float64), ds.actions.max(0).astype(np.float64)
    return low, np.where(high > low, high, low + 1.0)


def dataset_dims(ds: Dataset) -> tuple[int, int, int | None]:
    """(obs_dim, act_dim, n_actions): n_actions is None for Box; for Discrete it comes from the environment
    when known (the data may not contain every action), act_dim is then 1."""
    if not ds.discrete:
        return ds.observations.shape[1], ds.actions.shape[1], None
    n = int(gym.make(ds.env_id, **ds.env_kwargs).action_space.n) if ds.env_id else int(ds.actions.max()) + 1
    return ds.observations.shape[1], 1, n


def return_range_scale(ds: Dataset) -> float:
    """IQL's locomotion reward scale: 1000 / (max - min episode return in the dataset)."""
    rets = ds.episode_returns()
    return 1000.0 / max(float(rets.max() - rets.min()), 1e-6)


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256), activation: type[nn.Module] = nn.ReLU,
        output_activation: type[nn.Module] | None = None, dropout: float = 0.0) -> nn.Sequential:
    """in -> [Linear -> activation (-> Dropout)] * len(hidden) -> Linear -> (output_activation)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), activation()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


def evaluate(ds: Dataset, policy: Callable[[torch.Tensor], torch.Tensor], n_episodes: int, seed: int,
             device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> np.ndarray:
    """Run `n_episodes` of `policy` (a batch of raw observations -> a batch of actions, under no_grad) in the
    dataset's environment, each episode seeded `seed + i`; return the undiscounted episode returns."""
    if ds.env_id is None:
        raise ValueError(f"{ds.name}: no env_id in the dataset metadata, so policies cannot be evaluated; "
                         "pass --eval-episodes 0 to train without evaluation")
    env = gym.make(ds.env_id, **ds.env_kwargs)
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    returns = np.zeros(n_episodes)
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            with torch.no_grad():
                o = normalize(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
                a = policy(o)[0].cpu().numpy()
            obs, r, term, trunc, _ = env.step(int(a) if discrete else a)
            returns[i] += r
            done = term or trunc
    env.close()
    return returns


def set_seed(seed: int, torch_deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def pick_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


def make_run(args, script: str) -> tuple[str, SummaryWriter]:
    """runs/{dataset}__{exp_name}__{seed}__{timestamp}, with the hyperparameters logged as a markdown table."""
    dataset = Path(args.dataset).stem if args.dataset.endswith(".npz") else args.dataset.replace("/", "-")
    run_name = f"{dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    print(f"{script}: run {run_name} (tensorboard --logdir runs)", flush=True)
    return run_name, writer


class Progress:
    """A one-line console summary every `log_every` steps: steps, steps/second, ETA and the last evaluation."""

    def __init__(self, total_steps: int):
        self.total, self.last_t, self.last_step = total_steps, time.time(), 0
        self.last_eval = "no eval yet"

    def sps(self, step: int) -> float:
        """Gradient steps per second since the previous call."""
        now = time.time()
        sps = (step - self.last_step) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_step = now, step
        return sps

    def eval(self, ret: float, norm: float, seconds: float) -> None:
        """Record an evaluation; its wall time is left out of the next SPS figure."""
        self.last_eval = f"eval return {ret:.1f} (normalized {norm:.1f})"
        self.last_t += seconds

    def line(self, step: int, sps: float, extra: str = "") -> None:
        eta = (self.total - step) / max(sps, 1e-9)
        print(f"step {step:>8}/{self.total} | {sps:6.0f} SPS | ETA {eta / 60:6.1f} min | {self.last_eval}"
              + (f" | {extra}" if extra else ""), flush=True)
