"""The dataset file format, loading onto the training device, sampling, OMIGA's importer and the `info` CLI.

Native format: one HDF5 file per (env, agent_conf, quality), e.g. `Hopper-3x1-medium-replay.hdf5`:

    observations       float32 [N, n_agents, obs_dim]   local observations (agent_obsk=1), zero-padded
    next_observations  float32 [N, n_agents, obs_dim]
    states             float32 [N, state_dim]           global state (the single-agent MuJoCo observation)
    next_states        float32 [N, state_dim]
    actions            float32 [N, n_agents, act_dim]   in [-1, 1], zero-padded
                       (discrete envs: int32 [N, n_agents], the action indices)
    rewards            float32 [N]                      team reward
    terminals          bool    [N]                      true termination: do not bootstrap
    timeouts           bool    [N]                      episode cut by the time limit or the collector: bootstrap
    avail_actions      bool    [N, n_agents, n_actions] discrete envs only: the actions each agent could take
    next_avail_actions bool    [N, n_agents, n_actions] discrete envs only: the same at the next observation
    attrs: env, agent_conf, obs_mode, n_agents, obs_dims, act_dims, state_dim, source, plus how it was made; discrete
           files add discrete = True and win_rate.

Files are named `{env}-{agent_conf}-{quality}.hdf5` (MuJoCo: expert, medium, medium-replay, medium-expert) and
`{map}-{quality}.hdf5` (SMAX: good, medium, poor, the papers' names for SMAC data). Loaded, a discrete file's actions
become one-hot rows [n_agents, N, n_actions], so critics take (observation, one-hot action) as they take continuous
actions, and its masks come with every minibatch.

Transitions of an episode are contiguous; an episode ends where `terminals | timeouts`.
Agent inputs for `--obs-mode state|omiga` are built from `states` (+ one-hot id) at load time, so one file serves
every mode. Files imported from OMIGA (`obs_mode="omiga"`) hold what OMIGA's env recorded (per agent, [state, one-hot id]
z-scored) and serve only that mode; the one-hot id is appended at load time, as OMIGA's networks do.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from common.envs import ENV_SPECS, SMAX_MAPS, build_agent_obs, check_env_name, check_obs_mode, with_agent_id

QUALITIES = ("expert", "medium", "medium-replay", "medium-expert")
SMAX_QUALITIES = ("good", "medium", "poor")
ARRAY_KEYS = ("observations", "next_observations", "states", "next_states", "actions", "rewards", "terminals", "timeouts")
MASK_KEYS = ("avail_actions", "next_avail_actions")  # discrete files only


class DatasetError(ValueError):
    """A dataset file that is missing, malformed, or does not fit the environment."""


def dataset_filename(env: str, agent_conf: str | None, quality: str) -> str:
    return f"{env}-{quality}.hdf5" if env in SMAX_MAPS else f"{env}-{agent_conf}-{quality}.hdf5"


def dataset_path(data_dir: str | Path, env: str, agent_conf: str | None, quality: str) -> Path:
    if env not in SMAX_MAPS:
        agent_conf = agent_conf or check_env_name(env).default_agent_conf
    return Path(data_dir) / dataset_filename(env, agent_conf, quality)


def array_dtype(key: str, discrete: bool) -> np.dtype:
    """The stored dtype of a native array."""
    if key in ("terminals", "timeouts") or key in MASK_KEYS:
        return np.dtype(bool)
    return np.dtype(np.int32 if key == "actions" and discrete else np.float32)


def array_keys(discrete: bool) -> tuple[str, ...]:
    return ARRAY_KEYS + MASK_KEYS if discrete else ARRAY_KEYS


def remake_commands(path: Path) -> str:
    """How to make the file at `path` again: generate it, or import OMIGA's file. The env, partition and quality come
    from the file's name when it follows the native naming, as ENV and QUALITY placeholders otherwise."""
    smax = re.fullmatch(r"(.+)-(good|medium|poor)\.hdf5", path.name)
    if smax and smax[1] in SMAX_MAPS:
        return (f"  generate it from the committed behaviour policies (needs pip install -r requirements-smax.txt):\n"
                f"    python -m common.smax_collect dataset --map {smax[1]} --quality {smax[2]} --data-dir {shlex.quote(str(path.parent))}")
    match = re.fullmatch(r"([A-Za-z]+)-([^-]+)-(.+)\.hdf5", path.name)
    named = match is not None and match[1] in ENV_SPECS and match[3] in QUALITIES
    env, conf, quality = match.groups() if named else ("ENV", None, "QUALITY")
    conf_arg = f" --agent-conf {conf}" if named and conf != ENV_SPECS[env].default_agent_conf else ""
    return (
        f"  generate it from the committed behaviour policies:\n"
        f"    python -m common.collect dataset --env {env} --quality {quality} --data-dir {shlex.quote(str(path.parent))}"
        f"{conf_arg}\n"
        f"  or import OMIGA's published file ({{Scenario}}-v2-{{conf}}-{{quality}}.hdf5):\n"
        f"    python -m common.datasets import-omiga FILE --env {env} --quality {quality} "
        f"--data-dir {shlex.quote(str(path.parent))}"
        f"{conf_arg}"
    )


