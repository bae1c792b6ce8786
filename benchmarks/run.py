"""Run the benchmark grid through submitit: every (algo, env, dataset, seed) as one job, here or on a Slurm cluster.

    python benchmarks/run.py --algos omcda omiga icq comadice --envs Hopper \\
        --datasets expert medium medium-replay medium-expert --seeds 0 1 2 3 4 [--workers N] [-- ARGS FOR EVERY SCRIPT]
    python benchmarks/run.py --launcher slurm --partition gpu --time 1440 --gpus-per-job 1 --array-parallelism 20 ...

Each cell has a folder `{runs_dir}/{env}__{dataset}__{algo}__{seed}/`. The script runs with that folder as its working
directory, so its run directory (TensorBoard events, args.json, result.json, model.pt) is
`runs/{env}__{dataset}__{algo}__{seed}__{time}/` inside it. Every script runs with --save-model, so it writes a
checkpoint at every evaluation; the scripts' output goes to submitit's logs in `{runs_dir}/submitit/`.

`--status` prints, for the same command, every cell's state (finished with its final return, running, resumable
from a checkpoint, not started) with its updates done and the time left at its measured updates/s, then one line
for the whole grid; it starts nothing.

Running the same command again continues the grid: a cell whose result.json says finished is skipped (whatever the
arguments after --; extend a finished run by hand with the script's --resume RUN_DIR --total-steps N), an unfinished
cell with a model.pt is resumed from it with --resume, and any other cell starts again from scratch.

--launcher local (default): submitit's LocalExecutor on this machine, --workers jobs at once; waits for every job
and prints a summary. SIGINT or SIGTERM to run.py stops the running cells' scripts, each with a checkpoint, and
exits 130 or 143. --launcher slurm: one job array (--partition, --time, --gpus-per-job, --array-parallelism);
run.py exits once it is submitted. Missing datasets are generated once, sequentially, before any job starts (unless
the script arguments include --no-generate), so parallel jobs never write the same file. `--exp-name` is the
algorithm's name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import submitit  # noqa: E402
import torch  # noqa: E402

from common.cli import StopOnSignal  # noqa: E402
from common.collect import ensure_dataset  # noqa: E402
from common.datasets import QUALITIES, dataset_path  # noqa: E402
from common.envs import ENV_NAMES  # noqa: E402
from common.results import read_result  # noqa: E402

ALGOS = ("omcda", "omiga", "icq", "comadice", "bc", "cql_ma", "cfcql", "omar", "bcq_ma")
GRID_FLAGS = ("--env", "--dataset", "--seed", "--exp-name", "--data-dir", "--resume")
LOG_TAIL_LINES = 5  # of a failed job's error log, shown in the summary
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Run:
    algo: str
    env: str
    dataset: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.env}__{self.dataset}__{self.algo}__{self.seed}"

    def script_arguments(self, data_dir: Path, extra: list[str]) -> list[str]:
        return ["--env", self.env, "--dataset", self.dataset, "--seed", str(self.seed), "--exp-name", self.algo,
                "--data-dir", str(data_dir), "--save-model", *extra]


def plan(cell: Path) -> tuple[str, Path | None]:
    """What to do with a grid cell: ("skip", None) when one of its runs finished, ("resume", run directory) when one
    has a checkpoint (the latest), else ("run", None)."""
    results = (read_result(path) for path in cell.glob("runs/*/result.json"))
    if any(result is not None and result["finished"] for result in results):
        return "skip", None
    checkpoints = sorted(cell.glob("runs/*/model.pt"), key=lambda path: path.stat().st_mtime)
    if checkpoints:
        return "resume", checkpoints[-1].parent
    return "run", None


def processes() -> dict[int, tuple[Path, str]]:
    """This machine's processes as pid -> (working directory, command line): Linux's /proc, else none."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            found[int(proc.name)] = Path(os.readlink(proc / "cwd")), (proc / "cmdline").read_text().replace("\0", " ")
        except OSError:  # gone, or not ours to read
            continue
    return found


