"""The TF twin over 2 real worker processes (MultiWorkerMirroredStrategy on CPU, TF_CONFIG on free 127.0.0.1
ports) against single-process references: Partial FC's loss and gradients, one training step of 2 workers x 4
samples against 1 process x 8, the sampled centres, the collective NaN guard, and a killed worker.

Worker r gets the contiguous half r of the global batch (rows 4r..4r+3). The workers (dist_worker_tf.py) run
once for tests 1-4 and once more for the kill."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from twinface import config, partial_fc as plan
from twinface.launch import free_ports, tf_config, worker_env
from twinface.data.transforms import to_model_input
from twinface_tf.heads import MarginHead
from twinface_tf.losses import cross_entropy
from twinface_tf.optim import build_optimizer
from twinface_tf.partial_fc import PartialFC
from twinface_tf.train import TFTwin

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker_tf.py")
WORLD, BATCH, CLASSES, DIM = 2, 4, 200, 32
CONFIG = {"seed": 0, "backbone": {"name": "mbf", "input_size": 32, "num_features": DIM},
          "head": {"type": "arcface"}, "train": {"batch_size": BATCH}}
LR = 0.1
# parity_tests/test_step_parity.py's STEP_CAP: difference / size of the step's update. Measured here: backbone
# ~1e-6, class centres ~1.7e-5 (oneDNN blocks a 100-centre shard's matmul differently from a 200-centre one);
# a wrong reduction (gradients averaged, not summed, or summed twice) is off by the whole update.
STEP_TOL = 1e-3


def _launch(tmp_path, jobs, timeout, **spec):
    """Both workers to the end (or `timeout` s); returns {rank: npz dict or None}, their logs, and the seconds."""
    rng = np.random.default_rng(7)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, emb=rng.standard_normal((WORLD * BATCH, DIM)).astype(np.float32),
             labels=rng.integers(0, CLASSES, WORLD * BATCH).astype(np.int64), num_classes=CLASSES,
             images=rng.integers(0, 256, (WORLD * BATCH, 32, 32, 3), dtype=np.uint8))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"inputs": str(inputs), "out": str(tmp_path), "jobs": jobs, "config": CONFIG,
                                     "lr": LR, "timeout_s": 600, **spec}))
    ports = free_ports(WORLD)
    logs = [open(tmp_path / f"worker{r}.log", "w") for r in range(WORLD)]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, WORKER, str(spec_path)], stdout=logs[r], stderr=subprocess.STDOUT,
                              env=worker_env(WORLD, {"TF_CONFIG": tf_config(ports, r)})) for r in range(WORLD)]
    try:
        for p in procs:
            p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = time.time() - t0
    texts = [(tmp_path / f"worker{r}.log").read_text() for r in range(WORLD)]
    results = {}
    for r in range(WORLD):
        path = tmp_path / f"worker{r}.npz"
        results[r] = dict(np.load(path)) if path.exists() else None
    return results, texts, seconds, inputs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    results, logs, seconds, inputs = _launch(tmp, ["pfc_1.0", "pfc_0.1", "train"], timeout=240, steps=2, nan_at=2)
    for r in range(WORLD):
        assert results[r] is not None, f"worker {r} wrote no results after {seconds:.0f}s:\n{logs[r][-3000:]}"
    return results, dict(np.load(inputs)), tmp


def _centres():
    return plan.init_centres(0, 0, CLASSES, DIM)


def _margin_ce(emb, labels, centres):
    """Single process: MarginHead (arcface, s 64, m2 0.5) on `centres` + cross-entropy; loss and gradients."""
    head = MarginHead(DIM, len(centres), s=64.0, m2=0.5)
    head.weight.assign(centres)
    emb = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        loss = cross_entropy(head(emb, labels), labels)
    grad_emb, grad_centres = tape.gradient(loss, [emb, head.weight])
    return float(loss), grad_emb.numpy(), grad_centres.numpy()


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(b).max(), 1e-30))


def test_partial_fc_over_two_workers_is_margin_head_cross_entropy(run):
    results, inputs, _ = run
    loss, grad_emb, grad_centres = _margin_ce(inputs["emb"], inputs["labels"], _centres())
    for r in range(WORLD):
        assert _rel(results[r]["pfc_1.0/loss"], loss) < 1e-5      # the same global loss on every worker
    got_emb = np.concatenate([results[r]["pfc_1.0/grad_emb"] for r in range(WORLD)])
    got_centres = np.concatenate([results[r]["pfc_1.0/grad_weight"] for r in range(WORLD)])
    print(f"PFC 1.0 over 2 workers vs MarginHead + CE: loss {_rel(results[0]['pfc_1.0/loss'], loss):.1e}, "
          f"d/d embeddings {_rel(got_emb, grad_emb):.1e}, d/d centres {_rel(got_centres, grad_centres):.1e}")
    assert _rel(got_emb, grad_emb) < 1e-4, _rel(got_emb, grad_emb)
    assert _rel(got_centres, grad_centres) < 1e-4, _rel(got_centres, grad_centres)


def test_sampled_centres_are_common_selects_and_the_loss_is_single_process(run):
    results, inputs, _ = run
    labels, centres = inputs["labels"], _centres()
    picked, columns, offset = [], np.full(len(labels), -1), 0
    for r in range(WORLD):
        start, num_local = plan.shard(CLASSES, WORLD, r)
        index, local = plan.select(labels, start, num_local, 0.1, 0, 0, r)
        np.testing.assert_array_equal(results[r]["pfc_0.1/index"], index)
        assert len(index) == max(plan.num_sampled(num_local, 0.1), len(np.unique(local[local >= 0])))
        picked.append(centres[start + index])
        columns[local >= 0] = offset + local[local >= 0]
        offset += len(index)
    assert (columns >= 0).all()
    loss, grad_emb, grad_picked = _margin_ce(inputs["emb"], columns, np.concatenate(picked))
    for r in range(WORLD):
        assert _rel(results[r]["pfc_0.1/loss"], loss) < 1e-5
    got_emb = np.concatenate([results[r]["pfc_0.1/grad_emb"] for r in range(WORLD)])
    assert _rel(got_emb, grad_emb) < 1e-4
    got_picked = np.concatenate([results[r]["pfc_0.1/grad_weight"][results[r]["pfc_0.1/index"]]
                                 for r in range(WORLD)])
    print(f"PFC 0.1 over 2 workers vs 1 process on the picked centres: loss "
          f"{_rel(results[0]['pfc_0.1/loss'], loss):.1e}, d/d embeddings {_rel(got_emb, grad_emb):.1e}, "
          f"d/d picked centres {_rel(got_picked, grad_picked):.1e}")
    assert _rel(got_picked, grad_picked) < 1e-4
    for r in range(WORLD):                     # centres left out of the draw get no gradient
        unpicked = np.delete(results[r]["pfc_0.1/grad_weight"], results[r]["pfc_0.1/index"], axis=0)
        assert not unpicked.any()


def _weights(result, step, count):
    return [result[f"train/{step}/{i:04d}"] for i in range(count)]


def _reference_step(start, images, labels):
    """1 process x 8 samples, as data-parallel training does it: the backbone (BatchNorm on batch statistics) on
    each worker's half separately, embeddings concatenated, Partial FC at world 1, the summed gradient clipped,
    BatchNorm moving statistics the mean of the two halves' updates."""
    cfg = config.from_dict(CONFIG)
    twin = TFTwin()
    twin.build(cfg, CLASSES)
    backbone = twin.backbone
    head = PartialFC(DIM, CLASSES, seed=0, **cfg.head_params())
    for v, value in zip(backbone.variables + head.variables, start):
        v.assign(value)
    stats = [v for v in backbone.non_trainable_variables if "moving" in v.path]
    before = [v.numpy() for v in stats]
    updated = []
    with tf.GradientTape() as tape:
        emb = []
        for r in range(WORLD):
            for v, value in zip(stats, before):
                v.assign(value)
            emb.append(backbone(tf.constant(to_model_input(images[r * BATCH:(r + 1) * BATCH], "NHWC")),
                                training=True))
            updated.append([v.numpy() for v in stats])
        loss = head(tf.concat(emb, 0), tf.constant(labels))
    grads = tape.gradient(loss, backbone.trainable_variables + [head.weight])
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads[:-1]]))
    coef = tf.minimum(cfg.train.clip_grad_norm / (norm + 1e-6), 1.0)
    twin.opt_backbone.learning_rate.assign(LR)
    twin.opt_backbone.apply([g * coef for g in grads[:-1]], backbone.trainable_variables)
    opt_head = build_optimizer("sgd", [head.weight], LR, momentum=cfg.optimizer.momentum,
                               weight_decay=cfg.optimizer.weight_decay)
    opt_head.apply(grads[-1:], [head.weight])
    for v, *values in zip(stats, *updated):
        v.assign(np.mean(values, axis=0))
    return float(loss), [v.numpy() for v in backbone.variables], head.weight.numpy()


