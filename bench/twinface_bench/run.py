"""The bench plan: which tasks run, in which order, each in its own child process; then the derived numbers
(GFLOP/s, fraction of the reference peak, ratios to the fastest runtime, targets) and the report files."""
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from twinface.cpu import isa as cpu_isa
from twinface.cpu import model_name as cpu_model
from twinface.cpu import tensorflow_kernels, torch_kernels

from . import measure, report
from .shared import DEFAULT_PATHS
from .tasks import run_task

CPU_RUNTIMES = ("torch-eager", "torch-channels-last", "torch-jit-freeze", "torch-jit-onednn", "torch-compile",
                "torch-aot", "torch-embed", "torch-embed-omp-default", "torch-embed-bf16", "tf-eager", "tf-function", "tf-xla",
                "tf-embed", "tf-embed-eigen", "tf-embed-avx2", "tf-embed-bf16", "ort-torch", "ort-tf",
                "tflite-fp32", "tflite-fp16", "tflite-int8", "tflite-int8-float-prelu")
TFLITE_RUNTIMES = ("tflite-fp32", "tflite-fp16", "tflite-int8", "tflite-int8-float-prelu")
# bf16 trunk, fp16 weights, int8: other numbers than the fp32 rows, so never a contender in the duel that judges
# the default paths
REDUCED_PRECISION_RUNTIMES = ("torch-embed-bf16", "tf-embed-bf16", "tflite-fp16", "tflite-int8",
                              "tflite-int8-float-prelu")
# --runtimes only: keeps `make bench` under 15 min
OPT_IN_RUNTIMES = ("torch-aot", "torch-embed-omp-default", "tf-embed-eigen", "tf-embed-avx2", "tf-train-eigen", "tf-train-avx2",
                   "torch-train-bf16", "tf-train-bf16", *TFLITE_RUNTIMES)
CUDA_RUNTIMES = ("torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-fp16", "torch-cuda-fp16-channels-last")
TRAIN_RUNTIMES = ("torch-train", "tf-train", "tf-train-eigen", "tf-train-avx2", "torch-train-bf16", "tf-train-bf16")
# --runtimes only, IResNet only: the backbone's training step without / with gradient checkpointing, for peak RSS
MEMORY_RUNTIMES = ("torch-train-backbone", "torch-train-backbone-checkpointing")
TARGETS = {"default_path_vs_fastest": 0.9, "train_ratio_max": 1.25}
# By default libgomp (torch's OpenMP) spins its threads between parallel regions: on cores that other thread pools
# also want (TF's, onnxruntime's in the duel), a spinning thread starves the one it waits for (docs/bench.md). Children
# run PASSIVE unless the caller's environment says otherwise; an opt-in row runs libgomp's default, for comparison.
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# TensorFlow's kernels as other CPUs run them (docs/design.md, "CPU kernels"): its Eigen kernels (TF's default
# without AVX-512 VNNI/BF16 or AMX) and oneDNN's AVX2 code (what twinface runs on an AVX2-only CPU).
TF_KERNEL_ENV = {"eigen": {"TF_ENABLE_ONEDNN_OPTS": "0"}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
RUNTIME_ENV = {"torch-embed-omp-default": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},     # None: unset
               **{f"tf-{row}-{kind}": env for kind, env in TF_KERNEL_ENV.items() for row in ("embed", "train")}}


@dataclasses.dataclass
class Options:
    models: tuple = ("r50", "r18", "mbf")
    batches: tuple = (1, 32)
    input_size: int = 112
    num_features: int = 512
    runtimes: tuple = tuple(r for r in CPU_RUNTIMES + TRAIN_RUNTIMES if r not in OPT_IN_RUNTIMES)
    train_batch: int = 64
    classes: int = 10000
    min_iters: int = 3                    # per inference batch (the smallest takes >= 10: latency percentiles)
    min_seconds: float = 1.0
    max_seconds: float = 20.0             # a slow row stops early (after one timed call)
    train_steps: int = 2                  # timed steps after the first (tracing, allocation)
    train_max_seconds: float = 60.0
    duel_rounds: int = 4                  # interleaved calls per runtime at the largest batch (the targets)
    duel_contenders: int = 2              # the fastest other runtimes of the rows join the default paths
    peak_n: int = 4096
    peak_libs: tuple = ("numpy", "torch", "tf")
    out: str = "bench/results"
    isolate: bool = True                  # one child process per task (per-row peak RSS)
    timeout_s: float = 900.0


def run_child(spec: dict, timeout_s: float) -> list:
    """run_task in a fresh interpreter; a failure becomes an error row naming the task, not a crashed bench.
    The first row records the process's wall time (start-up and imports included): where the bench's time goes."""
    t0 = time.perf_counter()
    rows = _run_child(spec, timeout_s)
    rows[0]["process_s"] = time.perf_counter() - t0
    return rows


