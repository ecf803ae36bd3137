"""Specifications of bcq.py: the discrete ratio filter, the perturbation bound, the soft clipped double-Q target,
the VAE's KL term, known-answer tests of every ALGO LOGIC function (one plain-SGD step of each update on tiny linear
stand-in networks, checked against a hand computation), and an end-to-end smoke run (train, save, reload) for a Box
and a Discrete dataset."""

import math

import pytest
import torch
import torch.nn as nn

import bcq
from tests.conftest import run_script


class Fixed(nn.Module):
    """A stand-in network that returns the same row of outputs for every observation."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.as_tensor(row, dtype=torch.float32)

    def forward(self, obs):
        return self.row.expand(obs.shape[0], -1)


class Given(nn.Module):
    """A stand-in network that returns the given (batch, n_actions) tensor, whatever the observations."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, obs):
        return self.out


def masked_argmax(q, logits, threshold):
    """The Discrete BCQ choice for per-state Q values and imitation logits."""
    agent = bcq.DiscreteBCQ(obs_dim=1, n_actions=q.shape[1], args=bcq.Args(bcq_threshold=threshold))
    agent.q, agent.imitation = Given(q), Given(logits)
    return agent.act(torch.zeros(q.shape[0], 1))


def ratio_to_max(logits):
    """G(a|s) / max_b G(b|s), computed the plain way (softmax, then divide) as an independent reference."""
    probs = logits.softmax(1)
    return probs / probs.max(1, keepdim=True).values


# (1) Discrete BCQ: the chosen action always passes G(a|s) / max G(b|s) > threshold
def test_discrete_bcq_skips_the_best_q_action_when_the_imitation_filter_rules_it_out():
    # G = (0.6, 0.15, 0.25): ratios 1, 0.25, 0.42. Threshold 0.3 rules out action 1, the one with the best Q
    agent = bcq.DiscreteBCQ(obs_dim=4, n_actions=3, args=bcq.Args(bcq_threshold=0.3))
    agent.imitation = Fixed(torch.log(torch.tensor([0.6, 0.15, 0.25])))
    agent.q = Fixed([0.0, 10.0, 1.0])
    assert agent.act(torch.zeros(5, 4)).tolist() == [2] * 5
    agent.threshold = 0.2  # now action 1 passes (0.25 > 0.2) and wins on Q
    assert agent.act(torch.zeros(5, 4)).tolist() == [1] * 5


def test_discrete_bcq_ratio_test_is_strict():
    # an action of probability exactly 0 has ratio 0: with threshold 0 it is still excluded (0 > 0 is false)
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert bcq.allowed_actions(logits, threshold=0.0).tolist() == [[True, False, True]]
    assert masked_argmax(torch.tensor([[0.0, 100.0, -1.0]]), logits, threshold=0.0).tolist() == [0]


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 0.7, 0.95])
def test_discrete_bcq_choice_is_the_best_q_among_allowed_actions_on_random_cases(threshold):
    g = torch.Generator().manual_seed(0)
    logits, q = torch.randn(4000, 6, generator=g) * 3, torch.randn(4000, 6, generator=g)
    chosen = masked_argmax(q, logits, threshold)
    ratio = ratio_to_max(logits)
    assert (ratio.gather(1, chosen[:, None]) > threshold).all()
    best_allowed = torch.where(ratio > threshold, q, float("-inf")).max(1).values
    assert torch.equal(q.gather(1, chosen[:, None]).squeeze(1), best_allowed)


def test_discrete_target_selects_with_online_nets_and_evaluates_with_the_target_q():
    args = bcq.Args(bcq_threshold=0.3, discount=0.9)
    agent = bcq.DiscreteBCQ(obs_dim=4, n_actions=3, args=args)
    agent.imitation = Fixed(torch.log(torch.tensor([0.6, 0.15, 0.25])))  # action 1 filtered out
    agent.q = Fixed([0.0, 10.0, 1.0])  # online choice among {0, 2}: action 2
    q_target = Fixed([9.0, 50.0, 7.0])  # selecting on the target would give 0, ignoring the filter would give 1
    y = bcq.discrete_target(torch.tensor([1.0, 1.0]), torch.zeros(2, 4), torch.tensor([0.0, 1.0]), agent, q_target,
                            args)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 7.0, 1.0]))


