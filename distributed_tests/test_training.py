"""The whole loop over 2 processes: `twinface train --nproc 2` end to end in both twins, resume; and in torch the
guard rails across ranks, a dead rank, the shipped recipes. (The TF twin's own are in tensorflow/tests.)"""
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from .processes import run, torchrun
from twinface import run_dir
from twinface.testing import TINY_DATA, tiny_config, tiny_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _config_file(tmp_path, data_dir, name="run", **sections) -> str:
    cfg = tiny_config(data_dir, tmp_path / name, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return str(path)


def twinface(*args, expect_ok=True):
    return run([sys.executable, "-m", "twinface.cli", *args], expect_ok=expect_ok)


FILES = {"torch": ("backbone.pth", "state.pt", ".weights.h5"), "tf": ("backbone.weights.h5", "state.npz", ".pth")}


def _arrays(path) -> dict:
    """Every tensor of a backbone file or head shard, as numpy, by name."""
    path = str(path)
    if path.endswith(".h5"):
        import h5py
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return found
    if path.endswith(".npz"):
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files if k != "meta"}
    saved = torch.load(path, weights_only=True)
    saved = saved.get("head", saved)
    return {k: v.numpy() for k, v in saved.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_two_processes_train_resume_and_hand_over(framework, tmp_path, data_dir):
    """`twinface train --nproc 2`: data, training, evaluation, sharded checkpoints, export; a resumed run equals
    the uninterrupted one bit for bit; a resume over another process count is refused naming both; the backbone
    evaluates and converts like any other."""
    backbone, state, other = FILES[framework]
    full = _config_file(tmp_path, data_dir, "full")
    train = ["train", "--framework", framework, "--config", full]
    twinface(*train, "--nproc", "2", "--output", str(tmp_path / "a"))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 4 and "onnx_max_abs_diff" in summary
    assert summary["results"]["val"]["acc_mean"] > 0
    states = [str(tmp_path / run / state) for run in "ab"]
    assert run_dir.shard_files(states[0]) == [os.path.basename(run_dir.shard_path(states[0], r, 4)) for r in (0, 1)]

    twinface(*train, "--nproc", "2", "--output", str(tmp_path / "b"), "--set", "train.max_steps=2")   # epoch 1 of 2
    twinface(*train, "--nproc", "2", "--output", str(tmp_path / "b"), "--resume")
    assert _same(_arrays(tmp_path / "a" / backbone), _arrays(tmp_path / "b" / backbone))
    for r in (0, 1):
        assert _same(*(_arrays(run_dir.shard_path(s, r, 4)) for s in states))

    refused = twinface(*train, "--output", str(tmp_path / "b"), "--resume", "--set", "train.epochs=3",
                       expect_ok=False)
    assert refused.returncode != 0
    assert "trained over 2 process(es), this resume has 1" in refused.stderr

    out = twinface("eval", "--weights", str(tmp_path / "a" / backbone), "--arch", "mbf", "--num-features", "32",
                   "--input-size", "32", "--bin", os.path.join(data_dir, "val.bin"))
    assert f"Accuracy-Flip: {summary['results']['val']['acc_mean']:.5f}" in out.stdout     # the run's own score
    twinface("convert", str(tmp_path / "a" / backbone), str(tmp_path / f"a{other}"), "--arch", "mbf")
    assert (tmp_path / f"a{other}").stat().st_size > 0


def _worker_config(tmp_path, data_dir, **train):
    cfg = tiny_config(data_dir, tmp_path / "run", train={"batch_size": 8, "epochs": 2, "log_every": 1, **train})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path), tmp_path / "run"