def running_cells() -> set[Path]:
    """The working directories of this machine's processes: a local job runs in its cell."""
    return {cwd for cwd, _ in processes().values()}


def stop_scripts(cells: dict[Path, str]) -> int:
    """SIGTERM every script of `cells` (cell -> algorithm) running here, which then checkpoints and exits: submitit's
    local jobs do not pass a signal on to their command. Returns how many were signalled."""
    signalled = 0
    for pid, (cwd, command) in processes().items():
        if cwd in cells and str(REPO / f"{cells[cwd]}.py") in command.split():
            os.kill(pid, signal.SIGTERM)
            signalled += 1
    return signalled


def cell_status(cell: Path, total_steps: int | None, running: set[Path]) -> dict:
    """One cell's state: finished / running / resumable / not started, its updates done (the checkpoint's step, or
    the last evaluation's for a running cell), the planned total and its measured updates/s (None when unknown)."""
    results = [result for path in cell.glob("runs/*/result.json") if (result := read_result(path)) is not None]
    results.sort(key=lambda result: result.get("written_at", 0))
    latest = results[-1] if results else {}
    done = latest["evaluations"][-1]["step"] if latest.get("evaluations") else 0
    total = latest.get("args", {}).get("total_steps", total_steps)
    if any(result.get("finished") for result in results):
        final = next(result for result in results if result.get("finished"))["last"]
        return dict(state="finished", done=total, total=total, ups=latest.get("updates_per_sec"),
                    note=f"{final['mean']:.1f} ± {final['std']:.1f}")
    checkpoints = sorted(cell.glob("runs/*/model.pt"), key=lambda path: path.stat().st_mtime)
    if cell.resolve() in running:
        state = "running"
    elif checkpoints:
        state = "resumable"
        done = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["step"]
    else:
        state = "not started" if not results else "restart"  # results but no checkpoint: starts again
    return dict(state=state, done=done, total=total, ups=latest.get("updates_per_sec"), note="")


def print_status(grid: list[Run], runs_dir: Path, total_steps: int | None) -> None:
    """A line per cell and one for the grid; the time left of a cell with no speed of its own uses the mean updates/s
    of its algorithm's other cells."""
    running = running_cells()
    statuses = {run: cell_status(runs_dir / run.name, total_steps, running) for run in grid}
    speeds = {}
    for run, status in statuses.items():
        if status["ups"]:
            speeds.setdefault(run.algo, []).append(status["ups"])
    left_seconds, unknown = 0.0, 0
    for run, status in statuses.items():
        ups = status["ups"] or (sum(speeds[run.algo]) / len(speeds[run.algo]) if run.algo in speeds else None)
        remaining = (status["total"] or 0) - status["done"] if status["total"] else None
        if status["state"] == "finished":
            eta = ""
        elif remaining is None or ups is None:
            eta, unknown = "time left unknown", unknown + 1
        else:
            left_seconds += remaining / ups
            eta = f"{remaining / ups / 60:.0f} min left at {ups:.0f} updates/s"
        progress = f"{status['done']:,}/{status['total']:,}" if status["total"] else f"{status['done']:,}/?"
        print(f"{status['state']:<12} {run.name:<45} {progress:>17}  {status['note'] or eta}")
    counts = {state: sum(s["state"] == state for s in statuses.values())
              for state in ("finished", "running", "resumable", "restart", "not started")}
    print("grid: " + ", ".join(f"{count} {state}" for state, count in counts.items() if count)
          + f" of {len(grid)}; {left_seconds / 3600:.1f} core-hours left at the measured speeds"
          + (f" (+{unknown} cells of unknown speed)" if unknown else ""))


def prepare_datasets(runs: list[Run], data_dir: Path, generate: bool, dry_run: bool) -> None:
    """Generate the missing datasets of `runs` one after the other, before any job starts."""
    for env, quality in dict.fromkeys((run.env, run.dataset) for run in runs):
        path = dataset_path(data_dir, env, None, quality)
        if path.exists():
            continue
        if dry_run:
            print(f"would generate {path}" if generate else f"missing {path} (--no-generate)")
            continue
        try:
            ensure_dataset(data_dir, env, None, quality, generate)
        except FileNotFoundError as error:
            raise SystemExit(str(error)) from error


