"""Reference log-probs through the cache: the key, agreement with full logits, corrupted files recomputed, a
second run that never runs the reference model, verification, and a separate reference model."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo.reference.setup as reference_setup
from dpo.cli import main
from dpo.data import collate_paired, prepare_data
from dpo.model import LogprobSettings, add_lora, load_base_model, load_tokenizer
from dpo.recipe import recipe_from_dict
from dpo.reference.setup import reference_keys, reference_logps, reference_store
from tests.helpers import build_tiny_model, write_jsonl, write_pairs, write_recipe

QUIET = lambda _: None  # noqa: E731


# --------------------------------------------------------------------------------------------- helpers


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
    """Counts the reference forwards (each is one batch): the calls of every ``logp_fn`` that
    ``dpo.reference.setup`` opens, whether it runs a network of its own or the trainer's step module."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        counter = self
        real = reference_setup.open_reference

        @contextmanager
        def counting(*args, **kwargs):
            with real(*args, **kwargs) as logp_fn:
                def counted(batch):
                    counter.calls += 1
                    return logp_fn(batch)

                yield counted

        monkeypatch.setattr(reference_setup, "open_reference", counting)


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


def test_train_key_is_independent_of_packing_and_the_eval_key_holds_how_rows_are_packed(tmp_path, assets):
    """Packed and padded batches compute the same values, so the train key ignores packing; evaluation
    reproduces the precompute bit for bit only with the same rows, so the eval key holds the layout."""
    cache = tmp_path / "cache"
    off, auto, on, budget = (keys_of(make_recipe(assets, cache, train=train)) for train in (
        {"packing": "off"}, {"packing": "auto"}, {"packing": "on"}, {"packing": "on", "max_batch_tokens": 64}))
    assert off[0] == auto[0] == on[0] == budget[0]
    assert off[1] != auto[1] and auto[1] == on[1] and on[1] != budget[1]


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


def test_a_gguf_base_is_keyed_by_its_own_file_and_a_gguf_reference_by_its(tmp_path, assets):
    from tests.helpers import build_tiny_gguf

    pytest.importorskip("gguf")
    cache, folder = tmp_path / "cache", tmp_path / "gguf"
    build_tiny_gguf(folder, "a.gguf", seed=0)
    build_tiny_gguf(folder, "b.gguf", seed=1)
    gguf_a = make_recipe(assets, cache, model={"path": str(folder), "gguf_file": "a.gguf"})
    _, data, _ = prepared(gguf_a)
    parts = reference_keys(gguf_a, data)["train"][1]
    assert parts["model"]["gguf"] == "a.gguf" and set(parts["model"]["files"]) == {"a.gguf"}
    gguf_b = make_recipe(assets, cache, model={"path": str(folder), "gguf_file": "b.gguf"})
    assert reference_keys(gguf_b, data)["train"][0] != reference_keys(gguf_a, data)["train"][0]
    separate = make_recipe(assets, cache, model={"path": str(folder), "gguf_file": "a.gguf"},
                           reference={"model_path": str(folder), "gguf_file": "b.gguf"})
    assert reference_keys(separate, data)["train"][1]["model"] == reference_keys(gguf_b, data)["train"][1]["model"]
