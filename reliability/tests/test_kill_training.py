"""kill -9 at seeded random moments of a tiny torch training, checkpoint writes included.

Each kill is followed by what a user would do: `--resume` when a checkpoint exists, else `--overwrite` (a start
again). What must hold: every restart succeeds, a checkpoint the log announced is on disk and readable (no
finished epoch lost), and the run ends with a backbone bit-identical to an uninterrupted run's.
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

import torch
import yaml

from twinface.testing import tiny_config, tiny_dataset

KILLS = 20                   # kill -9s this room delivers (stated in the README)
SEED = 20261201
EPOCHS = 3                   # 4 steps each: a checkpoint (and a backbone write) every 4 steps


# Runs `twinface train`; with n > 0 the process kill -9s itself inside its n-th checkpoint write (backbone.pth or
# state.pt), either halfway through writing the temporary file or just before renaming it into place.
_TRAIN = """
import io, os, signal, sys
import torch

n, where = int(sys.argv[1]), sys.argv[2]
calls = [0]
real_save, real_replace = torch.save, os.replace

def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == n and where == "mid-write":
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

def replace(src, dst, *args, **kwargs):
    if calls[0] == n and where == "before-rename" and os.path.basename(dst) in ("state.pt", "backbone.pth"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

torch.save, os.replace = save, replace
from twinface.cli import main
main(sys.argv[3:])
"""


def _start(config, run, fresh, kill_at_write=0, where=""):
    """`--overwrite` for a fresh start (or when no checkpoint was written yet), else `--resume`."""
    resume = not fresh and os.path.exists(os.path.join(run, "state.pt"))
    return subprocess.Popen([sys.executable, "-c", _TRAIN, str(kill_at_write), where, "train", "--framework", "torch",
                             "--config", config, "--output", run, "--resume" if resume else "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after(proc, delay):
    try:
        proc.wait(delay)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        return True


def _saved_step(run):
    path = os.path.join(run, "state.pt")
    return torch.load(path, weights_only=True)["meta"]["step"] if os.path.exists(path) else 0


def _log_size(run):
    log = os.path.join(run, "train.log")
    return os.path.getsize(log) if os.path.exists(log) else 0


def _announced_step(run, offset):
    """The last checkpoint the log announced since `offset` (the start of this attempt at the run)."""
    with open(os.path.join(run, "train.log")) as f:
        f.seek(offset)
        return max(map(int, re.findall(r"checkpoint: .*state\.pt \(step (\d+)\)", f.read())), default=0)


def _ended_by_kill(proc):
    """Wait for the run: True if it kill -9ed itself, False if it ended well; anything else fails the test."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    return proc.returncode != 0


def _finish(proc):
    assert not _ended_by_kill(proc)


def _same_backbone(a, b):
    expected = torch.load(os.path.join(a, "backbone.pth"), weights_only=True)
    got = torch.load(os.path.join(b, "backbone.pth"), weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_kill_9_at_random_moments_loses_nothing_and_ends_bit_identical(tmp_path, faults):
    data = tiny_dataset(tmp_path / "synth")
    config = str(tmp_path / "tiny.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(tiny_config(data, tmp_path / "unused", train={"epochs": EPOCHS}).to_dict(), f)
    full, run = str(tmp_path / "full"), str(tmp_path / "killed")
    t0 = time.time()
    _finish(_start(config, full, fresh=True))
    duration = time.time() - t0

    rng = random.Random(SEED)
    kills, during_writes, starts, completed, fresh, offset = 0, 0, 0, 0, True, 0
    while kills < KILLS:
        assert starts < 3 * KILLS, f"only {kills} kills landed in {starts} runs"
        if fresh:
            offset = _log_size(run)
        mode = rng.choice(["timer", "timer", "mid-write", "before-rename"])
        if mode == "timer":
            proc = _start(config, run, fresh)
            killed = _kill_after(proc, rng.uniform(0.2, 0.5 * duration))
        else:                                  # one of the checkpoint writes still to come (2 per epoch; none left
            epochs_left = EPOCHS - (0 if fresh else _saved_step(run) // 4)    # when only the export remains)
            proc = _start(config, run, fresh, rng.randint(1, max(1, 2 * epochs_left)), mode)
            killed = _ended_by_kill(proc)
            during_writes += killed
        starts += 1
        if killed:
            kills += 1
            # the checkpoint on disk is readable and not older than the last one the log announced
            assert _saved_step(run) >= _announced_step(run, offset)
            fresh = False
        else:                                  # the run reached its end first: check it, then start over
            if mode == "timer":
                _finish(proc)
            _same_backbone(full, run)
            completed += 1
            fresh = True
    if not fresh:
        _finish(_start(config, run, fresh=False))
        _same_backbone(full, run)
        completed += 1
    print(f"{kills} kill -9s ({during_writes} during checkpoint writes) over {starts} starts; "
          f"{completed} killed runs completed bit-identical; seed {SEED}")
    assert during_writes >= 3
    assert not [n for n in os.listdir(run) if ".tmp" in n]
    faults.record(f"kill -9 during torch training ({during_writes} in checkpoint writes)", kills, kills)