def make_executor(args: argparse.Namespace) -> submitit.Executor:
    executor = submitit.AutoExecutor(folder=args.runs_dir.resolve() / "submitit", cluster=args.launcher)
    gpus = args.gpus_per_job
    if gpus is None:  # all a local job sees of this machine's GPUs: one is what a script uses
        gpus = min(1, torch.cuda.device_count()) if args.launcher == "local" else 1
    executor.update_parameters(timeout_min=args.time, gpus_per_node=gpus, name="offline-marl")
    if args.launcher == "slurm":
        executor.update_parameters(slurm_partition=args.partition, slurm_array_parallelism=args.array_parallelism)
    return executor


def make_job(run: Run, cell: Path, arguments: list[str], threads: str) -> submitit.helpers.CommandFunction:
    """The script as a submitit job in its cell's folder (a class of submitit's, so any job process can unpickle it).
    The job's own environment is kept (Slurm's and submitit's CUDA_VISIBLE_DEVICES among it), with `threads` CPU
    threads and unbuffered output added."""
    command = ["env", f"OMP_NUM_THREADS={threads}", "PYTHONUNBUFFERED=1", sys.executable, str(REPO / f"{run.algo}.py")]
    return submitit.helpers.CommandFunction([*command, *arguments], cwd=cell)


def outcome(cell: Path, job: submitit.Job) -> tuple[bool, str]:
    """Whether the cell's run finished, with its last evaluation, or the end of the job's error log."""
    results = (read_result(path) for path in cell.glob("runs/*/result.json"))
    finished = [result for result in results if result is not None and result["finished"]]
    if job.state != "FINISHED" or job.exception() is not None or not finished:
        log = Path(job.paths.stderr)
        text = log.read_text(errors="replace") if log.exists() else ""
        tail = [line for line in text.splitlines() if line.strip()][-LOG_TAIL_LINES:] or ["(no output)"]
        return False, f"job {job.job_id} {job.state}, log {log} ends:\n" + "\n".join(f"    {line}" for line in tail)
    last = finished[0]["last"]
    return True, f"{last['mean']:.2f} ± {last['std']:.2f} over {last['episodes']} episodes"


