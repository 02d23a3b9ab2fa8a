"""`--runtime`: run a model in another framework than the one that wrote it, or in the fastest one here.

embed / eval / verify run a weights file in its own framework by default. `--runtime torch|tf|onnx` converts it
once with `twinface convert` (verified against the original, docs/convert.md) into the cache and runs that copy.
`--runtime auto` times each runtime at the command's batch shape, each in a fresh process with only its own
framework loaded (as `twinface bench` measures), keeps the decision and says which runtime it picked.

Cache: $TWINFACE_CACHE, else $XDG_CACHE_HOME/twinface, else ~/.cache/twinface:
    runtimes/<sha256 of the file, 20 hex>-<arch>-<input size><suffix>   the converted copies
    runtime-choice.json   decisions by machine (CPU model, instruction sets, cores, thread and kernel settings,
                          framework versions), model (arch, input and embedding size, else the file's digest) and
                          batch: a new machine, model, batch or version is measured again
"""
import datetime
import json
import os
import subprocess
import sys
import time
from importlib import metadata

from . import cpu
from .atomic import file_sha256, write_bytes
from .embedders import package_path

RUNTIMES = ("torch", "tf", "onnx")
CHOICES = (*RUNTIMES, "auto")
SUFFIX = {"torch": ".pth", "tf": ".weights.h5", "onnx": ".onnx"}
SETTINGS = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS",
            "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
PACKAGES = ("torch", "tensorflow-cpu", "tensorflow", "onnxruntime")
MIN_RUNS, MIN_SECONDS, MAX_RUNS = 5, 2.0, 50
CHILD_TIMEOUT = 1200


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("TWINFACE_CACHE") or os.path.join(base, "twinface")


def converted(weights: str, framework: str, runtime: str, arch: str = None, input_size: int = None,
              log=print) -> str:
    """`weights` (a `framework` file) as a `runtime` file: itself, or a verified copy in the cache, made once.
    input_size: what the caller runs the model at; a copy read at another size (a ViT's grid allows several) is
    refused rather than used."""
    if runtime == framework:
        return weights
    if framework == "tflite":
        raise ValueError(f"{weights}: a .tflite file runs only in TensorFlow Lite's interpreter; --runtime {runtime} "
                         f"needs the model's torch, Keras or ONNX weights")
    if runtime in ("torch", "tf") and not arch:
        raise ValueError(f"{weights}: --runtime {runtime} needs --arch (the twins' weight files do not record their "
                         f"architecture)")
    name = file_sha256(weights)[:20] + (f"-{arch}" if arch else "") + (f"-{input_size}" if input_size else "")
    path = os.path.join(cache_dir(), "runtimes", name + SUFFIX[runtime])
    if not os.path.exists(path):
        from twinface_convert.convert import convert
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            report = convert(weights, path, arch=arch, log=lambda *_: None)
        except FileExistsError:                         # another process made the same copy meanwhile
            return path
        if input_size and report.backbone.input_size != input_size:
            os.remove(path)
            raise ValueError(f"{weights}: its weights read as input size {report.backbone.input_size}, not "
                             f"--input-size {input_size}; --runtime {runtime} cannot convert it at that size")
        log(f"runtime {runtime}: converted {weights} to {path} once (verified, embeddings within "
            f"{report.max_abs_diff:.2g} of the original)")
    return path


def machine_key() -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu.model_name(), "isa": cpu.isa(), "cores": len(os.sched_getaffinity(0)),
            "settings": {k: os.environ.get(k) for k in SETTINGS}, "versions": versions}


