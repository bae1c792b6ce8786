"""Tables, intervals and learning curves of benchmark results, built from result.json files alone.

    python benchmarks/report.py                                  # benchmarks/results -> its README.md, curves/ and
                                                                 # the results block of the top-level README.md
    python benchmarks/report.py [RESULTS_DIR] [--out FILE]       # another folder of results -> FILE
    python benchmarks/report.py --collect runs/benchmark         # copy finished runs in, then report

Every result.json under RESULTS_DIR is a run (the scripts write one into every run directory). `--collect RUNS_DIR`
copies the finished ones found under RUNS_DIR to RESULTS_DIR/{env}-{agent_conf}/{dataset}/{exp_name}/{budget}_updates/seed_{seed}/
result.json, replacing an older copy of the same cell, so that the committed benchmarks/results/ alone rebuilds the
report. If a seed has more than one finished result, the one written last counts; unfinished runs are listed, not
averaged.

A table covers one env (a SMAX map: the map alone) at one budget (the runs' --total-steps): runs of other lengths go
to their own table, never side by side. Rows are datasets, columns exp_names (run.py names runs after the algorithm).
A cell is the mean over seeds of each seed's last evaluation with its 95 % percentile-bootstrap confidence interval
and n, e.g. `612 [571, 650] n=3` (one seed: no interval). A second table takes each seed's best evaluation during
training (optimistic); SMAX maps get a third, of win rates. Per env and budget, aggregated over its datasets as in
rliable (Agarwal et al., "Deep Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021): the
interquartile mean (IQM) of all runs' last evaluations and the probability that omcda improves on each other
algorithm, each with a stratified-bootstrap 95 % CI (runs resampled within each dataset). Returns are not normalised:
within one env every dataset shares the reward scale. Every bootstrap draws from a generator seeded afresh, so the
report is the same on every machine and a new result changes only the cells it belongs to. With matplotlib
installed, one learning-curve PNG per (env, dataset, budget) goes to `curves/` beside the output file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
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
from common.results import read_result  # noqa: E402
from run import ALGOS  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
README = REPO / "README.md"
BLOCK_BEGIN = ("<!-- results: begin (written by `python benchmarks/report.py` from benchmarks/results; "
               "edit report.py, not this block) -->")
BLOCK_END = "<!-- results: end -->"
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
HEADLINE = "omcda"  # the algorithm whose probability of improvement on each other one is reported

# The papers' own numbers, for orientation only: other data (HAPPO on MuJoCo 2.0 Hopper-v2; SMAC on StarCraft II)
# and another simulator than ours. Mean ± std over 5 seeds. "data" is the dataset's mean return.
PUBLISHED = {
    ("Hopper", "3x1"): dict(
        source="OMCDA's Table 1 (its OMIGA, ICQ, CQL-MA, BCQ-MA and OMAR columns are OMIGA's Table 1); data: OMIGA's "
               "Table 2. HAPPO data under MuJoCo 2.0 (Hopper-v2)",
        data=dict(expert="2452.02", medium="723.57", **{"medium-replay": "746.42", "medium-expert": "1190.61"}),
        returns={
            "expert": dict(bcq_ma="77.85 ± 58.04", cql_ma="159.14 ± 313.83", icq="754.74 ± 806.28",
                           omar="2.36 ± 1.46", omiga="859.63 ± 709.47", omcda="1214.25 ± 830.72"),
            "medium": dict(bcq_ma="44.58 ± 20.62", cql_ma="401.27 ± 199.88", icq="501.79 ± 14.03",
                           omar="21.34 ± 24.90", omiga="1189.26 ± 544.30", omcda="1441.53 ± 488.91"),
            "medium-replay": dict(bcq_ma="26.53 ± 24.04", cql_ma="31.37 ± 15.16", icq="195.39 ± 103.61",
                                  omar="3.30 ± 3.22", omiga="774.18 ± 494.27", omcda="1733.27 ± 379.71"),
            "medium-expert": dict(bcq_ma="54.31 ± 23.66", cql_ma="64.82 ± 123.31", icq="355.44 ± 373.86",
                                  omar="1.44 ± 0.86", omiga="709.00 ± 595.66", omcda="1047.13 ± 523.67"),
        }),
    ("5m_vs_6m",): dict(
        source="OMCDA's Table 1; data: OMIGA's Table 4. SMAC on StarCraft II, MAPPO data",
        data=dict(good="20.00", medium="11.03", poor="8.50"),
        returns={
            "good": dict(bcq_ma="7.76 ± 0.15", cql_ma="8.08 ± 0.21", icq="7.87 ± 0.30", omar="7.40 ± 0.63",
                         omiga="8.25 ± 0.37", omcda="8.46 ± 0.12"),
            "medium": dict(bcq_ma="7.58 ± 0.10", cql_ma="7.78 ± 0.10", icq="7.77 ± 0.3", omar="7.08 ± 0.51",
                           omiga="7.92 ± 0.57", omcda="8.10 ± 0.18"),
            "poor": dict(bcq_ma="7.61 ± 0.36", cql_ma="7.43 ± 0.10", icq="7.26 ± 0.19", omar="7.27 ± 0.42",
                         omiga="7.52 ± 0.21", omcda="7.67 ± 0.10"),
        }),
    ("6h_vs_8z",): dict(
        source="OMIGA's Table 1 (OMCDA's Table 1 has no 6h_vs_8z); data: OMIGA's Table 4. SMAC on StarCraft II, "
               "MAPPO data",
        data=dict(good="17.84", medium="11.96", poor="9.12"),
        returns={
            "good": dict(bcq_ma="12.19 ± 0.23", cql_ma="10.44 ± 0.20", icq="11.81 ± 0.12", omar="9.85 ± 0.28",
                         omiga="12.54 ± 0.21"),
            "medium": dict(bcq_ma="11.77 ± 0.16", cql_ma="11.29 ± 0.29", icq="11.13 ± 0.33", omar="10.36 ± 0.16",
                           omiga="12.19 ± 0.22"),
            "poor": dict(bcq_ma="10.84 ± 0.16", cql_ma="10.81 ± 0.52", icq="10.55 ± 0.10", omar="10.63 ± 0.25",
                         omiga="11.31 ± 0.19"),
        }),
}


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
    def budget(self) -> int:
        return self.args["total_steps"]

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
        return self.task, self.dataset, self.algo, self.budget, self.seed

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
    """Every readable result.json under `folder`; the others are skipped with a warning naming them."""
    results = ((path, read_result(path)) for path in sorted(folder.rglob("result.json")))
    return [RunRecord(path, result) for path, result in results if result is not None]


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
        task, dataset, algo, budget, seed = record.cell
        target = results_dir / "-".join(task) / dataset / algo / f"{budget}_updates" / f"seed_{seed}" / "result.json"
        committed = read_result(target) if target.exists() else None
        if committed is not None and committed["written_at"] >= record.result["written_at"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(record.path, tmp)
        tmp.replace(target)
        written.append(target)
    return written


def ordered(names, preferred: tuple[str, ...]) -> list[str]:
    """The distinct names, those in `preferred` first and in its order, then the others sorted."""
    names = set(names)
    return [name for name in preferred if name in names] + sorted(names - set(preferred))


# Interval estimates -------------------------------------------------------------------------------------------------

def bootstrap_mean_ci(values) -> np.ndarray:
    """95 % percentile-bootstrap CI of the mean over seeds (axis 0); values [seeds] or [seeds, steps]."""
    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(values), size=(RESAMPLES, len(values)))
    return np.percentile(values[draws].mean(axis=1), [2.5, 97.5], axis=0)


def iqm(per_dataset: list[np.ndarray]) -> np.ndarray:
    """Interquartile mean of all runs' scores (runs on the last axis of each dataset's array): the mean of the middle
    half, int(n / 4) cut from each end (as scipy.stats.trim_mean, which rliable uses)."""
    scores = np.sort(np.concatenate(per_dataset, axis=-1), axis=-1)
    cut = scores.shape[-1] // 4
    return scores[..., cut:scores.shape[-1] - cut].mean(axis=-1)


def probability_of_improvement(x: list[np.ndarray], y: list[np.ndarray]) -> np.ndarray:
    """P(X > Y), averaged over datasets: on each, the chance that a run of X beats a run of Y (ties count half),
    over all pairs of their runs (the Mann-Whitney U statistic over the number of pairs); runs on the last axis."""
    return np.mean([((a[..., :, None] > b[..., None, :]) + 0.5 * (a[..., :, None] == b[..., None, :])).mean((-2, -1))
                    for a, b in zip(x, y)], axis=0)


def stratified_bootstrap_ci(statistic, *samples: list[np.ndarray]) -> np.ndarray | None:
    """95 % percentile CI of statistic(*samples), each sample a list over datasets of run scores, its runs
    resampled with replacement within each dataset (independently for each sample); None when every dataset has
    one run, where resampling cannot move the statistic. `statistic` takes the resamples on a leading axis."""
    if all(len(runs) == 1 for sample in samples for runs in sample):
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resampled = [[runs[rng.integers(0, len(runs), size=(RESAMPLES, len(runs)))] for runs in sample]
                 for sample in samples]
    return np.percentile(statistic(*resampled), [2.5, 97.5])


def number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def bracket(interval, decimals: int) -> str:
    """` [low, high]`, or nothing where there is no interval."""
    return "" if interval is None else f" [{number(interval[0], decimals)}, {number(interval[1], decimals)}]"


def interval_cell(values, decimals: int) -> str:
    """`mean [low, high] n=k`; one seed has no interval."""
    if len(values) == 0:
        return "—"
    mean = number(np.mean(values), decimals)
    interval = bootstrap_mean_ci(values) if len(values) > 1 else None
    return f"{mean}{bracket(interval, decimals)} n={len(values)}"


def decimals_for(values) -> int:
    """Whole numbers where returns run to hundreds (MuJoCo), two decimals on SMAX's 0-20 scale."""
    return 0 if max(abs(v) for v in values) >= 100 else 2


