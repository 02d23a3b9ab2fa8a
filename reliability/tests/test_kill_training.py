"""kill -9 at seeded random moments of a tiny torch training, checkpoint writes included.

Each kill is followed by what a user would do: `--resume` when a checkpoint exists, else `--overwrite` (a start
again). What must hold: every restart succeeds, a checkpoint the log announced is on disk and readable (no
finished epoch lost), and the run ends with a backbone bit-identical to an uninterrupted run's.
"""
import os
import random
import re
import subprocess
import sys
import time

import torch
import yaml

from twinface.testing import tiny_config, tiny_dataset

KILLS = 20                   # kill -9s this room delivers (stated in the README)
SEED = 20261201
EPOCHS = 3                   # 4 steps each: a checkpoint (and a backbone write) every 4 steps
STATE_TEMP = re.compile(r"^\.(state\.pt|backbone\.pth)\..+\.tmp$")


def _start(config, run, fresh):
    """`--overwrite` for a fresh start (or when no checkpoint was written yet), else `--resume`."""
    resume = not fresh and os.path.exists(os.path.join(run, "state.pt"))
    return subprocess.Popen([sys.executable, "-m", "twinface.cli", "train", "--framework", "torch", "--config", config,
                             "--output", run, "--resume" if resume else "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_during_a_write(proc, run, limit):
    """Poll the run directory and kill as soon as a checkpoint's temporary file appears; True if it did."""
    deadline = time.time() + limit
    while proc.poll() is None and time.time() < deadline:
        if os.path.isdir(run) and any(STATE_TEMP.match(n) for n in os.listdir(run)):
            proc.kill()
            return True
        time.sleep(0.0005)
    return False


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


def _finish(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def _same_backbone(a, b):
    expected = torch.load(os.path.join(a, "backbone.pth"), weights_only=True)
    got = torch.load(os.path.join(b, "backbone.pth"), weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_kill_9_at_random_moments_loses_nothing_and_ends_bit_identical(tmp_path):
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
        proc = _start(config, run, fresh)
        starts += 1
        if rng.random() < 0.4:
            killed = _kill_during_a_write(proc, run, duration)
            during_writes += killed
        else:
            killed = _kill_after(proc, rng.uniform(0.2, 0.75 * duration))
        if killed:
            proc.wait()
            kills += 1
            # the checkpoint on disk is readable and not older than the last one the log announced
            assert _saved_step(run) >= _announced_step(run, offset)
            fresh = False
        else:                                  # the run reached its end first: check it, then start over
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
