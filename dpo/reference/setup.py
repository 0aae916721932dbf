"""Which network the reference is, what its cached values are keyed on, and running it only on a miss.

Sits between the model (:mod:`dpo.model`) and the trainer: it knows the recipe, the data and how to load a
model, and hands :mod:`dpo.reference.compute` a fingerprint and a ``logp_fn``.

The key of a split's values is a hash of exactly what changes them:

* the reference network: the content of its config and weight files (:mod:`dpo.reference.fingerprint`;
  a hub snapshot by its commit; a GGUF checkpoint by its ``.gguf`` file alone), ``model.dtype``, ``model.quantization``, ``model.attn_implementation``
  (some architectures compute attention differently without eager), ``model.trust_remote_code``, the
  reference adapter's files (or "none": the base with the policy's adapter disabled), and the
  transformers version (the modelling code);
* the tokenized split (``PreparedData.*_fingerprint``: every token id, so tokenizer, template,
  truncation and the paired or unpaired layout);
* :data:`LOGPROB_VERSION` and the cache format version.

Not in it: the learning rate, beta, the loss, LoRA settings, the output folder, and the log-prob
implementation (``train.logprob_impl``/``logprob_chunk_size``: torch and Triton compute the same function
and differ only by rounding). One exception: the eval split's key holds ``reference.batch_size``, because
evaluation batches held-out rows exactly as their precompute did, which is what makes an untrained policy
reproduce the reference bit for bit; the eval split is small, so recomputing it is cheap.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo.data import PreparedData, collate_paired, collate_unpaired, prepare_data
from dpo.model import LogprobSettings, ModelError, SequenceLogprobs, add_lora, load_base_model, load_tokenizer
from dpo.recipe import Recipe
from dpo.reference.compute import (
    LogpFn,
    ReferenceLogps,
    compute_and_store,
    compute_reference_logps,
    example_indices,
    load_cached,
    reference_mismatches,
)
from dpo.reference.fingerprint import HashIndex, IdentityError, digest_of, folder_identity
from dpo.reference.store import FORMAT_VERSION, ReferenceStore

Log = Callable[[str], None]
Collate = Callable[[list[dict]], dict[str, Tensor]]

# Bump when dpo.model.sequence_logprobs or dpo.kernels.token_logprobs change the function they compute
# (not when they only get faster): every cached value is then recomputed.
LOGPROB_VERSION = 1
# Verification tolerance per sqrt(token) of a summed log-prob (see
# dpo.reference.compute.verification_tolerance): float32 differs between batch shapes by ~1e-6 per token,
# 16-bit and quantized models by ~1e-2.
TOLERANCE_FLOAT32 = 1e-3
TOLERANCE_16BIT = 0.1
HASH_INDEX_NAME = "file-hashes.json"


class ReferenceMismatchError(ValueError):
    """Cached reference log-probs that the reference model no longer reproduces."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dpo-train/reference`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo-train" / "reference"


def reference_store(recipe: Recipe) -> ReferenceStore:
    configured = recipe.reference.cache_dir
    return ReferenceStore(Path(configured).expanduser() if configured else default_cache_dir())


def network_parts(recipe: Recipe, index: HashIndex) -> dict[str, Any]:
    """The part of the key that identifies the reference network (see the module docstring)."""
    import transformers

    model, reference = recipe.model, recipe.reference
    try:
        parts = {
            "format": FORMAT_VERSION,
            "logprob_version": LOGPROB_VERSION,
            "model": (folder_identity(reference.model_path, index, "reference.model_path", reference.gguf_file)
                      if reference.model_path is not None
                      else folder_identity(model.path, index, "model.path", model.gguf_file)),
            "adapter": ("none" if reference.adapter is None
                        else folder_identity(reference.adapter, index, "reference.adapter")),
            "dtype": model.dtype,
            "quantization": model.quantization.model_dump() if model.quantization is not None else None,
            "attn_implementation": model.attn_implementation,
            "trust_remote_code": model.trust_remote_code,
            "transformers": transformers.__version__,
        }
    except IdentityError as exc:
        raise ModelError(str(exc)) from None
    if reference.adapter is not None:
        import peft

        parts["peft"] = peft.__version__
    return parts


