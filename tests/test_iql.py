"""IQL: the loss math and actors on hand-computed cases, one full update step on linear networks with plain SGD
checked against hand-derived gradients, and (slow) smoke runs of the script on Box and Discrete data."""

import copy
import math
from pathlib import Path

import pytest
import torch

import iql
from tests.conftest import Member, run_script


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


def _setup(discrete: bool, q_targets=(1.0, 3.0), v=0.0, **kw):
    args = iql.Args(learning_rate=0.0, total_steps=10, n_critics=len(q_targets), **kw)  # lr 0: nothing moves
    obs_dim, act_dim, n = 3, 2, (4 if discrete else None)
    critics = _constant(iql.QEnsemble(obs_dim, act_dim, n, args), 0.0)
    critics_t = _constant(iql.QEnsemble(obs_dim, act_dim, n, args), 0.0)
    with torch.no_grad():
        for i, c in enumerate(q_targets):  # member i of the target ensemble outputs c everywhere
            critics_t.biases[-1][i].fill_(c)
    vf = _constant(iql.mlp(obs_dim, 1, [8]), v)
    actor = _constant(iql.make_actor(obs_dim, act_dim, n, args), 0.0)  # uniform categorical / N(0, 1)
    q_opt = torch.optim.Adam(critics.parameters(), lr=0.0)
    v_opt, actor_opt = torch.optim.Adam(vf.parameters(), lr=0.0), torch.optim.Adam(actor.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(actor_opt, lambda _: 1.0)
    actions = torch.tensor([1, 3]) if discrete else torch.zeros(2, act_dim)
    batch = (torch.zeros(2, obs_dim), actions, torch.tensor([1.0, 1.0]), torch.zeros(2, obs_dim),
             torch.tensor([0.0, 1.0]))
    return batch, dict(critics=critics, critics_target=critics_t, vf=vf, actor=actor, q_opt=q_opt, v_opt=v_opt,
                       actor_opt=actor_opt, actor_sched=sched, args=args)


@pytest.mark.parametrize("discrete", [False, True])
def test_v_regresses_to_the_min_of_the_target_qs(discrete):
    batch, nets = _setup(discrete, q_targets=(1.0, 3.0), v=0.0)
    logs = iql.update(batch, **nets)
    assert logs["v_loss"].item() == pytest.approx(0.7 * 1.0**2)  # u = min(1, 3) - 0 = 1 > 0: weight tau
    assert logs["adv"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("discrete", [False, True])
def test_q_target_bootstraps_v_except_at_terminals(discrete):
    batch, nets = _setup(discrete, v=5.0)
    logs = iql.update(batch, **nets)
    # targets r + 0.99 * (1 - terminal) * V(s') = [1 + 4.95, 1]; both Qs output 0; loss = sum of the two MSEs
    assert logs["q_loss"].item() == pytest.approx(2 * (5.95**2 + 1.0) / 2, rel=1e-5)


def test_awr_actor_loss_is_the_weighted_negative_log_likelihood():
    batch, nets = _setup(True, q_targets=(2.0, 2.0), v=1.0)
    logs = iql.update(batch, **nets)
    # zero actor weights: uniform over 4 actions, log pi = -log 4; adv = 1 so weight exp(3)
    assert logs["actor_loss"].item() == pytest.approx(math.exp(3.0) * math.log(4.0), rel=1e-5)


@pytest.mark.parametrize("discrete", [False, True])
def test_beta_zero_is_behaviour_cloning(discrete):
    # --beta 0: every weight exp(0 * adv) is 1 whatever Q and V say, so the actor loss is the negative
    # log-likelihood of the data actions and one actor step is exactly one behaviour-cloning step
    torch.manual_seed(0)
    batch, nets = _setup(discrete, q_targets=(2.0, -5.0), v=1.0, beta=0.0)
    actor = nets["actor"]
    for p in actor.parameters():  # a non-uniform policy, so the log-likelihood differs between the data actions
        torch.nn.init.normal_(p, std=0.5)
    obs = torch.randn_like(batch[0])
    actions = batch[1] if discrete else torch.tensor([[0.3, -0.2], [-0.6, 0.1]])
    batch = (obs, actions, *batch[2:])
    bc_actor = copy.deepcopy(actor)
    bc_opt = torch.optim.Adam(bc_actor.parameters(), lr=0.1)
    nets["actor_opt"] = torch.optim.Adam(actor.parameters(), lr=0.1)
    nets["actor_sched"] = torch.optim.lr_scheduler.LambdaLR(nets["actor_opt"], lambda _: 1.0)
    nll = -bc_actor.log_prob(obs, actions).mean()
    logs = iql.update(batch, **nets)
    assert logs["weights"].item() == pytest.approx(1.0)
    assert logs["actor_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    bc_opt.zero_grad()
    nll.backward()
    bc_opt.step()
    for p, q in zip(actor.parameters(), bc_actor.parameters()):
        torch.testing.assert_close(p, q)


def test_polyak_moves_targets_by_tau():
    batch, nets = _setup(False, q_targets=(1.0, 1.0))
    with torch.no_grad():
        nets["critics"].biases[-1][0].fill_(3.0)
    iql.update(batch, **nets)
    assert nets["critics_target"].biases[-1][0].item() == pytest.approx(1.0 + 0.005 * (3.0 - 1.0))
    assert nets["critics_target"].biases[-1][1].item() == pytest.approx(1.0 + 0.005 * (0.0 - 1.0))


def test_expectile_weight_switches_at_zero_not_at_one():
    # u = 0.5 is a positive error: weight tau = 0.7 (a threshold at 1 would give 0.3); u = -2: weight 0.3
    # (0.7 * 0.25 + 0.3 * 4) / 2 = 0.6875
    assert iql.expectile_loss(torch.tensor([0.5, -2.0]), 0.7).item() == pytest.approx(0.6875)


# Hand-checkable networks: with n_layers = 0 every mlp is a single nn.Linear whose weights the tests set.
def _linear(layer: torch.nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))


LINEAR = dict(n_layers=0)


def _twin(obs_dim: int, act_dim: int, n_actions, args) -> tuple:
    """A two-member QEnsemble and views of its members (Q1, Q2)."""
    ens = iql.QEnsemble(obs_dim, act_dim, n_actions, args)
    return ens, Member(ens, 0), Member(ens, 1)


def test_box_q_is_a_scalar_per_transition_from_state_and_action_for_each_member():
    q, q1, q2 = _twin(2, 1, None, iql.Args(**LINEAR))
    _linear(q1, [[1.0, 2.0, 3.0]], [0.5])
    _linear(q2, [[0.0, 0.0, -1.0]], [0.0])
    # Q1 = 1 s1 + 2 s2 + 3 a + 0.5: [1 + 0 + 1.5 + 0.5, 0 + 2 - 3 + 0.5] = [3, -0.5]; Q2 = -a: [-0.5, 1]
    out = q(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5], [-1.0]]))
    torch.testing.assert_close(out, torch.tensor([[3.0, -0.5], [-0.5, 1.0]]))


