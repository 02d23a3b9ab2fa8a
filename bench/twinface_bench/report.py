"""bench.json (everything), bench.md (the tables) and bench.png (bar chart) from one bench result."""
import json
import os

from .shared import DEFAULT_PATHS

LABELS = {
    "torch-eager": "torch eager (NCHW)", "torch-channels-last": "torch eager channels_last",
    "torch-jit-freeze": "torch TorchScript frozen, channels_last",
    "torch-jit-onednn": "torch TorchScript frozen + optimize_for_inference (oneDNN layout)",
    "torch-compile": "torch.compile (inductor, freezing; largest batch only)",
    "torch-aot": "torch AOTInductor package (backbone.pt2: embed's path beside one)",
    "torch-embed": "**torch embed_images (default)**",
    "torch-embed-omp-default": "torch embed_images, libgomp's default wait policy (spins)",
    "torch-embed-bf16": "torch embed_images, bf16 trunk (autocast)",
    "tf-eager": "TF eager", "tf-function": "TF tf.function", "tf-xla": "TF tf.function(jit_compile) XLA",
    "tf-embed": "**TF embed_images (default)**",
    "tf-embed-eigen": "TF embed_images, Eigen kernels (TF_ENABLE_ONEDNN_OPTS=0)",
    "tf-embed-avx2": "TF embed_images, oneDNN capped at AVX2",
    "tf-embed-bf16": "TF embed_images, bf16 trunk (mixed_bfloat16)",
    "ort-torch": "onnxruntime, torch export", "ort-tf": "onnxruntime, TF export (tf2onnx)",
    "tflite-fp32": "TFLite fp32 (XNNPACK)", "tflite-fp16": "TFLite fp16 weights (XNNPACK)",
    "tflite-int8": "TFLite int8 (XNNPACK)", "tflite-int8-float-prelu": "TFLite int8, PReLU in float (XNNPACK)",
    "torch-cuda-fp32": "torch CUDA fp32", "torch-cuda-bf16": "torch CUDA bf16 weights+inputs",
    "torch-cuda-fp16": "torch CUDA fp16 autocast", "torch-cuda-fp16-channels-last": "torch CUDA fp16 autocast channels_last",
    "torch-train": "torch TorchTwin.train_step", "tf-train": "TF TFTwin.train_step",
    "tf-train-eigen": "TF TFTwin.train_step, Eigen kernels", "tf-train-avx2": "TF TFTwin.train_step, oneDNN AVX2",
    "torch-train-bf16": "torch TorchTwin.train_step, train.precision bf16",
    "tf-train-bf16": "TF TFTwin.train_step, train.precision bf16 (mixed_bfloat16)",
    "torch-train-backbone": "torch backbone forward + backward only",
    "torch-train-backbone-checkpointing": "torch backbone forward + backward, gradient checkpointing",
}
MODEL_NAMES = {"r50": "IResNet-50", "r18": "IResNet-18", "mbf": "MobileFaceNet", "resnext50": "ResNeXt-50",
               "resnext101": "ResNeXt-101", "densenet121": "DenseNet-121", "vit_t": "ViT-T", "vit_s": "ViT-S",
               "vit_b": "ViT-B"}


def label(runtime):
    return LABELS.get(runtime, runtime)


def progress_line(row) -> str:
    where = " ".join(str(x) for x in (row.get("model"), f"batch {row['batch']}" if "batch" in row else None) if x)
    head = f"[{row['section']}] {row['runtime']} {where}".rstrip()
    if "error" in row:
        return f"{head}: ERROR {row['error']}"
    if row["section"] == "peak":
        return f"{head}: {row['gflops']:.0f} GFLOP/s (fp32 matmul {row['n']}^2)"
    if row["section"] == "prepare":
        return f"{head}: ready in {row['seconds']:.1f} s"
    if row["section"] == "duel":
        return f"{head}: {row['images_per_s']:.1f} images/s (median of {row['iterations']} interleaved rounds)"
    return (f"{head}: {row['images_per_s']:.1f} images/s (median of {row['iterations']}, best "
            f"{row['best_images_per_s']:.1f}), first call {row['first_call_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB")


def write_all(result, out_dir):
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(markdown(result))
    chart(result, os.path.join(out_dir, "bench.png"))


