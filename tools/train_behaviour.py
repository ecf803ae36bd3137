"""Train the SAC behaviour policies of the MuJoCo locomotion datasets (datasets.py, D4RL's recipe; docs/datasets.md).

    python tools/train_behaviour.py --env hopper             # 1M env steps: snapshots, eval log, checkpoint in
                                                             # runs/behaviour/hopper
    python tools/train_behaviour.py --env hopper --resume    # continue an interrupted run from its checkpoint
    python tools/train_behaviour.py --env hopper --export    # pick expert / medium / replay snapshots, copy them
                                                             # with their metadata to behaviour_policies/

SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications"), written CleanRL-style: twin Q networks
256x256, automatic entropy tuning (target -act_dim), Adam 3e-4 for actor, critics and temperature, batch 256,
gamma 0.99, tau 0.005, 5,000 uniform-random steps before learning, then one update per env step. The actor is
datasets.SquashedGaussianActor, so an exported snapshot *is* the datasets' behaviour policy.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets as D  # noqa: E402


@dataclass
class Args:
    env: Literal["hopper", "halfcheetah", "walker2d"] = "hopper"
    """which locomotion environment: Hopper-v5, HalfCheetah-v5 or Walker2d-v5"""
    total_steps: int = 1_000_000
    """environment steps of the run (one SAC update per step after --learning-starts)"""
    seed: int = 0
    """seeds the network initialisation, the training environment, exploration and minibatch sampling"""
    learning_starts: int = 5_000
    """uniform-random environment steps before the first update; the first snapshot is taken here"""
    snapshot_every: int = 20_000
    """every N env steps (and at --learning-starts and the end) save the actor alone to snapshots/{env}-{step}.pt and
    evaluate it with --eval-episodes stochastic episodes on separate environments and RNG, so evaluation never touches
    the training stream; each evaluation appends {step, eval_return_mean, eval_return_std, wall_s} to eval.jsonl"""
    eval_episodes: int = 10
    """stochastic episodes per snapshot evaluation (actions sampled as in the datasets)"""
    checkpoint_every: int = 20_000
    """every N env steps (and at the end) write checkpoint.pt, the full state for --resume: networks, optimisers,
    log-alpha, replay buffer arrays, numpy and torch RNG states; written to a temporary file, then renamed"""
    resume: bool = False
    """continue from out_dir/checkpoint.pt (snapshots and eval.jsonl lines after it are redone). The environment
    restarts its episode on resume (the episode in progress is not saved), so a resumed run is not bit-identical to
    an uninterrupted one"""
    export: bool = False
    """no training: from the run's snapshots take the last as expert, as medium the one (after --learning-starts)
    whose eval return is closest to a third of the expert's (D4RL's medium), and the ones before it for
    medium-replay; copy them with their metadata into --behaviour-dir"""
    out_dir: str | None = None
    """the run's folder (default runs/behaviour/{env}): snapshots/, eval.jsonl, checkpoint.pt"""
    behaviour_dir: str | None = None
    """where --export writes (default: datasets.behaviour_dir(), i.e. behaviour_policies/ or $OFFLINE_RL_BEHAVIOUR)"""
    batch_size: int = 256
    """minibatch size of each update"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    hidden: int = 256
    """hidden width of actor and critics (two layers; 256 is the recipe, smaller only for quick tests)"""
    buffer_size: int | None = None
    """replay buffer capacity (default: --total-steps, i.e. nothing is overwritten)"""
    threads: int = 1
    """CPU threads (torch.set_num_threads)"""


class TwinQ(nn.Module):
    """Two independent critics Q(s, a): (obs, act) -> hidden -> hidden -> 1, ReLU."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.q1, self.q2 = (nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, 1)) for _ in range(2))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, act], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class SAC:
    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        self.actor = D.SquashedGaussianActor(obs_dim, act_dim, args.hidden)
        self.qf = TwinQ(obs_dim, act_dim, args.hidden)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.lr)
        self.q_opt = torch.optim.Adam(self.qf.parameters(), lr=args.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.lr)
        self.gen = torch.Generator().manual_seed(args.seed)  # SAC's action noise (acting and updates)
        self.gamma, self.tau = args.gamma, args.tau

    def act(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.actor.sample(torch.from_numpy(obs[None]), self.gen)[0][0].numpy()

    def update(self, obs, act, rew, next_obs, term) -> None:
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():  # soft TD target from the current policy at s' and the target critics
            next_act, next_logp = self.actor.sample(next_obs, self.gen)
            q1_t, q2_t = self.qf_target(next_obs, next_act)
            target = rew + self.gamma * (1.0 - term) * (torch.min(q1_t, q2_t) - alpha * next_logp)
        q1, q2 = self.qf(obs, act)
        q_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.q_opt.zero_grad()
        q_loss.backward()
        self.q_opt.step()

        pi, logp = self.actor.sample(obs, self.gen)
        self.qf.requires_grad_(False)  # the actor loss needs grads w.r.t. actions only, not the critics' weights
        actor_loss = (alpha * logp - torch.min(*self.qf(obs, pi))).mean()
        self.qf.requires_grad_(True)
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()

        alpha_loss = -(self.log_alpha.exp() * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            torch._foreach_lerp_(list(self.qf_target.parameters()), list(self.qf.parameters()), self.tau)


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.arrays = dict(obs=np.zeros((capacity, obs_dim), np.float32), act=np.zeros((capacity, act_dim), np.float32),
                           rew=np.zeros(capacity, np.float32), next_obs=np.zeros((capacity, obs_dim), np.float32),
                           term=np.zeros(capacity, np.float32))
        self.capacity, self.pos, self.size = capacity, 0, 0

    def add(self, **row) -> None:
        for k, v in row.items():
            self.arrays[k][self.pos] = v
        self.pos, self.size = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> list[torch.Tensor]:
        idx = rng.integers(0, self.size, n)
        return [torch.from_numpy(self.arrays[k][idx]) for k in ("obs", "act", "rew", "next_obs", "term")]


# ---------------------------------------------------------------------------------------------------------------
# Snapshots, checkpoints, export
# ---------------------------------------------------------------------------------------------------------------
def snapshot(args: Args, out: Path, agent: SAC, step: int, wall_s: float) -> float:
    """Evaluate the actor on its own environments and RNG, save it in the behaviour policy format, log the result."""
    env_id = D.LOCOMOTION[args.env]
    rng = np.random.default_rng([args.seed, step, 7])  # never the training stream
    returns = D.episode_returns_of(env_id, D.ActorSampler(agent.actor, rng), args.eval_episodes, rng)
    import mujoco

    meta = dict(env_id=env_id, train_env_steps=step, eval_return_mean=float(returns.mean()),
                eval_return_std=float(returns.std()), eval_episodes=args.eval_episodes, seed=args.seed,
                learning_starts=args.learning_starts, total_steps=args.total_steps, hidden=args.hidden,
                mujoco=mujoco.__version__, gymnasium=gym.__version__)
    D.save_behaviour_policy(out / "snapshots" / f"{args.env}-{step:07d}.pt", agent.actor, **meta)
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps(dict(step=step, eval_return_mean=meta["eval_return_mean"],
                                eval_return_std=meta["eval_return_std"], wall_s=round(wall_s, 1))) + "\n")
    return meta["eval_return_mean"]


def save_checkpoint(path: Path, step: int, wall_s: float, agent: SAC, buf: ReplayBuffer, rng: np.random.Generator,
                    args: Args) -> None:
    state = dict(step=step, wall_s=wall_s, args=asdict(args), log_alpha=agent.log_alpha.detach().clone(),
                 **{k: getattr(agent, k).state_dict() for k in ("actor", "qf", "qf_target", "actor_opt", "q_opt",
                                                                "alpha_opt")},
                 buffer={k: torch.from_numpy(v[:buf.size]) for k, v in buf.arrays.items()}, buffer_pos=buf.pos,
                 np_rng=rng.bit_generator.state, torch_gen=agent.gen.get_state(), torch_rng=torch.get_rng_state())
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a run killed while saving keeps the previous checkpoint


def load_checkpoint(path: Path, agent: SAC, buf: ReplayBuffer, rng: np.random.Generator,
                    args: Args) -> tuple[int, float]:
    if not path.exists():
        raise D.UserError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, weights_only=True)
    if state["args"]["env"] != args.env or state["args"]["hidden"] != args.hidden:
        raise D.UserError(f"--resume: {path} is a run of --env {state['args']['env']} --hidden "
                          f"{state['args']['hidden']}, not --env {args.env} --hidden {args.hidden}")
    for k in ("actor", "qf", "qf_target", "actor_opt", "q_opt", "alpha_opt"):
        getattr(agent, k).load_state_dict(state[k])
    with torch.no_grad():
        agent.log_alpha.copy_(state["log_alpha"])
    size = len(state["buffer"]["rew"])
    if size > buf.capacity:
        raise D.UserError(f"--resume: the checkpoint holds {size} transitions, more than --buffer-size {buf.capacity}")
    for k, v in state["buffer"].items():
        buf.arrays[k][:size] = v.numpy()
    # the same capacity: go on where the ring was; a larger one (a longer --total-steps): fill the free rows first
    buf.size, buf.pos = size, (state["buffer_pos"] if size == buf.capacity else size)
    rng.bit_generator.state = state["np_rng"]
    agent.gen.set_state(state["torch_gen"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state["wall_s"])


def forget_after(out: Path, env: str, step: int) -> None:
    """On resume: snapshots and eval lines at or after the checkpoint's step belong to the interrupted run."""
    for f in (out / "snapshots").glob(f"{env}-*.pt"):
        if int(f.stem.rsplit("-", 1)[1]) >= step:
            f.unlink()
    log = out / "eval.jsonl"
    if log.exists():
        keep = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] < step]
        log.write_text("".join(line + "\n" for line in keep))


