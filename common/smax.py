"""SMAX maps (jaxmarl's JAX re-implementation of SMAC) behind the interface of common.envs' MuJoCo envs.

`SMAXEnv(map_name)`, e.g. "5m_vs_6m", "6h_vs_8z" or the tiny "3m", exposes

    reset(seed) -> obs [n_agents, obs_dim], state [state_dim]
    step(actions [n_agents] int) -> obs, state, team_reward, terminated, truncated
    avail_actions() -> bool [n_agents, act_dim]: which actions each agent may take at the current step
    won: whether the episode that just ended was won
    name, n_agents, obs_dim, act_dim (the number of discrete actions), state_dim, episode_limit, discrete = True
    copy(), copies(count), close()

`BatchedSMAX(map_name, num_envs)` steps `num_envs` episodes in one call (jax.vmap) and resets those that end.

Choices:
- The agents control the allies; the enemies follow SMAX's scripted heuristic (jaxmarl's HeuristicEnemySMAX with its
  defaults: shoot the closest unit in range, else advance), as SMAC's built-in AI does.
- obs: SMAX's local observation of each agent ("unit_list": the units it sees and its own features) + one-hot agent
  id, the inputs SMAC methods give their agents. state: SMAX's world state (every unit's health, position in map
  units, weapon cooldown and type; teams; types), what mixers and centralised critics see.
- Actions: 0-3 move north, east, south, west; 4 stop; 5 + j attack enemy j (in range only). A dead agent may only stop.
  Passing an action whose mask is false raises a ValueError: SMAX itself would silently ignore it.
- team_reward: REWARD_SCALE (10) times SMAX's reward, the same for every ally: the health the enemies lost this step
  as a fraction of their full health, summed and divided by the number of enemies, plus 1 when the battle is won.
  Returns lie in [0, 20], the scale of SMAC's normalised rewards, at which the papers report SMAC returns (OMIGA,
  Table 4: good data 20.0 on 5m_vs_6m) and tuned their hyperparameters.
- won: every enemy dead while an ally lives, the condition of SMAX's win bonus (both teams dying in the same step is
  a draw, as in SMAC). terminated: either team wiped out. truncated: SMAX's time limit (100 steps by default); it
  checks the limit before counting the step, so episodes last up to episode_limit = max_steps + 1 steps.
- Seeding: reset(seed) draws the episode from jax.random.PRNGKey(seed), split once for SMAX's reset and then once per
  step, so an episode depends on its seed and the actions only. reset() without a seed continues the env's key.
- Speed: reset and step are jit-compiled once per map (and SMAX keyword arguments) and shared by every env of that
  map; a step moves its outputs to the host in one transfer. The arrays returned are read-only views of them.

jax and jaxmarl are optional dependencies of this module alone (requirements-smax.txt); no other module imports it.
"""

from __future__ import annotations

import functools
import io
import sys
from typing import Callable, NamedTuple

import numpy as np


def _import_smax():
    """jaxmarl prints notices when imported, and importing its MaBrax envs resets sys.stdout and sys.stderr to
    sys.__stdout__ and sys.__stderr__, which would undo pytest's capture or a plain redirect: point all four at a sink
    during the import and put them back after."""
    saved = sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__
    sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = io.StringIO()
    try:
        from jaxmarl.environments.smax import HeuristicEnemySMAX
        from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO
    finally:
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__ = saved
    return HeuristicEnemySMAX, MAP_NAME_TO_SCENARIO


try:
    import jax
    import jax.numpy as jnp

    HeuristicEnemySMAX, MAP_NAME_TO_SCENARIO = _import_smax()
except ImportError as error:
    raise ImportError(f"the SMAX envs need jax and jaxmarl: pip install -r requirements-smax.txt ({error})") from error

MAP_NAMES = tuple(MAP_NAME_TO_SCENARIO)
REWARD_SCALE = 10.0  # SMAX's returns are at most 2; SMAC's normalised ones at most 20


class Observation(NamedTuple):
    obs: jax.Array  # [n_agents, obs_dim]: local observation + one-hot id
    state: jax.Array  # [state_dim]
    avail: jax.Array  # bool [n_agents, act_dim]


class Outcome(NamedTuple):
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    won: jax.Array


class SMAXFunctions(NamedTuple):
    smax: HeuristicEnemySMAX
    reset: Callable  # key -> key, env_state, Observation
    step: Callable  # key, env_state, actions [n_agents] -> key, env_state, Observation, Outcome
    batched_reset: Callable  # keys [E] -> the same, batched
    # keys, env_states, actions [E, n_agents] -> keys, env_states, Observation (a finished episode's next start),
    # Outcome, and the Observation the step reached (before that reset)
    batched_step: Callable


