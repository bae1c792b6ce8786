"""Multi-Agent MuJoCo environments, and the SMAX maps, with one uniform interface for every algorithm script.

`make_env(name)` wraps Gymnasium-Robotics' MaMuJoCo (`mamujoco_v1`), or for a SMAX map name (SMAX_MAPS) builds
common.smax's SMAXEnv, importing jax only then. Every env exposes

    reset(seed) -> obs [n_agents, obs_dim], state [state_dim]
    step(actions) -> obs, state, team_reward, terminated, truncated
    n_agents, obs_dim, act_dim, state_dim, episode_limit, discrete
MuJoCo: actions [n_agents, act_dim] in [-1, 1], discrete = False. SMAX: actions [n_agents] indices among act_dim,
discrete = True, plus avail_actions() [n_agents, act_dim] and won (see common.smax).

Agent inputs depend on `obs_mode` (see `build_agent_obs`):
    "state"  global state + one-hot agent id: the setting of the papers' experiments (OMIGA, ComaDICE, OMCDA).
    "local"  local observation (agent_obsk=1), zero-padded to the largest agent, + one-hot id.
    "omiga"  OMIGA's published pipeline: its env records, per agent, [state, one-hot id] z-scored over its own
             entries (Ant: the state first zero-padded to 111 entries, where Ant-v2 had its always-zero contact
             forces), and its networks append the one-hot id again.

The physics are MuJoCo 4 (Gymnasium `*-v5`), which differ slightly from the mujoco-py / MuJoCo 2.0 `*-v2`
tasks that OMIGA's data was recorded in; returns are comparable in scale, not to the decimal.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np

# gymnasium-robotics prints a notice about its AdroitHand tasks on import; it does not concern MaMuJoCo.
with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    from gymnasium_robotics import mamujoco_v1

OBS_MODES = ("state", "local", "omiga")
# SMAX maps (discrete actions; common.smax, which needs jax) the project makes data for; 3m is the tests' tiny map.
SMAX_MAPS = ("5m_vs_6m", "6h_vs_8z", "3m")


@dataclass(frozen=True)
class EnvSpec:
    default_agent_conf: str
    gym_kwargs: dict = field(default_factory=dict)
    local_categories: list | None = None
    omiga_state_dim: int | None = None  # state size of the Gym *-v2 task OMIGA recorded in


ENV_SPECS = {
    "Hopper": EnvSpec("3x1", omiga_state_dim=11),
    # Ant-v2 under MuJoCo 2.0 reported all-zero contact forces and a zero contact cost; match it.
    "Ant": EnvSpec(
        "2x4",
        gym_kwargs=dict(include_cfrc_ext_in_observation=False, contact_cost_weight=0.0),
        local_categories=[["qpos", "qvel"], ["qpos"]],
        omiga_state_dim=111,
    ),
    "HalfCheetah": EnvSpec("6x1", omiga_state_dim=17),
}
ENV_NAMES = tuple(ENV_SPECS)


def default_obs_mode(env: str) -> str:
    """The agent inputs of the papers' experiments: the global state + id on MuJoCo, the local observation on SMAX."""
    return "local" if env in SMAX_MAPS else "state"


class EnvConfigError(ValueError):
    """An env name, agent partition or observation mode that does not exist."""


def check_env_name(env: str) -> EnvSpec:
    """The spec of a MuJoCo task."""
    if env not in ENV_SPECS:
        smax = f" (SMAX maps: {', '.join(SMAX_MAPS)})" if env not in SMAX_MAPS else f"; {env} is a SMAX map"
        raise EnvConfigError(f"unknown MuJoCo env {env!r}; valid names: {', '.join(ENV_NAMES)}{smax}")
    return ENV_SPECS[env]


def check_obs_mode(obs_mode: str) -> None:
    if obs_mode not in OBS_MODES:
        raise EnvConfigError(f"unknown obs_mode {obs_mode!r}; valid modes: {', '.join(OBS_MODES)}")


