"""What every script shares and no reader came for: the data on the device, `mlp`, evaluation, the start of a run
(clean errors, flag ranges, threads, seed, device, data, --load-model), TensorBoard and the console line."""

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from datasets import (Dataset, UserError, action_bounds, check_policy_fits, check_ranges, dataset_dims, format_score,
                      load_dataset, pick_device)


@dataclass
class Policy:
    """A saved policy in environment units: act(raw obs) -> actions; dist(raw obs) -> pi(.|s), None if deterministic."""

    act: Callable[[torch.Tensor], torch.Tensor]
    dist: Callable[[torch.Tensor], torch.distributions.Distribution] | None
    discrete: bool
    checkpoint: dict


class ReplayBuffer:
    """The dataset as tensors on `device`, sampled uniformly on the device. Box actions rescaled to [-1, 1], Discrete
    ones int64; `normalize_obs`: observations standardised (eps 1e-3, as CORL); rewards r * scale + bias; a script may
    set `mc_returns` (Cal-QL's G per row), then sampled as a sixth tensor."""

    def __init__(self, ds: Dataset, device: torch.device, normalize_obs: bool = False, reward_scale: float = 1.0,
                 reward_bias: float = 0.0):
        def t(x, dtype=torch.float32):
            return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

        self.device, self.size, self.discrete, self.reward_scale, self.reward_bias = (device, len(ds), ds.discrete,
                                                                                      reward_scale, reward_bias)
        self.obs_dim, self.act_dim, self.n_actions = dataset_dims(ds)
        obs, dim = ds.observations, ds.observations.shape[1]  # float64 statistics, without a float64 copy of the data
        self.obs_mean = t(obs.mean(0, dtype=np.float64) if normalize_obs else np.zeros(dim))
        self.obs_std = t(obs.std(0, dtype=np.float64) + 1e-3 if normalize_obs else np.ones(dim))
        # without normalisation these share the dataset's arrays on the CPU: no second copy of the largest arrays
        self.observations, self.next_observations = (self.normalize(t(x)) if normalize_obs else t(x)
                                                     for x in (ds.observations, ds.next_observations))
        if ds.discrete:
            self.actions = t(ds.actions, torch.long)
        else:  # `unscale_action` maps the networks' [-1, 1] back to the environment's box
            low, high = action_bounds(ds)
            self.action_center, self.action_half = t((high + low) / 2), t((high - low) / 2)
            self.actions = (t(ds.actions) - self.action_center) / self.action_half
        self.rewards = t(ds.rewards) * reward_scale + reward_bias
        self.terminals = t(ds.terminals)  # only true terminals stop bootstrapping; timeouts do not
        if self.rewards.shape != (self.size,) or self.terminals.shape != (self.size,):  # (N, 1) would broadcast
            raise ValueError(f"rewards and terminals must be ({self.size},): load data with load_dataset")
        self.mc_returns: torch.Tensor | None = None

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def unscale_action(self, action: torch.Tensor) -> torch.Tensor:
        return action * self.action_half + self.action_center

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """(obs, actions, rewards, next_obs, terminals[, mc_returns]) of `batch_size` random rows, no host sync."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        batch = (self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
                 self.terminals[idx])
        return batch if self.mc_returns is None else (*batch, self.mc_returns[idx])


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256), activation: type[nn.Module] = nn.ReLU,
        output_activation: type[nn.Module] | None = None, dropout: float = 0.0) -> nn.Sequential:
    """in -> [Linear -> activation (-> Dropout)] * len(hidden) -> Linear -> (output_activation)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), activation()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        in_dim = h
    layers += [nn.Linear(in_dim, out_dim)] + ([output_activation()] if output_activation is not None else [])
    return nn.Sequential(*layers)


@contextlib.contextmanager
def isolated(*modules: nn.Module) -> Iterator[None]:
    """`modules` in eval mode, no gradient, a forked random state: logging and evaluation never change training."""
    modes = [m.training for m in modules]
    with torch.random.fork_rng(), torch.no_grad():
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)


