"""The executor: file integrity, one write per snapshot, overwrite/archive, failures."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import pathlib
import stat
import warnings

import numpy as np
import pytest
import torch

import ckptfn
from ckptfn import CheckpointWriteError, Config, PayloadError, Strategy, execute, init, load_checkpoint, step
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from tests.faults import snapshot_of
from ckptfn.core.naming import parse_temp_name, temp_name

from ckptfn.kit import FileSystem, plan
from tests.faults import FailingFS, NoLinksFS, RecordingFS

UTC = dt.timezone.utc


def clock(second: int) -> dt.datetime:
    return dt.datetime(2026, 11, 29, 13, 15, second, 123456, tzinfo=UTC)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def train_a_bit(model, optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()


def hidden(directory: pathlib.Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".")]


def run_epochs(config, history, directory, payload_for=lambda epoch: {"epoch": epoch}):
    state, written = init(config), []
    for epoch, metrics in enumerate(history):
        state, actions = step(state, metrics)
        written.append(execute(actions, payload_for(epoch), directory, state=state, metrics=metrics, now=clock(epoch)))
    return state, written


# --- file integrity ------------------------------------------------------------------------


def test_saved_file_is_complete_and_restores_model_and_optimizer_exactly(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_a_bit(model, optimizer)
    strategy = Strategy("val_loss", filename="best_loss.pt")
    state, actions = step(init(strategy), {"val_loss": 0.31, "loss_components": {"mse": 0.2}}, epoch=7)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7}
    (path,) = execute(actions, payload, tmp_path, state=state, metrics={"val_loss": 0.31, "loss_components": {"mse": 0.2}}, now=clock(0))
    assert path == tmp_path / "best_loss.pt"

    raw = torch.load(path, weights_only=True)  # plain torch, safe mode
    assert set(raw) == {"state_dict", "metadata"}

    restored = tiny_model(seed=1)
    restored.load_state_dict(raw["state_dict"]["model"])
    probe = torch.randn(32, 4)
    assert torch.equal(restored(probe), model(probe))

    restored_opt = torch.optim.Adam(restored.parameters(), lr=1e-2)
    restored_opt.load_state_dict(raw["state_dict"]["optimizer"])
    torch.manual_seed(5)
    train_a_bit(model, optimizer, 2)
    torch.manual_seed(5)
    train_a_bit(restored, restored_opt, 2)
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)

    meta = raw["metadata"]
    assert meta["format"] == "ckptfn/1"
    assert meta["epoch"] == 7
    assert meta["timestamp"] == "2026-11-29T13:15:00.123456+00:00"
    assert meta["saves"] == [
        {"metric_name": "val_loss", "mode": "min", "filename": "best_loss.pt", "overwrite": True,
         "min_delta": 0.0, "value": 0.31, "previous": None, "epoch": 7, "global_step": None}
    ]
    assert meta["metrics"] == {"val_loss": 0.31, "loss_components.mse": 0.2}
    assert meta["manager_state"] == state.to_dict()
    assert meta["versions"] == {"ckptfn": ckptfn.__version__, "torch": str(torch.__version__)}
    assert all(type(v) is str for v in meta["versions"].values())
    assert ckptfn.restore(strategy, meta["manager_state"]) == state


def test_metadata_holds_only_plain_types(tmp_path):
    state, actions = step(init(Strategy("m")), {"m": np.float32(0.5)})
    metrics = {"m": torch.tensor(0.5), "n": np.float64(2.0), "text": "ignored", "vec": torch.ones(3)}
    (path,) = execute(actions, {}, tmp_path, state=state, metrics=metrics)
    meta = ckptfn.read_metadata(path)

    def plain(x):
        if isinstance(x, dict):
            return all(type(k) is str and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return type(x) in (str, int, float, bool, type(None))

    assert plain(meta)
    assert meta["metrics"] == {"m": 0.5, "n": 2.0}
    dt.datetime.fromisoformat(meta["timestamp"])  # ISO-8601


def test_payload_conversions_and_rejections(tmp_path):
    state, actions = step(init(Strategy("m")), {"m": 1.0})
    payload = {"epoch": np.int64(3), "rng": np.random.default_rng(0).bit_generator.state["state"]["state"],
               "where": pathlib.Path("/runs/7"), "arr": np.arange(3)}
    (path,) = execute(actions, payload, tmp_path)
    loaded, _ = load_checkpoint(path)
    assert loaded["epoch"] == 3 and type(loaded["epoch"]) is int
    assert loaded["where"] == "/runs/7"
    assert torch.equal(loaded["arr"], torch.arange(3))

    before = sorted(os.listdir(tmp_path))
    for bad, key in [({"scheduler": {"fn": lambda e: e}}, "payload['scheduler']['fn']"),
                     ({"when": dt.datetime.now()}, "payload['when']"),
                     ({"ok": 1, "obj": object()}, "payload['obj']")]:
        state, actions = step(state, {"m": state.bests[0].value - 1})
        with pytest.raises(PayloadError) as info:
            execute(actions, bad, tmp_path)
        assert key in str(info.value)
        assert isinstance(info.value, TypeError) and isinstance(info.value, CheckpointWriteError)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even a temp file


def test_tensors_on_other_devices_are_saved(tmp_path):
    state, actions = step(init(Strategy("m")), {"m": 1.0})
    payload = {"w": torch.randn(3, dtype=torch.float64), "h": torch.randn(2).half(), "b": torch.tensor([True, False])}
    (path,) = execute(actions, payload, tmp_path)
    loaded, _ = load_checkpoint(path)
    for key in payload:
        assert torch.equal(loaded[key], payload[key]) and loaded[key].dtype == payload[key].dtype


def test_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        state, actions = step(init(Strategy("m")), {"m": 1.0})
        (path,) = execute(actions, {}, tmp_path / "new" / "dir")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- multi-metric --------------------------------------------------------------------------

THREE = Config.from_mapping([
    {"metric_name": "val_loss", "filename": "best_loss.pt"},
    {"metric_name": "loss_components.concordance", "filename": "best_concordance.pt"},
    {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt"},
])


def test_three_strategies_fire_at_their_own_epochs(tmp_path):
    history = [
        {"val_loss": 1.0, "loss_components": {"concordance": 0.9}, "val_residual_spearman": 0.1},
        {"val_loss": 0.8, "loss_components": {"concordance": 0.95}, "val_residual_spearman": 0.05},
        {"val_loss": 0.9, "loss_components": {"concordance": 0.7}, "val_residual_spearman": 0.3},
        {"val_loss": 0.95, "loss_components": {"concordance": 0.8}, "val_residual_spearman": 0.2},
    ]
    _, written = run_epochs(THREE, history, tmp_path)
    names = [[p.name for p in paths] for paths in written]
    assert names == [["best_loss.pt", "best_concordance.pt", "best_corr.pt"], ["best_loss.pt"],
                     ["best_concordance.pt", "best_corr.pt"], []]
    epochs = {name: ckptfn.read_metadata(tmp_path / name)["epoch"] for name in ("best_loss.pt", "best_concordance.pt", "best_corr.pt")}
    assert epochs == {"best_loss.pt": 1, "best_concordance.pt": 2, "best_corr.pt": 2}
    for name in epochs:
        payload, meta = load_checkpoint(tmp_path / name)
        assert payload == {"epoch": epochs[name]}


def test_one_snapshot_is_one_inode_and_one_write(tmp_path):
    fs = RecordingFS()
    state, actions = step(init(THREE), {"val_loss": 1.0, "loss_components": {"concordance": 0.9}, "val_residual_spearman": 0.1})
    targets, meta = snapshot_of(actions)
    payload = {"w": torch.randn(256, 256)}
    paths = write_snapshot(tmp_path, targets, payload, meta, fs=fs)
    inodes = {p.stat().st_ino for p in paths}
    assert len(inodes) == 1 and paths[0].stat().st_nlink == 3
    assert [op for op, _ in fs.ops].count("create") == 1
    written = sum(args[0] for op, args in fs.ops if op == "write")
    assert written == paths[0].stat().st_size  # bytes written = one checkpoint, however many names
    entries = ckptfn.read_metadata(paths[1])["saves"]
    assert [(e["filename"], e["value"]) for e in entries] == [
        ("best_loss.pt", 1.0), ("best_concordance.pt", 0.9), ("best_corr.pt", 0.1)]


def test_without_hard_links_each_name_gets_a_complete_copy(tmp_path):
    fs = NoLinksFS()
    targets = [Target("a.pt"), Target("b.pt")]
    meta = {"format": "ckptfn/1", "epoch": 0, "saves": []}
    paths = write_snapshot(tmp_path, targets, {"w": torch.ones(10)}, meta, fs=fs)
    assert paths[0].stat().st_ino != paths[1].stat().st_ino
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert hidden(tmp_path) == []


# --- overwrite vs archive ------------------------------------------------------------------


def test_overwrite_keeps_one_file_archive_keeps_every_version(tmp_path):
    config = Config([Strategy("val_loss", filename="best_loss.pt"),
                     Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False)])
    values = [(1.0, 0.1), (0.9, 0.2), (0.95, 0.15), (0.8, 0.4), (0.7, 0.5)]
    run_epochs(config, [{"val_loss": l, "val_corr": c} for l, c in values], tmp_path)
    files = sorted(os.listdir(tmp_path))
    # 4 improvements of val_corr (epochs 0, 1, 3, 4): 1 current + 3 archived, named by their own save times
    assert files == [
        "best_corr.pt",
        "best_corr_20261129T131500123456Z.pt",
        "best_corr_20261129T131501123456Z.pt",
        "best_corr_20261129T131503123456Z.pt",
        "best_loss.pt",
    ]
    assert ckptfn.read_metadata(tmp_path / "best_loss.pt")["epoch"] == 4
    for name, epoch in zip(files[:4], [4, 0, 1, 3]):
        payload, meta = load_checkpoint(tmp_path / name)
        assert meta["epoch"] == epoch and payload == {"epoch": epoch}


def test_archive_name_clash_gets_a_counter(tmp_path):
    strategy = Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False)
    (tmp_path / "best_corr_20261129T131500123456Z.pt").write_bytes(b"someone else's file")
    run_epochs(strategy, [{"val_corr": 0.1}, {"val_corr": 0.2}], tmp_path)
    assert (tmp_path / "best_corr_20261129T131500123456Z.pt").read_bytes() == b"someone else's file"
    # archived names follow the order of saves: the version archived now sorts after every earlier one
    assert ckptfn.read_metadata(tmp_path / "best_corr_20261129T131500123457Z.pt")["epoch"] == 0
    assert ckptfn.read_metadata(tmp_path / "best_corr.pt")["epoch"] == 1


def test_a_name_taken_meanwhile_gets_a_counter(tmp_path):
    class TakenOnce(FileSystem):  # the real seam, with one archive name taken by a racing writer
        taken = False

        def link(self, source, target):
            if not self.taken and "_2026" in target.name:
                self.taken = True
                target.write_bytes(b"a racing writer's file")
                raise FileExistsError(target)
            return super().link(source, target)

    strategy = Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False)
    state, actions = step(init(strategy), {"val_corr": 0.1})
    execute(actions, {}, tmp_path, state=state, now=clock(0))
    state, actions = step(state, {"val_corr": 0.2})
    snapshot = plan(actions, state=state, now=clock(1))
    write_snapshot(tmp_path, snapshot.targets, {}, snapshot.metadata, fs=TakenOnce())
    assert (tmp_path / "best_corr_20261129T131500123456Z.pt").read_bytes() == b"a racing writer's file"
    assert ckptfn.read_metadata(tmp_path / "best_corr_20261129T131500123456Z-1.pt")["epoch"] == 0


def test_a_foreign_file_at_an_archive_policy_name_is_archived_by_mtime(tmp_path):
    (tmp_path / "best_corr.pt").write_bytes(b"user data")
    os.utime(tmp_path / "best_corr.pt", (0, 0))
    strategy = Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False)
    run_epochs(strategy, [{"val_corr": 0.1}], tmp_path)
    assert (tmp_path / "best_corr_19700101T000000000000Z.pt").read_bytes() == b"user data"


def test_overwrite_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_loss.pt").symlink_to(outside)
    run_epochs(Strategy("val_loss", filename="best_loss.pt"), [{"val_loss": 1.0}], run)
    assert outside.read_text() == "precious"
    assert not (run / "best_loss.pt").is_symlink()
    assert ckptfn.read_metadata(run / "best_loss.pt")["epoch"] == 0


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op, at",
    [("mkdir", 0), ("create", 0), ("write", 0), ("write", 3), ("fsync", 0), ("link", 0), ("link", 1),
     ("replace", 0), ("replace", 1), ("fsync_dir", 0), ("fsync_dir", 1)],
)
def test_a_failed_write_leaves_the_previous_best_intact_and_no_temp_file(tmp_path, op, at):
    config = Config([Strategy("val_loss", filename="best_loss.pt"), Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False)])
    state, actions = step(init(config), {"val_loss": 1.0, "val_corr": 0.1})
    execute(actions, {"w": torch.ones(1000)}, tmp_path, state=state, now=clock(0))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    new_state, actions = step(state, {"val_loss": 0.5, "val_corr": 0.2})

    targets, meta = snapshot_of(actions, now=clock(1))
    fs = FailingFS(op, at)
    with pytest.raises(CheckpointWriteError) as info:
        write_snapshot(tmp_path, targets, {"w": torch.zeros(1000)}, meta, fs=fs)
    assert str(tmp_path / "best_loss.pt") in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert hidden(tmp_path) == []
    for name, content in before.items():  # old files are byte-identical or (if published) complete new ones
        current = (tmp_path / name).read_bytes()
        if tmp_path / name in info.value.published:
            assert ckptfn.read_metadata(tmp_path / name)["epoch"] == 1
        else:
            assert current == content
    # order: link temp->tmp0, replace tmp0->best_loss, link best_corr->archive, fsync_dir,
    # replace temp->best_corr, fsync_dir
    expected_published = {("link", 1): 1, ("replace", 1): 1, ("fsync_dir", 0): 1, ("fsync_dir", 1): 2}.get((op, at), 0)
    assert info.value.published == (tmp_path / "best_loss.pt", tmp_path / "best_corr.pt")[:expected_published]


def test_unwritable_directory_is_a_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    state, actions = step(init(Strategy("m")), {"m": 1.0})
    with pytest.raises(CheckpointWriteError, match="cannot use checkpoint directory"):
        execute(actions, {}, blocker / "sub")


def test_real_disk_full_on_a_small_tmpfs(small_tmpfs):
    directory = small_tmpfs("4m")
    state, actions = step(init(Strategy("val_loss", filename="best_loss.pt")), {"val_loss": 1.0})
    execute(actions, {"w": torch.ones(256 * 1024)}, directory, state=state)  # 1 MiB
    before = (directory / "best_loss.pt").read_bytes()
    state2, actions = step(state, {"val_loss": 0.5})
    with pytest.raises(CheckpointWriteError) as info:
        execute(actions, {"w": torch.ones(1024 * 1024)}, directory, state=state2)  # 4 MiB: cannot fit
    assert "best_loss.pt" in str(info.value)
    assert "No space left on device" in str(info.value) or "space" in repr(info.value.__cause__)
    assert (directory / "best_loss.pt").read_bytes() == before
    assert hidden(directory) == []
    # the caller kept `state`; the next epoch with a fitting payload saves normally
    state3, actions = step(state, {"val_loss": 0.4})
    execute(actions, {"w": torch.ones(1024)}, directory, state=state3)
    assert ckptfn.read_metadata(directory / "best_loss.pt")["saves"][0]["value"] == 0.4


# --- temporary files -----------------------------------------------------------------------


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    stale = tmp_path / temp_name("best_loss.pt", dead_pid, host, "ab12")
    live = tmp_path / temp_name("best_loss.pt", os.getppid(), host, "cd34")
    foreign = tmp_path / temp_name("best_loss.pt", dead_pid, "another-host", "ef56")
    for path in (stale, live, foreign):
        path.write_bytes(b"partial")
    state, actions = step(init(Strategy("val_loss", filename="best_loss.pt")), {"val_loss": 1.0})
    execute(actions, {}, tmp_path)
    assert not stale.exists()
    assert live.exists() and foreign.exists()
    assert parse_temp_name(stale.name)[:2] == (dead_pid, host.replace(".", "_")[:32])


def test_readers_ignore_temp_files(tmp_path):
    state, actions = step(init(Strategy("val_loss", filename="best_loss.pt")), {"val_loss": 1.0})
    execute(actions, {}, tmp_path)
    (tmp_path / temp_name("best_loss.pt", 999999, "h", "00")).write_bytes(b"partial")
    from ckptfn.io.read import visible_files
    assert visible_files(tmp_path) == ["best_loss.pt"]


# --- warnings and logging ------------------------------------------------------------------


def test_skips_warn_and_saves_log(tmp_path, caplog):
    state = init(ckptfn.Config(THREE.strategies, on_missing="warn"))
    state, actions = step(state, {"val_loss": float("nan"), "val_residual_spearman": 0.4})
    with caplog.at_level(logging.INFO, logger="ckptfn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = execute(actions, {}, tmp_path, state=state)
    messages = [str(w.message) for w in caught if issubclass(w.category, ckptfn.MetricWarning)]
    assert messages == [
        "val_loss is not finite (nan) at epoch 0; best_loss.pt not saved",
        "loss_components.concordance is missing at epoch 0; best_concordance.pt not saved; "
        "the metrics are: val_loss, val_residual_spearman",
    ]
    assert [p.name for p in paths] == ["best_corr.pt"]
    assert "saved best_corr.pt: val_residual_spearman 0.4000 (was none) at epoch 0" in caplog.messages
    state, actions = step(state, {"val_loss": 0.31, "val_residual_spearman": 0.5, "loss_components": {"concordance": 1.0}})
    with caplog.at_level(logging.INFO, logger="ckptfn"):
        execute(actions, {}, tmp_path, state=state)
    assert "saved best_corr.pt: val_residual_spearman 0.5000 (was 0.4000) at epoch 1" in caplog.messages


def test_execute_validates_its_arguments(tmp_path):
    state, actions = step(init(Strategy("m")), {"m": 1.0})
    with pytest.raises(ValueError, match="timezone-aware"):
        execute(actions, {}, tmp_path, now=dt.datetime(2026, 1, 1))
    with pytest.raises(TypeError, match="state"):
        execute(actions, {}, tmp_path, state={"not": "a state"})
    with pytest.raises(TypeError, match="Save or Skip"):
        execute(["save it"], {}, tmp_path)
    assert execute((), {}, tmp_path / "untouched") == ()
    assert not (tmp_path / "untouched").exists()
