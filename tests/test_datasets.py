"""common/datasets.py: the native format's round trip, sampling, the OMIGA importer, bad input, and the `info` CLI."""

import h5py
import numpy as np
import pytest
import torch

from common.collect import ensure_dataset
from common.datasets import (ARRAY_KEYS, Dataset, DatasetError, dataset_path, import_omiga, load_dataset, read_dataset,
                             validate_arrays, write_dataset)
from common.envs import build_agent_obs, make_env
from conftest import run_module, smoke_run

# Three hand-made episodes: lengths 3 (terminal), 4 (time-out), 2 (terminal).
EPISODE_ENDS = {2: "terminal", 6: "timeout", 8: "terminal"}
N, N_AGENTS, OBS_DIM, ACT_DIM, STATE_DIM = 9, 2, 3, 2, 4
REWARDS = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0, -5.0, -6.0], np.float32)  # distinct: index recoverable
EPISODE_RETURNS = np.array([6.0, 100.0, -11.0])


def hand_made_arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(N, N_AGENTS, OBS_DIM)).astype(np.float32)
    states = rng.normal(size=(N, STATE_DIM)).astype(np.float32)
    within = np.array([t not in EPISODE_ENDS for t in range(N)])  # a next observation is the next row's within episodes
    next_obs = np.where(within[:, None, None], np.roll(obs, -1, 0), obs + 1)
    return dict(observations=obs, next_observations=next_obs, states=states, next_states=states + 1,
                actions=rng.uniform(-1, 1, (N, N_AGENTS, ACT_DIM)).astype(np.float32), rewards=REWARDS.copy(),
                terminals=np.array([EPISODE_ENDS.get(t) == "terminal" for t in range(N)]),
                timeouts=np.array([EPISODE_ENDS.get(t) == "timeout" for t in range(N)]))


ATTRS = dict(env="Hopper", agent_conf="3x1", obs_mode="local", n_agents=N_AGENTS, obs_dims=[OBS_DIM] * N_AGENTS,
             act_dims=[ACT_DIM] * N_AGENTS, state_dim=STATE_DIM, source="tests: hand-made")


@pytest.fixture
def native_file(tmp_path):
    return write_dataset(tmp_path / "Hopper-3x1-medium.hdf5", hand_made_arrays(), ATTRS)


def write_raw(path, arrays: dict) -> None:
    """Write arrays as they are, bypassing write_dataset's validation, to test the loader's checks."""
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)


# --- native format -------------------------------------------------------------------------------------------------

def test_round_trip_keeps_arrays_dtypes_and_attributes(native_file):
    arrays = hand_made_arrays()
    assert [p.name for p in native_file.parent.iterdir()] == [native_file.name]  # no temporary file left behind
    loaded, attrs = read_dataset(native_file)
    assert set(loaded) == set(ARRAY_KEYS)
    for key in ARRAY_KEYS:
        np.testing.assert_array_equal(loaded[key], arrays[key])
        assert loaded[key].dtype == (np.bool_ if key in ("terminals", "timeouts") else np.float32)
    assert attrs["env"] == "Hopper" and attrs["obs_mode"] == "local" and attrs["state_dim"] == STATE_DIM
    assert list(attrs["obs_dims"]) == [OBS_DIM] * N_AGENTS and attrs["source"] == "tests: hand-made"


def test_loaded_dataset_is_agent_major_on_the_device(native_file):
    arrays = hand_made_arrays()
    local = load_dataset(native_file, "cpu", obs_mode="local")
    assert (local.n_agents, len(local), local.obs_dim, local.act_dim, local.state_dim) == (2, N, OBS_DIM + 2, ACT_DIM, 4)
    assert local.obs.shape == (N_AGENTS, N, OBS_DIM + N_AGENTS) and local.obs.device.type == "cpu"
    eye = np.eye(N_AGENTS, dtype=np.float32)
    for i in range(N_AGENTS):
        np.testing.assert_array_equal(local.obs[i].numpy(), np.concatenate([arrays["observations"][:, i], np.tile(eye[i], (N, 1))], 1))
        np.testing.assert_array_equal(local.next_obs[i, :, :OBS_DIM].numpy(), arrays["next_observations"][:, i])
        np.testing.assert_array_equal(local.actions[i].numpy(), arrays["actions"][:, i])
    np.testing.assert_array_equal(local.dones.numpy(), arrays["terminals"].astype(np.float32))
    np.testing.assert_array_equal(local.rewards.numpy(), REWARDS)
    # --obs-mode state: every agent sees the global state + its one-hot id, built at load time from `states`.
    state = load_dataset(native_file, "cpu", obs_mode="state")
    assert state.obs.shape == (N_AGENTS, N, STATE_DIM + N_AGENTS)
    for i in range(N_AGENTS):
        np.testing.assert_array_equal(state.obs[i].numpy(), np.concatenate([arrays["states"], np.tile(eye[i], (N, 1))], 1))
        np.testing.assert_array_equal(state.next_obs[i, :, :STATE_DIM].numpy(), arrays["next_states"])