# Tables ---------------------------------------------------------------------------------------------------------------

def card_cells(records: list[RunRecord]) -> list[str]:
    """The dataset card the runs trained on; runs on different files of one name (other sizes or seeds) are shown
    as such instead of one of the cards. Where the file lay (--data-dir) does not make it another file."""
    cards = {json.dumps({k: v for k, v in r.result["dataset"].items() if k != "file"}, sort_keys=True) for r in records}
    if len(cards) != 1:
        return ["(differs between runs)"] * 3
    card = records[0].result["dataset"]
    win_rate = f" (win rate {card['win_rate']:.2f})" if "win_rate" in card else ""
    return [f"{card['episodes']:,}", f"{card['transitions']:,}",
            f"{card['return_mean']:.1f} ± {card['return_std']:.1f}{win_rate}"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def task_name(task: tuple[str, ...]) -> str:
    return " ".join(task)


def table_title(task: tuple[str, ...], budget: int) -> str:
    return f"{task_name(task)}, {budget:,} updates"


class Grid:
    """The finished runs of one (env, budget): one table's rows (datasets) and columns (algorithms)."""

    def __init__(self, records: list[RunRecord], task: tuple[str, ...], budget: int):
        self.task, self.budget = task, budget
        self.runs = [r for r in records if r.task == task and r.budget == budget]
        self.algos = ordered([r.algo for r in self.runs], ALGOS)
        self.datasets = ordered([r.dataset for r in self.runs], SMAX_QUALITIES if task[0] in SMAX_MAPS else QUALITIES)
        self.decimals = decimals_for([r.eval_returns[-1] for r in self.runs])

    def cell_runs(self, dataset: str, algo: str) -> list[RunRecord]:
        return sorted((r for r in self.runs if r.dataset == dataset and r.algo == algo), key=lambda r: r.seed)

    def scores(self, algo: str) -> dict[str, np.ndarray]:
        """Each dataset's last evaluations of `algo` (datasets it has no run on left out)."""
        return {d: np.array([r.eval_returns[-1] for r in runs]) for d in self.datasets
                if (runs := self.cell_runs(d, algo))}

    def table(self, pick, decimals: int | None = None, cards: bool = False) -> str:
        decimals = self.decimals if decimals is None else decimals
        header = ["dataset", *(["dataset episodes", "transitions", "dataset return"] if cards else []), *self.algos]
        rows = [[d, *(card_cells([r for r in self.runs if r.dataset == d]) if cards else []),
                 *(interval_cell([pick(r) for r in self.cell_runs(d, algo)], decimals) for algo in self.algos)]
                for d in self.datasets]
        return markdown_table(header, rows)

    def iqm_cells(self) -> dict[str, str]:
        """IQM [CI] (runs) of every algorithm that ran on every dataset of the table; the others say how many."""
        cells = {}
        for algo in self.algos:
            scores = self.scores(algo)
            if len(scores) < len(self.datasets):
                cells[algo] = f"— ({len(scores)} of {len(self.datasets)} datasets)"
                continue
            per_dataset = list(scores.values())
            interval = stratified_bootstrap_ci(iqm, per_dataset)
            runs = sum(map(len, per_dataset))
            cells[algo] = (f"{number(iqm(per_dataset), self.decimals)}{bracket(interval, self.decimals)} "
                           f"({runs} run{'s' * (runs != 1)})")
        return cells

    def improvement_cells(self) -> dict[str, str]:
        """P(omcda > algo) [CI] over the datasets both ran on, for every other algorithm."""
        if HEADLINE not in self.algos:
            return {}
        mine, cells = self.scores(HEADLINE), {}
        for algo in self.algos:
            if algo == HEADLINE:
                continue
            theirs = self.scores(algo)
            shared = [d for d in mine if d in theirs]
            if not shared:
                cells[algo] = "— (no shared dataset)"
                continue
            x, y = [mine[d] for d in shared], [theirs[d] for d in shared]
            interval = stratified_bootstrap_ci(probability_of_improvement, x, y)
            cells[algo] = (f"{probability_of_improvement(x, y):.2f}{bracket(interval, 2)} "
                           f"({len(shared)} dataset{'s' if len(shared) > 1 else ''})")
        return cells


def tasks(records: list[RunRecord]) -> list[tuple[str, ...]]:
    """The envs the runs cover, MuJoCo before SMAX maps."""
    return sorted({r.task for r in records}, key=lambda task: (task[0] in SMAX_MAPS, task))


def grids(records: list[RunRecord]) -> list[Grid]:
    return [Grid(records, task, budget) for task in tasks(records)
            for budget in sorted({r.budget for r in records if r.task == task})]


def aggregate_tables(all_grids: list[Grid]) -> str:
    """IQM per (env, budget) and algorithm; P(omcda > X) per (env, budget) and other algorithm."""
    algos = ordered([a for g in all_grids for a in g.algos], ALGOS)
    iqms = [[table_title(g.task, g.budget), str(len(g.datasets)),
             *(g.iqm_cells().get(a, "—") for a in algos)] for g in all_grids]
    with_headline = [g for g in all_grids if HEADLINE in g.algos]
    others = [a for a in algos if a != HEADLINE]
    improvements = [[table_title(g.task, g.budget), *(g.improvement_cells().get(a, "—") for a in others)]
                    for g in with_headline]
    parts = ["**IQM** of the runs' last evaluations over the env's datasets [95 % stratified-bootstrap CI] (runs); "
             "only algorithms with runs on every dataset of the table:",
             markdown_table(["env, budget", "datasets", *algos], iqms)]
    if improvements:
        parts += [f"**Probability that {HEADLINE} improves** on each algorithm (a run of {HEADLINE} beats one of "
                  "the other, averaged over the datasets both ran) [95 % stratified-bootstrap CI]:",
                  markdown_table(["env, budget", *others], improvements)]
    return "\n\n".join(parts)


def published_table(task: tuple[str, ...], ours: list[RunRecord], heading: str) -> str | None:
    """The paper's numbers for the task, beside our datasets' mean returns; None if no paper reports the task."""
    if task not in PUBLISHED:
        return None
    paper = PUBLISHED[task]
    algos = ordered([a for row in paper["returns"].values() for a in row], ALGOS)
    rows = []
    for dataset, row in paper["returns"].items():
        # files of one name made on two machines differ slightly: show each
        our_data = " / ".join(f"{mean:.1f}" for mean in sorted({r.result["dataset"]["return_mean"] for r in ours
                                                                if r.dataset == dataset})) or "—"
        rows.append([dataset, paper["data"][dataset], our_data, *(row.get(a, "—") for a in algos)])
    return "\n\n".join([f"{heading} {paper['source']}. Mean ± std over 5 seeds at the papers' budgets; for "
                        "orientation only, not comparable cell by cell:",
                        markdown_table(["dataset", "their data", "our data", *algos], rows)])


# Learning curves ------------------------------------------------------------------------------------------------------

def plot_learning_curves(records: list[RunRecord], out_dir: Path) -> dict[tuple, Path]:
    """One PNG per (env, dataset, budget): the mean over seeds of the evaluation return at the steps every seed
    evaluated, shaded by its 95 % bootstrap CI (no band for one seed)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no learning curves (pip install matplotlib)")
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for task, dataset, budget in sorted({(r.task, r.dataset, r.budget) for r in records}):
        figure, axes = plt.subplots(figsize=(6, 4))
        mine = [r for r in records if r.task == task and r.dataset == dataset and r.budget == budget]
        for algo in ordered([r.algo for r in mine], ALGOS):
            seeds = [r for r in mine if r.algo == algo]
            steps = sorted(set.intersection(*(set(r.eval_steps.tolist()) for r in seeds)))
            curves = np.array([[dict(zip(r.eval_steps.tolist(), r.eval_returns))[s] for s in steps] for r in seeds])
            color = f"C{ALGOS.index(algo)}" if algo in ALGOS else None  # one colour per algorithm in every plot
            (line,) = axes.plot(steps, curves.mean(0), marker=".", color=color, label=f"{algo} (n={len(seeds)})")
            if len(seeds) > 1:
                low, high = bootstrap_mean_ci(curves)
                axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        axes.set(title=f"{task_name(task)} {dataset}, {budget:,} updates (band: 95 % bootstrap CI of the mean)",
                 xlabel="updates", ylabel="evaluation return")
        axes.title.set_fontsize(9)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a curve
        path = out_dir / "curves" / f"{'-'.join(task)}-{dataset}-{budget}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        tmp.replace(path)
        plt.close(figure)
        plots[(task, dataset, budget)] = path
    return plots


# Pages ----------------------------------------------------------------------------------------------------------------

def provenance(records: list[RunRecord], command: str) -> str:
    """Where the numbers come from: the devices, the code's commits, when, and the training speed."""
    written = [r.result["written_at"] for r in records]
    runs = f"{len(records)} finished run" + ("s" if len(records) > 1 else "")
    lines = [f"Written by `{command}` from {runs} (results written {datetime.date.fromtimestamp(min(written))} to "
             f"{datetime.date.fromtimestamp(max(written))}).",
             f"- commit: {', '.join(sorted({r.result['commit'] or 'unknown' for r in records}))}"]
    for device in sorted({r.result["device"] for r in records}):
        for task in tasks(records):
            mine = [r for r in records if r.result["device"] == device and r.task == task]
            if not mine:
                continue
            timed = [r for r in mine if r.result["updates_per_sec"]]
            speeds = [f"{algo} {np.median([r.result['updates_per_sec'] for r in timed if r.algo == algo]):.0f}"
                      for algo in ordered([r.algo for r in timed], ALGOS)]
            on_task = f" on {task_name(task)}" if len(tasks(records)) > 1 else ""
            lines.append(f"- device: {device}; updates/s{on_task} (median over runs, evaluations excluded): "
                         f"{', '.join(speeds) or 'not recorded'}")
    return "\n".join(lines)


CELL_LEGEND = ("A cell: mean over seeds of each seed's last evaluation [95 % bootstrap CI of the mean] n=seeds "
               "(one seed: no interval); a table never mixes budgets.")


def report_text(records: list[RunRecord], unfinished: list[RunRecord], plots: dict, out_dir: Path,
                command: str) -> str:
    sections = ["# Results", provenance(records, command), CELL_LEGEND]
    all_grids = grids(records)
    for grid in all_grids:
        parts = [f"## {table_title(grid.task, grid.budget)}",
                 "**Last evaluation** (the headline), with the card of the dataset the runs trained on.",
                 grid.table(lambda r: r.eval_returns[-1], cards=True),
                 "**Best evaluation** during training (optimistic: the maximum over evaluations, chosen by looking "
                 "at the evaluation returns themselves).",
                 grid.table(lambda r: r.eval_returns.max())]
        if any(r.last_win_rate is not None for r in grid.runs):
            parts += ["**Win rate** at the last evaluation.", grid.table(lambda r: r.last_win_rate, decimals=2)]
        parts.append(aggregate_tables([grid]))
        parts += [f"![{task_name(task)} {dataset} {budget}]({path.relative_to(out_dir).as_posix()})"
                  for (task, dataset, budget), path in plots.items() if (task, budget) == (grid.task, grid.budget)]
        sections.append("\n\n".join(parts))
    for task in tasks(records):
        table = published_table(task, [r for r in records if r.task == task],
                                f"## Published: {task_name(task)}\n\nOther data and simulator:")
        if table:
            sections.append(table)
    if unfinished:
        sections.append("## Unfinished runs (not in the tables)\n\n" + "\n".join(
            f"- `{r.path.parent}`: last evaluation at step {r.eval_steps[-1] if len(r.eval_steps) else 'none'} "
            f"of {r.args['total_steps']}" for r in unfinished))
    return "\n\n".join(sections) + "\n"


def readme_block(records: list[RunRecord]) -> str:
    """The top-level README's results section: the last-evaluation tables, the aggregates and the papers' numbers."""
    all_grids = grids(records)
    parts = [BLOCK_BEGIN,
             f"{CELL_LEGEND} Best-during-training tables, dataset cards, win rates, devices and learning curves: "
             "[benchmarks/results/README.md](benchmarks/results/README.md).",
             *(f"**{table_title(g.task, g.budget)}**, last evaluation\n\n{g.table(lambda r: r.eval_returns[-1])}"
               for g in all_grids),
             aggregate_tables(all_grids),
             *filter(None, (published_table(task, [r for r in records if r.task == task],
                                            f"**Published, {task_name(task)}** (other data and simulator):")
                            for task in tasks(records))),
             BLOCK_END]
    return "\n\n".join(parts)


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the results markers (markers included) replaced by `block`."""
    pattern = re.compile(re.escape(BLOCK_BEGIN) + ".*?" + re.escape(BLOCK_END), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected one results block between {BLOCK_BEGIN!r} and {BLOCK_END!r}")
    return pattern.sub(lambda _: block, text)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(results_dir: Path, out: Path, command: str) -> str:
    """Write the report of the runs under `results_dir` to `out` (curves beside it); returns its text."""
    records = load_results(results_dir)
    finished = latest_finished_per_seed(records)
    plots = plot_learning_curves(finished, out.parent)
    text = report_text(finished, [r for r in records if not r.finished], plots, out.parent, command)
    write_atomically(out, text)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", type=Path, nargs="?", default=RESULTS_DIR,
                        help="folder searched for result.json files (default: benchmarks/results, whose report also "
                             "rewrites the results block of README.md)")
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
    if not any(r.finished for r in load_results(args.results_dir)):
        parser.error(f"no finished runs under {args.results_dir}: a run is a result.json file")
    # The README's block describes the committed results: check its markers before anything is written.
    readme = README.read_text() if args.results_dir.resolve() == RESULTS_DIR else None
    if readme is not None and (readme.count(BLOCK_BEGIN), readme.count(BLOCK_END)) != (1, 1):
        parser.error(f"{README}: expected one line {BLOCK_BEGIN!r} and one line {BLOCK_END!r}")
    write_report(args.results_dir, args.out, shlex.join(["python", "benchmarks/report.py", *argv]))
    print(f"wrote {args.out}")
    if readme is not None:
        write_atomically(README, replace_block(readme, readme_block(
            latest_finished_per_seed(load_results(args.results_dir)))))
        print(f"wrote the results block of {README}")


if __name__ == "__main__":
    main()
