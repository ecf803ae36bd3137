"""The thin helpers: the device replay buffer, action scaling, observation normalisation, evaluation, runs."""

import numpy as np
import pytest
import torch

import common as C
import datasets as D


@pytest.fixture(scope="module")
def pend() -> D.Dataset:
    return D.generate_builtin("pendulum-medium", 2000)


def test_replay_buffer_samples_on_device_with_right_shapes(pend):
    rb = C.ReplayBuffer(pend, torch.device("cpu"))
    obs, act, rew, next_obs, term = rb.sample(64)
    assert obs.shape == (64, 3) and act.shape == (64, 1) and rew.shape == (64,) and next_obs.shape == (64, 3)
    assert term.dtype == torch.float32 and obs.device.type == "cpu"


def test_box_actions_are_scaled_to_unit_box_and_back(pend):
    rb = C.ReplayBuffer(pend, torch.device("cpu"))
    assert rb.actions.min() >= -1 and rb.actions.max() <= 1  # Pendulum's box is [-2, 2]
    np.testing.assert_allclose(rb.unscale_action(rb.actions).numpy(), pend.actions, atol=1e-6)


def test_observation_normalisation_is_the_dataset_standardisation(pend):
    rb = C.ReplayBuffer(pend, torch.device("cpu"), normalize_obs=True)
    np.testing.assert_allclose(rb.observations.mean(0).numpy(), 0, atol=1e-4)
    raw = torch.as_tensor(pend.observations[:5])
    np.testing.assert_allclose(rb.normalize(raw).numpy(), rb.observations[:5].numpy(), atol=1e-6)
    assert torch.equal(C.ReplayBuffer(pend, torch.device("cpu")).observations, torch.as_tensor(pend.observations))


def test_timeouts_do_not_stop_bootstrapping(pend):
    rb = C.ReplayBuffer(pend, torch.device("cpu"))
    assert pend.timeouts.any() and rb.terminals.sum() == 0  # Pendulum only times out


def test_reward_scale_and_bias(pend):
    rb = C.ReplayBuffer(pend, torch.device("cpu"), reward_scale=2.0, reward_bias=-1.0)
    np.testing.assert_allclose(rb.rewards.numpy(), 2 * pend.rewards - 1, rtol=1e-6)
    rets = pend.episode_returns()
    assert C.return_range_scale(pend) == pytest.approx(1000 / (rets.max() - rets.min()))


def test_mlp_shape():
    net = C.mlp(5, 3, (16, 16, 16))
    assert net(torch.zeros(7, 5)).shape == (7, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in net) == 4


def test_evaluate_runs_distinct_seeded_episodes_and_is_reproducible():
    ds = D.generate_builtin("cartpole-expert", 1000)
    always_left = lambda obs: torch.zeros(len(obs), dtype=torch.long)  # noqa: E731
    r1 = C.evaluate(ds, always_left, 3, seed=0, device=torch.device("cpu"))
    r2 = C.evaluate(ds, always_left, 3, seed=0, device=torch.device("cpu"))
    assert r1.shape == (3,) and (r1 < 30).all() and np.array_equal(r1, r2)
    expert = lambda obs: torch.as_tensor([D.cartpole_expert(o) for o in obs.numpy()])  # noqa: E731
    assert C.evaluate(ds, expert, 2, seed=0, device=torch.device("cpu")).mean() == 500


def test_dataset_dims():
    assert C.dataset_dims(D.generate_builtin("lunarlander-medium", 500)) == (8, 1, 4)
    assert C.dataset_dims(D.generate_builtin("lunarlander-continuous-medium", 500)) == (8, 2, None)


def test_evaluate_without_env_id_says_what_to_do(pend):
    bare = D.Dataset(**{k: getattr(pend, k) for k in D.ARRAY_KEYS})
    with pytest.raises(ValueError, match="--eval-episodes 0"):
        C.evaluate(bare, lambda o: o, 1, 0, torch.device("cpu"))