# (2) Box BCQ: the perturbation is at most phi * max_action and the action stays in [-1, 1]
@pytest.mark.parametrize("phi", [0.05, 0.5])
def test_perturbation_never_exceeds_phi_and_stays_in_the_action_box(phi):
    torch.manual_seed(0)
    actor = bcq.Perturbation(obs_dim=3, act_dim=2, phi=phi)
    with torch.no_grad():
        for p in actor.parameters():
            p.mul_(1e4)  # huge raw outputs: tanh saturates
    obs = torch.randn(512, 3) * 10
    actions = torch.rand(512, 2) * 2 - 1
    actions[:4] = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])  # the box's corners
    assert actor.net(torch.cat([obs, actions], 1)).abs().max() > 1e3
    out = actor(obs, actions)
    assert ((out - actions).abs() <= phi + 1e-6).all()
    assert out.min() >= -1.0 and out.max() <= 1.0
    raw = torch.full_like(actions, 1e30) * torch.sign(torch.randn_like(actions))
    direct = bcq.perturb(actions, raw, phi)
    assert ((direct - actions).abs() <= phi + 1e-6).all() and direct.abs().max() <= 1.0


def test_box_policy_acts_inside_the_action_box():
    torch.manual_seed(0)
    agent = bcq.BoxBCQ(obs_dim=3, act_dim=2, args=bcq.Args(n_select_samples=7))
    a = agent.act(torch.randn(16, 3) * 100)
    assert a.shape == (16, 2) and a.abs().max() <= 1.0


# (3) Box BCQ: the soft clipped double-Q target
def test_soft_clipped_double_q_on_a_hand_computed_case():
    # two states, two candidates each; rows grouped by state: [s0 c0, s0 c1, s1 c0, s1 c1]
    q1, q2 = torch.tensor([1.0, 3.0, 5.0, 0.0]), torch.tensor([2.0, 0.0, 5.0, 8.0])
    # s0: 0.75 * 1 + 0.25 * 2 = 1.25 and 0.75 * 0 + 0.25 * 3 = 0.75 -> 1.25;  s1: 5 and 0.25 * 8 = 2 -> 5
    assert torch.allclose(bcq.soft_clipped_double_q(q1, q2, n=2, lmbda=0.75), torch.tensor([1.25, 5.0]))
    # lambda = 1 is clipped double Q (the min), lambda = 0 the max
    assert torch.allclose(bcq.soft_clipped_double_q(q1, q2, n=2, lmbda=1.0), torch.tensor([1.0, 5.0]))
    assert torch.allclose(bcq.soft_clipped_double_q(q1, q2, n=2, lmbda=0.0), torch.tensor([3.0, 8.0]))


def test_box_target_groups_candidates_by_state_with_repeat_interleave():
    """Each next state's candidates must be compared only with each other. The stub critic adds 100 * state id to
    every value, so candidates mixed across states (as `.repeat` tiling would do) give a different answer."""
    args = bcq.Args(n_target_samples=4, lmbda=0.75, discount=0.9)
    seen = {}

    class StubVAE:
        def decode(self, obs):
            seen["obs"], seen["a"] = obs.clone(), torch.randn(obs.shape[0], 2)
            return seen["a"]

    def actor_target(obs, a):
        return a

    def critic_target(obs, a):
        return 100 * obs[:, 0] + a[:, 0], 100 * obs[:, 0] + a[:, 1]

    torch.manual_seed(0)
    next_obs = torch.tensor([[0.0], [1.0], [2.0]])
    rewards, terminals = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.0])
    y = bcq.box_target(rewards, next_obs, terminals, StubVAE(), actor_target, critic_target, args)
    assert torch.equal(seen["obs"][:, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [2.0] * 4))
    expected = []
    for i in range(3):
        a = seen["a"][seen["obs"][:, 0] == i]
        soft = 0.75 * a.min(1).values + 0.25 * a.max(1).values
        expected.append(rewards[i] + 0.9 * (1 - terminals[i]) * (100 * i + soft.max()))
    assert torch.allclose(y, torch.stack(expected))


# (4) Box BCQ: the VAE's KL term is a mean over batch and latent dimensions
def test_vae_kl_on_a_known_case():
    mean, std = torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [math.e, 1.0]])
    # per element: 0, 0.5 * 1^2 = 0.5, 0.5 * (e^2 - 1 - 2 * 1) = 0.5 * (e^2 - 3), 0; averaged over the 4 elements
    expected = (0.5 + 0.5 * (math.e**2 - 3)) / 4
    assert math.isclose(bcq.vae_kl(mean, std).item(), expected, rel_tol=1e-5)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                  torch.distributions.Normal(0.0, 1.0)).mean()
    assert torch.allclose(bcq.vae_kl(mean, std), reference)
    # a mean, not a sum: duplicating the latent dimensions leaves it unchanged
    assert torch.allclose(bcq.vae_kl(mean.repeat(1, 3), std.repeat(1, 3)), bcq.vae_kl(mean, std))


