"""ICQ: implicit constraint Q-learning, multi-agent (Yang et al., NeurIPS 2021, "Believe What You See: Implicit
Constraint Approach for Offline Multi-Agent Reinforcement Learning"; a baseline of OMCDA's short paper, OMIGA and
ComaDICE, and in OMIGA's "Discussion with prior works" the method that estimates the partition function Z from the
minibatch).

Per agent i: twin critics Q^1_i, Q^2_i(o_i, a_i) and a tanh-Gaussian policy pi_i(a_i | o_i); a mixer hypernetwork on
the global state s gives w(s) = |.| >= 0 and b(s). Targets (bar) are Polyak copies of the critics and the mixer.
Nothing outside the data is evaluated: the next joint action a' is the dataset's own action at the next step, so the
critic is trained SARSA-like, with the behaviour expectation reweighted towards high values.

    Q_i = min_j Q^j_i,   Q^j_tot(s, a) = sum_i w_i(s) Q^j_i(o_i, a_i) + b(s)                (ICQ-MA's decomposition)
    T_IC Q(s, a) = r + gamma E_{s', a'~mu}[ exp(Q(s', a')/alpha) / Z(s') Q(s', a') ],   Z(s') = E_{a'~mu}[exp(Q/alpha)]
                                               (implicit constraint operator, from pi* = mu exp(Q/alpha) / Z)
    rho = B softmax_B(Q̄_tot(s', a')/alpha)                    (Z estimated over the minibatch: rho averages one)
    L_Q  = sum_j E_B[ (r + gamma (1 - done) rho Q̄_tot(s', a') - Q^j_tot(s, a))^2 ]       (critic loss J_Q, lambda = 0)
    L_pi = -sum_i E_B[ sg(B softmax_B(w_i(s) Q_i(o_i, a_i)/beta)) log pi_i(a_i | o_i) ]     (ICQ-MA's policy loss J_pi)
As alpha -> infinity the target is the SARSA target r + gamma Q̄_tot(s', a'); as alpha -> 0 its batch average tends to
r + gamma max_B Q̄_tot(s', a'), the best next value seen in the batch.

Agent inputs follow --obs-mode as in omiga.py: "state" (default, global state + one-hot id) or "local".

Discrete actions (SMAX maps, --env 5m_vs_6m): pi_i is categorical over the actions available at o_i (the others
masked to probability 0) and Q_i takes the one-hot action; the losses above are unchanged, and evaluation takes the
most probable available action. Agents then see their local observation + id (--obs-mode local, SMAC's setting).

Choices the paper leaves open ("published code" is the continuous multi-agent ICQ that ComaDICE runs as a baseline,
vietbt/ComaDICE agents/continuous/icq.py; OMIGA's repository has no ICQ; "ours" marks the rest):
- Ours: alpha 10,000 (OMIGA's Table 5 and the published code use 10; see the batch Z below for why 10 cannot be
  run on MuJoCo here), beta 100, gamma 0.99, tau 0.005,
  Adam lr 1e-4 (the published code's command-line default), batch 128, 2x256 ReLU networks, mixer with one hidden
  layer of 64, gradient-norm clip 1.0. Both temperatures are in units of Q:
  with MuJoCo rewards of a few per step, Q spans about 10^2 over a batch, so beta 100 gives policy weights within a few
  e-folds of each other and no single sample owns the batch; rescale beta with the reward scale (the toy test: 0.2).
- Twin critics, min per agent before mixing, for the target and the policy weights. Ours: each twin is mixed and
  regressed on the target (published code regresses the mixed min, which trains only the lower twin per sample).
- Ours: Z is the batch mean (rho = B softmax, averaging one), the estimator of E_mu[exp(Q/alpha)]; published code uses
  a plain softmax (summing to one), which shrinks every bootstrapped value by about 1/B and keeps Q near the one-step
  reward. The softmax runs across the batch's different next states, one batch-level Z standing in for every Z(s'):
  high-value next states get rho > 1/gamma, so once Q̄_tot spreads over more than a few alpha within a batch the target
  expands and the critic diverges (Hopper random-action data, rewards x1 or x20, alpha 10: in 500-1000 updates).
  The ICQ authors' own multi-agent code (YiqinYang/ICQ, ICQ-MA on SMAC) uses this B softmax too, over the batch's
  episodes at each step, with a critic temperature of 1000 (near the SARSA limit) and a policy temperature of 0.1 on
  advantages Q - E_pi[Q]. The target contracts only while gamma max_B rho <= 1, i.e. while the batch spread of
  Q̄_tot stays below about alpha log(1/gamma) = alpha / 100, hence the default alpha 10,000: ICQ's critic then sits
  near the SARSA limit (rho within about 1 % of 1) and its improvement comes from the policy weights. Measured on
  Hopper medium-replay (30,000 updates, seed 1, lr 1e-4, shared networks): alpha 10 diverged within 1,000 updates
  (mean Q_tot 198 at 1k, 7.7e3 at 2k; final return 346.0), alpha 1000 from 7,000 (85, then 4.3e3 at 8k; final 108.5),
  alpha 10,000 stayed bounded (mean Q_tot 10-68, max rho 1.02; final 506.6 +- 139.5).
- Ours: terminal transitions are sampled (their target is r) but left out of the critic's softmax, since their next
  value is not bootstrapped; a transition that ends its episode by a time limit is not sampled, because the next
  action it would bootstrap on is not in the data.
- Policy weights from the online critics and mixer before their step, detached, no baseline, as in published code.
- The paper's lambda-return over sampled trajectories is left out: one-step targets on shuffled transitions, as in
  omiga.py (published code decays by lambda over positions in a randomly drawn minibatch: no trajectory meaning).
- Policy: tanh-Gaussian with state-dependent log-std clamped to [-5, 2]; evaluation action tanh(mean), as in omiga.py.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from common.cli import POSITIVE, Rule, check_args, exit_on_user_error, parse_args
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
    alpha: float = 10_000.0
    """temperature of the critic's implicit constraint, in units of Q (ICQ's Lagrangian coefficient; OMIGA: 10,
    which diverges with the batch estimate of Z on MuJoCo: see the docstring)"""
    beta: float = 100.0
    """temperature of the policy weights softmax(w_i Q_i / beta), in units of Q (published code: 100)"""
    q_lr: float = 1e-4
    """learning rate of the local critics and the mixer"""
    policy_lr: float = 1e-4
    """learning rate of the policies"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of Q and pi"""
    mixer_hidden_dim: int = 64
    """hidden units of the mixer hypernetwork"""
    grad_clip: float = 1.0
    """gradient-norm clip of every optimizer"""


