# Batch-Constrained deep Q-learning (BCQ). Docs: docs/bcq.md
# Box: Fujimoto, Meger, Precup 2019 (https://arxiv.org/abs/1812.02900), the authors' sfujim/BCQ continuous_BCQ.
# Discrete: Fujimoto, Conti, Ghavamzadeh, Pineau 2019 (https://arxiv.org/abs/1910.01708), their discrete_BCQ (MLP).
import copy
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import Policy, ReplayBuffer, Run, evaluate, isolated, mlp, setup, speed_up
from datasets import check_ranges, load_checkpoint


@dataclass
class Args:
    exp_name: str = "bcq"
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
    """if toggled, save weights and config to `runs/{run_name}/bcq.pt` (load with torch.load(weights_only=True))"""
    load_model: str | None = None
    """path to a saved `bcq.pt`: evaluate it for --eval-episodes episodes and exit, no training"""
    checkpoint_every: int = 0
    """with --save-model, also save `bcq_step{N}.pt` every N steps (0: only the final model), e.g. for ope.py"""
    dataset: str | None = None
    """built-in name, Minari id or `.npz` path; unset: lunarlander-continuous-medium (--load-model: the checkpoint's)"""
    total_steps: int = 1_000_000
    """number of gradient steps"""
    batch_size: int | None = None
    """transitions per gradient step; None picks the authors' value: 100 for Box, 64 for Discrete (non-Atari)"""
    eval_every: int = 5000
    """evaluate the policy every this many gradient steps (and after the last one)"""
    eval_episodes: int = 10
    """episodes per evaluation (0 turns evaluation off)"""
    log_every: int = 1000
    """write losses and diagnostics to TensorBoard and the console every this many steps"""
    compile: bool = False
    """run the update step through torch.compile (same losses as eager; CPU speed: docs/benchmark.md "--compile")"""

    # Algorithm specific arguments
    learning_rate: float | None = None
    """Adam learning rate of every network; None picks the authors' value: 1e-3 for Box, 3e-4 for Discrete"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target networks (Box: actor and critics; Discrete: Q, unless --target-update-every > 0)"""
    normalize_obs: bool = False
    """standardise observations by the dataset mean/std (an addition: the authors' code uses raw observations)"""
    phi: float = 0.05
    """Box: the perturbation is bounded by phi * max_action (max_action = 1: the buffer's actions are in [-1, 1])"""
    lmbda: float = 0.75
    """Box: lambda of the soft clipped double-Q target lambda * min(Q1, Q2) + (1 - lambda) * max(Q1, Q2)"""
    n_target_samples: int = 10
    """Box: VAE candidates per next state in the critic target (the target takes the max over them)"""
    n_select_samples: int = 10
    """Box: candidates per state when acting (argmax Q1); 10 as in the paper, the authors' current code uses 100"""
    kl_weight: float = 0.5
    """Box: weight of the VAE's KL term (the KL is averaged over batch and latent dimensions, as the authors)"""
    bcq_threshold: float = 0.3
    """Discrete: only actions with G(a|s) / max_b G(b|s) > threshold are allowed; in [0, 1), 0 ~ plain Q-learning"""
    logit_penalty: float = 1e-2
    """Discrete: weight of mean(logits^2) of the imitation network in the loss"""
    target_update_every: int = 0
    """Discrete: copy Q into its target every N steps (a hard update); 0: Polyak averaging with --tau every step"""


RANGES = {"learning_rate": "(0, inf)", "phi": "[0, inf)", "lmbda": "[0, 1]", "n_target_samples": "[1, inf)",
          "n_select_samples": "[1, inf)", "kl_weight": "[0, inf)", "bcq_threshold": "[0, 1)",  # 1 would bar every a
          "logit_penalty": "[0, inf)", "target_update_every": "[0, inf)"}
DEFAULT_DATASET = "lunarlander-continuous-medium"


