"""common/vaults.py: OG-MARL's Flashbax vaults read from a fixture that the real flashbax (0.1.3) wrote
(tests/fixtures/vaults, made by make_vault_fixture.py there), our datasets exported and read back, the episode ends,
and bad input. Needs tensorstore (requirements-vaults.txt); skipped without it. With FLASHBAX_PYTHON naming a Python
that has flashbax 0.1.3, flashbax itself reads our export too."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorstore")

from common.datasets import ARRAY_KEYS, read_dataset, write_dataset  # noqa: E402
from common.envs import omiga_normalise  # noqa: E402
from common.vaults import LAYOUT_KEY, STEP_ROWS, SUCCESSOR_ROW, export_vault, import_vault, read_vault, write_vault  # noqa: E402
from conftest import REPO, run_module, smoke_run  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "vaults"
GYMNASIUM, OMIGA = FIXTURES / "gymnasium_3hopper.vlt", FIXTURES / "omiga_3hopper.vlt"


@pytest.fixture(scope="module")
def rollouts() -> dict:
    """The steps the fixture's vaults were written from, and where each episode ends."""
    data = dict(np.load(FIXTURES / "rollouts.npz"))
    data["ends"] = np.flatnonzero(data["terminals"] | data["truncations"])
    return data


def test_fixture_is_what_flashbax_wrote(rollouts):
    arrays, metadata = read_vault(GYMNASIUM, "Replay")
    assert metadata["version"] == 1.2 and LAYOUT_KEY not in metadata
    np.testing.assert_array_equal(arrays["observations"][0], rollouts["observations"])
    np.testing.assert_array_equal(arrays["infos.state"][0], rollouts["states"])
    np.testing.assert_array_equal(arrays["rewards"][0], np.repeat(rollouts["rewards"][:, None], 3, 1))
    assert {p.name for p in (GYMNASIUM / "Replay").iterdir()} == {"metadata.json", "manifest.ocdbt", "d"}


def test_gymnasium_vault_imports_to_identical_arrays(tmp_path, rollouts):
    """Step rows: falls keep their terminal step (next observation: its own, a placeholder); the collector's cut
    (truncation) and the unflagged tail lose their last step, and the step before ends as a time-out."""
    out = import_vault(GYMNASIUM, "Replay", "Hopper", out=tmp_path / "Hopper-3x1-medium-replay.hdf5")
    arrays, attrs = read_dataset(out)
    ends, total = rollouts["ends"], len(rollouts["rewards"])
    falls, cut = ends[:-1], ends[-1]
    rows = np.setdiff1d(np.arange(total), [cut, total - 1])
    nexts = np.where(np.isin(rows, falls), rows, rows + 1)
    for key, source in (("observations", "observations"), ("states", "states"), ("actions", "actions"),
                        ("rewards", "rewards")):
        np.testing.assert_array_equal(arrays[key], rollouts[source][rows])
    np.testing.assert_array_equal(arrays["next_observations"], rollouts["observations"][nexts])
    np.testing.assert_array_equal(arrays["next_states"], rollouts["states"][nexts])
    np.testing.assert_array_equal(arrays["terminals"], np.isin(rows, falls))
    np.testing.assert_array_equal(arrays["timeouts"], np.isin(rows, [cut - 1, total - 2]))
    assert (attrs["env"], attrs["agent_conf"], attrs["obs_mode"], attrs["n_agents"]) == ("Hopper", "3x1", "local", 3)
    assert list(attrs["obs_dims"]) == [8, 9, 8] and attrs["state_dim"] == 11
    assert attrs["source"] == f"imported from Flashbax vault {GYMNASIUM} uid Replay"


