"""Command line: ``dpo-train RECIPE [--set key.path=value ...] [--dry-run]``.

The CLI is thin: it loads the recipe, applies overrides and hands over to the module that does the work.
A first argument that is not a command name is a recipe, so ``dpo-train recipe.yaml`` means
``dpo-train train recipe.yaml``.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from dpo.recipe import Recipe, RecipeError, load_recipe


class _DpoTrainGroup(TyperGroup):
    """The ``dpo-train`` command group: a first argument that is not a command (nor ``-h``, ``--help`` or
    ``--version``) is a recipe for ``train``, and the root help is one plain page listing every command
    with its one-line description and an example (the ``Example:`` line of its epilog)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, resume_latest_when_bare(default_to_train(list(args), self.commands)))

    def format_help(self, ctx, formatter) -> None:
        formatter.write(root_help(self.commands))


app = typer.Typer(cls=_DpoTrainGroup, add_completion=False, no_args_is_help=False, invoke_without_command=True,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Offline preference optimization (DPO, IPO, KTO, ...) on LoRA/QLoRA adapters.")
ROOT_OPTIONS = ("-h", "--help", "--version")


def default_to_train(args: list[str], commands) -> list[str]:
    """``dpo-train RECIPE ...`` is ``dpo-train train RECIPE ...``: anything first that is not a command name
    or a root option (``--dry-run recipe.yaml`` too) goes to ``train``."""
    if args and args[0] not in commands and args[0] not in ROOT_OPTIONS:
        return ["train", *args]
    return args


def root_help(commands) -> str:
    """The page ``dpo-train``, ``dpo-train -h`` and ``dpo-train --help`` print."""
    width = max(len(name) for name in commands) + 2
    lines = [f"dpo-train {_version('dpo-train')}: offline preference optimization (DPO, IPO, KTO, ...) on "
             "LoRA/QLoRA adapters.", "",
             "Usage: dpo-train RECIPE [--set KEY.PATH=VALUE ...] [--dry-run] [--resume [PATH]] [--overwrite] "
             "[--verbose]",
             "         train with a recipe (the same as `dpo-train train RECIPE`; `dpo-train train --help` lists "
             "every option)",
             "       dpo-train COMMAND [ARGS] [OPTIONS]", "", "Commands:"]
    for name, command in commands.items():
        if command.hidden:
            continue
        lines.append(f"  {name:<{width}}{command.get_short_help_str(limit=200)}")
        example = command_example(command)
        if example:
            lines.append(f"  {'':<{width}}  e.g. {example}")
    lines += ["", "Options:",
              "  -h, --help  Show this page and exit (`dpo-train COMMAND --help` explains a command's options).",
              "  --version   Print the versions of dpo-train and of the libraries it runs on, and whether CUDA is "
              "available.", ""]
    return "\n".join(lines)


def command_example(command) -> str | None:
    """The example of a command: the text after ``Example:`` in its epilog."""
    epilog = command.epilog or ""
    return epilog.split("Example:", 1)[1].strip() if "Example:" in epilog else None


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def version_report() -> str:
    """What ``dpo-train --version`` prints: dpo-train, Python and each library's version, and CUDA."""
    rows = [("dpo-train", _version("dpo-train")), ("python", sys.version.split()[0])]
    rows += [(name, _version(name)) for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes",
                                                 "triton")]
    try:
        import torch

        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            cuda = (f"available: {torch.cuda.device_count()} device(s), {', '.join(names)} (CUDA "
                    f"{torch.version.cuda})")
        else:
            built = torch.version.cuda
            cuda = (f"not available (torch built for CUDA {built}, but no device is visible)" if built
                    else "not available (a CPU-only torch build)")
    except ImportError:
        cuda = "unknown (torch is not installed)"
    rows.append(("CUDA", cuda))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", is_eager=True, help="Print the versions of dpo-train and "
                                          "of its libraries, and whether CUDA is available.")] = False,
) -> None:
    """Offline preference optimization (DPO, IPO, KTO, ...) on LoRA/QLoRA adapters."""
    if version:
        typer.echo(version_report())
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:  # bare `dpo-train`: the same page as --help
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe (see recipes/ for examples).",
                                           show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY.PATH=VALUE",
                 help="Override one recipe value, e.g. --set loss.beta=0.2 --set train.max_steps=50. "
                      "Values are read as YAML. Repeatable."),
]

CompareSetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY.PATH=VALUE",
                 help="Override one compare-file value, e.g. --set generation.seed=1 --set models.1.run=runs/x "
                      "(a number selects a list item). Values are read as YAML. Repeatable."),
]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show the libraries' own warnings, log messages and progress bars as they come "
                            "(otherwise they go to output.dir/train.log, with a count at the end).")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input or a refused write (shown as one clear message, no traceback)."""
    from dpo.data import DataError
    from dpo.files import WriteFailed
    from dpo.model import ModelError
    from dpo.reference import ReferenceMismatchError
    from dpo.reward import GoldError
    from dpo.train import CheckpointError
    from dpo.train.engine import EngineError

    return (RecipeError, ModelError, DataError, CheckpointError, ReferenceMismatchError, WriteFailed, GoldError,
            EngineError)


@contextmanager
def _stopped_by_user() -> Iterator[None]:
    """Ctrl-C outside the training loop (which checkpoints and exits by itself) ends with status 130 and one
    line, not a traceback: nothing is half-written, every cache and checkpoint is complete or absent."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("\nerror: stopped by SIGINT; every file written so far is complete (an unfinished cache or "
                   "checkpoint is never used)", err=True)
        raise typer.Exit(code=128 + signal.SIGINT) from None


def _load(recipe: Path, overrides: list[str] | None) -> Recipe:
    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        _fail(str(exc))


PrecomputeOpt = Annotated[bool, typer.Option(
    "--precompute-only", help="Fill the reference log-prob cache and stop (same as `dpo-train cache RECIPE`).")]
VerifyOpt = Annotated[int | None, typer.Option(
    "--verify-reference", metavar="K", min=1, show_default=False,
    help="Recompute K random cached reference examples at start-up; stop with an error if any differs beyond "
         "tolerance (same as --set reference.verify=K).")]


def _with_verify(overrides: list[str] | None, verify: int | None) -> list[str]:
    return [*(overrides or []), *([f"reference.verify={verify}"] if verify is not None else [])]


def _precompute(recipe: Recipe, log=typer.echo) -> None:
    from dpo.reference import precompute_references

    paths = precompute_references(recipe, log=log)
    for split, path in paths.items():
        log(f"reference cache ({split}): {path}")


@app.command("train", epilog="Example: dpo-train recipes/quickstart.yaml --set train.max_steps=100")
def train_command(
    recipe: RecipeArg,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Make every check the run makes (output folder, every "
                                          "path, loss options, memory plan), load the tokenizer and data, and print "
                                          "the resolved recipe, token statistics and the plan (steps, epochs, "
                                          "warmup, evaluations, checkpoints); write nothing, train nothing.")] = False,
    resume: Annotated[str | None, typer.Option(
        "--resume", metavar="[PATH]", show_default=False,
        help="Continue from the latest complete checkpoint in output.dir, or from the checkpoint folder PATH "
             "(put it after RECIPE). Refused when a setting that changes the result differs.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --resume: resume even though settings that "
                                        "change the result differ from the checkpoint's (listed as a warning).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start afresh in a non-empty output.dir, deleting "
                                            "a previous run's outputs there (nothing else).")] = False,
    precompute_only: PrecomputeOpt = False,
    verify_reference: VerifyOpt = None,
    verbose: VerboseOpt = False,
    processes: Annotated[int, typer.Option(
        "--processes", min=1, metavar="N", help="With --dry-run: the memory plan per GPU of a run over N "
        "processes (GPUs).")] = 1,
    engine: Annotated[str | None, typer.Option(
        "--engine", metavar="NAME", show_default=False, help="With --dry-run: the engine of that run, ddp, zero2, "
        "fsdp2 or zero3 (default: ddp with --processes N > 1).")] = None,
) -> None:
    """Train a LoRA adapter with the recipe's task: a preference loss, a reward model, SFT, PPO or RLOO (the
    default command: `dpo-train RECIPE`).

    Other commands: cache, merge, score, compare, pairs (`dpo-train COMMAND --help` explains each).
    """
    from dpo.model.memory import ENGINES

    if (processes != 1 or engine is not None) and not dry_run:
        _fail("--processes and --engine only shape the --dry-run memory plan; a run's engine and process count "
              "come from how it is launched (accelerate launch --config_file ..., torchrun)")
    engine = engine or ("ddp" if processes > 1 else "single")
    if engine not in ENGINES:
        _fail(f"--engine {engine}: one of {', '.join(ENGINES)}")
    loaded = _load(recipe, _with_verify(set_, verify_reference))
    from dpo.train.console import RunConsole

    try:
        with _stopped_by_user(), RunConsole(typer.echo, verbose=verbose) as console:
            if dry_run:
                dry_run_report(loaded, recipe_file=recipe, resume=resume, overwrite=overwrite, force=force,
                               log=console.log, engine=engine, processes=processes)
                return
            if precompute_only:
                _precompute(loaded, console.log)
                return
            from dpo.train import TrainingStopped, train

            try:
                train(loaded, resume=resume, force=force, overwrite=overwrite, recipe_file=recipe, console=console)
            except TrainingStopped as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(code=exc.exit_code) from None
    except _user_errors() as exc:
        _fail(str(exc))