# ALGO LOGIC: Box networks (continuous BCQ, paper Sec. 4 and Algorithm 1). Actions live in [-1, 1].
class VAE(nn.Module):
    """Conditional VAE G_omega(a|s), the generative model of the data's actions: 750-750, latent 2 * act_dim."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.latent_dim = 2 * act_dim
        self.encoder = mlp(obs_dim + act_dim, 2 * self.latent_dim, (750, 750))  # -> (mean, log_std)
        self.decoder = mlp(obs_dim + self.latent_dim, act_dim, (750, 750), output_activation=nn.Tanh)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reconstruct the data action through a reparameterised, UNclipped z; returns (recon, mean, std)."""
        mean, log_std = self.encoder(torch.cat([obs, action], 1)).chunk(2, dim=1)
        std = log_std.clamp(-4.0, 15.0).exp()
        z = mean + std * torch.randn_like(std)
        return self.decode(obs, z), mean, std

    def decode(self, obs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Sample a ~ G(.|s): z from the prior, clipped to [-0.5, 0.5] so samples stay where the data is dense."""
        if z is None:
            z = torch.randn(obs.shape[0], self.latent_dim, device=obs.device).clamp(-0.5, 0.5)
        return self.decoder(torch.cat([obs, z], 1))


def perturb(action: torch.Tensor, raw: torch.Tensor, phi: float) -> torch.Tensor:
    """xi in [-phi * max_action, phi * max_action] (max_action = 1) added to the action, then clamped to the box."""
    return (action + phi * torch.tanh(raw)).clamp(-1.0, 1.0)


class Perturbation(nn.Module):
    """The actor xi_phi(s, a) (400-300): nudges a VAE sample towards higher Q, by at most phi."""

    def __init__(self, obs_dim: int, act_dim: int, phi: float):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, act_dim, (400, 300))
        self.phi = phi

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return perturb(action, self.net(torch.cat([obs, action], 1)), self.phi)


class Critic(nn.Module):
    """Two independent Q(s, a) networks, 400-300 each; forward returns (Q1, Q2)."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net1, self.net2 = (mlp(obs_dim + act_dim, 1, (400, 300)) for _ in range(2))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(obs, action), self.net2(torch.cat([obs, action], 1)).squeeze(1)

    def q1(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net1(torch.cat([obs, action], 1)).squeeze(1)


class BoxBCQ(nn.Module):
    """What a Box BCQ agent needs to act: the VAE G, the perturbation actor xi and the twin critic."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.vae = VAE(obs_dim, act_dim)
        self.actor = Perturbation(obs_dim, act_dim, args.phi)
        self.critic = Critic(obs_dim, act_dim)
        self.n_select = args.n_select_samples

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The BCQ policy (Algorithm 1): n candidates from G, each perturbed by xi; keep the one with the highest Q1."""
        batch, n = obs.shape[0], self.n_select
        obs_rep = obs.repeat_interleave(n, 0)  # rows i*n .. i*n + n-1 are the candidates of state i
        candidates = self.actor(obs_rep, self.vae.decode(obs_rep))
        best = self.critic.q1(obs_rep, candidates).view(batch, n).argmax(1)
        return candidates.view(batch, n, -1)[torch.arange(batch, device=obs.device), best]


# ALGO LOGIC: the Box update, in the authors' order: VAE -> critic -> actor -> Polyak.
def vae_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, I)), a mean over batch AND latent dims (authors'; a sum weighs 2 * act_dim more)."""
    return -0.5 * (1.0 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()


def soft_clipped_double_q(q1: torch.Tensor, q2: torch.Tensor, n: int, lmbda: float) -> torch.Tensor:
    """Sec. 4: lambda * min + (1 - lambda) * max of the twins, then the max over s_i's n candidates (rows i*n + j)."""
    q = lmbda * torch.min(q1, q2) + (1.0 - lmbda) * torch.max(q1, q2)
    return q.view(-1, n).max(1).values


@torch.no_grad()
def box_target(rewards, next_obs, terminals, vae, actor_target, critic_target, args: Args) -> torch.Tensor:
    """y = r + gamma * (1 - terminal) * max_j [soft clipped double Q of candidate j at s']."""
    next_rep = next_obs.repeat_interleave(args.n_target_samples, 0)  # NOT .repeat: tiling would mix states
    next_actions = actor_target(next_rep, vae.decode(next_rep))  # the current VAE (there is no target VAE)
    target_q = soft_clipped_double_q(*critic_target(next_rep, next_actions), args.n_target_samples, args.lmbda)
    return rewards + args.discount * (1.0 - terminals) * target_q


def update_box(batch, step, *, agent, actor_target, critic_target, vae_opt, critic_opt, actor_opt, args: Args):
    """One BCQ step (Algorithm 1); `step` is unused (the Box targets are Polyak-averaged every step)."""
    obs, actions, rewards, next_obs, terminals = batch
    # (1) VAE: reconstruct data actions, KL to the prior (loss = MSE + 0.5 * KL)
    recon, mean, std = agent.vae(obs, actions)
    kl = vae_kl(mean, std)
    vae_loss = F.mse_loss(recon, actions) + args.kl_weight * kl
    vae_opt.zero_grad(set_to_none=True)
    vae_loss.backward()
    vae_opt.step()

    # (2) Critic: both Q networks regress to the same target, built with the just-updated VAE
    y = box_target(rewards, next_obs, terminals, agent.vae, actor_target, critic_target, args)
    q1, q2 = agent.critic(obs, actions)
    critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
    critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    critic_opt.step()

    # (3) Actor: deterministic policy gradient through Q1 only, on perturbed VAE samples (the VAE is not trained here)
    with torch.no_grad():
        sampled = agent.vae.decode(obs)
    actor_loss = -agent.critic.q1(obs, agent.actor(obs, sampled)).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()  # also leaves grads on the critic: cleared by critic_opt.zero_grad before they are used
    actor_opt.step()

    with torch.no_grad():  # (4) Polyak averaging of the actor and critic targets
        for net, target in ((agent.actor, actor_target), (agent.critic, critic_target)):
            for p, tp in zip(net.parameters(), target.parameters()):
                tp.lerp_(p, args.tau)
    return dict(vae_loss=vae_loss, critic_loss=critic_loss, actor_loss=actor_loss, vae_kl=kl, target_q=y.mean())


# ALGO LOGIC: Discrete BCQ (the authors' FC_Q model): separate Q and imitation MLPs, 256-256, one optimiser.
def allowed_actions(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """a is allowed iff G(a|s) / max_b G(b|s) > threshold (strict) = exp(logit_a - max_b logit_b) > threshold."""
    return (logits - logits.max(1, keepdim=True).values).exp() > threshold


class DiscreteBCQ(nn.Module):
    """Q(s, .) and the imitation logits of G(.|s); acts greedily on Q among the actions G deems likely enough."""

    def __init__(self, obs_dim: int, n_actions: int, args: Args):
        super().__init__()
        self.q = mlp(obs_dim, n_actions, (256, 256))
        self.imitation = mlp(obs_dim, n_actions, (256, 256))  # logits of G(a|s), a behaviour-cloning classifier
        self.threshold = args.bcq_threshold

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:  # argmax Q over the allowed actions (G's likeliest always is)
        return torch.where(allowed_actions(self.imitation(obs), self.threshold), self.q(obs), -torch.inf).argmax(1)


@torch.no_grad()
def discrete_target(rewards, next_obs, terminals, agent: DiscreteBCQ, q_target, args: Args) -> torch.Tensor:
    """a' = masked argmax of the ONLINE Q under the ONLINE G's filter; its value is read from the TARGET Q."""
    next_q = q_target(next_obs).gather(1, agent.act(next_obs)[:, None]).squeeze(1)
    return rewards + args.discount * (1.0 - terminals) * next_q


def update_discrete(batch, step, *, agent, q_target, opt, args: Args):
    """One step on Huber TD + NLL of G on data actions + 1e-2 * mean(logits^2), then the target update."""
    obs, actions, rewards, next_obs, terminals = batch
    y = discrete_target(rewards, next_obs, terminals, agent, q_target, args)
    q_data = agent.q(obs).gather(1, actions[:, None]).squeeze(1)
    logits = agent.imitation(obs)
    q_loss = F.smooth_l1_loss(q_data, y)  # Huber with delta 1
    imitation_loss = F.cross_entropy(logits, actions)  # = NLL of log_softmax(logits) at the data action
    logit_loss = logits.pow(2).mean()  # keeps the logits (and hence the ratio test) from drifting
    loss = q_loss + imitation_loss + args.logit_penalty * logit_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

    with torch.no_grad():  # target: hard copy every N steps, or Polyak every step
        if args.target_update_every > 0 and step % args.target_update_every == 0:
            q_target.load_state_dict(agent.q.state_dict())
        elif args.target_update_every == 0:
            for p, tp in zip(agent.q.parameters(), q_target.parameters()):
                tp.lerp_(p, args.tau)
    return dict(q_loss=q_loss, imitation_loss=imitation_loss, logit_loss=logit_loss, target_q=y.mean())


def q_value(agent, obs: torch.Tensor, a: torch.Tensor, discrete: bool) -> torch.Tensor:
    """Q(s, a) (Discrete) or min(Q1, Q2)(s, a) (Box): what the diagnostics and eval/q_start report."""
    return agent.q(obs).gather(1, a[:, None]).squeeze(1) if discrete else torch.min(*agent.critic(obs, a))


@torch.no_grad()
def diagnostics(batch, agent, discrete: bool) -> dict[str, torch.Tensor]:
    """Q on data actions, the OOD gap Q(s, pi(s)) - Q(s, a_data), pi's distance to the data; under isolated() (VAE)."""
    obs, actions = batch[0], batch[1]
    pi = agent.act(obs)
    q_data, q_pi = q_value(agent, obs, actions, discrete), q_value(agent, obs, pi, discrete)
    logs = dict(q_data=q_data.mean(), q_pi_minus_q_data=(q_pi - q_data).mean())
    if discrete:
        allowed = allowed_actions(agent.imitation(obs), agent.threshold).float().sum(1).mean()
        return dict(logs, action_mismatch=(pi != actions).float().mean(), allowed_actions=allowed)
    return dict(logs, action_mse=((pi - actions) ** 2).sum(-1).mean())


def load_policy(path: str, device: str | torch.device = "cpu") -> Policy:
    """Rebuild the policy saved by --save-model, in environment units: Box, the argmax of Q1 over perturbed VAE
    candidates; Discrete, masked greedy. `dist` is None: no density, so IS-based OPE needs a smoothing (docs/bcq.md)."""
    ckpt = load_checkpoint(path, device, "bcq")
    args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})
    discrete = ckpt["n_actions"] is not None
    agent = (DiscreteBCQ(ckpt["obs_dim"], ckpt["n_actions"], args) if discrete
             else BoxBCQ(ckpt["obs_dim"], ckpt["act_dim"], args)).to(device).eval()
    agent.load_state_dict(ckpt["agent"])
    mean, std = ckpt["obs_mean"], ckpt["obs_std"]
    unscale = (lambda a: a) if discrete else (lambda a: ckpt["action_center"] + ckpt["action_half"] * a)
    return Policy(act=lambda o: unscale(agent.act((o - mean) / std)), dist=None, discrete=discrete, checkpoint=ckpt)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device, ds = setup(args, "bcq.py", RANGES, load_policy, DEFAULT_DATASET)  # seed, device, data; --load-model exits
    args.batch_size = args.batch_size or (64 if ds.discrete else 100)  # None: the authors' Box or Discrete value
    args.learning_rate = args.learning_rate or (3e-4 if ds.discrete else 1e-3)
    check_ranges(args, {"batch_size": f"[1, {len(ds)}]"})  # the default batch too: not more than the dataset
    rb = ReplayBuffer(ds, device, args.normalize_obs)
    run = Run(args, "bcq.py", args.total_steps)

    # ALGO LOGIC: networks, target copies and optimisers
    if ds.discrete:
        agent = DiscreteBCQ(rb.obs_dim, rb.n_actions, args).to(device)
        q_target = copy.deepcopy(agent.q)  # only Q has a target; G is only used online
        opt = torch.optim.Adam(agent.parameters(), lr=args.learning_rate)  # ONE optimiser for Q and G
        update = partial(update_discrete, agent=agent, q_target=q_target, opt=opt, args=args)
    else:
        agent = BoxBCQ(rb.obs_dim, rb.act_dim, args).to(device)
        actor_target, critic_target = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)  # no target VAE
        vae_opt, critic_opt, actor_opt = (torch.optim.Adam(m.parameters(), lr=args.learning_rate)
                                          for m in (agent.vae, agent.critic, agent.actor))
        update = partial(update_box, agent=agent, actor_target=actor_target, critic_target=critic_target,
                         vae_opt=vae_opt, critic_opt=critic_opt, actor_opt=actor_opt, args=args)
    update = speed_up(update, args.compile)  # --compile; subnormals flushed (CPU speed only, the same maths)

    def policy(obs: torch.Tensor) -> torch.Tensor:  # evaluation: masked greedy, or the Box choice in the env's box
        return agent.act(obs) if ds.discrete else rb.unscale_action(agent.act(obs))

    def save_model(path: str) -> str:
        """Weights, config and normalisation constants, loadable with torch.load(path, weights_only=True)."""
        extra = {} if ds.discrete else dict(action_center=rb.action_center, action_half=rb.action_half)
        torch.save(dict(algo="bcq", args=asdict(args), agent=agent.state_dict(), obs_dim=rb.obs_dim, act_dim=rb.act_dim,
                        n_actions=rb.n_actions, obs_mean=rb.obs_mean, obs_std=rb.obs_std, **extra), path)
        print(f"saved {path}", flush=True)
        return path

    # TRY NOT TO MODIFY: the training loop: sample, update, then save / evaluate / log when due
    model_path = None
    for step in range(1, args.total_steps + 1):
        batch = rb.sample(args.batch_size)
        logs = update(batch, step)

        if args.save_model and args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_model(f"runs/{run.name}/bcq_step{step}.pt")
        if args.save_model and step == args.total_steps:  # before the last evaluation: an error there loses no model
            model_path = save_model(f"runs/{run.name}/bcq.pt")

        # Evaluation: the score, and the discounted return from the start states next to the policy's own Q there
        evaluated = args.eval_episodes > 0 and (step % args.eval_every == 0 or step == args.total_steps)
        if evaluated:
            t0 = time.time()
            with isolated(agent):
                ev = evaluate(ds, policy, args.eval_episodes, args.seed + 100, device, rb.normalize, args.discount,
                              reward_transform=(rb.reward_scale, rb.reward_bias))
                s0 = rb.normalize(ev.start_obs)
                q_start = q_value(agent, s0, agent.act(s0), ds.discrete).mean().item()
            run.evaluation(ds, step, ev, q_start, time.time() - t0)

        if step % args.log_every == 0 or step == args.total_steps or evaluated:  # the only host syncs
            with isolated(agent):
                logs.update(diagnostics(batch, agent, ds.discrete))
            run.log(step, logs, show=["q_data"])
    run.finish(model_path)