def test_sample_shapes_contents_and_reproducibility(native_file):
    arrays = hand_made_arrays()
    dataset = load_dataset(native_file, "cpu", obs_mode="local")
    batch = dataset.sample(64, torch.Generator().manual_seed(0))
    assert batch.obs.shape == batch.next_obs.shape == (N_AGENTS, 64, OBS_DIM + N_AGENTS)
    assert batch.actions.shape == (N_AGENTS, 64, ACT_DIM)
    assert batch.rewards.shape == batch.dones.shape == (64,)
    assert batch.states.shape == batch.next_states.shape == (64, STATE_DIM)
    # Every sampled row is one whole transition: the reward identifies it, the rest must match that index.
    idx = np.array([int(np.flatnonzero(REWARDS == r)[0]) for r in batch.rewards.numpy()])
    np.testing.assert_array_equal(batch.obs[:, :, :OBS_DIM].numpy(), arrays["observations"][idx].transpose(1, 0, 2))
    np.testing.assert_array_equal(batch.actions.numpy(), arrays["actions"][idx].transpose(1, 0, 2))
    np.testing.assert_array_equal(batch.states.numpy(), arrays["states"][idx])
    np.testing.assert_array_equal(batch.next_states.numpy(), arrays["next_states"][idx])
    np.testing.assert_array_equal(batch.dones.numpy(), arrays["terminals"][idx])
    assert len(set(idx)) == N  # 64 draws over 9 transitions reach them all
    again = dataset.sample(64, torch.Generator().manual_seed(0))
    other = dataset.sample(64, torch.Generator().manual_seed(1))
    for field in ("obs", "actions", "rewards", "next_obs", "dones", "states", "next_states"):
        assert torch.equal(getattr(batch, field), getattr(again, field))
    assert not torch.equal(batch.rewards, other.rewards)


def test_episode_returns_on_hand_made_example(native_file):
    np.testing.assert_allclose(load_dataset(native_file).episode_returns(), EPISODE_RETURNS)
    # A final episode that neither terminates nor times out still closes at the end of the data.
    arrays = hand_made_arrays()
    arrays["terminals"][-1] = False
    dataset = Dataset(arrays, ATTRS, "local", "cpu")
    np.testing.assert_allclose(dataset.episode_returns(), EPISODE_RETURNS)


