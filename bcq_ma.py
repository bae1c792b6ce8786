"""BCQ-MA: batch-constrained deep Q-learning per agent (BCQ: Fujimoto, Meger and Precup, ICML 2019, "Off-Policy Deep
Reinforcement Learning without Exploration"), the BCQ-MA baseline of Table 1 of OMCDA's short paper, with the
offline decentralized framework of Jiang and Lu ("Offline Decentralized Multi-Agent Reinforcement Learning": value
deviation lambda_vd, transition normalization lambda_tn, MABCQ, its Algorithm 1) as two flags.

Independent learners [ours]: every agent i learns from its own (o_i, a_i, r, o'_i, done) alone, with the team reward
r; there is no mixer and no critic on the global state, with or without the flags. OMCDA's short paper only names
BCQ-MA; OMAR (Pan et al., ICML 2022), whose MuJoCo baselines OMCDA's short paper follows, builds its multi-agent
baselines on decentralized critics, and Jiang and Lu's framework requires them (each agent sees only its own data).
Agent inputs follow --obs-mode as in omiga.py ("state", the default, as Jiang and Lu's MuJoCo agents also get the
robot's state; or "local"); one dataset serves all agents, each reading its own slice (Jiang and Lu collect one per
agent). Jiang and Lu's fully decentralized learners, which share no weights, are --per-agent-networks.
Per agent, all agents batched in one matmul:

    G_i = {E_i(mu, sigma | o_i, a_i), D_i(a_i | o_i, z)}       conditional VAE, the behaviour model (BCQ Sec. 4)
    xi_i(o_i, a_i; Phi) = Phi tanh(f_i(o_i, a_i)) in [-Phi, Phi],  acting a_i + xi_i clipped to [-1, 1]  (BCQ Sec. 4)
    Q_i^1, Q_i^2 twin critics; targets (hat) of Q and xi are Polyak copies (rate tau); G_i has no target.

BCQ's losses (BCQ Sec. 4 and Algorithm 1, cited by section; Jiang and Lu's by their equation numbers):
    L_G  = E_D[ |D_i(o_i, z) - a_i|^2 ] + beta KL(N(mu, sigma) || N(0, I)),   z = mu + sigma eps   (BCQ Sec. 4, App.)
    candidates a^j = hat-xi_i(o', a~^j) + a~^j,  a~^j = D_i(o', z^j),  z^j ~ clip(N(0, I), -c, c),  j = 1..n
    V*_i(o') = max_j [ lam min_k hat-Q_i^k(o', a^j) + (1 - lam) max_k hat-Q_i^k(o', a^j) ]  (soft clipped double Q)
    y_i  = r + gamma (1 - done) V*_i(o')                                                      (BCQ Sec. 4)
    L_Q  = E_D[ w_i sum_k (Q_i^k(o_i, a_i) - y_i)^2 ]                          (BCQ: w = 1; Jiang and Lu: their Eq. 1)
    L_xi = -E_D[ w_i Q_i^1(o_i, a~ + xi_i(o_i, a~)) ],  a~ = D_i(o_i, z), z ~ clip(N(0, I), -c, c) (Jiang and Lu, Eq. 2)
    pi_i(o_i) = argmax over the n candidates a^j (made with xi_i, not its target) of Q_i^1(o_i, a^j)   (BCQ Sec. 4)

Jiang and Lu's weights w_i = lambda_vd_i lambda_tn_i (each 1 when its flag is off), detached, Sec. 3.3 and 3.4:
    --value-deviation:          lambda_vd_i = clip(1 + (V*_i(o') - E V*_i) / |E V*_i|, 1 - eps, 1 + eps)   (Sec. 3.1)
        V*_i(o') = (1 - done) times the BCQ target value above (the same candidates and soft clipped twin targets),
        E V*_i = E_{s'~P_B(.|s, a_i)} V*_i(s') estimated from the sample, without visiting the other next states, by
        inverting the Bellman equation on the target critic: E V*_i = (hat-Q_i(o_i, a_i) - r) / gamma        (Sec. 3.4)
        with hat-Q_i the soft clipped combination of the twin targets at the dataset action [ours], and eps the
        optimism level (Jiang and Lu: 0.80 HalfCheetah, 0.48 Walker, 0.80 Hopper, 0.64 Ant, 0.99 SMAC, 0.9 MPE).
    --transition-normalization: lambda_tn_i = 1 / P_B(s' | s, a_i) ~ rho_N(0,I)(mu^1) / rho_N(0,I)(mu^2)
                                            = exp((|mu^2|^2 - |mu^1|^2) / 2)                           (Sec. 3.2, 3.4)
        with mu^1 = E^1_i's mean at (o_i, a_i) (G_i above is Jiang and Lu's G^1) and mu^2 the mean of a second VAE
        G^2_i = {E^2_i(mu^2, sigma^2 | o_i, a_i, o'_i), D^2_i(a_i | o_i, o'_i, z^2)} trained with L_G on (o_i, o'_i).
    The modified transition probability the weights stand for (Sec. 3.3), z_i a normaliser over next states:
        hat-P_B(s' | s, a_i) = P_B(s' | s, a_i) lambda_tn_i lambda_vd_i / z_i,  z_i = sum_s' P_B lambda_tn_i lambda_vd_i
    z_i does not depend on s' and only rescales p_B(s, a_i), so it leaves y_i's expectation unchanged and is not in
    L_Q or L_xi (Sec. 3.3); `reweighted_transitions` computes hat-P_B for a tabular P_B (Jiang and Lu's Tables 1-4).
    Jiang and Lu's ablation rows are the four flag settings: BCQ (neither flag), BCQ w/ lambda_vd (--value-deviation),
    BCQ w/ lambda_tn (--transition-normalization), MABCQ (both).
    Logged as values/value_spread: Jiang and Lu's Table 6 measure, mean_s [max_i V*_i(s) - min_i V*_i(s)], on the
    batch's next observations (the target's V*_i); benchmarks/bcq_ma_values.py measures it on a fixed sample.

Discrete actions (SMAX maps): discrete BCQ (Fujimoto, Conti, Ghavamzadeh and Pineau, 2019, "Benchmarking Batch Deep
Reinforcement Learning Algorithms", cited by name). The behaviour model G_i is a categorical classifier over the
available actions (the shared CategoricalPolicy), fitted by maximum likelihood; the actions it deems likely enough
replace the n perturbed VAE samples:
    L_G  = -E_D[ log G_i(a_i | o_i) ]
    C_i(o) = { a available at o : G_i(a | o) / max_a~ G_i(a~ | o) > threshold }              (threshold 0.3, BCQ's)
    V*_i(o') = max_{a in C_i(o')} [ lam min_k hat-Q_i^k(o', a) + (1 - lam) max_k hat-Q_i^k(o', a) ]
    y_i, L_Q as above;   pi_i(o_i) = argmax_{a in C_i(o_i)} Q_i^1(o_i, a);   no perturbation network (no xi, no L_xi)
[ours] the twin critics and their soft clipped target stay (discrete BCQ: one Q, a double-DQN target), so only the
candidate set differs between action types; lambda_vd is unchanged; for lambda_tn, G^1 and G^2 are conditional VAEs as
above on the one-hot actions (trained beside the classifier, which stays the behaviour model).

Choices the papers leave open (BCQ's published code unless marked otherwise):
- Phi 0.05, lam 0.75, n 10 candidates for the target and for acting (the code acts with 100), latent dim 2 x act_dim,
  beta 0.5 (KL_loss averaged over latent dims and the batch, as the code does), latent samples clipped to
  [-0.5, 0.5], encoder log-std clamped to [-4, 15], decoder output tanh; Adam lr 1e-3 for Q, xi and G; gamma 0.99,
  tau 0.005; the VAE trained alongside the critic every update; no gradient clipping. L_Q sums the twin critics'
  squared errors (mean over the batch), as the code does. Jiang and Lu train with lr 1e-3 for Q, 1e-4 for xi and G,
  latent dim 10, (64, 64) units and batch 1024 on MuJoCo (their Table 12): pass those to reproduce their setting.
- Ours: hidden layers of 256 units for Q and xi (BCQ: 400 and 300; batched_mlp has equal widths), 750 for the VAEs
  (BCQ). Losses are means over the batch summed over agents.
- Ours: Jiang and Lu's Algorithm 1 fits G^1 and G^2 before the Q-learning loop; here they are trained alongside it, as
  BCQ does, and lambda_tn uses the means of this update's VAE forward pass (before its step). Eq. 2 writes xi's input
  as the dataset action; xi is trained on VAE samples as BCQ does (they are what it perturbs when acting), each
  weighted by its transition's w_i.
- Ours: |E V*_i| is floored at 1e-6 (the value deviation is undefined at E V* = 0, e.g. at initialisation; the clip
  then bounds it); lambda_tn is clipped to [1 / tn_max, tn_max] with tn_max 10 only to guard the exp (Jiang and Lu
  report [0.2, 1.4] for almost all samples and states no clip). Dividing by |E V*| keeps a higher V*(s') weighted
  more for either sign of E V*; with E V* > 0 (positive rewards, as Jiang and Lu's Theorem 1 assumes; Hopper's while it
  stands) both weights together give hat-P_B proportional to V*, the form of that theorem's proof.
- Acting samples latents from the global torch generator (BCQ's policy is an argmax over sampled candidates).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from common.cli import NON_NEGATIVE, POSITIVE, Rule, at_least, check_args, exit_on_user_error, interval, parse_args
from common.datasets import Batch
from common.run import Run, load_env_and_dataset, prepare_device


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "offline-marl"
    """the wandb project name"""
    env: Literal["Hopper", "Ant", "HalfCheetah", "5m_vs_6m", "6h_vs_8z", "3m"] = "Hopper"
    """the task: a Multi-Agent MuJoCo env (Hopper, Ant, HalfCheetah) or a SMAX map (5m_vs_6m, 6h_vs_8z, the tiny 3m;
    needs `pip install -r requirements-smax.txt`)"""
    agent_conf: str | None = None
    """MuJoCo agent partition (default per env: Hopper 3x1, Ant 2x4, HalfCheetah 6x1)"""
    obs_mode: Literal["state", "local", "omiga"] | None = None
    """agent inputs: state (global state + id, the papers' MuJoCo setting), local (local observation + id, the only
    mode on SMAX), omiga; default: state on MuJoCo, local on SMAX"""
    dataset: Literal["expert", "medium", "medium-replay", "medium-expert", "good", "poor"] = "medium-replay"
    """dataset quality: MuJoCo expert, medium, medium-replay, medium-expert; SMAX good, medium, poor"""
    data_dir: str = "data"
    """folder of the dataset files"""
    no_generate: bool = False
    """if toggled, a missing dataset is an error instead of being generated from the committed behaviour policies"""
    total_steps: int = 1_000_000
    """number of gradient updates"""
    batch_size: int = 128
    """minibatch size"""
    eval_every: int = 5000
    """evaluate every this many updates"""
    eval_episodes: int = 10
    """episodes per evaluation during training"""
    final_eval_episodes: int = 32
    """episodes of the final evaluation"""
    log_every: int = 1000
    """log losses every this many updates"""
    save_model: bool = False
    """if toggled, save everything `--resume` needs (networks, optimizers, step, RNG states, evaluations) to `model.pt`
    in the run directory at every evaluation and at the end"""
    resume: str | None = None
    """continue the run in this run directory from its `model.pt`; arguments not given default to the checkpoint's,
    and only run-level ones (--total-steps, --eval-every, logging, --data-dir, ...) may differ from it"""
    per_agent_networks: bool = False
    """if toggled, every agent has its own network weights (default: one network of each kind shared by all agents,
    told apart by the one-hot id in their inputs, as in the official OMIGA code)"""
    tf32: bool = True
    """if toggled, float32 matmuls on a GPU run on TensorFloat-32 tensor cores (`--no-tf32`: full float32)"""

    # Algorithm specific arguments
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network update rate (critics and perturbation network)"""
    phi: float = 0.05
    """largest perturbation Phi: xi_i(o_i, a_i) is in [-phi, phi] per action dimension (BCQ: 0.05)"""
    soft_clip: float = 0.75
    """lambda of the soft clipped double-Q target: lambda min + (1 - lambda) max of the twin targets (BCQ: 0.75)"""
    candidates: int = 10
    """n: actions sampled from the VAE and perturbed, for the target's max and for acting (BCQ: 10)"""
    latent_scale: int = 2
    """latent dimension of the VAEs = latent_scale x act_dim (BCQ: 2)"""
    latent_clip: float = 0.5
    """latents sampled from the prior are clipped to [-latent_clip, latent_clip] (BCQ: 0.5)"""
    kl_weight: float = 0.5
    """weight of the KL term in the VAE loss (BCQ: 0.5)"""
    q_lr: float = 1e-3
    """learning rate of the twin critics (BCQ: 1e-3; Jiang and Lu: 1e-3)"""
    perturbation_lr: float = 1e-3
    """learning rate of the perturbation networks (BCQ: 1e-3; Jiang and Lu: 1e-4)"""
    vae_lr: float = 1e-3
    """learning rate of the VAEs (BCQ: 1e-3; Jiang and Lu: 1e-4)"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of Q and xi"""
    vae_hidden_dim: int = 750
    """hidden units of the two hidden layers of the VAEs' encoders and decoders (BCQ: 750)"""
    value_deviation: bool = False
    """if toggled, weight the TD and perturbation objectives by Jiang and Lu's value deviation lambda_vd (optimism)"""
    transition_normalization: bool = False
    """if toggled, weight them by Jiang and Lu's transition normalization lambda_tn (trains a second VAE on
    (o, a, o'))"""
    optimism: float = 0.8
    """optimism level epsilon: lambda_vd is clipped to [1 - epsilon, 1 + epsilon] (Jiang and Lu, Hopper: 0.8)"""
    tn_max: float = 10.0
    """lambda_tn is clipped to [1 / tn_max, tn_max] (ours: only guards the exp; Jiang and Lu saw [0.2, 1.4])"""
    threshold: float = 0.3
    """discrete actions: an action is a candidate when G(a | o) / max G(. | o) exceeds this (discrete BCQ: 0.3)"""


