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
reproduce the reference bit for bit; the eval split is small, so recomputing it is cheap. For the same
reason a packed run's eval key also holds how its rows are packed (``train.max_batch_tokens``) and
:data:`PACKED_ATTENTION_VERSION`; the train key does not depend on packing at all (packed and padded batches
compute the same values).
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo.data import PreparedData, choose_collate, prepare_data
from dpo.model import (
    LogprobSettings,
    ModelError,
    PackedAttention,
    SequenceLogprobs,
    add_lora,
    load_base_model,
    load_tokenizer,
    resolve_packing,
)
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
from dpo.reference.shard import Processes
from dpo.reference.store import FORMAT_VERSION, ReferenceStore

Log = Callable[[str], None]
Collate = Callable[[list[dict]], dict[str, Tensor]]

# Bump when dpo.model.sequence_logprobs or dpo.kernels.token_logprobs change the function they compute
# (not when they only get faster): every cached value is then recomputed.
LOGPROB_VERSION = 1
# Bump when packed batches are computed another way (same values, other rounding): evaluation must reproduce
# its precompute bit for bit, so held-out values from the earlier way are recomputed. 2: SDPA one segment at a
# time (dpo.model.segment_attention) instead of one dense mask per row.
PACKED_ATTENTION_VERSION = 2
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
    if recipe.train.packing != "off":  # evaluation packs rows exactly as the precompute did
        evaluation["eval_packed_rows"] = {"max_batch_tokens": recipe.train.max_batch_tokens,
                                          "attention": PACKED_ATTENTION_VERSION}
    return {"train": (digest_of(train), train), "eval": (digest_of(evaluation), evaluation)}


@contextmanager
def open_reference(recipe: Recipe, settings: LogprobSettings, device, policy=None, log: Log = print,
                   policy_packing: PackedAttention | None = None, step=None) -> Iterator[LogpFn]:
    """A ``logp_fn`` running the reference network; whatever it had to load is freed on exit.

    The network runs through :class:`dpo.model.SequenceLogprobs`, the training step's own forward. Without
    ``reference.model_path`` or ``reference.adapter`` the reference is the policy's base with its adapter
    disabled: ``policy`` when given (taking packed batches as ``policy_packing`` says), else one built here the
    way the trainer builds it (the same numbers either way). ``step`` is the run's step module around
    ``policy`` as its engine prepared it: the pass then goes through it, so an engine that shards the model
    runs the forward it set up. A network loaded here gets its own packing check (``train.packing``), logged.
    """
    reference = recipe.reference
    holder: dict[str, Any] = {}  # the only strong reference to the network, cleared on exit

    def packing_of(network) -> PackedAttention | None:
        return resolve_packing(recipe.train.packing, network, recipe.data.max_length, device, log,
                               what="the reference")

    try:
        if reference.model_path is None and reference.adapter is None:
            if policy is None:
                holder["policy"] = add_lora(load_base_model(recipe.model, device=device), recipe.lora,
                                            recipe.model.gradient_checkpointing)
                packing = packing_of(holder["policy"])
            else:
                holder["policy"], packing = policy, policy_packing
            holder["logprobs"] = step if step is not None else SequenceLogprobs(holder["policy"], settings, packing)
            was_training = holder["logprobs"].training
            holder["logprobs"].eval()

            def adapter_off_logp_fn(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
                with holder["policy"].disable_adapter():
                    return holder["logprobs"](batch)

            try:
                yield adapter_off_logp_fn
            finally:
                holder["logprobs"].train(was_training)
            return
        network = load_reference_network(recipe, device)
        holder["logprobs"] = SequenceLogprobs(network, settings, packing_of(network))
        del network

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
                    log: Log, policy=None, checkpoint_every_s: float = 60.0,
                    policy_packing: PackedAttention | None = None, *, step=None,
                    processes: Processes | None = None) -> tuple[ReferenceLogps, ReferenceLogps]:
    """Reference log-probs of both splits through the cache: read on a hit, computed and written on a miss.

    Nothing is loaded or run for the reference when both splits hit (unless ``reference.verify`` asks for
    a check, which recomputes that many random examples and raises :class:`ReferenceMismatchError` if any
    differs beyond tolerance).

    Several processes (every one of them calls this, with the same data): the first process of each machine
    reads its machine's cache (several machines need not share a disk), the processes agree on which splits
    any machine lacks, compute those together (:mod:`dpo.reference.shard`), and each machine's first process
    that lacked a split writes it.

    Args:
        recipe: the run's recipe (model, reference and cache settings).
        data: the tokenized splits and their fingerprints.
        collate: rows -> batch of ``2B`` sequences (padded or packed: :func:`dpo.data.choose_collate`).
        settings: log-prob kernel settings.
        device: where the reference runs.
        log: where messages go.
        policy: the peft policy, whose base (adapter disabled) is the default reference; None loads it on a miss.
        checkpoint_every_s: seconds between progress saves of a precompute.
        policy_packing: how ``policy`` takes packed batches (None: it does not).
        step: the run's step module around ``policy``, as the engine prepared it (see :func:`open_reference`).
        processes: the processes of a multi-process run; None for one process.

    Returns:
        ``(train, eval)`` reference values, on the CPU.
    """
    processes = processes or Processes()
    store = reference_store(recipe)
    index = HashIndex(store.directory / HASH_INDEX_NAME)
    # Each machine's first process hashes the weight files (memoized beside the cache); the others then read
    # its digests instead of hashing the same files again.
    keys = reference_keys(recipe, data, index) if processes.local_main else None
    processes.gather(None)
    keys = keys or reference_keys(recipe, data, index)
    splits = {"train": data.train, "eval": data.eval}
    results: dict[str, ReferenceLogps | None] = {split: _empty() for split, rows in splits.items() if len(rows) == 0}
    writes: set[str] = set()
    with ExitStack() as locks:
        if processes.local_main:
            for split, rows in splits.items():
                if split not in results:
                    results[split] = load_cached(store, keys[split][0], len(rows), split, log)
            # One writer per entry: a process that finds another computing it waits, then reads its file. Only
            # the first process of a run waits: the others' machines may share its disk (and so its lock), and
            # it cannot finish while they wait; one that finds the lock taken computes without writing.
            for split in [s for s in splits if results.get(s) is None]:
                lock = store.lock(keys[split][0], log, wait=processes.rank == 0)
                if lock is None:
                    log(f"reference cache: {store.path(keys[split][0])} is being written by another process; "
                        "computing the values without writing them")
                    continue
                locks.enter_context(lock)
                results[split] = load_cached(store, keys[split][0], len(splits[split]), split, log)
                if results[split] is None:
                    writes.add(split)
        lacking = {split for part in processes.gather([s for s in splits if results.get(s) is None]
                                                      if processes.local_main else []) for split in part}
        missing = [split for split in splits if split in lacking]
        for split in splits:
            if split not in missing and results.get(split) is None:  # found by this machine's first process
                results[split] = load_cached(store, keys[split][0], len(splits[split]), split, lambda _: None)
                if results[split] is None:
                    raise ReferenceMismatchError(f"reference cache: {store.path(keys[split][0])} vanished while "
                                                 "this run was reading it; run again")
        hits = [split for split in splits if split not in missing and len(results[split]) > 0]
        verify = recipe.reference.verify
        if verify and not hits:
            log("reference cache: nothing to verify (every value was computed in this run)")
            verify = 0
        if missing or verify:
            with open_reference(recipe, settings, device, policy, log, policy_packing, step) as logp_fn:
                for split in missing:
                    fingerprint, parts = keys[split]
                    results[split] = compute_and_store(store, fingerprint, parts, splits[split], collate, logp_fn,
                                                       recipe.reference.batch_size, device, split, log,
                                                       checkpoint_every_s, processes, write=split in writes)
                if verify:
                    verify_cached(recipe, {s: splits[s] for s in hits}, {s: results[s] for s in hits},
                                  {s: store.path(keys[s][0]) for s in hits}, collate, logp_fn, device, verify, log,
                                  processes.gather)
    return results["train"], results["eval"]


