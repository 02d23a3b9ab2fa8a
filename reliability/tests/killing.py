"""Helpers of the fault-injection room: tiny training runs of either twin, their checkpoints, and one table row
per fault class (Row); and kill -9 at seeded random moments of a tiny `twinface train`, checkpoint writes
included (KilledTraining).

Each kill is followed by what a user would do: `--resume` when a checkpoint exists, else `--overwrite` (a start
again). What must hold: every restart succeeds, a checkpoint the log announced is on disk and readable (no
finished epoch lost), every run that reaches its end has a backbone bit-identical to an uninterrupted run's,
and no temporary file outlives the runs.
"""
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import yaml

from twinface.testing import tiny_config, tiny_dataset

# The files a checkpoint writes, (training state, backbone), per twin.
FILES = {"torch": ("state.pt", "backbone.pth"), "tf": ("state.npz", "backbone.weights.h5")}

# Runs `twinface train`; with n > 0 the process kill -9s itself inside its n-th checkpoint write (the backbone or
# the training state), either halfway through writing the temporary file or just before renaming it into place.
# The writers hooked: torch.save (torch), numpy.savez and keras' save_weights (TF).
_TRAIN = """
import os, signal, sys
import twinface                                   # before TensorFlow: it chooses TensorFlow's CPU kernels

n, where, framework, finals = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split(",")
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counted(write, file_at):
    def hooked(*args, **kwargs):
        calls[0] += 1
        result = write(*args, **kwargs)
        if calls[0] == n and where == "mid-write":        # leave the temporary file half written
            f = args[file_at]
            if hasattr(f, "flush"):
                f.flush()
            path = getattr(f, "name", f)
            os.truncate(path, os.path.getsize(path) // 2)
            die()
        return result
    return hooked

real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    if calls[0] == n and where == "before-rename" and os.path.basename(dst) in finals:
        die()
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
if framework == "torch":
    import torch
    torch.save = counted(torch.save, 1)
else:
    import keras, numpy
    numpy.savez = counted(numpy.savez, 0)
    keras.Model.save_weights = counted(keras.Model.save_weights, 1)
from twinface.cli import main
main(["train", "--framework", framework] + sys.argv[5:])
"""


def tiny_run_config(tmp_path, epochs) -> str:
    """The tiny config (twinface.testing) training `epochs` epochs on the tiny synthetic set, as a YAML file."""
    path = str(tmp_path / f"tiny{epochs}.yaml")
    data = tiny_dataset(tmp_path / "synth")
    with open(path, "w") as f:
        yaml.safe_dump(tiny_config(data, tmp_path / "unused", train={"epochs": epochs}).to_dict(), f)
    return path


def saved_step(framework, run) -> int:
    """The step of the training state in `run` (0 when there is none); reading it proves it readable."""
    path = os.path.join(run, FILES[framework][0])
    if not os.path.exists(path):
        return 0
    if framework == "torch":
        import torch
        return torch.load(path, weights_only=True)["meta"]["step"]
    with np.load(path, allow_pickle=False) as saved:
        return json.loads(str(saved["meta"]))["step"]


def backbone(framework, run) -> dict:
    """{tensor name: array} of the backbone file in `run`, read by its framework's format."""
    path = os.path.join(run, FILES[framework][1])
    if framework == "torch":
        import torch
        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    import h5py
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def assert_same_backbone(framework, expected_run, run):
    expected, got = backbone(framework, expected_run), backbone(framework, run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].dtype == got[name].dtype and np.array_equal(expected[name], got[name]), name


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def temporaries(directory) -> list:
    return [name for name in os.listdir(directory) if ".tmp" in name]


class Row:
    """One fault class's figures: `with row.fault(**case):` counts a fault injected, and a survivor when the block
    passes. A failing case is reported as a subtest and the next one still runs, so the figures stay honest."""

    def __init__(self, subtests):
        self.subtests, self.injected, self.survived, self.lost = subtests, 0, 0, 0

    @contextlib.contextmanager
    def fault(self, **case):
        with self.subtests.test(**case):
            self.injected += 1
            yield
            self.survived += 1

    def check_kept(self, found, previous, new):
        """What a destination holds after the fault: the previous output or the complete new one, nothing else."""
        self.lost += found not in (previous, new)
        assert found in (previous, new)

    def record(self, faults, fault):
        faults.record(fault, self.injected, self.survived, self.lost)
        assert self.survived == self.injected and self.lost == 0


