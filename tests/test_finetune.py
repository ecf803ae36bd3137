"""Offline-to-online fine-tuning: known answers for the replay buffer's online rows (add, the online/offline split of
a batch, Cal-QL's Monte-Carlo returns and the hold on unfinished episodes), the collector (replayed against an
independent copy of the environment), Cal-QL's floor and the exploration actions on hand-set networks, one Cal-QL
update step of each kind against the formula written out, and end-to-end runs of iql_finetune.py and
cql_finetune.py (slow). The dataset cache comes from conftest.py."""

import copy
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tests.conftest import ROOT, run_script
from tests.test_cql import SGD, FixedActor, fixed_batch, linear_args, linear_ensemble, set_linear
from tests.test_scripts import scalars

import cql
import cql_finetune as CF
import datasets as D
import iql
import iql_finetune as IF
import online as O

CPU = torch.device("cpu")


def buffer(ds: D.Dataset, capacity: int = 0, **kw) -> O.OnlineReplayBuffer:
    """online.OnlineReplayBuffer with ReplayBuffer's keyword defaults; remembers its dataset for `with_returns`."""
    kw = {**dict(normalize_obs=False, reward_scale=1.0, reward_bias=0.0), **kw}
    rb = O.OnlineReplayBuffer(ds, CPU, kw["normalize_obs"], kw["reward_scale"], kw["reward_bias"], capacity)
    rb.dataset = ds
    return rb


def with_returns(rb: O.OnlineReplayBuffer, discount: float) -> None:
    """Cal-QL's G as cql_finetune.py sets it up: floored by min(r_min, 0) of the data, on the transformed rewards."""
    floor = min(rb.rewards[: rb.n_offline].min().item(), 0.0)
    rb.track_returns(partial(CF.returns_to_go, discount=discount, floor=floor), rb.dataset.episode_ends())


def hand_dataset(rewards, terminals=None, timeouts=None, box: bool = False, env_id: str | None = None) -> D.Dataset:
    """N rows whose observation is the row index (so a sampled row names itself), zero actions."""
    n = len(rewards)
    obs = np.arange(n, dtype=np.float32)[:, None]
    flags = [np.zeros(n, bool) if f is None else np.asarray(f, bool) for f in (terminals, timeouts)]
    actions = np.zeros((n, 1), np.float32) if box else np.zeros(n, np.int64)
    return D.Dataset(observations=obs, actions=actions, rewards=np.asarray(rewards, np.float32),
                     next_observations=obs + 1, terminals=flags[0], timeouts=flags[1], env_id=env_id)


def rows(batch) -> torch.Tensor:
    """The row indices of a batch drawn from a `hand_dataset` buffer (observations unnormalised)."""
    return batch[0][:, 0].long()


# ----------------------------------------------------------------------------------------------------------------
# Cal-QL's Monte-Carlo returns-to-go on the dataset
def test_returns_to_go_per_episode_terminal_timeout_and_the_data_end_on_transformed_rewards():
    # three episodes: rows 0-2 end in a terminal, rows 3-4 are cut by a time limit, rows 5-6 by the end of the data
    ds = hand_dataset([1, 2, 3, 4, 5, 6, 7], terminals=[0, 0, 1, 0, 0, 0, 0], timeouts=[0, 0, 0, 0, 1, 0, 0])
    rb = buffer(ds, reward_scale=2.0, reward_bias=-1.0, capacity=3)
    with_returns(rb, 0.5)
    # r' = 2 r - 1 = (1, 3, 5 | 7, 9 | 11, 13); G_t = r'_t + 0.5 G_{t+1}, 0 after each episode's last row (no
    # bootstrap at the time-limit cut): (1 + 0.5 (3 + 0.5 * 5), 3 + 2.5, 5 | 7 + 4.5, 9 | 11 + 6.5, 13)
    expected = [3.75, 5.5, 5.0, 11.5, 9.0, 17.5, 13.0, 0.0, 0.0, 0.0]  # the 3 free online rows hold 0
    assert rb.mc_returns.tolist() == expected
    # a batch now carries each row's G last
    torch.manual_seed(0)
    batch = rb.sample(64)
    assert len(batch) == 6 and torch.equal(batch[5], rb.mc_returns[rows(batch)])
    assert set(rows(batch).tolist()) == set(range(7))  # the free rows are never drawn


def test_returns_to_go_stay_below_the_behaviour_value_with_negative_rewards_cut_by_a_time_limit():
    # the Pendulum case: r < 0 and an episode cut at its time limit. Summing to the cut (no bootstrap) would put G
    # *above* V^mu, which goes on past the cut; the tail is completed with the data's smallest reward, r_min = -3:
    # -3 / (1 - 0.5) = -6, which no continuation can fall below.
    ds = hand_dataset([-1, -2, -1, -3, -1], terminals=[0, 0, 0, 0, 1], timeouts=[0, 0, 1, 0, 0])
    rb = buffer(ds)
    with_returns(rb, 0.5)
    # cut episode: G_2 = -1 + 0.5 * -6 = -4, G_1 = -2 + 0.5 * -4 = -4, G_0 = -1 + 0.5 * -4 = -3 (the truncated sum
    # would give -1, -2.5, -2.25); terminal episode: no tail, G = (-3 + 0.5 * -1, -1)
    assert rb.mc_returns.tolist() == [-3.0, -4.0, -4.0, -3.5, -1.0]


def test_an_episode_of_only_the_failure_reward_gets_the_authors_sparse_rule():
    # sparse rewards (0 success, -1 otherwise): an episode of nothing but -1 cut by the time limit gets
    # G = r_neg / (1 - gamma) = -1 / (1 - 0.9) = -10 at every step (the authors' calc_return_to_go); a successful
    # episode ending in a terminal keeps its discounted sum
    ds = hand_dataset([-1, -1, -1, -1, 0], terminals=[0, 0, 0, 0, 1], timeouts=[0, 0, 1, 0, 0])
    rb = buffer(ds)
    with_returns(rb, 0.9)
    np.testing.assert_allclose(rb.mc_returns.tolist(), [-10.0, -10.0, -10.0, -1.0, 0.0], rtol=1e-6)


