# Implicit Q-Learning (Kostrikov, Nair, Levine 2021, https://arxiv.org/abs/2110.06169). Docs: docs/iql.md
# Continuous (Box) actions follow the authors' code (ikostrikov/implicit_q_learning); the Discrete variant is a
# straight port of the same losses to Q(s, .) heads and a categorical policy (there is no official one).
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import Policy, ReplayBuffer, Run, evaluate, isolated, mlp, setup, speed_up
from datasets import Dataset, load_checkpoint


@dataclass
class Args:
    exp_name: str = "iql"
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of torch, numpy and random; evaluation episode i is seeded `seed + 100 + i`"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """`auto` picks CUDA when present, else CPU; or any torch device string (`cpu`, `cuda:1`)"""
    threads: int = 1
    """CPU threads per process (torch.set_num_threads); docs/benchmark.md "Threads" says why the default is 1"""
    save_model: bool = False
    """if toggled, save weights and config to `runs/{run_name}/iql.pt` (load with torch.load(weights_only=True))"""
    load_model: str | None = None
    """path to a saved `iql.pt`: evaluate it for --eval-episodes episodes and exit, no training"""
    checkpoint_every: int = 0
    """with --save-model, also save `iql_step{N}.pt` every N steps (0: only the final model), e.g. for ope.py"""
    dataset: str | None = None
    """built-in name, Minari id or `.npz` path; unset: lunarlander-continuous-medium (--load-model: the checkpoint's)"""
    total_steps: int = 1_000_000
    """number of gradient steps"""
    batch_size: int = 256
    """transitions per gradient step"""
    eval_every: int = 5000
    """evaluate the policy every this many gradient steps (and after the last one)"""
    eval_episodes: int = 10
    """episodes per evaluation (0 turns evaluation off)"""
    log_every: int = 1000
    """write losses and diagnostics to TensorBoard and the console every this many steps"""
    compile: bool = False
    """run the update step through torch.compile (same losses as eager; CPU speed: docs/benchmark.md "--compile")"""

    # Algorithm specific arguments (the paper's symbols; defaults from the authors' code)
    learning_rate: float = 3e-4
    """Adam learning rate of Q, V and the actor"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target Q networks"""
    expectile: float = 0.7
    """expectile tau of the V regression (Eq. 5): 0.5 is the mean, -> 1 approaches the max over data actions"""
    beta: float = 3.0
    """inverse temperature beta of the weights exp(beta * adv) (Eq. 7; authors' `temperature`); 0: behaviour cloning"""
    max_weight: float = 100.0
    """clip of the advantage weights exp(beta * adv)"""
    hidden_dim: int = 256
    """width of the hidden layers of every network"""
    n_layers: int = 2
    """hidden layers of every network"""
    n_critics: int = 2
    """N, the Q networks of the ensemble (2: the authors' twin Q); the V target takes their min (SAC-N)"""
    q_lcb: float = 0.0
    """k > 0: the V target takes mean - k * std of the N critics (lower confidence bound), not their min"""
    cosine_lr: bool = True
    """cosine decay of the actor's learning rate to 0 over the training steps (the authors' offline code)"""
    deterministic_actor: bool = False
    """Box only: a deterministic tanh actor trained by advantage-weighted MSE (CORL's option) instead of a Gaussian"""
    actor_dropout: float = 0.0
    """dropout in the actor's hidden layers (the authors use 0.1 on Kitchen/Adroit)"""
    normalize_obs: bool = False
    """standardise observations by the dataset mean/std (an addition: the authors' code uses raw observations)"""
    reward_scaling: Literal["auto", "none", "return-range", "minus-one"] = "auto"
    """`auto`: the authors' rule (return-range on hopper/halfcheetah/walker2d, minus-one on AntMaze, else none)"""


RANGES = {"learning_rate": "(0, inf)", "expectile": "(0, 1)", "beta": "[0, inf)", "max_weight": "(0, inf)",
          "hidden_dim": "[1, inf)", "n_layers": "[0, inf)", "actor_dropout": "[0, 1)", "n_critics": "[1, inf)",
          "q_lcb": "[0, inf)"}
DEFAULT_DATASET = "lunarlander-continuous-medium"


# ALGO LOGIC: networks. N critics (twin Q by default) and a state-value V; the actor depends on the action space.
class QEnsemble(nn.Module):
    """N critics in one module, layer j's weights stacked (N, in, out) for one batched matmul, initialised as N `mlp`s
    would be. Box: Q(s, a); Discrete: the Q(s, .) head read at the given action. Returns (N, B)."""

    def __init__(self, obs_dim: int, act_dim: int, n_actions: int | None, args: Args):
        super().__init__()
        self.discrete = n_actions is not None
        in_dim, out_dim = (obs_dim, n_actions) if self.discrete else (obs_dim + act_dim, 1)
        members = [[m for m in mlp(in_dim, out_dim, [args.hidden_dim] * args.n_layers) if isinstance(m, nn.Linear)]
                   for _ in range(args.n_critics)]
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([m[j].weight.T for m in members]).detach())
                                        for j in range(len(members[0])))
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([m[j].bias[None] for m in members]).detach())
                                       for j in range(len(members[0])))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (N, B, out): each member's MLP (Linear, ReLU, ..., Linear) on the same input."""
        h = x.expand(len(self.weights[0]), *x.shape)
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)  # (N, B, in) @ (N, in, out) + (N, 1, out): N Linear layers at once
            h = F.relu(h) if j < len(self.weights) - 1 else h
        return h

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if self.discrete:  # the value of the given action, read from each member's Q(s, .) head
            q = self.heads(obs)
            return q.gather(2, action[None, :, None].expand(len(q), -1, 1)).squeeze(2)
        return self.heads(torch.cat([obs, action], 1)).squeeze(2)