def test_info_cli_prints_the_dataset_card(native_file, tmp_path):
    result = run_module("common.datasets", "info", str(native_file), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    mean, std = EPISODE_RETURNS.mean(), EPISODE_RETURNS.std()
    assert "transitions 9" in out and "episodes 3" in out, out
    assert f"episode return {mean:.1f} ± {std:.1f}" in out, out
    assert "min -11.0" in out and "max 100.0" in out, out
    assert "tests: hand-made" in out


def test_dataset_commands_give_one_error_line_and_exit_2_on_what_is_not_a_dataset(tmp_path):
    """A directory, a text file, and a missing file under a folder with a space: one message, exit status 2, no
    traceback, no advice to delete a directory, and paths in the printed commands quoted for the shell."""
    (tmp_path / "not hdf5.txt").write_text("hello")
    cases = {("info", str(tmp_path)): "a directory, not a dataset file",
             ("info", str(tmp_path / "not hdf5.txt")): "not a readable HDF5 file",
             ("import-omiga", str(tmp_path / "not hdf5.txt"), "--env", "Hopper", "--quality", "medium", "--data-dir",
              str(tmp_path)): "not a readable HDF5 file",
             ("info", str(tmp_path / "a folder" / "Hopper-3x1-medium.hdf5")): f"--data-dir '{tmp_path / 'a folder'}'"}
    for args, expected in cases.items():
        result = run_module("common.datasets", *args, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(f"python -m common.datasets {args[0]}: error: "), result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "delete" not in run_module("common.datasets", "info", str(tmp_path), cwd=tmp_path, timeout=120).stderr


@pytest.mark.parametrize("mode", ["state", "local", "omiga"])
@pytest.mark.parametrize("name", ["Hopper", "Ant"])
def test_load_time_inputs_equal_the_envs_inputs(tmp_path, name, mode):
    """A native file recorded in local mode, loaded with --obs-mode X, gives the inputs env(obs_mode=X) gives."""
    recorder, live = make_env(name, obs_mode="local"), make_env(name, obs_mode=mode)
    n = recorder.n_agents
    obs, state = recorder.reset(seed=11)
    live_obs = [live.reset(seed=11)[0]]
    rows = {k: [] for k in ARRAY_KEYS}
    rng = np.random.default_rng(0)
    for t in range(5):
        actions = rng.uniform(-1, 1, (n, recorder.act_dim)).astype(np.float32)
        next_obs, next_state, reward, terminated, truncated = recorder.step(actions)
        live_obs.append(live.step(actions)[0])
        for key, value in (("observations", obs[:, :-n]), ("next_observations", next_obs[:, :-n]), ("states", state),
                           ("next_states", next_state), ("actions", actions), ("rewards", reward),
                           ("terminals", terminated), ("timeouts", t == 4)):
            rows[key].append(value)
        obs, state = next_obs, next_state
    attrs = dict(env=name, agent_conf=recorder.agent_conf, obs_mode="local", n_agents=n, obs_dims=recorder.local_obs_dims,
                 act_dims=recorder.local_act_dims, state_dim=recorder.state_dim, source="tests")
    path = write_dataset(dataset_path(tmp_path, name, None, "expert"), {k: np.asarray(v) for k, v in rows.items()}, attrs)
    dataset = load_dataset(path, "cpu", obs_mode=mode)
    dataset.check_env(live)
    np.testing.assert_allclose(dataset.obs.numpy().transpose(1, 0, 2), np.stack(live_obs[:-1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dataset.next_obs.numpy().transpose(1, 0, 2), np.stack(live_obs[1:]), rtol=1e-5, atol=1e-5)


# --- OMIGA importer ------------------------------------------------------------------------------------------------

def omiga_layout(r_shape: str) -> dict:
    """A 7-step file in OMIGA's layout. d marks steps 2 and 5; s differs per agent so 'agent 0's s' is checked."""
    t = np.arange(7, dtype=np.float32)
    s = t[:, None, None] * 10 + np.arange(2)[None, :, None] * 100 + np.arange(3)[None, None, :]  # [7, 2, 3]
    o = t[:, None, None] + np.arange(2)[None, :, None] * 0.5 + np.zeros((1, 1, 4))  # [7, 2, 4]
    a = np.tile((t / 10)[:, None, None], (1, 2, 2))  # [7, 2, 2]
    r = t + 100
    return dict(s=s, o=o, a=a, r=r if r_shape == "[N]" else r[:, None], d=np.array([0, 0, 1, 0, 0, 1, 0.0])[:, None])


@pytest.mark.parametrize("r_shape", ["[N]", "[N,1]"])
def test_omiga_import_builds_next_step_and_mask_like_omiga(tmp_path, r_shape):
    raw = omiga_layout(r_shape)
    write_raw(tmp_path / "Hopper-v2-3x1-expert.hdf5", raw)
    out = import_omiga(tmp_path / "Hopper-v2-3x1-expert.hdf5", tmp_path / "out" / "Hopper-3x1-expert.hdf5", "Hopper")
    arrays, attrs = read_dataset(out)
    # Keep t with d[t] == 0 and t < N-1: 0, 1, 3, 4 (t=6 is the last step; 2 and 5 are dones). Next step t+1.
    keep, nxt = np.array([0, 1, 3, 4]), np.array([1, 2, 4, 5])
    np.testing.assert_array_equal(arrays["observations"], raw["o"][keep])
    np.testing.assert_array_equal(arrays["next_observations"], raw["o"][nxt])
    np.testing.assert_array_equal(arrays["actions"], raw["a"][keep])
    np.testing.assert_array_equal(arrays["rewards"], [100, 101, 103, 104])
    np.testing.assert_array_equal(arrays["states"], raw["s"][keep].reshape(4, 6))  # every agent's s, as OMIGA's mixer
    np.testing.assert_array_equal(arrays["next_states"], raw["s"][nxt].reshape(4, 6))
    np.testing.assert_array_equal(arrays["terminals"], [False, True, False, True])  # d[t+1]: mask = 1 - d[t+1]
    assert not arrays["timeouts"].any()
    assert attrs["obs_mode"] == "omiga" and attrs["env"] == "Hopper" and attrs["n_agents"] == 2
    dataset = load_dataset(out, "cpu", obs_mode="omiga")
    # OMIGA's recorded inputs as they are, then the one-hot id its networks append
    np.testing.assert_array_equal(dataset.obs[:, :, :4].numpy(), raw["o"][keep].transpose(1, 0, 2))
    np.testing.assert_array_equal(dataset.obs[:, :, 4:].numpy(), np.broadcast_to(np.eye(2)[:, None], (2, 4, 2)))
    np.testing.assert_array_equal(dataset.dones.numpy(), [0, 1, 0, 1])
    np.testing.assert_allclose(dataset.episode_returns(), [201, 207])


def test_omiga_import_trains_on_what_omiga_evaluation_feeds(tmp_path):
    """A Hopper file built the way OMIGA's env records (o_i = s_i = z-score of [state, one-hot i]) trains on exactly the
    inputs our env gives a policy in --obs-mode omiga for the same states, and passes the env check."""
    from test_envs import omiga_recorded

    env = make_env("Hopper", obs_mode="omiga")
    raw_states = np.random.default_rng(0).normal(0.0, 2.0, (6, env.state_dim))
    recorded = np.stack([[omiga_recorded(x, env.state_dim, i, env.n_agents) for i in range(env.n_agents)]
                         for x in raw_states]).astype(np.float32)
    d = np.eye(1, 6, 5).T  # one episode: the done of its last step ends it
    write_raw(tmp_path / "raw.hdf5", dict(s=recorded, o=recorded, a=np.zeros((6, 3, 1), np.float32),
                                          r=np.zeros(6, np.float32), d=d))
    dataset = load_dataset(import_omiga(tmp_path / "raw.hdf5", tmp_path / "Hopper-3x1-expert.hdf5", "Hopper"), "cpu",
                           obs_mode="omiga")
    dataset.check_env(env)
    env_inputs = build_agent_obs("omiga", np.zeros((5, 3, env.local_obs_dim)), raw_states[:5], env.omiga_state_dim)
    np.testing.assert_allclose(dataset.obs.numpy(), env_inputs.transpose(1, 0, 2), atol=1e-5)
    assert dataset.state_dim == 3 * 14  # OMIGA's mixer input: the three recorded vectors side by side


def test_a_script_trains_and_evaluates_on_an_imported_omiga_file(tmp_path):
    """omiga.py on an imported file: the policy trains on OMIGA's inputs (17 per agent for Hopper) and the mixer on
    OMIGA's state (3 x 14), then is evaluated in --obs-mode omiga."""
    from test_envs import omiga_recorded

    rng = np.random.default_rng(0)
    raw_states = rng.normal(0.0, 2.0, (200, 11))
    recorded = np.stack([[omiga_recorded(x, 11, i, 3) for i in range(3)] for x in raw_states]).astype(np.float32)
    d = np.zeros((200, 1))
    d[99] = d[199] = 1
    write_raw(tmp_path / "raw.hdf5", dict(s=recorded, o=recorded, a=rng.uniform(-1, 1, (200, 3, 1)).astype(np.float32),
                                          r=rng.normal(size=200).astype(np.float32), d=d))
    import_omiga(tmp_path / "raw.hdf5", tmp_path / "data" / "Hopper-3x1-medium-replay.hdf5", "Hopper")
    (tmp_path / "work").mkdir()
    run = smoke_run("omiga.py", tmp_path / "data", tmp_path / "work", "--obs-mode", "omiga", total_steps=20)
    assert run.checkpoint["agents"]["policy.net.0.weight"].shape[1] == 17
    assert run.checkpoint["agents"]["mixer.hyper_w.0.weight"].shape[1] == 42


@pytest.mark.parametrize("mode", ["state", "local"])
def test_omiga_import_refuses_other_obs_modes(tmp_path, mode):
    write_raw(tmp_path / "raw.hdf5", omiga_layout("[N]"))
    out = import_omiga(tmp_path / "raw.hdf5", tmp_path / "Hopper-3x1-expert.hdf5", "Hopper")
    with pytest.raises(DatasetError, match="imported from OMIGA.*use --obs-mode omiga"):
        load_dataset(out, "cpu", obs_mode=mode)


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.pop("d"), r"missing keys \['d'\]"),
    (lambda raw: raw.update(s=raw["s"][:, 0]), "s, o and a must be"),
    (lambda raw: raw.update(r=raw["r"][:-1]), "r has shape"),
    (lambda raw: raw.update(a=raw["a"][:-1]), "a has shape"),
    (lambda raw: raw.update(d=np.zeros((7, 2))), "d has shape"),
])
def test_omiga_import_rejects_bad_files(tmp_path, change, message):
    raw = omiga_layout("[N]")
    change(raw)
    write_raw(tmp_path / "raw.hdf5", raw)
    with pytest.raises(DatasetError, match=message):
        import_omiga(tmp_path / "raw.hdf5", tmp_path / "out.hdf5", "Hopper")
    assert not (tmp_path / "out.hdf5").exists()


def test_omiga_import_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="OMIGA file not found: .*nothing.hdf5"):
        import_omiga(tmp_path / "nothing.hdf5", tmp_path / "out.hdf5", "Hopper")


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, warned", [(10_000, True), (50_000, False)], ids=["former-1x", "default-5x"])
def test_existing_medium_replay_of_another_size_is_flagged(tmp_path, capsys, steps, warned):
    source = (f"common.collect, sac behaviour policy; checkpoints at steps 0..70000 (every 10000) each run for {steps} "
              "steps with the training exploration (sac); seed 0")
    path = write_dataset(dataset_path(tmp_path, "Hopper", "3x1", "medium-replay"), hand_made_arrays(),
                         {**ATTRS, "source": source})
    assert ensure_dataset(tmp_path, "Hopper", None, "medium-replay", generate=False) == path
    message = capsys.readouterr().err
    assert ("runs each checkpoint for 10000 steps; the default medium-replay runs each for 50000" in message) == warned
    assert bool(message) == warned
    write_dataset(dataset_path(tmp_path, "Hopper", "3x1", "medium"), hand_made_arrays(), {**ATTRS, "source": source})
    ensure_dataset(tmp_path, "Hopper", None, "medium", generate=False)
    assert capsys.readouterr().err == ""  # only medium-replay's definition changed


