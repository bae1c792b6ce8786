"""The mutation check's list (tests/mutants.py) follows the code: every mutant's text occurs exactly once in its
script, and a mutant changes the script."""

import pytest

from conftest import REPO
from mutants import MUTANTS, check_applies


@pytest.mark.parametrize("script", sorted(MUTANTS))
def test_every_mutant_applies_exactly_once_and_changes_its_script(script):
    text = (REPO / f"{script}.py").read_text()
    names = [mutant.name for mutant in MUTANTS[script]]
    assert len(set(names)) == len(names)
    for mutant in MUTANTS[script]:
        check_applies(script, mutant, text)
        assert text.replace(mutant.original, mutant.replacement) != text
