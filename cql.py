# Conservative Q-Learning (Kumar, Zhou, Tucker, Levine 2020, https://arxiv.org/abs/2006.04779). Docs: docs/cql.md
# Box actions: CQL(H) on SAC as in the authors' code (aviralkumar2907/CQL, d4rl/rlkit/torch/sac/cql.py).
# Discrete actions: CQL(H) on double DQN with an MLP Q(s, .) (the authors' Atari agent is QR-DQN; see the docs).
import copy
import math
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import Policy, ReplayBuffer, Run, evaluate, isolated, mlp, setup, speed_up
from datasets import UserError, load_checkpoint


@dataclass
class Args:
    exp_name: str = "cql"
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
    """if toggled, save weights and config to `runs/{run_name}/cql.pt` (load with torch.load(weights_only=True))"""
    load_model: str | None = None
    """path to a saved `cql.pt`: evaluate it for --eval-episodes episodes and exit, no training"""
    checkpoint_every: int = 0
    """with --save-model, also save `cql_step{N}.pt` every N steps (0: only the final model), e.g. for ope.py"""
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

    # Algorithm specific arguments
    cql_alpha: float | None = None
    """weight alpha of the conservative term (Eq. 4; authors' `min_q_weight`); unset: 5 Box, 1 Discrete; 0: SAC / DQN"""
    actor_lr: float = 1e-4
    """Box: Adam learning rate of the actor and of the SAC temperature (the authors' README value)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the Q networks (Box and Discrete) and of the Lagrange multiplier alpha'"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target Q networks (Discrete: unless --target-update-every > 0)"""
    hidden_dim: int = 256
    """width of the hidden layers of every network"""
    n_layers: int = 3
    """hidden layers of every network (the authors use 3 for the actor and the critics)"""
    n_critics: int = 2
    """Box: N, the Q networks of the ensemble (2: the authors' twin Q); TD target and actor take their min (SAC-N)"""
    q_lcb: float = 0.0
    """Box: k > 0: TD target and actor take mean - k * std of the N critics (lower confidence bound), not their min"""
    cql_n_actions: int = 10
    """Box: N, the actions drawn from each of the 3 proposals (uniform, pi(.|s), pi(.|s')) per state (App. F)"""
    backup_entropy: bool = False
    """Box: subtract alpha * log pi(a'|s') in the TD target (the full SAC backup); the authors' runs leave it out"""
    cql_max_target_backup: bool = False
    """Box: TD target = min over the twin targets of the max over N actions from pi(.|s') (authors' max_q_backup)"""
    cql_lagrange: bool = False
    """Box: tune alpha' >= 0 by dual gradient ascent so the weighted gap stays near --cql-target-action-gap"""
    cql_target_action_gap: float = 5.0
    """Box, with --cql-lagrange: threshold tau of the Lagrange form (5.0: the authors' AntMaze value)"""
    bc_steps: int = 0
    """Box: the first this many steps train the actor by likelihood of data actions, not Q (authors: 40000)"""
    target_update_every: int = 0
    """Discrete: copy Q into its target every N steps (a hard update); 0: Polyak averaging with --tau every step"""
    normalize_obs: bool = False
    """standardise observations by the dataset mean/std (an addition: the authors' code uses raw observations)"""
    reward_scale: float = 1.0
    """rewards become r * reward_scale + reward_bias (authors' AntMaze: (r - 0.5) * 4, i.e. 4 and -2)"""
    reward_bias: float = 0.0
    """see --reward-scale"""


RANGES = {"cql_alpha": "[0, inf)", "actor_lr": "(0, inf)", "critic_lr": "(0, inf)", "hidden_dim": "[1, inf)",
          "n_layers": "[0, inf)", "cql_n_actions": "[1, inf)", "bc_steps": "[0, inf)", "n_critics": "[1, inf)",
          "target_update_every": "[0, inf)", "q_lcb": "[0, inf)"}
DEFAULT_DATASET = "lunarlander-continuous-medium"


