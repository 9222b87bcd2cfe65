"""The command line: demo, inspect, replay, on real files; error paths; replay agrees with scan."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import subprocess
import sys

import matplotlib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn.cli.main import main
from ckptfn.cli.replay import plot_replay, replay
from ckptfn.cli.history import load_config_file, load_history
from ckptfn.core.metrics import MISSING

from tests.cli.tables import footer, table_rows
from tests.strategies import configs, logical_histories

matplotlib.use("Agg")

CONFIG_YAML = """\
strategies:
  - metric_name: val_loss
    filename: best_loss.pt
  - metric_name: loss_components.concordance
    filename: best_concordance.pt
    min_delta: 1e-3
  - metric_name: val_corr
    mode: max
    filename: best_corr.pt
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def history_csv(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(
        "val_loss,loss_components.concordance,val_corr\n"
        "1.0,0.5,0.1\n"
        "0.8,0.6,\n"
        "0.9,0.3,0.4\n"
        "nan,0.2995,0.2\n"
    )
    return path


@pytest.fixture
def config_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML)
    return path


# --- demo ------------------------------------------------------------------------------


def test_demo_trains_saves_and_prints_the_inspect_table(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--output-dir", str(tmp_path / "run"), "--epochs", "6", "--seed", "1")
    assert code == 0
    lines = out.splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 6
    assert "saved: best_loss.pt, best_concordance.pt, best_corr.pt" in epoch_lines[0]
    assert f"$ ckptfn inspect {tmp_path / 'run'}" in out
    table = out[out.index("$ ckptfn inspect"):]
    for name in ("best_loss.pt", "best_concordance.pt", "best_corr.pt", "last.pt"):
        assert name in table
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith("best_corr_")) == [
        "best_concordance.pt", "best_corr.pt", "best_loss.pt", "last.pt"]


def test_demo_default_output_dir_is_a_new_run_directory_under_cwd(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "demo", "--epochs", "1")[0] == 0
    (run_dir,) = (tmp_path / "ckpt-demo").iterdir()
    assert run_dir.name.startswith("run-") and (run_dir / "last.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-demo"]  # nothing else written


