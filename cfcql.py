"""CFCQL: counterfactual conservative Q-learning (Shao, Qu, Chen, Zhang, Ji, NeurIPS 2023, "Counterfactual
Conservative Q Learning for Offline Multi-agent Reinforcement Learning"), written as a diff of cql_ma.py.

Per agent i: Q_i(o_i, a_i) and a tanh-Gaussian policy pi_i(a_i | o_i); a mixer hypernetwork on the global state s gives
w(s) = |.| >= 0 and b(s), as in omiga.py. Targets (bar) are Polyak copies of Q and the mixer. Where MA-CQL penalises
the joint action as one (a log-integral over the n d-dimensional box, whose penalty grows with n), CFCQL penalises each
agent's own action with the other agents held at the dataset's actions, and averages the n penalties with weights
lambda_i(s) that sum to one:

    Q_tot(s, a) = sum_i w_i(s) Q_i(o_i, a_i) + b(s)                                     (omiga.py's mixer, its Eq. 8)
    y = r + gamma (1 - done) Q̄_tot(s', a'),   a'_i ~ pi_i(. | o'_i)                        (as cql_ma.py)
    R_i(s) = log int exp(Q_tot(s, a_i, a^D_-i)) da_i - Q_tot(s, a^D)                      (counterfactual CQL(H) term)
    log int exp(Q_tot(s, a_i, a^D_-i)) da_i ~ log( 1/(2N) sum_k exp(Q_tot(s, a_ik, a^D_-i)) / p(a_ik) ),
          a_i1..a_iN ~ U([-1, 1]^d),  a_iN+1..a_i2N ~ pi_i(. | o_i)                        (CQL's estimator, per agent)
    lambda_i(s) = softmax_i( tau KL(mu_i(. | s) || beta_i(. | o_i)) ),   mu_i ∝ exp(Q_tot(s, a_i, a^D_-i))
                                                                                (tau = 0: lambda_i = 1/n)
    L_Q  = E_D[ (y - Q_tot(s, a))^2 ] + cql_alpha E_D[ sum_i sg(lambda_i(s)) R_i(s) ]     over Q_i, w, b
    L_pi, L_alpha as in cql_ma.py (SAC's policy and temperature steps)
With tau = 0 (lambda_i = 1/n) and Q_tot a weighted sum, sum_i R_i is MA-CQL's joint R exactly, so CFCQL's penalty is
MA-CQL's divided by n: conservatism that does not grow with the number of agents, the paper's central argument.
mu_i is the distribution the log-integral pushes Q_tot down on (the maximiser in CQL(H)); its KL to agent i's
behaviour policy measures how far agent i's counterfactual actions leave the data, so with tau > 0 the agent that
strays furthest carries most of the penalty (tau -> infinity: all of it).

Agent inputs follow --obs-mode as in omiga.py: "state" (default, global state + one-hot id) or "local".

Discrete actions (SMAX maps, --env 5m_vs_6m): pi_i and beta_i are categorical over the actions available at o_i, Q_i
takes the one-hot action, and the critic scores every action in one pass, so the sums are exact (the backup, L_pi and
L_alpha are cql_ma.py's discrete ones). Swapping agent i's action moves the linear mix by w_i (Q_i(a_i) - Q_i(a^D_i)),
so agent i's counterfactual log-sum-exp needs only its own actions:
    R_i(s) = logsumexp_{a_i available} w_i(s) Q_i(o_i, a_i) - w_i(s) Q_i(o_i, a^D_i)   (a sum over a_i where the
                                                              continuous form integrates, as CQL(H)'s Eq. 4 sums)
    mu_i(a_i | s) = softmax_{a_i available} w_i(s) Q_i(o_i, a_i)
    KL(mu_i || beta_i) = sum_a mu_i(a | s) (log mu_i(a | s) - log beta_i(a | o_i))
With tau = 0, sum_i R_i / n is again cql_ma.py's discrete penalty divided by n.
Evaluation takes the most probable available action. Agents see their local observation + id (--obs-mode local).

Choices the paper leaves open (ours unless marked otherwise):
- No equation numbers are cited: the paper's full text was not at hand when this was written. The forms above follow
  the paper's abstract and its published code (thu-rllab/CFCQL: the counterfactual log-sum-exp per agent averaged with
  weights, as in its continuous learner; weights softmax_i(temperature x KL(mu_i || beta_i)), as in its discrete
  learner). Check them against the paper before quoting numbers.
- tau = 0 by default (lambda_i = 1/n), the first command of the published code's continuous README (tau > 0 there needs
  a pretrained VAE). With tau > 0 the behaviour policies beta_i are omiga.py's tanh-Gaussian class fitted by maximum
  likelihood alongside (bc.py's loss), and KL(mu_i || beta_i) is estimated from the same 2N importance samples,
  self-normalised: sum_k rho_k (log mu_i(a_ik) - log beta_i(a_ik)), rho_k ∝ exp(Q_tot(s, a_ik, a^D_-i)) / p(a_ik).
- Everything else is cql_ma.py's: cql_alpha 5, N = 10 per proposal and agent, the backup, the SAC actor and
  temperature, the learning rates, one mixed critic per agent.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from common.cli import NON_NEGATIVE, Rule, at_least, check_args, exit_on_user_error, interval, parse_args
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
    """target network update rate"""
    cql_alpha: float = 5.0
    """weight of the counterfactual penalty sum_i lambda_i R_i (cql_ma.py's cql_alpha; CQL's Gym setting 5)"""
    cql_samples: int = 10
    """actions drawn per agent from each proposal (uniform, current policy) for the log-integrals' estimates"""
    cf_tau: float = 0.0
    """temperature of the agent weights lambda_i = softmax_i(tau KL(mu_i || beta_i)); 0 gives lambda_i = 1/n"""
    q_lr: float = 3e-4
    """learning rate of the local Q networks and the mixer"""
    policy_lr: float = 1e-4
    """learning rate of the policies, of the entropy temperature and (cf_tau > 0) of the behaviour policies"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of Q and pi"""
    mixer_hidden_dim: int = 64
    """hidden units of the mixer hypernetwork"""
    grad_clip: float = 1.0
    """gradient-norm clip of every optimizer"""
    discrete_target_entropy: float = 0.5
    """discrete actions: each agent's entropy target, as a fraction of log(number of actions available at o_i)"""