# ALGO LOGIC: networks. Box: N critics Q(s, a) and a tanh-Gaussian actor (SAC). Discrete: one Q(s, .) network.
class QEnsemble(nn.Module):
    """Box: N critics in one module, layer j's weights stacked (N, in, out) for one batched matmul, initialised as N
    `mlp`s would be. Returns (N, B); for n actions per state (B, n, d), obs is broadcast and out is (N, B, n)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        members = [[m for m in mlp(obs_dim + act_dim, 1, [args.hidden_dim] * args.n_layers) if isinstance(m, nn.Linear)]
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
        if action.dim() == 3:  # n actions per state: score the B * n pairs, then (N, B, n)
            x = torch.cat([obs[:, None].expand(-1, action.shape[1], -1), action], -1)
            return self.heads(x.flatten(0, 1)).view(-1, *action.shape[:2])
        return self.heads(torch.cat([obs, action], 1)).squeeze(2)


class DiscreteQNetwork(nn.Module):
    """Discrete: Q(s, .) -> one value per action. The policy is its argmax."""

    def __init__(self, obs_dim: int, n_actions: int, args: Args):
        super().__init__()
        self.n_actions = n_actions
        self.net = mlp(obs_dim, n_actions, [args.hidden_dim] * args.n_layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).argmax(-1)


class TanhGaussianActor(nn.Module):
    """Box: a = tanh(u), u ~ N(mu(s), sigma(s)), log sigma in [-5, 2] (authors' TanhGaussianPolicy); acts tanh(mu)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim, 2 * act_dim, [args.hidden_dim] * args.n_layers)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean, log_std = self.net(obs).chunk(2, -1)
        return torch.distributions.Normal(mean, log_std.clamp(-5.0, 2.0).exp())

    @staticmethod
    def squashed_log_prob(dist: torch.distributions.Normal, u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Change of variables a = tanh(u) (SAC, App. C): log N(u) - sum log(1 - tanh(u)^2), with rlkit's 1e-6."""
        return (dist.log_prob(u) - torch.log(1.0 - a**2 + 1e-6)).sum(-1)

    def sample(self, obs: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised a ~ pi(.|s) and log pi(a|s); with n: n actions per state, shapes (B, n, d) and (B, n)."""
        if n is not None:
            obs = obs[:, None].expand(-1, n, -1)
        dist = self.dist(obs)
        u = dist.rsample()
        a = torch.tanh(u)
        return a, self.squashed_log_prob(dist, u, a)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        a = action.clamp(-1.0 + 1e-6, 1.0 - 1e-6)  # data actions may sit on the box edge, where atanh is infinite
        return self.squashed_log_prob(self.dist(obs), torch.atanh(a), a)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs).chunk(2, -1)[0])


# ALGO LOGIC: the conservative term of CQL(H) (Eq. 4): alpha * E_s[logsumexp_a Q(s, a) - E_{a~D} Q(s, a)].
# Minimising it pushes Q down where Q is large (the soft-max over all actions) and up on the data actions.
def cql_gap_discrete(q_all: torch.Tensor, actions: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
    """Exact for Discrete actions: logsumexp over every action of Q(s, .) minus Q(s, a_data), mean over states.
    `floor` (Cal-QL, cql_finetune.py): logsumexp over max(Q(s, .), G) instead; Q(s, a_data) is not floored."""
    q_data = q_all.gather(1, actions[:, None]).squeeze(1)
    q_soft = q_all if floor is None else torch.maximum(q_all, floor[:, None])
    return (torch.logsumexp(q_soft, 1) - q_data).mean()


def cql_proposals(obs: torch.Tensor, next_obs: torch.Tensor, actor: TanhGaussianActor, n: int):
    """App. F: importance-sampling proposals for log int exp Q(s, a) da, 3N actions per state with their
    log-densities: N uniform on [-1, 1]^d (log density d * log(1/2)), N from pi(.|s) and N from pi(.|s') (the
    authors' code; all are scored at s). No gradient reaches the actor through these samples."""
    batch, d = obs.shape[0], actor.act_dim
    a_unif = torch.rand(batch, n, d, device=obs.device) * 2.0 - 1.0
    log_unif = torch.full((batch, n), d * math.log(0.5), device=obs.device)
    with torch.no_grad():
        a_cur, logp_cur = actor.sample(obs, n)
        a_next, logp_next = actor.sample(next_obs, n)
    return torch.cat([a_unif, a_cur, a_next], 1), torch.cat([log_unif, logp_cur, logp_next], 1)


def cql_gap_box(q_proposals: torch.Tensor, log_density: torch.Tensor, q_data: torch.Tensor) -> torch.Tensor:
    """Box: logsumexp_i [Q(s, a_i) - log mu(a_i)] over the 3N proposals estimates log int exp Q(s, a) da up to
    the constant log 3N (dropped, as the authors: no gradient), minus Q(s, a_data); mean over states. With the
    critics' leading axis, (N, B, 3N) and (N, B): one gap per critic, (N,)."""
    return (torch.logsumexp(q_proposals - log_density, -1) - q_data).mean(-1)


def pessimistic(q: torch.Tensor, lcb: float) -> torch.Tensor:
    """(N, ...) -> (...): the minimum over the N critics (SAC-N; N = 2 is the twin-min), or for lcb = k > 0 the lower
    confidence bound mean - k * std (population std, so with N = 2 and k = 1 it is the minimum again)."""
    return q.mean(0) - lcb * q.std(0, correction=0) if lcb > 0 else q.min(0).values


def update_box(batch, step, logging, *, critics, critics_target, actor, log_alpha, log_alpha_prime, q_opt, actor_opt,
               alpha_opt, alpha_prime_opt, args: Args, calibrate=None):
    """One CQL(H)-SAC step in the authors' order: temperature, then critics, then the actor, then Polyak. The
    actor's loss is taken before the critic step, so actor and critics both see the pre-update networks. `logging`:
    the loop logs this step (with --cql-alpha 0 the conservative term is measured only then). `calibrate`: Cal-QL's
    floor on the policy's proposals (cql_finetune.py --cal-ql)."""
    obs, actions, rewards, next_obs, terminals = batch[:5]  # with Cal-QL, batch[5] is G, the MC return-to-go
    # (1) SAC temperature: drive the policy entropy towards the target -d (log_alpha starts at 0, i.e. alpha = 1)
    a_pi, logp_pi = actor.sample(obs)
    alpha_loss = -(log_alpha * (logp_pi.detach() - actor.act_dim)).mean()
    alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward(retain_graph=True)  # keeps the actor's sample for (2): --compile fuses both in one node
    alpha_opt.step()
    alpha = log_alpha.exp().detach()

    # (2) Actor loss: SAC's alpha log pi - min Q (or the --q-lcb bound); for the first --bc-steps behaviour cloning,
    # alpha log pi - log pi(a_data|s) (the authors' policy_eval_start). Gradient now, step after the critics.
    if step <= args.bc_steps:
        actor_loss = (alpha * logp_pi - actor.log_prob(obs, actions)).mean()
    else:
        actor_loss = (alpha * logp_pi - pessimistic(critics(obs, a_pi), args.q_lcb)).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()

    # (3) TD target with a' ~ pi(.|s') and the *minimum* of the N target critics (or the --q-lcb bound), without the
    # entropy term as the authors' "deterministic backup" (Eqs. 3-4 use the plain Bellman backup; --backup-entropy)
    with torch.no_grad():
        if args.cql_max_target_backup:  # min over critics of each critic's max over N sampled actions
            a_next, _ = actor.sample(next_obs, args.cql_n_actions)
            q_next = pessimistic(critics_target(next_obs, a_next).max(2).values, args.q_lcb)
        else:
            a_next, logp_next = actor.sample(next_obs)
            q_next = pessimistic(critics_target(next_obs, a_next), args.q_lcb)
            if args.backup_entropy:
                q_next = q_next - alpha * logp_next
        target = rewards + args.discount * (1.0 - terminals) * q_next

    # (4) Critics: TD (MSE, no 1/2, as the authors) plus the conservative term per critic, the same proposals for all.
    # With --cql-alpha 0 (plain SAC critics) the term, 95% of the compute, is only measured when the loop logs, with
    # no gradient and proposals from a forked random stream, so logging never changes what training draws
    conservative = args.cql_alpha > 0
    measure = conservative or logging
    if measure:
        with torch.random.fork_rng(enabled=not conservative):
            prop_actions, prop_log_density = cql_proposals(obs, next_obs, actor, args.cql_n_actions)
    q_data = critics(obs, actions)  # (N, B)
    td_loss = ((q_data - target) ** 2).mean(1).sum()  # the sum of the N MSEs, as the authors' two
    logs, gaps = {}, None if measure else torch.zeros(len(q_data), device=obs.device)  # zeros: alpha 0, not measured
    if measure:
        with torch.set_grad_enabled(conservative):
            q_proposals = critics(obs, prop_actions)  # (N, B, 3n)
            if calibrate is not None:  # Cal-QL: the policy's proposals floored by G
                q_proposals, logs["cal_ql_bound_rate"] = calibrate(q_proposals, batch[5])
            gaps = cql_gap_box(q_proposals, prop_log_density, q_data)  # (N,), one per critic
        logs["cql_gap"] = gaps.mean().detach()
    if args.cql_lagrange:  # App. F: min_Q max_{alpha' >= 0} alpha' (alpha * gap - tau), alpha' by gradient ascent
        alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6)
        slack = (args.cql_alpha * gaps - args.cql_target_action_gap).detach()
        alpha_prime_loss = -0.5 * (alpha_prime * slack).sum()
        alpha_prime_opt.zero_grad(set_to_none=True)
        alpha_prime_loss.backward()
        alpha_prime_opt.step()
        cql_loss = (alpha_prime.detach() * (args.cql_alpha * gaps - args.cql_target_action_gap)).sum()
        logs.update(alpha_prime_loss=alpha_prime_loss.detach(), alpha_prime=alpha_prime.detach())
    else:
        cql_loss = (args.cql_alpha * gaps).sum()
    q_loss = td_loss + cql_loss if conservative else td_loss  # alpha 0: plain (offline) SAC critics
    q_opt.zero_grad(set_to_none=True)  # also clears what the actor's backward left on the critics
    q_loss.backward()
    q_opt.step()
    actor_opt.step()

    # (5) Polyak averaging of the target critics, every step
    with torch.no_grad():
        for p, tp in zip(critics.parameters(), critics_target.parameters()):
            tp.lerp_(p, args.tau)
    return dict(q_loss=q_loss.detach(), td_loss=td_loss.detach(), cql_loss=cql_loss.detach(),
                actor_loss=actor_loss.detach(), alpha_loss=alpha_loss.detach(), alpha=alpha,
                log_pi=logp_pi.mean().detach(), **logs)


def update_discrete(batch, step, logging, *, qnet, qnet_target, q_opt, args: Args, cal_ql: bool = False):
    """One CQL(H)-DQN step: Huber TD to a double-DQN target plus alpha * (logsumexp_a Q(s, a) - Q(s, a_data)). The
    exact gap is cheap: computed whether `logging` or not. `cal_ql` (cql_finetune.py): Q(s, .) floored by batch[5]."""
    obs, actions, rewards, next_obs, terminals = batch[:5]
    # (1) Double DQN target: the online network picks a' = argmax Q(s', .), the target network scores it
    with torch.no_grad():
        a_next = qnet(next_obs).argmax(1, keepdim=True)
        q_next = qnet_target(next_obs).gather(1, a_next).squeeze(1)
        target = rewards + args.discount * (1.0 - terminals) * q_next

    # (2) Huber TD loss on the data action plus the exact conservative term (Eq. 4)
    q_all = qnet(obs)
    td_loss = F.smooth_l1_loss(q_all.gather(1, actions[:, None]).squeeze(1), target)
    gap = cql_gap_discrete(q_all, actions, batch[5] if cal_ql else None)
    cql_loss = args.cql_alpha * gap
    q_loss = td_loss + cql_loss if args.cql_alpha > 0 else td_loss  # alpha 0: plain double DQN on fixed data
    q_opt.zero_grad(set_to_none=True)
    q_loss.backward()
    q_opt.step()

    # (3) Target network: Polyak every step, or a hard copy every --target-update-every steps
    with torch.no_grad():
        if args.target_update_every > 0:
            if step % args.target_update_every == 0:
                qnet_target.load_state_dict(qnet.state_dict())
        else:
            for p, tp in zip(qnet.parameters(), qnet_target.parameters()):
                tp.lerp_(p, args.tau)
    return dict(q_loss=q_loss.detach(), td_loss=td_loss.detach(), cql_loss=cql_loss.detach(), cql_gap=gap.detach())


def q_value(net: QEnsemble | DiscreteQNetwork, lcb: float, obs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Q(s, a) as the policy sees it: Box, the N critics' minimum (or --q-lcb bound); Discrete, read from Q(s, .)."""
    return pessimistic(net(obs, a), lcb) if isinstance(net, QEnsemble) else net(obs).gather(1, a[:, None]).squeeze(1)


@torch.no_grad()
def diagnostics(batch, q_value, greedy, discrete: bool, critics: QEnsemble | None = None) -> dict[str, torch.Tensor]:
    """Mean Q on data actions, the gap Q(s, pi(s)) - Q(s, a_data), how far pi strays from the data (`q_value(obs, a)`,
    `greedy(obs)`); Box (`critics`): also the critics' spread (std over the N) on data and policy actions."""
    obs, actions = batch[0], batch[1]
    pi = greedy(obs)
    q_data = q_value(obs, actions)
    stray = (pi != actions).float().mean() if discrete else ((pi - actions) ** 2).sum(-1).mean()
    spread = {} if critics is None else dict(q_std_data=critics(obs, actions).std(0, correction=0).mean(),
                                             q_std_pi=critics(obs, pi).std(0, correction=0).mean())
    return dict(q_data=q_data.mean(), q_pi_minus_q_data=(q_value(obs, pi) - q_data).mean(), **spread,
                **{"action_mismatch" if discrete else "action_mse": stray})


def load_policy(path: str, device: str | torch.device = "cpu") -> Policy:
    """The --save-model policy in environment units: Box, tanh(mean) and the tanh-Gaussian; Discrete, argmax Q."""
    ckpt = load_checkpoint(path, device, "cql")
    args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})  # cql_finetune's too
    mean, std = ckpt["obs_mean"], ckpt["obs_std"]
    if ckpt["n_actions"] is not None:
        qnet = DiscreteQNetwork(ckpt["obs_dim"], ckpt["n_actions"], args).to(device).eval()
        qnet.load_state_dict(ckpt["qnet"])
        return Policy(act=lambda o: qnet.act((o - mean) / std), dist=None, discrete=True, checkpoint=ckpt)
    actor = TanhGaussianActor(ckpt["obs_dim"], ckpt["act_dim"], args).to(device).eval()
    actor.load_state_dict(ckpt["actor"])
    center, half = ckpt["action_center"], ckpt["action_half"]

    def dist(o: torch.Tensor) -> torch.distributions.Distribution:
        squash = [torch.distributions.TanhTransform(cache_size=1), torch.distributions.AffineTransform(center, half)]
        return torch.distributions.Independent(
            torch.distributions.TransformedDistribution(actor.dist((o - mean) / std), squash), 1)

    return Policy(act=lambda o: center + half * actor.act((o - mean) / std), dist=dist, discrete=False,
                  checkpoint=ckpt)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device, ds = setup(args, "cql.py", RANGES, load_policy, DEFAULT_DATASET)  # seed, device, data; --load-model exits
    if ds.discrete and (args.n_critics != 2 or args.q_lcb > 0):
        raise UserError("--n-critics/--q-lcb apply to Box CQL; discrete CQL has one double-DQN Q network")
    if args.cql_alpha is None:  # one flag, two defaults: 5.0 for Box (authors' Gym runs), 1.0 for Discrete
        args.cql_alpha = 1.0 if ds.discrete else 5.0
    rb = ReplayBuffer(ds, device, args.normalize_obs, args.reward_scale, args.reward_bias)
    run = Run(args, "cql.py", args.total_steps)

    # ALGO LOGIC: networks and optimisers. Target networks start as exact copies of the online ones.
    if ds.discrete:
        qnet = DiscreteQNetwork(rb.obs_dim, rb.n_actions, args).to(device)
        qnet_target = copy.deepcopy(qnet)
        q_opt = torch.optim.Adam(qnet.parameters(), lr=args.critic_lr)
        update = partial(update_discrete, qnet=qnet, qnet_target=qnet_target, q_opt=q_opt, args=args)
        value, greedy, critics = partial(q_value, qnet, 0.0), qnet.act, None
        saved = dict(qnet=qnet, qnet_target=qnet_target)  # what --save-model writes
    else:
        critics = QEnsemble(rb.obs_dim, rb.act_dim, args).to(device)
        critics_target = copy.deepcopy(critics)  # draws nothing (as the twin targets did): the actor's init is kept
        actor = TanhGaussianActor(rb.obs_dim, rb.act_dim, args).to(device)
        log_alpha = torch.zeros((), device=device, requires_grad=True)  # SAC temperature, alpha = exp(0) = 1
        log_alpha_prime = torch.zeros((), device=device, requires_grad=True)  # Lagrange multiplier, alpha' = 1
        q_opt = torch.optim.Adam(critics.parameters(), lr=args.critic_lr)
        actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
        alpha_opt = torch.optim.Adam([log_alpha], lr=args.actor_lr)
        alpha_prime_opt = torch.optim.Adam([log_alpha_prime], lr=args.critic_lr)
        update = partial(update_box, critics=critics, critics_target=critics_target, actor=actor,
                         log_alpha=log_alpha, log_alpha_prime=log_alpha_prime, q_opt=q_opt, actor_opt=actor_opt,
                         alpha_opt=alpha_opt, alpha_prime_opt=alpha_prime_opt, args=args)
        value, greedy = partial(q_value, critics, args.q_lcb), actor.act
        saved = dict(actor=actor, critics=critics, critics_target=critics_target, log_alpha=log_alpha,
                     log_alpha_prime=log_alpha_prime, action_center=rb.action_center, action_half=rb.action_half)
    update = speed_up(update, args.compile)  # --compile; subnormals flushed (CPU speed only, the same maths)

    def policy(obs: torch.Tensor) -> torch.Tensor:  # evaluation: argmax Q, or tanh(mean) in the environment's box
        return greedy(obs) if ds.discrete else rb.unscale_action(greedy(obs))

    def save_model(path: str) -> str:
        """Weights, config and normalisation constants, loadable with torch.load(path, weights_only=True)."""
        nets = {k: v.state_dict() if isinstance(v, nn.Module) else v.detach() for k, v in saved.items()}
        torch.save(dict(algo="cql", args=asdict(args), obs_mean=rb.obs_mean, obs_std=rb.obs_std, obs_dim=rb.obs_dim,
                        act_dim=rb.act_dim, n_actions=rb.n_actions, **nets), path)
        print(f"saved {path}", flush=True)
        return path

    # TRY NOT TO MODIFY: the training loop: sample, update, then save / evaluate / log when due
    model_path = None
    for step in range(1, args.total_steps + 1):
        evaluated = args.eval_episodes > 0 and (step % args.eval_every == 0 or step == args.total_steps)
        logging = step % args.log_every == 0 or step == args.total_steps or evaluated  # the only host syncs
        batch = rb.sample(args.batch_size)
        logs = update(batch, step, logging)

        if args.save_model and args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_model(f"runs/{run.name}/cql_step{step}.pt")
        if args.save_model and step == args.total_steps:  # before the last evaluation: an error there loses no model
            model_path = save_model(f"runs/{run.name}/cql.pt")

        # Evaluation: the score, and the discounted return from the start states next to the policy's own Q there
        if evaluated:
            t0 = time.time()
            with isolated():
                ev = evaluate(ds, policy, args.eval_episodes, args.seed + 100, device, rb.normalize, args.discount,
                              reward_transform=(rb.reward_scale, rb.reward_bias))
                s0 = rb.normalize(ev.start_obs)
                q_start = value(s0, greedy(s0)).mean().item()
            run.evaluation(ds, step, ev, q_start, time.time() - t0)

        if logging:
            with isolated():
                logs.update(diagnostics(batch, value, greedy, ds.discrete, critics))
            run.log(step, logs, show=["q_data", "cql_gap"])
    run.finish(model_path)
