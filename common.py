"""Thin helpers shared by cql.py, iql.py and bcq.py: data on the device, networks, evaluation, run set-up.

Everything algorithmic lives in the scripts; this file only holds plumbing a reader can skim.
Dataset recipes, loading and validation live in datasets.py (`load_dataset` is re-exported here).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from datasets import BUILTIN_NAMES, Dataset, UserError, load_dataset

__all__ = ["BUILTIN_NAMES", "Dataset", "UserError", "load_dataset", "Policy", "ReplayBuffer", "mlp", "evaluate",
           "Evaluation", "isolated", "set_seed", "pick_device", "make_run", "Progress", "dataset_dims",
           "return_range_scale", "report_user_errors", "check_ranges", "COMMON_RANGES", "load_checkpoint",
           "log_evaluation", "format_score", "report_saved_policy", "OnlineCollector",
           "save_training_state", "read_training_state", "resumed_args", "restore_training_state"]


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

    With `normalize_obs`, observations are standardised by the dataset mean/std (eps 1e-3, as CORL);
    `normalize(obs)` applies the same transform at evaluation time.

    Offline-to-online: `capacity` rows are kept free after the dataset for transitions collected online (`add`); rows
    [0, n_offline) are the dataset, [n_offline, size) the online data. With `returns_to_go` (Cal-QL) each row also
    holds its Monte-Carlo return G, and an online episode is held back from sampling until it ends and G is known.
    """

    def __init__(self, ds: Dataset, device: torch.device, normalize_obs: bool = False, reward_scale: float = 1.0,
                 reward_bias: float = 0.0, capacity: int = 0):
        def t(x, dtype=torch.float32):
            return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

        def with_room(x: torch.Tensor) -> torch.Tensor:  # the dataset's rows, then `capacity` empty ones
            return torch.cat([x, x.new_zeros(capacity, *x.shape[1:])]) if capacity else x

        self.device, self.size = device, len(ds)
        self.n_offline = self.ready = self.episode_start = self.size  # rows [0, ready) may be sampled
        self.reward_scale, self.reward_bias, self.discrete = reward_scale, reward_bias, ds.discrete
        obs, dim = ds.observations, ds.observations.shape[1]  # float64 statistics, without a float64 copy of the data
        self.obs_mean = t(obs.mean(0, dtype=np.float64) if normalize_obs else np.zeros(dim))
        self.obs_std = t(obs.std(0, dtype=np.float64) + 1e-3 if normalize_obs else np.ones(dim))
        if normalize_obs:
            self.observations = with_room(self.normalize(t(ds.observations)))
            self.next_observations = with_room(self.normalize(t(ds.next_observations)))
        else:  # on the CPU these share the dataset's arrays: no second copy of the largest arrays (2M-row MuJoCo)
            self.observations = with_room(t(ds.observations))
            self.next_observations = with_room(t(ds.next_observations))
        if ds.discrete:
            self.actions = with_room(t(ds.actions, torch.long))
        else:  # Box actions are rescaled to [-1, 1] for the networks; `unscale_action` maps policy outputs back
            low, high = action_bounds(ds)
            self.action_center, self.action_half = t((high + low) / 2), t((high - low) / 2)
            self.actions = with_room((t(ds.actions) - self.action_center) / self.action_half)
        self.rewards = t(ds.rewards) * reward_scale + reward_bias
        self.terminals = t(ds.terminals)  # only true terminals stop bootstrapping; timeouts do not
        if self.rewards.shape != (self.size,) or self.terminals.shape != (self.size,):  # (N, 1) would broadcast
            raise ValueError(f"rewards {tuple(self.rewards.shape)} and terminals {tuple(self.terminals.shape)} must "
                             f"be ({self.size},): load data with load_dataset, which validates it")
        self.rewards, self.terminals = with_room(self.rewards), with_room(self.terminals)
        self.mc_returns: torch.Tensor | None = None
        self.discount = 1.0
        self._episode_ends = ds.episode_ends()

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def unscale_action(self, action: torch.Tensor) -> torch.Tensor:
        """[-1, 1] network actions -> the environment's action box."""
        return action * self.action_half + self.action_center

    def sample(self, batch_size: int, online_ratio: float = 0.0) -> tuple[torch.Tensor, ...]:
        """(obs, actions, rewards, next_obs, terminals), and with `returns_to_go` the rows' G last, for `batch_size`
        random rows, no host round-trip. online_ratio > 0: that share of the batch from the online rows and the
        rest from the dataset (symmetric sampling, RLPD / Cal-QL); 0: uniform over every row."""
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

    def returns_to_go(self, discount: float) -> None:
        """Cal-QL: G_t = r_t + gamma * (1 - terminal_t) * G_{t+1} within each episode of the dataset, on the scaled
        rewards, completed so that G never exceeds the behaviour policy's value V^mu: where an episode is cut (a time
        limit, the end of the data) the sum goes on with the discounted tail of min(r_min, 0) per step, r_min the
        data's smallest reward (0 when r >= 0: the authors' truncated sum). An episode whose every reward is r_min <=
        0 (a sparse-reward failure) thus gets r_min / (1 - gamma) at every step, the authors' sparse rule
        (docs/finetune.md). Online episodes get theirs in `end_episode`."""
        self.discount, self.mc_returns = discount, torch.zeros_like(self.rewards)
        self.reward_floor = min(float(self.rewards[: self.n_offline].min()), 0.0)
        starts = np.concatenate([[0], self._episode_ends[:-1] + 1])
        for start, end in zip(starts, self._episode_ends):
            self._fill_returns(int(start), int(end) + 1)

    def _fill_returns(self, start: int, stop: int) -> None:
        r, term = self.rewards[start:stop].cpu().double().numpy(), self.terminals[start:stop].cpu().double().numpy()
        g = 0.0 if term[-1] else self.reward_floor / (1.0 - self.discount)  # a cut episode's tail, a lower bound
        out = np.zeros(stop - start)
        for i in range(stop - start - 1, -1, -1):
            g = r[i] + self.discount * (1.0 - term[i]) * g
            out[i] = g
        self.mc_returns[start:stop] = torch.as_tensor(out).to(self.mc_returns)

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
        """The online episode that just ended becomes sampleable; with `returns_to_go`, after its G is filled in."""
        if self.mc_returns is not None:
            self._fill_returns(self.episode_start, self.size)
        self.ready = self.episode_start = self.size