def test_vae_clamps_log_std_to_minus_4_in_the_encoder():
    vae = bcq.VAE(obs_dim=3, act_dim=1)
    with torch.no_grad():
        last = vae.encoder[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, -100.0, -100.0]))  # (mean, mean, log_std, log_std)
    _, mean, std = vae(torch.randn(5, 3), torch.zeros(5, 1))
    assert torch.allclose(std, torch.full_like(std, math.exp(-4.0))) and torch.equal(mean, torch.zeros_like(mean))


# (5) Known answers for every piece of the ALGO LOGIC. Tiny stand-in networks (nn.Linear with chosen weights) make
# each output and gradient computable by hand; one plain-SGD step (lr > 0) is then compared with that hand computation.
def linear(weight, bias) -> nn.Linear:
    """nn.Linear with the given weight (out x in) and bias."""
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


class LatentOut(nn.Module):
    """A stand-in decoder that returns its latent input z unchanged (the input is cat([obs, z]))."""

    def __init__(self, obs_dim):
        super().__init__()
        self.obs_dim = obs_dim

    def forward(self, x):
        return x[:, self.obs_dim:]


def layer_sizes(net):
    return [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)]


def test_networks_have_the_authors_layer_sizes():
    # reference card 2.1 and 3.1: VAE 750-750 with latent 2 * act_dim, actor and each critic head 400-300,
    # discrete Q and imitation 256-256 (obs_dim 3, act_dim 2, 4 discrete actions)
    vae = bcq.VAE(obs_dim=3, act_dim=2)
    assert vae.latent_dim == 4
    assert layer_sizes(vae.encoder) == [(5, 750), (750, 750), (750, 8)]  # -> (mean, log_std), 4 each
    assert layer_sizes(vae.decoder) == [(7, 750), (750, 750), (750, 2)] and isinstance(vae.decoder[-1], nn.Tanh)
    assert layer_sizes(bcq.Perturbation(obs_dim=3, act_dim=2, phi=0.05).net) == [(5, 400), (400, 300), (300, 2)]
    critic = bcq.Critic(obs_dim=3, act_dim=2)
    assert critic.net1 is not critic.net2
    for head in (critic.net1, critic.net2):
        assert layer_sizes(head) == [(5, 400), (400, 300), (300, 1)]
    agent = bcq.DiscreteBCQ(obs_dim=3, n_actions=4, args=bcq.Args())
    for net in (agent.q, agent.imitation):
        assert layer_sizes(net) == [(3, 256), (256, 256), (256, 4)]


def test_vae_forward_reparameterises_an_unclipped_latent_with_log_std_clamped_to_minus_4_and_15():
    vae = bcq.VAE(obs_dim=1, act_dim=2)  # latent 4: the encoder's 8 outputs are (mean x4, log_std x4)
    with torch.no_grad():
        vae.encoder[-1].weight.zero_()
        vae.encoder[-1].bias.copy_(torch.tensor([0.5, -2.0, 3.0, 0.0, math.log(0.5), -100.0, 20.0, 0.0]))
    vae.decoder = LatentOut(obs_dim=1)  # recon = z
    torch.manual_seed(3)
    recon, mean, std = vae(torch.randn(6, 1), torch.rand(6, 2))
    # log_std clamped to [-4, 15]: std = (0.5, e^-4, e^15, 1); z = mean + std * eps, eps the next normal draw
    torch.manual_seed(3)
    torch.randn(6, 1), torch.rand(6, 2)  # the draws that made the inputs
    eps = torch.randn(6, 4)
    expected_mean = torch.tensor([0.5, -2.0, 3.0, 0.0]).expand(6, 4)
    expected_std = torch.tensor([0.5, math.exp(-4.0), math.exp(15.0), 1.0]).expand(6, 4)
    assert torch.allclose(mean, expected_mean) and torch.allclose(std, expected_std, rtol=1e-5)
    assert torch.allclose(recon, expected_mean + expected_std * eps, rtol=1e-5, atol=1e-6)
    assert (recon[:, 1] < -1.5).all()  # mean -2, std e^-4: no [-0.5, 0.5] clip on the training latent