def argument_ranges(args: Args) -> dict[str, Rule]:
    """The valid range of each numeric argument of this script that common.cli's common rules do not cover."""
    return {"cql_alpha": NON_NEGATIVE, "cql_samples": at_least(1), "cf_tau": NON_NEGATIVE,
            "discrete_target_entropy": interval(0, 1)}


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
class Agents(nn.Module):
    """Every network of CFCQL and the entropy temperature; targets are Polyak copies. The behaviour policies exist only
    where the agent weights use them (cf_tau > 0)."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks)
        self.q = AgentQ(nets, obs_dim, act_dim, args.hidden_dim)
        self.mixer = Mixer(state_dim, n_agents, args.mixer_hidden_dim)
        self.policy = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)
        self.q_target, self.mixer_target = (copy.deepcopy(m).requires_grad_(False) for m in (self.q, self.mixer))
        self.log_entropy_alpha = nn.Parameter(torch.zeros(()))
        self.behaviour = (make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim) if args.cf_tau > 0
                          else None)


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    return {
        "q": torch.optim.Adam([*agents.q.parameters(), *agents.mixer.parameters()], lr=args.q_lr),
        "policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr),
        "entropy": torch.optim.Adam([agents.log_entropy_alpha], lr=args.policy_lr),
    } | ({} if agents.behaviour is None else
         {"behaviour": torch.optim.Adam(agents.behaviour.parameters(), lr=args.policy_lr)})


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
    With the samples split evenly between proposals, each half is an unbiased estimate of the integral."""
    return torch.logsumexp(values - log_density, 0) - math.log(values.shape[0])


