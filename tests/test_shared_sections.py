"""What the algorithm scripts share, kept identical so that `diff omiga.py <script>` shows only the algorithm: the
common arguments, the agent networks and the training loop (its machinery is common/run.py)."""

import difflib
import re
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = ["omcda.py", "icq.py", "comadice.py", "bc.py", "cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
FUSED = ["omcda.py", "icq.py", "comadice.py"]  # like omiga.py, train --num-seeds seeds as one computation
# omcda.py (behaviour cloning, per-agent summary, decomposition monitor), icq.py (next-action sampler) and
# comadice.py (initial states) change the training loop in documented places; icq.py has no state-value network. The
# single-seed scripts share theirs with bc.py.
SAME_RUN_SECTION = ["cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
SAME_NETWORKS = [script for script in SCRIPTS if script != "icq.py"]
FUSED_ARGUMENTS = "    # Fused seeds and the update's compilation"


def shared_sections(path: Path) -> list[str]:
    """The `# TRY NOT TO MODIFY` blocks of a script, each up to the next banner comment or the end of the file."""
    return re.findall(r"^# TRY NOT TO MODIFY.*?(?=^# ALGO LOGIC|^# TRY NOT TO MODIFY|\Z)", path.read_text(),
                      re.M | re.S)


def common_arguments(path: Path) -> str:
    """The `Args` fields every script shares: from the class line to the fused-seed or algorithm-specific ones."""
    text = path.read_text()
    end = text.find(FUSED_ARGUMENTS)
    return text[text.index("class Args:"):end if end >= 0 else text.index("    # Algorithm specific arguments")]


def fused_arguments(path: Path) -> str:
    text = path.read_text()
    return text[text.index(FUSED_ARGUMENTS):text.index("    # Algorithm specific arguments")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_common_arguments_are_identical(script):
    assert common_arguments(REPO / script) == common_arguments(REPO / "omiga.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_only_the_fused_scripts_offer_fused_seeds_and_compilation(script):
    """--num-seeds, --compile and --cuda-graph appear where they work: identical in the fused scripts, absent elsewhere."""
    if script in FUSED:
        assert fused_arguments(REPO / script) == fused_arguments(REPO / "omiga.py")
    else:
        assert FUSED_ARGUMENTS not in (REPO / script).read_text()


@pytest.mark.parametrize("script", SAME_NETWORKS)
def test_network_section_is_identical(script):
    assert shared_sections(REPO / script)[0] == shared_sections(REPO / "omiga.py")[0]


@pytest.mark.parametrize("script", SAME_RUN_SECTION)
def test_run_section_is_identical(script):
    template = shared_sections(REPO / "bc.py")
    assert len(template) == 2 and shared_sections(REPO / script) == template


def training_loop_changes(script: str) -> list[str]:
    """The lines of `script`'s training loop that differ from omiga.py's."""
    template, mine = (shared_sections(REPO / name)[1].splitlines() for name in ("omiga.py", script))
    return [line for line in difflib.unified_diff(template, mine, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_omcda_training_loop_differs_only_where_it_documents():
    """omcda.py's training loop is omiga.py's plus behaviour cloning, the behaviour actions its minibatches carry,
    the per-agent summary after each evaluation and the decomposition monitor."""
    documented = (r"run\.attach|agent_summary|behaviour|cloning|run\.save\(0\)|run\.close|interruptible|bc_loss|save_model|"
                  r"path\.unlink|else:|monitor|decomposition_warning|run\.log|^\+$|dataset\.sample")
    changed = training_loop_changes("omcda.py")
    assert len(changed) <= 26 and all(re.search(documented, line) for line in changed), changed


def test_comadice_training_loop_is_omigas_with_its_initial_states():
    template, mine = (shared_sections(REPO / script)[1] for script in ("omiga.py", "comadice.py"))
    assert mine == template.replace(
        "dataset.sample(args.batch_size, run.generators), args)",
        "dataset.sample(args.batch_size, run.generators),\n"
        "                              sample_initial_states(dataset, args.batch_size, run.generators), args)")


def test_icq_network_section_is_omigas_without_the_state_value_network():
    template, mine = (shared_sections(REPO / script)[0] for script in ("omiga.py", "icq.py"))
    value_network = template[template.index("class AgentValue("):template.index("class AgentQ(")]
    assert mine == template.replace(value_network, "")


def test_icq_training_loop_is_omigas_with_its_next_action_sampler():
    changed = training_loop_changes("icq.py")
    assert len(changed) <= 5 and all(re.search(r"transitions|dataset\.sample", line) for line in changed), changed


def rules_block(path: Path) -> str:
    """The comment block of rules under the `# ALGO LOGIC` banner."""
    match = re.search(r"^# ALGO LOGIC.*\n((?:# .*\n)+)", path.read_text(), re.M)
    return match.group(1) if match else ""


@pytest.mark.parametrize("script", FUSED)
def test_fused_scripts_state_the_update_rules_as_omiga_does(script):
    assert "# Rules for an update" in rules_block(REPO / "omiga.py")
    assert rules_block(REPO / script) == rules_block(REPO / "omiga.py")
