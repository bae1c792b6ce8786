"""OMIGA: offline MARL with implicit global-to-local value regularization (Wang et al., NeurIPS 2023).

Per agent i: V_i(o_i), Q_i(o_i, a_i) and a tanh-Gaussian policy pi_i(a_i | o_i); a mixer hypernetwork on the global
state s gives w(s) = |.| >= 0 and b(s). Targets (bar) are Polyak copies of V, Q and the mixer.

    Q_tot(s, a) = sum_i w_i(s) Q_i(o_i, a_i) + b(s),   V_tot(s) = sum_i w_i(s) V_i(o_i) + b(s)          (Eq. 8)
    z_i = w̄_i(s) (Q̄_i(o_i, a_i) - V_i(o_i)) / alpha                                                   (Eq. 9)
    L_V  = E_D[ exp(z_i) + w̄_i(s) V_i(o_i) / alpha ]              -> E_mu[exp(z_i)] = 1 at the optimum   (Eq. 11, 12)
    L_Q  = E_D[ (r + gamma (1 - done) V̄_tot(s') - Q_tot(s, a))^2 ]   over Q_i, w, b                    (Eq. 13)
    L_pi = -E_D[ sg(exp(z_i)) log pi_i(a_i | o_i) ]                                                    (Eq. 14)

Agent inputs follow --obs-mode: "state" (default) gives every agent the global state plus a one-hot id, the setting
of the papers' MuJoCo experiments; "local" gives each agent its local observation (agent_obsk=1) plus the id.

Discrete actions (SMAX maps, --env 5m_vs_6m): pi_i is categorical over the actions available at o_i (the others
masked to probability 0) and Q_i takes the one-hot action; the losses above are unchanged, and evaluation takes the
most probable available action. Agents then see their local observation + id (--obs-mode local, SMAC's setting).

Choices the paper leaves open (published code's, unless marked "ours"):
- alpha 10, gamma 0.99, tau 0.005, Adam lr 5e-4, batch 128, 1e6 updates, 2x256 ReLU networks, mixer with one hidden
  layer of 64 on the global state, gradient-norm clip 1.0.
- w̄ in z is the target mixer's weights (detached); Q̄ is the target Q.
- Ours: L_V is computed as exp(z - c) + exp(-c) w̄ V / alpha with c_i a running average of the minibatch maximum of
  z_i, tracked at the target networks' rate tau (c_i is raised to max_B z_i - 50 only where exp would overflow float32).
  A constant c is a positive rescaling of the loss, so its minimiser is unchanged. The published code shifts by the
  minibatch's own maximum instead: that scales each minibatch's gradient by exp(-max_B z), smallest exactly when the
  batch holds a large z (which says "raise V"), so the SGD fixed point leaves E_mu[exp(z)] = 1 (about 2.9 at std(z) = 3
  and batch 128; harmless at alpha 10, where std(z) stays small). z is not clamped inside L_V (a clamp would zero the
  exp term's gradient for the largest z and let the linear term push V the wrong way); the policy weight uses
  exp(clamp(z, -10, 10)).
- Policy: state-dependent log-std clamped to [-5, 2]; dataset actions clamped to +-(1 - 1e-6) before atanh;
  evaluation action tanh(mean).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from common.cli import POSITIVE, Rule, check_args, exit_on_user_error, parse_args
from common.datasets import Batch
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
    """regularisation strength alpha of the global KL(pi_tot || mu_tot) (OMIGA: 10; 1 for HalfCheetah medium)"""
    q_lr: float = 5e-4
    """learning rate of the local Q networks and the mixer"""
    v_lr: float = 5e-4
    """learning rate of the local V networks"""
    policy_lr: float = 5e-4
    """learning rate of the policies"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of V, Q and pi"""
    mixer_hidden_dim: int = 64
    """hidden units of the mixer hypernetwork"""
    grad_clip: float = 1.0
    """gradient-norm clip of every optimizer"""
    z_clip: float = 10.0
    """z is clamped to [-z_clip, z_clip] in the policy weight exp(z)"""


def argument_ranges(args: Args) -> dict[str, Rule]:
    """The valid range of each numeric argument of this script that common.cli's common rules do not cover."""
    return {"z_clip": POSITIVE}


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
    """Every network of OMIGA; targets are Polyak copies."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks, args.num_seeds)
        self.v = AgentValue(nets, obs_dim, args.hidden_dim)
        self.q = AgentQ(nets, obs_dim, act_dim, args.hidden_dim)
        self.mixer = Mixer(state_dim, n_agents, args.mixer_hidden_dim, args.num_seeds)
        self.policy = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)
        self.v_target, self.q_target, self.mixer_target = (copy.deepcopy(m).requires_grad_(False) for m in (self.v, self.q, self.mixer))
        self.register_buffer("value_shift", torch.zeros(args.num_seeds, n_agents))


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    """Adam is elementwise, so one Adam over the seeds' stacked weights is one independent Adam per seed."""
    capturable = captures_graph(args, next(agents.parameters()).device)  # the graph holds the step counters
    return {
        "v": torch.optim.Adam(agents.v.parameters(), lr=args.v_lr, capturable=capturable),
        "q": torch.optim.Adam([*agents.q.parameters(), *agents.mixer.parameters()], lr=args.q_lr,
                              capturable=capturable),
        "policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr, capturable=capturable),
    }


