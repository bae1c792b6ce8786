"""Evaluation: run episodes in lockstep over copies of an environment, one policy forward pass per step; with
several workers, the copies are shared out to that many processes through gymnasium's AsyncVectorEnv."""

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


def evaluate(act_fn: Callable[[np.ndarray], np.ndarray], env: MultiAgentMujocoEnv, episodes: int, seed: int,
             num_envs: int | None = None) -> np.ndarray:
    """Team return of each of `episodes` episodes; episode k starts from `reset(seed + k)`.

    `act_fn` maps observations [E, n_agents, obs_dim] to actions [E, n_agents, act_dim] for all running copies at
    once. With a deterministic `act_fn` the returns depend only on `seed`, not on how many copies run."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    num_envs = min(num_envs or episodes, episodes)
    envs = [env] + env.copies(num_envs - 1)
    returns = np.zeros(episodes)
    running = {}  # env slot -> episode index
    obs = np.zeros((num_envs, env.n_agents, env.obs_dim), np.float32)
    next_episode = 0
    for slot in range(num_envs):
        obs[slot], _ = envs[slot].reset(seed=seed + next_episode)
        running[slot] = next_episode
        next_episode += 1
    while running:
        slots = sorted(running)
        actions = np.asarray(act_fn(obs[slots]))
        for row, slot in enumerate(slots):
            o, _, reward, terminated, truncated = envs[slot].step(actions[row])
            returns[running[slot]] += reward
            obs[slot] = o
            if terminated or truncated:
                if next_episode < episodes:
                    obs[slot], _ = envs[slot].reset(seed=seed + next_episode)
                    running[slot] = next_episode
                    next_episode += 1
                else:
                    del running[slot]
    return returns


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


def evaluate_seeds(act_fn: Callable[[np.ndarray], np.ndarray], env: MultiAgentMujocoEnv, episodes: int,
                   seeds: list[int], workers: int | None = None) -> np.ndarray:
    """Team returns [len(seeds), episodes] of the fused seeds' policies: seed k's episode e starts from
    `reset(seeds[k] + e)`, as `evaluate(..., seed=seeds[k])` would run it.

    All episodes run at once in lockstep, one env copy each, with one `act_fn` call per step on every copy's
    observation, seed-major [len(seeds) * episodes, n_agents, obs_dim] (a fixed shape: a finished episode's row holds
    its last observation and its action is ignored). With `workers` > 1 (default: `default_workers()`) the copies are
    stepped in that many processes; the returns do not depend on it."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    starts = [seed + e for seed in seeds for e in range(episodes)]
    workers = min(workers or default_workers(), len(starts))
    returns = np.zeros(len(starts))
    running = np.ones(len(starts), dtype=bool)
    if workers == 1:
        envs = [env] + env.copies(len(starts) - 1)
        obs = np.stack([copy.reset(seed=start)[0] for copy, start in zip(envs, starts)]).astype(np.float32)
        while running.any():
            actions = np.asarray(act_fn(obs))
            for slot in np.flatnonzero(running):
                obs[slot], _, reward, terminated, truncated = envs[slot].step(actions[slot])
                returns[slot] += reward
                running[slot] = not (terminated or truncated)
        return returns.reshape(len(seeds), episodes)

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
    return returns.reshape(len(seeds), episodes)