def test_vae_decode_clips_the_prior_latent_to_plus_minus_half_but_not_a_given_latent():
    vae = bcq.VAE(obs_dim=1, act_dim=1)  # latent 2
    vae.decoder = LatentOut(obs_dim=1)  # decode returns the latent it was given or drew
    torch.manual_seed(0)
    z = vae.decode(torch.zeros(4000, 1))
    torch.manual_seed(0)
    assert torch.equal(z, torch.randn(4000, 2).clamp(-0.5, 0.5))  # z ~ N(0, I) clipped to [-0.5, 0.5]
    # P(|z| > 0.5) = 0.617 for a standard normal: both bounds are hit, and the rest is spread inside them
    assert z.min() == -0.5 and z.max() == 0.5 and 0.3 < (z.abs() < 0.5).float().mean() < 0.45
    given = torch.tensor([[3.0, -2.0]])
    assert torch.equal(vae.decode(torch.zeros(1, 1), given), given)


def test_perturb_adds_phi_tanh_raw_and_clamps_to_the_box():
    action = torch.tensor([[0.2, -0.3, 0.98, -0.98, 0.5]])
    raw = torch.tensor([[math.atanh(0.5), math.atanh(-0.5), 100.0, -100.0, 0.0]])  # tanh: 0.5, -0.5, 1, -1, 0
    # phi = 0.1: 0.2 + 0.05, -0.3 - 0.05, 0.98 + 0.1 -> 1, -0.98 - 0.1 -> -1, 0.5 + 0
    expected = torch.tensor([[0.25, -0.35, 1.0, -1.0, 0.5]])
    assert torch.allclose(bcq.perturb(action, raw, phi=0.1), expected)
    actor = bcq.Perturbation(obs_dim=1, act_dim=5, phi=0.1)
    actor.net = linear([[0.0] * 6] * 5, raw[0].tolist())  # raw output independent of the input
    assert torch.allclose(actor(torch.tensor([[7.0]]), action), expected)


def test_critic_returns_both_heads_and_q1_is_head_one():
    critic = bcq.Critic(obs_dim=1, act_dim=1)
    critic.net1 = linear([[0.5, 1.0]], [0.0])  # Q1 = 0.5 s + a
    critic.net2 = linear([[-0.5, 0.25]], [0.5])  # Q2 = -0.5 s + 0.25 a + 0.5
    obs, act = torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.2], [-0.4]])
    q1, q2 = critic(obs, act)
    assert torch.allclose(q1, torch.tensor([0.45, -0.9])) and torch.allclose(q2, torch.tensor([0.3, 0.9]))
    assert torch.allclose(critic.q1(obs, act), torch.tensor([0.45, -0.9]))


def test_q_value_is_q_at_the_action_for_discrete_and_min_of_both_heads_for_box():
    agent = bcq.DiscreteBCQ(obs_dim=1, n_actions=3, args=bcq.Args())
    agent.q = linear([[1.0], [-1.0], [0.5]], [0.0, 0.5, 0.2])  # Q(s) = (s, 0.5 - s, 0.5 s + 0.2)
    # s = 1, a = 2: 0.7;  s = -0.5, a = 1: 1.0;  s = 0, a = 0: 0
    q = bcq.q_value(agent, torch.tensor([[1.0], [-0.5], [0.0]]), torch.tensor([2, 1, 0]), discrete=True)
    assert torch.allclose(q, torch.tensor([0.7, 1.0, 0.0]))
    box = bcq.BoxBCQ(obs_dim=1, act_dim=1, args=bcq.Args())
    box.critic.net1 = linear([[0.5, 1.0]], [0.0])
    box.critic.net2 = linear([[-0.5, 0.25]], [0.5])
    # (Q1, Q2) = (0.45, 0.3) and (-0.9, 0.9) (as in the critic test): the min is Q2 in row 0, Q1 in row 1
    q = bcq.q_value(box, torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.2], [-0.4]]), discrete=False)
    assert torch.allclose(q, torch.tensor([0.3, -0.9]))


class CandidateVAE(nn.Module):
    """decode(obs): candidate j of each state is (s, C[j]) when rows are grouped by state (row i*n + j)."""

    C = torch.tensor([0.1, 0.7, -0.2])

    def decode(self, obs):
        return torch.stack([obs[:, 0], self.C[torch.arange(obs.shape[0]) % 3]], 1)


