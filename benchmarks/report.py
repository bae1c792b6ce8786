"""Write the results tables of a benchmark grid: `python benchmarks/report.py RUNS_DIR [--out benchmarks/results.md]`.

Every folder under RUNS_DIR that holds an args.json is a run, whether benchmarks/run.py or a person started it. A run
is finished when its last `eval/return_mean` is at step `total_steps` (the final evaluation); unfinished runs are
listed, not averaged. One table per env: rows are datasets, with the dataset card (from --data-dir) beside them;
columns are exp_names (run.py names runs after the algorithm; give another configuration another exp_name); a cell is
mean ± std over seeds (population std; n = number of seeds) of each seed's last evaluation, the headline, and in a
second table of each seed's best evaluation during training. If a seed was run more than once, its latest finished
run counts. Hardware, grid command and time taken come from the
result.json files that run.py writes. With matplotlib installed, a learning-curve PNG per (env, dataset) is written
to `curves/` beside the output file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from common.datasets import QUALITIES, dataset_card, dataset_path  # noqa: E402
from common.envs import check_env_name  # noqa: E402
from run import ALGOS  # noqa: E402

RETURN_TAG = "eval/return_mean"


@dataclass
class RunRecord:
    path: Path
    env: str
    agent_conf: str
    dataset: str
    algo: str
    seed: int
    total_steps: int
    eval_steps: np.ndarray
    eval_returns: np.ndarray
    result: dict | None  # result.json written by benchmarks/run.py

    @property
    def task(self) -> tuple[str, str]:
        """What one table covers: the env and its agent partition."""
        return self.env, self.agent_conf

    @property
    def finished(self) -> bool:
        return len(self.eval_steps) > 0 and self.eval_steps[-1] == self.total_steps


def read_eval_returns(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if RETURN_TAG not in events.Tags()["scalars"]:
        return np.zeros(0, dtype=int), np.zeros(0)
    scalars = events.Scalars(RETURN_TAG)
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def load_run(args_file: Path) -> RunRecord:
    args = json.loads(args_file.read_text())
    run_dir = args_file.parent
    result_file = run_dir / "result.json"
    agent_conf = args.get("agent_conf") or check_env_name(args["env"]).default_agent_conf
    return RunRecord(run_dir, args["env"], agent_conf, args["dataset"], args["exp_name"], args["seed"],
                     args["total_steps"], *read_eval_returns(run_dir),
                     json.loads(result_file.read_text()) if result_file.exists() else None)


def latest_finished_per_seed(records: list[RunRecord]) -> list[RunRecord]:
    latest = {}
    for record in sorted(records, key=lambda r: (r.path / "args.json").stat().st_mtime):
        if record.finished:
            latest[(record.task, record.dataset, record.algo, record.seed)] = record
    return list(latest.values())


def ordered(names: list[str], preferred: tuple[str, ...]) -> list[str]:
    """The distinct names, those in `preferred` first and in its order, then the others sorted."""
    names = set(names)
    return [name for name in preferred if name in names] + sorted(names - set(preferred))


def mean_std_cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:  # no spread to report from one seed
        return f"{values[0]:.1f} (n=1)"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f} (n={len(values)})"


def card_cells(data_dir: Path, task: tuple[str, str], dataset: str) -> list[str]:
    path = dataset_path(data_dir, *task, dataset)
    if not path.exists():
        return ["—", "—", "—"]
    card = dataset_card(path)
    return_cell = f"{card['return_mean']:.1f} ± {card['return_std']:.1f}"
    return [f"{card['episodes']:,}", f"{card['transitions']:,}", return_cell]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def task_tables(records: list[RunRecord], task: tuple[str, str], data_dir: Path) -> str:
    mine = [r for r in records if r.task == task]
    algos = ordered([r.algo for r in mine], ALGOS)
    datasets = ordered([r.dataset for r in mine], QUALITIES)

    def cells(pick) -> list[list[str]]:
        return [[mean_std_cell([pick(r) for r in mine if r.dataset == dataset and r.algo == algo]) for algo in algos]
                for dataset in datasets]

    last = cells(lambda r: r.eval_returns[-1])
    best = cells(lambda r: r.eval_returns.max())
    card_header = ["dataset episodes", "transitions", "dataset return"]
    return "\n\n".join([
        f"## {' '.join(task)}",
        "**Last evaluation** (the headline): the final evaluation of each seed, mean ± std over seeds.",
        markdown_table(["dataset", *card_header, *algos],
                       [[d, *card_cells(data_dir, task, d), *row] for d, row in zip(datasets, last)]),
        "**Best evaluation** during training (optimistic: the maximum over evaluations), mean ± std over seeds.",
        markdown_table(["dataset", *algos], [[d, *row] for d, row in zip(datasets, best)]),
    ])


def plot_learning_curves(records: list[RunRecord], out_dir: Path) -> dict[tuple[tuple[str, str], str], Path]:
    """One PNG per (env, dataset): mean ± std over seeds of eval/return_mean at the steps every seed evaluated."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no learning curves (pip install matplotlib)")
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for task, dataset in sorted({(r.task, r.dataset) for r in records}):
        figure, axes = plt.subplots(figsize=(6, 4))
        mine = [r for r in records if r.task == task and r.dataset == dataset]
        for algo in ordered([r.algo for r in mine], ALGOS):
            seeds = [r for r in mine if r.algo == algo]
            steps = sorted(set.intersection(*(set(r.eval_steps.tolist()) for r in seeds)))
            curves = np.array([[dict(zip(r.eval_steps.tolist(), r.eval_returns))[s] for s in steps] for r in seeds])
            mean, std = curves.mean(0), curves.std(0)
            axes.plot(steps, mean, label=f"{algo} (n={len(seeds)})")
            axes.fill_between(steps, mean - std, mean + std, alpha=0.2)
        axes.set(title=f"{' '.join(task)} {dataset}", xlabel="updates", ylabel="evaluation return")
        axes.legend()
        path = out_dir / "curves" / f"{'-'.join(task)}-{dataset}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        plots[(task, dataset)] = path
    return plots


