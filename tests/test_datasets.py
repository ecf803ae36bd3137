"""Built-in datasets, .npz and Minari loading, validation errors, behaviour log-probs and the report."""

import math
import sys

import gymnasium as gym
import numpy as np
import pytest

import datasets as D

SMALL = 3000  # transitions per generated dataset in these tests (the real ones have 100k)


@pytest.fixture(scope="module")
def small() -> dict[str, D.Dataset]:
    return {name: D.generate_builtin(name, SMALL) for name in D.BUILTIN_NAMES}


def test_there_are_twenty_builtin_names():
    assert len(D.BUILTIN_NAMES) == 20
    assert "lunarlander-continuous-medium-expert" in D.BUILTIN_NAMES


@pytest.mark.parametrize("name", D.BUILTIN_NAMES)
def test_builtin_shapes_dtypes_and_metadata(small, name):
    ds = small[name]
    D.validate(ds)
    env = gym.make(ds.env_id, **ds.env_kwargs)
    n = len(ds)
    assert n >= SMALL
    assert ds.observations.dtype == np.float32 and ds.observations.shape == (n, *env.observation_space.shape)
    assert ds.next_observations.shape == ds.observations.shape
    if isinstance(env.action_space, gym.spaces.Discrete):
        assert ds.actions.dtype == np.int64 and ds.actions.shape == (n,)
    else:
        assert ds.actions.dtype == np.float32 and ds.actions.shape == (n, *env.action_space.shape)
    assert ds.rewards.dtype == np.float32 and ds.rewards.shape == (n,)
    assert ds.terminals.dtype == bool and ds.timeouts.dtype == bool
    assert ds.behavior_log_probs.shape == (n,) and np.isfinite(ds.behavior_log_probs).all()
    assert ds.ref_min_score < ds.ref_max_score
    # whole episodes only: the last row ends an episode, and s' of a non-final row is the next row's s
    assert ds.terminals[-1] or ds.timeouts[-1]
    cont = ~(ds.terminals | ds.timeouts)[:-1]
    np.testing.assert_array_equal(ds.next_observations[:-1][cont], ds.observations[1:][cont])
    assert not (ds.terminals & ds.timeouts).any()


def test_generation_is_deterministic_to_the_byte():
    a, b = (D.generate_builtin("lunarlander-continuous-mixed", 2000) for _ in range(2))
    for k in (*D.ARRAY_KEYS, "behavior_log_probs"):
        assert getattr(a, k).tobytes() == getattr(b, k).tobytes(), k


def test_qualities_order_and_medium_sits_30_to_60_percent(small):
    for env in D.ENVS:
        score = {q: small[f"{env}-{q}"].normalized_score(small[f"{env}-{q}"].episode_returns().mean())
                 for q in D.QUALITIES}
        assert score["random"] < score["mixed"] < score["medium"] < score["medium-expert"] < score["expert"], score
        assert 25 <= score["medium"] <= 65, (env, score["medium"])
        assert score["expert"] > 80, (env, score["expert"])


def test_pendulum_expert_beats_minus_200():
    arrays = D.rollout_episodes(D.ENVS["pendulum"], lambda e: 0.0, 0, seed=3, n_episodes=30)
    rets = D.Dataset(**arrays).episode_returns()
    assert rets.mean() > -200


def test_reference_scores_match_a_fresh_measurement():
    for env in ("pendulum", "cartpole"):
        lo, hi = D.measure_reference_scores(env, episodes=40, seed=7)
        r = D.ENVS[env]
        assert abs(lo - r.ref_min_score) < 0.1 * abs(r.ref_max_score - r.ref_min_score)
        assert abs(hi - r.ref_max_score) < 0.1 * abs(r.ref_max_score - r.ref_min_score)


def test_load_dataset_caches_on_disk(dataset_cache):
    first = D.load_dataset("cartpole-random")
    files = list(dataset_cache.glob("cartpole-random-*.npz"))
    assert len(files) == 1
    second = D.load_dataset("cartpole-random")
    assert len(first) >= 100_000 and first.rewards.tobytes() == second.rewards.tobytes()
    assert second.env_id == "CartPole-v1" and second.ref_max_score == 500.0


# --- behaviour log-probs: proper distributions, and the ones that produced the data ---------------------------
def _policy(env_name: str, eps: float, seed: int = 0) -> D.BehaviorPolicy:
    r = D.ENVS[env_name]
    return D.BehaviorPolicy(gym.make(r.env_id, **r.env_kwargs).action_space, r.expert(), eps, r.sigma,
                            np.random.default_rng(seed))