def test_a_nan_on_one_rank_is_skipped_by_all_and_counted_once(tmp_path, data_dir):
    cfg, run = _worker_config(tmp_path, data_dir)
    torchrun(["torch_worker.py", "train", cfg, "nan"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["skipped_steps"]["non_finite_loss"] == 1
    assert (run / "train.log").read_text().count("non-finite loss") == 1
    ranks = [np.load(run / f"final.rank{r}.npz") for r in (0, 1)]
    for key in ranks[0].files:                      # both ranks skipped the same step: identical backbones
        assert np.array_equal(ranks[0][key], ranks[1][key]), key


def test_a_dead_rank_stops_the_others_and_is_named(tmp_path, data_dir):
    cfg, run = _worker_config(tmp_path, data_dir)
    t0 = time.time()
    done = torchrun(["torch_worker.py", "train", cfg, "die"], expect_ok=False, timeout=120)
    elapsed = time.time() - t0
    assert done.returncode != 0 and elapsed < 120
    text = done.stdout + done.stderr
    assert "rank      : 1" in text or "rank: 1" in text, text[-3000:]


# 3 steps of each recipe: tiny batches at 32x32 (fp16 convolutions are slow on a CPU), and a loss scale of 64 where
# arcface_torch starts at 2^16: an untrained IResNet's first fp16 steps overflow at 2^16 and are skipped (as on a
# GPU), and 3 skipped steps would leave an untrained r100, whose eval-mode activations overflow, to export.
RECIPE_SMOKE = ["train.max_steps=3", "train.batch_size=2", "backbone.input_size=32", "seed=0", "train.loss_scale=64", "train.log_every=1", "data.source=synthetic",
                "data.num_classes=0", "data.num_workers=0", "val.bins=[]",
                "train.aot_package=false"]          # compiling r100 is minutes; the default run's package is tested


@pytest.mark.parametrize("recipe", ["ms1mv3_r50", "glint360k_r100"])
def test_shipped_recipes_run_over_two_processes(recipe, tmp_path, data_dir):
    """Each recipe's backbone, head (margins, sample_rate, fp16) and loop for 3 steps on the tiny synthetic set
    (its identities replace the recipe's class count)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sets = [a for s in RECIPE_SMOKE + [f"data.path={data_dir}"] + [f"data.{k}={v}" for k, v in
                                                                    TINY_DATA.items()] for a in ("--set", s)]
    twinface("train", "--framework", "torch", "--config", os.path.join(root, "configs", f"{recipe}.yaml"),
             "--nproc", "2", "--output", str(tmp_path / "run"), *sets)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 3 and summary["precision"] == "fp16"
    assert summary["skipped_steps"]["non_finite_loss"] == 0


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_triplet_loss_trains_over_two_processes(framework, tmp_path, data_dir):
    """Triplet loss with P x K batches over 2 processes: each rank mines its own identities (disjoint by the
    sampler), the gradients are averaged; the run trains, evaluates and exports like any other."""
    cfg = _config_file(tmp_path, data_dir, head={"type": "none"}, loss={"type": "triplet", "mining": "semi_hard"},
                       data={"sampler": "identity", "images_per_identity": 3}, train={"batch_size": 6, "epochs": 1})
    twinface("train", "--framework", framework, "--config", cfg, "--nproc", "2", "--output", str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 36 // 12 and summary["skipped_steps"]["no_valid_triplet"] == 0
    assert "identity sampler: 2 identities x 3 images" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_tfrecord_shards_stream_to_two_processes(framework, tmp_path, data_dir):
    """A TFRecord data set read as streams over 2 processes, nothing cached (the TF twin reads the shards with
    tf.data): rank r reads only its own shards, every rank runs the same steps; the run trains and evaluates."""
    from twinface.data.convert import rec_to_tfrecord
    rec_to_tfrecord(os.path.join(data_dir, "train"), tmp_path / "tfr", shards=4, progress=False)  # 9 records each
    cfg = _config_file(tmp_path, data_dir, data={"source": "tfrecord", "path": str(tmp_path / "tfr"),
                                                 "sampler": "stream", "stream_window": 5, "memory_cache_gb": 0},
                       val={"bins": [os.path.join(data_dir, "val.bin")]}, train={"batch_size": 6, "epochs": 1})
    twinface("train", "--framework", framework, "--config", cfg, "--nproc", "2", "--output", str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 18 // 6
    assert "stream sampler: rank 0 reads shards [0, 2] (18 records, 18 used per epoch)" in \
        (tmp_path / "run" / "train.log").read_text()