def test_discrete_q_reads_the_data_actions_head_of_each_member():
    q, q1, q2 = _twin(2, 1, 3, iql.Args(**LINEAR))
    _linear(q1, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 10.0, 20.0])
    _linear(q2, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [7.0, 8.0, 9.0])
    # Q1(s, .) = [s1, s2 + 10, s1 + s2 + 20]; s = (1, 2): [1, 12, 23], action 1 -> 12; s = (3, 4): [3, 14, 27] -> 3
    out = q(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1, 0]))
    torch.testing.assert_close(out, torch.tensor([[12.0, 3.0], [8.0, 7.0]]))


@pytest.mark.parametrize("n_actions", [None, 3])
def test_ensemble_members_start_and_compute_as_separate_mlps(n_actions):
    args = iql.Args(n_critics=3, hidden_dim=16, n_layers=2)
    in_dim, out_dim = (4, n_actions) if n_actions else (4 + 2, 1)
    torch.manual_seed(0)
    separate = [iql.mlp(in_dim, out_dim, [16, 16]) for _ in range(3)]  # the same draws, in the same order
    torch.manual_seed(0)
    ens = iql.QEnsemble(4, 2, n_actions, args)
    obs = torch.randn(5, 4)
    action = torch.tensor([0, 2, 1, 1, 0]) if n_actions else torch.rand(5, 2) * 2 - 1
    x = obs if n_actions else torch.cat([obs, action], 1)
    expected = torch.stack([m(x).gather(1, action[:, None])[:, 0] if n_actions else m(x)[:, 0] for m in separate])
    torch.testing.assert_close(ens(obs, action), expected, rtol=1e-5, atol=1e-6)  # batched matmul rounding only


