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
    returns, wins = evaluate(act, env, episodes=5, seed=100, num_envs=2)
    assert returns.shape == (5,) and np.isfinite(returns).all() and wins is None
    # Episode k starts from reset(seed + k).
    reference = [one_episode(make_env("Hopper"), act, 100 + k) for k in range(5)]
    np.testing.assert_allclose(returns, reference, rtol=1e-9)
    assert len(set(np.round(returns, 6))) == 5  # the episodes really differ, so the seed sequence is observable


def test_same_seed_same_returns_other_seed_other_returns():
    env = make_env("Hopper", obs_mode="local")
    act = linear_policy(env, seed=1)
    first = evaluate(act, env, episodes=3, seed=7)[0]
    np.testing.assert_array_equal(first, evaluate(act, env, episodes=3, seed=7)[0])
    np.testing.assert_array_equal(first, evaluate(act, make_env("Hopper", obs_mode="local"), episodes=3, seed=7)[0])
    assert not np.allclose(first, evaluate(act, env, episodes=3, seed=8)[0])


def test_independent_of_num_envs():
    env = make_env("Hopper")
    act = linear_policy(env, seed=2)
    results = [evaluate(act, env, episodes=5, seed=0, num_envs=k)[0] for k in (1, 2, 5, 8)]
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
    serial, wins = evaluate_seeds(act, env, episodes=3, seeds=[10, 20], workers=1)
    assert serial.shape == (2, 3) and wins is None
    np.testing.assert_allclose(serial[0], evaluate(act, env, episodes=3, seed=10)[0], rtol=1e-12)
    np.testing.assert_allclose(serial[1], evaluate(act, env, episodes=3, seed=20)[0], rtol=1e-12)
    # 6 episodes over 4 worker processes of 2 copies each (2 idle), twice on the same pool
    for _ in range(2):
        np.testing.assert_array_equal(evaluate_seeds(act, env, episodes=3, seeds=[10, 20], workers=4)[0], serial)


class CountingDiscreteEnv:
    """A discrete-action env with SMAX's interface and no jax: 2 agents, 4 actions, of which the available ones
    change every step (agent i may take actions t + i and t + i + 1 mod 4 at step t); the reward is the sum of the
    actions taken; an episode from reset(seed) lasts 2 + seed % 3 steps and is won when its return is a multiple of
    3. Taking an unavailable action raises, as SMAXEnv does."""

    discrete, n_agents, act_dim, obs_dim, state_dim = True, 2, 4, 3, 1

    def copies(self, count):
        return [CountingDiscreteEnv() for _ in range(count)]

    def _obs(self):
        return np.array([[self.t, i, self.seed] for i in range(2)], np.float32), np.zeros(1, np.float32)

    def reset(self, seed):
        self.seed, self.t, self.total, self.won = seed, 0, 0, False
        return self._obs()

    def avail_actions(self):
        avail = np.zeros((2, 4), bool)
        for i in range(2):
            avail[i, [(self.t + i) % 4, (self.t + i + 1) % 4]] = True
        return avail

    def step(self, actions):
        actions = np.asarray(actions)
        if not self.avail_actions()[np.arange(2), actions].all():
            raise ValueError(f"unavailable action {actions} at step {self.t}")
        self.t += 1
        self.total += int(actions.sum())
        over = self.t == 2 + self.seed % 3
        self.won = over and self.total % 3 == 0
        return (*self._obs(), float(actions.sum()), over, False)


def highest_available(obs, avail):
    """Each agent's highest-numbered available action: a policy that obeys the masks."""
    assert avail.shape == (obs.shape[0], 2, 4) and avail.dtype == bool
    return avail.shape[-1] - 1 - avail[..., ::-1].argmax(-1)


def reference_discrete_episode(seed: int) -> tuple[float, bool]:
    env = CountingDiscreteEnv()
    obs, _ = env.reset(seed)
    total, over = 0.0, False
    while not over:
        obs, _, reward, over, _ = env.step(highest_available(obs[None], env.avail_actions()[None])[0])
        total += reward
    return total, env.won


def test_discrete_env_evaluation_passes_masks_and_reports_wins():
    env = CountingDiscreteEnv()
    expected = [reference_discrete_episode(seed) for seed in range(5, 11)]
    returns, wins = evaluate(highest_available, env, episodes=6, seed=5, num_envs=4)
    np.testing.assert_array_equal(returns, [r for r, _ in expected])
    np.testing.assert_array_equal(wins, [w for _, w in expected])
    assert wins.any() and not wins.all()
    fused, fused_wins = evaluate_seeds(highest_available, env, episodes=3, seeds=[5, 8], workers=4)
    np.testing.assert_array_equal(fused, returns.reshape(2, 3))
    np.testing.assert_array_equal(fused_wins, wins.reshape(2, 3))
    with pytest.raises(ValueError, match="unavailable action"):  # a policy that ignores the masks is caught
        evaluate(lambda obs, avail: np.zeros(obs.shape[:2], int), env, episodes=2, seed=0)