class OnlineCollector:
    """Offline-to-online fine-tuning: steps the dataset's environment with the policy being trained, one transition
    at a time into the replay buffer. The environment is seeded once (`seed`), so a run depends on the seed alone.
    `explore(obs)` maps a batch of normalised observations to network actions; it draws from the training random
    stream (the samples are part of training), with `modules` in eval mode (no dropout) while it acts."""

    def __init__(self, ds: Dataset, rb: ReplayBuffer, seed: int):
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


def action_bounds(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of a Box action space: the environment's when known, else the data's own range."""
    if ds.env_id is not None:
        space = env_action_space(ds)
        return space.low.astype(np.float64), space.high.astype(np.float64)
    low, high = ds.actions.min(0).astype(np.float64), ds.actions.max(0).astype(np.float64)
    return low, np.where(high > low, high, low + 1.0)


def env_action_space(ds: Dataset) -> gym.Space:
    """The dataset environment's action space (the environment is closed again)."""
    env = gym.make(ds.env_id, **ds.env_kwargs)
    space = env.action_space
    env.close()
    return space


def dataset_dims(ds: Dataset) -> tuple[int, int, int | None]:
    """(obs_dim, act_dim, n_actions): n_actions is None for Box; for Discrete it comes from the environment
    when known (the data may not contain every action), act_dim is then 1."""
    if not ds.discrete:
        return ds.observations.shape[1], ds.actions.shape[1], None
    n = int(env_action_space(ds).n) if ds.env_id else int(ds.actions.max()) + 1
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


@dataclass
class Evaluation:
    """What `evaluate` measured: per-episode returns and the observations the episodes started from."""

    returns: np.ndarray
    """undiscounted episode returns (what the normalized score is computed from)"""
    discounted_returns: np.ndarray
    """sum_t gamma^t (scale r_t + bias) per episode, in training-reward units: what the policy's own Q at the start
    state should predict"""
    start_obs: torch.Tensor
    """(n_episodes, obs_dim) raw first observations, on the device"""


def flush_subnormals(update: Callable) -> Callable:
    """`update` run with float32 subnormals (|x| < 1.2e-38) read and written as zero on the CPU
    (torch.set_flush_denormal). Adam's moments of weights whose gradient stays zero (dead ReLU units) shrink by 0.9
    and 0.999 a step into that range, where CPUs compute more slowly: a Box BCQ run's state at 130k steps updates
    1.26x faster with them flushed (docs/benchmark.md). The maths is unchanged (such a moment moves a weight by
    < 1e-30); only the update is wrapped, so data generation, environments and evaluation keep IEEE arithmetic."""

    def flushed(*args, **kwargs):
        torch.set_flush_denormal(True)
        try:
            return update(*args, **kwargs)
        finally:
            torch.set_flush_denormal(False)

    return flushed


@contextlib.contextmanager
def isolated(*modules: nn.Module) -> Iterator[None]:
    """For evaluation and diagnostics: `modules` in eval mode (no dropout) and the torch random state forked (CPU
    and CUDA), so neither changes what training draws next: the same seed gives the same run whatever
    --log-every, --eval-every and --eval-episodes are."""
    modes = [m.training for m in modules]
    with torch.random.fork_rng(), torch.no_grad():
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)