@app.command("cache", epilog="Example: dpo-train cache recipes/quickstart.yaml")
def cache_command(recipe: RecipeArg, set_: SetOpt = None, verify_reference: VerifyOpt = None,
                  verbose: VerboseOpt = False) -> None:
    """Compute the recipe's reference log-probs into the cache without training.

    Files are named by a fingerprint of the reference model, its dtype and quantization, the reference
    adapter and the tokenized data, so a later `dpo-train RECIPE` (on this machine, or on another one
    given the same cache folder) finds them without running the reference model.
    """
    loaded = _load(recipe, _with_verify(set_, verify_reference))
    from dpo.train.console import RunConsole

    try:
        with _stopped_by_user(), RunConsole(typer.echo, verbose=verbose) as console:
            _precompute(loaded, console.log)
    except _user_errors() as exc:
        _fail(str(exc))


def dry_run_report(recipe: Recipe, recipe_file: Path | None = None, resume: str | None = None,
                   overwrite: bool = False, force: bool = False, log=typer.echo, engine: str = "single",
                   processes: int = 1) -> None:
    """Print the resolved recipe, what the data looks like once tokenized, the memory plan (per GPU under
    ``engine`` over ``processes`` GPUs) and the step plan (steps, epochs, warmup, evaluations, checkpoints),
    after the checks a real run makes before training (every input path, the output directory and its lock,
    the checkpoint to resume from, the trackers)."""
    from dpo.data import prepare_data
    from dpo.losses import get_loss
    from dpo.model import load_tokenizer
    from dpo.recipe import ONLINE_TASKS
    from dpo.train import preflight
    from dpo.train.plan import format_plan, plan_steps

    log("# resolved recipe")
    log(recipe.to_yaml())
    log("# output")
    log(preflight(recipe, resume=resume, overwrite=overwrite, force=force, recipe_file=recipe_file))
    if recipe.task in ONLINE_TASKS:
        from dpo.online.memory import describe_online

        log(describe_online(recipe, log=log))
        log("dry run: nothing was trained")
        return
    spec = get_loss(recipe.loss.name)
    paired = spec.paired or recipe.task == "reward"
    tokenizer = load_tokenizer(recipe.model)
    margin_column = recipe.reward.margin_column if recipe.task == "reward" else None
    data = prepare_data(recipe.data, tokenizer, unpaired=not paired, seed=recipe.train.seed, log=log,
                        margin_column=margin_column, completions=recipe.task == "sft")
    log(f"# data (layout: {data.layout})")
    log(data.stats.format())
    log(f"train examples: {len(data.train)}, eval examples: {len(data.eval)}")
    if recipe.task == "preference":
        log(_memory_section(recipe, data.train, engine, processes))
    if not paired and len(data.train):  # the run's own KTO check (dpo.train.setup.preference_setup)
        from dpo.data import kto_balance_warning

        labels, options = data.train["label"], recipe.loss.options()
        warning = kto_balance_warning(sum(labels), len(labels) - sum(labels), options["desirable_weight"],
                                      options["undesirable_weight"])
        if warning:
            log(f"warning: {warning}")
    world = processes if processes > 1 else int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_steps(len(data.train), recipe.train, drop_last=not paired, world=world, has_eval=len(data.eval) > 0)
    unit = "examples" if recipe.task == "sft" else "pairs" if paired else "rows"
    log(format_plan(plan, recipe.train, unit=unit))
    log("dry run: nothing was trained")


def _memory_section(recipe: Recipe, train_rows, engine: str = "single", processes: int = 1) -> str:
    from dpo.model import memory_report

    try:
        return memory_report(recipe, train_rows, engine=engine, processes=processes)[0]
    except (OSError, ValueError, TypeError) as exc:
        return f"# memory\n  no estimate: cannot read the model's config.json ({exc})"


