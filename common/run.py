"""The run machinery every algorithm script shares, none of it algorithm: the device, the environment and dataset,
fused seeds' initialisation, run directories and TensorBoard writers, checkpoints, host copies of the metrics,
evaluations and their records, stopping on a signal, and CUDA-graph capture of the update. A script's training
loop (the end of omiga.py) builds a `Run`, attaches its networks and optimizers to it (which restores --resume's
checkpoint), and for each of `run.steps()` samples from `run.generators`, updates, and calls `run.log`,
`run.evaluate` and `run.stop_after` at their intervals; `run.finish()` ends it.

Fused scripts (omiga.py, omcda.py, icq.py, comadice.py) train --num-seeds seeds as one computation: every network
weight, buffer and metric carries a leading seed dimension. The other scripts train one seed, without that dimension.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.cli import StopOnSignal, check_device, check_same_dataset, evaluation_due
from common.collect import ensure_dataset
from common.datasets import Batch, load_dataset
from common.envs import make_env
from common.evaluation import evaluate, evaluate_seeds
from common.results import RunResult, write_json


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def prepare_device(args: Any, checkpoint: dict | None) -> torch.device:
    """Seed every generator from --seed and pick the device: CUDA when there is one and --cuda, else the CPU; a
    resumed run must continue on the kind of device it was trained on."""
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    check_device(checkpoint, device)
    return device


def load_env_and_dataset(args: Any, device: torch.device, checkpoint: dict | None):
    """The environment and its dataset on `device` (generated from the committed behaviour policies if missing, unless
    --no-generate), checked against each other and against --resume's dataset: (env, dataset, dataset file)."""
    env = make_env(args.env, args.agent_conf, args.obs_mode)
    dataset_file = ensure_dataset(args.data_dir, args.env, env.agent_conf, args.dataset, generate=not args.no_generate)
    dataset = load_dataset(dataset_file, device, args.obs_mode)
    dataset.check_env(env)
    check_same_dataset(checkpoint, dataset.card())
    return env, dataset, dataset_file


def build_seeds(build: Callable[[Any], nn.Module], args: Any) -> nn.Module:
    """`build(args)` for args.num_seeds fused seeds, seed k's slice of every weight initialised exactly as a run with
    --seed seed+k alone initialises it: every parameter and buffer holds the seeds' weight sets along its first dim,
    in seed order."""
    singles = []
    for k in range(args.num_seeds):
        torch.manual_seed(args.seed + k)
        singles.append(build(replace(args, num_seeds=1)).state_dict())
    fused = build(args)
    fused.load_state_dict({name: torch.cat([single[name] for single in singles]) for name in singles[0]})
    torch.manual_seed(args.seed)
    return fused