def _run_child(spec, timeout_s):
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "rows.json")
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", **CHILD_ENV, **os.environ, **RUNTIME_ENV.get(spec.get("runtime"), {})}
        env = {k: v for k, v in env.items() if v is not None}
        try:
            proc = subprocess.run([sys.executable, "-m", "twinface_bench.tasks", json.dumps(spec), out],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return [_error_row(spec, f"timed out after {timeout_s:.0f} s")]
        if proc.returncode != 0 or not os.path.exists(out):
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
            return [_error_row(spec, f"exit code {proc.returncode}: {' | '.join(tail) or 'no output'}")]
        with open(out) as f:
            return json.load(f)


def run_in_process(spec: dict, timeout_s: float) -> list:
    """run_task here (the smoke test): no per-row RSS, no per-row environment, no timeout."""
    try:
        return run_task(spec)
    except Exception as e:                 # same contract as a child: the row records the error, the bench goes on
        return [_error_row(spec, f"{type(e).__name__}: {e}")]


def _error_row(spec, message):
    section = {"peak": "peak", "prepare": "prepare", "infer": "inference", "duel": "duel",
               "train": "training"}[spec["task"]]
    name = spec.get("runtime") or f"{spec['task']}-{spec.get('lib') or spec.get('framework')}"
    return {"section": section, "runtime": name, "model": spec.get("model"), "error": message}


def plan(opts: Options, work_dir: str, cuda: bool = False, model: str = None) -> list:
    """Task specs for one model (inference runtimes, then training), or the peak tasks when model is None."""
    if model is None:
        return [{"task": "peak", "lib": lib, "n": opts.peak_n} for lib in opts.peak_libs]
    infer = [r for r in opts.runtimes if r in CPU_RUNTIMES] + (list(CUDA_RUNTIMES) if cuda else [])
    # torch.compile compiles anew for every batch size (~1 min for IResNet-50): the largest batch only.
    specs = [{"task": "infer", "runtime": r, "min_iters": opts.min_iters, "min_seconds": opts.min_seconds,
              "max_seconds": opts.max_seconds, "latency_batch": min(opts.batches),
              "batches": [max(opts.batches)] if r == "torch-compile" else list(opts.batches),
              **_model_spec(opts, work_dir, model)} for r in infer]
    specs += [{"task": "train", "runtime": r, "batch": opts.train_batch, "classes": opts.classes,
               "min_iters": opts.train_steps, "min_seconds": 0.0, "max_seconds": opts.train_max_seconds,
               **_model_spec(opts, work_dir, model)} for r in opts.runtimes if r in TRAIN_RUNTIMES + MEMORY_RUNTIMES]
    return specs


def _model_spec(opts, work_dir, model):
    return {"model": model, "input_size": opts.input_size, "num_features": opts.num_features, "work_dir": work_dir}


def prepare_specs(opts: Options, work_dir: str, model: str) -> list:
    tflite = [r[len("tflite-"):] for r in opts.runtimes if r in TFLITE_RUNTIMES]
    needs_tf = any(r.startswith("tf-") or r == "ort-tf" for r in opts.runtimes)
    specs = [{"task": "prepare", "framework": framework, **_model_spec(opts, work_dir, model)}
             for framework in ("torch", "tf") if framework == "torch" or needs_tf]
    if tflite:                       # the Keras twin's exports, from the weights the torch preparation wrote
        specs.append({"task": "prepare", "framework": "tflite", "quantizations": tflite,
                      **_model_spec(opts, work_dir, model)})
    return specs


def duel_spec(opts: Options, work_dir: str, model: str, rows: list):
    """The default paths and the fastest other CPU runtimes of this model's rows, at the largest batch."""
    large = max(opts.batches)
    measured = [r for r in rows if r["section"] == "inference" and r["model"] == model and r.get("batch") == large
                and "error" not in r and r["runtime"] in CPU_RUNTIMES and r["runtime"] not in RUNTIME_ENV
                and r["runtime"] not in REDUCED_PRECISION_RUNTIMES]
    defaults = [r["runtime"] for r in measured if r["runtime"] in DEFAULT_PATHS]
    others = sorted((r for r in measured if r["runtime"] not in DEFAULT_PATHS), key=lambda r: -r["images_per_s"])
    if not defaults:
        return None
    return {"task": "duel", "runtimes": defaults + [r["runtime"] for r in others[:opts.duel_contenders]],
            "batch": large, "rounds": opts.duel_rounds, **_model_spec(opts, work_dir, model)}


def run_bench(opts: Options, log=print) -> dict:
    """Run everything, write bench.{json,md,png} under opts.out, return the result."""
    started, t_start = datetime.datetime.now().astimezone(), time.perf_counter()
    execute = run_child if opts.isolate else run_in_process
    load_start = os.getloadavg()
    rows, tasks = [], {"done": 0}

    def do(spec):
        new = execute(spec, opts.timeout_s)
        tasks["done"] += 1
        elapsed = time.perf_counter() - t_start
        left = elapsed / tasks["done"] * max(tasks["total"] - tasks["done"], 0)      # tasks differ: a rough ETA
        for row in new:
            rows.append(row)
            log(f"{report.progress_line(row)}  [task {tasks['done']}/{tasks['total']}, {elapsed / 60:.1f} min, "
                f"~{left / 60:.1f} min left]")
        return rows[-1]

    with tempfile.TemporaryDirectory(prefix="twinface-bench-") as work_dir:
        # peaks at the start and one at the end; per model: preparations, rows, the duel (CUDA rows not counted)
        tasks["total"] = len(plan(opts, work_dir)) + 1 + sum(
            len(prepare_specs(opts, work_dir, m)) + len(plan(opts, work_dir, False, m)) + 1 for m in opts.models)
        for spec in plan(opts, work_dir):
            do(spec)
        for model in opts.models:
            facts = [do(spec) for spec in prepare_specs(opts, work_dir, model)]
            specs = plan(opts, work_dir, bool(facts[0].get("cuda")), model)
            for spec in [s for s in specs if s["task"] == "infer"]:
                do(spec)
            duel = duel_spec(opts, work_dir, model, rows)
            for spec in ([duel] if duel else []) + [s for s in specs if s["task"] == "train"]:
                do(spec)
        start = [r for r in rows if r["section"] == "peak" and "error" not in r]
        if start:                                    # again at the end: how much the machine drifted meanwhile
            do({"task": "peak", "lib": max(start, key=lambda r: r["gflops"])["runtime"][5:], "n": opts.peak_n})
    result = {"started": started.isoformat(timespec="seconds"), "seconds": time.perf_counter() - t_start,
              "machine": machine(load_start), "options": dataclasses.asdict(opts), "rows": rows}
    derive(result)
    os.makedirs(opts.out, exist_ok=True)
    report.write_all(result, opts.out)
    return result


def derive(result: dict) -> None:
    """Add GFLOP/s, fraction of peak and ratios to the rows, and the targets' verdicts to the result."""
    rows, opts = result["rows"], result["options"]
    peaks = [r["gflops"] for r in rows if r["section"] == "peak" and "error" not in r]
    result["peak_gflops"] = max(peaks) if peaks else None
    for r in rows:
        if r["section"] in ("inference", "training") and "error" not in r:
            r["gflop_per_image"] = measure.gflop_per_image(r["model"], opts["input_size"], r["section"] == "training")
            r["gflops"] = r["images_per_s"] * r["gflop_per_image"]
            r["peak_fraction"] = r["gflops"] / result["peak_gflops"] if result["peak_gflops"] else None
    cpu = [r for r in rows if r["section"] == "inference" and "error" not in r and r["runtime"] in CPU_RUNTIMES]
    fastest = {}
    for r in cpu:
        key = (r["model"], r["batch"])
        if r["images_per_s"] > fastest.get(key, (0, None))[0]:
            fastest[key] = (r["images_per_s"], r["runtime"])
    for r in cpu:
        r["vs_fastest"] = r["images_per_s"] / fastest[(r["model"], r["batch"])][0]
    targets = []
    duels = {}
    for r in rows:
        if r["section"] == "duel" and "error" not in r:
            duels.setdefault(r["model"], []).append(r)
    for model, duel in duels.items():
        best = max(duel, key=lambda r: r["images_per_s"])
        for r in duel:
            r["vs_fastest"] = r["images_per_s"] / best["images_per_s"]
            if r["runtime"] in DEFAULT_PATHS:
                targets.append({"what": f"{r['runtime']} vs fastest ({best['runtime']}), interleaved", "model": model,
                                "batch": r["batch"], "ratio": r["vs_fastest"],
                                "target": f">= {TARGETS['default_path_vs_fastest']}",
                                "met": r["vs_fastest"] >= TARGETS["default_path_vs_fastest"]})
    train = {(r["model"], r["runtime"]): r for r in rows if r["section"] == "training" and "error" not in r}
    for model in opts["models"]:
        if (model, "torch-train") in train and (model, "tf-train") in train:
            ratio = train[(model, "torch-train")]["images_per_s"] / train[(model, "tf-train")]["images_per_s"]
            spread = max(ratio, 1 / ratio)
            targets.append({"what": "training torch / TF", "model": model, "batch": opts["train_batch"],
                            "ratio": ratio, "target": f"within {TARGETS['train_ratio_max']}x",
                            "met": spread <= TARGETS["train_ratio_max"]})
    result["targets"] = targets


def machine(load_start) -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    versions = {}
    for package in ("torch", "tensorflow-cpu", "tensorflow", "onnxruntime", "numpy", "keras"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    tf_default = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    kernels = {"isa": cpu_isa(), "tf": tensorflow_kernels(), "tf_default": tensorflow_kernels(tf_default),
               "tf_setting": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "torch": torch_kernels()}
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(memory, 1),
            "python": platform.python_version(), "kernels": kernels,
            "platform": platform.platform(), "versions": versions, "load_start": load_start,
            "load_end": os.getloadavg(), "child_env": {k: os.environ.get(k, v) for k, v in CHILD_ENV.items()}}
