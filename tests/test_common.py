"""The thin helpers: the device replay buffer, action scaling, observation normalisation, evaluation, runs."""

import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import common as C
import datasets as D
import iql
import online as O


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


def test_the_buffer_holds_no_second_copy_of_the_observations_on_the_cpu(pend):
    # 2M-row MuJoCo data: the observation arrays are most of the bytes, so the buffer's tensors are the dataset's
    rb = C.ReplayBuffer(pend, torch.device("cpu"))
    assert rb.observations.data_ptr() == pend.observations.ctypes.data
    assert rb.next_observations.data_ptr() == pend.next_observations.ctypes.data
    # with room for online rows, or normalised, they are new tensors (the dataset's arrays are never written)
    online = O.OnlineReplayBuffer(pend, torch.device("cpu"), False, 1.0, 0.0, capacity=10)
    assert online.observations.data_ptr() != pend.observations.ctypes.data
    normalized = C.ReplayBuffer(pend, torch.device("cpu"), normalize_obs=True)
    assert normalized.observations.data_ptr() != pend.observations.ctypes.data
    # float64 statistics, as from a float64 copy of the data
    obs64 = pend.observations.astype(np.float64)
    assert torch.equal(normalized.obs_mean, torch.as_tensor(obs64.mean(0), dtype=torch.float32))
    assert torch.equal(normalized.obs_std, torch.as_tensor(obs64.std(0) + 1e-3, dtype=torch.float32))


def test_timeouts_do_not_stop_bootstrapping(pend):
    rb = C.ReplayBuffer(pend, torch.device("cpu"))
    assert pend.timeouts.any() and rb.terminals.sum() == 0  # Pendulum only times out


def test_reward_scale_and_bias(pend):
    rb = C.ReplayBuffer(pend, torch.device("cpu"), reward_scale=2.0, reward_bias=-1.0)
    np.testing.assert_allclose(rb.rewards.numpy(), 2 * pend.rewards - 1, rtol=1e-6)
    rets = pend.episode_returns()
    assert iql.reward_transform(pend, "return-range") == pytest.approx((1000 / (rets.max() - rets.min()), 0.0))


def test_mlp_shape():
    net = C.mlp(5, 3, (16, 16, 16))
    assert net(torch.zeros(7, 5)).shape == (7, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in net) == 4


def test_evaluate_runs_distinct_seeded_episodes_and_is_reproducible():
    ds = D.generate_builtin("cartpole-expert", 1000)
    always_left = lambda obs: torch.zeros(len(obs), dtype=torch.long)  # noqa: E731
    r1 = C.evaluate(ds, always_left, 3, seed=0, device=torch.device("cpu")).returns
    r2 = C.evaluate(ds, always_left, 3, seed=0, device=torch.device("cpu")).returns
    assert r1.shape == (3,) and (r1 < 30).all() and np.array_equal(r1, r2)
    expert = lambda obs: torch.as_tensor([D.cartpole_expert(o) for o in obs.numpy()])  # noqa: E731
    assert C.evaluate(ds, expert, 2, seed=0, device=torch.device("cpu")).returns.mean() == 500


def test_evaluate_discounts_each_episode_and_keeps_its_start_state():
    ds = D.generate_builtin("cartpole-expert", 1000)
    always_left = lambda obs: torch.zeros(len(obs), dtype=torch.long)  # noqa: E731
    ev = C.evaluate(ds, always_left, 2, seed=3, device=torch.device("cpu"), discount=0.9)
    # CartPole pays 1 per step, so an episode of T steps earns T and sum_t 0.9^t = (1 - 0.9^T) / (1 - 0.9)
    np.testing.assert_allclose(ev.discounted_returns, (1 - 0.9**ev.returns) / (1 - 0.9), rtol=1e-12)
    env = gym.make("CartPole-v1")
    for i in range(2):
        np.testing.assert_array_equal(ev.start_obs[i].numpy(), env.reset(seed=3 + i)[0])


def test_evaluation_and_isolated_leave_the_training_random_stream_alone():
    ds = D.generate_builtin("cartpole-expert", 1000)
    noisy = lambda obs: torch.randint(0, 2, (len(obs),))  # noqa: E731  (a policy that draws from torch's RNG)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    C.evaluate(ds, noisy, 2, seed=0, device=torch.device("cpu"))
    with C.isolated(net):
        assert not net.training  # no dropout while measuring
        torch.rand(5)
    assert net.training
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("interval,good,bad", [("[0, 1)", [0.0, 0.5], [1.0, -0.1, float("nan")]),
                                               ("(0, 1]", [1.0, 1e-9], [0.0, 1.5]),
                                               ("[1, inf)", [1, 10**9], [0, -3])])
def test_check_ranges_names_the_flag_and_its_interval(interval, good, bad):
    class A:
        discount = None

    D.check_ranges(A, {"discount": interval})  # None (an unset optional flag) is skipped
    for v in good:
        A.discount = v
        D.check_ranges(A, {"discount": interval})
    for v in bad:
        A.discount = v
        with pytest.raises(C.UserError, match=rf"--discount {v} is out of range: it must lie in \{interval[0]}"):
            D.check_ranges(A, {"discount": interval})


def test_replay_buffer_refuses_per_transition_arrays_that_would_broadcast(pend):
    bad = D.Dataset(**{k: getattr(pend, k) for k in D.ARRAY_KEYS})
    bad.rewards = bad.rewards[:, None]  # (N, 1): r + gamma * V(s') would broadcast to (B, B)
    with pytest.raises(ValueError, match="must be"):
        C.ReplayBuffer(bad, torch.device("cpu"))