@dataclass
class Evaluation:
    returns: np.ndarray  # undiscounted episode returns (the normalized score's)
    discounted_returns: np.ndarray  # sum_t gamma^t (scale r_t + bias): what Q at the start state should predict
    start_obs: torch.Tensor  # (n_episodes, obs_dim) raw first observations, on the device


def evaluate(ds: Dataset, policy: Callable[[torch.Tensor], torch.Tensor], n_episodes: int, seed: int,
             device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
             discount: float = 0.99, on_episode: Callable[[], object] | None = None,
             reward_transform: tuple[float, float] = (1.0, 0.0)) -> Evaluation:
    """`n_episodes` of `policy` (raw obs -> actions, batched), episode i seeded `seed + i`; the discounted return sums
    scale * r + bias (`reward_transform`), the rewards Q learned from. `on_episode()` after each (a progress bar)."""
    if ds.env_id is None:
        raise UserError(f"{ds.name}: no env_id in the dataset, so there is no environment to evaluate in; pass "
                        "--eval-episodes 0 (or add env_id to the .npz)")
    env = gym.make(ds.env_id, **ds.env_kwargs)
    discrete, (scale, bias) = isinstance(env.action_space, gym.spaces.Discrete), reward_transform
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


def speed_up(update: Callable, compile: bool = False) -> Callable:
    """The update step, compiled with --compile (random draws stay eager's, so seeds agree), with float32 subnormals
    flushed to zero: Adam's moments of dead units decay into them and CPUs compute them slowly (docs/benchmark.md)."""
    if compile:
        torch._inductor.config.fallback_random = True
        torch._functorch.config.donated_buffer = False  # an update may take two backward passes through one graph
        update = torch.compile(update)

    def flushed(*args, **kwargs):
        torch.set_flush_denormal(True)
        try:
            return update(*args, **kwargs)
        finally:
            torch.set_flush_denormal(False)

    return flushed


COMMON_RANGES = {"total_steps": "[1, inf)", "batch_size": "[1, inf)", "eval_every": "[1, inf)",
                 "eval_episodes": "[0, inf)", "log_every": "[1, inf)", "checkpoint_every": "[0, inf)",
                 "threads": "[1, inf)", "discount": "[0, 1)", "tau": "(0, 1]"}


def setup(args, script: str, ranges: dict[str, str], load_policy: Callable[..., Policy],
          default_dataset: str) -> tuple[torch.device, Dataset]:
    """The start of every script: one-line errors for user mistakes, flag ranges, threads, seed and device. With
    --load-model it evaluates the saved policy and exits; else it loads the dataset and checks the flags fit it."""
    sys.excepthook = lambda kind, e, tb: (print(f"{script}: error: {e}", file=sys.stderr, flush=True)  # one line
                                          if issubclass(kind, UserError) else sys.__excepthook__(kind, e, tb))
    check_ranges(args, {**COMMON_RANGES, **ranges})
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = pick_device(args.device)
    if args.load_model:  # a saved policy on its own dataset (unless --dataset says otherwise), one line, then exit
        policy = load_policy(args.load_model, device)
        ds = load_dataset(args.dataset or policy.checkpoint["args"]["dataset"])
        check_policy_fits(args.load_model, policy.checkpoint, ds)
        returns = evaluate(ds, policy.act, args.eval_episodes, args.seed + 100, device).returns
        print(f"{args.load_model} on {ds.name} over {len(returns)} episodes: "
              f"{format_score(returns.mean(), ds.normalized_score(returns.mean()))}, return std {returns.std():.1f}")
        raise SystemExit
    args.dataset = args.dataset or default_dataset
    ds = load_dataset(args.dataset)
    check_ranges(args, {"batch_size": f"[1, {len(ds)}]"})  # not more than the dataset's transitions
    if args.eval_episodes > 0 and ds.env_id is None:  # refused now, not at the first evaluation
        evaluate(ds, policy=None, n_episodes=0, seed=0, device=device)  # raises its UserError
    return device, ds