def provenance(records: list[RunRecord], command: str) -> str:
    results = [r.result for r in records if r.result]
    lines = [f"Written {datetime.date.today().isoformat()} by `{command}`."]
    if results:
        started = min(r["finished_at"] - r["seconds"] for r in results)
        finished = max(r["finished_at"] for r in results)
        lines += [
            f"- hardware: {'; '.join(sorted({r['hardware'] for r in results}))}",
            *(f"- grid command: `{c}`" for c in sorted({r["command"] for r in results})),
            f"- {len(results)} runs took {sum(r['seconds'] for r in results) / 3600:.2f} h of run time, "
            f"{(finished - started) / 3600:.2f} h of wall clock from {datetime.date.fromtimestamp(started)} "
            f"to {datetime.date.fromtimestamp(finished)}",
        ]
    if len(results) < len(records):
        lines.append(f"- {len(records) - len(results)} runs have no result.json (not run by benchmarks/run.py): "
                     f"their hardware and time are not recorded")
    return "\n".join(lines)


def write_report(runs_dir: Path, out: Path, data_dir: Path, command: str) -> str:
    records = [load_run(path) for path in sorted(runs_dir.rglob("args.json"))]
    if not records:
        raise SystemExit(f"no runs under {runs_dir}: a run is a folder holding args.json")
    finished = latest_finished_per_seed(records)
    unfinished = [r for r in records if not r.finished]
    plots = plot_learning_curves(finished, out.parent)
    sections = ["# Results", provenance(finished, command)]
    for task in sorted({r.task for r in finished}):
        sections.append(task_tables(finished, task, data_dir))
        sections += [f"![{' '.join(task)} {dataset}]({path.relative_to(out.parent).as_posix()})"
                     for (plot_task, dataset), path in plots.items() if plot_task == task]
    if unfinished:
        sections.append("## Unfinished runs (not in the tables)\n\n" + "\n".join(
            f"- `{r.path}`: last evaluation at step {r.eval_steps[-1] if len(r.eval_steps) else 'none'} "
            f"of {r.total_steps}" for r in unfinished))
    text = "\n\n".join(sections) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", type=Path, help="folder searched for runs (folders holding args.json)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.md"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="dataset files, for the dataset cards")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        parser.error(f"{args.runs_dir} is not a folder")
    write_report(args.runs_dir, args.out, args.data_dir, shlex.join(["python", "benchmarks/report.py", *argv]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
