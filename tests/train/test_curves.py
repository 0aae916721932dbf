"""curves.png: a figure with the expected panels, axes and lines, read before it is saved."""

from __future__ import annotations

import json

import pytest

from dpo.cli import main
from dpo.train.curves import curves_figure, read_run
from tests.train.test_loop import tiny_recipe


def write_metrics(folder, records, loss="dpo"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "recipe.yaml").write_text(f"loss:\n  name: {loss}\n")
    return folder


PAIRED = [{"split": "eval", "step": 0, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.0,
           "rewards/chosen": 0.0, "rewards/rejected": 0.0, "logps/chosen": -17.0, "logps/rejected": -18.0}] + [
    {"split": "train", "step": s, "loss": 0.7 - 0.1 * s, "rewards/accuracies": 0.5 + 0.1 * s, "rewards/margins": 0.2 * s,
     "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s, "logps/chosen": -17.0 + s, "logps/rejected": -18.0 - s,
     "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 100.0} for s in (1, 2, 3)]


def axes_by_title(figure):
    return {a.get_title(): a for a in figure.axes if a.get_visible()}


def test_one_run_has_every_panel_labelled_with_train_lines_and_eval_points(tmp_path):
    figure = curves_figure([read_run(write_metrics(tmp_path / "run", PAIRED))])
    axes = axes_by_title(figure)
    assert list(axes) == ["loss", "preference accuracy", "reward margin", "implicit rewards", "log-probs",
                          "gradient norm", "learning rate", "throughput"]
    for a in axes.values():
        assert a.get_xlabel() == "optimizer step" and a.get_ylabel()
    assert "nats" in axes["loss"].get_ylabel() and "nats" in axes["log-probs"].get_ylabel()
    lines = {line.get_label(): line for line in axes["implicit rewards"].get_lines()}
    assert list(lines.get("chosen").get_xdata()) == [1, 2, 3]
    assert list(lines["chosen, eval"].get_xdata()) == [0]
    assert list(lines["rejected"].get_ydata()) == pytest.approx([-0.1, -0.2, -0.3])
    loss = {line.get_label(): line for line in axes["loss"].get_lines()}
    assert list(loss["loss"].get_ydata()) == pytest.approx([0.6, 0.5, 0.4]) and list(loss["loss, eval"].get_ydata()) == [0.69]
    assert "run (dpo)" in figure.get_suptitle()


def test_kto_plots_the_gap_and_desirable_rewards(tmp_path):
    records = [{"split": "train", "step": s, "loss": 0.5, "rewards/desirable": 0.2 * s, "rewards/undesirable": -0.1 * s,
                "logps/desirable": -3.0, "logps/undesirable": -4.0, "kl": 0.0, "grad_norm": 1.0, "lr": 1e-3}
               for s in (1, 2)]
    axes = axes_by_title(curves_figure([read_run(write_metrics(tmp_path / "kto", records, "kto"))]))
    assert "preference accuracy" not in axes and "reward gap (KTO)" in axes
    gap = axes["reward gap (KTO)"].get_lines()[0]
    assert list(gap.get_ydata()) == pytest.approx([0.3, 0.6])
    assert {line.get_label() for line in axes["implicit rewards"].get_lines()} == {"desirable", "undesirable"}


def test_several_runs_share_the_axes_each_in_its_colour(tmp_path):
    first = write_metrics(tmp_path / "a", PAIRED)
    second = write_metrics(tmp_path / "b", [dict(r, loss=r["loss"] * 2) for r in PAIRED], "ipo")
    figure = curves_figure([read_run(first), read_run(second)])
    loss = axes_by_title(figure)["loss"]
    labels = [line.get_label() for line in loss.get_lines()]
    assert labels == ["a (dpo): loss", "a (dpo): loss, eval", "b (ipo): loss", "b (ipo): loss, eval"]
    colors = [line.get_color() for line in loss.get_lines()]
    assert colors[0] == colors[1] != colors[2] == colors[3]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["a (dpo)", "b (ipo)"]


@pytest.mark.curves
def test_a_run_draws_curves_png_and_plot_overlays_runs(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, train={"eval_every": 2, "max_steps": 4})
    main([str(recipe)])
    out = tmp_path / "out"
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and "curves.png" in (out / ".dpo-train").read_text()
    main(["plot", str(out), str(out), "--out", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
    assert "curves of 2 run(s)" in capsys.readouterr().out


def test_plot_of_a_folder_without_metrics_is_one_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err
