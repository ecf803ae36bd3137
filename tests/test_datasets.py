"""Built-in datasets, .npz and Minari loading, validation errors, behaviour log-probs and the report."""

import math
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import datasets as D

SMALL = 3000  # transitions per generated dataset in these tests (the real ones have 100k, MuJoCo ones 1M)
HOPPER = tuple(n for n in D.LOCOMOTION_NAMES if n.startswith("hopper-"))  # the MuJoCo names generated here
GENERATED = D.CLASSIC_NAMES + HOPPER
REPLAY_STEPS, MEDIUM_STEP = [200, 700, 1500], 3000  # the tiny hopper "training run" (medium-replay = SMALL rows)


def write_tiny_behaviour(folder) -> None:
    """Untrained actors (hidden 32, distinct seeds) in the behaviour policy format, for all three environments;
    hopper's files describe a run with replay snapshots at REPLAY_STEPS and the medium checkpoint at MEDIUM_STEP."""
    import torch

    for e, (env, env_id) in enumerate(D.LOCOMOTION.items()):
        space = gym.make(env_id)
        dims = (space.observation_space.shape[0], space.action_space.shape[0])
        meta = dict(env_id=env_id, eval_return_std=1.0, seed=0, learning_starts=REPLAY_STEPS[0])
        files = {f"{env}-replay-{s:07d}": dict(train_env_steps=s, eval_return_mean=10.0) for s in REPLAY_STEPS}
        files[f"{env}-medium"] = dict(train_env_steps=MEDIUM_STEP, eval_return_mean=300.0, replay_steps=REPLAY_STEPS)
        files[f"{env}-expert"] = dict(train_env_steps=10_000, eval_return_mean=1000.0)
        for i, (stem, extra) in enumerate(files.items()):
            torch.manual_seed(100 * e + i)
            D.save_behaviour_policy(folder / f"{stem}.pt", D.SquashedGaussianActor(*dims, hidden=32), **meta, **extra)


