"""From the recipe's ``data:`` section to tokenized train and eval datasets.

Steps: read rows (:mod:`dpo.data.load`), rename columns and detect the layout
(:mod:`dpo.data.layouts`), validate every row and report bad ones (:mod:`dpo.data.validate`), split
off eval rows, tokenize through ``datasets.map`` (:mod:`dpo.data.tokenize`) or reuse the on-disk cache
(:mod:`dpo.data.cache`), and for unpaired losses convert pairs and add KL completions (:mod:`dpo.data.kto`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from dpo.data.cache import (
    DamagedEntry,
    content_hash,
    default_cache_dir,
    entry_lock,
    key_of,
    load_entry,
    rows_hash,
    save_entry,
    tokenizer_hash,
)
from dpo.data.chat import resolve_chat_template
from dpo.data.kto import kl_completions, pairs_to_unpaired, require_both_labels
from dpo.data.layouts import (
    SINGLE_LAYOUTS,
    check_mapped_columns,
    detect_layout,
    normalise_row,
    rename_columns,
    uses_chat,
)
from dpo.data.load import load_rows
from dpo.data.stats import LengthSummary, TokenStats
from dpo.data.tokenize import RowTokenizer
from dpo.data.validate import BadRow, DataError, RowProblem, handle_bad_rows, require_number

IDS = datasets.Sequence(datasets.Value("int32"))
PAIRED_FEATURES = datasets.Features(
    {"index": datasets.Value("int64"), "prompt_ids": IDS, "chosen_ids": IDS, "rejected_ids": IDS}
)
UNPAIRED_FEATURES = datasets.Features(
    {
        "index": datasets.Value("int64"),
        "prompt_ids": IDS,
        "completion_ids": IDS,
        "label": datasets.Value("bool"),
        "kl_completion_ids": IDS,
    }
)


@dataclass
class Canonical:
    """Validated rows of one source, in the canonical form of :mod:`dpo.data.layouts`."""

    source: str
    unit: str
    layout: str
    chat: bool
    rows: list[dict[str, Any]]
    bad: list[BadRow]
    duplicates: int = 0


@dataclass
class PreparedData:
    """Tokenized data, ready for the reference cache and the trainer.

    Attributes:
        train: paired rows ``index, prompt_ids, chosen_ids, rejected_ids``, or unpaired rows ``index,
            prompt_ids, completion_ids, label, kl_completion_ids``; ``index`` is 0..n-1 within the split.
        eval: the same columns; possibly empty.
        layout: the layout read (detected or named by the recipe).
        stats: token statistics (see :class:`dpo.data.stats.TokenStats`).
        train_fingerprint: a hash of the train split's token ids (equal iff the tokenized data is equal).
        eval_fingerprint: the same for the eval split.
        eval_prompts: the held-out rows' prompts as read (text, or messages), in order, before tokenizing.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    layout: str
    stats: TokenStats
    train_fingerprint: str
    eval_fingerprint: str
    eval_prompts: list = field(default_factory=list)