def test_dataset_dims():
    assert D.dataset_dims(D.generate_builtin("lunarlander-medium", 500)) == (8, 1, 4)
    assert D.dataset_dims(D.generate_builtin("lunarlander-continuous-medium", 500)) == (8, 2, None)


def test_evaluate_without_env_id_says_what_to_do(pend):
    bare = D.Dataset(**{k: getattr(pend, k) for k in D.ARRAY_KEYS})
    with pytest.raises(C.UserError, match="--eval-episodes 0"):
        C.evaluate(bare, lambda o: o, 1, 0, torch.device("cpu"))


def test_speed_up_flushes_subnormals_inside_the_update_only():
    tiny = torch.tensor([1e-39, 1e-38, 1e-30])  # two subnormal float32s and a normal one

    def update(x, *, scale):
        return x * scale

    flushed = C.speed_up(update)
    assert flushed(tiny, scale=1.0).tolist() == [0.0, 0.0, pytest.approx(1e-30)]
    assert (update(tiny, scale=1.0) == tiny).all() and (tiny * 1.0)[0] > 0  # outside: IEEE arithmetic again
    with pytest.raises(ZeroDivisionError):
        C.speed_up(lambda: 1 / 0)()
    assert (tiny * 1.0)[0] > 0  # restored after an exception too


def test_evaluate_discounts_the_rewards_the_critics_were_trained_on():
    # CartPole pushed left: reward 1 per step. With the transform r' = 2 r - 0.5 the discounted return is
    # sum_t 0.9^t * 1.5 = 1.5 (1 - 0.9^T) / (1 - 0.9), in the units Q is learned in; the score stays raw
    ds = D.generate_builtin("cartpole-medium", 500)
    ev = C.evaluate(ds, lambda o: torch.zeros(len(o), dtype=torch.long), 2, seed=3, device=torch.device("cpu"),
                    discount=0.9, reward_transform=(2.0, -0.5))
    np.testing.assert_allclose(ev.discounted_returns, 1.5 * (1 - 0.9**ev.returns) / (1 - 0.9), rtol=1e-12)
    assert ev.returns.min() > 5  # raw: one per step


def test_collector_restores_each_modules_mode_even_when_acting_fails(pend):
    rb = O.OnlineReplayBuffer(pend, torch.device("cpu"), False, 1.0, 0.0, capacity=5)
    collector = O.OnlineCollector(pend, rb, seed=0)
    frozen, training = torch.nn.Linear(1, 1).eval(), torch.nn.Linear(1, 1)
    collector.step(lambda obs: torch.zeros(len(obs), 1), frozen, training)
    assert not frozen.training and training.training  # each back to what it was, not all to train

    def broken(obs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collector.step(broken, training)
    assert training.training
    collector.close()


def test_a_warm_up_step_takes_the_seeded_action_spaces_sample_in_network_units(pend):
    rb = O.OnlineReplayBuffer(pend, torch.device("cpu"), False, 1.0, 0.0, capacity=3)
    collector = O.OnlineCollector(pend, rb, seed=4)
    twin = gym.make(pend.env_id, **pend.env_kwargs).action_space
    twin.seed(4)
    for row in range(len(pend), len(pend) + 3):
        collector.step(None)
        # Pendulum's torque box [-2, 2] -> network units [-1, 1]: a / 2
        np.testing.assert_allclose(rb.actions[row].numpy(), twin.sample() / 2, rtol=1e-6)
    collector.close()


def test_a_checkpoint_of_another_environment_is_refused_in_one_line(pend):
    ckpt = dict(obs_dim=8, act_dim=1, n_actions=4, args=dict(dataset="lunarlander-medium"))
    with pytest.raises(C.UserError, match=r"lunarlander-medium \(8-d observations, 4 actions\); pendulum-medium has "
                                          r"3-d observations, 1-d actions"):
        D.check_policy_fits("iql.pt", ckpt, pend)
    D.check_policy_fits("iql.pt", dict(ckpt, obs_dim=3, n_actions=None), pend)  # the same spaces pass


def test_a_folder_is_not_called_missing(tmp_path):
    with pytest.raises(C.UserError, match="is a folder: pass the .pt file in it"):
        D.load_checkpoint(str(tmp_path))


def test_start_up_checks_name_the_missing_environment(pend, tmp_path):
    bare = D.Dataset(**{k: getattr(pend, k) for k in D.ARRAY_KEYS})
    D.save_npz(bare, tmp_path / "bare.npz")
    args = iql.Args(dataset=str(tmp_path / "bare.npz"), batch_size=8, eval_episodes=0, device="cpu")
    try:
        device, ds = C.setup(args, "iql.py", iql.RANGES, iql.load_policy, iql.DEFAULT_DATASET)
        assert device == torch.device("cpu") and len(ds) == len(pend)
        args.eval_episodes = 1  # refused at start-up, before any training
        with pytest.raises(C.UserError, match="no env_id in the dataset, so there is no environment to evaluate in; "
                                              "pass --eval-episodes 0"):
            C.setup(args, "iql.py", iql.RANGES, iql.load_policy, iql.DEFAULT_DATASET)
        args.batch_size = len(pend) + 1
        with pytest.raises(C.UserError, match=rf"--batch-size {len(pend) + 1} is out of range: it must lie in \[1, "):
            C.setup(args, "iql.py", iql.RANGES, iql.load_policy, iql.DEFAULT_DATASET)
    finally:
        sys.excepthook = sys.__excepthook__  # setup installs the one-line error hook
