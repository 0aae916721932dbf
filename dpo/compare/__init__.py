"""The compare stage: any set of policies side by side on the same prompts, judged by one reward model.

Takes a compare file (:mod:`dpo.compare.config`): models, a reference, a trained reward model, prompts and
optional held-out pairs. Samples every model, scores the samples, measures drift, length and diversity
(:mod:`dpo.compare.metrics`) and hands on ``report.json``, ``report.md``, samples and plots
(:mod:`dpo.compare.report`); :func:`run_compare` does it all (``dpo-train compare``).
"""

from dpo.compare.config import CompareConfig, CompareError, PromptSet, load_compare_config
from dpo.compare.run import read_prompts, run_compare

__all__ = ["CompareConfig", "CompareError", "PromptSet", "load_compare_config", "read_prompts", "run_compare"]
