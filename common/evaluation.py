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