def prepare_data(
    data_cfg: Any,
    tokenizer: Any,
    *,
    unpaired: bool,
    seed: int,
    log: Callable[[str], None] = print,
    margin_column: str | None = None,
    completions: bool = False,
) -> PreparedData:
    """Read, validate, split and tokenize the recipe's data.

    Args:
        data_cfg: the recipe's ``data`` section (:class:`dpo.recipe.DataConfig`).
        tokenizer: the policy's tokenizer (a ``transformers`` tokenizer).
        unpaired: the loss takes unpaired rows (KTO); pairs are then split into a desirable and an
            undesirable row each.
        seed: the recipe's ``train.seed``: fixes the eval split, the unpaired shuffle and KL partners.
        log: where progress and summaries are printed.
        margin_column: a numeric column of the data carried through as ``margin`` (one float per pair,
            e.g. a rating gap for a reward model's margin); every row must hold a finite number there.
        completions: the caller trains on completions of any layout (supervised fine-tuning): pairs stay
            pairs (their chosen side is the completion), single-completion layouts become unpaired rows, and
            a set of only desirable rows is fine.

    Returns:
        The tokenized splits, their fingerprints, the layout and token statistics.
    """
    train = read_canonical(data_cfg, data_cfg.train, "data.train", log, margin_column)
    if data_cfg.eval is not None:
        evaluation = read_canonical(data_cfg, data_cfg.eval, "data.eval", log, margin_column)
        if (evaluation.layout, evaluation.chat) != (train.layout, train.chat):
            raise DataError(
                f"data.eval ({data_cfg.eval}) has layout {evaluation.layout}, but data.train has layout "
                f"{train.layout}; both must have the same layout"
            )
        train_rows, eval_rows = train.rows, evaluation.rows
    else:
        evaluation = None
        train_rows, eval_rows = split_rows(train.rows, data_cfg.eval_fraction, seed, train.source)
    single = train.layout in SINGLE_LAYOUTS
    unpaired = unpaired or (completions and single)
    if train.layout == "demonstrations" and not unpaired:
        raise DataError(
            f"{train.source} holds demonstrations (prompt and completion, or messages) and no preference; they "
            "train with task: sft"
        )
    if train.layout == "unpaired" and not unpaired:
        raise DataError(
            f"{train.source} holds unpaired rows (prompt, completion, label); they train only with an unpaired "
            "loss: set loss.name: kto"
        )
    if train.layout == "unpaired" and not completions:
        require_both_labels([r["label"] for r in train_rows], train.source)

    template, template_label = resolve_chat_template(data_cfg.chat_template, tokenizer)
    settings = {
        "tokenizer": tokenizer_hash(tokenizer),
        "template": template if train.chat else None,
        "max_length": data_cfg.max_length,
        "max_prompt_length": data_cfg.max_prompt_length,
        "truncation": data_cfg.truncation,
        "unpaired": unpaired,
        "seed": seed if unpaired else None,
    }
    if completions and single:
        settings["completions"] = True  # rows for supervised fine-tuning: no KL completions
    cache_dir = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_dir()
    splits = {}
    for name, rows, canonical in (("train", train_rows, train), ("eval", eval_rows, evaluation or train)):
        splits[name] = _tokenized_split(
            name, rows, canonical, tokenizer, data_cfg, settings, template, template_label, cache_dir, log
        )

    (train_ds, train_meta, train_arrays), (eval_ds, eval_meta, eval_arrays) = splits["train"], splits["eval"]
    if len(train_ds) == 0:
        raise DataError(f"{train.source}: no usable rows are left for training")
    bad_reasons = Counter(b.reason for b in train.bad + (evaluation.bad if evaluation else []))
    converted = unpaired and not single
    stats = TokenStats(
        unit="rows" if single else "pairs",
        count=train_meta["count"] + eval_meta["count"],
        train_count=train_meta["count"],
        eval_count=eval_meta["count"],
        prompt_lengths=LengthSummary.of(np.concatenate([train_arrays["prompt"], eval_arrays["prompt"]])),
        completion_lengths=LengthSummary.of(np.concatenate([train_arrays["completion"], eval_arrays["completion"]])),
        truncated=train_meta["truncated"] + eval_meta["truncated"],
        dropped=train_meta["dropped"] + eval_meta["dropped"],
        max_length=data_cfg.max_length,
        max_prompt_length=data_cfg.max_prompt_length,
        truncation=data_cfg.truncation,
        bad_rows=dict(bad_reasons),
        unpaired_rows=(len(train_ds), len(eval_ds)) if converted else None,
        duplicates=train.duplicates + (evaluation.duplicates if evaluation else 0),
        eval_in_train=_overlap(eval_rows, train_rows) if evaluation else 0,
    )
    return PreparedData(
        train=train_ds,
        eval=eval_ds,
        layout=train.layout,
        stats=stats,
        train_fingerprint=train_meta["fingerprint"],
        eval_fingerprint=eval_meta["fingerprint"],
        eval_prompts=[row["prompt"] for row in eval_rows],
    )