def missing_dataset_message(path: Path) -> str:
    return f"dataset file not found: {path}\n{remake_commands(path)}"


def write_dataset(path: str | Path, arrays: dict[str, np.ndarray], attrs: dict) -> Path:
    """Validate and write a native dataset atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    validate_arrays(arrays, path)
    discrete = "avail_actions" in arrays
    if discrete:
        attrs = {**attrs, "discrete": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key in array_keys(discrete):
                f.create_dataset(key, data=np.asarray(arrays[key], dtype=array_dtype(key, discrete)))
            for key, value in attrs.items():
                f.attrs[key] = value
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the folder is not writable: the error that got us here is the one to see
            pass
    return path


def check_writable_dir(folder: str | Path) -> None:
    """Create `folder` if needed and write and delete a file there, so that generating a dataset (minutes) fails at
    once, with one line, where its file could not be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"--data-dir {folder}: a file, not a folder")
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DatasetError(f"--data-dir {folder}: cannot write a dataset there ({error.strerror or error})") from None


EXTREME_REWARD = 1e4  # [ours] warned about at load: MuJoCo's and SMAX's rewards per step are below 100
ACTION_TOLERANCE = 1e-4  # continuous actions may exceed [-1, 1] by this much (float rounding), not more
CHAINED_SAMPLE = 100_000  # transitions checked for next_observations[t] == observations[t + 1]