class GaussianActor(nn.Module):
    """Box: N(tanh(mu(s)), exp(log_std)), log_std state-independent in [-5, 2] (authors' NormalTanhPolicy)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, [args.hidden_dim] * args.n_layers, dropout=args.actor_dropout)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(torch.tanh(self.net(obs)), self.log_std.clamp(-5.0, 2.0).exp())

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).log_prob(action).sum(-1)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class DeterministicActor(nn.Module):
    """Box: a = tanh(mu(s)); trained by advantage-weighted MSE to the dataset action (CORL's option)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, [args.hidden_dim] * args.n_layers, dropout=args.actor_dropout)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return -((self.act(obs) - action) ** 2).sum(-1)  # not a density: the AWR loss becomes a weighted MSE

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class CategoricalActor(nn.Module):
    """Discrete: pi(a|s) = softmax(logits(s)); acts greedily (argmax)."""

    def __init__(self, obs_dim: int, n_actions: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, n_actions, [args.hidden_dim] * args.n_layers, dropout=args.actor_dropout)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(obs), -1).gather(1, action[:, None]).squeeze(1)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).argmax(-1)


def make_actor(obs_dim: int, act_dim: int, n_actions: int | None, args: Args) -> nn.Module:
    if n_actions is not None:
        return CategoricalActor(obs_dim, n_actions, args)
    return (DeterministicActor if args.deterministic_actor else GaussianActor)(obs_dim, act_dim, args)


# ALGO LOGIC: the three losses of IQL, the same for Box and Discrete: Q is only ever evaluated on dataset actions.
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Eq. 5: L_2^tau(u) = |tau - 1(u < 0)| u^2 with u = Q(s, a) - V(s): positive errors weigh tau, negative 1 - tau."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff**2).mean()