@dataclass
class Tally:
    kills: int = 0
    during_writes: int = 0
    starts: int = 0
    completed: int = 0          # killed runs that went on to their end, bit-identical


class KilledTraining:
    """A tiny run of `epochs` epochs (4 steps each: a checkpoint, i.e. a backbone and a state write, every 4
    steps) in tmp_path/killed, and its uninterrupted twin in tmp_path/full."""

    def __init__(self, framework, tmp_path, epochs):
        self.framework, self.epochs = framework, epochs
        self.state_file = FILES[framework][0]
        self.config = tiny_run_config(tmp_path, epochs)
        self.full, self.run = str(tmp_path / "full"), str(tmp_path / "killed")

    def start(self, run, fresh, kill_at_write=0, where=""):
        """`--overwrite` for a fresh start (or when no checkpoint was written yet), else `--resume`."""
        resume = not fresh and os.path.exists(os.path.join(run, self.state_file))
        return subprocess.Popen([sys.executable, "-c", _TRAIN, str(kill_at_write), where, self.framework,
                                 ",".join(FILES[self.framework]), "--config", self.config, "--output", run,
                                 "--resume" if resume else "--overwrite"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def saved_step(self):
        return saved_step(self.framework, self.run)

    def log_size(self):
        log = os.path.join(self.run, "train.log")
        return os.path.getsize(log) if os.path.exists(log) else 0

    def announced_step(self, offset):
        """The last checkpoint the log announced since `offset` (the start of this attempt at the run); 0 when a
        kill came before the run opened its log (during start-up)."""
        log = os.path.join(self.run, "train.log")
        if not os.path.exists(log):
            return 0
        with open(log) as f:
            f.seek(offset)
            pattern = rf"checkpoint: .*{re.escape(self.state_file)} \(step (\d+)\)"
            return max(map(int, re.findall(pattern, f.read())), default=0)

    def kill_repeatedly(self, kills, seed, modes=("timer", "timer", "mid-write", "before-rename")) -> Tally:
        """Deliver `kills` kill -9s, each at a moment drawn from `modes` (a timer, or inside a checkpoint write);
        the modes come from one seeded generator and the moments from another, so the number of kills inside
        writes is fixed by the seed."""
        t0 = time.time()
        finish(self.start(self.full, fresh=True))
        duration = time.time() - t0
        pick_mode, pick_moment = random.Random(seed), random.Random(seed + 1)
        tally, fresh, offset = Tally(), True, 0
        while tally.kills < kills:
            assert tally.starts < 3 * kills, f"only {tally.kills} kills landed in {tally.starts} runs"
            if fresh:
                offset = self.log_size()
            mode = pick_mode.choice(modes)
            if mode == "timer":
                proc = self.start(self.run, fresh)
                killed = kill_after(proc, pick_moment.uniform(0.2, 0.5 * duration))
            else:                                  # one of the checkpoint writes still to come (2 per epoch; none
                epochs_left = self.epochs - (0 if fresh else self.saved_step() // 4)   # when only export remains)
                proc = self.start(self.run, fresh, pick_moment.randint(1, max(1, 2 * epochs_left)), mode)
                killed = ended_by_kill(proc)
                tally.during_writes += killed
            tally.starts += 1
            if killed:
                tally.kills += 1
                # the checkpoint on disk is readable and not older than the last one the log announced
                assert self.saved_step() >= self.announced_step(offset)
                fresh = False
            else:                                  # the run reached its end first: check it, then start over
                if mode == "timer":
                    finish(proc)
                assert_same_backbone(self.framework, self.full, self.run)
                tally.completed += 1
                fresh = True
        if not fresh:
            finish(self.start(self.run, fresh=False))
            assert_same_backbone(self.framework, self.full, self.run)
            tally.completed += 1
        assert not temporaries(self.run)
        return tally


def kill_after(proc, delay) -> bool:
    """kill -9 `proc` after `delay` seconds; False if it ended by itself first."""
    try:
        proc.wait(delay)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        return True


def ended_by_kill(proc) -> bool:
    """Wait for the run: True if it kill -9ed itself, False if it ended well; anything else fails the test."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    return proc.returncode != 0


def finish(proc):
    assert not ended_by_kill(proc)
