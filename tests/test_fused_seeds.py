"""--num-seeds K: K seeds trained as one batched computation give each seed the losses, weights, optimizer states and
evaluations of a separate run with that seed, and one run directory each."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_forked

SCRIPTS = ["omiga.py", "omcda.py", "comadice.py", "icq.py"]
SEEDS = 3
TINY_RUN = ["--no-generate", "--batch-size", "8", "--hidden-dim", "16", "--eval-every", "10", "--eval-episodes", "2",
            "--final-eval-episodes", "2", "--log-every", "5", "--save-model", "--total-steps", "20", "--seed", "4"]
SCRIPT_TINY_RUN = {"omcda.py": ["--bc-steps", "20"]}
pytestmark = pytest.mark.usefixtures("forked_runs_share_imports")


def train(script: str, cwd, *args: str) -> list:
    cwd.mkdir()
    result = run_forked(script, *TINY_RUN, *SCRIPT_TINY_RUN.get(script, []), *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted((cwd / "runs").iterdir(), key=lambda run_dir: json.loads((run_dir / "args.json").read_text())["seed"])


def logged(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if not tag.startswith("charts/")}  # timings differ between runs


def seed_slice(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Seed k's weight sets: every parameter, buffer and optimizer state holds the seeds' sets along dim 0."""
    return tensor.reshape(SEEDS, -1, *tensor.shape[1:])[k].reshape(-1, *tensor.shape[1:])


@pytest.mark.parametrize("script", SCRIPTS)
def test_fused_seeds_equal_separate_runs(script, tiny_hopper_dir, tmp_path):
    data = ["--data-dir", str(tiny_hopper_dir)]
    fused_dirs = train(script, tmp_path / "fused", *data, "--num-seeds", str(SEEDS))
    assert [json.loads((d / "args.json").read_text())["seed"] for d in fused_dirs] == [4, 5, 6]
    fused = torch.load(fused_dirs[0] / "model.pt", weights_only=False)
    for k in range(SEEDS):
        (single_dir,) = train(script, tmp_path / f"seed{k}", *data, "--seed", str(4 + k))
        single = torch.load(single_dir / "model.pt", weights_only=False)
        for name, value in single["agents"].items():
            torch.testing.assert_close(seed_slice(fused["agents"][name], k), value, msg=f"seed {4 + k}: {name}")
        for optimizer, state in single["optimizers"].items():
            for index, moments in state["state"].items():
                fused_moments = fused["optimizers"][optimizer]["state"][index]
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(seed_slice(fused_moments[key], k), moments[key])
        fused_logs, single_logs = logged(fused_dirs[k]), logged(single_dir)
        assert fused_logs.keys() == single_logs.keys() and any(tag.startswith("losses/") for tag in single_logs)
        for tag, events in single_logs.items():
            assert [step for step, _ in fused_logs[tag]] == [step for step, _ in events], tag
            torch.testing.assert_close([value for _, value in fused_logs[tag]], [value for _, value in events],
                                       rtol=1e-4, atol=1e-5, msg=f"seed {4 + k}: {tag}")
        fused_result, single_result = (json.loads((d / "result.json").read_text()) for d in (fused_dirs[k], single_dir))
        assert [e["step"] for e in fused_result["evaluations"]] == [10, 20] and fused_result["finished"]
        assert fused_result["training_seconds"] > 0 and fused_result["evaluation_seconds"] > 0
        torch.testing.assert_close([e["mean"] for e in fused_result["evaluations"]],
                                   [e["mean"] for e in single_result["evaluations"]], rtol=1e-4, atol=1e-4)
    # the seeds really differ, so matching each seed's own run is a real check
    assert not torch.allclose(seed_slice(fused["agents"]["policy.net.0.weight"], 0),
                              seed_slice(fused["agents"]["policy.net.0.weight"], 1))


@pytest.mark.parametrize("script", SCRIPTS)
def test_fused_run_resumes(script, tiny_hopper_dir, tmp_path):
    """A fused run stopped halfway continues from the first seed's directory and ends where an uninterrupted one does."""
    data = ["--data-dir", str(tiny_hopper_dir)]
    split = train(script, tmp_path / "split", *data, "--num-seeds", "2", "--total-steps", "10")
    result = run_forked(script, "--resume", str(split[0]), "--total-steps", "20", cwd=tmp_path / "split")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final return:") == 2
    whole = train(script, tmp_path / "whole", *data, "--num-seeds", "2")
    resumed, uninterrupted = (torch.load(dirs[0] / "model.pt", weights_only=False) for dirs in (split, whole))
    torch.testing.assert_close(resumed["agents"], uninterrupted["agents"])
    for resumed_dir, whole_dir in zip(split, whole):
        assert logged(resumed_dir).keys() == logged(whole_dir).keys()
        assert ([e["mean"] for e in json.loads((resumed_dir / "result.json").read_text())["evaluations"]]
                == [e["mean"] for e in json.loads((whole_dir / "result.json").read_text())["evaluations"]])
