"""The torch twin through the shared training loop: outputs, resume after a kill, NaN guard rails, and a run
directory that survives kills, full disks, bad val sets, a second trainer and careless restarts."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from twinface.testing import (check_densenet_trains, check_fp16_overflow_backs_off, check_nan_guard,
                              check_resnext_trains_with_checkpointing, check_resume_matches_uninterrupted,
                              check_tfrecord_trains_like_rec, check_training_outputs, check_truncated_state_is_named,
                              run_tiny, tiny_dataset)
from twinface_torch.backbones import get_model
from twinface_torch.train import TorchTwin


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def _weights_of_model(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _weights(twin):
    return _weights_of_model(twin.backbone)


def _reloaded(path):
    # arcface_torch's format: a plain state_dict that loads strictly into a fresh model
    model = get_model("mbf", num_features=32, input_size=32)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return _weights_of_model(model)


def test_training_from_tfrecord_equals_training_from_rec(data, tmp_path):
    check_tfrecord_trains_like_rec(TorchTwin, _weights, data, tmp_path)


def test_training_writes_every_output(data, tmp_path):
    check_training_outputs(TorchTwin, "backbone.pth", "state.pt", _reloaded, _weights, data, tmp_path)


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(data, tmp_path):
    check_resume_matches_uninterrupted(
        TorchTwin, _weights, lambda run: torch.load(run / "state.pt", weights_only=True)["meta"]["step"],
        data, tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nan_loss_skips_updates_and_stops_without_writing_nan_weights(data, tmp_path, precision):
    def poison(twin):
        with torch.no_grad():
            twin.head.weight[0, 0] = float("nan")

    def finite(run):
        return all(torch.isfinite(v.float()).all() for v in torch.load(run / "backbone.pth", weights_only=True).values())
    check_nan_guard(TorchTwin, poison, finite, data, tmp_path, precision)


def test_resume_without_a_checkpoint_is_a_clear_error(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no training state at .*state.pt"):
        run_tiny(TorchTwin, data, tmp_path / "empty", resume=True)


def test_fp16_overflow_is_skipped_backs_off_and_the_run_goes_on(data, tmp_path):
    check_fp16_overflow_backs_off(TorchTwin, lambda run: torch.load(run / "state.pt", weights_only=True)["scaler"]["scale"], data, tmp_path)


def test_truncated_state_is_an_error_naming_the_file(data, tmp_path):
    check_truncated_state_is_named(TorchTwin, "state.pt", data, tmp_path)


class _MustNotTrain(TorchTwin):
    def train_step(self, *args):
        raise AssertionError("a training step ran")


def test_a_corrupt_val_bin_fails_the_start_naming_the_file(data, tmp_path):
    bad = tmp_path / "lfw.bin"
    bad.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match=f"{bad}"):
        run_tiny(_MustNotTrain, data, tmp_path / "run", val={"bins": [str(bad)]})


def test_a_failing_evaluation_is_reported_and_the_run_goes_on_from_a_saved_checkpoint(data, tmp_path):
    class NaNEmbeddings(TorchTwin):
        def embed(self, images):
            return np.full((len(images), 32), np.nan, np.float32)

    run = tmp_path / "run"
    summary, _ = run_tiny(NaNEmbeddings, data, run)
    assert summary["finished"] and summary["steps"] == 8
    assert "NaN" in summary["results"]["val"]["error"]
    assert [h["step"] for h in summary["history"]] == [4, 8]
    assert torch.load(run / "state.pt", weights_only=True)["meta"]["step"] == 8
    log = (run / "train.log").read_text()
    assert log.count("evaluation of val failed") == 2 and "training goes on" in log
    assert log.index("checkpoint: ") < log.index("evaluation of val failed")


def test_a_second_training_in_the_same_directory_is_refused_naming_the_first_pid(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from twinface.run_dir import RunLock\n"
                               "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"another training \\(pid {holder.pid}\\) is running"):
            run_tiny(TorchTwin, data, run)
        assert sorted(os.listdir(run)) == [".twinface-train.lock"]    # nothing written beside the lock
    finally:
        holder.kill()
        holder.wait()
    summary, _ = run_tiny(TorchTwin, data, run, train={"epochs": 1})   # the kernel dropped the dead holder's lock
    assert summary["finished"]


def test_resuming_a_finished_run_keeps_it_and_more_epochs_extend_it(data, tmp_path):
    run = tmp_path / "run"
    first, _ = run_tiny(TorchTwin, data, run, train={"epochs": 1})
    files = {name: (run / name).read_bytes() for name in ("summary.json", "state.pt", "backbone.pth", "config.yaml")}
    again, _ = run_tiny(TorchTwin, data, run, resume=True, train={"epochs": 1})
    assert again["results"] == first["results"] and again["train_images_per_s"] == first["train_images_per_s"] > 0
    assert {name: (run / name).read_bytes() for name in files} == files
    assert "the run is finished (step 4 of 4)" in (run / "train.log").read_text()
    longer, _ = run_tiny(TorchTwin, data, run, resume=True, train={"epochs": 2, "log_every": 2})
    assert longer["steps"] == 8 and [h["step"] for h in longer["history"]] == [4, 8]
    assert "resume with a changed config: train.epochs: 1 -> 2" in (run / "train.log").read_text()


def test_training_into_a_previous_run_needs_overwrite(data, tmp_path):
    run = tmp_path / "run"
    run_tiny(TorchTwin, data, run, train={"epochs": 1})
    before = (run / "backbone.pth").read_bytes()
    with pytest.raises(FileExistsError, match=f"{run} already holds a training run .*state.pt.*--overwrite"):
        run_tiny(_MustNotTrain, data, run, train={"epochs": 1})
    assert (run / "backbone.pth").read_bytes() == before
    old_events = os.listdir(run / "tensorboard")
    with pytest.raises(KeyboardInterrupt):             # --overwrite starts over: the old state is gone at once
        run_tiny(TorchTwin, data, run, kill_after=0, overwrite=True, train={"epochs": 1})
    assert not (run / "state.pt").exists() and not (run / "summary.json").exists()
    assert old_events and not set(old_events) & set(os.listdir(run / "tensorboard"))   # no mix of two runs' curves


def test_resume_under_a_config_that_breaks_the_run_is_refused_naming_each_key(data, tmp_path):
    run = tmp_path / "run"
    run_tiny(TorchTwin, data, run, train={"epochs": 1})
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"head\.type: 'arcface' -> 'cosface'.*train\.batch_size: 8 -> 4") as e:
        run_tiny(_MustNotTrain, data, run, resume=True, train={"batch_size": 4, "epochs": 2}, head={"type": "cosface"})
    assert "head.m2" in str(e.value) and "train.epochs" not in str(e.value)
    assert (run / "config.yaml").read_text() == saved
    # a margin spelled out at its default value is no change
    summary, _ = run_tiny(_MustNotTrain, data, run, resume=True, train={"epochs": 1},
                          head={"type": "arcface", "m2": 0.5})
    assert summary["finished"]


def test_temporary_files_of_killed_writers_are_removed_at_start_and_nothing_else(data, tmp_path):
    run = tmp_path / "run"
    run_tiny(TorchTwin, data, run, train={"epochs": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ours = [f".state.pt.twinface-{dead}-k2j3h4.tmp", f".backbone.onnx.twinface-{dead}-a1b2.tmp.onnx"]
    theirs = [".notes.txt.tmp", "state.pt.bak", f".state.pt.twinface-{os.getpid()}-live.tmp"]  # the last: alive
    for name in ours + theirs:
        (run / name).write_bytes(b"half")
    run_tiny(_MustNotTrain, data, run, resume=True, train={"epochs": 1})        # finished: only the clean-up runs
    left = set(os.listdir(run))
    assert not left & set(ours) and set(theirs) <= left


_SLOW_TRAINER = """
import sys, time
from twinface.testing import run_tiny
from twinface_torch.train import TorchTwin