@pytest.mark.parametrize("env_name", ["cartpole", "lunarlander"])
def test_discrete_behaviour_probabilities_sum_to_one(env_name, small):
    obs = small[f"{env_name}-medium"].observations[:20]
    pol = _policy(env_name, 0.37)
    for o in obs:
        total = sum(math.exp(pol.log_prob(o, a)) for a in range(int(pol.space.n)))
        assert total == pytest.approx(1.0, abs=1e-9)


def test_box_behaviour_density_integrates_to_one_1d_and_2d(small):
    pend = _policy("pendulum", 0.3)
    grid = np.linspace(-2, 2, 4001)
    for o in small["pendulum-medium"].observations[:5]:
        dens = np.array([math.exp(pend.log_prob(o, np.array([g]))) for g in grid])
        assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=2e-3)
    lunar = _policy("lunarlander-continuous", 0.3)
    g = np.linspace(-1, 1, 301)
    o = small["lunarlander-continuous-medium"].observations[0]
    dens = np.array([[math.exp(lunar.log_prob(o, np.array([x, y]))) for y in g] for x in g])
    assert np.trapezoid(np.trapezoid(dens, g, axis=1), g) == pytest.approx(1.0, abs=5e-3)


def test_truncated_gaussian_samples_follow_the_stored_density():
    """Samples near the boundary: a clipped Gaussian would pile mass on the edge, a truncated one does not."""
    pol = _policy("pendulum", 0.0, seed=1)
    obs = np.array([math.cos(0.05), math.sin(0.05), 0.0])  # upright: expert action -0.5, noise std 0.2
    pol.expert = lambda o: np.array([1.9])  # put the mean near the edge of the [-2, 2] box
    samples = np.array([pol.act(obs)[0][0] for _ in range(20000)])
    edges = np.linspace(1.5, 2.0, 11)
    hist = np.histogram(samples, bins=edges)[0] / len(samples)
    fine = np.linspace(1.5, 2.0, 5001)
    dens = np.array([math.exp(pol.log_prob(obs, np.array([x]))) for x in fine])
    expected = [np.trapezoid(dens[(fine >= a) & (fine <= b)], fine[(fine >= a) & (fine <= b)])
                for a, b in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(hist, expected, atol=0.01)
    assert (samples <= 2.0).all() and (samples == 2.0).mean() < 0.001


@pytest.mark.parametrize("env_name", ["cartpole", "lunarlander-continuous"])
def test_stored_log_probs_are_those_of_the_generating_policy(env_name, small):
    ds = small[f"{env_name}-medium"]
    pol = _policy(env_name, D.ENVS[env_name].medium_eps)
    idx = np.arange(0, len(ds), 97)
    recomputed = [pol.log_prob(ds.observations[i], ds.actions[i]) for i in idx]
    np.testing.assert_allclose(ds.behavior_log_probs[idx], recomputed, rtol=1e-5, atol=1e-5)


def test_discrete_action_frequencies_match_the_behaviour_policy(small):
    ds = D.generate_builtin("cartpole-medium", 20000)
    eps = D.ENVS["cartpole"].medium_eps
    expert = np.array([D.cartpole_expert(o) for o in ds.observations])
    assert (ds.actions == expert).mean() == pytest.approx(1 - eps / 2, abs=0.01)


# --- .npz and Minari ---------------------------------------------------------------------------------------
def test_npz_round_trip(tmp_path, small):
    ds = small["lunarlander-continuous-medium"]
    D.save_npz(ds, tmp_path / "mine.npz")
    back = D.load_dataset(str(tmp_path / "mine.npz"))
    for k in (*D.ARRAY_KEYS, "behavior_log_probs"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ds, k))
    assert back.env_kwargs == {"continuous": True} and back.ref_min_score == ds.ref_min_score


def test_npz_without_metadata_loads_and_has_no_score(tmp_path, small):
    ds = small["cartpole-medium"]
    np.savez(tmp_path / "bare.npz", **{k: getattr(ds, k) for k in D.ARRAY_KEYS})
    back = D.load_dataset(str(tmp_path / "bare.npz"))
    assert back.env_id is None and back.behavior_log_probs is None and math.isnan(back.normalized_score(1.0))


