"""result.json: what one run reports beside its TensorBoard events, in a file small enough to commit.

    {"args": {...}, "script": "omcda.py", "commit": "<git HEAD>" or null, "device": "NVIDIA H100 ..." or "<CPU> (2 cores)",
     "dataset": {dataset card}, "evaluations": [{"step", "mean", "std", "episodes"}, ...], "last": {...},
     "best": {...}, "updates_per_sec": ..., "training_seconds": ..., "evaluation_seconds": ... or null,
     "finished": true or false, "written_at": <unix time>}

The scripts rewrite it atomically at every evaluation and after the final one (then `finished` is true).
`updates_per_sec` is the training speed (evaluations excluded) of the session that wrote it; `training_seconds` and
`evaluation_seconds` are that session's time in updates (between logs) and in evaluations (null in the files of
scripts that did not time them yet), from which the share of time spent evaluating follows. benchmarks/report.py
builds its tables and learning curves from these files alone.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def write_json(path: Path, obj) -> None:
    """Write `obj` as JSON to `path` atomically: a reader sees the old file or the new one, never half of one (the
    temporary name is the process's own, so two writers cannot interleave)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


_LOCKED: dict[Path, int] = {}  # run directory -> the descriptor holding its lock, for the life of the process


def lock_run_dir(run_dir: Path) -> None:
    """Hold an advisory lock (flock on run_dir/.lock) until the process ends: two processes writing one run's
    checkpoint and result files (a double --resume) would interleave them. Raises RunDirBusy if another process holds
    it; a second call from this process is a no-op."""
    key = run_dir.resolve()
    if key in _LOCKED:
        return
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(f"{run_dir}: another process is training this run (it holds {run_dir / '.lock'}); stop it "
                         f"first, its checkpoint is kept") from None
    _LOCKED[key] = fd


RESULT_KEYS = ("args", "dataset", "evaluations", "finished", "written_at")
RESULT_ARGS = ("env", "dataset", "exp_name", "seed", "total_steps")


def read_result(path: Path) -> dict | None:
    """A result.json as a dict, or None with one warning line naming the file when it cannot be read, is not JSON or
    lacks what the tools read (RESULT_KEYS, and RESULT_ARGS in its args): one bad file must not stop a report."""
    try:
        result = json.loads(path.read_text())
        missing = [key for key in RESULT_KEYS if key not in result]
        missing += [f"args.{key}" for key in RESULT_ARGS if key not in result.get("args", {})]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        if not isinstance(result["evaluations"], list):
            raise ValueError("evaluations is not a list")
    except (OSError, ValueError, AttributeError, TypeError) as error:  # JSONDecodeError is a ValueError
        print(f"warning: skipping {path}: {error}", file=sys.stderr)
        return None
    return result


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout (e.g. an exported copy) or without git."""
    try:
        result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model and its number of cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


@dataclass
class RunResult:
    """A run's result.json, kept up to date: `add_evaluation` after each evaluation, `time` at each log with the
    updates and seconds of training since the last one (evaluations excluded), from which updates/s is computed. The
    run directory stays locked (lock_run_dir) while the process lives."""

    run_dir: Path
    args: dict
    device: torch.device
    dataset: dict
    evaluations: list[dict] = field(default_factory=list)  # a resumed run continues its checkpoint's list
    commit: str | None = field(default_factory=git_commit)  # of the code this process started with
    script: str = field(default_factory=lambda: Path(sys.argv[0]).name)  # what wrote it, whatever --exp-name says
    timed_updates: int = 0
    timed_seconds: float = 0.0
    evaluation_seconds: float | None = None

    def __post_init__(self):
        lock_run_dir(self.run_dir)

    def time(self, updates: int, seconds: float) -> None:
        self.timed_updates += updates
        self.timed_seconds += seconds

    def time_evaluation(self, seconds: float) -> None:
        self.evaluation_seconds = (self.evaluation_seconds or 0.0) + seconds

    def add_evaluation(self, step: int, returns: np.ndarray, finished: bool = False,
                       wins: np.ndarray | None = None) -> None:
        """Record an evaluation's returns (and, on SMAX, its win rate) and rewrite result.json."""
        evaluation = dict(step=step, mean=float(returns.mean()), std=float(returns.std()), episodes=len(returns))
        if wins is not None:
            evaluation["win_rate"] = float(np.mean(wins))
        self.evaluations.append(evaluation)
        write_json(self.run_dir / "result.json", dict(
            args=self.args, script=self.script, commit=self.commit, device=device_name(self.device), dataset=self.dataset,
            evaluations=self.evaluations, last=self.evaluations[-1],
            best=max(self.evaluations, key=lambda evaluation: evaluation["mean"]),
            updates_per_sec=self.timed_updates / self.timed_seconds if self.timed_seconds > 0 else None,
            training_seconds=self.timed_seconds, evaluation_seconds=self.evaluation_seconds, finished=finished,
            written_at=time.time()))
