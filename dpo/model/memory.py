"""Peak accelerator memory of one training step, estimated from the model's shape and the recipe.

Every term is arithmetic on sizes that can be checked by hand; nothing is loaded but ``config.json`` (or a
GGUF file's metadata).

* **Weights.** A 4-bit linear weight of ``n`` values is ``n / 2`` bytes of codes plus one scale per 64
  values: a float32 (4 bytes), or with double quantization one byte plus a float32 per 256 scales.
  LLM.int8 is one byte a value plus a float32 scale per output row. Embeddings, norms, biases and the LM
  head stay in the compute dtype.
* **LoRA.** peft keeps adapter weights in float32: ``r * (in + out)`` values per adapted linear, each with
  a float32 gradient and the optimizer's two moments (8 bytes with AdamW; 2 bytes with the 8-bit AdamWs
  for tensors of 4096+ values, plus a float32 scale per 256, and two shared 256-entry code books).
* **Saved activations** (what autograd keeps between the forward and the backward), per token and layer,
  for a Llama-style block with compute dtype ``a`` bytes and a 4- or 8-bit (or frozen) base, whose matmul
  keeps nothing for the backward:

  - each adapted linear keeps its input cast to float32 for ``lora_A``'s gradient: ``4 * in``; a float32
    model keeps one copy per distinct input (o_proj's is the attention output); dropout keeps a dropped-out
    copy per linear and a mask (one byte a value with CUDA's fused dropout; PyTorch's CPU dropout keeps a
    float32 mask instead, which this does not model);
  - each adapted linear keeps ``lora_A``'s output for ``lora_B``'s gradient: ``4 * r``;
  - each RMSNorm keeps its float32 input and one float32 scale: ``4 * H + 4``;
  - attention keeps the query and output (``a * H`` each), key and value (``a * kv_dim`` each, or
    ``a * H`` when padding makes attention expand them), a float32 log-sum-exp per head, and with padding
    an additive mask of ``a * T`` bytes per token;
  - the MLP keeps the gate and up projections and the activation: ``3 * a * I``.

  With gradient checkpointing a layer keeps only its input (``a * H``) and its activations are rebuilt one
  layer at a time in the backward.
* **Outside the layers:** the final norm's input, the log-prob kernel's saved tensors (the completion
  positions' hidden states; with the fused Triton path the float32 ``d logp / d hidden`` instead), the
  rotary tables, and the kernel's chunk workspace (``[chunk, V]`` float32 logits and friends).
* **Backward working set:** the gradient flowing back through one layer (``2 * a * H`` per token), the MLP's
  gradients (a float32 one from the adapter plus three in the compute dtype, per intermediate value), and
  one dequantized weight.

The peak is the larger of the end of the forward and the backward through the last layer, on top of the
persistent memory (weights, adapter, gradients, optimizer states). It does not count the CUDA context
(about 0.5 GiB outside the allocator) or fragmentation, and paged optimizer states live in unified memory
that ``torch.cuda.max_memory_allocated`` does not see.

**Per GPU under an engine** (:func:`estimate_engine`; ``W`` processes, each with its own batch, so the
activations are one process's):

* ``ddp``: the whole model on every GPU, plus DDP's gradient buckets (a second copy of the adapter's gradients).
* ``zero2`` (DeepSpeed ZeRO-2): the whole model; the optimizer states, a float32 copy of the adapter and the
  reduced gradients split ``W`` ways.
* ``fsdp2`` (FSDP2 ``fully_shard``): weights, adapter, gradients and optimizer states split ``W`` ways; gathered
  in full while they run, the current decoder block and the next one (prefetched), and the LM head for the
  whole step (it stays in the root unit: the log-prob kernel reads its whole weight); one block's gradients
  in full until they are reduce-scattered.
* ``fsdp2-offload`` (FSDP2 with ``fsdp_offload_params: true``): the shards live in host memory (the
  optimizer steps there); the GPU holds what is gathered in full, one block's gradients and the activations.
* ``zero3`` (DeepSpeed ZeRO-3): as ``fsdp2``, plus DeepSpeed's float32 partition of the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

GiB = 2**30

# The seven linears of a Llama-style block, grouped by the input they read (one float32 model keeps one
# copy of each group's input for all its adapted linears).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# Architectures whose block is exactly the one the activation terms describe.
EXACT_ARCHITECTURES = ("llama", "mistral", "qwen2")

LORA_BYTES = 4  # peft keeps adapter weights (and so their inputs and outputs) in float32
QUANT_BLOCK = 64  # bitsandbytes 4-bit: values per scale
NESTED_BLOCK = 256  # double quantization: scales per second-level scale
OPTIM_8BIT_BLOCK = 256  # bitsandbytes 8-bit optimizers: values per scale
OPTIM_8BIT_MIN_SIZE = 4096  # smaller tensors keep float32 moments
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on.

    Attributes:
        vocab: V. hidden: H. layers: L. heads: query heads. kv_heads: key/value heads (GQA).
        head_dim: per head. intermediate: I, the MLP width.
        tied_head: the LM head shares the embedding matrix.
        attention_bias: q, k and v projections have biases (Qwen2).
        model_type: the config's ``model_type``; blocks other than :data:`EXACT_ARCHITECTURES` are
            estimated as a Llama block.
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_head: bool = False
    attention_bias: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or a ``config.json`` dict."""
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        if get("text_config") is not None:  # multimodal wrappers keep the language model's sizes here
            return cls.from_config(get("text_config"))
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        model_type = get("model_type") or "llama"
        return cls(
            vocab=get("vocab_size"),
            hidden=hidden,
            layers=get("num_hidden_layers"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            intermediate=get("intermediate_size"),
            tied_head=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)) or model_type == "qwen2",
            model_type=model_type,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """``name -> (in_features, out_features)`` of one layer's linears."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }


@dataclass(frozen=True)
class TrainingPlan:
    """The recipe's choices that decide memory.

    Attributes:
        weight_bits: 4 or 8 for a quantized base; None for one in ``compute_dtype``.
        double_quant: 4-bit scales stored in 8 bits.
        compute_dtype: dtype of unquantized weights and of activations.
        lora_r: adapter rank.
        lora_targets: adapted linears (names from :data:`LINEAR_NAMES`).
        lora_dropout: adapter dropout is on (p > 0).
        optimizer: "adamw", "adamw_8bit" or "paged_adamw_8bit".
        checkpointing: gradient checkpointing.
        logprob_impl: "triton" (fused, frozen head) or "torch" (chunked).
        logprob_chunk: tokens per kernel chunk; None for the kernel's default.
        input_grads: the embedding output requires grad (k-bit preparation or checkpointing).
    """

    weight_bits: int | None
    double_quant: bool
    compute_dtype: str
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: bool
    optimizer: str
    checkpointing: bool
    logprob_impl: str
    logprob_chunk: int | None
    input_grads: bool

    @property
    def compute_bytes(self) -> int:
        return _DTYPE_BYTES[self.compute_dtype]

    @classmethod
    def from_recipe(cls, recipe: Any, device_type: str = "cuda") -> TrainingPlan:
        """The plan of ``recipe`` (a :class:`dpo.recipe.Recipe`) on a ``device_type`` accelerator."""
        model, lora, train = recipe.model, recipe.lora, recipe.train
        quant = model.quantization
        impl = train.logprob_impl
        if impl == "auto":
            impl = "triton" if device_type == "cuda" and _triton_importable() else "torch"
        targets = LINEAR_NAMES if lora.target_modules == "all-linear" else tuple(
            name for name in LINEAR_NAMES if any(name == t or name.endswith(t) for t in lora.target_modules))
        return cls(
            weight_bits=quant.bits if quant else None,
            double_quant=bool(quant and quant.double_quant),
            compute_dtype=quant.compute_dtype if quant else model.dtype,
            lora_r=lora.r,
            lora_targets=targets,
            lora_dropout=lora.dropout > 0,
            optimizer=train.optimizer,
            checkpointing=model.gradient_checkpointing,
            logprob_impl=impl,
            logprob_chunk=train.logprob_chunk_size,
            input_grads=quant is not None or model.gradient_checkpointing,
        )


@dataclass(frozen=True)
class Batch:
    """One collated batch.

    Attributes:
        rows: R sequences (two per pair).
        tokens: T, the padded length of every row.
        completion_tokens: M, labelled tokens over all rows (what the log-prob kernel sees).
        padded: some rows are shorter than T (attention then takes a mask and expands GQA keys/values).
    """

    rows: int
    tokens: int
    completion_tokens: int
    padded: bool = False

    @property
    def positions(self) -> int:
        return self.rows * self.tokens


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each term and the peak (see the module docstring for the arithmetic)."""

    quantized_weights: int
    other_weights: int
    lora_params: int
    lora_grads: int
    optimizer_states: int
    layer_activations: int  # one layer's saved activations for the batch, without checkpointing
    saved_activations: int  # everything kept for the backward at the end of the forward
    logprob_workspace: int
    recompute: int  # one layer's activations rebuilt in the backward (checkpointing), else 0
    backward_working_set: int
    forward_peak: int
    backward_peak: int
    peak: int
    gathered_weights: int = 0  # weights an engine that shards them holds in full during a step
    engine_buffers: int = 0  # the engine's own copies (gradient buckets, float32 partitions)

    @property
    def persistent(self) -> int:
        return (self.quantized_weights + self.other_weights + self.lora_params + self.optimizer_states
                + self.gathered_weights + self.engine_buffers)

    def format(self, batch: Batch, shape: ModelShape, plan: TrainingPlan) -> str:
        """A few aligned lines for the terminal."""
        per_token_layer = self.layer_activations / batch.positions
        checkpoint_per_token = plan.compute_bytes * shape.hidden
        rows = [
            ("quantized weights" if plan.weight_bits else "weights (linears)", self.quantized_weights),
            ("embeddings, norms, head", self.other_weights),
            ("LoRA parameters", self.lora_params),
            ("LoRA gradients", self.lora_grads),
            (f"optimizer states ({plan.optimizer})", self.optimizer_states),
            ("saved activations" + (" (checkpointed)" if plan.checkpointing else ""), self.saved_activations),
            ("recomputed layer" + ("" if plan.checkpointing else " (none)"), self.recompute),
            ("backward working set", self.backward_working_set),
            (f"log-prob chunk ({plan.logprob_impl})", self.logprob_workspace),
        ]
        if self.gathered_weights:
            rows.insert(2, ("gathered in full (head, 2 blocks)", self.gathered_weights))
        if self.engine_buffers:
            rows.insert(5, ("engine buffers", self.engine_buffers))
        lines = [f"  {name:<34}{format_bytes(value)}" for name, value in rows]
        lines += [
            f"  activations per token and layer: {per_token_layer / 1024:.1f} KiB without checkpointing, "
            f"{checkpoint_per_token / 1024:.1f} KiB with",
            f"  {'estimated peak':<34}{format_bytes(self.peak)} "
            f"({'backward' if self.backward_peak >= self.forward_peak else 'end of forward'}; "
            f"batch of {batch.rows} rows x {batch.tokens} tokens)",
        ]
        if shape.model_type not in EXACT_ARCHITECTURES:
            lines.append(f"  note: {shape.model_type} blocks are estimated as Llama blocks")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def format_bytes(value: int) -> str:
    """``12.34 GiB``, or MiB under one GiB, right-aligned."""
    return f"{value / GiB:8.2f} GiB" if value >= GiB else f"{value / 2**20:8.1f} MiB"


