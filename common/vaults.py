"""Flashbax vaults, the dataset format of OG-MARL, read into and written from the native HDF5 format.

A vault is a folder of datasets `<vault>/<uid>/`, each holding `metadata.json` (format version 1.2, the structure of the
experience: each array's shape and dtype) and one tensorstore OCDBT key-value store (`manifest.ocdbt`, `d/`) of zarr
arrays: `observations.` [B, T, N, obs], `actions.` [B, T, N, act], `rewards.`, `terminals.`, `truncations.` [B, T, N],
`infos.state.` [B, T, state] (a key is the path through the experience's dicts, each part followed by a dot), and
`vault_index`, the number of valid time steps along T (the arrays are allocated 10^13 long). Each of the B rows is
one stream of episodes back to back; there is no next-observation array. Those are the facts of flashbax 0.1.3's
Vault class, which wrote the fixture of tests/test_vaults.py; only tensorstore is needed to read and write them.

How episodes end, by the vault's layout:
- "step rows" (OG-MARL's recordings, e.g. og_marl/gymnasium_mamujoco): a row is one step, flagged terminal or
  truncated if the episode ended with it; the observation after a flagged row is not stored.
- "successor row" (OG-MARL's conversion of OMIGA's data, omiga/mamujoco, and our exports): each episode ends with one
  extra row that holds the observation after its last step; the flag sits on that row, whose action and reward are
  not a step's.
A dataset's metadata names its layout under LAYOUT_KEY when we wrote it; otherwise a vault of OMIGA's recorded inputs
is read as "successor row", any other as "step rows".

Imported transitions: a row whose next row is in the same episode becomes a transition to it. A row without one is
dropped, and the row before it then ends its episode as a time-out (bootstrapped), except a true termination in a
"step rows" vault: it is kept as a terminal transition whose next observation and state repeat its own (placeholders
that the (1 - done) of every target ignores), since dropping it would lose every fall of a Hopper. OG-MARL's
MaMuJoCo wrappers flag the end of every episode terminal, the time limit's too, so an episode flagged terminal that
reached the env's time limit (`make_env(...).episode_limit`, 1000 steps on MuJoCo; counted from the row after the
previous flag) is a time-out, as is any episode flagged truncated and the unflagged rows a recording stopped in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from common.datasets import DatasetError, QUALITIES, dataset_filename, episode_bounds, read_dataset, write_dataset
from common.envs import ENV_SPECS, EnvConfigError, make_env

INSTALL_HINT = "Flashbax vaults need tensorstore, an optional dependency: pip install -r requirements-vaults.txt"
FORMAT_VERSION = 1.2  # flashbax 0.1.3's VERSION; it reads any 1.x
TIME_AXIS_LENGTH = int(10e12)  # flashbax allocates every array this long along T and counts the valid steps in vault_index
COMPRESSOR = {"id": "gzip", "level": 5}  # flashbax's default
FIELDS = ("observations", "actions", "rewards", "terminals", "truncations", "infos.state")
LAYOUT_KEY = "episode_layout"
STEP_ROWS, SUCCESSOR_ROW = "step rows", "successor row"


def _tensorstore():
    try:
        import tensorstore
    except ImportError:
        raise DatasetError(INSTALL_HINT) from None
    return tensorstore


def _spec(folder: Path, key: str) -> dict:
    """The tensorstore spec of one array of a vault dataset (Flashbax names them `infos.state.`, the index `vault_index`)."""
    name = key if key == "vault_index" else f"{key}."
    return {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{folder.resolve()}", "path": name}}


def _leaves(structure: dict, prefix: str = "") -> dict[str, str]:
    """The metadata's nested structure as {dotted key: value}."""
    leaves = {}
    for key, value in structure.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def vault_uids(vault_dir: Path) -> list[str]:
    return sorted(p.name for p in vault_dir.iterdir() if (p / "metadata.json").is_file()) if vault_dir.is_dir() else []