def read_canonical(
    data_cfg: Any, spec: str, key: str, log: Callable[[str], None], margin_column: str | None = None
) -> Canonical:
    """Read one source, detect (or take) its layout, and validate every row into canonical form.

    With ``margin_column`` each canonical row also holds ``margin``, that column's value as a float.
    """
    raw = load_rows(spec, split=data_cfg.split, key=key)
    if data_cfg.max_rows is not None:
        total = len(raw.rows) + len(raw.bad)
        raw = raw.head(data_cfg.max_rows)
        if total > data_cfg.max_rows:
            log(f"{raw.source}: using the first {data_cfg.max_rows} of {total} rows (data.max_rows)")
    columns = dict(data_cfg.columns)
    if columns:
        check_mapped_columns(raw.column_names(), columns, raw.source)
    if margin_column is not None and margin_column not in raw.column_names():
        raise DataError(
            f"{raw.source}: reward.margin_column is '{margin_column}', but there is no such column; the columns "
            f"are: {', '.join(raw.column_names())}"
        )
    renamed = [(number, rename_columns(row, columns)) for number, row in raw.rows]
    names = list(dict.fromkeys(name for _, row in renamed for name in row))
    sample = _sample_row(renamed)
    if data_cfg.layout == "auto":
        layout = detect_layout(names, sample, raw.source)
        log(f"{raw.source}: layout {layout} (detected from the columns {', '.join(names)})")
    else:
        layout = data_cfg.layout
        log(f"{raw.source}: layout {layout} (set by data.layout)")
    chat = uses_chat(layout, sample)

    rows: list[dict[str, Any]] = []
    bad = list(raw.bad)
    for number, row in renamed:
        try:
            margin = {"margin": require_number(row, margin_column)} if margin_column is not None else {}
            rows.append({"number": number, **normalise_row(row, layout, chat=chat), **margin})
        except RowProblem as problem:
            bad.append(BadRow(raw.source, raw.unit, number, problem.reason, problem.detail))
    bad.sort(key=lambda b: b.number)
    handle_bad_rows(bad, data_cfg.on_bad_row, log)
    if not rows:
        raise DataError(f"{key}: {raw.source} has no usable rows")
    duplicates = len(rows) - len({_identity(row) for row in rows})
    if duplicates:
        unit = "rows" if layout in SINGLE_LAYOUTS else "pairs"
        log(f"{raw.source}: {duplicates} {unit} repeat an earlier one exactly; they are kept (and so weigh more)")
    return Canonical(raw.source, raw.unit, layout, chat, rows, bad, duplicates)


def _overlap(rows: list[dict[str, Any]], others: list[dict[str, Any]]) -> int:
    """How many of ``rows`` are also in ``others``."""
    seen = {_identity(row) for row in others}
    return sum(_identity(row) in seen for row in rows)


def _identity(row: dict[str, Any]) -> str:
    """What makes two canonical rows the same example (everything but the row number)."""
    return json.dumps({k: v for k, v in row.items() if k != "number"}, sort_keys=True, ensure_ascii=False)