class DistanceCritic(nn.Module):
    """Q1(s, a) = -(a_1 - s)^2 prefers the candidate closest to s; Q2 = +(a_1 - s)^2 prefers the farthest."""

    def q1(self, obs, a):
        return -((a[:, 1] - obs[:, 0]) ** 2)

    def forward(self, obs, a):
        return self.q1(obs, a), -self.q1(obs, a)


def test_box_act_perturbs_each_states_own_candidates_and_keeps_the_best_by_q1():
    agent = bcq.BoxBCQ(obs_dim=1, act_dim=2, args=bcq.Args(n_select_samples=3, phi=0.1))
    agent.vae, agent.critic = CandidateVAE(), DistanceCritic()
    agent.actor.net = linear([[0.0] * 3] * 2, [0.0, math.atanh(0.5)])  # adds (0, 0.1 * 0.5) to every candidate
    # perturbed candidates' second coordinate: 0.15, 0.75, -0.15; the closest to s = 0.15, 0.7, -0.2 is
    # candidate 0, 1, 2 respectively (Q2 or argmin would pick the farthest; no perturbation would give 0.1, 0.7, -0.2)
    a = agent.act(torch.tensor([[0.15], [0.7], [-0.2]]))
    assert torch.allclose(a, torch.tensor([[0.15, 0.15], [0.7, 0.75], [-0.2, -0.15]]))


def test_vae_kl_matches_torch_distributions_on_means_and_stds_away_from_0_and_1():
    mean, std = torch.tensor([[0.5, -2.0], [1.5, 0.3]]), torch.tensor([[0.5, 2.0], [1.0, 0.2]])
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                  torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(bcq.vae_kl(mean, std), reference.mean())


# A Box batch of two transitions: s, a, r, s', terminal (a = 0.4 s, which the tiny VAE below reconstructs exactly)
BOX_BATCH = (torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.2], [-0.4]]), torch.tensor([1.0, 2.0]),
             torch.tensor([[1.5], [0.25]]), torch.tensor([0.0, 1.0]))


