"""Training curves: ``OUT/curves.png`` of a run, and ``dpo-train plot`` overlaying several runs.

Read from ``metrics.jsonl`` alone, so a finished run, a running one and one that stopped early all plot
the same way. Eight panels against the optimizer step: loss; preference accuracy (KTO: the reward gap,
desirable minus undesirable); the reward margin; the chosen and rejected (KTO: desirable and undesirable)
rewards; their summed log-probs; the gradient norm before clipping; the learning rate; tokens per second.
Train records are lines, evaluations are points joined by a dashed line in the same colour. With one run,
colours tell the series apart (chosen against rejected); with several, colours tell the runs apart and the
line style the series. A panel no run has a value for says so.

The figures are built with matplotlib's object API (no pyplot state, no display) and returned before they
are saved, so tests read the axes rather than pixels.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dpo.files import write_bytes_atomic, writing

CURVES_FILE = "curves.png"
INSTALL_HINT = "pip install matplotlib (a dependency of dpo-train; it is missing from this environment)"


@dataclass(frozen=True)
class Panel:
    """One plot: its title, y-axis label, and the series it draws as ``(metric key, legend label)``."""

    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]


PANELS = (
    Panel("loss", "loss (nats, averaged per example)", (("loss", "loss"),)),
    Panel("preference accuracy", "fraction of pairs ranked right", (("rewards/accuracies", "accuracy"),)),
    Panel("reward gap (KTO)", "desirable − undesirable reward", (("rewards/gap", "gap"),)),
    Panel("reward margin", "chosen − rejected reward", (("rewards/margins", "margin"),)),
    Panel("implicit rewards", "reward (the loss's own: β·log-ratio for DPO)",
          (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
           ("rewards/desirable", "desirable"), ("rewards/undesirable", "undesirable"))),
    Panel("log-probs", "summed completion log-prob (nats)",
          (("logps/chosen", "chosen"), ("logps/rejected", "rejected"),
           ("logps/desirable", "desirable"), ("logps/undesirable", "undesirable"))),
    Panel("gradient norm", "L2 norm before clipping", (("grad_norm", "grad norm"),)),
    Panel("learning rate", "learning rate", (("lr", "lr"),)),
    Panel("throughput", "tokens / second", (("tokens_per_s", "tokens/s"),)),
)
_LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class RunCurves:
    """The records of one run's ``metrics.jsonl``, split by kind.

    Attributes:
        label: how the run is named in legends (its folder name, and its loss when known).
        train: train records, in step order.
        eval: evaluation records, in step order (step 0 is before training).
    """

    label: str
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)

    def has(self, key: str) -> bool:
        return any(_finite(r.get(key)) for r in self.train + self.eval)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run(run: str | Path, label: str | None = None) -> RunCurves:
    """A run's curves from ``RUN/metrics.jsonl``; KTO's train records get their ``rewards/gap``.

    Raises:
        FileNotFoundError: ``RUN`` has no ``metrics.jsonl``.
    """
    run = Path(run)
    if label is None:
        label = run.resolve().name
        try:
            import yaml

            loss = (yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("loss") or {}
            label += f" ({loss['name']})" if isinstance(loss, dict) and loss.get("name") else ""
        except (OSError, ValueError, ImportError):
            pass
    curves = RunCurves(label)
    with open(run / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            if "rewards/gap" not in record and "rewards/desirable" in record and "rewards/undesirable" in record:
                record["rewards/gap"] = record["rewards/desirable"] - record["rewards/undesirable"]
            (curves.eval if record.get("split") == "eval" else curves.train).append(record)
    curves.train.sort(key=lambda r: r["step"])
    curves.eval.sort(key=lambda r: r["step"])
    return curves


def _points(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in records if key in r and isinstance(r[key], (int, float))]
    return [r["step"] for r in kept], [float(r[key]) for r in kept]


def curves_figure(runs: list[RunCurves]):
    """A matplotlib ``Figure`` with one axes per panel that any run has values for (see :data:`PANELS`).

    Each axes is titled by its panel, its x axis is the optimizer step and its y axis says the quantity
    and unit. Lines are labelled ``"<series>"`` (one run) or ``"<run>: <series>"`` (several), with
    ``", eval"`` appended for evaluation points. With one run a panel of several series has a legend; with
    several runs one legend above the panels names the runs' colours, and a panel of several series has a
    small legend of its line styles.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [p for p in PANELS if any(run.has(key) for run in runs for key, _ in p.series)]
    columns = 4 if len(panels) > 6 else 3
    rows = max(1, math.ceil(len(panels) / columns))
    several = len(runs) > 1
    # Spacing set by hand: a layout engine doubles the time to save the figure.
    figure = Figure(figsize=(4.6 * columns, 3.6 * rows + (0.9 if several else 0.5)))
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.08, top=0.84 if several else 0.9, wspace=0.32,
                           hspace=0.42)
    grid = figure.subplots(rows, columns, squeeze=False)
    colors = [f"C{i}" for i in range(10)]
    for index, axes in enumerate(grid.flat):
        if index >= len(panels):
            axes.set_visible(False)
            continue
        panel = panels[index]
        styles: dict[str, str] = {}
        for run_index, run in enumerate(runs):
            present = [(key, name) for key, name in panel.series if run.has(key)]
            for series_index, (key, name) in enumerate(present):
                color = colors[(run_index if several else series_index) % len(colors)]
                style = _LINE_STYLES[series_index % len(_LINE_STYLES)] if several else "-"
                styles.setdefault(name, style)
                label = f"{run.label}: {name}" if several else name
                steps, values = _points(run.train, key)
                if steps:
                    axes.plot(steps, values, style, color=color, linewidth=1.4, label=label)
                steps, values = _points(run.eval, key)
                if steps:
                    axes.plot(steps, values, "o:", color=color, linewidth=0.7, markersize=4.5,
                              markeredgecolor="black", markeredgewidth=0.5, label=f"{label}, eval")
        axes.set_title(panel.title)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(panel.ylabel)
        axes.grid(alpha=0.3)
        if panel.series[0][0] == "rewards/accuracies":
            axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # chance
        if panel.series[0][0] == "lr":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(styles) > 1 and not several:
            axes.legend(fontsize="small")
        elif len(styles) > 1:
            axes.legend(handles=[Line2D([], [], color="black", linestyle=style, label=name)
                                 for name, style in styles.items()], fontsize="small")
    if several:
        handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=2, label=run.label)
                   for i, run in enumerate(runs)]
        figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncols=min(len(runs), 6),
                      frameon=False)
    title = runs[0].label if not several else " vs ".join(run.label for run in runs)
    figure.suptitle(f"{title}: lines are training (averaged over train.log_every steps), points held-out "
                    "evaluations", fontsize="large")
    return figure


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes (no timestamp in its metadata, so the same curves give the same file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return buffer.getvalue()


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_run_curves(run_dir, log=None) -> Path | None:
    """Draw ``OUT/curves.png`` from ``OUT/metrics.jsonl`` (recorded in the run's marker first), replacing it
    atomically.

    Returns None, writing nothing, where there is nothing to plot yet, or where matplotlib is missing or
    fails (said through ``log``: the curves must never stop a run). A failed write (a full disk) raises
    :class:`dpo.files.WriteFailed`, as every write of a run does.
    """
    metrics = run_dir.root / "metrics.jsonl"
    if not metrics.is_file():
        return None
    if not matplotlib_available():
        if log is not None:
            log(f"note: curves.png not drawn: {INSTALL_HINT}")
        return None
    curves = read_run(run_dir.root)
    if not curves.train and not curves.eval:
        return None
    try:
        data = png_bytes(curves_figure([curves]))
    except Exception as exc:  # a plotting failure costs the picture, never the run
        if log is not None:
            log(f"warning: curves.png not drawn: {type(exc).__name__}: {exc}")
        return None
    path = run_dir.root / CURVES_FILE
    run_dir.record(files=[CURVES_FILE])
    with writing(path, "training curves", len(data)):
        write_bytes_atomic(path, data)
    return path


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """``dpo-train plot``: overlay the curves of ``runs`` on the same axes, saved as ``out`` (PNG).

    Raises:
        ValueError: a run folder has no ``metrics.jsonl``, or matplotlib is missing (the message says how to
            install it).
    """
    if not matplotlib_available():
        raise ValueError(f"dpo-train plot needs matplotlib: {INSTALL_HINT}")
    loaded = []
    for run in runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise ValueError(f"{run}: no metrics.jsonl here; give the output.dir of a dpo-train run")
        loaded.append(read_run(run))
    labels = [run.label for run in loaded]
    for run in loaded:  # two folders of the same name: tell them apart by their path
        if labels.count(run.label) > 1:
            run.label = str(runs[loaded.index(run)])
    out = Path(out)
    data = png_bytes(curves_figure(loaded))
    with writing(out, "the plot", len(data)):
        write_bytes_atomic(out, data)
    return out
