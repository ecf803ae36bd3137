# Conservative Q-Learning (Kumar, Zhou, Tucker, Levine 2020, https://arxiv.org/abs/2006.04779). Docs: docs/cql.md
# Box actions: CQL(H) on SAC as in the authors' code (aviralkumar2907/CQL, d4rl/rlkit/torch/sac/cql.py).
# Discrete actions: CQL(H) on double DQN with an MLP Q(s, .) (the authors' Atari agent is QR-DQN; see the docs).
import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import (COMMON_RANGES, check_data, OnlineCollector, Policy, Progress, ReplayBuffer, UserError, check_ranges,
                    dataset_dims, evaluate, flush_subnormals, isolated, load_checkpoint, load_dataset, log_evaluation,
                    make_run, mlp, pick_device, read_training_state, report_saved_policy, report_user_errors,
                    restore_training_state, resumed_args, save_training_state, set_seed)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
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
    resume_every: int = 0
    """save the training state to `runs/{run_name}/resume.pt` every N steps for --resume (0: never; offline only)"""
    resume: str | None = None
    """continue an interrupted run from its `resume.pt` (its run folder and flags, except --device and --threads)"""
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

    # Offline-to-online fine-tuning (docs/finetune.md)
    online_steps: int = 0
    """online fine-tuning: environment steps after the offline --total-steps, each followed by --utd gradient steps"""
    utd: int = 1
    """online: gradient steps per environment step (the update-to-data ratio)"""
    online_ratio: float = 0.0
    """online: share of each batch drawn from the online data, the rest from the dataset (0: uniform over all rows)"""
    online_epsilon: float = 0.05
    """Discrete, online: probability of a uniformly random action instead of argmax Q (epsilon-greedy)"""
    learning_starts: int = 0
    """online: the first this many of the --online-steps take uniformly random actions, no gradient step (CleanRL)"""
    cal_ql: bool = False
    """Cal-QL (Nakamoto et al. 2023): the conservative term floors the policy's Q by the data's return G: max(Q, G)"""


# Valid ranges of the numeric flags, checked at start-up (a one-line error names the flag and its range)
RANGES = {**COMMON_RANGES, "cql_alpha": "[0, inf)", "actor_lr": "(0, inf)", "critic_lr": "(0, inf)",
          "hidden_dim": "[1, inf)", "n_layers": "[0, inf)", "cql_n_actions": "[1, inf)", "bc_steps": "[0, inf)",
          "target_update_every": "[0, inf)", "n_critics": "[1, inf)", "q_lcb": "[0, inf)", "total_steps": "[0, inf)",
          "online_steps": "[0, inf)", "utd": "[1, inf)", "online_ratio": "[0, 1]", "online_epsilon": "[0, 1]",
          "learning_starts": "[0, inf)"}
DEFAULT_DATASET = "lunarlander-continuous-medium"


# ALGO LOGIC: networks. Box: N critics Q(s, a) (twin Q by default) and a tanh-Gaussian actor (SAC). Discrete: one
# Q(s, .) network.
class QEnsemble(nn.Module):
    """Box: N critics Q_1..Q_N(s, a) in one module (--n-critics). Layer j holds the N members' weights stacked,
    (N, in, out), applied in one batched matmul: 10 critics cost far less than five times 2. The members start as N
    separate `mlp`s would (the same random draws in the same order as the twin networks). Returns (N, B); an action
    batch (B, n, d) holds n actions per state: obs is broadcast, out (N, B, n)."""

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
    """Box: a = tanh(u), u ~ N(mu(s), sigma(s)) with a state-dependent log sigma clamped to [-5, 2] (authors'
    TanhGaussianPolicy). Acts with tanh(mu(s)); `log_prob` gives log pi(a|s) of any action in [-1, 1] (OPE)."""

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
    `floor` (Cal-QL, G per state): logsumexp over max(Q(s, .), G) instead; Q(s, a_data) is not floored."""
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


def calibrate(q_proposals: torch.Tensor, mc_returns: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cal-QL (Nakamoto et al. 2023; the authors' JaxCQL): max(Q(s, a), G(s)) on the 2N proposals from pi(.|s) and
    pi(.|s') (the last 2N), before the log-density correction; the N uniform ones are left as they are. Returns the
    floored (critics, B, 3N) values and the share of the policy's Q-values that the floor lifted."""
    q_uniform, q_policy = q_proposals[..., :n], q_proposals[..., n:]
    floor = mc_returns[:, None].expand_as(q_policy)
    return torch.cat([q_uniform, torch.maximum(q_policy, floor)], -1), (q_policy < floor).float().mean()