def vault_dataset(vault_dir: str | Path, uid: str) -> tuple[Path, dict]:
    """The folder and metadata of one dataset of a vault, checked without reading its arrays; DatasetError for a
    folder that is not a vault, a missing uid, unreadable metadata, or a vault of discrete actions."""
    vault_dir = Path(vault_dir)
    if not vault_dir.is_dir():
        raise DatasetError(f"{vault_dir}: not a folder; a Flashbax vault is a folder of datasets <vault>/<uid>/")
    folder = vault_dir / uid
    if not (folder / "metadata.json").is_file():
        uids = vault_uids(vault_dir)
        if (vault_dir / "metadata.json").is_file():
            raise DatasetError(f"{vault_dir}: one dataset of a vault, not the vault: pass {vault_dir.parent} with "
                               f"--uid {vault_dir.name}")
        if not uids:
            raise DatasetError(f"{vault_dir}: not a Flashbax vault (no <uid>/metadata.json inside)")
        raise DatasetError(f"{vault_dir}: no dataset with uid {uid!r}; its uids: {', '.join(uids)}")
    try:
        metadata = json.loads((folder / "metadata.json").read_text())
        version, structure = float(metadata["version"]), _leaves(metadata["structure_shape"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DatasetError(f"{folder}/metadata.json: not a Flashbax vault's metadata ({type(error).__name__}: "
                           f"{error})") from None
    if int(version) != int(FORMAT_VERSION):
        raise DatasetError(f"{folder}: vault format version {version}; this reader knows version {FORMAT_VERSION} "
                           f"(flashbax 0.1.3)")
    if "infos.legals" in structure:
        raise DatasetError(f"{folder}: a vault of discrete actions (it has legals); only continuous-action "
                           f"(MaMuJoCo) vaults are imported")
    missing = [key for key in FIELDS if key not in structure]
    if missing:
        raise DatasetError(f"{folder}: the vault has no {', '.join(missing)}; a MaMuJoCo vault holds {', '.join(FIELDS)} "
                           f"(it has {', '.join(structure)})")
    return folder, metadata


def read_vault(vault_dir: str | Path, uid: str) -> tuple[dict[str, np.ndarray], dict]:
    """The valid steps of one dataset of a vault, {field: [B, T, ...]} for FIELDS, and its metadata; DatasetError
    as vault_dataset's, or for a damaged store."""
    folder, metadata = vault_dataset(vault_dir, uid)
    ts = _tensorstore()
    try:
        length = int(ts.open(_spec(folder, "vault_index"), open=True).result().read().result()[0])
        arrays = {key: np.asarray(ts.open(_spec(folder, key), open=True).result()[:, :length].read().result())
                  for key in FIELDS}
    except ValueError as error:  # tensorstore's error for a missing or damaged store
        reason = str(error).splitlines()[0].split(" [tensorstore_spec=")[0]
        raise DatasetError(f"{folder}: cannot read the vault's arrays ({reason}); it is incomplete or damaged: "
                           f"download it again") from None
    if length < 2:
        raise DatasetError(f"{folder}: the vault holds {length} time steps, too few for one transition")
    return arrays, metadata


def _transitions(flags: np.ndarray, terminal: np.ndarray, truncated: np.ndarray, layout: str, limit: int):
    """Row indices (rows, next_rows) of the transitions of one stream of T rows and their end flags (terminals,
    timeouts); see the module docstring."""
    rows, nexts, terminals, timeouts = [], [], [], []
    ends = np.flatnonzero(flags)
    starts = np.concatenate([[0], ends + 1])
    ends = np.append(ends, len(flags) - 1)  # the unflagged rows after the last flag, if any
    for number, (start, end) in enumerate(zip(starts, ends)):
        if end < start:
            continue
        flagged = number < len(ends) - 1 or flags[end]
        steps = end - start + (layout == STEP_ROWS)  # the episode's steps (a successor row is not one)
        terminated = flagged and terminal[end] and not truncated[end] and steps < limit
        if layout == STEP_ROWS and terminated:
            kept = np.arange(start, end + 1)
            following = np.append(kept[1:], end)  # placeholder: a terminal's next observation is never used
        else:
            kept = np.arange(start, end)  # the last row has no successor: dropped
            following = kept + 1
            terminated = terminated and layout == SUCCESSOR_ROW
        if len(kept) == 0:
            continue
        ending = np.zeros(len(kept), bool)
        ending[-1] = True
        rows.append(kept)
        nexts.append(following)
        terminals.append(ending & terminated)
        timeouts.append(ending & (not terminated))
    if not rows:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, bool),) * 2
    return np.concatenate(rows), np.concatenate(nexts), np.concatenate(terminals), np.concatenate(timeouts)


