"""cql.py: known answers for the ALGO LOGIC (networks with set weights, log-densities against torch's own
tanh-transformed Normal, the conservative term, proposals replayed from a seed, one plain-SGD step of each update
against the equations written out from the reference card or by hand), and end-to-end runs (train, save, reload)
on a Box and a Discrete dataset (slow). The dataset cache comes from conftest.py."""

import copy
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import ROOT, Member, run_script

import cql


class SGD:
    """Plain SGD, p <- p - lr * p.grad (params whose grad is None are skipped), with the optimiser interface the
    updates call. The same arithmetic as torch.optim.SGD without momentum, written out so each parameter change is
    exactly -lr * gradient, and without torch.optim's first-use import of torch._dynamo (seconds per test process)."""

    def __init__(self, params, lr: float):
        self.params, self.lr = list(params), lr

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p -= self.lr * p.grad


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
    critics = cql.QEnsemble(3, 2, args)
    critics_t, actor = copy.deepcopy(critics), cql.TanhGaussianActor(3, 2, args)
    (ref_q1, ref_q2), ref_actor = separate(critics), copy.deepcopy(actor)
    ref_q1_t, ref_q2_t = separate(critics_t)  # copies: the update moves its targets by Polyak
    log_alpha, log_alpha_prime = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    b = batch(3, discrete=False)
    before = copy.deepcopy(critics)
    q_opt = SGD(critics.parameters(), lr=1.0)  # delta = -gradient
    torch.manual_seed(1)
    logs = cql.update_box(b, 1, logged(1, args), critics=critics, critics_target=critics_t, actor=actor,
                          log_alpha=log_alpha,
                          log_alpha_prime=log_alpha_prime, q_opt=q_opt,
                          actor_opt=SGD(actor.parameters(), lr=0.01),
                          alpha_opt=SGD([log_alpha], lr=0.01),
                          alpha_prime_opt=SGD([log_alpha_prime], lr=0.01), args=args)

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
    delta = [p - q for i in range(2) for p, q in zip(member_params(critics, i), member_params(before, i))]
    grads = [p.grad for p in list(ref_q1.parameters()) + list(ref_q2.parameters())]
    assert len(delta) == len(grads) == 12 and all(torch.allclose(d, -g, atol=1e-6) for d, g in zip(delta, grads))
    # between logging steps alpha 0 skips the conservative term altogether (SAC's cost, not CQL's)
    args.log_every = 1000
    logs = cql.update_box(b, 2, logged(2, args), critics=critics, critics_target=critics_t, actor=actor,
                          log_alpha=log_alpha,
                          log_alpha_prime=log_alpha_prime, q_opt=q_opt,
                          actor_opt=SGD(actor.parameters(), lr=0.01),
                          alpha_opt=SGD([log_alpha], lr=0.01),
                          alpha_prime_opt=SGD([log_alpha_prime], lr=0.01), args=args)
    assert "cql_gap" not in logs and logs["cql_loss"].item() == 0.0


def test_discrete_cql_alpha_zero_is_the_plain_double_dqn_update():
    torch.manual_seed(0)
    args = cql.Args(cql_alpha=0.0, hidden_dim=16, n_layers=2)
    qnet = cql.DiscreteQNetwork(4, 3, args)
    qnet_t = cql.DiscreteQNetwork(4, 3, args)  # a different target, so double DQN differs from plain DQN
    ref, ref_t = copy.deepcopy(qnet), copy.deepcopy(qnet_t)  # the update moves its target by Polyak
    b = batch(4, discrete=True)
    before = [p.detach().clone() for p in qnet.parameters()]
    logs = cql.update_discrete(b, 1, True, qnet=qnet, qnet_target=qnet_t, q_opt=SGD(qnet.parameters(), lr=1.0),
                               args=args)

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
    opt = SGD(qnet.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        cql.cql_gap_discrete(qnet(obs), actions).backward()
        opt.step()
    after = qnet(obs).detach()
    assert (after[:, 0] - before[:, 0]).mean() > 0 and (after[:, 1:] - before[:, 1:]).mean() < 0


# ----------------------------------------------------------------------------------------------------------------
# Networks. With n_layers=0 every mlp is one nn.Linear, so each output is a hand computation from set weights.
def logged(step: int, args: cql.Args) -> bool:
    """Whether cql.py's loop logs `step` (and so tells update_box to measure the gap with --cql-alpha 0)."""
    return step % args.log_every == 0 or step == args.total_steps


def linear_args(**overrides) -> cql.Args:
    return cql.Args(hidden_dim=4, n_layers=0, **overrides)


def set_linear(net, weight, bias):
    """Set the only nn.Linear of `net`, or a QEnsemble's Member (views into the stacked parameters)."""
    (layer,) = [net] if isinstance(net, Member) else [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
    return net


def linear_ensemble(obs_dim: int, act_dim: int, members: list, **overrides) -> cql.QEnsemble:
    """A QEnsemble of one-Linear members Q_i(s, a) = w_i . [s, a] + b_i, members = [(w_1, b_1), ...]."""
    ens = cql.QEnsemble(obs_dim, act_dim, linear_args(n_critics=len(members), **overrides))
    for i, (w, b) in enumerate(members):
        set_linear(Member(ens, i), [w], [b])
    return ens


class SeparateQ(torch.nn.Module):
    """Member i of a QEnsemble as the separate mlp it replaces (nn.Linear layers holding copies of its weights):
    Q_i(s, a) = mlp_i([s, a]). The reference of the update tests, independent of the batched matmul."""

    def __init__(self, ens: cql.QEnsemble, i: int):
        super().__init__()
        layers = []
        for w, b in zip(ens.weights, ens.biases):
            layer = torch.nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                layer.weight.copy_(w[i].T)
                layer.bias.copy_(b[i, 0])
            layers += [layer, torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers[:-1])

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


def separate(ens: cql.QEnsemble) -> list[SeparateQ]:
    return [SeparateQ(ens, i) for i in range(len(ens.weights[0]))]


def member_params(ens: cql.QEnsemble, i: int) -> list[torch.Tensor]:
    """Member i's parameters in nn.Linear layout and SeparateQ's order: weight (out, in), bias (out,) per layer."""
    return [t.detach() for w, b in zip(ens.weights, ens.biases) for t in (w[i].T, b[i, 0])]


def stacked(ens: cql.QEnsemble, members: list[SeparateQ]) -> cql.QEnsemble:
    """A copy of `ens` holding the separate members' weights (the inverse of `separate`)."""
    ens = copy.deepcopy(ens)
    with torch.no_grad():
        for i, m in enumerate(members):
            for j, layer in enumerate(x for x in m.net if isinstance(x, torch.nn.Linear)):
                ens.weights[j][i].copy_(layer.weight.T)
                ens.biases[j][i, 0].copy_(layer.bias)
    return ens


def test_q_ensemble_scores_state_action_pairs_and_n_actions_per_state_for_each_member():
    # Q1(s, a) = s0 + 2 s1 + 10 a0 - 10 a1 + 0.5; Q2(s, a) = -s0 + a0 (a second member, scored separately)
    q = linear_ensemble(2, 2, [([1.0, 2.0, 10.0, -10.0], 0.5), ([-1.0, 0.0, 1.0, 0.0], 0.0)])
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Q1: state 1, a = (0.1, 0): 1 + 1 + 0.5 = 2.5; state 2, a = (0, 0.2): 2 - 2 + 0.5 = 0.5. Q2: -1 + 0.1, 0 + 0
    out = q(obs, torch.tensor([[0.1, 0.0], [0.0, 0.2]]))
    assert out.shape == (2, 2) and torch.allclose(out, torch.tensor([[2.5, 0.5], [-0.9, 0.0]]))
    # n = 3 actions per state, (B, n, d) -> (N, B, n), each scored at its own state (Q1(s, 0) = 1.5 and 2.5):
    # a = (0, 0), (0.1, 0), (0, 0.1) -> Q1 +0, +1, -1; Q2(s, 0) = -1 and 0, then +0, +0.1, +0
    a3 = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]]).expand(2, 3, 2)
    out3 = q(obs, a3)
    assert out3.shape == (2, 2, 3)
    assert torch.allclose(out3, torch.tensor([[[1.5, 2.5, 0.5], [2.5, 3.5, 1.5]],
                                              [[-1.0, -0.9, -1.0], [0.0, 0.1, 0.0]]]))