def verify_cached(recipe: Recipe, rows: dict[str, Any], cached: dict[str, ReferenceLogps], paths: dict[str, Path],
                  collate: Collate, logp_fn: LogpFn, device, count: int, log: Log,
                  gather: Callable[[Any], list] = lambda obj: [obj]) -> None:
    """Recompute ``count`` random cached examples and raise if any differs from its cached value.

    With several processes (``gather``), every one recomputes the examples the first one drew, so that
    they run the same forwards.
    """
    population = [(split, i) for split in cached for i in range(len(cached[split]))]
    chosen = random.Random(os.urandom(16)).sample(population, min(count, len(population)))
    chosen = gather(chosen)[0]
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


def _quiet(message: str) -> None:
    """The log of processes other than each machine's first."""


def precompute_references(recipe: Recipe, log: Log = print) -> dict[str, Path]:
    """Fill the reference cache for a recipe without training (``dpo-train cache RECIPE``).

    Started as several processes (``accelerate launch``, ``torchrun``), they share the pass: each runs the
    whole model on its device and computes its share of the batches; each machine's first process writes that
    machine's cache (and alone returns the paths).

    Returns:
        The cache file of each non-empty split (``{}`` for a loss that needs no reference).
    """
    from dpo.losses import get_loss

    spec = get_loss(recipe.loss.name)
    if recipe.task != "preference" or not spec.needs_reference:
        what = f"task {recipe.task}" if recipe.task != "preference" else f"loss {recipe.loss.name}"
        log(f"{what} needs no reference log-probs: nothing to compute")
        return {}
    from accelerate import PartialState

    processes = Processes.launched()
    state = PartialState()
    if not processes.local_main:
        log = _quiet
    tokenizer = load_tokenizer(recipe.model)
    with state.local_main_process_first():  # each machine's first process tokenizes; the others read its cache
        data = prepare_data(recipe.data, tokenizer, unpaired=not spec.paired, seed=recipe.train.seed, log=log)
    device = state.device if state.num_processes > 1 else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    collate = choose_collate(spec.paired, tokenizer.pad_token_id, recipe.train.packing, recipe.train.max_batch_tokens,
                             device)
    settings = LogprobSettings(recipe.train.logprob_impl, recipe.train.logprob_chunk_size)
    if processes.world > 1:
        log(f"reference cache: {processes.world} processes share the precompute")
    try:
        reference_logps(recipe, data, collate, settings, device, log, processes=processes)
    finally:
        if processes.world > 1:
            # A process that exits with its process group open is aborted by the collective library's threads.
            state.destroy_process_group()
    if not processes.local_main:
        return {}
    store = reference_store(recipe)
    keys = reference_keys(recipe, data, HashIndex(store.directory / HASH_INDEX_NAME))  # digests memoized by now
    return {split: store.path(keys[split][0]) for split, rows in (("train", data.train), ("eval", data.eval))
            if len(rows) > 0}