def validate_arrays(arrays: dict[str, np.ndarray], path: Path | str = "<arrays>") -> None:
    """Shapes, finiteness and meaning: continuous actions in the envs' range [-1, 1]; for discrete actions (arrays with
    `avail_actions`), that every action is an available one; at least one episode end; and, within episodes (a
    sample of CHAINED_SAMPLE transitions), each transition's next observation is the next one's observation."""
    discrete = "avail_actions" in arrays
    keys = array_keys(discrete)
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DatasetError(f"{path}: missing keys {missing}; a native dataset needs {list(keys)}")
    obs, states, actions = arrays["observations"], arrays["states"], arrays["actions"]
    if obs.ndim != 3 or actions.ndim != (2 if discrete else 3) or states.ndim != 2:
        action_shape = "[N, n_agents] (discrete)" if discrete else "[N, n_agents, dim]"
        raise DatasetError(
            f"{path}: observations must be [N, n_agents, dim], actions {action_shape} and states [N, state_dim]; "
            f"got observations {obs.shape}, actions {actions.shape}, states {states.shape}"
        )
    n = obs.shape[0]
    expected = {
        "next_observations": obs.shape, "next_states": states.shape,
        "actions": (n, obs.shape[1]) if discrete else (n, obs.shape[1], actions.shape[2]),
        "states": (n, states.shape[1]), "rewards": (n,), "terminals": (n,), "timeouts": (n,),
    }
    if discrete:
        n_actions = arrays["avail_actions"].shape[-1]
        expected.update(avail_actions=(n, obs.shape[1], n_actions), next_avail_actions=(n, obs.shape[1], n_actions))
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != tuple(shape):
            raise DatasetError(f"{path}: {key} has shape {tuple(arrays[key].shape)}, expected {tuple(shape)}")
    if n == 0:
        raise DatasetError(f"{path}: the dataset holds no transitions")
    for key in ("observations", "next_observations", "states", "next_states", "actions", "rewards"):
        values = np.asarray(arrays[key])
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).reshape(n, -1).any(-1).nonzero()[0][0])
            raise DatasetError(f"{path}: {key} holds NaN or inf (first at transition {bad})")
    if not discrete:
        magnitude = np.abs(np.asarray(actions)).reshape(n, -1).max(-1)
        if magnitude.max() > 1 + ACTION_TOLERANCE:
            raise DatasetError(f"{path}: actions reach {magnitude.max():g} (first outside [-1, 1] at transition "
                               f"{int(np.argmax(magnitude > 1 + ACTION_TOLERANCE))}); the envs act in [-1, 1]: rescale "
                               f"the actions to it")
    ends = np.asarray(arrays["terminals"], bool) | np.asarray(arrays["timeouts"], bool)
    if not ends.any():
        raise DatasetError(f"{path}: no transition ends an episode (terminals and timeouts are all false), so the "
                           f"{n:,} transitions would read as one episode; mark each episode's last transition")
    chained = np.flatnonzero(~ends[:-1])
    if len(chained) > CHAINED_SAMPLE:
        chained = np.sort(np.random.default_rng(0).choice(chained, CHAINED_SAMPLE, replace=False))
    if len(chained):
        following, nexts = np.asarray(arrays["observations"][chained + 1]), np.asarray(arrays["next_observations"][chained])
        broken = chained[~np.isclose(nexts, following, rtol=1e-5, atol=1e-5).reshape(len(chained), -1).all(-1)]
        if len(broken) > 0.01 * len(chained):
            raise DatasetError(f"{path}: next_observations[t] is not observations[t + 1] within episodes at "
                               f"{len(broken):,} of {len(chained):,} transitions checked (first at {broken[0]}): are the "
                               f"rows shuffled, or the episode ends (terminals, timeouts) missing?")
    if discrete:
        if not np.issubdtype(np.asarray(actions).dtype, np.integer):
            raise DatasetError(f"{path}: discrete actions must be integer indices, got dtype {actions.dtype}")
        in_range = (actions >= 0) & (actions < n_actions)
        taken = np.take_along_axis(arrays["avail_actions"], np.clip(actions, 0, n_actions - 1)[..., None], -1)[..., 0]
        bad = np.argwhere(~(in_range & taken))
        if len(bad):
            t, agent = bad[0]
            raise DatasetError(f"{path}: agent {agent} took action {actions[t, agent]} at transition {t}, which its "
                               f"avail_actions mark unavailable ({len(bad)} such actions in all)")