def test_ensemble_members_start_and_compute_as_separate_mlps():
    args = cql.Args(n_critics=3, hidden_dim=16, n_layers=2)
    torch.manual_seed(0)
    separate_mlps = [cql.mlp(4 + 2, 1, [16, 16]) for _ in range(3)]  # the same draws, in the same order
    torch.manual_seed(0)
    ens = cql.QEnsemble(4, 2, args)
    obs, action = torch.randn(5, 4), torch.rand(5, 2) * 2 - 1
    expected = torch.stack([m(torch.cat([obs, action], 1))[:, 0] for m in separate_mlps])
    torch.testing.assert_close(ens(obs, action), expected, rtol=1e-5, atol=1e-6)  # batched matmul rounding only
    a3 = torch.rand(5, 7, 2) * 2 - 1  # 7 actions per state: (N, B, 7)
    expected3 = torch.stack([m(torch.cat([obs[:, None].expand(-1, 7, -1), a3], -1))[..., 0] for m in separate_mlps])
    torch.testing.assert_close(ens(obs, a3), expected3, rtol=1e-5, atol=1e-6)
    assert len(list(ens.parameters())) == 6 and ens.weights[0].shape == (3, 6, 16)  # 3 layers, each stacked


def test_discrete_q_network_scores_every_action_and_acts_greedily():
    # Q(s, .) = W s + b with W = [[1, 0], [0, 1], [-1, -1]], b = [0, 0, 0.5]
    qnet = set_linear(cql.DiscreteQNetwork(2, 3, linear_args()), [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]],
                      [0.0, 0.0, 0.5])
    obs = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, -1.0], [3.0, 0.0]])
    # rows: [2, 1, -2.5], [0, 3, -2.5], [-1, -1, 2.5], [3, 0, -2.5] -> greedy actions 0, 1, 2, 0
    assert torch.allclose(qnet(obs), torch.tensor([[2.0, 1.0, -2.5], [0.0, 3.0, -2.5], [-1.0, -1.0, 2.5],
                                                   [3.0, 0.0, -2.5]]))
    assert qnet.act(obs).tolist() == [0, 1, 2, 0]
    assert qnet.act(torch.stack([obs, obs.flip(0)])).tolist() == [[0, 1, 2, 0], [0, 2, 1, 0]]  # any batch shape
    # q_value reads Q(s, a) off the head: a = (1, 1, 0, 2) -> 1, 3, -1, -2.5
    assert cql.q_value(qnet, 0.0, obs, torch.tensor([1, 1, 0, 2])).tolist() == [1.0, 3.0, -1.0, -2.5]


def test_q_value_takes_the_smaller_critic_state_by_state():
    # Q1(s, a) = s0 and Q2(s, a) = s1: state (1, 2) -> min 1 (Q1); state (3, -1) -> min -1 (Q2)
    q = linear_ensemble(2, 1, [([1.0, 0.0, 0.0], 0.0), ([0.0, 1.0, 0.0], 0.0)])
    obs = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    assert cql.q_value(q, 0.0, obs, torch.zeros(2, 1)).tolist() == [1.0, -1.0]
    # lcb 0.5: mean (1.5, 1), population std (0.5, 2) -> (1.25, 0)
    assert cql.q_value(q, 0.5, obs, torch.zeros(2, 1)).tolist() == [1.25, 0.0]


