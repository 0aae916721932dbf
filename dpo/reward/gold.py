"""Gold scorers: a Python function of the user's that judges a completion, named ``module:function``.

A gold scorer is the rule a task is really judged by (is the answer right? does it follow the format?),
where a reward model is only an estimate of it. Training evaluations report its mean over held-out
answers (``eval.gold``), ``dpo-train pairs`` ranks sampled completions by it (``--scorer``), and any later
stage that needs a verifiable score reuses :func:`load_gold`.

The function takes ``(prompt, completion)``: the prompt as the data holds it (a string, or a list of chat
messages ``{"role", "content"}``) and the completion as text (decoded, special tokens and the final EOS
left out); it returns a number (``True``/``False`` count as 1/0). Loading it imports and runs the user's
own code in this process, with this process's rights: name only code you trust.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo.recipe import RecipeError, excerpt


class GoldError(RecipeError):
    """A gold scorer that cannot be loaded or returned something other than a finite number."""


@dataclass(frozen=True)
class Gold:
    """A loaded gold scorer; calling it checks what the user's function returns.

    Attributes:
        name: as configured (``module:function`` or ``file.py:function``).
        function: the user's function.
        what: the option that named it (``eval.gold``, ``--scorer``), for messages.
    """

    name: str
    function: Callable[[Any, str], Any]
    what: str = "eval.gold"

    def __call__(self, prompt: Any, completion: str) -> float:
        """The score of one completion, as a float.

        Raises:
            GoldError: the function raised, or returned something that is not a finite number.
        """
        try:
            value = self.function(prompt, completion)
        except Exception as exc:
            raise GoldError(f"{self.what} ({self.name}) raised {type(exc).__name__}: {exc} (prompt "
                            f"{excerpt(prompt)}, completion {excerpt(completion)})") from exc
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise GoldError(f"{self.what} ({self.name}) returned {excerpt(value)} for prompt {excerpt(prompt)}, "
                            f"completion {excerpt(completion)}; it must return a finite number")
        return float(value)


def _from_file(path: Path, what: str):
    if not path.is_file():
        raise GoldError(f"{what}: {path} is not a file")
    # A name of its own per file, so two scorers called rules.py in different folders do not collide.
    name = f"dpo_gold_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise GoldError(f"{what}: running {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _from_module(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise GoldError(f"{what}: no module named {name!r}; give a file instead (path/to/rules.py:function) "
                            "or put its folder on PYTHONPATH") from None
        raise GoldError(f"{what}: importing {name} failed: {exc}") from exc
    except Exception as exc:
        raise GoldError(f"{what}: importing {name} failed: {type(exc).__name__}: {exc}") from exc


def load_gold(spec: str, what: str = "eval.gold") -> Gold:
    """Import the scorer ``spec`` names: ``package.module:function`` (importable), or
    ``path/to/file.py:function`` (a ``.py`` file, relative to the current folder or absolute).

    Args:
        spec: the scorer's name.
        what: the option that named it, for messages.

    Raises:
        GoldError: not of that form, not importable, or not a callable.
    """
    location, sep, function = spec.rpartition(":")
    if not sep or not location or not function.isidentifier():
        raise GoldError(f"{what}: {excerpt(spec)} is not module:function or path/to/file.py:function")
    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _from_file(Path(location).expanduser(), what)
    else:
        module = _from_module(location, what)
    target = getattr(module, function, None)
    if not callable(target):
        raise GoldError(f"{what}: {location} has no function {function!r}")
    return Gold(spec, target, what)
