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


def arcface_torch_poly_lr(step, base_lr, max_steps, warmup_steps, power=2):
    """insightface recognition/arcface_torch/lr_scheduler.py, PolyScheduler.get_lr, written out. arcface_torch
    calls scheduler.step() after every optimizer step, so the update made at 0-based `step` sees last_epoch == step:
        last_epoch < warmup_steps: base_lr * last_epoch / warmup_steps
        otherwise:                 base_lr * (1 - (last_epoch - warmup_steps) / (max_steps - warmup_steps)) ** power
    """
    if step < warmup_steps:
        return base_lr * float(step) / float(warmup_steps)
    return base_lr * pow(1 - float(step - warmup_steps) / float(max_steps - warmup_steps), power)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2.5])
def test_polynomial_schedule_with_warmup_matches_arcface_torch(warmup_epochs):
    total, per_epoch = 100, 10
    ours = [lr_at(s, 0.1, total, per_epoch, "polynomial", warmup_epochs=warmup_epochs) for s in range(total)]
    theirs = [arcface_torch_poly_lr(s, 0.1, total, int(warmup_epochs * per_epoch)) for s in range(total)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)
    if warmup_epochs:
        assert ours[0] == 0.0                                  # arcface_torch's first update has lr 0


def test_cosine_and_step_schedules():
    assert lr_at(0, 1.0, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(50, 1.0, 100, 10, "cosine", min_lr=0.1) == pytest.approx(0.55)
    step = [lr_at(s, 1.0, 100, 10, "step", milestones=[3, 6], gamma=0.1) for s in (29, 30, 59, 60)]
    assert step == pytest.approx([1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 1.0, 10, 1, "linear")