def pessimistic(q: torch.Tensor, lcb: float) -> torch.Tensor:
    """(N, ...) -> (...): the minimum over the N critics (SAC-N; N = 2 is the twin-min), or for lcb = k > 0 the lower
    confidence bound mean - k * std (population std, so with N = 2 and k = 1 it is the minimum again)."""
    return q.mean(0) - lcb * q.std(0, correction=0) if lcb > 0 else q.min(0).values


def update_box(batch, step, *, critics, critics_target, actor, log_alpha, log_alpha_prime, q_opt, actor_opt,
               alpha_opt, alpha_prime_opt, args: Args):
    """One CQL(H)-SAC step in the authors' order: temperature, then critics, then the actor, then Polyak. The
    actor's loss is taken before the critic step, so actor and critics both see the pre-update networks."""
    obs, actions, rewards, next_obs, terminals = batch[:5]  # with --cal-ql, batch[5] is G, the MC return-to-go
    # (1) SAC temperature: drive the policy entropy towards the target -d (log_alpha starts at 0, i.e. alpha = 1)
    a_pi, logp_pi = actor.sample(obs)
    alpha_loss = -(log_alpha * (logp_pi.detach() - actor.act_dim)).mean()
    alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward(retain_graph=True)  # keeps the actor's sample for (2): --compile fuses both in one node
    alpha_opt.step()
    alpha = log_alpha.exp().detach()

    # (2) Actor loss: SAC's alpha log pi - min Q (over the N critics, or the --q-lcb bound); during the first
    # --bc-steps, behaviour cloning alpha log pi - log pi(a_data|s) instead (the authors' policy_eval_start). Its
    # gradient is taken now, its step after the critics.
    if step <= args.bc_steps:
        actor_loss = (alpha * logp_pi - actor.log_prob(obs, actions)).mean()
    else:
        actor_loss = (alpha * logp_pi - pessimistic(critics(obs, a_pi), args.q_lcb)).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()

    # (3) TD target with a' ~ pi(.|s') from the current actor and the *minimum* of the N target critics (or the
    # --q-lcb bound). The authors drop the entropy term (their "deterministic backup": Eqs. 3-4 use the plain Bellman
    # backup); see --backup-entropy
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

    # (4) Critics: TD (MSE, no 1/2, as the authors) plus the conservative term, for each critic separately, the same
    # proposals for all. With --cql-alpha 0 (plain SAC critics) the term, 95% of the compute, is only measured on
    # logging steps, no gradient, with proposals from a forked random stream so that logging never changes what
    # training draws
    conservative = args.cql_alpha > 0
    last = args.total_steps + (args.online_steps - args.learning_starts) * args.utd
    measure = conservative or step % args.log_every == 0 or step == last
    if measure:
        with torch.random.fork_rng(enabled=not conservative):
            prop_actions, prop_log_density = cql_proposals(obs, next_obs, actor, args.cql_n_actions)
    q_data = critics(obs, actions)  # (N, B)
    td_loss = ((q_data - target) ** 2).mean(1).sum()  # the sum of the N MSEs, as the authors' two
    if measure:
        with torch.set_grad_enabled(conservative):
            q_proposals = critics(obs, prop_actions)  # (N, B, 3n)
            if args.cal_ql:  # Cal-QL: the policy's proposals floored by G (calibration)
                q_proposals, bound_rate = calibrate(q_proposals, batch[5], args.cql_n_actions)
            gaps = cql_gap_box(q_proposals, prop_log_density, q_data)  # (N,), one per critic
    else:
        gaps = torch.zeros(len(q_data), device=obs.device)  # zeros: alpha 0, not measured
    logs = dict(cql_gap=gaps.mean().detach()) if measure else {}
    if measure and args.cal_ql:
        logs.update(cal_ql_bound_rate=bound_rate.detach())
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


def update_discrete(batch, step, *, qnet, qnet_target, q_opt, args: Args):
    """One CQL(H)-DQN step: Huber TD to a double-DQN target plus alpha * (logsumexp_a Q(s, a) - Q(s, a_data))."""
    obs, actions, rewards, next_obs, terminals = batch[:5]  # with --cal-ql, batch[5] is G, the MC return-to-go
    # (1) Double DQN target: the online network picks a' = argmax Q(s', .), the target network scores it
    with torch.no_grad():
        a_next = qnet(next_obs).argmax(1, keepdim=True)
        q_next = qnet_target(next_obs).gather(1, a_next).squeeze(1)
        target = rewards + args.discount * (1.0 - terminals) * q_next

    # (2) Huber TD loss on the data action plus the exact conservative term (Eq. 4)
    q_all = qnet(obs)
    td_loss = F.smooth_l1_loss(q_all.gather(1, actions[:, None]).squeeze(1), target)
    gap = cql_gap_discrete(q_all, actions, batch[5] if args.cal_ql else None)
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
    return dict(q_loss=q_loss.detach(), td_loss=td_loss.detach(), cql_loss=cql_loss.detach(),
                cql_gap=gap.detach())