@app.command("merge", epilog="Example: dpo-train merge runs/llama3-8b-qlora --out merged/ --dtype bf16")
def merge_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's output.dir (recipe.yaml and adapter/).",
                                            show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="New directory for the merged model.", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="Weights of the saved model: bf16, fp16 or fp32 (the merge "
                                       "itself runs and is checked in float32).")] = "bf16",
    base: Annotated[str | None, typer.Option("--base", help="The base model (a folder or a .gguf file), if not the "
                                             "recipe's model.path and model.gguf_file.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Merge a run's LoRA adapter into its full-precision base; saves a standard Hugging Face model directory.

    The merge runs on the CPU in float32 (4 bytes a parameter), and the merged model's log-probs are checked
    against base + adapter on sample sequences before anything is saved in --dtype. A GGUF base gives an
    ordinary safetensors folder.
    """
    from dpo.model import MergeError, merge_run
    from dpo.train.console import RunConsole

    try:
        with RunConsole(typer.echo, verbose=verbose) as console:
            merge_run(run_dir, out, dtype=dtype, base_path=base, log=console.log)
    except (MergeError, *_user_errors()) as exc:
        _fail(str(exc))


@app.command("score", epilog="Example: dpo-train score --reward-model runs/reward-quickstart --data answers.jsonl")
def score_command(
    reward_model: Annotated[Path, typer.Option("--reward-model", help="Run directory of a `task: reward` run "
                                               "(its output.dir).", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="Rows with prompt and completion (text, or chat messages): "
                                       ".jsonl, .json, .parquet, .csv or a save_to_disk folder.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="JSON-lines file to write (default: NAME.scores.jsonl "
                                             "beside the data file).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 16,
    verbose: VerboseOpt = False,
) -> None:
    """Score each (prompt, completion) row with a trained reward model; writes each row with a `score` field."""
    import torch

    from dpo.reward import load_reward_run, score_file
    from dpo.train.console import RunConsole

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with RunConsole(typer.echo, verbose=verbose) as console:
            run = load_reward_run(reward_model, device)
            score_file(run, data, out, batch_size, device, log=console.log)
    except _user_errors() as exc:
        _fail(str(exc))


@app.command("compare", epilog="Example: dpo-train compare recipes/compare-quickstart.yaml --set generation.seed=1")
def compare_command(
    config: Annotated[Path, typer.Argument(help="Compare file (see recipes/compare-quickstart.yaml).",
                                           show_default=False)],
    set_: CompareSetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Compare models side by side: reward, win rate, preference accuracy, KL drift, length, diversity."""
    from dpo.compare import CompareError, load_compare_config, run_compare
    from dpo.train.console import RunConsole

    try:
        loaded = load_compare_config(config, set_ or [])
        with RunConsole(typer.echo, verbose=verbose) as console:
            run_compare(loaded, source=str(config), log=console.log)
    except (*_user_errors(), CompareError) as exc:
        _fail(str(exc))


@app.command("plot", epilog="Example: dpo-train plot runs/quickstart-dpo runs/quickstart-ipo --out dpo-vs-ipo.png")
def plot_command(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run folders (each a run's output.dir, "
                                               "holding metrics.jsonl).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("curves.png"),
) -> None:
    """Draw the training curves of one or more runs on the same axes (loss, accuracy, rewards, ...).

    Each run also draws its own OUT/curves.png at every evaluation and at its end.
    """
    from dpo.train.curves import plot_runs

    try:
        path = plot_runs(runs, out)
    except (ValueError, *_user_errors()) as exc:
        _fail(str(exc))
    typer.echo(f"curves of {len(runs)} run(s) written to {path}")
@app.command("pairs", epilog="Example: dpo-train pairs recipes/quickstart.yaml --prompts recipes/quickstart/data/eval.jsonl --scorer dpo.quickstart:gold --k 4 --out pairs.jsonl")
def pairs_command(
    model: Annotated[str, typer.Argument(metavar="RECIPE_OR_MODEL", show_default=False, help=(
        "What to sample from: a recipe (its base model), a finished run's output.dir (base + adapter), an adapter "
        "folder, a model folder or a .gguf file."))],
    prompts: Annotated[Path, typer.Option("--prompts", show_default=False, help=(
        "Prompts: rows with only prompt (text or chat messages), or any supported data file (its unique prompts)."))],
    scorer: Annotated[str, typer.Option("--scorer", show_default=False, help=(
        "A task: reward run's output.dir, or a gold scorer module:function or path/to/file.py:function of (prompt, "
        "completion) -> number (your code: it is imported and run)."))],
    out: Annotated[Path, typer.Option("--out", show_default=False, help="The pairs file to write (JSON lines).")],
    k: Annotated[int, typer.Option("--k", min=2, help="Completions sampled per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy (all k alike).")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per generate call.")] = 8,
    layout: Annotated[str, typer.Option("--layout", help=(
        "auto (explicit for text prompts, conversational for chat prompts), explicit, or conversational (text "
        "prompts become one user message, sampled through the chat template)."))] = "auto",
    min_margin: Annotated[float, typer.Option("--min-margin", min=0.0, help=(
        "Drop a prompt whose best and worst scores differ by no more than this (a tie).")) ] = 0.0,
    keep_unfinished: Annotated[bool, typer.Option("--keep-unfinished", help=(
        "Also use samples cut at --max-new-tokens without an EOS (training would end them with one)."))] = False,
    max_prompt_length: Annotated[int | None, typer.Option("--max-prompt-length", min=1, help=(
        "Prompt tokens kept (their end); default: the recipe's data.max_prompt_length, else 256."))] = None,
    max_prompts: Annotated[int | None, typer.Option("--max-prompts", min=1, help=(
        "Use only the first N unique prompts."))] = None,
    dtype: Annotated[str, typer.Option("--dtype", help=(
        "float32, bfloat16 or float16 for a model folder, file or adapter (a recipe or run uses its own)."))
    ] = "float32",
    base: Annotated[str | None, typer.Option("--base", help="The base model of an adapter folder, if its "
                                             "adapter_config.json does not name a loadable one.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build preference pairs from a model's own samples: k per prompt, scored, best against worst.

    Ties and prompts whose samples all score the same are dropped and counted. Train on the file with
    dpo-train, then sample pairs from the new policy and train again (iterative DPO).
    """
    from dpo.pairs import PairSettings
    from dpo.pairs import pairs_command as build

    if layout not in ("auto", "explicit", "conversational"):
        _fail(f"--layout {layout!r}: use auto, explicit or conversational")
    if dtype not in ("float32", "bfloat16", "float16"):
        _fail(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    settings = PairSettings(k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            batch_size=batch_size, layout=layout, min_margin=min_margin,
                            keep_unfinished=keep_unfinished, max_prompt_length=max_prompt_length,
                            max_prompts=max_prompts)
    from dpo.train.console import RunConsole

    try:
        with _stopped_by_user(), RunConsole(typer.echo, verbose=verbose) as console:
            build(model, str(prompts), scorer, out, settings, dtype=dtype, base=base, overwrite=overwrite,
                  log=console.log)
    except _user_errors() as exc:
        _fail(str(exc))


COMMANDS = {"train"}


def resume_latest_when_bare(args: list[str]) -> list[str]:
    """``--resume`` takes an optional PATH: alone (last, or before another option or the recipe) it means
    the latest checkpoint, spelled ``--resume latest`` for the parser, which wants a value."""
    out = []
    for position, arg in enumerate(args):
        out.append(arg)
        following = args[position + 1] if position + 1 < len(args) else None
        if arg == "--resume" and (following is None or following.startswith("-")
                                  or following.endswith((".yaml", ".yml"))):
            out.append("latest")
    return out


class ForgivingStream(io.TextIOBase):
    """stdout or stderr for the length of a command: text that cannot be written is dropped, not raised.

    With ``dpo-train RECIPE 2>&1 | tee log``, Ctrl-C stops ``tee`` too; every later write would raise
    ``BrokenPipeError`` and end a stopping run before its checkpoint. Here the first failed write points
    the descriptor at ``/dev/null`` (so nothing buffered fails later either) and the run goes on silently.
    """

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.gone = False

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:
        return getattr(self.stream, "errors", None) or "strict"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        try:
            return not self.gone and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # a closed pipe, or a stream closed under us
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._drop()

    def _drop(self) -> None:
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # no descriptor behind it (captured output): dropping is enough


@contextmanager
def forgiving_streams() -> Iterator[None]:
    """Replace ``sys.stdout`` and ``sys.stderr`` with :class:`ForgivingStream` inside the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ForgivingStream(sys.stdout), ForgivingStream(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dpo-train`` script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with forgiving_streams():
            try:
                app(args=args, prog_name="dpo-train")
            except OSError as exc:  # a read or write the stages did not expect to fail: one line, no traceback
                what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
                typer.echo(f"error: {what}", err=True)
                raise SystemExit(2) from None
    except SystemExit as exc:
        # click ends every run with SystemExit; only a failure should leave the function that way.
        if exc.code not in (0, None):
            raise


if __name__ == "__main__":
    main()
