"""The pairs stage: preference data from a model's own samples (``dpo-train pairs``), for iterative DPO.

Takes a model (a recipe's base, a finished run, an adapter, a model folder or a GGUF file), a prompt file
and a scorer (a gold ``module:function`` or a reward-model run). Samples through :mod:`dpo.model`, reads
prompts as :mod:`dpo.compare` does, scores through :mod:`dpo.reward`, and hands on a JSON-lines file of
best-against-worst pairs that ``dpo-train`` trains on (:mod:`dpo.pairs.build`).
"""

from dpo.pairs.build import (
    PairSettings,
    PairsReport,
    build_pairs,
    choose_pair,
    load_sampler,
    load_scorer,
    pairs_command,
)

__all__ = ["PairSettings", "PairsReport", "build_pairs", "choose_pair", "load_sampler", "load_scorer", "pairs_command"]
