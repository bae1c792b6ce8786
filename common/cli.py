"""Command-line plumbing every algorithm script shares: argument checks, resuming from a checkpoint, user errors
without a traceback, and stopping on Ctrl-C with a checkpoint.

    with exit_on_user_error():
        args, checkpoint = parse_args(Args)        # checkpoint: None, or the --resume run's model.pt
        check_args(args, {"beta": POSITIVE})       # the common ranges plus the script's own
        device = ...
        check_device(checkpoint, device)
        ... load the environment and the dataset ...
    stop = StopOnSignal()                          # from here on, a signal ends the run with a checkpoint
    with stop.interruptible(save):                  # behaviour cloning, evaluations: abandoned at once
        ...
    for step in ...:
        ...
        if stop.requested:                          # updates: finished, then checkpointed
            break
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import sys
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, TypeVar

import torch
import tyro
from tqdm import tqdm

from common.datasets import DatasetError
from common.envs import EnvConfigError, default_obs_mode
from common.results import RunDirBusy, lock_run_dir

Rule = tuple[Callable[[Any], bool], str]  # (is the value valid, the valid range in words)


class ArgumentError(ValueError):
    """A command-line argument outside its valid range."""


def at_least(low: int) -> Rule:
    return (lambda value: value >= low, f">= {low}")


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    def valid(value: float) -> bool:
        return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)

    return valid, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


POSITIVE: Rule = (lambda value: 0 < value < math.inf, "> 0 and finite")
NON_NEGATIVE: Rule = (lambda value: 0 <= value < math.inf, ">= 0 and finite")
FINITE: Rule = (lambda value: math.isfinite(value), "finite")

# The arguments every script has, and those that mean the same in every script that has them. NaN fails every
# comparison, so it is rejected too.
COMMON_RULES: dict[str, Rule] = {
    "seed": interval(0, 2**32 - 1),  # NumPy's seeds
    "total_steps": (lambda value: value >= 1, ">= 1 (there is no evaluate-only mode)"),
    "batch_size": at_least(1),
    "eval_every": at_least(1),
    "eval_episodes": at_least(1),
    "final_eval_episodes": at_least(1),
    "log_every": at_least(1),
    "gamma": interval(0, 1, high_open=True),
    "tau": interval(0, 1, low_open=True),
    "grad_clip": POSITIVE,
    "alpha": POSITIVE,  # OMIGA's, ICQ's and ComaDICE's regularisation strength or temperature: each divides by it
    "num_seeds": at_least(1),
}
SUFFIX_RULES: dict[str, Rule] = {"_lr": POSITIVE, "_dim": at_least(1)}  # learning rates, network sizes


def rule_for(name: str, rules: dict[str, Rule] | None = None) -> Rule | None:
    """The rule of argument `name`: the script's own in `rules` if there is one, else the common rule of its name or
    of its suffix (`*_lr`, `*_dim`). Every numeric argument has one (tests/test_errors.py checks it)."""
    rule = (rules or {}).get(name) or COMMON_RULES.get(name)
    return rule or next((r for suffix, r in SUFFIX_RULES.items() if name.endswith(suffix)), None)


def check_args(args: Any, rules: dict[str, Rule] | None = None) -> None:
    """Raise `ArgumentError` naming the first argument of the dataclass `args` outside its valid range (rule_for);
    fields without a rule are not checked."""
    for field in fields(args):
        rule, value = rule_for(field.name, rules), getattr(args, field.name)
        if rule is not None and not rule[0](value):
            raise ArgumentError(f"--{field.name.replace('_', '-')} {value}: must be {rule[1]}")


ArgsT = TypeVar("ArgsT")

# What may change when a run is resumed: how long it trains, how it evaluates and logs, where the data is; not what
# it computes.
RUN_LEVEL_ARGS = ("resume", "cuda", "track", "wandb_project_name", "data_dir", "no_generate", "total_steps",
                  "eval_every", "eval_episodes", "final_eval_episodes", "log_every", "save_model")


class ResumeError(ValueError):
    """A run that `--resume` cannot continue exactly."""


def with_env_defaults(args: ArgsT) -> ArgsT:
    """`args` with --obs-mode, when not given, set to the env's default (common.envs.default_obs_mode)."""
    if getattr(args, "obs_mode", "") is None:
        return replace(args, obs_mode=default_obs_mode(args.env))
    return args


