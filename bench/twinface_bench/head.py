"""`twinface bench --head`: the Partial FC head at scale. Per setting (classes x sample_rate x world), every rank
runs in a process of its own (world 2: torchrun, gloo on CPU) and reports its step time and the head's memory;
here they become one row per setting, then head.json, head.md and head.png.
"""
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from twinface.launch import torchrun_command, worker_env

from .measure import peak_rss_mb
from .report import _fmt
from .run import CHILD_ENV, machine

# world > 1: torch's workers start under torchrun; the TF module starts its workers itself (twinface.launch)
WORKERS = {"torch": "twinface_bench.head_torch", "tf": "twinface_bench.head_tf"}
MEMORY_KEYS = ("weight_mb", "grad_mb", "momentum_mb", "logits_mb", "total_mb")
MEMORY_MARGIN = 1.1             # a projection was up to 5% short of the measured peak RSS


@dataclasses.dataclass
class HeadOptions:
    classes: tuple = (10_000, 100_000, 1_000_000)
    sample_rates: tuple = (1.0, 0.1)
    worlds: tuple = (1, 2)
    frameworks: tuple = ("torch", "tf")
    embedding: int = 512
    batch: int = 128                      # per rank
    warmup: int = 1
    steps: int = 3                        # timed, after the warm-up
    seed: int = 0
    timeout_s: float = 900.0              # per setting, every rank together
    out: str = "bench/results"


def time_steps(step, barrier, spec: dict) -> tuple:
    """(seconds of each timed step, the last step's output) after the warm-up; every step starts when all ranks
    are there, so a step's time is the slower rank's."""
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        barrier()
        t0 = time.perf_counter()
        out = step()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    return times, out


def write_rank(out_dir: str, spec: dict, rank: int, world: int, centres: int, sampled: int, times: list, loss: float,
               threads: int, weight_mb: float, grad_mb: float, momentum_mb: float):
    """One rank's numbers as OUT_DIR/rank<r>.json. The logits [global batch, sampled centres] are gone after the
    step, so their size comes from the centres the last step sampled (fp32)."""
    memory = {"weight_mb": weight_mb, "grad_mb": grad_mb, "momentum_mb": momentum_mb,
              "logits_mb": spec["batch"] * world * sampled * 4 / 2 ** 20}
    row = {"rank": rank, "world": world, "centres": centres, "sampled": sampled,
           "step_ms": 1e3 * float(np.median(times)), "steps_ms": [1e3 * t for t in times], "loss": loss,
           "threads": threads, **memory, "total_mb": sum(memory.values()), "peak_rss_mb": peak_rss_mb()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)


def settings(opts: HeadOptions) -> list:
    """Smallest head first: a setting that runs out of memory comes last and costs the others nothing."""
    return [{"framework": f, "world": w, "classes": c, "sample_rate": r, "embedding": opts.embedding,
             "batch": opts.batch, "warmup": opts.warmup, "steps": opts.steps, "seed": opts.seed,
             "timeout_s": opts.timeout_s}
            for c in sorted(opts.classes) for f in opts.frameworks for w in opts.worlds for r in opts.sample_rates]


def command(spec: dict, out_dir: str) -> list:
    argv = [json.dumps(spec), out_dir]
    module = WORKERS[spec["framework"]]
    if spec["world"] == 1 or spec["framework"] == "tf":
        return [sys.executable, "-m", module, *argv]
    return torchrun_command(spec["world"], argv, module=module)