def test_demo_rejects_bad_epochs(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--epochs", "0", "--output-dir", str(tmp_path))
    assert code == 2 and "--epochs must be >= 1" in err


# --- inspect ---------------------------------------------------------------------------


@pytest.fixture
def checkpoint_dir(tmp_path):
    manager = ckptfn.CheckpointManager(tmp_path / "ckpt", [
        {"metric_name": "val_loss", "filename": "best_loss.pt"},
        {"metric_name": "val_corr", "mode": "max", "filename": "best_corr.pt", "overwrite": False}])
    for epoch, (loss, corr) in enumerate([(1.0, 0.1), (0.5, 0.3), (0.7, 0.4)]):
        manager.update({"val_loss": loss, "val_corr": corr}, {"epoch": epoch}, epoch)
    (tmp_path / "ckpt" / "notes.txt").write_text("not a checkpoint")
    return tmp_path / "ckpt"


def test_inspect_table_marks_archives_and_explains_broken_files(checkpoint_dir, capsys):
    code, out, _ = run(capsys, "inspect", str(checkpoint_dir))
    assert code == 0
    rows = table_rows(out)
    assert len(rows) == 4  # best_corr + 2 archived + best_loss; notes.txt is not a checkpoint
    assert sum("[archived]" in row for row in rows) == 2
    (index,) = [i for i, row in enumerate(rows) if row.startswith("best_loss.pt")]
    assert rows[index].split()[:4] == ["best_loss.pt", "1", "-", "val_loss=0.5"]  # no step recorded: "-"
    # the epoch-1 snapshot is also best_corr.pt's archived version: one file, two names, listed together
    assert rows[index + 1].startswith("= best_corr_") and rows[index + 1].split()[2:] == ["[archived]", "val_corr=0.3"]
    assert footer(out).endswith("; 1 other entry skipped (not checkpoints)")
    code, out, _ = run(capsys, "inspect", str(checkpoint_dir / "notes.txt"))  # named: always a row
    (notes,) = table_rows(out)
    assert notes.startswith("notes.txt") and "unreadable: not a ckptfn checkpoint" in notes


def test_inspect_json(checkpoint_dir, capsys):
    code, out, _ = run(capsys, "inspect", "--json", str(checkpoint_dir / "best_corr.pt"), str(checkpoint_dir / "notes.txt"))
    rows = json.loads(out)
    assert code == 0 and [r["file"] for r in rows] == ["best_corr.pt", "notes.txt"]
    assert rows[0]["epoch"] == 2 and rows[0]["global_step"] is None and rows[0]["saves"] == [
        {"metric_name": "val_corr", "mode": "max", "filename": "best_corr.pt", "value": 0.4, "previous": 0.3,
         "epoch": 2, "global_step": None}]
    assert rows[0]["metrics"] == {"val_loss": 0.7, "val_corr": 0.4} and rows[0]["kind"] == "ckptfn"
    assert rows[0]["archived"] is False and rows[0]["size"] > 0 and rows[0]["error"] is None
    assert rows[1]["error"].startswith("not a ckptfn checkpoint")


def test_inspect_missing_path_is_one_line_on_stderr(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2 and out == "" and err.count("\n") == 1 and "no such file or directory" in err


# --- replay ----------------------------------------------------------------------------


def test_replay_csv(history_csv, config_yaml, capsys):
    code, out, _ = run(capsys, "replay", str(history_csv), "--config", str(config_yaml), "--json")
    result = json.loads(out)
    assert code == 0
    assert [(s["epoch"], s["filename"]) for s in result["saves"]] == [
        (0, "best_loss.pt"), (0, "best_concordance.pt"), (0, "best_corr.pt"),
        (1, "best_loss.pt"), (2, "best_concordance.pt"), (2, "best_corr.pt")]
    assert result["bests"]["best_concordance.pt"]["value"] == 0.3  # 0.2995 is within min_delta=1e-3 (YAML float)
    code, out, _ = run(capsys, "replay", str(history_csv), "--config", str(config_yaml))
    assert "epoch    2: best_corr.pt" in out and "final bests:" in out


def test_replay_jsonl_with_nested_metrics_and_epoch_column(tmp_path, config_yaml, capsys):
    path = tmp_path / "history.jsonl"
    rows = [{"epoch": 10, "val_loss": 1.0, "loss_components": {"concordance": 0.5}, "val_corr": 0.1},
            {"epoch": 11, "val_loss": 0.9, "loss_components": {"concordance": 0.6}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    code, out, _ = run(capsys, "replay", str(path), "--config", str(config_yaml), "--json")
    assert code == 0
    assert [(s["epoch"], s["filename"]) for s in json.loads(out)["saves"]] == [
        (10, "best_loss.pt"), (10, "best_concordance.pt"), (10, "best_corr.pt"), (11, "best_loss.pt")]


def test_replay_plot_has_one_panel_per_metric_and_markers_at_saves(history_csv, config_yaml, tmp_path, capsys):
    out_png = tmp_path / "replay.png"
    code, _, _ = run(capsys, "replay", str(history_csv), "--config", str(config_yaml), "--plot", str(out_png))
    assert code == 0 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = ckptfn.Config.from_mapping(load_config_file(config_yaml))
    history = load_history(history_csv)
    figure = plot_replay(replay(history, config), config)
    assert len(figure.axes) == 3
    saves_per_panel = [sum(len(c.get_offsets()) for c in axis.collections) for axis in figure.axes]
    assert saves_per_panel == [2, 2, 2]
    curve = figure.axes[0].lines[0]  # val_loss over the rows that have a finite value
    assert list(curve.get_xdata()) == [0, 1, 2] and list(curve.get_ydata()) == [1.0, 0.8, 0.9]


@pytest.mark.parametrize(
    "files, message",
    [
        ({"h.csv": None, "c.yaml": CONFIG_YAML}, "h.csv: no such history file"),
        ({"h.csv": "val_loss\n1.0\nabc\n", "c.yaml": CONFIG_YAML}, "h.csv: line 3: column 'val_loss': 'abc' is not a number"),
        ({"h.csv": "val_loss,val_loss\n1,2\n", "c.yaml": CONFIG_YAML}, "column 'val_loss' appears twice"),
        ({"h.csv": "val_loss\n1\n", "c.yaml": "strategies:\n  - metric_name: val_los\n"},
         "strategies[0].metric_name: 'val_los' never appears in"),
        ({"h.csv": "val_loss\n1\n", "c.yaml": "strategies:\n  - metric_name: val_loss\n    mode: maximum\n"},
         "c.yaml: strategies[0].mode: 'maximum' is not one of 'min', 'max'"),
        ({"h.csv": "val_loss\n1\n", "c.yaml": "strategies: [\n"}, "c.yaml: invalid YAML"),
        ({"h.csv": "val_loss\n1\n", "c.yaml": "enabled: false\n"}, "nothing to replay"),
        ({"h.jsonl": "{\"val_loss\": 1}\n[1, 2]\n", "c.yaml": CONFIG_YAML}, "h.jsonl: line 2: expected a JSON object"),
        ({"h.jsonl": "{oops\n", "c.yaml": CONFIG_YAML}, "h.jsonl: line 1: invalid JSON"),
        ({"h.txt": "x", "c.yaml": CONFIG_YAML}, "unknown history format '.txt'"),
    ],
)
def test_replay_errors_are_one_clear_line(tmp_path, capsys, files, message):
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / name
        if content is not None:
            paths[name].write_text(content)
    history, config = list(paths.values())
    code, out, err = run(capsys, "replay", str(history), "--config", str(config))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def write_history(logical, path, fmt):
    if fmt == "csv":
        names = sorted({name for epoch in logical for name in epoch})
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(names)
            for epoch in logical:
                writer.writerow(["" if epoch[n] is MISSING else repr(epoch[n]) for n in names])
    else:
        with open(path, "w") as file:
            for epoch in logical:
                row: dict = {}
                for name, value in epoch.items():
                    if value is MISSING:
                        continue
                    *parents, leaf = name.split(".")
                    node = row
                    for part in parents:
                        node = node.setdefault(part, {})
                    node[leaf] = value if math.isfinite(value) else str(value)
                file.write(json.dumps(row) + "\n")


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs(), data=st.data(), fmt=st.sampled_from(["csv", "jsonl"]))
def test_replay_agrees_with_scan(tmp_path, capsys, config, data, fmt):
    names = sorted({s.metric_name for s in config.strategies})
    logical = data.draw(logical_histories(names, max_size=12).filter(lambda h: len(h) > 0))
    if fmt == "jsonl":  # JSON has no NaN/inf literals: those rows are written as strings and must be rejected
        logical = [{k: (v if v is MISSING or math.isfinite(v) else MISSING) for k, v in e.items()} for e in logical]
    present = {name for epoch in logical for name, value in epoch.items() if value is not MISSING}
    history_path = tmp_path / f"history.{fmt}"
    config_path = tmp_path / "config.json"
    write_history(logical, history_path, fmt)
    config_path.write_text(json.dumps({"on_missing": config.on_missing, "strategies": [
        {"metric_name": s.metric_name, "mode": s.mode, "filename": s.filename, "min_delta": s.min_delta}
        for s in config.strategies]}))
    code, out, err = run(capsys, "replay", str(history_path), "--config", str(config_path), "--json")
    if not set(names) <= present:
        assert code == 2 and "never appears" in err
        return
    assert code == 0, err
    # the reference: scan over the decisions (the rows with a watched metric), each at its row's index
    rows = [{k: v for k, v in e.items() if v is not MISSING} for e in logical]
    decisions = [(index, row) for index, row in enumerate(rows) if row]
    _, per_step = ckptfn.scan(ckptfn.init(config), [row for _, row in decisions], [index for index, _ in decisions])
    expected = [(a.epoch, a.filename, a.value) for actions in per_step for a in actions if isinstance(a, ckptfn.Save)]
    result = json.loads(out)
    assert [(s["epoch"], s["filename"], s["value"]) for s in result["saves"]] == expected
    assert result["rows"] == len(rows) and result["decisions"] == len(decisions)


# --- the installed entry points --------------------------------------------------------


def test_help_for_every_command(capsys):
    for sub in ([], ["demo"], ["inspect"], ["replay"]):
        with pytest.raises(SystemExit) as info:
            main([*sub, "--help"])
        assert info.value.code == 0 and "usage: ckptfn" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[sys.executable, "-m", "ckptfn"], [str(pathlib.Path(sys.executable).parent / "ckptfn")]])
def test_installed_entry_points(command, tmp_path):
    result = subprocess.run([*command, "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("ckptfn inspect: error:") and "Traceback" not in result.stderr
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from ckptfn.cli.main import _Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = _Progress(4, stream)
        progress.line("epoch 0")
        progress.bar(1)
        progress.finish()
    assert "[########......................] epoch 1/4" in terminal.getvalue() and "\r" in terminal.getvalue()
    assert pipe.getvalue() == "epoch 0\n"


def test_replay_and_inspect_with_a_periodic_save(tmp_path, history_csv, capsys):
    config = tmp_path / "every.yaml"
    config.write_text("strategies:\n  - metric_name: val_loss\n  - every_n_epochs: 2\n    filename: last.pt\n")
    code, out, err = run(capsys, "replay", str(history_csv), "--config", str(config), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [(s["epoch"], s["filename"]) for s in result["saves"] if s["filename"] == "last.pt"] == [(1, "last.pt"), (3, "last.pt")]
    assert result["bests"]["last.pt"] == {"every_n_epochs": 2, "epoch": 3, "global_step": None}
    code, out, _ = run(capsys, "replay", str(history_csv), "--config", str(config))
    assert "epoch    3: last.pt                  every 2 epochs" in out and "last saved at epoch 3" in out

    manager = ckptfn.CheckpointManager(tmp_path / "run", ckptfn.Config.from_mapping(load_config_file(config)))
    for epoch, loss in enumerate([1.0, 0.5]):
        manager.update({"val_loss": loss}, {}, epoch)
    code, out, _ = run(capsys, "inspect", str(tmp_path / "run" / "last.pt"))
    assert code == 0 and "val_loss=0.5, every 2 epochs" in out


def test_inspect_lists_sharded_checkpoint_directories(tmp_path, capsys):
    manager = ckptfn.CheckpointManager(tmp_path, [{"metric_name": "val_loss", "filename": "best_loss.pt"}], sharded=True)
    manager.update({"val_loss": 0.25}, {"w": __import__("torch").ones(3)}, 4)
    code, out, _ = run(capsys, "inspect", "--json", str(tmp_path))
    (row,) = json.loads(out)
    assert code == 0 and row["file"] == "best_loss.dcp" and row["epoch"] == 4 and row["error"] is None
    assert row["saves"][0]["value"] == 0.25 and row["size"] > 0