def argument_ranges(args: Args) -> dict[str, Rule]:
    """The valid range of each numeric argument of this script that common.cli's common rules do not cover."""
    return {"beta": POSITIVE}


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


# ALGO LOGIC: in-sample next actions, networks, losses and the update
# Rules for an update that fused seeds, --resume and the CUDA graph rely on (docs/adding-an-algorithm.md):
# - every parameter, buffer and metric leads with the seed dimension: agent tensors are [seeds, n, B, ...], networks
#   are BatchedLinear (never nn.Linear) and clipped_step clips each seed's gradient alone;
# - buffers change in place (copy_, lerp_, clamp_): a captured graph keeps the tensors it recorded;
# - no host sync in update(): no .item(), .cpu(), print or branch on a tensor's value; return detached metrics, which
#   the loop copies at --log-every;
# - metrics are named "losses/...", "values/...", "agents/..." and shaped [seeds] or, per agent, [seeds, n];
# - the optimizers' names are checkpoint keys, and minibatches come from run.generators alone.
@dataclass
class ICQBatch(Batch):
    next_actions: torch.Tensor = field(kw_only=True)  # [..., n_agents, B, act_dim] the dataset's next joint action


class NextActionSampler:
    """Samples transitions with the dataset's next joint action a', the action at step t + 1 of the same episode.

    Episodes are contiguous, so step t + 1 follows t unless t ends an episode. A true terminal needs no a' (nothing is
    bootstrapped; it is paired with itself); an episode cut by a time limit would need one and the data has none, so
    that transition is not sampled. Indices stay on the dataset's device: sampling copies nothing from the host."""

    def __init__(self, dataset: Dataset):
        steps = torch.arange(len(dataset), device=dataset.device)
        episode_end = torch.zeros(len(dataset), dtype=torch.bool, device=dataset.device)
        episode_end[dataset.episode_starts[1:] - 1] = True
        episode_end[-1] = True
        self.dataset = dataset
        self.indices = steps[~episode_end | dataset.dones.bool()]
        self.next_indices = torch.where(episode_end, steps, steps + 1)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None) -> ICQBatch:
        """A minibatch; given a list of generators (fused seeds), one per generator, stacked as the leading dim."""
        pick = draw_indices(len(self.indices), batch_size, generator, self.indices.device)
        batch = self.dataset.gather(self.indices[pick])
        next_actions = self.dataset.actions[:, self.next_indices[pick]].movedim(0, -3)
        return ICQBatch(**vars(batch), next_actions=next_actions)


