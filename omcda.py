"""OMCDA: offline MARL with conservative degree allocation (OMCDA's short paper and "Who Matters Matters", ICLR 2026).

OMIGA (Wang et al., NeurIPS 2023) with one KL budget d_i and one price alpha_i per agent instead of one alpha for all:
    max_pi E[ sum_t gamma^t r_t ]  s.t.  KL_i := E_D[ KL(pi_i(.|o_i) || pi_b,i(.|o_i)) ] <= d_i,  sum_i d_i = d_tot,
through its Lagrangian, the return of r_t - sum_i alpha_i KL(pi_i || pi_b,i), pi_tot = prod_i pi_i.
[paper] = stated by the OMCDA papers (OMCDA's short paper, "Who Matters Matters"); [ours] = the concrete reading where
the papers give the structure, not the equation.

 1. Behaviour cloning [paper]: pi_b,i = argmax E_D[log pi_b,i(a_i | o_i)] for --bc-steps, then frozen; pi_i starts as
    a copy of pi_b,i.
 2. Decoupled values [Who Matters Matters, key design 1]: Q_tot = Q^r_tot + sum_i alpha_i Q^{c,i}_tot, the soft return
    of r - sum_i alpha_i KL_i split into the return of the rewards Q^r_tot and minus agent i's discounted future KL
    Q^{c,i}_tot. [ours] Two of the three are learned, each with OMIGA's mixer (Eq. 8), the third is their difference:
      Q_tot(s, a)   = sum_i w_i(s) Q_i(o_i, a_i) + b(s)           (soft value: sets pi*, as OMIGA)
      Q^r_tot(s, a) = sum_i w^r_i(s) Q^r_i(o_i, a_i) + b^r(s)     (reward value of pi*: measures influence)
      sum_i alpha_i Q^{c,i}_tot = Q_tot - Q^r_tot                  (logged as values/q_conservative_tot)
    pi* comes from the soft chain and Q^r evaluates that pi*, with no feedback into control: backing up Q^r and Q^c
    separately and reading pi* off their sum (a Boltzmann mean, not a non-expansion: Asadi & Littman, ICML 2017)
    inflated Q^r_tot and collapsed the returns (docs/omcda.md, "The allocation").
 3. Consistent local policy [Who Matters Matters, Prop. 3.1, 3.2, Thm. 3.3; OMIGA Eq. 10 with per-agent alpha_i]:
      pi*_i ∝ pi_b,i exp(z_i),   z_i = w̄_i (Q̄_i - V_i) / alpha_i = x_i + y_i,   x_i = w̄^r_i (Q̄^r_i - V^r_i) / alpha_i,
    x_i the reward part of Prop. 3.2's exponent and y_i = z_i - x_i its conservative part Q^{c,i} - V^{c,i}. With
    per-agent alpha_i the soft value pays exactly sum_i alpha_i KL_i: V_tot = E_{pi*}[Q_tot] - sum_i alpha_i KL_i.
 4. Value losses [OMIGA Eq. 10, 13 with per-agent alpha_i; Who Matters Matters, Prop. 3.4: V normalises pi*_i]:
      V̂_i(o_i) = (alpha_i / w̄_i) log E_{a ~ pi_b,i(.|o_i)}[ exp(w̄_i Q̄_i(o_i, a) / alpha_i) ]     (Eq. 10 solved for V_i)
      L_V  = E_D[ (V̂_i(o_i) - V_i(o_i))^2 ]                       -> E_{pi_b}[exp(z_i) | o_i] = 1: pi*_i is normalised
      V̂^r_i(o_i) = E_{a ~ pi*_i(.|o_i)}[ Q̄^r_i(o_i, a) ] = E_{pi_b,i}[ exp(z_i) Q̄^r_i ]    (the reward value of pi*)
      L_Vr = E_D[ (V̂^r_i(o_i) - V^r_i(o_i))^2 ]                   -> V^r_i = E_{pi*}[Q^r_i | o_i]
      L_Q  = E_D[ (r + gamma (1 - done) V̄_tot(s') - Q_tot(s, a))^2 ],       V_tot = sum_i w_i V_i + b
      L_Qr = E_D[ (r + gamma (1 - done) V̄^r_tot(s') - Q^r_tot(s, a))^2 ],   V^r_tot = sum_i w^r_i V^r_i + b^r
    [ours] V̂_i and V̂^r_i are estimated per state from the same actions: the exact sum over the available actions
    (discrete), or over --behaviour-samples actions of pi_b,i drawn afresh at every update (continuous; V̂^r_i
    self-normalised by their weights exp(z_i)), so Q̄_i and Q̄^r_i are read at actions of pi_b,i as well as the
    data's. OMIGA's exp loss (Eq. 12) on the data's single action per state normalises pi*_i only on average over
    the states V_i cannot tell apart and settles V_i above the soft values by about
    (alpha_i / w̄_i) Var_o(log E_{pi_b}[exp(z_i) | o]) / 2, a bias the backups compound; the data-action regression
    of V^r_i overestimated pi*'s return likewise (both measured in docs/omcda.md, "The soft value per state" and
    "The reward value per state").
 5. KL_i [ours: in-sample, of the policy the values define]: KL(pi*_i || pi_b,i) = E_{pi*}[z_i] = E_D[exp(z_i) z_i],
    no policy action needed (estimated self-normalised, see below). The KL of the extracted Gaussian pi_i to pi_b,i
    is logged beside it as a diagnostic.
 6. Influence [Who Matters Matters, key design 2: m_i = dV^r_tot / dKL(pi_i || pi_b,i), by the chain rule through pi_i].
    [ours] The family pi_i moves on is pi_i(beta_i) ∝ pi_b,i exp(beta_i z_i), sharpening (beta_i > 1) or flattening
    agent i's policy, at beta_i = 1; with the critics held fixed and K_i(o_i) = E_{pi*}[z_i | o_i] = KL_i(o_i),
      dV^r_tot / dbeta_i = alpha_i Cov_{pi*}(x_i, z_i | o_i),   dKL_i / dbeta_i = Var_{pi*}(z_i | o_i),
      m_i = alpha_i E_D[exp(z_i) x_i (z_i - K_i)] / E_D[exp(z_i) (z_i - K_i)^2]      (each moment averaged over o_i)
      L_K = E_D[ sg(exp(z_i)) (sg(z_i) - K_i(o_i))^2 ]                               -> K_i(o_i) = KL_i(o_i)
    Coordinate-free and in-sample; without a conservative part (x_i = z_i - K_i), and with --no-decouple, m_i = alpha_i
    (the envelope theorem: the marginal return of KL is its price). The denominator is positive whenever pi*_i
    deviates; moving alpha_i instead divides by Cov(x_i, z_i), which crossed zero (docs/omcda.md, "The allocation").
 7. Allocation [paper]: d = softmax(m̂ / tau_m) d_tot with m̂ = m / max_i |m_i| [ours: scale-free], so
    sum_i d_i = d_tot.
 8. alpha_i [Who Matters Matters]: min_{alpha_i >= 0} alpha_i (d_i - KL_i), by dual descent on log alpha_i (loss
    log alpha_i sg(d_i - KL_i)) within [--alpha-min, --alpha-max]: alpha_i rises while agent i exceeds its budget.
 9. Policy [OMIGA Eq. 14]: L_pi = -E_D[ sg(exp(clamp(z_i, -z_clip, z_clip))) log pi_i(a_i | o_i) ].
Ablations (Who Matters Matters): --allocation uniform (w/o-CDA), --allocation random (rd: one Dirichlet(1) draw per
run), and --no-decouple (w/o-dq: the soft chain alone, as OMIGA with per-agent alpha_i; no Q^r to measure influence
with).

Agent inputs follow --obs-mode: "state" (default; the global state + a one-hot id, the papers' MuJoCo setting) or
"local" (the agent's observation + id). Discrete actions (SMAX maps): pi_i is categorical over the actions available
at o_i, Q_i and Q^r_i take the one-hot action, the losses are unchanged, the logged policy_kl is the categorical KL
in closed form and evaluation takes the most probable available action.

Choices the papers leave open (OMIGA's published values where they apply; otherwise ours):
- gamma 0.99, tau 0.005 (every target), Adam lr 5e-4, batch 128, 1e6 updates, 2x256 ReLU networks, hypernetworks
  of one hidden layer of 64 on the global state, gradient-norm clip 1.0.
- 2 actions of pi_b,i per state and update in V̂_i and V̂^r_i (with 8 the headline command collapsed:
  docs/omcda.md); agents/normaliser_i = E_D[exp(z_i)] is logged.
- KL_i and the influence moments: expectations under pi* over the minibatch, self-normalised (sum_B exp(z) f /
  sum_B exp(z); KL_i is the KL of softmax_B(z) to the minibatch, blind to an offset in V), of clamp(z) as the policy
  weights, smoothed by a moving average (--estimate-ema); the plain mean E_B[exp(z) z] is heavy-tailed
  (docs/omcda.md).
- alpha_i starts at 10 (OMIGA's MuJoCo alpha), in [0.1, 100], log-alpha Adam lr 1e-3.
- DecompositionMonitor warns when Q_tot - Q^r_tot turns positive, which the decomposition forbids.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from tqdm import tqdm

from common.cli import POSITIVE, Rule, at_least, check_args, exit_on_user_error, interval, parse_args
from common.datasets import Batch, Dataset
from common.run import Run, build_seeds, captures_graph, compile_update, load_env_and_dataset, prepare_device


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

    # Fused seeds and the update's compilation (the scripts whose networks carry a leading seed dimension)
    num_seeds: int = 1
    """train the seeds seed, seed+1, ..., seed+num_seeds-1 as one batched computation, with one run directory each
    and the numbers of separate runs"""
    cuda_graph: bool = True
    """if toggled, on a GPU the update runs as one captured CUDA graph (`--no-cuda-graph`: eager); no effect on a CPU"""
    compile: bool = False
    """if toggled, compile the update step with torch.compile (inside the CUDA graph on a GPU)"""

    # Algorithm specific arguments
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network update rate"""
    d_tot: float = 1.2
    """total KL budget sum_i d_i shared by the agents (Who Matters Matters, MuJoCo sweeps: 0.3, 1.2, 3)"""
    allocation: Literal["influence", "uniform", "random"] = "influence"
    """how d_tot is split: influence (OMCDA), uniform (w/o-CDA), random (rd)"""
    no_decouple: bool = False
    """if toggled, no reward value Q^r beside the soft value, so the influence is the price, m_i = alpha_i (the w/o-dq
    ablation)"""
    influence_temperature: float = 1.0
    """softmax temperature tau_m of the allocation over normalised influences"""
    estimate_ema: float = 0.05
    """exponential-moving-average rate of the in-sample KL_i and influence estimates"""
    alpha_init: float = 10.0
    """initial alpha_i of every agent"""
    alpha_min: float = 0.1
    """lower clamp of alpha_i (in reward units: lower it for tasks with rewards far below MuJoCo's)"""
    alpha_max: float = 100.0
    """upper clamp of alpha_i"""
    alpha_lr: float = 1e-3
    """Adam learning rate of the dual descent on log alpha_i"""
    bc_steps: int = 20_000
    """behaviour-cloning updates of pi_b before training (then pi_b is frozen)"""
    bc_lr: float = 5e-4
    """learning rate of behaviour cloning"""
    q_lr: float = 5e-4
    """learning rate of the local Q networks and their mixers"""
    v_lr: float = 5e-4
    """learning rate of the local V networks"""
    policy_lr: float = 5e-4
    """learning rate of the policies"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of V, Q and pi"""
    mixer_hidden_dim: int = 64
    """hidden units of the mixer hypernetworks"""
    grad_clip: float = 1.0
    """gradient-norm clip of every optimizer"""
    z_clip: float = 10.0
    """z is clamped to [-z_clip, z_clip] in the policy weight exp(z)"""
    behaviour_samples: int = 2
    """actions of pi_b,i per state and update in the targets of V_i and V^r_i (continuous actions; discrete ones are
    summed over exactly); with 8 the headline command collapsed (docs/omcda.md)"""


