"""One worker of a 2-worker TF run for test_distributed_tf.py: `TF_CONFIG=... python dist_worker_tf.py SPEC.json`.

Inputs come from the spec's inputs .npz (the test owns them and the
single-process references); everything the test compares goes to <out>/worker<RANK>.npz. Jobs, in order:
- pfc_<rate>: PartialFC alone on fixed embeddings (this worker's contiguous half of the global batch): loss,
  gradients for its embedding rows and its centres, the centres it sampled.
- train: TFTwin steps on fixed images (contiguous halves); weights before and after every step. With
  `nan_at`, worker 1's loss is made NaN at that step (a flag added to the loss): the step guard is collective.
  Then each worker's head shard (shard<RANK>.npz) and rank 0's state (state.npz), one more step, and the
  same step again after loading them back (a resume).
- kill: worker `victim` kills itself (SIGKILL) after a first barrier; the other keeps entering barriers (a
  collective, as in every step) until one fails, and records the message and how long that took.
"""
import json
import os
import signal
import sys
import time

import numpy as np

import tensorflow as tf

from twinface import config
from twinface_tf import distributed as dist, partial_fc
from twinface_tf.train import TFTwin

SPEC = json.load(open(sys.argv[1]))
RANK, WORLD = dist.world()                # from the TF_CONFIG the test sets
twin = TFTwin(timeout_s=SPEC["timeout_s"])  # the strategy first: collectives are configured at program start
inputs = np.load(SPEC["inputs"])
out = {}


def half(array):
    n = len(array) // WORLD
    return array[RANK * n:(RANK + 1) * n]


def pfc_job(rate):
    head = partial_fc.PartialFC(inputs["emb"].shape[1], int(inputs["num_classes"]), sample_rate=rate, rank=RANK,
                                world_size=WORLD, seed=0, s=64.0, m2=0.5)
    emb, labels = tf.constant(half(inputs["emb"])), tf.constant(half(inputs["labels"]))

    @tf.function
    def step():
        def replica(emb, labels):
            with tf.GradientTape() as tape:
                tape.watch(emb)
                loss = head(emb, labels)
            return (loss, *map(tf.convert_to_tensor, tape.gradient(loss, [emb, head.weight])))
        return dist.run(twin.strategy, replica, emb, labels)
    loss, grad_emb, grad_weight = step()
    out.update({f"pfc_{rate}/loss": loss.numpy(), f"pfc_{rate}/grad_emb": grad_emb.numpy(),
                f"pfc_{rate}/grad_weight": grad_weight.numpy(), f"pfc_{rate}/index": head.last_index.numpy(),
                f"pfc_{rate}/class_start": head.class_start})


def save_weights(key):
    """Backbone variables (BatchNorm statistics included) and the head shard, by position."""
    for i, v in enumerate(twin.backbone.variables + twin.head.variables):
        out[f"{key}/{i:04d}"] = v.numpy()


def train_job():
    twin.build(config.from_dict(SPEC["config"]), int(inputs["num_classes"]))
    poison = tf.Variable(0.0)                 # worker 1's loss + NaN at step nan_at; + 0.0 changes nothing
    call = type(twin.head).call
    type(twin.head).call = lambda self, *args: call(self, *args) + poison
    images, labels = half(inputs["images"]), half(inputs["labels"])
    save_weights("train/0")
    for step in range(1, SPEC["steps"] + 1):
        poison.assign(np.nan if RANK == 1 and step == SPEC.get("nan_at") else 0.0)
        out[f"train/loss{step}"] = twin.train_step(images, labels, SPEC["lr"], SPEC["lr"])
        save_weights(f"train/{step}")
    meta = {"step": SPEC["steps"], "world_size": WORLD}        # as the trainer writes it
    state, shard = (os.path.join(SPEC["out"], name) for name in ("state.npz", f"shard{RANK}.npz"))
    twin.save_shard(shard, meta)
    if RANK == 0:
        twin.save_state(state, meta)
    twin.barrier()                            # rank 0's state is written before anyone reads it
    poison.assign(0.0)
    out["train/loss_next"] = twin.train_step(images, labels, SPEC["lr"], SPEC["lr"])
    save_weights("train/next")
    twin.load_state(state)                    # back to the checkpoint: the same step again
    twin.load_shard(shard)
    out["train/loss_resumed"] = twin.train_step(images, labels, SPEC["lr"], SPEC["lr"])
    save_weights("train/resumed")


def kill_job():
    twin.barrier()                            # both alive and connected
    if RANK == SPEC["victim"]:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.time()
    try:
        for _ in range(100000):
            twin.barrier()
    except RuntimeError as e:
        out.update({"kill/message": str(e), "kill/seconds": time.time() - t0})


for job in SPEC["jobs"]:
    if job.startswith("pfc_"):
        pfc_job(float(job[4:]))
    else:
        {"train": train_job, "kill": kill_job}[job]()
np.savez(os.path.join(SPEC["out"], f"worker{RANK}.npz"), **out)