def read_dataset(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and attributes of a native dataset file; `DatasetError` (what is wrong, and how to make the file
    again) for a file that is missing, not HDF5, truncated, or lacks a key or has one of the wrong dtype."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(missing_dataset_message(path))
    if path.is_dir():
        raise DatasetError(f"{path}: a directory, not a dataset file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            discrete = bool(attrs.get("discrete", False))
            keys = array_keys(discrete)
            missing = [k for k in keys if k not in f]
            if missing:
                raise DatasetError(f"{path}: missing keys {missing}; a native dataset needs {list(keys)}; "
                                   f"if it is OMIGA's file, import it instead\n{remake_commands(path)}")
            for key in keys:
                expected = array_dtype(key, discrete)
                stored = getattr(f[key], "dtype", None)  # None: a group, not an array
                if stored is None or stored.kind != expected.kind:  # other widths are converted on loading
                    raise DatasetError(f"{path}: {key} is stored as {'a group' if stored is None else stored}, "
                                       f"expected {expected}\n{remake_commands(path)}")
            arrays = {k: f[k][()] for k in keys}
    except OSError as error:  # h5py's error for a file that is not HDF5, truncated, or corrupt inside
        raise DatasetError(f"{path}: not a readable HDF5 file ({error}); delete it and make it again\n"
                           f"{remake_commands(path)}") from None
    validate_arrays(arrays, path)
    return arrays, attrs


def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) index of each episode; the last transition always closes one."""
    ends = np.flatnonzero(np.asarray(terminals) | np.asarray(timeouts)) + 1
    if len(ends) == 0 or ends[-1] != len(terminals):
        ends = np.append(ends, len(terminals))
    starts = np.concatenate([[0], ends[:-1]])
    return starts, ends


def draw_indices(high: int, batch_size: int, generator: torch.Generator | list[torch.Generator] | None,
                 device: torch.device) -> torch.Tensor:
    """Uniform indices in [0, high) on `device`: [batch_size], or given a list of K generators (fused seeds) [K,
    batch_size], row k drawn by generator k exactly as a run with that generator alone would draw it."""
    if isinstance(generator, list):
        return torch.stack([torch.randint(high, (batch_size,), device=device, generator=one) for one in generator])
    return torch.randint(high, (batch_size,), device=device, generator=generator)


@dataclass
class Batch:
    """A minibatch, agent-major so the batched per-agent networks take it as is; fused seeds add a leading [K] to
    every field."""

    obs: torch.Tensor  # [n_agents, B, obs_dim]
    actions: torch.Tensor  # [n_agents, B, act_dim]
    rewards: torch.Tensor  # [B]
    next_obs: torch.Tensor  # [n_agents, B, obs_dim]
    dones: torch.Tensor  # [B] 1.0 on true termination (no bootstrap)
    states: torch.Tensor  # [B, state_dim]
    next_states: torch.Tensor  # [B, state_dim]
    # Discrete-action datasets only (actions are then one-hot [n_agents, B, n_actions]); None otherwise:
    avail: torch.Tensor | None = None  # bool [n_agents, B, n_actions]: the actions each agent could take at obs
    next_avail: torch.Tensor | None = None  # bool [n_agents, B, n_actions]: the same at next_obs


class Dataset:
    """Every array as a tensor on `device`; `sample` draws indices there, so training never copies from the host."""

    def __init__(self, arrays: dict[str, np.ndarray], attrs: dict, obs_mode: str, device: torch.device | str,
                 path: Path | None = None):
        check_obs_mode(obs_mode)
        self.path = path  # the file it was read from, named in errors
        recorded_mode = attrs.get("obs_mode", "local")
        if recorded_mode == "omiga" and obs_mode != "omiga":
            raise DatasetError(f"this dataset was imported from OMIGA's files and holds only OMIGA's agent inputs; "
                               f"use --obs-mode omiga (got {obs_mode!r})")
        self.attrs, self.obs_mode, self.device = attrs, obs_mode, torch.device(device)
        if recorded_mode == "omiga":  # OMIGA's recorded inputs; its networks append the agent id
            obs, next_obs = with_agent_id(arrays["observations"]), with_agent_id(arrays["next_observations"])
        else:
            spec = ENV_SPECS.get(attrs.get("env", ""))
            omiga_dim = spec.omiga_state_dim if spec else None
            obs = build_agent_obs(obs_mode, arrays["observations"], arrays["states"], omiga_dim)
            next_obs = build_agent_obs(obs_mode, arrays["next_observations"], arrays["next_states"], omiga_dim)

        def to_device(x, dtype=torch.float32):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype).to(self.device)

        self.obs = to_device(obs.transpose(1, 0, 2))
        self.next_obs = to_device(next_obs.transpose(1, 0, 2))
        self.discrete = bool(attrs.get("discrete", False))
        if self.discrete:
            n_actions = arrays["avail_actions"].shape[-1]
            self.actions = to_device(np.eye(n_actions, dtype=np.float32)[arrays["actions"].T])
            self.avail = to_device(arrays["avail_actions"].transpose(1, 0, 2), torch.bool)
            self.next_avail = to_device(arrays["next_avail_actions"].transpose(1, 0, 2), torch.bool)
        else:
            self.actions = to_device(arrays["actions"].transpose(1, 0, 2))
        self.rewards = to_device(arrays["rewards"])
        largest = float(np.abs(arrays["rewards"]).max())
        if largest > EXTREME_REWARD:
            print(f"warning: {path or 'dataset'}: rewards reach {largest:g} in magnitude; values a thousand times the "
                  f"MuJoCo and SMAX rewards make the squared TD errors overflow: rescale them", file=sys.stderr)
        self.dones = to_device(arrays["terminals"])
        self.states = to_device(arrays["states"])
        self.next_states = to_device(arrays["next_states"])
        starts, ends = episode_bounds(arrays["terminals"], arrays["timeouts"])
        self.episode_starts = torch.as_tensor(starts, device=self.device)
        self._episode_ends = ends
        self.n_agents, self.size, self.obs_dim = self.obs.shape
        self.act_dim = self.actions.shape[-1]
        self.state_dim = self.states.shape[-1]

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None) -> Batch:
        """A minibatch of uniformly drawn transitions; given a list of K generators (fused seeds), K minibatches with
        a leading seed dim [K, ...] (see draw_indices)."""
        return self.gather(draw_indices(self.size, batch_size, generator, self.device))

    def gather(self, idx: torch.Tensor) -> Batch:
        """The transitions at idx [B] or [K, B]; agent tensors come agent-major within a seed, [K, n_agents, B, ...]."""
        def agent_major(x: torch.Tensor) -> torch.Tensor:
            return x[:, idx].movedim(0, -3)

        fields = (agent_major(self.obs), agent_major(self.actions), self.rewards[idx], agent_major(self.next_obs),
                  self.dones[idx], self.states[idx], self.next_states[idx])
        if self.discrete:
            return Batch(*fields, agent_major(self.avail), agent_major(self.next_avail))
        return Batch(*fields)

    def episode_returns(self) -> np.ndarray:
        cumulative = np.concatenate([[0.0], np.cumsum(self.rewards.double().cpu().numpy())])
        starts = self.episode_starts.cpu().numpy()
        return cumulative[self._episode_ends] - cumulative[starts]

    def card(self) -> dict:
        """The dataset card of `dataset_card`, from the arrays already loaded."""
        return returns_card(self.path, self.size, self.episode_returns(), self.attrs)

    def check_env(self, env) -> None:
        """Fail clearly when the dataset does not fit the environment the script will evaluate in. The state of a file
        imported from OMIGA is its mixer's input (every agent's recorded vector), used in training only."""
        imported = self.attrs.get("obs_mode") == "omiga"
        mine = (self.n_agents, self.obs_dim, self.act_dim, None if imported else self.state_dim)
        theirs = (env.n_agents, env.obs_dim, env.act_dim, None if imported else env.state_dim)
        if mine != theirs:
            recorded = f"{self.attrs.get('env', '?')} {self.attrs.get('agent_conf', '?')}"
            raise DatasetError(
                f"{self.path or 'dataset'}: dataset does not match env {env.name} {env.agent_conf} "
                f"(obs_mode={env.obs_mode}): dataset has (n_agents, obs_dim, act_dim, state_dim) = {mine}, env has "
                f"{theirs}; the file says it holds {recorded} data"
                + (f"\n{remake_commands(self.path)}" if self.path else "")
            )
        recorded = (self.attrs.get("env"), self.attrs.get("agent_conf"))
        if recorded[0] not in (None, env.name) or recorded[1] not in (None, env.agent_conf):
            raise DatasetError(f"{self.path or 'dataset'}: the file says it holds {recorded[0]} {recorded[1]} data, not "
                               f"{env.name} {env.agent_conf}" + (f"\n{remake_commands(self.path)}" if self.path else ""))
        longest = int((self._episode_ends - self.episode_starts.cpu().numpy()).max())
        if longest > env.episode_limit:
            print(f"warning: {self.path or 'dataset'}: its longest episode has {longest:,} steps, more than "
                  f"{env.name}'s limit of {env.episode_limit}: are its time-outs marked?", file=sys.stderr)


def load_dataset(path: str | Path, device: torch.device | str = "cpu", obs_mode: str = "state") -> Dataset:
    arrays, attrs = read_dataset(path)
    return Dataset(arrays, attrs, obs_mode, device, Path(path))


def returns_card(path: str | Path, transitions: int, returns: np.ndarray, attrs: dict) -> dict:
    """Size and returns of a dataset; discrete (SMAX) files add the win rate their generator recorded."""
    card = dict(file=str(path), transitions=transitions, episodes=len(returns),
                return_mean=float(returns.mean()), return_std=float(returns.std()),
                return_min=float(returns.min()), return_max=float(returns.max()),
                source=str(attrs.get("source", "unknown")))
    if "win_rate" in attrs:
        card["win_rate"] = float(attrs["win_rate"])
    return card


def dataset_card(path: str | Path) -> dict:
    arrays, attrs = read_dataset(path)
    starts, ends = episode_bounds(arrays["terminals"], arrays["timeouts"])
    cumulative = np.concatenate([[0.0], np.cumsum(arrays["rewards"].astype(np.float64))])
    return returns_card(path, len(arrays["rewards"]), cumulative[ends] - cumulative[starts], attrs)


def import_omiga(src: str | Path, dst: str | Path, env: str, agent_conf: str | None = None) -> Path:
    """Convert OMIGA's published `{Scenario}-v2-{conf}-{quality}.hdf5` (keys s, o, a, r, d) to the native format.

    OMIGA builds transitions as: keep t where d[t] == 0 and t < N-1; next step t+1; bootstrap mask 1 - d[t+1].
    The global state is every agent's `s` concatenated, the input of OMIGA's mixer."""
    spec = check_env_name(env)
    agent_conf = agent_conf or spec.default_agent_conf
    src = Path(src)
    if not src.is_file():
        raise DatasetError(f"OMIGA file not found: {src}" + (" (a directory)" if src.is_dir() else ""))
    try:
        with h5py.File(src, "r") as f:
            missing = [k for k in ("s", "o", "a", "r", "d") if k not in f]
            if missing:
                raise DatasetError(f"{src}: missing keys {missing}; OMIGA's files hold s, o, a, r, d")
            s, o, a, r, d = (f[k][()] for k in ("s", "o", "a", "r", "d"))
    except OSError as error:  # not HDF5, truncated, or corrupt inside
        raise DatasetError(f"{src}: not a readable HDF5 file ({error})") from None
    if s.ndim != 3 or o.ndim != 3 or a.ndim != 3:
        raise DatasetError(f"{src}: s, o and a must be [N, n_agents, dim]; got s {s.shape}, o {o.shape}, a {a.shape}")
    n = len(o)
    for key, value in (("s", s), ("a", a)):
        if value.shape[:2] != o.shape[:2]:
            raise DatasetError(f"{src}: {key} has shape {value.shape}; expected [{n}, {o.shape[1]}, dim] like o {o.shape}")
    for key, value in (("r", r), ("d", d)):
        if value.shape not in ((n,), (n, 1)):
            raise DatasetError(f"{src}: {key} has shape {value.shape}; expected [{n}] or [{n}, 1]")
    r = np.asarray(r, np.float32).reshape(n, -1)[:, 0]
    d = np.asarray(d).reshape(n, -1)[:, 0].astype(bool)
    keep = np.flatnonzero(~d[:-1])
    nxt = keep + 1
    terminals = d[nxt]
    # OMIGA drops the step after a done, so a kept transition whose successor is a done ends an episode.
    arrays = dict(observations=o[keep], next_observations=o[nxt], states=s[keep].reshape(len(keep), -1),
                  next_states=s[nxt].reshape(len(nxt), -1),
                  actions=a[keep], rewards=r[keep], terminals=terminals,
                  timeouts=np.zeros_like(terminals))
    attrs = dict(env=env, agent_conf=agent_conf, obs_mode="omiga", n_agents=o.shape[1], obs_dims=[o.shape[2]] * o.shape[1],
                 act_dims=[a.shape[2]] * a.shape[1], state_dim=s.shape[1] * s.shape[2],
                 source=f"imported from OMIGA file {src.name}")
    return write_dataset(dst, arrays, attrs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.datasets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the dataset card of each file")
    info.add_argument("files", nargs="+")
    info.add_argument("--markdown", action="store_true", help="one markdown table row per file, for the README")
    imp = sub.add_parser("import-omiga", help="convert an OMIGA file to the native format")
    imp.add_argument("file")
    imp.add_argument("--env", required=True, choices=sorted(ENV_SPECS))
    imp.add_argument("--quality", required=True, choices=QUALITIES)
    imp.add_argument("--agent-conf", default=None)
    imp.add_argument("--data-dir", default="data")
    vault = sub.add_parser("import-vault", help="convert one dataset of an OG-MARL Flashbax vault (MaMuJoCo) to the "
                                                "native format; needs pip install -r requirements-vaults.txt")
    vault.add_argument("vault_dir", metavar="VAULT_DIR", help="the vault folder, e.g. vaults/omiga/mamujoco/3hopper.vlt")
    vault.add_argument("--uid", required=True, help="the dataset inside it, e.g. Medium-Replay")
    vault.add_argument("--env", required=True, choices=sorted(ENV_SPECS))
    vault.add_argument("--agent-conf", default=None)
    vault.add_argument("--out", default=None, help="the native file to write (default: "
                                                   "data/vault-{vault name}[-omiga]/{env}-{conf}-{uid in lower case}.hdf5)")
    export = sub.add_parser("export-vault", help="write a native dataset as one dataset of a Flashbax vault, "
                                                 "OUT_DIR/UID/; needs pip install -r requirements-vaults.txt")
    export.add_argument("file", metavar="FILE")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the vault folder")
    export.add_argument("--uid", default=None, help="the dataset's name in the vault (default: FILE's name without .hdf5)")
    args = parser.parse_args(argv)
    try:
        run_command(args)
    except DatasetError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run_command(args: argparse.Namespace) -> None:
    if args.command == "info":
        if args.markdown:
            print("| file | episodes | transitions | return mean ± std | min | max | how it was made |\n|---|---:|---:|---|---:|---:|---|")
        for file in args.files:
            card = dataset_card(file)
            if args.markdown:
                print(f"| {Path(file).name} | {card['episodes']:,} | {card['transitions']:,} | {card['return_mean']:.1f} ± "
                      f"{card['return_std']:.1f} | {card['return_min']:.1f} | {card['return_max']:.1f} | {card['source']} |")
            else:
                win_rate = f"   win rate {card['win_rate']:.2f}" if "win_rate" in card else ""
                print(f"{card['file']}\n  transitions {card['transitions']:,}   episodes {card['episodes']:,}\n"
                      f"  episode return {card['return_mean']:.1f} ± {card['return_std']:.1f}   "
                      f"min {card['return_min']:.1f}   max {card['return_max']:.1f}{win_rate}\n"
                      f"  source: {card['source']}")
    elif args.command == "import-omiga":
        out = dataset_path(args.data_dir, args.env, args.agent_conf, args.quality)
        print(f"wrote {import_omiga(args.file, out, args.env, args.agent_conf)}")
    else:  # the vault commands: tensorstore, an optional dependency, is imported only here
        import common.datasets
        from common import vaults

        try:
            if args.command == "import-vault":
                print(f"wrote {vaults.import_vault(args.vault_dir, args.uid, args.env, args.agent_conf, args.out)}")
            else:
                print(f"wrote {vaults.export_vault(args.file, args.out_dir, args.uid)}")
        except common.datasets.DatasetError as error:  # under `python -m` this file is __main__, its class another
            raise DatasetError(str(error)) from None


if __name__ == "__main__":
    main()
