"""BC: behaviour cloning of every agent's policy by maximum likelihood of the dataset's actions (imitation learning
as in Pomerleau 1991, "Efficient Training of Artificial Neural Networks for Autonomous Navigation"); the simplest
baseline of offline MARL comparisons, one that ComaDICE's published code (Bui et al., ICLR 2025) also runs.

Per agent i: a tanh-Gaussian policy pi_i(a_i | o_i), the same class as omiga.py's. Nothing else is learned: no
values, no mixer, no rewards. The dataset's joint behaviour policy is a product of per-agent policies when each agent's
noise is independent (as in this project's generated data), so fitting each pi_i to its own agent's actions is
maximum likelihood of the joint actions:

    L_pi = -sum_i E_D[ log pi_i(a_i | o_i) ]                  (maximum likelihood; minimiser pi_i = mu_i where mu_i
                                                                is in the policy class)

Agent inputs follow --obs-mode as in omiga.py: "state" (default, global state + one-hot id) or "local".

Discrete actions (SMAX maps, --env 5m_vs_6m): pi_i is categorical over the actions available at o_i (the others
masked to probability 0); the loss above is unchanged, and evaluation takes the most probable available action.
Agents then see their local observation + id (--obs-mode local, SMAC's setting).

Choices the method leaves open (ours, unless marked otherwise):
- The policy class, its log-std clamp [-5, 2], the dataset-action clamp +-(1 - 1e-6) before atanh and the evaluation
  action tanh(mean) are omiga.py's, so BC is exactly OMIGA's policy step with every weight exp(z) set to 1.
- Adam lr 5e-4, batch 128, 2x256 ReLU networks, gradient-norm clip 1.0: OMIGA's published settings, so BC differs from
  the template only in its loss. ComaDICE's published BC baseline uses the same loss (mean over agents there, a sum
  here: a constant factor n that Adam's scale invariance removes).
- The shared network block above the algorithm keeps the value, Q and mixer classes that BC does not use, so that
  block stays byte-identical across scripts.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.cli import Rule
from common.collect import ensure_dataset
from common.datasets import Batch, load_dataset
from common.envs import make_env
from common.evaluation import evaluate
from common.results import RunResult, write_json


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
    num_seeds: int = 1
    """train the seeds seed, seed+1, ..., seed+num_seeds-1 as one batched computation, with one run directory each
    and the numbers of separate runs (omiga.py, omcda.py, comadice.py and icq.py)"""
    compile: bool = False
    """if toggled, compile the update step with torch.compile (and CUDA graphs on a GPU)"""
    tf32: bool = True
    """if toggled, float32 matmuls on a GPU run on TensorFloat-32 tensor cores (`--no-tf32`: full float32)"""

    # Algorithm specific arguments
    policy_lr: float = 5e-4
    """learning rate of the policies"""
    hidden_dim: int = 256
    """hidden units of the two hidden layers of pi"""
    grad_clip: float = 1.0
    """gradient-norm clip of the optimizer"""


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
class Agents(nn.Module):
    """Every network of BC: the agents' policies only (state_dim is accepted for the shared constructor call)."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, state_dim: int, args: Args,
                 discrete: bool = False):
        super().__init__()
        nets = count_weight_sets(n_agents, args.per_agent_networks)
        self.policy = make_policy(discrete, nets, obs_dim, act_dim, args.hidden_dim)


def make_optimizers(agents: Agents, args: Args) -> dict[str, torch.optim.Optimizer]:
    return {"policy": torch.optim.Adam(agents.policy.parameters(), lr=args.policy_lr)}


def policy_loss(log_prob: torch.Tensor) -> torch.Tensor:
    """L_pi: negative log-likelihood of the dataset actions, log_prob [n, B]; mean over the batch, summed over agents."""
    return -log_prob.mean(1).sum()


def clipped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return grad_norm


def update(agents: Agents, optimizers: dict, batch: Batch, args: Args) -> dict[str, torch.Tensor]:
    """One BC update: a gradient step on the policies' negative log-likelihood."""
    if isinstance(agents.policy, CategoricalPolicy):
        loss_pi = policy_loss(agents.policy.log_prob(batch.obs, batch.actions, batch.avail))
        clipped_step(optimizers["policy"], loss_pi, args.grad_clip)
        return {"losses/policy": loss_pi.detach()}
    mean, log_std = agents.policy(batch.obs)
    loss_pi = policy_loss(tanh_gaussian_log_prob(mean, log_std, batch.actions))
    clipped_step(optimizers["policy"], loss_pi, args.grad_clip)
    return {"losses/policy": loss_pi.detach(), "values/gaussian_std": log_std.detach().exp().mean()}