def test_pessimistic_is_the_minimum_or_mean_minus_k_population_std():
    q = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # N = 3 critics, B = 2
    assert iql.pessimistic(q, 0.0).tolist() == [1.0, 0.0]
    # mean (2, 2); population std sqrt(2/3) and sqrt(8/3)
    expected = [2.0 - 0.5 * math.sqrt(2 / 3), 2.0 - 0.5 * math.sqrt(8 / 3)]
    assert iql.pessimistic(q, 0.5).tolist() == pytest.approx(expected)
    twin = torch.tensor([[1.0, 5.0], [3.0, -1.0]])
    assert iql.pessimistic(twin, 1.0).tolist() == pytest.approx([1.0, -1.0])  # N = 2, k = 1: the minimum again


def test_v_target_is_the_lower_confidence_bound_with_q_lcb():
    batch, nets = _setup(False, q_targets=(1.0, 3.0, 5.0), v=0.0, q_lcb=0.5)
    logs = iql.update(batch, **nets)
    # mean 3, population std sqrt(8/3): u = 3 - 0.5 sqrt(8/3) - 0 > 0, weight tau
    assert logs["v_loss"].item() == pytest.approx(0.7 * (3 - 0.5 * math.sqrt(8 / 3)) ** 2, rel=1e-6)


def test_q_loss_sums_the_mse_of_every_member():
    batch, nets = _setup(True, q_targets=(0.0,) * 10, v=5.0)  # ten critics, all outputting 0
    logs = iql.update(batch, **nets)
    # targets [1 + 0.99 * 5, 1]; each member's MSE is (5.95^2 + 1) / 2; ten of them
    assert logs["q_loss"].item() == pytest.approx(10 * (5.95**2 + 1.0) / 2, rel=1e-5)


def test_diagnostics_report_the_critics_spread_on_data_and_policy_actions():
    args = iql.Args(**LINEAR)
    q, q1, q2 = _twin(1, 1, 3, args)
    _linear(q1, [[0.0], [0.0], [0.0]], [1.0, 5.0, 2.0])
    _linear(q2, [[0.0], [0.0], [0.0]], [3.0, 5.0, 0.0])
    actor = iql.CategoricalActor(1, 3, args)
    _linear(actor.net[0], [[0.0], [0.0], [0.0]], [0.0, 1.0, 0.0])  # always action 1
    d = iql.diagnostics((torch.zeros(2, 1), torch.tensor([0, 2])), q, actor, args, discrete=True)
    # data actions 0 and 2: |1 - 3| / 2 = 1 and |2 - 0| / 2 = 1; the policy's action 1: both say 5, spread 0
    assert d["q_std_data"].item() == pytest.approx(1.0) and d["q_std_pi"].item() == pytest.approx(0.0)
    assert d["q_data"].item() == pytest.approx((1.0 + 0.0) / 2) and d["q_pi_minus_q_data"].item() == 4.5


def test_gaussian_actor_log_prob_is_a_diagonal_normal_around_tanh_mean_with_clamped_log_std():
    actor = iql.GaussianActor(2, 3, iql.Args(**LINEAR))
    _linear(actor.net[0], [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], [0.0, 0.0, 0.5])
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-7.0, 3.0, 0.5]))  # clamped to [-5, 2]: -5 and 2; 0.5 is inside
    obs = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    action = torch.tensor([[0.1, -0.2, 0.3], [-0.4, 0.5, 0.9]])
    mean = torch.tanh(torch.tensor([[0.5, -1.0, 2.0], [2.0, 0.0, 2.5]]))  # W s + b, worked out by hand
    std = torch.tensor([math.exp(-5.0), math.exp(2.0), math.exp(0.5)])
    # independent route: torch.distributions, per-dimension log-densities summed over the action dimension only
    expected = torch.distributions.Independent(torch.distributions.Normal(mean, std), 1).log_prob(action)
    torch.testing.assert_close(actor.log_prob(obs, action), expected)
    torch.testing.assert_close(actor.act(obs), mean)  # acts with the mean, not a sample