def test_missing_file_says_path_command_and_omiga_import(tmp_path):
    expected = tmp_path / "Hopper-3x1-medium.hdf5"
    with pytest.raises(FileNotFoundError) as error:
        ensure_dataset(tmp_path, "Hopper", None, "medium", generate=False)
    message = str(error.value)
    assert str(expected) in message
    assert "python -m common.collect dataset --env Hopper --quality medium" in message
    assert "OMIGA" in message and "python -m common.datasets import-omiga" in message
    with pytest.raises(DatasetError, match=f"dataset file not found: {expected}"):
        load_dataset(expected)


@pytest.mark.parametrize("key", ["rewards", "next_states"])
def test_missing_key(tmp_path, key):
    arrays = hand_made_arrays()
    del arrays[key]
    write_raw(tmp_path / "bad.hdf5", arrays)
    with pytest.raises(DatasetError, match=rf"bad.hdf5: missing keys \['{key}'\]"):
        load_dataset(tmp_path / "bad.hdf5")
    with pytest.raises(DatasetError, match="missing keys"):
        write_dataset(tmp_path / "never.hdf5", arrays, ATTRS)
    assert not (tmp_path / "never.hdf5").exists()


@pytest.mark.parametrize("key, shape, message", [
    ("rewards", (N + 1,), r"rewards has shape \(10,\), expected \(9,\)"),
    ("actions", (N, N_AGENTS + 1, ACT_DIM), r"actions has shape \(9, 3, 2\), expected \(9, 2, 2\)"),
    ("next_observations", (N, N_AGENTS, OBS_DIM + 1), r"next_observations has shape \(9, 2, 4\), expected \(9, 2, 3\)"),
    ("terminals", (N - 1,), r"terminals has shape \(8,\), expected \(9,\)"),
    ("observations", (N, N_AGENTS * OBS_DIM), r"observations must be \[N, n_agents, dim\], actions \[N, n_agents, dim\]"),
])
def test_wrong_shape(tmp_path, key, shape, message):
    arrays = hand_made_arrays()
    arrays[key] = np.zeros(shape, arrays[key].dtype)
    write_raw(tmp_path / "bad.hdf5", arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path / "bad.hdf5")