def test_without_returns_to_go_a_batch_is_the_five_usual_tensors():
    rb = buffer(hand_dataset([1.0, 2.0]), capacity=2)
    assert rb.mc_returns is None and len(rb.sample(4)) == 5
    rb.add(np.array([9.0]), torch.tensor(0), 1.0, np.array([10.0]), False)
    rb.end_episode()
    assert rb.mc_returns is None and len(rb.sample(4, 0.5)) == 5


# ----------------------------------------------------------------------------------------------------------------
# add(): one online transition, stored as the dataset's rows are
def test_add_stores_the_normalised_obs_the_network_action_and_the_transformed_reward_box():
    rng = np.random.default_rng(0)
    obs = rng.normal([1.0, -2.0], [0.5, 3.0], size=(50, 2)).astype(np.float32)
    actions = np.linspace(0.0, 4.0, 50, dtype=np.float32)[:, None]  # no env: the box is the data's [0, 4]
    ds = D.Dataset(observations=obs, actions=actions, rewards=np.zeros(50, np.float32), next_observations=obs,
                   terminals=np.zeros(50, bool), timeouts=np.zeros(50, bool))
    rb = buffer(ds, normalize_obs=True, reward_scale=2.0, reward_bias=-1.0, capacity=2)
    assert len(rb.rewards) == 52 and rb.size == rb.ready == rb.n_offline == 50
    mean, std = obs.astype(np.float64).mean(0), obs.astype(np.float64).std(0) + 1e-3
    rb.add(np.array([5.0, -3.0]), torch.tensor([0.25]), 1.5, np.array([6.0, -2.0]), True)
    np.testing.assert_allclose(rb.observations[50].numpy(), (np.array([5.0, -3.0]) - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(rb.next_observations[50].numpy(), (np.array([6.0, -2.0]) - mean) / std, rtol=1e-6)
    assert rb.actions[50].item() == 0.25  # stored in network units, as given
    assert rb.unscale_action(rb.actions[50]).item() == pytest.approx(2.5)  # 2 + 2 * 0.25 in the [0, 4] box
    assert rb.rewards[50].item() == 2.0 and rb.terminals[50].item() == 1.0  # 2 * 1.5 - 1
    assert rb.size == rb.ready == 51 and rb.n_offline == 50  # no Cal-QL: sampleable at once
    rb.add(np.array([0.0, 0.0]), torch.tensor([-1.0]), 0.0, np.array([0.0, 0.0]), False)
    assert rb.terminals[51].item() == 0.0 and rb.rewards[51].item() == -1.0 and rb.size == 52
    with pytest.raises(ValueError, match="full"):
        rb.add(np.array([0.0, 0.0]), torch.tensor([0.0]), 0.0, np.array([0.0, 0.0]), False)
    assert rb.size == 52  # the refused row left nothing behind


def test_add_stores_a_discrete_action_index_and_a_buffer_without_capacity_is_full():
    rb = buffer(hand_dataset([1.0, 2.0, 3.0]), capacity=1)
    rb.add(np.array([7.0]), torch.tensor(2), 0.5, np.array([8.0]), False)
    assert rb.actions.dtype == torch.long and rb.actions[3].item() == 2 and rb.observations[3].item() == 7.0
    with pytest.raises(ValueError, match="full"):
        buffer(hand_dataset([1.0])).add(np.array([0.0]), torch.tensor(0), 0.0, np.array([0.0]), False)


# ----------------------------------------------------------------------------------------------------------------
# sample(): uniform as before until online rows exist; then round(B * ratio) of them, the rest from the dataset
def test_before_any_online_row_sampling_is_the_old_uniform_draw_whatever_the_ratio_and_capacity():
    ds = hand_dataset(np.arange(10.0))
    for rb in (buffer(ds), buffer(ds, capacity=5)):
        for ratio in (0.0, 0.5, 1.0):
            torch.manual_seed(3)
            got = rb.sample(32, ratio)
            torch.manual_seed(3)
            assert torch.equal(rows(got), torch.randint(0, 10, (32,))), ratio
            assert torch.equal(got[2], torch.as_tensor(ds.rewards)[rows(got)])


def online_buffer(n_online: int = 3, **kw) -> O.OnlineReplayBuffer:
    """10 dataset rows (obs 0..9, reward = row), then online rows with obs 100, 101, ... and reward 50."""
    rb = buffer(hand_dataset(np.arange(10.0)), capacity=5, **kw)
    for i in range(n_online):
        rb.add(np.array([100.0 + i]), torch.tensor(0), 50.0, np.array([101.0 + i]), False)
    return rb


def test_sample_draws_exactly_round_b_ratio_online_rows_and_the_rest_from_the_dataset():
    rb = online_buffer()
    for batch_size, ratio, n_online in ((8, 0.5, 4), (8, 0.25, 2), (10, 0.3, 3), (6, 1.0, 6)):
        for _ in range(20):
            got = rows(rb.sample(batch_size, ratio))
            online = got >= 100
            assert online.sum().item() == n_online, (batch_size, ratio)
            assert ((got < 10) | ((got >= 100) & (got <= 102))).all()  # never a free row
            assert (rb.sample(batch_size, ratio)[2] == 50.0).sum().item() == n_online  # the online rewards
    # the draw itself: the dataset's rows first, then the online rows [n_offline, ready)
    torch.manual_seed(5)
    got = rows(rb.sample(8, 0.5))
    torch.manual_seed(5)
    offline, online = torch.randint(0, 10, (4,)), torch.randint(10, 13, (4,))
    assert torch.equal(got, torch.cat([offline, online + 90]))  # online row 10 + k holds obs 100 + k


def test_ratio_zero_with_online_rows_is_uniform_over_every_ready_row():
    rb = online_buffer()
    torch.manual_seed(2)
    got = rows(rb.sample(64, 0.0))
    torch.manual_seed(2)
    idx = torch.randint(0, 13, (64,))
    assert torch.equal(got, torch.where(idx < 10, idx, idx + 90))


def test_online_share_is_the_expected_online_fraction_of_a_batch():
    rb = buffer(hand_dataset(np.arange(10.0)), capacity=5)
    assert rb.online_share(8, 0.0) == 0.0 and rb.online_share(8, 0.5) == 0.0  # nothing online yet
    rb = online_buffer()
    assert rb.online_share(8, 0.0) == pytest.approx(3 / 13)  # uniform over 13 rows, 3 online
    assert rb.online_share(8, 0.5) == 0.5 and rb.online_share(10, 0.3) == pytest.approx(0.3)
    assert rb.online_share(8, 0.25) == 0.25 and rb.online_share(6, 1.0) == 1.0
    # a ratio too small to give one online row in the batch: sample() draws uniformly, and the share says so
    assert rb.online_share(1, 0.4) == pytest.approx(3 / 13)
    assert rb.online_share(8, 0.125) == 0.125  # exactly one online row of 8


def test_sample_without_a_ratio_is_uniform_over_every_ready_row():
    rb = online_buffer()
    torch.manual_seed(0)
    got = rows(rb.sample(2000))
    assert got.min() == 0 and got.max() == 102  # dataset rows 0..9 and the online rows' observations 100..102
    assert (got >= 100).float().mean().item() == pytest.approx(3 / 13, abs=0.03)


def test_cal_ql_holds_an_online_episode_back_until_it_ends_then_fills_its_returns():
    rb = buffer(hand_dataset(np.arange(10.0)), reward_scale=2.0, reward_bias=-1.0, capacity=5)
    with_returns(rb, 0.5)
    offline_g = rb.mc_returns[:10].clone()
    rb.add(np.array([100.0]), torch.tensor(0), 1.0, np.array([101.0]), False)  # r' = 1
    rb.add(np.array([101.0]), torch.tensor(1), 2.0, np.array([102.0]), False)  # r' = 3
    assert rb.size == 12 and rb.ready == 10  # held back: its G is not known yet
    for ratio in (0.0, 0.5, 1.0):
        assert (rows(rb.sample(500, ratio)) < 10).all(), ratio  # nothing online is drawn, whatever the ratio
        assert rb.online_share(8, ratio) == 0.0
    # G on the transformed rewards; the episode ended without a terminal, so it goes on with the tail of the data's
    # smallest reward, r'_min = -1: -1 / (1 - 0.5) = -2. G = (1 + 0.5 * 2, 3 + 0.5 * -2)
    rb.end_episode()
    assert rb.mc_returns[10:12].tolist() == [2.0, 2.0] and rb.ready == 12
    assert torch.equal(rb.mc_returns[:10], offline_g)  # the dataset's G untouched
    batch = rb.sample(8, 0.5)
    assert (rows(batch)[4:] >= 100).all() and torch.equal(batch[5][4:], torch.full((4,), 2.0))
    assert rb.online_share(8, 0.0) == pytest.approx(2 / 12)
    # the next episode is held while the finished one stays sampleable; its G starts at its own first row
    rb.add(np.array([102.0]), torch.tensor(0), 4.0, np.array([103.0]), True)  # r' = 7, terminal
    assert rb.ready == 12 and (rows(rb.sample(500, 1.0)) <= 101).all()
    rb.end_episode()
    assert rb.mc_returns[10:13].tolist() == [2.0, 2.0, 7.0] and rb.ready == 13


def test_online_returns_stop_at_a_terminal_inside_what_end_episode_fills():
    # G_t = r_t + gamma (1 - terminal_t) G_{t+1}: a terminal row is not bootstrapped even if rows follow it (the only
    # place the (1 - terminal) factor shows: the dataset's episodes, and the collector's, end at their terminal)
    rb = buffer(hand_dataset(np.arange(4.0)), capacity=3)
    with_returns(rb, 0.5)
    rb.add(np.array([0.0]), torch.tensor(0), 1.0, np.array([0.0]), True)
    rb.add(np.array([0.0]), torch.tensor(0), 2.0, np.array([0.0]), False)
    rb.add(np.array([0.0]), torch.tensor(0), 4.0, np.array([0.0]), False)
    rb.end_episode()
    assert rb.mc_returns[4:7].tolist() == [1.0, 4.0, 4.0]


def test_without_cal_ql_end_episode_only_marks_the_episode_start():
    rb = online_buffer(2)
    assert rb.ready == 12  # add made both rows sampleable already
    rb.end_episode()
    assert rb.ready == rb.episode_start == 12 and rb.mc_returns is None


# ----------------------------------------------------------------------------------------------------------------
# The collector, replayed against an independent copy of the environment with the same seed and actions
class Recorder:
    """An explore function with a fixed action that records the (normalised) observations it was given and checks
    that the collector put `module` in eval mode while it acts."""

    def __init__(self, action: torch.Tensor, module: torch.nn.Module | None = None):
        self.action, self.module, self.seen = action, module, []

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        assert obs.shape[0] == 1 and not torch.is_grad_enabled()
        if self.module is not None:
            assert not self.module.training
        self.seen.append(obs[0].clone())
        return self.action[None].expand(len(obs), *self.action.shape)


@pytest.mark.parametrize("name", ["cartpole-medium", "pendulum-medium"])
def test_collector_adds_the_environments_transitions_and_reports_each_episode(name: str):
    ds = D.generate_builtin(name, 2000)
    discrete = ds.discrete
    cap = 40 if discrete else 201
    rb = buffer(ds, normalize_obs=True, reward_scale=2.0, reward_bias=-0.5, capacity=cap)
    with_returns(rb, 0.9)  # Cal-QL: each episode is held back until the collector ends it
    n = len(ds)
    net = torch.nn.Dropout(0.5)
    # CartPole: always push left (episodes of ~10 steps, ending in a terminal); Pendulum: network action 0.5,
    # i.e. torque 1.0 in [-2, 2], for the 200 steps of a time-limited episode
    explore = Recorder(torch.tensor(0) if discrete else torch.tensor([0.5]), net)
    env_action = 0 if discrete else np.array([1.0], np.float32)
    collector = O.OnlineCollector(ds, rb, seed=7)
    twin = gym.make(ds.env_id, **ds.env_kwargs)
    twin_obs, _ = twin.reset(seed=7)
    episodes, start = [], n
    while rb.size < n + cap - (15 if discrete else 0):
        row = rb.size
        done = collector.step(explore, net)
        assert net.training  # back in train mode after acting
        next_obs, reward, terminated, truncated, _ = twin.step(env_action)
        raw = (rb.observations[row] * rb.obs_std + rb.obs_mean).numpy()
        np.testing.assert_allclose(raw, twin_obs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose((rb.next_observations[row] * rb.obs_std + rb.obs_mean).numpy(), next_obs,
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(explore.seen[-1], rb.observations[row])  # explore saw the stored normalised obs
        assert rb.actions[row].tolist() == (0 if discrete else [0.5])
        assert rb.rewards[row].item() == pytest.approx(2.0 * reward - 0.5, rel=1e-6, abs=1e-5)
        assert rb.terminals[row].item() == float(terminated)  # a time-limit cut is not a terminal
        assert collector.env_steps == row - n + 1
        if terminated or truncated:
            length = rb.size - start
            assert done is not None and done[1] == length
            raw_rewards = (rb.rewards[start:rb.size].double() + 0.5) / 2.0
            assert done[0] == pytest.approx(raw_rewards.sum().item(), rel=1e-5)
            assert rb.ready == rb.size  # the finished episode is sampleable, with its discounted returns
            r = rb.rewards[start:rb.size].double()
            # a time-limit cut goes on with the tail of the data's smallest transformed reward (a lower bound)
            floor = rb.returns_to_go.keywords["floor"]
            assert floor == min(rb.rewards[:n].min().item(), 0.0)
            tail = 0.0 if terminated else floor / (1 - 0.9)
            g = [sum(0.9**j * r[t + j].item() for j in range(length - t)) + 0.9 ** (length - t) * tail
                 for t in range(length)]
            np.testing.assert_allclose(rb.mc_returns[start:rb.size].numpy(), g, rtol=1e-5)
            episodes.append(done)
            start = rb.size
            twin_obs, _ = twin.reset()  # the environment is seeded once: later episodes continue its stream
        else:
            assert done is None and rb.ready == start
            twin_obs = next_obs
    if discrete:
        assert len(episodes) >= 2 and all(ret == length for ret, length in episodes)  # 1 per step
        assert rb.terminals[n:rb.size].sum().item() == len(episodes)
    else:
        assert episodes and episodes[0][1] == 200 and rb.terminals[n:rb.size].sum().item() == 0


def test_two_collectors_with_the_same_seed_and_explore_collect_the_same_rows():
    ds = D.generate_builtin("cartpole-medium", 2000)

    def collect(seed: int):
        rb = buffer(ds, capacity=60)
        collector = O.OnlineCollector(ds, rb, seed=seed)
        torch.manual_seed(0)
        explore = lambda obs: torch.randint(0, 2, (len(obs),))  # noqa: E731 (draws from the training stream)
        episodes = [collector.step(explore) for _ in range(60)]
        return rb, [e for e in episodes if e is not None]

    (a, ea), (b, eb), (c, _) = collect(4), collect(4), collect(5)
    assert ea == eb and len(ea) >= 1
    for k in ("observations", "actions", "rewards", "next_observations", "terminals"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert not torch.equal(a.observations[len(ds)], c.observations[len(ds)])  # the seed sets the start state


def test_a_dataset_without_an_environment_cannot_be_fine_tuned():
    ds = hand_dataset([1.0, 2.0])
    with pytest.raises(D.UserError, match="no env_id"):
        O.OnlineCollector(ds, buffer(ds, capacity=1), seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Cal-QL's floor and the exploration actions, on hand cases
def test_calibrate_floors_only_the_policy_proposals_by_each_states_return():
    n = 2
    q = torch.tensor([[[-3.0, 4.0, 0.0, 1.0, -2.0, 5.0],  # critic 1, state 1 (G = 0.5)
                       [-9.0, -9.0, -9.0, 2.0, -9.0, -9.0]],  # critic 1, state 2 (G = -4)
                      [[-1.0, -1.0, 0.6, 0.4, 0.5, -7.0],  # critic 2, state 1
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])  # critic 2, state 2
    floored, rate = CF.calibrate(q, torch.tensor([0.5, -4.0]), n)
    expected = torch.tensor([[[-3.0, 4.0, 0.5, 1.0, 0.5, 5.0],
                              [-9.0, -9.0, -4.0, 2.0, -4.0, -4.0]],
                             [[-1.0, -1.0, 0.6, 0.5, 0.5, 0.5],
                              [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    assert torch.equal(floored, expected)  # the n uniform proposals (first 2) stay below the floor
    # lifted among the 2 * 2 * 4 policy values: 2 + 3 + 2 + 0 (0.5 itself is not below 0.5)
    assert rate.item() == 7 / 16


def test_discrete_gap_with_a_floor_lifts_every_actions_q_but_not_the_data_action():
    q_all = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    actions = torch.tensor([0, 2])
    # state 1, G = 2.5: logsumexp(2.5, 3, 2.5) - Q(s, a_data) = log(2 e^2.5 + e^3) - 1 (the data's Q stays 1);
    # state 2, G = -100: unchanged, logsumexp(1, 3, 2) - 2
    gap = cql.cql_gap_discrete(q_all, actions, torch.tensor([2.5, -100.0]))
    row1 = math.log(2 * math.exp(2.5) + math.exp(3)) - 1
    row2 = math.log(math.exp(1) + math.exp(3) + math.exp(2)) - 2
    assert gap.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    assert cql.cql_gap_discrete(q_all, actions, torch.tensor([-100.0, -100.0])).item() == \
        cql.cql_gap_discrete(q_all, actions).item()
    # a floor above every Q: logsumexp(G, G, G) - Q(s, a_data) = G + log 3 - Q(s, a_data)
    assert cql.cql_gap_discrete(q_all, actions, torch.tensor([10.0, 10.0])).item() == pytest.approx(
        10 + math.log(3) - 1.5, rel=1e-6)


def test_epsilon_greedy_is_greedy_at_zero_uniform_at_one_and_the_mix_in_between():
    args = cql.Args(hidden_dim=4, n_layers=0)
    qnet = set_linear(cql.DiscreteQNetwork(1, 3, args), torch.zeros(3, 1), [0.0, 2.0, 1.0])  # greedy: action 1
    obs = torch.zeros(600, 1)
    assert (CF.explore_discrete(qnet, 0.0, obs) == 1).all()
    torch.manual_seed(0)
    got = CF.explore_discrete(qnet, 1.0, obs)
    torch.manual_seed(0)
    assert torch.equal(got, torch.randint(0, 3, (600,))) and set(got.tolist()) == {0, 1, 2}
    torch.manual_seed(1)
    got = CF.explore_discrete(qnet, 0.3, obs)
    torch.manual_seed(1)
    random_action = torch.randint(0, 3, (600,))
    assert torch.equal(got, torch.where(torch.rand(600) < 0.3, random_action, torch.ones(600, dtype=torch.long)))


def test_iql_explore_samples_the_gaussian_clipped_to_the_box_and_the_categorical():
    args = iql.Args(hidden_dim=4, n_layers=0)
    actor = iql.GaussianActor(1, 2, args)
    set_linear(actor.net, torch.zeros(2, 1), torch.atanh(torch.tensor([0.9, -0.2])))
    with torch.no_grad():
        actor.log_std.fill_(0.0)  # std 1: a good share of the draws leaves [-1, 1]
    obs = torch.zeros(4000, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        got = IF.explore(actor, obs)
    torch.manual_seed(0)
    raw = torch.distributions.Normal(torch.tensor([0.9, -0.2]).expand(4000, 2), 1.0).sample()
    assert torch.allclose(got, raw.clamp(-1.0, 1.0), atol=1e-6)
    assert (got == 1.0).any() and (got == -1.0).any() and got.abs().max() <= 1.0
    cat = iql.CategoricalActor(1, 3, args)
    set_linear(cat.net, torch.zeros(3, 1), torch.log(torch.tensor([0.2, 0.5, 0.3])))
    torch.manual_seed(1)
    with torch.no_grad():
        got = IF.explore(cat, obs)
    torch.manual_seed(1)
    probs = torch.tensor([0.2, 0.5, 0.3]).expand(4000, 3)
    assert torch.equal(got, torch.distributions.Categorical(probs=probs).sample())
    freq = torch.bincount(got, minlength=3) / 4000
    assert torch.allclose(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.03)  # a sample, not the argmax


def test_cql_explore_box_is_a_tanh_gaussian_sample():
    torch.manual_seed(0)
    actor = cql.TanhGaussianActor(3, 2, cql.Args(hidden_dim=8, n_layers=1))
    obs = torch.randn(5, 3)
    torch.manual_seed(1)
    got = CF.explore_box(actor, obs)
    torch.manual_seed(1)
    assert torch.equal(got, actor.sample(obs)[0]) and got.abs().max() < 1


# ----------------------------------------------------------------------------------------------------------------
# One Cal-QL update step of each kind
def box_step(critics, batch, args: cql.Args, seed: int = 4, cal_ql: bool = True) -> dict:
    """One update_box step with FixedActor, which draws nothing: the step's first draws are the uniform proposals."""
    actor = FixedActor()
    log_alpha, log_alpha_prime = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    torch.manual_seed(seed)
    return cql.update_box(batch, 1, True, critics=critics, critics_target=copy.deepcopy(critics), actor=actor,
                          log_alpha=log_alpha, log_alpha_prime=log_alpha_prime, q_opt=SGD(critics.parameters(), 0.1),
                          actor_opt=SGD(actor.parameters(), 0.1), alpha_opt=SGD([log_alpha], 0.1),
                          alpha_prime_opt=SGD([log_alpha_prime], 0.1), args=args,
                          calibrate=partial(CF.calibrate, n=args.cql_n_actions) if cal_ql else None)


def test_box_cal_ql_step_floors_the_policy_proposals_in_the_gap_and_its_gradient():
    args = linear_args(n_critics=2, cql_alpha=1.0, cql_n_actions=2, discount=0.5)
    c = torch.tensor([0.0, 1.0])
    critics = linear_ensemble(1, 1, [([0.0, ci], 0.0) for ci in c.tolist()])  # Q_i(s, a) = c_i a; a_data = 0
    g = torch.tensor([0.2, -5.0])
    logs = box_step(critics, (*fixed_batch(), g), args)
    torch.manual_seed(4)  # the update's first draws: the 2 uniform proposals per state
    uniform = 2 * torch.rand(2, 2, 1)[..., 0] - 1
    policy = torch.tensor([-0.5, 0.5, -0.5, 0.5]).expand(2, 4)  # FixedActor at s, then at s'; log pi = 0
    q_unif = c[:, None, None] * uniform - math.log(0.5)  # (critic, state, proposal) minus the log density
    q_pol = c[:, None, None] * policy
    lifted = q_pol < g[None, :, None]
    z = torch.cat([q_unif, torch.where(lifted, g[None, :, None].expand_as(q_pol), q_pol)], -1)
    gaps = torch.logsumexp(z, -1).mean(-1)  # minus Q_i(s, a_data) = 0
    # lifted: critic 0 (Q = 0) at state 1 all 4, critic 1 at state 1 the two -0.5s; nothing at state 2
    assert lifted.sum().item() == 6 and logs["cal_ql_bound_rate"].item() == 6 / 16
    assert logs["cql_gap"].item() == pytest.approx(gaps.mean().item(), rel=1e-6)
    assert logs["cql_loss"].item() == pytest.approx(gaps.sum().item(), rel=1e-6)
    # a lifted value is the constant G: no gradient reaches c_i through it. The TD gradient on c_i is 0 (a_data = 0)
    dz = torch.cat([uniform.expand(2, 2, 2), torch.where(lifted, 0.0, policy.expand(2, 2, 4))], -1)
    grad = (torch.softmax(z, -1) * dz).sum(-1).mean(-1)
    assert torch.allclose(critics.weights[0][:, 1, 0], c - 0.1 * grad, atol=1e-6)


def box_nets(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    args = cql.Args(hidden_dim=8, n_layers=1)
    return dict(critics=cql.QEnsemble(3, 2, args), critics_target=cql.QEnsemble(3, 2, args),
                actor=cql.TanhGaussianActor(3, 2, args))


def real_box_step(nets: dict, batch, args: cql.Args, cal_ql: bool = False) -> tuple[dict, dict]:
    nets = copy.deepcopy(nets)
    log_alpha, log_alpha_prime = torch.tensor(0.3, requires_grad=True), torch.tensor(-0.4, requires_grad=True)
    torch.manual_seed(11)
    logs = cql.update_box(batch, 2, True, **nets, log_alpha=log_alpha, log_alpha_prime=log_alpha_prime,
                          q_opt=SGD(nets["critics"].parameters(), 0.1), actor_opt=SGD(nets["actor"].parameters(), 0.05),
                          alpha_opt=SGD([log_alpha], 0.2), alpha_prime_opt=SGD([log_alpha_prime], 0.3), args=args,
                          calibrate=partial(CF.calibrate, n=args.cql_n_actions) if cal_ql else None)
    return logs, nets


def real_box_batch(size: int = 16):
    g = torch.Generator().manual_seed(9)
    return (torch.randn(size, 3, generator=g), torch.rand(size, 2, generator=g) * 2 - 1,
            torch.randn(size, generator=g), torch.randn(size, 3, generator=g),
            (torch.rand(size, generator=g) < 0.2).float())


@pytest.mark.parametrize("lagrange", [False, True])
def test_box_cal_ql_with_a_floor_below_every_q_is_plain_cql_and_a_huge_floor_is_g_plus_log_2n(lagrange: bool):
    nets, b = box_nets(), real_box_batch()
    flags = dict(cql_alpha=2.0, cql_n_actions=3, cql_lagrange=lagrange, cql_target_action_gap=1.0)
    plain, plain_nets = real_box_step(nets, b, cql.Args(**flags))
    low, low_nets = real_box_step(nets, (*b, torch.full((16,), -1e9)), cql.Args(**flags), cal_ql=True)
    assert low.pop("cal_ql_bound_rate").item() == 0.0 and low.keys() == plain.keys()
    for k in plain:
        assert torch.equal(low[k], plain[k]), k
    for k in nets:
        for p, q in zip(plain_nets[k].parameters(), low_nets[k].parameters()):
            assert torch.equal(p, q), k
    # G = 1000 above every Q: the 2n policy terms are G - log pi, which swamp the rest: gap ~ G + log sum exp(-log pi)
    # - Q(s, a_data). Replay the update's draws: a ~ pi(s) (temperature, actor), a' ~ pi(s') (target), then the
    # proposals: the uniform ones, then n from pi(s) and n from pi(s')
    high, _ = real_box_step(nets, (*b, torch.full((16,), 1000.0)), cql.Args(**flags), cal_ql=True)
    assert high["cal_ql_bound_rate"].item() == 1.0
    torch.manual_seed(11)
    actor, critics = nets["actor"], nets["critics"]
    obs, next_obs = b[0], b[3]
    with torch.no_grad():
        actor.sample(obs), actor.sample(next_obs)
        torch.rand(16, 3, 2)
        _, logp_cur = actor.sample(obs, 3)
        _, logp_next = actor.sample(next_obs, 3)
        q_data = critics(obs, b[1])
    pol = 1000.0 - torch.cat([logp_cur, logp_next], 1)  # (B, 2n)
    expected = (torch.logsumexp(pol, -1)[None] - q_data).mean(-1).mean()  # the uniform terms add < 1e-300
    assert high["cql_gap"].item() == pytest.approx(expected.item(), rel=1e-6)


def discrete_step(g: torch.Tensor | None):
    args = cql.Args(hidden_dim=4, n_layers=0, cql_alpha=0.5, discount=0.9, tau=0.5)
    qnet = set_linear(cql.DiscreteQNetwork(2, 3, args), torch.zeros(3, 2), [1.0, 3.0, 2.0])
    qnet_t = set_linear(cql.DiscreteQNetwork(2, 3, args), torch.zeros(3, 2), [5.0, -1.0, 4.0])
    b = (torch.zeros(2, 2), torch.tensor([0, 2]), torch.tensor([1.7, 0.5]), torch.ones(2, 2), torch.tensor([0.0, 1.0]))
    logs = cql.update_discrete(b if g is None else (*b, g), 1, True, qnet=qnet, qnet_target=qnet_t,
                               q_opt=SGD(qnet.parameters(), lr=0.1), args=args, cal_ql=g is not None)
    return logs, qnet.net[0].bias.detach().clone(), qnet_t.net[0].bias.detach().clone()


def test_discrete_cal_ql_step_by_hand():
    # the plain case of tests/test_cql.py (Q(s, .) = b = (1, 3, 2), a_data = (0, 2), td 0.51) with G = (2.5, -100)
    logs, bias, _ = discrete_step(torch.tensor([2.5, -100.0]))
    row1 = math.log(2 * math.exp(2.5) + math.exp(3)) - 1  # state 1: (2.5, 3, 2.5) in the logsumexp, Q(s, 0) = 1
    row2 = math.log(math.exp(1) + math.exp(3) + math.exp(2)) - 2  # state 2: unchanged
    assert logs["td_loss"].item() == pytest.approx(0.51, abs=1e-5)
    assert logs["cql_gap"].item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    assert logs["cql_loss"].item() == pytest.approx(0.5 * (row1 + row2) / 2, rel=1e-6)
    # d/db: Huber (0.1, 0, 0.5); conservative 0.5 * mean over states of (d logsumexp / db - one-hot(a_data)). In state
    # 1 only action 1 is not lifted: e^3 / (2 e^2.5 + e^3) on it; state 2 softmax(1, 3, 2)
    w1 = math.exp(3) / (2 * math.exp(2.5) + math.exp(3))
    soft2 = torch.softmax(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64), 0)
    d_lse = (torch.tensor([0.0, w1, 0.0], dtype=torch.float64) + soft2) / 2
    grad = torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64) + 0.5 * (d_lse - torch.tensor([0.5, 0.0, 0.5]))
    expected = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64) - 0.1 * grad
    assert torch.allclose(bias.double(), expected, atol=1e-6)


def test_discrete_cal_ql_with_a_floor_below_every_q_is_plain_cql():
    plain, low = discrete_step(None), discrete_step(torch.tensor([-1e9, -1e9]))
    assert plain[0].keys() == low[0].keys()
    for k in plain[0]:
        assert torch.equal(plain[0][k], low[0][k]), k
    assert torch.equal(plain[1], low[1]) and torch.equal(plain[2], low[2])


# ----------------------------------------------------------------------------------------------------------------
# End-to-end runs (slow)
ONLINE = ["--total-steps", "20", "--online-steps", "30", "--utd", "2", "--batch-size", "32", "--hidden-dim", "32",
          "--seed", "3"]
SMALL = {"iql_finetune.py": [], "cql_finetune.py": ["--cql-n-actions", "2"]}


def env_steps_at(step: int, total: int = 20, utd: int = 2) -> int:
    """Environment steps taken by gradient step `step`: one before each --utd updates of the online phase."""
    return 0 if step <= total else (step - total - 1) // utd + 1


@pytest.mark.slow
@pytest.mark.parametrize("script, dataset, extra", [
    ("iql_finetune.py", "cartpole-medium", []), ("iql_finetune.py", "pendulum-medium", []),
    ("cql_finetune.py", "cartpole-medium", []), ("cql_finetune.py", "pendulum-medium", []),
    ("cql_finetune.py", "cartpole-medium", ["--cal-ql", "--online-ratio", "0.5"]),
    ("cql_finetune.py", "pendulum-medium", ["--cal-ql", "--online-ratio", "0.5"]),
])
def test_online_run_logs_env_steps_and_online_scores_and_saves_a_loadable_model(tmp_path, script, dataset, extra):
    out = run_script(script, "--dataset", dataset, *ONLINE, *SMALL[script], *extra, "--log-every", "5",
                     "--eval-every", "1000", "--eval-episodes", "1", "--save-model", cwd=tmp_path)
    assert "nan" not in out and f"{script}: done, 80 steps in" in out.splitlines()[-1]
    run = next((tmp_path / "runs").iterdir())
    charts, evals, online = scalars(run, "charts/"), scalars(run, "eval/"), scalars(run, "online/")
    # (odd steps logged too: the environment steps before the first of each --utd updates, not after the last)
    assert charts["charts/env_steps"] == {s: env_steps_at(s) for s in range(5, 81, 5)}
    # evaluated at the switch (step 20, 0 env steps) and at the end (step 80, 30 env steps), the same numbers
    assert set(evals["eval/normalized_score"]) == {20, 80} and set(online["online/normalized_score"]) == {0, 30}
    assert online["online/normalized_score"][0] == evals["eval/normalized_score"][20]
    assert online["online/normalized_score"][30] == evals["eval/normalized_score"][80]
    assert online["online/return"][30] == evals["eval/return"][80]
    # episodes: logged at the env step that ends each; CartPole pays 1 per step, so return = length and the env
    # steps at which they end are the running sums of the lengths; Pendulum's 200 steps do not end in 30
    lengths = charts.get("charts/episodic_length", {})
    if dataset == "pendulum-medium":
        assert not lengths
    else:
        assert list(lengths) == np.cumsum(list(lengths.values())).tolist()
        assert charts["charts/episodic_return"] == lengths
    # the share of online rows in a batch: uniform sampling gives k / (N + k) with k env steps; Cal-QL with ratio
    # 0.5 gives 0.5 once the first episode has ended (its rows are held back until then), else 0
    n = len(D.load_dataset(dataset))
    first_end = min(lengths, default=math.inf)
    for step, share in charts["charts/online_share"].items():
        k = env_steps_at(step)
        if extra:
            assert share == (0.5 if k >= first_end else 0.0), step
        else:
            assert share == pytest.approx(k / (n + k), rel=1e-5), step
    if extra and dataset == "pendulum-medium":
        assert "diagnostics/cal_ql_bound_rate" in scalars(run, "diagnostics/")
    offline = script.replace("_finetune", "")  # the checkpoint is the offline script's, which loads it
    (path,) = tmp_path.glob(f"runs/*/{offline[:-3]}.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["args"]["online_steps"] == 30
    out = run_script(offline, "--load-model", str(path), "--eval-episodes", "1", cwd=tmp_path)
    assert f"on {dataset} over 1 episodes: normalized" in out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["iql_finetune.py", "cql_finetune.py"])
@pytest.mark.parametrize("dataset", ["pendulum-medium", "cartpole-medium"])
def test_online_runs_are_the_same_whatever_the_logging_and_evaluation(tmp_path, script, dataset):
    # the settings that could leak into training (as tests/test_scripts.py), and both halves of the batch
    extra = {"iql_finetune.py": ["--actor-dropout", "0.1"], "cql_finetune.py": ["--cql-alpha", "0"]}[script]
    base = ["--dataset", dataset, *ONLINE, *SMALL[script], *extra]
    common = [*base, "--online-ratio", "0.5"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    run_script(script, *common, "--log-every", "10", "--eval-every", "20", "--eval-episodes", "2", cwd=a)
    run_script(script, *common, "--log-every", "20", "--eval-every", "30", "--eval-episodes", "1", cwd=b)
    ra, rb = (next((d / "runs").iterdir()) for d in (a, b))
    la, lb = scalars(ra, "losses/"), scalars(rb, "losses/")
    assert la.keys() == lb.keys() and la
    for tag in la:
        assert {20, 30, 40, 60, 80} <= set(lb[tag])  # every log step and every evaluation step
        for step in (20, 40, 60, 80):
            assert la[tag][step] == lb[tag][step], (tag, step)  # bit-identical, not approximately equal
    ca, cb = scalars(ra, "charts/"), scalars(rb, "charts/")
    for tag in ("charts/episodic_return", "charts/episodic_length"):  # the same episodes, logged whatever the settings
        assert ca.get(tag) == cb.get(tag), tag
    assert all(ca["charts/env_steps"][s] == cb["charts/env_steps"][s] for s in (20, 40, 60, 80))
    # --online-ratio is what the online phase samples with: the same run with ratio 0 trains identically offline
    # (nothing online to draw yet, so the same uniform draws) and differently from the first online step on
    c = tmp_path / "c"
    c.mkdir()
    run_script(script, *base, "--online-ratio", "0", "--log-every", "10", "--eval-every", "20", "--eval-episodes", "2",
               cwd=c)
    lc = scalars(next((c / "runs").iterdir()), "losses/")
    for tag in la:
        assert all(la[tag][s] == lc[tag][s] for s in (10, 20)), tag
    assert all(la["losses/q_loss"][s] != lc["losses/q_loss"][s] for s in range(30, 81, 10))


# runs a script with two spies: the discount the replay buffer's returns-to-go get, and the mode of every module
# the acting policy uses while it acts
SPY = """
import runpy, sys
import torch.nn as nn
import online
track_returns, step = online.OnlineReplayBuffer.track_returns, online.OnlineCollector.step
def spy_returns(self, returns_to_go, episode_ends):
    print("returns_to_go discount", returns_to_go.keywords["discount"])
    return track_returns(self, returns_to_go, episode_ends)
def spy_step(self, explore, *modules):
    def acting(obs):
        used = [m for m in explore.args if isinstance(m, nn.Module)]
        print("acting with", [m.training for m in used], "dropout layers", sum(
            isinstance(x, nn.Dropout) for m in used for x in m.modules()))
        return explore(obs)
    return step(self, acting, *modules)
online.OnlineReplayBuffer.track_returns, online.OnlineCollector.step = spy_returns, spy_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [("iql_finetune.py", ["--actor-dropout", "0.1"]),
                                           ("cql_finetune.py", ["--cal-ql", "--discount", "0.9", "--cql-n-actions",
                                                                "2"])])
def test_the_acting_policy_runs_in_eval_mode_and_cal_ql_returns_use_the_discount(tmp_path, script, extra):
    flags = ["--dataset", "pendulum-medium", "--total-steps", "5", "--online-steps", "4", "--batch-size", "16",
             "--hidden-dim", "16", "--eval-episodes", "0", *extra]
    proc = subprocess.run([sys.executable, "-c", SPY, str(ROOT / script), *flags], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    acting = [line for line in proc.stdout.splitlines() if line.startswith("acting with")]
    # one action per environment step, every module it uses in eval mode (IQL's actor has dropout layers to switch)
    assert acting == ["acting with [False] dropout layers " + ("2" if script == "iql_finetune.py" else "0")] * 4
    returns = [line for line in proc.stdout.splitlines() if line.startswith("returns_to_go")]
    assert returns == (["returns_to_go discount 0.9"] if script == "cql_finetune.py" else [])


def fail_one_line(script: str, *flags: str, cwd: Path) -> str:
    """Run a script that must refuse its flags with status 1 and a one-line error (small settings first, so that a
    script that wrongly accepts them ends in seconds)."""
    small = ["--total-steps", "5", "--batch-size", "8", "--hidden-dim", "8", "--eval-episodes", "0"]
    proc = subprocess.run([sys.executable, str(ROOT / script), *small, *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_online_flag_errors_are_one_line(tmp_path):
    for name in ("cartpole-medium", "pendulum-medium"):  # generated now, so no progress bar shares stderr
        D.load_dataset(name)
    for script in ("iql.py", "cql.py"):  # the offline scripts train at least one step and know no online flags
        line = fail_one_line(script, "--dataset", "cartpole-medium", "--total-steps", "0", cwd=tmp_path)
        assert "--total-steps 0 is out of range: it must lie in [1, inf)" in line
    assert "--online-steps 0 is out of range" in fail_one_line(
        "iql_finetune.py", "--dataset", "cartpole-medium", "--total-steps", "0", "--online-steps", "0", cwd=tmp_path)
    assert "--total-steps 0 --online-steps 0 trains nothing" in fail_one_line(
        "cql_finetune.py", "--dataset", "cartpole-medium", "--total-steps", "0", "--online-steps", "0", cwd=tmp_path)
    for script in ("iql_finetune.py", "cql_finetune.py"):
        assert "--online-ratio 1.5 is out of range" in fail_one_line(
            script, "--dataset", "cartpole-medium", "--online-steps", "5", "--online-ratio", "1.5", cwd=tmp_path)
        assert "--utd 0 is out of range" in fail_one_line(
            script, "--dataset", "cartpole-medium", "--online-steps", "5", "--utd", "0", cwd=tmp_path)
    assert "--deterministic-actor" in fail_one_line("iql_finetune.py", "--dataset", "pendulum-medium",
                                                    "--deterministic-actor", "--online-steps", "5", cwd=tmp_path)
    assert "--online-epsilon" in fail_one_line("cql_finetune.py", "--dataset", "cartpole-medium", "--online-steps", "5",
                                               "--online-epsilon", "1.5", cwd=tmp_path)
    bare = D.generate_builtin("cartpole-medium", 500)
    bare.env_id = None
    D.save_npz(bare, tmp_path / "bare.npz")
    assert "no env_id" in fail_one_line("iql_finetune.py", "--dataset", str(tmp_path / "bare.npz"), "--online-steps",
                                        "5", cwd=tmp_path)


@pytest.mark.slow
def test_iql_actor_lr_is_constant_in_both_phases_when_an_online_phase_follows(tmp_path):
    # the authors' fine-tuning config: no decay before or after the switch (a cosine over the offline steps would
    # take the rate to 0 at the switch and then jump back to --learning-rate)
    run_script("iql_finetune.py", "--dataset", "cartpole-medium", "--total-steps", "20", "--online-steps", "10",
               "--learning-rate", "0.001", "--batch-size", "16", "--hidden-dim", "16", "--log-every", "1",
               "--eval-episodes", "0", cwd=tmp_path)
    lr = scalars(next((tmp_path / "runs").iterdir()), "charts/")["charts/actor_lr"]
    assert set(lr) == set(range(1, 31)) and all(lr[step] == np.float32(0.001) for step in lr)


@pytest.mark.slow
def test_from_scratch_the_first_learning_starts_steps_are_random_and_train_nothing(tmp_path):
    run_script("cql_finetune.py", "--dataset", "cartpole-medium", "--total-steps", "0", "--online-steps", "30",
               "--learning-starts", "20", "--cql-alpha", "0", "--online-ratio", "1", "--batch-size", "8",
               "--hidden-dim", "8", "--log-every", "1", "--eval-episodes", "0", cwd=tmp_path)
    charts = scalars(next((tmp_path / "runs").iterdir()), "charts/")
    # 30 environment steps, 10 gradient steps: the first gradient step comes after 20 random steps and one of the
    # policy's
    assert sorted(charts["charts/env_steps"]) == list(range(1, 11))
    assert [charts["charts/env_steps"][s] for s in range(1, 11)] == list(range(21, 31))
    assert "--learning-starts 30" in fail_one_line("cql_finetune.py", "--dataset", "cartpole-medium", "--total-steps",
                                                   "0", "--online-steps", "30", "--learning-starts", "30", cwd=tmp_path)