def test_deterministic_actor_log_prob_is_minus_squared_distance_to_tanh_mean():
    actor = iql.DeterministicActor(1, 2, iql.Args(**LINEAR))
    _linear(actor.net[0], [[0.0], [0.0]], [math.atanh(0.5), math.atanh(-0.5)])  # act = (0.5, -0.5) for any s
    action = torch.tensor([[0.25, 0.5], [0.5, -0.5]])
    # row 1: -((0.5 - 0.25)^2 + (-0.5 - 0.5)^2) = -(0.0625 + 1) = -1.0625; row 2: the action itself, 0
    assert actor.log_prob(torch.zeros(2, 1), action).tolist() == pytest.approx([-1.0625, 0.0], abs=1e-6)


def test_categorical_actor_log_prob_is_log_softmax_and_it_acts_greedily_per_state():
    actor = iql.CategoricalActor(2, 3, iql.Args(**LINEAR))
    _linear(actor.net[0], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [0.0, 0.0, 0.5])
    obs = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # logits [2, 0, 0.5] and [0, 3, 0.5]
    logits = torch.tensor([[2.0, 0.0, 0.5], [0.0, 3.0, 0.5]])
    expected = torch.distributions.Categorical(logits=logits).log_prob(torch.tensor([2, 0]))
    torch.testing.assert_close(actor.log_prob(obs, torch.tensor([2, 0])), expected)
    assert actor.act(obs).tolist() == [0, 1]  # the argmax of each row's own logits


def test_q_start_is_the_twin_min_at_the_actors_evaluation_action_box():
    args = iql.Args(**LINEAR)
    q, q1, q2 = _twin(1, 1, None, args)
    actor = iql.GaussianActor(1, 1, args)
    _linear(q1, [[0.0, 1.0]], [0.0])  # Q1(s, a) = a
    _linear(q2, [[0.0, -1.0]], [0.0])  # Q2(s, a) = -a
    _linear(actor.net[0], [[1.0]], [0.0])  # pi(s) = tanh(s)
    obs = torch.tensor([[math.atanh(0.5)], [math.atanh(-0.25)]])
    # pi = [0.5, -0.25]: Q1 = [0.5, -0.25], Q2 = [-0.5, 0.25]; min = [-0.5, -0.25] (Q2 then Q1 is the smaller)
    assert iql.pessimistic(q(obs, actor.act(obs)), 0.0).tolist() == pytest.approx([-0.5, -0.25], abs=1e-6)


def test_q_start_is_the_twin_min_at_the_actors_evaluation_action_discrete():
    args = iql.Args(**LINEAR)
    q, q1, q2 = _twin(1, 1, 3, args)
    actor = iql.CategoricalActor(1, 3, args)
    _linear(q1, [[0.0], [0.0], [0.0]], [1.0, 5.0, 2.0])  # Q1(s, .) = [1, 5, 2]
    _linear(q2, [[0.0], [0.0], [0.0]], [4.0, 3.0, 0.0])  # Q2(s, .) = [4, 3, 0]
    _linear(actor.net[0], [[1.0], [-1.0], [0.0]], [0.0, 0.0, 0.0])  # logits [s, -s, 0]
    obs = torch.tensor([[1.0], [-1.0], [0.0]])
    # pi = [0, 1, 0] (s = 0: tie -> first): min(Q1, Q2) at those actions = [min(1, 4), min(5, 3), min(1, 4)]
    assert iql.pessimistic(q(obs, actor.act(obs)), 0.0).tolist() == pytest.approx([1.0, 3.0, 1.0])