def export(args: Args, out: Path) -> None:
    snaps = []
    for f in sorted((out / "snapshots").glob(f"{args.env}-*.pt")):
        blob = torch.load(f, weights_only=True)
        snaps.append((int(blob["train_env_steps"]), float(blob["eval_return_mean"]), f))
    if len(snaps) < 2:
        raise D.UserError(f"--export: {out / 'snapshots'} has {len(snaps)} snapshot(s) of {args.env}; "
                          f"train first: python tools/train_behaviour.py --env {args.env}")
    expert = snaps[-1]
    learning_starts = int(torch.load(expert[2], weights_only=True)["learning_starts"])
    candidates = [s for s in snaps[:-1] if s[0] > learning_starts]
    if not candidates:
        raise D.UserError(f"--export: no snapshot between learning_starts {learning_starts} and the expert's step "
                          f"{expert[0]} to serve as medium")
    medium = min(candidates, key=lambda s: (abs(s[1] - expert[1] / 3), s[0]))  # D4RL: medium ~ 1/3 of expert
    replay = [s for s in snaps if s[0] < medium[0]]
    dest = Path(args.behaviour_dir) if args.behaviour_dir else D.behaviour_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(f"{args.env}-replay-*.pt"):
        old.unlink()

    def copy_with(src: Path, name: str, **extra) -> Path:
        blob = torch.load(src, weights_only=True)
        tmp = dest / f"{name}.{os.getpid()}.tmp"
        torch.save({**blob, **extra}, tmp)
        os.replace(tmp, dest / name)
        return dest / name

    written = [copy_with(expert[2], f"{args.env}-expert.pt", role="expert"),
               copy_with(medium[2], f"{args.env}-medium.pt", role="medium", replay_steps=[s[0] for s in replay])]
    written += [copy_with(s[2], f"{args.env}-replay-{s[0]:07d}.pt", role="replay") for s in replay]
    print(f"expert: step {expert[0]:,}, eval return {expert[1]:.1f}\n"
          f"medium: step {medium[0]:,}, eval return {medium[1]:.1f} (target: a third of the expert's, "
          f"{expert[1] / 3:.1f})\nmedium-replay: uniform for the first {replay[0][0] if replay else medium[0]:,} "
          f"steps, then {len(replay)} snapshot(s), {medium[0]:,} env steps in all")
    print(f"wrote {len(written)} files to {dest}: " + ", ".join(p.name for p in written))


