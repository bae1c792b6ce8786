"""Optional dependencies stay optional: the MuJoCo path never imports jax (common/smax.py alone does), and without jax
the SMAX module says how to install it; likewise tensorstore, which only the vault commands (common/vaults.py) import.
Runs with or without jax and tensorstore installed."""

import os
import subprocess
import sys

from conftest import REPO

SCRIPTS = sorted(path.stem for path in REPO.glob("*.py"))


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_mujoco_path_and_scripts_do_not_import_jax():
    modules = ["common.envs", "common.datasets", "common.evaluation", "common.collect", *SCRIPTS]
    assert {"omiga", "omcda"} <= set(SCRIPTS)
    result = run_python(f"import sys, {', '.join(modules)}\n"
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'jaxmarl')))")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_smax_without_jax_says_what_to_install():
    # None in sys.modules makes `import jax` raise ImportError, as if jax were not installed.
    result = run_python("import sys; sys.modules['jax'] = sys.modules['jaxmarl'] = None; import common.smax")
    assert result.returncode != 0
    assert "ImportError: the SMAX envs need jax and jaxmarl: pip install -r requirements-smax.txt" in result.stderr


def test_tensorstore_is_imported_by_the_vault_commands_alone():
    modules = ["common.envs", "common.datasets", "common.evaluation", "common.collect", *SCRIPTS]
    result = run_python(f"import sys, {', '.join(modules)}\n"
                        "from common.datasets import main\n"
                        "try:\n    main(['info', 'tests/fixtures/vaults/rollouts.npz'])\nexcept SystemExit:\n    pass\n"
                        "print(sorted(m for m in sys.modules if m == 'common.vaults' or m.split('.')[0] == 'tensorstore'))")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_vault_commands_without_tensorstore_say_what_to_install():
    # None in sys.modules makes `import tensorstore` raise ImportError, as if it were not installed.
    result = run_python("import sys; sys.modules['tensorstore'] = None\n"
                        "from common.datasets import main\n"
                        "main(['import-vault', 'tests/fixtures/vaults/gymnasium_3hopper.vlt', '--uid', 'Replay', "
                        "'--env', 'Hopper', '--out', '/nonexistent/x.hdf5'])")
    assert result.returncode == 2
    assert result.stderr.strip() == ("python -m common.datasets import-vault: error: Flashbax vaults need tensorstore, "
                                     "an optional dependency: pip install -r requirements-vaults.txt")