def capture_graph(update_fn):
    """`update_fn` recorded once as one CUDA graph and replayed at every step: the step's hundreds of small kernels
    become one launch. Each replay reads the minibatch from fixed buffers and returns the same metric tensors, which
    the next replay overwrites. Recording needs the optimizers' states to exist, so three warm-up steps run first, on
    the first minibatch; every weight, buffer and optimizer state is then put back as it was, so the run trains from
    the same start as eager."""
    graph, static_inputs, static_metrics = None, None, None

    def step(agents: nn.Module, optimizers: dict, *inputs) -> dict[str, torch.Tensor]:
        """inputs: the update's minibatches (Batch), then its arguments."""
        nonlocal graph, static_inputs, static_metrics
        if graph is None:
            start = {name: value.clone() for name, value in agents.state_dict().items()}
            states = [{param: {key: value.clone() for key, value in state.items()}
                       for param, state in optimizer.state.items()} for optimizer in optimizers.values()]
            static_inputs = [type(x)(**{name: None if value is None else value.clone()
                                        for name, value in vars(x).items()}) if isinstance(x, Batch) else x
                             for x in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    update_fn(agents, optimizers, *static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_metrics = update_fn(agents, optimizers, *static_inputs)
            with torch.no_grad():
                for name, value in agents.state_dict().items():
                    value.copy_(start[name])
                for optimizer, saved in zip(optimizers.values(), states):
                    for param, state in optimizer.state.items():
                        for key, value in state.items():
                            value.copy_(saved[param][key]) if param in saved else value.zero_()
        for static, given in zip(static_inputs, inputs):
            if isinstance(given, Batch):
                for name, value in vars(given).items():
                    if value is not None:
                        getattr(static, name).copy_(value)
        graph.replay()
        return static_metrics

    return step


def captures_graph(args: Any, device: torch.device) -> bool:
    """Whether the update runs as a captured CUDA graph: on CUDA, unless --no-cuda-graph. Its optimizers must then
    keep their step counters on the device (Adam's `capturable`)."""
    return device.type == "cuda" and args.cuda_graph


def compile_update(update_fn, args: Any, device: torch.device):
    """The update step as it runs: eager on the CPU; on CUDA captured as one CUDA graph (capture_graph) unless
    --no-cuda-graph; --compile puts torch.compile under either."""
    step = torch.compile(update_fn, dynamic=False) if args.compile else update_fn
    return capture_graph(step) if captures_graph(args, device) else step


def make_act_fn(policy: nn.Module, device: torch.device, seeds: int, fused: bool):
    """The deterministic actions of every seed's policy for the evaluation: obs [seeds * E, n, obs_dim], seed-major;
    on discrete envs the masks avail [seeds * E, n, A] come too and the actions go back as indices [seeds * E, n]."""
    def agent_major(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """[seeds * E, n, d] -> [seeds, n, E, d] (fused) or [n, E, d]."""
        x_t = torch.as_tensor(x, dtype=dtype, device=device)
        return x_t.reshape(seeds, -1, *x_t.shape[1:]).transpose(1, 2) if fused else x_t.transpose(0, 1)

    @torch.no_grad()
    def act(obs: np.ndarray, avail: np.ndarray | None = None) -> np.ndarray:
        avail_t = None if avail is None else agent_major(avail, torch.bool)
        actions = policy.act(agent_major(obs, torch.float32), avail_t)
        actions = actions.transpose(-3, -2).reshape(obs.shape[0], obs.shape[1], -1)
        return (actions if avail is None else actions.argmax(-1)).cpu().numpy()

    return act


def seed_metrics(metrics: dict[str, torch.Tensor], seeds: int, fused: bool) -> list[dict[str, float]]:
    """Host copies of every seed's metrics (log intervals only): each metric is [seeds] or, per agent, [seeds, n]
    (without the seed dimension when not fused); a per-agent vector `name` becomes `name_0`, `name_1`, ..."""
    if not fused:
        metrics = {name: value[None] for name, value in metrics.items()}
    host = {name: value.reshape(seeds, -1).cpu() for name, value in metrics.items()}
    per_seed = []
    for k in range(seeds):
        values = {}
        for name, value in host.items():
            if metrics[name].ndim <= 1:
                values[name] = value[k, 0].item()
            else:
                values.update({f"{name}_{i}": x for i, x in enumerate(value[k].tolist())})
        per_seed.append(values)
    return per_seed


def check_finite(metrics: dict[str, float], step: int, last_checked: int, seed: int) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged: {name} = {value} at the log of update {step} of seed {seed} "
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


def make_runs(args: Any, seeds: list[int], checkpoint: dict | None) -> tuple[list[Path], list[SummaryWriter]]:
    """One run directory per seed, fresh, or with --resume the run's own (the first seed's holds model.pt), where
    TensorBoard continues after the checkpoint's step (what a stopped run logged after its checkpoint is discarded)."""
    if checkpoint:  # the first seed's directory is the one resumed; the other seeds' are its siblings
        resumed = Path(args.resume)
        run_dirs = [resumed] + [resumed.parent / name for name in checkpoint["run_dirs"][1:]]
    else:
        started = int(time.time())
        run_dirs = [unique_dir(Path("runs") / f"{args.env}__{args.dataset}__{args.exp_name}__{seed}__{started}")
                    for seed in seeds]
    writers = []
    for run_dir, seed in zip(run_dirs, seeds):
        seed_args = asdict(replace(args, seed=seed))
        write_json(run_dir / "args.json", seed_args)
        writer = SummaryWriter(str(run_dir), purge_step=checkpoint["step"] + 1 if checkpoint else None)
        if not checkpoint:
            table = "\n".join(f"|{key}|{value}|" for key, value in seed_args.items())
            writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, config=seed_args, name=run_dir.name, sync_tensorboard=True,
                       dir=str(run_dir), id=run_dir.name, resume="allow", reinit="create_new")
        writers.append(writer)
    return run_dirs, writers


class Run:
    """One training run of every seed: its directories, writers and result files, the minibatch generators, the
    checkpoint, the evaluations, the progress bar and SIGINT/SIGTERM (from construction on, a signal ends every stage
    with a checkpoint). `fused`: the networks and metrics carry a leading seed dimension (--num-seeds)."""

    def __init__(self, script_file: str, args: Any, checkpoint: dict | None, device: torch.device, env,
                 dataset_card: dict, fused: bool = True):
        self.script, self.args, self.checkpoint, self.device, self.env = Path(script_file).name, args, checkpoint, device, env
        self.dataset_card, self.fused = dataset_card, fused
        self.seeds = list(range(args.seed, args.seed + (args.num_seeds if fused else 1)))
        self.start_step = checkpoint["step"] if checkpoint else 0
        self.dirs, self.writers = make_runs(args, self.seeds, checkpoint)
        self.stop = StopOnSignal()
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in self.seeds]
        self.results = [RunResult(run_dir, asdict(replace(args, seed=seed)), device, dataset_card,
                                  checkpoint["evaluations"][k] if checkpoint else [])
                        for k, (run_dir, seed) in enumerate(zip(self.dirs, self.seeds))]
        self.agents, self.optimizers, self.summary, self.act_fn = None, None, None, None
        self.last_eval = self.results[0].evaluations[-1]["mean"] if self.results[0].evaluations else float("nan")
        self.last_checked = self.tick_step = self.start_step
        self.tick = time.perf_counter()
        self.progress = None

    def announce(self, data: str) -> None:
        """The run's first line: where it writes, what it trains on and how."""
        print(f"{self.dirs[0]}: {data} on {self.device}"
              + (f", seeds {self.seeds[0]}..{self.seeds[-1]} fused" if len(self.seeds) > 1 else "")
              + (f", resumed at update {self.start_step}" if self.checkpoint else ""))

    def attach(self, agents: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
               summary: Callable[[], str] | None = None) -> None:
        """The networks and optimizers the run trains and checkpoints (the optimizers' names are the checkpoint's
        keys), restored from --resume's checkpoint; called after everything that draws random numbers at start-up.
        `summary()` is printed after each periodic evaluation."""
        self.agents, self.optimizers, self.summary = agents, optimizers, summary
        self.act_fn = make_act_fn(agents.policy, self.device, len(self.seeds), self.fused)
        if self.checkpoint:
            agents.load_state_dict(self.checkpoint["agents"])
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(self.checkpoint["optimizers"][name])
            rng = self.checkpoint["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            torch.cuda.set_rng_state_all(rng["cuda"])
            for generator, state in zip(self.generators, rng["sampling"], strict=True):
                generator.set_state(state)

    def save(self, step: int) -> Path:
        """Everything `--resume` needs to continue the run as if it had not stopped, written atomically to the first
        seed's model.pt: networks, optimizers, step, every random number generator (each seed's minibatch generator,
        Python's, NumPy's, torch's), the evaluations so far and the seeds' run directories; and what it must be
        resumed with, the script and the dataset's card."""
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all(), "sampling": [generator.get_state() for generator in self.generators]}
        path = self.dirs[0] / "model.pt"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"agents": self.agents.state_dict(),
                    "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
                    "step": step, "args": asdict(self.args), "rng": rng, "device": self.device.type,
                    "evaluations": [result.evaluations for result in self.results],
                    "run_dirs": [run_dir.name for run_dir in self.dirs], "script": self.script,
                    "dataset": self.dataset_card}, tmp)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def save_and_close(self, step: int, stage: str) -> str:
        """Checkpoint update `step` and close the writers: the line a run stopped in `stage` ends with."""
        path = self.save(step)
        self.close()
        return f"stopped {stage}; checkpoint saved to {path}"

    def record_evaluation(self, step: int, episodes: int, finished: bool = False) -> np.ndarray:
        """Evaluate every seed's policy for `episodes` episodes and record them (TensorBoard, result.json): returns
        [seeds, episodes]. A signal abandons the evaluation with a checkpoint of update `step`."""
        self.agents.eval()
        started = time.perf_counter()
        with self.stop.interruptible(
                lambda: self.save_and_close(step, f"in the evaluation of update {step}, which --resume redoes")):
            if self.fused:
                returns, wins = evaluate_seeds(self.act_fn, self.env, episodes,
                                               [1_000_000 * (seed + 1) for seed in self.seeds])
            else:
                returns, wins = evaluate(self.act_fn, self.env, episodes, 1_000_000 * (self.seeds[0] + 1))
                returns, wins = returns[None], None if wins is None else wins[None]
        seconds = time.perf_counter() - started
        self.agents.train()
        for k, (writer, result, seed_returns) in enumerate(zip(self.writers, self.results, returns)):
            seed_wins = None if wins is None else wins[k]
            writer.add_scalar("eval/return_mean", float(seed_returns.mean()), step)
            writer.add_scalar("eval/return_std", float(seed_returns.std()), step)
            if seed_wins is not None:
                writer.add_scalar("eval/win_rate", float(seed_wins.mean()), step)
            writer.add_scalar("charts/evaluation_seconds", seconds, step)
            result.time_evaluation(seconds)
            result.add_evaluation(step, seed_returns, finished, seed_wins)
        return returns

    def evaluate(self, step: int) -> None:
        """The periodic evaluation (--eval-episodes), then a checkpoint with --save-model; its time is not training's."""
        returns = self.record_evaluation(step, self.args.eval_episodes)
        tqdm.write(f"step {step}: eval return " + ", ".join(f"{r.mean():.1f} ± {r.std():.1f}" for r in returns)
                   + (f" | {self.summary()}" if self.summary else ""))
        if self.args.save_model:
            self.save(step)
        self.last_eval = float(returns[0].mean())
        self.tick = time.perf_counter()

    def steps(self):
        """The updates left to train, behind a progress bar; a resumed run first redoes the evaluation a signal
        abandoned."""
        if self.checkpoint and self.start_step < self.args.total_steps and evaluation_due(self.checkpoint, self.args):
            self.evaluate(self.start_step)
        self.tick = time.perf_counter()
        self.progress = tqdm(range(self.start_step + 1, self.args.total_steps + 1), initial=self.start_step,
                             total=self.args.total_steps, mininterval=2.0, desc=self.args.exp_name)
        return self.progress

    def log(self, step: int, metrics: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        """Host copies of the metrics (the loop's only sync with the device), checked finite and written with the
        training speed since the last log: every seed's values, for the script's own checks."""
        per_seed = seed_metrics(metrics, len(self.seeds), self.fused)
        for values, seed in zip(per_seed, self.seeds):
            check_finite(values, step, self.last_checked, seed)
        self.last_checked = step
        updates, seconds = step - self.tick_step, time.perf_counter() - self.tick
        updates_per_sec = updates / seconds
        self.tick, self.tick_step = time.perf_counter(), step
        for writer, result, values in zip(self.writers, self.results, per_seed):
            result.time(updates, seconds)
            for name, value in values.items():
                writer.add_scalar(name, value, step)
            writer.add_scalar("charts/updates_per_sec", updates_per_sec, step)
        self.progress.set_postfix(ups=f"{updates_per_sec:.0f}", eval=f"{self.last_eval:.0f}")
        return per_seed

    def stop_after(self, step: int) -> None:
        """End the run on the signal received: checkpoint update `step` and exit."""
        self.progress.close()
        self.stop.exit(self.save_and_close(step, f"after update {step} of {self.args.total_steps}"))

    def finish(self) -> None:
        """The final evaluation (--final-eval-episodes), the last checkpoint with --save-model, and the summary lines."""
        returns = self.record_evaluation(self.args.total_steps, self.args.final_eval_episodes, finished=True)
        if self.args.save_model:
            self.save(self.args.total_steps)
        self.close()
        for result, seed, seed_returns in zip(self.results, self.seeds, returns):
            win_rate = result.evaluations[-1].get("win_rate")
            print(f"final return: {seed_returns.mean():.2f} ± {seed_returns.std():.2f} over {len(seed_returns)} "
                  f"episodes" + (f", win rate {win_rate:.2f}" if win_rate is not None else "")
                  + (f" (seed {seed})" if len(self.seeds) > 1 else ""))
        training, evaluating = self.results[0].timed_seconds, self.results[0].evaluation_seconds
        print(f"time: {training:.0f} s training, {evaluating:.0f} s evaluating "
              f"({evaluating / max(training + evaluating, 1e-9):.0%} of both)")
        if self.stop.requested:  # during the final writes, which completed
            self.stop.exit("received after the final evaluation: the run is complete")
