"""Evaluation: run episodes in lockstep over copies of an environment, one policy forward pass per step."""

from __future__ import annotations

from typing import Callable

import numpy as np

from common.envs import MultiAgentMujocoEnv


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


def evaluate_seeds(act_fn: Callable[[np.ndarray], np.ndarray], env: MultiAgentMujocoEnv, episodes: int,
                   seeds: list[int]) -> np.ndarray:
    """Team returns [len(seeds), episodes] of the fused seeds' policies: seed k's episode e starts from
    `reset(seeds[k] + e)`, as `evaluate(..., seed=seeds[k])` would run it.

    All episodes run at once in lockstep, one env copy each, with one `act_fn` call per step on every copy's
    observation, seed-major [len(seeds) * episodes, n_agents, obs_dim] (a fixed shape: a finished episode's row holds
    its last observation and its action is ignored)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    starts = [seed + e for seed in seeds for e in range(episodes)]
    envs = [env] + env.copies(len(starts) - 1)
    obs = np.stack([copy.reset(seed=start)[0] for copy, start in zip(envs, starts)]).astype(np.float32)
    returns = np.zeros(len(starts))
    running = np.ones(len(starts), dtype=bool)
    while running.any():
        actions = np.asarray(act_fn(obs))
        for slot in np.flatnonzero(running):
            obs[slot], _, reward, terminated, truncated = envs[slot].step(actions[slot])
            returns[slot] += reward
            running[slot] = not (terminated or truncated)
    return returns.reshape(len(seeds), episodes)
