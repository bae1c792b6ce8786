"""MA-CQL: conservative Q-learning with a mixed team critic (CQL: Kumar et al., NeurIPS 2020, "Conservative
Q-Learning for Offline Reinforcement Learning"), multi-agent as offline-MARL papers run it as a baseline (OMAR, Pan et
al., ICML 2022; the CQL-MA baseline of OMIGA and ComaDICE).

Per agent i: Q_i(o_i, a_i) and a tanh-Gaussian policy pi_i(a_i | o_i); a mixer hypernetwork on the global state s gives
w(s) = |.| >= 0 and b(s), as in omiga.py. Targets (bar) are Polyak copies of Q and the mixer. The joint action a is
penalised as one action: CQL(H) on Q_tot over the joint action space.

    Q_tot(s, a) = sum_i w_i(s) Q_i(o_i, a_i) + b(s)                                     (omiga.py's mixer, its Eq. 8)
    y = r + gamma (1 - done) Q̄_tot(s', a'),   a'_i ~ pi_i(. | o'_i)                        (CQL's backup, no entropy)
    R(s) = log int exp(Q_tot(s, a)) da - Q_tot(s, a_D)                                     (CQL(H), Eq. 4)
    log int exp(Q_tot) da ~ log( 1/(2N) sum_k exp(Q_tot(s, a_k)) / p(a_k) ),                (CQL, Appendix F)
          a_1..a_N ~ U([-1, 1]^(n d)),  a_N+1..a_2N ~ prod_i pi_i(. | o_i),  p = the density each was drawn from
    L_Q  = E_D[ (y - Q_tot(s, a))^2 ] + cql_alpha E_D[ R(s) ]                               over Q_i, w, b  (Eq. 4)
    L_pi = E_D, a~pi[ alpha sum_i log pi_i(a_i | o_i) - Q_tot(s, a) ]       (SAC's policy step, CQL Algorithm 1)
    L_alpha = -E_D, a~pi[ log(alpha) sg(sum_i log pi_i(a_i | o_i) + H̄) ],   H̄ = -n d       (SAC's temperature)
Because the mixer is linear in the Q_i, each agent's action reaches Q_tot only through w_i(s) Q_i(o_i, a_i): agent i's
policy gradient is its own mixed local value's.

Agent inputs follow --obs-mode as in omiga.py: "state" (default, global state + one-hot id) or "local".

Discrete actions (SMAX maps, --env 5m_vs_6m): pi_i is categorical over the actions available at o_i and Q_i takes the
one-hot action. The critic scores every action, so each expectation is a sum, not a sample (the discrete SAC of
Christodoulou, 2019, with CQL(H)'s penalty in its discrete form, Eq. 4's sum over actions):
    y = r + gamma (1 - done) [ sum_i w̄_i(s') sum_a' pi_i(a' | o'_i) Q̄_i(o'_i, a') + b̄(s') ]   (a' over o'_i's available)
    log sum_a exp Q_tot(s, a) = b(s) + sum_i logsumexp_{a_i available} w_i(s) Q_i(o_i, a_i)   (the linear mixer makes
                                                                       the sum over joint actions a product over agents)
    L_pi = E_D[ sum_i sum_a pi_i(a | o_i) (alpha log pi_i(a | o_i) - w_i(s) Q_i(o_i, a)) ]
    L_alpha = -E_D[ log(alpha) sg(sum_i E_pi_i[log pi_i] + H̄) ],  H̄ = c sum_i log |A_i(o_i)|   (c = 0.5, ours)
Evaluation takes the most probable available action. Agents see their local observation + id (--obs-mode local).

Choices the papers leave open (CQL's published Gym settings unless marked "ours"):
- cql_alpha 5 (CQL's min_q_weight for Gym MuJoCo, without the Lagrange variant), N = 10 samples per proposal, Adam lr
  3e-4 for Q and mixer, 1e-4 for the policy and the temperature, gamma 0.99, tau 0.005, automatic entropy tuning
  towards -1 per action dimension, initial alpha 1; the backup carries no entropy term. L_Q is the mean squared TD
  error plus cql_alpha R, as in CQL's code: Eq. 4 halves the TD term, so its alpha is cql_alpha / 2.
- Ours: one critic per agent mixed by omiga.py's hypernetwork (OMAR builds MA-CQL on independent TD3 critics; ComaDICE's
  published CQL-MA baseline uses a mixer like this one); no twin critics, as in that baseline. CQL's code also draws
  N actions from pi(. | s') and scores them at s, and clones the behaviour for its first updates; neither is done here.
- Ours: the estimate divides by 2N inside the log (CQL's code does not): a constant that changes no gradient and makes
  the logged penalty an estimate of R itself (an integral over the box, where Eq. 4 sums over discrete actions, so R
  is not bounded below by 0).
- Policy: omiga.py's class; sampled actions' log-densities are computed from the pre-tanh draw (exact), not by atanh.
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
    """weight of the conservative penalty log int exp(Q_tot) - Q_tot(s, a_D) (CQL's min_q_weight; Gym setting 5)"""
    cql_samples: int = 10
    """actions drawn from each proposal (uniform, current policy) for the log-integral's importance-sampled estimate"""
    q_lr: float = 3e-4
    """learning rate of the local Q networks and the mixer"""
    policy_lr: float = 1e-4
    """learning rate of the policies and of the entropy temperature"""
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
    return {"cql_alpha": NON_NEGATIVE, "cql_samples": at_least(1), "discrete_target_entropy": interval(0, 1)}


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
    """Every network of MA-CQL and the entropy temperature; targets are Polyak copies."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks)
        self.q = AgentQ(nets, obs_dim, act_dim, args.hidden_dim)
        self.mixer = Mixer(state_dim, n_agents, args.mixer_hidden_dim)
        self.policy = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)
        self.q_target, self.mixer_target = (copy.deepcopy(m).requires_grad_(False) for m in (self.q, self.mixer))
        self.log_entropy_alpha = nn.Parameter(torch.zeros(()))


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    return {
        "q": torch.optim.Adam([*agents.q.parameters(), *agents.mixer.parameters()], lr=args.q_lr),
        "policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr),
        "entropy": torch.optim.Adam([agents.log_entropy_alpha], lr=args.policy_lr),
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
    With the samples split evenly between proposals, each half is an unbiased estimate of the integral."""
    return torch.logsumexp(values - log_density, 0) - math.log(values.shape[0])


def conservative_penalty(sampled_q_tot: torch.Tensor, log_density: torch.Tensor,
                         data_q_tot: torch.Tensor) -> torch.Tensor:
    """CQL(H)'s R (Eq. 4), batch mean: sampled_q_tot, log_density [S, B] (joint actions), data_q_tot [B]."""
    return (log_integral_exp(sampled_q_tot, log_density) - data_q_tot).mean()


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


def joint_log_sum_exp(w: torch.Tensor, q_all: torch.Tensor, b: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """log sum_a exp Q_tot(s, a) over the available joint actions, exactly: the mixer is linear, so the sum over the
    product of the agents' action sets factorises into b + sum_i logsumexp_{a_i available} w_i Q_i(o_i, a_i).
    w [n, B], q_all, avail [n, B, A], b [B] -> [B]."""
    return b + torch.logsumexp((w[..., None] * q_all).masked_fill(~avail, -torch.inf), -1).sum(0)


def update(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """One MA-CQL update (CQL, Algorithm 1): Q and mixer on TD + penalty (Eq. 4), then the policy and temperature."""
    if batch.avail is not None:
        return update_discrete(agents, optimizers, batch, args)
    n_agents, batch_size, act_dim = batch.actions.shape
    samples = args.cql_samples
    mean, log_std = agents.policy(batch.obs)
    with torch.no_grad():
        next_actions, _ = sample_actions(*agents.policy(batch.next_obs))
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_q_tot = mix(next_w, agents.q_target(batch.next_obs, next_actions), next_b)
        # Proposals for the log-integral, [n, samples, B, act_dim]: uniform on the box, then the current policy.
        uniform_actions = torch.rand(n_agents, samples, batch_size, act_dim, device=mean.device) * 2.0 - 1.0
        uniform_log_density = torch.full((samples, batch_size), -n_agents * act_dim * math.log(2.0), device=mean.device)
        policy_actions, policy_log_prob = sample_actions(mean.detach()[:, None].expand(-1, samples, -1, -1),
                                                         log_std.detach()[:, None].expand(-1, samples, -1, -1))
        log_density = torch.cat([uniform_log_density, policy_log_prob.sum(0)])

    # One critic pass scores the dataset action (index 0) and the 2N proposals at every sampled state.
    actions = torch.cat([batch.actions[:, None], uniform_actions, policy_actions], 1)
    q = agents.q(batch.obs.repeat(1, actions.shape[1], 1), actions.flatten(1, 2)).unflatten(1, (actions.shape[1], -1))
    w, b = agents.mixer(batch.states)
    q_tot_all = (w[:, None] * q).sum(0) + b
    q_tot = q_tot_all[0]
    loss_td = q_loss(q_tot, batch.rewards, batch.dones, next_q_tot, args.gamma)
    loss_cql = conservative_penalty(q_tot_all[1:], log_density, q_tot)
    clipped_step(optimizers["q"], loss_td + args.cql_alpha * loss_cql, args.grad_clip)

    entropy_alpha = agents.log_entropy_alpha.detach().exp()
    new_actions, log_prob = sample_actions(mean, log_std)
    with torch.no_grad():
        w_new, b_new = agents.mixer(batch.states)
    loss_pi = policy_loss(log_prob, mix(w_new, agents.q(batch.obs, new_actions), b_new), entropy_alpha)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip)
    loss_alpha = entropy_alpha_loss(agents.log_entropy_alpha, log_prob, -float(n_agents * act_dim))
    clipped_step(optimizers["entropy"], loss_alpha, args.grad_clip)

    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/q": loss_td.detach(), "losses/cql_penalty": loss_cql.detach(), "losses/policy": loss_pi.detach(),
            "values/q_tot": q_tot.detach().mean(), "values/entropy_alpha": entropy_alpha,
            "values/policy_entropy": -log_prob.detach().sum(0).mean()}


def update_discrete(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """The same update on discrete actions, with every expectation over actions exact (the critic scores all A
    actions of every agent in one pass): the backup's E_{a'~pi}, CQL(H)'s log-sum-exp over the available joint actions
    (Eq. 4 as written, no sampling) and the policy's and temperature's expectations under the categorical pi."""
    act_dim = batch.actions.shape[-1]
    with torch.no_grad():
        next_probs = agents.policy.log_probs(batch.next_obs, batch.next_avail).exp()
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_q_tot = mix(next_w, (next_probs * q_of_every_action(agents.q_target, batch.next_obs, act_dim)).sum(-1), next_b)

    q_all = q_of_every_action(agents.q, batch.obs, act_dim)
    w, b = agents.mixer(batch.states)
    q_tot = mix(w, (q_all * batch.actions).sum(-1), b)
    loss_td = q_loss(q_tot, batch.rewards, batch.dones, next_q_tot, args.gamma)
    loss_cql = (joint_log_sum_exp(w, q_all, b, batch.avail) - q_tot).mean()
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

    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/q": loss_td.detach(), "losses/cql_penalty": loss_cql.detach(), "losses/policy": loss_pi.detach(),
            "values/q_tot": q_tot.detach().mean(), "values/entropy_alpha": entropy_alpha,
            "values/policy_entropy": -expected_log_prob.detach().sum(0).mean()}


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
