"""common/smax.py: sizes, action masks, seeding, the win flag, SMAX's own reward, and the batched env. Skipped where
jaxmarl is not installed (requirements-smax.txt)."""

import numpy as np
import pytest

pytest.importorskip("jaxmarl")

import jax  # noqa: E402
import jaxmarl  # noqa: E402

from common.smax import REWARD_SCALE, BatchedSMAX, SMAXEnv, smax_functions  # noqa: E402

EAST, STOP, FIRST_ATTACK = 1, 4, 5  # SMAX's actions: 0-3 move north, east, south, west; 4 stop; 5 + j attack enemy j
UNIT_FEATURES = 10  # world-state entries per unit, health first


@pytest.fixture(scope="module")
def env_3m():
    return SMAXEnv("3m")


def health(env, state):
    """Allies' and enemies' health fractions, read from SMAX's world state (dead units are all zero)."""
    n_units = env.n_agents + env.act_dim - FIRST_ATTACK  # allies and enemies
    fractions = state[: n_units * UNIT_FEATURES].reshape(n_units, UNIT_FEATURES)[:, 0]
    return fractions[: env.n_agents], fractions[env.n_agents:]


def random_available(rng, avail):
    """A uniformly random available action per agent (any leading shape)."""
    return (rng.random(avail.shape) * avail).argmax(-1)


def focus_fire(avail):
    """Every agent shoots the lowest-numbered enemy in its range, else moves east (towards the enemies' start)."""
    attack = avail[:, FIRST_ATTACK:]
    return np.where(attack.any(-1), attack.argmax(-1) + FIRST_ATTACK, np.where(avail[:, EAST], EAST, STOP))


def run_episode(env, seed, policy):
    env.reset(seed)
    steps = []
    while True:
        _, state, reward, terminated, truncated = env.step(policy(env.avail_actions()))
        steps.append((state, reward, terminated, truncated, env.won))
        if terminated or truncated:
            return steps


def test_5m_vs_6m_sizes_and_first_step():
    env = SMAXEnv("5m_vs_6m")
    assert (env.n_agents, env.act_dim, env.obs_dim, env.state_dim, env.episode_limit) == (5, 11, 140 + 5, 132, 101)
    assert env.discrete
    obs, state = env.reset(0)
    assert obs.shape == (5, 145) and obs.dtype == np.float32 and state.shape == (132,) and state.dtype == np.float32
    np.testing.assert_array_equal(obs[:, -5:], np.eye(5))
    avail = env.avail_actions()
    # The teams start apart: every agent may move or stop, none may shoot yet.
    assert avail.shape == (5, 11) and avail.dtype == bool
    assert avail[:, :FIRST_ATTACK].all() and not avail[:, FIRST_ATTACK:].any()
    obs, state, reward, terminated, truncated = env.step(np.full(5, STOP))
    assert obs.shape == (5, 145) and state.shape == (132,)
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool


def test_6h_vs_8z_sizes_match_its_outputs():
    env = SMAXEnv("6h_vs_8z")
    assert (env.n_agents, env.act_dim, env.obs_dim, env.state_dim, env.episode_limit) == (6, 13, 179 + 6, 168, 101)
    _, _, observation = jax.eval_shape(env.functions.reset, jax.random.PRNGKey(0))  # traced, not compiled
    assert (observation.obs.shape, observation.state.shape, observation.avail.shape) == ((6, 185), (168,), (6, 13))


def test_unknown_map_is_refused():
    with pytest.raises(ValueError, match="unknown SMAX map '5m_vs_7m'; valid names: .*5m_vs_6m"):
        SMAXEnv("5m_vs_7m")


def test_random_available_actions_end_within_the_limit(env_3m):
    rng = np.random.default_rng(0)
    for seed in range(5):
        steps = run_episode(env_3m, seed, lambda avail: random_available(rng, avail))
        assert 1 <= len(steps) <= env_3m.episode_limit
        assert not any(terminated or truncated for _, _, terminated, truncated, _ in steps[:-1])
        _, _, terminated, truncated, _ = steps[-1]
        assert terminated != truncated  # a battle's end is not also a timeout
        assert all(np.isfinite(reward) and reward >= 0 for _, reward, _, _, _ in steps)