# TRY NOT TO MODIFY: running, logging, evaluation, checkpoints
def make_act_fn(policy: nn.Module, device: torch.device):
    @torch.no_grad()
    def act(obs: np.ndarray, avail: np.ndarray | None = None) -> np.ndarray:
        """Deterministic actions: obs [E, n, obs_dim]; on discrete envs the masks avail [E, n, A] come too and the
        actions go back as indices [E, n]."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).transpose(0, 1)
        avail_t = None if avail is None else torch.as_tensor(avail, device=device).transpose(0, 1)
        actions = policy.act(obs_t, avail_t).transpose(0, 1)
        return (actions if avail is None else actions.argmax(-1)).cpu().numpy()

    return act


def save_checkpoint(path: Path, agents: nn.Module, optimizers: dict, step: int, args: Args, dataset_card: dict,
                    generator: torch.Generator, evaluations: list[dict]) -> None:
    """Everything `--resume` needs to continue the run as if it had not stopped, written atomically: networks,
    optimizers, step, every random number generator (the sampling generator, Python's, NumPy's, torch's) and the
    evaluations so far; and what it must be resumed with, the script and the dataset's card."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all(), "sampling": generator.get_state()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"agents": agents.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "step": step, "args": asdict(args), "rng": rng, "device": generator.device.type,
                "evaluations": evaluations, "script": Path(__file__).name, "dataset": dataset_card}, tmp)
    os.replace(tmp, path)


