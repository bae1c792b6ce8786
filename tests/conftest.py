import itertools
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# For the processes tests start without run_script (submitit's local jobs): one thread each, as on a loaded CI
# machine. This process's torch has read its thread count already.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_hopper_dir(tmp_path_factory) -> Path:
    """A 600-transition Hopper-3x1 'medium-replay' file of uniform random actions, in the native format."""
    from common.collect import rollout
    from common.datasets import dataset_path, write_dataset
    from common.envs import make_env

    data_dir = tmp_path_factory.mktemp("data")
    env = make_env("Hopper")
    arrays = rollout("Hopper", None, [(None, "uniform", 600)], seed=0, num_envs=4)
    attrs = dict(env="Hopper", agent_conf="3x1", obs_mode="local", n_agents=env.n_agents, obs_dims=env.local_obs_dims,
                 act_dims=env.local_act_dims, state_dim=env.state_dim, source="tests: uniform random actions")
    write_dataset(dataset_path(data_dir, "Hopper", "3x1", "medium-replay"), arrays, attrs)
    return data_dir


def run_script(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_module(module: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` with the repository importable, as a user runs the common/ CLIs."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


class ForkedRun:
    """`python script args` run in a child forked from this test process, which has already imported torch, MuJoCo
    and the scripts' other dependencies: the child runs the script as __main__, with its own exit status, output
    files and signal handlers, in a fraction of the seconds a fresh interpreter spends importing torch."""

    def __init__(self, script: str, *args: str, cwd: Path, before: Callable[[], None] | None = None):
        """`before` runs in the child first: it may patch what the script will import (tests of signals at a stage)."""
        self.stdout_path, self.stderr_path = cwd / f"{script}.stdout", cwd / f"{script}.stderr"
        self.stdout_path.write_text("")  # emptied: an earlier run's longer output in the same folder must not show through
        self.stderr_path.write_text("")
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            self._run_child(str(REPO / script), args, cwd, before)

    def _run_child(self, script: str, args: tuple[str, ...], cwd: Path, before: Callable[[], None] | None) -> None:
        status = 1
        try:
            if before is not None:
                before()
            # One thread, as run_script's OMP_NUM_THREADS=1: an OpenMP thread team the test process started before the
            # fork does not exist in the child, and a parallel region would wait for it forever.
            torch.set_num_threads(1)
            os.chdir(cwd)
            for fd, path in ((1, self.stdout_path), (2, self.stderr_path)):
                os.dup2(os.open(path, os.O_WRONLY), fd)
            sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as exit_request:  # as the interpreter treats it
            code = exit_request.code
            if code is None or isinstance(code, int):
                status = code or 0
            else:  # a message: printed, status 1
                print(code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def wait(self) -> subprocess.CompletedProcess:
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return subprocess.CompletedProcess([], self.returncode, self.stdout(), self.stderr_path.read_text())

    def __enter__(self) -> "ForkedRun":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.returncode is None:  # a failed test must not leave the child training
            os.kill(self.pid, signal.SIGKILL)
            self.wait()


def run_forked(script: str, *args: str, cwd: Path, before: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    with ForkedRun(script, *args, cwd=cwd, before=before) as run:
        return run.wait()


@pytest.fixture(scope="module")
def forked_runs_share_imports() -> None:
    """Import once, before the forks, what every forked run would otherwise import itself: tyro, TensorBoard's
    writer, and torch._dynamo (which Adam's first construction imports, about 2 s)."""
    import torch._dynamo  # noqa: F401
    import tyro  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401


@dataclass
class SmokeRun:
    stdout: str
    run_dir: Path
    args: dict
    scalars: set
    checkpoint: dict


def smoke_run(script: str, data_dir: Path, cwd: Path, *extra_args: str, total_steps: int = 50) -> SmokeRun:
    """Run an algorithm script for a few updates on a tiny dataset and check what every script must produce:
    the final line, the run directory, args.json, TensorBoard scalars, result.json and an atomically saved
    checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_script(script, "--data-dir", str(data_dir), "--no-generate", "--total-steps", str(total_steps),
                        "--eval-every", str(total_steps // 2), "--eval-episodes", "1", "--final-eval-episodes", "2",
                        "--log-every", "10", "--save-model", "--exp-name", "smoke", *extra_args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^final return: -?\d+\.\d+ ± \d+\.\d+ over 2 episodes$", result.stdout, re.M), result.stdout
    (run_dir,) = (cwd / "runs").iterdir()
    assert run_dir.name.startswith("Hopper__medium-replay__smoke__1__")
    args = json.loads((run_dir / "args.json").read_text())
    assert args["total_steps"] == total_steps
    scalars = set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])
    assert {"eval/return_mean", "eval/return_std", "charts/updates_per_sec"} <= scalars
    checkpoint = torch.load(run_dir / "model.pt", weights_only=False)
    assert checkpoint["step"] == total_steps and any(key.startswith("policy.") for key in checkpoint["agents"])
    result_file = json.loads((run_dir / "result.json").read_text())
    with h5py.File(data_dir / "Hopper-3x1-medium-replay.hdf5") as data:
        transitions = len(data["rewards"])
    assert result_file["args"] == args and result_file["finished"] and result_file["dataset"]["transitions"] == transitions
    assert [(e["step"], e["episodes"]) for e in result_file["evaluations"]] == [(total_steps // 2, 1), (total_steps, 2)]
    assert result_file["last"] == result_file["evaluations"][-1] and result_file["updates_per_sec"] > 0
    # Scripts that fuse seeds keep one list of evaluations per seed.
    saved = checkpoint["evaluations"][0] if checkpoint.get("run_dirs") else checkpoint["evaluations"]
    assert saved == result_file["evaluations"]
    assert not list(run_dir.glob("*.tmp"))
    return SmokeRun(result.stdout, run_dir, args, scalars, checkpoint)


def exp_loss_fixed_point(loss, track_shift, std: float = 3.0, steps: int = 10_000) -> float:
    """E[exp(z)] at the fixed point that plain SGD on minibatches of 128 reaches for an exp value loss
    `loss(v [1, B], q [1, B], shift [1])` with z = q - v, q ~ N(0, std^2) (a pool of 20,000), V a scalar; the iterate
    averaged over the second half. The minimiser has E[exp(z)] = 1 exactly."""
    generator = torch.Generator().manual_seed(0)
    pool = std * torch.randn(1, 20_000, generator=generator)
    v, shift = torch.zeros(1, 1, requires_grad=True), torch.zeros(1)
    optimizer = torch.optim.SGD([v], lr=0.1)
    averaged = torch.zeros(())
    for step in range(steps):
        q = pool[:, torch.randint(pool.shape[1], (128,), generator=generator)]
        optimizer.zero_grad()
        loss(v.expand_as(q), q, shift).backward()
        optimizer.step()
        track_shift(shift, q - v.detach(), 0.005)
        if step >= steps // 2:
            averaged += v.detach().squeeze() / (steps - steps // 2)
    return torch.exp(pool - averaged).mean().item()


# A two-agent chain with known regularised optima: the multi-step, never-terminal toy of the value tests.
CHAIN_GAMMA = 0.8
CHAIN_ACTIONS = np.array([-0.5, 0.5], np.float32)  # the two discrete actions as continuous inputs
CHAIN_BEHAVIOUR = np.array([[[0.8, 0.2], [0.3, 0.7]], [[0.5, 0.5], [0.9, 0.1]]])  # pi_b,i(a_i | s_i)
CHAIN_REWARD = np.array([[[0.0, 1.0], [0.6, 0.0]], [[0.2, 0.0], [0.0, 0.8]]])  # r_i(s_i, a_i); r = r_0 + r_1
CHAIN_JOINT = [(k // 8, (k // 4) % 2, (k // 2) % 2, k % 2) for k in range(16)]  # row k: (s_0, s_1, a_0, a_1)


def chain_soft_optimum(agent: int, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each agent's local state s_i in {0, 1} moves to s_i' = a_i, forever, so the KL-regularised problem separates
    per agent: soft value iteration of r_i - alpha KL(pi_i || pi_b,i) gives Q_i [s, a], V_i [s] and pi*_i [s, a]."""
    behaviour, reward = CHAIN_BEHAVIOUR[agent], CHAIN_REWARD[agent]
    v = np.zeros(2)
    for _ in range(500):
        q = reward + CHAIN_GAMMA * v[None, :]
        v = alpha * np.log((behaviour * np.exp(q / alpha)).sum(1))
    return q, v, behaviour * np.exp((q - v[:, None]) / alpha)


def chain_dataset(episode_length: int | None = None, discrete: bool = False, terminal_state: int | None = None):
    """Every joint (s, a) of the two-agent chain, repeated in proportion to the behaviour policies; never terminal,
    unless terminal_state names a joint state 2 s_0 + s_1 whose every transition ends the episode (its next state keeps
    the value it has from its other predecessors, so only the (1 - done) of a backup makes Q there equal r).
    Both agents observe the global state (one-hot of (s_0, s_1)). With episode_length the rows are shuffled and every
    episode_length-th is a timeout, so that the rows after them (and row 0) are episode starts. With discrete, the
    actions are the indices 0 and 1 (loaded one-hot), both always available."""
    from common.datasets import Dataset

    rows = np.array([(s0, s1, a0, a1) for s0, s1, a0, a1 in itertools.product(range(2), repeat=4)
                     for _ in range(round(200 * CHAIN_BEHAVIOUR[0, s0, a0] * CHAIN_BEHAVIOUR[1, s1, a1]))])
    timeouts = np.zeros(len(rows), bool)
    if episode_length is not None:
        rows = rows[np.random.default_rng(0).permutation(len(rows))]
        timeouts[episode_length - 1 :: episode_length] = True
    one_hot = np.eye(4, dtype=np.float32)
    states, next_states = one_hot[rows[:, 0] * 2 + rows[:, 1]], one_hot[rows[:, 2] * 2 + rows[:, 3]]
    rewards = CHAIN_REWARD[0, rows[:, 0], rows[:, 2]] + CHAIN_REWARD[1, rows[:, 1], rows[:, 3]]
    arrays = dict(observations=np.repeat(states[:, None], 2, 1), next_observations=np.repeat(next_states[:, None], 2, 1),
                  states=states, next_states=next_states, actions=CHAIN_ACTIONS[rows[:, 2:]][..., None],
                  rewards=rewards.astype(np.float32), terminals=rows[:, 0] * 2 + rows[:, 1] == terminal_state,
                  timeouts=timeouts)
    if discrete:
        arrays.update(actions=rows[:, 2:].astype(np.int32), avail_actions=np.ones((len(rows), 2, 2), bool),
                      next_avail_actions=np.ones((len(rows), 2, 2), bool))
    return Dataset(arrays, dict(obs_mode="local", discrete=discrete), "local", "cpu")


def chain_joint_batch(dataset):
    """The 16 joint (s, a) of the chain as one batch, row k = CHAIN_JOINT[k]."""
    taken = dataset.actions.argmax(-1) if dataset.discrete else (dataset.actions[..., 0] > 0).long()
    keys = (dataset.states.argmax(1) * 4 + taken[0] * 2 + taken[1]).tolist()
    return dataset.gather(torch.tensor([keys.index(k) for k in range(16)]))


def random_batch(n_agents: int = 2, obs_dim: int = 3, act_dim: int = 1, state_dim: int = 4, size: int = 64,
                 seed: int = 0, terminal_fraction: float = 0.25):
    """A minibatch of random continuous transitions, some of them terminal: input for checks of which network feeds
    which loss, where the numbers themselves do not matter."""
    from common.datasets import Batch

    generator = torch.Generator().manual_seed(seed)
    state, next_state = torch.randn(2, size, state_dim, generator=generator)
    return Batch(obs=torch.randn(n_agents, size, obs_dim, generator=generator),
                 actions=torch.rand(n_agents, size, act_dim, generator=generator) * 1.8 - 0.9,
                 rewards=torch.randn(size, generator=generator),
                 next_obs=torch.randn(n_agents, size, obs_dim, generator=generator),
                 dones=(torch.rand(size, generator=generator) < terminal_fraction).float(),
                 states=state, next_states=next_state)


@torch.no_grad()
def perturb_(module: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Add Gaussian noise of std `scale` to every parameter of `module`, in place."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def assert_polyak_step(targets_before: dict, agents: torch.nn.Module, pairs: dict[str, str], tau: float) -> None:
    """After one update, each target network (name in `pairs`) is (1 - tau) x its old weights + tau x its online
    network's new ones; targets_before maps the target names to their state_dicts before the update."""
    for target_name, online_name in pairs.items():
        online = getattr(agents, online_name).state_dict()
        for key, after in getattr(agents, target_name).state_dict().items():
            expected = torch.lerp(targets_before[target_name][key], online[key], tau)
            torch.testing.assert_close(after, expected, msg=lambda m: f"{target_name}.{key}: {m}")