@functools.cache
def smax_functions(map_name: str, **smax_kwargs) -> SMAXFunctions:
    """The jit-compiled functions of one map, built once per process and shared by all its envs (jit compiles on first
    call; a second env object would otherwise compile its own)."""
    if map_name not in MAP_NAME_TO_SCENARIO:
        raise ValueError(f"unknown SMAX map {map_name!r}; valid names: {', '.join(MAP_NAMES)}")
    smax = HeuristicEnemySMAX(scenario=MAP_NAME_TO_SCENARIO[map_name], **smax_kwargs)
    n_agents = smax.num_allies

    def observe(obs: dict, env_state) -> Observation:
        local = jnp.stack([obs[agent] for agent in smax.agents])
        avail = smax.get_avail_actions(env_state)
        return Observation(jnp.concatenate([local, jnp.eye(n_agents, dtype=local.dtype)], -1), obs["world_state"],
                           jnp.stack([avail[agent] for agent in smax.agents]).astype(bool))

    def reset(key):
        key, reset_key = jax.random.split(key)
        obs, env_state = smax.reset(reset_key)
        # SMAX's reset leaves a leaf weakly typed that its step returns strongly typed: without this, the first and the
        # later steps would each compile `step`.
        env_state = jax.tree.map(lambda leaf: leaf.astype(leaf.dtype), env_state)
        return key, env_state, observe(obs, env_state)

    def step(key, env_state, actions):
        key, step_key = jax.random.split(key)
        obs, env_state, rewards, dones, _ = smax.step_env(step_key, env_state, dict(zip(smax.agents, actions)))
        alive = env_state.state.unit_alive
        allies_dead, enemies_dead = ~alive[:n_agents].any(), ~alive[n_agents:].any()
        terminated = allies_dead | enemies_dead
        won = enemies_dead & ~allies_dead
        team_reward = REWARD_SCALE * rewards[smax.agents[0]]  # SMAX gives every ally the same reward
        outcome = Outcome(team_reward, terminated, dones["__all__"] & ~terminated, won)
        return key, env_state, observe(obs, env_state), outcome

    def step_and_reset(key, env_state, actions):
        key, env_state, reached, outcome = step(key, env_state, actions)
        key, fresh_state, fresh = reset(key)
        done = outcome.terminated | outcome.truncated
        next_state, after = jax.tree.map(lambda new, old: jax.lax.select(done, new, old), (fresh_state, fresh),
                                         (env_state, reached))
        return key, next_state, after, outcome, reached

    return SMAXFunctions(smax, jax.jit(reset), jax.jit(step), jax.jit(jax.vmap(reset)),
                         jax.jit(jax.vmap(step_and_reset)))


def check_actions(actions, avail: np.ndarray) -> np.ndarray:
    """`actions` [..., n_agents] as int32 when every one is available in `avail` [..., n_agents, act_dim]; otherwise
    a ValueError that names the first (env and) agent whose action is not."""
    actions = np.asarray(actions)
    if actions.shape != avail.shape[:-1]:
        raise ValueError(f"actions must have shape {avail.shape[:-1]}, got {actions.shape}")
    if not np.issubdtype(actions.dtype, np.integer):
        raise ValueError(f"actions must be integer action indices, got dtype {actions.dtype}")
    act_dim = avail.shape[-1]
    in_range = (actions >= 0) & (actions < act_dim)
    allowed = in_range & np.take_along_axis(avail, np.clip(actions, 0, act_dim - 1)[..., None], -1)[..., 0]
    if not allowed.all():
        index = tuple(np.argwhere(~allowed)[0])
        where = (f"env {index[0]}, " if len(index) == 2 else "") + f"agent {index[-1]}"
        raise ValueError(f"{where} cannot take action {actions[index]} now: its available actions are "
                         f"{np.flatnonzero(avail[index]).tolist()}")
    return actions.astype(np.int32)


