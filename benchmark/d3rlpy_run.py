"""Train d3rlpy's IQL / CQL / BCQ on one of our datasets with our settings, for the side-by-side benchmark.

Runs in its own virtual environment (d3rlpy pins its own gymnasium; see benchmark/requirements-d3rlpy.txt):

    .venv-d3rlpy/bin/python benchmark/d3rlpy_run.py --algo cql --dataset lunarlander-medium --total-steps 5000

What is matched to our scripts (each value is our script's default for that action space):
- the data: our arrays, converted to a d3rlpy MDPDataset (episodes split at terminals and timeouts), Box
  actions min-max scaled to [-1, 1] with the environment's bounds (as our ReplayBuffer does); d3rlpy takes s'
  from the next row, so it drops the last transition of each time-limited episode (0.5% of Pendulum's data);
- gradient steps, batch size, learning rates, discount, Polyak tau, network widths and depths, the algorithm
  constants (expectile, beta / weight_temp, CQL weight, sampled actions, BCQ phi / lambda / threshold);
- evaluation: `common.evaluate` on the same episodes as our scripts (episode i seeded seed + 100 + i), d3rlpy's
  greedy `predict` (our scripts also evaluate the deterministic action), logged under the same TensorBoard tags
  (`eval/normalized_score`, `eval/return`, `charts/SPS`) so `benchmark/aggregate.py` reads both, and the same
  console lines and run folder (`common.Run`; `eval/q_start` is NaN: d3rlpy's Q is not read);
- CPU arithmetic: d3rlpy's update is wrapped in `common.speed_up`, as our scripts' is (the same maths;
  long runs would otherwise slow down as Adam's moments decay into subnormal floats: docs/benchmark.md).

What d3rlpy cannot match, and what it is set to instead:
- discrete IQL: d3rlpy has none (`--algo iql` on a Discrete dataset exits with a message);
- discrete CQL / BCQ target network: d3rlpy copies it every `target_update_interval` steps, our scripts use
  Polyak averaging with tau 0.005; the interval is set to 1 / tau = 200 steps, the same time scale;
- CQL's conservative weight: d3rlpy multiplies `conservative_weight * (gap - threshold)` by a learned alpha;
  `alpha_learning_rate=0` with `initial_alpha=1` leaves the fixed weight 5.0 of our default (non-Lagrangian);
- steps/second: timed between evaluations with evaluation time left out, as our scripts do; d3rlpy's own
  sampler and logging are part of its speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import d3rlpy  # noqa: E402
import torch  # noqa: E402
from d3rlpy.models.encoders import VectorEncoderFactory  # noqa: E402
from d3rlpy.optimizers import AdamFactory  # noqa: E402
from d3rlpy.optimizers.lr_schedulers import CosineAnnealingLRFactory  # noqa: E402

from common import Run, evaluate, speed_up  # noqa: E402
from datasets import UserError, action_bounds, dataset_dims, load_dataset  # noqa: E402


NOT_AVAILABLE = 3  # exit status for "d3rlpy has no such algorithm for this action space" (run.py reports n/a)


def enc(*hidden: int) -> VectorEncoderFactory:
    return VectorEncoderFactory(hidden_units=list(hidden))


def make_algo(algo: str, discrete: bool, total_steps: int, action_scaler, compile_graph: bool = False,
              reward_scaler=None):
    """The d3rlpy algorithm configured with our scripts' defaults (iql.py, cql.py, bcq.py); `compile_graph`: d3rlpy's
    torch.compile + CUDA-graph option (2.7+); `reward_scaler`: IQL's (iql.py --reward-scaling)."""
    extra = dict(compile_graph=True) if compile_graph else {}
    if algo == "iql":
        if discrete:
            print("d3rlpy has no discrete IQL; nothing to compare iql.py's discrete variant with")
            raise SystemExit(NOT_AVAILABLE)
        # iql.py: 2x256 networks, lr 3e-4 everywhere, cosine-decayed actor lr, expectile 0.7, beta 3, max weight 100
        return d3rlpy.algos.IQLConfig(**extra,
            actor_learning_rate=3e-4, critic_learning_rate=3e-4, batch_size=256, gamma=0.99, tau=0.005,
            expectile=0.7, weight_temp=3.0, max_weight=100.0, n_critics=2,
            actor_encoder_factory=enc(256, 256), critic_encoder_factory=enc(256, 256),
            value_encoder_factory=enc(256, 256),
            actor_optim_factory=AdamFactory(lr_scheduler_factory=CosineAnnealingLRFactory(T_max=total_steps)),
            action_scaler=action_scaler, reward_scaler=reward_scaler)
    if algo == "cql":
        if discrete:  # cql.py discrete: 3x256 Q network, lr 3e-4, batch 256, alpha 1.0
            return d3rlpy.algos.DiscreteCQLConfig(**extra,
                learning_rate=3e-4, batch_size=256, gamma=0.99, n_critics=1, alpha=1.0,
                target_update_interval=200, encoder_factory=enc(256, 256, 256))
        # cql.py Box: 3x256 actor and critics, actor lr 1e-4, critic lr 3e-4, entropy lr 1e-4, weight 5, 10 actions
        return d3rlpy.algos.CQLConfig(**extra,
            actor_learning_rate=1e-4, critic_learning_rate=3e-4, temp_learning_rate=1e-4, alpha_learning_rate=0.0,
            initial_alpha=1.0, conservative_weight=5.0, n_action_samples=10, batch_size=256, gamma=0.99, tau=0.005,
            n_critics=2, soft_q_backup=False, max_q_backup=False,
            actor_encoder_factory=enc(256, 256, 256), critic_encoder_factory=enc(256, 256, 256),
            action_scaler=action_scaler)
    if algo == "bcq":
        if discrete:  # bcq.py discrete: separate 2x256 Q and imitation networks, lr 3e-4, batch 64, threshold 0.3
            return d3rlpy.algos.DiscreteBCQConfig(**extra,
                learning_rate=3e-4, batch_size=64, gamma=0.99, n_critics=1, action_flexibility=0.3, beta=1e-2,
                target_update_interval=200, share_encoder=False, encoder_factory=enc(256, 256))
        # bcq.py Box: actor / critics 400-300, VAE 750-750, lr 1e-3, batch 100, phi 0.05, lambda 0.75, 10 samples
        return d3rlpy.algos.BCQConfig(**extra,
            actor_learning_rate=1e-3, critic_learning_rate=1e-3, imitator_learning_rate=1e-3, batch_size=100,
            gamma=0.99, tau=0.005, n_critics=2, lam=0.75, n_action_samples=10, action_flexibility=0.05, beta=0.5,
            actor_encoder_factory=enc(400, 300), critic_encoder_factory=enc(400, 300),
            imitator_encoder_factory=enc(750, 750), action_scaler=action_scaler)
    raise SystemExit(f"unknown --algo {algo!r}: choose iql, cql or bcq")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=["iql", "cql", "bcq"], required=True)
    p.add_argument("--dataset", required=True, help="a built-in name or an .npz path (as in our scripts)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-steps", type=int, default=5000, help="gradient steps")
    p.add_argument("--eval-every", type=int, default=1000, help="evaluate every this many gradient steps")
    p.add_argument("--eval-episodes", type=int, default=10, help="0: no evaluation (speed runs)")
    p.add_argument("--exp-name", default=None, help="default: d3rlpy_{algo}; the run folder is "
                   "runs/{dataset}__{exp_name}__{seed}__{time}, as our scripts write")
    p.add_argument("--device", default="cpu:0", help="d3rlpy's device string, e.g. cuda:0")
    p.add_argument("--compile-graph", action="store_true", help="d3rlpy's compile_graph=True (CUDA only)")
    p.add_argument("--reward-scaling", choices=["none", "return-range"], default="none",
                   help="IQL: as iql.py's flag; return-range is d3rlpy's ReturnBasedRewardScaler(multiplier=1000), "
                        "r * 1000 / (max - min episode return), the authors' locomotion setting")
    a = p.parse_args()
    try:
        train(a)
    except UserError as e:
        raise SystemExit(f"d3rlpy_run.py: {e}") from None


