import os
import signal
import subprocess
import sys

import pytest

from twinface.atomic import atomic_path
from twinface.schedule import lr_at


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "backbone.pth"
    path.write_bytes(b"good old weights")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            raise KeyboardInterrupt                     # killed mid-write
    assert path.read_bytes() == b"good old weights"
    assert os.listdir(tmp_path) == ["backbone.pth"]     # no temp file left behind
    with atomic_path(str(path), suffix=".weights.h5") as tmp:
        assert tmp.endswith(".weights.h5")
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert path.read_bytes() == b"new"


KILLED_WRITER = """
import os, signal, sys
from twinface.atomic import atomic_path
with atomic_path(sys.argv[1], suffix=".pt") as tmp:
    open(tmp, "wb").write(b"half of the new")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    # Half-written `.state.pt.*.tmp` files of killed runs used to stay in run directories for good.
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)])
    assert run.returncode == -signal.SIGKILL and len(os.listdir(tmp_path)) == 2
    with atomic_path(str(tmp_path / "other.pt")) as tmp:
        open(tmp, "wb").close()
    assert sorted(os.listdir(tmp_path)) == ["other.pt", "state.pt"] and path.read_bytes() == b"old"


def test_polynomial_schedule_with_warmup_matches_arcface_torch():
    # arcface_torch PolyScheduler: linear warm-up to base, then base * (1 - t)^2
    lrs = [lr_at(s, 0.1, 100, 10, "polynomial", warmup_epochs=1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.1 * (1 - 45 / 90) ** 2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_cosine_and_step_schedules():
    assert lr_at(0, 1.0, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(50, 1.0, 100, 10, "cosine", min_lr=0.1) == pytest.approx(0.55)
    step = [lr_at(s, 1.0, 100, 10, "step", milestones=[3, 6], gamma=0.1) for s in (29, 30, 59, 60)]
    assert step == pytest.approx([1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 1.0, 10, 1, "linear")
