"""What the algorithm scripts share, kept identical so that `diff omiga.py <script>` shows only the algorithm: the
common arguments, the agent networks, and (for the scripts written as diffs of omiga.py) the run section."""

import difflib
import re
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = ["omcda.py", "icq.py", "comadice.py", "bc.py", "cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
# omcda.py (behaviour cloning, per-agent summary), icq.py (next-action sampler) and comadice.py (initial states)
# change the run section in documented places; icq.py has no state-value network. omiga.py's and omcda.py's run
# sections fuse seeds and compile the update; the single-seed scripts share theirs with bc.py.
SAME_RUN_SECTION = ["cql_ma.py", "cfcql.py", "omar.py", "bcq_ma.py"]
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


# The scripts without a discrete-action branch yet stop on SMAX maps before building the env, and do not tell their
# networks the action type.
CONTINUOUS_ONLY = re.compile(r"        if args.env in SMAX_MAPS:\n            raise EnvConfigError\(.*?\)\n", re.S)


@pytest.mark.parametrize("script", SAME_RUN_SECTION)
def test_run_section_is_identical(script):
    mine, template = shared_sections(REPO / script), shared_sections(REPO / "bc.py")
    assert len(template) == 2
    if CONTINUOUS_ONLY.search(mine[1]):
        assert [mine[0], CONTINUOUS_ONLY.sub("", mine[1])] == [template[0], template[1].replace(", env.discrete)", ")")]
    else:
        assert mine == template


def test_fused_seed_run_sections_differ_only_where_omcda_documents():
    """omcda.py's run section is omiga.py's plus its argument rules, behaviour cloning, the behaviour noise its
    minibatches carry, per-agent summary and the decomposition monitor."""
    template, mine = (shared_sections(REPO / script)[1].splitlines() for script in ("omiga.py", "omcda.py"))
    changed = [line for line in difflib.unified_diff(template, mine, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    documented = (r"check_args|POSITIVE|alpha_|behaviour|bc_loss|agent_summary|if checkpoint|else:|eval return|"
                  r"monitor|decomposition_warning|common\.cli|exit_on_user_error|cloning|writer|update-0|path\.unlink|^\+$|"
                  r"dataset\.sample")
    assert len(changed) <= 30 and all(re.search(documented, line) for line in changed), changed


def test_comadice_run_section_is_omigas_with_its_initial_states():
    template, mine = (shared_sections(REPO / script)[1] for script in ("omiga.py", "comadice.py"))
    assert mine == template.replace(
        "dataset.sample(args.batch_size, generators), args)",
        "dataset.sample(args.batch_size, generators),\n"
        "                              sample_initial_states(dataset, args.batch_size, generators), args)")


def test_icq_network_section_is_omigas_without_the_state_value_network():
    template, mine = (shared_sections(REPO / script)[0] for script in ("omiga.py", "icq.py"))
    value_network = template[template.index("class AgentValue("):template.index("class AgentQ(")]
    assert mine == template.replace(value_network, "")


def test_icq_run_section_is_omigas_with_its_next_action_sampler():
    template, mine = (shared_sections(REPO / script)[1].splitlines() for script in ("omiga.py", "icq.py"))
    changed = [line for line in difflib.unified_diff(template, mine, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    documented = (r"from common\.cli|POSITIVE|beta|check_args\(args\)|transitions|dataset\.sample|on \{device\}|"
                  r"print\(f\"\{run_dirs\[0\]\}")
    assert len(changed) <= 10 and all(re.search(documented, line) for line in changed), changed
