"""What an OMCDA checkpoint's policy and critics look like, for finding why a run's returns fall:

    python benchmarks/omcda_diagnose.py MODEL_PT [MODEL_PT ...] [--samples 20000] [--episodes 6] [--swaps]

Loads each checkpoint (model.pt of a --save-model run; fused seeds are measured one by one) and prints one markdown
row per (checkpoint, seed, agent). On one fixed sample of the dataset (same transitions for every checkpoint):
  z_std        the spread of z_i = w̄_i (Q̄_i - V_i) / alpha_i over the sample (the update's z);
  ess          the effective sample size of the policy weights exp(clamp(z_i)) per minibatch of --batch-size,
               (sum w)^2 / sum w^2 / B, averaged over the sample's minibatches;
  lognorm      mean and std over states of log E_{a ~ pi_b,i}[exp(z_i(o_i, a)) | o_i], from --action-samples actions of
               the frozen pi_b: 0 for every state when V_i is the soft value; its spread across states is the part of
               the policy weights that reweights states instead of actions;
  kl_state     the per-state KL(pi*_i || pi_b,i) of the tilt pi_b exp(z), from the same actions (self-normalised);
  kl_pi        KL(pi_i || pi_b,i) of the extracted Gaussians on the sample's states, and on the states the
               deterministic policy visits (kl_pi_visited);
  log_std      the mean pre-tanh log-std of pi_i and of pi_b,i on the sample's states;
  z_pi, z_b    mean z_i of pi_i's and pi_b,i's deterministic action at the sample's states, against z_data, the mean z_i
               of the data actions (how the critic rates the action the evaluation takes);
  sat          fraction of pi_i's deterministic actions with |a| > 0.99 over the evaluation's steps.
Per (checkpoint, seed): the returns of the deterministic pi, the sampled pi, the deterministic pi_b and pi* itself (the
tilt pi_b exp(z) the critics evaluate, acted by importance resampling of pi_b's actions) and pi*'s deterministic
mean; Q_tot - Q^r_tot
and V_tot - V^r_tot on the sample; V_tot and V^r_tot at the evaluation's start states beside the discounted returns of the deterministic pi
and of pi* from them; with --swaps, the return of the team where one
agent's policy is swapped: pi_b for agent i and pi for the others, and pi for agent i and pi_b for the others.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import omcda  # noqa: E402
from common.datasets import dataset_path, load_dataset  # noqa: E402
from common.cli import with_env_defaults  # noqa: E402
from common.envs import check_env_name, make_env  # noqa: E402

SAMPLE_SEED = 0
SATURATED = 0.99


def load_agents(model: Path) -> tuple[omcda.Args, omcda.Agents, int]:
    """The checkpoint's arguments, its networks (CPU) and its update step."""
    checkpoint = torch.load(model, map_location="cpu", weights_only=False)
    names = {f.name for f in fields(omcda.Args)}
    args = omcda.Args(**{k: v for k, v in checkpoint["args"].items() if k in names})
    args = with_env_defaults(args)
    env = make_env(args.env, args.agent_conf, args.obs_mode)
    if env.discrete:
        raise SystemExit(f"{model}: {args.env} has discrete actions; this tool measures the continuous policy")
    agents = omcda.Agents(env.n_agents, env.obs_dim, env.act_dim, env.state_dim, args)
    agents.load_state_dict(checkpoint["agents"])
    return args, agents.eval(), checkpoint["step"]


def seeded(x: torch.Tensor, seeds: int) -> torch.Tensor:
    """One copy of x per fused seed along a new leading dim."""
    return x.expand(seeds, *x.shape)


