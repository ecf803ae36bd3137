# Offline-to-online fine-tuning with CQL, and Cal-QL (Nakamoto, Zhai, Singh, Sharma, Ma, Finn, Kumar, Levine 2023,
# https://arxiv.org/abs/2303.05479): CQL whose conservative term never pushes the policy's Q below the data's
# return-to-go. Docs: docs/finetune.md. CQL's networks and update come from cql.py unchanged: pre-training for
# --total-steps on the dataset, then --online-steps environment steps, each followed by --utd updates on the
# dataset plus everything collected so far. --total-steps 0 trains from scratch online (SAC / double DQN with
# --cql-alpha 0); --online-steps 0 pre-trains only (offline Cal-QL).
import copy
import time
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import tyro

import cql
from common import Run, evaluate, isolated, setup, speed_up
from cql import DiscreteQNetwork, QEnsemble, TanhGaussianActor, diagnostics, q_value, update_box, update_discrete
from datasets import UserError
from online import OnlineCollector, OnlineReplayBuffer


@dataclass
class Args(cql.Args):
    exp_name: str = "cql_finetune"
    """the name of this experiment (part of the run folder's name)"""
    total_steps: int = 1_000_000
    """offline pre-training: gradient steps on the dataset before the online phase (0: start online at once)"""
    online_steps: int = 1_000_000
    """environment steps after pre-training, each followed by --utd gradient steps (0: pre-training only)"""
    utd: int = 1
    """gradient steps per environment step (the update-to-data ratio)"""
    online_ratio: float = 0.0
    """share of each batch drawn from the online data, the rest from the dataset (0: uniform over all rows)"""
    online_epsilon: float = 0.05
    """Discrete: probability of a uniformly random action instead of argmax Q (epsilon-greedy)"""
    learning_starts: int = 0
    """the first this many of the --online-steps take uniformly random actions, no gradient step (CleanRL)"""
    cal_ql: bool = False
    """Cal-QL: the conservative term floors the policy's Q by the data's return-to-go G: max(Q, G)"""


RANGES = {**cql.RANGES, "total_steps": "[0, inf)", "online_steps": "[0, inf)", "utd": "[1, inf)",
          "online_ratio": "[0, 1]", "online_epsilon": "[0, 1]", "learning_starts": "[0, inf)"}


# ALGO LOGIC: Cal-QL's calibration, the one change to CQL's pre-training objective
def returns_to_go(rewards: torch.Tensor, terminals: torch.Tensor, episode_ends: np.ndarray, discount: float,
                  floor: float) -> torch.Tensor:
    """Cal-QL's G_t = r_t + gamma (1 - terminal_t) G_{t+1} within each episode (float64, then float32). A cut episode
    (a time limit, the end of the data) goes on with the discounted tail of `floor` = min(r_min, 0) per step, so G
    stays below the behaviour policy's value: 0 for r >= 0 (the authors' truncated sum), r_min / (1 - gamma) for an
    episode of only r_min <= 0 (their sparse rule). docs/finetune.md."""
    r, term = rewards.cpu().double().numpy(), terminals.cpu().double().numpy()
    out, start = np.zeros(len(r)), 0
    for end in episode_ends:
        g = 0.0 if term[end] else floor / (1.0 - discount)  # a cut episode's tail, a lower bound
        for i in range(end, start - 1, -1):
            g = r[i] + discount * (1.0 - term[i]) * g
            out[i] = g
        start = end + 1
    return torch.as_tensor(out, dtype=torch.float32, device=rewards.device)


