"""common/collect.py: behaviour-policy training (CLI, checkpoints, resume), checkpoint selection, dataset generation.

Everything is written under pytest's tmp folders: `select` and `generate_dataset` get explicit output folders, and the
training CLI runs with --work-dir in a tmp folder and --no-select, so nothing touches behaviour_policies/ or runs/."""

import shutil

import numpy as np
import pytest
import torch

from common.collect import (DATASET_NOISE, POLICY_DIR, TARGET_RETURNS, Actor, build_actor, fp16_state, generate_dataset,
                            load_policies, quality_segments, select, train)
from common.datasets import episode_bounds, load_dataset, read_dataset
from common.envs import ENV_NAMES, make_env
from common.evaluation import evaluate
from conftest import run_module

TRAIN_STEPS, CHECKPOINT_EVERY, LEARNING_STARTS = 300, 100, 100


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 300-step Hopper TD3 run through the CLI (updates from step 100, a checkpoint every 100 steps)."""
    cwd = tmp_path_factory.mktemp("train")
    result = run_module("common.collect", "train", "--env", "Hopper", "--total-steps", str(TRAIN_STEPS),
                        "--checkpoint-every", str(CHECKPOINT_EVERY), "--learning-starts", str(LEARNING_STARTS),
                        "--work-dir", "work", "--no-select", cwd=cwd, timeout=300)
    return cwd, result


@pytest.fixture(scope="module")
def trained_bundle(trained, tmp_path_factory):
    """The policy bundle `select` makes from the short run, written to a tmp folder."""
    cwd, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    policy_dir = tmp_path_factory.mktemp("policies")
    select("Hopper", cwd / "work", out=policy_dir / "Hopper.pt")
    return policy_dir


def test_train_cli_writes_a_checkpoint_that_loads(trained):
    cwd, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == ["work"]  # nothing outside --work-dir
    assert "step 200: eval return" in result.stdout
    state = torch.load(cwd / "work" / "train_state.pt", weights_only=False)
    assert state["step"] == TRAIN_STEPS and state["algo"] == "td3" and state["learning_starts"] == LEARNING_STARTS
    assert state["updates"] == TRAIN_STEPS - LEARNING_STARTS + 1  # one update per step from learning_starts on
    assert [h["step"] for h in state["history"]] == [0, 100, 200, 300]
    assert all(np.isfinite(h["eval_mean"]) and h["eval_std"] >= 0 for h in state["history"])
    assert len(state["buffer"]["r"]) == TRAIN_STEPS
    assert np.abs(state["buffer"]["a"][:LEARNING_STARTS]).max() <= 1.0
    env = make_env("Hopper")
    bundle = dict(hidden=state["hidden"], algo=state["algo"])
    states = torch.from_numpy(state["buffer"]["s"][:50])
    final = Actor(env.state_dim, env.joint_act_dim, state["hidden"], stochastic=False)
    final.load_state_dict(state["nets"]["actor"])
    for record in state["history"]:
        assert all(v.dtype == torch.float16 for v in record["actor"].values())  # kept compactly
        actor = build_actor(bundle, record, env.state_dim, env.joint_act_dim)
        assert actor.deterministic(states).shape == (50, env.joint_act_dim)
    # The last checkpoint is the final actor, up to fp16 rounding; training moved it away from the first.
    with torch.no_grad():
        last = build_actor(bundle, state["history"][-1], env.state_dim, env.joint_act_dim).deterministic(states)
        first = build_actor(bundle, state["history"][0], env.state_dim, env.joint_act_dim).deterministic(states)
        torch.testing.assert_close(last, final.deterministic(states), atol=5e-3, rtol=0)
        assert (last - first).abs().max() > 1e-2


def test_train_resumes_from_its_checkpoint(trained, tmp_path, capsys):
    cwd, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path / "work"
    shutil.copytree(cwd / "work", work)
    before = torch.load(work / "train_state.pt", weights_only=False)
    trainer = train("Hopper", None, TRAIN_STEPS + 100, work, CHECKPOINT_EVERY, seed=0, learning_starts=LEARNING_STARTS,
                    select_after=False)
    assert f"resuming Hopper td3 from step {TRAIN_STEPS}" in capsys.readouterr().out
    after = torch.load(work / "train_state.pt", weights_only=False)
    assert trainer.step == after["step"] == TRAIN_STEPS + 100
    assert [h["step"] for h in after["history"]] == [0, 100, 200, 300, 400]
    for old, new in zip(before["history"], after["history"]):
        assert old["eval_mean"] == new["eval_mean"]
        assert all(torch.equal(old["actor"][k], new["actor"][k]) for k in old["actor"])
    np.testing.assert_array_equal(after["buffer"]["s"][:TRAIN_STEPS], before["buffer"]["s"])
    with pytest.raises(ValueError, match="holds a td3 run; pass --algo td3"):
        train("Hopper", "sac", TRAIN_STEPS + 200, work, CHECKPOINT_EVERY, 0, LEARNING_STARTS, False)


# --- selection and generation semantics on a hand-made run ----------------------------------------------------------

HAND_EVALS = [10.0, 300.0, 700.0, 1500.0, 2400.0, 2000.0]  # medium target 724 -> step 20k; expert 2452 -> step 40k
HAND_BIAS = [-0.6, 0.6, -0.3, 0.0, 0.3, 0.0]  # every checkpoint's actor outputs about tanh(bias): tells them apart


def hand_made_actor(bias: float) -> Actor:
    actor = Actor(11, 3, 16, stochastic=False)
    with torch.no_grad():
        actor.net[-1].weight.mul_(0.01)
        actor.net[-1].bias.fill_(bias)
    return actor


@pytest.fixture(scope="module")
def hand_made_bundle(tmp_path_factory):
    """`select` on a hand-made Hopper training state with known evaluations and distinguishable actors."""
    work = tmp_path_factory.mktemp("hand_run")
    history = [dict(step=10_000 * k, eval_mean=e, eval_std=5.0, actor=fp16_state(hand_made_actor(b)))
               for k, (e, b) in enumerate(zip(HAND_EVALS, HAND_BIAS))]
    torch.save(dict(history=history, algo="td3", hidden=16, learning_starts=10_000, step=50_000), work / "train_state.pt")
    policy_dir = tmp_path_factory.mktemp("hand_policies")
    select("Hopper", work, out=policy_dir / "Hopper.pt")
    return policy_dir


def test_select_keeps_sequence_medium_and_expert(hand_made_bundle):
    assert TARGET_RETURNS["Hopper"] == {"medium": 723.57, "expert": 2452.02}
    bundle = load_policies("Hopper", hand_made_bundle)
    assert bundle["medium"]["step"] == 20_000 and bundle["expert"]["step"] == 40_000
    assert [r["step"] for r in bundle["sequence"]] == [0, 10_000, 20_000]
    assert bundle["checkpoint_every"] == 10_000 and bundle["learning_starts"] == 10_000
    assert [c[1] for c in bundle["curve"]] == HAND_EVALS
    segments, _ = quality_segments(bundle, "medium-replay", None, 11, 3)
    # Every checkpoint before the medium one, for 5 times the steps training spent on it, with its exploration.
    assert [(explore, steps) for _, explore, steps in segments] == [("uniform", 50_000), ("train", 50_000)]
    segments, _ = quality_segments(bundle, "medium-replay", 2000, 11, 3)
    assert [steps for _, _, steps in segments] == [1000, 1000]
    with pytest.raises(ValueError, match="unknown quality"):
        quality_segments(bundle, "random", None, 11, 3)


def residuals(arrays: dict, actor: Actor) -> np.ndarray:
    """Recorded joint action minus the actor's deterministic action, on the entries that were not clipped."""
    env = make_env("Hopper")
    joint = arrays["actions"][:, :, 0]  # Hopper 3x1: agent i drives joint action i
    assert (env.joint_action_index[:, 0] == np.arange(3)).all()
    with torch.no_grad():
        mean = actor.deterministic(torch.from_numpy(arrays["states"])).numpy()
    unclipped = np.abs(joint) < 1.0
    return (joint - mean)[unclipped]