@pytest.fixture(scope="module")
def behaviour(tmp_path_factory):
    """The tiny behaviour policies, found through OFFLINE_RL_BEHAVIOUR (never the committed behaviour_policies/)."""
    folder = tmp_path_factory.mktemp("behaviour")
    write_tiny_behaviour(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFLINE_RL_BEHAVIOUR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def small(behaviour) -> dict[str, D.Dataset]:
    return {name: D.generate_builtin(name, SMALL) for name in GENERATED}


def test_there_are_thirty_five_builtin_names():
    assert len(D.BUILTIN_NAMES) == 35 and len(set(D.BUILTIN_NAMES)) == 35
    assert D.BUILTIN_NAMES[:20] == D.CLASSIC_NAMES  # the first 20 (and their seeds) are unchanged
    assert "lunarlander-continuous-medium-expert" in D.BUILTIN_NAMES
    assert {"walker2d-medium-replay", "halfcheetah-medium-expert", "hopper-random"} <= set(D.BUILTIN_NAMES)
    assert D._split_name("halfcheetah-medium-replay") == ("halfcheetah", "medium-replay")


@pytest.mark.parametrize("name", GENERATED)
def test_builtin_shapes_dtypes_and_metadata(small, name):
    ds = small[name]
    D.validate(ds)
    env = gym.make(ds.env_id, **ds.env_kwargs)
    n = len(ds)
    assert n == SMALL if name.endswith("medium-replay") else n >= SMALL
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
@pytest.mark.parametrize("name", GENERATED)
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
    with pytest.raises(D.UserError, match=r"observations must be an array of numbers, one row per"):
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


def _tiny(tmp_path, env="CartPole-v1", n=20, **override) -> str:
    """A small synthetic .npz for the error tests: CartPole (4-d obs, Discrete(2)) or Pendulum (3-d obs, Box(1,)).
    `override` replaces arrays or metadata; None drops one."""
    obs_dim, actions = (4, np.zeros(n, np.int64)) if env == "CartPole-v1" else (3, np.zeros((n, 1), np.float32))
    arrays = dict(observations=np.zeros((n, obs_dim), np.float32), actions=actions, rewards=np.ones(n, np.float32),
                  next_observations=np.zeros((n, obs_dim), np.float32), terminals=np.zeros(n, bool),
                  timeouts=np.arange(n) == n - 1, env_id=np.asarray(env))
    arrays.update(override)
    np.savez(tmp_path / "tiny.npz", **{k: v for k, v in arrays.items() if v is not None})
    return str(tmp_path / "tiny.npz")


def test_a_file_that_is_not_a_zip_archive_is_not_blamed_on_pickled_data(tmp_path):
    for text in ("not a zip file", ""):  # a text file, an empty file
        (tmp_path / "x.npz").write_text(text)
        with pytest.raises(D.UserError, match=r"x.npz: not a valid .npz file \(not a zip archive") as e:
            D.load_dataset(str(tmp_path / "x.npz"))
        assert "pickled" not in str(e.value)


def test_object_arrays_are_refused_as_pickled_data(tmp_path):
    path = _tiny(tmp_path, rewards=np.array([1.0, "a"] * 10, dtype=object))
    with pytest.raises(D.UserError, match="array 'rewards' holds Python objects \\(pickled data\\)"):
        D.load_dataset(path)


def test_a_damaged_array_in_the_archive_is_a_user_error(tmp_path):
    path = Path(_tiny(tmp_path))
    data = bytearray(path.read_bytes())
    data[data.find(b"NUMPY") + 200] ^= 0xFF  # flip bits inside the first array: its CRC no longer matches
    path.write_bytes(data)
    with pytest.raises(D.UserError, match="array 'observations' cannot be read .*Bad CRC-32.*damaged"):
        D.load_dataset(str(path))


def test_a_directory_is_not_a_dataset(tmp_path):
    for folder in (tmp_path / "run.npz", tmp_path / "some" / "dir"):  # with and without the .npz suffix
        folder.mkdir(parents=True)
        with pytest.raises(D.UserError, match=f"{folder} is a directory, not a dataset file"):
            D.load_dataset(str(folder))


def test_a_missing_path_without_npz_suffix_is_not_sent_to_minari(tmp_path):
    with pytest.raises(D.UserError, match="does not exist, and is neither a built-in name nor a Minari id"):
        D.load_dataset(str(tmp_path / "mydata"))


def test_an_empty_npz_says_it_holds_no_arrays(tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(D.UserError, match=r"empty.npz holds no arrays; an offline dataset needs \['observations'"):
        D.load_dataset(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "other.npz", obs=np.zeros(3), acts=np.zeros(3))  # someone else's names: say what is there
    with pytest.raises(D.UserError, match=r"missing array\(s\) \[.*\], found \['acts', 'obs'\]"):
        D.load_dataset(str(tmp_path / "other.npz"))


def test_scalar_and_non_numeric_arrays_are_refused(tmp_path):
    refused = "rewards must be an array of numbers, one row per transition, got "
    with pytest.raises(D.UserError, match=refused + r"float32 \(\)"):
        D.load_dataset(_tiny(tmp_path, rewards=np.float32(1.0)))
    with pytest.raises(D.UserError, match=refused + "<U1"):
        D.load_dataset(_tiny(tmp_path, rewards=np.array(["a"] * 20)))
    with pytest.raises(D.UserError, match=r"behavior_log_probs must be an array of numbers"):
        D.load_dataset(_tiny(tmp_path, behavior_log_probs=np.array(["-0.7"] * 20)))


def test_metadata_must_be_single_values_of_the_right_kind(tmp_path):
    with pytest.raises(D.UserError, match=r"env_id must be a single str, got array\(\['a', 'b'\]"):
        D.load_dataset(_tiny(tmp_path, env_id=np.array(["a", "b"])))
    with pytest.raises(D.UserError, match="ref_min_score must be a single float, got array\\('abc'"):
        D.load_dataset(_tiny(tmp_path, ref_min_score=np.asarray("abc"), ref_max_score=np.asarray(1.0)))
    assert D.load_dataset(_tiny(tmp_path, ref_min_score=np.asarray(0), ref_max_score=np.asarray(5))).ref_max_score == 5


def test_integer_actions_for_a_box_action_space_are_refused(tmp_path):
    with pytest.raises(D.UserError, match=r"Pendulum-v1 has a Box action space, so actions must be floats, got int64"):
        D.load_dataset(_tiny(tmp_path, "Pendulum-v1", actions=np.zeros((20, 1), np.int64)))


# --- behaviour log-probabilities: ope.py uses them as the exact log pi_b(a|s) ----------------------------------
def test_discrete_log_probabilities_above_zero_are_refused(tmp_path):
    log_probs = np.full(20, -0.7, np.float32)
    log_probs[[3, 8]] = 0.7  # a probability of 2: e.g. a negative log-likelihood stored by mistake
    with pytest.raises(D.UserError, match=r"behavior_log_probs is above 0 at 2 row\(s\), first \[3, 8\]: a discrete "
                                          "action's probability cannot exceed 1"):
        D.load_dataset(_tiny(tmp_path, behavior_log_probs=log_probs))
    log_probs[[3, 8]] = 1e-7  # log of a probability that rounds to just above 1: float noise, accepted
    assert D.load_dataset(_tiny(tmp_path, behavior_log_probs=log_probs)).behavior_log_probs[3] == np.float32(1e-7)
    no_env = _tiny(tmp_path, behavior_log_probs=np.full(20, 0.7), env_id=None)  # integer actions: discrete anyway
    with pytest.raises(D.UserError, match=r"behavior_log_probs is above 0 at 20 row\(s\)"):
        D.load_dataset(no_env)


def test_box_log_densities_may_exceed_zero(tmp_path):
    ds = D.load_dataset(_tiny(tmp_path, "Pendulum-v1", behavior_log_probs=np.full(20, 2.5, np.float32)))
    assert (ds.behavior_log_probs == 2.5).all()


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_non_finite_log_probabilities_are_refused(tmp_path, env):
    for bad, what in ((np.nan, r"NaN or \+inf"), (np.inf, r"NaN or \+inf"), (-np.inf, "-inf")):
        log_probs = np.full(20, -0.7, np.float32)
        log_probs[5] = bad
        with pytest.raises(D.UserError, match=rf"behavior_log_probs is {what} at 1 row\(s\), first \[5\]") as e:
            D.load_dataset(_tiny(tmp_path, env, behavior_log_probs=log_probs))
        assert ("could not have taken" in str(e.value)) == (bad == -np.inf)


# --- the command line -------------------------------------------------------------------------------------------
def test_the_command_line_lists_the_builtin_names():
    import subprocess

    out = subprocess.run([sys.executable, D.__file__, "--list"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert out.split() == list(D.BUILTIN_NAMES)


def test_the_command_line_refuses_unknown_options_and_mixed_modes(capsys):
    for argv in (["--foo"], ["--list", "--all"], ["--all", "cartpole-medium"]):
        with pytest.raises(SystemExit) as e:
            D.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) <= 2, err
    with pytest.raises(SystemExit):
        D.main(["--help"])
    out = capsys.readouterr().out
    assert "--list" in out and "python datasets.py lunarlander-medium" in out


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


# --- MuJoCo locomotion (D4RL's recipe), with the tiny untrained behaviour policies -------------------------------
def _independent_log_prob(actor, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """log pi(a|s) recomputed from the stored float32 action: u = atanh(a) in float64, Gaussian density of u, minus
    log |d tanh/du| = log(1 - a^2); written directly (not through the library's stable formula)."""
    import torch

    a = actions.astype(np.float64)
    u = np.arctanh(a)
    with torch.no_grad():
        mean, log_std = (x.double().numpy() for x in actor(torch.from_numpy(obs)))
    std = np.exp(log_std)
    return (-0.5 * ((u - mean) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi)) - np.log1p(-a**2)).sum(-1)


@pytest.mark.parametrize("quality", ["medium", "expert"])
def test_locomotion_log_probs_are_the_actors_density_of_the_stored_action(small, quality):
    ds = small[f"hopper-{quality}"]
    actor, _ = D.load_behaviour_policy("hopper", f"hopper-{quality}")
    # away from |a| = 1, where the float32 rounding of the stored action moves atanh(a) noticeably
    ok = np.abs(ds.actions).max(1) < 0.99
    assert ok.mean() > 0.95
    recomputed = _independent_log_prob(actor, ds.observations[ok], ds.actions[ok])
    np.testing.assert_allclose(ds.behavior_log_probs[ok], recomputed, rtol=0, atol=2e-5)
    other, _ = D.load_behaviour_policy("hopper", "hopper-expert" if quality == "medium" else "hopper-medium")
    assert np.abs(_independent_log_prob(other, ds.observations[ok], ds.actions[ok]) - recomputed).mean() > 0.1


def test_locomotion_random_is_uniform_on_the_box(small):
    ds = small["hopper-random"]
    np.testing.assert_array_equal(ds.behavior_log_probs, np.float32(-3 * math.log(2.0)))
    assert ds.actions.min() >= -1 and ds.actions.max() <= 1
    np.testing.assert_allclose(ds.actions.mean(0), 0.0, atol=0.03)
    np.testing.assert_allclose(ds.actions.std(0), 1 / math.sqrt(3), atol=0.02)


def test_tanh_gaussian_density_integrates_to_one_and_matches_the_trainers_formula():
    import torch

    # one action dimension, a mean far from 0 so that the mass piles up near a = 1: the Jacobian matters there
    mean, log_std = 1.5, math.log(0.8)
    a = np.linspace(-1, 1, 400_001)[1:-1]
    u = np.arctanh(a)
    dens = np.exp(D.tanh_gaussian_log_prob(((u - mean) / math.exp(log_std))[:, None], np.full((len(a), 1), log_std),
                                           u[:, None]))
    assert np.trapezoid(dens, a) == pytest.approx(1.0, abs=1e-3)
    # the stable Jacobian where tanh(u) is 1 in floating point: log(1 - tanh(u)^2) = 2 (log 2 - |u| - log(1 + e^-2|u|))
    assert D.tanh_gaussian_log_prob(np.zeros((1, 1)), np.zeros((1, 1)), np.full((1, 1), 20.0))[0] == pytest.approx(
        -0.5 * math.log(2 * math.pi) - 2 * (math.log(2) - 20.0), rel=1e-12)
    # SquashedGaussianActor.sample (what SAC trains with) gives the same log-density as the datasets' float64 path
    torch.manual_seed(0)
    actor = D.SquashedGaussianActor(4, 3, hidden=16)
    obs = torch.randn(50, 4)
    act, logp = actor.sample(obs, torch.Generator().manual_seed(1))
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(1)).double().numpy()
    with torch.no_grad():
        m, ls = (x.double().numpy() for x in actor(obs))
    u = m + np.exp(ls) * z
    np.testing.assert_allclose(act.detach().numpy(), np.tanh(u), atol=1e-6)
    np.testing.assert_allclose(logp.detach().numpy(), D.tanh_gaussian_log_prob(z, ls, u), atol=1e-4)


def _hopper_unhealthy(next_obs: np.ndarray) -> np.ndarray:
    """Hopper-v5 terminates when z <= 0.7, |angle| >= 0.2 or any of obs[1:] leaves (-100, 100)."""
    z, angle = next_obs[:, 0], next_obs[:, 1]
    return ~((z > 0.7) & (angle > -0.2) & (angle < 0.2) & (np.abs(next_obs[:, 1:]) < 100).all(1))


@pytest.mark.parametrize("quality", ["random", "medium"])
def test_hopper_terminals_are_exactly_the_unhealthy_states(small, quality):
    ds = small[f"hopper-{quality}"]
    np.testing.assert_array_equal(ds.terminals, _hopper_unhealthy(ds.next_observations))
    assert ds.terminals.sum() > 20 and not ds.timeouts.any()  # these short episodes never reach the time limit
    assert ds.terminals[-1]


def test_halfcheetah_never_terminates_and_times_out_at_1000(behaviour):
    ds = D.generate_builtin("halfcheetah-random", 2000)
    assert len(ds) == 2000 and not ds.terminals.any()
    np.testing.assert_array_equal(np.flatnonzero(ds.timeouts), [999, 1999])
    cont = ~ds.timeouts[:-1]
    np.testing.assert_array_equal(ds.next_observations[:-1][cont], ds.observations[1:][cont])


class _FallsAtTheTimeLimit(gym.Env):
    """Terminates on its 3rd step, the step its 3-step time limit also cuts."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(1, self.t, np.float32), 1.0, self.t == 3, False, {}


def test_a_terminal_on_the_time_limits_step_is_a_terminal_not_a_timeout():
    gym.register("FallsAtTheTimeLimit-v0", entry_point=_FallsAtTheTimeLimit, max_episode_steps=3)
    try:
        pool = D.EnvPool("FallsAtTheTimeLimit-v0", 1, np.random.default_rng(0))
        policy = D.UniformSampler(pool.envs[0].action_space, np.random.default_rng(1))
        assert [pool.step(policy, [0]) for _ in range(3)] == [[], [], [0]]
        np.testing.assert_array_equal(pool.ep["terminals"][0], [False, False, True])
        np.testing.assert_array_equal(pool.ep["timeouts"][0], [False, False, False])  # TimeLimit set truncated too
        pool.close()
    finally:
        gym.registry.pop("FallsAtTheTimeLimit-v0")


def test_medium_expert_is_medium_followed_by_expert(small):
    me = D.generate_builtin("hopper-medium-expert", 2 * SMALL)
    med, exp = small["hopper-medium"], small["hopper-expert"]  # each generated with size SMALL
    assert len(me) == len(med) + len(exp)
    for k in (*D.ARRAY_KEYS, "behavior_log_probs"):
        np.testing.assert_array_equal(getattr(me, k), np.concatenate([getattr(med, k), getattr(exp, k)]), err_msg=k)
    assert me.ref_min_score == -20.272305 and me.ref_max_score == 3234.3  # D4RL's hopper reference returns


def test_medium_replay_replays_the_snapshots_in_order_for_their_step_counts(small):
    ds = small["hopper-medium-replay"]
    # which policy took each row: the candidate whose density of the stored action equals the stored log-prob
    actors = [D.load_behaviour_policy("hopper", f"hopper-replay-{s:07d}")[0] for s in REPLAY_STEPS]
    cand = [np.full(len(ds), -3 * math.log(2.0))]  # uniform before the first snapshot (the learning-starts steps)
    cand += [_independent_log_prob(a, ds.observations, ds.actions) for a in actors]
    diff = np.abs(np.stack(cand) - ds.behavior_log_probs)
    source = diff.argmin(0)
    assert np.median(diff.min(0)) < 1e-5 and (np.sort(diff, 0)[1] > 1e-3).mean() > 0.99  # unambiguous
    steps = np.diff([0, *REPLAY_STEPS, MEDIUM_STEP])  # 200 uniform, then 500, 800, 1500 steps of the snapshots
    np.testing.assert_array_equal(np.bincount(source, minlength=4), steps)
    # in order: episodes are stored as they end, so the policy that ended each episode never goes back, and
    # inside an episode (which runs on across a snapshot change, as in the training run) neither does the policy
    ends = ds.episode_ends()
    assert (np.diff(source[ends]) >= 0).all()
    starts = np.concatenate([[0], ends[:-1] + 1])
    for s, e in zip(starts, ends):
        assert (np.diff(source[s:e + 1]) >= 0).all()
    # the episodes still running at the end are cut: last rows marked timeouts, never terminals
    assert 0 < ds.timeouts.sum() <= D.N_ENVS and not (ds.terminals & ds.timeouts).any()
    # a smaller size replays the first steps of the run only
    first = D.generate_builtin("hopper-medium-replay", 600)
    assert len(first) == 600 and (first.behavior_log_probs == np.float32(-3 * math.log(2.0))).sum() == 200


def test_locomotion_generation_is_deterministic(small):
    for name in ("hopper-medium", "hopper-medium-replay"):
        again = D.generate_builtin(name, SMALL)
        for k in (*D.ARRAY_KEYS, "behavior_log_probs"):
            assert getattr(again, k).tobytes() == getattr(small[name], k).tobytes(), (name, k)
    # different names draw different noise and resets, even where the weights are shared
    assert small["hopper-medium"].observations[0].tobytes() != small["hopper-expert"].observations[0].tobytes()


def test_missing_behaviour_files_name_the_training_command(tmp_path, monkeypatch, behaviour):
    monkeypatch.setenv("OFFLINE_RL_BEHAVIOUR", str(tmp_path))
    cmd = "python tools/train_behaviour.py --env walker2d"
    with pytest.raises(D.UserError, match=r"walker2d-medium\.pt is missing.*" + cmd):
        D.generate_builtin("walker2d-medium", 100)
    with pytest.raises(D.UserError, match=r"walker2d-expert\.pt is missing.*" + cmd):
        D.load_dataset("walker2d-expert")
    assert len(D.generate_builtin("walker2d-random", 100)) >= 100  # random needs no weights
    # medium-replay: the medium file lists its snapshots; a missing one is named
    for f in behaviour.glob("hopper-*.pt"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hopper-replay-0000700.pt").unlink()
    with pytest.raises(D.UserError, match=r"hopper-replay-0000700\.pt is missing.*--env hopper"):
        D.load_dataset("hopper-medium-replay")


def test_cache_file_changes_with_the_behaviour_weights(tmp_path, monkeypatch, behaviour):
    for f in behaviour.glob("hopper-*.pt"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("OFFLINE_RL_BEHAVIOUR", str(tmp_path))
    before = {q: D.builtin_cache_path(f"hopper-{q}") for q in ("medium", "expert", "medium-expert", "medium-replay")}
    assert D.builtin_cache_path("cartpole-medium").name == f"cartpole-medium-r{D.RECIPE_VERSION}.npz"
    (tmp_path / "hopper-expert.pt").write_bytes((behaviour / "hopper-medium.pt").read_bytes())  # "retrained"
    after = {q: D.builtin_cache_path(f"hopper-{q}") for q in before}
    assert [before[q] == after[q] for q in before] == [True, False, False, True]


def test_report_gives_both_normalizations_and_says_tables_use_d4rls(small):
    ds = small["hopper-medium"]
    text = D.report(ds)
    mean = ds.episode_returns().mean()
    assert f"normalized   {100 * (mean + 20.272305) / (3234.3 + 20.272305):9.1f}" in text
    assert "D4RL's reference returns" in text and "the one tables use" in text
    v5 = 100 * (mean - D.V5_RANDOM_RETURN["hopper"]) / (1000.0 - D.V5_RANDOM_RETURN["hopper"])  # expert meta: 1000
    assert f"normalized (v5) {v5:7.1f}" in text and "expert 1000.0 = 100" in text


def test_v5_random_returns_match_a_fresh_measurement():
    for env, se in (("hopper", 1.4), ("walker2d", 0.5)):  # standard errors of the 100-episode constants
        assert D.measure_random_return(env, episodes=100, seed=3) == pytest.approx(D.V5_RANDOM_RETURN[env], abs=6 * se)


def test_the_committed_behaviour_policies_are_complete_and_load(monkeypatch):
    # every environment with files in behaviour_policies/ has its expert, its medium and each replay snapshot the
    # medium names, each loading as the actor its environment needs (a bad export or a forgotten file fails here)
    monkeypatch.delenv("OFFLINE_RL_BEHAVIOUR", raising=False)
    committed = {f.name.split("-")[0] for f in D.behaviour_dir().glob("*.pt")}
    assert "hopper" in committed  # trained and exported (docs/datasets.md); halfcheetah and walker2d join later
    for env_name in committed:
        env = gym.make(D.LOCOMOTION[env_name])
        dims = (env.observation_space.shape[0], env.action_space.shape[0])
        _, medium = D.load_behaviour_policy(env_name, f"{env_name}-medium")
        stems = [f"{env_name}-expert", f"{env_name}-medium"] + [f"{env_name}-replay-{s:07d}"
                                                                  for s in medium["replay_steps"]]
        for stem in stems:
            actor, meta = D.load_behaviour_policy(env_name, stem)
            assert meta["env_id"] == D.LOCOMOTION[env_name] and meta["role"] in stem
            assert (actor.trunk[0].in_features, actor.mean.out_features) == dims
        assert sorted(f.stem for f in D.behaviour_dir().glob(f"{env_name}-*.pt")) == sorted(stems)


def test_another_mujoco_version_is_named_when_generating(monkeypatch, capsys):
    import mujoco

    root = Path(D.__file__).parent
    for requirements in (root / "requirements.txt", root / "benchmark" / "requirements-d3rlpy.txt"):
        assert f"mujoco=={D.MUJOCO_VERSION} " in requirements.read_text()  # the pins and the documented version agree
    monkeypatch.setattr(mujoco, "__version__", D.MUJOCO_VERSION)
    assert D.mujoco_version_note() is None
    monkeypatch.setattr(mujoco, "__version__", "9.9.9")
    D.generate_builtin("hopper-random", 10)
    err = capsys.readouterr().err
    assert "mujoco 9.9.9 is installed" in err and f"pip install mujoco=={D.MUJOCO_VERSION}" in err