def run_local(executor: submitit.Executor, jobs: dict[Run, tuple[Path, submitit.helpers.CommandFunction]],
              workers: int) -> tuple[list[str], StopOnSignal]:
    """Run the jobs, `workers` at a time; returns the failures. SIGINT or SIGTERM stops the running scripts (each
    checkpoints) and starts nothing more: the same command then resumes them."""
    pending, running, failed, stopping = list(jobs), {}, [], False
    stop = StopOnSignal()
    while pending or running:
        while pending and len(running) < workers and not stop.requested:
            run = pending.pop(0)
            running[run] = executor.submit(jobs[run][1])
        if stop.requested and not stopping:
            stopping = True
            print(f"{stop.received.name}: stopping {stop_scripts({jobs[run][0]: run.algo for run in running})} "
                  f"running cells (they checkpoint); {len(pending)} not started", flush=True)
            pending = []
        time.sleep(POLL_SECONDS)
        for run in [run for run, submitted in running.items() if submitted.done()]:
            ok, message = outcome(jobs[run][0], running.pop(run))
            done = len(jobs) - len(pending) - len(running)
            print(f"[{done}/{len(jobs)}] {'finished' if ok else 'stopped' if stop.requested else 'FAILED'} {run.name}: "
                  f"{message}", flush=True)
            if not ok and not stop.requested:
                failed.append(f"{run.name}: {message}")
    stop.restore()
    return failed, stop


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    separator = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:separator], argv[separator + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="arguments after -- are passed to "
                                     "every script, e.g. -- --total-steps 100000")
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--envs", nargs="+", choices=ENV_NAMES, default=["Hopper"])
    parser.add_argument("--datasets", nargs="+", choices=QUALITIES, default=list(QUALITIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--dry-run", action="store_true", help="list what would run and what is finished, run nothing")
    parser.add_argument("--status", action="store_true", help="print each cell's state, updates done and time left, "
                        "and a line for the whole grid; run nothing")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: submitit's LocalExecutor on this machine; slurm: a Slurm job array")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="local: jobs at once (default: half the CPU cores)")
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit of each job in minutes (default: 1440)")
    parser.add_argument("--gpus-per-job", type=int,
                        help="GPUs of each job (default: slurm 1; local 1 if this machine has a GPU, else 0)")
    parser.add_argument("--partition", help="slurm: the partition to submit to (default: the cluster's)")
    parser.add_argument("--array-parallelism", type=int, default=32, help="slurm: jobs of the array running at once")
    args = parser.parse_args(own)
    for name in ("workers", "time", "array_parallelism"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.gpus_per_job is not None and args.gpus_per_job < 0:
        parser.error("--gpus-per-job must be at least 0")
    clashes = [arg for arg in extra if arg.split("=")[0].replace("_", "-") in GRID_FLAGS]
    if clashes:
        parser.error(f"{' '.join(clashes)} after -- is set by run.py for each run: use --envs, --datasets, --seeds, "
                     f"--data-dir (a cell with a checkpoint is resumed by itself)")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    runs_dir, data_dir = args.runs_dir.resolve(), args.data_dir.resolve()
    grid = [Run(algo, env, dataset, seed) for env in args.envs for dataset in args.datasets for algo in args.algos
            for seed in args.seeds]
    if args.status:
        total = next((int(extra[i + 1]) for i, arg in enumerate(extra[:-1]) if arg == "--total-steps"), None)
        print_status(grid, runs_dir, total)
        return 0
    plans = {run: plan(runs_dir / run.name) for run in grid}
    pending = [run for run in grid if plans[run][0] != "skip"]
    skipped = len(grid) - len(pending)
    for run in grid:
        action, run_dir = plans[run]
        print(f"{action if run_dir is None else f'{action} from {run_dir.name}':<60} {run.name}")
    prepare_datasets(pending, data_dir, generate="--no-generate" not in extra, dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run: {len(pending)} to run, {skipped} finished, {len(grid)} in the grid")
        return 0

    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.workers))
    jobs = {}
    for run in pending:
        cell = runs_dir / run.name
        action, run_dir = plans[run]
        if action == "run":  # a run that stopped before its first checkpoint left nothing to continue
            shutil.rmtree(cell / "runs", ignore_errors=True)
        cell.mkdir(parents=True, exist_ok=True)
        resume = ["--resume", str(run_dir)] if action == "resume" else []
        jobs[run] = cell, make_job(run, cell, [*run.script_arguments(data_dir, extra), *resume], threads)
    if not jobs:
        print(f"nothing to run: all {skipped} runs finished")
        return 0
    try:
        executor = make_executor(args)
    except RuntimeError as error:  # submitit's: no Slurm here
        print(f"run.py: error: --launcher {args.launcher}: {error}", file=sys.stderr)
        return 2
    if args.launcher == "slurm":
        with executor.batch():
            submitted = [executor.submit(function) for _, function in jobs.values()]
        print(f"submitted {len(submitted)} jobs to Slurm (job ids {submitted[0].job_id} ... {submitted[-1].job_id}), "
              f"skipped {skipped} (already finished); logs in {runs_dir / 'submitit'}. Run this command again once "
              f"they are done: it resumes what a time limit stopped.")
        return 0

    print(f"running {len(pending)} runs, {args.workers} at once, OMP_NUM_THREADS={threads}, in {runs_dir}")
    failed, stop = run_local(executor, jobs, args.workers)
    if stop.requested:
        stop.exit("the grid stopped; its cells kept their checkpoints, and the same command resumes them")
    print(f"\nfinished {len(pending) - len(failed)}, skipped {skipped} (already finished), failed {len(failed)}")
    for line in failed:
        print(f"  failed {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