@torch.no_grad()
def data_measures(agents: omcda.Agents, args: omcda.Args, batch, action_samples: int, kl_states: int,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """The sample's measures of every seed and agent [seeds, n] (see the module docstring)."""
    seeds = args.num_seeds
    obs, actions, states = seeded(batch.obs, seeds), seeded(batch.actions, seeds), seeded(batch.states, seeds)
    alpha = agents.log_alpha.exp()[..., None]
    w_target, _ = agents.mixer_target(states)
    v = agents.v(obs)

    def z_of(a: torch.Tensor) -> torch.Tensor:
        return w_target * (agents.q_target(obs, a) - v) / alpha

    z = z_of(actions)
    clipped = z.clamp(-args.z_clip, args.z_clip)
    chunks = clipped[..., : clipped.shape[-1] // batch_size * batch_size].unflatten(-1, (-1, batch_size))
    weights = torch.exp(chunks - chunks.amax(-1, keepdim=True))
    ess = (weights.sum(-1).pow(2) / weights.pow(2).sum(-1) / batch_size).mean(-1)

    mean, log_std = agents.policy(obs)
    b_mean, b_log_std = agents.behaviour(obs)
    out = {"z_std": z.std(-1), "ess": ess, "z_data": z.mean(-1), "z_pi": z_of(torch.tanh(mean)).mean(-1),
           "z_b": z_of(torch.tanh(b_mean)).mean(-1), "kl_pi": omcda.gaussian_kl(mean, log_std, b_mean, b_log_std).mean(-1),
           "log_std": log_std.mean((-2, -1)), "log_std_b": b_log_std.mean((-2, -1))}

    # log E_{pi_b}[exp z | o] and KL(pi* || pi_b | o) from actions of pi_b at the first kl_states states
    few = slice(0, kl_states)
    o, w, vv = obs[..., few, :], w_target[..., few], v[..., few]
    bm, bs = b_mean[..., few, :], b_log_std[..., few, :]
    noise = torch.randn((action_samples, *bm.shape), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    drawn = torch.tanh(bm + bs.exp() * noise)  # [K, seeds, n, S, act]
    q_drawn = torch.stack([agents.q_target(o, drawn[k]) for k in range(action_samples)])  # [K, seeds, n, S]
    z_drawn = (w * (q_drawn - vv) / alpha).clamp(-args.z_clip, args.z_clip)
    log_norm = torch.logsumexp(z_drawn, 0) - np.log(action_samples)  # [seeds, n, S]
    kl_state = omcda.in_sample_kl(z_drawn.movedim(0, -1))  # [seeds, n, S]
    out.update(lognorm_mean=log_norm.mean(-1), lognorm_std=log_norm.std(-1), kl_state=kl_state.mean(-1))

    if agents.decouple:
        w_all, b = agents.mixer(states)
        w_r, b_r = agents.mixer_reward(states)
        q_tot, q_r_tot = omcda.mix(w_all, agents.q(obs, actions), b), omcda.mix(w_r, agents.q_reward(obs, actions), b_r)
        out["q_minus_qr"] = (q_tot - q_r_tot).mean(-1)
        out["v_minus_vr"] = (omcda.mix(w_all, agents.v(obs), b) - omcda.mix(w_r, agents.v_reward(obs), b_r)).mean(-1)
    return out


class Team:
    """Deterministic (or sampled) actions of seed k's team where each agent follows pi or pi_b: `use_pi[i]`."""

    def __init__(self, agents: omcda.Agents, seed: int, use_pi: list[bool], sample: bool = False):
        self.agents, self.seed, self.sample = agents, seed, sample
        self.use_pi = torch.tensor(use_pi)[:, None, None]
        self.generator = torch.Generator().manual_seed(SAMPLE_SEED)

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, states: np.ndarray) -> np.ndarray:
        """obs [E, n, obs_dim] -> actions [E, n, act_dim]; `states` unused (TiltedTeam's mixer needs them)."""
        x = seeded(torch.as_tensor(obs, dtype=torch.float32).transpose(0, 1), self.agents.log_alpha.shape[0])
        pi_mean, pi_log_std = (t[self.seed] for t in self.agents.policy(x))
        b_mean = self.agents.behaviour(x)[0][self.seed]
        if self.sample:
            pi_mean = pi_mean + pi_log_std.exp() * torch.randn(pi_mean.shape, generator=self.generator)
        return torch.tanh(torch.where(self.use_pi, pi_mean, b_mean)).transpose(0, 1).numpy()


class TiltedTeam:
    """pi*_i ∝ pi_b,i exp(z_i) itself, the policy the critics evaluate, acted from `candidates` actions of pi_b,i per
    agent by self-normalised importance weights softmax(clamp(z_i)): one of them drawn with those probabilities, or
    with `mean` the deterministic weighted mean of the candidates (before the tanh)."""

    def __init__(self, agents: omcda.Agents, seed: int, z_clip: float, candidates: int = 32, mean: bool = False):
        self.agents, self.seed, self.z_clip, self.candidates, self.mean = agents, seed, z_clip, candidates, mean
        self.generator = torch.Generator().manual_seed(SAMPLE_SEED)

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, states: np.ndarray) -> np.ndarray:
        seeds = self.agents.log_alpha.shape[0]
        x = seeded(torch.as_tensor(obs, dtype=torch.float32).transpose(0, 1), seeds)  # [seeds, n, E, d]
        s = seeded(torch.as_tensor(states, dtype=torch.float32), seeds)
        b_mean, b_log_std = self.agents.behaviour(x)
        noise = torch.randn((self.candidates, *b_mean.shape), generator=self.generator)
        pre_tanh = b_mean + b_log_std.exp() * noise  # [K, seeds, n, E, act]
        drawn = torch.tanh(pre_tanh)
        w, _ = self.agents.mixer_target(s)
        v = self.agents.v(x)
        alpha = self.agents.log_alpha.exp()[..., None]
        z = torch.stack([w * (self.agents.q_target(x, drawn[k]) - v) / alpha for k in range(self.candidates)])
        weights = torch.softmax(z.clamp(-self.z_clip, self.z_clip)[:, self.seed].movedim(0, -1), -1)  # [n, E, K]
        if self.mean:
            actions = torch.tanh((weights[..., None] * pre_tanh[:, self.seed].movedim(0, -2)).sum(-2))  # [n, E, act]
            return actions.transpose(0, 1).numpy()
        pick = torch.multinomial(weights.reshape(-1, self.candidates), 1, generator=self.generator)
        chosen = drawn[:, self.seed].movedim(0, -2).reshape(-1, self.candidates, drawn.shape[-1])
        actions = chosen[torch.arange(chosen.shape[0]), pick[:, 0]].reshape(*weights.shape[:2], -1)  # [n, E, act]
        return actions.transpose(0, 1).numpy()


def rollout(env, act, starts: list[int], gamma: float = 0.99
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Episodes from reset(start) in lockstep: returns [E], visited observations [T, n, obs_dim] and states
    [T, state_dim] of the running copies, the actions taken [T, n, act_dim] and the discounted returns [E]."""
    envs = [env] + env.copies(len(starts) - 1)
    first = [e.reset(seed=s) for e, s in zip(envs, starts)]
    obs = np.stack([o for o, _ in first])
    returns, discounted, running = np.zeros(len(starts)), np.zeros(len(starts)), np.ones(len(starts), bool)
    discount = 1.0
    visited, visited_states, taken = [], [], []
    states = np.stack([s for _, s in first])
    while running.any():
        actions = act(obs, states)
        visited.append(obs[running]), visited_states.append(states[running]), taken.append(actions[running])
        for k in np.flatnonzero(running):
            obs[k], states[k], reward, terminated, truncated = envs[k].step(actions[k])
            returns[k] += reward
            discounted[k] += discount * reward
            running[k] = not (terminated or truncated)
        discount *= gamma
    return returns, np.concatenate(visited), np.concatenate(visited_states), np.concatenate(taken), discounted


@torch.no_grad()
def start_values(agents: omcda.Agents, env, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """V_tot and V^r_tot [seeds] averaged over the start states of `starts`."""
    first = [env.reset(seed=s) for s in starts]
    seeds = agents.log_alpha.shape[0]
    obs = seeded(torch.as_tensor(np.stack([o for o, _ in first]), dtype=torch.float32).transpose(0, 1), seeds)
    states = seeded(torch.as_tensor(np.stack([s for _, s in first]), dtype=torch.float32), seeds)
    w, b = agents.mixer(states)
    w_r, b_r = agents.mixer_reward(states)
    return omcda.mix(w, agents.v(obs), b).mean(-1), omcda.mix(w_r, agents.v_reward(obs), b_r).mean(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=20_000, help="transitions of the fixed data sample")
    parser.add_argument("--kl-states", type=int, default=2_000, help="states of the sample for lognorm and kl_state")
    parser.add_argument("--action-samples", type=int, default=32, help="pi_b actions per state for lognorm, kl_state")
    parser.add_argument("--batch-size", type=int, default=128, help="minibatch size of the ess measure")
    parser.add_argument("--episodes", type=int, default=6, help="episodes per policy and seed")
    parser.add_argument("--swaps", action="store_true", help="also the returns of one agent's policy swapped")
    parser.add_argument("--data-dir", type=Path)
    options = parser.parse_args(argv)

    team_rows = ["| checkpoint | step | seed | pi | pi sampled | pi_b | pi* | pi* mean | Q_tot - Q^r_tot / V_tot - V^r_tot (data) | V_tot / V^r_tot / discounted return of pi, pi* (start) "
                 "| swaps: pi_b for agent i / pi for agent i |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    agent_rows = ["| step | seed | agent | alpha | z_std | ess | lognorm mean ± std | kl_state | kl_pi | kl_pi_visited | "
                  "log_std pi / pi_b | z_data / z_pi / z_b | sat |", "| ---: | ---: | ---: |" + " ---: |" * 10]
    dataset = None
    for model in options.models:
        args, agents, step = load_agents(model)
        if dataset is None:
            agent_conf = args.agent_conf or check_env_name(args.env).default_agent_conf
            path = dataset_path(options.data_dir or args.data_dir, args.env, agent_conf, args.dataset)
            dataset = load_dataset(path, "cpu", args.obs_mode)
            idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SAMPLE_SEED))[: options.samples]
            batch = dataset.gather(idx)
        env = make_env(args.env, args.agent_conf, args.obs_mode)
        measures = data_measures(agents, args, batch, options.action_samples, options.kl_states, options.batch_size)
        n = env.n_agents
        for k in range(args.num_seeds):
            seed = args.seed + k
            starts = [1_000_000 * (seed + 1) + e for e in range(options.episodes)]
            returns = {}
            returns["pi"], visited, _, taken, discounted = rollout(env, Team(agents, k, [True] * n), starts, args.gamma)
            returns["pi sampled"] = rollout(env, Team(agents, k, [True] * n, sample=True), starts)[0]
            returns["pi_b"] = rollout(env, Team(agents, k, [False] * n), starts)[0]
            returns["pi*"], _, _, _, tilted_discounted = rollout(env, TiltedTeam(agents, k, args.z_clip), starts, args.gamma)
            returns["pi* mean"] = rollout(env, TiltedTeam(agents, k, args.z_clip, mean=True), starts)[0]
            swaps = ""
            if options.swaps:
                swaps = " ; ".join(
                    f"{rollout(env, Team(agents, k, [j != i for j in range(n)]), starts)[0].mean():.0f} / "
                    f"{rollout(env, Team(agents, k, [j == i for j in range(n)]), starts)[0].mean():.0f}" for i in range(n))
            with torch.no_grad():
                x = seeded(torch.as_tensor(visited, dtype=torch.float32).transpose(0, 1), args.num_seeds)
                kl_visited = omcda.gaussian_kl(*agents.policy(x), *agents.behaviour(x))[k].mean(-1)
            saturated = (np.abs(taken) > SATURATED).mean((0, 2))
            v_start, v_r_start = (x[k].item() for x in start_values(agents, env, starts)) if agents.decouple else (
                float("nan"), float("nan"))
            q_gap = measures["q_minus_qr"][k].item() if agents.decouple else float("nan")
            v_gap = measures["v_minus_vr"][k].item() if agents.decouple else float("nan")
            team_rows.append(f"| {model.parent.name}/{model.name} | {step} | {seed} | "
                             + " | ".join(f"{r.mean():.1f}" for r in returns.values())
                             + f" | {q_gap:.1f} / {v_gap:.1f} | {v_start:.1f} / {v_r_start:.1f} / {discounted.mean():.1f} / {tilted_discounted.mean():.1f} | {swaps} |")
            alpha = agents.log_alpha.exp()[k]
            for i in range(n):
                m = {name: value[k, i].item() for name, value in measures.items() if value.ndim == 2}
                agent_rows.append(
                    f"| {step} | {seed} | {i} | {alpha[i]:.3g} | {m['z_std']:.2f} | {m['ess']:.3f} | "
                    f"{m['lognorm_mean']:.2f} ± {m['lognorm_std']:.2f} | {m['kl_state']:.3f} | {m['kl_pi']:.3f} | "
                    f"{kl_visited[i]:.3f} | {m['log_std']:.2f} / {m['log_std_b']:.2f} | "
                    f"{m['z_data']:.2f} / {m['z_pi']:.2f} / {m['z_b']:.2f} | {saturated[i]:.3f} |")
        print(f"done {model}", file=sys.stderr, flush=True)
    print("\n".join(team_rows), "\n", "\n".join(agent_rows), sep="\n")


if __name__ == "__main__":
    main()