def awr_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Eq. 7: exp(beta * (Q - V)), clipped at max_weight (100 in the authors' code)."""
    return torch.exp(beta * adv).clamp(max=max_weight)


def pessimistic(q: torch.Tensor, lcb: float) -> torch.Tensor:
    """(N, B) -> (B): the minimum over the N critics (SAC-N; N = 2 is the twin-min), or for lcb = k > 0 the lower
    confidence bound mean - k * std (population std, so with N = 2 and k = 1 it is the minimum again)."""
    return q.mean(0) - lcb * q.std(0, correction=0) if lcb > 0 else q.min(0).values


def update(batch, *, critics, critics_target, vf, actor, q_opt, v_opt, actor_opt, actor_sched, args: Args):
    """One IQL step in the authors' order: V, then the actor (with the new V), then Q (to the new V), then Polyak."""
    obs, actions, rewards, next_obs, terminals = batch
    # (1) V(s) -> the expectile of the target Qs' minimum (or --q-lcb bound) over dataset actions (Eq. 5), no OOD query
    with torch.no_grad():
        target_q = pessimistic(critics_target(obs, actions), args.q_lcb)
    v = vf(obs).squeeze(1)
    v_loss = expectile_loss(target_q - v, args.expectile)
    v_opt.zero_grad(set_to_none=True)
    v_loss.backward()
    v_opt.step()

    # (2) Actor: advantage-weighted regression onto dataset actions (Eq. 7), advantage from the updated V
    with torch.no_grad():
        adv = target_q - vf(obs).squeeze(1)
        weights = awr_weights(adv, args.beta, args.max_weight)
    actor_loss = -(weights * actor.log_prob(obs, actions)).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_opt.step()
    actor_sched.step()

    # (3) Q(s, a) -> r + gamma * (1 - terminal) * V(s') (Eq. 6): the max over actions is implicit in V's expectile
    with torch.no_grad():
        target_v = rewards + args.discount * (1.0 - terminals) * vf(next_obs).squeeze(1)
    q_data = critics(obs, actions)  # (N, B)
    q_loss = ((q_data - target_v) ** 2).mean(1).sum()  # the sum of the N MSEs, as the authors' two
    q_opt.zero_grad(set_to_none=True)
    q_loss.backward()
    q_opt.step()

    # (4) Polyak averaging of the target Q networks
    with torch.no_grad():
        for p, tp in zip(critics.parameters(), critics_target.parameters()):
            tp.lerp_(p, args.tau)
    return dict(v_loss=v_loss, actor_loss=actor_loss, q_loss=q_loss, adv=adv.mean(), weights=weights.mean(), v=v.mean())


@torch.no_grad()
def diagnostics(batch, critics, actor, args: Args, discrete: bool) -> dict[str, torch.Tensor]:
    """Mean Q on data actions, the OOD gap Q(s, pi(s)) - Q(s, a_data), how far pi strays from the data, and the critics'
    spread (std over the N) on data and policy actions. Call under common.isolated(actor)."""
    obs, actions = batch[0], batch[1]
    pi = actor.act(obs)
    q_all_data, q_all_pi = critics(obs, actions), critics(obs, pi)
    q_data = pessimistic(q_all_data, args.q_lcb)
    stray = (pi != actions).float().mean() if discrete else ((pi - actions) ** 2).sum(-1).mean()
    return dict(q_data=q_data.mean(), q_pi_minus_q_data=(pessimistic(q_all_pi, args.q_lcb) - q_data).mean(),
                q_std_data=q_all_data.std(0, correction=0).mean(), q_std_pi=q_all_pi.std(0, correction=0).mean(),
                **{"action_mismatch" if discrete else "action_mse": stray})


def authors_reward_scaling(dataset: str) -> str:
    """The authors' train_offline.py: return-range on the locomotion datasets, minus-one on AntMaze, else none."""
    name = dataset.lower()
    if "antmaze" in name:
        return "minus-one"
    return "return-range" if any(env in name for env in ("hopper", "halfcheetah", "walker2d")) else "none"


def reward_transform(ds: Dataset, scaling: str) -> tuple[float, float]:
    """(scale, bias): return-range is 1000 / (max - min episode return), minus-one is r - 1, none is r."""
    rets = ds.episode_returns()
    return {"none": (1.0, 0.0), "return-range": (1000.0 / max(float(rets.max() - rets.min()), 1e-6), 0.0),
            "minus-one": (1.0, -1.0)}[scaling]


def load_policy(path: str, device: str | torch.device = "cpu") -> Policy:
    """The --save-model policy in environment units: Box, the mean and N(tanh(mu(s)), std); Discrete, argmax and pi."""
    ckpt = load_checkpoint(path, device, "iql")
    args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})  # iql_finetune's too
    actor = make_actor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["n_actions"], args).to(device).eval()
    actor.load_state_dict(ckpt["actor"])
    mean, std = ckpt["obs_mean"], ckpt["obs_std"]
    if ckpt["n_actions"] is not None:
        return Policy(act=lambda o: actor.act((o - mean) / std),
                      dist=lambda o: torch.distributions.Categorical(logits=actor.net((o - mean) / std)),
                      discrete=True, checkpoint=ckpt)
    center, half = ckpt["action_center"], ckpt["action_half"]

    def dist(o: torch.Tensor) -> torch.distributions.Distribution:
        d = actor.dist((o - mean) / std)
        return torch.distributions.Independent(torch.distributions.Normal(center + half * d.loc, half * d.scale), 1)

    return Policy(act=lambda o: center + half * actor.act((o - mean) / std),
                  dist=None if args.deterministic_actor else dist, discrete=False, checkpoint=ckpt)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device, ds = setup(args, "iql.py", RANGES, load_policy, DEFAULT_DATASET)  # seed, device, data; --load-model exits
    if args.reward_scaling == "auto":
        args.reward_scaling = authors_reward_scaling(args.dataset)
        print(f"iql.py: --reward-scaling auto -> {args.reward_scaling} (the authors' rule)", flush=True)
    rb = ReplayBuffer(ds, device, args.normalize_obs, *reward_transform(ds, args.reward_scaling))
    run = Run(args, "iql.py", args.total_steps)

    # ALGO LOGIC: networks and optimisers. Target Qs start as exact copies; V has no target network.
    critics = QEnsemble(rb.obs_dim, rb.act_dim, rb.n_actions, args).to(device)
    critics_target = QEnsemble(rb.obs_dim, rb.act_dim, rb.n_actions, args).to(device)  # fresh draws, as the twins'
    critics_target.load_state_dict(critics.state_dict())
    vf = mlp(rb.obs_dim, 1, [args.hidden_dim] * args.n_layers).to(device)
    actor = make_actor(rb.obs_dim, rb.act_dim, rb.n_actions, args).to(device)
    q_opt = torch.optim.Adam(critics.parameters(), lr=args.learning_rate)
    v_opt = torch.optim.Adam(vf.parameters(), lr=args.learning_rate)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    actor_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(actor_opt, args.total_steps) if args.cosine_lr
                   else torch.optim.lr_scheduler.LambdaLR(actor_opt, lambda _: 1.0))
    update = speed_up(update, args.compile)  # --compile; subnormals flushed (CPU speed only, the same maths)

    def policy(obs: torch.Tensor) -> torch.Tensor:
        """Evaluation action: the mean (Box, mapped back to the environment's box) or the argmax (Discrete)."""
        return actor.act(obs) if ds.discrete else rb.unscale_action(actor.act(obs))

    def save_model(path: str) -> str:
        """Weights, config and normalisation constants, loadable with torch.load(path, weights_only=True)."""
        extra = {} if ds.discrete else dict(action_center=rb.action_center, action_half=rb.action_half)
        torch.save(dict(algo="iql", args=asdict(args), actor=actor.state_dict(), critics=critics.state_dict(),
                        vf=vf.state_dict(), obs_mean=rb.obs_mean, obs_std=rb.obs_std, obs_dim=rb.obs_dim,
                        act_dim=rb.act_dim, n_actions=rb.n_actions, **extra), path)
        print(f"saved {path}", flush=True)
        return path

    # TRY NOT TO MODIFY: the training loop: sample, update, then save / evaluate / log when due
    model_path = None
    for step in range(1, args.total_steps + 1):
        batch = rb.sample(args.batch_size)
        logs = update(batch, critics=critics, critics_target=critics_target, vf=vf, actor=actor, q_opt=q_opt,
                      v_opt=v_opt, actor_opt=actor_opt, actor_sched=actor_sched, args=args)

        if args.save_model and args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_model(f"runs/{run.name}/iql_step{step}.pt")
        if args.save_model and step == args.total_steps:  # before the last evaluation: an error there loses no model
            model_path = save_model(f"runs/{run.name}/iql.pt")

        # Evaluation: the score, and the discounted return from the start states next to the policy's own Q there
        evaluated = args.eval_episodes > 0 and (step % args.eval_every == 0 or step == args.total_steps)
        if evaluated:
            t0 = time.time()
            with isolated(actor):
                ev = evaluate(ds, policy, args.eval_episodes, args.seed + 100, device, rb.normalize, args.discount,
                              reward_transform=(rb.reward_scale, rb.reward_bias))
                s0 = rb.normalize(ev.start_obs)  # the policy's own value estimate there, as the V target takes it
                q_start = pessimistic(critics(s0, actor.act(s0)), args.q_lcb).mean().item()
            run.evaluation(ds, step, ev, q_start, time.time() - t0)

        if step % args.log_every == 0 or step == args.total_steps or evaluated:  # the only host syncs
            with isolated(actor):
                logs.update(diagnostics(batch, critics, actor, args, ds.discrete))
            run.log(step, logs, show=["q_data"], actor_lr=actor_sched.get_last_lr()[0])
    run.finish(model_path)
