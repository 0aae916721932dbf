"""Loading the model: the base causal LM (full precision or 4/8-bit), its tokenizer, and a fresh LoRA adapter.

The policy is the base with a LoRA adapter (:func:`add_lora`); the reference model is the same network
with the adapter disabled (or, when the recipe names one, a separate model used only while the reference
log-probs are computed). Heads the fused log-prob kernels would get wrong are refused here
(:func:`check_head`); the log-probs themselves are :mod:`dpo.model.logprobs`'s business.

A GGUF checkpoint (``model.gguf_file``, a file in ``model.path``'s folder) is read by transformers:
config, tokenizer (with its chat template) and weights, dequantized to ``model.dtype`` into an ordinary
dense model, which trains, merges and saves like any other. It needs the optional ``gguf`` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from dpo.recipe import LoraConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model this tool cannot train correctly; the message says why and what to do."""


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def check_gguf(config: ModelConfig, what: str = "model.gguf_file") -> None:
    """Refuse, before anything slow, a GGUF checkpoint that cannot be read: the ``gguf`` package is missing,
    or the file is not in the model folder (the message lists the GGUF files that are).

    Args:
        config: a model section; nothing is checked without ``gguf_file``.
        what: the recipe key naming the file, for messages.
    """
    if config.gguf_file is None:
        return
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{what}: reading a GGUF checkpoint needs the gguf package: pip install 'dpo-train[gguf]'")
    folder = Path(config.path).expanduser()
    if folder.is_dir() and not (folder / config.gguf_file).is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        listing = f"the GGUF files there: {', '.join(present)}" if present else "it holds no .gguf file"
        raise ModelError(f"{what}: {config.gguf_file} is not a file in {folder} ({listing})")


def gguf_kwargs(config: ModelConfig) -> dict:
    """``from_pretrained`` arguments that read ``config.gguf_file`` into a dense model ({} without one).

    Recent transformers can keep a GGUF's weights packed and compute through kernels; LoRA and the merge
    need plain weights, and a packed model cannot be saved, so dequantizing is asked for explicitly.
    """
    if config.gguf_file is None:
        return {}
    kwargs = {"gguf_file": config.gguf_file}
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantize
        return kwargs
    return {**kwargs, "quantization_config": GgufConfig(dequantize=True)}


def model_location(text: str) -> tuple[str, str | None]:
    """A model named on the command line: a folder or hub id (``(text, None)``) or a ``.gguf`` file (``(its
    folder, its name)``)."""
    path = Path(text).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    return text, None