def measure(spec: dict) -> dict:
    """One setting: its ranks' processes, in a session of their own so that a timeout stops all of them
    (the launcher's workers included); the row, or an error row naming the setting."""
    with tempfile.TemporaryDirectory(prefix="twinface-head-") as out_dir:
        # the cores shared out over the ranks
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", **CHILD_ENV, **worker_env(spec["world"], {})}
        proc = subprocess.Popen(command(spec, out_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output = proc.communicate(timeout=spec["timeout_s"])[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return _error(spec, f"timed out after {spec['timeout_s']:.0f} s")
        ranks = []
        for rank in range(spec["world"]):
            path = os.path.join(out_dir, f"rank{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    ranks.append(json.load(f))
    if proc.returncode != 0 or len(ranks) != spec["world"]:
        tail = [line.strip() for line in output.splitlines() if line.strip()][-3:]
        return _error(spec, f"exit code {proc.returncode}, {len(ranks)} of {spec['world']} ranks reported: "
                            f"{' | '.join(tail) or 'no output'}")
    return {**_setting(spec), "ranks": ranks,
            **{k: max(r[k] for r in ranks) for k in ("centres", "sampled", "step_ms", *MEMORY_KEYS, "peak_rss_mb")}}


def measured(row) -> bool:
    return "step_ms" in row


def _setting(spec):
    return {k: spec[k] for k in ("framework", "world", "classes", "sample_rate")}


def _error(spec, message):
    return {**_setting(spec), "error": message}


def projected_rss_mb(spec: dict, rows: list):
    """Peak RSS per rank this setting will need, extrapolated linearly in classes from the two largest measured
    settings of the same framework, world and sample_rate (the head's memory is linear in classes); None before
    there are two. A setting that cannot fit is skipped rather than left to the kernel's OOM killer on a machine
    others share."""
    same = sorted((r for r in rows if measured(r) and _setting(r) == {**_setting(spec), "classes": r["classes"]}),
                  key=lambda r: r["classes"])[-2:]
    if len(same) < 2:
        return None
    (c1, m1), (c2, m2) = ((r["classes"], r["peak_rss_mb"]) for r in same)
    return m2 + (m2 - m1) / (c2 - c1) * (spec["classes"] - c2)


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024


def run_head(opts: HeadOptions, log=print) -> dict:
    """Every setting, then head.{json,md,png} under opts.out."""
    started, t_start, load_start = datetime.datetime.now().astimezone(), time.perf_counter(), os.getloadavg()
    rows = []
    specs = settings(opts)
    for i, spec in enumerate(specs, 1):
        need_mb, free_mb = projected_rss_mb(spec, rows), available_mb()
        if need_mb is not None and MEMORY_MARGIN * need_mb * spec["world"] > free_mb:
            rows.append({**_setting(spec), "skipped": f"projected peak RSS {need_mb / 1024:.1f} GB per rank x "
                                                      f"{spec['world']}, {free_mb / 1024:.1f} GB available"})
        else:
            rows.append(measure(spec))
        log(f"[head {i}/{len(specs)}, {(time.perf_counter() - t_start) / 60:.1f} min] {row_line(rows[-1])}")
    result = {"started": started.isoformat(timespec="seconds"), "seconds": time.perf_counter() - t_start,
              "machine": machine(load_start), "options": dataclasses.asdict(opts), "rows": rows}
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "head.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(opts.out, "head.md"), "w") as f:
        f.write(markdown(result))
    chart(result, os.path.join(opts.out, "head.png"))
    return result


def row_line(row) -> str:
    what = f"{row['framework']} world {row['world']}, {row['classes']:,} classes, sample_rate {row['sample_rate']}"
    if not measured(row):
        return f"{what}: " + (f"ERROR {row['error']}" if "error" in row else f"not run, {row['skipped']}")
    return (f"{what}: {row['step_ms']:.1f} ms/step, head {row['total_mb']:.1f} MB per rank, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB")


def markdown(result) -> str:
    m, o = result["machine"], result["options"]
    lines = [
        f"Run {result['started']}, {result['seconds'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB; load average {'/'.join(f'{x:.2f}' for x in m['load_start'])} at the start, "
        f"{'/'.join(f'{x:.2f}' for x in m['load_end'])} at the end.",
        f"Partial FC head alone (ArcFace margin), embeddings {o['embedding']}-d, batch {o['batch']} per rank, fp32, "
        f"SGD momentum 0.9 weight decay 5e-4; step = forward + backward + optimizer step, median of {o['steps']} "
        f"after {o['warmup']} warm-up, the slower rank's. Memory per rank (the largest rank's): centres, their "
        "gradient, the momentum buffer, and the logits [global batch, sampled centres]. World 2 = two processes "
        "sharing the cores (torch: torchrun, gloo; TF: TF_CONFIG workers, MultiWorkerMirroredStrategy).",
        "",
        "| framework | world | classes | sample_rate | centres / rank | sampled / rank | step ms | samples/s "
        "| weight MB | grad MB | momentum MB | logits MB | head MB / rank | peak RSS MB |",
        "|" + "---|" * 14,
    ]
    for r in result["rows"]:
        cells = [r["framework"], r["world"], f"{r['classes']:,}", r["sample_rate"]]
        if not measured(r):
            why = f"ERROR: {r['error']}" if "error" in r else f"not run: {r['skipped']}"
            lines.append(f"| {' | '.join(map(str, cells))} | {why} |")
            continue
        cells += [f"{r['centres']:,}", f"{r['sampled']:,}", _fmt(r["step_ms"]),
                  _fmt(1e3 * o["batch"] * r["world"] / r["step_ms"])]           # the global batch per second
        cells += [_fmt(r[k]) for k in MEMORY_KEYS] + [_fmt(r["peak_rss_mb"], 0)]
        lines.append(f"| {' | '.join(map(str, cells))} |")
    return "\n".join(lines) + "\n"


def chart(result, path):
    """Against classes: the head's memory per rank (its state falls with world), its logits (fall with
    sample_rate; with the batch per rank fixed they do not fall with world: the shard halves as the global batch
    doubles) and the step time; one line per framework, world (marker) and sample_rate (line style)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in result["rows"] if measured(r)]
    panels = (("head (weight + grad + momentum + logits), MB per rank", "total_mb"),
              ("logits [global batch, sampled centres], MB per rank", "logits_mb"), ("step, ms (slower rank)", "step_ms"))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4))
    lines = sorted({(r["framework"], r["world"], r["sample_rate"]) for r in ok}, key=lambda k: (k[0], k[1], -k[2]))
    for ax, (title, key) in zip(axes, panels):
        for framework, world, rate in lines:
            mine = sorted((r for r in ok if (r["framework"], r["world"], r["sample_rate"]) == (framework, world, rate)),
                          key=lambda r: r["classes"])
            ax.plot([r["classes"] for r in mine], [r[key] for r in mine], marker="o" if world == 1 else "s",
                    markersize=9 if world == 1 else 5, linestyle="-" if rate >= 1.0 else "--",
                    label=f"{framework}, world {world}, sample_rate {rate}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    if lines:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