@pytest.mark.parametrize("key, value", [("states", np.nan), ("rewards", np.inf), ("observations", -np.inf),
                                        ("actions", np.nan), ("next_states", np.nan)])
def test_nan_or_inf(tmp_path, key, value):
    arrays = hand_made_arrays()
    arrays[key][5] = value
    write_raw(tmp_path / "bad.hdf5", arrays)
    with pytest.raises(DatasetError, match=rf"{key} holds NaN or inf \(first at transition 5\)"):
        load_dataset(tmp_path / "bad.hdf5")
    with pytest.raises(DatasetError, match="NaN or inf"):
        write_dataset(tmp_path / "never.hdf5", arrays, ATTRS)


def test_check_env_rejects_a_dataset_that_does_not_fit(tmp_path):
    hopper = make_env("Hopper", obs_mode="state")  # 3 agents, local obs 9, act 1, state 11
    rng = np.random.default_rng(0)
    obs, states = rng.normal(size=(N, 3, 9)).astype(np.float32), rng.normal(size=(N, 11)).astype(np.float32)
    arrays = dict(hand_made_arrays(), observations=obs, next_observations=np.roll(obs, -1, 0), states=states,
                  next_states=states, actions=np.zeros((N, 3, 1), np.float32))
    path = write_dataset(tmp_path / "Hopper-3x1-expert.hdf5", arrays, dict(ATTRS, n_agents=3))
    load_dataset(path, "cpu", "state").check_env(hopper)  # fits
    load_dataset(path, "cpu", "local").check_env(make_env("Hopper", obs_mode="local"))  # fits
    with pytest.raises(DatasetError, match=r"does not match env Ant 2x4 .*dataset has .* = \(3, 14, 1, 11\), env has \(2, 29, 4, 27\)"):
        load_dataset(path, "cpu", "state").check_env(make_env("Ant"))
    with pytest.raises(DatasetError, match=r"does not match env Hopper 3x1 \(obs_mode=local\)"):
        load_dataset(path, "cpu", "state").check_env(make_env("Hopper", obs_mode="local"))


    mislabelled = write_dataset(tmp_path / "Hopper-3x1-medium.hdf5", arrays, dict(ATTRS, n_agents=3, env="HalfCheetah"))
    with pytest.raises(DatasetError, match=r"the file says it holds HalfCheetah 3x1 data, not Hopper 3x1"):
        load_dataset(mislabelled, "cpu", "state").check_env(hopper)  # the shapes fit, the label does not