def parse_args(args_class: type[ArgsT]) -> tuple[ArgsT, dict | None]:
    """The command line's arguments and, with `--resume RUN_DIR`, the checkpoint RUN_DIR/model.pt (loaded on the CPU),
    whose arguments become the defaults: `--resume RUN_DIR --total-steps N` continues a run to N updates. Raises
    `ResumeError` if there is no checkpoint, if it holds no random number generator states, if an argument outside
    RUN_LEVEL_ARGS differs from the checkpoint's, or if the checkpoint has reached --total-steps already."""
    args = with_env_defaults(tyro.cli(args_class))
    if args.resume is None:
        return args, None
    path = Path(args.resume) / "model.pt"
    if not path.is_file():
        raise ResumeError(f"--resume {args.resume}: no checkpoint {path} (runs write it at every evaluation with "
                          f"--save-model, and when Ctrl-C or SIGTERM stops them)")
    lock_run_dir(Path(args.resume))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, or not torch.save's: whatever torch raises, the file is unusable
        raise ResumeError(f"--resume {args.resume}: {path} is not a readable checkpoint ({error})") from error
    if "rng" not in checkpoint:
        raise ResumeError(f"--resume {args.resume}: {path} holds no random number generator states (it was written "
                          f"before --resume existed), so the run cannot continue exactly")
    check_same_script(checkpoint, args_class, args.resume)
    names = [field.name for field in fields(args_class)]
    unknown = sorted(set(checkpoint["args"]) - set(names))
    if unknown:
        raise ResumeError(f"--resume {args.resume}: {path} has arguments this script does not know: {unknown}")
    saved = args_class(**{**checkpoint["args"], "resume": args.resume})
    args = tyro.cli(args_class, default=saved)
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the checkpoint's: {getattr(saved, name)})"
               for name in names if name not in RUN_LEVEL_ARGS and getattr(args, name) != getattr(saved, name)]
    if changed:
        may_change = ", ".join(f"--{name.replace('_', '-')}" for name in RUN_LEVEL_ARGS[1:])
        raise ResumeError(f"--resume {args.resume}: {'; '.join(changed)}: a resumed run keeps the arguments that "
                          f"define its algorithm (only {may_change} may change)")
    if checkpoint["step"] >= args.total_steps and not evaluation_due(checkpoint, args):
        raise ResumeError(f"--resume {args.resume}: the checkpoint is at update {checkpoint['step']}, so "
                          f"--total-steps {args.total_steps} leaves nothing to train")
    return args, checkpoint


def check_same_script(checkpoint: dict, args_class: type, run_dir: str) -> None:
    """A checkpoint resumes only in the script that wrote it: another script would train on under its own algorithm
    and report the hybrid under the first one's name. Checkpoints written before they named their script fall back
    on their exp_name, which is the script's name unless --exp-name changed it."""
    script = Path(sys.modules[args_class.__module__].__file__)
    saved = checkpoint.get("script")
    if saved is None and (script.parent / f"{checkpoint['args'].get('exp_name')}.py").is_file():
        saved = f"{checkpoint['args']['exp_name']}.py"
    if saved is not None and saved != script.name:
        raise ResumeError(f"--resume {run_dir}: the checkpoint was written by {saved}; resume it with "
                          f"`python {saved} --resume {shlex.quote(run_dir)}`")


