"""One worker of a TF scale-out check, started with a TF_CONFIG (processes.tf_workers): the torch_worker.py checks
in the TF twin, so the two twins' ranks can be compared file for file.

    python tf_worker.py head SAMPLE_RATE OUT_DIR         Partial FC on fixed embeddings: loss and gradients
    python tf_worker.py step OUT_DIR START.npz           one TFTwin step from the torch worker's starting backbone

Each worker writes OUT_DIR/rank{r}.npz with torch_worker.py's keys (backbone tensors under torch names).
"""
import os
import sys

import numpy as np
import tensorflow as tf

from twinface_convert.mapping import keras_to_torch, torch_to_keras
from twinface_tf import distributed as dist
from twinface_tf.partial_fc import PartialFC
from twinface_tf.train import TFTwin

from inputs import ARCFACE, CLASSES, D, HEAD_CLASSES, embeddings, global_batch, mine, step_config

TWIN = TFTwin()                        # the strategy first: collectives are set up at program start


def head(sample_rate, out):
    rank, world = TWIN.rank, TWIN.world_size
    pfc = PartialFC(D, HEAD_CLASSES, sample_rate, rank, world, seed=0, **ARCFACE)
    emb = tf.constant(mine(embeddings(), rank, world))
    labels = tf.constant(mine(global_batch(classes=HEAD_CLASSES)[1], rank, world))

    @tf.function
    def step():
        def replica(emb, labels):
            with tf.GradientTape() as tape:
                tape.watch(emb)
                loss = pfc(emb, labels)
            return (loss, *tape.gradient(loss, [emb, pfc.weight]))
        return dist.run(TWIN.strategy, replica, emb, labels)

    loss, emb_grad, weight_grad = step()
    np.savez(os.path.join(out, f"rank{rank}.npz"), loss=float(loss), emb_grad=emb_grad.numpy(),
             weight_grad=tf.convert_to_tensor(weight_grad).numpy(), index=pfc.last_index.numpy(),
             class_start=pfc.class_start)


def step(out, start_file):
    rank, world = TWIN.rank, TWIN.world_size
    images, labels = global_batch()
    TWIN.build(step_config(world), CLASSES)
    with np.load(start_file) as saved:
        torch_to_keras({k[len("start/"):]: saved[k] for k in saved.files if k.startswith("start/")}, TWIN.backbone,
                       source=start_file)
    loss = TWIN.train_step(mine(images, rank, world), mine(labels, rank, world), 0.1, 0.1)
    np.savez(os.path.join(out, f"rank{rank}.npz"), loss=loss, head=TWIN.head.weight.numpy(),
             class_start=TWIN.head.class_start,
             **{f"backbone/{k}": v for k, v in keras_to_torch(TWIN.backbone).items()})


if __name__ == "__main__":
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "head":
        head(float(args[0]), args[1])
    else:
        step(*args)