def evaluate(ds: Dataset, policy: Callable[[torch.Tensor], torch.Tensor], n_episodes: int, seed: int,
             device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
             discount: float = 0.99, on_episode: Callable[[], object] | None = None,
             reward_transform: tuple[float, float] = (1.0, 0.0)) -> Evaluation:
    """Run `n_episodes` of `policy` (a batch of raw observations -> a batch of actions) in the dataset's
    environment, each episode seeded `seed + i`, on a forked random stream (see `isolated`); `on_episode` is called
    after each episode (a progress bar's update). The discounted return sums `scale * r + bias` for
    `reward_transform` (scale, bias): the rewards the critics were trained on, so that it compares with their Q."""
    if ds.env_id is None:
        raise UserError(f"{ds.name}: no env_id in the dataset metadata, so policies cannot be evaluated; "
                        "pass --eval-episodes 0 to train without evaluation")
    env = gym.make(ds.env_id, **ds.env_kwargs)
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    scale, bias = reward_transform
    returns, discounted, starts = np.zeros(n_episodes), np.zeros(n_episodes), []
    with isolated():
        for i in range(n_episodes):
            obs, _ = env.reset(seed=seed + i)
            starts.append(obs)
            done, t = False, 0
            while not done:
                a = policy(normalize(torch.as_tensor(obs, dtype=torch.float32, device=device)[None]))[0].cpu().numpy()
                obs, r, term, trunc, _ = env.step(int(a) if discrete else a)
                returns[i] += r
                discounted[i] += discount**t * (scale * r + bias)
                done, t = term or trunc, t + 1
            if on_episode is not None:
                on_episode()
    env.close()
    start_obs = torch.as_tensor(np.asarray(starts), dtype=torch.float32, device=device).reshape(n_episodes, -1)
    return Evaluation(returns, discounted, start_obs)


def report_saved_policy(path: str, policy: Policy, ds: Dataset, n_episodes: int, seed: int,
                        device: torch.device) -> None:
    """--load-model: evaluate a saved policy on `ds` and print its score in one line."""
    check_policy_fits(path, policy.checkpoint, ds)
    returns = evaluate(ds, policy.act, n_episodes, seed, device).returns
    print(f"{path} on {ds.name} over {len(returns)} episodes: "
          f"{format_score(returns.mean(), ds.normalized_score(returns.mean()))}, return std {returns.std():.1f}")


def check_policy_fits(path: str, ckpt: dict, ds: Dataset) -> None:
    """A UserError when a checkpoint's observation or action space differs from the dataset's environment."""
    have, want = dataset_dims(ds), (ckpt["obs_dim"], ckpt["act_dim"], ckpt["n_actions"])
    if have != want:
        def spaces(obs_dim: int, act_dim: int, n_actions: int | None) -> str:
            return f"{obs_dim}-d observations, " + (f"{n_actions} actions" if n_actions else f"{act_dim}-d actions")
        raise UserError(f"{path} was trained on {ckpt['args']['dataset']} ({spaces(*want)}); {ds.name} has "
                        f"{spaces(*have)}: pass a dataset of the same environment, or drop --dataset")


def check_data(args, ds: Dataset) -> None:
    """Start-up checks that need the dataset: a batch no larger than the data, and an environment to evaluate in
    (before training, so that no run fails at its first evaluation)."""
    check_ranges(args, {"batch_size": f"[1, {len(ds)}]"})  # not more than the dataset's transitions
    if args.eval_episodes > 0 and ds.env_id is None:
        raise UserError(f"{ds.name}: no env_id in the dataset, so there is no environment to evaluate in; pass "
                        "--eval-episodes 0 (or add env_id to the .npz)")