class TwinAgentQ(nn.Module):
    """Two independent Q_i(o_i, a_i) per agent, the twins as two groups of weight sets of one batched network, within
    each seed's: obs [..., n, B, obs_dim] -> [..., 2, n, B]."""

    def __init__(self, weight_sets: int, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.q = AgentQ(2 * weight_sets, obs_dim, act_dim, hidden_dim)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        def twice(x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(-4).expand(*x.shape[:-3], 2, *x.shape[-3:])

        return self.q(twice(obs), twice(actions))


class Agents(nn.Module):
    """Every network of ICQ; targets are Polyak copies."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks, args.num_seeds)
        self.q = TwinAgentQ(nets, obs_dim, act_dim, args.hidden_dim)
        self.mixer = Mixer(state_dim, n_agents, args.mixer_hidden_dim, args.num_seeds)
        self.policy = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)
        self.q_target, self.mixer_target = (copy.deepcopy(m).requires_grad_(False) for m in (self.q, self.mixer))


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    """Adam is elementwise, so one Adam over the seeds' stacked weights is one independent Adam per seed."""
    capturable = captures_graph(args, next(agents.parameters()).device)  # the graph holds the step counters
    return {
        "q": torch.optim.Adam([*agents.q.parameters(), *agents.mixer.parameters()], lr=args.q_lr,
                              capturable=capturable),
        "policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr, capturable=capturable),
    }


def batch_softmax_weights(values: torch.Tensor, temperature: float, live: torch.Tensor | None = None) -> torch.Tensor:
    """B softmax_B(values / temperature) over the last (batch) axis, the minibatch estimate of exp(Q/temperature) / Z
    with Z = E_mu[exp(Q/temperature)]: the weights average one. Entries not `live` get zero and do not count in Z."""
    if live is None:
        return torch.softmax(values / temperature, dim=-1) * values.shape[-1]
    logits = (values / temperature).masked_fill(~live, float("-inf"))
    # With no live entry the softmax is all NaN; torch.where then gives zeros.
    return torch.where(live, torch.softmax(logits, dim=-1) * live.sum(-1, keepdim=True), 0.0)


def icq_target(rewards: torch.Tensor, dones: torch.Tensor, next_q_tot: torch.Tensor, gamma: float,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """T_IC in-sample: y = r + gamma (1 - done) rho Q̄_tot(s', a'), rho the batch-softmax weights over the non-terminal
    samples (zero on terminals). Returns y and rho."""
    rho = batch_softmax_weights(next_q_tot, alpha, live=dones == 0)
    return rewards + gamma * rho * next_q_tot, rho


def q_loss(q_tot: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_Q for one twin: squared error of the mixed Q against the (detached) implicit-constraint target; [..., B] ->
    [...]."""
    return (q_tot - target.detach()).pow(2).mean(-1)


def policy_loss(log_prob: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_pi: behaviour cloning weighted per sample (weights detached); log_prob, weights [..., n, B], summed over
    agents."""
    return -(weights.detach() * log_prob).mean(-1).sum(-1)


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


def update(agents: Agents, optimizers: dict, batch: ICQBatch, args: Args) -> dict[str, torch.Tensor]:
    """One ICQ update: critics and mixer on the in-sample implicit-constraint target, then the policies by weighted
    behaviour cloning with weights from the critics before their step."""
    with torch.no_grad():
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_q = agents.q_target(batch.next_obs, batch.next_actions).min(-3).values
        target, rho = icq_target(batch.rewards, batch.dones, mix(next_w, next_q, next_b), args.gamma, args.alpha)

    w, b = agents.mixer(batch.states)
    q_twins = agents.q(batch.obs, batch.actions)
    q1_tot, q2_tot = mix(w, q_twins[..., 0, :, :], b), mix(w, q_twins[..., 1, :, :], b)
    loss_q = q_loss(q1_tot, target) + q_loss(q2_tot, target)
    policy_weights = batch_softmax_weights(w.detach() * q_twins.detach().min(-3).values, args.beta)
    clipped_step(optimizers["q"], loss_q, args.grad_clip, args.num_seeds)

    loss_pi = policy_loss(agents.policy.log_prob(batch.obs, batch.actions, batch.avail), policy_weights)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip, args.num_seeds)

    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/q": loss_q.detach(), "losses/policy": loss_pi.detach(), "values/q_tot": q1_tot.detach().mean(-1),
            "values/target_weight_max": rho.amax(-1), "values/policy_weight_max": policy_weights.amax((-2, -1))}


# TRY NOT TO MODIFY: the training loop (common/run.py holds its machinery)
if __name__ == "__main__":
    with exit_on_user_error():
        args, checkpoint = parse_args(Args)
        check_args(args, argument_ranges(args))
        device = prepare_device(args, checkpoint)
        env, dataset, dataset_file = load_env_and_dataset(args, device, checkpoint)
    run = Run(__file__, args, checkpoint, device, env, dataset.card())
    transitions = NextActionSampler(dataset)
    run.announce(f"{len(dataset):,} transitions ({len(transitions):,} with a next action) from {dataset_file}")

    agents = build_seeds(lambda a: Agents(env.n_agents, env.obs_dim, env.act_dim, dataset.state_dim, a,
                                          env.discrete), args).to(device)
    optimizers = make_optimizers(agents, args)
    run.attach(agents, optimizers)
    update_step = compile_update(update, args, device)
    for step in run.steps():
        metrics = update_step(agents, optimizers, transitions.sample(args.batch_size, run.generators), args)
        if step % args.log_every == 0 or step == args.total_steps:
            run.log(step, metrics)
        if step % args.eval_every == 0 and step < args.total_steps:
            run.evaluate(step)
        if run.stop.requested:
            run.stop_after(step)
    run.finish()
