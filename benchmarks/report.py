"""Tables and learning curves of benchmark results, built from result.json files alone.

    python benchmarks/report.py [RESULTS_DIR] [--out FILE]       # default: benchmarks/results -> its README.md
    python benchmarks/report.py --collect runs/benchmark         # copy finished runs in, then report

Every result.json under RESULTS_DIR is a run (the scripts write one into every run directory). `--collect RUNS_DIR`
copies the finished ones found under RUNS_DIR to RESULTS_DIR/{env}-{agent_conf}/{dataset}/{exp_name}/seed_{seed}/
result.json, replacing an older copy of the same cell, so that the committed benchmarks/results/ alone rebuilds the
report. One table per env: rows are datasets, with the dataset card the runs trained on beside them; columns are
exp_names (run.py names runs after the algorithm; give another configuration another exp_name); a SMAX map is its
own table (its folder and title the map's name), with a third table of the win rates; a cell is
mean ± std over seeds (population std; n = number of seeds, then the runs' length in updates) of each seed's last
evaluation, the headline, and in a
second table of each seed's best evaluation during training. If a seed has more than one finished result, the one
written last counts; unfinished runs are listed, not averaged. With matplotlib installed, a learning-curve PNG per
(env, dataset) is written to `curves/` beside the output file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common.datasets import QUALITIES, SMAX_QUALITIES  # noqa: E402
from common.envs import SMAX_MAPS, check_env_name  # noqa: E402
from run import ALGOS  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"


@dataclass
class RunRecord:
    path: Path  # its result.json
    result: dict

    @property
    def args(self) -> dict:
        return self.result["args"]

    @property
    def task(self) -> tuple[str, ...]:
        """What one table covers: the env and its agent partition (a SMAX map: the map alone)."""
        if self.args["env"] in SMAX_MAPS:
            return (self.args["env"],)
        return self.args["env"], self.args["agent_conf"] or check_env_name(self.args["env"]).default_agent_conf

    @property
    def dataset(self) -> str:
        return self.args["dataset"]

    @property
    def algo(self) -> str:
        return self.args["exp_name"]

    @property
    def seed(self) -> int:
        return self.args["seed"]

    @property
    def cell(self) -> tuple:
        return self.task, self.dataset, self.algo, self.seed

    @property
    def finished(self) -> bool:
        return self.result["finished"]

    @property
    def eval_steps(self) -> np.ndarray:
        return np.array([evaluation["step"] for evaluation in self.result["evaluations"]], dtype=int)

    @property
    def eval_returns(self) -> np.ndarray:
        return np.array([evaluation["mean"] for evaluation in self.result["evaluations"]])

    @property
    def last_win_rate(self) -> float | None:
        """The last evaluation's win rate (SMAX runs), else None."""
        return self.result["evaluations"][-1].get("win_rate")


def load_results(folder: Path) -> list[RunRecord]:
    return [RunRecord(path, json.loads(path.read_text())) for path in sorted(folder.rglob("result.json"))]


def latest_finished_per_seed(records: list[RunRecord]) -> list[RunRecord]:
    latest = {}
    for record in sorted(records, key=lambda r: r.result["written_at"]):
        if record.finished:
            latest[record.cell] = record
    return list(latest.values())


def collect(runs_dir: Path, results_dir: Path) -> list[Path]:
    """Copy the result.json of every finished run under `runs_dir` to its cell's place in `results_dir`, unless the
    copy there was written later; returns the files written."""
    written = []
    for record in latest_finished_per_seed(load_results(runs_dir)):
        task, dataset, algo, seed = record.cell
        target = results_dir / "-".join(task) / dataset / algo / f"seed_{seed}" / "result.json"
        if target.exists() and json.loads(target.read_text())["written_at"] >= record.result["written_at"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(record.path, tmp)
        tmp.replace(target)
        written.append(target)
    return written


def ordered(names: list[str], preferred: tuple[str, ...]) -> list[str]:
    """The distinct names, those in `preferred` first and in its order, then the others sorted."""
    names = set(names)
    return [name for name in preferred if name in names] + sorted(names - set(preferred))


def mean_std_cell(values: list[float], budgets: list[int]) -> str:
    """mean ± std over seeds, with the number of seeds and the runs' lengths in updates (e.g. "20k" or "20k/30k")."""
    if not values:
        return "—"
    length = "/".join(f"{steps / 1000:g}k" for steps in sorted(set(budgets)))
    if len(values) == 1:  # no spread to report from one seed
        return f"{values[0]:.1f} (n=1, {length})"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f} (n={len(values)}, {length})"