def argument_ranges(args: Args) -> dict[str, Rule]:
    """The valid range of each numeric argument of this script that common.cli's common rules do not cover."""
    return {
        "phi": NON_NEGATIVE, "soft_clip": interval(0, 1), "candidates": at_least(1), "latent_scale": at_least(1),
        "latent_clip": POSITIVE, "kl_weight": NON_NEGATIVE, "optimism": interval(0, 1),
        "tn_max": (lambda value: 1 <= value < math.inf, ">= 1 and finite"), "threshold": interval(0, 1),
    }


# TRY NOT TO MODIFY: agent networks (shared or per agent, all agents in one matmul) and the mixer
class BatchedLinear(nn.Module):
    """A linear layer with G weight sets in one matmul: x [..., in] whose rows split into G consecutive equal groups,
    each using one weight set. On agent inputs [seeds, n_agents, B, in], G = seeds shares the layer between a seed's
    agents, told apart by the one-hot id in their inputs (the official OMIGA code's networks), and G = seeds *
    n_agents gives every agent its own; a mixer on states [seeds, B, state_dim] has G = seeds."""

    def __init__(self, weight_sets: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per weight set
        self.weight = nn.Parameter(torch.empty(weight_sets, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(weight_sets, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(self.weight.shape[0], -1, x.shape[-1])
        return torch.baddbmm(self.bias, grouped, self.weight).reshape(*x.shape[:-1], -1)


def count_weight_sets(n_agents: int, per_agent_networks: bool, seeds: int = 1) -> int:
    """How many weight sets each agent network has: per seed, 1 (shared by the agents) or one per agent."""
    return seeds * (n_agents if per_agent_networks else 1)


def batched_mlp(weight_sets: int, in_dim: int, out_dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        BatchedLinear(weight_sets, in_dim, hidden_dim), nn.ReLU(),
        BatchedLinear(weight_sets, hidden_dim, hidden_dim), nn.ReLU(),
        BatchedLinear(weight_sets, hidden_dim, out_dim),
    )


class AgentValue(nn.Module):
    """V_i(o_i) for every agent: obs [..., n, B, obs_dim] -> [..., n, B]."""

    def __init__(self, weight_sets: int, obs_dim: int, hidden_dim: int):
        super().__init__()
        self.net = batched_mlp(weight_sets, obs_dim, 1, hidden_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class AgentQ(nn.Module):
    """Q_i(o_i, a_i) for every agent: obs [..., n, B, obs_dim], actions [..., n, B, act_dim] -> [..., n, B]."""

    def __init__(self, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = batched_mlp(weight_sets, obs_dim + act_dim, 1, hidden_dim)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], -1)).squeeze(-1)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log-density of actions in (-1, 1) under tanh(N(mean, exp(log_std)^2)), summed over action dims: [..., n, B]."""
    actions = actions.clamp(-1.0 + 1e-6, 1.0 - 1e-6)
    # Written out rather than torch.distributions.Normal, whose argument validation syncs with the GPU.
    standardised = (torch.atanh(actions) - mean) * torch.exp(-log_std)
    gaussian = -0.5 * standardised.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    return (gaussian - torch.log1p(-actions.pow(2))).sum(-1)


class AgentPolicy(nn.Module):
    """Tanh-Gaussian pi_i(a_i | o_i) with state-dependent log-std, all agents batched."""

    def __init__(self, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = batched_mlp(weight_sets, obs_dim, 2 * act_dim, hidden_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, -1)
        return mean, log_std.clamp(-5.0, 2.0)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, avail: None = None) -> torch.Tensor:
        """log pi_i(a_i | o_i) of actions in (-1, 1): [..., n, B] (continuous actions have no masks: avail is None)."""
        return tanh_gaussian_log_prob(*self(obs), actions)

    def act(self, obs: torch.Tensor, avail: None = None) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


class CategoricalPolicy(nn.Module):
    """pi_i(a_i | o_i) over discrete actions (SMAX), all agents batched: the actions unavailable at o_i (avail false)
    get probability 0. Actions are one-hot rows [..., n, B, A], the form the critics take them in."""

    def __init__(self, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = batched_mlp(weight_sets, obs_dim, act_dim, hidden_dim)

    def log_probs(self, obs: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        """log pi_i(. | o_i) [..., n, B, A]; an unavailable action's is the float32 minimum, finite, so that 0 times
        it is 0."""
        return torch.log_softmax(self.net(obs).masked_fill(~avail, torch.finfo(torch.float32).min), -1)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        """log pi_i(a_i | o_i) of one-hot actions: [..., n, B]."""
        return (self.log_probs(obs, avail) * actions).sum(-1)

    def act(self, obs: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        """The most probable available action, one-hot."""
        log_probs = self.log_probs(obs, avail)
        return nn.functional.one_hot(log_probs.argmax(-1), log_probs.shape[-1]).to(log_probs.dtype)


def make_policy(discrete: bool, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int) -> nn.Module:
    """The policy class of the env's action type: categorical over discrete actions, else tanh-Gaussian."""
    return (CategoricalPolicy if discrete else AgentPolicy)(weight_sets, obs_dim, act_dim, hidden_dim)


class Mixer(nn.Module):
    """Hypernetwork on the global state: w(s) = |f(s)| >= 0 per agent and a free bias b(s); one per seed."""

    def __init__(self, state_dim: int, n_agents: int, hidden_dim: int, seeds: int = 1):
        super().__init__()
        self.hyper_w = nn.Sequential(BatchedLinear(seeds, state_dim, hidden_dim), nn.ReLU(),
                                     BatchedLinear(seeds, hidden_dim, n_agents))
        self.hyper_b = nn.Sequential(BatchedLinear(seeds, state_dim, hidden_dim), nn.ReLU(),
                                     BatchedLinear(seeds, hidden_dim, 1))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [..., B, state_dim] -> w [..., n, B], b [..., B]."""
        return self.hyper_w(states).abs().transpose(-1, -2), self.hyper_b(states).squeeze(-1)


def mix(w: torch.Tensor, values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i w_i values_i + b: w, values [..., n, B], b [..., B] -> [..., B]   (Eq. 8)."""
    return (w * values).sum(-2) + b


# ALGO LOGIC: networks, losses and the update
class BatchedVAE(nn.Module):
    """Conditional VAE per agent, all agents batched: E(mu, sigma | c, a) and D(a | c, z), with the condition c = o_i
    (G^1, the behaviour model) or c = [o_i, o'_i] (Jiang and Lu's G^2)."""

    def __init__(self, weight_sets: int, cond_dim: int, act_dim: int, latent_dim: int, hidden_dim: int,
                 latent_clip: float):
        super().__init__()
        self.encoder = batched_mlp(weight_sets, cond_dim + act_dim, 2 * latent_dim, hidden_dim)
        self.decoder = batched_mlp(weight_sets, cond_dim + latent_dim, act_dim, hidden_dim)
        self.latent_dim, self.latent_clip = latent_dim, latent_clip

    def encode(self, cond: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and log-std [n, B, latent_dim] of E(. | c, a); log-std clamped to [-4, 15] as in BCQ's code."""
        mean, log_std = self.encoder(torch.cat([cond, actions], -1)).chunk(2, -1)
        return mean, log_std.clamp(-4.0, 15.0)

    def decode(self, cond: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """D(c, z) in [-1, 1]; without z, z ~ N(0, I) clipped to [-latent_clip, latent_clip] (BCQ's sampling)."""
        if latent is None:
            latent = torch.randn(*cond.shape[:-1], self.latent_dim, device=cond.device)
            latent = latent.clamp(-self.latent_clip, self.latent_clip)
        return torch.tanh(self.decoder(torch.cat([cond, latent], -1)))

    def forward(self, cond: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction D(c, mu + sigma eps), mean and log-std."""
        mean, log_std = self.encode(cond, actions)
        return self.decode(cond, mean + log_std.exp() * torch.randn_like(mean)), mean, log_std


class Perturbation(nn.Module):
    """xi_i(o_i, a_i; Phi) = Phi tanh(f_i(o_i, a_i)); forward returns the perturbed action clip(a + xi, -1, 1)."""

    def __init__(self, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int, phi: float):
        super().__init__()
        self.net = batched_mlp(weight_sets, obs_dim + act_dim, act_dim, hidden_dim)
        self.phi = phi

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        xi = self.phi * torch.tanh(self.net(torch.cat([obs, actions], -1)))
        return (actions + xi).clamp(-1.0, 1.0)


class TwinQ(nn.Module):
    """Q_i^1 and Q_i^2 for every agent: obs [n, B, obs_dim], actions [n, B, act_dim] -> two [n, B]."""

    def __init__(self, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.q1 = AgentQ(weight_sets, obs_dim, act_dim, hidden_dim)
        self.q2 = AgentQ(weight_sets, obs_dim, act_dim, hidden_dim)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(obs, actions), self.q2(obs, actions)


def soft_clipped_q(q1: torch.Tensor, q2: torch.Tensor, soft_clip: float) -> torch.Tensor:
    """BCQ's soft clipped double Q: lambda min(q1, q2) + (1 - lambda) max(q1, q2)."""
    return soft_clip * torch.minimum(q1, q2) + (1.0 - soft_clip) * torch.maximum(q1, q2)


def sample_candidates(vae: BatchedVAE, perturbation: Perturbation, obs: torch.Tensor,
                      candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n perturbed VAE samples per observation: obs [n, B, d] -> repeated obs and actions [n, B * candidates, .],
    the candidates of one observation contiguous."""
    repeated = obs.repeat_interleave(candidates, 1)
    return repeated, perturbation(repeated, vae.decode(repeated))


def candidate_value(critic: TwinQ, perturbation: Perturbation, vae: BatchedVAE, obs: torch.Tensor, candidates: int,
                    soft_clip: float) -> torch.Tensor:
    """V*_i(o) = max over the candidates of the soft clipped twin Q: [n, B] (BCQ's target value)."""
    repeated, actions = sample_candidates(vae, perturbation, obs, candidates)
    values = soft_clipped_q(*critic(repeated, actions), soft_clip)
    return values.unflatten(1, (obs.shape[1], candidates)).max(-1).values


class BCQPolicy(nn.Module):
    """pi_i(o_i): the candidate with the highest Q_i^1 (BCQ Sec. 4), all agents batched. Holds the VAE, the
    perturbation network and the critics (shared with Agents), so checkpoints and act() see one policy."""

    def __init__(self, vae: BatchedVAE, perturbation: Perturbation, critic: TwinQ, candidates: int):
        super().__init__()
        self.vae, self.perturbation, self.critic, self.candidates = vae, perturbation, critic, candidates

    def act(self, obs: torch.Tensor, avail: None = None) -> torch.Tensor:
        """obs [n, B, obs_dim] -> actions [n, B, act_dim] (continuous actions: no masks)."""
        repeated, actions = sample_candidates(self.vae, self.perturbation, obs, self.candidates)
        values = self.critic.q1(repeated, actions).unflatten(1, (obs.shape[1], self.candidates))
        best = values.argmax(-1)  # [n, B]
        actions = actions.unflatten(1, (obs.shape[1], self.candidates))
        return actions.gather(2, best[..., None, None].expand(-1, -1, 1, actions.shape[-1])).squeeze(2)


def q_of_every_action(q_net: AgentQ, obs: torch.Tensor, act_dim: int) -> torch.Tensor:
    """Q_i(o_i, a) of every discrete action a (one-hot) in one critic pass: obs [..., n, B, obs_dim] -> [..., n, B, A].
    A one-hot a picks row obs_dim + a of the first layer's weight, so that layer's observation term is computed once
    per observation and each action adds its row (the critic on [o, one-hot a], with the first matmul A times
    smaller)."""
    first, *rest = q_net.net
    weight_sets, obs_dim = first.weight.shape[0], obs.shape[-1]
    obs_term = torch.baddbmm(first.bias, obs.reshape(weight_sets, -1, obs_dim), first.weight[:, :obs_dim])
    hidden = obs_term.unflatten(1, (-1, obs.shape[-2], 1)) + first.weight[:, None, None, obs_dim:]  # [G, ., B, A, H]
    hidden = hidden.reshape(*obs.shape[:-2], -1, hidden.shape[-1])  # rows (observation, action) in each group
    for layer in rest:
        hidden = layer(hidden)
    return hidden.reshape(*obs.shape[:-1], act_dim)


def candidate_actions(behaviour: CategoricalPolicy, obs: torch.Tensor, avail: torch.Tensor,
                      threshold: float) -> torch.Tensor:
    """Discrete BCQ's C_i(o) [n, B, A]: the actions with G_i(a | o) / max G_i(. | o) > threshold (an unavailable
    action has probability 0, so never passes)."""
    probs = behaviour.log_probs(obs, avail).exp()
    return probs / probs.max(-1, keepdim=True).values > threshold


def discrete_candidate_value(critic: TwinQ, behaviour: CategoricalPolicy, obs: torch.Tensor, avail: torch.Tensor,
                             threshold: float, soft_clip: float) -> torch.Tensor:
    """V*_i(o) = max over C_i(o) of the soft clipped twin Q: [n, B] (discrete BCQ's target value)."""
    values = soft_clipped_q(*(q_of_every_action(q, obs, avail.shape[-1]) for q in (critic.q1, critic.q2)), soft_clip)
    return values.masked_fill(~candidate_actions(behaviour, obs, avail, threshold), -torch.inf).max(-1).values


class DiscreteBCQPolicy(nn.Module):
    """pi_i(o_i) = argmax over C_i(o_i) of Q_i^1 (discrete BCQ), one-hot, all agents batched."""

    def __init__(self, behaviour: CategoricalPolicy, critic: TwinQ, threshold: float):
        super().__init__()
        self.behaviour, self.critic, self.threshold = behaviour, critic, threshold

    def act(self, obs: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        candidates = candidate_actions(self.behaviour, obs, avail, self.threshold)
        values = q_of_every_action(self.critic.q1, obs, avail.shape[-1]).masked_fill(~candidates, -torch.inf)
        return nn.functional.one_hot(values.argmax(-1), avail.shape[-1]).to(obs.dtype)


class Agents(nn.Module):
    """Every network of BCQ-MA, per agent and batched; targets are Polyak copies of the critics and xi. On discrete
    actions the behaviour model is a classifier and there is no xi; G^1 is then built only for lambda_tn."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks)
        if discrete and not 0.0 <= args.threshold < 1.0:
            raise ValueError(f"--threshold {args.threshold}: must lie in [0, 1) (at 1 or above no action is a "
                             f"candidate)")
        latent_dim = args.latent_scale * act_dim
        self.behaviour = CategoricalPolicy(nets, obs_dim, act_dim, args.hidden_dim) if discrete else None
        self.vae = (BatchedVAE(nets, obs_dim, act_dim, latent_dim, args.vae_hidden_dim, args.latent_clip)
                    if not discrete or args.transition_normalization else None)
        self.perturbation = None if discrete else Perturbation(nets, obs_dim, act_dim, args.hidden_dim, args.phi)
        self.critic = TwinQ(nets, obs_dim, act_dim, args.hidden_dim)
        self.policy = (DiscreteBCQPolicy(self.behaviour, self.critic, args.threshold) if discrete
                       else BCQPolicy(self.vae, self.perturbation, self.critic, args.candidates))
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.perturbation_target = None if discrete else copy.deepcopy(self.perturbation).requires_grad_(False)
        # Jiang and Lu's G^2 on (o, a, o'), only for transition normalization
        self.transition_vae = (BatchedVAE(nets, 2 * obs_dim, act_dim, latent_dim, args.vae_hidden_dim,
                                          args.latent_clip) if args.transition_normalization else None)


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    behaviour_models = [m for m in (agents.behaviour, agents.vae, agents.transition_vae) if m is not None]
    return {
        "vae": torch.optim.Adam([p for m in behaviour_models for p in m.parameters()], lr=args.vae_lr),
        "critic": torch.optim.Adam(agents.critic.parameters(), lr=args.q_lr),
    } | ({} if agents.perturbation is None else
         {"perturbation": torch.optim.Adam(agents.perturbation.parameters(), lr=args.perturbation_lr)})


def vae_loss(recon: torch.Tensor, actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
             kl_weight: float) -> torch.Tensor:
    """L_G per agent, summed over agents: squared reconstruction error plus kl_weight KL(N(mu, sigma) || N(0, I)),
    each averaged over the batch and its dimensions (BCQ's code)."""
    reconstruction = (recon - actions).pow(2).mean((1, 2))
    kl = -0.5 * (1.0 + 2.0 * log_std - mean.pow(2) - (2.0 * log_std).exp()).mean((1, 2))
    return (reconstruction + kl_weight * kl).sum()


VALUE_FLOOR = 1e-6  # |E V*| below this is treated as this: the value deviation divides by it


def value_deviation(next_value: torch.Tensor, expected_value: torch.Tensor, optimism: float) -> torch.Tensor:
    """lambda_vd = clip(1 + (V*(s') - E V*) / |E V*|, 1 - epsilon, 1 + epsilon) (Jiang and Lu, Sec. 3.1 and 3.4)."""
    deviation = 1.0 + (next_value - expected_value) / expected_value.abs().clamp_min(VALUE_FLOOR)
    return deviation.clamp(1.0 - optimism, 1.0 + optimism)


def value_deviation_weight(next_value: torch.Tensor, q_target: torch.Tensor, rewards: torch.Tensor,
                           dones: torch.Tensor, gamma: float, optimism: float) -> torch.Tensor:
    """lambda_vd from one sample (Jiang and Lu, Sec. 3.4): V*(s') = (1 - done) next_value and
    E_{s'} V*(s') = (Q̂(s, a) - r) / gamma, the Bellman equation of the target critic solved for the expectation.
    next_value, q_target [n, B]; rewards, dones [B]."""
    expected = (q_target - rewards) / gamma
    return value_deviation((1.0 - dones) * next_value, expected, optimism)


def transition_normalization_weight(mean: torch.Tensor, transition_mean: torch.Tensor,
                                    tn_max: float) -> torch.Tensor:
    """lambda_tn = rho_N(0,I)(mu^1) / rho_N(0,I)(mu^2) = exp((|mu^2|^2 - |mu^1|^2) / 2) (Jiang and Lu, Sec. 3.4),
    mu^1 the mean of G^1 at (o, a), mu^2 of G^2 at (o, a, o'), each [n, B, latent]; clipped to [1 / tn_max, tn_max]."""
    log_ratio = 0.5 * (transition_mean.pow(2).sum(-1) - mean.pow(2).sum(-1))
    return log_ratio.clamp(-math.log(tn_max), math.log(tn_max)).exp()


def objective_weights(lambda_vd: torch.Tensor | None, lambda_tn: torch.Tensor | None) -> torch.Tensor | float:
    """w = lambda_tn lambda_vd of Jiang and Lu's Eq. 1 and 2, a factor being 1 when its flag is off (None)."""
    weight = 1.0
    if lambda_vd is not None:
        weight = weight * lambda_vd
    if lambda_tn is not None:
        weight = weight * lambda_tn
    return weight


def value_spread(values: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of max_i V*_i(s) - min_i V*_i(s), values [n, B]: how far the agents' value estimates of
    the same sampled states disagree (Jiang and Lu, Table 6: adding transition normalization to lambda_vd lowers it)."""
    return (values.max(0).values - values.min(0).values).mean()


def reweighted_transitions(probs: torch.Tensor, next_values: torch.Tensor, expected_value: torch.Tensor | None,
                           value_dev: bool, transition_norm: bool, optimism: float) -> torch.Tensor:
    """Jiang and Lu's hat-P_B(s' | s, a) = P_B lambda_tn lambda_vd / z (Sec. 3.3) for a tabular P_B: probs and
    next_values [..., S'] over the next states of one (s, a) (probability 0 where s' is never reached), expected_value
    [...] the E V* in lambda_vd (None: E_{P_B} V*, the exact expectation). z = sum_s' P_B lambda_tn lambda_vd; without
    either flag this returns P_B."""
    seen = probs > 0
    if expected_value is None:
        expected_value = (probs * next_values).sum(-1)
    lambda_vd = value_deviation(next_values, expected_value[..., None], optimism) if value_dev else None
    lambda_tn = torch.where(seen, 1.0 / probs.clamp_min(1e-12), 0.0) if transition_norm else None
    unnormalised = probs * objective_weights(lambda_vd, lambda_tn)
    return unnormalised / unnormalised.sum(-1, keepdim=True)


def td_loss(q: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Weighted squared TD error, mean over the batch, summed over agents: q, target, weight [n, B] (Jiang and Lu,
    Eq. 1)."""
    return (weight * (q - target).pow(2)).mean(-1).sum()


def perturbation_loss(perturbed_q: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """L_xi: minus the weighted Q_i^1 of the perturbed VAE samples, mean over the batch, summed over agents (Jiang and
    Lu, Eq. 2 with BCQ's samples)."""
    return -(weight * perturbed_q).mean(-1).sum()


def gradient_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def weight_metrics(lambda_vd: torch.Tensor | None, lambda_tn: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Batch and per-agent means of the weights in use, and their std over the batch and agents (a mean near 1 can
    hide weights that still move individual transitions)."""
    weights = {name: value for name, value in (("lambda_vd", lambda_vd), ("lambda_tn", lambda_tn)) if value is not None}
    return ({f"values/{name}": value.mean() for name, value in weights.items()}
            | {f"values/{name}_std": value.std() for name, value in weights.items()}
            | {f"agents/{name}": value.mean(1) for name, value in weights.items()})


def update(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """One BCQ-MA update (BCQ Algorithm 1, Jiang and Lu's Algorithm 1 under the flags): the VAEs (L_G), the twin critics
    (L_Q, Jiang and Lu, Eq. 1), the perturbation networks (L_xi, Eq. 2), then the targets."""
    if batch.avail is not None:
        return update_discrete(agents, optimizers, batch, args)
    recon, mean, log_std = agents.vae(batch.obs, batch.actions)
    loss_vae = vae_loss(recon, batch.actions, mean, log_std, args.kl_weight)
    metrics = {}
    lambda_vd = lambda_tn = None
    if agents.transition_vae is not None:
        transition_cond = torch.cat([batch.obs, batch.next_obs], -1)
        recon_tn, mean_tn, log_std_tn = agents.transition_vae(transition_cond, batch.actions)
        loss_transition_vae = vae_loss(recon_tn, batch.actions, mean_tn, log_std_tn, args.kl_weight)
        lambda_tn = transition_normalization_weight(mean.detach(), mean_tn.detach(), args.tn_max)
        loss_vae = loss_vae + loss_transition_vae
        metrics["losses/transition_vae"] = loss_transition_vae.detach()
    gradient_step(optimizers["vae"], loss_vae)

    with torch.no_grad():
        next_value = candidate_value(agents.critic_target, agents.perturbation_target, agents.vae, batch.next_obs,
                                     args.candidates, args.soft_clip)
        target = batch.rewards + args.gamma * (1.0 - batch.dones) * next_value
        if args.value_deviation:
            q_target = soft_clipped_q(*agents.critic_target(batch.obs, batch.actions), args.soft_clip)
            lambda_vd = value_deviation_weight(next_value, q_target, batch.rewards, batch.dones, args.gamma,
                                               args.optimism)
        weight = objective_weights(lambda_vd, lambda_tn)

    q1, q2 = agents.critic(batch.obs, batch.actions)
    loss_critic = td_loss(q1, target, weight) + td_loss(q2, target, weight)
    gradient_step(optimizers["critic"], loss_critic)

    with torch.no_grad():
        sampled = agents.vae.decode(batch.obs)
    perturbed_q = agents.critic.q1(batch.obs, agents.perturbation(batch.obs, sampled))
    loss_perturbation = perturbation_loss(perturbed_q, weight)
    gradient_step(optimizers["perturbation"], loss_perturbation)

    soft_update(agents.critic_target, agents.critic, args.tau)
    soft_update(agents.perturbation_target, agents.perturbation, args.tau)
    metrics.update({"losses/vae": loss_vae.detach(), "losses/critic": loss_critic.detach(),
                    "losses/perturbation": loss_perturbation.detach(), "values/q": q1.detach().mean(),
                    "values/target": target.mean(), "values/value_spread": value_spread(next_value),
                    "agents/q": q1.detach().mean(1)})
    return metrics | weight_metrics(lambda_vd, lambda_tn)


def update_discrete(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """The same update on discrete actions (discrete BCQ): the classifier G_i (and, for lambda_tn, the VAEs on the
    one-hot actions), then the twin critics towards the best candidate in C_i(o'), then the critics' targets."""
    loss_behaviour = -agents.behaviour.log_prob(batch.obs, batch.actions, batch.avail).mean(-1).sum()
    loss_vae, metrics = loss_behaviour, {"losses/behaviour": loss_behaviour.detach()}
    lambda_vd = lambda_tn = None
    if agents.transition_vae is not None:
        recon, mean, log_std = agents.vae(batch.obs, batch.actions)
        recon_tn, mean_tn, log_std_tn = agents.transition_vae(torch.cat([batch.obs, batch.next_obs], -1),
                                                              batch.actions)
        loss_transition_vae = vae_loss(recon_tn, batch.actions, mean_tn, log_std_tn, args.kl_weight)
        loss_vae = loss_vae + vae_loss(recon, batch.actions, mean, log_std, args.kl_weight) + loss_transition_vae
        lambda_tn = transition_normalization_weight(mean.detach(), mean_tn.detach(), args.tn_max)
        metrics["losses/transition_vae"] = loss_transition_vae.detach()
    gradient_step(optimizers["vae"], loss_vae)

    with torch.no_grad():
        next_value = discrete_candidate_value(agents.critic_target, agents.behaviour, batch.next_obs,
                                              batch.next_avail, args.threshold, args.soft_clip)
        target = batch.rewards + args.gamma * (1.0 - batch.dones) * next_value
        if args.value_deviation:
            q_target = soft_clipped_q(*agents.critic_target(batch.obs, batch.actions), args.soft_clip)
            lambda_vd = value_deviation_weight(next_value, q_target, batch.rewards, batch.dones, args.gamma,
                                               args.optimism)
        weight = objective_weights(lambda_vd, lambda_tn)

    q1, q2 = agents.critic(batch.obs, batch.actions)
    loss_critic = td_loss(q1, target, weight) + td_loss(q2, target, weight)
    gradient_step(optimizers["critic"], loss_critic)
    soft_update(agents.critic_target, agents.critic, args.tau)
    metrics.update({"losses/vae": loss_vae.detach(), "losses/critic": loss_critic.detach(),
                    "values/q": q1.detach().mean(), "values/target": target.mean(),
                    "values/value_spread": value_spread(next_value), "agents/q": q1.detach().mean(1)})
    return metrics | weight_metrics(lambda_vd, lambda_tn)


# TRY NOT TO MODIFY: the training loop (common/run.py holds its machinery)
if __name__ == "__main__":
    with exit_on_user_error():
        args, checkpoint = parse_args(Args)
        check_args(args, argument_ranges(args))
        device = prepare_device(args, checkpoint)
        env, dataset, dataset_file = load_env_and_dataset(args, device, checkpoint)
    run = Run(__file__, args, checkpoint, device, env, dataset.card(), fused=False)
    run.announce(f"{len(dataset):,} transitions from {dataset_file}")

    agents = Agents(env.n_agents, env.obs_dim, env.act_dim, dataset.state_dim, args, env.discrete).to(device)
    optimizers = make_optimizers(agents, args)
    run.attach(agents, optimizers)
    for step in run.steps():
        metrics = update(agents, optimizers, dataset.sample(args.batch_size, run.generators[0]), args)
        if step % args.log_every == 0 or step == args.total_steps:
            run.log(step, metrics)
        if step % args.eval_every == 0 and step < args.total_steps:
            run.evaluate(step)
        if run.stop.requested:
            run.stop_after(step)
    run.finish()
