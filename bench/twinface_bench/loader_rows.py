"""One task of the loader section (loader.py), run in a child process of its own:

    python -m twinface_bench.loader_rows '<spec json>' OUT.json

so torch's and TensorFlow's threads never share a process, and each row's peak RSS is its own. Tasks: the data
set (generated once), the decode limit, one twin's loader at one worker count over one format, and one twin's
training step fed by its loader against the same batches held in memory.
"""
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import numpy as np

from twinface.data.dataset import open_dataset
from twinface.data.sampler import sampler_for

from .measure import peak_rss_mb
from .shared import train_config

IMAGE_SIZE = 112                    # the synthetic set's crops, and what the recipes train on


def data(spec) -> dict:
    """The synthetic set (112x112 JPEGs) as an image folder and .rec/.idx, plus a TFRecord copy of the .rec
    when asked; the path each format's rows open."""
    from twinface.data import synth
    t0 = time.perf_counter()
    root = os.path.join(spec["dir"], "synth")
    synth.generate(root, num_identities=spec["identities"], images_per_identity=spec["images_per_identity"],
                   val_identities=2, val_pairs=20, seed=spec["seed"], formats=("rec", "folder"), workers=2,
                   progress=False)
    paths = {"folder": os.path.join(root, "train"), "rec": os.path.join(root, "train.rec")}
    if "tfrecord" in spec["formats"]:
        from twinface.data.convert import rec_to_tfrecord
        paths["tfrecord"] = os.path.join(spec["dir"], "tfrecord")
        rec_to_tfrecord(os.path.join(root, "train"), paths["tfrecord"], shards=spec["shards"], progress=False)
    dataset = open_dataset(paths["rec"])
    sizes = [len(dataset.encoded(i)) for i in range(len(dataset))]
    return {"section": "data", "images": len(dataset), "identities": dataset.num_classes,
            "jpeg_bytes_mean": float(np.mean(sizes)), "paths": {f: paths[f] for f in spec["formats"]},
            "seconds": time.perf_counter() - t0}


def limit(spec) -> dict:
    """Single-thread cv2.imdecode over every JPEG of the set (median of the passes) and that rate times the cores
    this process may run on: what decoding alone allows on this machine, before any loader overhead."""
    import cv2
    cv2.setNumThreads(1)
    dataset = open_dataset(spec["path"])
    encoded = [np.frombuffer(dataset.encoded(i), np.uint8) for i in range(len(dataset))]
    rates = []
    for _ in range(spec["passes"]):
        t0 = time.perf_counter()
        for buffer in encoded:
            cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        rates.append(len(encoded) / (time.perf_counter() - t0))
    cores = len(os.sched_getaffinity(0))
    single = statistics.median(rates)
    return {"section": "limit", "single_core_images_per_s": single, "passes_images_per_s": rates, "cores": cores,
            "limit_images_per_s": single * cores, "images": len(encoded)}


def _twin_batches(framework):
    """The twin's real default loader: twinface_torch.data.batches (DataLoader) or twinface_tf.data.batches
    (tf.data), imported only here so a torch row never loads TensorFlow."""
    if framework == "torch":
        from twinface_torch.data import batches
    elif framework == "tf":
        from twinface_tf.data import batches
    else:
        raise ValueError(f"loader bench: unknown framework {framework!r}; expected torch or tf")
    return batches


def _sampler(spec, dataset):
    """The trainer's sampler for this batch size: shuffled epochs (the default) or, for TFRecord, the stream
    sampler (shards read in turn, window-shuffled; the TF twin's native tf.data reader); random flips."""
    cfg = train_config({"model": spec.get("model", "r18"), "input_size": IMAGE_SIZE, "num_features": 512,
                        "batch": spec["batch"]})
    if spec["sampler"] != cfg.data.sampler:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=spec["format"],
                                                                sampler=spec["sampler"]))
    return cfg, sampler_for(cfg, dataset, 0, 1)