def test_pessimistic_is_the_minimum_or_mean_minus_k_population_std():
    q = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # N = 3 critics, B = 2
    assert cql.pessimistic(q, 0.0).tolist() == [1.0, 0.0]
    # mean (2, 2); population std sqrt(2/3) and sqrt(8/3)
    expected = [2.0 - 0.5 * math.sqrt(2 / 3), 2.0 - 0.5 * math.sqrt(8 / 3)]
    assert cql.pessimistic(q, 0.5).tolist() == pytest.approx(expected)
    twin = torch.tensor([[1.0, 5.0], [3.0, -1.0]])
    assert cql.pessimistic(twin, 1.0).tolist() == pytest.approx([1.0, -1.0])  # N = 2, k = 1: the minimum again
    # (N, B, n) -> (B, n): the reduction is over the critics only
    assert cql.pessimistic(torch.tensor([[[1.0, 2.0]], [[0.0, 3.0]]]), 0.0).tolist() == [[0.0, 2.0]]


def test_box_gap_gives_one_gap_per_critic_with_shared_proposals():
    # N = 2 critics, one state, two proposals with log mu = (0, log 2), the same for both critics.
    # critic 1: Q = (1, 1), data 3: log(e + e/2) - 3 = -1.594535; critic 2: Q = (0, 0), data 0: log(1 + 1/2) = 0.405465
    q_prop = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])
    log_density = torch.tensor([[0.0, math.log(2.0)]])
    gaps = cql.cql_gap_box(q_prop, log_density, torch.tensor([[3.0], [0.0]]))
    assert gaps.shape == (2,)
    assert gaps.tolist() == pytest.approx([math.log(1.5 * math.e) - 3.0, math.log(1.5)], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--n-critics", "3"], ["--n-critics", "1"], ["--q-lcb", "0.5"]])
def test_critic_flags_are_box_only(tmp_path, flags: list[str]):
    proc = subprocess.run([sys.executable, str(ROOT / "cql.py"), "--dataset", "cartpole-medium", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (  # after the dataset's progress bar
        "cql.py: error: --n-critics/--q-lcb apply to Box CQL; discrete CQL has one double-DQN Q network")


def test_diagnostics_report_the_critics_spread_on_data_and_policy_actions():
    # Q1 = a, Q2 = -a (one action dim): at a_data = 0.5 the population std is 0.5; at pi(s) = 0.2 it is 0.2
    q = linear_ensemble(1, 1, [([0.0, 1.0], 0.0), ([0.0, -1.0], 0.0)])
    b = (torch.zeros(3, 1), torch.full((3, 1), 0.5))
    greedy = lambda obs: torch.full((len(obs), 1), 0.2)  # noqa: E731
    logs = cql.diagnostics(b, partial(cql.q_value, q, 0.0), greedy, False, q)
    assert logs["q_std_data"].item() == pytest.approx(0.5) and logs["q_std_pi"].item() == pytest.approx(0.2)
    assert logs["q_data"].item() == pytest.approx(-0.5) and logs["q_pi_minus_q_data"].item() == pytest.approx(0.3)
    assert "q_std_data" not in cql.diagnostics(b, partial(cql.q_value, q, 0.0), greedy, False)


def actor_with_head(mean: list[float], log_std: list[float], obs_dim: int = 2) -> cql.TanhGaussianActor:
    """A linear actor with zero weights: its head outputs (mean, log std) = the bias, whatever the state."""
    return set_linear(cql.TanhGaussianActor(obs_dim, len(mean), linear_args()), torch.zeros(2 * len(mean), obs_dim),
                      mean + log_std)


def tanh_gaussian(mean: torch.Tensor, std: torch.Tensor) -> torch.distributions.Distribution:
    """torch's own tanh-squashed Normal (exact Jacobian), independent of cql.py's change of variables."""
    base = torch.distributions.Normal(mean, std)
    return torch.distributions.Independent(torch.distributions.TransformedDistribution(
        base, [torch.distributions.TanhTransform(cache_size=1)]), 1)


def test_actor_head_is_mean_then_log_std_clamped_to_the_authors_range_and_acts_with_tanh_mean():
    actor = actor_with_head([0.5, -1.0, 0.0], [0.3, 3.0, -7.0])
    dist = actor.dist(torch.zeros(4, 2))
    assert torch.allclose(dist.mean, torch.tensor([0.5, -1.0, 0.0]).expand(4, 3))
    # log std clamped to [-5, 2]: 0.3 stays, 3 -> 2, -7 -> -5
    assert torch.allclose(dist.stddev, torch.tensor([0.3, 2.0, -5.0]).exp().expand(4, 3))
    # deterministic action tanh(mean) = (0.4621, -0.7616, 0), for any batch shape
    expected = torch.tensor([0.462117, -0.761594, 0.0])
    assert torch.allclose(actor.act(torch.zeros(5, 2)), expected.expand(5, 3), atol=1e-6)
    assert torch.allclose(actor.act(torch.zeros(2, 5, 2)), expected.expand(2, 5, 3), atol=1e-6)


def test_actor_samples_are_reparameterised_tanh_gaussian_draws_with_their_torch_log_density():
    mean, log_std = [0.5, -1.0, 0.2], [0.3, -0.5, 0.0]
    actor, obs = actor_with_head(mean, log_std), torch.zeros(4, 2)
    ref = tanh_gaussian(torch.tensor(mean).expand(4, 3), torch.tensor(log_std).exp().expand(4, 3))
    torch.manual_seed(5)
    a, logp = actor.sample(obs)
    torch.manual_seed(5)
    a_ref = ref.rsample()  # the same normal draws, squashed by torch's TanhTransform
    assert a.requires_grad and torch.allclose(a, a_ref, atol=1e-6)
    assert logp.shape == (4,) and torch.allclose(logp, ref.log_prob(a_ref), atol=1e-4)
    # n = 5 actions per state: (B, n, d) and (B, n)
    ref_n = tanh_gaussian(torch.tensor(mean).expand(4, 5, 3), torch.tensor(log_std).exp().expand(4, 5, 3))
    torch.manual_seed(6)
    a, logp = actor.sample(obs, 5)
    torch.manual_seed(6)
    a_ref = ref_n.rsample()
    assert a.shape == (4, 5, 3) and torch.allclose(a, a_ref, atol=1e-6)
    assert logp.shape == (4, 5) and torch.allclose(logp, ref_n.log_prob(a_ref), atol=1e-4)


def test_actor_log_prob_of_given_actions_matches_torch_tanh_transformed_gaussian():
    torch.manual_seed(0)
    actor = cql.TanhGaussianActor(3, 3, cql.Args(hidden_dim=8, n_layers=1))
    obs = torch.randn(6, 3)
    actions = torch.rand(6, 3) * 1.6 - 0.8  # inside the box
    mean, log_std = actor.net(obs).chunk(2, -1)
    ref = tanh_gaussian(mean, log_std.clamp(-5.0, 2.0).exp())
    assert torch.allclose(actor.log_prob(obs, actions), ref.log_prob(actions), atol=1e-4)


def test_squashed_log_prob_keeps_rlkits_epsilon_inside_the_jacobian():
    # at a = 1 exactly: log N(u) - log(1 - 1 + 1e-6) = log N(u) + 13.8155 (rlkit's 1e-6 keeps it finite)
    dist = torch.distributions.Normal(torch.zeros(1, 1), torch.ones(1, 1))
    u, a = torch.tensor([[0.3]]), torch.tensor([[1.0]])
    lp = cql.TanhGaussianActor.squashed_log_prob(dist, u, a)
    assert lp.item() == pytest.approx(-0.5 * 0.09 - 0.5 * math.log(2 * math.pi) - math.log(1e-6), abs=1e-3)


def test_actor_log_prob_on_the_box_edge_clamps_to_one_minus_1e6():
    # N(0.5, 1), float64. a = +-1 is clamped to +-(1 - 1e-6): u = +-atanh(1 - 1e-6) = +-0.5 log((2 - 1e-6) / 1e-6)
    # = +-7.254329, and 1 - a^2 + 1e-6 = 2e-6 - 1e-12 + 1e-6; log pi = log N(u; 0.5, 1) - log(3e-6 - 1e-12)
    actor = actor_with_head([0.5], [0.0], obs_dim=1).double()
    u = 0.5 * math.log((2 - 1e-6) / 1e-6)
    jac = math.log(3e-6 - 1e-12)
    expected = [-0.5 * (s * u - 0.5) ** 2 - 0.5 * math.log(2 * math.pi) - jac for s in (1, -1)]
    lp = actor.log_prob(torch.zeros(2, 1, dtype=torch.float64), torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
    assert lp.tolist() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Conservative term, Box proposals
def test_box_gap_is_a_mean_over_states():
    # state 1: logsumexp(0 - 0, 0 - 0) - 0 = log 2; state 2: logsumexp(1 - 0, 1 - log 2) - 3 = log(e + e/2) - 3
    q_prop = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    log_density = torch.tensor([[0.0, 0.0], [0.0, math.log(2.0)]])
    expected = (math.log(2.0) + math.log(1.5 * math.e) - 3.0) / 2  # (0.693147 - 1.594535) / 2 = -0.450694
    assert cql.cql_gap_box(q_prop, log_density, torch.tensor([0.0, 3.0])).item() == pytest.approx(expected, abs=1e-5)


class StateActor(torch.nn.Module):
    """Deterministic stand-in policy: at state s every sample is tanh(s[:2]) with log pi = sum(s); draws nothing."""

    act_dim = 2

    def sample(self, obs, n=None):
        a, logp = torch.tanh(obs[:, :2]), obs.sum(-1)
        if n is None:
            return a, logp
        return a[:, None].expand(-1, n, -1), logp[:, None].expand(-1, n)


def test_box_proposals_are_seeded_uniform_draws_then_policy_at_s_then_policy_at_next_s():
    obs = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.5, 0.6]])
    next_obs = torch.tensor([[-0.7, 0.8, 0.0], [0.9, 0.1, -0.2]])
    n = 4
    torch.manual_seed(3)
    actions, log_density = cql.cql_proposals(obs, next_obs, StateActor(), n)
    torch.manual_seed(3)
    uniform = 2 * torch.rand(2, n, 2) - 1  # U(-1, 1)^2 from the same draws
    assert torch.allclose(actions[:, :n], uniform)
    assert torch.allclose(actions[:, n:2 * n], torch.tanh(obs[:, None, :2]).expand(-1, n, -1))
    assert torch.allclose(actions[:, 2 * n:], torch.tanh(next_obs[:, None, :2]).expand(-1, n, -1))
    # log mu: uniform density 1/4 -> log 0.25 = -1.386294; log pi(a|s) = sum(s) = 0.6, 0.5; at s': 0.1, 0.8
    expected = torch.tensor([[-1.386294] * n + [0.6] * n + [0.1] * n, [-1.386294] * n + [0.5] * n + [0.8] * n])
    assert torch.allclose(log_density, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Box update: one step with plain SGD against CQL(H)-SAC written out independently from the reference card (section
# 4.2), with torch's tanh-transformed Normal for every log pi and the draws replayed from the same seed in the
# documented order (a ~ pi(s) for temperature and actor, a' ~ pi(s') for the target, then the 3N proposals).
LR = dict(q=0.1, actor=0.05, alpha=0.2, alpha_prime=0.3)


def box_nets(seed: int = 0, obs_dim: int = 3, act_dim: int = 2) -> dict:
    torch.manual_seed(seed)
    args = cql.Args(hidden_dim=8, n_layers=1)
    return dict(critics=cql.QEnsemble(obs_dim, act_dim, args),  # two members, the twin critics
                critics_target=cql.QEnsemble(obs_dim, act_dim, args),  # targets differ from the online critics
                actor=cql.TanhGaussianActor(obs_dim, act_dim, args),
                log_alpha=torch.tensor(0.3, requires_grad=True),  # alpha = 1.35, so alpha * x != x / alpha
                log_alpha_prime=torch.tensor(-0.4, requires_grad=True))  # alpha' = 0.67, inside the clamp [0, 1e6]


def run_update_box(nets: dict, b, step: int, args: cql.Args, seed: int = 11):
    nets = copy.deepcopy(nets)
    params = [p for k, v in nets.items() for p in (v.parameters() if isinstance(v, torch.nn.Module) else [v])]
    for p in params:  # stale gradients (as an earlier backward would leave): each step must clear, not add to them
        p.grad = torch.full_like(p, 7.0)
    opts = dict(q_opt=SGD(nets["critics"].parameters(), lr=LR["q"]),
                actor_opt=SGD(nets["actor"].parameters(), lr=LR["actor"]),
                alpha_opt=SGD([nets["log_alpha"]], lr=LR["alpha"]),
                alpha_prime_opt=SGD([nets["log_alpha_prime"]], lr=LR["alpha_prime"]))
    torch.manual_seed(seed)
    logs = cql.update_box(b, step, logged(step, args), **nets, **opts, args=args)
    return nets, logs


def policy_draw(actor, obs, n=None):
    """a ~ pi(.|s) and log pi(a|s) from torch's TanhTransform on the actor's raw head (n: n draws per state)."""
    if n is not None:
        obs = obs[:, None].expand(-1, n, -1)
    mean, log_std = actor.net(obs).chunk(2, -1)
    dist = tanh_gaussian(mean, log_std.clamp(-5.0, 2.0).exp())
    a = dist.rsample()
    return a, dist.log_prob(a)


def policy_log_prob(actor, obs, actions):
    mean, log_std = actor.net(obs).chunk(2, -1)
    return tanh_gaussian(mean, log_std.clamp(-5.0, 2.0).exp()).log_prob(actions)


def q_many(q, obs, actions):
    """Q(s, a_i) for (B, M, d) actions, through the 2-D path only."""
    b, m, d = actions.shape
    return q(obs[:, None].expand(-1, m, -1).reshape(b * m, -1), actions.reshape(b * m, d)).view(b, m)


def reference_box_step(nets: dict, b, step: int, args: cql.Args, seed: int = 11):
    """The expected networks and logs after one CQL(H)-SAC step with SGD, from the reference card's equations."""
    n = copy.deepcopy(nets)
    (q1, q2), (q1_t, q2_t), actor = separate(n["critics"]), separate(n["critics_target"]), n["actor"]
    obs, actions, rewards, next_obs, terminals = b
    batch_size, d, big_n = obs.shape[0], actor.act_dim, args.cql_n_actions
    torch.manual_seed(seed)
    a_pi, logp_pi = policy_draw(actor, obs)
    # temperature first: loss -log_alpha (log pi - d), so d loss / d log_alpha = -(mean log pi - d); SGD step
    log_alpha0 = n["log_alpha"].detach()
    log_alpha = log_alpha0 + LR["alpha"] * (logp_pi.detach().mean() - d)
    alpha = log_alpha.exp()
    if step <= args.bc_steps:  # behaviour cloning while step <= bc_steps
        actor_loss = (alpha * logp_pi - policy_log_prob(actor, obs, actions)).mean()
    else:
        actor_loss = (alpha * logp_pi - torch.minimum(q1(obs, a_pi), q2(obs, a_pi))).mean()
    actor_grads = torch.autograd.grad(actor_loss, list(actor.parameters()))  # pre-update critics
    with torch.no_grad():
        if args.cql_max_target_backup:  # min over the twin targets of each one's max over N draws at s'
            a_next, _ = policy_draw(actor, next_obs, big_n)
            v = torch.minimum(q_many(q1_t, next_obs, a_next).amax(1), q_many(q2_t, next_obs, a_next).amax(1))
        else:
            a_next, logp_next = policy_draw(actor, next_obs)
            v = torch.minimum(q1_t(next_obs, a_next), q2_t(next_obs, a_next))
            if args.backup_entropy:
                v = v - alpha * logp_next
        y = rewards + args.discount * (1 - terminals) * v
    conservative = args.cql_alpha > 0
    measured = conservative or logged(step, args)
    with torch.no_grad():  # proposals: N uniform (density 2^-d), N from pi(s), N from pi(s'), all scored at s
        a_unif = 2 * torch.rand(batch_size, big_n, d) - 1
        a_cur, logp_cur = policy_draw(actor, obs, big_n)
        a_nxt, logp_nxt = policy_draw(actor, next_obs, big_n)
        props = torch.cat([a_unif, a_cur, a_nxt], 1)
        log_mu = torch.cat([torch.full((batch_size, big_n), -d * math.log(2.0)), logp_cur, logp_nxt], 1)
    td, gaps = [], []
    for q in (q1, q2):
        q_data = q(obs, actions)
        td.append(((q_data - y) ** 2).mean())
        gaps.append((torch.logsumexp(q_many(q, obs, props) - log_mu, 1) - q_data).mean() if measured
                    else torch.zeros(()))
    expected = dict(td_loss=td[0] + td[1], actor_loss=actor_loss, alpha=alpha, log_pi=logp_pi.mean(),
                    alpha_loss=-(log_alpha0 * (logp_pi - d)).mean())
    log_alpha_prime = n["log_alpha_prime"].detach()
    if args.cql_lagrange:  # dual ascent: loss -0.5 alpha' sum(slack), d / d log alpha' = -0.5 alpha' sum(slack)
        alpha_prime = log_alpha_prime.exp().clamp(max=1e6)
        slack = sum(args.cql_alpha * g.detach() - args.cql_target_action_gap for g in gaps)
        expected.update(alpha_prime=alpha_prime, alpha_prime_loss=-0.5 * alpha_prime * slack)
        log_alpha_prime = log_alpha_prime + LR["alpha_prime"] * 0.5 * alpha_prime * slack
        cql_loss = alpha_prime * sum(args.cql_alpha * g - args.cql_target_action_gap for g in gaps)
    else:
        cql_loss = args.cql_alpha * (gaps[0] + gaps[1])
    q_loss = expected["td_loss"] + cql_loss if conservative else expected["td_loss"]
    expected.update(cql_loss=cql_loss, q_loss=q_loss)
    if measured:
        expected["cql_gap"] = (gaps[0] + gaps[1]) / 2
    q_params = list(q1.parameters()) + list(q2.parameters())
    q_grads = torch.autograd.grad(q_loss, q_params)
    with torch.no_grad():
        for p, g in zip(q_params, q_grads):
            p -= LR["q"] * g
        for p, g in zip(actor.parameters(), actor_grads):
            p -= LR["actor"] * g
        for net, target in ((q1, q1_t), (q2, q2_t)):  # Polyak: target + tau (new online - target)
            for p, tp in zip(net.parameters(), target.parameters()):
                tp += args.tau * (p - tp)
    n.update(log_alpha=log_alpha, log_alpha_prime=log_alpha_prime, critics=stacked(n["critics"], [q1, q2]),
             critics_target=stacked(n["critics_target"], [q1_t, q2_t]))
    return n, {k: v.detach() for k, v in expected.items()}


def box_batch(size: int = 16, obs_dim: int = 3, act_dim: int = 2):
    g = torch.Generator().manual_seed(0)
    terminals = torch.zeros(size)
    terminals[::3] = 1.0  # some terminal transitions, some not
    return (torch.randn(size, obs_dim, generator=g), torch.rand(size, act_dim, generator=g) * 1.8 - 0.9,
            torch.randn(size, generator=g), torch.randn(size, obs_dim, generator=g), terminals)


BOX_CASES = {  # name: (flags, step)
    "cql": (dict(cql_alpha=0.5), 1),
    "lagrange": (dict(cql_alpha=0.5, cql_lagrange=True, cql_target_action_gap=0.3), 1),
    "bc_last_step": (dict(cql_alpha=0.5, bc_steps=3), 3),
    "first_step_after_bc": (dict(cql_alpha=0.5, bc_steps=3), 4),
    "max_target_backup": (dict(cql_alpha=0.5, cql_max_target_backup=True), 1),
    "backup_entropy": (dict(cql_alpha=0.5, backup_entropy=True), 1),
    "alpha0_logging_step": (dict(cql_alpha=0.0, log_every=1), 1),
    "alpha0_between_logging": (dict(cql_alpha=0.0, log_every=1000), 2),
    "alpha0_lagrange_between_logging": (dict(cql_alpha=0.0, log_every=1000, cql_lagrange=True), 2),
}


@pytest.mark.parametrize("case", list(BOX_CASES))
def test_box_update_matches_cql_sac_written_out_by_hand(case: str):
    flags, step = BOX_CASES[case]
    args = cql.Args(hidden_dim=8, n_layers=1, cql_n_actions=3, discount=0.9, tau=0.25, **flags)
    nets, b = box_nets(), box_batch()
    got, logs = run_update_box(nets, b, step, args)
    want, want_logs = reference_box_step(nets, b, step, args)
    assert set(logs) == set(want_logs)
    for k, v in logs.items():
        assert not v.requires_grad, f"{k} holds an autograd graph"
        assert torch.allclose(v, want_logs[k], rtol=1e-4, atol=1e-4), (k, v, want_logs[k])
    for name, value in got.items():
        params = list(value.parameters()) if isinstance(value, torch.nn.Module) else [value]
        want_params = list(want[name].parameters()) if isinstance(value, torch.nn.Module) else [want[name]]
        for p, w in zip(params, want_params):
            assert torch.allclose(p.detach(), w.detach(), rtol=1e-4, atol=1e-5), name
        # every network moved: critics, actor, temperature, targets (and alpha' with the Lagrange form)
        before = list(nets[name].parameters()) if isinstance(value, torch.nn.Module) else [nets[name]]
        moved = any(not torch.equal(p.detach(), q.detach()) for p, q in zip(params, before))
        assert moved == (name != "log_alpha_prime" or args.cql_lagrange), name


def test_box_temperature_steps_first_and_the_actor_loss_uses_the_new_alpha():
    # SGD on -log_alpha (log pi - d): log_alpha' = 0.3 + lr (mean log pi - d), and alpha = exp(log_alpha')
    args = cql.Args(hidden_dim=8, n_layers=1, cql_n_actions=3, cql_alpha=0.5)
    _, logs = run_update_box(box_nets(), box_batch(), 1, args)
    assert logs["alpha"].item() == pytest.approx(math.exp(0.3 + LR["alpha"] * (logs["log_pi"].item() - 2)), rel=1e-5)
    assert logs["alpha_loss"].item() == pytest.approx(-0.3 * (logs["log_pi"].item() - 2), rel=1e-5)


def test_box_lagrange_multiplier_is_capped_at_1e6():
    # alpha' = exp(15) = 3.3e6 is clamped to 1e6:
    # cql_loss = 1e6 * sum_i (0.5 gap_i - 0.3) = 1e6 (0.5 * 2 mean gap - 0.6)
    args = cql.Args(hidden_dim=8, n_layers=1, cql_n_actions=3, cql_alpha=0.5, cql_lagrange=True,
                    cql_target_action_gap=0.3)
    nets = box_nets()
    nets["log_alpha_prime"] = torch.tensor(15.0, requires_grad=True)
    got, logs = run_update_box(nets, box_batch(), 1, args)
    assert logs["alpha_prime"].item() == 1e6
    assert logs["cql_loss"].item() == pytest.approx(1e6 * (logs["cql_gap"].item() - 0.6), rel=1e-5)
    assert got["log_alpha_prime"].item() == 15.0  # no gradient through the clamp


# ----------------------------------------------------------------------------------------------------------------
# Critic ensembles (--n-critics, --q-lcb): one step with hand-set linear members and a stand-in policy that draws
# nothing, so every number below is a hand computation.
class FixedActor(torch.nn.Module):
    """Box stand-in policy, act_dim 1, no random draws: a ~ pi(.|s) is 0.5; n draws per state are (-0.5, 0.5, ...);
    log pi = 0 (through a parameter, so the actor's loss has a gradient)."""

    act_dim = 1

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def sample(self, obs, n=None):
        if n is None:
            return torch.full((len(obs), 1), 0.5), self.w * torch.zeros(len(obs))
        a = torch.tensor([-0.5, 0.5]).repeat(n)[:n]
        return a[None, :, None].expand(len(obs), -1, -1), self.w * torch.zeros(len(obs), n)


def fixed_batch():
    """Two transitions at s = s' = 0 with a_data = 0, rewards (1, 2); the second is terminal."""
    return torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1.0, 2.0]), torch.zeros(2, 1), torch.tensor([0.0, 1.0])


def one_box_step(critics, critics_target, step: int, args: cql.Args, seed: int = 0) -> dict:
    actor = FixedActor()
    log_alpha, log_alpha_prime = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    torch.manual_seed(seed)
    return cql.update_box(fixed_batch(), step, logged(step, args), critics=critics, critics_target=critics_target,
                          actor=actor,
                          log_alpha=log_alpha, log_alpha_prime=log_alpha_prime, q_opt=SGD(critics.parameters(), 0.1),
                          actor_opt=SGD(actor.parameters(), 0.1), alpha_opt=SGD([log_alpha], 0.1),
                          alpha_prime_opt=SGD([log_alpha_prime], 0.1), args=args)


@pytest.mark.parametrize("q_lcb, max_backup, v", [
    (0.0, False, -0.5),  # Q_i(s', 0.5) = (0.5, -0.5, 0): min -0.5
    (1.0, False, -math.sqrt(1 / 6)),  # mean 0, population std sqrt(1/6): -0.408248
    (0.0, True, 0.0),  # each critic's max over a' in (-0.5, 0.5): (0.5, 0.5, 0), min 0 (the max of the min is -0.5)
    (1.0, True, 1 / 3 - math.sqrt(1 / 18)),  # mean 1/3, population std sqrt(1/18): 0.097631
])
def test_td_target_is_the_minimum_or_lcb_of_three_target_critics(q_lcb: float, max_backup: bool, v: float):
    args = linear_args(n_critics=3, cql_alpha=0.0, log_every=1000, discount=0.5, cql_n_actions=2, q_lcb=q_lcb,
                       cql_max_target_backup=max_backup)
    critics = linear_ensemble(1, 1, [([0.0, 0.0], 0.0)] * 3)  # online Q = 0: the TD loss is N mean(y^2)
    target = linear_ensemble(1, 1, [([0.0, 1.0], 0.0), ([0.0, -1.0], 0.0), ([0.0, 2.0], -1.0)])  # c_i a' + b_i
    logs = one_box_step(critics, target, 2, args)
    # y = (1 + 0.5 v, 2) (the second transition is terminal); three members: 3 (y_1^2 + y_2^2) / 2
    assert logs["td_loss"].item() == pytest.approx(3 * ((1 + 0.5 * v) ** 2 + 4) / 2, rel=1e-6)


@pytest.mark.parametrize("q_lcb, actor_loss", [(0.0, -0.5), (1.0, -(1.5 - math.sqrt(7 / 6)))])
def test_td_loss_sums_the_members_mses_each_member_steps_on_its_own_and_the_actor_takes_the_pessimistic_q(
        q_lcb: float, actor_loss: float):
    args = linear_args(n_critics=3, cql_alpha=0.0, log_every=1000, discount=0.5, tau=0.5, q_lcb=q_lcb)
    critics = linear_ensemble(1, 1, [([0.0, 0.0], 0.5), ([0.0, 0.0], 1.0), ([0.0, 0.0], 3.0)])  # Q_i = b_i
    target = linear_ensemble(1, 1, [([0.0, 0.0], 2.0)] * 3)  # min and any lcb: 2
    logs = one_box_step(critics, target, 2, args)
    # y = (1 + 0.5 * 2, 2) = (2, 2); MSEs (1.5^2, 1^2, 1^2), summed: 4.25
    assert logs["td_loss"].item() == pytest.approx(4.25) and logs["q_loss"].item() == pytest.approx(4.25)
    # the actor maximises the online critics' min (0.5) or lcb (mean 1.5, population std sqrt(7/6)); log pi = 0
    assert logs["actor_loss"].item() == pytest.approx(actor_loss, rel=1e-6)
    # each bias steps on its own MSE: d/db_i = 2 (b_i - 2) = (-3, -2, 2) -> (0.8, 1.2, 2.8); the weights stay 0
    assert torch.allclose(critics.biases[0][:, 0, 0], torch.tensor([0.8, 1.2, 2.8]))
    assert torch.equal(critics.weights[0], torch.zeros(3, 2, 1))
    # Polyak over the whole ensemble, tau 0.5: 2 + 0.5 (b' - 2) = (1.4, 1.6, 2.4)
    assert torch.allclose(target.biases[0][:, 0, 0], torch.tensor([1.4, 1.6, 2.4]))


def test_conservative_gap_is_per_member_on_the_same_proposals():
    args = linear_args(n_critics=3, cql_alpha=1.0, cql_n_actions=2, discount=0.5)
    c = torch.tensor([0.0, 1.0, 2.0])
    critics = linear_ensemble(1, 1, [([0.0, ci], 0.0) for ci in c.tolist()])  # Q_i(s, a) = c_i a
    logs = one_box_step(critics, copy.deepcopy(critics), 1, args, seed=4)
    torch.manual_seed(4)  # FixedActor draws nothing: the 2 uniform proposals per state are the update's first draws
    policy = torch.tensor([-0.5, 0.5]).expand(2, 2)
    props = torch.cat([2 * torch.rand(2, 2, 1)[..., 0] - 1, policy, policy], 1)  # (B, 6): uniform, pi(s), pi(s')
    log_mu = torch.cat([torch.full((2, 2), math.log(0.5)), torch.zeros(2, 4)], 1)  # uniform density 1/2, log pi 0
    z = c[:, None, None] * props - log_mu  # (N, B, 6)
    gaps = torch.logsumexp(z, -1).mean(-1)  # minus Q_i(s, a_data) = 0
    assert gaps[0].item() == pytest.approx(math.log(8))  # c = 0: log(2 + 2 + 4 * 1)
    assert logs["cql_gap"].item() == pytest.approx(gaps.mean().item(), rel=1e-6)
    assert logs["cql_loss"].item() == pytest.approx(gaps.sum().item(), rel=1e-6)
    # each member's own gap moves its c_i: d gap_i / d c_i = mean_s sum_j softmax_j(z_i) a_j (the TD gradient on c_i
    # is 0 since a_data = 0); SGD 0.1
    grad = (torch.softmax(z, -1) * props).sum(-1).mean(-1)
    assert torch.allclose(critics.weights[0][:, 1, 0], c - 0.1 * grad, atol=1e-6)
    assert len(set(grad.tolist())) == 3  # three different steps


# ----------------------------------------------------------------------------------------------------------------
# Discrete update
def test_discrete_update_by_hand_double_dqn_target_huber_td_cql_term_and_polyak():
    # Q(s, .) = b (zero weights): online b = (1, 3, 2), target b = (5, -1, 4). obs = 0, so only the biases move.
    args = cql.Args(hidden_dim=4, n_layers=0, cql_alpha=0.5, discount=0.9, tau=0.5)
    qnet = set_linear(cql.DiscreteQNetwork(2, 3, args), torch.zeros(3, 2), [1.0, 3.0, 2.0])
    qnet_t = set_linear(cql.DiscreteQNetwork(2, 3, args), torch.zeros(3, 2), [5.0, -1.0, 4.0])
    b = (torch.zeros(2, 2), torch.tensor([0, 2]), torch.tensor([1.7, 0.5]), torch.ones(2, 2), torch.tensor([0.0, 1.0]))
    for p in qnet.parameters():
        p.grad = torch.full_like(p, 7.0)  # a stale gradient must not leak into the step
    logs = cql.update_discrete(b, 1, True, qnet=qnet, qnet_target=qnet_t, q_opt=SGD(qnet.parameters(), lr=0.1),
                               args=args)
    # double DQN: the online net picks a' = argmax (1, 3, 2) = 1, the target scores it: -1 (plain DQN would take 5)
    # y = (1.7 + 0.9 * 1 * -1, 0.5 + 0) = (0.8, 0.5); Q(s, a) = (b0, b2) = (1, 2); errors (0.2, 1.5)
    # Huber: (0.5 * 0.2^2, 1.5 - 0.5) = (0.02, 1.0) -> td 0.51
    # gap: logsumexp(1, 3, 2) = 3.407606 -> mean(3.407606 - 1, 3.407606 - 2) = 1.907606; cql 0.5 * gap = 0.953803
    assert logs["td_loss"].item() == pytest.approx(0.51, abs=1e-5)
    assert logs["cql_gap"].item() == pytest.approx(1.907606, abs=1e-5)
    assert logs["cql_loss"].item() == pytest.approx(0.953803, abs=1e-5)
    assert logs["q_loss"].item() == pytest.approx(1.463803, abs=1e-5)
    assert all(not v.requires_grad for v in logs.values())
    # d/db: Huber (0.2 / 2, 0, 1 / 2) = (0.1, 0, 0.5); cql 0.5 (softmax(b) - mean one-hot) with
    # softmax = (0.090031, 0.665241, 0.244728), one-hot mean (0.5, 0, 0.5) -> (-0.204985, 0.332620, -0.127636)
    # total (-0.104985, 0.332620, 0.372364); b - 0.1 grad = (1.010498, 2.966738, 1.962764); weights stay 0
    layer, target_layer = qnet.net[0], qnet_t.net[0]
    assert torch.allclose(layer.bias, torch.tensor([1.010498, 2.966738, 1.962764]), atol=1e-5)
    assert torch.equal(layer.weight, torch.zeros(3, 2))
    # Polyak with tau 0.5: (5, -1, 4) + 0.5 (new b - (5, -1, 4)) = (3.005249, 0.983369, 2.981382)
    assert torch.allclose(target_layer.bias, torch.tensor([3.005249, 0.983369, 2.981382]), atol=1e-5)


@pytest.mark.parametrize("every", [1, 2])
def test_discrete_hard_target_update_copies_exactly_every_n_steps(every: int):
    torch.manual_seed(0)
    args = cql.Args(hidden_dim=8, n_layers=1, cql_alpha=0.5, target_update_every=every)
    qnet, qnet_t = cql.DiscreteQNetwork(4, 3, args), cql.DiscreteQNetwork(4, 3, args)
    opt = SGD(qnet.parameters(), lr=0.1)
    b = batch(4, discrete=True)
    for step in range(1, 4):
        old_target = copy.deepcopy(qnet_t.state_dict())
        cql.update_discrete(b, step, True, qnet=qnet, qnet_target=qnet_t, q_opt=opt, args=args)
        copied = step % every == 0
        for k, v in qnet_t.state_dict().items():  # a copy of the updated online net, or left exactly as it was
            assert torch.equal(v, qnet.state_dict()[k] if copied else old_target[k]), (step, k)


@pytest.mark.slow
@pytest.mark.parametrize("dataset, discrete", [("pendulum-medium", False), ("cartpole-medium", True)])
def test_train_save_and_reload(tmp_path: Path, dataset: str, discrete: bool):
    # small networks and batches keep the Box run (3N = 30 extra actions per state) fast on a CPU
    out = run_script("cql.py", "--dataset", dataset, "--total-steps", "200", "--eval-every", "100",
                     "--eval-episodes", "1", "--log-every", "100", "--save-model", "--device", "cpu",
                     "--batch-size", "32", "--hidden-dim", "64", cwd=tmp_path)
    assert "eval normalized" in out and "nan" not in out
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


@pytest.mark.slow
def test_box_ensemble_with_lcb_trains_saves_and_discrete_refuses_the_flags(tmp_path: Path):
    out = run_script("cql.py", "--dataset", "pendulum-medium", "--total-steps", "20", "--eval-episodes", "0",
                     "--log-every", "10", "--save-model", "--device", "cpu", "--batch-size", "16", "--hidden-dim",
                     "16", "--n-critics", "3", "--q-lcb", "0.5", cwd=tmp_path)
    assert "nan" not in out
    (path,) = tmp_path.glob("runs/*/cql.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["critics"]["weights.0"].shape[0] == 3 and ckpt["critics_target"]["weights.0"].shape[0] == 3
    assert "q1" not in ckpt and cql.load_policy(str(path)).act(torch.zeros(2, ckpt["obs_dim"])).shape == (2, 1)
    proc = subprocess.run([sys.executable, str(Path(cql.__file__)), "--dataset", "cartpole-medium", "--n-critics",
                           "3", "--total-steps", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "cql.py: error: --n-critics/--q-lcb apply to Box CQL" in proc.stderr