def check_episode_structure(arrays: dict) -> int:
    """Transitions of an episode are contiguous: next state of t is the state of t+1 inside an episode."""
    ends = arrays["terminals"] | arrays["timeouts"]
    inside = np.flatnonzero(~ends[:-1])
    np.testing.assert_array_equal(arrays["next_states"][inside], arrays["states"][inside + 1])
    np.testing.assert_array_equal(arrays["next_observations"][inside], arrays["observations"][inside + 1])
    assert ends[-1], "the last transition closes an episode"
    assert not (arrays["terminals"] & arrays["timeouts"]).any()
    return int(ends.sum())


def test_generation_follows_the_recipe(hand_made_bundle, tmp_path):
    bundle = load_policies("Hopper", hand_made_bundle)
    actor = lambda record: build_actor(bundle, record, 11, 3)
    # medium-replay: 1000 steps of uniform actions (checkpoint 0 is before learning starts), then 1000 steps of the
    # step-10k actor with TD3's exploration N(0, 0.1^2); each segment cut in all 8 copies (time-outs).
    path = generate_dataset("Hopper", "medium-replay", tmp_path, size=2000, seed=0, num_envs=8, policy_dir=hand_made_bundle)
    arrays, attrs = read_dataset(path)
    assert path.name == "Hopper-3x1-medium-replay.hdf5" and len(arrays["rewards"]) == 2000
    assert attrs["quality"] == "medium-replay" and attrs["obs_mode"] == "local" and attrs["seed"] == 0
    # Local observations without the one-hot id, zero-padded to the largest agent (Hopper 3x1: 8, 9, 8 -> 9).
    assert list(attrs["obs_dims"]) == [8, 9, 8] and arrays["observations"].shape == (2000, 3, 9)
    assert not arrays["observations"][:, [0, 2], 8].any()
    assert check_episode_structure(arrays) >= 16
    assert arrays["timeouts"][999] or arrays["terminals"][999]
    first, second = {k: v[:1000] for k, v in arrays.items()}, {k: v[1000:] for k, v in arrays.items()}
    uniform = first["actions"].reshape(-1)
    assert abs(uniform.mean()) < 0.1 and abs(np.abs(uniform).mean() - 0.5) < 0.05  # U(-1, 1)
    noise = residuals(second, actor(bundle["sequence"][1]))
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.1) < 0.015
    assert np.abs(residuals(second, actor(bundle["sequence"][0]))).mean() > 0.5  # not the step-0 actor
    # expert: whole episodes of the expert (step 40k) actor + N(0, DATASET_NOISE^2).
    path = generate_dataset("Hopper", "expert", tmp_path, size=500, seed=0, num_envs=4, policy_dir=hand_made_bundle)
    arrays, _ = read_dataset(path)
    assert len(arrays["rewards"]) >= 500
    check_episode_structure(arrays)
    noise = residuals(arrays, actor(bundle["expert"]))
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - DATASET_NOISE) < 0.015
    assert np.abs(residuals(arrays, actor(bundle["medium"]))).mean() > 0.3


