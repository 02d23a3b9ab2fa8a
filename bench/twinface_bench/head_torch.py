"""One Partial FC head setting on one rank of the torch twin, started by head.py as a plain process (world 1) or
under torchrun (world 2):

    python -m twinface_bench.head_torch '<spec json>' OUT_DIR          -> OUT_DIR/rank<r>.json

A step is the head alone on fixed embeddings: forward, distributed cross-entropy, backward to the embeddings
and the centres, SGD (momentum 0.9, weight decay 5e-4) on this rank's shard.
"""
import json
import os
import sys
import time

import numpy as np
import torch

from twinface.registry import margin_settings
from twinface_torch import distributed as dist
from twinface_torch.partial_fc import PartialFC

from .measure import peak_rss_mb


def _mb(t) -> float:
    return 0.0 if t is None else t.numel() * t.element_size() / 2 ** 20


def measure_rank(spec: dict) -> dict:
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

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        dist.barrier()                  # ranks start each step together: a step's time is the slower rank's
        t0 = time.perf_counter()
        loss = step()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    # the head's memory from its live tensors; the logits [global batch, sampled centres] are gone after the
    # step, so their size comes from the centres this step sampled
    sampled = len(head.last_index)
    memory = {"weight_mb": _mb(head.weight), "grad_mb": _mb(head.weight.grad),
              "momentum_mb": _mb(optimizer.state[head.weight].get("momentum_buffer")),
              "logits_mb": spec["batch"] * world * sampled * head.weight.element_size() / 2 ** 20}
    return {"rank": rank, "world": world, "centres": head.num_local, "sampled": sampled,
            "step_ms": 1e3 * float(np.median(times)), "steps_ms": [1e3 * t for t in times], "loss": loss,
            "threads": torch.get_num_threads(), **memory, "total_mb": sum(memory.values()),
            "peak_rss_mb": peak_rss_mb()}


def main(argv):
    spec, out_dir = json.loads(argv[0]), argv[1]
    row = measure_rank(spec)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{row['rank']}.json"), "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    main(sys.argv[1:])
