"""common/envs.py: the uniform interface, the three observation modes, and equivalence with MaMuJoCo's own step."""

import numpy as np
import pytest

from common.envs import ENV_NAMES, OBS_MODES, SMAX_MAPS, default_obs_mode, make_env

# name -> (agent_conf, n_agents, act_dim, state_dim, local obs dim (padded), OMIGA's state size)
SPECS = {
    "Hopper": ("3x1", 3, 1, 11, 9, 11),
    "Ant": ("2x4", 2, 4, 27, 21, 111),  # no contact forces (Ant-v2 under MuJoCo 2.0); OMIGA padded to 111
    "HalfCheetah": ("6x1", 6, 1, 17, 9, 17),
}


def expected_obs_dim(name: str, obs_mode: str) -> int:
    _, n, _, state_dim, local_dim, omiga_dim = SPECS[name]
    return {"state": state_dim, "local": local_dim, "omiga": omiga_dim + n}[obs_mode] + n


def omiga_recorded(state: np.ndarray, size: int, agent: int, n_agents: int) -> np.ndarray:
    """What OMIGA's env records for one agent, computed here independently: [state zero-padded to `size`, one-hot
    id], z-scored over its entries (its MaMuJoCo get_obs)."""
    recorded = np.zeros(size + n_agents, np.float64)
    recorded[: len(state)] = state
    recorded[size + agent] = 1.0
    return (recorded - recorded.mean()) / recorded.std()


@pytest.mark.parametrize("obs_mode", OBS_MODES)
@pytest.mark.parametrize("name", list(SPECS))
def test_reset_and_step_shapes(name, obs_mode):
    conf, n, act_dim, state_dim, _, _ = SPECS[name]
    env = make_env(name, obs_mode=obs_mode)
    assert (env.agent_conf, env.n_agents, env.act_dim, env.state_dim) == (conf, n, act_dim, state_dim)
    assert env.obs_dim == expected_obs_dim(name, obs_mode)
    assert env.episode_limit == 1000
    obs, state = env.reset(seed=0)
    assert obs.shape == (n, env.obs_dim) and obs.dtype == np.float32
    assert state.shape == (state_dim,)
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs, state, reward, terminated, truncated = env.step(rng.uniform(-1, 1, (n, act_dim)))
        assert obs.shape == (n, env.obs_dim) and obs.dtype == np.float32 and np.isfinite(obs).all()
        assert state.shape == (state_dim,)
        assert type(reward) is float and np.isfinite(reward)
        assert type(terminated) is bool and type(truncated) is bool
    # Every mode ends with the one-hot agent id.
    np.testing.assert_array_equal(obs[:, -n:], np.eye(n))
    with pytest.raises(ValueError, match="actions must have shape"):
        env.step(np.zeros((n + 1, act_dim)))


