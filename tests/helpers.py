"""Builders for tests: local tokenizers and tiny random-weight models saved with ``save_pretrained``.

Nothing is downloaded; every model is loaded back through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dpo.quickstart import build_tokenizer, make_pairs

__all__ = ["Crash", "build_tokenizer", "build_tiny_gguf", "build_tiny_model", "crash_at_micro_batch", "qlora_recipe", "reference_values",
           "write_jsonl", "write_pairs", "write_recipe", "yes_no_pairs"]


def build_tiny_model(directory: str | Path, arch: str = "llama", *, vocab_size: int | None = None,
                     hidden_size: int = 32, seed: int = 0, sliding_window: int | None = None) -> Path:
    """Save a tiny random model of the given architecture plus the test tokenizer to ``directory``.

    Args:
        directory: where to write (created).
        arch: "llama", "qwen2" (attention biases), "mistral" (a sliding window on every layer, 4096 unless
            ``sliding_window`` says) or "gemma2" (final-logit and attention softcaps, tied head, sliding-window
            layers of 16 tokens, or ``sliding_window``, between full ones).
        vocab_size: defaults to the tokenizer's size.
        hidden_size: width of the tiny model.
        seed: weight initialisation seed.
        sliding_window: the window of mistral's and gemma2's sliding-window layers.
    """
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    directory = Path(directory)
    tokenizer = build_tokenizer()
    vocab = vocab_size or len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        config, cls = LlamaConfig(tie_word_embeddings=False, **common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(tie_word_embeddings=False, **common), Qwen2ForCausalLM
    elif arch == "mistral":
        config = MistralConfig(sliding_window=sliding_window or 4096, tie_word_embeddings=False, **common)
        cls = MistralForCausalLM
    elif arch == "gemma2":
        config = Gemma2Config(head_dim=hidden_size // 4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              sliding_window=sliding_window or 16, tie_word_embeddings=True, **common)
        cls = Gemma2ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


GGUF_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
GGUF_VOCAB_SIZE = len(GGUF_SPECIAL_TOKENS) + 256 + 1  # the specials, one token per byte, one merge ("od")
GGUF_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what a byte-level BPE vocabulary is written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = dict(zip(printable, map(chr, printable))), 0
    for byte in range(256):
        if byte not in characters:
            characters[byte], extra = chr(256 + extra), extra + 1
    return characters


def build_tiny_gguf(directory: str | Path, name: str = "tiny.gguf", *, seed: int = 0,
                    source: str | Path | None = None) -> Path:
    """Write a tiny random Llama as a GGUF checkpoint (float32 tensors), with a byte-level BPE tokenizer, BOS,
    EOS, pad and a chat template in its metadata, as llama.cpp's converter lays a Llama out (q and k rows
    permuted). Returns the file's path.

    Args:
        directory: the model folder (created); the file is ``directory/name``.
        name: the file's name.
        seed: weight initialisation seed.
        source: also save the same network as a safetensors folder here (to compare with).
    """
    import tempfile

    import gguf
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        model = AutoModelForCausalLM.from_pretrained(
            build_tiny_model(source or scratch, vocab_size=GGUF_VOCAB_SIZE, seed=seed))
    config, weights = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def permuted(weight, heads: int):  # llama.cpp's order of rotary halves; transformers undoes it on load
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    alphabet = _byte_alphabet()
    writer = gguf.GGUFWriter(str(directory / name), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(GGUF_VOCAB_SIZE)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(GGUF_SPECIAL_TOKENS + [alphabet[b] for b in range(256)] + ["od"])
    writer.add_token_types([3] * len(GGUF_SPECIAL_TOKENS) + [1] * 257)  # 3: control, 1: normal
    writer.add_token_merges(["o d"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(GGUF_CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        writer.add_tensor(f"blk.{layer}.attn_q.weight",
                          permuted(weights[prefix + "self_attn.q_proj.weight"], config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight",
                          permuted(weights[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads))
        for hf_name, gguf_name in names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weights[f"{prefix}{hf_name}.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return directory / name


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_pairs(directory: str | Path, train: int = 64, eval: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Quickstart-task pairs (train and held-out eval) as jsonl files."""
    directory = Path(directory)
    return (write_jsonl(directory / "train.jsonl", make_pairs(train, seed, numbers=range(10, 500))),
            write_jsonl(directory / "eval.jsonl", make_pairs(eval, seed + 1, numbers=range(500, 1000))))


