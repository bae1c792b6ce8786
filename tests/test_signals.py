"""SIGINT (Ctrl-C) and SIGTERM (Slurm at a job's time limit) at every stage of a run end it with one line, exit status
130 or 143 and a checkpoint from which `--resume` finishes the run exactly as if it had not stopped: the interrupted
stage (behaviour cloning, an evaluation, the final one included) is redone, a checkpoint being written is completed.
Each signal is sent by the child itself from inside the stage, through a patched function the script imports."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import ForkedRun, run_forked
from test_errors import SCRIPT_TINY_RUN, SCRIPTS, TINY_RUN

pytestmark = pytest.mark.usefixtures("forked_runs_share_imports")
TRACEBACK = "Traceback (most recent call last)"
RUN = ["--total-steps", "20", "--eval-every", "10", "--seed", "3"]


def signal_on_call(module, name: str, signum: int, when=lambda call, *args: call == 1):
    """A `before` hook: `module.name` sends `signum` to its own process once, before the first call for which
    `when(call number, *args)` holds, then goes on as the original."""
    def before():
        original, calls, sent = getattr(module, name), [0], [False]

        def patched(*args, **kwargs):
            calls[0] += 1
            if not sent[0] and when(calls[0], *args):
                sent[0] = True
                os.kill(os.getpid(), signum)
            return original(*args, **kwargs)

        setattr(module, name, patched)
    return before


def stages(signum: int) -> dict:
    """stage -> (the `before` hook that signals inside it, the stop line's pattern, the checkpoint's update)."""
    import common.datasets
    import common.run

    def saving_update(step):
        return lambda call, obj, *rest: isinstance(obj, dict) and obj.get("step") == step

    return {
        "evaluation": (signal_on_call(common.run, "evaluate_seeds", signum),
                       r"stopped in the evaluation of update 10, which --resume redoes", 10),
        "final evaluation": (signal_on_call(common.run, "evaluate_seeds", signum, lambda call, *_: call == 2),
                             r"stopped in the evaluation of update 20, which --resume redoes", 20),
        "checkpoint write": (signal_on_call(torch, "save", signum, saving_update(10)),
                             r"stopped after update 10 of 20", 10),
        "behaviour cloning": (signal_on_call(common.datasets.Dataset, "sample", signum, lambda call, *_: call == 5),
                              r"stopped in behaviour cloning, which --resume redoes", 0),
    }


def evaluations(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "result.json").read_text())["evaluations"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_hopper_dir, tmp_path_factory) -> dict[str, list[dict]]:
    """The evaluations of the tiny run, not interrupted, per script."""
    found = {}
    for script in ("omiga.py", "omcda.py"):
        cwd = tmp_path_factory.mktemp(script[:-3])
        result = run_forked(script, "--data-dir", str(tiny_hopper_dir), *TINY_RUN, *SCRIPT_TINY_RUN.get(script, []),
                            *RUN, "--save-model", cwd=cwd)
        assert result.returncode == 0, result.stderr
        (run_dir,) = (cwd / "runs").iterdir()
        found[script] = evaluations(run_dir)
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
@pytest.mark.parametrize("stage", ["evaluation", "final evaluation", "checkpoint write", "behaviour cloning"])
@pytest.mark.parametrize("script", ["omiga.py", "omcda.py"])
def test_a_signal_at_any_stage_ends_in_a_checkpoint_that_resumes_exactly(script, stage, signum, tiny_hopper_dir,
                                                                        uninterrupted, tmp_path):
    if stage == "behaviour cloning" and script != "omcda.py":
        pytest.skip("only omcda.py clones a behaviour policy first")
    before, stop_line, checkpoint_step = stages(signum)[stage]
    args = ["--data-dir", str(tiny_hopper_dir), *TINY_RUN, *SCRIPT_TINY_RUN.get(script, []), *RUN, "--save-model"]
    stopped = run_forked(script, *args, cwd=tmp_path, before=before)
    assert stopped.returncode == 128 + signum and TRACEBACK not in stopped.stderr, stopped.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    model = Path("runs") / run_dir.name / "model.pt"
    assert re.search(rf"^{re.escape(script)}: {signum.name}: {stop_line}; checkpoint saved to {re.escape(str(model))}"
                     rf"( before it)?$", stopped.stderr, re.M), stopped.stderr
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    assert checkpoint["step"] == checkpoint_step and checkpoint["script"] == script
    assert not list(run_dir.glob(".*.tmp")) and "final return" not in stopped.stdout

    resumed = run_forked(script, "--resume", str(Path("runs") / run_dir.name), "--data-dir", str(tiny_hopper_dir),
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert evaluations(run_dir) == uninterrupted[script]  # the abandoned stage redone, nothing twice, same numbers
    assert json.loads((run_dir / "result.json").read_text())["script"] == script


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
def test_a_signal_during_the_final_writes_completes_them(signum, tiny_hopper_dir, uninterrupted, tmp_path):
    before = signal_on_call(torch, "save", signum,
                            lambda call, obj, *rest: isinstance(obj, dict) and obj.get("step") == 20)
    result = run_forked("omiga.py", "--data-dir", str(tiny_hopper_dir), *TINY_RUN, *RUN, "--save-model", cwd=tmp_path,
                        before=before)
    assert result.returncode == 128 + signum and TRACEBACK not in result.stderr, result.stderr
    assert f"omiga.py: {signum.name}: received after the final evaluation: the run is complete" in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["finished"]
    assert evaluations(run_dir) == uninterrupted["omiga.py"]
    assert torch.load(run_dir / "model.pt", weights_only=False)["step"] == 20


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
@pytest.mark.parametrize("script", SCRIPTS)
def test_signal_during_training_saves_the_checkpoint(script, signum, tiny_hopper_dir, tmp_path):
    """Every script, a signal from outside while it trains: the update, or the evaluation it is in, ends the run."""
    with ForkedRun(script, "--data-dir", str(tiny_hopper_dir), *TINY_RUN, *SCRIPT_TINY_RUN.get(script, []),
                   "--total-steps", "1000000", "--eval-every", "5", "--exp-name", "stopped", cwd=tmp_path) as run:
        deadline = time.monotonic() + 60
        while "step 5: eval return" not in run.stdout():  # the training loop has started
            assert time.monotonic() < deadline, run.stderr_path.read_text()
            time.sleep(0.05)
        os.kill(run.pid, signum)
        result = run.wait()
    assert result.returncode == 128 + signum, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    stopped = re.search(rf"^{re.escape(script)}: {signum.name}: stopped (after update (\d+) of 1000000|in the "
                        rf"evaluation of update (\d+), which --resume redoes); checkpoint saved to "
                        rf"{re.escape(str(Path('runs') / run_dir.name / 'model.pt'))}$", result.stderr, re.M)
    assert stopped, result.stderr
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)  # saved although --save-model was not given
    assert checkpoint["step"] == int(stopped[2] or stopped[3]) >= 5
    assert {"agents", "optimizers", "args"} <= checkpoint.keys() and checkpoint["script"] == script
    assert not list(run_dir.glob(".*.tmp")) and "final return" not in result.stdout


def test_omcda_keeps_no_checkpoint_of_update_0_without_save_model(tiny_hopper_dir, tmp_path):
    """The checkpoint written before behaviour cloning is for an interrupt there: a run without --save-model that
    cloned its behaviour policy leaves no model.pt behind."""
    result = run_forked("omcda.py", "--data-dir", str(tiny_hopper_dir), *TINY_RUN, *SCRIPT_TINY_RUN["omcda.py"],
                        "--total-steps", "10", "--eval-every", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "result.json").exists() and not (run_dir / "model.pt").exists()