def test_two_workers_by_4_step_like_one_process_by_8(run):
    results, inputs, _ = run
    count = sum(1 for k in results[0] if k.startswith("train/0/"))
    start = _weights(results[0], 0, count)
    np.testing.assert_array_equal(np.concatenate([start[-1], _weights(results[1], 0, count)[-1]]), _centres())
    start = start[:-1] + [_centres()]                          # the whole head, both shards
    loss, backbone, centres = _reference_step(start, inputs["images"], inputs["labels"])
    print(f"2 workers x 4 vs 1 process x 8: loss {_rel(results[0]['train/loss1'], loss):.1e}")
    for r in range(WORLD):
        assert _rel(results[r]["train/loss1"], loss) < 1e-5
    after = [_weights(results[r], 1, count) for r in range(WORLD)]
    update = max(np.abs(b - a).max() for a, b in zip(start[:-1], backbone))
    diff = max(np.abs(a - b).max() for a, b in zip(after[0][:-1], backbone)) / update
    print(f"backbone after one step: {diff:.2e} of the update")
    assert diff < STEP_TOL, f"backbone after one step: {diff:.2e} of the update"
    got = np.concatenate([after[r][-1] for r in range(WORLD)])
    diff = np.abs(got - centres).max() / np.abs(centres - _centres()).max()
    print(f"class centres after one step: {diff:.2e} of the update")
    assert diff < STEP_TOL, f"class centres after one step: {diff:.2e} of the update"


