"""The reference log-prob cache: keys, file checks, interrupted precomputes, agreement with full logits,
and a second run that never runs the reference model."""

from __future__ import annotations

import gc
import json
import os
import shutil
import weakref
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpo.reference.setup as reference_setup
from dpo.cli import main
from dpo.data import collate_paired, prepare_data
from dpo.model import LogprobSettings, add_lora, load_base_model, load_tokenizer
from dpo.recipe import recipe_from_dict
from dpo.reference.compute import compute_and_store, compute_reference_logps, reference_mismatches
from dpo.reference.fingerprint import HashIndex, IdentityError, folder_identity
from dpo.reference.setup import reference_keys, reference_logps, reference_store
from dpo.reference.store import CacheFileError, ReferenceStore
from tests.helpers import build_tiny_model, write_jsonl, write_pairs, write_recipe

QUIET = lambda _: None  # noqa: E731


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """One tiny Llama and one small pair set shared by the tests that do not modify them."""
    root = tmp_path_factory.mktemp("reference-assets")
    model = build_tiny_model(root / "model")
    train, eval_ = write_pairs(root / "data", train=24, eval=12)
    return {"model": model, "train": train, "eval": eval_, "root": root}


def recipe_tree(assets: dict, cache: Path, **sections) -> dict:
    tree = {
        "model": {"path": str(assets["model"])},
        "data": {"train": str(assets["train"]), "eval": str(assets["eval"]), "max_length": 64,
                 "max_prompt_length": 48},
        "lora": {"r": 4, "alpha": 8},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 0.003, "log_every": 1, "seed": 0},
        "reference": {"batch_size": 8, "cache_dir": str(cache)},
        "output": {"dir": str(cache.parent / "out")},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return tree


def make_recipe(assets: dict, cache: Path, **sections):
    return recipe_from_dict(recipe_tree(assets, cache, **sections))


def prepared(recipe, unpaired: bool = False):
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=unpaired, seed=recipe.train.seed, log=QUIET)
    return tokenizer, data, partial(collate_paired, pad_token_id=tokenizer.pad_token_id)


def keys_of(recipe, unpaired: bool = False) -> tuple[str, str]:
    _, data, _ = prepared(recipe, unpaired)
    keys = reference_keys(recipe, data)
    return keys["train"][0], keys["eval"][0]


