"""The reference stage: reference log-probs, computed once per fingerprint and kept in an on-disk cache.

Takes the recipe, the tokenized splits and (on a cache miss) a network to run: the policy with its
adapter disabled, or a separate reference model. Hands on :class:`ReferenceLogps` per split, which the
training step only looks up by example index (:func:`reference_logps`). What the cache key is made of
lives in :mod:`dpo.reference.setup` and :mod:`dpo.reference.fingerprint`, the files in
:mod:`dpo.reference.store`, the batched no-grad pass in :mod:`dpo.reference.compute` (shared between the
processes of a multi-process run: :mod:`dpo.reference.shard`).
"""

from dpo.reference.compute import (
    LogpFn,
    ReferenceLogps,
    compute_and_store,
    compute_reference_logps,
    length_sorted_batches,
    reference_mismatches,
)
from dpo.reference.fingerprint import HashIndex, IdentityError, folder_identity
from dpo.reference.setup import (
    LOGPROB_VERSION,
    ReferenceMismatchError,
    open_reference,
    precompute_references,
    reference_keys,
    reference_logps,
)
from dpo.reference.shard import Processes, compute_sharded
from dpo.reference.store import CacheFileError, ReferenceStore

__all__ = [
    "LOGPROB_VERSION",
    "CacheFileError",
    "HashIndex",
    "IdentityError",
    "LogpFn",
    "Processes",
    "ReferenceLogps",
    "ReferenceMismatchError",
    "ReferenceStore",
    "compute_and_store",
    "compute_reference_logps",
    "compute_sharded",
    "folder_identity",
    "length_sorted_batches",
    "open_reference",
    "precompute_references",
    "reference_keys",
    "reference_logps",
    "reference_mismatches",
]