@pytest.mark.parametrize("name", list(SPECS))
def test_state_and_omiga_modes_are_built_from_the_state(name):
    n, state_dim, omiga_dim = SPECS[name][1], SPECS[name][3], SPECS[name][5]
    actions = np.random.default_rng(1).uniform(-1, 1, (4, n, SPECS[name][2]))
    results = {}
    for mode in ("state", "omiga"):
        env = make_env(name, obs_mode=mode)
        obs, state = env.reset(seed=7)
        for a in actions:
            obs, state, *_ = env.step(a)
        results[mode] = obs, state
    (state_obs, state), (omiga_obs, omiga_state) = results["state"], results["omiga"]
    np.testing.assert_array_equal(state, omiga_state)  # same seed and actions: same physics in both modes
    for i in range(n):
        np.testing.assert_array_equal(state_obs[i], np.concatenate([state, np.eye(n)[i]]).astype(np.float32))
        recorded = omiga_recorded(state, omiga_dim, i, n)
        np.testing.assert_allclose(omiga_obs[i, : omiga_dim + n], recorded, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(omiga_obs[i, omiga_dim + n :], np.eye(n)[i])  # appended again by the networks
    assert abs(omiga_obs[0, : omiga_dim + n].mean()) < 1e-5 and abs(omiga_obs[0, : omiga_dim + n].std() - 1) < 1e-4
    assert not np.allclose(omiga_obs[0, : omiga_dim + n], omiga_obs[1, : omiga_dim + n])  # the id is inside the z-score
    if name == "Ant":  # Ant-v2's always-zero contact forces: one constant value after the z-score
        assert omiga_obs.shape[1] == 115
        np.testing.assert_allclose(omiga_obs[0, state_dim:omiga_dim], recorded[state_dim], rtol=1e-6)


@pytest.mark.parametrize("name", list(SPECS))
def test_direct_step_equals_mamujoco_step(name):
    """Our wrapper steps the single-agent env with the joint action; MaMuJoCo's own step must give the same."""
    ours, theirs = make_env(name, obs_mode="local"), make_env(name, obs_mode="local")
    agents = theirs.ma_env.possible_agents
    n = ours.n_agents
    obs, state = ours.reset(seed=3)
    ref_obs, _ = theirs.ma_env.reset(seed=3)
    rng = np.random.default_rng(3)
    for t in range(40):
        for i, agent in enumerate(agents):
            d = ours.local_obs_dims[i]
            np.testing.assert_allclose(obs[i, :d], ref_obs[agent], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(obs[i, :d], theirs.ma_env._get_obs_agent(i), rtol=1e-6, atol=1e-6)
            assert not obs[i, d:ours.local_obs_dim].any()  # zero padding up to the largest agent
        np.testing.assert_array_equal(obs[:, -n:], np.eye(n))
        np.testing.assert_allclose(state, theirs.ma_env.state(), rtol=1e-6, atol=1e-6)
        if t == 39:
            break
        actions = rng.uniform(-1, 1, (n, ours.act_dim))
        obs, state, reward, terminated, truncated = ours.step(actions)
        local = {agent: actions[i, : ours.local_act_dims[i]] for i, agent in enumerate(agents)}
        ref_obs, ref_rewards, ref_term, ref_trunc, _ = theirs.ma_env.step(local)
        for agent in agents:
            assert reward == pytest.approx(float(ref_rewards[agent]), rel=1e-12, abs=1e-12)
            assert (terminated, truncated) == (bool(ref_term[agent]), bool(ref_trunc[agent]))
        if terminated:
            break


def test_halfcheetah_truncates_at_episode_limit():
    env = make_env("HalfCheetah")
    env.reset(seed=0)
    zeros = np.zeros((env.n_agents, env.act_dim))
    flags = [env.step(zeros)[3:] for _ in range(env.episode_limit)]
    assert flags[-1] == (False, True)
    assert not any(term or trunc for term, trunc in flags[:-1])


def test_reset_seeding():
    env, other = make_env("Hopper", seed=5), make_env("Hopper")
    first = env.reset()[1]  # the constructor's seed seeds the first reset without one
    np.testing.assert_array_equal(first, other.reset(seed=5)[1])
    assert not np.array_equal(other.reset(seed=5)[1], other.reset(seed=6)[1])


def test_other_agent_conf():
    env = make_env("HalfCheetah", "2x3", obs_mode="local")
    assert (env.n_agents, env.act_dim, env.state_dim) == (2, 3, 17)
    env.reset(seed=0)
    obs = env.step(np.zeros((2, 3)))[0]
    assert obs.shape == (2, env.obs_dim) == (2, max(env.local_obs_dims) + 2)
    assert env.local_act_dims == [3, 3]


def test_unknown_env_lists_valid_names():
    with pytest.raises(ValueError, match="unknown MuJoCo env 'Walker'") as error:
        make_env("Walker")
    for name in (*ENV_NAMES, *SMAX_MAPS):
        assert name in str(error.value)
    assert set(ENV_NAMES) == {"Hopper", "Ant", "HalfCheetah"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(agent_conf="5x1"), "SMAX map, whose agents are fixed by the map: drop --agent-conf 5x1"),
    (dict(obs_mode="state"), "use --obs-mode local"),
])
def test_smax_maps_refuse_mujoco_settings_before_importing_jax(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_env("5m_vs_6m", **kwargs)
    assert default_obs_mode("5m_vs_6m") == "local" and default_obs_mode("Hopper") == "state"


def test_unknown_obs_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="unknown obs_mode 'global'") as error:
        make_env("Hopper", obs_mode="global")
    for mode in ("state", "local", "omiga"):
        assert mode in str(error.value)


def test_bad_agent_conf_fails_clearly():
    with pytest.raises(ValueError, match="cannot build Hopper with agent_conf='7x9'"):
        make_env("Hopper", "7x9")
