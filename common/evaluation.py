"""Evaluation: run episodes in lockstep over copies of an environment, one policy forward pass per step; with
several workers, the copies are shared out to that many processes through gymnasium's AsyncVectorEnv.

Both functions return (returns, wins): the team return of every episode and, on discrete-action (SMAX) envs, whether
it was won (None on MuJoCo). On discrete envs `act_fn(obs, avail)` also gets each agent's available actions
[E, n_agents, act_dim] and returns action indices [E, n_agents].
"""

from __future__ import annotations

import atexit
import functools
import math
import os
from typing import Callable

import gymnasium
import numpy as np

from common.envs import MultiAgentMujocoEnv, make_env

PARALLEL_FROM_CORES = 8  # machines with fewer cores evaluate in the training process


class EnvSlots:
    """Copies of one env stepped in lockstep: their last observations [E, n_agents, obs_dim] and, on discrete envs,
    their available actions [E, n_agents, act_dim], for one `act_fn` call on any subset of them."""

    def __init__(self, envs: list):
        self.envs, self.discrete = envs, envs[0].discrete
        self.obs = np.zeros((len(envs), envs[0].n_agents, envs[0].obs_dim), np.float32)
        self.avail = np.zeros((len(envs), envs[0].n_agents, envs[0].act_dim), bool) if self.discrete else None

    def reset(self, slot: int, seed: int) -> None:
        self.obs[slot], _ = self.envs[slot].reset(seed=seed)
        if self.discrete:
            self.avail[slot] = self.envs[slot].avail_actions()

    def act(self, act_fn: Callable, slots) -> np.ndarray:
        if self.discrete:
            return np.asarray(act_fn(self.obs[slots], self.avail[slots]))
        return np.asarray(act_fn(self.obs[slots]))

    def step(self, slot: int, action: np.ndarray) -> tuple[float, bool, bool]:
        """Step one copy: (reward, episode over, won)."""
        env = self.envs[slot]
        self.obs[slot], _, reward, terminated, truncated = env.step(action)
        if self.discrete:
            self.avail[slot] = env.avail_actions()
        return reward, terminated or truncated, self.discrete and env.won


def evaluate(act_fn: Callable, env: MultiAgentMujocoEnv, episodes: int, seed: int,
             num_envs: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Team return of each of `episodes` episodes, and whether it was won (discrete envs; None otherwise); episode k
    starts from `reset(seed + k)`.

    `act_fn` maps observations [E, n_agents, obs_dim] (and, on discrete envs, available actions) to actions for all
    running copies at once. With a deterministic `act_fn` the returns depend only on `seed`, not on how many copies
    run."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    num_envs = min(num_envs or episodes, episodes)
    slots = EnvSlots([env] + env.copies(num_envs - 1))
    returns, wins = np.zeros(episodes), np.zeros(episodes, bool)
    running = {}  # env slot -> episode index
    next_episode = 0
    for slot in range(num_envs):
        slots.reset(slot, seed + next_episode)
        running[slot] = next_episode
        next_episode += 1
    while running:
        active = sorted(running)
        actions = slots.act(act_fn, active)
        for row, slot in enumerate(active):
            reward, over, won = slots.step(slot, actions[row])
            returns[running[slot]] += reward
            if over:
                wins[running[slot]] = won
                if next_episode < episodes:
                    slots.reset(slot, seed + next_episode)
                    running[slot] = next_episode
                    next_episode += 1
                else:
                    del running[slot]
    return returns, (wins if slots.discrete else None)


def default_workers() -> int:
    """Evaluation processes: one per core on machines with at least PARALLEL_FROM_CORES cores, else none (1: the
    training process steps the copies itself)."""
    cores = os.cpu_count() or 1
    return cores if cores >= PARALLEL_FROM_CORES else 1


class EnvCopies(gymnasium.Env):
    """`count` copies of one task as one gymnasium.Env, so that AsyncVectorEnv can give each worker process a share of
    an evaluation's episodes: observation [count, n_agents, obs_dim], action [count, n_agents, act_dim]. `starts`
    holds the copies' reset seeds (None: idle copy). The copies' rewards and whether they still run come in the info
    dict; the env itself never ends, so the vector env never resets it on its own."""

    def __init__(self, name: str, agent_conf: str, obs_mode: str, count: int):
        self.envs = [make_env(name, agent_conf, obs_mode) for _ in range(count)]
        env = self.envs[0]
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (count, env.n_agents, env.obs_dim), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (count, env.n_agents, env.act_dim), np.float64)
        self.starts: list[int | None] = [None] * count
        self.obs = np.zeros(self.observation_space.shape, np.float32)
        self.running = np.zeros(count, dtype=bool)

    def reset(self, *, seed=None, options=None):
        for slot, (env, start) in enumerate(zip(self.envs, self.starts)):
            self.running[slot] = start is not None
            if start is not None:
                self.obs[slot] = env.reset(seed=start)[0]
        return self.obs.copy(), {}

    def step(self, actions):
        rewards = np.zeros(len(self.envs))
        for slot in np.flatnonzero(self.running):
            self.obs[slot], _, rewards[slot], terminated, truncated = self.envs[slot].step(actions[slot])
            self.running[slot] = not (terminated or truncated)
        return self.obs.copy(), 0.0, False, False, {"rewards": rewards, "running": self.running.copy()}


