"""``os.fork()`` while an asynchronous save is in flight (a DataLoader worker, a launcher, a ``fork`` pool).

The child gets a copy of the parent's memory but only the thread that called
``fork``: the background writer thread and the save it runs stay in the parent.
The child must exit normally (its exit hook must not wait for the parent's save),
may save asynchronously itself on a thread of its own, and the parent's save
completes intact. Each scenario runs in a fresh interpreter under a timeout
(tests/shells/forking.py), so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

from tests.shells.forking import check, run_scenario


def test_a_child_forked_during_an_async_save_exits_normally_and_the_parents_save_completes(tmp_path):
    # Before: the child's exit hook waited forever on the parent's save (its thread is not in the child):
    # "child still running after 20 s".
    assert check(tmp_path, "exit") == []
    assert not (tmp_path / "child").exists()  # the child wrote nothing: the parent's save is the parent's


def test_a_forked_child_saves_asynchronously_on_its_own_thread_with_new_and_inherited_writers(tmp_path):
    # Before: the inherited writer waited forever for the parent's save to free the staging buffers.
    assert check(tmp_path, "save") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child", "inherited", "parent"]


def test_the_scenario_reports_a_child_that_never_exits(tmp_path, monkeypatch):
    # The check itself: with the fork handler switched off, the old hang is seen and reported.
    monkeypatch.setenv("CKPTFN_TEST_FORGET_NOTHING", "1")
    result = run_scenario(tmp_path, "exit", child_seconds=2)
    assert "child still running after 2.0 s" in result.stdout, result.stdout + result.stderr
    assert "parent best: {'best_val_loss.pt': 0.5}" in result.stdout  # the parent is unaffected either way
