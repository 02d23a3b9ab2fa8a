"""One bench task (reference peak, preparation, inference runtime, duel, training step), run in a child process:

    python -m twinface_bench.tasks '<spec json>' OUT.json

so each row's peak RSS is its own. The plan (run.py) can also call run_task in-process (the smoke test does).
"""
import json
import math
import os
import sys
import time

import numpy as np

from . import measure

LATENCY_MIN_ITERS = 10          # the smallest batch reports latency percentiles: enough calls to mean something


def _rows_module(runtime: str):
    """The module that owns a runtime, imported only when needed: a torch row never loads TensorFlow."""
    prefix = runtime.split("-")[0]
    if prefix == "torch":
        from . import torch_rows as module
    elif prefix == "tf":
        from . import tf_rows as module
    elif prefix == "ort":
        from . import ort_rows as module
    elif prefix == "tflite":
        from . import tflite_rows as module
    else:
        raise ValueError(f"unknown runtime {runtime!r}: expected a name starting with torch-, tf-, ort- or tflite-")
    return module


def peak(spec) -> dict:
    """GFLOP/s of an n x n fp32 matrix product in one library: the machine's reference peak."""
    n, lib = spec["n"], spec["lib"]
    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (0, 1))
    if lib == "numpy":
        def matmul():
            return a @ b
    elif lib == "torch":
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)

        def matmul():
            return torch.mm(ta, tb)
    elif lib == "tf":
        import tensorflow as tf
        ta, tb = tf.constant(a), tf.constant(b)

        def matmul():
            return tf.linalg.matmul(ta, tb).numpy()
    else:
        raise ValueError(f"peak: unknown library {lib!r}; expected numpy, torch or tf")
    return {"section": "peak", "runtime": f"peak-{lib}", "n": n, "gflops": measure.matmul_gflops(matmul, n),
            "peak_rss_mb": measure.peak_rss_mb()}


def prepare(spec) -> dict:
    images = measure.images(8, spec["input_size"])
    module = _rows_module(spec["framework"])
    t0 = time.perf_counter()
    facts = module.prepare(spec, images)
    return {"section": "prepare", "runtime": f"prepare-{spec['framework']}", "model": spec["model"],
            "seconds": time.perf_counter() - t0, **facts}


def infer(spec) -> list:
    """One runtime on one model at each batch size; batches run smallest first, so the peak RSS read after
    each one is that batch's (or a smaller one's) peak."""
    runtime = spec["runtime"]
    module = _rows_module(runtime)
    build, make_call = module.inference(runtime, spec)
    t0 = time.perf_counter()
    build()
    build_s = time.perf_counter() - t0
    images = measure.images(max(spec["batches"]), spec["input_size"])
    rows = []
    for batch in sorted(spec["batches"]):
        call = make_call(images[:batch])
        t0 = time.perf_counter()
        call()
        first_call_s = time.perf_counter() - t0
        min_iters = max(spec["min_iters"], LATENCY_MIN_ITERS) if batch == spec["latency_batch"] else spec["min_iters"]
        times = measure.time_calls(call, min_iters, spec["min_seconds"], spec["max_seconds"])
        row = {"section": "inference", "runtime": runtime, "model": spec["model"], "batch": batch,
               "build_s": build_s, "first_call_s": first_call_s, **measure.summarize(times, batch),
               "peak_rss_mb": measure.peak_rss_mb()}
        if hasattr(module, "cuda_peak_mb") and "cuda" in runtime:
            row["gpu_peak_mb"] = module.cuda_peak_mb()
        rows.append(row)
    return rows


def duel(spec) -> list:
    """Several runtimes in one process, one call each per round, the order rotating: every runtime sees the
    same machine, so the ratios between them survive other processes' load coming and going (rows measured a
    minute apart do not). The bench's targets are read from here."""
    images = measure.images(spec["batch"], spec["input_size"])
    calls = {}
    for runtime in spec["runtimes"]:
        build, make_call = _rows_module(runtime).inference(runtime, spec)
        build()
        calls[runtime] = make_call(images)
        calls[runtime]()                                     # first call: tracing, compiling, allocation
    times = {runtime: [] for runtime in calls}
    order = list(calls)
    for i in range(spec["rounds"]):
        for runtime in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter()
            calls[runtime]()
            times[runtime].append(time.perf_counter() - t0)
    return [{"section": "duel", "runtime": runtime, "model": spec["model"], "batch": spec["batch"],
             **measure.summarize(t, spec["batch"])} for runtime, t in times.items()]


def train(spec) -> list:
    """Training steps of one twin's real adapter; a non-finite loss fails the row (that step skipped its
    update, so its time is not what training gets)."""
    runtime = spec["runtime"]
    module = _rows_module(runtime)
    rng = np.random.default_rng(0)
    images = measure.images(spec["batch"], spec["input_size"])
    labels = rng.integers(0, spec["classes"], spec["batch"]).astype(np.int64)
    t0 = time.perf_counter()
    step = module.training(spec, images, labels)
    build_s = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    losses.append(step())
    first_call_s = time.perf_counter() - t0
    times = measure.time_calls(lambda: losses.append(step()), spec["min_iters"], spec["min_seconds"],
                               spec["max_seconds"])
    bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        raise RuntimeError(f"{runtime} {spec['model']}: training step {bad[0]} returned loss {losses[bad[0]]}; "
                           f"a skipped update would time faster than training")
    return [{"section": "training", "runtime": runtime, "model": spec["model"], "batch": spec["batch"],
             "classes": spec["classes"], "build_s": build_s, "first_call_s": first_call_s,
             **measure.summarize(times, spec["batch"]), "losses": losses, "peak_rss_mb": measure.peak_rss_mb()}]


TASKS = {"peak": peak, "prepare": prepare, "infer": infer, "duel": duel, "train": train}


def run_task(spec) -> list:
    if spec["task"] not in TASKS:
        raise ValueError(f"unknown bench task {spec['task']!r}; known: {', '.join(TASKS)}")
    result = TASKS[spec["task"]](spec)
    return result if isinstance(result, list) else [result]


def main(argv):
    spec_json, out_path = argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = run_task(json.loads(spec_json))
    with open(out_path, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1:])