# ---------------------------------------------------------------------------------------------------------------
def train(args: Args, out: Path) -> None:
    env_id = D.LOCOMOTION[args.env]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # network initialisation
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = SAC(obs_dim, act_dim, args)
    buf = ReplayBuffer(args.buffer_size or args.total_steps, obs_dim, act_dim)
    rng = np.random.default_rng(args.seed)  # uniform learning-starts actions, minibatches, resume resets
    ckpt = out / "checkpoint.pt"
    if args.resume:
        step, wall0 = load_checkpoint(ckpt, agent, buf, rng, args)
        forget_after(out, args.env, step)
        obs = env.reset(seed=int(rng.integers(2**31 - 1)))[0].astype(np.float32)  # a new episode (see --resume)
        print(f"resumed from {ckpt} at step {step:,} (replay buffer {buf.size:,} transitions)", flush=True)
    else:
        if ckpt.exists() or any((out / "snapshots").glob("*.pt")):
            raise D.UserError(f"{out} already holds a run: continue it with --resume, or choose another --out-dir")
        step, wall0 = 0, 0.0
        obs = env.reset(seed=args.seed)[0].astype(np.float32)
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    t0, last_eval = time.time() - wall0, float("nan")
    bar = tqdm(total=args.total_steps, initial=step, unit="step", desc=f"SAC {args.env}", mininterval=2.0,
               dynamic_ncols=True)
    while step < args.total_steps:
        if step == args.learning_starts or (step > 0 and step % args.snapshot_every == 0):
            last_eval = snapshot(args, out, agent, step, time.time() - t0)
            bar.set_postfix(eval_return=f"{last_eval:.0f}", refresh=False)
        if step < args.learning_starts:
            act = rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
        else:
            act = agent.act(obs)
        next_obs, rew, term, trunc, _ = env.step(act)
        next_obs = next_obs.astype(np.float32)
        buf.add(obs=obs, act=act, rew=rew, next_obs=next_obs, term=float(term))  # a time limit is not a terminal
        obs = env.reset()[0].astype(np.float32) if term or trunc else next_obs
        if step >= args.learning_starts:
            agent.update(*buf.sample(rng, args.batch_size))
        step += 1
        bar.update(1)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            save_checkpoint(ckpt, step, time.time() - t0, agent, buf, rng, args)
    bar.close()
    if step > 0:
        last_eval = snapshot(args, out, agent, step, time.time() - t0)
    save_checkpoint(ckpt, step, time.time() - t0, agent, buf, rng, args)
    env.close()
    n = len(list((out / "snapshots").glob(f"{args.env}-*.pt")))
    print(f"done: {step:,} steps in {(time.time() - t0) / 3600:.2f} h, final eval return {last_eval:.1f}. Wrote "
          f"{out / 'snapshots'}/ ({n} actor files), {out / 'eval.jsonl'}, {ckpt}. "
          f"Next: python tools/train_behaviour.py --env {args.env} --export", flush=True)


def main(args: Args) -> None:
    for name in ("total_steps", "snapshot_every", "eval_episodes", "batch_size", "threads", "hidden"):
        if getattr(args, name) < 1:
            raise D.UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.learning_starts < 1:
        raise D.UserError("--learning-starts must be at least 1 (uniform steps fill the buffer before updates)")
    out = Path(args.out_dir or f"runs/behaviour/{args.env}")
    export(args, out) if args.export else train(args, out)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except D.UserError as e:  # a user mistake: one line, no traceback
        raise SystemExit(f"train_behaviour.py: error: {e}") from None