def import_vault(vault_dir: str | Path, uid: str, env: str, agent_conf: str | None = None,
                 out: str | Path | None = None) -> Path:
    """Convert one dataset of a Flashbax vault of a MaMuJoCo task to the native format (see the module docstring).

    A vault of local observations (OG-MARL's gymnasium_mamujoco, our exports) keeps them and its states, for every
    --obs-mode. A vault of OMIGA's recorded inputs (omiga/mamujoco: per agent [state, one-hot id] z-scored, Hopper 14
    wide) becomes an `obs_mode="omiga"` file as `import-omiga` makes, with every agent's vector side by side as the
    mixer's state. Default output: data/vault-{vault name}[-omiga]/{env}-{conf}-{uid in lower case}.hdf5, the uid being
    one of the qualities the scripts' --dataset names."""
    vault_dir = Path(vault_dir)
    if env not in ENV_SPECS:
        raise DatasetError(f"--env {env}: vaults are imported for the MaMuJoCo tasks {', '.join(ENV_SPECS)}")
    try:
        task = make_env(env, agent_conf, obs_mode="local")
    except EnvConfigError as error:
        raise DatasetError(str(error)) from None
    where = f"{vault_dir} uid {uid}"
    vault_dataset(vault_dir, uid)  # a wrong folder or uid first, before any advice on the output's name
    if out is None and uid.lower() not in QUALITIES:
        raise DatasetError(f"uid {uid!r} is not one of the qualities the scripts load by --dataset "
                           f"({', '.join(QUALITIES)}): name the file with --out, e.g. --out "
                           f"data/vault-{vault_dir.name.removesuffix('.vlt')}/"
                           f"{dataset_filename(env, task.agent_conf, 'medium-replay')}")
    raw, metadata = read_vault(vault_dir, uid)
    obs, actions, rewards, states = raw["observations"], raw["actions"], raw["rewards"], raw["infos.state"]
    if obs.ndim != 4 or actions.ndim != 4 or states.ndim != 3 or rewards.shape != obs.shape[:3]:
        raise DatasetError(f"{where}: expected observations [B, T, N, dim], actions [B, T, N, dim], rewards [B, T, N] "
                           f"and infos.state [B, T, dim]; got {obs.shape}, {actions.shape}, {rewards.shape}, "
                           f"{states.shape}")
    n, obs_dim, act_dim, state_dim = obs.shape[2], obs.shape[3], actions.shape[3], states.shape[2]
    omiga_dim = ENV_SPECS[env].omiga_state_dim + task.n_agents
    if (n, obs_dim, act_dim, state_dim) == (task.n_agents, task.local_obs_dim, task.act_dim, task.state_dim):
        omiga = False
    elif (n, obs_dim, act_dim) == (task.n_agents, omiga_dim, task.act_dim):
        omiga = True
        states = obs.reshape(*obs.shape[:2], -1)  # OMIGA's mixer input: every agent's recorded vector, as import-omiga
    else:
        raise DatasetError(
            f"{where}: does not fit {env} {task.agent_conf}: the vault has {n} agents, observations of {obs_dim}, "
            f"actions of {act_dim} and states of {state_dim}; {env} {task.agent_conf} has {task.n_agents} agents, "
            f"observations of {task.local_obs_dim} (local; OMIGA's recorded inputs: {omiga_dim}), actions of "
            f"{task.act_dim} and states of {task.state_dim}")
    if not (rewards == rewards[..., :1]).all():
        raise DatasetError(f"{where}: the agents' rewards differ; the algorithms here learn from one team reward")
    layout = metadata.get(LAYOUT_KEY, SUCCESSOR_ROW if omiga else STEP_ROWS)
    if layout not in (STEP_ROWS, SUCCESSOR_ROW):
        raise DatasetError(f"{where}: unknown {LAYOUT_KEY} {layout!r} in its metadata.json")
    parts = {key: [] for key in ("observations", "next_observations", "states", "next_states", "actions", "rewards",
                                 "terminals", "timeouts")}
    for b in range(obs.shape[0]):  # each batch row is its own stream of episodes
        terminal, truncated = raw["terminals"][b].any(-1), raw["truncations"][b].any(-1)
        rows, nexts, ends_terminal, ends_timeout = _transitions(terminal | truncated, terminal, truncated, layout,
                                                                task.episode_limit)
        for key, source, index in (("observations", obs, rows), ("next_observations", obs, nexts), ("states", states, rows),
                                   ("next_states", states, nexts), ("actions", actions, rows)):
            parts[key].append(source[b, index])
        parts["rewards"].append(rewards[b, rows, 0])
        parts["terminals"].append(ends_terminal)
        parts["timeouts"].append(ends_timeout)
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    source = f"imported from Flashbax vault {vault_dir} uid {uid}"
    if omiga:
        source += (f" (OMIGA's data, recorded under MuJoCo 2.0 in {env}-v2; evaluation here runs MuJoCo 4, {env}-v5, "
                   f"whose dynamics differ slightly)")
    if "source" in metadata:
        source += f"; the vault's source: {metadata['source']}"
    attrs = dict(env=env, agent_conf=task.agent_conf, obs_mode="omiga" if omiga else "local", n_agents=n,
                 obs_dims=[obs_dim] * n if omiga else task.local_obs_dims, act_dims=task.local_act_dims,
                 state_dim=arrays["states"].shape[1], source=source)
    if out is None:
        folder = Path("data") / f"vault-{vault_dir.resolve().name.removesuffix('.vlt')}{'-omiga' if omiga else ''}"
        out = folder / dataset_filename(env, task.agent_conf, uid.lower())
    task.close()
    return write_dataset(out, arrays, attrs)


