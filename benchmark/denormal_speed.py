"""How much subnormal floats slow a long Box BCQ run on CPU, and what flushing them to zero gives back (what
`common.speed_up` does around every script's update).

Adam keeps running moments of each weight's gradient. Where the gradient stays zero (a ReLU unit that no longer
fires) they shrink by 0.9 and 0.999 a step until they fall below float32's smallest normal number, 1.2e-38; x86
CPUs compute on such subnormal ("denormal") numbers many times slower. This loads the training state a long run
saved, counts its subnormal values, and times the same updates with `torch.set_flush_denormal` off and on,
alternately, each round from the saved state:

    python benchmark/denormal_speed.py benchmark/results/mujoco/runs/hopper-medium__bcq-mujoco__1__*/resume.pt

The state is a `resume.pt` that bcq.py wrote with `--resume-every N` before the resume feature was dropped (the
networks and Adam's moments: a `--save-model` file holds no optimiser state, so it cannot show the slowdown); its
flags that today's bcq.py no longer has (--resume-every, --resume) are left out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bcq  # noqa: E402
from common import ReplayBuffer  # noqa: E402
from datasets import dataset_dims, load_dataset  # noqa: E402


def subnormal_share(state) -> tuple[int, int]:
    """(subnormal, all) float values in a nested state dict."""
    if isinstance(state, torch.Tensor):
        if not state.is_floating_point():
            return 0, 0
        return int(((state != 0) & (state.abs() < torch.finfo(state.dtype).tiny)).sum()), state.numel()
    parts = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    counts = [subnormal_share(p) for p in parts]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def steps_per_second(saved: dict, args: bcq.Args, rb: ReplayBuffer, dims: tuple[int, int], steps: int) -> float:
    """Rebuild the agent and optimisers as bcq.py does, load the saved state, time `steps` updates."""
    agent = bcq.BoxBCQ(*dims, args)
    actor_target, critic_target = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    vae_opt, critic_opt, actor_opt = (torch.optim.Adam(m.parameters(), lr=args.learning_rate)
                                      for m in (agent.vae, agent.critic, agent.actor))
    trained = dict(agent=agent, actor_target=actor_target, critic_target=critic_target, vae_opt=vae_opt,
                   critic_opt=critic_opt, actor_opt=actor_opt)
    for k, v in trained.items():  # a copy: Adam would update the saved moments in place (and flush them to zero)
        v.load_state_dict(copy.deepcopy(saved[k]))
    update = partial(bcq.update_box, agent=agent, actor_target=actor_target, critic_target=critic_target,
                     vae_opt=vae_opt, critic_opt=critic_opt, actor_opt=actor_opt, args=args)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        update(rb.sample(args.batch_size), step)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("resume", help="a Box bcq.py run's runs/<run>/resume.pt (written by an earlier version)")
    p.add_argument("--steps", type=int, default=200, help="updates timed per round and setting")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    state = torch.load(a.resume, map_location="cpu", weights_only=True)
    if state.get("script") != "bcq.py" or "vae_opt" not in state["trained"]:
        raise SystemExit(f"{a.resume}: not the resume.pt of a Box bcq.py run")
    known = {f.name for f in dataclasses.fields(bcq.Args)}
    args = bcq.Args(**{k: v for k, v in state["args"].items() if k in known})
    ds = load_dataset(args.dataset)
    rb = ReplayBuffer(ds, torch.device("cpu"), args.normalize_obs)
    dims = dataset_dims(ds)[:2]
    sub, total = subnormal_share(state["trained"])
    print(f"{args.dataset} at step {state['step']}: {sub:,} of {total:,} saved floats are subnormal "
          f"({sub / total:.1%})", flush=True)
    sps = {False: [], True: []}
    for r in range(a.rounds):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            sps[flush].append(steps_per_second(state["trained"], args, rb, dims, a.steps))
            print(f"round {r + 1}: flush_denormal={flush}: {sps[flush][-1]:.1f} steps/s", flush=True)
    off, on = (statistics.median(sps[f]) for f in (False, True))
    print(f"median over {a.rounds} rounds of {a.steps} updates: {off:.1f} steps/s as saved, {on:.1f} with "
          f"subnormals flushed to zero ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