def _sample_row(rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """A row to read value types from: for each field, its first non-null value."""
    sample: dict[str, Any] = {}
    for _, row in rows:
        for name, value in row.items():
            if sample.get(name) is None:
                sample[name] = value
    return sample


def split_rows(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int, source: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split off ``eval_fraction`` of the rows (at least one when the fraction is positive), seeded.

    Both parts keep the file's order, so a split is reproducible from the file, the fraction and the seed.
    """
    n_eval = round(len(rows) * eval_fraction)
    if eval_fraction > 0:
        n_eval = max(n_eval, 1)
    if n_eval >= len(rows):
        raise DataError(
            f"{source}: {len(rows)} usable row(s) are too few to split off data.eval_fraction {eval_fraction}; "
            "add rows, lower data.eval_fraction, or name a separate data.eval"
        )
    in_eval = np.zeros(len(rows), dtype=bool)
    in_eval[np.random.default_rng([seed, 2]).permutation(len(rows))[:n_eval]] = True
    return [r for r, e in zip(rows, in_eval) if not e], [r for r, e in zip(rows, in_eval) if e]


def _tokenized_split(
    name: str,
    rows: list[dict[str, Any]],
    canonical: Canonical,
    tokenizer: Any,
    data_cfg: Any,
    settings: dict[str, Any],
    template: str | None,
    template_label: str,
    cache_dir: Path,
    log: Callable[[str], None],
) -> tuple[datasets.Dataset, dict[str, Any], dict[str, np.ndarray]]:
    key = key_of({**settings, "rows": rows_hash(rows)})
    paired = canonical.layout not in SINGLE_LAYOUTS
    sides = ("chosen", "rejected") if paired else ("completion",)

    def tokenize():
        return _tokenize(rows, canonical, tokenizer, data_cfg, sides, template, template_label,
                         unpaired=settings["unpaired"], seed=settings["seed"], log=log, name=name, key=key,
                         with_kl=not settings.get("completions", False))

    # An empty split is built at once and never cached: datasets cannot load an empty saved dataset back.
    if not rows:
        return tokenize()
    said: set[str] = set()  # a damaged entry is reported once

    def say_once(message: str) -> None:
        if message not in said:
            said.add(message)
            log(message)

    cached = _cached_split(cache_dir, key, name, canonical, say_once)
    if cached is not None:
        return cached
    lock = entry_lock(cache_dir, key, log)
    try:
        cached = _cached_split(cache_dir, key, name, canonical, say_once)  # written meanwhile by another process
        if cached is not None:
            return cached
        dataset, meta, arrays = tokenize()
        with _quiet_datasets():
            save_entry(cache_dir, key, dataset, meta, arrays)
        return dataset, meta, arrays
    finally:
        lock.release()


def _cached_split(cache_dir: Path, key: str, name: str, canonical: Canonical, log: Callable[[str], None]
                  ) -> tuple[datasets.Dataset, dict[str, Any], dict[str, np.ndarray]] | None:
    """A verified cache entry, or None (a miss, or a damaged entry: said, and tokenized again)."""
    try:
        cached = load_entry(cache_dir, key)
    except DamagedEntry as exc:
        log(f"{name}: the tokenized-data cache entry {cache_dir / key} does not match its checksums ({exc}); "
            "tokenizing again")
        return None
    if cached is None:
        return None
    dataset, meta, arrays = cached
    dataset._fingerprint = meta["fingerprint"]
    log(f"{name}: {meta['count']} tokenized {_unit(canonical)} reused from the cache ({cache_dir / key})")
    return dataset, meta, arrays


@contextmanager
def _quiet_datasets():
    """Silence datasets' bookkeeping progress bars (flatten, cast, save); tokenization keeps its own bar."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _unit(canonical: Canonical) -> str:
    return "rows" if canonical.layout in SINGLE_LAYOUTS else "pairs"


def _tokenize(
    rows: list[dict[str, Any]],
    canonical: Canonical,
    tokenizer: Any,
    data_cfg: Any,
    sides: tuple[str, ...],
    template: str | None,
    template_label: str,
    *,
    unpaired: bool,
    seed: int | None,
    log: Callable[[str], None],
    name: str,
    key: str,
    with_kl: bool = True,
) -> tuple[datasets.Dataset, dict[str, Any], dict[str, np.ndarray]]:
    unit = _unit(canonical)
    if not rows:
        empty = UNPAIRED_FEATURES if unpaired else PAIRED_FEATURES
        dataset = datasets.Dataset.from_dict({k: [] for k in empty}, features=empty)
        meta = {"count": 0, "truncated": 0, "dropped": 0, "fingerprint": content_hash(dataset.data.table)}
        dataset._fingerprint = meta["fingerprint"]
        return dataset, meta, {"prompt": np.zeros(0, np.int64), "completion": np.zeros(0, np.int64)}

    log(f"{name}: tokenizing {len(rows)} {unit}")
    row_tokenizer = RowTokenizer(
        tokenizer,
        sides=sides,
        chat_template=template,
        template_label=template_label,
        max_length=data_cfg.max_length,
        max_prompt_length=data_cfg.max_prompt_length,
        truncation=data_cfg.truncation,
        source=canonical.source,
        unit=canonical.unit,
    )
    source = datasets.Dataset.from_list(rows)
    workers = data_cfg.num_proc if data_cfg.num_proc > 1 and len(rows) >= 2 * data_cfg.num_proc else None
    mapped = source.map(
        row_tokenizer,
        batched=True,
        num_proc=workers,
        remove_columns=[c for c in source.column_names if c not in ("number", "label", "margin")],
        features=_map_features(sides, with_label="label" in source.column_names,
                               with_margin="margin" in source.column_names),
        new_fingerprint=key,
        desc=f"tokenizing {name}",
    )
    columns = mapped.with_format("numpy", columns=["number", "truncated", "dropped", "prompt_length"])[:]
    dropped = columns["dropped"].astype(bool)
    if dropped.any():
        numbers = ", ".join(str(n) for n in columns["number"][dropped][:20])
        log(
            f"{name}: dropped {int(dropped.sum())} {unit} whose completion truncation left with no token "
            f"({canonical.unit}s {numbers}{', ...' if dropped.sum() > 20 else ''} of {canonical.source})"
        )
    arrays = {
        "prompt": columns["prompt_length"].astype(np.int64),
        "completion": np.concatenate(
            [mapped.with_format("numpy", columns=[f"{s}_length"])[:][f"{s}_length"] for s in sides]
        ).astype(np.int64),
    }
    kept = mapped.select(np.flatnonzero(~dropped)) if dropped.any() else mapped
    with _quiet_datasets():
        if not unpaired:
            dataset = _paired_dataset(kept)
        else:
            dataset = _unpaired_dataset(kept, paired=canonical.layout not in SINGLE_LAYOUTS, seed=seed,
                                        max_length=data_cfg.max_length, with_kl=with_kl)
    meta = {
        "count": len(kept),
        "truncated": int(columns["truncated"].astype(bool).sum()),
        "dropped": int(dropped.sum()),
        "fingerprint": content_hash(dataset.with_format("arrow")[:]),
    }
    dataset._fingerprint = meta["fingerprint"]
    return dataset, meta, arrays


def _map_features(sides: tuple[str, ...], *, with_label: bool, with_margin: bool = False) -> datasets.Features:
    features = {
        "number": datasets.Value("int64"),
        "prompt_ids": IDS,
        "prompt_length": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "dropped": datasets.Value("bool"),
    }
    for side in sides:
        features[f"{side}_ids"] = IDS
        features[f"{side}_length"] = datasets.Value("int32")
    if with_label:
        features["label"] = datasets.Value("bool")
    if with_margin:
        features["margin"] = datasets.Value("float64")
    return datasets.Features(features)


def _paired_dataset(kept: datasets.Dataset) -> datasets.Dataset:
    margin = ["margin"] if "margin" in kept.column_names else []
    columns = kept.select_columns(["prompt_ids", "chosen_ids", "rejected_ids", *margin]).flatten_indices()
    features = datasets.Features({**PAIRED_FEATURES, "margin": datasets.Value("float64")}) if margin else PAIRED_FEATURES
    return columns.add_column("index", np.arange(len(kept), dtype=np.int64)).cast(features)


def _unpaired_dataset(kept: datasets.Dataset, *, paired: bool, seed: int | None, max_length: int,
                      with_kl: bool = True) -> datasets.Dataset:
    """Unpaired rows; ``with_kl`` false (supervised fine-tuning) leaves every KL completion empty."""
    seed = 0 if seed is None else seed
    if paired:
        columns = kept.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
        rows = pairs_to_unpaired(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], seed)
    else:
        rows = kept.select_columns(["prompt_ids", "completion_ids", "label"]).to_dict()
    rows["kl_completion_ids"] = (kl_completions(rows["prompt_ids"], rows["completion_ids"], seed, max_length) if with_kl
                                 else [[] for _ in rows["completion_ids"]])
    rows["index"] = list(range(len(rows["label"])))
    return datasets.Dataset.from_dict(rows, features=UNPAIRED_FEATURES)