def test_unavailable_actions_raise(env_3m):
    env_3m.reset(0)
    message = r"agent 1 cannot take action 5 now: its available actions are \[0, 1, 2, 3, 4\]"
    with pytest.raises(ValueError, match=message):
        env_3m.step(np.array([STOP, FIRST_ATTACK, STOP]))
    with pytest.raises(ValueError, match="agent 2 cannot take action 8"):
        env_3m.step(np.array([STOP, STOP, env_3m.act_dim]))
    with pytest.raises(ValueError, match="agent 0 cannot take action -1"):
        env_3m.step(np.array([-1, STOP, STOP]))
    with pytest.raises(ValueError, match="shape"):
        env_3m.step(np.full(4, STOP))
    with pytest.raises(ValueError, match="integer"):
        env_3m.step(np.full(3, 4.0))
    with pytest.raises(RuntimeError, match="reset"):
        SMAXEnv("3m").step(np.full(3, STOP))


def test_dead_agents_may_only_stop(env_3m):
    rng = np.random.default_rng(1)
    for seed in range(5):
        env_3m.reset(seed)
        while True:
            avail = env_3m.avail_actions()
            _, state, _, terminated, truncated = env_3m.step(random_available(rng, avail))
            allies, _ = health(env_3m, state)
            dead = allies == 0
            if dead.any():
                expected = np.zeros(env_3m.act_dim, bool)
                expected[STOP] = True
                assert (env_3m.avail_actions()[dead] == expected).all()
                if not terminated:
                    with pytest.raises(ValueError, match=f"agent {np.flatnonzero(dead)[0]} cannot take action {EAST}"):
                        env_3m.step(np.where(dead, EAST, STOP))
                return
            assert not (terminated or truncated)
    pytest.fail("no agent died in 5 random episodes")


def test_same_seed_same_episode_other_seed_differs(env_3m):
    first = run_episode(env_3m, 7, focus_fire)
    second = run_episode(env_3m, 7, focus_fire)
    assert len(first) == len(second)
    for (state_a, reward_a, *_), (state_b, reward_b, *_) in zip(first, second):
        np.testing.assert_array_equal(state_a, state_b)
        assert reward_a == reward_b
    obs, state = env_3m.reset(7)
    np.testing.assert_array_equal(obs, env_3m.reset(7)[0])
    assert not np.array_equal(state, env_3m.reset(8)[1])
    # A seed given to the constructor seeds the first unseeded reset.
    np.testing.assert_array_equal(SMAXEnv("3m", seed=7).reset()[1], state)


def test_copies_share_one_compilation(env_3m):
    copy = env_3m.copies(2)[1]
    assert copy.functions is env_3m.functions and env_3m.copies(1)[0] is env_3m.copies(2)[0]
    run_episode(copy, 0, focus_fire)
    run_episode(env_3m, 1, focus_fire)
    # jit compiles again for any new argument type: reset's state must type like step's (private jax counter).
    assert env_3m.functions.reset._cache_size() == 1 and env_3m.functions.step._cache_size() == 1


def test_won_exactly_when_every_enemy_dies_and_an_ally_lives(env_3m):
    outcomes = set()
    for seed in range(10):
        steps = run_episode(env_3m, seed, focus_fire)
        assert not any(won for *_, won in steps[:-1])
        state, reward, terminated, truncated, won = steps[-1]
        allies, enemies = health(env_3m, state)
        assert won == (terminated and not enemies.any() and allies.any())
        assert won == (reward >= REWARD_SCALE)  # SMAX's win bonus, scaled
        outcomes.add(won)
        env_3m.reset(seed)
        assert not env_3m.won
    assert outcomes == {True, False}, "focus fire on 3m should win some of 10 episodes and lose some"


def test_time_limit_truncates_at_episode_limit():
    env = SMAXEnv("3m", max_steps=3)
    assert env.episode_limit == 4
    steps = run_episode(env, 0, lambda avail: np.full(3, STOP))  # the enemies are still out of range
    assert len(steps) == env.episode_limit
    _, _, terminated, truncated, won = steps[-1]
    assert truncated and not terminated and not won