@pytest.mark.parametrize("case, change, message", [
    ("actions outside [-1, 1]", lambda a: dict(actions=a["actions"] * 5),
     r"actions reach [\d.]+ \(first outside \[-1, 1\] at transition \d+\); the envs act in \[-1, 1\]"),
    ("no episode end", lambda a: dict(terminals=np.zeros(N, bool), timeouts=np.zeros(N, bool)),
     r"no transition ends an episode .* the 9 transitions would read as one episode"),
    ("shuffled next observations", lambda a: dict(next_observations=a["next_observations"][::-1]),
     r"next_observations\[t\] is not observations\[t \+ 1\] within episodes at \d of 6 transitions checked"),
])
def test_datasets_are_checked_for_meaning(case, change, message, tmp_path):
    arrays = hand_made_arrays()
    validate_arrays(arrays)  # the unchanged arrays pass
    with pytest.raises(DatasetError, match=message):
        write_dataset(tmp_path / "Hopper-3x1-expert.hdf5", {**arrays, **change(arrays)}, ATTRS)
    assert not (tmp_path / "Hopper-3x1-expert.hdf5").exists()


def test_loading_warns_of_overlong_episodes_and_extreme_rewards(tmp_path, capsys):
    hopper = make_env("Hopper", obs_mode="state")
    n = hopper.episode_limit + 5  # one episode, longer than Hopper's limit
    obs = np.random.default_rng(0).normal(size=(n + 1, 3, 9)).astype(np.float32)
    arrays = dict(observations=obs[:-1], next_observations=obs[1:], states=np.zeros((n, 11), np.float32),
                  next_states=np.zeros((n, 11), np.float32), actions=np.zeros((n, 3, 1), np.float32),
                  rewards=np.ones(n, np.float32), terminals=np.eye(1, n, n - 1, dtype=bool)[0], timeouts=np.zeros(n, bool))
    path = write_dataset(tmp_path / "Hopper-3x1-expert.hdf5", arrays, dict(ATTRS, n_agents=3))
    load_dataset(path, "cpu", "state").check_env(hopper)
    assert capsys.readouterr().err == (f"warning: {path}: its longest episode has 1,005 steps, more than Hopper's limit "
                                       f"of 1000: are its time-outs marked?\n")
    arrays["rewards"][3] = -1e30
    load_dataset(write_dataset(path, arrays, dict(ATTRS, n_agents=3)), "cpu", "state")
    assert "rewards reach 1e+30 in magnitude" in capsys.readouterr().err


