import os
import pathlib
import subprocess
import uuid

import pytest

from hypothesis import HealthCheck, settings

# Shared, noisy CI machines: no per-example deadlines; failures print their reproduction blob.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile(
    "thorough",
    deadline=None,
    print_blob=True,
    max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tiny tmpfs (default 4 MiB) for real "No space left on device" errors; skip if impossible."""
    mounts: list[pathlib.Path] = []

    def mount(size: str = "4m") -> pathlib.Path:
        point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        try:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("cannot mount a tmpfs here: no mount command")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


#: Test modules the nested README run (tests/test_readme_commands.py) collects: fast, and exercising
#: the installed package (the core's laws, the executor's files).
NESTED_README_MODULES = ("tests/core/test_step.py", "tests/io/test_write.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CKPTFN_NESTED_README_RUN") != "1":
        return
    wanted = {config.rootpath / name for name in NESTED_README_MODULES}
    keep = [item for item in items if item.path in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


# --- the tests leave the repository as they found it ----------------------------------------------

#: What running the tests may add at the top of the checkout: caches.
_ALLOWED_NEW = {".pytest_cache", ".hypothesis", "__pycache__"}


def pytest_sessionstart(session):
    session.config._ckptfn_root_before = set(os.listdir(session.config.rootpath))


def pytest_sessionfinish(session, exitstatus):
    """A test that writes into the checkout (a stray ``checkpoints/`` from a Lightning default
    directory, an ``s3:`` folder from a mangled URL) fails the run, naming what it left."""
    before = getattr(session.config, "_ckptfn_root_before", None)
    if before is None or os.environ.get("CKPTFN_NESTED_README_RUN") == "1":
        return
    left = sorted(set(os.listdir(session.config.rootpath)) - before - _ALLOWED_NEW)
    if left:
        session.config.get_terminal_writer().line(
            f"the tests left these in the checkout {session.config.rootpath}: {', '.join(left)}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
