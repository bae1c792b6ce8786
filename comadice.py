"""ComaDICE: offline cooperative MARL with stationary distribution correction (Bui et al., ICLR 2025).

Per agent i: nu_i(o_i), q_i(o_i, a_i) and a tanh-Gaussian policy pi_i(a_i | o_i); one mixer M on the global state s,
a "1-layer" linear mixer: M_s[x] = sum_i w_i(s) x_i + b(s), a single linear combination of the agents' values with
w(s) = |.| >= 0 and a free bias b(s), both given by hypernetworks with one hidden layer of 64 on s. The same M makes

    nu_tot(s) = M_s[nu(o)],   A_tot(s, a) = M_s[q(o, a) - nu(o)]                                     (Sec. 4.2, 5)
    L_q  = E_D[ (M_s[q - nu] + M_s[nu] - r - gamma (1 - done) M̄_s'[nū(o')])^2 ]   over q_i and M       (Eq. 10)
    L_nu = (1 - gamma) E_{s0 ~ D0}[ M_s0[nu(o0)] ] + E_D[ alpha f*(A_tot / alpha) ]   over nu_i          (Eq. 11)
           with A_tot = M_s[q - nu] + gamma (1 - done) (M_s'[nu(o')] - sg(M_s'[nu(o')]))   (value of Eq. 10's fit,
           derivative of Eq. 5's r + gamma nu_tot(s') - nu_tot(s))
    w*   = max(0, f'^{-1}(A_tot / alpha))                                                           (Prop. 4.1)
    L_pi = -E_D[ sg(w*) sum_i log pi_i(a_i | o_i) ]       every agent gets the same global weight      (Eq. 12)

D0 is the set of first steps of the dataset's episodes; bars are Polyak copies. At the minimiser of L_q,
A_tot = r + gamma nū_tot(s') - nu_tot(s): the advantage is the TD residual of nu (Eq. 5).
f*(y) = sup_{t>=0} {t y - f(t)} is attained at t = max(0, f'^{-1}(y)) as f is convex, so f*(y) = y t - f(t) there
and d f*/dy = w* (Prop. 4.1's gradient).

f-divergences (--f-divergence), y = A_tot / alpha:
    soft-chi2  f(t) = t log t - t + 1 (t < 1), (t - 1)^2 / 2 (t >= 1)
               f'^{-1}(y) = e^y (y < 0), y + 1 (y >= 0);     f*(y) = e^y - 1 (y < 0), y^2 / 2 + y (y >= 0)
    chi2       f(t) = (t - 1)^2 / 2;    f'^{-1}(y) = y + 1;  f*(y) = max(0, y + 1)^2 / 2 - 1/2   (t = 0 for y < -1)
    kl         f(t) = t log t;          f'^{-1}(y) = e^(y - 1);  f*(y) = e^(y - 1)

Agent inputs follow --obs-mode: "state" (default) gives every agent the global state plus a one-hot id, the setting
of the papers' MuJoCo experiments; "local" gives each agent its local observation (agent_obsk=1) plus the id.

Discrete actions (SMAX maps, --env 5m_vs_6m): pi_i is categorical over the actions available at o_i (the others
masked to probability 0) and the critics take the one-hot action; the losses above are unchanged, and evaluation takes the
most probable available action. Agents then see their local observation + id (--obs-mode local, SMAC's setting).

The losses above follow the paper. Its published trainer (vietbt/ComaDICE, runner/madice/continuous.py) differs
from the paper in ways this script does not copy:
- its advantage is per agent, e_i = w_i(s) (q_i - nu_i), without the mixer's bias, and two Lagrange multipliers
  (for nu and for the policy weights) are learned alongside to push E[w] to 1; here A_tot is mixed with its bias and
  there are no multipliers (Eq. 11 as printed);
- its initial-state term is (1 - gamma) E[nu_i(o0)] on the local, unmixed nu; here M_s0[nu(o0)] (Eq. 11);
- its policy weight is sum_i w_i from the target q and target mixer; here one w* of the online networks (Eq. 12);
- an update that raises (its NaN assertions) is caught and the parameters reloaded; here a non-finite loss stops the
  run with an error;
- its MuJoCo loader, shared by every algorithm in that repository, divides dataset actions by 4; here actions stay
  in [-1, 1] for every script.
Taken from the published code where the paper gives no value: alpha 10, gamma 0.99, tau 0.005, Adam lr 1e-4 (its
command-line default), batch 128, 2x256 ReLU networks, mixer hypernetworks with one hidden layer of 64, gradient-norm
clip 1.0, soft-chi2 by default; L_q trains q and the mixer, L_nu trains nu only (split the same way there: Eq. 11
names the mixer's parameters too, but with q held fixed its derivative in the free bias b(s) is
(1 - gamma) p0(s) + rho_D(s) E[w* | s], never negative, so minimising it over the mixer only pushes b down without
bound while q and nu drift to compensate). The bootstrap M̄_s'[nū(o')] uses Polyak copies of nu and the mixer; a
terminal transition does not bootstrap.

Ours, where neither settles it:
- Eq. 10 as printed has the signs of its last two terms swapped relative to the sentence before it and Eq. 5,
  and Sec. 5's w* has M[nu] - M[q]; we use A_tot = r + gamma nu_tot(s') - nu_tot(s) and w* from M[q - nu] (Sec. 4.3).
- In L_nu, A_tot keeps q's value but gets Eq. 5's derivative +gamma w* in nu_tot(s') (online nu, detached
  mixer). q is a fit of r + gamma nu_tot(s'), so holding it fixed drops that term, and the minimiser over nu becomes
  E_D[w*] = (1 - gamma) p0-mass, driving w* to 0 and nu_tot up without bound: on Hopper expert, 3k updates took
  nu_tot from 500 to 6,750 and L_q to 8e5 (return 11). With the term, the minimiser is the flow balance of a
  stationary distribution (a test checks the gradient against the DICE objective's).
- The three losses are computed from one forward pass on the same minibatch, each seeing the others' networks
  before this update (the paper updates them "simultaneously"); w* is detached and not clipped.
- Every update draws batch_size initial states uniformly from D0, independent of the transition minibatch.
- Policy: state-dependent log-std clamped to [-5, 2]; dataset actions clamped to +-(1 - 1e-6) before atanh;
  evaluation action tanh(mean). Not offered: the 2-layer mixer of the paper's ablation.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn as nn

from common.cli import Rule, check_args, exit_on_user_error, parse_args
from common.datasets import Batch, Dataset, draw_indices
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
    alpha: float = 10.0
    """strength alpha of the f-divergence between the occupancies of pi_tot and mu_tot (ComaDICE: 10)"""
    f_divergence: Literal["soft-chi2", "chi2", "kl"] = "soft-chi2"
    """the f of the regulariser D_f: soft-chi2, chi2 or kl"""
    q_lr: float = 1e-4
    """learning rate of the local q networks and the mixer"""
    nu_lr: float = 1e-4
    """learning rate of the local nu networks"""
    policy_lr: float = 1e-4
    """learning rate of the policies"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of nu, q and pi"""
    mixer_hidden_dim: int = 64
    """hidden units of the mixer hypernetworks"""
    grad_clip: float = 1.0
    """gradient-norm clip of every optimizer"""


