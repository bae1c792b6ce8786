"""Bad input: every script rejects it with one line naming what is wrong and exit status 2, without a traceback;
dataset files that cannot be read say how to make them again; an interrupted dataset write leaves no file that looks
valid. Signals: tests/test_signals.py."""

import dataclasses
import importlib
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.cli import POSITIVE, ArgumentError, check_args, exit_on_user_error, interval, rule_for
from common.datasets import ARRAY_KEYS, DatasetError, dataset_path, read_dataset, write_dataset
from conftest import run_forked, run_script

SCRIPTS = ["omiga.py", "omcda.py", "icq.py", "comadice.py", "bc.py", "cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
TINY_RUN = ["--no-generate", "--batch-size", "8", "--hidden-dim", "16", "--eval-episodes", "1"]
SCRIPT_TINY_RUN = {"omcda.py": ["--bc-steps", "10"]}
TRACEBACK = "Traceback (most recent call last)"
pytestmark = pytest.mark.usefixtures("forked_runs_share_imports")


@pytest.fixture(scope="module")
def bad_data_dir(tmp_path_factory, tiny_hopper_dir) -> Path:
    """The tiny Hopper medium-replay file, its first 5000 bytes as Hopper's expert file, and a copy saved under
    HalfCheetah's name."""
    data_dir = tmp_path_factory.mktemp("bad_data")
    good = dataset_path(tiny_hopper_dir, "Hopper", "3x1", "medium-replay")
    shutil.copy(good, dataset_path(data_dir, "Hopper", "3x1", "medium-replay"))
    shutil.copy(good, dataset_path(data_dir, "HalfCheetah", "6x1", "medium-replay"))
    dataset_path(data_dir, "Hopper", "3x1", "expert").write_bytes(good.read_bytes()[:5000])
    return data_dir


# (arguments, the message's regular expression after "<script>: error: ")
CASES = {
    "truncated dataset file": (
        ["--dataset", "expert"],
        r"\S*Hopper-3x1-expert\.hdf5: not a readable HDF5 file \(.*truncated file: eof = 5000.*\); delete it and make "
        r"it again\n.*\n +python -m common.collect dataset --env Hopper --quality expert --data-dir \S+\n.*OMIGA"),
    "batch size 0": (["--batch-size", "0"], r"--batch-size 0: must be >= 1$"),
    "eval every 0": (["--eval-every", "0"], r"--eval-every 0: must be >= 1$"),
    "total steps 0": (["--total-steps", "0"], r"--total-steps 0: must be >= 1 \(there is no evaluate-only mode\)$"),
    "eval episodes 0": (["--final-eval-episodes", "0"], r"--final-eval-episodes 0: must be >= 1$"),
    "gamma 1": (["--gamma", "1"], r"--gamma 1.0: must be in \[0, 1\)$"),
    "negative learning rate": (["--policy-lr", "-1e-4"], r"--policy-lr -0.0001: must be > 0 and finite$"),
    "Hopper file under HalfCheetah's name": (
        ["--env", "HalfCheetah"],
        r"\S*HalfCheetah-6x1-medium-replay\.hdf5: dataset does not match env HalfCheetah 6x1 .*; the file says it "
        r"holds Hopper 3x1 data\n.*\n +python -m common.collect dataset --env HalfCheetah --quality medium-replay"),
    "unknown agent partition": (["--agent-conf", "9x9"], r"cannot build Hopper with agent_conf='9x9'"),
    "missing dataset": (["--dataset", "medium"],
                        r"dataset file not found: \S*Hopper-3x1-medium\.hdf5\n.*\n +python -m common.collect dataset"),
}


@pytest.mark.parametrize("script, case", [(script, case) for script in SCRIPTS for case in CASES
                                          if (script, case) not in (("bc.py", "gamma 1"),  # BC has no discount
                                                                    ("bcq_ma.py", "negative learning rate"))])
def test_bad_input_is_one_message_and_exit_status_2(script, case, bad_data_dir, tmp_path):
    args, message = CASES[case]
    result = run_forked(script, "--data-dir", str(bad_data_dir), *TINY_RUN, *SCRIPT_TINY_RUN.get(script, []), *args,
                        cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert TRACEBACK not in result.stderr
    assert re.search(rf"^{re.escape(script)}: error: {message}", result.stderr, re.M), result.stderr
    assert not (tmp_path / "runs").exists()  # rejected before a run directory is made


@pytest.mark.parametrize("script", ["omiga.py", "omcda.py"])
def test_a_data_dir_that_cannot_hold_the_dataset_is_refused_before_generating(script, tmp_path):
    """Generating Hopper medium-replay takes minutes: a --data-dir that is a file is refused first, in one line."""
    (tmp_path / "a_file").write_text("")
    started = time.perf_counter()
    result = run_forked(script, "--data-dir", str(tmp_path / "a_file"), "--total-steps", "10", cwd=tmp_path)
    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr
    assert re.search(rf"^{re.escape(script)}: error: --data-dir \S+a_file: a file, not a folder$", result.stderr, re.M)
    assert time.perf_counter() - started < 60 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, valid", [(["--dataset", "foo"], "medium-replay"), (["--env", "Hoper"], "HalfCheetah")])
@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_choice_lists_the_valid_values(script, args, valid, bad_data_dir, tmp_path):
    result = run_forked(script, "--data-dir", str(bad_data_dir), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert valid in result.stderr and TRACEBACK not in result.stderr


@pytest.mark.parametrize("script, args, message", [
    ("omiga.py", ["--alpha", "0"], "--alpha 0.0: must be > 0 and finite"),  # a common rule, by name
    ("omcda.py", ["--alpha-init", "1000"], r"--alpha-init 1000.0: must be in \[--alpha-min, --alpha-max\] = \[0.1, 100.0\]"),
    ("omcda.py", ["--alpha-min", "50", "--alpha-max", "1"], r"--alpha-max 1.0: must be >= --alpha-min \(50.0\) and finite"),
    ("omar.py", ["--omar-elites", "30"], r"--omar-elites 30: must be in \[2, 20\]"),
    ("bc.py", ["--seed", "-1"], r"--seed -1: must be in \[0, 4294967295\]"),
    ("omcda.py", ["--d-tot", "nan"], "--d-tot nan: must be > 0 and finite"),
    ("icq.py", ["--beta", "-1"], "--beta -1.0: must be > 0 and finite"),
    ("bcq_ma.py", ["--vae-lr", "-1e-4"], "--vae-lr -0.0001: must be > 0 and finite"),  # no policy network
    ("comadice.py", ["--alpha", "inf"], "--alpha inf: must be > 0 and finite"),
])
def test_script_specific_ranges(script, args, message, bad_data_dir, tmp_path):
    result = run_forked(script, "--data-dir", str(bad_data_dir), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert re.fullmatch(rf"{re.escape(script)}: error: {message}\n", result.stderr), result.stderr


# Values tried against every numeric argument's range: a range that accepts them all restricts nothing.
OUT_OF_ANY_RANGE = {int: [-(10**12), -1, 0, 1, 10**12], float: [-math.inf, -1e12, -1.0, 0.0, 0.5, 1.0, 1e12, math.inf,
                                                                math.nan]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_argument_has_a_range_that_rejects_a_value(script):
    """Generated from each script's Args: a new numeric field without a rule (common, by suffix, or the script's
    argument_ranges) fails here. For each field, the first value its rule rejects must stop check_args with one
    message naming that field, while the defaults pass."""
    module = importlib.import_module(script[:-len(".py")])
    defaults = module.Args()
    rules = module.argument_ranges(defaults)
    check_args(defaults, rules)
    numeric = [field for field in dataclasses.fields(defaults)
               if type(getattr(defaults, field.name)) in OUT_OF_ANY_RANGE]
    assert len(numeric) >= 10  # the common ones at least: the field types were recognised
    for field in numeric:
        rule = rule_for(field.name, rules)
        assert rule is not None, f"{script}: --{field.name} has no range"
        kind = type(getattr(defaults, field.name))
        rejected = next((value for value in OUT_OF_ANY_RANGE[kind] if not rule[0](value)), None)
        assert rejected is not None, f"{script}: --{field.name}'s range ({rule[1]}) rejects nothing"
        bad = dataclasses.replace(defaults, **{field.name: rejected})
        with pytest.raises(ArgumentError, match=rf"^--{field.name.replace('_', '-')} {re.escape(str(rejected))}: "
                                                rf"must be "):
            check_args(bad, module.argument_ranges(bad))


def test_forked_run_reports_what_a_fresh_interpreter_does(bad_data_dir, tmp_path):
    args = ("--data-dir", str(bad_data_dir), "--batch-size", "0")
    forked, fresh = run_forked("omiga.py", *args, cwd=tmp_path), run_script("omiga.py", *args, cwd=tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


# --- the shared pieces, in process ---------------------------------------------------------------------------------

def test_check_args_applies_common_suffix_and_script_rules():
    from omiga import Args

    check_args(Args(), {"alpha": POSITIVE})  # the defaults are valid
    with pytest.raises(ArgumentError, match=r"^--log-every 0: must be >= 1$"):
        check_args(Args(log_every=0))
    with pytest.raises(ArgumentError, match=r"^--tau 0.0: must be in \(0, 1\]$"):
        check_args(Args(tau=0.0))
    with pytest.raises(ArgumentError, match=r"^--v-lr nan: must be > 0 and finite$"):  # by its suffix _lr
        check_args(Args(v_lr=float("nan")))
    with pytest.raises(ArgumentError, match=r"^--hidden-dim 0: must be >= 1$"):  # by its suffix _dim
        check_args(Args(hidden_dim=0))
    with pytest.raises(ArgumentError, match=r"^--batch-size 4: must be in \[8, 16\]$"):  # a script's rule wins
        check_args(Args(batch_size=4), {"batch_size": interval(8, 16)})


def test_exit_on_user_error_prints_one_line_and_other_errors_propagate(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["omiga.py"])
    with pytest.raises(SystemExit) as exit_request, exit_on_user_error():
        raise DatasetError("data/x.hdf5: missing keys ['rewards']")
    assert exit_request.value.code == 2
    assert capsys.readouterr().err == "omiga.py: error: data/x.hdf5: missing keys ['rewards']\n"
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    for signum in (signal.SIGINT, signal.SIGTERM):  # while the dataset loads or generates
        with pytest.raises(SystemExit) as exit_request, exit_on_user_error():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
        assert exit_request.value.code == 128 + signum
        assert capsys.readouterr().err == (f"omiga.py: {signum.name}: interrupted before training started (a dataset "
                                           f"being generated is not written)\n")
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers  # put back
    with pytest.raises(ZeroDivisionError), exit_on_user_error():
        raise ZeroDivisionError("a bug, not bad input: its traceback is kept")


def native_arrays(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n + 1, 2, 3)).astype(np.float32)  # one episode, each next observation the next row's
    arrays = dict(observations=obs[:-1], next_observations=obs[1:],
                  actions=rng.uniform(-1, 1, (n, 2, 3)).astype(np.float32))
    arrays.update(states=np.zeros((n, 4), np.float32), next_states=np.zeros((n, 4), np.float32),
                  rewards=np.ones(n, np.float32), terminals=np.zeros(n, bool), timeouts=np.eye(1, n, n - 1, bool)[0])
    return arrays


def write_raw(path: Path, arrays: dict) -> None:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_text("not HDF5"), r"not a readable HDF5 file \(.*file signature not found"),
    (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
     r"not a readable HDF5 file \(.*truncated file"),
    (lambda path: write_raw(path, {k: v for k, v in native_arrays().items() if k != "rewards"}),
     r"missing keys \['rewards'\]"),
    (lambda path: write_raw(path, dict(native_arrays(), terminals=np.zeros(6, np.int64))),
     "terminals is stored as int64, expected bool"),
    (lambda path: write_raw(path, dict(native_arrays(), states=np.zeros((6, 4), "S4"))),
     r"states is stored as \|S4, expected float32"),
])
def test_unreadable_file_names_itself_the_problem_and_the_command(tmp_path, damage, message):
    path = write_dataset(dataset_path(tmp_path, "Ant", "4x2", "medium"), native_arrays(), {})
    damage(path)
    with pytest.raises(DatasetError) as error:
        read_dataset(path)
    assert re.match(rf"{re.escape(str(path))}: {message}", str(error.value)), error.value
    assert (f"python -m common.collect dataset --env Ant --quality medium --data-dir {tmp_path} --agent-conf 4x2"
            in str(error.value))


def test_a_failed_dataset_write_shows_its_own_error_even_when_the_cleanup_fails(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def cleanup_refused(self, missing_ok=False):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    monkeypatch.setattr(Path, "unlink", cleanup_refused)
    with pytest.raises(OSError, match="No space left on device"):
        write_dataset(tmp_path / "Hopper-3x1-expert.hdf5", native_arrays(), {})


def test_ctrl_c_while_writing_a_dataset_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "Hopper-3x1-expert.hdf5", native_arrays(), {"source": "the previous file"})
    written = []

    def interrupted_after_two_arrays(group, name, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(name)
        return create_dataset(group, name, **kwargs)

    create_dataset = h5py.Group.create_dataset
    monkeypatch.setattr(h5py.Group, "create_dataset", interrupted_after_two_arrays)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(path, native_arrays(9), {"source": "the new file"})
    assert written == list(ARRAY_KEYS[:2])
    arrays, attrs = read_dataset(path)
    assert attrs["source"] == "the previous file" and len(arrays["rewards"]) == 6
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_killed_dataset_write_leaves_no_file_under_the_dataset_name(tmp_path):
    """SIGKILL half-way through the write: no cleanup runs, only a hidden temporary file can be left behind."""
    path = tmp_path / "Hopper-3x1-expert.hdf5"
    pid = os.fork()
    if pid == 0:
        create_dataset = h5py.Group.create_dataset

        def killed_after_the_first_array(group, name, **kwargs):
            create_dataset(group, name, **kwargs)
            group.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        h5py.Group.create_dataset = killed_after_the_first_array
        try:
            write_dataset(path, native_arrays(), {})
        finally:
            os._exit(1)  # not reached when the kill worked
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not path.exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(f".{path.name}.") and leftover.suffix == ".tmp"