def calibrate(q_proposals: torch.Tensor, mc_returns: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cal-QL (Nakamoto et al. 2023; the authors' JaxCQL): max(Q(s, a), G(s)) on the 2N proposals from pi(.|s) and
    pi(.|s') (the last 2N), before the log-density correction; the N uniform ones are left as they are. Returns the
    floored (critics, B, 3N) values and the share of the policy's Q-values that the floor lifted."""
    q_uniform, q_policy = q_proposals[..., :n], q_proposals[..., n:]
    floor = mc_returns[:, None].expand_as(q_policy)
    return torch.cat([q_uniform, torch.maximum(q_policy, floor)], -1), (q_policy < floor).float().mean()


def explore_box(actor: TanhGaussianActor, obs: torch.Tensor) -> torch.Tensor:
    """Box: the action that collects data, a tanh-Gaussian sample of pi(.|s)."""
    return actor.sample(obs)[0]


def explore_discrete(qnet: DiscreteQNetwork, epsilon: float, obs: torch.Tensor) -> torch.Tensor:
    """Discrete: epsilon-greedy on Q, a uniformly random action with probability epsilon."""
    greedy = qnet.act(obs)
    random_action = torch.randint(0, qnet.n_actions, greedy.shape, device=obs.device)
    return torch.where(torch.rand(greedy.shape, device=obs.device) < epsilon, random_action, greedy)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device, ds = setup(args, "cql_finetune.py", RANGES, cql.load_policy, cql.DEFAULT_DATASET)
    if args.total_steps + args.online_steps == 0:
        raise UserError("--total-steps 0 --online-steps 0 trains nothing: give either phase at least 1 step")
    if args.learning_starts >= max(args.online_steps, 1):
        raise UserError(f"--learning-starts {args.learning_starts}: the random warm-up is part of the online phase, so "
                        f"it must be below --online-steps ({args.online_steps})")
    if ds.discrete and (args.n_critics != 2 or args.q_lcb > 0):
        raise UserError("--n-critics/--q-lcb apply to Box CQL; discrete CQL has one double-DQN Q network")
    if args.cql_alpha is None:  # one flag, two defaults: 5.0 for Box (authors' Gym runs), 1.0 for Discrete
        args.cql_alpha = 1.0 if ds.discrete else 5.0
    rb = OnlineReplayBuffer(ds, device, args.normalize_obs, args.reward_scale, args.reward_bias, args.online_steps)
    if args.cal_ql:  # G on the transformed rewards, floored by min(r_min, 0) of the data
        floor = min(rb.rewards[: rb.n_offline].min().item(), 0.0)
        rb.track_returns(partial(returns_to_go, discount=args.discount, floor=floor), ds.episode_ends())
    n_updates = args.total_steps + (args.online_steps - args.learning_starts) * args.utd
    run = Run(args, "cql_finetune.py", n_updates)

    # ALGO LOGIC: networks and optimisers, as cql.py builds them; Cal-QL passes its calibration to the update
    if ds.discrete:
        qnet = DiscreteQNetwork(rb.obs_dim, rb.n_actions, args).to(device)
        qnet_target = copy.deepcopy(qnet)
        q_opt = torch.optim.Adam(qnet.parameters(), lr=args.critic_lr)
        update = partial(update_discrete, qnet=qnet, qnet_target=qnet_target, q_opt=q_opt, args=args,
                         cal_ql=args.cal_ql)
        value, greedy, critics = partial(q_value, qnet, 0.0), qnet.act, None
        explore, explorer = partial(explore_discrete, qnet, args.online_epsilon), qnet
        saved = dict(qnet=qnet, qnet_target=qnet_target)
    else:
        critics = QEnsemble(rb.obs_dim, rb.act_dim, args).to(device)
        critics_target = copy.deepcopy(critics)
        actor = TanhGaussianActor(rb.obs_dim, rb.act_dim, args).to(device)
        log_alpha = torch.zeros((), device=device, requires_grad=True)
        log_alpha_prime = torch.zeros((), device=device, requires_grad=True)
        q_opt = torch.optim.Adam(critics.parameters(), lr=args.critic_lr)
        actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
        alpha_opt = torch.optim.Adam([log_alpha], lr=args.actor_lr)
        alpha_prime_opt = torch.optim.Adam([log_alpha_prime], lr=args.critic_lr)
        update = partial(update_box, critics=critics, critics_target=critics_target, actor=actor,
                         log_alpha=log_alpha, log_alpha_prime=log_alpha_prime, q_opt=q_opt, actor_opt=actor_opt,
                         alpha_opt=alpha_opt, alpha_prime_opt=alpha_prime_opt, args=args,
                         calibrate=partial(calibrate, n=args.cql_n_actions) if args.cal_ql else None)
        value, greedy = partial(q_value, critics, args.q_lcb), actor.act
        explore, explorer = partial(explore_box, actor), actor
        saved = dict(actor=actor, critics=critics, critics_target=critics_target, log_alpha=log_alpha,
                     log_alpha_prime=log_alpha_prime, action_center=rb.action_center, action_half=rb.action_half)
    update = speed_up(update, args.compile)

    def policy(obs: torch.Tensor) -> torch.Tensor:
        return greedy(obs) if ds.discrete else rb.unscale_action(greedy(obs))

    def save_model(path: str) -> str:
        """cql.py's checkpoint (its load_policy, --load-model and ope.py read it), with this run's flags."""
        nets = {k: v.state_dict() if isinstance(v, nn.Module) else v.detach() for k, v in saved.items()}
        torch.save(dict(algo="cql", args=asdict(args), obs_mean=rb.obs_mean, obs_std=rb.obs_std, obs_dim=rb.obs_dim,
                        act_dim=rb.act_dim, n_actions=rb.n_actions, **nets), path)
        print(f"saved {path}", flush=True)
        return path

    def log_episode(episode: tuple[float, int] | None) -> None:
        if episode is not None:
            run.writer.add_scalar("charts/episodic_return", episode[0], collector.env_steps)
            run.writer.add_scalar("charts/episodic_length", episode[1], collector.env_steps)

    # TRY NOT TO MODIFY: the loop. Steps 1..total_steps train on the dataset; then every --utd steps one environment
    # step goes into the buffer first (after --learning-starts random ones). Evaluated also at the switch.
    collector, model_path = OnlineCollector(ds, rb, args.seed) if args.online_steps > 0 else None, None
    for step in range(1, n_updates + 1):
        if step > args.total_steps and (step - args.total_steps - 1) % args.utd == 0:
            while collector.env_steps < args.learning_starts:  # warm-up: random actions, no gradient step
                log_episode(collector.step(None))
            log_episode(collector.step(explore, explorer))
        evaluated = args.eval_episodes > 0 and (step % args.eval_every == 0 or step in (args.total_steps, n_updates))
        logging = step % args.log_every == 0 or step == n_updates or evaluated  # the only host syncs
        batch = rb.sample(args.batch_size, args.online_ratio)
        logs = update(batch, step, logging)

        if args.save_model and args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_model(f"runs/{run.name}/cql_step{step}.pt")
        if args.save_model and step == n_updates:
            model_path = save_model(f"runs/{run.name}/cql.pt")

        if evaluated:
            t0 = time.time()
            with isolated():
                ev = evaluate(ds, policy, args.eval_episodes, args.seed + 100, device, rb.normalize, args.discount,
                              reward_transform=(rb.reward_scale, rb.reward_bias))
                s0 = rb.normalize(ev.start_obs)
                q_start = value(s0, greedy(s0)).mean().item()
            norm = run.evaluation(ds, step, ev, q_start, time.time() - t0)
            if collector is not None and step >= args.total_steps:  # the online phase also against env steps
                run.writer.add_scalar("online/return", ev.returns.mean(), collector.env_steps)
                run.writer.add_scalar("online/normalized_score", norm, collector.env_steps)

        if logging:
            with isolated():
                logs.update(diagnostics(batch, value, greedy, ds.discrete, critics))
            env_steps = collector.env_steps if collector is not None else 0
            run.log(step, logs, show=["q_data", "cql_gap", "env_steps"], env_steps=env_steps,
                    online_share=rb.online_share(args.batch_size, args.online_ratio))
    if collector is not None:
        collector.close()
    run.finish(model_path)
