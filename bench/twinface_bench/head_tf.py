"""One Partial FC head setting on one worker of the TF twin (head_torch.py's twin), started by head.py:

    python -m twinface_bench.head_tf '<spec json>' OUT_DIR          -> OUT_DIR/rank<r>.json

At world > 1 that first process starts the workers (twinface.launch: TF_CONFIG on free 127.0.0.1 ports) and
each worker runs its replica under MultiWorkerMirroredStrategy, as the TF twin trains.
"""
import json
import os
import sys

import numpy as np
import tensorflow as tf

from twinface.launch import run_tf_workers
from twinface.registry import margin_settings
from twinface_tf import distributed as dist
from twinface_tf.optim import SGD
from twinface_tf.partial_fc import PartialFC

from .head import time_steps, write_rank


def _mb(t) -> float:
    return int(np.prod(t.shape)) * tf.as_dtype(t.dtype).size / 2 ** 20        # Keras variables: dtype is a name


def measure_rank(spec: dict, out_dir: str):
    rank, world = dist.world()
    strategy = dist.strategy(world, spec["timeout_s"])
    d, classes = spec["embedding"], spec["classes"]
    head = PartialFC(d, classes, spec["sample_rate"], rank, world, seed=0, **margin_settings("arcface", {}))
    optimizer = SGD(learning_rate=0.1, momentum=0.9, weight_decay=5e-4)       # torch.optim.SGD's rule
    optimizer.build([head.weight])
    rng = np.random.default_rng([spec["seed"], rank])
    embeddings = tf.constant(rng.standard_normal((spec["batch"], d), dtype=np.float32))
    labels = tf.constant(rng.integers(0, classes, spec["batch"]))

    def replica():
        with tf.GradientTape() as tape:
            tape.watch(embeddings)          # backward runs through the all-gather back to the embeddings
            loss = head(embeddings, labels)
        grad, grad_embeddings = tape.gradient(loss, [head.weight, embeddings])
        return loss, tf.convert_to_tensor(grad), grad_embeddings

    @tf.function
    def step():
        loss, grad, grad_embeddings = dist.run(strategy, replica)
        optimizer.apply([grad], [head.weight])
        return loss, grad, grad_embeddings

    times, (loss, grad, _) = time_steps(step, lambda: dist.barrier(strategy), spec)
    momentum = optimizer.momentum_buffers[optimizer._get_variable_index(head.weight)]
    write_rank(out_dir, spec, rank, world, head.num_local, head.last_index.numpy().size, times, float(loss),
               int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0)), _mb(head.weight), _mb(grad), _mb(momentum))


def main(argv):
    spec = json.loads(argv[0])
    if spec["world"] > 1 and "TF_CONFIG" not in os.environ:
        sys.exit(run_tf_workers(spec["world"], [sys.executable, "-m", "twinface_bench.head_tf", *argv]))
    measure_rank(spec, argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
