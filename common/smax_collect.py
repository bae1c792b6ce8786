"""Behaviour policies and datasets for the SMAX maps (discrete actions), so that every SMAX dataset can be made on a
fresh machine from committed checkpoints, as common.collect does for MuJoCo. The SMAX env needs jax and jaxmarl
(requirements-smax.txt); this module imports them only where it steps the env.

    python -m common.smax_collect train   --map 5m_vs_6m [--total-steps N]        # MAPPO, resumable
    python -m common.smax_collect select  --map 5m_vs_6m [--work-dir RUN ...]      # pick good / medium / poor
    python -m common.smax_collect dataset --map 5m_vs_6m --quality good [--episodes 1000] [--data-dir DIR]

Behaviour policies: MAPPO (Yu et al., NeurIPS 2022 Datasets and Benchmarks) with parameter sharing, the method that
made the papers' SMAC data (OMIGA, Appendix B: Meng et al.'s datasets, collected from MAPPO agents). One
categorical actor pi(a_i | o_i) shared by the agents (its input holds the one-hot id), a centralised V(s) on the
world state, PPO's clipped objective with the team's advantage for every agent, unavailable actions masked out of
the logits:

    A_t = sum_k (gamma lambda)^k delta_t+k,  delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t)   (GAE; the sum
          stops where an episode ends; s'_t is the state step t reached, so a time-limit cut bootstraps from it)
    L_pi = -E[ min(rho_i A, clip(rho_i, 1 - eps, 1 + eps) A) ] - c_H E[ H(pi(. | o_i)) ],  rho_i = pi / pi_old
    L_V  = E[ (V(s_t) - (A_t + V_old(s_t)))^2 ]

Settings: those of JaxMARL's tuned MAPPO on SMAX (its final sweep: 64 envs x 128 steps per iteration, 4 epochs of 4
minibatches, clip eps 0.2, gamma 0.99, lambda 0.95, Adam lr 2e-3 decayed linearly to 0), except [ours]: gradient-norm
clip 0.5 per network (theirs: 0.25 on one joint actor-critic loss), entropy c_H 0.01 (theirs: 0), feed-forward 2 x 128
ReLU networks (theirs: recurrent; a policy Markov in o_i is the class the offline learners here fit, so the data's
behaviour policy lies in it), advantages normalised per iteration, no value normalisation (SMAX returns are scaled to
[0, 20]). Measured on 5m_vs_6m: MAPPO's own SMAC values (lr 5e-4 constant, 5 epochs, clip 10) reached a return of
7.1 and a win rate of 0.04 after 6M steps, these 9.4 and 0.16 after 5.5M.

Checkpoints: every --checkpoint-every env steps, the actor (fp16) with its return and win rate over 128 episodes of
sampled actions (the policy as it collects data). `select` keeps, per quality, the checkpoint (of one or more runs)
whose return is nearest to that of the papers' SMAC data (OMIGA, Table 4), in `behaviour_policies/smax-{map}.pt`
(committed). [ours] Where training never reaches the good return (20 on 5m_vs_6m: every battle won), the three targets
are scaled by best / good, keeping the papers' ratios between the qualities.

Datasets: EPISODES (1000) whole episodes of the quality's checkpoint, actions sampled (OMIGA's SMAC datasets are
1000 episodes each), taken in the order they start, round-robin over the envs, so that short episodes are not
favoured. Observations are stored without the one-hot id, as for MuJoCo; actions as indices, with the availability
masks of both observations.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.collect import POLICY_DIR, atomic_save, fp16_state, mlp
from common.datasets import SMAX_QUALITIES, dataset_path, write_dataset

# Mean episode return of the papers' SMAC data (OMIGA, Table 4), the target quality of our checkpoints.
TARGET_RETURNS = {
    "5m_vs_6m": {"good": 20.00, "medium": 11.03, "poor": 8.50},
    "6h_vs_8z": {"good": 17.84, "medium": 11.96, "poor": 9.12},
}
EPISODES = 1000
EVAL_EPISODES = 128
HIDDEN = 128


def masked_logits(logits: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Logits with the unavailable actions (avail false) at the dtype's minimum: probability 0, log-probability finite."""
    return logits.masked_fill(~avail, torch.finfo(logits.dtype).min)


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One action per row of masked logits [..., A], from the categorical they define."""
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])


class Actor(nn.Module):
    """pi(a_i | o_i) for every agent: obs [..., obs_dim] (with the one-hot id) -> logits [..., A]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden)
        nn.init.orthogonal_(self.net[-1].weight, gain=0.01)  # PPO's usual start: a near-uniform policy
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, obs: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        return masked_logits(self.net(obs), avail)


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        ends: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates [T, E]; next_values[t] is V of the state step t reached, terminated[t] stops
    the bootstrap and ends[t] (terminated or cut) stops the sum at an episode's end."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * (1.0 - terminated[t]) * next_values[t] - values[t]
        running = delta + gamma * lam * (1.0 - ends[t]) * running
        advantages[t] = running
    return advantages


