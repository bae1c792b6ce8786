"""OMAR: offline multi-agent RL with actor rectification (Pan, Huang, Ma, Xu, ICML 2022, "Plan Better Amid
Conservatism: Offline Multi-Agent Reinforcement Learning with Actor Rectification"), written as a diff of cql_ma.py.

OMAR keeps CQL's conservative critics and changes the actor. Conservative Q-functions have non-concave landscapes in the
action, where the policy gradient alone stops at a local optimum, and with many agents one agent stuck there is
enough to spoil the team: the paper's account of why CQL degrades as agents are added. OMAR's actor mixes the
first-order policy gradient with a zeroth-order step: a regression towards the best action that an iterative sampling
optimiser (a cross-entropy method) finds on the agent's own conservative Q.

Per agent i: twin critics Q^1_i, Q^2_i(o_i, a_i) and a deterministic policy pi_i(o_i) = tanh(f_i(o_i)) (TD3), all
agents batched; targets (bar) are Polyak copies of the critics and the policy. Independent learners on the team
reward r, each conservative by CQL(H) on its own action:

    y_i = r + gamma (1 - done) min_j Q̄^j_i(o'_i, pī_i(o'_i))                          (TD3's backup, per agent)
    R^j_i(o_i) = log int exp(Q^j_i(o_i, a_i)) da_i - Q^j_i(o_i, a^D_i)                  (CQL(H), CQL's Eq. 4)
    log int exp(Q) da_i ~ log( 1/(2N) sum_k exp(Q(o_i, a_k)) / p(a_k) ),                   (CQL, Appendix F)
          a_1..a_N ~ U([-1, 1]^d),  a_N+1..a_2N = tanh(f_i(o_i) + 0.2 eps),  p = the density each was drawn from
    L_Q  = sum_i sum_j E_D[ (y_i - Q^j_i(o_i, a^D_i))^2 + cql_alpha R^j_i(o_i) ]
    â_i(o_i): the sampling optimiser on Q^1_i(o_i, .), per agent and sample, all in one tensor op per iteration:
          mu^0 = omar_mu, sigma^0 = omar_sigma (per action dimension); for t = 1..T: draw M actions
          clip(N(mu^(t-1), sigma^(t-1)^2), -1, 1), add the K elites of iteration t-1, keep the K of largest Q^1_i as
          the elites of t, and refit mu^t, sigma^t to them (mean and standard deviation); â_i is the best of the last
          elites and pi_i(o_i), by Q^1_i
    L_pi = sum_i E_D[ omar_coe ||pi_i(o_i) - sg(â_i)||^2 / d - (1 - omar_coe) Q^1_i(o_i, pi_i(o_i))     (OMAR's actor
                      + 1e-3 ||pi_i(o_i)||^2 / d ]                                             objective, + [code])
omar_coe is the paper's regularisation coefficient tau (the weight of the zeroth-order target against the policy
gradient); omar_coe = 0 is CQL on independent TD3 learners, OMAR's own CQL baseline.

Discrete actions (SMAX maps, --env 5m_vs_6m) [ours: the paper's actor, optimiser and backup are for continuous
actions]: pi_i is categorical over the actions available at o_i (the shared CategoricalPolicy), Q^j_i takes the one-hot
action, and the critics score every action in one pass, so each search and expectation is exact:
    y_i = r + gamma (1 - done) sum_a' pī_i(a' | o'_i) min_j Q̄^j_i(o'_i, a')   (TD3's pī_i(o'_i) -> its expectation)
    R^j_i(o_i) = logsumexp_{a available} Q^j_i(o_i, a) - Q^j_i(o_i, a^D_i)      (CQL(H), Eq. 4's sum over actions)
    â_i(o_i) = argmax_{a available} Q^1_i(o_i, a)        (what the sampling optimiser searches for, found exactly)
    L_pi = sum_i E_D[ -omar_coe log pi_i(â_i | o_i) - (1 - omar_coe) sum_a pi_i(a | o_i) Q^1_i(o_i, a) ]
The regression towards â becomes a cross-entropy (the categorical's maximum likelihood of â); the action penalty has
no discrete counterpart, so --action-l2, --cql-samples, --cql-noise and the sampling optimiser's flags (--omar-iters,
--omar-samples, --omar-elites, --omar-mu, --omar-sigma, --omar-policy-mean) do nothing on SMAX maps. Evaluation takes
the most probable available action. Agents see their local observation + id.

Equation numbers: the paper's full text was not at hand when this was written (its abstract and the opening of its
experiments section were), so OMAR's objective above is cited by name, not number; only CQL's numbers are given.
Check the actor objective against the paper before quoting it.

Independent critics, not cql_ma.py's mixed Q_tot: the paper builds OMAR, and its CQL and TD3+BC baselines, "on the
independent TD3 based on decentralized critics" (centralised MATD3 critics only in an appendix), and its optimiser
searches each agent's own Q_i(o_i, .). The papers this project compares with run OMAR as such a baseline: OMIGA
implements OMAR "based on the algorithm described in their papers" and gives the linear mixer only to BCQ-MA and CQL-MA.
With the mixer, argmax_a w_i(s) Q_i = argmax_a Q_i (w_i >= 0), so the optimiser would be unchanged, but the critic would
be cql_ma.py's, and OMAR would differ from MA-CQL only in its actor; here it differs in the critic's factorisation too,
as in the paper. The mixer class stays in the shared section, unused.

Settings. [code]: the paper is silent and the value is the authors' code's (ling-pan/OMAR, its Multi-Agent MuJoCo
branch, HalfCheetah 2x3). [ours]: a choice made here.
- [code] omar_coe 0.9 and cql_alpha 5: the code's HalfCheetah medium-replay pair (its table: random 1.0 / 1.0,
  medium-replay 0.9 / 5.0, medium 0.7 / 1.0, expert 0.5 / 5.0 for omar_coe / cql_alpha). [ours] The same default for
  every env and dataset here; the code has no Hopper or Ant settings.
- [code] T = 2 iterations, M = 20 samples, K = 5 elites, omar_mu 0, omar_sigma 2: its Multi-Agent MuJoCo values (its
  command-line defaults 3 / 10 / 10 are the particle environments'). The elites of the previous iteration compete with
  the new samples, and the policy's own action is kept when its Q is not lower than the best sample's, as in the
  code. [ours] --omar-policy-mean starts the sampler at the policy's action instead of omar_mu.
- [code] Adam lr 3e-4 for critics and policies, gamma 0.99, tau 0.005 (critics and policy), 256 hidden units,
  gradient-norm clip 0.5 per agent, the 1e-3 action penalty, policy updated every step, no target-policy noise.
  Batch 128, the scripts' common default (the code's is 256).
- [ours] N = 10 CQL samples per proposal (the code's 10) with noise 0.2 (its cql_sample_noise_level) added before the
  tanh, so the policy proposal's density is exact on the box: the code adds the noise after the tanh, clips, and
  subtracts a density where a log-density belongs. As in cql_ma.py, two proposals (the code, like CQL's, also draws N
  from the policy at o' and scores them at o; left out for speed: the critic pass is the update's largest cost) and
  the estimate divides by 2N inside the log (no gradient changes).
- [ours] One minibatch serves every agent (the code draws one per agent); losses are sums over agents of their own
  losses and gradients are clipped per agent, so the agents' updates stay independent.
- --omar-elites must lie in [2, --omar-samples] (a standard deviation needs two elites); outside it the script stops
  with a ValueError when the networks are built, since the shared main block checks only the common ranges.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from common.cli import FINITE, NON_NEGATIVE, POSITIVE, Rule, at_least, check_args, exit_on_user_error, interval, parse_args
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
    """target network update rate (critics and policy)"""
    cql_alpha: float = 5.0
    """weight of each agent's conservative penalty log int exp(Q_i) - Q_i(o_i, a_D) (OMAR's code, medium-replay: 5)"""
    cql_samples: int = 10
    """actions drawn from each proposal (uniform, the policy with noise) for the log-integral's estimate"""
    cql_noise: float = 0.2
    """std of the pre-tanh Gaussian noise of the log-integral's policy proposal"""
    omar_coe: float = 0.9
    """weight of the zeroth-order target ||pi(o) - â||^2 against the policy gradient's -Q (the paper's tau)"""
    omar_iters: int = 2
    """iterations of the sampling optimiser"""
    omar_samples: int = 20
    """actions the sampling optimiser draws per agent and sample in each iteration"""
    omar_elites: int = 5
    """elite actions (largest Q) the sampling optimiser refits its Gaussian to; between 2 and omar_samples"""
    omar_mu: float = 0.0
    """initial mean of the sampling optimiser's Gaussian, every action dimension"""
    omar_sigma: float = 2.0
    """initial standard deviation of the sampling optimiser's Gaussian, every action dimension"""
    omar_policy_mean: bool = False
    """if toggled, the sampling optimiser starts at the policy's action instead of omar_mu"""
    action_l2: float = 1e-3
    """weight of the penalty on the policy's squared action (OMAR's code)"""
    q_lr: float = 3e-4
    """learning rate of the twin Q networks"""
    policy_lr: float = 3e-4
    """learning rate of the policies"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of Q and pi"""
    grad_clip: float = 0.5
    """gradient-norm clip of every optimizer, per agent"""