EXP_HEADROOM = 50.0  # exp(z - c) <= e^50 in the value loss; float32 overflows at e^88


def value_loss(v: torch.Tensor, q_target: torch.Tensor, w: torch.Tensor, alpha: float, shift: torch.Tensor) -> torch.Tensor:
    """L_V (Eq. 12) per agent, summed over agents; v, q_target, w [..., n, B] -> [...]. Scaled by exp(-c) with c the
    running shift [..., n] (raised to max_B z - EXP_HEADROOM where exp would overflow): the same c for every minibatch
    keeps the minibatch gradients unbiased, so SGD's fixed point is the minimiser E_mu[exp(z)] = 1."""
    z = w * (q_target - v) / alpha
    c = torch.maximum(shift, z.detach().max(-1).values - EXP_HEADROOM)[..., None]
    return (torch.exp(z - c) + torch.exp(-c) * w * v / alpha).mean(-1).sum(-1)


@torch.no_grad()
def track_shift(shift: torch.Tensor, z: torch.Tensor, rate: float) -> None:
    """Move the value loss's shift c [..., n] towards this minibatch's max of z [..., n, B], after the loss used it."""
    shift.lerp_(z.max(-1).values, rate)


def q_loss(q_tot: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, next_v_tot: torch.Tensor, gamma: float) -> torch.Tensor:
    """L_Q (Eq. 13): squared TD error of the mixed Q against r + gamma (1 - done) V̄_tot(s'); [..., B] -> [...]."""
    target = rewards + gamma * (1.0 - dones) * next_v_tot
    return (q_tot - target.detach()).pow(2).mean(-1)


def policy_loss(log_prob: torch.Tensor, z: torch.Tensor, z_clip: float) -> torch.Tensor:
    """L_pi (Eq. 14): advantage-weighted behaviour cloning, weights exp(clamp(z)) detached; summed over agents."""
    weight = torch.exp(z.detach().clamp(-z_clip, z_clip))
    return -(weight * log_prob).mean(-1).sum(-1)


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


def update(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """One OMIGA update (OMIGA, Algorithm 1): V (Eq. 12), then Q and mixer (Eq. 13), then policy (Eq. 14)."""
    with torch.no_grad():
        w_target, _ = agents.mixer_target(batch.states)
        q_target = agents.q_target(batch.obs, batch.actions)
        next_w, next_b = agents.mixer_target(batch.next_states)
        next_v_tot = mix(next_w, agents.v_target(batch.next_obs), next_b)

    v = agents.v(batch.obs)
    loss_v = value_loss(v, q_target, w_target, args.alpha, agents.value_shift)
    clipped_step(optimizers["v"], loss_v, args.grad_clip, args.num_seeds)
    z = w_target * (q_target - v.detach()) / args.alpha
    track_shift(agents.value_shift, z, args.tau)

    w, b = agents.mixer(batch.states)
    q_tot = mix(w, agents.q(batch.obs, batch.actions), b)
    loss_q = q_loss(q_tot, batch.rewards, batch.dones, next_v_tot, args.gamma)
    clipped_step(optimizers["q"], loss_q, args.grad_clip, args.num_seeds)

    loss_pi = policy_loss(agents.policy.log_prob(batch.obs, batch.actions, batch.avail), z, args.z_clip)
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip, args.num_seeds)

    soft_update(agents.v_target, agents.v, args.tau)
    soft_update(agents.q_target, agents.q, args.tau)
    soft_update(agents.mixer_target, agents.mixer, args.tau)
    return {"losses/v": loss_v.detach(), "losses/q": loss_q.detach(), "losses/policy": loss_pi.detach(),
            "values/q_tot": q_tot.detach().mean(-1), "values/v": v.detach().mean((-2, -1)),
            "values/weight_mean": torch.exp(z.clamp(-args.z_clip, args.z_clip)).mean((-2, -1))}


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
        metrics = update_step(agents, optimizers, dataset.sample(args.batch_size, run.generators), args)
        if step % args.log_every == 0 or step == args.total_steps:
            run.log(step, metrics)
        if step % args.eval_every == 0 and step < args.total_steps:
            run.evaluate(step)
        if run.stop.requested:
            run.stop_after(step)
    run.finish()
