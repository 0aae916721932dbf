"""Experiment trackers (``output.report_to``): TensorBoard, Weights & Biases and MLflow, through accelerate's
tracker classes (``accelerate.tracking``), with their files inside the run's output folder.

=============  ======================  =================================================================
tracker        files                   mode
=============  ======================  =================================================================
tensorboard    ``OUT/tensorboard/``    event files; a resumed run drops the events after its checkpoint
wandb          ``OUT/wandb/``          offline unless ``WANDB_MODE`` is set (``wandb sync OUT/wandb/offline-run-*``)
mlflow         ``OUT/mlflow/``         MLflow's file store, unless ``MLFLOW_TRACKING_URI`` names another
=============  ======================  =================================================================

The wandb and MLflow folders are recorded in the run marker as folders that hold only what the tracker
wrote, so ``--overwrite`` removes them whole; TensorBoard's event files are recorded one by one.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from dpo.recipe import OutputConfig, RecipeError
from dpo.train import metric_log
from dpo.train.metric_log import TENSORBOARD_DIR

# tracker -> (module it needs, the dpo-train extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
NOT_SCALARS = ("split", "step", "epoch")


def tracker_available(name: str) -> bool:
    """Whether the package a tracker needs can be imported."""
    if name == "tensorboard":
        return metric_log.tensorboard_available()
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def require_trackers(output: OutputConfig) -> None:
    """Refuse a tracker whose package is missing, before anything runs; the message names the extra.

    Raises:
        RecipeError: naming the key (``output.report_to``, or ``output.tensorboard`` where that asked for it).
    """
    for name in output.trackers():
        if tracker_available(name):
            continue
        module, extra = PACKAGES[name]
        if name == "tensorboard" and "tensorboard" not in output.report_to:
            raise RecipeError(f"output.tensorboard: true needs the tensorboard package (pip install "
                              f"'dpo-train[{extra}]'), or set output.tensorboard: false")
        raise RecipeError(f"output.report_to: {name} needs the {module} package (pip install 'dpo-train[{extra}]'), "
                          f"or take {name} out of output.report_to")


def scalars(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tracker values: ``<split>/<metric>`` for every number but the step and
    epoch (non-finite values as they are)."""
    split = record["split"]
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved recipe as ``{"train.lr": 0.003, ...}`` (lists as text), for the trackers' run settings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
    return flat


def start_trackers(names: list[str], out_dir: Path, *, project: str = "dpo-train", config: dict | None = None,
                   resumed_step: int | None = None, run_dir=None) -> list:
    """Start accelerate trackers writing into ``out_dir``; returns them (``log(values, step)``, ``finish()``).

    Args:
        names: trackers, from :meth:`dpo.recipe.OutputConfig.trackers`.
        out_dir: the run's output folder.
        project: the wandb project and MLflow experiment.
        config: the resolved recipe, stored as the run's settings by wandb and MLflow.
        resumed_step: the checkpoint step a resumed run starts from (TensorBoard drops later events).
        run_dir: the output directory's :class:`dpo.train.output_dir.RunDirectory` (records what is written).
    """
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    out_dir = Path(out_dir)
    run_name = out_dir.resolve().name
    settings = flat_config(config or {})
    trackers = []
    for name in names:
        if name == "tensorboard":
            folder = out_dir / TENSORBOARD_DIR
            if run_dir is not None:
                run_dir.mkdir(TENSORBOARD_DIR)
            else:
                folder.mkdir(parents=True, exist_ok=True)
            before = set(os.listdir(folder))
            purge = {"purge_step": resumed_step + 1} if resumed_step is not None else {}
            tracker = TensorBoardTracker(TENSORBOARD_DIR, str(out_dir), **purge)
            tracker.start()
            if run_dir is not None:  # the event file it opened, named by time, host and process
                run_dir.record(files=[f"{TENSORBOARD_DIR}/{n}" for n in sorted(set(os.listdir(folder)) - before)])
        elif name == "wandb":
            import wandb

            if run_dir is not None:
                run_dir.record(scratch=["wandb"])
            kwargs: dict[str, Any] = {"dir": str(out_dir), "name": run_name, "config": settings,
                                      "settings": wandb.Settings(silent=True)}
            if not os.environ.get("WANDB_MODE"):
                kwargs["mode"] = "offline"  # nothing leaves the machine unless the user asks for it
            tracker = WandBTracker(project, **kwargs)
            tracker.start()
        else:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                if run_dir is not None:
                    run_dir.record(scratch=["mlflow"])
                # MLflow 3 keeps its file store working only when asked to; it needs no server or database.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (out_dir / "mlflow").resolve().as_uri()
                # The store's folder is laid out here: MLflow keeps one store object per address, which does not
                # lay it out again after --overwrite removed it (a second run in the same process).
                from mlflow.store.tracking.file_store import FileStore

                FileStore(uri)
                mlflow.set_tracking_uri(uri)
                # set_tracking_uri also exports MLFLOW_TRACKING_URI; a later run in this process (and the test
                # suite's) must find it as the user left it.
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            tracker = MLflowTracker(project, run_name=run_name)
            tracker.start()
            if settings:
                tracker.store_init_configuration(settings)
        trackers.append(tracker)
    return trackers