def tiny_box(args):
    """A Box agent of linear stand-ins (obs_dim = act_dim = 1, latent 2) and its targets, for hand computation."""
    agent = bcq.BoxBCQ(obs_dim=1, act_dim=1, args=args)
    # encoder: mean = (0.5, -1), log_std = (ln 2, ln 2) whatever the input; decoder: 0.4 s, ignoring z
    agent.vae.encoder = linear([[0.0, 0.0]] * 4, [0.5, -1.0, math.log(2.0), math.log(2.0)])
    agent.vae.decoder = linear([[0.4, 0.0, 0.0]], [0.0])
    agent.actor.net = linear([[0.0, 0.0]], [0.0])  # raw = 0: actor(s, a) = a, and d actor / d raw = phi
    agent.critic.net1 = linear([[0.5, 1.0]], [0.0])  # Q1 = 0.5 s + a
    agent.critic.net2 = linear([[-0.5, 0.25]], [0.5])  # Q2 = -0.5 s + 0.25 a + 0.5
    actor_target = bcq.Perturbation(obs_dim=1, act_dim=1, phi=args.phi)
    actor_target.net = linear([[0.0, 0.0]], [100.0])  # a + 2.5 * tanh(100) >= 1: every target candidate is +1
    critic_target = bcq.Critic(obs_dim=1, act_dim=1)
    critic_target.net1 = linear([[1.0, 2.0]], [0.0])  # Q1' = s + 2 a
    critic_target.net2 = linear([[-1.0, 0.5]], [1.0])  # Q2' = -s + 0.5 a + 1
    return agent, actor_target, critic_target


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_update_box_one_sgd_step_matches_the_hand_computation():
    args = bcq.Args(phi=2.5, lmbda=0.75, discount=0.9, tau=0.25, kl_weight=0.5, n_target_samples=3)
    agent, actor_target, critic_target = tiny_box(args)
    lr = 0.1
    opts = {f"{name}_opt": torch.optim.SGD(getattr(agent, name).parameters(), lr=lr)
            for name in ("vae", "critic", "actor")}
    for p in agent.parameters():
        p.grad = torch.ones_like(p)  # stale gradients: each loss must start from zero
    old_targets = params(actor_target), params(critic_target)
    s, a, r, s2, d = BOX_BATCH
    x_sa = torch.cat([s, a], 1)
    logs = bcq.update_box(BOX_BATCH, 1, agent=agent, actor_target=actor_target, critic_target=critic_target,
                          args=args, **opts)

    # (1) VAE. recon = 0.4 s = a exactly: the MSE and its gradients are 0, so the decoder does not move.
    # KL per element -0.5 (1 + 2 log sigma - mu^2 - sigma^2), averaged over B * L = 4 elements; its gradient per row
    # w.r.t. (mu, log sigma) is (mu, sigma^2 - 1) / 4 = (0.5, -1, 3, 3) / 4, times kl_weight 0.5.
    g_row = 0.5 * torch.tensor([0.5, -1.0, 3.0, 3.0]) / 4
    enc_w, enc_b = agent.vae.encoder.weight, agent.vae.encoder.bias
    assert torch.allclose(enc_b, torch.tensor([0.5, -1.0, math.log(2.0), math.log(2.0)]) - lr * 2 * g_row)
    assert torch.allclose(enc_w, -lr * torch.outer(g_row, x_sa.sum(0)))  # inputs (s, a) summed: (-0.5, -0.2)
    assert torch.equal(agent.vae.decoder.weight, torch.tensor([[0.4, 0.0, 0.0]]))
    assert torch.equal(agent.vae.decoder.bias, torch.tensor([0.0]))
    mu, sigma = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 2.0])
    kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * sigma.log()).mean()
    assert torch.allclose(logs["vae_kl"], kl) and torch.allclose(logs["vae_loss"], 0.5 * kl)

    # (2) Critic. Target candidates are +1: Q1'(s', 1) = (3.5, 2.25), Q2'(s', 1) = (0, 1.25);
    # 0.75 min + 0.25 max = (0.875, 1.5); y = r + 0.9 (1 - d) * that = (1 + 0.7875, 2) (s'_2 is terminal)
    y = torch.tensor([1.7875, 2.0])
    assert torch.allclose(logs["target_q"], y.mean())
    x = torch.cat([s, a, torch.ones(2, 1)], 1)  # d Q / d (w_s, w_a, b) = (s, a, 1)
    q1, q2 = torch.tensor([0.45, -0.9]), torch.tensor([0.3, 0.9])  # online Q1 = 0.5 s + a, Q2 = -0.5 s + 0.25 a + 0.5
    assert torch.allclose(logs["critic_loss"], ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean())
    new1 = torch.tensor([0.5, 1.0, 0.0]) - lr * 2 * (q1 - y) @ x / 2  # d mse / d theta = 2 mean((Q - y) x)
    new2 = torch.tensor([-0.5, 0.25, 0.5]) - lr * 2 * (q2 - y) @ x / 2
    for head, new in ((agent.critic.net1, new1), (agent.critic.net2, new2)):
        assert torch.allclose(torch.cat([head.weight[0], head.bias]), new)

    # (3) Actor, through the UPDATED Q1. sampled = decode(s) = 0.4 s = (0.2, -0.4); actor(s, sampled) = sampled;
    # loss = -mean Q1(s, actor(s, sampled)): d loss / d raw_i = -w_a * phi / 2 (tanh'(0) = 1, no clamp)
    sampled = 0.4 * s
    assert torch.allclose(logs["actor_loss"], -(new1[0] * s[:, 0] + new1[1] * sampled[:, 0] + new1[2]).mean())
    g_raw = -new1[1] * args.phi / 2
    actor_net = agent.actor.net
    assert torch.allclose(actor_net.bias, -lr * 2 * g_raw[None])
    assert torch.allclose(actor_net.weight, -lr * g_raw * torch.cat([s, sampled], 1).sum(0, keepdim=True))

    # (4) Polyak: target <- 0.75 target + 0.25 online, for the actor and the critic (the VAE has no target)
    for target, online, old in ((actor_target, agent.actor, old_targets[0]), (critic_target, agent.critic,
                                                                                old_targets[1])):
        for tp, p, before in zip(target.parameters(), online.parameters(), old):
            assert torch.allclose(tp, 0.75 * before + 0.25 * p)


# A Discrete batch of three transitions (obs_dim 1, 3 actions); the third is terminal
DISCRETE_BATCH = (torch.tensor([[1.0], [-0.5], [0.0]]), torch.tensor([2, 1, 0]), torch.tensor([0.5, -2.0, 0.5]),
                  torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([0.0, 0.0, 1.0]))
