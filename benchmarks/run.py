"""Run the benchmark grid: every (algo, env, dataset, seed) as one subprocess, several at once, resumable.

    python benchmarks/run.py --algos omcda omiga icq comadice --envs Hopper \\
        --datasets expert medium medium-replay medium-expert --seeds 0 1 2 3 4 [--workers N] [-- ARGS FOR EVERY SCRIPT]

Each run has a folder `{runs_dir}/{env}__{dataset}__{algo}__{seed}/`. The script runs with that folder as its working
directory, so it writes its run directory (TensorBoard events, args.json) inside it, to
`runs/{env}__{dataset}__{algo}__{seed}__{time}/`; its stdout and stderr go to `log.txt`. When the script exits 0,
`result.json` is written into its run directory: the final return, the script's arguments, the time taken, the
hardware and the grid command.

Resuming: a run whose result.json holds the same script arguments is finished and skipped; any other run folder is
cleared and run again. Missing datasets are generated once, sequentially, before any run starts (unless the script
arguments include --no-generate), so parallel runs never write the same file. `--exp-name` is the algorithm's name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common.collect import ensure_dataset  # noqa: E402
from common.datasets import QUALITIES, dataset_path  # noqa: E402
from common.envs import ENV_NAMES  # noqa: E402

ALGOS = ("omcda", "omiga", "icq", "comadice", "bc", "cql_ma", "cfcql", "omar")
GRID_FLAGS = ("--env", "--dataset", "--seed", "--exp-name", "--data-dir")
LOG_TAIL_LINES = 5  # of a failed run's log, shown in the summary
FINAL_LINE = re.compile(r"^final return: (\S+) ± (\S+) over (\d+) episodes$", re.M)


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
                "--data-dir", str(data_dir), *extra]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def machine_name() -> str:
    """This machine's CPU and, where there is one, GPU (the scripts train on the GPU when there is one)."""
    names = [device_name(torch.device("cpu"))]
    if torch.cuda.is_available():
        names.append(device_name(torch.device("cuda")))
    return ", ".join(names)


def plan(run_folder: Path, arguments: list[str]) -> str:
    """What to do with a run: skip it when it finished with these arguments, else run it, saying why."""
    if not run_folder.exists():
        return "run"
    results = [json.loads(path.read_text()) for path in run_folder.glob("runs/*/result.json")]
    if any(result["arguments"] == arguments for result in results):
        return "skip"
    return "rerun (arguments changed)" if results else "rerun (unfinished)"


def prepare_datasets(runs: list[Run], data_dir: Path, generate: bool, dry_run: bool) -> None:
    """Generate the missing datasets of `runs` one after the other, before any worker starts."""
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


def execute(run: Run, run_folder: Path, arguments: list[str], env_vars: dict, record: dict) -> tuple[bool, str]:
    """Run one script in a fresh `run_folder`; on success write result.json into its run directory."""
    shutil.rmtree(run_folder, ignore_errors=True)
    run_folder.mkdir(parents=True)
    log = run_folder / "log.txt"
    start = time.time()
    with log.open("w") as out:
        process = subprocess.run([sys.executable, str(REPO / f"{run.algo}.py"), *arguments], cwd=run_folder,
                                 env=env_vars, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    text = log.read_text(errors="replace")
    final_lines = FINAL_LINE.findall(text)
    run_dirs = [path.parent for path in run_folder.glob("runs/*/args.json")]
    if process.returncode != 0 or not final_lines or len(run_dirs) != 1:
        tail = [line for line in text.splitlines() if line.strip()][-LOG_TAIL_LINES:] or ["(no output)"]
        return False, f"exit code {process.returncode}, log {log} ends:\n" + "\n".join(f"    {line}" for line in tail)
    mean, std, episodes = final_lines[-1]
    result = dict(return_mean=float(mean), return_std=float(std), episodes=int(episodes), seconds=round(seconds, 1),
                  finished_at=time.time(), arguments=arguments, **record)
    (run_dirs[0] / "result.json").write_text(json.dumps(result, indent=2))
    return True, f"{mean} ± {std} over {episodes} episodes ({seconds:.0f} s)"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    separator = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:separator], argv[separator + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="arguments after -- are passed to "
                                     "every script, e.g. -- --total-steps 100000")
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--envs", nargs="+", choices=ENV_NAMES, default=["Hopper"])
    parser.add_argument("--datasets", nargs="+", choices=QUALITIES, default=list(QUALITIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="runs at once (default: half the CPU cores)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--dry-run", action="store_true", help="list what would run and what is finished, run nothing")
    args = parser.parse_args(own)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    clashes = [arg for arg in extra if arg.split("=")[0].replace("_", "-") in GRID_FLAGS]
    if clashes:
        parser.error(f"{' '.join(clashes)} after -- is set by run.py for each run: use --envs, --datasets, --seeds, "
                     f"--data-dir")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    runs_dir, data_dir = args.runs_dir.resolve(), args.data_dir.resolve()
    grid = [Run(algo, env, dataset, seed) for env in args.envs for dataset in args.datasets for algo in args.algos
            for seed in args.seeds]
    arguments = {run: run.script_arguments(data_dir, extra) for run in grid}
    plans = {run: plan(runs_dir / run.name, arguments[run]) for run in grid}
    pending = [run for run in grid if plans[run] != "skip"]
    skipped = len(grid) - len(pending)
    for run in grid:
        print(f"{plans[run]:<26} {run.name}")
    prepare_datasets(pending, data_dir, generate="--no-generate" not in extra, dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run: {len(pending)} to run, {skipped} finished, {len(grid)} in the grid")
        return 0

    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.workers))
    env_vars = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    record = dict(hardware=machine_name(), command=shlex.join(["python", "benchmarks/run.py", *argv]))
    print(f"running {len(pending)} runs, {args.workers} at once, OMP_NUM_THREADS={threads}, in {runs_dir}")
    failed = []
    with ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(execute, run, runs_dir / run.name, arguments[run], env_vars, record): run
                   for run in pending}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                run = futures[future]
                ok, message = future.result()
                print(f"[{done}/{len(pending)}] {'finished' if ok else 'FAILED'} {run.name}: {message}", flush=True)
                if not ok:
                    failed.append(f"{run.name}: {message}")
        except KeyboardInterrupt:  # the running scripts got the same Ctrl-C; start no more
            pool.shutdown(cancel_futures=True)
            raise

    print(f"\nfinished {len(pending) - len(failed)}, skipped {skipped} (already finished), failed {len(failed)}")
    for line in failed:
        print(f"  failed {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