def test_minari_round_trip(tmp_path, monkeypatch):
    """A Minari dataset made locally with Minari's own tools (no network), with both terminals and timeouts."""
    minari = pytest.importorskip("minari")
    pytest.importorskip("h5py")
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = gym.make("CartPole-v1", max_episode_steps=60)
    rng = np.random.default_rng(0)
    buffers = []
    for ep in range(12):
        obs, _ = env.reset(seed=ep)
        o, a, r, te, tr = [obs], [], [], [], []
        while not (te and (te[-1] or tr[-1])):
            act = int(rng.integers(2)) if ep % 2 else D.cartpole_expert(o[-1])
            obs, rew, term, trunc, _ = env.step(act)
            o.append(obs), a.append(act), r.append(rew), te.append(term), tr.append(trunc)
        buffers.append(EpisodeBuffer(id=ep, observations=np.array(o), actions=np.array(a), rewards=np.array(r),
                                     terminations=np.array(te), truncations=np.array(tr), infos={}))
    minari.create_dataset_from_buffers("cartpole/test-v0", buffers, env=env, algorithm_name="mixed",
                                       ref_min_score=23.0, ref_max_score=500.0, data_format="hdf5")
    ds = D.load_dataset("cartpole/test-v0")
    steps = sum(len(b.rewards) for b in buffers)
    assert len(ds) == steps and ds.env_id == "CartPole-v1" and ds.discrete
    assert ds.terminals.sum() == sum(b.terminations.sum() for b in buffers) > 0  # terminals and timeouts ...
    assert ds.timeouts.sum() == sum(b.truncations.sum() for b in buffers) > 0  # ... both present, kept distinct
    assert ds.ref_min_score == 23.0 and ds.ref_max_score == 500.0
    np.testing.assert_array_equal(ds.observations[:5], buffers[0].observations[:5])
    cont = ~(ds.terminals | ds.timeouts)[:-1]
    np.testing.assert_array_equal(ds.next_observations[:-1][cont], ds.observations[1:][cont])


def test_minari_id_without_minari_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "minari", None)  # makes `import minari` raise ImportError
    with pytest.raises(D.UserError, match="pip install minari"):
        D.load_dataset("mujoco/hopper/medium-v0")


# --- bad input gets a clear error ---------------------------------------------------------------------------
def _write(tmp_path, ds, **override):
    arrays = {k: getattr(ds, k) for k in D.ARRAY_KEYS}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays, env_id=np.asarray(ds.env_id), env_kwargs=np.asarray(repr(ds.env_kwargs)))
    return str(path)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="lunarlander-medium-expert"):
        D.load_dataset("lunarlander-hard")


def test_missing_file():
    with pytest.raises(D.UserError, match="does not exist"):
        D.load_dataset("/nonexistent/data.npz")


def test_missing_array(tmp_path, small):
    with pytest.raises(ValueError, match=r"missing array\(s\) \['timeouts'\]"):
        D.load_dataset(_write(tmp_path, small["cartpole-medium"], timeouts=None))


def test_mismatched_lengths(tmp_path, small):
    ds = small["cartpole-medium"]
    with pytest.raises(ValueError, match="row-aligned"):
        D.load_dataset(_write(tmp_path, ds, rewards=ds.rewards[:-5]))


def test_nan_and_inf_are_reported_with_their_rows(tmp_path, small):
    ds = small["pendulum-medium"]
    obs = ds.observations.copy()
    obs[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"observations has 1 NaN/inf.*\[7\]"):
        D.load_dataset(_write(tmp_path, ds, observations=obs))
    rew = ds.rewards.copy()
    rew[3] = np.inf
    with pytest.raises(ValueError, match="rewards has 1 NaN/inf"):
        D.load_dataset(_write(tmp_path, ds, rewards=rew))


def test_actions_outside_the_action_space(tmp_path, small):
    ds = small["pendulum-medium"]
    act = ds.actions.copy()
    act[11] = 2.5
    with pytest.raises(ValueError, match="outside Box.*row 11"):
        D.load_dataset(_write(tmp_path, ds, actions=act))
    cp = small["cartpole-medium"]
    with pytest.raises(ValueError, match="outside Discrete"):
        D.load_dataset(_write(tmp_path, cp, actions=cp.actions + 1))
    with pytest.raises(ValueError, match="1-D integer array"):
        D.load_dataset(_write(tmp_path, cp, actions=cp.actions.astype(np.float32)))


def test_observation_shape_must_match_the_environment(tmp_path, small):
    ds = small["cartpole-medium"]  # 4-d observations claimed to come from LunarLander (8-d)
    arrays = {k: getattr(ds, k) for k in D.ARRAY_KEYS}
    np.savez(tmp_path / "x.npz", **arrays, env_id=np.asarray("LunarLander-v3"))
    with pytest.raises(ValueError, match=r"shape \(4,\) but LunarLander-v3 observes \(8,\)"):
        D.load_dataset(str(tmp_path / "x.npz"))