def argument_ranges(args: Args) -> dict[str, Rule]:
    """The valid range of each numeric argument of this script that common.cli's common rules do not cover."""
    return {}


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
    """Every network of ComaDICE; the bootstrap of Eq. 10 uses Polyak copies of nu and the mixer."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks, args.num_seeds)
        self.nu = AgentValue(nets, obs_dim, args.hidden_dim)
        self.q = AgentQ(nets, obs_dim, act_dim, args.hidden_dim)
        self.mixer = Mixer(state_dim, n_agents, args.mixer_hidden_dim, args.num_seeds)
        self.policy = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)
        self.nu_target, self.mixer_target = (copy.deepcopy(m).requires_grad_(False) for m in (self.nu, self.mixer))


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    """Adam is elementwise, so one Adam over the seeds' stacked weights is one independent Adam per seed."""
    capturable = captures_graph(args, next(agents.parameters()).device)  # the graph holds the step counters
    return {
        "nu": torch.optim.Adam(agents.nu.parameters(), lr=args.nu_lr, capturable=capturable),
        "q": torch.optim.Adam([*agents.q.parameters(), *agents.mixer.parameters()], lr=args.q_lr,
                              capturable=capturable),
        "policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr, capturable=capturable),
    }


# f-divergences: f(t) for t >= 0, its conjugate f*(y) = sup_{t>=0} {t y - f(t)} and f'^{-1}(y) (derivations in the
# module docstring). The exponentials see y clamped at 0 so that torch.where's unused branch never overflows.
def soft_chi2_f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t < 1, torch.xlogy(t, t) - t + 1, 0.5 * (t - 1) ** 2)


