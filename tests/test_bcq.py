"""Specifications of bcq.py: the discrete ratio filter, the perturbation bound, the soft clipped double-Q target,
the VAE's KL term, and an end-to-end smoke run (train, save, reload) for a Box and a Discrete dataset."""

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
    allowed = bcq.allowed_actions(torch.tensor([[0.0, float("-inf"), 1.0]]), threshold=0.0)
    assert allowed.tolist() == [[True, False, True]]
    assert bcq.masked_argmax(torch.tensor([[0.0, 100.0, -1.0]]), allowed).tolist() == [0]


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 0.7, 0.95])
def test_discrete_bcq_choice_is_the_best_q_among_allowed_actions_on_random_cases(threshold):
    g = torch.Generator().manual_seed(0)
    logits, q = torch.randn(4000, 6, generator=g) * 3, torch.randn(4000, 6, generator=g)
    chosen = bcq.masked_argmax(q, bcq.allowed_actions(logits, threshold))
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


# (5) End to end: train a few steps, save, reload with --load-model and with load_policy.
# The dataset cache (OFFLINE_RL_DATA) is the session-wide temporary folder set up in tests/conftest.py.
@pytest.mark.parametrize("dataset, discrete", [("pendulum-medium", False), ("cartpole-medium", True)])
def test_bcq_trains_saves_and_reloads(dataset, discrete, tmp_path):
    base = ["--dataset", dataset, "--device", "cpu", "--eval-episodes", "1"]
    out = run_script("bcq.py", *base, "--total-steps", "200", "--eval-every", "100", "--log-every", "100",
                     "--save-model", cwd=tmp_path)
    assert "step      200/200" in out and "eval return" in out
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