def reference_keys(recipe: Recipe, data: PreparedData, index: HashIndex | None = None
                   ) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{"train": (fingerprint, parts), "eval": (fingerprint, parts)}`` for the recipe's reference values."""
    network = network_parts(recipe, index if index is not None else HashIndex(None))
    train = {**network, "data": data.train_fingerprint}
    evaluation = {**network, "data": data.eval_fingerprint, "eval_batch_size": recipe.reference.batch_size}
    return {"train": (digest_of(train), train), "eval": (digest_of(evaluation), evaluation)}


@contextmanager
def open_reference(recipe: Recipe, settings: LogprobSettings, device, policy=None) -> Iterator[LogpFn]:
    """A ``logp_fn`` running the reference network; whatever it had to load is freed on exit.

    The network runs through :class:`dpo.model.SequenceLogprobs`, the training step's own forward. Without
    ``reference.model_path`` or ``reference.adapter`` the reference is the policy's base with its adapter
    disabled: ``policy`` when given, else one built here the way the trainer builds it (the same numbers
    either way).
    """
    reference = recipe.reference
    holder: dict[str, Any] = {}  # the only strong reference to the network, cleared on exit
    try:
        if reference.model_path is None and reference.adapter is None:
            holder["logprobs"] = SequenceLogprobs(policy if policy is not None else add_lora(
                load_base_model(recipe.model, device=device), recipe.lora, recipe.model.gradient_checkpointing),
                settings)
            was_training = holder["logprobs"].model.training
            holder["logprobs"].eval()

            def adapter_off_logp_fn(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
                with holder["logprobs"].model.disable_adapter():
                    return holder["logprobs"](batch)

            try:
                yield adapter_off_logp_fn
            finally:
                holder["logprobs"].train(was_training)
            return
        holder["logprobs"] = SequenceLogprobs(load_reference_network(recipe, device), settings)

        def logp_fn(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return holder["logprobs"](batch)

        yield logp_fn
    finally:
        holder.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_reference_network(recipe: Recipe, device):
    """The separate reference model (``reference.model_path`` and its ``reference.gguf_file``, or the base) with
    ``reference.adapter`` if set."""
    reference = recipe.reference
    if reference.model_path is None:
        model = load_base_model(recipe.model, device=device)
    else:
        config = recipe.model.model_copy(update={"path": reference.model_path, "gguf_file": reference.gguf_file})
        model = load_base_model(config, device=device, keys=("reference.model_path", "reference.gguf_file"))
    if recipe.reference.adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, recipe.reference.adapter, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"reference.adapter: cannot load {recipe.reference.adapter!r} onto the reference "
                             f"model: {exc}") from None
    model.eval()
    return model


def _empty() -> ReferenceLogps:
    return ReferenceLogps(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, dtype=torch.long))


def reference_logps(recipe: Recipe, data: PreparedData, collate: Collate, settings: LogprobSettings, device,
                    log: Log, policy=None, checkpoint_every_s: float = 60.0) -> tuple[ReferenceLogps, ReferenceLogps]:
    """Reference log-probs of both splits through the cache: read on a hit, computed and written on a miss.

    Nothing is loaded or run for the reference when both splits hit (unless ``reference.verify`` asks for
    a check, which recomputes that many random examples and raises :class:`ReferenceMismatchError` if any
    differs beyond tolerance).

    Args:
        recipe: the run's recipe (model, reference and cache settings).
        data: the tokenized splits and their fingerprints.
        collate: rows -> ``2B``-row batch.
        settings: log-prob kernel settings.
        device: where the reference runs.
        log: where messages go.
        policy: the peft policy, whose base (adapter disabled) is the default reference; None loads it on a miss.
        checkpoint_every_s: seconds between progress saves of a precompute.

    Returns:
        ``(train, eval)`` reference values, on the CPU.
    """
    store = reference_store(recipe)
    keys = reference_keys(recipe, data, HashIndex(store.directory / HASH_INDEX_NAME))
    splits = {"train": data.train, "eval": data.eval}
    results: dict[str, ReferenceLogps | None] = {}
    for split, rows in splits.items():
        results[split] = _empty() if len(rows) == 0 else load_cached(store, keys[split][0], len(rows), split, log)
    missing = [split for split, value in results.items() if value is None]
    hits = [split for split, value in results.items() if value is not None and len(value) > 0]
    verify = recipe.reference.verify
    if verify and not hits:
        log("reference cache: nothing to verify (every value was computed in this run)")
        verify = 0
    with ExitStack() as locks:
        # One writer per entry: a process that finds another computing it waits, then reads its file.
        for split in list(missing):
            locks.enter_context(store.lock(keys[split][0], log))
            results[split] = load_cached(store, keys[split][0], len(splits[split]), split, log)
            if results[split] is not None:
                missing.remove(split)
        if missing or verify:
            with open_reference(recipe, settings, device, policy) as logp_fn:
                for split in missing:
                    fingerprint, parts = keys[split]
                    results[split] = compute_and_store(store, fingerprint, parts, splits[split], collate, logp_fn,
                                                       recipe.reference.batch_size, device, split, log,
                                                       checkpoint_every_s)
                if verify:
                    verify_cached(recipe, {s: splits[s] for s in hits}, {s: results[s] for s in hits},
                                  {s: store.path(keys[s][0]) for s in hits}, collate, logp_fn, device, verify, log)
    return results["train"], results["eval"]