# --- the report --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", D.BUILTIN_NAMES)
def test_report_prints_for_every_builtin(small, name):
    text = D.report(small[name])
    assert f"dataset {name}" in text and "normalized" in text and "return histogram" in text
    assert ("action frequencies" in text) == small[name].discrete
    assert "behaviour policy: mean -log pi_b" in text


@pytest.mark.parametrize("key", ["rewards", "terminals", "timeouts", "behavior_log_probs"])
def test_per_transition_arrays_shaped_n_by_1_are_squeezed_with_a_note(tmp_path, small, capsys, key):
    ds = small["pendulum-medium"]  # the CQL authors' loader writes rewards and terminals as (N, 1)
    extra = {"behavior_log_probs": ds.behavior_log_probs} if key != "behavior_log_probs" else {}
    path = _write(tmp_path, ds, **{key: getattr(ds, key)[:, None]}, **extra)
    loaded = D.load_dataset(path)
    assert getattr(loaded, key).shape == (len(ds),)
    np.testing.assert_array_equal(getattr(loaded, key), getattr(ds, key))
    assert f"{key} has shape ({len(ds)}, 1); using it as ({len(ds)},)" in capsys.readouterr().out


def test_other_shapes_and_dtypes_are_refused(tmp_path, small):
    ds = small["pendulum-medium"]
    with pytest.raises(D.UserError, match=r"rewards must have one value per transition.*\(3\d+, 2\)"):
        D.load_dataset(_write(tmp_path, ds, rewards=np.stack([ds.rewards, ds.rewards], 1)))
    with pytest.raises(D.UserError, match=r"observations must be a real \(N, dim\) array"):
        D.load_dataset(_write(tmp_path, ds, observations=ds.observations.astype(str)))
    with pytest.raises(D.UserError, match=r"actions\[:, None\]"):  # a 1-D Box action without its dimension
        D.load_dataset(_write(tmp_path, ds, actions=ds.actions[:, 0]))
    bare = D.Dataset(**{k: getattr(ds, k) for k in D.ARRAY_KEYS})  # no env to check against: still (N, dim)
    bare.actions = bare.actions[:, 0]
    with pytest.raises(D.UserError, match=r"actions must be a real \(N, dim\) array"):
        D.validate(bare)


@pytest.mark.parametrize("text", ['{"continuous": true}', "{'continuous': True}"])
def test_env_kwargs_may_be_json_or_a_python_dict(tmp_path, small, text):
    ds = small["lunarlander-continuous-medium"]
    path = tmp_path / "kw.npz"
    np.savez(path, **{k: getattr(ds, k) for k in D.ARRAY_KEYS}, env_id=np.asarray(ds.env_id),
             env_kwargs=np.asarray(text))
    assert D.load_dataset(str(path)).env_kwargs == {"continuous": True}


def test_env_kwargs_that_are_not_a_dict_get_a_clear_error(tmp_path, small):
    ds = small["cartpole-medium"]
    path = tmp_path / "kw.npz"
    np.savez(path, **{k: getattr(ds, k) for k in D.ARRAY_KEYS}, env_kwargs=np.asarray("continuous=True"))
    with pytest.raises(D.UserError, match="env_kwargs must be a JSON object or a Python dict literal"):
        D.load_dataset(str(path))


def test_a_corrupt_npz_is_a_user_error(tmp_path):
    (tmp_path / "x.npz").write_text("not a zip file")
    with pytest.raises(D.UserError, match="not a readable .npz"):
        D.load_dataset(str(tmp_path / "x.npz"))


def test_minari_reference_scores_own_then_d4rl_table_then_none(capsys):
    assert D.minari_reference_scores("D4RL/door/human-v2", {"ref_min_score": -1, "ref_max_score": 9}) == (-1.0, 9.0)
    assert D.minari_reference_scores("mujoco/hopper/medium-v0", {}) == (-20.272305, 3234.3)
    assert "D4RL's hopper returns" in capsys.readouterr().out
    assert D.minari_reference_scores("mujoco/pusher/medium-v0", {}) == (None, None)
    assert "no normalized score" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_generating_the_same_dataset_at_once_both_succeed(tmp_path):
    import os
    import subprocess

    # two seeds started together used to write the same temporary cache file and read back a corrupt one
    env = dict(os.environ, OFFLINE_RL_DATA=str(tmp_path), OMP_NUM_THREADS="1")
    code = "import datasets; print(len(datasets.load_dataset('lunarlander-continuous-expert')))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(D.__file__), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1
    assert not list(tmp_path.glob("*.tmp.npz"))