# One full IQL step on linear networks with plain SGD, checked against gradients derived by hand (no autograd).
LR_Q, LR_V, LR_ACTOR = 0.1, 0.2, 0.3
BOX_ARGS = dict(LINEAR, discount=0.99, tau=0.25, expectile=0.7, beta=2.0, max_weight=1.5)


def _box_step_setup():
    args = iql.Args(**BOX_ARGS)
    critics, q1, q2 = _twin(2, 1, None, args)
    critics_t, q1_t, q2_t = _twin(2, 1, None, args)
    _linear(q1, [[0.5, 0.5, 0.0]], [0.0])  # Q(s, a) = w . (s1, s2, a) + b
    _linear(q2, [[0.0, 0.0, 2.0]], [1.0])
    _linear(q1_t, [[1.0, 0.0, 1.0]], [0.0])
    _linear(q2_t, [[0.0, 1.0, 0.0]], [0.5])
    vf = iql.mlp(2, 1, [])
    _linear(vf[0], [[1.0, -1.0]], [0.25])
    actor = iql.GaussianActor(2, 1, args)
    _linear(actor.net[0], [[0.0, 0.0]], [0.0])  # mean tanh(0) = 0, log_std 0: N(0, 1) in every state
    q_opt = torch.optim.SGD(critics.parameters(), lr=LR_Q)
    v_opt = torch.optim.SGD(vf.parameters(), lr=LR_V)
    actor_opt = torch.optim.SGD(actor.parameters(), lr=LR_ACTOR)
    sched = torch.optim.lr_scheduler.LambdaLR(actor_opt, lambda k: 0.5**k)  # halves the actor's lr per step
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    actions = torch.tensor([[0.5], [-0.5]])
    rewards, next_obs, terminals = torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor(
        [0.0, 1.0])
    nets = dict(critics=critics, critics_target=critics_t, vf=vf, actor=actor, q_opt=q_opt, v_opt=v_opt,
                actor_opt=actor_opt, actor_sched=sched, args=args)
    views = dict(q1=q1, q2=q2, q1_target=q1_t, q2_target=q2_t)
    return (obs, actions, rewards, next_obs, terminals), nets, views


def _box_step_by_hand():
    """The expected parameters and logs after one step, from Sec. 6.2 of the reference with hand-derived gradients
    of the linear networks (B = 2; every loss is a batch mean)."""
    (s, a, r, s2, d), n, views = _box_step_setup()
    w = {k: views[k].weight.detach()[0].clone() for k in ("q1", "q2", "q1_target", "q2_target")}
    b = {k: views[k].bias.detach()[0].clone() for k in ("q1", "q2", "q1_target", "q2_target")}
    sa = torch.cat([s, a], 1)
    # (1) V: target min(Qt1, Qt2)(s, a) = min([1.5, -0.5], [0.5, 1.5]) = [0.5, -0.5]; V(s) = [1.25, -0.75]
    target_q = torch.minimum(sa @ w["q1_target"] + b["q1_target"], sa @ w["q2_target"] + b["q2_target"])
    wv, bv = torch.tensor([1.0, -1.0]), 0.25
    v_old = s @ wv + bv
    u = target_q - v_old  # [-0.75, 0.25]: expectile weights [0.3, 0.7]
    tau_w = torch.where(u > 0, 0.7, 0.3)
    dv = -2 * tau_w * u / 2  # dL_V / dV(s_i)
    wv, bv = wv - LR_V * (dv @ s), bv - LR_V * dv.sum()
    # (2) actor with the NEW V: adv = target_q - V_new(s); weights exp(2 adv) clipped at 1.5
    adv = target_q - (s @ wv + bv)
    weights = torch.exp(2.0 * adv).clamp(max=1.5)
    # log N(a; m, 1) = -(a - m)^2 / 2 - log(2 pi) / 2 at m = tanh(0) = 0 (tanh' = 1), log_std = 0:
    # d(-mean w log pi)/d bias = -mean(w a), /d W = -mean(w a s), /d log_std = -mean(w (a^2 - 1))
    logp = -(a[:, 0] ** 2) / 2 - 0.5 * math.log(2 * math.pi)
    wa = weights * a[:, 0]  # the actor starts at zero, so its new parameters are -lr * grad
    actor_w, actor_b = LR_ACTOR * (wa @ s) / 2, LR_ACTOR * wa.sum() / 2
    actor_log_std = LR_ACTOR * (weights * (a[:, 0] ** 2 - 1)).sum() / 2
    # (3) Q to the NEW V at s', no bootstrap at the terminal: y = r + 0.99 (1 - d) V_new(s')
    y = r + 0.99 * (1 - d) * (s2 @ wv + bv)
    q_loss, new = 0.0, {}
    for k in ("q1", "q2"):
        q = sa @ w[k] + b[k]
        q_loss = q_loss + ((q - y) ** 2).mean()
        dq = 2 * (q - y) / 2
        new[k] = (w[k] - LR_Q * (dq @ sa), b[k] - LR_Q * dq.sum())
    # (4) Polyak with tau = 0.25 towards the UPDATED online nets
    for k in ("q1", "q2"):
        t = k + "_target"
        new[t] = (w[t] + 0.25 * (new[k][0] - w[t]), b[t] + 0.25 * (new[k][1] - b[t]))
    logs = dict(v_loss=(tau_w * u**2).mean(), actor_loss=-(weights * logp).mean(), q_loss=q_loss, adv=adv.mean(),
                weights=weights.mean(), v=v_old.mean())
    return dict(new, vf=(wv, bv), actor=(actor_w, actor_b, actor_log_std)), logs


