"""cql.py: the conservative term against hand-computed values, --cql-alpha 0 as plain SAC / DQN, and end-to-end
runs (train, save, reload) on a Box and a Discrete dataset. The dataset cache comes from conftest.py."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import run_script

import cql


def test_discrete_cql_gap_is_logsumexp_minus_data_q():
    # row 1: log(e + e^2 + e^3) - 3 = 0.407606; row 2: log(3) - 0 = 1.098612; mean 0.753109
    q_all = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    actions = torch.tensor([2, 1])
    assert cql.cql_gap_discrete(q_all, actions).item() == pytest.approx(0.753109, abs=1e-5)


def test_box_gap_subtracts_log_densities_inside_the_logsumexp():
    # d = 2: the uniform density on [-1, 1]^2 is 1/4, log = 2 log(0.5) = -1.3863.
    # values Q - log mu = [0 + 1.3863, 1 + 0.5, 2 + 2] -> logsumexp = log(4 + e^1.5 + e^4) = 4.14440; minus Q_data 1
    q_prop = torch.tensor([[0.0, 1.0, 2.0]])
    log_density = torch.tensor([[2 * math.log(0.5), -0.5, -2.0]])
    assert log_density[0, 0].item() == pytest.approx(-1.3863, abs=1e-4)
    assert cql.cql_gap_box(q_prop, log_density, torch.tensor([1.0])).item() == pytest.approx(3.14440, abs=1e-4)


class StubActor(torch.nn.Module):
    """Always samples the action 0 with log pi = 0 (and a log-prob that would carry a gradient)."""

    act_dim = 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def sample(self, obs, n=None):
        shape = (obs.shape[0], n) if n is not None else (obs.shape[0],)
        return torch.zeros(*shape, self.act_dim), self.w * torch.zeros(shape)


def test_box_proposals_are_uniform_and_detached_policy_samples():
    obs, n = torch.zeros(5, 3), 10
    actions, log_density = cql.cql_proposals(obs, obs, StubActor(), n)
    assert actions.shape == (5, 3 * n, 2) and log_density.shape == (5, 3 * n)
    assert actions[:, :n].abs().max() <= 1.0 and actions[:, :n].abs().min() > 0  # uniform draws on [-1, 1]^2
    assert torch.allclose(log_density[:, :n], torch.full((5, n), -1.3863), atol=1e-4)
    assert not log_density.requires_grad  # sg(log pi): the conservative term never trains the actor
    # with a stub Q = 0 everywhere: logsumexp = log(N * 4 + 2N * 1) = log 60 = 4.0943; minus Q_data 0.5
    gap = cql.cql_gap_box(torch.zeros(5, 3 * n), log_density, torch.full((5,), 0.5))
    assert gap.item() == pytest.approx(math.log(60) - 0.5, abs=1e-5)


def test_tanh_gaussian_log_prob_matches_its_samples():
    torch.manual_seed(0)
    actor = cql.TanhGaussianActor(3, 2, cql.Args(hidden_dim=16, n_layers=2))
    obs = torch.randn(64, 3)
    a, logp = actor.sample(obs)
    assert a.abs().max() < 1.0
    assert torch.allclose(actor.log_prob(obs, a), logp, atol=1e-3)


def batch(n_obs: int, discrete: bool, n_actions: int = 3, act_dim: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(0)
    actions = (torch.randint(0, n_actions, (size,), generator=g) if discrete
               else torch.rand(size, act_dim, generator=g) * 2 - 1)
    return (torch.randn(size, n_obs, generator=g), actions, torch.randn(size, generator=g),
            torch.randn(size, n_obs, generator=g), (torch.rand(size, generator=g) < 0.2).float())


def sgd_step_delta(net: torch.nn.Module, before: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() - b for p, b in zip(net.parameters(), before)]


def test_box_cql_alpha_zero_is_the_plain_sac_critic_update():
    torch.manual_seed(0)
    args = cql.Args(cql_alpha=0.0, hidden_dim=16, n_layers=2, log_every=1)  # step 1 logs: the gap is measured
    q1, q2 = cql.QNetwork(3, 2, args), cql.QNetwork(3, 2, args)
    q1_t, q2_t, actor = copy.deepcopy(q1), copy.deepcopy(q2), cql.TanhGaussianActor(3, 2, args)
    ref_q1, ref_q2, ref_actor = copy.deepcopy(q1), copy.deepcopy(q2), copy.deepcopy(actor)
    ref_q1_t, ref_q2_t = copy.deepcopy(q1_t), copy.deepcopy(q2_t)  # the update moves its targets by Polyak
    log_alpha, log_alpha_prime = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    b = batch(3, discrete=False)
    before = [p.detach().clone() for p in list(q1.parameters()) + list(q2.parameters())]
    q_opt = torch.optim.SGD(list(q1.parameters()) + list(q2.parameters()), lr=1.0)  # delta = -gradient
    torch.manual_seed(1)
    logs = cql.update_box(b, 1, q1, q2, q1_t, q2_t, actor, log_alpha, log_alpha_prime, q_opt,
                          torch.optim.Adam(actor.parameters()), torch.optim.Adam([log_alpha]),
                          torch.optim.Adam([log_alpha_prime]), args)

    # the same random draws in the same order: a ~ pi(s) for the actor, then a' ~ pi(s') for the TD target
    obs, actions, rewards, next_obs, terminals = b
    torch.manual_seed(1)
    ref_actor.sample(obs)
    a_next, _ = ref_actor.sample(next_obs)
    with torch.no_grad():
        y = rewards + 0.99 * (1 - terminals) * torch.min(ref_q1_t(next_obs, a_next), ref_q2_t(next_obs, a_next))
    td = F.mse_loss(ref_q1(obs, actions), y) + F.mse_loss(ref_q2(obs, actions), y)
    td.backward()
    assert logs["q_loss"].item() == td.item() and logs["cql_gap"].item() > 0
    delta = sgd_step_delta(q1, before[:len(before) // 2]) + sgd_step_delta(q2, before[len(before) // 2:])
    grads = [p.grad for p in list(ref_q1.parameters()) + list(ref_q2.parameters())]
    assert all(torch.allclose(d, -g, atol=1e-6) for d, g in zip(delta, grads))
    # between logging steps alpha 0 skips the conservative term altogether (SAC's cost, not CQL's)
    args.log_every = 1000
    logs = cql.update_box(b, 2, q1, q2, q1_t, q2_t, actor, log_alpha, log_alpha_prime, q_opt,
                          torch.optim.Adam(actor.parameters()), torch.optim.Adam([log_alpha]),
                          torch.optim.Adam([log_alpha_prime]), args)
    assert "cql_gap" not in logs and logs["cql_loss"].item() == 0.0


def test_discrete_cql_alpha_zero_is_the_plain_double_dqn_update():
    torch.manual_seed(0)
    args = cql.Args(cql_alpha=0.0, hidden_dim=16, n_layers=2)
    qnet = cql.DiscreteQNetwork(4, 3, args)
    qnet_t = cql.DiscreteQNetwork(4, 3, args)  # a different target, so double DQN differs from plain DQN
    ref, ref_t = copy.deepcopy(qnet), copy.deepcopy(qnet_t)  # the update moves its target by Polyak
    b = batch(4, discrete=True)
    before = [p.detach().clone() for p in qnet.parameters()]
    logs = cql.update_discrete(b, 1, qnet, qnet_t, torch.optim.SGD(qnet.parameters(), lr=1.0), args)

    obs, actions, rewards, next_obs, terminals = b
    with torch.no_grad():
        y = rewards + 0.99 * (1 - terminals) * ref_t(next_obs).gather(1, ref(next_obs).argmax(1, True)).squeeze(1)
    td = F.smooth_l1_loss(ref(obs).gather(1, actions[:, None]).squeeze(1), y)
    td.backward()
    assert logs["q_loss"].item() == td.item() and logs["cql_gap"].item() > 0
    assert all(torch.allclose(d, -p.grad, atol=1e-6) for d, p in zip(sgd_step_delta(qnet, before), ref.parameters()))


def test_discrete_cql_term_lowers_unseen_actions_and_raises_the_data_action():
    args = cql.Args(cql_alpha=1.0, hidden_dim=16, n_layers=2)
    torch.manual_seed(0)
    qnet = cql.DiscreteQNetwork(4, 3, args)
    obs, actions = torch.randn(32, 4), torch.zeros(32, dtype=torch.long)
    before = qnet(obs).detach()
    opt = torch.optim.SGD(qnet.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        cql.cql_gap_discrete(qnet(obs), actions).backward()
        opt.step()
    after = qnet(obs).detach()
    assert (after[:, 0] - before[:, 0]).mean() > 0 and (after[:, 1:] - before[:, 1:]).mean() < 0


@pytest.mark.parametrize("dataset, discrete", [("pendulum-medium", False), ("cartpole-medium", True)])
def test_train_save_and_reload(tmp_path: Path, dataset: str, discrete: bool):
    # small networks and batches keep the Box run (3N = 30 extra actions per state) fast on a CPU
    out = run_script("cql.py", "--dataset", dataset, "--total-steps", "200", "--eval-every", "100",
                     "--eval-episodes", "1", "--log-every", "100", "--save-model", "--device", "cpu",
                     "--batch-size", "32", "--hidden-dim", "64", cwd=tmp_path)
    assert "eval return" in out and "nan" not in out
    (path,) = tmp_path.glob("runs/*/cql.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["args"]["cql_alpha"] == (1.0 if discrete else 5.0)  # the default follows the action space
    policy = cql.load_policy(str(path))
    obs = torch.zeros(4, ckpt["obs_dim"])
    if discrete:
        assert policy.act(obs).dtype == torch.long and policy.dist is None  # greedy: no density
    else:  # Pendulum: actions in [-2, 2]; the density is the tanh-Gaussian stretched to that box
        a = policy.act(obs)
        assert a.shape == (4, ckpt["act_dim"]) and (a.abs() <= 2).all()
        assert torch.isfinite(policy.dist(obs).log_prob(a.clamp(-1.99, 1.99))).all()
        grid = torch.linspace(-2 + 1e-4, 2 - 1e-4, 40001)[:, None]
        dens = policy.dist(obs[:1].expand(len(grid), -1)).log_prob(grid).exp()
        assert torch.trapezoid(dens, grid[:, 0]).item() == pytest.approx(1.0, abs=0.02)
    out = run_script("cql.py", "--dataset", dataset, "--load-model", str(path), "--eval-episodes", "1",
                     "--device", "cpu", cwd=tmp_path)
    assert "normalized" in out