def test_matches_smax_itself(env_3m):
    """obs, state, masks, reward and ends are SMAX's own, stepped here with the keys the wrapper documents."""
    smax = jaxmarl.make("HeuristicEnemySMAX", scenario=jaxmarl.environments.smax.map_name_to_scenario("3m"))
    seed = 2  # focus fire wins this one: the reward includes damage and the win bonus
    key, reset_key = jax.random.split(jax.random.PRNGKey(seed))
    smax_obs, smax_state = smax.reset(reset_key)
    obs, state = env_3m.reset(seed)
    total = 0.0
    while True:
        np.testing.assert_array_equal(obs[:, :-3], np.stack([smax_obs[agent] for agent in smax.agents]))
        np.testing.assert_array_equal(state, smax_obs["world_state"])
        smax_avail = smax.get_avail_actions(smax_state)
        smax_avail = np.stack([smax_avail[agent] for agent in smax.agents])
        np.testing.assert_array_equal(env_3m.avail_actions(), smax_avail)
        actions = focus_fire(env_3m.avail_actions())
        key, step_key = jax.random.split(key)
        smax_obs, smax_state, rewards, dones, _ = smax.step_env(step_key, smax_state, dict(zip(smax.agents, actions)))
        obs, state, reward, terminated, truncated = env_3m.step(actions)
        ally_rewards = {float(rewards[agent]) for agent in smax.agents}
        assert len(ally_rewards) == 1, "SMAX gives every ally the same reward"
        assert reward == pytest.approx(REWARD_SCALE * ally_rewards.pop(), rel=1e-6)
        assert (terminated or truncated) == bool(dones["__all__"])
        total += reward
        if terminated or truncated:
            break
    assert env_3m.won and total == pytest.approx(2.0 * REWARD_SCALE)


def test_batched_env_resets_finished_episodes():
    batched = BatchedSMAX("3m", num_envs=4, seed=0)
    obs, state = batched.reset()
    assert obs.shape == (4, 3, batched.obs_dim) and state.shape == (4, batched.state_dim)
    lengths, outcomes = np.zeros(4, int), []
    for _ in range(40):
        actions = np.stack([focus_fire(avail) for avail in batched.avail_actions()])
        obs, state, reward, terminated, truncated = batched.step(actions)
        assert reward.shape == terminated.shape == truncated.shape == batched.won.shape == (4,)
        lengths += 1
        done = terminated | truncated
        assert (lengths[done] <= batched.episode_limit).all()
        # Running episodes return what they reached; finished ones the start of the next: full health, no target.
        np.testing.assert_array_equal(obs[~done], batched.final_obs[~done])
        np.testing.assert_array_equal(batched.avail_actions()[~done], batched.final_avail[~done])
        for e in np.flatnonzero(done):
            allies, enemies = health(batched, state[e])
            assert (allies == 1).all() and (enemies == 1).all()
            assert not batched.avail_actions()[e, :, FIRST_ATTACK:].any()
            allies, enemies = health(batched, batched.final_state[e])
            # where the episode ended: a dead ally may only stop
            only_stop = np.eye(batched.act_dim, dtype=bool)[STOP]
            assert (batched.final_avail[e][allies == 0] == only_stop).all()
            assert terminated[e] == (not allies.any() or not enemies.any())
            assert batched.won[e] == (terminated[e] and not enemies.any() and allies.any())
            outcomes.append(batched.won[e])
        assert not batched.won[~done].any()
        lengths[done] = 0
    assert len(outcomes) >= 4 and set(outcomes) == {True, False}
    batched.reset(1)
    actions = np.full((4, 3), STOP)
    actions[2, 0] = FIRST_ATTACK
    with pytest.raises(ValueError, match="env 2, agent 0 cannot take action 5"):
        batched.step(actions)


def test_batched_seeding_is_deterministic():
    a, b = BatchedSMAX("3m", num_envs=4), BatchedSMAX("3m", num_envs=4)
    np.testing.assert_array_equal(a.reset(5)[1], b.reset(5)[1])
    assert not np.array_equal(a.reset(5)[1], a.reset(6)[1])
    assert smax_functions("3m").batched_step is a.functions.batched_step
