# Offline-to-online fine-tuning with IQL (Kostrikov, Nair, Levine 2021, Sec. 5.3; the authors' train_finetune.py).
# Docs: docs/finetune.md. IQL's networks and update come from iql.py unchanged: pre-training for --total-steps on the
# dataset, then --online-steps environment steps with a sample of the policy, each followed by --utd updates on the
# dataset plus everything collected so far.
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import tyro

import iql
from common import Run, evaluate, isolated, mlp, setup, speed_up
from datasets import UserError
from iql import CategoricalActor, QEnsemble, diagnostics, make_actor, pessimistic, update
from online import OnlineCollector, OnlineReplayBuffer


@dataclass
class Args(iql.Args):
    exp_name: str = "iql_finetune"
    """the name of this experiment (part of the run folder's name)"""
    total_steps: int = 1_000_000
    """offline pre-training: gradient steps on the dataset before the online phase (0: start online at once)"""
    cosine_lr: bool = False
    """cosine decay of the actor's rate over all updates (off: the authors' fine-tuning keeps it constant)"""
    online_steps: int = 1_000_000
    """environment steps after pre-training, each followed by --utd gradient steps"""
    utd: int = 1
    """gradient steps per environment step (the update-to-data ratio)"""
    online_ratio: float = 0.0
    """share of each batch drawn from the online data, the rest from the dataset (0: uniform over all rows)"""


RANGES = {**iql.RANGES, "total_steps": "[0, inf)", "online_steps": "[1, inf)", "utd": "[1, inf)",
          "online_ratio": "[0, 1]"}


def explore(actor: torch.nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """The action that collects data, a sample of pi(.|s): the Gaussian clipped to [-1, 1] (the authors' fine-tuning
    clips sampled actions) or the categorical."""
    if isinstance(actor, CategoricalActor):
        return torch.distributions.Categorical(logits=actor.net(obs)).sample()
    return actor.dist(obs).sample().clamp(-1.0, 1.0)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device, ds = setup(args, "iql_finetune.py", RANGES, iql.load_policy, iql.DEFAULT_DATASET)
    if args.deterministic_actor:
        raise UserError("iql_finetune.py collects data with a sample of the policy: the Gaussian actor (drop "
                        "--deterministic-actor)")
    if args.reward_scaling == "auto":
        args.reward_scaling = iql.authors_reward_scaling(args.dataset)
        print(f"iql_finetune.py: --reward-scaling auto -> {args.reward_scaling} (the authors' rule)", flush=True)
    rb = OnlineReplayBuffer(ds, device, args.normalize_obs, *iql.reward_transform(ds, args.reward_scaling),
                            capacity=args.online_steps)
    n_updates = args.total_steps + args.online_steps * args.utd
    run = Run(args, "iql_finetune.py", n_updates)

    # ALGO LOGIC: networks and optimisers, as iql.py builds them
    critics = QEnsemble(rb.obs_dim, rb.act_dim, rb.n_actions, args).to(device)
    critics_target = QEnsemble(rb.obs_dim, rb.act_dim, rb.n_actions, args).to(device)
    critics_target.load_state_dict(critics.state_dict())
    vf = mlp(rb.obs_dim, 1, [args.hidden_dim] * args.n_layers).to(device)
    actor = make_actor(rb.obs_dim, rb.act_dim, rb.n_actions, args).to(device)
    q_opt = torch.optim.Adam(critics.parameters(), lr=args.learning_rate)
    v_opt = torch.optim.Adam(vf.parameters(), lr=args.learning_rate)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    actor_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(actor_opt, n_updates) if args.cosine_lr
                   else torch.optim.lr_scheduler.LambdaLR(actor_opt, lambda _: 1.0))
    update = speed_up(update, args.compile)

    def policy(obs: torch.Tensor) -> torch.Tensor:
        return actor.act(obs) if ds.discrete else rb.unscale_action(actor.act(obs))

    def save_model(path: str) -> str:
        """iql.py's checkpoint (its load_policy, --load-model and ope.py read it), with this run's flags."""
        extra = {} if ds.discrete else dict(action_center=rb.action_center, action_half=rb.action_half)
        torch.save(dict(algo="iql", args=asdict(args), actor=actor.state_dict(), critics=critics.state_dict(),
                        vf=vf.state_dict(), obs_mean=rb.obs_mean, obs_std=rb.obs_std, obs_dim=rb.obs_dim,
                        act_dim=rb.act_dim, n_actions=rb.n_actions, **extra), path)
        print(f"saved {path}", flush=True)
        return path

    # TRY NOT TO MODIFY: the loop. Steps 1..total_steps train on the dataset; then every --utd steps one environment
    # step with a sample of the policy goes into the buffer first. Evaluated also at the switch.
    collector, model_path = OnlineCollector(ds, rb, args.seed), None
    for step in range(1, n_updates + 1):
        if step > args.total_steps and (step - args.total_steps - 1) % args.utd == 0:
            episode = collector.step(partial(explore, actor), actor)
            if episode is not None:
                run.writer.add_scalar("charts/episodic_return", episode[0], collector.env_steps)
                run.writer.add_scalar("charts/episodic_length", episode[1], collector.env_steps)
        batch = rb.sample(args.batch_size, args.online_ratio)
        logs = update(batch, critics=critics, critics_target=critics_target, vf=vf, actor=actor, q_opt=q_opt,
                      v_opt=v_opt, actor_opt=actor_opt, actor_sched=actor_sched, args=args)

        if args.save_model and args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_model(f"runs/{run.name}/iql_step{step}.pt")
        if args.save_model and step == n_updates:
            model_path = save_model(f"runs/{run.name}/iql.pt")

        evaluated = args.eval_episodes > 0 and (step % args.eval_every == 0 or step in (args.total_steps, n_updates))
        if evaluated:
            t0 = time.time()
            with isolated(actor):
                ev = evaluate(ds, policy, args.eval_episodes, args.seed + 100, device, rb.normalize, args.discount,
                              reward_transform=(rb.reward_scale, rb.reward_bias))
                s0 = rb.normalize(ev.start_obs)
                q_start = pessimistic(critics(s0, actor.act(s0)), args.q_lcb).mean().item()
            norm = run.evaluation(ds, step, ev, q_start, time.time() - t0)
            if step >= args.total_steps:  # the online phase's scores also against environment steps
                run.writer.add_scalar("online/return", ev.returns.mean(), collector.env_steps)
                run.writer.add_scalar("online/normalized_score", norm, collector.env_steps)

        if step % args.log_every == 0 or step == n_updates or evaluated:  # the only host syncs
            with isolated(actor):
                logs.update(diagnostics(batch, critics, actor, args, ds.discrete))
            run.log(step, logs, show=["q_data", "env_steps"], actor_lr=actor_sched.get_last_lr()[0],
                    env_steps=collector.env_steps, online_share=rb.online_share(args.batch_size, args.online_ratio))
    collector.close()
    run.finish(model_path)