def test_omiga_vault_imports_like_import_omiga(tmp_path, rollouts):
    """Successor row: the extra row per episode is dropped and gives the last step its next observation; the
    observations are OMIGA's recorded inputs, the mixer's state every agent's vector side by side."""
    out = import_vault(OMIGA, "Medium", "Hopper", out=tmp_path / "Hopper-3x1-medium.hdf5")
    arrays, attrs = read_dataset(out)
    ends = rollouts["ends"]
    rows = np.arange(ends[-1] + 1)  # the fixture leaves the unflagged tail out of this vault
    recorded = omiga_normalise(np.concatenate([rollouts["states"][rows], rollouts["final_states"][:len(ends)]]), 3, 11)
    np.testing.assert_array_equal(arrays["observations"], recorded[:len(rows)])
    nexts = np.where(np.isin(rows, ends), len(rows) + np.searchsorted(ends, rows), rows + 1)
    np.testing.assert_array_equal(arrays["next_observations"], recorded[nexts])
    np.testing.assert_array_equal(arrays["states"], recorded[:len(rows)].reshape(len(rows), -1))
    np.testing.assert_array_equal(arrays["actions"], rollouts["actions"][rows])
    np.testing.assert_array_equal(arrays["terminals"], np.isin(rows, ends))  # every episode under 1000 steps
    assert not arrays["timeouts"].any()
    assert attrs["obs_mode"] == "omiga" and list(attrs["obs_dims"]) == [14] * 3 and attrs["state_dim"] == 42
    assert "MuJoCo 2.0" in attrs["source"] and "MuJoCo 4" in attrs["source"]