def soft_chi2_conjugate(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y < 0, torch.expm1(y.clamp(max=0)), 0.5 * y**2 + y)


def soft_chi2_prime_inverse(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y < 0, torch.exp(y.clamp(max=0)), y + 1)


def chi2_f(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (t - 1) ** 2


def chi2_conjugate(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (y + 1).clamp(min=0) ** 2 - 0.5


def chi2_prime_inverse(y: torch.Tensor) -> torch.Tensor:
    return y + 1


def kl_f(t: torch.Tensor) -> torch.Tensor:
    return torch.xlogy(t, t)


def kl_conjugate(y: torch.Tensor) -> torch.Tensor:
    return torch.exp(y - 1)


def kl_prime_inverse(y: torch.Tensor) -> torch.Tensor:
    return torch.exp(y - 1)


class FDivergence(NamedTuple):
    f: Callable[[torch.Tensor], torch.Tensor]
    conjugate: Callable[[torch.Tensor], torch.Tensor]
    prime_inverse: Callable[[torch.Tensor], torch.Tensor]


F_DIVERGENCES = {
    "soft-chi2": FDivergence(soft_chi2_f, soft_chi2_conjugate, soft_chi2_prime_inverse),
    "chi2": FDivergence(chi2_f, chi2_conjugate, chi2_prime_inverse),
    "kl": FDivergence(kl_f, kl_conjugate, kl_prime_inverse),
}


def occupancy_ratio(advantage_tot: torch.Tensor, divergence: FDivergence, alpha: float) -> torch.Tensor:
    """w* = max(0, f'^{-1}(A_tot / alpha)) (Prop. 4.1), the estimate of rho^pi_tot / rho^mu_tot."""
    return divergence.prime_inverse(advantage_tot / alpha).clamp(min=0)


def q_loss(advantage_tot: torch.Tensor, nu_tot: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor,
           next_nu_tot: torch.Tensor, gamma: float) -> torch.Tensor:
    """L_q (Eq. 10): squared gap between A_tot and the TD residual r + gamma (1 - done) nū_tot(s') - nu_tot(s);
    [..., B] -> [...]."""
    td_residual = rewards + gamma * (1.0 - dones) * next_nu_tot.detach() - nu_tot
    return (advantage_tot - td_residual).pow(2).mean(-1)


def advantage_for_nu(advantage_tot: torch.Tensor, next_nu_tot: torch.Tensor, dones: torch.Tensor,
                     gamma: float) -> torch.Tensor:
    """A_tot as L_nu sees it: the value of M_s[q - nu], with the derivative in nu_tot(s') of the r + gamma nu_tot(s')
    that q stands for (Eq. 5), so that dL_nu/dnu balances the flow out of a state against the flow into it."""
    return advantage_tot + gamma * (1.0 - dones) * (next_nu_tot - next_nu_tot.detach())


def nu_loss(initial_nu_tot: torch.Tensor, advantage_tot: torch.Tensor, divergence: FDivergence, alpha: float,
            gamma: float) -> torch.Tensor:
    """L_nu (Eq. 11): (1 - gamma) E_D0[nu_tot(s0)] + E_D[alpha f*(A_tot / alpha)]; [..., B] -> [...]."""
    return (1.0 - gamma) * initial_nu_tot.mean(-1) + alpha * divergence.conjugate(advantage_tot / alpha).mean(-1)


def policy_loss(log_prob: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L_pi (Eq. 12): behaviour cloning weighted by w* [..., B], detached, the same for every agent; summed over
    agents."""
    return -(weight.detach()[..., None, :] * log_prob).mean(-1).sum(-1)


def clipped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float, seeds: int = 1) -> None:
    """One optimizer step on the sum of the seeds' losses [seeds] (each seed's gradient is its own loss's), with the
    gradient norm clipped per seed: every parameter's leading dim holds the seeds' weight sets in seed order, and one
    norm over all seeds (clip_grad_norm_) would couple them. Same formula as clip_grad_norm_ for one seed."""
    optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norms = torch.stack([g.reshape(seeds, -1).norm(dim=1) for g in grads]).norm(dim=0)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
    for g in grads:
        g.view(seeds, -1).mul_(scale)
    optimizer.step()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def sample_initial_states(dataset: Dataset, batch_size: int,
                          generator: torch.Generator | list[torch.Generator]) -> Batch:
    """A minibatch of the episodes' first steps (s0 ~ D0 in Eq. 11), drawn on the dataset's device; given a list of
    generators (fused seeds), one minibatch per generator, stacked as the seeds' leading dim."""
    pick = draw_indices(len(dataset.episode_starts), batch_size, generator, dataset.device)
    return dataset.gather(dataset.episode_starts[pick])


def update(agents: Agents, optimizers: dict, batch: Batch, initial_batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """One ComaDICE update (ComaDICE, Sec. 5): q and mixer (Eq. 10), nu (Eq. 11), then the policy (Eq. 12)."""
    divergence = F_DIVERGENCES[args.f_divergence]
    with torch.no_grad():
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_nu_tot = mix(next_w, agents.nu_target(batch.next_obs), next_b)
        initial_w, initial_b = agents.mixer(initial_batch.states)

    w, b = agents.mixer(batch.states)
    q = agents.q(batch.obs, batch.actions)
    with torch.no_grad():
        nu_fixed = agents.nu(batch.obs)

    # Eq. 10 fits q and the mixer with nu held fixed; Eq. 11 fits nu with q and the mixer held fixed. nu's forward
    # for Eq. 11 comes after the q step (which leaves nu unchanged), so each backward has a graph of its own.
    loss_q = q_loss(mix(w, q - nu_fixed, b), mix(w, nu_fixed, b), batch.rewards, batch.dones, next_nu_tot, args.gamma)
    clipped_step(optimizers["q"], loss_q, args.grad_clip, args.num_seeds)

    w, b = w.detach(), b.detach()
    nu = agents.nu(batch.obs)
    advantage_tot = mix(w, q.detach() - nu, b)
    with torch.no_grad():
        online_next_w, online_next_b = agents.mixer(batch.next_states)
    online_next_nu_tot = mix(online_next_w, agents.nu(batch.next_obs), online_next_b)
    initial_nu_tot = mix(initial_w, agents.nu(initial_batch.obs), initial_b)
    loss_nu = nu_loss(initial_nu_tot, advantage_for_nu(advantage_tot, online_next_nu_tot, batch.dones, args.gamma),
                      divergence, args.alpha, args.gamma)
    clipped_step(optimizers["nu"], loss_nu, args.grad_clip, args.num_seeds)

    weight = occupancy_ratio(advantage_tot.detach(), divergence, args.alpha)
    loss_pi = policy_loss(agents.policy.log_prob(batch.obs, batch.actions, batch.avail), weight)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip, args.num_seeds)

    soft_update(agents.nu_target, agents.nu, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/q": loss_q.detach(), "losses/nu": loss_nu.detach(), "losses/policy": loss_pi.detach(),
            "values/nu_tot": mix(w, nu.detach(), b).mean(-1), "values/advantage_tot": advantage_tot.detach().mean(-1),
            "values/w_mean": weight.mean(-1), "values/w_max": weight.amax(-1),
            "values/w_zero_fraction": (weight == 0).float().mean(-1)}


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
    run.attach(agents, optimizers)
    update_step = compile_update(update, args, device)
    for step in run.steps():
        metrics = update_step(agents, optimizers, dataset.sample(args.batch_size, run.generators),
                              sample_initial_states(dataset, args.batch_size, run.generators), args)
        if step % args.log_every == 0 or step == args.total_steps:
            run.log(step, metrics)
        if step % args.eval_every == 0 and step < args.total_steps:
            run.evaluate(step)
        if run.stop.requested:
            run.stop_after(step)
    run.finish()