def write_recipe(path: str | Path, tree: dict) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def reference_values(n: int) -> dict[str, torch.Tensor]:
    """Reference-cache tensors for ``n`` examples, each value distinct."""
    return {"first": -torch.arange(n, dtype=torch.float32), "second": -2 * torch.arange(n, dtype=torch.float32),
            "first_tokens": torch.arange(n) + 1, "second_tokens": torch.arange(n) + 2}


def yes_no_pairs(count: int, seed: int, numbers: range) -> list[dict[str, str]]:
    """Pairs whose chosen answer is always " yes" and rejected " no": learnable in a few steps, and it
    carries to prompts never seen in training."""
    rng = random.Random(seed)
    return [{"prompt": f"Is {n} a number? Answer:", "chosen": " yes", "rejected": " no"}
            for n in rng.sample(list(numbers), count)]


def qlora_recipe(tmp_path: Path, quantization: dict | None = None, **train) -> Path:
    model = build_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "data" / "train.jsonl", yes_no_pairs(32, 0, range(100, 500)))
    write_jsonl(tmp_path / "data" / "eval.jsonl", yes_no_pairs(16, 1, range(500, 999)))
    tree = {
        "model": {"path": str(model), "gradient_checkpointing": True,
                  "quantization": quantization or {"bits": 4, "compute_dtype": "float32"}},
        "data": {"train": str(tmp_path / "data" / "train.jsonl"), "eval": str(tmp_path / "data" / "eval.jsonl"),
                 "max_length": 32, "max_prompt_length": 24},
        "lora": {"r": 8, "alpha": 16},
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 0.02, "warmup_steps": 0, "log_every": 3, "seed": 0,
                  "optimizer": "adamw_8bit", **train},
        "reference": {"batch_size": 16, "cache_dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "out")},
    }
    return write_recipe(tmp_path / "recipe.yaml", tree)


class Crash(Exception):
    """Stands for the process dying (power cut, OOM kill) at the point it is raised."""


def crash_at_micro_batch(monkeypatch, number: int) -> None:
    """Make the ``number``-th training micro-batch (counted from 1) crash the run."""
    import dpo.train.setup as train_setup

    real = train_setup.batch_loss
    seen = []

    def batch_loss(policy, *args):
        if policy.training:
            seen.append(1)
            if len(seen) == number:
                raise Crash(f"killed at micro-batch {number}")
        return real(policy, *args)

    monkeypatch.setattr(train_setup, "batch_loss", batch_loss)


# ---------------------------------------------------------------------------------- several processes

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "recipes" / "accelerate"


def accelerate_env(config: Path, processes: int) -> dict[str, str]:
    """The environment ``accelerate launch --config_file CONFIG --num_processes N`` gives the processes it
    starts, computed by accelerate's own launcher code (so the example configs are what the tests run)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", str(processes),
                                               "-m", "dpo.cli"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config if defaults else [])
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def torchrun(args: list[str], *, config: str | None = None, processes: int = 2, nodes: tuple[int, int] | None = None,
             port: int | None = None, env: dict[str, str] | None = None, background: bool = False):
    """``torchrun ... -m dpo.cli ARGS`` on the CPU (gloo), with the environment of an example accelerate config
    (``recipes/accelerate/CONFIG.yaml``; None: torchrun alone, which is DDP).

    Args:
        args: the dpo-train command line.
        config: the config's name, e.g. "fsdp2".
        processes: processes per node.
        nodes: ``(node_rank, number of nodes)`` for a run over several simulated machines on this one
            (rendezvous on 127.0.0.1:``port``); None for ``--standalone``.
        port: the main process's port with ``nodes``.
        env: more environment variables.
        background: return the ``Popen`` instead of waiting.
    """
    import os
    import subprocess
    import sys

    launch_env = accelerate_env(ACCELERATE_CONFIGS / f"{config}.yaml", processes) if config else {}
    full_env = {**os.environ, **launch_env, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO),
                **(env or {})}
    full_env.pop("ACCELERATE_USE_CPU", None)  # dpo-train picks the CPU itself where there is no GPU
    where = (["--standalone"] if nodes is None else
             ["--nnodes", str(nodes[1]), "--node_rank", str(nodes[0]), "--master_addr", "127.0.0.1",
              "--master_port", str(port)])
    command = [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(processes),
               "-m", "dpo.cli", *args]
    if background:
        return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