def choose(weights: str, framework: str, arch: str, model_kwargs: dict, batch: int, log=print,
           time_runtime=None) -> str:
    """The fastest runtime for this model at `batch` on this machine: measured the first time, then remembered.

    time_runtime(weights, framework, runtime, arch, model_kwargs, batch) -> (ms per batch, note): a test's stand-in
    for the measurement in a child process.
    """
    if framework == "tflite":
        log("runtime auto: tflite (a .tflite file runs only in TensorFlow Lite's interpreter)")
        return "tflite"
    if not arch:
        log(f"runtime auto: {framework} (without --arch the twins cannot load it: pass --arch to let them compete)")
        return framework
    # What decides the speed besides the architecture: the source's own runtime (an ONNX file may be folded or
    # fp16) and a compiled package beside torch weights, which the torch twin then runs
    package = package_path(weights)
    model = {"arch": arch, **model_kwargs, "source": framework,
             "package": file_sha256(package) if os.path.isfile(package) else None}
    key = json.dumps({"machine": machine_key(), "model": model, "batch": batch}, sort_keys=True)
    path = os.path.join(cache_dir(), "runtime-choice.json")
    known = _decisions(path, log).get(key)
    if known:
        log(f"runtime auto: {known['runtime']} (measured {known['when']}: {_times(known['ms'])}; remembered in "
            f"{path}, delete it to measure again)")
        return known["runtime"]
    time_runtime = time_runtime or _time_in_child
    ms = {}
    for runtime in RUNTIMES:
        log(f"runtime auto: timing {runtime} at batch {batch} ...")
        try:
            ms[runtime], note = time_runtime(weights, framework, runtime, arch, model_kwargs, batch)
        except RuntimeError as e:
            log(f"runtime auto: {runtime} left out: {e}")
            continue
        if note:
            log(note)
    if not ms:
        raise RuntimeError(f"{weights}: no runtime could run it (torch, tf and onnx all failed; see above)")
    best = min(ms, key=ms.get)
    decisions = _decisions(path, log)              # read again: another process may have added its own
    decisions[key] = {"runtime": best, "ms": ms, "when": datetime.datetime.now().isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_bytes(path, json.dumps(decisions, indent=1).encode())
    log(f"runtime auto: picked {best} ({_times(ms)}); remembered in {path}")
    return best


def _times(ms: dict) -> str:
    return ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(ms.items(), key=lambda kv: kv[1])) + " per batch"


def _decisions(path: str, log) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            decisions = json.load(f)
        if isinstance(decisions, dict):
            return decisions
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        pass
    log(f"runtime auto: {path} is not a decision table; measuring again and writing it anew")
    return {}


def _time_in_child(weights, framework, runtime, arch, model_kwargs, batch):
    """Convert (when needed) in one child and time in another: the conversion's check runs both frameworks, and
    the timing must see only its own (torch and TF in one process slow each other)."""
    args = [weights, framework, runtime, arch, json.dumps(model_kwargs), str(batch)]
    note = _run_child("convert", *args)["note"]
    return _run_child("time", *args)["ms"], note


def _run_child(mode, *args) -> dict:
    argv = [sys.executable, "-m", "twinface.runtime", mode, *args]
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ}
    try:
        run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result in {CHILD_TIMEOUT} s") from None
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {run.returncode}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def time_embedder(embed, batch: int) -> float:
    """Median milliseconds of one batch of 112x112 images, after two warm-up batches."""
    import numpy as np
    images = np.random.default_rng(0).integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8)
    for _ in range(2):
        embed(images)
    times, start = [], time.perf_counter()
    while len(times) < MIN_RUNS or (time.perf_counter() - start < MIN_SECONDS and len(times) < MAX_RUNS):
        t = time.perf_counter()
        embed(images)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _child(mode, weights, framework, runtime, arch, model_kwargs, batch):
    model_kwargs, notes = json.loads(model_kwargs), []
    source = converted(weights, framework, runtime, arch, model_kwargs.get("input_size"), log=notes.append)
    if mode == "convert":
        print(json.dumps({"note": " ".join(notes)}))
        return
    from .embedders import load_embedder
    print(json.dumps({"ms": time_embedder(load_embedder(source, runtime, arch, **model_kwargs), int(batch))}))


if __name__ == "__main__":
    _child(*sys.argv[1:])