G_PROBS = [0.6, 0.15, 0.25]  # G(.|s) for every s: ratios 1, 0.25, 0.42, so threshold 0.3 rules out action 1


def tiny_discrete(args):
    agent = bcq.DiscreteBCQ(obs_dim=1, n_actions=3, args=args)
    agent.q = linear([[1.0], [-1.0], [0.5]], [0.0, 0.5, 0.2])  # Q(s) = (s, 0.5 - s, 0.5 s + 0.2)
    agent.imitation = linear([[0.0]] * 3, [math.log(p) for p in G_PROBS])
    q_target = linear([[0.5], [2.0], [-1.0]], [1.0, 0.0, 3.0])  # Q'(s) = (0.5 s + 1, 2 s, 3 - s)
    return agent, q_target


def test_update_discrete_one_sgd_step_matches_the_hand_computation():
    args = bcq.Args(bcq_threshold=0.3, discount=0.9, tau=0.25, logit_penalty=1e-2, target_update_every=0)
    agent, q_target = tiny_discrete(args)
    old_target = params(q_target)
    lr = 0.1
    opt = torch.optim.SGD(agent.parameters(), lr=lr)
    for p in agent.parameters():
        p.grad = torch.ones_like(p)  # stale gradients: the loss must start from zero
    logs = bcq.update_discrete(DISCRETE_BATCH, 7, agent=agent, q_target=q_target, opt=opt, args=args)
    s, a = DISCRETE_BATCH[0][:, 0], DISCRETE_BATCH[1]

    # Target: allowed {0, 2}. s' = 2: online Q = (2, -1.5, 1.2) -> a' = 0, Q'(2)[0] = 2 -> y = 0.5 + 0.9 * 2 = 2.3.
    # s' = -1: online Q = (-1, 1.5, -0.3) -> a' = 2 (1 is filtered), Q'(-1)[2] = 4 -> y = -2 + 0.9 * 4 = 1.6.
    # s' = 0.5 is terminal: y = 0.5. (Choosing a' with Q' would give 1 and 2; scoring with online Q: 2, -0.3.)
    y = torch.tensor([2.3, 1.6, 0.5])
    assert torch.allclose(logs["target_q"], y.mean())
    # Q(s, a): Q(1)[2] = 0.7, Q(-0.5)[1] = 1.0, Q(0)[0] = 0; delta = Q - y = (-1.6, -0.6, -0.5)
    delta = torch.tensor([-1.6, -0.6, -0.5])
    huber = torch.tensor([1.6 - 0.5, 0.5 * 0.6**2, 0.5 * 0.5**2])  # |d| - 0.5 beyond 1, d^2 / 2 inside
    assert torch.allclose(logs["q_loss"], huber.mean())
    g_q = torch.zeros(3, 3)
    g_q[torch.arange(3), a] = delta.clamp(-1, 1) / 3  # d Huber mean / d Q(s_i, a_i), 0 on the other actions
    assert torch.allclose(agent.q.bias, torch.tensor([0.0, 0.5, 0.2]) - lr * g_q.sum(0))
    assert torch.allclose(agent.q.weight, torch.tensor([[1.0], [-1.0], [0.5]]) - lr * (g_q.T @ s)[:, None])

    # Imitation: logits = log G_PROBS in every row. Cross-entropy gradient (softmax - onehot(a)) / 3, plus the
    # penalty 1e-2 * mean(logits^2) over 3 x 3 entries: gradient 1e-2 * 2 * logits / 9
    logits = torch.tensor(G_PROBS).log().expand(3, 3)
    assert torch.allclose(logs["imitation_loss"], -logits[torch.arange(3), a].mean())
    assert torch.allclose(logs["logit_loss"], (logits**2).mean())
    g_logits = (torch.tensor(G_PROBS) - torch.eye(3)[a]) / 3 + 1e-2 * 2 * logits / 9
    assert torch.allclose(agent.imitation.bias, logits[0] - lr * g_logits.sum(0))
    assert torch.allclose(agent.imitation.weight, -lr * (g_logits.T @ s)[:, None])

    # Polyak (target_update_every 0): target <- 0.75 target + 0.25 online
    for tp, p, before in zip(q_target.parameters(), agent.q.parameters(), old_target):
        assert torch.allclose(tp, 0.75 * before + 0.25 * p)


