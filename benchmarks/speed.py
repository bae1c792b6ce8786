"""Training speed: updates per second of each script's `update()` on this machine, printed as a markdown table.

    python benchmarks/speed.py [--algos ...] [--envs Hopper Ant HalfCheetah] [--batch-size 128] [--repeats 5]
                               [--updates 200] [--device auto] [--num-seeds 1 5 20] [--modes eager compile cudagraphs]
                               [--no-tf32]

For each (algo, env) the script's own Agents, optimizers and update run at the env's shapes in obs mode "state", on a
synthetic Dataset of random transitions held on the device and sampled the way the script's training loop samples it,
so the figure includes sampling and nothing else. Warm-up updates (and with them compilation and graph capture) are
excluded; a cell is the median over repeats of updates / seconds, each repeat timing `--updates` consecutive updates.

--num-seeds K trains K fused seeds (scripts with --num-seeds; the others run K = 1 only): a cell gives updates/s of
each seed and K times that, seed-updates/s. --modes: eager; compile, torch.compile of the update; cudagraphs,
torch.compile with mode "reduce-overhead" (PyTorch's CUDA graphs, one per piece between graph breaks); graph, the
eager update captured whole as one CUDA graph (the script's capture_graph); compile+graph, both (what --compile
runs on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common.datasets import Dataset  # noqa: E402
from common.envs import ENV_NAMES, MultiAgentMujocoEnv, make_env  # noqa: E402
from common.results import device_name  # noqa: E402
from common.run import capture_graph  # noqa: E402
from run import ALGOS  # noqa: E402

SYNTHETIC_TRANSITIONS = 4096
EPISODE_LENGTH = 1000


def synthetic_dataset(env: MultiAgentMujocoEnv, device: torch.device, rng: np.random.Generator) -> Dataset:
    """Random transitions with the env's shapes, in episodes of EPISODE_LENGTH steps, as a Dataset on `device`."""
    n, agents = SYNTHETIC_TRANSITIONS, env.n_agents

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal((n, *shape)).astype(np.float32)

    arrays = dict(observations=normal(agents, env.local_obs_dim), next_observations=normal(agents, env.local_obs_dim),
                  states=normal(env.state_dim), next_states=normal(env.state_dim),
                  actions=rng.uniform(-1, 1, (n, agents, env.act_dim)).astype(np.float32), rewards=normal(),
                  terminals=np.zeros(n, dtype=bool), timeouts=np.arange(1, n + 1) % EPISODE_LENGTH == 0)
    dataset = Dataset(arrays, dict(env=env.name, obs_mode="local"), "state", device)
    dataset.check_env(env)
    return dataset


COMPILE_MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead", "graph": None,
                 "compile+graph": "default"}


def fuses_seeds(algo: str) -> bool:
    return "num_seeds" in {field.name for field in dataclasses.fields(importlib.import_module(algo).Args)}


def make_update_step(algo: str, dataset: Dataset, device: torch.device, batch_size: int, seeds: int = 1,
                     mode: str = "eager") -> Callable[[], dict]:
    """One training-loop step of `algo`: sample as its main block does, then call its update() (compiled in `mode`)."""
    script = importlib.import_module(algo)
    args = dataclasses.replace(script.Args(), batch_size=batch_size)
    if fuses_seeds(algo):  # capturable optimizers wherever a graph may hold their step counters
        args = dataclasses.replace(args, num_seeds=seeds, cuda_graph=mode != "eager")
    agents = script.Agents(dataset.n_agents, dataset.obs_dim, dataset.act_dim, dataset.state_dim, args).to(device)
    optimizers = script.make_optimizers(agents, args)
    update = script.update if COMPILE_MODES[mode] is None else torch.compile(script.update, mode=COMPILE_MODES[mode],
                                                                             dynamic=False)
    if mode.endswith("graph"):
        update = capture_graph(update)
    generator = ([torch.Generator(device=device).manual_seed(k) for k in range(seeds)] if fuses_seeds(algo)
                 else torch.Generator(device=device).manual_seed(0))
    if algo == "omcda":  # freeze pi_b and start pi from it, as training does; the cloning itself is not timed
        script.pretrain_behaviour(agents, dataset, dataclasses.replace(args, bc_steps=0), generator)
    if algo == "icq":
        transitions = script.NextActionSampler(dataset)
        return lambda: update(agents, optimizers, transitions.sample(batch_size, generator), args)
    if algo == "comadice":
        return lambda: update(agents, optimizers, dataset.sample(batch_size, generator),
                              script.sample_initial_states(dataset, batch_size, generator), args)
    if algo == "omcda":
        return lambda: update(agents, optimizers, script.sample_batch(dataset, batch_size, args.behaviour_samples,
                                                                      generator), args)
    return lambda: update(agents, optimizers, dataset.sample(batch_size, generator), args)