# --- discrete actions (SMAX) ---------------------------------------------------------------------------------------

N_ACTIONS = 4


def hand_made_discrete_arrays(seed: int = 0) -> dict:
    """hand_made_arrays with integer actions, each drawn among its agent's available ones."""
    rng = np.random.default_rng(seed)
    arrays = hand_made_arrays(seed)
    avail = rng.random((N + 1, N_AGENTS, N_ACTIONS)) < 0.5
    avail[..., 0] = True  # every agent has at least one action
    arrays["actions"] = (rng.random((N, N_AGENTS, N_ACTIONS)) * avail[:-1]).argmax(-1).astype(np.int32)
    arrays["avail_actions"], arrays["next_avail_actions"] = avail[:-1], avail[1:]
    return arrays


DISCRETE_ATTRS = dict(ATTRS, env="3m", win_rate=0.25, source="tests: hand-made discrete")


def test_discrete_round_trip_one_hot_actions_and_masks_in_every_minibatch(tmp_path):
    arrays = hand_made_discrete_arrays()
    path = write_dataset(dataset_path(tmp_path, "3m", None, "good"), arrays, DISCRETE_ATTRS)
    assert path.name == "3m-good.hdf5"
    loaded, attrs = read_dataset(path)
    assert attrs["discrete"] and loaded["actions"].dtype == np.int32 and loaded["avail_actions"].dtype == np.bool_
    for key in ("actions", "avail_actions", "next_avail_actions"):
        np.testing.assert_array_equal(loaded[key], arrays[key])
    dataset = load_dataset(path, "cpu", "local")
    assert dataset.discrete and dataset.act_dim == N_ACTIONS
    batch = dataset.gather(torch.tensor([4, 0, 7]))
    assert batch.actions.shape == batch.avail.shape == batch.next_avail.shape == (N_AGENTS, 3, N_ACTIONS)
    np.testing.assert_array_equal(batch.actions.argmax(-1).numpy(), arrays["actions"][[4, 0, 7]].T)
    assert (batch.actions.sum(-1) == 1).all()
    np.testing.assert_array_equal(batch.avail.numpy(), arrays["avail_actions"][[4, 0, 7]].transpose(1, 0, 2))
    np.testing.assert_array_equal(batch.next_avail.numpy(), arrays["next_avail_actions"][[4, 0, 7]].transpose(1, 0, 2))
    assert (batch.avail & batch.actions.bool()).any(-1).all(), "every dataset action is an available one"
    fused = dataset.sample(5, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert fused.avail.shape == fused.actions.shape == (2, N_AGENTS, 5, N_ACTIONS)
    card = dataset.card()
    assert card["win_rate"] == 0.25 and card["episodes"] == 3


def test_discrete_action_that_was_unavailable_is_rejected(tmp_path):
    arrays = hand_made_discrete_arrays()
    arrays["avail_actions"][5, 1, arrays["actions"][5, 1]] = False
    with pytest.raises(DatasetError, match="agent 1 took action .* at transition 5, which its avail_actions mark"):
        write_dataset(tmp_path / "3m-good.hdf5", arrays, DISCRETE_ATTRS)
    arrays = hand_made_discrete_arrays()
    arrays["actions"] = arrays["actions"].astype(np.float32)
    with pytest.raises(DatasetError, match="integer indices"):
        write_dataset(tmp_path / "3m-good.hdf5", arrays, DISCRETE_ATTRS)


def test_missing_smax_file_says_how_to_generate_it(tmp_path):
    with pytest.raises(DatasetError) as error:
        read_dataset(dataset_path(tmp_path, "5m_vs_6m", None, "poor"))
    assert "python -m common.smax_collect dataset --map 5m_vs_6m --quality poor" in str(error.value)
    assert "requirements-smax.txt" in str(error.value)
