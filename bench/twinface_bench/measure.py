"""Timing, latency percentiles, peak memory and FLOP counts: the framework-free half of the bench."""
import resource
import time

import numpy as np

from twinface.registry import backbone_spec


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(call, min_iters: int, min_seconds: float, max_seconds: float) -> list:
    """Seconds per `call()`, repeated until min_iters calls and min_seconds are both reached; stops early at
    max_seconds (after at least one call) so one slow row cannot eat the run's budget."""
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= min_iters and elapsed >= min_seconds) or elapsed >= max_seconds:
            return times


def summarize(times: list, batch: int) -> dict:
    """images/s from the median call (robust to other processes on a shared machine) and from the fastest
    call; latency percentiles per call."""
    t = np.asarray(times, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99]) * 1e3
    return {"images_per_s": batch / float(np.median(t)), "best_images_per_s": batch / float(t.min()),
            "iterations": int(t.size), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def gflop_per_image(model: str, input_size: int, training: bool = False) -> float:
    """2 FLOPs per multiply-accumulate of one forward pass (registry, 112x112, scaled by area for other input
    sizes); a training step counts 3 forward passes (forward, and backward to inputs and to weights)."""
    forward = 2.0 * backbone_spec(model).gmacs * (input_size / 112) ** 2
    return 3.0 * forward if training else forward


def matmul_gflops(matmul, n: int, repeats: int = 3) -> float:
    """Best GFLOP/s of `matmul()` on n x n fp32 operands (2 n^3 FLOPs), after one warm-up call."""
    matmul()
    return 2.0 * n ** 3 / min(time_calls(matmul, repeats, 0.0, float("inf"))) / 1e9


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """The bench's input: the same uint8 RGB NHWC batch for every row of a run."""
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
