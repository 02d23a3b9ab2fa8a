"""One Partial FC head setting on one rank of the torch twin, started by head.py as a plain process (world 1) or
under torchrun (world 2):

    python -m twinface_bench.head_torch '<spec json>' OUT_DIR          -> OUT_DIR/rank<r>.json

A step is the head alone on fixed embeddings: forward, distributed cross-entropy, backward to the embeddings
and the centres, SGD (momentum 0.9, weight decay 5e-4) on this rank's shard.
"""
import json
import os
import sys

import numpy as np
import torch

from twinface.registry import margin_settings
from twinface_torch import distributed as dist
from twinface_torch.partial_fc import PartialFC

from .head import time_steps, write_rank


def _mb(t) -> float:
    return t.numel() * t.element_size() / 2 ** 20


def measure_rank(spec: dict, out_dir: str):
    rank, world, _ = dist.world()
    dist.init(world, torch.device("cpu"), spec["timeout_s"])
    d, classes = spec["embedding"], spec["classes"]
    head = PartialFC(d, classes, spec["sample_rate"], rank, world, seed=0, **margin_settings("arcface", {}))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng([spec["seed"], rank])
    # requires_grad: backward runs through the all-gather back to each rank's embeddings, as in training
    embeddings = torch.from_numpy(rng.standard_normal((spec["batch"], d), dtype=np.float32)).requires_grad_()
    labels = torch.from_numpy(rng.integers(0, classes, spec["batch"]))

    def step():
        optimizer.zero_grad()
        embeddings.grad = None
        loss = head(embeddings, labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    times, loss = time_steps(step, dist.barrier, spec)
    write_rank(out_dir, spec, rank, world, head.num_local, len(head.last_index), times, loss,
               torch.get_num_threads(), _mb(head.weight), _mb(head.weight.grad),
               _mb(optimizer.state[head.weight]["momentum_buffer"]))


def main(argv):
    measure_rank(json.loads(argv[0]), argv[1])
    # The rank's numbers are on disk. Leave without C++ teardown: gloo's, whether the group is destroyed at exit
    # or not, aborted the process (SIGABRT) in about 1 of 4 runs when its peer closed first.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
