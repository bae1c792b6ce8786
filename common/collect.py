"""Behaviour policies and dataset generation, so every dataset can be made on a fresh machine.

    python -m common.collect train   --env Hopper [--algo td3|sac] [--total-steps N]   # resumable
    python -m common.collect select  --env Hopper                                       # pick medium / expert
    python -m common.collect dataset --env Hopper --quality medium-replay [--size N] [--data-dir DIR] [--seed S]

Behaviour policies are single-agent actors on the global state over the joint action (TD3, or SAC for Ant). With
per-dimension independent action noise such a policy factorises exactly into per-agent policies
a_i = mu_i(s) + eps_i given the state: the papers' setting, where every agent sees the state.

`train` evaluates (10 deterministic episodes) and stores the actor every `--checkpoint-every` steps in
`runs/behaviour/{env}/`. `select` keeps, in `behaviour_policies/{env}.pt` (fp16, committed), the checkpoints from
step 0 to the medium one and the expert one, chosen as the nearest by evaluation to the returns of OMIGA's data.

Datasets (native format of `common.datasets`):
    expert / medium   rollouts of that checkpoint, deterministic action + N(0, 0.1^2) noise, clipped to [-1, 1]
    medium-replay     each checkpoint before the medium one, run for REPLAY_REPEAT (5) times as many steps as training
                      spent on it, with the training exploration (uniform random before learning starts; TD3
                      N(0, 0.1^2); SAC sampled): a stand-in for that run's replay buffer, enlarged because at 1x
                      (Hopper: 80k transitions) every OMIGA-family learner collapses after ~100k updates
    medium-expert     medium and expert in equal parts
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.datasets import (QUALITIES, SMAX_QUALITIES, DatasetError, check_writable_dir, dataset_path,
                             missing_dataset_message, write_dataset)
from common.envs import ENV_NAMES, SMAX_MAPS, check_env_name, make_env

POLICY_DIR = Path(__file__).resolve().parent.parent / "behaviour_policies"
# Mean episode return of OMIGA's MuJoCo data (OMIGA, Table 2), the target quality of our checkpoints.
TARGET_RETURNS = {
    "Hopper": {"medium": 723.57, "expert": 2452.02},
    "Ant": {"medium": 1418.70, "expert": 2055.07},
    "HalfCheetah": {"medium": 1425.66, "expert": 2785.10},
}
DEFAULT_ALGO = {"Hopper": "td3", "Ant": "sac", "HalfCheetah": "td3"}
DATASET_NOISE = 0.1
TD3_EXPLORATION = 0.1
DEFAULT_SIZE = 1_000_000
# medium-replay runs every checkpoint for this many times the steps its training spent on it: on the 1x file (Hopper,
# 80k transitions) omiga.py, omcda.py and the official OMIGA code all collapse after about 100k updates; on the 5x
# file omiga.py ran 160k updates without collapsing (README, "Long runs").
REPLAY_REPEAT = 5
LEARNING_STARTS = 10_000


def mlp(in_dim: int, out_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class Actor(nn.Module):
    """State -> joint action. TD3: tanh(mu). SAC: tanh-Gaussian with state-dependent log-std."""

    def __init__(self, state_dim: int, act_dim: int, hidden: int, stochastic: bool):
        super().__init__()
        self.stochastic = stochastic
        self.net = mlp(state_dim, 2 * act_dim if stochastic else act_dim, hidden)

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.net(state)
        if not self.stochastic:
            return out, None
        mean, log_std = out.chunk(2, -1)
        return mean, log_std.clamp(-5.0, 2.0)

    def deterministic(self, state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(state)[0])

    def explore(self, state: torch.Tensor, normal_noise: torch.Tensor) -> torch.Tensor:
        """Training-time exploration given standard normal noise of the action's shape."""
        mean, log_std = self(state)
        if self.stochastic:
            return torch.tanh(mean + log_std.exp() * normal_noise)
        return (torch.tanh(mean) + TD3_EXPLORATION * normal_noise).clamp(-1.0, 1.0)

    def sample_with_log_prob(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self(state)
        pre = mean + log_std.exp() * torch.randn_like(mean)
        action = torch.tanh(pre)
        log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(pre) - torch.log1p(-action.pow(2) + 1e-6)
        return action, log_prob.sum(-1)


class TwinCritic(nn.Module):
    def __init__(self, state_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.q1, self.q2 = mlp(state_dim + act_dim, 1, hidden), mlp(state_dim + act_dim, 1, hidden)

    def forward(self, state, action):
        x = torch.cat([state, action], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fp16_state(module: nn.Module) -> dict:
    return {k: v.detach().to(torch.float16).clone() for k, v in module.state_dict().items()}


class Trainer:
    """TD3 or SAC on the single-agent view of a MaMuJoCo task; all state in `state_dict()` for resuming."""

    def __init__(self, env_name: str, algo: str, hidden: int = 256, batch_size: int = 256, lr: float = 3e-4,
                 gamma: float = 0.99, tau: float = 0.005, learning_starts: int = 10_000, buffer_size: int = 1_000_000,
                 seed: int = 0):
        self.env = make_env(env_name)
        self.env_name, self.algo, self.hidden = env_name, algo, hidden
        self.batch_size, self.gamma, self.tau, self.learning_starts = batch_size, gamma, tau, learning_starts
        s, a = self.env.state_dim, self.env.joint_act_dim
        torch.manual_seed(seed)
        self.actor = Actor(s, a, hidden, stochastic=(algo == "sac"))
        self.critic = TwinCritic(s, a, hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.log_alpha = torch.zeros((), requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr)
        self.target_entropy = -float(a)
        n = buffer_size
        self.buffer = dict(s=np.zeros((n, s), np.float32), a=np.zeros((n, a), np.float32), r=np.zeros(n, np.float32),
                           s2=np.zeros((n, s), np.float32), done=np.zeros(n, np.float32))
        self.rng = np.random.default_rng(seed)
        self.step, self.updates, self.episode = 0, 0, 0
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        nets = {k: getattr(self, k).state_dict() for k in ("actor", "critic", "actor_target", "critic_target",
                                                             "actor_opt", "critic_opt", "alpha_opt")}
        filled = min(self.step, len(self.buffer["r"]))
        return dict(nets=nets, log_alpha=self.log_alpha.detach(), step=self.step, updates=self.updates,
                    episode=self.episode, history=self.history, rng=self.rng.bit_generator.state,
                    torch_rng=torch.get_rng_state(), buffer={k: v[:filled].copy() for k, v in self.buffer.items()},
                    algo=self.algo, hidden=self.hidden, learning_starts=self.learning_starts)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["nets"].items():
            getattr(self, k).load_state_dict(v)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.step, self.updates, self.episode = state["step"], state["updates"], state["episode"]
        self.history = state["history"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        for k, v in state["buffer"].items():
            self.buffer[k][: len(v)] = v

    def update(self) -> None:
        size = min(self.step, len(self.buffer["r"]))
        idx = self.rng.integers(0, size, self.batch_size)
        s, a, r, s2, done = (torch.from_numpy(self.buffer[k][idx]) for k in ("s", "a", "r", "s2", "done"))
        with torch.no_grad():
            if self.algo == "td3":
                mean, _ = self.actor_target(s2)
                noise = (0.2 * torch.randn_like(mean)).clamp(-0.5, 0.5)
                a2 = (torch.tanh(mean) + noise).clamp(-1.0, 1.0)
                entropy_bonus = 0.0
            else:
                a2, log_p2 = self.actor.sample_with_log_prob(s2)
                entropy_bonus = -self.log_alpha.exp() * log_p2
            target = r + self.gamma * (1 - done) * (torch.min(*self.critic_target(s2, a2)) + entropy_bonus)
        q1, q2 = self.critic(s, a)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        self.updates += 1
        if self.algo == "td3" and self.updates % 2:
            return
        if self.algo == "td3":
            actor_loss = -self.critic.q1(torch.cat([s, self.actor.deterministic(s)], -1)).mean()
        else:
            a_new, log_p = self.actor.sample_with_log_prob(s)
            actor_loss = (self.log_alpha.exp().detach() * log_p - torch.min(*self.critic(s, a_new))).mean()
            alpha_loss = -(self.log_alpha * (log_p.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad()
            alpha_loss.backward()
            self.alpha_opt.step()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, target_net in ((self.critic, self.critic_target), (self.actor, self.actor_target)):
                for p, tp in zip(net.parameters(), target_net.parameters()):
                    tp.lerp_(p, self.tau)

    def evaluate(self, episodes: int = 10) -> np.ndarray:
        from common.evaluation import evaluate

        # Agent inputs in "state" mode are [state, one-hot id]; agent 0's row carries the state.
        @torch.no_grad()
        def act(obs):
            return self.env.local_actions(self.actor.deterministic(torch.from_numpy(obs[:, 0, : self.env.state_dim])).numpy())

        return evaluate(act, self.env, episodes, seed=10_000)[0]

    def checkpoint(self) -> None:
        returns = self.evaluate()
        self.history.append(dict(step=self.step, eval_mean=float(returns.mean()), eval_std=float(returns.std()),
                                 actor=fp16_state(self.actor)))

    def train(self, total_steps: int, work_dir: Path, checkpoint_every: int) -> None:
        env = self.env.base_env
        state, _ = env.reset(seed=int(self.rng.integers(2**31)))
        start = time.time()
        pbar = tqdm(total=total_steps, initial=self.step, desc=f"{self.env_name} {self.algo}", mininterval=10.0)
        while self.step < total_steps:
            if self.step % checkpoint_every == 0 and len(self.history) * checkpoint_every <= self.step:
                self.checkpoint()
                atomic_save(self.state_dict(), work_dir / "train_state.pt")
                last = self.history[-1]
                pbar.set_postfix(eval=f"{last['eval_mean']:.0f}±{last['eval_std']:.0f}", elapsed=f"{time.time() - start:.0f}s")
                tqdm.write(f"step {self.step}: eval return {last['eval_mean']:.1f} ± {last['eval_std']:.1f}")
            if self.step < self.learning_starts:
                action = self.rng.uniform(-1.0, 1.0, self.env.joint_act_dim).astype(np.float32)
            else:
                noise = torch.from_numpy(self.rng.standard_normal(self.env.joint_act_dim).astype(np.float32))
                with torch.no_grad():
                    action = self.actor.explore(torch.from_numpy(state.astype(np.float32)), noise).numpy()
            next_state, reward, terminated, truncated, _ = env.step(action)
            i = self.step % len(self.buffer["r"])
            for key, value in (("s", state), ("a", action), ("r", reward), ("s2", next_state), ("done", float(terminated))):
                self.buffer[key][i] = value
            state = next_state
            if terminated or truncated:
                self.episode += 1
                state, _ = env.reset(seed=int(self.rng.integers(2**31)))
            self.step += 1
            if self.step % 1000 == 0:
                pbar.update(1000)
            if self.step >= self.learning_starts:
                self.update()
        self.checkpoint()
        atomic_save(self.state_dict(), work_dir / "train_state.pt")
        pbar.close()


def train(env: str, algo: str | None, total_steps: int, work_dir: Path, checkpoint_every: int, seed: int,
          learning_starts: int, select_after: bool) -> Trainer:
    check_env_name(env)
    torch.set_num_threads(1)
    algo = algo or DEFAULT_ALGO[env]
    trainer = Trainer(env, algo, seed=seed, learning_starts=learning_starts)
    state_path = work_dir / "train_state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["algo"] != algo:
            raise ValueError(f"{state_path} holds a {state['algo']} run; pass --algo {state['algo']} or a new --work-dir")
        trainer.load_state_dict(state)
        print(f"resuming {env} {algo} from step {trainer.step}")
    trainer.train(total_steps, work_dir, checkpoint_every)
    if select_after:
        select(env, work_dir)
    return trainer


def select(env: str, work_dir: Path, out: Path | None = None) -> Path:
    """Keep the checkpoints from step 0 to the medium one and the expert one, nearest by evaluation to the targets."""
    state = torch.load(work_dir / "train_state.pt", weights_only=False)
    history = state["history"]
    evals = np.array([h["eval_mean"] for h in history])
    target = TARGET_RETURNS[env]
    medium = int(np.argmin(np.abs(evals - target["medium"])))
    expert = int(np.argmin(np.abs(evals - target["expert"])))
    if evals[expert] < evals[medium]:
        expert = int(np.argmax(evals))
    checkpoint_every = history[1]["step"] - history[0]["step"] if len(history) > 1 else 0
    strip = lambda h: dict(step=h["step"], eval_mean=h["eval_mean"], eval_std=h["eval_std"], actor=h["actor"])
    bundle = dict(env=env, algo=state["algo"], hidden=state["hidden"], checkpoint_every=checkpoint_every,
                  learning_starts=state["learning_starts"], td3_exploration=TD3_EXPLORATION,
                  sequence=[strip(h) for h in history[: medium + 1]], medium=strip(history[medium]),
                  expert=strip(history[expert]), trained_steps=state["step"],
                  curve=[(h["step"], h["eval_mean"], h["eval_std"]) for h in history])
    out = out or POLICY_DIR / f"{env}.pt"
    atomic_save(bundle, out)
    print(f"{env}: medium = step {history[medium]['step']} ({evals[medium]:.0f}), expert = step "
          f"{history[expert]['step']} ({evals[expert]:.0f}); wrote {out}")
    return out


def load_policies(env: str, policy_dir: Path = POLICY_DIR) -> dict:
    path = policy_dir / f"{env}.pt"
    if not path.exists():
        raise FileNotFoundError(f"no behaviour policies for {env} at {path}; train them with "
                                f"`python -m common.collect train --env {env}`")
    return torch.load(path, weights_only=False)


def build_actor(bundle: dict, record: dict, state_dim: int, act_dim: int) -> Actor:
    actor = Actor(state_dim, act_dim, bundle["hidden"], stochastic=(bundle["algo"] == "sac"))
    actor.load_state_dict({k: v.float() for k, v in record["actor"].items()})
    return actor.eval()


def rollout(env_name: str, agent_conf: str | None, segments: list[tuple[Actor | None, str, int]], seed: int,
            num_envs: int = 16, desc: str = "") -> dict[str, np.ndarray]:
    """Run each (actor, exploration, steps) segment over `num_envs` env copies in lockstep, one forward per step.

    exploration: "dataset" (deterministic + N(0, 0.1^2)), "train" (the training exploration), "uniform".
    A segment records at least `steps` transitions in whole episodes ("dataset") or exactly `steps`, cutting the
    running episodes at the end and marking the cut as a timeout ("train", "uniform")."""
    envs = [make_env(env_name, agent_conf, obs_mode="local") for _ in range(num_envs)]
    env0 = envs[0]
    local_dim = env0.local_obs_dim  # store local observations without the one-hot id (native format)
    rng = np.random.default_rng(seed)
    episode_seed = seed * 1_000_003
    chunks = []
    pbar = tqdm(total=sum(s for _, _, s in segments), desc=desc, unit="step", mininterval=2.0)
    for actor, exploration, steps in segments:
        whole_episodes = exploration == "dataset"
        budget = math.ceil(steps / num_envs)
        per_env = [dict(obs=[], next_obs=[], states=[], next_states=[], actions=[], rewards=[], terminals=[], timeouts=[])
                   for _ in envs]
        obs, states = np.zeros((num_envs, env0.n_agents, env0.obs_dim), np.float32), np.zeros((num_envs, env0.state_dim), np.float32)
        for k, e in enumerate(envs):
            obs[k], states[k] = e.reset(seed=episode_seed)
            episode_seed += 1
        active = list(range(num_envs))
        counts = [0] * num_envs
        while active:
            if exploration == "uniform":
                joint = rng.uniform(-1.0, 1.0, (len(active), env0.joint_act_dim)).astype(np.float32)
            else:
                noise = rng.standard_normal((len(active), env0.joint_act_dim)).astype(np.float32)
                with torch.no_grad():
                    s = torch.from_numpy(states[active])
                    if exploration == "train":
                        joint = actor.explore(s, torch.from_numpy(noise)).numpy()
                    else:
                        joint = np.clip(actor.deterministic(s).numpy() + DATASET_NOISE * noise, -1.0, 1.0)
            actions = env0.local_actions(joint)
            still = []
            for row, k in enumerate(active):
                buf = per_env[k]
                next_obs, next_state, reward, terminated, truncated = envs[k].step(actions[row])
                counts[k] += 1
                cut = not whole_episodes and counts[k] >= budget
                for key, value in (("obs", obs[k, :, :local_dim].copy()), ("next_obs", next_obs[:, :local_dim]), ("states", states[k].copy()),
                                   ("next_states", next_state), ("actions", actions[row]), ("rewards", reward),
                                   ("terminals", terminated), ("timeouts", (truncated or cut) and not terminated)):
                    buf[key].append(value)
                obs[k], states[k] = next_obs, next_state
                episode_over = terminated or truncated
                if episode_over and not (whole_episodes and counts[k] >= budget):
                    obs[k], states[k] = envs[k].reset(seed=episode_seed)
                    episode_seed += 1
                if not (cut or (whole_episodes and episode_over and counts[k] >= budget)):
                    still.append(k)
            pbar.update(len(active))
            active = still
        for buf in per_env:
            chunks.append({k: np.asarray(v) for k, v in buf.items()})
    pbar.close()
    return {new: np.concatenate([c[old] for c in chunks]) for old, new in (
        ("obs", "observations"), ("next_obs", "next_observations"), ("states", "states"), ("next_states", "next_states"),
        ("actions", "actions"), ("rewards", "rewards"), ("terminals", "terminals"), ("timeouts", "timeouts"))}


def quality_segments(bundle: dict, quality: str, size: int | None, state_dim: int, act_dim: int):
    actor = lambda record: build_actor(bundle, record, state_dim, act_dim)
    if quality in ("expert", "medium"):
        record = bundle[quality]
        return [(actor(record), "dataset", size or DEFAULT_SIZE)], f"{quality} checkpoint at step {record['step']} " \
            f"(eval {record['eval_mean']:.0f}), deterministic action + N(0, {DATASET_NOISE}^2) noise"
    if quality == "medium-replay":
        sequence = bundle["sequence"][:-1] or bundle["sequence"]
        every = bundle["checkpoint_every"] or 10_000
        scale = (size / (every * len(sequence))) if size else REPLAY_REPEAT
        segments = []
        for record in sequence:
            for start in range(record["step"], record["step"] + every, every):
                explore = "uniform" if start < bundle["learning_starts"] else "train"
                segments.append((actor(record), explore, max(1, round(every * scale))))
        return segments, (f"checkpoints at steps 0..{bundle['medium']['step'] - every} (every {every}) each run for "
                          f"{round(every * scale)} steps with the training exploration ({bundle['algo']})")
    raise ValueError(f"unknown quality {quality!r}; valid: {', '.join(QUALITIES)}")


def generate_dataset(env: str, quality: str, data_dir: str | Path = "data", size: int | None = None, seed: int = 0,
                     agent_conf: str | None = None, num_envs: int = 16, policy_dir: Path = POLICY_DIR) -> Path:
    """Generate a native dataset from the committed behaviour policies; deterministic given (policies, seed)."""
    spec = check_env_name(env)
    agent_conf = agent_conf or spec.default_agent_conf
    bundle = load_policies(env, policy_dir)
    probe = make_env(env, agent_conf)
    if quality == "medium-expert":
        half = (size or 2 * DEFAULT_SIZE) // 2
        parts, notes = [], []
        for part, part_seed in (("medium", seed), ("expert", seed + 1)):
            segments, note = quality_segments(bundle, part, half, probe.state_dim, probe.joint_act_dim)
            parts.append(rollout(env, agent_conf, segments, part_seed, num_envs, desc=f"{env} {part}"))
            notes.append(f"{part}: {note}")
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        how = "; ".join(notes)
    else:
        segments, how = quality_segments(bundle, quality, size, probe.state_dim, probe.joint_act_dim)
        arrays = rollout(env, agent_conf, segments, seed, num_envs, desc=f"{env} {quality}")
    attrs = dict(env=env, agent_conf=agent_conf, obs_mode="local", quality=quality, n_agents=probe.n_agents,
                 obs_dims=probe.local_obs_dims, act_dims=probe.local_act_dims, state_dim=probe.state_dim,
                 source=f"common.collect, {bundle['algo']} behaviour policy; {how}; seed {seed}",
                 seed=seed, simulator="MuJoCo 4 via Gymnasium *-v5 / gymnasium-robotics mamujoco_v1")
    return write_dataset(dataset_path(data_dir, env, agent_conf, quality), arrays, attrs)


def replay_size_warning(path: Path) -> str | None:
    """A warning when a generated medium-replay file ran its checkpoints for other than REPLAY_REPEAT times their
    training steps: a file made before the definition changed (1x), or with --size, which a run would otherwise use
    without saying so."""
    with h5py.File(path, "r") as file:
        source = str(file.attrs.get("source", ""))
    match = re.search(r"\(every (\d+)\) each run for (\d+) steps", source)
    if match is None or int(match[2]) == REPLAY_REPEAT * int(match[1]):
        return None
    return (f"warning: {path} runs each checkpoint for {match[2]} steps; the default medium-replay runs each for "
            f"{REPLAY_REPEAT * int(match[1])} (5 times its training steps, since 2026-11-23). If that file predates "
            f"the change, delete it and it is generated again; keep it if you made it so with --size.")


def ensure_dataset(data_dir: str | Path, env: str, agent_conf: str | None, quality: str, generate: bool = True) -> Path:
    """The dataset's path; generate it from the committed behaviour policies if it is missing and `generate`
    (SMAX maps: with common.smax_collect, which needs jax). An existing medium-replay file of another size than the
    default gets a warning (`replay_size_warning`)."""
    smax = env in SMAX_MAPS
    valid = SMAX_QUALITIES if smax else QUALITIES
    if quality not in valid:
        raise DatasetError(f"--dataset {quality}: the {'SMAX' if smax else 'MuJoCo'} datasets of {env} are "
                           f"{', '.join(valid)}")
    path = dataset_path(data_dir, env, agent_conf, quality)
    if path.exists():
        warning = replay_size_warning(path) if quality == "medium-replay" else None
        if warning:
            print(warning, file=sys.stderr)
        return path
    if not generate:
        raise FileNotFoundError(missing_dataset_message(path))
    check_writable_dir(path.parent)
    print(f"dataset {path} not found: generating it from the committed behaviour policies (once)")
    if smax:
        from common.smax_collect import generate_dataset as generate_smax_dataset

        return generate_smax_dataset(env, quality, data_dir)
    return generate_dataset(env, quality, data_dir, agent_conf=agent_conf)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.collect", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a behaviour policy (resumable)")
    tr.add_argument("--env", required=True, choices=ENV_NAMES)
    tr.add_argument("--algo", choices=("td3", "sac"), default=None, help="default: td3, sac for Ant")
    tr.add_argument("--total-steps", type=int, default=None, help="default: 200k (Hopper), 100k (HalfCheetah), 400k (Ant)")
    tr.add_argument("--checkpoint-every", type=int, default=10_000)
    tr.add_argument("--learning-starts", type=int, default=LEARNING_STARTS)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--work-dir", default=None, help="default: runs/behaviour/{env}")
    tr.add_argument("--no-select", action="store_true", help="do not write behaviour_policies/{env}.pt at the end")
    se = sub.add_parser("select", help="write behaviour_policies/{env}.pt from a training run")
    se.add_argument("--env", required=True, choices=ENV_NAMES)
    se.add_argument("--work-dir", default=None)
    ds = sub.add_parser("dataset", help="generate a dataset from the committed behaviour policies")
    ds.add_argument("--env", required=True, choices=ENV_NAMES)
    ds.add_argument("--quality", required=True, choices=QUALITIES)
    ds.add_argument("--agent-conf", default=None)
    ds.add_argument("--size", type=int, default=None, help="transitions (default 1e6; medium-expert 2e6; "
                                                            "medium-replay: 5 times the medium checkpoint's training steps)")
    ds.add_argument("--data-dir", default="data")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--num-envs", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command in ("train", "select"):
        work_dir = Path(args.work_dir or f"runs/behaviour/{args.env}")
    if args.command == "train":
        default_steps = {"Hopper": 200_000, "HalfCheetah": 100_000, "Ant": 400_000}[args.env]
        train(args.env, args.algo, args.total_steps or default_steps, work_dir, args.checkpoint_every, args.seed,
              args.learning_starts, not args.no_select)
    elif args.command == "select":
        select(args.env, work_dir)
    else:
        start = time.time()
        path = generate_dataset(args.env, args.quality, args.data_dir, args.size, args.seed, args.agent_conf, args.num_envs)
        print(f"wrote {path} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
