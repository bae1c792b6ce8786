"""--resume: N updates, then N more from the checkpoint, end where 2N uninterrupted updates end (networks, optimizers,
evaluations, TensorBoard steps); a run that cannot continue exactly is refused with one message and exit status 2."""

import dataclasses
import fcntl
import importlib
import json
import re
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.cli import RUN_LEVEL_ARGS, ResumeError, check_device
from common.datasets import dataset_path, read_dataset, write_dataset
from conftest import run_forked

SCRIPTS = ["omiga.py", "omcda.py", "icq.py", "comadice.py", "bc.py", "cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
TINY_RUN = ["--no-generate", "--batch-size", "8", "--hidden-dim", "16", "--eval-episodes", "1",
            "--final-eval-episodes", "1", "--log-every", "5", "--save-model"]
SCRIPT_TINY_RUN = {"omcda.py": ["--bc-steps", "10"], "bcq_ma.py": ["--vae-hidden-dim", "16"]}
HALF = 10
pytestmark = pytest.mark.usefixtures("forked_runs_share_imports")


def tiny_run_args(script: str) -> list[str]:
    return [*TINY_RUN, "--eval-every", "5", *SCRIPT_TINY_RUN.get(script, [])]


def train(script: str, cwd, *args: str):
    result = run_forked(script, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def logged_steps(run_dir) -> dict[str, list[int]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag != "charts/updates_per_sec"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_resumed_run_ends_where_an_uninterrupted_run_ends(script, tiny_hopper_dir, tmp_path):
    (tmp_path / "split").mkdir()
    (tmp_path / "whole").mkdir()
    data = ["--data-dir", str(tiny_hopper_dir)]
    split = train(script, tmp_path / "split", *data, *tiny_run_args(script), "--total-steps", str(HALF))
    first_half = json.loads((split / "result.json").read_text())
    halfway = torch.load(split / "model.pt", weights_only=False)
    assert first_half["finished"] and first_half["last"]["step"] == HALF
    # Only --resume and the new length: every other argument comes from the checkpoint.
    result = run_forked(script, "--resume", str(split), "--total-steps", str(2 * HALF), cwd=tmp_path / "split")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed at update {HALF}" in result.stdout
    whole = train(script, tmp_path / "whole", *data, *tiny_run_args(script), "--total-steps", str(2 * HALF))

    resumed, uninterrupted = (torch.load(run_dir / "model.pt", weights_only=False) for run_dir in (split, whole))
    assert resumed["step"] == uninterrupted["step"] == 2 * HALF
    torch.testing.assert_close(resumed["agents"], uninterrupted["agents"])
    torch.testing.assert_close(resumed["optimizers"], uninterrupted["optimizers"])
    with pytest.raises(AssertionError):  # the second half trained: the end is not the halfway checkpoint
        torch.testing.assert_close(resumed["agents"], halfway["agents"])
    assert resumed["args"]["total_steps"] == 2 * HALF and resumed["args"]["resume"] == str(split)

    results = [json.loads((run_dir / "result.json").read_text()) for run_dir in (split, whole)]
    assert [e["step"] for e in results[0]["evaluations"]] == [5, 10, 15, 20]
    assert results[0]["finished"] and results[0]["last"]["step"] == 2 * HALF
    assert [e["mean"] for e in results[0]["evaluations"][2:]] == [e["mean"] for e in results[1]["evaluations"][2:]]
    assert results[0]["evaluations"][:2] == first_half["evaluations"]
    # TensorBoard continued at the checkpoint's step; OMCDA's behaviour cloning loss, at step 0, is there once
    assert logged_steps(split) == logged_steps(whole)
    assert json.loads((split / "args.json").read_text())["total_steps"] == 2 * HALF


def test_resuming_continues_after_a_checkpoint_and_drops_what_was_logged_after_it(tiny_hopper_dir, tmp_path):
    """A run killed after its checkpoint at update 10 had logged up to 20: the resumed run's TensorBoard shows each
    step once, those after 10 from the resumed run."""
    data = ["--data-dir", str(tiny_hopper_dir)]
    run_dir = train("omiga.py", tmp_path, *data, *TINY_RUN, "--total-steps", "20", "--eval-every", "10")
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    (tmp_path / "elsewhere").mkdir()
    earlier = train("omiga.py", tmp_path / "elsewhere", *data, *TINY_RUN, "--total-steps", "10", "--eval-every", "10")
    shutil.copy(earlier / "model.pt", run_dir / "model.pt")  # as if the run had stopped right after update 10
    assert checkpoint["step"] == 20 and torch.load(run_dir / "model.pt", weights_only=False)["step"] == 10
    result = run_forked("omiga.py", "--resume", str(run_dir), "--total-steps", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = logged_steps(run_dir)
    assert steps["losses/v"] == [5, 10, 15, 20] and steps["eval/return_mean"] == [10, 20]


def test_resume_refuses_what_it_cannot_continue_exactly(tiny_hopper_dir, tmp_path):
    data = ["--data-dir", str(tiny_hopper_dir)]
    run_dir = train("omiga.py", tmp_path, *data, *tiny_run_args("omiga.py"), "--total-steps", "10")
    cases = {
        "no checkpoint": (["--resume", str(tmp_path / "nowhere")], r"no checkpoint \S*nowhere/model\.pt"),
        "algorithm changed": (["--resume", str(run_dir), "--total-steps", "20", "--alpha", "3", "--seed", "2"],
                              r"--seed 2 \(the checkpoint's: 1\); --alpha 3\.0 \(the checkpoint's: 10\.0\): a resumed "
                              r"run keeps the arguments that define its algorithm \(only --cuda, .*--total-steps"),
        "nothing left to train": (["--resume", str(run_dir)], r"the checkpoint is at update 10, so --total-steps 10 "
                                                               r"leaves nothing to train"),
    }
    for case, (args, message) in cases.items():
        result = run_forked("omiga.py", *args, cwd=tmp_path)
        assert result.returncode == 2, (case, result.stderr)
        assert re.search(rf"^omiga\.py: error: --resume \S+: {message}", result.stderr, re.M), (case, result.stderr)
        assert "Traceback" not in result.stderr
    args_written = (run_dir / "args.json").read_text()
    result = run_forked("omcda.py", "--resume", str(run_dir), "--total-steps", "20", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == (
        f"omcda.py: error: --resume {run_dir}: the checkpoint was written by omiga.py; resume it with "
        f"`python omiga.py --resume {run_dir}`\n")
    assert (run_dir / "args.json").read_text() == args_written  # refused before anything was written

    other_data = tmp_path / "other_data"
    arrays, attrs = read_dataset(dataset_path(tiny_hopper_dir, "Hopper", "3x1", "medium-replay"))
    write_dataset(dataset_path(other_data, "Hopper", "3x1", "medium-replay"), {**arrays, "rewards": arrays["rewards"] + 1},
                  attrs)
    result = run_forked("omiga.py", "--resume", str(run_dir), "--total-steps", "20", "--data-dir", str(other_data),
                        cwd=tmp_path)
    assert result.returncode == 2 and re.fullmatch(
        r"omiga\.py: error: --resume: the run trained on \S+data\d*/Hopper-3x1-medium-replay\.hdf5: 600 transitions, "
        r"mean return -?[\d.]+, not on \S+other_data/Hopper-3x1-medium-replay\.hdf5: 600 transitions, mean return "
        r"-?[\d.]+; resume it with the dataset it started with \(--data-dir\)\n", result.stderr), result.stderr

    with open(run_dir / ".lock", "w") as held:  # another process training this run
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_forked("omiga.py", "--resume", str(run_dir), "--total-steps", "20", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == (
        f"omiga.py: error: {run_dir}: another process is training this run (it holds {run_dir / '.lock'}); stop it "
        f"first, its checkpoint is kept\n")
    assert (run_dir / "args.json").read_text() == args_written
    result = run_forked("omiga.py", "--resume", str(run_dir), "--total-steps", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # the lock went with its holder

    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "model.pt").write_bytes((run_dir / "model.pt").read_bytes()[:1000])
    result = run_forked("omiga.py", "--resume", str(tmp_path / "truncated"), "--total-steps", "20", cwd=tmp_path)
    assert result.returncode == 2 and re.search(r"model\.pt is not a readable checkpoint \(.+\)$", result.stderr, re.M)
    old = torch.load(run_dir / "model.pt", weights_only=False)
    del old["rng"]  # a checkpoint from before --resume existed
    torch.save(old, run_dir / "model.pt")
    result = run_forked("omiga.py", "--resume", str(run_dir), "--total-steps", "30", cwd=tmp_path)
    assert result.returncode == 2 and "holds no random number generator states" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_level_arguments_are_arguments_of_every_script(script):
    module = importlib.import_module(script[: -len(".py")])
    assert set(RUN_LEVEL_ARGS) <= {field.name for field in dataclasses.fields(module.Args)}


def test_a_checkpoint_continues_only_on_its_kind_of_device():
    check_device(None, torch.device("cpu"))  # a fresh run
    check_device({"device": "cpu"}, torch.device("cpu"))
    with pytest.raises(ResumeError, match="trained on cuda, this run would train on cpu"):
        check_device({"device": "cuda"}, torch.device("cpu"))