@pytest.fixture(scope="module")
def box_step_expected():
    expected, logs = _box_step_by_hand()
    # spot checks of the hand computation: target_q = [0.5, -0.5], V = [1.25, -0.75], u = [-0.75, 0.25],
    # dL_V/dV = -w u = [0.225, -0.175]; V_new: w = (1 - 0.2 * 0.225, -1 + 0.2 * 0.175), b = 0.25 - 0.2 * 0.05
    assert expected["vf"][0].tolist() == pytest.approx([0.955, -0.965])
    assert expected["vf"][1].item() == pytest.approx(0.24)
    assert logs["v_loss"].item() == pytest.approx((0.3 * 0.75**2 + 0.7 * 0.25**2) / 2)
    # V_new(s) = [1.195, -0.725]: adv = [-0.695, 0.225], exp(2 adv) = [0.249, 1.568]: the second is clipped to 1.5
    assert logs["adv"].item() == pytest.approx((-0.695 + 0.225) / 2, abs=1e-6)
    assert logs["weights"].item() == pytest.approx((math.exp(-1.39) + 1.5) / 2, abs=1e-6)
    return expected, logs


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("stale_grads", [False, True], ids=["clean", "stale-grads"])
def test_one_box_step_moves_every_network_by_hand_derived_sgd(box_step_expected, stale_grads):
    expected, _ = box_step_expected
    batch, nets, views = _box_step_setup()
    if stale_grads:  # gradients left over from elsewhere must be cleared before each backward, not accumulated
        for key in ("critics", "vf", "actor"):
            for p in nets[key].parameters():
                p.grad = torch.full_like(p, 100.0)
    iql.update(batch, **nets)
    for key in ("q1", "q2", "q1_target", "q2_target"):
        layer = views[key]
        torch.testing.assert_close(layer.weight.detach()[0], expected[key][0], msg=key)
        torch.testing.assert_close(layer.bias.detach()[0], expected[key][1], msg=key)
    torch.testing.assert_close(nets["vf"][0].weight.detach()[0], expected["vf"][0])
    torch.testing.assert_close(nets["vf"][0].bias.detach()[0], expected["vf"][1])
    actor = nets["actor"]
    torch.testing.assert_close(actor.net[0].weight.detach()[0], expected["actor"][0])
    torch.testing.assert_close(actor.net[0].bias.detach()[0], expected["actor"][1])
    torch.testing.assert_close(actor.log_std.detach()[0], expected["actor"][2])


def test_one_box_step_returns_the_hand_computed_losses_and_batch_means(box_step_expected):
    _, expected = box_step_expected
    batch, nets, _ = _box_step_setup()
    logs = iql.update(batch, **nets)
    assert set(logs) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(logs[key].detach(), value, msg=key)