def test_nan_on_one_worker_skips_the_step_on_both(run):
    """Worker 1's loss alone is NaN at step 2 (worker 0's is finite): both report it and leave every weight
    as it was, so the workers stay identical."""
    results, _, _ = run
    count = sum(1 for k in results[0] if k.startswith("train/0/"))
    backbone = count - 1
    for r in range(WORLD):
        assert np.isfinite(results[r]["train/loss1"]) and np.isnan(results[r]["train/loss2"])
        for a, b in zip(_weights(results[r], 1, count), _weights(results[r], 2, count)):
            np.testing.assert_array_equal(a, b)
    for step in range(3):                      # backbone, optimizer-updated and BatchNorm statistics alike
        for a, b in zip(*(_weights(results[r], step, count)[:backbone] for r in range(WORLD))):
            np.testing.assert_array_equal(a, b)


def test_checkpoint_files_split_backbone_and_shards_and_refuse_another_world_size(run):
    """Several workers: rank 0's state holds no head, each shard only its own centres and their optimizer
    state; a 1-process run (all 200 centres in one shard) refuses a shard of 2 (100 centres) and the state of
    2 processes, naming both sizes."""
    results, _, tmp = run
    state, shard = np.load(tmp / "state.npz"), np.load(tmp / "shard1.npz")
    assert {k.split("/")[0] for k in state.files} == {"backbone", "opt_backbone", "meta"}
    assert {k.split("/")[0] for k in shard.files} == {"head", "opt_head", "meta"}
    count = sum(1 for k in results[1] if k.startswith("train/0/"))
    np.testing.assert_array_equal(shard["head/0000"], _weights(results[1], 2, count)[-1])
    twin = TFTwin()
    twin.build(config.from_dict({**CONFIG, "head": {"type": "arcface", "sample_rate": 0.5}}), CLASSES)
    with pytest.raises(ValueError, match=re.escape(f"{tmp / 'shard1.npz'}: 'head/0000' (") + r"\S+weight\) " +
                       re.escape("has shape (100, 32), expected (200, 32) for the head shard of rank 0 of 1")):
        twin.load_shard(str(tmp / "shard1.npz"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp / 'state.npz'}: the run was trained over 2 process(es), "
                                                   f"this resume has 1")):
        twin.load_state(str(tmp / "state.npz"))


