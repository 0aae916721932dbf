"""Gold scorers: ``module:function`` and ``file.py:function`` loaded, their results checked, errors named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpo.reward import GoldError, load_gold


def test_the_quickstart_rule_loads_by_module_name_and_scores_answers():
    gold = load_gold("dpo.quickstart:gold")
    assert gold("Parity of 347:", " odd") == 1.0
    assert gold("Parity of 347:", " even") == 0.0
    assert gold("Mod 5 of 347:", "2") == 1.0
    assert gold("Last digit of 347:", " 7 and more") == 0.0


def test_a_file_scorer_loads_by_path_and_its_values_become_floats(tmp_path, monkeypatch):
    rules = tmp_path / "rules" / "rules.py"
    rules.parent.mkdir()
    rules.write_text(
        "import numpy as np\n"
        "def short(prompt, completion):\n    return len(completion) < 5\n"
        "def numpy_value(prompt, completion):\n    return np.float32(0.25)\n"
        "def words(prompt, completion):\n    return len(completion.split())\n"
        "NOT_A_FUNCTION = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_gold("rules/rules.py:short")("p", "abc") == 1.0  # True counts as 1
    assert load_gold(f"{rules}:numpy_value")("p", "x") == 0.25
    assert load_gold("rules/rules.py:words")([{"role": "user", "content": "hi"}], "a b c") == 3.0
    with pytest.raises(GoldError, match="has no function 'NOT_A_FUNCTION'"):
        load_gold("rules/rules.py:NOT_A_FUNCTION")
    with pytest.raises(GoldError, match="has no function 'absent'"):
        load_gold("rules/rules.py:absent")


@pytest.mark.parametrize(("returned", "shown"), [("'yes'", "'yes'"), ("float('nan')", "nan"), ("None", "None"),
                                                 ("[1.0]", r"\[1.0\]")])
def test_a_scorer_that_returns_no_finite_number_is_named(tmp_path, returned, shown):
    (tmp_path / "bad.py").write_text(f"def score(prompt, completion):\n    return {returned}\n")
    gold = load_gold(f"{tmp_path / 'bad.py'}:score", what="--scorer")
    with pytest.raises(GoldError, match=rf"--scorer \(.*bad.py:score\) returned {shown} for prompt 'Q', completion "
                                        r"'A'; it must return a finite number"):
        gold("Q", "A")


def test_a_scorer_that_raises_is_named_with_its_error_and_input(tmp_path):
    (tmp_path / "raises.py").write_text("def score(prompt, completion):\n    raise KeyError('answer')\n")
    gold = load_gold(f"{tmp_path / 'raises.py'}:score")
    with pytest.raises(GoldError, match=r"eval.gold \(.*\) raised KeyError: 'answer' \(prompt 'Q', completion 'A'\)"):
        gold("Q", "A")


def test_loading_errors_say_what_to_do(tmp_path):
    with pytest.raises(GoldError, match="no module named 'no_such_rules'; give a file instead .* PYTHONPATH"):
        load_gold("no_such_rules:score")
    with pytest.raises(GoldError, match="is not a file"):
        load_gold(f"{tmp_path / 'absent.py'}:score")
    (tmp_path / "broken.py").write_text("import no_such_dependency_anywhere\n")
    with pytest.raises(GoldError, match="running .*broken.py failed: ModuleNotFoundError"):
        load_gold(f"{tmp_path / 'broken.py'}:score")
    with pytest.raises(GoldError, match="is not module:function"):
        load_gold("dpo.quickstart")
    assert math.isfinite(load_gold("dpo.quickstart:gold")("Parity of 2:", "even"))
    assert np.isscalar(load_gold("dpo.quickstart:gold")("Parity of 2:", "even"))