def test_one_step_advances_the_actor_schedule_once_after_its_optimiser_step():
    batch, nets, _ = _box_step_setup()
    iql.update(batch, **nets)
    # LambdaLR(0.5^k): the step just taken used LR_ACTOR (checked above), the next one uses LR_ACTOR / 2
    assert nets["actor_opt"].param_groups[0]["lr"] == pytest.approx(LR_ACTOR / 2)


def test_with_zero_learning_rates_only_the_targets_move_by_polyak_towards_their_own_twin():
    batch, nets, views = _box_step_setup()
    for key in ("q_opt", "v_opt", "actor_opt"):  # lr 0: only Polyak can still move anything
        for group in nets[key].param_groups:
            group["lr"] = 0.0
    before = {k: _params(nets[k]) for k in ("critics", "critics_target", "vf", "actor")}
    twins = {k: (views[k].weight.detach().clone(), views[k].bias.detach().clone())
             for k in ("q1", "q2", "q1_target", "q2_target")}
    iql.update(batch, **nets)
    for k in ("critics", "vf", "actor"):
        for p, p0 in zip(nets[k].parameters(), before[k]):
            torch.testing.assert_close(p.detach(), p0, msg=k)
    # targets: t + 0.25 (online - t), each towards its own twin (q1 and q2 differ)
    for k in ("q1", "q2"):
        (w0, b0), (w_online, b_online) = twins[k + "_target"], twins[k]
        torch.testing.assert_close(views[k + "_target"].weight.detach(), w0 + 0.25 * (w_online - w0), msg=k)
        torch.testing.assert_close(views[k + "_target"].bias.detach(), b0 + 0.25 * (b_online - b0), msg=k)


def test_one_discrete_step_moves_only_the_data_actions_q_entries_and_the_policy_towards_weighted_data():
    args = iql.Args(**LINEAR, discount=0.5, tau=0.5, expectile=0.7, beta=1.0)
    critics, q1, q2 = _twin(1, 1, 3, args)
    critics_t, q1_t, q2_t = _twin(1, 1, 3, args)
    for q in (q1, q2):
        _linear(q, [[0.0], [0.0], [0.0]], [0.0, 0.0, 0.0])
    _linear(q1_t, [[0.0], [0.0], [0.0]], [1.0, 2.0, 9.0])  # Q1t(s, .) = [1, 2, 9]
    _linear(q2_t, [[0.0], [0.0], [0.0]], [3.0, 1.0, 9.0])  # Q2t(s, .) = [3, 1, 9]
    vf = iql.mlp(1, 1, [])
    _linear(vf[0], [[1.0]], [0.0])  # V(s) = s
    actor = iql.CategoricalActor(1, 3, args)
    _linear(actor.net[0], [[0.0], [0.0], [0.0]], [0.0, 0.0, 0.0])  # uniform policy
    opts = [torch.optim.SGD(p, lr=lr) for p, lr in ((critics.parameters(), 0.5),
                                                   (vf.parameters(), 0.0), (actor.parameters(), 1.0))]
    sched = torch.optim.lr_scheduler.LambdaLR(opts[2], lambda _: 1.0)
    obs, actions = torch.tensor([[0.0], [0.0]]), torch.tensor([0, 1])
    batch = (obs, actions, torch.tensor([1.0, 0.0]), torch.tensor([[2.0], [4.0]]), torch.tensor([0.0, 0.0]))
    logs = iql.update(batch, critics=critics, critics_target=critics_t, vf=vf, actor=actor, q_opt=opts[0],
                      v_opt=opts[1], actor_opt=opts[2], actor_sched=sched, args=args)
    # V target: the data action's min(Q1t, Q2t): a = 0 -> min(1, 3) = 1, a = 1 -> min(2, 1) = 1 (never the 9s)
    assert logs["v_loss"].item() == pytest.approx(0.7 * 1.0)
    # Q target y = r + 0.5 V(s') = [1 + 1, 0 + 2] = [2, 2]; dL/dQ1 = 2 (0 - 2) / 2 = -2 per transition, only
    # on the data action's head: bias of Q1 moves by -0.5 * -2 = +1 on heads 0 and 1, head 2 is untouched
    assert q1.bias.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert q2.bias.tolist() == pytest.approx([1.0, 1.0, 0.0])
    # targets: halfway (tau 0.5) towards the new online heads
    assert q1_t.bias.tolist() == pytest.approx([1.0, 1.5, 4.5])
    # actor: adv = 1 - V(0) = 1, weights e^1; d(-mean w log softmax[a])/d logits_i = -w (onehot(a_i) - 1/3) / 2
    # summed over the two transitions: -(e / 2) (1/3, 1/3, -2/3); SGD with lr 1 moves the bias by (e / 6, e / 6, -e / 3)
    e = math.e
    assert actor.net[0].bias.tolist() == pytest.approx([e / 6, e / 6, -e / 3], rel=1e-5)
    assert logs["actor_loss"].item() == pytest.approx(e * math.log(3.0), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dataset,extra", [("pendulum-medium", []), ("cartpole-medium", []),
                                           ("pendulum-medium", ["--deterministic-actor", "--normalize-obs"])])