class _SMAXMap:
    """What every env of a map shares: its name, sizes and compiled functions."""

    discrete = True
    agent_conf = None  # the map fixes the agents
    obs_mode = "local"  # local observation + one-hot id

    def __init__(self, map_name: str, **smax_kwargs):
        self.functions = smax_functions(map_name, **smax_kwargs)
        smax = self.functions.smax
        self.name, self.smax_kwargs = map_name, smax_kwargs
        self.n_agents = smax.num_allies
        self.act_dim = smax.num_ally_actions
        self.obs_dim = smax.obs_size + self.n_agents
        self.state_dim = smax.state_size
        self.episode_limit = smax.max_steps + 1
        self._avail: np.ndarray | None = None

    def avail_actions(self) -> np.ndarray:
        """bool [(num_envs,) n_agents, act_dim]: the actions each agent may take after the last reset or step."""
        if self._avail is None:
            raise RuntimeError("call reset() before avail_actions()")
        return self._avail


def _fresh_key():
    """The key of an env reset without any seed: fresh entropy, as an unseeded Gymnasium env draws."""
    return jax.random.PRNGKey(np.random.SeedSequence().generate_state(1)[0])


class SMAXEnv(_SMAXMap):
    """One SMAX map, stepped one episode at a time. `seed`, if given, seeds the first `reset()` called without a seed.
    Keyword arguments (hashable values) go to SMAX, e.g. max_steps."""

    def __init__(self, map_name: str, seed: int | None = None, **smax_kwargs):
        super().__init__(map_name, **smax_kwargs)
        self._seed = seed
        self._key = _fresh_key()
        self._env_state = None
        self.won = False
        self._copies: list[SMAXEnv] = []

    def copy(self) -> "SMAXEnv":
        return SMAXEnv(self.name, **self.smax_kwargs)

    def copies(self, count: int) -> list["SMAXEnv"]:
        """`count` other envs of the same map, kept for the next call (as the MuJoCo envs keep theirs)."""
        while len(self._copies) < count:
            self._copies.append(self.copy())
        return self._copies[:count]

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if seed is None:
            seed, self._seed = self._seed, None
        key = self._key if seed is None else jax.random.PRNGKey(seed)
        self._key, self._env_state, observation = self.functions.reset(key)
        observation = jax.device_get(observation)
        self._avail, self.won = observation.avail, False
        return observation.obs, observation.state

    def step(self, actions):
        actions = check_actions(actions, self.avail_actions())
        self._key, self._env_state, observation, outcome = self.functions.step(self._key, self._env_state, actions)
        observation, outcome = jax.device_get((observation, outcome))
        self._avail, self.won = observation.avail, bool(outcome.won)
        reward, terminated, truncated = float(outcome.reward), bool(outcome.terminated), bool(outcome.truncated)
        return observation.obs, observation.state, reward, terminated, truncated

    def close(self) -> None:
        """Nothing to release: kept for the MuJoCo envs' interface."""


class BatchedSMAX(_SMAXMap):
    """`num_envs` episodes of one map stepped together in one compiled call. An episode that ends is reset in the
    same call, so `step` returns the first observation of its next episode; the observation it ended on is in
    `final_obs` / `final_state` / `final_avail` (equal to the returned ones where the episode goes on), and `won`
    says, per env, whether an episode was won at this step. reset(seed) seeds env e from the e-th key of
    jax.random.split(PRNGKey(seed), num_envs)."""

    def __init__(self, map_name: str, num_envs: int, seed: int | None = None, **smax_kwargs):
        super().__init__(map_name, **smax_kwargs)
        self.num_envs, self._seed = num_envs, seed
        self._keys = jax.random.split(_fresh_key(), num_envs)
        self._env_states = None
        self.won = np.zeros(num_envs, bool)
        self.final_obs = self.final_state = self.final_avail = None

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All episodes anew: obs [num_envs, n_agents, obs_dim], state [num_envs, state_dim]."""
        if seed is None:
            seed, self._seed = self._seed, None
        keys = self._keys if seed is None else jax.random.split(jax.random.PRNGKey(seed), self.num_envs)
        self._keys, self._env_states, observation = self.functions.batched_reset(keys)
        observation = jax.device_get(observation)
        self._avail, self.won = observation.avail, np.zeros(self.num_envs, bool)
        return observation.obs, observation.state

    def step(self, actions):
        """actions [num_envs, n_agents] int -> obs, state, team_reward, terminated, truncated, each with a leading
        num_envs axis."""
        actions = check_actions(actions, self.avail_actions())
        self._keys, self._env_states, observation, outcome, reached = self.functions.batched_step(
            self._keys, self._env_states, actions)
        observation, outcome, reached = jax.device_get((observation, outcome, reached))
        self._avail, self.won = observation.avail, outcome.won
        self.final_obs, self.final_state, self.final_avail = reached.obs, reached.state, reached.avail
        return observation.obs, observation.state, outcome.reward, outcome.terminated, outcome.truncated