# ------------------------------------------------------------------------------------------- weights


def quantized_linear_bytes(n_in: int, n_out: int, bits: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes-quantized linear weight ``[n_out, n_in]`` (bias not included)."""
    n = n_in * n_out
    if bits == 8:
        return n + 4 * n_out  # int8 values, one float32 scale per output row
    blocks = math.ceil(n / QUANT_BLOCK)
    code = 16 * 4  # the 16-entry 4-bit code book
    if double_quant:
        # 8-bit scales, a float32 per 256 of them, and the 256-entry 8-bit code book.
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + code
    return math.ceil(n / 2) + 4 * blocks + code


def weight_bytes(shape: ModelShape, plan: TrainingPlan) -> tuple[int, int]:
    """``(linear weights of the layers, everything else)`` in bytes.

    Everything else: the embedding matrix, the LM head unless tied, ``2 L + 1`` RMSNorm weights and the
    q/k/v biases, all in the compute dtype.
    """
    a = plan.compute_bytes
    linears = 0
    for n_in, n_out in shape.linears().values():
        linears += (quantized_linear_bytes(n_in, n_out, plan.weight_bits, plan.double_quant)
                    if plan.weight_bits else n_in * n_out * a)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_head else 2)
    norms = (2 * shape.layers + 1) * shape.hidden
    biases = shape.layers * (shape.q_dim + 2 * shape.kv_dim) if shape.attention_bias else 0
    return shape.layers * linears, (embeddings + norms + biases) * a


# ---------------------------------------------------------------------------------------------- LoRA


def lora_tensor_sizes(shape: ModelShape, plan: TrainingPlan) -> list[int]:
    """Number of values of every adapter tensor (``lora_A`` is ``[r, in]``, ``lora_B`` ``[out, r]``)."""
    sizes = []
    for name, (n_in, n_out) in shape.linears().items():
        if name in plan.lora_targets:
            sizes += [plan.lora_r * n_in, n_out * plan.lora_r]
    return sizes * shape.layers


def optimizer_state_bytes(shape: ModelShape, plan: TrainingPlan) -> int:
    """Both AdamW moments of every adapter tensor (8-bit: plus one pair of code books, shared by all)."""
    total, any_8bit = 0, False
    for n in lora_tensor_sizes(shape, plan):
        if plan.optimizer == "adamw" or n < OPTIM_8BIT_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK)
            any_8bit = True
    return total + (2 * 256 * 4 if any_8bit else 0)


# ------------------------------------------------------------------------------------------- activations


def layer_activation_bytes(shape: ModelShape, plan: TrainingPlan, batch: Batch) -> int:
    """Bytes one layer keeps for the backward, for the whole batch, without checkpointing."""
    a, h, i = plan.compute_bytes, shape.hidden, shape.intermediate
    linears = shape.linears()
    adapted = [name for name in LINEAR_NAMES if name in plan.lora_targets]
    if plan.lora_dropout:
        # Each adapted linear keeps its own dropped-out float32 input and a one-byte mask.
        lora_inputs = sum((LORA_BYTES + 1) * linears[name][0] for name in adapted)
    elif a == LORA_BYTES:
        # No cast: linears reading the same tensor share the one kept copy, and o_proj's input is the
        # attention output attention already keeps.
        lora_inputs = sum(LORA_BYTES * linears[group[0]][0] for group in _INPUT_GROUPS
                          if group != ("o_proj",) and any(name in adapted for name in group))
    else:
        lora_inputs = sum(LORA_BYTES * linears[name][0] for name in adapted)
    lora_outputs = LORA_BYTES * plan.lora_r * len(adapted)
    norms = 2 * (4 * h + 4)
    kv_kept = shape.q_dim if batch.padded and shape.kv_heads < shape.heads else shape.kv_dim
    attention = a * (2 * shape.q_dim + 2 * kv_kept) + 4 * shape.heads
    mlp = 3 * a * i
    per_position = lora_inputs + lora_outputs + norms + attention + mlp
    mask = a * batch.tokens if batch.padded else 0  # [R, 1, T, T] additive mask, per layer
    return (per_position + mask) * batch.positions


def outside_layer_bytes(shape: ModelShape, plan: TrainingPlan, batch: Batch) -> int:
    """Saved tensors outside the layers: final norm, log-prob kernel, rotary tables, the label mask."""
    a, h, m = plan.compute_bytes, shape.hidden, batch.completion_tokens
    final_norm = (4 * h + 4) * batch.positions
    # The frozen head's float32 d logp / d hidden [M, H] (both implementations form it in the forward), plus
    # targets, positions and per-token float32 scalars: 44 bytes a token for Triton (it also keeps the
    # log-sum-exps and target log-probs), 32 for the PyTorch path.
    kernel = 4 * m * h + (44 if plan.logprob_impl == "triton" else 32) * m
    rotary = 2 * batch.tokens * shape.head_dim * a
    label_mask = batch.rows * (batch.tokens - 1)
    # Checkpointed layers keep their inputs, the boolean [R, 1, T, T] attention mask among them.
    attention_mask = batch.rows * batch.tokens**2 if batch.padded and plan.checkpointing else 0
    return final_norm + kernel + rotary + label_mask + attention_mask


def logprob_chunk(shape: ModelShape, plan: TrainingPlan, batch: Batch) -> int:
    """Tokens per log-prob kernel chunk (the kernels' own default unless the recipe sets one)."""
    if plan.logprob_chunk is not None:
        chunk = plan.logprob_chunk
    elif plan.logprob_impl == "triton":
        from dpo.kernels.triton_logprobs import TRITON_WORKSPACE_BYTES

        rows = max(1, TRITON_WORKSPACE_BYTES // (shape.vocab * (4 + (0 if plan.compute_bytes == 4
                                                                     else plan.compute_bytes))))
        chunk = rows // 64 * 64 if rows >= 128 else rows
    else:
        from dpo.kernels import TORCH_BYTES_PER_LOGIT, TORCH_WORKSPACE_BYTES

        chunk = max(1, TORCH_WORKSPACE_BYTES // (shape.vocab * TORCH_BYTES_PER_LOGIT))
    return max(1, min(chunk, batch.completion_tokens))


def logprob_workspace_bytes(shape: ModelShape, plan: TrainingPlan, batch: Batch) -> int:
    """One kernel chunk's temporaries, plus the gathered completion hidden states."""
    chunk = logprob_chunk(shape, plan, batch)
    gathered = plan.compute_bytes * batch.completion_tokens * shape.hidden
    if plan.logprob_impl == "triton":
        grad_block = 0 if plan.compute_bytes == 4 else plan.compute_bytes
        return chunk * shape.vocab * (4 + grad_block) + 4 * chunk * shape.hidden + gathered
    from dpo.kernels import TORCH_BYTES_PER_LOGIT

    return chunk * shape.vocab * TORCH_BYTES_PER_LOGIT + gathered


def backward_working_set_bytes(shape: ModelShape, plan: TrainingPlan, batch: Batch) -> int:
    """Gradients alive at once inside one layer's backward, plus one dequantized weight."""
    a = plan.compute_bytes
    per_position = 2 * a * shape.hidden + (LORA_BYTES + 3 * a) * shape.intermediate
    dequantized = max(n_in * n_out for n_in, n_out in shape.linears().values()) * a if plan.weight_bits else 0
    return per_position * batch.positions + dequantized


# ------------------------------------------------------------------------------------------- the peak


def estimate_step(shape: ModelShape, plan: TrainingPlan, batch: Batch) -> MemoryEstimate:
    """Peak memory of one training step (forward, backward, optimizer step) on ``batch``.

    Args:
        shape: the base model's sizes.
        plan: the recipe's memory-relevant choices.
        batch: the batch (for a recipe, its longest).

    Returns:
        Every term in bytes and the peak.
    """
    quantized, other = weight_bytes(shape, plan)
    lora_values = sum(lora_tensor_sizes(shape, plan))
    lora_params = lora_grads = LORA_BYTES * lora_values
    states = optimizer_state_bytes(shape, plan)
    layer = layer_activation_bytes(shape, plan, batch)
    outside = outside_layer_bytes(shape, plan, batch)
    if plan.checkpointing:
        saved = shape.layers * plan.compute_bytes * shape.hidden * batch.positions + outside
        recompute = layer
    else:
        saved = shape.layers * layer + outside
        recompute = 0
    if not plan.input_grads and not plan.checkpointing:
        saved -= (4 * shape.hidden + 4) * batch.positions  # the first norm keeps nothing
    workspace = logprob_workspace_bytes(shape, plan, batch)
    working = backward_working_set_bytes(shape, plan, batch)
    persistent = quantized + other + lora_params + states
    forward_peak = persistent + saved + workspace
    # The log-prob kernels formed d logp / d hidden in the forward (frozen head): their backward is a scale.
    backward_peak = persistent + lora_grads + saved + recompute + working
    return MemoryEstimate(
        quantized_weights=quantized, other_weights=other, lora_params=lora_params, lora_grads=lora_grads,
        optimizer_states=states, layer_activations=layer, saved_activations=saved, logprob_workspace=workspace,
        recompute=recompute, backward_working_set=working, forward_peak=forward_peak,
        backward_peak=backward_peak, peak=max(forward_peak, backward_peak),
    )


# Engines the memory plan knows (``--engine``), and what each shards.
ENGINES = ("single", "ddp", "zero2", "fsdp2", "fsdp2-offload", "zero3")
ENGINE_NAMES = {"single": "one process", "ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "fsdp2": "FSDP2",
                "fsdp2-offload": "FSDP2 with the shards in host memory", "zero3": "DeepSpeed ZeRO-3"}
SHARDING_ENGINES = ("fsdp2", "fsdp2-offload", "zero3")


def _gathered(shape: ModelShape, plan: TrainingPlan, quantized: int, lora: int) -> int:
    """What an engine that shards weights holds in full during a step: the LM head (the root unit's), the
    running decoder block and the prefetched next one (their weights and adapters)."""
    return shape.vocab * shape.hidden * plan.compute_bytes + 2 * ((quantized + lora) // shape.layers)


def estimate_engine(shape: ModelShape, plan: TrainingPlan, batch: Batch, engine: str = "single",
                    processes: int = 1) -> MemoryEstimate:
    """Peak memory of one GPU in a training step under ``engine`` with ``processes`` processes, each running
    ``batch`` (see the module docstring).

    Raises:
        ValueError: an engine not in :data:`ENGINES`.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
    step = estimate_step(shape, plan, batch)
    if engine == "single":
        return step
    w = max(1, processes)
    quantized, other, lora, grads, states = (step.quantized_weights, step.other_weights, step.lora_params,
                                             step.lora_grads, step.optimizer_states)
    gathered = buffers = 0
    if engine == "ddp":
        buffers = grads  # the gradient buckets DDP reduces, a second copy of the adapter's gradients
    elif engine == "zero2":
        states = math.ceil(states / w)
        buffers = math.ceil(lora / w) + math.ceil(grads / w)  # float32 partition, reduced gradient partition
    else:
        gathered = _gathered(shape, plan, quantized, lora)
        quantized, other, lora, states = (math.ceil(x / w) for x in (quantized, other, lora, states))
        grads = math.ceil(grads / w) + step.lora_grads // shape.layers  # one block's, before reduce-scatter
        if engine == "zero3":
            buffers = lora  # DeepSpeed's float32 partition of the adapter
        if engine == "fsdp2-offload":  # the shards, their gradients and the optimizer live in host memory
            quantized = other = lora = states = 0
            grads = step.lora_grads // shape.layers
    persistent = quantized + other + lora + states + gathered + buffers
    forward_peak = persistent + step.saved_activations + step.logprob_workspace
    backward_peak = persistent + grads + step.saved_activations + step.recompute + step.backward_working_set
    return replace(step, quantized_weights=quantized, other_weights=other, lora_params=lora, lora_grads=grads,
                   optimizer_states=states, gathered_weights=gathered, engine_buffers=buffers,
                   forward_peak=forward_peak, backward_peak=backward_peak, peak=max(forward_peak, backward_peak))


def estimate_no_grad_pass(shape: ModelShape, plan: TrainingPlan, batch: Batch, engine: str = "single",
                          processes: int = 1) -> int:
    """Peak of a forward without gradients (reference precompute, evaluation) on ``batch``.

    Weights, plus one layer's live tensors (residual, normed input, q/k/v and output, the MLP's four
    intermediate tensors, a float32 adapter input) and the kernel's logits chunk. Under an engine that shards
    the weights, each GPU's share of them and what is gathered in full (see :func:`estimate_engine`).
    """
    a = plan.compute_bytes
    quantized, other = weight_bytes(shape, plan)
    lora = LORA_BYTES * sum(lora_tensor_sizes(shape, plan))
    if engine in SHARDING_ENGINES:
        gathered = _gathered(shape, plan, quantized, lora)
        if engine == "fsdp2-offload":  # the shards live in host memory
            quantized = other = 0
            lora = gathered
        else:
            w = max(1, processes)
            quantized, other, lora = math.ceil(quantized / w), math.ceil(other / w), math.ceil(lora / w) + gathered
    per_position = (a * (4 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate)
                    + LORA_BYTES * shape.intermediate)
    mask = a * batch.tokens * batch.positions if batch.padded else 0
    chunk = logprob_chunk(shape, plan, batch)
    return quantized + other + lora + per_position * batch.positions + mask + 4 * chunk * shape.vocab


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ for a recipe


_SIDES = (("chosen_ids", "rejected_ids"), ("completion_ids", "kl_completion_ids"))


def longest_batch(rows: Any, batch_size: int) -> Batch:
    """The batch of the ``batch_size`` longest examples of ``rows`` (tokenized, paired or unpaired).

    Each example gives two rows, prompt + first side and prompt + second side, padded to the longest.
    """
    columns = set(rows.column_names) if hasattr(rows, "column_names") else set(rows[0]) if len(rows) else set()
    first, second = next((pair for pair in _SIDES if pair[0] in columns), _SIDES[0])
    prompts, firsts, seconds = ([len(ids) for ids in _column(rows, name)]
                                for name in ("prompt_ids", first, second)) if columns else ([], [], [])
    order = sorted(range(len(prompts)), key=lambda k: prompts[k] + max(firsts[k], seconds[k]), reverse=True)
    chosen = order[:batch_size]
    if not chosen:
        return Batch(rows=0, tokens=0, completion_tokens=0)
    lengths = [prompts[k] + firsts[k] for k in chosen] + [prompts[k] + seconds[k] for k in chosen]
    tokens = max(lengths)
    completions = sum(firsts[k] + seconds[k] for k in chosen)
    return Batch(rows=2 * len(chosen), tokens=tokens, completion_tokens=completions,
                 padded=any(length != tokens for length in lengths))


def _column(rows: Any, name: str) -> list:
    return rows[name] if hasattr(rows, "column_names") else [row[name] for row in rows]


def device_memory_bytes() -> int | None:
    """Total memory of CUDA device 0, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def memory_report(recipe: Any, train_rows: Any, device_bytes: int | None = None, engine: str = "single",
                  processes: int = 1) -> tuple[str, bool]:
    """The ``--dry-run`` memory section for ``recipe`` and its tokenized training rows.

    Args:
        recipe: a :class:`dpo.recipe.Recipe`.
        train_rows: its tokenized training examples.
        device_bytes: the accelerator's memory; None to detect it.
        engine: the engine of a multi-process run (:data:`ENGINES`); the estimate is per GPU.
        processes: how many processes (GPUs) the run has.

    Returns:
        ``(text, fits)``: ``fits`` is False when the estimate exceeds ``model.max_memory_gb`` (or else the
        detected device memory).
    """
    from transformers import AutoConfig

    gguf = {"gguf_file": recipe.model.gguf_file} if recipe.model.gguf_file else {}
    config = AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code, **gguf)
    shape = ModelShape.from_config(config)
    plan = TrainingPlan.from_recipe(recipe)
    batch = longest_batch(train_rows, recipe.train.batch_size)
    if batch.rows == 0:
        return "# memory\n  no training examples to size a batch from", True
    estimate = estimate_engine(shape, plan, batch, engine, processes)
    no_grad_batch = longest_batch(train_rows, recipe.reference.batch_size)
    no_grad = estimate_no_grad_pass(shape, plan, no_grad_batch, engine, processes)
    where = "on a CUDA device" if engine == "single" else f"per GPU, {ENGINE_NAMES[engine]} over {processes} GPUs"
    lines = [f"# memory (estimated peak {where}, {plan.weight_bits or plan.compute_dtype}"
             f"{'-bit' if plan.weight_bits else ''} base, LoRA r={plan.lora_r})",
             estimate.format(batch, shape, plan),
             f"  {'reference / eval pass (no grad)':<34}{format_bytes(no_grad)} "
             f"(reference.batch_size {recipe.reference.batch_size} pairs)"]
    budget, source = memory_budget(recipe, device_bytes)
    if budget is None:
        lines.append("  no CUDA device detected: set model.max_memory_gb to check the estimate against your card")
        return "\n".join(lines), True
    worst = max(estimate.peak, no_grad)
    fits = worst <= budget
    if fits:
        lines.append(f"  fits: {format_bytes(worst).strip()} of {format_bytes(budget).strip()} ({source})")
    else:
        lines.append(f"warning: the estimated peak {format_bytes(worst).strip()} exceeds {format_bytes(budget).strip()} "
                     f"({source}); "
                     + _advice(recipe, plan, estimate, no_grad, engine, processes))
    return "\n".join(lines), fits