def train(a: argparse.Namespace) -> None:
    if a.reward_scaling == "return-range" and a.algo != "iql":  # before loading the data
        raise UserError("--reward-scaling applies to --algo iql (as in our scripts)")
    if a.eval_every <= 0:
        raise UserError("--eval-every must be above 0")
    # d3rlpy runs whole epochs: one between two evaluations, so the steps must fit them exactly
    if a.total_steps % a.eval_every != 0:
        raise UserError(f"--total-steps {a.total_steps} is not a multiple of --eval-every {a.eval_every}: d3rlpy "
                        "trains in whole epochs between evaluations; pick multiples")

    ds = load_dataset(a.dataset)
    _, _, n_actions = dataset_dims(ds)
    d3rlpy.seed(a.seed)
    torch.manual_seed(a.seed)
    timeouts = ds.timeouts.copy()
    timeouts[-1] |= not ds.terminals[-1]  # close the last episode so d3rlpy keeps it
    if ds.discrete:
        data = d3rlpy.dataset.MDPDataset(ds.observations, ds.actions.reshape(-1, 1), ds.rewards, ds.terminals,
                                         timeouts, action_space=d3rlpy.ActionSpace.DISCRETE, action_size=n_actions)
        scaler = None
    else:
        data = d3rlpy.dataset.MDPDataset(ds.observations, ds.actions, ds.rewards, ds.terminals, timeouts,
                                         action_space=d3rlpy.ActionSpace.CONTINUOUS)
        low, high = action_bounds(ds)
        scaler = d3rlpy.preprocessing.MinMaxActionScaler(minimum=low.astype(np.float32),
                                                         maximum=high.astype(np.float32))
    reward_scaler = (d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0)
                     if a.reward_scaling == "return-range" else None)
    algo = make_algo(a.algo, ds.discrete, a.total_steps, scaler, a.compile_graph,
                     reward_scaler).create(device=a.device)
    algo.build_with_dataset(data)
    algo.update = speed_up(algo.update)  # as in our scripts: CPU speed only, the same maths

    # our scripts' run folder, TensorBoard log and console lines (common.Run reads the flags as a dataclass)
    a.exp_name = a.exp_name or f"d3rlpy_{a.algo}"
    run = Run(dataclasses.make_dataclass("Flags", list(vars(a)))(**vars(a)), "d3rlpy_run.py", a.total_steps)
    run.writer.add_text("d3rlpy_config", f"```\n{algo.config}\n```")
    print(f"d3rlpy_run.py: d3rlpy {d3rlpy.__version__}, {type(algo).__name__}", flush=True)

    def policy(obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(algo.predict(obs.cpu().numpy()))

    def on_epoch(algo_, epoch_: int, step: int) -> None:  # called by d3rlpy after every --eval-every steps
        if a.eval_episodes > 0:
            # the episodes our scripts evaluate on: episode i is seeded seed + 100 + i (see their --seed)
            t0 = time.time()
            ev = evaluate(ds, policy, a.eval_episodes, a.seed + 100, torch.device("cpu"))
            if not math.isfinite(ev.returns.mean()):
                raise FloatingPointError(f"non-finite evaluation return at step {step}")
            run.evaluation(ds, step, ev, float("nan"), time.time() - t0)  # q_start: d3rlpy's Q is not read
        run.log(step, {})
        run.writer.flush()

    algo.fit(data, n_steps=a.total_steps, n_steps_per_epoch=a.eval_every, experiment_name=run.name,
             with_timestamp=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory(), show_progress=False,
             save_interval=10**9, epoch_callback=on_epoch)
    run.finish("not saved (d3rlpy_run.py keeps no policy)")  # printed as "model not saved (...)"


if __name__ == "__main__":
    main()
