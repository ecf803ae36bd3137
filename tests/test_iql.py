"""IQL: the loss math on hand-computed cases, and smoke runs of the script on Box and Discrete data."""

import math
from pathlib import Path

import pytest
import torch

import iql
from tests.conftest import run_script


def test_expectile_loss_weights_positive_errors_by_tau():
    diff = torch.tensor([2.0, -1.0])
    # (0.7 * 2^2 + 0.3 * 1^2) / 2
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx(1.55)
    assert iql.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (4 + 1) / 2)  # tau = 0.5: half the MSE


def test_awr_weights_are_exp_beta_adv_clipped_at_max():
    w = iql.awr_weights(torch.tensor([0.0, 1.0, 10.0]), beta=3.0, max_weight=100.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(3.0), 100.0])


def _constant(net: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        list(net.parameters())[-1].fill_(value)  # the last bias
    return net


def _setup(discrete: bool, q_targets=(1.0, 3.0), v=0.0):
    args = iql.Args(learning_rate=0.0, total_steps=10)  # lr 0: the update computes losses but moves nothing
    obs_dim, act_dim, n = 3, 2, (4 if discrete else None)
    q1, q2 = (_constant(iql.QNetwork(obs_dim, act_dim, n, args), 0.0) for _ in range(2))
    q1_t, q2_t = (_constant(iql.QNetwork(obs_dim, act_dim, n, args), c) for c in q_targets)
    vf = _constant(iql.mlp(obs_dim, 1, [8]), v)
    actor = _constant(iql.make_actor(obs_dim, act_dim, n, args), 0.0)  # uniform categorical / N(0, 1)
    q_opt = torch.optim.Adam([*q1.parameters(), *q2.parameters()], lr=0.0)
    v_opt, actor_opt = torch.optim.Adam(vf.parameters(), lr=0.0), torch.optim.Adam(actor.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(actor_opt, lambda _: 1.0)
    actions = torch.tensor([1, 3]) if discrete else torch.zeros(2, act_dim)
    batch = (torch.zeros(2, obs_dim), actions, torch.tensor([1.0, 1.0]), torch.zeros(2, obs_dim),
             torch.tensor([0.0, 1.0]))
    return batch, (q1, q2, q1_t, q2_t, vf, actor, q_opt, v_opt, actor_opt, sched, args)


@pytest.mark.parametrize("discrete", [False, True])
def test_v_regresses_to_the_min_of_the_target_qs(discrete):
    batch, nets = _setup(discrete, q_targets=(1.0, 3.0), v=0.0)
    logs = iql.update(batch, *nets)
    assert logs["v_loss"].item() == pytest.approx(0.7 * 1.0**2)  # u = min(1, 3) - 0 = 1 > 0: weight tau
    assert logs["adv"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("discrete", [False, True])
def test_q_target_bootstraps_v_except_at_terminals(discrete):
    batch, nets = _setup(discrete, v=5.0)
    logs = iql.update(batch, *nets)
    # targets r + 0.99 * (1 - terminal) * V(s') = [1 + 4.95, 1]; both Qs output 0; loss = sum of the two MSEs
    assert logs["q_loss"].item() == pytest.approx(2 * (5.95**2 + 1.0) / 2, rel=1e-5)


def test_awr_actor_loss_is_the_weighted_negative_log_likelihood():
    batch, nets = _setup(True, q_targets=(2.0, 2.0), v=1.0)
    logs = iql.update(batch, *nets)
    # zero actor weights: uniform over 4 actions, log pi = -log 4; adv = 1 so weight exp(3)
    assert logs["actor_loss"].item() == pytest.approx(math.exp(3.0) * math.log(4.0), rel=1e-5)


def test_polyak_moves_targets_by_tau():
    batch, nets = _setup(False, q_targets=(1.0, 1.0))
    q1, q1_t = nets[0], nets[2]
    with torch.no_grad():
        list(q1.parameters())[-1].fill_(3.0)
    iql.update(batch, *nets)
    assert list(q1_t.parameters())[-1].item() == pytest.approx(1.0 + 0.005 * (3.0 - 1.0))


@pytest.mark.parametrize("dataset,extra", [("pendulum-medium", []), ("cartpole-medium", []),
                                           ("pendulum-medium", ["--deterministic-actor", "--normalize-obs"])])
def test_smoke_train_save_and_reload(tmp_path, dataset, extra):
    flags = ["--dataset", dataset, "--total-steps", "200", "--eval-every", "100", "--eval-episodes", "1",
             "--log-every", "100", "--batch-size", "64", "--save-model", "--checkpoint-every", "100",
             "--device", "cpu", *extra]
    out = run_script("iql.py", *flags, cwd=tmp_path)
    assert "step      200/200" in out and "eval return" in out
    saved = list((tmp_path / "runs").glob("*/iql.pt"))
    assert len(saved) == 1
    assert sorted(p.name for p in saved[0].parent.glob("iql_step*.pt")) == ["iql_step100.pt", "iql_step200.pt"]
    ckpt = torch.load(saved[0], weights_only=True)
    assert ckpt["args"]["dataset"] == dataset
    events = list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert events
    out = run_script("iql.py", "--dataset", dataset, "--load-model", str(saved[0]), "--eval-episodes", "2",
                     cwd=tmp_path)
    assert "normalized" in out and "over 2 episodes" in out


def test_tensorboard_has_the_contract_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script("iql.py", "--dataset", "cartpole-medium", "--total-steps", "100", "--eval-every", "100",
               "--eval-episodes", "1", "--log-every", "50", "--batch-size", "32", cwd=tmp_path)
    acc = EventAccumulator(str(next((tmp_path / "runs").iterdir()))).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("eval/return", "eval/normalized_score", "charts/SPS", "losses/q_loss", "losses/v_loss",
                "losses/actor_loss", "diagnostics/q_data", "diagnostics/q_pi_minus_q_data",
                "diagnostics/action_mismatch"):
        assert tag in tags, tag


def test_saved_policy_acts_and_has_a_density_in_environment_units(tmp_path):
    run_script("iql.py", "--dataset", "pendulum-medium", "--total-steps", "50", "--eval-episodes", "0",
               "--batch-size", "32", "--save-model", cwd=tmp_path)
    policy = iql.load_policy(str(next((tmp_path / "runs").glob("*/iql.pt"))))
    obs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    act = policy.act(obs)
    assert act.shape == (2, 1) and (act.abs() <= 2).all()  # Pendulum's box is [-2, 2]
    d = policy.dist(obs)
    torch.testing.assert_close(d.mean, act)  # the evaluation action is the Gaussian's mean
    # a density over [-2, 2]: the [-1, 1] Gaussian stretched by 2 has log-density lower by log 2
    grid = torch.linspace(-30, 30, 20001)[:, None]
    dens = policy.dist(obs[:1].expand(len(grid), 3)).log_prob(grid).exp()
    assert torch.trapezoid(dens, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-3)


def test_divergence_stops_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    import numpy as np

    import datasets as D

    ds = D.generate_builtin("cartpole-medium", 2000)
    ds.rewards = np.full_like(ds.rewards, 1e38)  # finite, so the data is valid, but every squared error overflows
    D.save_npz(ds, tmp_path / "huge.npz")
    proc = subprocess.run([sys.executable, str(Path(iql.__file__)), "--dataset", str(tmp_path / "huge.npz"),
                           "--total-steps", "20", "--log-every", "10", "--eval-episodes", "0", "--batch-size", "16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "training diverged" in proc.stderr