def argument_ranges(args: Args) -> dict[str, Rule]:
    """The valid range of each numeric argument of this script that common.cli's common rules do not cover."""
    return {
        "cql_alpha": NON_NEGATIVE, "cql_samples": at_least(1), "cql_noise": POSITIVE, "omar_coe": interval(0, 1),
        "omar_iters": at_least(1), "omar_samples": at_least(2), "omar_elites": interval(2, args.omar_samples),
        "omar_mu": FINITE, "omar_sigma": POSITIVE, "action_l2": NON_NEGATIVE,
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
class AgentActor(nn.Module):
    """Deterministic pi_i(o_i) = tanh(f_i(o_i)) for every agent (TD3's actor): forward gives f_i, [n, B, act_dim]."""

    def __init__(self, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = batched_mlp(weight_sets, obs_dim, act_dim, hidden_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def act(self, obs: torch.Tensor, avail: None = None) -> torch.Tensor:
        return torch.tanh(self(obs))


class Agents(nn.Module):
    """Every network of OMAR: per agent twin critics and a deterministic policy; targets are Polyak copies.
    state_dim is unused (independent critics), kept for the scripts' common signature."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks)
        if not 2 <= args.omar_elites <= args.omar_samples:
            raise ValueError(f"--omar-elites {args.omar_elites}: must be between 2 and --omar-samples "
                             f"({args.omar_samples})")
        self.q = nn.ModuleList([AgentQ(nets, obs_dim, act_dim, args.hidden_dim) for _ in range(2)])
        self.policy = (CategoricalPolicy if discrete else AgentActor)(nets, obs_dim, act_dim, args.hidden_dim)
        self.q_target, self.policy_target = (copy.deepcopy(m).requires_grad_(False) for m in (self.q, self.policy))


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    return {
        "q": torch.optim.Adam(agents.q.parameters(), lr=args.q_lr),
        "policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr),
    }


def sample_actions(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised a = tanh(mean + std eps) and log pi(a) summed over action dims, from the pre-tanh draw u:
    log N(u) - sum log(1 - tanh(u)^2), the Jacobian written as 2 (log 2 - u - softplus(-2u)) to stay finite."""
    noise = torch.randn_like(mean)
    pre_tanh = mean + log_std.exp() * noise
    gaussian = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    log_jacobian = 2.0 * (math.log(2.0) - pre_tanh - nn.functional.softplus(-2.0 * pre_tanh))
    return torch.tanh(pre_tanh), (gaussian - log_jacobian).sum(-1)


def log_integral_exp(values: torch.Tensor, log_density: torch.Tensor) -> torch.Tensor:
    """Importance-sampled log int exp(Q) da from samples along dim 0: log mean_k exp(Q_k) / p(a_k) (CQL, Appendix F).
    With the samples split evenly between proposals, each part is an unbiased estimate of the integral."""
    return torch.logsumexp(values - log_density, 0) - math.log(values.shape[0])


def conservative_penalty(sampled_q: torch.Tensor, log_density: torch.Tensor, data_q: torch.Tensor) -> torch.Tensor:
    """sum_i of agent i's CQL(H) R_i (Eq. 4), batch mean: sampled_q, log_density [S, n, B] (agent i's own actions),
    data_q [n, B]."""
    return (log_integral_exp(sampled_q, log_density) - data_q).mean(-1).sum()


def q_loss(q: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, next_q: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_i of agent i's squared TD error against r + gamma (1 - done) next_q_i: q, next_q [n, B]."""
    target = rewards + gamma * (1.0 - dones) * next_q
    return (q - target.detach()).pow(2).mean(-1).sum()


@torch.no_grad()
def next_value(agents: Agents, next_obs: torch.Tensor) -> torch.Tensor:
    """TD3's bootstrap per agent: min_j Q̄^j_i(o'_i, pī_i(o'_i)) over the target critics, [n, B]."""
    next_actions = agents.policy_target.act(next_obs)
    return torch.min(*(critic(next_obs, next_actions) for critic in agents.q_target))


@torch.no_grad()
def sampling_optimiser(q_fn, mean: torch.Tensor, std: torch.Tensor, iters: int, samples: int,
                       elites: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OMAR's zeroth-order optimiser, a cross-entropy method run for every agent and sample at once.
    mean, std [n, B, d] start the Gaussian; q_fn maps actions [n, M, B, d] to values [n, M, B]. Each iteration draws
    `samples` actions, pools them with the previous elites, keeps the `elites` of largest value and refits the
    Gaussian to them. Returns the best action found [n, B, d] and its value [n, B]."""
    elite_actions = elite_values = None
    for _ in range(iters):
        drawn = (mean[:, None] + std[:, None] * torch.randn(mean.shape[0], samples, *mean.shape[1:],
                                                            device=mean.device)).clamp(-1.0, 1.0)
        values = q_fn(drawn)
        if elite_actions is not None:
            drawn, values = torch.cat([drawn, elite_actions], 1), torch.cat([values, elite_values], 1)
        elite_values, index = values.topk(elites, dim=1)  # sorted: index 0 is the best
        elite_actions = drawn.gather(1, index[..., None].expand(-1, -1, -1, drawn.shape[-1]))
        mean, std = elite_actions.mean(1), elite_actions.std(1)
    return elite_actions[:, 0], elite_values[:, 0]


def rectified_actions(policy_actions: torch.Tensor, policy_q: torch.Tensor, sampled_actions: torch.Tensor,
                      sampled_q: torch.Tensor) -> torch.Tensor:
    """â: the optimiser's action where its value beats the policy's own, else the policy's action: [n, B, d]."""
    return torch.where((policy_q >= sampled_q)[..., None], policy_actions, sampled_actions).detach()


def policy_loss(actions: torch.Tensor, q: torch.Tensor, target_actions: torch.Tensor, omar_coe: float,
                action_l2: float) -> torch.Tensor:
    """L_pi: sum_i of the batch mean of omar_coe ||pi_i - â_i||^2 / d - (1 - omar_coe) Q_i + action_l2 ||pi_i||^2 / d;
    actions, target_actions [n, B, d], q [n, B] at the policy's actions."""
    rectification = (actions - target_actions.detach()).pow(2).mean(-1)
    return (omar_coe * rectification - (1.0 - omar_coe) * q + action_l2 * actions.pow(2).mean(-1)).mean(-1).sum()


def clipped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> torch.Tensor:
    """Step with each agent's gradient norm clipped to `clip` on its own (every parameter's first dim is the agent):
    one agent's large gradient does not shrink the others'. Returns the norms before clipping [n]."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.view(-1, *([1] * (grad.ndim - 1))))
    optimizer.step()
    return norms


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


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


def update(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """One OMAR update: the twin critics on TD + CQL(H) per agent, then the policies on OMAR's objective."""
    if batch.avail is not None:
        return update_discrete(agents, optimizers, batch, args)
    n_agents, batch_size, act_dim = batch.actions.shape
    samples = args.cql_samples
    with torch.no_grad():
        next_q = next_value(agents, batch.next_obs)
        # Proposals for each agent's log-integral, [n, samples, B, d]: uniform on the box, then the noisy policy.
        uniform_actions = torch.rand(n_agents, samples, batch_size, act_dim, device=batch.obs.device) * 2.0 - 1.0
        uniform_log_density = torch.full((n_agents, samples, batch_size), -act_dim * math.log(2.0),
                                         device=batch.obs.device)
        means = agents.policy(batch.obs)[:, None].expand(-1, samples, -1, -1)
        policy_actions, policy_log_prob = sample_actions(means, torch.full_like(means, math.log(args.cql_noise)))
        log_density = torch.cat([uniform_log_density, policy_log_prob], 1).transpose(0, 1)

    # One pass of each critic scores the dataset action (index 0) and the 2N proposals at every sampled observation.
    actions = torch.cat([batch.actions[:, None], uniform_actions, policy_actions], 1)
    obs = batch.obs.repeat(1, actions.shape[1], 1)
    qs = [critic(obs, actions.flatten(1, 2)).unflatten(1, (actions.shape[1], -1)) for critic in agents.q]
    loss_td = sum(q_loss(q[:, 0], batch.rewards, batch.dones, next_q, args.gamma) for q in qs)
    loss_cql = sum(conservative_penalty(q[:, 1:].transpose(0, 1), log_density, q[:, 0]) for q in qs)
    clipped_step(optimizers["q"], loss_td + args.cql_alpha * loss_cql, args.grad_clip)

    new_actions = agents.policy.act(batch.obs)
    q_policy = agents.q[0](batch.obs, new_actions)
    with torch.no_grad():
        def q_fn(candidates: torch.Tensor) -> torch.Tensor:
            return agents.q[0](batch.obs.repeat(1, candidates.shape[1], 1),
                               candidates.flatten(1, 2)).unflatten(1, (candidates.shape[1], -1))

        start = new_actions if args.omar_policy_mean else torch.full_like(new_actions, args.omar_mu)
        sampled, sampled_q = sampling_optimiser(q_fn, start, torch.full_like(new_actions, args.omar_sigma),
                                                args.omar_iters, args.omar_samples, args.omar_elites)
        target_actions = rectified_actions(new_actions, q_policy, sampled, sampled_q)
    loss_pi = policy_loss(new_actions, q_policy, target_actions, args.omar_coe, args.action_l2)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip)

    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.policy_target, agents.policy, args.tau)
    return {"losses/q": loss_td.detach(), "losses/cql_penalty": loss_cql.detach(), "losses/policy": loss_pi.detach(),
            "losses/rectification": (new_actions.detach() - target_actions).pow(2).mean(),
            "values/q": qs[0][:, 0].detach().mean(), "values/q_policy": q_policy.detach().mean(),
            "values/q_sampled_gain": (sampled_q - q_policy.detach()).clamp(min=0.0).mean(),
            "agents/sampled_target_share": (sampled_q > q_policy.detach()).float().mean(1)}


def update_discrete(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """The same update on discrete actions, every search and expectation exact (the critics score all A actions of
    every agent in one pass): the expected TD3 backup, CQL(H)'s log-sum-exp over the available actions, and the
    actor's cross-entropy towards argmax Q^1_i mixed with its expected Q^1_i."""
    act_dim = batch.actions.shape[-1]
    with torch.no_grad():
        next_probs = agents.policy_target.log_probs(batch.next_obs, batch.next_avail).exp()
        next_q_all = torch.min(*(q_of_every_action(critic, batch.next_obs, act_dim) for critic in agents.q_target))
        next_q = (next_probs * next_q_all).sum(-1)

    qs_all = [q_of_every_action(critic, batch.obs, act_dim) for critic in agents.q]
    data_qs = [(q_all * batch.actions).sum(-1) for q_all in qs_all]
    loss_td = sum(q_loss(q, batch.rewards, batch.dones, next_q, args.gamma) for q in data_qs)
    loss_cql = sum((torch.logsumexp(q_all.masked_fill(~batch.avail, -torch.inf), -1) - q).mean(-1).sum()
                   for q_all, q in zip(qs_all, data_qs))
    clipped_step(optimizers["q"], loss_td + args.cql_alpha * loss_cql, args.grad_clip)

    log_probs = agents.policy.log_probs(batch.obs, batch.avail)
    with torch.no_grad():
        q_new = q_of_every_action(agents.q[0], batch.obs, act_dim)
        best = q_new.masked_fill(~batch.avail, -torch.inf).argmax(-1, keepdim=True)  # â_i, [n, B, 1]
    q_policy = (log_probs.exp() * q_new).sum(-1)
    rectification = -log_probs.gather(-1, best).squeeze(-1)
    loss_pi = (args.omar_coe * rectification - (1.0 - args.omar_coe) * q_policy).mean(-1).sum()
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip)

    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.policy_target, agents.policy, args.tau)
    return {"losses/q": loss_td.detach(), "losses/cql_penalty": loss_cql.detach(), "losses/policy": loss_pi.detach(),
            "losses/rectification": rectification.detach().mean(), "values/q": data_qs[0].detach().mean(),
            "values/q_policy": q_policy.detach().mean(),
            "values/q_sampled_gain": (q_new.gather(-1, best).squeeze(-1) - q_policy.detach()).mean()}


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
