"""The fixed inputs every scale-out check shares (torch and TF workers, and the tests' references): seeded
global batches of images, labels and embeddings, and the tiny training config. No framework imported here."""
import numpy as np

from twinface import config

# 8 samples per rank: with 4, BatchNorm over the 1x1 maps of MobileFaceNet at 32x32 sees 4 values per channel,
# so ill-conditioned that torch vs TF drift to 1.7e-3 of the update in one step (6e-6 with 8; one process 8e-6)
D, CLASSES, GLOBAL_BATCH = 32, 10, 16
HEAD_CLASSES = 100          # the head checks: enough centres that sampling draws negatives too
ARCFACE = {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}


def global_batch(size=32, classes=CLASSES):
    rng = np.random.default_rng(7)
    return (rng.integers(0, 256, (GLOBAL_BATCH, size, size, 3), dtype=np.uint8),
            rng.integers(0, classes, GLOBAL_BATCH).astype(np.int64))


def embeddings():
    return np.random.default_rng(8).standard_normal((GLOBAL_BATCH, D)).astype(np.float32)


def mine(x, rank, world):
    n = len(x) // world
    return x[rank * n:(rank + 1) * n]


def step_config(world):
    return config.from_dict({"seed": 0, "backbone": {"name": "mbf", "input_size": 32, "num_features": D},
                             "head": {"type": "arcface"}, "optimizer": {"lr": 0.1},
                             "train": {"batch_size": GLOBAL_BATCH // world}})
