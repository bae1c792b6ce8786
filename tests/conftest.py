import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
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