def card_cells(records: list[RunRecord]) -> list[str]:
    """The dataset card the runs trained on; runs on different files of one name (other sizes or seeds) are shown
    as such instead of one of the cards."""
    cards = {json.dumps(r.result["dataset"], sort_keys=True) for r in records}
    if len(cards) != 1:
        return ["(differs between runs)"] * 3
    card = records[0].result["dataset"]
    win_rate = f" (win rate {card['win_rate']:.2f})" if "win_rate" in card else ""
    return [f"{card['episodes']:,}", f"{card['transitions']:,}",
            f"{card['return_mean']:.1f} ± {card['return_std']:.1f}{win_rate}"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def task_tables(records: list[RunRecord], task: tuple[str, ...]) -> str:
    mine = [r for r in records if r.task == task]
    algos = ordered([r.algo for r in mine], ALGOS)
    datasets = ordered([r.dataset for r in mine], SMAX_QUALITIES if task[0] in SMAX_MAPS else QUALITIES)

    def cells(pick) -> list[list[str]]:
        def runs(dataset: str, algo: str) -> list[RunRecord]:
            return [r for r in mine if r.dataset == dataset and r.algo == algo]

        return [[mean_std_cell([pick(r) for r in runs(dataset, algo)],
                               [r.args["total_steps"] for r in runs(dataset, algo)]) for algo in algos]
                for dataset in datasets]

    last = cells(lambda r: r.eval_returns[-1])
    best = cells(lambda r: r.eval_returns.max())
    card_header = ["dataset episodes", "transitions", "dataset return"]
    tables = [
        f"## {' '.join(task)}",
        "**Last evaluation** (the headline): the final evaluation of each seed, mean ± std over seeds.",
        markdown_table(["dataset", *card_header, *algos], [[d, *card_cells([r for r in mine if r.dataset == d]), *row]
                                                           for d, row in zip(datasets, last)]),
        "**Best evaluation** during training (optimistic: the maximum over evaluations), mean ± std over seeds.",
        markdown_table(["dataset", *algos], [[d, *row] for d, row in zip(datasets, best)]),
    ]
    if any(r.last_win_rate is not None for r in mine):
        win_rates = [[f"{np.mean(rates):.2f}" if (rates := [r.last_win_rate for r in mine if r.dataset == d
                                                            and r.algo == algo]) else "—" for algo in algos]
                     for d in datasets]
        tables += ["**Win rate** at the last evaluation, mean over seeds.",
                   markdown_table(["dataset", *algos], [[d, *row] for d, row in zip(datasets, win_rates)])]
    return "\n\n".join(tables)


def plot_learning_curves(records: list[RunRecord], out_dir: Path) -> dict[tuple[tuple[str, ...], str], Path]:
    """One PNG per (env, dataset): mean ± std over seeds of the evaluation return at the steps every seed
    evaluated."""
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
        tmp = path.with_name(f".{path.name}.tmp")
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        tmp.replace(path)
        plt.close(figure)
        plots[(task, dataset)] = path
    return plots


def provenance(records: list[RunRecord], command: str) -> str:
    """Where the numbers come from: the devices, the code's commits, when, and the training speed."""
    written = [r.result["written_at"] for r in records]
    runs = f"{len(records)} finished run" + ("s" if len(records) > 1 else "")
    lines = [f"Written {datetime.date.today().isoformat()} by `{command}` from {runs} (results written "
             f"{datetime.date.fromtimestamp(min(written))} to {datetime.date.fromtimestamp(max(written))}).",
             f"- commit: {', '.join(sorted({r.result['commit'] or 'unknown' for r in records}))}"]
    tasks = sorted({r.task for r in records})
    for device in sorted({r.result["device"] for r in records}):
        for task in tasks:
            mine = [r for r in records if r.result["device"] == device and r.task == task]
            if not mine:
                continue
            timed = [r for r in mine if r.result["updates_per_sec"]]
            speeds = [f"{algo} {np.median([r.result['updates_per_sec'] for r in timed if r.algo == algo]):.0f}"
                      for algo in ordered([r.algo for r in timed], ALGOS)]
            on_task = f" on {' '.join(task)}" if len(tasks) > 1 else ""
            lines.append(f"- device: {device}; updates/s{on_task} (median over runs, evaluations excluded): "
                         f"{', '.join(speeds) or 'not recorded'}")
    return "\n".join(lines)


def write_report(results_dir: Path, out: Path, command: str) -> str:
    records = load_results(results_dir)
    if not records:
        raise SystemExit(f"no runs under {results_dir}: a run is a result.json file")
    finished = latest_finished_per_seed(records)
    unfinished = [r for r in records if not r.finished]
    sections = ["# Results"]
    if finished:
        plots = plot_learning_curves(finished, out.parent)
        sections.append(provenance(finished, command))
        for task in sorted({r.task for r in finished}):
            sections.append(task_tables(finished, task))
            sections += [f"![{' '.join(task)} {dataset}]({path.relative_to(out.parent).as_posix()})"
                         for (plot_task, dataset), path in plots.items() if plot_task == task]
    if unfinished:
        sections.append("## Unfinished runs (not in the tables)\n\n" + "\n".join(
            f"- `{r.path.parent}`: last evaluation at step {r.eval_steps[-1] if len(r.eval_steps) else 'none'} "
            f"of {r.args['total_steps']}" for r in unfinished))
    text = "\n\n".join(sections) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", type=Path, nargs="?", default=RESULTS_DIR,
                        help="folder searched for result.json files (default: benchmarks/results)")
    parser.add_argument("--collect", type=Path, metavar="RUNS_DIR",
                        help="first copy the finished runs under RUNS_DIR into RESULTS_DIR")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "README.md",
                        help="the report; its curves go to curves/ beside it (default: benchmarks/results/README.md)")
    args = parser.parse_args(argv)
    if args.collect:
        if not args.collect.is_dir():
            parser.error(f"--collect {args.collect}: not a folder")
        copied = collect(args.collect, args.results_dir)
        print(f"collected {len(copied)} finished runs from {args.collect} into {args.results_dir}")
    if not args.results_dir.is_dir():
        parser.error(f"{args.results_dir} is not a folder")
    write_report(args.results_dir, args.out, shlex.join(["python", "benchmarks/report.py", *argv]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
