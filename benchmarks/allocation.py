"""What OMCDA's allocation did in a run: `python benchmarks/allocation.py RUN_DIR [RUN_DIR ...] [--steps 10000 20000 30000]`.

Reads a run's TensorBoard scalars and prints, per run, a markdown table of every agent's alpha_i, in-sample KL_i,
budget d_i, influence m_i and reward value w^r_i V^r_i at the given steps (the logged values nearest at or before
each step), with whether agent i's budget binds there (KL_i within 20 % of d_i and alpha_i strictly inside its
range), and the evaluation returns, then at how many of all its logs a budget binds. Then Who Matters Matters'
Figure 3 claim, measured: the Spearman rank correlation between w^r_i V^r_i and m_i over every (agent, evaluation step)
pair of all the runs given, and the mean over evaluation steps of the rank correlation across agents at one step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

AGENT_FIELDS = ("alpha", "kl", "budget", "influence", "reward_value")
BINDING_TOLERANCE = 0.2


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of a run: tag -> (steps, values)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: (np.array([e.step for e in accumulator.Scalars(tag)]), np.array([e.value for e in accumulator.Scalars(tag)]))
            for tag in accumulator.Tags()["scalars"]}


def value_at(scalars: dict, tag: str, step: int) -> float:
    """The last value of `tag` logged at or before `step`."""
    steps, values = scalars[tag]
    before = np.nonzero(steps <= step)[0]
    if len(before) == 0:
        raise ValueError(f"{tag} has no value at or before step {step} (first logged at {steps.min()})")
    return float(values[before[-1]])


def n_agents(scalars: dict) -> int:
    return sum(1 for tag in scalars if tag.startswith("agents/alpha_"))


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties averaged."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = rank(np.asarray(x, float)), rank(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def budget_binds(kl: float, budget: float, alpha: float, args: dict) -> bool:
    """KL_i within 20 % of d_i and alpha_i strictly inside its range."""
    return (abs(kl - budget) <= BINDING_TOLERANCE * budget
            and args["alpha_min"] * 1.001 < alpha < args["alpha_max"] * 0.999)


def binding_counts(scalars: dict, args: dict) -> tuple[int, int, list[int], int]:
    """Over every logged step of agents/kl_0: (logs, logs where at least one budget binds, logs where each agent's
    binds, logs with every alpha_i on its floor)."""
    agents = range(n_agents(scalars))
    any_binds, each_binds, all_on_floor = 0, [0] * len(agents), 0
    steps = scalars["agents/kl_0"][0]
    for step in steps:
        alphas = [value_at(scalars, f"agents/alpha_{i}", step) for i in agents]
        binding = [budget_binds(value_at(scalars, f"agents/kl_{i}", step), value_at(scalars, f"agents/budget_{i}", step),
                                alphas[i], args) for i in agents]
        any_binds += any(binding)
        each_binds = [count + b for count, b in zip(each_binds, binding)]
        all_on_floor += all(alpha <= args["alpha_min"] * 1.001 for alpha in alphas)
    return len(steps), any_binds, each_binds, all_on_floor


def allocation_table(run_dir: Path, scalars: dict, steps: list[int]) -> str:
    args = json.loads((run_dir / "args.json").read_text())
    lines = [f"{run_dir.name}: d_tot {args['d_tot']}, allocation {args['allocation']}, "
             f"alpha in [{args['alpha_min']}, {args['alpha_max']}]",
             "", "| step | return | agent | alpha | KL (in-sample) | budget | binds | influence | w^r V^r |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for step in steps:
        eval_return = value_at(scalars, "eval/return_mean", step)
        for agent in range(n_agents(scalars)):
            alpha, kl, budget, influence, reward_value = (value_at(scalars, f"agents/{field}_{agent}", step)
                                                          for field in AGENT_FIELDS)
            binds = budget_binds(kl, budget, alpha, args)
            lines.append(f"| {step} | {eval_return:.1f} | {agent} | {alpha:.3g} | {kl:.3g} | {budget:.3g} | "
                         f"{'yes' if binds else 'no'} | {influence:.3g} | {reward_value:.3g} |")
    return "\n".join(lines)


def figure3_correlation(all_scalars: list[dict]) -> tuple[float, float, int]:
    """(pooled Spearman over (agent, eval step) pairs, mean per-step Spearman across agents, number of pairs)."""
    pooled_value, pooled_influence, per_step = [], [], []
    for scalars in all_scalars:
        for step in scalars["eval/return_mean"][0]:
            value = np.array([value_at(scalars, f"agents/reward_value_{i}", step) for i in range(n_agents(scalars))])
            influence = np.array([value_at(scalars, f"agents/influence_{i}", step) for i in range(n_agents(scalars))])
            pooled_value.extend(value)
            pooled_influence.extend(influence)
            per_step.append(spearman(value, influence))
    return spearman(np.array(pooled_value), np.array(pooled_influence)), float(np.nanmean(per_step)), len(pooled_value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--steps", nargs="+", type=int, default=[10_000, 20_000, 30_000])
    args = parser.parse_args(argv)
    all_scalars = []
    for run_dir in args.run_dirs:
        scalars = read_scalars(run_dir)
        if "agents/influence_0" not in scalars:
            parser.error(f"{run_dir} has no agents/influence_0 scalars: not an OMCDA run directory")
        all_scalars.append(scalars)
        print(allocation_table(run_dir, scalars, args.steps))
        logs, any_binds, each_binds, all_on_floor = binding_counts(scalars, json.loads((run_dir / "args.json").read_text()))
        print(f"\nover {logs} logs: a budget binds at {any_binds} (agent by agent: {', '.join(map(str, each_binds))}); "
              f"every alpha_i on its floor at {all_on_floor}", end="\n\n")
    pooled, per_step, pairs = figure3_correlation(all_scalars)
    print(f"Figure 3 (w^r_i V^r_i against m_i): Spearman {pooled:.3f} over {pairs} (agent, evaluation) pairs; "
          f"mean per-evaluation Spearman across agents {per_step:.3f}")


if __name__ == "__main__":
    main()
