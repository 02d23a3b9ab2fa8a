"""`twinface bench --detect`: MTCNN face detection time per 640x480 photo, for the torch twin, the TF twin and
onnxruntime, at 1 thread and at the machine's cores. Each row (runtime x threads) is a process of its own
(detect_rows.py), started once; the rows then take turns, one pass over the photos each per round, the order
reversed every other round, so that load from other processes hits every row alike. detect.{json,md,png} come
out of detect_report.py.
"""
import dataclasses
import datetime
import json
import os
import select
import subprocess
import sys
import tempfile
import time

import numpy as np

from twinface import fixtures
from twinface.data.images import read_image
from twinface.detect.faces import FRAMEWORKS as RUNTIMES

from . import detect_report
from .detect_rows import HEIGHT, NETS, WIDTH
from .measure import summarize
from .run import CHILD_ENV, machine

PHOTOS = tuple(name.split("/", 1)[1] for *_, members in fixtures.PACKAGES.values()
               for name, _ in members.values() if name.startswith("photos/"))
STAGES = ("pnet_ms", "rnet_ms", "onet_ms", "cascade_ms")


def _cores():
    return len(os.sched_getaffinity(0))


@dataclasses.dataclass
class DetectOptions:
    photos: tuple = PHOTOS                        # fixture photo names (twinface.fixtures), or paths to photos
    runtimes: tuple = RUNTIMES
    threads: tuple = tuple(sorted({1, _cores()}))
    repeats: int = 10                             # timed passes over the photos per row, interleaved
    timeout_s: float = 300.0                      # per reply of a row's process (its start: loading + warm-up)
    out: str = "bench/results"


def photo_path(name: str) -> str:
    return name if os.path.isfile(name) else fixtures.photo(name)


def check(opts: DetectOptions) -> None:
    unknown = [r for r in opts.runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"detect bench: unknown runtime {unknown[0]!r}; known: {', '.join(RUNTIMES)}")
    if opts.repeats < 1 or not opts.photos or not opts.runtimes or min(opts.threads, default=0) < 1:
        raise ValueError(f"detect bench: expected repeats >= 1, threads >= 1 and at least one photo and runtime, got "
                         f"repeats {opts.repeats}, threads {opts.threads}, photos {opts.photos}, "
                         f"runtimes {opts.runtimes}")


class Row:
    """One row's process: started with its spec, then asked for one timed pass at a time."""

    def __init__(self, spec: dict, timeout_s: float):
        self.spec, self.timeout_s = spec, timeout_s
        self.result = {"runtime": spec["runtime"], "threads": spec["threads"]}
        self.stderr = tempfile.TemporaryFile("w+")
        # OMP_NUM_THREADS too: a thread pool the API calls miss (oneDNN's under TF) still gets the row's threads
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", **CHILD_ENV, **os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        self.proc = subprocess.Popen([sys.executable, "-m", "twinface_bench.detect_rows", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env)
        self.passes = []

    @property
    def ok(self) -> bool:
        return "error" not in self.result

    def reply(self) -> dict:
        """The process's next JSON line; a timeout or an exit becomes the row's error (and None)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if not ready:
            self.proc.kill()
        code = self.proc.wait()
        self.stderr.seek(0)
        tail = [x.strip() for x in self.stderr.read().splitlines() if x.strip()][-3:]
        self.result["error"] = (f"timed out after {self.timeout_s:.0f} s" if not ready else
                                f"exit code {code}: {' | '.join(tail) or 'no output'}")
        return None

    def start(self):
        ready = self.reply()
        if ready:
            self.result.update(ready)

    def run_pass(self):
        try:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass                                  # it has exited: reply() reports why
        timed = self.reply()
        if timed:
            self.passes.append(timed["times"])

    def finish(self) -> dict:
        if self.ok:
            self.proc.stdin.close()
            last = self.reply()
            if last:
                self.result.update(last)
                self.proc.wait()
        self.stderr.close()
        if self.ok:
            self.result.update(summary(self.passes, self.spec["names"]))
        return self.result


def summary(passes: list, names: list) -> dict:
    """Median / p90 ms over every detection (photos x passes), photos/s, the mean ms of each stage per photo
    (means add up to the mean total; medians would not), each net's calls per photo, each photo's median ms and
    every detection's ms (per pass, per photo)."""
    flat = [t for times in passes for t in times]
    ms = np.array([t["ms"] for t in flat])
    stats = summarize(list(ms / 1e3), 1)
    return {"median_ms": stats["p50_ms"], "p90_ms": stats["p90_ms"], "mean_ms": float(ms.mean()),
            "photos_per_s": stats["images_per_s"], "detections": len(flat), "passes": len(passes),
            "stages_ms": {s: float(np.mean([t[s] for t in flat])) for s in STAGES},
            "calls_per_photo": {net: float(np.mean([t[f"{net}_calls"] for t in flat])) for net in NETS},
            "passes_ms": [[t["ms"] for t in times] for times in passes],
            "photo_median_ms": {name: float(np.median([times[i]["ms"] for times in passes]))
                                for i, name in enumerate(names)}}


def faces_agree(rows: list) -> bool:
    """Every measured row found the same faces per photo (all detections, and those kept at the aligner's score)."""
    faces = [r["faces"] for r in rows if "faces" in r]
    return all(f == faces[0] for f in faces)


def run_detect(opts: DetectOptions, log=print) -> dict:
    """Every row started in turn, `repeats` interleaved rounds, then detect.{json,md,png} under opts.out."""
    check(opts)
    started, t_start, load_start = datetime.datetime.now().astimezone(), time.perf_counter(), os.getloadavg()
    paths = [photo_path(name) for name in opts.photos]
    photos = [{"name": os.path.basename(p), "size": list(read_image(p).shape[1::-1])} for p in paths]
    names = [p["name"] for p in photos]
    if len(set(names)) < len(names):                    # rows report per photo by file name
        raise ValueError(f"detect bench: photos need distinct file names, got {', '.join(names)}")
    rows = []

    def clock():
        return f"[detect, {(time.perf_counter() - t_start) / 60:.1f} min]"

    for runtime in opts.runtimes:
        for threads in opts.threads:
            row = Row({"runtime": runtime, "threads": threads, "photos": paths, "names": names}, opts.timeout_s)
            row.start()
            log(f"{clock()} {detect_report.start_line(row.result, names)}")
            rows.append(row)
    for i in range(opts.repeats):
        for row in rows if i % 2 == 0 else rows[::-1]:
            if row.ok:
                row.run_pass()
        latest = [(r.result, r.passes[-1] if r.ok else None) for r in rows]
        log(f"{clock()} {detect_report.round_line(i + 1, opts.repeats, latest)}")
    results = [row.finish() for row in rows]
    for r in results:
        log(f"{clock()} {detect_report.progress_line(r)}")
    result = {"started": started.isoformat(timespec="seconds"), "seconds": time.perf_counter() - t_start,
              "machine": machine(load_start), "options": dataclasses.asdict(opts), "size": [WIDTH, HEIGHT],
              "photos": photos, "rows": results, "faces_agree": faces_agree(results)}
    os.makedirs(opts.out, exist_ok=True)
    detect_report.write_all(result, opts.out)
    return result