def write_section(result, out_dir, name, markdown, chart):
    """An opt-in section's NAME.json (everything), NAME.md (markdown(result)) and NAME.png (chart) in out_dir."""
    base = os.path.join(out_dir, f"{name}.")
    for ext, text in (("json", json.dumps(result, indent=1)), ("md", markdown(result))):
        with open(base + ext, "w") as f:
            f.write(text)
    chart(result, base + "png")


def load_text(values) -> str:
    """A load average triple as 1.00/2.00/3.00."""
    return "/".join(f"{x:.2f}" for x in values)


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


def _kernels_line(k) -> str:
    if not k:
        return "CPU kernels: not recorded (a run from before they were)."
    setting = "unset" if k["tf_setting"] is None else k["tf_setting"]
    return (f"CPU kernels: instruction sets {', '.join(k['isa']) or 'unknown'}; TensorFlow runs {k['tf']} "
            f"(TF_ENABLE_ONEDNN_OPTS={setting}; TensorFlow's own default on this CPU: {k['tf_default']}); "
            f"torch: {k.get('torch', 'not recorded')} (ATen kernel level, oneDNN); onnxruntime picks its kernels by "
            "instruction set at run time.")


def markdown(result) -> str:
    m, opts, rows = result["machine"], result["options"], result["rows"]
    batches = sorted(opts["batches"])
    small, large = batches[0], batches[-1]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    peaks = [r for r in rows if r["section"] == "peak" and "error" not in r]
    start, end = peaks[:len(opts["peak_libs"])], peaks[len(opts["peak_libs"]):]
    peak_text = ", ".join(f"{r['runtime'][5:]} {_fmt(r['gflops'], 0)}" for r in start) + "".join(
        f"; at the end, {r['runtime'][5:]} again: {_fmt(r['gflops'], 0)}" for r in end)
    env = ", ".join(f"{k}={v}" for k, v in m["child_env"].items())
    spent = {}
    for r in rows:
        spent[r["section"]] = spent.get(r["section"], 0.0) + r.get("process_s", 0.0)
    spent_text = ", ".join(f"{section} {seconds / 60:.1f}" for section, seconds in spent.items() if seconds)
    lines = [
        f"Run {result['started']}, {result['seconds'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB; {m['platform']}; Python {m['python']}; {versions}.",
        _kernels_line(m.get("kernels")),
        f"Load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in m['load_start'])} at the start, "
        f"{'/'.join(f'{x:.2f}' for x in m['load_end'])} at the end."
        + (f" Minutes by section (each row's process, start-up included): {spent_text}." if spent_text else ""),
        f"Reference peak, GFLOP/s of an fp32 matrix product {opts['peak_n']}x{opts['peak_n']} at the start: {peak_text}. "
        f"The best, {_fmt(result['peak_gflops'], 0)} GFLOP/s, is the peak below.",
        f"Input {opts['input_size']}x{opts['input_size']}, embeddings {opts['num_features']}-d, the same weights and "
        "images in every row; images/s from the median call; GFLOP/s = images/s x 2 x MACs (training: x 3). "
        f"Each row runs in its own process, with {env} unless the row says otherwise.",
        "",
        f"### Inference (images/s; latency at batch {small}; GFLOP/s, % of peak, x fastest, RSS at batch {large})",
        "",
        f"| model | runtime | {' | '.join(f'batch {b}' for b in batches)} | p50 / p90 / p99 ms | GFLOP/s | % peak "
        f"| x fastest | peak RSS MB | setup s |",
        "|" + "---|" * (len(batches) + 8),
    ]
    by_key = {(r["model"], r["runtime"], r.get("batch")): r for r in rows if r["section"] == "inference"}
    inference_runtimes = list(dict.fromkeys(r["runtime"] for r in rows if r["section"] == "inference"))
    for model in opts["models"]:
        for runtime in inference_runtimes:
            cells = [by_key.get((model, runtime, b)) for b in batches]
            errors = [c for c in cells if c and "error" in c]
            failed = errors or ([by_key[(model, runtime, None)]] if (model, runtime, None) in by_key else [])
            if failed:
                lines.append(f"| {MODEL_NAMES.get(model, model)} | {label(runtime)} | ERROR: {failed[0]['error']} |")
                continue
            if not any(cells):
                continue
            lo, hi = cells[0], cells[-1]
            latency = " / ".join(_fmt(lo[k]) for k in ("p50_ms", "p90_ms", "p99_ms")) if lo else "-"
            lines.append(
                f"| {MODEL_NAMES.get(model, model)} | {label(runtime)} | "
                f"{' | '.join(_fmt(c['images_per_s']) if c else '-' for c in cells)} | {latency} | "
                + (f"{_fmt(hi['gflops'], 0)} | {_fmt(100 * hi['peak_fraction'] if hi.get('peak_fraction') else None, 0)} | "
                   f"{_fmt(hi.get('vs_fastest'), 2)} | {_fmt(hi['peak_rss_mb'], 0)} | "
                   f"{_fmt(hi['build_s'] + hi['first_call_s'])} |" if hi else "- | - | - | - | - |"))
    duel = [r for r in rows if r["section"] == "duel"]
    if duel:
        lines += ["", f"### Interleaved at batch {large}: default paths against the fastest rows, one call each per "
                  f"round, {opts['duel_rounds']} rounds in one process (ratios that other processes' load cannot skew; "
                  "the targets)", "", "| model | runtime | images/s | x fastest |", "|---|---|---|---|"]
        for r in duel:
            if "error" in r:
                lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | duel | ERROR: {r['error']} |")
                continue
            lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {label(r['runtime'])} | "
                         f"{_fmt(r['images_per_s'])} | {_fmt(r.get('vs_fastest'), 2)} |")
    train = [r for r in rows if r["section"] == "training"]
    if train:
        lines += ["", f"### Training step (batch {opts['train_batch']}, ArcFace head over {opts['classes']:,} classes, "
                  "SGD; the twins' own train_step, data loading excluded)", "",
                  "| model | twin | images/s | GFLOP/s | % peak | peak RSS MB | first step s |", "|---|---|---|---|---|---|---|"]
        for r in train:
            if "error" in r:
                lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {label(r['runtime'])} | ERROR: {r['error']} |")
                continue
            lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {label(r['runtime'])} | {_fmt(r['images_per_s'], 2)} | "
                         f"{_fmt(r['gflops'], 0)} | {_fmt(100 * r['peak_fraction'] if r.get('peak_fraction') else None, 0)} | "
                         f"{_fmt(r['peak_rss_mb'], 0)} | {_fmt(r['first_call_s'])} |")
    if result.get("targets"):
        lines += ["", "### Targets", "", "| model | batch | what | ratio | target | met |", "|---|---|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {MODEL_NAMES.get(t['model'], t['model'])} | {t['batch']} | {t['what']} | {t['ratio']:.2f} | "
                         f"{t['target']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def chart(result, path):
    """One panel per model: inference images/s at the largest batch, default paths highlighted; one panel for
    training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    opts, rows = result["options"], result["rows"]
    large = max(opts["batches"])
    ok = [r for r in rows if "error" not in r]
    panels = [(f"{MODEL_NAMES.get(m, m)}, batch {large}",
               [r for r in ok if r["section"] == "inference" and r["model"] == m and r["batch"] == large])
              for m in opts["models"]]
    train = [r for r in ok if r["section"] == "training"]
    if train:
        panels.append((f"training step, batch {opts['train_batch']}", train))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 0.32 * sum(len(p[1]) + 2 for p in panels)),
                             squeeze=False)
    for ax, (title, panel) in zip(axes[:, 0], panels):
        names = [label(r["runtime"]).strip("*") + (f" ({MODEL_NAMES.get(r['model'], r['model'])})"
                                                  if r["section"] == "training" else "") for r in panel]
        values = [r["images_per_s"] for r in panel]
        colors = ["tab:red" if r["runtime"] in DEFAULT_PATHS else
                  "tab:orange" if r["runtime"].startswith("torch") else
                  "tab:blue" if r["runtime"].startswith("tf") else "tab:green" for r in panel]
        ax.barh(range(len(panel)), values, color=colors)
        ax.set_yticks(range(len(panel)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        for i, r in enumerate(panel):
            note = f" {r['images_per_s']:.1f}" + (f"  ({r['vs_fastest']:.2f}x)" if "vs_fastest" in r else "")
            ax.text(r["images_per_s"], i, note, va="center", fontsize=7)
        ax.set_xlim(0, max(values, default=1) * 1.3)
    axes[-1, 0].set_xlabel("images/s (median call); red: the twins' default embed_images path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