def restore_checkpoint(checkpoint: dict, agents: nn.Module, optimizers: dict, generator: torch.Generator) -> None:
    """Load a `save_checkpoint` into the networks and optimizers and set every random number generator to its state;
    called after everything that draws random numbers at start-up."""
    agents.load_state_dict(checkpoint["agents"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    rng = checkpoint["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["sampling"])


def scalar_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Host copies of the metrics (log intervals only); a per-agent vector `name` becomes `name_0`, `name_1`, ..."""
    values = {}
    for name, value in metrics.items():
        if value.ndim == 0:
            values[name] = value.item()
        else:
            values.update({f"{name}_{i}": x for i, x in enumerate(value.tolist())})
    return values


def check_finite(metrics: dict[str, float], step: int, last_checked: int) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged: {name} = {value} at the log of update {step} "
                                     f"(finite at update {last_checked}); check the data first (a warning at load "
                                     f"names extreme rewards), then try a smaller learning rate or larger alpha")


def unique_dir(base: Path) -> Path:
    """Create and return `base`, or `base_2`, `base_3`, ... when a run of the same name started in the same second."""
    for attempt in range(1, 1000):
        run_dir = base if attempt == 1 else base.with_name(f"{base.name}_{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a fresh run directory next to {base}")


def make_run(args: Args, start_step: int) -> tuple[Path, SummaryWriter]:
    """A fresh run directory, or with --resume the run's own, where TensorBoard continues after `start_step` (what a
    stopped run logged after its checkpoint is discarded)."""
    name = f"{args.env}__{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume) if args.resume else unique_dir(Path("runs") / name)
    write_json(run_dir / "args.json", asdict(args))
    writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if args.resume else None)
    if not args.resume:
        table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, config=asdict(args), name=run_dir.name, sync_tensorboard=True,
                   dir=str(run_dir), id=run_dir.name, resume="allow")
    return run_dir, writer


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


if __name__ == "__main__":
    from common.cli import (ONE_SEED_EAGER, StopOnSignal, check_args, check_device, check_same_dataset,
                            evaluation_due, exit_on_user_error, parse_args)

    with exit_on_user_error():
        args, checkpoint = parse_args(Args)
        check_args(args, {**ONE_SEED_EAGER, **argument_ranges(args)})
        seed_everything(args.seed, args.torch_deterministic)
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        check_device(checkpoint, device)
        env = make_env(args.env, args.agent_conf, args.obs_mode)
        dataset_file = ensure_dataset(args.data_dir, args.env, env.agent_conf, args.dataset,
                                      generate=not args.no_generate)
        dataset = load_dataset(dataset_file, device, args.obs_mode)
        dataset.check_env(env)
        dataset_card = dataset.card()
        check_same_dataset(checkpoint, dataset_card)
    start_step = checkpoint["step"] if checkpoint else 0
    run_dir, writer = make_run(args, start_step)
    stop = StopOnSignal()  # from here on, SIGINT and SIGTERM end every stage with a checkpoint
    print(f"{run_dir}: {len(dataset):,} transitions from {dataset_file} on {device}"
          + (f", resumed at update {start_step}" if checkpoint else ""))

    agents = Agents(env.n_agents, env.obs_dim, env.act_dim, dataset.state_dim, args, env.discrete).to(device)
    optimizers = make_optimizers(agents, args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    result = RunResult(run_dir, asdict(args), device, dataset_card, checkpoint["evaluations"] if checkpoint else [])

    def save(step: int) -> Path:
        path = run_dir / "model.pt"
        save_checkpoint(path, agents, optimizers, step, args, dataset_card, generator, result.evaluations)
        return path

    def save_and_close(step: int, stage: str) -> str:
        """Checkpoint update `step` and close the writer: the line a run stopped in `stage` ends with."""
        path = save(step)
        writer.close()
        return f"stopped {stage}; checkpoint saved to {path}"

    if checkpoint:
        restore_checkpoint(checkpoint, agents, optimizers, generator)
    act_fn = make_act_fn(agents.policy, device)
    eval_seed = 1_000_000 * (args.seed + 1)

    def evaluate_and_record(step: int, episodes: int, finished: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        agents.eval()
        with stop.interruptible(lambda: save_and_close(step, f"in the evaluation of update {step}, which --resume redoes")):
            returns, wins = evaluate(act_fn, env, episodes, eval_seed)
        agents.train()
        writer.add_scalar("eval/return_mean", float(returns.mean()), step)
        writer.add_scalar("eval/return_std", float(returns.std()), step)
        if wins is not None:
            writer.add_scalar("eval/win_rate", float(wins.mean()), step)
        result.add_evaluation(step, returns, finished, wins)
        return returns, wins

    def evaluate_periodically(step: int) -> float:
        returns, _ = evaluate_and_record(step, args.eval_episodes)
        tqdm.write(f"step {step}: eval return {returns.mean():.1f} ± {returns.std():.1f}")
        if args.save_model:
            save(step)
        return float(returns.mean())

    if checkpoint and start_step < args.total_steps and evaluation_due(checkpoint, args):
        evaluate_periodically(start_step)  # the evaluation a signal abandoned
    last_eval = result.evaluations[-1]["mean"] if result.evaluations else float("nan")
    last_checked, tick, tick_step = start_step, time.perf_counter(), start_step
    progress = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps,
                    mininterval=2.0, desc=args.exp_name)
    for step in progress:
        metrics = update(agents, optimizers, dataset.sample(args.batch_size, generator), args)
        if step % args.log_every == 0 or step == args.total_steps:
            values = scalar_metrics(metrics)
            check_finite(values, step, last_checked)
            last_checked = step
            seconds = time.perf_counter() - tick
            updates_per_sec = (step - tick_step) / seconds
            result.time(step - tick_step, seconds)
            tick, tick_step = time.perf_counter(), step
            for name, value in values.items():
                writer.add_scalar(name, value, step)
            writer.add_scalar("charts/updates_per_sec", updates_per_sec, step)
            progress.set_postfix(ups=f"{updates_per_sec:.0f}", eval=f"{last_eval:.0f}")
        if step % args.eval_every == 0 and step < args.total_steps:
            last_eval = evaluate_periodically(step)
            tick = time.perf_counter()
        if stop.requested:
            progress.close()
            stop.exit(save_and_close(step, f"after update {step} of {args.total_steps}"))

    returns, wins = evaluate_and_record(args.total_steps, args.final_eval_episodes, finished=True)
    if args.save_model:
        save(args.total_steps)
    writer.close()
    print(f"final return: {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
          + (f", win rate {wins.mean():.2f}" if wins is not None else ""))
    if stop.requested:  # during the final writes, which completed
        stop.exit("received after the final evaluation: the run is complete")
