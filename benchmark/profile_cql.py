"""Where a Box CQL step spends its time: torch.profiler over eager update_box steps on LunarLander-sized data (8-dim
observations, 2-dim actions, batch 256, twin 3x256 critics, 10 actions per proposal), one CPU thread.

    python benchmark/profile_cql.py            # about a minute; prints the top operators and the phase shares

The phases are timed separately by running the same pieces the update runs (no change to cql.py): the critics on
the 3N proposals and on the data actions (forward and backward), the TD part, the actor's loss; each is a share of
one full step (they overlap a little: both the first two score the data actions).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cql  # noqa: E402


def main(steps: int = 30, obs_dim: int = 8, act_dim: int = 2, batch: int = 256) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = cql.Args(cql_alpha=5.0, total_steps=10**6)
    critics = cql.QEnsemble(obs_dim, act_dim, args)
    critics_target = cql.QEnsemble(obs_dim, act_dim, args)
    actor = cql.TanhGaussianActor(obs_dim, act_dim, args)
    log_alpha, log_alpha_prime = (torch.zeros((), requires_grad=True) for _ in range(2))
    opts = dict(q_opt=torch.optim.Adam(critics.parameters(), 3e-4),
                actor_opt=torch.optim.Adam(actor.parameters(), 1e-4), alpha_opt=torch.optim.Adam([log_alpha], 1e-4),
                alpha_prime_opt=torch.optim.Adam([log_alpha_prime], 3e-4))
    nets = dict(critics=critics, critics_target=critics_target, actor=actor, log_alpha=log_alpha,
                log_alpha_prime=log_alpha_prime, **opts, args=args)
    data = (torch.randn(batch, obs_dim), torch.rand(batch, act_dim) * 2 - 1, torch.randn(batch),
            torch.randn(batch, obs_dim), torch.zeros(batch))
    for step in range(1, 4):  # warm-up
        cql.update_box(data, step, logging=False, **nets)
    t0 = time.perf_counter()
    for step in range(4, 4 + steps):
        cql.update_box(data, step, logging=False, **nets)
    full = (time.perf_counter() - t0) / steps

    # the phases, each timed alone on the same networks
    obs, actions = data[0], data[1]

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t) / steps

    def proposals() -> None:
        a, logd = cql.cql_proposals(obs, data[3], actor, args.cql_n_actions)
        gaps = cql.cql_gap_box(critics(obs, a), logd, critics(obs, actions))
        gaps.sum().backward()

    def td() -> None:
        with torch.no_grad():
            a_next, _ = actor.sample(data[3])
            target = data[2] + 0.99 * cql.pessimistic(critics_target(data[3], a_next), 0.0)
        ((critics(obs, actions) - target) ** 2).mean(1).sum().backward()

    def actor_part() -> None:
        a_pi, logp = actor.sample(obs)
        (logp.mean() - cql.pessimistic(critics(obs, a_pi), 0.0).mean()).backward()

    phases = dict(proposals=timed(proposals), td=timed(td), actor=timed(actor_part))
    print(f"update_box: {1000 * full:.1f} ms per step ({1 / full:.1f} steps/s, one thread)")
    for k, v in phases.items():
        print(f"  {k:10s} {1000 * v:6.1f} ms  ({100 * v / full:4.1f}% of a step)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for step in range(4, 9):
            cql.update_box(data, step, logging=False, **nets)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
