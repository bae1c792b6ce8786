"""common/evaluation.py: batched lockstep evaluation returns the right episodes, deterministically."""

import numpy as np
import pytest

from common.envs import make_env
from common.evaluation import evaluate, evaluate_seeds


def linear_policy(env, seed: int = 0, calls: list | None = None):
    """A fixed deterministic act_fn computed row by row (elementwise ops only), so a row's action cannot depend on
    the rest of the batch. Records the shape of every batch it is called with in `calls`."""
    weights = np.random.default_rng(seed).normal(0, 0.3, (env.obs_dim, env.act_dim))

    def act(obs):
        if calls is not None:
            calls.append(obs.shape)
        return np.tanh((obs[..., :, None] * weights).sum(-2))

    return act


def one_episode(env, act, seed: int) -> float:
    """The reference: one episode from reset(seed), one unbatched step at a time."""
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, _, reward, terminated, truncated = env.step(act(obs[None])[0])
        total += reward
        done = terminated or truncated
    return total


def test_returns_requested_count_and_matches_episode_by_episode_reference():
    env = make_env("Hopper")
    act = linear_policy(env)
    returns = evaluate(act, env, episodes=5, seed=100, num_envs=2)
    assert returns.shape == (5,) and np.isfinite(returns).all()
    # Episode k starts from reset(seed + k).
    reference = [one_episode(make_env("Hopper"), act, 100 + k) for k in range(5)]
    np.testing.assert_allclose(returns, reference, rtol=1e-9)
    assert len(set(np.round(returns, 6))) == 5  # the episodes really differ, so the seed sequence is observable


def test_same_seed_same_returns_other_seed_other_returns():
    env = make_env("Hopper", obs_mode="local")
    act = linear_policy(env, seed=1)
    first = evaluate(act, env, episodes=3, seed=7)
    np.testing.assert_array_equal(first, evaluate(act, env, episodes=3, seed=7))
    np.testing.assert_array_equal(first, evaluate(act, make_env("Hopper", obs_mode="local"), episodes=3, seed=7))
    assert not np.allclose(first, evaluate(act, env, episodes=3, seed=8))


def test_independent_of_num_envs():
    env = make_env("Hopper")
    act = linear_policy(env, seed=2)
    results = [evaluate(act, env, episodes=5, seed=0, num_envs=k) for k in (1, 2, 5, 8)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-9)


def test_act_fn_gets_batched_observations():
    env = make_env("Ant", obs_mode="omiga")
    serial, batched = [], []
    evaluate(linear_policy(env, calls=serial), env, episodes=4, seed=0, num_envs=1)
    evaluate(linear_policy(env, calls=batched), env, episodes=4, seed=0, num_envs=4)
    assert all(shape[1:] == (env.n_agents, env.obs_dim) == (2, 115) for shape in serial + batched)
    assert all(shape[0] == 1 for shape in serial)
    assert batched[0][0] == 4 and all(1 <= shape[0] <= 4 for shape in batched)
    # One forward per lockstep step serves every running episode: the same env steps in as many calls as the longest
    # episode has steps, each call at most as large as the last.
    assert sum(shape[0] for shape in batched) == len(serial)
    assert len(batched) < len(serial) and all(a[0] >= b[0] for a, b in zip(batched, batched[1:]))


def test_rejects_zero_episodes():
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        evaluate(lambda obs: obs, make_env("Hopper"), episodes=0, seed=0)


def test_fused_seeds_evaluation_matches_each_seeds_own_and_does_not_depend_on_workers():
    env = make_env("Hopper")
    act = linear_policy(env, seed=3)
    serial = evaluate_seeds(act, env, episodes=3, seeds=[10, 20], workers=1)
    assert serial.shape == (2, 3)
    np.testing.assert_allclose(serial[0], evaluate(act, env, episodes=3, seed=10), rtol=1e-12)
    np.testing.assert_allclose(serial[1], evaluate(act, env, episodes=3, seed=20), rtol=1e-12)
    # 6 episodes over 4 worker processes of 2 copies each (2 idle), twice on the same pool
    for _ in range(2):
        np.testing.assert_array_equal(evaluate_seeds(act, env, episodes=3, seeds=[10, 20], workers=4), serial)