def check_same_dataset(checkpoint: dict | None, card: dict) -> None:
    """A resumed run trains on the data it started with: the dataset card (transitions, episodes, returns, source) must
    be the checkpoint's; only the file's place may change."""
    if checkpoint is None or "dataset" not in checkpoint:  # not resumed, or written before checkpoints held the card
        return
    saved = checkpoint["dataset"]
    if {k: v for k, v in saved.items() if k != "file"} != {k: v for k, v in card.items() if k != "file"}:
        def describe(c: dict) -> str:
            return f"{c['file']}: {c['transitions']:,} transitions, mean return {c['return_mean']:.1f}"
        raise ResumeError(f"--resume: the run trained on {describe(saved)}, not on {describe(card)}; resume it with "
                          f"the dataset it started with (--data-dir)")


def evaluation_due(checkpoint: dict, args: Any) -> bool:
    """Whether a signal abandoned the evaluation of the checkpoint's update (a periodic one, or the final one at
    --total-steps), which a resumed run then does first. A run stopped between updates has evaluated its update
    already when that update is an evaluation's."""
    step, evaluations = checkpoint["step"], checkpoint["evaluations"][0]  # one list per seed, evaluated together
    evaluated = evaluations[-1]["step"] if evaluations else 0
    return 0 < step and (step % args.eval_every == 0 or step == args.total_steps) and evaluated < step


def check_device(checkpoint: dict | None, device: torch.device) -> None:
    """A run continues exactly only on the kind of device it was trained on: the CPU's and CUDA's random number
    generators are different generators."""
    if checkpoint is not None and checkpoint["device"] != device.type:
        raise ResumeError(f"the checkpoint was trained on {checkpoint['device']}, this run would train on "
                          f"{device.type}: resume on the same kind of device (--no-cuda runs on the CPU)")


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Print an expected user error (an argument out of range, a run that cannot be resumed, an unknown env partition,
    a dataset file that is missing or unreadable) as its message alone, without a traceback, and exit with status 2,
    as argparse and tyro do for their own errors; SIGINT (Ctrl-C) or SIGTERM while loading exits with 130 or 143.
    Any other exception keeps its traceback."""
    prog = os.path.basename(sys.argv[0])
    received = []

    def interrupt(signum: int, frame) -> NoReturn:
        received.append(signal.Signals(signum))
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in StopOnSignal.SIGNALS}
    try:
        yield
    except (ArgumentError, ResumeError, EnvConfigError, DatasetError, RunDirBusy, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        print(f"{prog}: {signum.name}: interrupted before training started (a dataset being generated is not "
              f"written)", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopOnSignal:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM into `requested`, which the training loop reads between updates so
    it can save a checkpoint and then `exit`; inside `interruptible(save)` the signal abandons the work at once
    instead. Install it before the first long stage and keep it to the end: every stage then ends in a checkpoint.
    The previous handlers are restored at once, so a second signal stops the process immediately."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: signal.Signals | None = None
        self._save: Callable[[], str] | None = None
        self._previous = {signum: signal.signal(signum, self._request) for signum in self.SIGNALS}

    def _request(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
        self.restore()
        if self._save is not None:
            self.exit(self._save())

    @contextmanager
    def interruptible(self, save: Callable[[], str]) -> Iterator[None]:
        """Work that a signal abandons at once (behaviour cloning, an evaluation): `save()` writes the last consistent
        checkpoint, from which --resume redoes the work, and returns the line to print; the process then exits. A
        signal received before the work starts stops it there."""
        if self.requested:
            self.exit(save())
        self._save = save
        try:
            yield
        finally:
            self._save = None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def exit(self, message: str) -> NoReturn:
        """Print `message` and exit with the shell's status for the signal (130 for SIGINT, 143 for SIGTERM)."""
        tqdm.write(f"{os.path.basename(sys.argv[0])}: {self.received.name}: {message}", file=sys.stderr)  # on its own line
        raise SystemExit(128 + self.received)