def test_resuming_from_state_and_shards_is_bit_faithful(run):
    """The step after a checkpoint, taken once straight on and once after loading the checkpoint back."""
    results, _, _ = run
    count = sum(1 for k in results[0] if k.startswith("train/0/"))
    for r in range(WORLD):
        assert results[r]["train/loss_next"] == results[r]["train/loss_resumed"]
        changed = False
        for a, b, before in zip(_weights(results[r], "next", count), _weights(results[r], "resumed", count),
                                _weights(results[r], 2, count)):
            np.testing.assert_array_equal(a, b)
            changed |= not np.array_equal(a, before, equal_nan=True)
        assert changed                         # the step did train


@pytest.mark.parametrize("victim", [1, 0])       # 0 also hosts TF's coordination service
def test_a_killed_worker_makes_the_other_exit_naming_it(tmp_path, victim):
    results, logs, seconds, _ = _launch(tmp_path, ["kill"], timeout=150, victim=victim)
    survivor = 1 - victim
    assert results[victim] is None
    assert results[survivor] is not None, f"worker {survivor} did not finish in {seconds:.0f}s:\n" \
                                          f"{logs[survivor][-3000:]}"
    message = str(results[survivor]["kill/message"])
    assert f"TF worker {survivor} of 2: worker {victim} of the run stopped or is unreachable" in message, message
    assert results[survivor]["kill/seconds"] < 120, results[survivor]["kill/seconds"]
    print(f"worker {survivor} noticed the kill after {float(results[survivor]['kill/seconds']):.2f}s: {message}")


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        workers = {"cluster": {"worker": [address, f"127.0.0.1:{free_ports(1)[0]}"]},
                   "task": {"type": "worker", "index": 0}}
        done = subprocess.run([sys.executable, "-c", "from twinface_tf.train import TFTwin; TFTwin()"],
                              env={**os.environ, "TF_CONFIG": json.dumps(workers)}, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode != 0
    assert f"OSError: TF_CONFIG: worker 0 cannot serve {address} (is the port in use?)" in done.stderr, \
        done.stderr[-3000:]


@pytest.mark.parametrize("workers, expected", [
    ({}, (0, 1)),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, (0, 1)),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, (1, 2)),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}},
     "TF_CONFIG: task must be {'type': 'worker', 'index': 0..1} (one of cluster.worker), got"),
    ({"cluster": {"worker": ["a:1", "b:2"], "chief": ["c:3"]}, "task": {"type": "worker", "index": 1}},
     "TF_CONFIG: the cluster may name only 'worker' tasks (worker 0 is the chief), got ['chief']"),
])
def test_rank_and_world_size_come_from_tf_config(monkeypatch, workers, expected):
    from twinface_tf import distributed as dist
    monkeypatch.setenv("TF_CONFIG", json.dumps(workers))
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            dist.world()
    else:
        assert dist.world() == expected