def episode_arrays(lengths: list[int], terminal: list[bool], seed: int = 0) -> dict:
    """Native Hopper 3x1 arrays of episodes of the given lengths, each ending terminal or by a time-out."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    obs = rng.normal(size=(n + len(lengths), 3, 9)).astype(np.float32)
    states = rng.normal(size=(n + len(lengths), 11)).astype(np.float32)
    ends = np.cumsum(lengths)
    rows = np.arange(n) + np.searchsorted(ends, np.arange(n), side="right")  # each episode's last row has a successor
    flags = np.zeros(n, bool)
    flags[ends - 1] = True
    return dict(observations=obs[rows], next_observations=obs[rows + 1], states=states[rows], next_states=states[rows + 1],
                actions=rng.uniform(-1, 1, (n, 3, 1)).astype(np.float32), rewards=rng.normal(size=n).astype(np.float32),
                terminals=flags & np.repeat(terminal, lengths), timeouts=flags & ~np.repeat(terminal, lengths))


HOPPER_ATTRS = dict(env="Hopper", agent_conf="3x1", obs_mode="local", n_agents=3, obs_dims=[8, 9, 8], act_dims=[1, 1, 1],
                    state_dim=11, source="tests: random episodes")


def test_export_then_import_gives_the_same_dataset(tmp_path, tiny_hopper_dir):
    """A collected dataset (random actions: falls, and a last episode the file leaves open) and hand-made episodes
    ending terminal and by time-outs, one of them a single step."""
    collected = tiny_hopper_dir / "Hopper-3x1-medium-replay.hdf5"
    hand_made = write_dataset(tmp_path / "Hopper-3x1-medium.hdf5",
                              episode_arrays([5, 1, 7, 3], [True, True, False, False]), HOPPER_ATTRS)
    for src in (collected, hand_made):
        vault = export_vault(src, tmp_path / "ours.vlt")
        assert vault == tmp_path / "ours.vlt" / src.stem and not list((tmp_path / "ours.vlt").glob(".*"))
        out = import_vault(tmp_path / "ours.vlt", src.stem, "Hopper", out=tmp_path / "back" / src.name)
        original, back = read_dataset(src)[0], read_dataset(out)[0]
        for key in ARRAY_KEYS:
            np.testing.assert_array_equal(back[key], original[key], err_msg=key)
            assert back[key].dtype == original[key].dtype
    metadata = json.loads((tmp_path / "ours.vlt" / src.stem / "metadata.json").read_text())
    assert metadata[LAYOUT_KEY] == SUCCESSOR_ROW and metadata["structure_shape"]["observations"] == "(1, 20, 3, 9)"


@pytest.mark.parametrize("layout, terminal_rows, expected", [
    # step rows: 1000 steps flagged terminal reach the limit, a time-out (the flagged step dropped); 4 steps: a fall
    (STEP_ROWS, [999, 1003], dict(transitions=999 + 4, terminals=[1002], timeouts=[998])),
    # successor row: 1000 steps then the extra row; 4 steps then the extra row
    (SUCCESSOR_ROW, [1000, 1005], dict(transitions=1000 + 4, terminals=[1003], timeouts=[999])),
])
def test_a_terminal_at_the_time_limit_is_a_time_out(tmp_path, layout, terminal_rows, expected):
    rng = np.random.default_rng(0)
    length = terminal_rows[-1] + 1
    flags = np.zeros((length, 3), bool)
    flags[terminal_rows] = True
    write_vault(tmp_path / "v.vlt" / "Expert", {
        "observations": rng.normal(size=(length, 3, 9)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (length, 3, 1)).astype(np.float32),
        "rewards": np.ones((length, 3), np.float32), "terminals": flags, "truncations": np.zeros((length, 3), bool),
        "infos.state": rng.normal(size=(length, 11)).astype(np.float32)}, {LAYOUT_KEY: layout})
    arrays, _ = read_dataset(import_vault(tmp_path / "v.vlt", "Expert", "Hopper", out=tmp_path / "out.hdf5"))
    assert len(arrays["rewards"]) == expected["transitions"]
    assert list(np.flatnonzero(arrays["terminals"])) == expected["terminals"]
    assert list(np.flatnonzero(arrays["timeouts"])) == expected["timeouts"]


def test_cli_default_output_and_a_uid_that_is_no_quality(tmp_path):
    result = run_module("common.datasets", "import-vault", str(OMIGA), "--uid", "Medium", "--env", "Hopper", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "wrote data/vault-omiga_3hopper-omiga/Hopper-3x1-medium.hdf5"
    result = run_module("common.datasets", "import-vault", str(GYMNASIUM), "--uid", "Replay", "--env", "Hopper", cwd=tmp_path)
    assert result.returncode == 2 and "uid 'Replay' is not one of the qualities" in result.stderr
    assert "--out data/vault-gymnasium_3hopper/Hopper-3x1-medium-replay.hdf5" in result.stderr


def damaged(tmp_path: Path, change) -> Path:
    vault = tmp_path / "copy.vlt"
    shutil.copytree(GYMNASIUM, vault)
    change(vault / "Replay")
    return vault


def truncate_largest(folder: Path) -> None:
    largest = max((folder / "d").iterdir(), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])


@pytest.mark.parametrize("case, args, message", [
    ("not a vault", lambda tmp: [str(tmp), "--uid", "Replay", "--env", "Hopper"],
     "not a Flashbax vault (no <uid>/metadata.json inside)"),
    ("not a vault, no --out", lambda tmp: [str(tmp), "--uid", "Replay", "--env", "Hopper"],
     "not a Flashbax vault (no <uid>/metadata.json inside)"),
    ("a file", lambda tmp: [str(FIXTURES / "rollouts.npz"), "--uid", "Replay", "--env", "Hopper"],
     "not a folder; a Flashbax vault is a folder of datasets <vault>/<uid>/"),
    ("missing uid", lambda tmp: [str(GYMNASIUM), "--uid", "Expert", "--env", "Hopper"],
     "no dataset with uid 'Expert'; its uids: Replay"),
    ("the uid folder", lambda tmp: [str(GYMNASIUM / "Replay"), "--uid", "Replay", "--env", "Hopper"],
     f"one dataset of a vault, not the vault: pass {GYMNASIUM} with --uid Replay"),
    ("truncated d/", lambda tmp: [str(damaged(tmp, truncate_largest)), "--uid", "Replay", "--env", "Hopper"],
     "cannot read the vault's arrays (OUT_OF_RANGE"),
    ("no d/", lambda tmp: [str(damaged(tmp, lambda f: shutil.rmtree(f / "d"))), "--uid", "Replay", "--env", "Hopper"],
     "cannot read the vault's arrays (NOT_FOUND"),
    ("another env", lambda tmp: [str(GYMNASIUM), "--uid", "Replay", "--env", "Ant"],
     "does not fit Ant 2x4: the vault has 3 agents, observations of 9, actions of 1 and states of 11; Ant 2x4 has 2 "
     "agents, observations of 21 (local; OMIGA's recorded inputs: 113), actions of 4 and states of 27"),
    ("another partition", lambda tmp: [str(OMIGA), "--uid", "Medium", "--env", "Hopper", "--agent-conf", "2x1"],
     "cannot build Hopper with agent_conf='2x1'"),
])
def test_bad_vaults_give_one_line_and_exit_2(tmp_path, case, args, message):
    out = [] if case.endswith("no --out") else ["--out", str(tmp_path / "x.hdf5")]
    result = run_module("common.datasets", "import-vault", *args(tmp_path), *out, cwd=tmp_path)
    assert result.returncode == 2, (case, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("python -m common.datasets import-vault: error: ") and message in result.stderr
    assert not (tmp_path / "x.hdf5").exists()


def test_export_refuses_an_existing_dataset(tmp_path, tiny_hopper_dir):
    src = str(tiny_hopper_dir / "Hopper-3x1-medium-replay.hdf5")
    assert run_module("common.datasets", "export-vault", src, str(tmp_path / "v"), cwd=tmp_path).returncode == 0
    result = run_module("common.datasets", "export-vault", src, str(tmp_path / "v"), cwd=tmp_path)
    assert result.returncode == 2 and "already exists; remove it or choose another uid" in result.stderr


def test_a_script_trains_on_an_imported_vault(tmp_path):
    import_vault(GYMNASIUM, "Replay", "Hopper", out=tmp_path / "data" / "Hopper-3x1-medium-replay.hdf5")
    (tmp_path / "work").mkdir()
    run = smoke_run("omcda.py", tmp_path / "data", tmp_path / "work", "--bc-steps", "10", "--hidden-dim", "16",
                    total_steps=20)
    assert run.checkpoint["agents"]["policy.net.0.weight"].shape[1] == 11 + 3  # Hopper's state + one-hot id


@pytest.mark.skipif(not os.environ.get("FLASHBAX_PYTHON"), reason="FLASHBAX_PYTHON names no Python with flashbax")
def test_flashbax_reads_our_export(tmp_path, tiny_hopper_dir):
    src = tiny_hopper_dir / "Hopper-3x1-medium-replay.hdf5"
    export_vault(src, tmp_path / "ours.vlt", "Medium-Replay")
    arrays, _ = read_dataset(src)
    code = ("import sys, numpy as np; from flashbax.vault import Vault\n"
            "e = Vault(vault_name='ours.vlt', rel_dir=sys.argv[1], vault_uid='Medium-Replay').read().experience\n"
            "np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in e.items() if k != 'infos'}, "
            "state=np.asarray(e['infos']['state']))")
    result = subprocess.run([os.environ["FLASHBAX_PYTHON"], "-c", code, str(tmp_path), str(tmp_path / "read.npz")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    read = np.load(tmp_path / "read.npz")
    episodes = int((arrays["terminals"] | arrays["timeouts"]).sum())
    assert read["observations"].shape == (1, len(arrays["rewards"]) + episodes, 3, 9)
    steps = ~(read["terminals"][0, :, 0] | read["truncations"][0, :, 0])  # the rows that are steps, not extra rows
    np.testing.assert_array_equal(read["observations"][0, steps], arrays["observations"])
    np.testing.assert_array_equal(read["state"][0, steps], arrays["states"])
    np.testing.assert_array_equal(read["rewards"][0, steps, 0], arrays["rewards"])