def verify_cached(recipe: Recipe, rows: dict[str, Any], cached: dict[str, ReferenceLogps], paths: dict[str, Path],
                  collate: Collate, logp_fn: LogpFn, device, count: int, log: Log) -> None:
    """Recompute ``count`` random cached examples and raise if any differs from its cached value."""
    population = [(split, i) for split in cached for i in range(len(cached[split]))]
    chosen = random.Random(os.urandom(16)).sample(population, min(count, len(population)))
    quantized = recipe.model.quantization is not None
    per_token = TOLERANCE_FLOAT32 if recipe.model.dtype == "float32" and not quantized else TOLERANCE_16BIT
    problems: list[str] = []
    for split in cached:
        indices = sorted(i for s, i in chosen if s == split)
        if not indices:
            continue
        positions = {index: p for p, index in enumerate(example_indices(rows[split]))}
        subset = [{**rows[split][positions[i]], "index": j} for j, i in enumerate(indices)]
        fresh = compute_reference_logps(subset, collate, logp_fn, recipe.reference.batch_size, device,
                                        f"verify ({split})", lambda _: None)
        problems += [f"{paths[split]}: {p}" for p in reference_mismatches(cached[split], fresh, indices, per_token)]
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise ReferenceMismatchError(
            f"reference cache: {len(problems)} of {2 * len(chosen)} re-computed sequences differ from the cached "
            f"values:\n  {shown}\nThe cache is stale or the reference model is not the one it was computed with; "
            "delete the file(s) named above to recompute them."
        )
    log(f"reference cache: verified {len(chosen)} random examples ({2 * len(chosen)} sequences) against the "
        "reference model")


def precompute_references(recipe: Recipe, log: Log = print) -> dict[str, Path]:
    """Fill the reference cache for a recipe without training (``dpo-train cache RECIPE``).

    Returns:
        The cache file of each non-empty split (``{}`` for a loss that needs no reference).
    """
    from dpo.losses import get_loss

    spec = get_loss(recipe.loss.name)
    if recipe.task != "preference" or not spec.needs_reference:
        what = f"task {recipe.task}" if recipe.task != "preference" else f"loss {recipe.loss.name}"
        log(f"{what} needs no reference log-probs: nothing to compute")
        return {}
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=not spec.paired, seed=recipe.train.seed, log=log)
    collate = partial(collate_paired if spec.paired else collate_unpaired, pad_token_id=tokenizer.pad_token_id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = LogprobSettings(recipe.train.logprob_impl, recipe.train.logprob_chunk_size)
    reference_logps(recipe, data, collate, settings, device, log)
    store = reference_store(recipe)
    keys = reference_keys(recipe, data, HashIndex(store.directory / HASH_INDEX_NAME))  # digests memoized by now
    return {split: store.path(keys[split][0]) for split, rows in (("train", data.train), ("eval", data.eval))
            if len(rows) > 0}