@pytest.mark.parametrize("every, step, copied", [(3, 3, True), (3, 4, False), (1, 5, True)])
def test_update_discrete_hard_copies_the_target_exactly_every_n_steps(every, step, copied):
    args = bcq.Args(target_update_every=every, tau=0.25)
    agent, q_target = tiny_discrete(args)
    old_target = params(q_target)
    bcq.update_discrete(DISCRETE_BATCH, step, agent=agent, q_target=q_target,
                        opt=torch.optim.SGD(agent.parameters(), lr=0.1), args=args)
    expected = params(agent.q) if copied else old_target  # a copy of the just-updated Q, else untouched
    assert all(torch.equal(tp, e) for tp, e in zip(q_target.parameters(), expected))
    assert not torch.equal(agent.q.bias, old_target[1])  # (the online Q did move)


@pytest.mark.parametrize("discrete", [False, True])
def test_load_policy_ignores_args_keys_it_does_not_know(tmp_path, discrete):
    args = bcq.Args(bcq_threshold=0.5, n_select_samples=3)
    torch.manual_seed(0)
    agent = bcq.DiscreteBCQ(2, 3, args) if discrete else bcq.BoxBCQ(2, 1, args)
    box = {} if discrete else dict(action_center=torch.tensor([1.0]), action_half=torch.tensor([2.0]))
    path = tmp_path / "bcq.pt"
    torch.save(dict(algo="bcq", args={**vars(args), "resume_every": 0, "online_steps": 5}, agent=agent.state_dict(),
                    obs_dim=2, act_dim=None if discrete else 1, n_actions=3 if discrete else None,
                    obs_mean=torch.zeros(2), obs_std=torch.ones(2), **box), path)
    policy = bcq.load_policy(str(path))  # iql_finetune-style extra keys (or the dropped --resume's) are left out
    assert policy.discrete == discrete and policy.dist is None
    obs = torch.randn(5, 2)
    torch.manual_seed(1)  # Box acting draws VAE candidates: the same draws for both
    a = policy.act(obs)
    torch.manual_seed(1)
    assert torch.equal(a, agent.act(obs) if discrete else 1.0 + 2.0 * agent.act(obs))  # Box: into the env's box


# (6) End to end: train a few steps, save, reload with --load-model and with load_policy.
# The dataset cache (OFFLINE_RL_DATA) is the session-wide temporary folder set up in tests/conftest.py.
@pytest.mark.slow
@pytest.mark.parametrize("dataset, discrete", [("pendulum-medium", False), ("cartpole-medium", True)])
def test_bcq_trains_saves_and_reloads(dataset, discrete, tmp_path):
    base = ["--dataset", dataset, "--device", "cpu", "--eval-episodes", "1"]
    out = run_script("bcq.py", *base, "--total-steps", "200", "--eval-every", "100", "--log-every", "100",
                     "--save-model", cwd=tmp_path)
    assert "step      200/200" in out and "eval normalized" in out and "done, 200 steps" in out
    (path,) = tmp_path.glob("runs/*/bcq.pt")

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algo"] == "bcq" and ckpt["args"]["dataset"] == dataset
    assert ckpt["args"]["batch_size"] == (64 if discrete else 100)
    assert ckpt["args"]["learning_rate"] == (3e-4 if discrete else 1e-3)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(path.parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    if discrete:
        losses, stray = ["losses/q_loss", "losses/imitation_loss"], "diagnostics/action_mismatch"
    else:
        losses, stray = ["losses/vae_loss", "losses/critic_loss", "losses/actor_loss"], "diagnostics/action_mse"
    expected = {"eval/return", "eval/normalized_score", "charts/SPS", "diagnostics/q_data",
                "diagnostics/q_pi_minus_q_data", stray, *losses}
    assert expected <= tags
    assert all(math.isfinite(e.value) for tag in losses for e in events.Scalars(tag))

    out = run_script("bcq.py", *base, "--load-model", str(path), cwd=tmp_path)
    assert "normalized" in out and "over 1 episodes" in out

    policy = bcq.load_policy(str(path))  # raw observations in, environment actions out; no density
    assert policy.discrete == discrete and policy.dist is None and policy.checkpoint["algo"] == "bcq"
    a = policy.act(torch.randn(8, ckpt["obs_dim"]) * 3)
    if discrete:
        assert a.shape == (8,) and a.dtype == torch.int64 and ((a >= 0) & (a < ckpt["n_actions"])).all()
    else:
        assert a.shape == (8, 1) and (a.abs() <= 2.0).all()  # Pendulum's box is [-2, 2]