def omiga_normalise(states: np.ndarray, n_agents: int, padded_dim: int) -> np.ndarray:
    """What OMIGA's env records for each agent [..., n_agents, padded_dim + n_agents]: [state zero-padded to
    `padded_dim`, one-hot id] z-scored over its own entries."""
    pad = padded_dim - states.shape[-1]
    padded = np.concatenate([states, np.zeros(states.shape[:-1] + (pad,), states.dtype)], -1) if pad > 0 else states
    per_agent = np.broadcast_to(padded[..., None, :], padded.shape[:-1] + (n_agents, padded_dim))
    recorded = with_agent_id(per_agent).astype(np.float64)
    mean = recorded.mean(-1, keepdims=True)
    std = recorded.std(-1, keepdims=True)
    return ((recorded - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def with_agent_id(agent_inputs: np.ndarray) -> np.ndarray:
    """[..., n_agents, d] -> [..., n_agents, d + n_agents]: the one-hot agent id appended."""
    *batch_shape, n_agents, _ = agent_inputs.shape
    agent_id = np.broadcast_to(np.eye(n_agents, dtype=np.float32), (*batch_shape, n_agents, n_agents))
    return np.concatenate([agent_inputs, agent_id], -1).astype(np.float32)


def build_agent_obs(obs_mode: str, local_obs: np.ndarray, states: np.ndarray, omiga_state_dim: int | None = None) -> np.ndarray:
    """Agent inputs [..., n_agents, d] from local observations [..., n_agents, d_local] and states [..., state_dim].

    The one-hot agent id is appended in every mode. Works on any leading batch shape (numpy)."""
    check_obs_mode(obs_mode)
    n_agents = local_obs.shape[-2]
    batch_shape = local_obs.shape[:-2]
    if obs_mode == "local":
        base = local_obs
    elif obs_mode == "omiga":
        base = omiga_normalise(states, n_agents, omiga_state_dim or states.shape[-1])
    else:
        base = np.broadcast_to(states[..., None, :], batch_shape + (n_agents, states.shape[-1]))
    return with_agent_id(base)


class MultiAgentMujocoEnv:
    """One MaMuJoCo task. Steps the underlying single-agent MuJoCo env directly with the joint action
    (equivalent to MaMuJoCo's own step) and builds local observations only when `obs_mode="local"`."""

    episode_limit = 1000
    discrete = False

    def __init__(self, env: str, agent_conf: str | None = None, obs_mode: str = "state", seed: int | None = None):
        spec = check_env_name(env)
        check_obs_mode(obs_mode)
        self.name, self.agent_conf, self.obs_mode = env, agent_conf or spec.default_agent_conf, obs_mode
        self.omiga_state_dim = spec.omiga_state_dim
        kwargs = dict(spec.gym_kwargs)
        if spec.local_categories is not None:
            kwargs["local_categories"] = spec.local_categories
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.ma_env = mamujoco_v1.parallel_env(env, self.agent_conf, agent_obsk=1, **kwargs)
        except Exception as error:
            raise EnvConfigError(f"cannot build {env} with agent_conf={self.agent_conf!r}: {error}") from error
        self.base_env = self.ma_env.single_agent_env
        agents = self.ma_env.possible_agents
        self.n_agents = len(agents)
        self.local_obs_dims = [self.ma_env.observation_space(a).shape[0] for a in agents]
        self.local_act_dims = [self.ma_env.action_space(a).shape[0] for a in agents]
        self.local_obs_dim = max(self.local_obs_dims)
        self.act_dim = max(self.local_act_dims)
        self.state_dim = self.base_env.observation_space.shape[0]
        self.joint_act_dim = self.base_env.action_space.shape[0]
        # joint_action_index[i, j]: the joint-action entry driven by agent i's j-th action (-1: padding).
        local = self.ma_env.map_global_action_to_local_actions(np.arange(self.joint_act_dim, dtype=np.float64))
        self.joint_action_index = np.full((self.n_agents, self.act_dim), -1, dtype=np.int64)
        for i, agent in enumerate(agents):
            self.joint_action_index[i, : self.local_act_dims[i]] = np.asarray(local[agent]).reshape(-1).astype(np.int64)
        self.action_mask = self.joint_action_index >= 0
        self.obs_dim = build_agent_obs(obs_mode, np.zeros((self.n_agents, self.local_obs_dim)), np.zeros(self.state_dim), self.omiga_state_dim).shape[-1]
        self._seed = seed
        self._copies: list[MultiAgentMujocoEnv] = []

    def copy(self) -> "MultiAgentMujocoEnv":
        return MultiAgentMujocoEnv(self.name, self.agent_conf, self.obs_mode)

    def copies(self, count: int) -> list["MultiAgentMujocoEnv"]:
        """`count` other envs of the same task, built once and kept: building a MuJoCo env costs far more than a step."""
        while len(self._copies) < count:
            self._copies.append(self.copy())
        return self._copies[:count]

    def local_observations(self) -> np.ndarray:
        obs = np.zeros((self.n_agents, self.local_obs_dim), dtype=np.float32)
        for i in range(self.n_agents):
            obs[i, : self.local_obs_dims[i]] = self.ma_env._get_obs_agent(i)
        return obs

    def _observe(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        state = state.astype(np.float32)
        local = self.local_observations() if self.obs_mode == "local" else np.zeros((self.n_agents, self.local_obs_dim), np.float32)
        return build_agent_obs(self.obs_mode, local, state, self.omiga_state_dim), state

    def joint_action(self, actions: np.ndarray) -> np.ndarray:
        """[n_agents, act_dim] per-agent actions -> the underlying env's joint action."""
        joint = np.zeros(self.joint_act_dim, dtype=np.float64)
        joint[self.joint_action_index[self.action_mask]] = np.asarray(actions)[self.action_mask]
        return joint

    def local_actions(self, joint: np.ndarray) -> np.ndarray:
        """Joint action [..., joint_act_dim] -> per-agent actions [..., n_agents, act_dim] (padding zero)."""
        return np.where(self.action_mask, joint[..., np.maximum(self.joint_action_index, 0)], 0.0).astype(np.float32)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if seed is None:
            seed, self._seed = self._seed, None
        state, _ = self.base_env.reset(seed=seed)
        return self._observe(state)

    def step(self, actions: np.ndarray):
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.n_agents, self.act_dim):
            raise ValueError(f"actions must have shape {(self.n_agents, self.act_dim)}, got {actions.shape}")
        state, reward, terminated, truncated, _ = self.base_env.step(np.clip(self.joint_action(actions), -1.0, 1.0))
        obs, state = self._observe(state)
        return obs, state, float(reward), bool(terminated), bool(truncated)

    def close(self) -> None:
        for other in self._copies:
            other.close()
        self.base_env.close()


def make_env(env: str, agent_conf: str | None = None, obs_mode: str = "state", seed: int | None = None):
    """Build a Multi-Agent MuJoCo task by name: one of `ENV_NAMES`; `agent_conf` defaults per env (Hopper 3x1,
    Ant 2x4, HalfCheetah 6x1); or a SMAX map of `SMAX_MAPS` (no agent_conf; obs_mode "local", the SMAC setting).
    `seed`, if given, seeds the first `reset()` called without a seed."""
    if env in SMAX_MAPS:
        if agent_conf is not None:
            raise EnvConfigError(f"{env} is a SMAX map, whose agents are fixed by the map: drop --agent-conf {agent_conf}")
        if obs_mode != "local":
            raise EnvConfigError(f"SMAX agents act on their local observations: use --obs-mode local (the default on "
                                 f"SMAX maps), not {obs_mode!r}")
        from common.smax import SMAXEnv

        return SMAXEnv(env, seed)
    return MultiAgentMujocoEnv(env, agent_conf, obs_mode, seed)
