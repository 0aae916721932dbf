"""Preference data: reading every supported layout, validating rows, tokenizing, caching and collating.

The trainer and the CLI use :func:`prepare_data` (recipe ``data:`` section -> tokenized splits) and
:func:`collate_paired` / :func:`collate_unpaired` (tokenized rows -> padded batches), or
:func:`collate_packed_paired` / :func:`collate_packed_unpaired` (each prompt once, segments packed into rows
without padding between them: :mod:`dpo.data.pack`).
"""

from dpo.data.collate import IGNORE_INDEX, collate_paired, collate_unpaired
from dpo.data.kto import kto_balance_warning
from dpo.data.layouts import CANONICAL_COLUMNS, LAYOUTS
from dpo.data.pack import (
    UNLIMITED,
    choose_collate,
    collate_packed_paired,
    collate_packed_unpaired,
    is_packed,
    unpack_to_padded,
)
from dpo.data.prepare import PreparedData, prepare_data
from dpo.data.stats import LengthSummary, TokenStats
from dpo.data.validate import DataError

__all__ = [
    "CANONICAL_COLUMNS",
    "IGNORE_INDEX",
    "LAYOUTS",
    "DataError",
    "LengthSummary",
    "PreparedData",
    "TokenStats",
    "UNLIMITED",
    "choose_collate",
    "collate_packed_paired",
    "collate_packed_unpaired",
    "collate_paired",
    "collate_unpaired",
    "is_packed",
    "kto_balance_warning",
    "prepare_data",
    "unpack_to_padded",
]
