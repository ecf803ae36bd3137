"""The online half of offline-to-online fine-tuning, shared by iql_finetune.py and cql_finetune.py
(docs/finetune.md): a replay buffer with room for the transitions collected online, and the collector that steps
the dataset's environment with the policy being trained."""

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from common import ReplayBuffer
from datasets import Dataset, UserError


class OnlineReplayBuffer(ReplayBuffer):
    """The dataset's rows [0, n_offline), then `capacity` empty rows that `add` fills with online transitions. With
    `track_returns` (Cal-QL) each row also holds its return-to-go G, and an online episode is held back from
    sampling until it ends and its G is known."""

    def __init__(self, ds: Dataset, device: torch.device, normalize_obs: bool, reward_scale: float,
                 reward_bias: float, capacity: int):
        super().__init__(ds, device, normalize_obs, reward_scale, reward_bias)
        for name in ("observations", "next_observations", "actions", "rewards", "terminals"):
            x = getattr(self, name)
            setattr(self, name, torch.cat([x, x.new_zeros(capacity, *x.shape[1:])]))
        self.n_offline = self.ready = self.episode_start = self.size  # rows [0, ready) may be sampled
        self.returns_to_go: Callable | None = None

    def track_returns(self, returns_to_go: Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor],
                      episode_ends: np.ndarray) -> None:
        """Cal-QL: `returns_to_go(rewards, terminals, episode_ends)` gives G for the dataset now and for each online
        episode as it ends."""
        self.returns_to_go, self.mc_returns = returns_to_go, torch.zeros_like(self.rewards)
        self.mc_returns[: self.n_offline] = returns_to_go(self.rewards[: self.n_offline],
                                                          self.terminals[: self.n_offline], episode_ends)

    def sample(self, batch_size: int, online_ratio: float = 0.0) -> tuple[torch.Tensor, ...]:
        """online_ratio > 0: that share of the batch from the online rows, the rest from the dataset (symmetric
        sampling, RLPD / Cal-QL); 0: uniform over every sampleable row."""
        n_online = self._n_online(batch_size, online_ratio)
        if n_online == 0:
            idx = torch.randint(0, self.ready, (batch_size,), device=self.device)
        else:
            idx = torch.cat([torch.randint(0, self.n_offline, (batch_size - n_online,), device=self.device),
                             torch.randint(self.n_offline, self.ready, (n_online,), device=self.device)])
        batch = (self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
                 self.terminals[idx])
        return batch if self.mc_returns is None else (*batch, self.mc_returns[idx])

    def _n_online(self, batch_size: int, online_ratio: float) -> int:
        return round(batch_size * online_ratio) if self.ready > self.n_offline else 0

    def online_share(self, batch_size: int, online_ratio: float) -> float:
        """The expected share of online rows in a batch `sample` draws now (for logging)."""
        n_online = self._n_online(batch_size, online_ratio)
        return n_online / batch_size if n_online > 0 else (self.ready - self.n_offline) / self.ready

    def add(self, obs: np.ndarray, action: torch.Tensor, reward: float, next_obs: np.ndarray, terminal: bool) -> None:
        """One online transition: raw observations and reward as the environment gave them, the network's action
        ([-1, 1] for Box, an index for Discrete); stored with the dataset's normalisation and reward transform."""
        if self.size == len(self.rewards):
            raise ValueError(f"the replay buffer is full ({self.size} rows): pass capacity= for the online steps")
        i = self.size
        self.observations[i] = self.normalize(torch.as_tensor(obs, dtype=torch.float32, device=self.device))
        self.next_observations[i] = self.normalize(torch.as_tensor(next_obs, dtype=torch.float32, device=self.device))
        self.actions[i] = action
        self.rewards[i] = float(reward) * self.reward_scale + self.reward_bias
        self.terminals[i] = float(terminal)
        self.size += 1
        if self.mc_returns is None:
            self.ready = self.size

    def end_episode(self) -> None:
        """The online episode that just ended becomes sampleable; with `track_returns`, after its G is filled in."""
        if self.mc_returns is not None:
            start, stop = self.episode_start, self.size
            self.mc_returns[start:stop] = self.returns_to_go(self.rewards[start:stop], self.terminals[start:stop],
                                                             np.array([stop - start - 1]))
        self.ready = self.episode_start = self.size


class OnlineCollector:
    """Steps the dataset's environment with the policy being trained, one transition at a time into the buffer. The
    environment is seeded once (`seed`), so a run depends on the seed alone. `explore(obs)` maps a batch of
    normalised observations to network actions; it draws from the training random stream (the samples are part of
    training), with `modules` in eval mode (no dropout) while it acts."""

    def __init__(self, ds: Dataset, rb: OnlineReplayBuffer, seed: int):
        if ds.env_id is None:
            raise UserError(f"{ds.name}: no env_id in the dataset metadata, so there is no environment to fine-tune in")
        self.env, self.rb = gym.make(ds.env_id, **ds.env_kwargs), rb
        self.obs, _ = self.env.reset(seed=seed)
        self.env.action_space.seed(seed)
        self.env_steps, self.episode_return, self.episode_length = 0, 0.0, 0

    def step(self, explore: Callable[[torch.Tensor], torch.Tensor] | None, *modules: nn.Module
             ) -> tuple[float, int] | None:
        """One environment step; returns (return, length) of the episode when this step ends one, else None.
        `explore` None: a uniformly random action from the seeded action space (a warm-up step)."""
        if explore is None:
            a = torch.as_tensor(self.env.action_space.sample(), device=self.rb.device)
            a = a if self.rb.discrete else (a.float() - self.rb.action_center) / self.rb.action_half
        else:
            modes = [m.training for m in modules]
            try:
                with torch.no_grad():
                    for m in modules:
                        m.eval()
                    obs = torch.as_tensor(self.obs, dtype=torch.float32, device=self.rb.device)[None]
                    a = explore(self.rb.normalize(obs))[0]
            finally:
                for m, mode in zip(modules, modes):
                    m.train(mode)
        env_action = int(a) if self.rb.discrete else self.rb.unscale_action(a).cpu().numpy()
        next_obs, reward, terminated, truncated, _ = self.env.step(env_action)
        self.rb.add(self.obs, a, reward, next_obs, terminated)
        self.env_steps, self.episode_return, self.episode_length = (self.env_steps + 1, self.episode_return + reward,
                                                                    self.episode_length + 1)
        self.obs = next_obs
        if not (terminated or truncated):
            return None
        self.rb.end_episode()
        finished = (self.episode_return, self.episode_length)
        self.obs, _ = self.env.reset()
        self.episode_return, self.episode_length = 0.0, 0
        return finished

    def close(self) -> None:
        self.env.close()