def pessimistic_q(critics: QEnsemble, obs: torch.Tensor, a: torch.Tensor, lcb: float) -> torch.Tensor:
    """Box: min_i Q_i(s, a) over the N critics (or the --q-lcb bound), the value the actor maximises and the
    diagnostics report."""
    return pessimistic(critics(obs, a), lcb)


def check_critic_flags(args: Args, discrete: bool) -> None:
    """--n-critics and --q-lcb shape Box CQL's critics; Discrete CQL has one double-DQN network, so refuse them."""
    if discrete and (args.n_critics != 2 or args.q_lcb > 0):
        raise UserError("--n-critics/--q-lcb apply to Box CQL; discrete CQL has one double-DQN Q network")


def discrete_q(qnet: DiscreteQNetwork, obs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Discrete: Q(s, a) read from the Q(s, .) head."""
    return qnet(obs).gather(1, a[:, None]).squeeze(1)


@torch.no_grad()
def diagnostics(batch, q_value, greedy, discrete: bool, critics: QEnsemble | None = None) -> dict[str, torch.Tensor]:
    """Mean Q on dataset actions, the gap Q(s, pi(s)) - Q(s, a_data) and how far pi strays from the data.
    `q_value(obs, a)` is the critics' minimum or --q-lcb bound (Box) or Q(s, a) (Discrete); `greedy(obs)` the
    evaluation action. Box (`critics`): also the critics' spread (std over the N) on data actions and on pi's: the
    epistemic gap that grows off the data."""
    obs, actions = batch[0], batch[1]
    pi = greedy(obs)
    q_data = q_value(obs, actions)
    stray = (pi != actions).float().mean() if discrete else ((pi - actions) ** 2).sum(-1).mean()
    spread = {} if critics is None else dict(q_std_data=critics(obs, actions).std(0, correction=0).mean(),
                                             q_std_pi=critics(obs, pi).std(0, correction=0).mean())
    return dict(q_data=q_data.mean(), q_pi_minus_q_data=(q_value(obs, pi) - q_data).mean(), **spread,
                **{"action_mismatch" if discrete else "action_mse": stray})


def explore_box(actor: TanhGaussianActor, obs: torch.Tensor) -> torch.Tensor:
    """Online, Box: the action that collects data, a tanh-Gaussian sample of pi(.|s)."""
    return actor.sample(obs)[0]


def explore_discrete(qnet: DiscreteQNetwork, epsilon: float, obs: torch.Tensor) -> torch.Tensor:
    """Online, Discrete: epsilon-greedy on Q, a uniformly random action with probability epsilon."""
    greedy = qnet.act(obs)
    random_action = torch.randint(0, qnet.n_actions, greedy.shape, device=obs.device)
    return torch.where(torch.rand(greedy.shape, device=obs.device) < epsilon, random_action, greedy)


def load_policy(path: str, device: str | torch.device = "cpu") -> Policy:
    """Rebuild the policy saved by --save-model, in environment units. Box: acts with tanh(mean); its distribution
    is the tanh-Gaussian mapped to the action box (for OPE). Discrete: argmax Q, deterministic (no distribution)."""
    ckpt = load_checkpoint(path, device, "cql")
    args = Args(**ckpt["args"])
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
    # TRY NOT TO MODIFY: clean errors for user mistakes, flag ranges, threads, seeding, device, data
    report_user_errors("cql.py")
    resumed = read_training_state(args.resume, "cql.py") if args.resume else None
    if resumed:  # the interrupted run's own flags; --device and --threads from this command
        args = resumed_args(args, resumed)
    check_ranges(args, RANGES)
    torch.set_num_threads(args.threads)
    set_seed(args.seed, args.torch_deterministic)
    device = pick_device(args.device)

    if args.load_model:  # evaluate a saved policy on its own dataset (unless --dataset says otherwise) and exit
        saved = load_policy(args.load_model, device)
        ds = load_dataset(args.dataset or saved.checkpoint["args"]["dataset"])
        report_saved_policy(args.load_model, saved, ds, args.eval_episodes, args.seed + 100, device)
        raise SystemExit

    args.dataset = args.dataset or DEFAULT_DATASET
    if args.online_steps > 0 and args.resume_every > 0:
        raise UserError("--resume-every saves offline training only (an environment mid-episode cannot be saved): "
                        "drop it or --online-steps")
    if args.total_steps == 0 and args.online_steps == 0:
        raise UserError("--total-steps 0 trains nothing offline: give it an online phase (--online-steps M) or at "
                        "least 1 step")
    ds = load_dataset(args.dataset)
    check_data(args, ds)  # batch size, an environment to evaluate in
    if args.learning_starts >= max(args.online_steps, 1):
        raise UserError(f"--learning-starts {args.learning_starts}: the random warm-up is part of the online phase, so "
                        f"it must be below --online-steps ({args.online_steps})")
    discrete = ds.discrete
    obs_dim, act_dim, n_actions = dataset_dims(ds)
    check_critic_flags(args, discrete)
    if args.cql_alpha is None:  # one flag, two defaults: 5.0 for Box (authors' Gym runs), 1.0 for Discrete
        args.cql_alpha = 1.0 if discrete else 5.0
    rb = ReplayBuffer(ds, device, args.normalize_obs, args.reward_scale, args.reward_bias, capacity=args.online_steps)
    if args.cal_ql:  # Cal-QL's floor G: discounted returns-to-go of each episode, on the transformed rewards
        rb.returns_to_go(args.discount)
    run_name, writer = make_run(args, "cql.py", resumed)

    # ALGO LOGIC: networks and optimisers. Target networks start as exact copies of the online ones.
    if discrete:
        qnet = DiscreteQNetwork(obs_dim, n_actions, args).to(device)
        qnet_target = copy.deepcopy(qnet)
        q_opt = torch.optim.Adam(qnet.parameters(), lr=args.critic_lr)
        update = partial(update_discrete, qnet=qnet, qnet_target=qnet_target, q_opt=q_opt, args=args)
        q_value, greedy, critics = partial(discrete_q, qnet), qnet.act, None
        explore, explorer = partial(explore_discrete, qnet, args.online_epsilon), qnet
        trained = dict(qnet=qnet, qnet_target=qnet_target, q_opt=q_opt)  # what --resume-every saves
    else:
        critics = QEnsemble(obs_dim, act_dim, args).to(device)
        critics_target = copy.deepcopy(critics)  # draws nothing (as the twin targets did): the actor's init is kept
        actor = TanhGaussianActor(obs_dim, act_dim, args).to(device)
        log_alpha = torch.zeros((), device=device, requires_grad=True)  # SAC temperature, alpha = exp(0) = 1
        log_alpha_prime = torch.zeros((), device=device, requires_grad=True)  # Lagrange multiplier, alpha' = 1
        q_opt = torch.optim.Adam(critics.parameters(), lr=args.critic_lr)
        actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
        alpha_opt = torch.optim.Adam([log_alpha], lr=args.actor_lr)
        alpha_prime_opt = torch.optim.Adam([log_alpha_prime], lr=args.critic_lr)
        update = partial(update_box, critics=critics, critics_target=critics_target, actor=actor,
                         log_alpha=log_alpha, log_alpha_prime=log_alpha_prime, q_opt=q_opt, actor_opt=actor_opt,
                         alpha_opt=alpha_opt, alpha_prime_opt=alpha_prime_opt, args=args)
        q_value, greedy = partial(pessimistic_q, critics, lcb=args.q_lcb), actor.act
        explore, explorer = partial(explore_box, actor), actor
        trained = dict(critics=critics, critics_target=critics_target, actor=actor, log_alpha=log_alpha,
                       log_alpha_prime=log_alpha_prime, q_opt=q_opt, actor_opt=actor_opt, alpha_opt=alpha_opt,
                       alpha_prime_opt=alpha_prime_opt)

    if args.compile:  # the same update, compiled; random draws stay eager's (fallback_random), so seeds agree
        torch._inductor.config.fallback_random = True
        torch._functorch.config.donated_buffer = False  # an update may take two backward passes through one graph
        update = torch.compile(update)
    update = flush_subnormals(update)  # CPU speed only, the same maths: Adam's moments decay into slow subnormals

    def policy(obs: torch.Tensor) -> torch.Tensor:
        """Evaluation action: tanh(mean) mapped back to the environment's box (Box) or argmax Q (Discrete)."""
        return greedy(obs) if discrete else rb.unscale_action(greedy(obs))

    def save_model(path: str) -> str:
        """Weights, config and normalisation constants, loadable with torch.load(path, weights_only=True)."""
        if discrete:
            nets = dict(qnet=qnet.state_dict(), qnet_target=qnet_target.state_dict())
        else:
            nets = dict(actor=actor.state_dict(), critics=critics.state_dict(),
                        critics_target=critics_target.state_dict(), log_alpha=log_alpha.detach(),
                        log_alpha_prime=log_alpha_prime.detach(),
                        action_center=rb.action_center, action_half=rb.action_half)
        torch.save(dict(algo="cql", args=asdict(args), obs_mean=rb.obs_mean, obs_std=rb.obs_std, obs_dim=obs_dim,
                        act_dim=act_dim, n_actions=n_actions, **nets), path)
        print(f"saved {path}", flush=True)
        return path

    # TRY NOT TO MODIFY: the training loop. Offline: --total-steps gradient steps on the dataset. Online
    # (--online-steps M, docs/finetune.md): M times, one environment step with a sample of the policy into the
    # buffer, then --utd gradient steps.
    n_updates = args.total_steps + (args.online_steps - args.learning_starts) * args.utd
    collector = OnlineCollector(ds, rb, args.seed) if args.online_steps > 0 else None
    progress = Progress("cql.py", n_updates)

    def log_episode(episode: tuple[float, int] | None) -> None:
        if episode is not None:
            writer.add_scalar("charts/episodic_return", episode[0], collector.env_steps)
            writer.add_scalar("charts/episodic_length", episode[1], collector.env_steps)

    start = restore_training_state(resumed, trained, progress) if resumed else 0
    model_path = None
    for step in range(start + 1, n_updates + 1):
        if step > args.total_steps and (step - args.total_steps - 1) % args.utd == 0:
            while collector.env_steps < args.learning_starts:  # warm-up: random actions, no gradient step
                log_episode(collector.step(None))
            log_episode(collector.step(explore, explorer))
        batch = rb.sample(args.batch_size, args.online_ratio)
        logs = update(batch, step)

        if args.save_model and args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_model(f"runs/{run_name}/cql_step{step}.pt")
        if args.save_model and step == n_updates:  # before the last evaluation: an error there loses no model
            model_path = save_model(f"runs/{run_name}/cql.pt")

        # Evaluation: the undiscounted score, and the discounted return earned from the start states next to the
        # policy's own Q there (overestimation, measured on the same policy); with an online phase also at the
        # switch and against environment steps
        evaluated = args.eval_episodes > 0 and (step % args.eval_every == 0 or step == n_updates
                                                or (step == args.total_steps and collector is not None))
        if evaluated:
            t0 = time.time()
            with isolated():
                ev = evaluate(ds, policy, args.eval_episodes, args.seed + 100, device, rb.normalize, args.discount,
                              reward_transform=(rb.reward_scale, rb.reward_bias))
                s0 = rb.normalize(ev.start_obs)
                q_start = q_value(s0, greedy(s0)).mean().item()
            log_evaluation(writer, progress, ds, step, ev, q_start, time.time() - t0,
                           env_steps=collector.env_steps if collector and step >= args.total_steps else None)

        if step % args.log_every == 0 or step == n_updates or evaluated:  # the only host syncs
            with isolated():
                logs.update(diagnostics(batch, q_value, greedy, discrete, critics))
            for k, v in logs.items():
                if not math.isfinite(v := v.item()):  # stop with a message rather than train on NaNs
                    raise FloatingPointError(f"{k} = {v} at step {step}: training diverged (try a lower learning "
                                             "rate, --normalize-obs, or check the dataset's rewards)")
                writer.add_scalar(f"losses/{k}" if k.endswith("_loss") else f"diagnostics/{k}", v, step)
            gap = f" | cql_gap {logs['cql_gap']:.2f}" if "cql_gap" in logs else ""  # alpha 0: logging steps only
            extra = f"q_data {logs['q_data']:.2f}{gap}"
            if collector is not None:
                writer.add_scalar("charts/env_steps", collector.env_steps, step)
                writer.add_scalar("charts/online_share", rb.online_share(args.batch_size, args.online_ratio), step)
                extra += f" | env steps {collector.env_steps}"
            writer.add_scalar("charts/SPS", progress.line(step, extra), step)

        if args.resume_every > 0 and step % args.resume_every == 0:
            save_training_state(f"runs/{run_name}/resume.pt", "cql.py", step, args, run_name, progress, trained)

    if collector is not None:
        collector.close()
    writer.close()
    progress.summary(run_name, model_path)
