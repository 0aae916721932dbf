"""What a run shows: aligned log lines above one progress bar, the same lines in train.log, the libraries'
noise kept there."""

from __future__ import annotations

import io
import logging
import math
import re
import warnings

from dpo.cli import main
from dpo.train.console import RunConsole, bar_metrics, format_train_line
from tests.train.test_loop import tiny_recipe

RECORD = {"split": "train", "step": 25, "epoch": 0, "loss": 0.69123, "rewards/accuracies": 0.55,
          "rewards/margins": 0.0291, "lr": 0.003, "grad_norm": 1.3391, "tokens_per_s": 6107.2, "bad_steps": 0}


def test_a_log_line_has_every_headline_value_in_fixed_columns():
    line = format_train_line(RECORD, 500, elapsed=62.4)
    assert line == ("step  25/500  loss  0.6912  acc 0.550  margin  +0.029  lr 3.00e-03  grad   1.339  "
                    "tok/s   6,107  0:01:02")
    later = format_train_line({**RECORD, "step": 500, "loss": 0.1, "rewards/margins": -2.5, "grad_norm": 12.25,
                               "tokens_per_s": 11110.0}, 500, elapsed=3725)
    # the same columns start at the same place whatever the values
    for label in ("loss", "acc", "margin", "lr", "grad", "tok/s"):
        assert line.index(f" {label} ") == later.index(f" {label} "), label
    assert later.endswith("1:02:05")


def test_kto_lines_show_the_gap_and_non_finite_values_keep_their_column():
    kto = {"split": "train", "step": 3, "loss": math.nan, "rewards/desirable": 0.5, "rewards/undesirable": -0.25,
           "lr": 1e-3, "grad_norm": math.inf, "tokens_per_s": 10.0, "bad_steps": 2}
    line = format_train_line(kto, 10)
    assert "loss     nan" in line and "gap  +0.750" in line and "grad     inf" in line and "acc" not in line
    assert line.endswith("bad steps 2")
    assert bar_metrics(kto) == {"loss": "nan", "gap": "+0.750"}
    assert bar_metrics(RECORD) == {"loss": "0.6912", "acc": "0.550"}


def test_messages_are_written_above_the_bar_never_glued_to_it():
    screen = io.StringIO()
    console = RunConsole(lambda text: screen.write(text + "\n"), bar_file=screen, force_bar=True)
    console.start_bar(10)
    for step in range(10):
        console.advance()
        if step in (3, 7):
            console.log(f"checkpoint: step {step} saved")
    console.show_metrics(RECORD)
    console.close_bar()
    # Each message starts a line of its own (after the bar was cleared with a carriage return) and ends it.
    pieces = re.split(r"[\r\n]", screen.getvalue())
    assert pieces.count("checkpoint: step 3 saved") == 1 and pieces.count("checkpoint: step 7 saved") == 1
    bars = [p for p in pieces if p.startswith("train ")]
    assert bars and all("saved" not in p for p in bars)
    assert "10/10" in bars[-1] and "loss=0.6912" in bars[-1] and "acc=0.550" in bars[-1]
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", bars[-1])  # elapsed < remaining


def test_library_warnings_and_log_records_go_to_the_log_not_the_terminal(tmp_path):
    shown = []
    before = logging.getLogger("bitsandbytes").handlers[:]
    with RunConsole(shown.append) as console:
        console.log("mine")
        warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    assert shown[0] == "mine" and len(shown) == 2
    assert shown[1].startswith("note: 3 warning(s) and message(s) of the libraries were not shown")
    assert any("a library's FutureWarning" in line for line in console.pending)
    assert any("gemm_4bit_forward" in line for line in console.pending)
    assert logging.getLogger("bitsandbytes").handlers == before  # restored on exit
    verbose = []
    with RunConsole(verbose.append, verbose=True) as console:
        console.library("warning (transformers): shown")
    assert verbose == ["warning (transformers): shown"]


def test_the_run_log_holds_the_terminal_lines_and_is_recorded(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    capsys.readouterr()  # what building the test's model printed (a library's notes) is not the run's
    main([str(recipe)])
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    out = tmp_path / "out"
    log = (out / "train.log").read_text().splitlines()
    assert log[0].startswith("# dpo-train ") and " started " in log[0]
    kept = [line for line in log[1:] if not line.startswith("library ")]
    assert kept == [line for line in printed if not line.startswith("note: ")]
    steps = [line for line in kept if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/4", "4/4"]
    assert "train.log" in (out / ".dpo-train").read_text()
    main([str(recipe), "--resume"])  # a resumed run appends to the same log
    log = (out / "train.log").read_text()
    assert log.count("# dpo-train ") == 2 and " resumed " in log
