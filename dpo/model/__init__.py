"""The model stage: the network that is trained, and what can be done with it.

Takes the recipe's ``model`` and ``lora`` sections (and token ids). Hands on the policy (a causal LM with a
fresh LoRA adapter, :func:`add_lora` on :func:`load_base_model`), its per-sequence log-probs through the
fused kernels (:class:`SequenceLogprobs`, the module whose forward the training step, evaluation and the
reference precompute call, on padded or packed prefix-shared batches: :mod:`dpo.model.packing`), the memory plan of a recipe (:mod:`dpo.model.memory`), merging an adapter
into its base (:mod:`dpo.model.merge`) and sampling completions (:mod:`dpo.model.generate`).
"""

from dpo.model.generate import (
    Samples,
    SamplingSettings,
    completion_text,
    encode_prompt,
    sample_completions,
)
from dpo.model.load import (
    ModelError,
    add_lora,
    causal_lm,
    check_gguf,
    check_head,
    enable_checkpointing,
    from_pretrained_kwargs,
    gguf_kwargs,
    is_quantized,
    keep_4bit_layout_trainable,
    load_base_model,
    load_tokenizer,
    model_location,
    quantization_config,
    torch_dtype,
)
from dpo.model.logprobs import (
    LogprobSettings,
    SequenceLogprobs,
    final_logit_softcap,
    packed_sequence_logprobs,
    sequence_logprobs,
    trunk,
)
from dpo.model.memory import memory_report
from dpo.model.merge import MergeError, MergeReport, merge_run
from dpo.model.packing import PackedAttention, plan_packing, resolve_packing

__all__ = [
    "LogprobSettings",
    "MergeError",
    "MergeReport",
    "ModelError",
    "PackedAttention",
    "Samples",
    "SamplingSettings",
    "SequenceLogprobs",
    "add_lora",
    "causal_lm",
    "check_gguf",
    "check_head",
    "completion_text",
    "enable_checkpointing",
    "encode_prompt",
    "final_logit_softcap",
    "from_pretrained_kwargs",
    "gguf_kwargs",
    "is_quantized",
    "keep_4bit_layout_trainable",
    "load_base_model",
    "load_tokenizer",
    "memory_report",
    "merge_run",
    "packed_sequence_logprobs",
    "plan_packing",
    "model_location",
    "quantization_config",
    "resolve_packing",
    "sample_completions",
    "sequence_logprobs",
    "torch_dtype",
    "trunk",
]
