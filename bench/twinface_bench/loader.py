"""`twinface bench --loader`: do the twins' data loaders keep up at real size? On one synthetic set of 112x112
JPEGs (an image folder, .rec/.idx and TFRecord): the machine's decode limit (single-thread cv2.imdecode x cores),
each twin's loader at every worker count over every format, and an IResNet-18 training step fed by the loader
against the same batches in memory. Every measurement runs in a child process of its own (loader_rows.py);
loader.{json,md,png} come out of loader_report.py.
"""
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

from twinface import config

from . import loader_report
from .run import CHILD_ENV, machine

FORMATS = ("folder", "rec", "tfrecord")
FRAMEWORKS = ("torch", "tf")
DEFAULT_WORKERS = config.DataConfig().num_workers          # what training runs with unless data.num_workers says
TARGETS = {"loader_vs_limit": 0.8, "fed_vs_memory": 0.95}


def _cores():
    return len(os.sched_getaffinity(0))


@dataclasses.dataclass
class LoaderOptions:
    images: int = 4096
    images_per_identity: int = 16
    formats: tuple = FORMATS
    frameworks: tuple = FRAMEWORKS
    workers: tuple = tuple(range(_cores() + 1))           # torch DataLoader processes; tf.data threads (0 runs as 1)
    batch: int = 128
    passes: int = 3                                        # epochs per loader row (the median counts)
    shards: int = 4                                        # of the TFRecord copy
    tfrecord_stream: bool = True                           # TFRecord rows also under data.sampler stream
    train_model: str = "r18"
    train_batch: int = 64
    train_steps: int = 4                                   # timed steps from memory, and as many fed by the loader
    train_format: str = "rec"
    train_frameworks: tuple = FRAMEWORKS
    seed: int = 0
    timeout_s: float = 600.0                               # per child
    out: str = "bench/results"


def effective_workers(framework: str, workers: int) -> int:
    """tf.data runs at least one thread, so its 0 is its 1."""
    return max(1, workers) if framework == "tf" else workers


def worker_counts(opts: LoaderOptions, framework: str) -> list:
    """Every asked count plus the default."""
    return sorted({effective_workers(framework, w) for w in set(opts.workers) | {DEFAULT_WORKERS}})


def samplers(opts: LoaderOptions, fmt: str) -> tuple:
    """Every format under the default sampler (shuffled epochs, random access); TFRecord also streamed."""
    if fmt == "tfrecord" and opts.tfrecord_stream:
        return "epoch", "stream"
    return ("epoch",)


def plan(opts: LoaderOptions, paths: dict) -> list:
    """The loader rows (format by format, torch then tf, fewest workers first) and the training rows."""
    specs = [{"task": "loader", "framework": f, "format": fmt, "sampler": sampler, "path": paths[fmt], "workers": w,
              "batch": opts.batch, "passes": opts.passes}
             for fmt in opts.formats for sampler in samplers(opts, fmt) for f in opts.frameworks
             for w in worker_counts(opts, f)]
    specs += [{"task": "train", "framework": f, "format": opts.train_format, "sampler": "epoch",
               "path": paths[opts.train_format], "workers": DEFAULT_WORKERS, "model": opts.train_model,
               "batch": opts.train_batch, "steps": opts.train_steps} for f in opts.train_frameworks]
    return specs