def set_seed(seed: int, torch_deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def pick_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device (a UserError if this
    machine does not have it)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
                        "(or auto)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    return dev


def report_user_errors(script: str) -> None:
    """From now on an uncaught UserError prints `script: error: message` on stderr and exits with status 1, no
    traceback; any other exception (a bug) keeps its traceback."""

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, UserError):
            print(f"{script}: error: {exc}", file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(exc_type, exc, tb)

    sys.excepthook = hook


# Valid ranges of the flags every training script has, as intervals ("inf" is unbounded); None values are skipped
COMMON_RANGES = {"total_steps": "[1, inf)", "batch_size": "[1, inf)", "eval_every": "[1, inf)",
                 "eval_episodes": "[0, inf)", "log_every": "[1, inf)", "checkpoint_every": "[0, inf)",
                 "resume_every": "[0, inf)",
                 "threads": "[1, inf)", "discount": "[0, 1)", "tau": "(0, 1]"}


def check_ranges(args, ranges: dict[str, str]) -> None:
    """Raise a UserError naming the first flag whose value lies outside its interval, e.g. {"discount": "[0, 1)"}."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        above = lo <= value if interval[0] == "[" else lo < value
        below = value <= hi if interval[-1] == "]" else value < hi
        if not (above and below):  # NaN fails both
            raise UserError(f"--{name.replace('_', '-')} {value} is out of range: it must lie in {interval}")


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


# Resumable runs (--resume-every, --resume): one file with everything that changes as a run trains
Trained = nn.Module | torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler | torch.Tensor


def save_training_state(path: str, script: str, step: int, args, run_name: str, progress: Progress,
                        trained: dict[str, Trained]) -> None:
    """What an interrupted run needs to go on exactly as if never stopped: the step, the flags, the run folder, the
    evaluations so far, the state of each network, optimiser, scheduler and learned scalar in `trained`, and the
    random streams. `args`: a script's Args, or an argparse namespace (benchmark/d3rlpy_run.py). Written to a
    temporary file, synced and renamed: a run killed mid-write keeps the previous one."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    rng = dict(torch=torch.get_rng_state(), numpy=(name, key.tolist(), pos, has_gauss, gauss),
               python=random.getstate(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])
    flags = asdict(args) if is_dataclass(args) else vars(args)
    state = dict(script=script, step=step, args=flags, run_name=run_name, evals=progress.evals, rng=rng,
                 trained={k: v.detach().clone() if isinstance(v, torch.Tensor) else v.state_dict()
                          for k, v in trained.items()})
    with open(f"{path}.tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def read_training_state(path: str, script: str) -> dict:
    """A file written by --resume-every (a UserError for a missing or foreign one)."""
    if not Path(path).is_file():
        raise UserError(f"--resume {path}: no such file (a run with --resume-every N writes runs/<run>/resume.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume {path}: not a file written by --resume-every ({type(e).__name__})") from None
    if not isinstance(state, dict) or "trained" not in state:
        raise UserError(f"--resume {path}: not a file written by --resume-every (a --save-model file? those hold "
                        "the policy only; continue runs from runs/<run>/resume.pt)")
    if state["script"] != script:
        raise UserError(f"--resume {path} was written by {state['script']}: continue it with `python "
                        f"{state['script']} --resume {path}`")
    folder = Path("runs", state["run_name"])
    if Path(path).resolve().parent != folder.resolve():  # the run goes on writing to runs/{run_name} from here
        raise UserError(f"--resume {path}: run this from the folder that holds {folder}/ "
                        f"(cd {Path(path).resolve().parent.parent.parent})")
    return state


def resumed_args(args, state: dict):
    """The interrupted run's flags, with --resume, --device and --threads from this command (where it runs, not
    what); other flags given on this command line are ignored, with a note."""
    here = ("resume", "device", "threads")
    try:
        saved = type(args)(**{**state["args"], **{k: getattr(args, k) for k in here}})
    except TypeError as e:
        raise UserError(f"--resume: the file's flags do not fit this version of the script ({e})") from None
    default = type(args)()
    ignored = [f"--{f.name.replace('_', '-')}" for f in fields(args)
               if f.name not in here and getattr(args, f.name) != getattr(default, f.name)]
    if ignored:
        print(f"note: {' '.join(ignored)} ignored: a resumed run keeps its own flags", flush=True)
    return saved


def restore_training_state(state: dict, trained: dict[str, Trained], progress: Progress) -> int:
    """Load `trained` and the random streams from a read_training_state dict; return the step it was saved at."""
    for k, v in trained.items():
        if isinstance(v, torch.Tensor):
            with torch.no_grad():
                v.copy_(state["trained"][k])
        else:
            v.load_state_dict(state["trained"][k])
    torch.set_rng_state(state["rng"]["torch"])
    name, key, pos, has_gauss, gauss = state["rng"]["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    progress.evals = [tuple(e) for e in state["evals"]]
    progress.last_step = state["step"]
    print(f"resuming at step {state['step']}", flush=True)
    return state["step"]


def make_run(args, script: str, resumed: dict | None = None) -> tuple[str, SummaryWriter]:
    """runs/{dataset}__{exp_name}__{seed}__{timestamp}, with the hyperparameters logged as a markdown table; with
    `resumed` (--resume), that run's folder, where TensorBoard drops what the run logged after its saved step."""
    if resumed:
        run_name = resumed["run_name"]
        writer = SummaryWriter(f"runs/{run_name}", purge_step=resumed["step"] + 1)
        print(f"{script}: resuming run {run_name} (tensorboard --logdir runs)", flush=True)
        return run_name, writer
    dataset = Path(args.dataset).stem if args.dataset.endswith(".npz") else args.dataset.replace("/", "-")
    run_name = f"{dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    print(f"{script}: run {run_name} (tensorboard --logdir runs)", flush=True)
    return run_name, writer


def log_evaluation(writer: SummaryWriter, progress: Progress, ds: Dataset, step: int, ev: Evaluation,
                   q_start: float, seconds: float, env_steps: int | None = None) -> None:
    """An evaluation to TensorBoard (eval/return, eval/normalized_score, eval/discounted_return, eval/q_start: the
    policy's own Q at the start states, next to the discounted return it earned from them) and to the console.
    With an online phase (`env_steps`), the return and score also against environment steps (online/...)."""
    norm = ds.normalized_score(ev.returns.mean())
    for tag, value in (("return", ev.returns.mean()), ("normalized_score", norm),
                       ("discounted_return", ev.discounted_returns.mean()), ("q_start", q_start)):
        writer.add_scalar(f"eval/{tag}", value, step)
    if env_steps is not None:
        writer.add_scalar("online/return", ev.returns.mean(), env_steps)
        writer.add_scalar("online/normalized_score", norm, env_steps)
    progress.eval(step, ev.returns.mean(), norm, seconds)


def format_score(ret: float, norm: float) -> str:
    """'normalized 85.2 (return 230.1)', or just the return when the dataset has no reference scores."""
    return f"return {ret:.1f}" if np.isnan(norm) else f"normalized {norm:.1f} (return {ret:.1f})"


class Progress:
    """The console: a line every --log-every steps and at every evaluation (steps, steps/second, ETA and the latest
    evaluation, printed on the line of the step where it ran), then a summary line when the run ends."""

    def __init__(self, script: str, total_steps: int):
        self.script, self.total = script, total_steps
        self.t_start = self.last_t = time.time()
        self.last_step = 0
        self.evals: list[tuple[int, float, float]] = []  # (step, mean return, normalized score)

    def eval(self, step: int, ret: float, norm: float, seconds: float) -> None:
        """Record an evaluation; its wall time is left out of the next SPS figure."""
        self.evals.append((step, float(ret), float(norm)))
        self.last_t += seconds

    def line(self, step: int, extra: str = "") -> float:
        """Print the progress line for `step`; return the gradient steps per second since the previous line."""
        now = time.time()
        sps = (step - self.last_step) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_step = now, step
        eta = (self.total - step) / max(sps, 1e-9)
        if self.evals:
            at, ret, norm = self.evals[-1]
            ev = f"eval {format_score(ret, norm)}" + ("" if at == step else f" at step {at}")
        else:
            ev = "no eval yet"
        print(f"step {step:>8}/{self.total} | {sps:6.0f} SPS | ETA {eta / 60:6.1f} min | {ev}"
              + (f" | {extra}" if extra else ""), flush=True)
        return sps

    def summary(self, run_name: str, model_path: str | None) -> None:
        """One line at the end: final and best evaluation, wall time, run folder, saved model."""
        parts = [f"{self.script}: done, {self.total} steps in {(time.time() - self.t_start) / 60:.1f} min"]
        if self.evals:
            at, ret, norm = self.evals[-1]
            parts.append(f"final {format_score(ret, norm)}")
            best = max(self.evals, key=lambda e: e[1])
            parts.append(f"best {format_score(best[1], best[2])} at step {best[0]}")
            if np.isnan(norm):
                parts.append("no normalized score: the dataset has no reference returns")
        else:
            parts.append("not evaluated (--eval-episodes 0)")
        parts.append(f"run runs/{run_name}")
        parts.append(f"model {model_path}" if model_path else "model not saved (add --save-model)")
        print(" | ".join(parts), flush=True)