@functools.cache
def worker_pool(name: str, agent_conf: str, obs_mode: str, workers: int, per_worker: int) -> gymnasium.vector.AsyncVectorEnv:
    """`workers` processes of `per_worker` copies each, built once per run and kept (building MuJoCo envs costs far
    more than a step); forkserver, so no worker inherits the training process's CUDA context or threads."""
    pool = gymnasium.vector.AsyncVectorEnv(
        [functools.partial(EnvCopies, name, agent_conf, obs_mode, per_worker)] * workers, context="forkserver")
    atexit.register(pool.close)
    return pool


def evaluate_seeds(act_fn: Callable, env: MultiAgentMujocoEnv, episodes: int, seeds: list[int],
                   workers: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Team returns [len(seeds), episodes] of the fused seeds' policies, and whether each episode was won (discrete
    envs; None otherwise): seed k's episode e starts from `reset(seeds[k] + e)`, as `evaluate(..., seed=seeds[k])`
    would run it.

    All episodes run at once in lockstep, one env copy each, with one `act_fn` call per step on every copy's
    observation, seed-major [len(seeds) * episodes, n_agents, obs_dim] (a fixed shape: a finished episode's row holds
    its last observation and its action is ignored). With `workers` > 1 (default: `default_workers()`) the copies are
    stepped in that many processes; the returns do not depend on it. Discrete (SMAX) envs always step in this
    process: their jax functions are compiled once per process and shared by the copies."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    starts = [seed + e for seed in seeds for e in range(episodes)]
    workers = 1 if env.discrete else min(workers or default_workers(), len(starts))
    returns, wins = np.zeros(len(starts)), np.zeros(len(starts), bool)
    running = np.ones(len(starts), dtype=bool)
    if workers == 1:
        slots = EnvSlots([env] + env.copies(len(starts) - 1))
        for slot, start in enumerate(starts):
            slots.reset(slot, start)
        while running.any():
            actions = slots.act(act_fn, slice(None))
            for slot in np.flatnonzero(running):
                reward, over, wins[slot] = slots.step(slot, actions[slot])
                returns[slot] += reward
                running[slot] = not over
        return returns.reshape(len(seeds), episodes), (wins.reshape(len(seeds), episodes) if slots.discrete else None)

    per_worker = math.ceil(len(starts) / workers)
    pool = worker_pool(env.name, env.agent_conf, env.obs_mode, workers, per_worker)
    padded = starts + [None] * (workers * per_worker - len(starts))  # idle copies at the end
    pool.set_attr("starts", [padded[w * per_worker:(w + 1) * per_worker] for w in range(workers)])
    obs, _ = pool.reset()
    actions = np.zeros((workers * per_worker, env.n_agents, env.act_dim))  # float64, as the serial path passes them
    while running.any():
        actions[:len(starts)] = act_fn(obs.reshape(-1, *obs.shape[2:])[:len(starts)])
        obs, _, _, _, info = pool.step(actions.reshape(workers, per_worker, *actions.shape[1:]))
        returns += info["rewards"].reshape(-1)[:len(starts)]
        running = info["running"].reshape(-1)[:len(starts)]
    return returns.reshape(len(seeds), episodes), None