class Slow(TorchTwin):
    def train_step(self, *args):
        print("training", flush=True)
        time.sleep(120)

run_tiny(Slow, sys.argv[1], sys.argv[2], data={"num_workers": 2})
"""


def _children(pid):
    return {int(c) for task in os.listdir(f"/proc/{pid}/task")
            for c in open(f"/proc/{pid}/task/{task}/children").read().split()}


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dataloader_workers_die_with_a_killed_trainer(data, tmp_path):
    trainer = subprocess.Popen([sys.executable, "-c", _SLOW_TRAINER, data, str(tmp_path / "run")],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "training"
        time.sleep(1.0)                                    # the workers fill their queue and block on it
        workers = _children(trainer.pid)
        assert len(workers) == 2
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.time() + 3
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"DataLoader workers {alive} outlived their killed parent"


_FULL_DISK = """
import resource, signal, sys
from twinface.testing import run_tiny
from twinface_torch.train import TorchTwin

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit then fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]),) * 2)
try:
    run_tiny(TorchTwin, sys.argv[1], sys.argv[2], resume=True, train={"epochs": 2})
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_names_the_file(data, tmp_path):
    run = tmp_path / "run"
    run_tiny(TorchTwin, data, run, train={"epochs": 1})
    state, backbone = run / "state.pt", run / "backbone.pth"
    limit = (backbone.stat().st_size + state.stat().st_size) // 2   # epoch 2's backbone fits, its state does not
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, data, str(run), str(limit)], capture_output=True,
                         text=True, timeout=300).stdout
    assert f"CheckpointWriteError: {state}: writing failed" in out, out
    assert torch.load(state, weights_only=True)["meta"]["step"] == 4
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_resnext_trains_with_checkpointing(data, tmp_path):
    check_resnext_trains_with_checkpointing(TorchTwin, data, tmp_path)


def test_densenet_trains(data, tmp_path):
    check_densenet_trains(TorchTwin, data, tmp_path)