def load_tokenizer(config: ModelConfig, path: str | None = None, key: str = "model.path"):
    """Load the model's tokenizer (from ``path`` instead, e.g. a saved adapter's folder; else from the model,
    or its GGUF file); a missing pad token falls back to EOS (padding is always masked).

    Raises:
        ModelError: it does not load; the message names ``key`` (the recipe key of the path), the path and
            what to do.
    """
    from transformers import AutoTokenizer

    if path is None:
        check_gguf(config)
    source = path or config.path
    gguf = {"gguf_file": config.gguf_file} if path is None and config.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code, **gguf)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        todo = ("the folder needs the tokenizer's files (tokenizer.json or tokenizer.model, tokenizer_config.json)"
                if Path(source).is_dir() else
                f"set {key} to a local Hugging Face model folder: --set {key}=/path/to/model")
        named = f" (gguf_file {config.gguf_file})" if gguf else ""
        raise ModelError(f"{key}: cannot load the tokenizer from {source}{named} ({first}); {todo}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"{config.path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{config.path}: the tokenizer has no EOS token; completions must end with one")
    return tokenizer


def quantization_config(config: ModelConfig, shardable: bool = False):
    """A ``BitsAndBytesConfig`` for ``model.quantization``, or None for a full-precision base.

    No skip list is given, so transformers keeps its default: the output embeddings (the LM head, whatever
    the architecture calls it) and tied weights stay unquantized; :func:`load_base_model` checks that.

    With ``shardable`` (the base will be sharded by FSDP) 4-bit codes are stored in tensors of
    ``compute_dtype`` (``bnb_4bit_quant_storage``), the dtype of the other weights, so that FSDP flat-shards
    them like any floating-point weight (its default ``uint8`` storage cannot survive the conversion to
    sharded tensors). The codes and so every value computed are the same bytes either way.
    """
    q = config.quantization
    if q is None:
        return None
    from transformers import BitsAndBytesConfig

    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
            **({"bnb_4bit_quant_storage": _DTYPES[q.compute_dtype]} if shardable else {}),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or the causal LM inside a peft model) was loaded in 4 or 8 bits."""
    lm = causal_lm(model)
    return bool(getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False))


def from_pretrained_kwargs(config: ModelConfig, device: torch.device | str | None = None,
                           shardable: bool = False) -> dict:
    """Keyword arguments for ``from_pretrained`` from the recipe's model section (dtype, remote code,
    attention, a GGUF file (:func:`gguf_kwargs`), and for a k-bit base its ``quantization_config`` placed on
    ``device``; ``shardable``: see :func:`quantization_config`)."""
    kwargs = {"dtype": _DTYPES[config.dtype], "trust_remote_code": config.trust_remote_code, **gguf_kwargs(config)}
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    quant = quantization_config(config, shardable)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["dtype"] = _DTYPES[config.quantization.compute_dtype]
        if device is not None:
            kwargs["device_map"] = {"": device}
    return kwargs


def load_base_model(config: ModelConfig, path: str | None = None, device: torch.device | str | None = None,
                    shardable: bool = False, keys: tuple[str, str] = ("model.path", "model.gguf_file")):
    """Load a causal LM from a local directory (or hub id), or its GGUF file, through ``from_pretrained``.

    Args:
        config: the recipe's model section (for another model, e.g. a separate reference, a copy naming it).
        path: load this path instead of ``config.path`` (its own GGUF file is then ``config.gguf_file``).
        device: where to put the weights (quantized models are placed by bitsandbytes).
        shardable: the base will be sharded by FSDP (4-bit storage, see :func:`quantization_config`).
        keys: the recipe keys naming the model and its GGUF file, for messages.
    """
    from transformers import AutoModelForCausalLM

    source = path or config.path
    check_gguf(config.model_copy(update={"path": source}), keys[1])
    if config.trust_remote_code:
        print(f"model: trust_remote_code is ON for {source}: code from the model directory will run")
    kwargs = from_pretrained_kwargs(config, device, shardable)
    quant = kwargs.get("quantization_config")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        hint = "" if Path(source).exists() else " (no such local directory; as a hub id it needs the network)"
        named = f" (gguf_file {config.gguf_file})" if config.gguf_file else ""
        raise ModelError(f"{keys[0]}: cannot load {source!r}{named}{hint}: {exc}; set {keys[0]} to a local Hugging "
                         f"Face model folder (config.json, weights, tokenizer): --set {keys[0]}=/path/to/model") from None
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":  # safetensors' own error type: a damaged weights file
            raise ModelError(f"{keys[0]}: a weights file of {source} is damaged ({exc}); copy or download the "
                             "model again") from None
        if not isinstance(exc, ImportError) or quant is None:
            raise
        raise ModelError(f"model.quantization: loading a {config.quantization.bits}-bit base needs bitsandbytes "
                         f"(pip install 'dpo-train[quant]'): {exc}") from None
    check_head(model, source)
    if quant is not None and not torch.is_floating_point(model.get_output_embeddings().weight):
        raise ModelError(f"{source}: the LM head was quantized; the log-prob kernels need it in full precision")
    if quant is not None:
        keep_4bit_layout_trainable(model)
    if quant is None and device is not None:
        model.to(device)
    return model


def keep_4bit_layout_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, the first forward in eval mode without gradients (the reference pass, an
    evaluation) repacks each weight, for good, into a layout whose matmul has no backward: later training
    steps then pass no gradient through the base to earlier layers' adapters, and the repacked matmul rounds
    differently from the trainable one.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_head(model: nn.Module, source: str = "model") -> None:
    """Refuse heads the fused log-prob path would get wrong (bias, logit scaling)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelError(f"{source}: the model has no linear output head (get_output_embeddings() is None)")
    if getattr(head, "bias", None) is not None:
        raise ModelError(f"{source}: an LM head with a bias is not supported by the log-prob kernels")
    config = model.config
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ModelError(f"{source}: config.{name}={value} (scaled logits) is not supported")


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing with the non-reentrant implementation (works with frozen inputs)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """Ready a 4/8-bit base for adapter training: frozen, input gradients on, optional checkpointing.

    Unlike peft's ``prepare_model_for_kbit_training`` this does not cast the unquantized weights
    (embeddings, norms, LM head) to float32: they stay in ``compute_dtype``, which keeps the head in the
    dtype the fused log-prob kernel runs in, the residual stream (and so every saved activation) at two
    bytes a value, and saves ``2 * vocab * hidden * 2`` bytes of weights (about 2 GiB for Llama-3-8B).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    # As peft does: reentrant checkpointing replays a block's backward only when the block's input requires
    # grad, which a frozen embedding's output does not. With non-reentrant checkpointing it costs one
    # [R, T, H] gradient and the first layer's saved norm input.
    model.enable_input_require_grads()
    return model


def add_lora(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False, adapter: str | None = None):
    """Wrap ``model`` with a fresh LoRA adapter (peft), or with the saved ``adapter`` (``model.adapter``) to
    train on from where it is; that adapter's own rank and targets then apply, not ``lora``'s. The LM head
    is never adapted."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if is_quantized(model):
        model = prepare_kbit_training(model, gradient_checkpointing)
    elif gradient_checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
    if adapter is not None:
        try:
            return PeftModel.from_pretrained(model, adapter, is_trainable=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"model.adapter: cannot load {adapter!r} onto {getattr(model, 'name_or_path', 'the base')} "
                             f"(a LoRA adapter folder saved for this base, e.g. an SFT run's OUT/adapter): {exc}") from None
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, peft_config)


def causal_lm(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a (possibly peft-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