# --- generation from a trained bundle: deterministic and loadable ----------------------------------------------------

@pytest.mark.parametrize("quality", ["medium-replay", "medium-expert"])
def test_generated_dataset_is_deterministic_and_passes_the_loader(trained_bundle, tmp_path, quality):
    paths = [generate_dataset("Hopper", quality, tmp_path / name, size=2000, seed=seed, num_envs=8,
                              policy_dir=trained_bundle) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    (first, first_attrs), (second, second_attrs), (other, _) = (read_dataset(p) for p in paths)
    assert first_attrs.keys() == second_attrs.keys()
    assert all(np.array_equal(first_attrs[k], second_attrs[k]) for k in first_attrs)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert not np.array_equal(first["actions"], other["actions"])  # the seed matters
    n = len(first["rewards"])
    assert 2000 <= n <= 2000 + 2 * 8 * 1000  # at least the size asked for; whole episodes may add up to one per copy
    check_episode_structure(first)
    starts, ends = episode_bounds(first["terminals"], first["timeouts"])
    assert len(starts) >= 16
    for obs_mode in ("local", "state", "omiga"):
        dataset = load_dataset(paths[0], "cpu", obs_mode)
        dataset.check_env(make_env("Hopper", obs_mode=obs_mode))
        assert len(dataset) == n and len(dataset.episode_returns()) == len(starts)


# --- the committed behaviour policies --------------------------------------------------------------------------------

RELATIVE_TOLERANCE, STD_TOLERANCE = 0.10, 2.5


def check_recorded_returns(bundle: dict, env_name: str) -> None:
    """A 2-episode evaluation of the medium and expert checkpoints (the stored fp16 weights, the evaluation seeds of
    training: 10,000 + k) lands within max(10 % of the recorded mean, 2.5 recorded stds) of the recorded mean."""
    env = make_env(env_name)
    for quality in ("medium", "expert"):
        record = bundle[quality]
        actor = build_actor(bundle, record, env.state_dim, env.joint_act_dim)

        @torch.no_grad()
        def act(obs):  # "state" mode: agent 0's input starts with the global state
            return env.local_actions(actor.deterministic(torch.from_numpy(obs[:, 0, : env.state_dim])).numpy())

        mean = evaluate(act, env, episodes=2, seed=10_000)[0].mean()
        tolerance = max(RELATIVE_TOLERANCE * abs(record["eval_mean"]), STD_TOLERANCE * record["eval_std"])
        assert abs(mean - record["eval_mean"]) <= tolerance, (env_name, quality, mean, record["eval_mean"], record["eval_std"])


def test_recorded_return_is_reproduced_from_the_stored_weights(trained_bundle):
    check_recorded_returns(load_policies("Hopper", trained_bundle), "Hopper")


@pytest.mark.parametrize("env_name", ENV_NAMES)
def test_committed_checkpoints_evaluate_to_their_recorded_return(env_name):
    if not (POLICY_DIR / f"{env_name}.pt").exists():
        pytest.skip(f"behaviour_policies/{env_name}.pt is not committed yet (python -m common.collect train --env {env_name})")
    check_recorded_returns(load_policies(env_name), env_name)