def loader(spec) -> dict:
    """Decoded, batched images/s of one epoch per pass (epochs 0, 1, ...): images after the first batch over the
    time from the first batch to the last, so the workers' start-up (reported apart) does not count."""
    batches = _twin_batches(spec["framework"])
    dataset = open_dataset(spec["path"])
    _, sampler = _sampler(spec, dataset)
    rates, first = [], []
    for epoch in range(spec["passes"]):
        start = time.perf_counter()
        count, t0 = 0, None
        for images, labels in batches(dataset, sampler, epoch, num_workers=spec["workers"], size=IMAGE_SIZE):
            if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8 \
                    or len(labels) != len(images):
                raise ValueError(f"{spec['framework']} loader on {spec['path']}: batch {images.dtype} {images.shape} "
                                 f"with {len(labels)} labels, expected uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]")
            if t0 is None:
                t0 = time.perf_counter()
                first.append(t0 - start)
            else:
                count += len(images)
        if not count:
            raise ValueError(f"loader bench: {len(dataset)} images make fewer than 2 batches of {spec['batch']}; "
                             "raise --loader-images")
        rates.append(count / (time.perf_counter() - t0))
    return {"section": "loader", **_row_key(spec), "images_per_s": statistics.median(rates),
            "passes_images_per_s": rates, "first_batch_s": statistics.median(first),
            "images_per_pass": sampler.steps_per_epoch() * spec["batch"], "peak_rss_mb": peak_rss_mb()}


def _row_key(spec):
    return {k: spec[k] for k in ("framework", "format", "sampler", "workers")}


def _build_twin(framework, cfg, num_classes):
    if framework == "torch":
        from twinface_torch.train import TorchTwin as Twin
    else:
        from twinface_tf.train import TFTwin as Twin
    twin = Twin()
    twin.build(cfg, num_classes)
    return twin


def train(spec) -> dict:
    """The twin's train_step fed by its own loader (twin.batches: data.num_workers, as the trainer calls it)
    against the same batches already in memory, in one process, `steps` of each. The first step (tracing,
    allocation) and the loader's first batch (its workers' start-up) are not timed; a loader step includes
    waiting for its batch."""
    dataset = open_dataset(spec["path"])
    cfg, sampler = _sampler(spec, dataset)
    twin = _build_twin(spec["framework"], cfg, dataset.num_classes)
    k = spec["steps"]
    collect = twin.batches(dataset, sampler, 0, 0)
    held = [next(collect) for _ in range(k + 1)]             # the loader's first k + 1 batches, held in memory
    collect.close()
    losses = []

    def step(images, labels):
        losses.append(twin.train_step(images, labels, 0.01, 0.01))

    step(*held[0])
    feed = twin.batches(dataset, sampler, 0, 0)
    step(*next(feed))
    times = {"memory": [], "loader": []}
    waits = []
    for i in range(1, k + 1):
        # Memory and loader steps alternate, the order flipping every pair (ABBA), so load from other processes
        # that comes and goes hits both alike. The loader replaces a batch it hands out at once (its workers or
        # tf.data's prefetch start on the next), so that work lands in the loader step's time.
        for fed_by in ("memory", "loader") if i % 2 else ("loader", "memory"):
            t0 = time.perf_counter()
            batch = held[i] if fed_by == "memory" else next(feed)
            if fed_by == "loader":
                waits.append(time.perf_counter() - t0)
            step(*batch)
            times[fed_by].append(time.perf_counter() - t0)
    feed.close()
    bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        raise RuntimeError(f"{spec['framework']} {spec['model']}: training step {bad[0]} returned loss "
                           f"{losses[bad[0]]}; a skipped update would time faster than training")
    memory, fed = times["memory"], times["loader"]
    return {"section": "training", **_row_key(spec), "model": spec["model"], "batch": spec["batch"],
            "classes": dataset.num_classes, "memory_images_per_s": spec["batch"] * len(memory) / sum(memory),
            "loader_images_per_s": spec["batch"] * len(fed) / sum(fed), "memory_steps_s": memory,
            "loader_steps_s": fed, "loader_wait_s": waits, "losses": losses, "peak_rss_mb": peak_rss_mb()}


TASKS = {"data": data, "limit": limit, "loader": loader, "train": train}


def main(argv):
    spec_json, out_path = argv
    spec = json.loads(spec_json)
    row = TASKS[spec["task"]](spec)
    with open(out_path, "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    main(sys.argv[1:])