def updates_per_second(step: Callable[[], dict], device: torch.device, updates: int, repeats: int,
                       warmup: int) -> float:
    """Median over `repeats` of updates / seconds for `updates` consecutive steps, after `warmup` untimed ones."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(updates):
            step()
        synchronize()
        rates.append(updates / (time.perf_counter() - start))
    return statistics.median(rates)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--envs", nargs="+", choices=ENV_NAMES, default=list(ENV_NAMES))
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats; the table shows their median")
    parser.add_argument("--updates", type=positive_int, default=200, help="updates per timed repeat")
    parser.add_argument("--warmup", type=positive_int, default=20, help="untimed updates before the repeats")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-seeds", nargs="+", type=positive_int, default=[1], help="fused seeds K per cell")
    parser.add_argument("--modes", nargs="+", choices=tuple(COMPILE_MODES), default=["eager"])
    parser.add_argument("--no-tf32", action="store_true", help="full float32 matmuls on a GPU (the scripts' --no-tf32)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    envs = {name: make_env(name) for name in args.envs}
    datasets = {name: synthetic_dataset(env, device, rng) for name, env in envs.items()}
    configs = [(mode, seeds) for mode in args.modes for seeds in args.num_seeds]
    rates = {}
    for algo in args.algos:
        for mode, seeds in configs:
            if seeds > 1 and not fuses_seeds(algo):
                continue
            for name in args.envs:
                try:
                    step = make_update_step(algo, datasets[name], device, args.batch_size, seeds, mode)
                    rates[algo, mode, seeds, name] = updates_per_second(step, device, args.updates, args.repeats,
                                                                        args.warmup)
                except Exception as error:  # one configuration failing to compile must not lose the others
                    print(f"{algo} {mode} K={seeds} {name}: failed: {error!r}"[:2000], file=sys.stderr, flush=True)
                    rates[algo, mode, seeds, name] = float("nan")
                    torch._dynamo.reset()
                    continue
                print(f"{algo} {mode} K={seeds} {name}: {rates[algo, mode, seeds, name]:.0f} updates/s",
                      file=sys.stderr, flush=True)
                torch._dynamo.reset()

    print(f"Updates per second (per seed; seed-updates/s = K x that in brackets), batch {args.batch_size}, obs mode "
          f"state, median of {args.repeats} x {args.updates} updates after {args.warmup} warm-up; "
          f"{device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {'float32' if args.no_tf32 else 'TF32'} matmuls" if device.type == "cuda" else "") + "\n")
    print("| algorithm | mode | K | " + " | ".join(f"{name} {envs[name].agent_conf}" for name in args.envs) + " |")
    print("| --- | --- | ---: |" + " ---: |" * len(args.envs))
    for algo in args.algos:
        for mode, seeds in configs:
            if (algo, mode, seeds, args.envs[0]) not in rates:
                continue
            cells = [rates[algo, mode, seeds, name] for name in args.envs]
            print(f"| {algo} | {mode} | {seeds} | " + " | ".join(
                f"{rate:,.0f}" + (f" ({seeds * rate:,.0f})" if seeds > 1 else "") for rate in cells) + " |")

if __name__ == "__main__":
    main()
