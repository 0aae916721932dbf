"""The benchmark scripts run end to end at tiny shapes on the CPU (their figures mean nothing here; what is
checked is that a GPU run will not stop on a broken script, and that the kernels it times are correct)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, **env: str) -> str:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TQDM_DISABLE": "1", **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def table_rows(text: str) -> dict[str, list[str]]:
    """``name -> cells`` of every Markdown table row (the last one wins for repeated names)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_logprob_bench_times_and_checks_every_path_including_triton_under_the_interpreter():
    out = run_bench("logprob.py", "--device", "cpu", "--n", "150", "--h", "32", "--v", "300",
                    "--warmup", "0", "--repeats", "1", TRITON_INTERPRET="1")
    assert out.count("| dpo.kernels, Triton path |") == 2  # frozen and trainable head
    for section in out.split("Trainable LM head"):
        rows = table_rows(section)
        for name in ("full logits, fp32 log_softmax, gather", "dpo.kernels, PyTorch path", "dpo.kernels, Triton path"):
            ms, ratio, _peak, error = rows[name]
            assert float(ms) > 0 and float(ratio) > 0
            assert float(error) < 1e-2, (name, error)  # bf16 inputs against float64


@pytest.mark.slow
def test_memory_bench_smoke_run_prints_a_row_per_length(tmp_path):
    out = run_bench("memory.py", "--smoke", "--model-dir", str(tmp_path / "model"))
    lengths = [int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", out, flags=re.MULTILINE)]
    assert lengths and lengths == sorted(lengths)
    assert "| tokens per side | peak | estimate |" in out


@pytest.mark.slow
def test_reference_bench_reports_a_miss_and_a_faster_hit():
    out = run_bench("reference.py", "--preset", "tiny", "--pairs", "32", "--hash-mb", "4")
    report = json.loads(out[out.index("{"):])
    first_step = report["start_to_first_step_s"]
    assert first_step["miss"] > 0 and first_step["hit"] > 0


def test_long_line_bench_prepares_a_long_line_and_counts_it_truncated():
    out = run_bench("long_line.py", "--mb", "0.2")
    report = json.loads(out[out.index("{"):])
    assert report["truncated_pairs"] == 1 and report["peak_rss_mib"] > 0 and report["seconds"] > 0


def test_online_memory_bench_prints_the_8b_ppo_recipe_plan():
    out = run_bench("online_memory.py")
    assert "# memory of the online step (estimated peak on a CUDA device, 4-bit base, LoRA r=16)" in out
    assert "reference adapter (frozen)" in out and "fits:" in out and "of 24.00 GiB (model.max_memory_gb)" in out


@pytest.mark.slow
def test_throughput_bench_runs_every_mode_on_the_same_pairs_and_closes_with_the_ratio_line():
    out = run_bench("throughput.py", "--shape", "tiny", "--repeats", "1", "--interleave", "--no-trl")
    rows = table_rows(out)
    first_losses = set()
    for mode in ("padded", "packed", "packed+prefix"):
        seconds, pairs_per_s, tokens_per_s, positions, first_loss, _peak, ratio = rows[mode]
        assert float(seconds) > 0 and float(pairs_per_s) > 0 and float(tokens_per_s.replace(",", "")) > 0
        first_losses.add(first_loss)
    assert len(first_losses) == 1  # the same pairs, the same first step
    positions = {mode: float(rows[mode][3].replace(",", "")) for mode in ("padded", "packed", "packed+prefix")}
    assert positions["packed+prefix"] < positions["packed"] < positions["padded"]
    assert re.fullmatch(r"packed\+prefix vs padded: \d+\.\d\dx pairs/s; vs TRL: n/a", out.strip().splitlines()[-1])


def test_engines_table_gives_every_layout_and_shards_the_70b_base():
    out = run_bench("engines.py", "--models", "Llama-3-8B", "Llama-3-70B")
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| Llama")]
    assert len(rows) == 2 * 8
    peak = {(model.strip(), engine.strip(), int(gpus)): float(step) for model, engine, gpus, step, _ in rows}
    assert peak[("Llama-3-70B", "FSDP2", 2)] < peak[("Llama-3-70B", "one process", 1)] / 1.5
    assert peak[("Llama-3-70B", "FSDP2", 8)] < peak[("Llama-3-70B", "FSDP2", 4)] < peak[("Llama-3-70B", "FSDP2", 2)]
    assert peak[("Llama-3-8B", "DDP", 2)] >= peak[("Llama-3-8B", "one process", 1)]  # the whole model on each GPU
