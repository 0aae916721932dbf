"""Imports flow one way: a module of ``dpo/`` imports only its own stage and the stages upstream of it.

Every import statement counts, wherever it is: at module level, inside a function or class (a lazy import),
under ``if TYPE_CHECKING``, and relative ones. See ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpo"

# The stages in the code's import order, upstream first: a module may import its own stage and the stages
# before it. dpo.files and dpo.quickstart, first, import nothing else from dpo; dpo.cli, last, is imported by
# nothing.
ORDER = ("files", "quickstart", "recipe", "data", "kernels", "model", "losses", "reference", "reward", "online", "train",
         "compare", "pairs", "cli")


def module_name(path: Path) -> str:
    """``dpo/model/load.py`` -> ``dpo.model.load``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str | None:
    """The stage a ``dpo`` module belongs to (``dpo.model.load`` -> ``model``); None outside ``dpo``'s stages."""
    parts = module.split(".")
    return parts[1] if parts[0] == "dpo" and len(parts) > 1 else None


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` for every module an import statement anywhere in ``source`` names.

    ``from X import y`` names X, and also ``X.y`` when X is ``dpo`` itself (``from dpo import cli``); relative
    imports are resolved against ``module`` (a package's own name for its ``__init__``).
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            if target == "dpo":
                found += [(node.lineno, f"dpo.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every import in ``source`` (the code of ``module``) of a stage downstream of ``module``'s stage."""
    own = ORDER.index(stage_of(module))
    problems = []
    for line, target in imported_modules(source, module, is_package):
        stage = stage_of(target)
        if stage is None:
            continue
        if stage not in ORDER:
            problems.append(f"{module}, line {line}: imports {target}, which belongs to no stage")
        elif ORDER.index(stage) > own:
            problems.append(f"{module}, line {line}: imports {target}; stage {stage} is downstream of "
                            f"{ORDER[own]} ({' -> '.join(ORDER)})")
    return problems


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py")


def test_every_module_of_dpo_belongs_to_a_stage_and_every_stage_exists():
    stages = {stage_of(module_name(path)) for path in modules()}
    assert stages == set(ORDER), "stages in dpo/ and in ORDER differ; add a new stage to ORDER in its place"


def test_every_module_imports_only_its_own_stage_and_stages_upstream_of_it():
    problems = []
    for path in modules():
        problems += violations(module_name(path), path.read_text(encoding="utf-8"), path.name == "__init__.py")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(("module", "source", "is_package", "downstream"), [
    ("dpo.model.load", "import torch\nimport dpo.kernels\nfrom dpo.data import collate_paired", False, []),
    ("dpo.model.load", "import dpo.train.loop", False, ["dpo.train.loop"]),
    ("dpo.model.load", "import dpo.train.loop as loop", False, ["dpo.train.loop"]),
    ("dpo.model.load", "from dpo.train import train", False, ["dpo.train"]),
    ("dpo.model.load", "from dpo import cli, recipe", False, ["dpo.cli"]),
    ("dpo.model.load", "def f():\n    from dpo.reference.setup import reference_keys\n", False, ["dpo.reference.setup"]),
    ("dpo.model.load", "class A:\n    def f(self):\n        import dpo.compare\n", False, ["dpo.compare"]),
    ("dpo.model.load", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dpo.reward import RewardRun\n",
     False, ["dpo.reward"]),
    ("dpo.model.load", "from . import logprobs\nfrom .logprobs import trunk", False, []),
    ("dpo.model.load", "from ..train import loop", False, ["dpo.train"]),
    ("dpo.model.load", "from .. import losses", False, ["dpo.losses"]),
    ("dpo.model.load", "def f():\n    from ..reward.model import HEAD\n", False, ["dpo.reward.model"]),
    ("dpo.model", "from .load import add_lora\nfrom ..kernels import token_logprobs", True, []),
    ("dpo.model", "from ..train.loop import train", True, ["dpo.train.loop"]),
    ("dpo.kernels.triton_logprobs", "from .torch_logprobs import float32_matmul", False, []),
    ("dpo.quickstart", "from dpo.recipe import Recipe", False, ["dpo.recipe"]),
    ("dpo.files", "from dpo.quickstart import build_tokenizer", False, ["dpo.quickstart"]),
    ("dpo.compare.run", "def main():\n    from dpo.cli import main\n", False, ["dpo.cli"]),
    ("dpo.cli", "def f():\n    from dpo.compare import run_compare\n    from dpo.train import train\n", False, []),
])
def test_the_check_sees_every_kind_of_import(module, source, is_package, downstream):
    problems = violations(module, source, is_package)
    assert [p.split(": imports ")[1].split(";")[0] for p in problems] == downstream