class ForwardCounter:
    """Counts the reference forwards that go through ``dpo.reference.setup`` (each is one batch)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        counter = self

        class Counting(reference_setup.SequenceLogprobs):
            def forward(self, batch):
                counter.calls += 1
                return super().forward(batch)

        monkeypatch.setattr(reference_setup, "SequenceLogprobs", Counting)


# ----------------------------------------------------------------------------------- agreement with maths


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_cached_values_equal_a_float64_full_logits_forward(tmp_path, arch):
    """Each cached value is sum_t log_softmax(logits_t)[y_t] over completion tokens, logits from the plain
    transformers forward in float64 (Gemma-2: softcapped logits, which the forward applies itself)."""
    from transformers import AutoModelForCausalLM

    assets = {"model": build_tiny_model(tmp_path / "model", arch=arch),
              **dict(zip(("train", "eval"), write_pairs(tmp_path / "data", train=10, eval=6)))}
    recipe = make_recipe(assets, tmp_path / "cache")
    tokenizer, data, collate = prepared(recipe)
    reference_logps(recipe, data, collate, LogprobSettings(), "cpu", QUIET)
    fingerprint = reference_keys(recipe, data)["train"][0]
    cached = load_file(reference_store(recipe).path(fingerprint))

    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float64).eval()
    for row in data.train:
        for side, name in (("chosen_ids", "first"), ("rejected_ids", "second")):
            ids = torch.tensor([row["prompt_ids"] + row[side]])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            start = len(row["prompt_ids"])  # logits at position t predict token t + 1
            expected = sum(logps[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
            assert cached[name][row["index"]].item() == pytest.approx(expected, abs=2e-4)
            assert cached[f"{name}_tokens"][row["index"]].item() == len(row[side])


# -------------------------------------------------------------------------------------------- the key


def _variant_tokenizer_model(source: Path, target: Path) -> Path:
    """The same weights with a tokenizer that swaps the ids of 'e' and 't' (so the token ids change)."""
    shutil.copytree(source, target)
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
    (target / "tokenizer.json").write_text(json.dumps(spec))
    return target


def test_key_changes_with_every_input_that_changes_the_values(tmp_path, assets):
    cache = tmp_path / "cache"
    base = keys_of(make_recipe(assets, cache))

    changed_rows = [json.loads(line) for line in assets["train"].read_text().splitlines()]
    changed_rows[3]["chosen"] += " indeed"
    other_data = write_jsonl(tmp_path / "train-changed.jsonl", changed_rows)
    other_weights = build_tiny_model(tmp_path / "other-weights", seed=1)
    other_tokenizer = _variant_tokenizer_model(assets["model"], tmp_path / "other-tokenizer")
    variants = {
        "data file content": make_recipe(assets, cache, data={"train": str(other_data)}),
        "tokenizer": make_recipe(assets, cache, model={"path": str(other_tokenizer)}),
        "max_length": make_recipe(assets, cache, data={"max_length": 16, "max_prompt_length": 12}),
        "reference model weights": make_recipe(assets, cache, model={"path": str(other_weights)}),
        "separate reference model": make_recipe(assets, cache, reference={"model_path": str(other_weights)}),
        "dtype": make_recipe(assets, cache, model={"dtype": "bfloat16"}),
    }
    _, truncated, _ = prepared(variants["max_length"])
    assert truncated.stats.truncated > 0  # the shorter limit really cuts rows, so the token ids differ
    for name, recipe in variants.items():
        train_key, eval_key = keys_of(recipe)
        assert train_key != base[0], name
        if name == "data file content":  # only the train file was changed
            assert eval_key == base[1]
        else:
            assert eval_key != base[1], name
    assert keys_of(make_recipe(assets, cache, loss={"name": "kto"}), unpaired=True)[0] != base[0]


def test_key_ignores_training_settings_and_paths(tmp_path, assets):
    cache = tmp_path / "cache"
    base = keys_of(make_recipe(assets, cache))
    copy = shutil.copytree(assets["model"], tmp_path / "copy-of-model")
    same = {
        "learning rate": make_recipe(assets, cache, train={"lr": 0.1}),
        "beta": make_recipe(assets, cache, loss={"beta": 0.7}),
        "loss name (ipo)": make_recipe(assets, cache, loss={"name": "ipo", "beta": 0.1}),
        "output dir": make_recipe(assets, cache, output={"dir": str(tmp_path / "elsewhere")}),
        "lora settings": make_recipe(assets, cache, lora={"r": 16, "alpha": 3.0}),
        "kernel implementation": make_recipe(assets, cache, train={"logprob_impl": "torch", "logprob_chunk_size": 3}),
        # Copies of the same files are the same network wherever they are, named either way.
        "model copy elsewhere": make_recipe(assets, cache, model={"path": str(copy)}),
        "reference named as a separate model": make_recipe(assets, cache, reference={"model_path": str(copy)}),
        # max_length above every example's length truncates nothing: same token ids, same values.
        "max_length that cuts nothing": make_recipe(assets, cache, data={"max_length": 128}),
    }
    for name, recipe in same.items():
        assert keys_of(recipe) == base, name


def test_tokenizer_files_count_only_through_the_token_ids(tmp_path, assets):
    """A re-saved tokenizer that maps text to the same ids (here: another chat template, unused by plain
    prompt/completion text) leaves the key alone; weights are what identify the network."""
    copy = shutil.copytree(assets["model"], tmp_path / "model")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    assert keys_of(make_recipe(assets, cache, model={"path": str(copy)})) == keys_of(make_recipe(assets, cache))


def test_eval_key_holds_the_batch_size_train_key_does_not(tmp_path, assets):
    """Evaluation batches held-out rows as their precompute did; other batch shapes round differently."""
    cache = tmp_path / "cache"
    small, large = (keys_of(make_recipe(assets, cache, reference={"batch_size": b})) for b in (2, 8))
    assert small[0] == large[0] and small[1] != large[1]


def test_file_digests_are_memoized_and_redone_when_a_file_changes(tmp_path, assets):
    folder = shutil.copytree(assets["model"], tmp_path / "model")
    memo = tmp_path / "hashes.json"
    first = HashIndex(memo)
    identity = folder_identity(str(folder), first, "model.path")
    assert {p.name for p in first.hashed} == {"config.json", "model.safetensors"}  # tokenizer files left out
    again = HashIndex(memo)
    assert folder_identity(str(folder), again, "model.path") == identity and again.hashed == []

    # Same size, same mtime, different bytes: the ctime still moves, so the file is hashed again.
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = HashIndex(memo)
    changed = folder_identity(str(folder), third, "model.path")
    assert [p.name for p in third.hashed] == ["model.safetensors"]
    assert changed["files"]["model.safetensors"] != identity["files"]["model.safetensors"]
    assert changed["files"]["config.json"] == identity["files"]["config.json"]


def test_hub_models_are_identified_by_their_snapshot_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--tiny"

    def publish(commit: str) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    publish("a" * 40)
    assert folder_identity("org/tiny", HashIndex(None), "model.path") == {"hub": "org/tiny", "commit": "a" * 40}
    publish("b" * 40)
    assert folder_identity("org/tiny", HashIndex(None), "model.path")["commit"] == "b" * 40
    with pytest.raises(IdentityError, match="model.path: 'org/absent'"):
        folder_identity("org/absent", HashIndex(None), "model.path")


# ------------------------------------------------------------------------------------- the file checks


def _values(n: int) -> dict[str, torch.Tensor]:
    return {"first": -torch.arange(n, dtype=torch.float32), "second": -2 * torch.arange(n, dtype=torch.float32),
            "first_tokens": torch.arange(n) + 1, "second_tokens": torch.arange(n) + 2}


def test_store_round_trip_and_every_rejected_file(tmp_path):
    store = ReferenceStore(tmp_path)
    path = store.save("f" * 40, _values(5), {"why": "test"})
    loaded = store.load("f" * 40, 5)
    assert all(torch.equal(loaded[k], v) for k, v in _values(5).items())
    assert store.load("0" * 40, 5) is None  # no file: a miss
    with pytest.raises(CacheFileError, match="count"):
        store.load("f" * 40, 6)  # another data set with another example count

    shutil.copy(path, store.path("e" * 40))  # a file from another fingerprint under this name
    with pytest.raises(CacheFileError, match="fingerprint"):
        store.load("e" * 40, 5)

    data = path.read_bytes()
    store.path("a" * 40).write_bytes(data.replace(b"f" * 40, b"a" * 40)[:-7])  # truncated
    with pytest.raises(CacheFileError, match="truncated"):
        store.load("a" * 40, 5)

    flipped = bytearray(data.replace(b"f" * 40, b"b" * 40))
    flipped[-3] ^= 0x01  # one bit of one value
    store.path("b" * 40).write_bytes(bytes(flipped))
    with pytest.raises(CacheFileError, match="checksum"):
        store.load("b" * 40, 5)


def test_corrupted_cache_file_is_reported_and_recomputed(tmp_path, assets):
    recipe = make_recipe(assets, tmp_path / "cache")
    _, data, collate = prepared(recipe)
    first, _ = reference_logps(recipe, data, collate, LogprobSettings(), "cpu", QUIET)
    path = reference_store(recipe).path(reference_keys(recipe, data)["train"][0])
    path.write_bytes(path.read_bytes()[:-10])

    messages: list[str] = []
    again, _ = reference_logps(recipe, data, collate, LogprobSettings(), "cpu", messages.append)
    assert any(str(path) in m and "unusable" in m and "truncated" in m for m in messages)
    assert any(m.startswith("reference cache: miss: computing 48 sequences") for m in messages)
    assert torch.equal(again.first, first.first)
    assert reference_store(recipe).load(path.stem, len(data.train)) is not None  # rewritten whole


# ------------------------------------------------------------------------------- interrupted precompute


def _rows(n: int) -> list[dict]:
    # Lengths 1..n so that the longest-first order is fixed; values depend only on the row.
    return [{"index": i, "prompt_ids": [1], "chosen_ids": [5] * (i + 1), "rejected_ids": [6] * (i + 1)}
            for i in range(n)]


def _fake_logp_fn(calls: list[int], fail_at: int | None = None, oom_above: int | None = None):
    def logp_fn(batch):
        b = batch["index"].shape[0]
        if oom_above is not None and b > oom_above:
            raise torch.OutOfMemoryError("fake: out of memory")
        calls.append(b)
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("injected failure")
        counts = (batch["labels"] != -100).sum(dim=1)
        return -0.5 * counts.float() - 0.01 * batch["index"].repeat(2).float(), counts

    return logp_fn


@pytest.mark.parametrize("checkpoint_every_s", [0.0, 3600.0])
def test_interrupted_precompute_leaves_no_acceptable_file_and_resumes(tmp_path, checkpoint_every_s):
    rows, store, fingerprint = _rows(10), ReferenceStore(tmp_path), "c" * 40
    collate = partial(collate_paired, pad_token_id=0)
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="injected"):
        compute_and_store(store, fingerprint, {}, rows, collate, _fake_logp_fn(calls, fail_at=3), 2, "cpu",
                          "train", QUIET, checkpoint_every_s=checkpoint_every_s)
    assert not store.path(fingerprint).exists()
    for leftover in tmp_path.iterdir():  # whatever it left, no name or content passes as the finished entry
        shutil.copy(leftover, store.path(fingerprint))
        with pytest.raises(CacheFileError):
            store.load(fingerprint, len(rows))
    store.path(fingerprint).unlink()

    # Two batches finished before the failure (hourly checkpoints: saved by the failure handler).
    resumed_calls: list[int] = []
    messages: list[str] = []
    resumed = compute_and_store(store, fingerprint, {}, rows, collate, _fake_logp_fn(resumed_calls), 2, "cpu",
                                "train", messages.append, checkpoint_every_s=checkpoint_every_s)
    assert resumed_calls == [2, 2, 2] and "resuming after 8 saved" in messages[0]
    clean = compute_reference_logps(rows, collate, _fake_logp_fn([]), 2, "cpu", log=QUIET)
    assert all(torch.equal(resumed.tensors()[k], clean.tensors()[k]) for k in clean.tensors())
    assert [p.name for p in tmp_path.iterdir()] == [store.path(fingerprint).name]  # progress file removed


def test_out_of_memory_halves_the_batch_and_keeps_every_value(tmp_path):
    rows, collate = _rows(9), partial(collate_paired, pad_token_id=0)
    calls: list[int] = []
    messages: list[str] = []
    result = compute_reference_logps(rows, collate, _fake_logp_fn(calls, oom_above=2), 8, "cpu", log=messages.append)
    assert calls == [2, 2, 2, 2, 1]
    assert any("out of memory at 8" in m for m in messages) and any("out of memory at 4" in m for m in messages)
    # The fake value is -0.5 per token - 0.01 * index; tokens = index + 1 on both sides.
    index = torch.arange(9, dtype=torch.float32)
    assert torch.allclose(result.first, -0.5 * (index + 1) - 0.01 * index)
    assert torch.equal(result.second_tokens, torch.arange(9) + 1)


# ------------------------------------------------------------------------------------ runs and the CLI


def test_second_run_never_runs_the_reference_and_trains_identically(tmp_path, assets, monkeypatch):
    import dpo.train.loop as trainer

    counter = ForwardCounter(monkeypatch)
    cache = tmp_path / "cache"
    messages: list[str] = []
    trainer.train(make_recipe(assets, cache, output={"dir": str(tmp_path / "one")}), log=messages.append)
    first_calls = counter.calls
    assert first_calls > 0 and any("reference cache: miss" in m for m in messages)

    messages.clear()
    loads: list[str] = []
    monkeypatch.setattr(reference_setup, "load_base_model", lambda *a, **k: loads.append("load"))
    trainer.train(make_recipe(assets, cache, output={"dir": str(tmp_path / "two")}), log=messages.append)
    assert counter.calls == first_calls and loads == []  # the reference never ran nor loaded
    assert sum("reference cache: hit" in m for m in messages) == 2

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert records("one") == records("two")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_cache_command_fills_the_cache_for_a_later_training_run(tmp_path, assets, monkeypatch, capsys):
    cache = tmp_path / "cache"
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe_tree(assets, cache, output={"dir": str(tmp_path / "run")}))
    main(["cache", str(recipe_path)])
    printed = capsys.readouterr().out
    assert "reference cache: miss: computing 48 sequences" in printed
    assert not (tmp_path / "run").exists()  # nothing trained
    assert len(list(cache.glob("*.safetensors"))) == 2

    counter = ForwardCounter(monkeypatch)
    main([str(recipe_path)])
    assert counter.calls == 0
    assert "reference cache: hit" in capsys.readouterr().out
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    # Values from the stand-alone precompute equal the trainer's own: every held-out pair ties before training.
    assert final["eval_before"]["rewards/accuracies"] == 0.5


def test_precompute_only_option_and_reference_free_losses(tmp_path, assets, capsys):
    cache = tmp_path / "cache"
    tree = recipe_tree(assets, cache, output={"dir": str(tmp_path / "run")})
    main([str(write_recipe(tmp_path / "recipe.yaml", tree)), "--precompute-only"])
    assert len(list(cache.glob("*.safetensors"))) == 2 and not (tmp_path / "run").exists()
    tree["loss"] = {"name": "simpo"}
    main(["cache", str(write_recipe(tmp_path / "simpo.yaml", tree))])
    assert "needs no reference log-probs" in capsys.readouterr().out


def test_verify_reference_passes_on_a_good_cache_and_stops_on_a_stale_one(tmp_path, assets, capsys):
    cache = tmp_path / "cache"
    recipe = make_recipe(assets, cache)
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe_tree(assets, cache))
    main(["cache", str(recipe_path)])
    main(["cache", str(recipe_path), "--verify-reference", "5"])
    assert "verified 5 random examples (10 sequences)" in capsys.readouterr().out

    # A stale entry: a well-formed file (valid checksum) whose values are not this model's.
    _, data, _ = prepared(recipe)
    store, fingerprint = reference_store(recipe), reference_keys(recipe, data)["train"][0]
    tensors = load_file(store.path(fingerprint))
    tensors["first"] = tensors["first"] + 0.5
    store.save(fingerprint, tensors, {})
    with pytest.raises(SystemExit) as info:
        main(["cache", str(recipe_path), "--verify-reference", "1000"])  # every example
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "differ from the cached values" in error and str(store.path(fingerprint)) in error


def test_verification_tolerance_grows_with_the_square_root_of_length():
    cached = _values(2)
    fresh = {k: v.clone() for k, v in cached.items()}
    from dpo.reference.compute import ReferenceLogps

    # first_tokens = [1, 2]: tolerance 1e-3 * sqrt(1) and 1e-3 * sqrt(2) = 1.414e-3.
    fresh["first"] = fresh["first"] + torch.tensor([0.9e-3, 1.5e-3])
    problems = reference_mismatches(ReferenceLogps(**cached), ReferenceLogps(**fresh), [0, 1], 1e-3)
    assert len(problems) == 1 and problems[0].startswith("example 1 (first)")
    fresh["second_tokens"] = fresh["second_tokens"] + 1
    assert len(reference_mismatches(ReferenceLogps(**cached), ReferenceLogps(**fresh), [0, 1], 1e-3)) == 3


# ------------------------------------------------------------------------------ a separate reference


def test_separate_reference_model_is_loaded_only_on_a_miss_and_freed(tmp_path, assets, monkeypatch):
    other = build_tiny_model(tmp_path / "sft", seed=2)
    recipe = make_recipe(assets, tmp_path / "cache", reference={"model_path": str(other)})
    _, data, collate = prepared(recipe)
    policy = add_lora(load_base_model(recipe.model), recipe.lora)
    loaded: list[weakref.ref] = []
    real_load = reference_setup.load_base_model

    def tracking_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(reference_setup, "load_base_model", tracking_load)
    separate, _ = reference_logps(recipe, data, collate, LogprobSettings(), "cpu", QUIET, policy=policy)
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None  # loaded for the precompute, gone afterwards
    reference_logps(recipe, data, collate, LogprobSettings(), "cpu", QUIET, policy=policy)
    assert len(loaded) == 1  # a hit loads nothing

    base, _ = reference_logps(make_recipe(assets, tmp_path / "cache"), data, collate, LogprobSettings(), "cpu",
                              QUIET, policy=policy)
    assert (separate.first - base.first).abs().max() > 1e-2  # really another network's values


def test_adapter_as_reference_matches_the_merged_model_in_float64(tmp_path, assets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = get_peft_model(load_base_model(make_recipe(assets, tmp_path).model),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "sft-adapter")
    recipe = make_recipe(assets, tmp_path / "cache", reference={"adapter": str(tmp_path / "sft-adapter")})
    assert keys_of(recipe) != keys_of(make_recipe(assets, tmp_path / "cache"))
    _, data, collate = prepared(recipe)
    values, _ = reference_logps(recipe, data, collate, LogprobSettings(), "cpu", QUIET)

    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float64),
                                       tmp_path / "sft-adapter").merge_and_unload().eval()
    for row in list(data.train)[:6]:
        ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(merged(input_ids=ids).logits[0, :-1], dim=-1)
        start = len(row["prompt_ids"])
        expected = sum(logps[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
        assert values.first[row["index"]].item() == pytest.approx(expected, abs=2e-4)


def test_unusable_identity_is_a_clear_model_error(tmp_path, assets):
    from dpo.model import ModelError

    empty = tmp_path / "empty-model"
    empty.mkdir()
    recipe = make_recipe(assets, tmp_path / "cache", reference={"model_path": str(empty)})
    _, data, _ = prepared(make_recipe(assets, tmp_path / "cache"))
    with pytest.raises(ModelError, match="reference.model_path: .* holds no config or weight files"):
        reference_keys(recipe, data)


def test_values_with_a_wrong_dtype_in_the_file_are_rejected(tmp_path):
    store = ReferenceStore(tmp_path)
    path = store.save("d" * 40, _values(3), {})
    with open(path, "rb") as handle:  # keep the metadata, store the counts as int32 instead
        header_size = int.from_bytes(handle.read(8), "little")
        metadata = json.loads(handle.read(header_size))["__metadata__"]
    values = _values(3)
    values["first_tokens"] = values["first_tokens"].int()
    save_file(values, str(path), metadata=metadata)
    with pytest.raises(CacheFileError):
        store.load("d" * 40, 3)