class Run:
    """runs/{dataset}__{exp_name}__{seed}__{time} with its TensorBoard `writer`, and the console: a line every
    --log-every steps and at every evaluation (SPS, ETA, the latest evaluation), a summary line at the end."""

    def __init__(self, args, script: str, total_steps: int):
        dataset = Path(args.dataset).stem if args.dataset.endswith(".npz") else args.dataset.replace("/", "-")
        self.name = f"{dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.writer = SummaryWriter(f"runs/{self.name}")
        table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        print(f"{script}: run {self.name} (tensorboard --logdir runs)", flush=True)
        self.script, self.total, self.last_step, self.t_start = script, total_steps, 0, time.time()
        self.last_t, self.evals = self.t_start, []  # evals: (step, mean return, normalized score)

    def evaluation(self, ds: Dataset, step: int, ev: Evaluation, q_start: float, seconds: float) -> float:
        """eval/return, normalized_score, discounted_return and q_start (the policy's own Q at the start states, to
        compare with the discounted return); returns the normalized score."""
        ret, norm = ev.returns.mean(), ds.normalized_score(ev.returns.mean())
        for tag, value in (("return", ret), ("normalized_score", norm),
                           ("discounted_return", ev.discounted_returns.mean()), ("q_start", q_start)):
            self.writer.add_scalar(f"eval/{tag}", value, step)
        self.evals.append((step, float(ret), float(norm)))
        self.last_t += seconds  # the evaluation's wall time is left out of the next SPS figure
        return norm

    def log(self, step: int, logs: dict[str, torch.Tensor], show: Sequence[str] = (), **charts: float) -> None:
        """Losses (keys ending in _loss) and diagnostics to TensorBoard, `charts` as charts/..., then the console line
        with the `show` entries. The only host syncs: the loop calls it on logging steps only."""
        values = {k: v.item() for k, v in logs.items()}
        for k, v in values.items():
            if not math.isfinite(v):  # stop with a message rather than train on NaNs
                raise FloatingPointError(f"{k} = {v} at step {step}: training diverged (try a lower learning rate, "
                                         "--normalize-obs, or check the dataset's rewards)")
            self.writer.add_scalar(f"losses/{k}" if k.endswith("_loss") else f"diagnostics/{k}", v, step)
        for k, v in charts.items():
            self.writer.add_scalar(f"charts/{k}", v, step)
        shown = {**values, **charts}
        extra = "".join(f" | {k} {shown[k]:.{2 if isinstance(shown[k], float) else 0}f}" for k in show if k in shown)
        now = time.time()
        sps = (step - self.last_step) / max(now - self.last_t, 1e-9)
        self.last_step, self.last_t = step, now
        self.writer.add_scalar("charts/SPS", sps, step)
        at, ret, norm = self.evals[-1] if self.evals else (None, 0.0, 0.0)
        ev = f"eval {format_score(ret, norm)}" + (f" at step {at}" if at != step else "") if at else "no eval yet"
        print(f"step {step:>8}/{self.total} | {sps:6.0f} SPS | ETA {(self.total - step) / max(sps, 1e-9) / 60:6.1f} "
              f"min | {ev}{extra}", flush=True)

    def finish(self, model_path: str | None) -> None:
        """Close TensorBoard; one line: final and best evaluation, wall time, run folder, saved model."""
        self.writer.close()
        parts = [f"{self.script}: done, {self.total} steps in {(time.time() - self.t_start) / 60:.1f} min"]
        if self.evals:
            (_, ret, norm), (at, best, best_norm) = self.evals[-1], max(self.evals, key=lambda e: e[1])
            parts += [f"final {format_score(ret, norm)}", f"best {format_score(best, best_norm)} at step {at}"]
            parts += ["no normalized score: the dataset has no reference returns"] if np.isnan(norm) else []
        else:
            parts.append("not evaluated (--eval-episodes 0)")
        parts += [f"run runs/{self.name}", f"model {model_path}" if model_path else "model not saved (--save-model)"]
        print(" | ".join(parts), flush=True)