def counterfactual_penalty(cf_q_tot: torch.Tensor, log_density: torch.Tensor, data_q_tot: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """sum_i lambda_i R_i, batch mean: cf_q_tot, log_density [S, n, B] (agent i's action sampled, the others' from the
    data), data_q_tot [B], weights lambda [n, B] (summing to one over agents; no gradient flows into them)."""
    per_agent = log_integral_exp(cf_q_tot, log_density) - data_q_tot
    return (weights.detach() * per_agent).sum(0).mean()


@torch.no_grad()
def agent_weights(cf_q_tot: torch.Tensor, log_density: torch.Tensor, behaviour_log_prob: torch.Tensor | None,
                  tau: float) -> torch.Tensor:
    """lambda [n, B] = softmax over agents of tau KL(mu_i || beta_i), mu_i ∝ exp(cf_q_tot), the KL estimated from the
    samples [S, n, B] with self-normalised importance weights; behaviour_log_prob is log beta_i there (None: 1/n)."""
    if behaviour_log_prob is None:
        return torch.full(cf_q_tot.shape[1:], 1.0 / cf_q_tot.shape[1], device=cf_q_tot.device)
    log_mu = cf_q_tot - log_integral_exp(cf_q_tot, log_density)
    kl = (torch.softmax(cf_q_tot - log_density, 0) * (log_mu - behaviour_log_prob)).sum(0)
    return torch.softmax(tau * kl, 0)


def counterfactual_q_tot(q: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q_tot at the dataset action [B] and with agent i's action swapped for sample k, the others' kept [S, n, B], from
    the local values q [n, 1 + S, B] (index 0: the dataset action). Swapping one agent moves the weighted sum by
    w_i (Q_i(sample) - Q_i(data))."""
    q_tot = mix(w, q[:, 0], b)
    return q_tot, (q_tot + w[:, None] * (q[:, 1:] - q[:, :1])).transpose(0, 1)


def q_loss(q_tot: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, next_q_tot: torch.Tensor, gamma: float) -> torch.Tensor:
    """Squared TD error of the mixed Q against r + gamma (1 - done) Q̄_tot(s', a' ~ pi)."""
    target = rewards + gamma * (1.0 - dones) * next_q_tot
    return (q_tot - target.detach()).pow(2).mean()


def policy_loss(log_prob: torch.Tensor, q_tot: torch.Tensor, entropy_alpha: torch.Tensor) -> torch.Tensor:
    """L_pi: SAC's policy loss on the joint action; log_prob [n, B] per agent, q_tot [B] at the policy's actions."""
    return (entropy_alpha * log_prob.sum(0) - q_tot).mean()


def entropy_alpha_loss(log_entropy_alpha: torch.Tensor, log_prob: torch.Tensor,
                       target_entropy: float | torch.Tensor) -> torch.Tensor:
    """SAC's temperature loss: alpha rises while the joint entropy -sum_i log pi_i is below the target."""
    return -(log_entropy_alpha * (log_prob.detach().sum(0) + target_entropy)).mean()


def clipped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return grad_norm


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


def counterfactual_penalties_discrete(w: torch.Tensor, q_all: torch.Tensor, data_q: torch.Tensor,
                                      avail: torch.Tensor) -> torch.Tensor:
    """R_i(s) [n, B] exactly: log sum over agent i's available actions of exp Q_tot(s, a_i, a^D_-i), minus
    Q_tot(s, a^D) = logsumexp_{a_i available} w_i Q_i(o_i, a_i) - w_i Q_i(o_i, a^D_i). w, data_q [n, B]; q_all, avail
    [n, B, A]."""
    return torch.logsumexp((w[..., None] * q_all).masked_fill(~avail, -torch.inf), -1) - w * data_q


@torch.no_grad()
def agent_weights_discrete(w: torch.Tensor, q_all: torch.Tensor, avail: torch.Tensor,
                           behaviour_log_probs: torch.Tensor | None, tau: float) -> torch.Tensor:
    """lambda [n, B] = softmax over agents of tau KL(mu_i || beta_i), mu_i = softmax of w_i Q_i over the available
    actions, the KL an exact sum; behaviour_log_probs [n, B, A] is log beta_i (None: lambda_i = 1/n)."""
    if behaviour_log_probs is None:
        return torch.full(w.shape, 1.0 / w.shape[0], device=w.device)
    log_mu = torch.log_softmax((w[..., None] * q_all).masked_fill(~avail, -torch.inf), -1)
    kl = torch.where(avail, log_mu.exp() * (log_mu - behaviour_log_probs), 0.0).sum(-1)
    return torch.softmax(tau * kl, 0)


def update(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """One CFCQL update: Q and mixer on TD + the weighted counterfactual penalty, then the policy and temperature (and,
    with cf_tau > 0, the behaviour policies)."""
    if batch.avail is not None:
        return update_discrete(agents, optimizers, batch, args)
    n_agents, batch_size, act_dim = batch.actions.shape
    samples = args.cql_samples
    mean, log_std = agents.policy(batch.obs)
    with torch.no_grad():
        next_actions, _ = sample_actions(*agents.policy(batch.next_obs))
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_q_tot = mix(next_w, agents.q_target(batch.next_obs, next_actions), next_b)
        # Each agent's own proposals, [n, samples, B, act_dim]: uniform on its box, then its current policy.
        uniform_actions = torch.rand(n_agents, samples, batch_size, act_dim, device=mean.device) * 2.0 - 1.0
        uniform_log_density = torch.full((n_agents, samples, batch_size), -act_dim * math.log(2.0), device=mean.device)
        policy_actions, policy_log_prob = sample_actions(mean.detach()[:, None].expand(-1, samples, -1, -1),
                                                         log_std.detach()[:, None].expand(-1, samples, -1, -1))
        log_density = torch.cat([uniform_log_density, policy_log_prob], 1).transpose(0, 1)

    # One critic pass scores the dataset action (index 0) and the 2N proposals at every sampled state.
    actions = torch.cat([batch.actions[:, None], uniform_actions, policy_actions], 1)
    q = agents.q(batch.obs.repeat(1, actions.shape[1], 1), actions.flatten(1, 2)).unflatten(1, (actions.shape[1], -1))
    w, b = agents.mixer(batch.states)
    q_tot, cf_q_tot = counterfactual_q_tot(q, w, b)
    behaviour_log_prob = None
    if agents.behaviour is not None:
        with torch.no_grad():
            behaviour_mean, behaviour_log_std = agents.behaviour(batch.obs)
            behaviour_log_prob = tanh_gaussian_log_prob(behaviour_mean[:, None], behaviour_log_std[:, None],
                                                        actions[:, 1:]).transpose(0, 1)
    weights = agent_weights(cf_q_tot.detach(), log_density, behaviour_log_prob, args.cf_tau)
    loss_td = q_loss(q_tot, batch.rewards, batch.dones, next_q_tot, args.gamma)
    loss_cql = counterfactual_penalty(cf_q_tot, log_density, q_tot, weights)
    clipped_step(optimizers["q"], loss_td + args.cql_alpha * loss_cql, args.grad_clip)

    entropy_alpha = agents.log_entropy_alpha.detach().exp()
    new_actions, log_prob = sample_actions(mean, log_std)
    with torch.no_grad():
        w_new, b_new = agents.mixer(batch.states)
    loss_pi = policy_loss(log_prob, mix(w_new, agents.q(batch.obs, new_actions), b_new), entropy_alpha)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip)
    loss_alpha = entropy_alpha_loss(agents.log_entropy_alpha, log_prob, -float(n_agents * act_dim))
    clipped_step(optimizers["entropy"], loss_alpha, args.grad_clip)
    if agents.behaviour is not None:
        loss_behaviour = -agents.behaviour.log_prob(batch.obs, batch.actions).mean(1).sum()
        clipped_step(optimizers["behaviour"], loss_behaviour, args.grad_clip)

    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/q": loss_td.detach(), "losses/cql_penalty": loss_cql.detach(), "losses/policy": loss_pi.detach(),
            "values/q_tot": q_tot.detach().mean(), "values/entropy_alpha": entropy_alpha,
            "values/policy_entropy": -log_prob.detach().sum(0).mean(), "agents/cf_weight": weights.mean(1)}


def update_discrete(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """The same update on discrete actions, every sum over actions exact (the critic scores all A actions of every
    agent in one pass): cql_ma.py's discrete backup, policy and temperature steps with the counterfactual penalty."""
    act_dim = batch.actions.shape[-1]
    with torch.no_grad():
        next_probs = agents.policy.log_probs(batch.next_obs, batch.next_avail).exp()
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_q = (next_probs * q_of_every_action(agents.q_target, batch.next_obs, act_dim)).sum(-1)
        next_q_tot = mix(next_w, next_q, next_b)

    q_all = q_of_every_action(agents.q, batch.obs, act_dim)
    w, b = agents.mixer(batch.states)
    data_q = (q_all * batch.actions).sum(-1)
    q_tot = mix(w, data_q, b)
    behaviour_log_probs = None
    if agents.behaviour is not None:
        with torch.no_grad():
            behaviour_log_probs = agents.behaviour.log_probs(batch.obs, batch.avail)
    weights = agent_weights_discrete(w.detach(), q_all.detach(), batch.avail, behaviour_log_probs, args.cf_tau)
    loss_td = q_loss(q_tot, batch.rewards, batch.dones, next_q_tot, args.gamma)
    loss_cql = (weights * counterfactual_penalties_discrete(w, q_all, data_q, batch.avail)).sum(0).mean()
    clipped_step(optimizers["q"], loss_td + args.cql_alpha * loss_cql, args.grad_clip)

    entropy_alpha = agents.log_entropy_alpha.detach().exp()
    log_probs = agents.policy.log_probs(batch.obs, batch.avail)
    probs = log_probs.exp()
    expected_log_prob = (probs * log_probs).sum(-1)  # E_{a_i~pi_i}[log pi_i], [n, B]
    with torch.no_grad():
        w_new, b_new = agents.mixer(batch.states)
        q_new = q_of_every_action(agents.q, batch.obs, act_dim)
    loss_pi = policy_loss(expected_log_prob, mix(w_new, (probs * q_new).sum(-1), b_new), entropy_alpha)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip)
    target_entropy = args.discrete_target_entropy * batch.avail.sum(-1).float().log().sum(0)
    loss_alpha = entropy_alpha_loss(agents.log_entropy_alpha, expected_log_prob, target_entropy)
    clipped_step(optimizers["entropy"], loss_alpha, args.grad_clip)
    if agents.behaviour is not None:
        loss_behaviour = -agents.behaviour.log_prob(batch.obs, batch.actions, batch.avail).mean(1).sum()
        clipped_step(optimizers["behaviour"], loss_behaviour, args.grad_clip)

    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/q": loss_td.detach(), "losses/cql_penalty": loss_cql.detach(), "losses/policy": loss_pi.detach(),
            "values/q_tot": q_tot.detach().mean(), "values/entropy_alpha": entropy_alpha,
            "values/policy_entropy": -expected_log_prob.detach().sum(0).mean(), "agents/cf_weight": weights.mean(1)}


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