def memory_budget(recipe: Any, device_bytes: int | None = None) -> tuple[int | None, str]:
    """The accelerator memory a dry run checks its estimate against, and where that figure comes from:
    ``model.max_memory_gb`` if set, else ``device_bytes`` (None: the detected CUDA device's), else (None, "")."""
    if recipe.model.max_memory_gb is not None:
        return int(recipe.model.max_memory_gb * GiB), "model.max_memory_gb"
    device_bytes = device_memory_bytes() if device_bytes is None else device_bytes
    if device_bytes is not None:
        return device_bytes, "the detected device"
    return None, ""


def _advice(recipe: Any, plan: TrainingPlan, estimate: MemoryEstimate, no_grad: int, engine: str = "single",
            processes: int = 1) -> str:
    if no_grad > estimate.peak:
        return "lower reference.batch_size (the no-grad passes are the largest)"
    options = []
    if not plan.checkpointing:
        options.append("model.gradient_checkpointing: true")
    if plan.weight_bits is None:
        options.append("model.quantization: {bits: 4}")
    if plan.optimizer == "adamw" and engine in ("single", "ddp"):
        options.append("train.optimizer: adamw_8bit")
    if engine in SHARDING_ENGINES:
        options.append(f"more GPUs (--processes {2 * processes})")
    elif estimate.quantized_weights + estimate.other_weights > estimate.peak // 2:
        options.append("sharding the weights over several GPUs (--engine fsdp2 --processes N; "
                       "recipes/accelerate/fsdp2.yaml)")
    options.append(f"a smaller train.batch_size (now {recipe.train.batch_size}) with more train.grad_accum")
    options.append(f"a shorter data.max_length (now {recipe.data.max_length})")
    return "try " + ", ".join(options)