def ppo_losses(logits: torch.Tensor, actions: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, returns: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped policy loss, the mean entropy and the value loss. logits [M, n, A] (masked), actions and
    old_log_prob [M, n], advantages, values and returns [M]: every agent of an env step shares its advantage."""
    log_probs = torch.log_softmax(logits, -1)
    log_prob = log_probs.gather(-1, actions[..., None]).squeeze(-1)
    ratio = torch.exp(log_prob - old_log_prob)
    advantage = advantages[:, None]
    policy_loss = -torch.minimum(ratio * advantage, ratio.clamp(1.0 - clip, 1.0 + clip) * advantage).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    return policy_loss, entropy, (values - returns).pow(2).mean()


class MAPPO:
    """MAPPO with a shared actor on BatchedSMAX; `state_dict()` holds what resuming needs."""

    def __init__(self, map_name: str, num_envs: int = 64, rollout_steps: int = 128, epochs: int = 4,
                 minibatches: int = 4, lr: float = 2e-3, gamma: float = 0.99, lam: float = 0.95, clip: float = 0.2,
                 entropy_coef: float = 0.01, max_grad_norm: float = 0.5, hidden: int = HIDDEN, seed: int = 0,
                 anneal_lr: bool = True):
        from common.smax import BatchedSMAX

        self.map_name, self.hidden, self.seed = map_name, hidden, seed
        self.envs = BatchedSMAX(map_name, num_envs, seed=seed)
        self.rollout_steps, self.epochs, self.minibatches = rollout_steps, epochs, minibatches
        self.gamma, self.lam, self.clip, self.entropy_coef, self.max_grad_norm = gamma, lam, clip, entropy_coef, max_grad_norm
        self.lr, self.anneal_lr = lr, anneal_lr
        self.settings = dict(num_envs=num_envs, rollout_steps=rollout_steps, epochs=epochs, minibatches=minibatches,
                             lr=lr, gamma=gamma, lam=lam, clip=clip, entropy_coef=entropy_coef,
                             max_grad_norm=max_grad_norm, hidden=hidden, seed=seed, anneal_lr=anneal_lr)
        torch.manual_seed(seed)
        self.actor = Actor(self.envs.obs_dim, self.envs.act_dim, hidden)
        self.critic = mlp(self.envs.state_dim, 1, hidden)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.steps, self.history = 0, []
        self.obs, self.state = self.envs.reset()
        self.episode_returns = np.zeros(num_envs)
        self.finished: list[tuple[float, bool]] = []  # (return, won) of the episodes finished since the last log

    def state_dict(self) -> dict:
        return dict(actor=self.actor.state_dict(), critic=self.critic.state_dict(),
                    actor_opt=self.actor_opt.state_dict(), critic_opt=self.critic_opt.state_dict(), steps=self.steps,
                    history=self.history, torch_rng=torch.get_rng_state(), map=self.map_name, hidden=self.hidden,
                    settings=self.settings)

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "critic", "actor_opt", "critic_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.steps, self.history = state["steps"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        self.obs, self.state = self.envs.reset(self.seed + self.steps)  # running episodes start over

    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        """One rollout of rollout_steps steps of every env."""
        keys = ("obs", "avail", "actions", "log_prob", "states", "rewards", "terminated", "ends", "reached_states")
        rollout = {key: [] for key in keys}
        for _ in range(self.rollout_steps):
            obs, avail = torch.tensor(self.obs), torch.tensor(self.envs.avail_actions())  # copies: the env's are read-only
            logits = self.actor(obs, avail)
            actions = sample_actions(logits)
            log_prob = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
            states = torch.tensor(self.state)
            self.obs, self.state, reward, terminated, truncated = self.envs.step(actions.numpy())
            ends = terminated | truncated
            self.episode_returns += reward
            for e in np.flatnonzero(ends):
                self.finished.append((float(self.episode_returns[e]), bool(self.envs.won[e])))
            self.episode_returns[ends] = 0.0
            for key, value in zip(keys, (obs, avail, actions, log_prob, states, torch.tensor(reward),
                                         torch.tensor(terminated).float(), torch.tensor(ends).float(),
                                         torch.tensor(self.envs.final_state))):
                rollout[key].append(value)
        self.steps += self.rollout_steps * self.envs.num_envs
        return {key: torch.stack(value) for key, value in rollout.items()}

    def update(self, rollout: dict[str, torch.Tensor]) -> dict[str, float]:
        with torch.no_grad():
            values = self.critic(rollout["states"]).squeeze(-1)
            next_values = self.critic(rollout["reached_states"]).squeeze(-1)
            advantages = gae(rollout["rewards"], values, next_values, rollout["terminated"], rollout["ends"],
                             self.gamma, self.lam)
            returns = (advantages + values).flatten()
            advantages = ((advantages - advantages.mean()) / (advantages.std() + 1e-8)).flatten()
        flat = {key: rollout[key].flatten(0, 1) for key in ("obs", "avail", "actions", "log_prob", "states")}
        for _ in range(self.epochs):
            for rows in torch.randperm(len(returns)).chunk(self.minibatches):
                logits = self.actor(flat["obs"][rows], flat["avail"][rows])
                policy_loss, entropy, value_loss = ppo_losses(
                    logits, flat["actions"][rows], flat["log_prob"][rows], advantages[rows],
                    self.critic(flat["states"][rows]).squeeze(-1), returns[rows], self.clip)
                for optimizer, loss, net in ((self.actor_opt, policy_loss - self.entropy_coef * entropy, self.actor),
                                             (self.critic_opt, value_loss, self.critic)):
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(net.parameters(), self.max_grad_norm)
                    optimizer.step()
        return dict(policy_loss=policy_loss.item(), entropy=entropy.item(), value_loss=value_loss.item())

    def checkpoint(self) -> dict:
        returns, wins = evaluate_actor(self.actor, self.map_name, EVAL_EPISODES, seed=10_000)
        record = dict(step=self.steps, return_mean=float(returns.mean()), return_std=float(returns.std()),
                      win_rate=float(wins.mean()), actor=fp16_state(self.actor))
        self.history.append(record)
        return record

    def train(self, total_steps: int, work_dir: Path, checkpoint_every: int) -> None:
        start = time.time()
        progress = tqdm(total=total_steps, initial=self.steps, desc=f"MAPPO {self.map_name}", unit="step",
                        mininterval=10.0)
        while True:
            if self.steps >= len(self.history) * checkpoint_every or self.steps >= total_steps:
                record = self.checkpoint()
                atomic_save(self.state_dict(), work_dir / "train_state.pt")
                tqdm.write(f"step {self.steps}: return {record['return_mean']:.2f} ± {record['return_std']:.2f}, "
                           f"win rate {record['win_rate']:.2f} ({time.time() - start:.0f} s)")
            if self.steps >= total_steps:
                break
            if self.anneal_lr:  # linearly to 0 at total_steps
                for optimizer in (self.actor_opt, self.critic_opt):
                    optimizer.param_groups[0]["lr"] = self.lr * (1.0 - self.steps / total_steps)
            metrics = self.update(self.collect())
            progress.update(self.rollout_steps * self.envs.num_envs)
            if self.finished:
                returns, wins = np.array(self.finished).T
                progress.set_postfix(ret=f"{returns.mean():.2f}", win=f"{wins.mean():.2f}",
                                     ent=f"{metrics['entropy']:.2f}")
                self.finished = []
        progress.close()


@torch.no_grad()
def evaluate_actor(actor: Actor, map_name: str, episodes: int, seed: int,
                   generator_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return and win of the first episode of each of `episodes` envs (one batched env each), actions sampled."""
    from common.smax import BatchedSMAX

    envs = BatchedSMAX(map_name, episodes, seed=seed)
    obs, _ = envs.reset()
    generator = torch.Generator().manual_seed(generator_seed)
    returns, wins, running = np.zeros(episodes), np.zeros(episodes, bool), np.ones(episodes, bool)
    while running.any():
        logits = actor(torch.tensor(obs), torch.tensor(envs.avail_actions()))
        obs, _, reward, terminated, truncated = envs.step(sample_actions(logits, generator).numpy())
        returns += np.where(running, reward, 0.0)
        wins |= running & envs.won
        running &= ~(terminated | truncated)
    return returns, wins


def work_dir_of(map_name: str, work_dir: str | None) -> Path:
    return Path(work_dir or f"runs/behaviour/smax-{map_name}")


def train(map_name: str, total_steps: int, work_dir: Path, checkpoint_every: int, seed: int, **settings) -> MAPPO:
    """MAPPO on `map_name` (settings: MAPPO's keyword arguments), continued from work_dir/train_state.pt if there."""
    trainer = MAPPO(map_name, seed=seed, **settings)
    state_file = work_dir / "train_state.pt"
    if state_file.exists():
        trainer.load_state_dict(torch.load(state_file, weights_only=False))
        print(f"resuming {state_file} at step {trainer.steps}")
    trainer.train(total_steps, work_dir, checkpoint_every)
    return trainer


def select(map_name: str, work_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the checkpoint nearest to each quality's target return to behaviour_policies/smax-{map}.pt, choosing among
    the checkpoints of every run in `work_dirs` (a long run and a short one with dense early checkpoints cover both the
    fast early rise and the plateau). When no checkpoint reaches the good target, every target is scaled by best return
    / good target, so that the three qualities keep the papers' ratios instead of medium and good both landing on the
    best checkpoint."""
    if map_name not in TARGET_RETURNS:
        raise ValueError(f"no target returns for {map_name}; maps with targets: {', '.join(TARGET_RETURNS)}")
    runs = []
    for work_dir in work_dirs:
        state_file = work_dir / "train_state.pt"
        if not state_file.exists():
            raise FileNotFoundError(f"no training run at {state_file}; run `python -m common.smax_collect train "
                                    f"--map {map_name} --work-dir {work_dir}` first")
        state = torch.load(state_file, weights_only=False)
        if state["map"] != map_name or state["hidden"] != (runs[0] if runs else state)["hidden"]:
            raise ValueError(f"{state_file} trained on {state['map']} with hidden {state['hidden']}; select needs "
                             f"runs on {map_name}, all with the same hidden size")
        runs.append(state)
    candidates = [dict(record, run=k) for k, state in enumerate(runs) for record in state["history"]]
    targets = TARGET_RETURNS[map_name]
    scale = min(1.0, max(record["return_mean"] for record in candidates) / targets["good"])
    chosen = {}
    for quality, target in targets.items():
        chosen[quality] = min(candidates, key=lambda record: abs(record["return_mean"] - scale * target))
        print(f"{quality}: run {chosen[quality]['run']} step {chosen[quality]['step']}, return "
              f"{chosen[quality]['return_mean']:.2f} (target {scale * target:.2f} = {scale:.3f} x the seeds' {target}), "
              f"win rate {chosen[quality]['win_rate']:.2f}")
    bundle = dict(map=map_name, hidden=runs[0]["hidden"], policies=chosen, target_scale=scale,
                  runs=[dict(settings=state.get("settings"), steps=state["steps"],
                             curve=[{k: v for k, v in record.items() if k != "actor"} for record in state["history"]])
                        for state in runs])
    out = out or POLICY_DIR / f"smax-{map_name}.pt"
    atomic_save(bundle, out)
    return out


def load_policies(map_name: str, policy_dir: Path = POLICY_DIR) -> dict:
    path = policy_dir / f"smax-{map_name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"no behaviour policies for {map_name} at {path}; train them with "
                                f"`python -m common.smax_collect train --map {map_name}`, then `select`")
    return torch.load(path, weights_only=False)


def build_actor(bundle: dict, quality: str, obs_dim: int, act_dim: int) -> Actor:
    if quality not in bundle["policies"]:
        raise ValueError(f"unknown quality {quality!r}; valid: {', '.join(bundle['policies'])}")
    actor = Actor(obs_dim, act_dim, bundle["hidden"])
    actor.load_state_dict({k: v.float() for k, v in bundle["policies"][quality]["actor"].items()})
    return actor.eval()


@torch.no_grad()
def rollout_episodes(actor: Actor, map_name: str, episodes: int, seed: int, num_envs: int = 100
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`episodes` whole episodes of `actor` (actions sampled) in the native dataset layout, and whether each was won.
    Env e contributes its first ceil(episodes / num_envs) episodes, and episodes are kept in the order (index within
    the env, env), so which episodes are kept does not depend on their lengths."""
    from common.smax import BatchedSMAX

    num_envs = min(num_envs, episodes)
    per_env = math.ceil(episodes / num_envs)
    envs = BatchedSMAX(map_name, num_envs, seed=seed)
    obs, state = envs.reset()
    n = envs.n_agents
    generator = torch.Generator().manual_seed(seed)
    steps = []  # per step: the collecting envs and their transitions
    done_count = np.zeros(num_envs, int)
    won = [[] for _ in range(num_envs)]
    progress = tqdm(total=num_envs * per_env, desc=f"{map_name} episodes", mininterval=2.0)
    while (done_count < per_env).any():
        avail = envs.avail_actions()
        actions = sample_actions(actor(torch.tensor(obs), torch.tensor(avail)), generator).numpy()
        next_obs, next_state, reward, terminated, truncated = envs.step(actions)
        collecting = np.flatnonzero(done_count < per_env)
        steps.append(dict(env=collecting, episode=done_count[collecting], observations=obs[collecting, :, :-n],
                          states=state[collecting], actions=actions[collecting], avail_actions=avail[collecting],
                          rewards=reward[collecting], next_observations=envs.final_obs[collecting, :, :-n],
                          next_states=envs.final_state[collecting], next_avail_actions=envs.final_avail[collecting],
                          terminals=terminated[collecting], timeouts=truncated[collecting]))
        ends = np.flatnonzero(terminated | truncated)
        for e in ends:
            if done_count[e] < per_env:
                won[e].append(bool(envs.won[e]))
        progress.update(int((done_count[ends] < per_env).sum()))
        done_count[ends] += 1
        obs, state = next_obs, next_state
    progress.close()
    arrays = {key: np.concatenate([step[key] for step in steps]) for key in steps[0]}
    # Episode (k, e): env e's k-th. A stable sort by k * num_envs + e keeps each episode's steps in order and puts the
    # episodes round-robin; the first `episodes` of them are kept.
    episode_key = arrays["episode"] * num_envs + arrays["env"]
    order = np.argsort(episode_key, kind="stable")
    kept_keys = np.unique(episode_key)[:episodes]
    order = order[episode_key[order] <= kept_keys[-1]]
    episode_wins = np.array([won[key % num_envs][key // num_envs] for key in kept_keys])
    return {key: value[order] for key, value in arrays.items() if key not in ("env", "episode")}, episode_wins


def generate_dataset(map_name: str, quality: str, data_dir: str | Path = "data", episodes: int = EPISODES,
                     seed: int = 0, policy_dir: Path = POLICY_DIR) -> Path:
    """Generate a native dataset of SMAX episodes from the committed behaviour policies; deterministic given the
    policies and the seed."""
    from common.smax import REWARD_SCALE, SMAXEnv

    probe = SMAXEnv(map_name)
    bundle = load_policies(map_name, policy_dir)
    actor = build_actor(bundle, quality, probe.obs_dim, probe.act_dim)
    record = bundle["policies"][quality]
    arrays, wins = rollout_episodes(actor, map_name, episodes, seed)
    local_dim = probe.obs_dim - probe.n_agents
    attrs = dict(env=map_name, agent_conf=f"{probe.n_agents}a", obs_mode="local", quality=quality, discrete=True,
                 n_agents=probe.n_agents, obs_dims=[local_dim] * probe.n_agents, act_dims=[probe.act_dim] * probe.n_agents,
                 state_dim=probe.state_dim, win_rate=float(wins.mean()), seed=seed, reward_scale=REWARD_SCALE,
                 source=f"common.smax_collect, MAPPO checkpoint at step {record['step']} (return "
                        f"{record['return_mean']:.2f}, win rate {record['win_rate']:.2f} over {EVAL_EPISODES} "
                        f"episodes), actions sampled; {episodes} episodes; seed {seed}",
                 simulator="jaxmarl SMAX (HeuristicEnemySMAX)")
    return write_dataset(dataset_path(data_dir, map_name, None, quality), arrays, attrs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.smax_collect", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train MAPPO behaviour policies (resumable)")
    tr.add_argument("--map", required=True)
    tr.add_argument("--total-steps", type=int, default=10_000_000)
    tr.add_argument("--checkpoint-every", type=int, default=250_000)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--work-dir", default=None, help="default: runs/behaviour/smax-{map}")
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--constant-lr", action="store_true", help="do not decay the learning rate linearly to 0")
    tr.add_argument("--max-grad-norm", type=float, default=0.5)
    tr.add_argument("--entropy-coef", type=float, default=0.01)
    tr.add_argument("--clip", type=float, default=0.2)
    tr.add_argument("--epochs", type=int, default=4)
    se = sub.add_parser("select", help="write behaviour_policies/smax-{map}.pt from a training run")
    se.add_argument("--map", required=True)
    se.add_argument("--work-dir", nargs="+", default=None, help="one or more training runs (default: the train default)")
    ds = sub.add_parser("dataset", help="generate a dataset from the committed behaviour policies")
    ds.add_argument("--map", required=True)
    ds.add_argument("--quality", required=True, choices=SMAX_QUALITIES)
    ds.add_argument("--episodes", type=int, default=EPISODES)
    ds.add_argument("--data-dir", default="data")
    ds.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.map, args.total_steps, work_dir_of(args.map, args.work_dir), args.checkpoint_every, args.seed,
              lr=args.lr, anneal_lr=not args.constant_lr, max_grad_norm=args.max_grad_norm, entropy_coef=args.entropy_coef,
              clip=args.clip, epochs=args.epochs)
    elif args.command == "select":
        select(args.map, [Path(d) for d in args.work_dir] if args.work_dir else [work_dir_of(args.map, None)])
    else:
        start = time.time()
        path = generate_dataset(args.map, args.quality, args.data_dir, args.episodes, args.seed)
        print(f"wrote {path} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
