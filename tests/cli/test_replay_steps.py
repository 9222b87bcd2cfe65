"""``ckptfn replay`` as runs are logged: Lightning CSVLogger files, global steps, periodic and top-k strategies, plots."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

import ckptfn
from ckptfn.cli.history import load_history
from ckptfn.cli.main import main
from ckptfn.cli.replay import kept_at_end, plot_replay, replay

matplotlib.use("Agg")

HYDRA_CONFIG = """\
checkpointing:
  strategies:
    - metric_name: val_loss
      filename: best_loss.pt
    - metric_name: val_acc
      mode: max
      top_k: 3
      filename: best_acc.pt
    - every_n_epochs: 1
      filename: last.pt
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def val_loss(step: int) -> float:
    """A validation loss that falls, with a bump at step 59 (not every validation improves)."""
    return round(0.08 + 0.9 * math.exp(-step / 15) + (0.02 if step == 59 else 0.0), 6)


def csvlogger_file(path, epochs: int = 6, steps_per_epoch: int = 20, log_every: int = 5, val_every: int = 10):
    """A metrics.csv as Lightning's CSVLogger writes it (``log_every_n_steps=5``,
    ``val_check_interval=10``): a training row every 5 steps with empty validation cells,
    a validation row every 10 steps with an empty training cell; ``step`` as Lightning logs it."""
    lines = ["epoch,step,train_loss,val_acc,val_loss"]
    for epoch in range(epochs):
        for batch in range(steps_per_epoch):
            step = epoch * steps_per_epoch + batch
            if (step + 1) % log_every == 0:
                lines.append(f"{epoch},{step},{1.0 / (step + 1):.6f},,")
            if (batch + 1) % val_every == 0:
                loss = val_loss(step)
                lines.append(f"{epoch},{step},,{1 - loss:.6f},{loss}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def metrics_csv(tmp_path):
    return csvlogger_file(tmp_path / "metrics.csv")


@pytest.fixture
def hydra_yaml(tmp_path):
    path = tmp_path / "checkpointing.yaml"
    path.write_text(HYDRA_CONFIG)
    return path


VAL_STEPS = [9, 19, 29, 39, 49, 59, 69, 79, 89, 99, 109, 119]


def test_a_csvlogger_file_replays_as_its_validation_decisions(metrics_csv, hydra_yaml, capsys):
    code, out, err = run(capsys, "replay", metrics_csv, "--config", hydra_yaml)
    assert code == 0 and err == ""  # no warning per training row
    assert out.splitlines()[0] == (
        f"replayed 36 rows, 6 epochs, steps 4-119 of {metrics_csv} with 3 strategies; "
        "12 rows with a watched metric (the decisions), 24 training-only")
    assert "epoch    0, step   9: best_loss.pt" in out and "skipped" not in out
    code, out, _ = run(capsys, "replay", metrics_csv, "--config", hydra_yaml, "--json")
    result = json.loads(out)
    assert (result["rows"], result["decisions"], result["epochs"], result["steps"]) == (36, 12, 6, [4, 119])
    assert result["skips"] == []
    loss_saves = [(s["epoch"], s["global_step"]) for s in result["saves"] if s["filename"] == "best_loss.pt"]
    assert loss_saves == [(e, s) for e, s in zip([0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5], VAL_STEPS[:5] + VAL_STEPS[6:])]
    # the periodic save: once per epoch, at its first decision (the rule of Every(n_epochs=1))
    assert [(s["epoch"], s["global_step"]) for s in result["saves"] if s["filename"] == "last.pt"] == [
        (0, 9), (1, 29), (2, 49), (3, 69), (4, 89), (5, 109)]
    assert result["bests"]["best_loss.pt"]["global_step"] == 119


def test_the_step_is_passed_to_step_as_global_step(tmp_path, metrics_csv, capsys):
    config = tmp_path / "steps.yaml"
    config.write_text("strategies:\n  - metric_name: val_loss\n  - every_n_steps: 20\n    filename: last.ckpt\n")
    code, out, err = run(capsys, "replay", metrics_csv, "--config", config, "--json")
    assert code == 0, err
    saves = json.loads(out)["saves"]
    # decided at training rows too (as the Lightning integration does after a batch): the first logged step past each 20
    assert [s["global_step"] for s in saves if s["filename"] == "last.ckpt"] == [24, 44, 64, 84, 104]
    assert json.loads(out)["bests"]["last.ckpt"] == {"every_n_steps": 20, "epoch": 5, "global_step": 104}
    code, out, _ = run(capsys, "replay", metrics_csv, "--config", config)
    assert "epoch    1, step  24: last.ckpt                every 20 steps" in out
    assert "last.ckpt                every 20 steps: last saved at epoch 5, step 104" in out


def test_a_global_step_key_in_json_lines(tmp_path, capsys):
    history = tmp_path / "history.jsonl"
    history.write_text("\n".join(json.dumps(row) for row in [
        {"global_step": 100, "eval": {"loss": 0.5}}, {"global_step": 200, "train_loss": 0.3},
        {"global_step": 300, "eval": {"loss": 0.4}}]) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text("strategies:\n  - metric_name: eval.loss\n")
    code, out, err = run(capsys, "replay", history, "--config", config, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [(s["epoch"], s["global_step"], s["value"]) for s in result["saves"]] == [(0, 100, 0.5), (2, 300, 0.4)]
    assert (result["rows"], result["decisions"], result["epochs"]) == (3, 2, 3)
    code, out, _ = run(capsys, "replay", history, "--config", config)
    assert out.startswith(f"replayed 3 rows, steps 100-300 of {history} with 1 strategy; 2 rows with a watched metric")


@pytest.mark.parametrize("config, message", [
    ("strategies:\n  - every_seconds: 600\n    filename: hourly.pt\n",
     "strategies[0] (every 600 seconds, hourly.pt): a history has no clock"),
    ("strategies:\n  - metric_name: val_loss\n  - every_n_steps: 50\n    filename: last.pt\n",
     "strategies[1] (every 50 steps, last.pt) counts steps, and"),
])
def test_periodic_strategies_replay_cannot_decide_are_one_line(tmp_path, capsys, config, message):
    history = tmp_path / "h.csv"
    history.write_text("epoch,val_loss\n0,1.0\n1,0.5\n")
    (tmp_path / "c.yaml").write_text(config)
    code, out, err = run(capsys, "replay", history, "--config", tmp_path / "c.yaml")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_a_decision_without_its_step_is_one_line(tmp_path, capsys):
    history = tmp_path / "h.csv"
    history.write_text("step,val_loss\n10,1.0\n,0.5\n")
    (tmp_path / "c.yaml").write_text("strategies:\n  - metric_name: val_loss\n  - every_n_steps: 10\n")
    code, _, err = run(capsys, "replay", history, "--config", tmp_path / "c.yaml")
    assert code == 2 and f"{history}: line 3: no 'step' value, and strategies[1] (every 10 steps, last.pt) counts steps" in err


def test_a_metric_missing_before_its_first_save_stops_the_replay_where_the_run_would(tmp_path, capsys):
    history = tmp_path / "h.csv"
    history.write_text("epoch,val_loss,val_acc\n0,1.0,\n1,0.5,0.7\n")
    (tmp_path / "c.yaml").write_text("strategies:\n  - metric_name: val_loss\n  - metric_name: val_acc\n    mode: max\n")
    code, out, err = run(capsys, "replay", history, "--config", tmp_path / "c.yaml")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{history}: line 2: the run would stop here: metric 'val_acc' (best_val_acc.pt) is missing" in err
    (tmp_path / "c.yaml").write_text("on_missing: warn\n" + (tmp_path / "c.yaml").read_text())
    code, out, err = run(capsys, "replay", history, "--config", tmp_path / "c.yaml")
    assert code == 0 and "  best_val_acc.pt          val_acc missing at 1 decision (first at epoch 0)" in out


def test_top_k_replay_keeps_the_k_best_values(tmp_path, capsys):
    history = tmp_path / "h.csv"
    history.write_text("val_acc\n0.50\n0.45\n0.60\n0.55\n0.58\n")
    (tmp_path / "c.yaml").write_text("strategies:\n  - metric_name: val_acc\n    mode: max\n    top_k: 3\n")
    code, out, _ = run(capsys, "replay", history, "--config", tmp_path / "c.yaml", "--json")
    best = json.loads(out)["bests"]["best_val_acc.pt"]
    assert code == 0 and best["value"] == 0.6 and [m["value"] for m in best["others"]] == [0.58, 0.55]
    code, out, _ = run(capsys, "replay", history, "--config", tmp_path / "c.yaml")
    assert "epoch    4: best_val_acc-epoch=4.pt  val_acc 0.58 enters the top 3, beating 0.5\n" in out
    assert "best_val_acc-epoch=0.pt leaves the top 3 (deleted)" in out
    assert "val_acc (max, top 3): 0.6 at epoch 2; then 0.58 (best_val_acc-epoch=4.pt), 0.55 (best_val_acc-epoch=3.pt)" in out


# --- the plot --------------------------------------------------------------------------------


def test_plot_with_a_periodic_strategy_draws_it_on_a_timeline(metrics_csv, hydra_yaml, tmp_path, capsys):
    # was: AttributeError: 'Every' object has no attribute 'metric_name'
    code, out, err = run(capsys, "replay", metrics_csv, "--config", hydra_yaml, "--plot", tmp_path / "r.png")
    assert code == 0, err
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = ckptfn.Config.from_mapping({"strategies": [{"metric_name": "val_loss"},
                                                        {"every_n_epochs": 1, "filename": "last.pt"}]})
    figure = plot_replay(replay(load_history(metrics_csv), config), config)
    metric_panel, timeline = figure.axes[:2]
    assert metric_panel.get_ylabel() == "val_loss" and timeline.get_xlabel() == "step"
    assert [t.get_text() for t in timeline.get_yticklabels()] == ["last.pt (every 1 epoch)"]
    marked = sorted(x for c in timeline.collections for x, _ in c.get_offsets())
    assert marked == [9, 29, 49, 69, 89, 109]


def test_plot_of_a_csvlogger_file_has_a_connected_line_per_metric(metrics_csv, hydra_yaml):
    history = load_history(metrics_csv)
    config = ckptfn.Config.from_mapping({"strategies": [
        {"metric_name": "val_loss", "filename": "best_loss.pt"},
        {"metric_name": "val_acc", "mode": "max", "top_k": 3, "filename": "best_acc.pt"}]})
    result = replay(history, config)
    figure = plot_replay(result, config, "metrics.csv")
    loss_panel, acc_panel = figure.axes[:2]
    # each metric over the rows that have a value: the 12 validations, connected (no NaN gaps)
    curve = loss_panel.lines[0]
    assert list(curve.get_xdata()) == VAL_STEPS
    assert list(curve.get_ydata()) == [val_loss(s) for s in VAL_STEPS]
    assert list(acc_panel.lines[0].get_xdata()) == VAL_STEPS
    assert not any(math.isnan(y) for y in acc_panel.lines[0].get_ydata())
    # the best so far, a step line from each improvement to the last step
    best = loss_panel.lines[1]
    assert best.get_drawstyle() == "steps-post"
    improvements = [s for s in VAL_STEPS if s != 59]
    assert list(best.get_xdata()) == improvements + [119]
    assert list(best.get_ydata()) == [val_loss(s) for s in improvements] + [val_loss(119)]
    # overwrite=True: only the last save's file is there at the end; the others are drawn hollow
    filled, hollow = ([c for c in loss_panel.collections if (tuple(c.get_facecolors()[0][:3]) == (1, 1, 1)) is h]
                      for h in (False, True))
    assert sum(len(c.get_offsets()) for c in filled) == 1 and sum(len(c.get_offsets()) for c in hollow) == 10
    # top-3: the three best values stay filled
    kept = sorted(y for c in acc_panel.collections if tuple(c.get_facecolors()[0][:3]) != (1, 1, 1)
                  for _, y in c.get_offsets())
    assert kept == sorted(sorted(round(1 - val_loss(s), 6) for s in VAL_STEPS)[-3:])
    assert loss_panel.get_xlabel() == "" and figure.axes[1].get_xlabel() == "step"
    assert "metrics.csv: 12 decisions, 36 rows" in figure.texts[0].get_text()


def test_plot_without_steps_uses_epochs(tmp_path):
    history = [{"epoch": e, "val_loss": v} for e, v in enumerate([3.0, 1.0, 2.0, 0.5])]
    config = ckptfn.Config([ckptfn.Strategy("val_loss", overwrite=False, keep=2)])
    figure = plot_replay(replay(history, config), config)
    assert figure.axes[0].get_xlabel() == "epoch" and list(figure.axes[0].lines[0].get_xdata()) == [0, 1, 2, 3]


def test_kept_at_end_follows_overwrite_keep_and_top_k():
    s = ckptfn.Strategy("acc", mode="max", top_k=2)
    result = replay([{"acc": v} for v in (0.5, 0.7, 0.6, 0.65)], ckptfn.Config([s]))
    saves = [a for actions in result.actions for a in actions]
    assert kept_at_end(s, saves, result.final.bests[0]) == (False, True, False, True)
    every = ckptfn.Every(1, overwrite=False, keep=3)
    assert kept_at_end(every, [ckptfn.Periodic(every, e) for e in range(5)], None) == (False, False, True, True, True)


def test_a_training_row_at_a_validated_step_leaves_the_periodic_save_to_the_validation():
    config = ckptfn.Config([ckptfn.Strategy("val_loss"), ckptfn.Every(n_steps=20, filename="last.pt")])
    history = [{"step": 20, "train_loss": 0.9}, {"step": 20, "val_loss": 0.5}, {"step": 45, "train_loss": 0.8}]
    result = replay(history, config)
    assert [[type(a).__name__ for a in actions] for actions in result.actions] == [[], ["Save", "Periodic"], ["Periodic"]]
    assert [p.decision for p in result.positions] == [False, True, False]
