"""What Jiang and Lu's weights did in finished bcq_ma.py runs, measured on one fixed sample of their dataset:

    python benchmarks/bcq_ma_values.py RUN_DIR [RUN_DIR ...] [--samples 20000] [--data-dir DIR]

Loads each run's final networks (model.pt, written by --save-model) and, on the same `--samples` transitions of its
dataset (drawn with a fixed seed, so runs on one dataset see the same states), prints a markdown row per run of:
the value spread mean_s [max_i V*_i(s') - min_i V*_i(s')] (Jiang and Lu's Table 6 measure; V*_i the BCQ target value of
the run's target networks), and the distributions (mean, std, 5th and 95th percentile) of lambda_vd and lambda_tn as
the run's update computes them. lambda_vd needs only the critics, so it is shown for every run (what the weight
would be with those networks); lambda_tn needs G^2, which only --transition-normalization runs have. The training
logs hold the batch means; these spreads show whether the weights move individual transitions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bcq_ma  # noqa: E402
from common.datasets import dataset_path, load_dataset  # noqa: E402
from common.envs import SMAX_MAPS, check_env_name  # noqa: E402

SAMPLE_SEED = 0


def load_run(run_dir: Path) -> tuple[bcq_ma.Args, dict, dict]:
    """A finished run's arguments, checkpoint and network weights (on the CPU)."""
    model = run_dir / "model.pt"
    if not model.is_file():
        raise SystemExit(f"{run_dir}: no model.pt; the run must have been trained with --save-model")
    checkpoint = torch.load(model, map_location="cpu", weights_only=False)
    args = bcq_ma.Args(**checkpoint["args"])
    if args.total_steps != checkpoint["step"]:
        print(f"note: {run_dir} stopped at update {checkpoint['step']} of {args.total_steps}", file=sys.stderr)
    return args, checkpoint, checkpoint["agents"]


def describe(values: torch.Tensor) -> str:
    """mean ± std [5th, 95th percentile] of every entry."""
    flat = values.flatten().numpy()
    low, high = np.percentile(flat, [5, 95])
    return f"{flat.mean():.3f} ± {flat.std():.3f} [{low:.3f}, {high:.3f}]"


@torch.no_grad()
def measure(run_dir: Path, samples: int, data_dir: Path | None) -> dict:
    """The run's label, flags and, on the fixed sample, V*_i(o') [n, samples], the value spread, lambda_vd and
    lambda_tn [n, samples] (None without G^2)."""
    args, checkpoint, state = load_run(run_dir)
    if args.env in SMAX_MAPS:
        raise SystemExit(f"{run_dir}: {args.env} has discrete actions; this tool measures the continuous update")
    agent_conf = args.agent_conf or check_env_name(args.env).default_agent_conf
    dataset = load_dataset(dataset_path(data_dir or args.data_dir, args.env, agent_conf, args.dataset), "cpu",
                           args.obs_mode)
    agents = bcq_ma.Agents(dataset.n_agents, dataset.obs_dim, dataset.act_dim, dataset.state_dim, args)
    agents.load_state_dict(state)
    agents.eval()
    batch = dataset.sample(samples, torch.Generator().manual_seed(SAMPLE_SEED))
    torch.manual_seed(SAMPLE_SEED)  # the latents of the candidates and of the VAEs' forward passes
    next_value = bcq_ma.candidate_value(agents.critic_target, agents.perturbation_target, agents.vae, batch.next_obs,
                                        args.candidates, args.soft_clip)
    q_target = bcq_ma.soft_clipped_q(*agents.critic_target(batch.obs, batch.actions), args.soft_clip)
    lambda_vd = bcq_ma.value_deviation_weight(next_value, q_target, batch.rewards, batch.dones, args.gamma,
                                              args.optimism)
    lambda_tn = None
    if agents.transition_vae is not None:
        _, mean, _ = agents.vae(batch.obs, batch.actions)
        _, transition_mean, _ = agents.transition_vae(torch.cat([batch.obs, batch.next_obs], -1), batch.actions)
        lambda_tn = bcq_ma.transition_normalization_weight(mean, transition_mean, args.tn_max)
    flags = [flag for flag, on in (("vd", args.value_deviation), ("tn", args.transition_normalization)) if on]
    return {"run": f"{args.exp_name} ({args.dataset}, seed {args.seed}, {checkpoint['step']:,} updates)",
            "flags": " ".join(flags) or "none", "optimism": args.optimism, "next_value": next_value,
            "value_spread": float(bcq_ma.value_spread(next_value)), "lambda_vd": lambda_vd, "lambda_tn": lambda_tn}


def table_row(measured: dict) -> list[str]:
    lambda_vd, optimism = measured["lambda_vd"], measured["optimism"]
    at_bound = ((lambda_vd <= 1.0 - optimism) | (lambda_vd >= 1.0 + optimism)).float().mean()
    lambda_tn = measured["lambda_tn"]
    return [measured["run"], measured["flags"], f"{measured['value_spread']:.3f}", describe(measured["next_value"]),
            f"{describe(lambda_vd)}, {at_bound:.1%} at a clip bound",
            "—" if lambda_tn is None else describe(lambda_tn)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="bcq_ma.py run directories (runs/...)")
    parser.add_argument("--samples", type=int, default=20_000, help="transitions measured per run")
    parser.add_argument("--data-dir", type=Path, help="where the datasets are (default: each run's --data-dir)")
    args = parser.parse_args(argv)
    rows = [table_row(measure(run_dir, args.samples, args.data_dir)) for run_dir in args.run_dirs]
    for row in [["run", "flags", "value spread", "V*", "lambda_vd", "lambda_tn"], ["---"] * 6, *rows]:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