def argument_ranges(args: Args) -> dict[str, Rule]:
    """The valid range of each numeric argument of this script that common.cli's common rules do not cover."""
    return {
        "d_tot": POSITIVE, "influence_temperature": POSITIVE, "estimate_ema": interval(0, 1, low_open=True),
        "alpha_min": POSITIVE,
        "alpha_max": (lambda value: args.alpha_min <= value < math.inf, f">= --alpha-min ({args.alpha_min}) and finite"),
        # blamed on --alpha-max when the bounds themselves are crossed
        "alpha_init": (lambda value: args.alpha_min > args.alpha_max or args.alpha_min <= value <= args.alpha_max,
                       f"in [--alpha-min, --alpha-max] = [{args.alpha_min}, {args.alpha_max}]"),
        "bc_steps": at_least(1), "z_clip": POSITIVE, "behaviour_samples": at_least(1),
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
# Rules for an update that fused seeds, --resume and the CUDA graph rely on (docs/adding-an-algorithm.md):
# - every parameter, buffer and metric leads with the seed dimension: agent tensors are [seeds, n, B, ...], networks
#   are BatchedLinear (never nn.Linear) and clipped_step clips each seed's gradient alone;
# - buffers change in place (copy_, lerp_, clamp_): a captured graph keeps the tensors it recorded;
# - no host sync in update(): no .item(), .cpu(), print or branch on a tensor's value; return detached metrics, which
#   the loop copies at --log-every;
# - metrics are named "losses/...", "values/...", "agents/..." and shaped [seeds] or, per agent, [seeds, n];
# - the optimizers' names are checkpoint keys, and minibatches come from run.generators alone.
class Agents(nn.Module):
    """Every network of OMCDA, the frozen behaviour policy, log alpha_i and the allocation state; targets are Polyak
    copies. `v`, `q`, `mixer` are the soft values Q_tot = Q^r_tot + sum_i alpha_i Q^{c,i}_tot and V that set pi*;
    `v_reward`, `q_reward`, `mixer_reward` the reward part V^r, Q^r, (w^r, b^r) and `state_kl` the per-state
    KL_i(o_i) of pi*_i, all absent with `decouple=False` (w/o-dq). Three KLs, one name each: `kl` is KL_i, the data
    average of KL(pi*_i || pi_b,i) that the budget d_i bounds; `state_kl` its value at one o_i; the logged
    `policy_kl` is the extracted pi_i's KL to pi_b,i, a diagnostic."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        seeds, nets = args.num_seeds, count_weight_sets(n_agents, args.per_agent_networks, args.num_seeds)
        self.decouple = not args.no_decouple
        self.v = AgentValue(nets, obs_dim, args.hidden_dim)
        self.q = AgentQ(nets, obs_dim, act_dim, args.hidden_dim)
        self.mixer = Mixer(state_dim, n_agents, args.mixer_hidden_dim, seeds)
        self.policy = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)
        self.v_target, self.q_target, self.mixer_target = (copy.deepcopy(m).requires_grad_(False) for m in (self.v, self.q, self.mixer))
        if self.decouple:
            self.v_reward = AgentValue(nets, obs_dim, args.hidden_dim)
            self.q_reward = AgentQ(nets, obs_dim, act_dim, args.hidden_dim)
            self.mixer_reward = Mixer(state_dim, n_agents, args.mixer_hidden_dim, seeds)
            self.v_reward_target, self.q_reward_target, self.mixer_reward_target = (
                copy.deepcopy(m).requires_grad_(False) for m in (self.v_reward, self.q_reward, self.mixer_reward))
            self.state_kl = AgentValue(nets, obs_dim, args.hidden_dim)
        self.behaviour = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)
        self.log_alpha = nn.Parameter(torch.full((seeds, n_agents), math.log(args.alpha_init)))
        self.register_buffer("kl", torch.zeros(seeds, n_agents))
        self.register_buffer("influence_moments", torch.zeros(seeds, 2, n_agents))
        self.register_buffer("influence", torch.zeros(seeds, n_agents))
        self.register_buffer("budget", torch.full((seeds, n_agents), args.d_tot / n_agents))
        self.register_buffer("random_allocation", torch.distributions.Dirichlet(torch.ones(n_agents)).sample((seeds,)))


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    """Adam is elementwise, so one Adam over the seeds' stacked weights is one independent Adam per seed."""
    capturable = captures_graph(args, next(agents.parameters()).device)  # the graph holds the step counters
    optimizers = {
        "v": torch.optim.Adam(agents.v.parameters(), lr=args.v_lr, capturable=capturable),
        "q": torch.optim.Adam([*agents.q.parameters(), *agents.mixer.parameters()], lr=args.q_lr,
                              capturable=capturable),
        "policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr, capturable=capturable),
        "alpha": torch.optim.Adam([agents.log_alpha], lr=args.alpha_lr, capturable=capturable),
    }
    if agents.decouple:
        optimizers["v_reward"] = torch.optim.Adam(agents.v_reward.parameters(), lr=args.v_lr, capturable=capturable)
        optimizers["state_kl"] = torch.optim.Adam(agents.state_kl.parameters(), lr=args.v_lr, capturable=capturable)
        optimizers["q_reward"] = torch.optim.Adam([*agents.q_reward.parameters(), *agents.mixer_reward.parameters()],
                                                  lr=args.q_lr, capturable=capturable)
    return optimizers


@dataclass
class NoisyBatch(Batch):
    """A minibatch with the noise of --behaviour-samples actions of pi_b,i per agent and transition (continuous actions
    only): standard normal [..., n, K * B, act_dim], K blocks of B rows."""

    behaviour_noise: torch.Tensor | None = None


def sample_batch(dataset: Dataset, batch_size: int, behaviour_samples: int,
                 generators: torch.Generator | list[torch.Generator]) -> NoisyBatch:
    """A minibatch and its behaviour noise, both drawn by the sampling generators (one per fused seed, so that fused
    seeds draw what separate runs draw)."""
    return add_behaviour_noise(dataset.sample(batch_size, generators), behaviour_samples, generators)


def add_behaviour_noise(batch: Batch, behaviour_samples: int,
                        generators: torch.Generator | list[torch.Generator]) -> NoisyBatch:
    """The batch with its behaviour noise, seed k's drawn by generators[k] (a single generator: no seed dim)."""
    if batch.avail is not None:  # discrete actions: the value targets sum over them exactly
        return NoisyBatch(**vars(batch))
    n_agents, size, act_dim = batch.actions.shape[-3:]
    shape, device = (n_agents, behaviour_samples * size, act_dim), batch.actions.device
    if isinstance(generators, list):
        noise = torch.stack([torch.randn(shape, generator=one, device=device) for one in generators])
    else:
        noise = torch.randn(shape, generator=generators, device=device)
    return NoisyBatch(**{**vars(batch), "behaviour_noise": noise})


def value_targets(agents: Agents, batch: NoisyBatch, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-state targets of V_i and V^r_i [..., n, B] from actions a of pi_b,i, scale_i = w̄_i / alpha_i [..., n, B]:
    V̂_i = log E_{pi_b,i}[exp(scale_i Q̄_i(o_i, a))] / scale_i and V̂^r_i = E_{pi*_i}[Q̄^r_i(o_i, a)] with
    pi*_i ∝ pi_b,i exp(scale_i Q̄_i) (None without a reward chain); exact over the available actions (discrete), else
    over the K actions tanh(mean + std * noise_k) of pi_b,i, V̂^r_i self-normalised."""
    size = batch.obs.shape[-2]
    if batch.avail is not None:
        log_behaviour = agents.behaviour.log_probs(batch.obs, batch.avail).movedim(-1, -2)  # [..., n, A, B]
        n_actions = log_behaviour.shape[-2]
        actions = torch.eye(n_actions, device=batch.obs.device).repeat_interleave(size, 0)  # A blocks of B rows
        actions = actions.expand(*batch.obs.shape[:-2], *actions.shape)
        log_weights, samples = log_behaviour, n_actions
    else:
        samples = batch.behaviour_noise.shape[-2] // size
        mean, log_std = (torch.cat([x] * samples, -2) for x in agents.behaviour(batch.obs))
        actions = torch.tanh(mean + log_std.exp() * batch.behaviour_noise)
        log_weights = -math.log(samples)
    obs = torch.cat([batch.obs] * samples, -2)
    q = agents.q_target(obs, actions).unflatten(-1, (samples, size))
    log_tilt = log_weights + scale[..., None, :] * q  # log pi_b + scale Q̄, up to each state's normaliser
    v_soft = torch.logsumexp(log_tilt, -2) / scale
    if not agents.decouple:
        return v_soft, None
    q_reward = agents.q_reward_target(obs, actions).unflatten(-1, (samples, size))
    return v_soft, (torch.softmax(log_tilt, -2) * q_reward).sum(-2)


def state_kl_loss(state_kl: torch.Tensor, z: torch.Tensor, z_clip: float) -> torch.Tensor:
    """L_K = E_D[sg(exp(z_i)) (sg(z_i) - K_i(o_i))^2]: K_i(o_i) -> E_{pi*}[z_i | o_i] = KL(pi*_i(.|o_i) || pi_b,i(.|o_i)),
    with z clamped to [-z_clip, z_clip] as in the policy weights and the other pi* estimates."""
    z = z.detach().clamp(-z_clip, z_clip)
    return (torch.exp(z) * (z - state_kl).pow(2)).mean(-1).sum(-1)


def q_loss(q_tot: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, next_v_tot: torch.Tensor, gamma: float) -> torch.Tensor:
    """L_Q and L_Qr (OMIGA Eq. 13): squared TD error of a mixed Q_tot against r + gamma (1 - done) V̄_tot(s')."""
    target = rewards + gamma * (1.0 - dones) * next_v_tot
    return (q_tot - target.detach()).pow(2).mean(-1)


def policy_loss(log_prob: torch.Tensor, z: torch.Tensor, z_clip: float) -> torch.Tensor:
    """L_pi: weighted behaviour cloning towards pi*_i, weights exp(clamp(z_i)) detached; summed over agents."""
    weight = torch.exp(z.detach().clamp(-z_clip, z_clip))
    return -(weight * log_prob).mean(-1).sum(-1)


def in_sample_kl(z: torch.Tensor) -> torch.Tensor:
    """KL(pi*_i || pi_b,i) = E_{pi*}[z_i] = E_D[exp(z_i) z_i] [n] of pi*_i ∝ pi_b,i exp(z_i), z [n, B] normalised by
    V^c, estimated as the KL of the minibatch's own tilt p = softmax_B(z) to the minibatch:
    sum_B p z - log mean_B exp(z). Equal to the above when E_D[exp(z)] = 1; never negative, bounded by log B, and
    unchanged by a constant error in V^c."""
    return (torch.softmax(z, -1) * z).sum(-1) - (torch.logsumexp(z, -1) - math.log(z.shape[-1]))


def influence_moments(reward_part: torch.Tensor, z: torch.Tensor, state_kl: torch.Tensor) -> torch.Tensor:
    """(Cov_{pi*}(x_i, z_i | o_i), Var_{pi*}(z_i | o_i)) [2, n], averaged over the data, of the reward part x [n, B] and
    z [n, B], z centred per state by its conditional mean state_kl = E_{pi*}[z_i | o_i] [n, B]; expectations under pi*
    estimated self-normalised like in_sample_kl."""
    weight = torch.softmax(z, -1)
    centred = z - state_kl
    return torch.stack([(weight * reward_part * centred).sum(-1), (weight * centred.pow(2)).sum(-1)], -2)


def influence_from_moments(alpha: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """m_i = (dV^r_tot / dbeta_i) / (dKL_i / dbeta_i) = alpha_i Cov_{pi*}(x_i, z_i) / Var_{pi*}(z_i) [n]."""
    return alpha * moments[..., 0, :] / moments[..., 1, :]


def gaussian_kl(mean: torch.Tensor, log_std: torch.Tensor, ref_mean: torch.Tensor, ref_log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, ref_std^2)) of diagonal Gaussians, summed over action dims: [n, B].
    tanh is a bijection, so this is also the KL of the squashed policies."""
    variance_ratio = torch.exp(2.0 * (log_std - ref_log_std))
    mean_term = (mean - ref_mean).pow(2) * torch.exp(-2.0 * ref_log_std)
    return 0.5 * (variance_ratio + mean_term - 1.0).sum(-1) + (ref_log_std - log_std).sum(-1)


def categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_a p(a) (log p(a) - log q(a)) of categoricals over the last dim [..., A]; actions that neither
    policy may take (log-probability at the float32 minimum in both) add 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def extracted_policy_kl(policy: nn.Module, behaviour: nn.Module, obs: torch.Tensor, avail: torch.Tensor | None
                        ) -> torch.Tensor:
    """KL(pi_i(.|o_i) || pi_b,i(.|o_i)) [..., n, B] of the extracted policy, in closed form: between the pre-tanh
    Gaussians, or between the categoricals over the actions available at o_i."""
    if isinstance(policy, CategoricalPolicy):
        return categorical_kl(policy.log_probs(obs, avail), behaviour.log_probs(obs, avail))
    return gaussian_kl(*policy(obs), *behaviour(obs))


ALLOCATIONS = ("influence", "uniform", "random")


def allocate_budget(influence: torch.Tensor, d_tot: float, allocation: str, temperature: float,
                    random_allocation: torch.Tensor) -> torch.Tensor:
    """Split d_tot over agents: softmax of m / max|m| (influence), d_tot / n (uniform) or a fixed random split."""
    if allocation == "influence":
        normalised = influence / (influence.abs().amax(-1, keepdim=True) + 1e-8)
        return torch.softmax(normalised / temperature, -1) * d_tot
    if allocation == "uniform":
        return torch.full_like(influence, d_tot / influence.shape[-1])
    if allocation == "random":
        return random_allocation * d_tot
    raise ValueError(f"unknown allocation {allocation!r}; valid: {', '.join(ALLOCATIONS)}")


def alpha_loss(log_alpha: torch.Tensor, kl: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Dual descent on min_{alpha_i >= 0} alpha_i (d_i - KL_i) in log alpha_i: alpha_i rises while KL_i > d_i."""
    return (log_alpha * (budget - kl).detach()).sum()


def clipped_steps(optimizers: list[torch.optim.Optimizer], loss: torch.Tensor, clip: float, seeds: int = 1) -> None:
    """One step of each optimizer (of disjoint parameter sets) on the sum of the seeds' losses [seeds]: one backward
    serves them all (which also keeps torch.compile from back-propagating twice through one compiled graph). Each
    optimizer's gradient norm is clipped per seed: every parameter's leading dim holds the seeds' weight sets in seed
    order, and one norm over all seeds (clip_grad_norm_) would couple them. Same formula as clip_grad_norm_ for one
    seed."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()
    for optimizer in optimizers:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = torch.stack([g.reshape(seeds, -1).norm(dim=1) for g in grads]).norm(dim=0)
        scale = (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
        for g in grads:
            g.view(seeds, -1).mul_(scale)
        optimizer.step()


def clipped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float, seeds: int = 1) -> None:
    clipped_steps([optimizer], loss, clip, seeds)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def pretrain_behaviour(agents: Agents, dataset: Dataset, args: Args,
                       generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """Behaviour cloning of pi_b by maximum likelihood, then freeze it and start pi from it (KL(pi || pi_b) = 0);
    returns the last minibatch's loss of each seed [seeds]."""
    optimizer = torch.optim.Adam(agents.behaviour.parameters(), lr=args.bc_lr)
    loss = torch.zeros(args.num_seeds)
    for _ in tqdm(range(args.bc_steps), desc="behaviour cloning", mininterval=2.0, disable=args.bc_steps < 1000):
        batch = dataset.sample(args.batch_size, generator)
        loss = -agents.behaviour.log_prob(batch.obs, batch.actions, batch.avail).mean(-1).sum(-1)
        clipped_step(optimizer, loss, args.grad_clip, args.num_seeds)
    agents.behaviour.requires_grad_(False)
    agents.policy.load_state_dict(agents.behaviour.state_dict())
    return loss.detach()


def reward_chain_steps(agents: Agents, optimizers: dict, batch: NoisyBatch, args: Args, alpha: torch.Tensor,
                       z: torch.Tensor, v_reward_target: torch.Tensor, loss_v: torch.Tensor, q_tot: torch.Tensor,
                       loss_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The reward chain beside the soft one (absent in w/o-dq): V^r and K_i stepped with V (one backward: they share no
    weights and see each other only through the detached z), Q^r with Q, then their targets' Polyak step. Returns
    the reward part x_i of z_i, the per-state KL_i(o_i), w^r_i V^r_i and the chain's metrics."""
    with torch.no_grad():
        w_reward_target, _ = agents.mixer_reward_target(batch.states)
        q_reward_target = agents.q_reward_target(batch.obs, batch.actions)
        next_w_reward, next_b_reward = agents.mixer_reward_target(batch.next_states)
        next_v_reward_tot = mix(next_w_reward, agents.v_reward_target(batch.next_obs), next_b_reward)
    v_reward = agents.v_reward(batch.obs)
    reward_part = w_reward_target * (q_reward_target - v_reward.detach()) / alpha
    loss_v_reward = (v_reward - v_reward_target).pow(2).mean(-1).sum(-1)
    state_kl = agents.state_kl(batch.obs)
    loss_state_kl = state_kl_loss(state_kl, z, args.z_clip)
    clipped_steps([optimizers["v"], optimizers["v_reward"], optimizers["state_kl"]],
                  loss_v + loss_v_reward + loss_state_kl, args.grad_clip, args.num_seeds)

    w_reward, b_reward = agents.mixer_reward(batch.states)
    q_reward_tot = mix(w_reward, agents.q_reward(batch.obs, batch.actions), b_reward)
    loss_q_reward = q_loss(q_reward_tot, batch.rewards, batch.dones, next_v_reward_tot, args.gamma)
    clipped_steps([optimizers["q"], optimizers["q_reward"]], loss_q + loss_q_reward, args.grad_clip, args.num_seeds)

    soft_update(agents.v_reward_target, agents.v_reward, args.tau)
    soft_update(agents.q_reward_target, agents.q_reward, args.tau)
    soft_update(agents.mixer_reward_target, agents.mixer_reward, args.tau)
    state_kl = state_kl.detach()
    metrics = {"losses/v_reward": loss_v_reward.detach(), "losses/state_kl": loss_state_kl.detach(),
               "agents/state_kl": state_kl.mean(-1), "values/v_reward": v_reward.detach().mean((-2, -1)),
               "losses/q_reward": loss_q_reward.detach(), "values/q_reward_tot": q_reward_tot.detach().mean(-1),
               "values/q_conservative_tot": (q_tot - q_reward_tot).detach().mean(-1)}
    return reward_part, state_kl, w_reward.detach() * v_reward.detach(), metrics


def update(agents: Agents, optimizers: dict, batch: NoisyBatch, args: Args) -> dict[str, torch.Tensor]:
    """One OMCDA update: V (and V^r, K), then Q (and Q^r), then the policy, then KL_i, influence, allocation and the
    alpha_i step."""
    alpha = agents.log_alpha.detach().exp()[..., None]
    with torch.no_grad():
        w_target, _ = agents.mixer_target(batch.states)
        q_target = agents.q_target(batch.obs, batch.actions)
        # w̄_i = 0 leaves agent i out of Q_tot; the floor only keeps the division finite (the limit is the mean).
        v_soft_target, v_reward_target = value_targets(agents, batch, w_target.clamp_min(1e-6) / alpha)
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_v_tot = mix(next_w, agents.v_target(batch.next_obs), next_b)

    v = agents.v(batch.obs)
    z = w_target * (q_target - v.detach()) / alpha
    loss_v = (v - v_soft_target).pow(2).mean(-1).sum(-1)
    w, b = agents.mixer(batch.states)
    q_tot = mix(w, agents.q(batch.obs, batch.actions), b)
    loss_q = q_loss(q_tot, batch.rewards, batch.dones, next_v_tot, args.gamma)
    if agents.decouple:
        reward_part, state_kl, reward_value, metrics = reward_chain_steps(agents, optimizers, batch, args, alpha, z,
                                                                          v_reward_target, loss_v, q_tot, loss_q)
    else:  # w/o-dq: no reward part to isolate, so m_i = alpha_i E[z^2] / E[z^2] = alpha_i
        clipped_step(optimizers["v"], loss_v, args.grad_clip, args.num_seeds)
        clipped_step(optimizers["q"], loss_q, args.grad_clip, args.num_seeds)
        reward_part, state_kl, reward_value, metrics = z, torch.zeros_like(z), w.detach() * v.detach(), {}

    loss_pi = policy_loss(agents.policy.log_prob(batch.obs, batch.actions, batch.avail), z, args.z_clip)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip, args.num_seeds)

    with torch.no_grad():
        z_clipped = z.clamp(-args.z_clip, args.z_clip)
        agents.kl.lerp_(in_sample_kl(z_clipped), args.estimate_ema)
        agents.influence_moments.lerp_(influence_moments(reward_part, z_clipped, state_kl), args.estimate_ema)
        agents.influence.copy_(influence_from_moments(alpha[..., 0], agents.influence_moments))
        agents.budget.copy_(allocate_budget(agents.influence, args.d_tot, args.allocation, args.influence_temperature,
                                            agents.random_allocation))
    optimizers["alpha"].zero_grad(set_to_none=True)
    alpha_loss(agents.log_alpha, agents.kl, agents.budget).backward()
    optimizers["alpha"].step()
    with torch.no_grad():
        agents.log_alpha.clamp_(math.log(args.alpha_min), math.log(args.alpha_max))
        policy_kl = extracted_policy_kl(agents.policy, agents.behaviour, batch.obs, batch.avail).mean(-1)

    soft_update(agents.v_target, agents.v, args.tau)
    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/v_soft": loss_v.detach(), "losses/q_soft": loss_q.detach(), "losses/policy": loss_pi.detach(),
            **metrics, "values/q_soft_tot": q_tot.detach().mean(-1), "values/v_soft": v.detach().mean((-2, -1)),
            "agents/alpha": agents.log_alpha.detach().exp(), "agents/budget": agents.budget.clone(),
            "agents/influence": agents.influence.clone(), "agents/kl": agents.kl.clone(), "agents/policy_kl": policy_kl,
            "agents/normaliser": torch.exp(z_clipped).mean(-1), "agents/z_std": z.std(-1),
            "agents/reward_value": reward_value.mean(-1)}


class DecompositionMonitor:
    """Warns when sum_i alpha_i Q^{c,i}_tot = Q_tot - Q^r_tot, minus a discounted KL, has a minibatch mean above
    SIGN_TOLERANCE |Q^r_tot|: once per seed, and again each time the excess doubles."""

    SIGN_TOLERANCE = 0.05

    def __init__(self):
        self.warned_at: dict[int, float] = {}  # seed -> relative excess at its last warning

    def check(self, values: dict[str, float], seed: int, step: int) -> str | None:
        if "values/q_conservative_tot" not in values:  # --no-decouple: no reward chain
            return None
        excess = values["values/q_conservative_tot"] / max(abs(values["values/q_reward_tot"]), 1e-8)
        if excess <= self.SIGN_TOLERANCE or excess < 2 * self.warned_at.get(seed, 0.0):
            return None
        self.warned_at[seed] = excess
        return (f"warning: seed {seed}, update {step}: Q_tot - Q^r_tot = {values['values/q_conservative_tot']:.1f} is "
                f"{excess:.0%} of |Q^r_tot| above 0, where the decomposition puts it at or below 0: the critics "
                f"overestimate (docs/omcda.md, known problems); a smaller --d-tot keeps them closer")


def agent_summary(agents: Agents) -> str:
    """The per-agent allocation state of each seed ("; " between seeds), for the terminal at each evaluation."""
    fields = {"alpha": agents.log_alpha.detach().exp(), "budget": agents.budget, "kl": agents.kl, "influence": agents.influence}
    return "; ".join("  ".join(f"{name} [{', '.join(f'{x:.3g}' for x in value[k].tolist())}]"
                               for name, value in fields.items()) for k in range(agents.kl.shape[0]))


# TRY NOT TO MODIFY: the training loop (common/run.py holds its machinery)
if __name__ == "__main__":
    with exit_on_user_error():
        args, checkpoint = parse_args(Args)
        check_args(args, argument_ranges(args))
        device = prepare_device(args, checkpoint)
        env, dataset, dataset_file = load_env_and_dataset(args, device, checkpoint)
    run = Run(__file__, args, checkpoint, device, env, dataset.card())
    run.announce(f"{len(dataset):,} transitions from {dataset_file}")

    agents = build_seeds(lambda a: Agents(env.n_agents, env.obs_dim, env.act_dim, dataset.state_dim, a,
                                          env.discrete), args).to(device)
    optimizers = make_optimizers(agents, args)
    run.attach(agents, optimizers, summary=lambda: agent_summary(agents))
    if run.start_step > 0:  # the checkpoint holds the cloned behaviour policy: no pretraining
        agents.behaviour.requires_grad_(False)
    else:  # fresh, or resumed from the checkpoint of update 0, written before behaviour cloning
        path = run.save(0)  # the state before behaviour cloning, which an interrupt abandons: --resume redoes it exactly

        def abandon_cloning() -> str:
            run.close()
            return f"stopped in behaviour cloning, which --resume redoes; checkpoint saved to {path} before it"

        with run.stop.interruptible(abandon_cloning):
            bc_losses = pretrain_behaviour(agents, dataset, args, run.generators).tolist()
        if not args.save_model:  # no stale update-0 model.pt beside a run that asked for none
            path.unlink()
        for writer, bc_loss in zip(run.writers, bc_losses):
            writer.add_scalar("losses/behaviour_cloning", bc_loss, 0)
    update_step = compile_update(update, args, device)
    monitor = DecompositionMonitor()
    for step in run.steps():
        metrics = update_step(agents, optimizers, sample_batch(dataset, args.batch_size, args.behaviour_samples, run.generators), args)
        if step % args.log_every == 0 or step == args.total_steps:
            for values, seed in zip(run.log(step, metrics), run.seeds):
                if (decomposition_warning := monitor.check(values, seed, step)) is not None:
                    tqdm.write(decomposition_warning)
        if step % args.eval_every == 0 and step < args.total_steps:
            run.evaluate(step)
        if run.stop.requested:
            run.stop_after(step)
    run.finish()