def export_vault(src: str | Path, vault_dir: str | Path, uid: str | None = None) -> Path:
    """Write a native dataset as one dataset of a Flashbax vault, `vault_dir/uid/` (uid: the file's name without
    .hdf5), in the "successor row" layout, so that importing it gives back the same transitions. Written in a
    temporary folder beside it, then renamed."""
    arrays, attrs = read_dataset(src)
    if attrs.get("discrete"):
        raise DatasetError(f"{src}: a dataset of discrete actions; only continuous-action datasets are exported")
    vault_dir = Path(vault_dir)
    uid = uid or Path(src).stem
    target = vault_dir / uid
    if target.exists():
        raise DatasetError(f"{target}: already exists; remove it or choose another uid")
    starts, ends = episode_bounds(arrays["terminals"], arrays["timeouts"])
    # Each episode's rows, then one row holding its last next observation and state: the flag's row.
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
    position = np.arange(len(rows)) + np.searchsorted(ends, rows, side="right")  # each row shifted by the extra rows before it
    extra = ends + np.arange(len(ends))  # where each episode's extra row goes
    length = len(rows) + len(ends)
    n_agents = arrays["observations"].shape[1]

    def laid_out(values: np.ndarray, last: np.ndarray) -> np.ndarray:
        out = np.zeros((length,) + values.shape[1:], values.dtype)
        out[position] = values[rows]
        out[extra] = last
        return out

    terminated = arrays["terminals"][ends - 1]
    terminal_rows, truncated_rows = np.zeros(length, bool), np.zeros(length, bool)
    terminal_rows[extra[terminated]] = True
    truncated_rows[extra[~terminated]] = True  # time-outs, and a last episode the file leaves open
    experience = {
        "observations": laid_out(arrays["observations"], arrays["next_observations"][ends - 1]),
        "actions": laid_out(arrays["actions"], 0.0),
        "rewards": np.repeat(laid_out(arrays["rewards"], 0.0)[:, None], n_agents, 1),  # every agent gets the team's
        "terminals": np.repeat(terminal_rows[:, None], n_agents, 1),
        "truncations": np.repeat(truncated_rows[:, None], n_agents, 1),
        "infos.state": laid_out(arrays["states"], arrays["next_states"][ends - 1]),
    }
    metadata = {LAYOUT_KEY: SUCCESSOR_ROW, "env": str(attrs.get("env", "")), "agent_conf": str(attrs.get("agent_conf", "")),
                "obs_mode": str(attrs.get("obs_mode", "local")), "source": str(attrs.get("source", "unknown"))}
    write_vault(target, experience, metadata)
    return target


def write_vault(folder: str | Path, experience: dict[str, np.ndarray], metadata: dict) -> None:
    """One vault dataset at `folder` from {dotted key: [T, ...]} (one stream, B = 1), as flashbax's Vault lays it out,
    written into a temporary folder beside it and renamed."""
    ts = _tensorstore()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    length = len(experience["rewards"])
    shapes, dtypes = {}, {}
    for key, values in experience.items():
        *parents, leaf = key.split(".")
        shape_node, dtype_node = shapes, dtypes
        for part in parents:
            shape_node, dtype_node = shape_node.setdefault(part, {}), dtype_node.setdefault(part, {})
        shape_node[leaf], dtype_node[leaf] = str((1, length) + values.shape[1:]), values.dtype.name
    try:
        tmp.mkdir()
        (tmp / "metadata.json").write_text(json.dumps({"version": FORMAT_VERSION, "structure_shape": shapes,
                                                       "structure_dtype": dtypes, **metadata}))
        for key, values in experience.items():
            spec = {**_spec(tmp, key), "metadata": {"compressor": COMPRESSOR}}
            store = ts.open(spec, create=True, dtype=values.dtype.name,
                            shape=(1, TIME_AXIS_LENGTH) + values.shape[1:]).result()
            store[:, :length].write(values[None]).result()
        index = ts.open(_spec(tmp, "vault_index"), create=True, dtype="int32", shape=(1,)).result()
        index.write(np.array([length], np.int32)).result()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
