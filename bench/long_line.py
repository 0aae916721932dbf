"""Benchmark: peak memory and time of ``prepare_data`` on data holding one very long single line.

Run from the repository root:

    python bench/long_line.py --mb 5

Writes 20 short quickstart-style pairs, the first with a prompt of ``--mb`` megabytes on one line, into a
temporary folder and prepares them with the quickstart's character-level tokenizer (one token per character,
the worst case for a long text) and ``max_length`` 512. Prints the process's peak resident memory (it includes
the imported libraries, about 400 MiB) and the time, as JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py would shadow the standard library's tokenize module, which torch imports: this folder must
# not be on the path. The repository root goes first so that `dpo` imports uninstalled.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=5.0, help="size of the long line in megabytes")
    args = parser.parse_args()

    from dpo.data import prepare_data
    from dpo.quickstart import build_tokenizer
    from dpo.recipe import DataConfig

    with tempfile.TemporaryDirectory() as folder:
        rows = [{"prompt": f"Parity of {n}:", "chosen": " even" if n % 2 == 0 else " odd",
                 "rejected": " odd" if n % 2 == 0 else " even"} for n in range(20)]
        rows[0]["prompt"] = "x " * int(args.mb * 500_000) + rows[0]["prompt"]
        data_file = Path(folder) / "pairs.jsonl"
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        config = DataConfig(train=str(data_file), cache_dir=str(Path(folder) / "cache"), max_length=512,
                            max_prompt_length=256)
        start = time.perf_counter()
        data = prepare_data(config, build_tokenizer(), unpaired=False, seed=0, log=lambda _: None)
        elapsed = time.perf_counter() - start
    print(json.dumps({"line_mb": args.mb, "seconds": round(elapsed, 2), "truncated_pairs": data.stats.truncated,
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