def run_child(spec: dict, timeout_s: float) -> dict:
    """One task in a fresh interpreter; a failure becomes the row with an error naming the task."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "row.json")
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", **CHILD_ENV, **os.environ}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "twinface_bench.loader_rows", json.dumps(spec), out],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return _error_row(spec, f"timed out after {timeout_s:.0f} s")
        if proc.returncode != 0 or not os.path.exists(out):
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
            return _error_row(spec, f"exit code {proc.returncode}: {' | '.join(tail) or 'no output'}")
        with open(out) as f:
            return {**json.load(f), "process_s": time.perf_counter() - t0}


def _error_row(spec, message):
    keys = {k: spec[k] for k in ("framework", "format", "sampler", "workers", "model") if k in spec}
    return {"section": {"train": "training"}.get(spec["task"], spec["task"]), **keys, "error": message}


def run_loader(opts: LoaderOptions, log=print) -> dict:
    """The data set, the limit, every row; then the targets and loader.{json,md,png} under opts.out."""
    unknown = [f for f in opts.formats + (opts.train_format,) if f not in FORMATS]
    if unknown:
        raise ValueError(f"loader bench: unknown format {unknown[0]!r}; known: {', '.join(FORMATS)}")
    started, t_start, load_start = datetime.datetime.now().astimezone(), time.perf_counter(), os.getloadavg()
    formats = tuple(dict.fromkeys(opts.formats + (opts.train_format,) if opts.train_frameworks else opts.formats))

    def do(spec):
        row = run_child(spec, opts.timeout_s)
        log(f"[loader, {(time.perf_counter() - t_start) / 60:.1f} min] {loader_report.progress_line(row)}")
        return row

    with tempfile.TemporaryDirectory(prefix="twinface-loader-") as work_dir:
        data = do({"task": "data", "dir": work_dir, "identities": max(1, opts.images // opts.images_per_identity),
                   "images_per_identity": opts.images_per_identity, "formats": formats, "shards": opts.shards,
                   "seed": opts.seed})
        if "error" in data:
            raise RuntimeError(f"loader bench: could not make its data set: {data['error']}")
        limit_spec = {"task": "limit", "path": data["paths"]["rec"], "passes": opts.passes}
        limits = [do(limit_spec)]
        rows = [do(spec) for spec in plan(opts, data["paths"])]
        limits.append(do(limit_spec))
    result = {"started": started.isoformat(timespec="seconds"), "seconds": time.perf_counter() - t_start,
              "machine": machine(load_start), "options": dataclasses.asdict(opts), "data": data,
              "limit": best_limit(limits), "limits": limits,
              "rows": [r for r in rows if r["section"] == "loader"],
              "training": [r for r in rows if r["section"] == "training"]}
    derive(result)
    os.makedirs(opts.out, exist_ok=True)
    loader_report.write_all(result, opts.out)
    return result


def best_limit(limits: list) -> dict:
    """The higher of the limits measured at the start and at the end: load from other processes only lowers
    it, and a limit measured low would flatter every ratio."""
    measured = [r for r in limits if "error" not in r]
    return max(measured, key=lambda r: r["limit_images_per_s"]) if measured else limits[0]


def derive(result: dict) -> None:
    """Each loader row's ratio to the limit, each training row's loader / memory ratio, and the targets: every
    twin's default loader (DEFAULT_WORKERS) on every format, and every training row."""
    limit = result["limit"].get("limit_images_per_s")
    targets = []
    result["goals"] = TARGETS
    for r in result["rows"]:
        if "error" in r:
            continue
        r["default"] = r["workers"] == effective_workers(r["framework"], DEFAULT_WORKERS)
        if not limit:
            continue
        r["vs_limit"] = r["images_per_s"] / limit
        if r["default"]:
            goal = TARGETS["loader_vs_limit"]
            stream = ", stream sampler" if r["sampler"] == "stream" else ""
            targets.append({"what": f"{r['framework']} default loader ({r['workers']} workers), {r['format']}{stream}, "
                                    "x decode limit", "ratio": r["vs_limit"], "target": f">= {goal}",
                            "met": r["vs_limit"] >= goal})
    for r in result["training"]:
        if "error" in r:
            continue
        r["ratio"] = r["loader_images_per_s"] / r["memory_images_per_s"]
        goal = TARGETS["fed_vs_memory"]
        targets.append({"what": f"{r['framework']} {r['model']} training, loader ({r['format']}, {r['workers']} "
                                "workers) / in memory", "ratio": r["ratio"], "target": f">= {goal}",
                        "met": r["ratio"] >= goal})
    result["targets"] = targets
