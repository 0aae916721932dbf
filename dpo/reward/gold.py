"""A gold scorer: a Python function ``module:function`` taking (prompt, completion) and returning a float.

The gold reward is the yardstick the reward model (the proxy) stands in for: a rule, a test suite, a
stronger judge. Online training logs it beside the proxy and the compare report shows both against the
KL, so reward hacking (the proxy rising while the gold reward does not) is visible. Loading one imports
the named module, which runs its code: name only code you trust.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

GoldScorer = Callable[[object, str], float]


class GoldScorerError(ValueError):
    """A gold scorer that cannot be loaded; the message names the spec and what to do."""


def load_gold_scorer(spec: str) -> Callable[[str, str], float]:
    """The function ``spec`` (``package.module:function``) names, e.g. ``dpo.quickstart:gold``.

    It is called as ``function(prompt, completion)``: the prompt as the data holds it (text, or a list of
    ``{role, content}`` messages), the completion as decoded text without its EOS; it returns a float.

    Raises:
        GoldScorerError: the spec is malformed, the module cannot be imported, or it has no such callable.
    """
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name or ":" in function_name:
        raise GoldScorerError(f"gold scorer {spec!r}: expected module:function, e.g. dpo.quickstart:gold")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GoldScorerError(f"gold scorer {spec!r}: cannot import {module_name} ({exc}); it must be importable "
                              "from where dpo-train runs (installed, or on PYTHONPATH)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise GoldScorerError(f"gold scorer {spec!r}: {module_name} has no function {function_name}")
    return function


def gold_scores(scorer: Callable[[str, str], float], prompts: list, completions: list[str], spec: str) -> list[float]:
    """``scorer`` on each (prompt, completion), as floats; a value that is not a number is an error naming
    the spec and the sample."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        value = scorer(prompt, completion)
        try:
            scores.append(float(value))
        except (TypeError, ValueError):
            raise GoldScorerError(f"gold scorer {spec!r} returned {value!r} for the prompt {str(prompt)[:60]!r}; "
                                  "it must return a number") from None
    return scores
