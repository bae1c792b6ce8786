"""What the algorithm scripts share, kept identical so that `diff omiga.py <script>` shows only the algorithm: the
common arguments, the agent networks, and (for the scripts written as diffs of omiga.py) the run section."""

import re
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = ["omcda.py", "icq.py", "comadice.py", "bc.py", "cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
# omcda.py (behaviour cloning, per-agent summary), icq.py (next-action sampler) and comadice.py (initial states)
# change the run section in documented places; icq.py has no state-value network.
SAME_RUN_SECTION = ["bc.py", "cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
SAME_NETWORKS = [script for script in SCRIPTS if script != "icq.py"]


def shared_sections(path: Path) -> list[str]:
    """The `# TRY NOT TO MODIFY` blocks of a script, each up to the next banner comment or the end of the file."""
    return re.findall(r"^# TRY NOT TO MODIFY.*?(?=^# ALGO LOGIC|^# TRY NOT TO MODIFY|\Z)", path.read_text(),
                      re.M | re.S)


def common_arguments(path: Path) -> str:
    """The `Args` fields every script shares: from the class line to the algorithm-specific ones."""
    text = path.read_text()
    return text[text.index("class Args:"):text.index("    # Algorithm specific arguments")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_common_arguments_are_identical(script):
    assert common_arguments(REPO / script) == common_arguments(REPO / "omiga.py")


@pytest.mark.parametrize("script", SAME_NETWORKS)
def test_network_section_is_identical(script):
    assert shared_sections(REPO / script)[0] == shared_sections(REPO / "omiga.py")[0]


@pytest.mark.parametrize("script", SAME_RUN_SECTION)
def test_run_section_is_identical(script):
    mine, template = shared_sections(REPO / script), shared_sections(REPO / "omiga.py")
    assert len(template) == 2
    assert mine == template