def test_smoke_train_save_and_reload(tmp_path, dataset, extra):
    flags = ["--dataset", dataset, "--total-steps", "200", "--eval-every", "100", "--eval-episodes", "1",
             "--log-every", "100", "--batch-size", "64", "--save-model", "--checkpoint-every", "100",
             "--device", "cpu", *extra]
    out = run_script("iql.py", *flags, cwd=tmp_path)
    assert "step      200/200" in out and "eval normalized" in out
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


@pytest.mark.slow
def test_tensorboard_has_the_contract_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script("iql.py", "--dataset", "cartpole-medium", "--total-steps", "100", "--eval-every", "100",
               "--eval-episodes", "1", "--log-every", "50", "--batch-size", "32", cwd=tmp_path)
    acc = EventAccumulator(str(next((tmp_path / "runs").iterdir()))).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("eval/return", "eval/normalized_score", "charts/SPS", "losses/q_loss", "losses/v_loss",
                "losses/actor_loss", "diagnostics/q_data", "diagnostics/q_pi_minus_q_data",
                "diagnostics/action_mismatch", "diagnostics/q_std_data", "diagnostics/q_std_pi", "eval/q_start",
                "eval/discounted_return"):
        assert tag in tags, tag


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_reward_scaling_auto_follows_the_authors_rule_per_dataset():
    # the authors' train_offline.py: 1000 / return range on hopper / halfcheetah / walker2d, r - 1 on AntMaze
    assert iql.authors_reward_scaling("hopper-medium") == "return-range"
    assert iql.authors_reward_scaling("mujoco/walker2d/medium-v0") == "return-range"
    assert iql.authors_reward_scaling("/data/HalfCheetah-expert.npz") == "return-range"
    assert iql.authors_reward_scaling("D4RL/antmaze/umaze-v1") == "minus-one"
    assert iql.authors_reward_scaling("lunarlander-medium") == "none"
    assert iql.Args().reward_scaling == "auto"


def test_reward_transform_of_each_rule():
    # three episodes (terminal after rows 1 and 4, the data's end after row 5): returns 3, 12, -1, range 13
    import numpy as np

    import datasets as D

    n = 6
    obs = np.zeros((n, 1), np.float32)
    ds = D.Dataset(observations=obs, actions=np.zeros((n, 1), np.float32), next_observations=obs,
                   rewards=np.array([1, 2, 3, 4, 5, -1], np.float32), terminals=np.array([0, 1, 0, 0, 1, 0], bool),
                   timeouts=np.zeros(n, bool))
    assert iql.reward_transform(ds, "none") == (1.0, 0.0)
    assert iql.reward_transform(ds, "minus-one") == (1.0, -1.0)  # the authors' AntMaze r - 1
    assert iql.reward_transform(ds, "return-range") == (1000.0 / 13.0, 0.0)  # 1000 / (max - min return)
    flat = D.Dataset(**{**{k: getattr(ds, k) for k in D.ARRAY_KEYS}, "rewards": np.zeros(n, np.float32)})
    assert iql.reward_transform(flat, "return-range") == (1000.0 / 1e-6, 0.0)  # equal returns: no division by 0
