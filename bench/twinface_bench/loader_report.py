"""loader.json (everything), loader.md (the tables) and loader.png (bars against the decode limit) from one
loader-section result (loader.py)."""
from .report import _fmt, load_text, write_section

FORMAT_NAMES = {"folder": "image folder", "rec": ".rec/.idx", "tfrecord": "TFRecord"}
LOADER_NAMES = {"torch": "torch DataLoader", "tf": "tf.data"}


def progress_line(row) -> str:
    what = row["section"] + "".join(f" {row[k]}" for k in ("framework", "format", "model") if k in row)
    if row.get("sampler") == "stream":
        what += " (stream sampler)"
    if "workers" in row:
        what += f", {row['workers']} workers"
    if "error" in row:
        return f"{what}: ERROR {row['error']}"
    if row["section"] == "data":
        return f"{what}: {row['images']} JPEGs ({row['jpeg_bytes_mean']:.0f} bytes each) in {row['seconds']:.1f} s"
    if row["section"] == "limit":
        return (f"{what}: cv2.imdecode {row['single_core_images_per_s']:.0f} images/s on one thread x "
                f"{row['cores']} cores = {row['limit_images_per_s']:.0f}")
    if row["section"] == "loader":
        return f"{what}: {row['images_per_s']:.0f} images/s, first batch {row['first_batch_s']:.2f} s"
    return (f"{what}: {row['loader_images_per_s']:.2f} images/s fed by the loader, {row['memory_images_per_s']:.2f} "
            "from memory")


def write_all(result, out_dir):
    write_section(result, out_dir, "loader", markdown, chart)


def source(row) -> str:
    """The format, and the sampler where it is not the default."""
    return FORMAT_NAMES[row["format"]] + (", stream sampler" if row.get("sampler") == "stream" else "")


def _format_name(fmt, options):
    return FORMAT_NAMES[fmt] + (f" in {options['shards']} shards" if fmt == "tfrecord" else "")


def markdown(result) -> str:
    m, o, data, limit = result["machine"], result["options"], result["data"], result["limit"]
    lines = [
        f"Run {result['started']}, {result['seconds'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB; load average (1/5/15 min) {load_text(m['load_start'])} at the start, "
        f"{load_text(m['load_end'])} at the end.",
        f"Data: {data['images']:,} synthetic 112x112 JPEG face crops ({data['jpeg_bytes_mean']:,.0f} bytes on "
        f"average), {data['identities']:,} identities, the same bytes in each format "
        f"({', '.join(_format_name(f, o) for f in data['paths'])}), on local disk (in the page cache after writing).",
    ]
    if "error" in limit:
        lines.append(f"Decode limit: ERROR {limit['error']}")
    else:
        both = " and ".join(_fmt(r.get("limit_images_per_s"), 0) for r in result["limits"])
        lines.append(f"**Decode limit: {_fmt(limit['limit_images_per_s'], 0)} images/s** = single-thread "
                     f"`cv2.imdecode` {_fmt(limit['single_core_images_per_s'], 0)} images/s on these JPEGs (median of "
                     f"{len(limit['passes_images_per_s'])} passes) x {limit['cores']} cores; the higher of the limits "
                     f"measured at the start and at the end ({both}).")
    lines += [
        "",
        f"### Loaders: decoded batches of {o['batch']}, uint8 112x112x3, flips as in training (images/s, median of "
        f"{o['passes']} epochs, from the first batch to the last)",
        "",
        "| format | loader | workers | images/s | x limit | first batch s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [source(r), LOADER_NAMES[r["framework"]], r["workers"]]
        if "error" in r:
            lines.append(f"| {' | '.join(map(str, cells))} | ERROR: {r['error']} |")
            continue
        rate = f"**{_fmt(r['images_per_s'], 0)}**" if r["default"] else _fmt(r["images_per_s"], 0)
        lines.append(f"| {' | '.join(map(str, cells))}{' (default)' if r['default'] else ''} | {rate} | "
                     f"{_fmt(r.get('vs_limit'), 2)} | {_fmt(r['first_batch_s'], 2)} | {_fmt(r['peak_rss_mb'], 0)} |")
    if result["training"]:
        lines += ["", f"### Training step fed by the loader vs the same batches in memory (ArcFace head, SGD; "
                  f"images/s over {o['train_steps']} steps of each, alternating)", "",
                  "| twin | model | batch | fed from | loader images/s | memory images/s | ratio | wait for batch ms "
                  "(mean) | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["training"]:
            cells = [r["framework"], r.get("model", "-")]
            if "error" in r:
                lines.append(f"| {' | '.join(map(str, cells))} | ERROR: {r['error']} |")
                continue
            wait_ms = 1e3 * sum(r["loader_wait_s"]) / len(r["loader_wait_s"])
            lines.append(f"| {' | '.join(map(str, cells))} | {r['batch']} | {FORMAT_NAMES[r['format']]}, "
                         f"{r['workers']} workers | {_fmt(r['loader_images_per_s'], 2)} | "
                         f"{_fmt(r['memory_images_per_s'], 2)} | {_fmt(r['ratio'], 3)} | {_fmt(wait_ms)} | "
                         f"{_fmt(r['peak_rss_mb'], 0)} |")
    if result["targets"]:
        lines += ["", "### Targets", "", "| what | ratio | target | met |", "|---|---|---|---|"]
        lines += [f"| {t['what']} | {t['ratio']:.2f} | {t['target']} | {'met' if t['met'] else 'NOT MET'} |"
                  for t in result["targets"]]
    return "\n".join(lines) + "\n"


def chart(result, path):
    """One panel per format: images/s of every loader row against the limit (solid) and the target (dashed), the
    default loaders in red; a last panel for the training rows, fed by the loader and from memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    limit = result["limit"].get("limit_images_per_s")
    sources = list(dict.fromkeys(source(r) for r in result["rows"]))
    training = [r for r in result["training"] if "error" not in r]
    panels = [(s, [r for r in result["rows"] if source(r) == s and "error" not in r]) for s in sources]
    heights = [len(p) + 2 for _, p in panels] + ([2 * len(training) + 2] if training else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(8, 1.0 + 0.3 * sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, rows) in zip(axes[:, 0], panels):
        names = [f"{LOADER_NAMES[r['framework']]}, {r['workers']} workers" for r in rows]
        ax.barh(range(len(rows)), [r["images_per_s"] for r in rows],
                color=["tab:red" if r["default"] else "tab:gray" for r in rows])
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        if limit:
            ax.axvline(limit, color="black", label="decode limit")
            goal = result["goals"]["loader_vs_limit"]
            ax.axvline(limit * goal, color="black", linestyle="--", label=f"target ({goal}x)")
            ax.set_xlim(0, limit * 1.15)
        ax.set_title(f"{title}: decoded images/s (red: default workers)", fontsize=9)
    if panels and limit:
        axes[0, 0].legend(fontsize=7, loc="lower right")
    if training:
        ax = axes[-1, 0]
        names, values, colors = [], [], []
        for r in training:
            names += [f"{r['framework']} {r['model']}, fed by loader", f"{r['framework']} {r['model']}, in memory"]
            values += [r["loader_images_per_s"], r["memory_images_per_s"]]
            colors += ["tab:red", "tab:gray"]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title("training step, images/s", fontsize=9)
    axes[-1, 0].set_xlabel("images/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
