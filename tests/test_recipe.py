"""Recipe parsing: round trips, overrides, and errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from dpo.recipe import (
    LOSS_CONFIGS,
    MAX_RECIPE_VALUES,
    ModelConfig,
    Recipe,
    RecipeError,
    excerpt,
    load_recipe,
    recipe_from_dict,
    safe_yaml,
)
from tests.helpers import write_recipe

MINIMAL = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "out"}}


def with_(**sections) -> dict:
    tree = {k: dict(v) for k, v in MINIMAL.items()}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


def test_valid_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict(with_(loss={"name": "ipo", "beta": 0.3}, train={"lr": "1e-4", "max_steps": 7}))
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert recipe.loss.name == "ipo" and recipe.loss.beta == 0.3
    assert recipe.train.lr == pytest.approx(1e-4)
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_recipe_is_frozen():
    from pydantic import ValidationError

    recipe = recipe_from_dict(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        recipe.train.lr = 1.0  # type: ignore[misc]


def test_packing_written_as_a_bare_yaml_on_or_off():
    assert recipe_from_dict({**MINIMAL, **safe_yaml("train: {packing: off}", "r.yaml")}).train.packing == "off"
    assert recipe_from_dict({**MINIMAL, "train": {"packing": True}}).train.packing == "on"
    assert recipe_from_dict(MINIMAL).train.packing == "auto"


def test_loss_defaults_to_dpo():
    assert recipe_from_dict(with_(loss={"beta": 0.5})).loss.name == "dpo"


@pytest.mark.parametrize(
    ("tree", "key", "hint"),
    [
        (with_(model={"path": "m", "colour": "red"}), "model.colour", "allowed here: path"),
        (with_(bogus={"a": 1}), "bogus", "unknown key"),
        (with_(train={"lr": "fast"}), "train.lr", "valid number"),
        (with_(train={"lr": -1}), "train.lr", "greater than 0"),
        (with_(train={"batch_size": 0}), "train.batch_size", "greater than or equal to 1"),
        (with_(train={"packing": "yes"}), "train.packing", "'auto', 'on' or 'off'"),
        (with_(train={"max_batch_tokens": 0}), "train.max_batch_tokens", "greater than or equal to 1"),
        (with_(data={"truncation": "middle"}), "data.truncation", "'keep_end' or 'keep_start'"),
        (with_(loss={"name": "ipo", "label_smoothing": 0.1}), "loss.label_smoothing", "it takes: beta, nll_weight"),
        (with_(loss={"name": "robust", "label_smoothing": 0.5}), "loss.label_smoothing", "less than 0.5"),
        (with_(loss={"name": "nope"}), "loss", "'dpo'"),
        (with_(model={"path": "m", "dtype": "float16"}), "model.dtype", "loss_scaler"),
        (with_(loss={"name": "kto"}, train={"batch_size": 1}), "train.batch_size", "at least 2"),
        (with_(data={"max_length": 10, "max_prompt_length": 10}), "max_prompt_length", "smaller than max_length"),
        ({"data": {"train": "t"}, "output": {"dir": "o"}}, "model", "required key is missing"),
        (with_(model={"path": "m", "gguf_file": "/abs/m.gguf"}), "model.gguf_file", "a file name inside the model"),
        (with_(model={"path": "m", "gguf_file": "m.gguf", "quantization": {"bits": 4}}), "model.quantization",
         "dequantized to model.dtype"),
        (with_(reference={"gguf_file": "r.gguf"}), "reference.gguf_file", "set reference.model_path"),
        (with_(eval={"gold": "rules.score"}), "eval.gold", "module:function or path/to/file.py:function"),
        (with_(eval={"gold": "rules:score"}), "eval.gold", "set eval.generate"),
        (with_(eval={"generate": -1}), "eval.generate", "greater than or equal to 0"),
        (with_(train={"sample_every": 0}), "train.sample_every", "greater than or equal to 1"),
        (with_(task="reward", eval={"generate": 4}), "eval.generate", "does not generate"),
        (with_(loss={"name": "dpop", "lambda": -1}), "loss.lambda", "greater than or equal to 0"),
    ],
)
def test_invalid_recipe_names_the_key(tree, key, hint):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(tree, "bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml")
    assert key in message
    assert hint in message


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(path, ["loss.beta=0.25", "train.max_steps=3", "lora.target_modules=[q_proj, v_proj]",
                                "model.quantization.bits=8"])
    assert recipe.loss.beta == 0.25 and recipe.train.max_steps == 3
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model.quantization is not None and recipe.model.quantization.bits == 8
    with pytest.raises(RecipeError, match="train.max_steps"):
        load_recipe(path, ["train.max_steps=zero"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(path, ["loss.beta"])


def test_python_yaml_tags_are_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="evil.yaml"):
        load_recipe(path)
    assert not marker.exists()


def test_anchors_that_share_a_little_are_fine_and_a_bomb_or_a_cycle_is_refused():
    assert safe_yaml("a: &x {b: 1}\nc: *x\nd: [*x, *x]\n", "r") == {"a": {"b": 1}, "c": {"b": 1},
                                                                    "d": [{"b": 1}, {"b": 1}]}
    wide = "a: &a [" + ", ".join(["1"] * 100) + "]\nb: [" + ", ".join(["*a"] * (MAX_RECIPE_VALUES // 100)) + "]\n"
    with pytest.raises(RecipeError, match="aliases expand to more than 10,000 values"):
        safe_yaml(wide, "r.yaml")
    with pytest.raises(RecipeError, match="refer to themselves"):
        safe_yaml("a: &a [*a]\n", "r.yaml")
    with pytest.raises(RecipeError, match="nested too deeply"):
        safe_yaml("[" * 50_000 + "]" * 50_000, "r.yaml")
    assert safe_yaml("", "r") is None


def test_an_excerpt_is_short_whatever_the_value():
    assert excerpt("short") == "'short'"
    assert len(excerpt(list(range(10**6)))) <= 60 and len(excerpt("x" * 10**6)) <= 60
    nested = [[[[list(range(1000))]]]]
    assert len(excerpt(nested)) <= 60


def test_a_recipe_file_is_read_only_up_to_its_bound(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\n" + "#" * 1_000_000 + "\n")
    with pytest.raises(RecipeError, match="over 1 MB"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="cannot read the recipe file"):
        load_recipe(tmp_path)  # a folder


def test_tilde_is_expanded_in_paths_but_not_in_an_inline_template(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = recipe_from_dict(with_(data={"train": "~/t.jsonl", "chat_template": "~{{ x }}"}, output={"dir": "~/o"}))
    assert (recipe.data.train, recipe.output.dir) == (f"{tmp_path}/t.jsonl", f"{tmp_path}/o")
    assert recipe.data.chat_template == "~{{ x }}"
    assert recipe_from_dict(with_(model={"path": "org/model-~1"})).model.path == "org/model-~1"  # a hub id


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_every_loss_has_a_config_and_options_match_the_registry():
    from dpo.losses import LOSSES

    assert set(LOSS_CONFIGS) == set(LOSSES)
    for name, cls in LOSS_CONFIGS.items():
        options = cls(name=name).options()
        assert set(options) == set(LOSSES[name].options), name


def test_resolved_recipe_has_every_default():
    recipe = recipe_from_dict(MINIMAL)
    tree = yaml.safe_load(recipe.to_yaml())
    assert set(tree) == set(Recipe.model_fields)
    assert tree["train"]["seed"] == 0 and tree["lora"]["target_modules"] == "all-linear"


def test_recipe_quantization_dtype_rules(tmp_path):
    assert ModelConfig(path="m", quantization={"compute_dtype": "float32"}).dtype == "float32"
    assert ModelConfig(path="m", dtype="bfloat16", quantization={}).dtype == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype"):
        ModelConfig(path="m", dtype="float32", quantization={"compute_dtype": "bfloat16"})
    recipe_path = write_recipe(tmp_path / "r.yaml", {
        "model": {"path": "m", "quantization": {"bits": 4, "compute_dtype": "float16"}},
        "data": {"train": "t.jsonl"}, "output": {"dir": "o"}})
    with pytest.raises(RecipeError, match="loss_scaler"):  # float16 compute needs loss scaling like float16 weights
        load_recipe(recipe_path)
    with pytest.raises(RecipeError, match="quantization.bits"):
        load_recipe(recipe_path, ["model.quantization.bits=3"])


def test_reward_recipe_refuses_loss_settings_and_round_trips():
    import yaml

    base = {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": "o"}}
    recipe = recipe_from_dict({**base, "task": "reward", "reward": {"margin_column": "gap", "center_weight": 0.01}})
    assert recipe.reward.margin_column == "gap" and recipe.reward.center_weight == 0.01
    # a resolved recipe holds every section, the other task's at its defaults: it loads back as it was
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    policy = recipe_from_dict(base)
    assert recipe_from_dict(yaml.safe_load(policy.to_yaml())) == policy
    with pytest.raises(RecipeError, match="takes no loss section"):
        recipe_from_dict({**base, "task": "reward", "loss": {"beta": 0.2}})
    with pytest.raises(RecipeError, match="used only with task: reward"):
        recipe_from_dict({**base, "reward": {"center_weight": 0.1}})
    with pytest.raises(RecipeError, match="reward.center_weight"):
        recipe_from_dict({**base, "task": "reward", "reward": {"center_weight": -1}})


def test_online_and_sft_recipes_check_their_sections_and_round_trip():
    base = {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": "o"}}
    online = {"reward_model": "runs/rm", "gold": "dpo.quickstart:gold"}
    ppo = recipe_from_dict({**base, "task": "ppo", "online": online})
    assert ppo.online.generation.samples_per_prompt == 1 and ppo.online.ppo_epochs == 1
    assert recipe_from_dict(yaml.safe_load(ppo.to_yaml())) == ppo
    rloo = recipe_from_dict({**base, "task": "rloo", "online": {**online, "advantage": "grpo",
                                                                "generation": {"samples_per_prompt": 4}}})
    assert recipe_from_dict(yaml.safe_load(rloo.to_yaml())) == rloo
    sft = recipe_from_dict({**base, "task": "sft", "data": {"train": "t", "layout": "demonstrations"}})
    assert recipe_from_dict(yaml.safe_load(sft.to_yaml())) == sft
    refused = [
        ({**base, "task": "ppo"}, "online: task: ppo needs an online section"),
        ({**base, "online": online}, "online: this section is used only with task: ppo or rloo"),
        ({**base, "task": "rloo", "online": online}, "rloo needs at least 2 samples per prompt"),
        ({**base, "task": "ppo", "online": {**online, "advantage": "grpo"}}, "online.advantage: used only with task: rloo"),
        ({**base, "task": "rloo", "online": {**online, "gae_lambda": 0.9, "generation": {"samples_per_prompt": 2}}},
         "online.gae_lambda: used only with task: ppo"),
        ({**base, "task": "ppo", "online": {**online, "gold": "no_colon"}}, "online.gold: expected module:function"),
        ({**base, "task": "ppo", "online": online, "loss": {"beta": 0.2}}, "task: ppo takes no loss section"),
        ({**base, "task": "ppo", "online": online, "reference": {"model_path": "r"}}, "reference.model_path"),
        ({**base, "task": "sft", "reference": {"adapter": "a"}}, "supervised fine-tuning has no reference"),
        ({**base, "data": {"train": "t", "layout": "demonstrations"}}, "train with task: sft"),
    ]
    for tree, message in refused:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict(tree)


def test_a_start_adapter_is_the_reference_unless_another_is_named():
    base = {"model": {"path": "m", "adapter": "runs/sft/adapter"}, "data": {"train": "t"}, "output": {"dir": "o"}}
    assert recipe_from_dict(base).reference.adapter == "runs/sft/adapter"
    online = {"task": "ppo", "online": {"reward_model": "rm"}}
    assert recipe_from_dict({**base, **online}).reference.adapter == "runs/sft/adapter"
    assert recipe_from_dict({**base, "reference": {"adapter": "other"}}).reference.adapter == "other"
    assert recipe_from_dict({**base, "reference": {"model_path": "ref"}}).reference.adapter is None
    # A reward model or SFT run has no reference: the adapter is only where their training starts.
    assert recipe_from_dict({**base, "task": "reward"}).reference.adapter is None
    assert recipe_from_dict({**base, "task": "sft"}).reference.adapter is None
