"""detect.json (everything), detect.md (the tables) and detect.png (stage bars per row) from one detection-section
result (detect.py)."""
from .report import _fmt, _kernels_line, load_text, write_section

RUNTIME_NAMES = {"torch": "torch twin", "tf": "TF twin (tf.function)", "onnx": "onnxruntime (torch export)"}
STAGE_NAMES = {"pnet_ms": "P-Net pyramid", "rnet_ms": "R-Net", "onet_ms": "O-Net", "cascade_ms": "numpy cascade"}


def _what(row) -> str:
    return f"{row['runtime']}, {row['threads']} thread{'s' if row['threads'] > 1 else ''}"


def _faces(faces, names) -> str:
    return ", ".join(f"{n} {f['found']} ({f['kept']} kept)" for n, f in zip(names, faces))


def start_line(row, names) -> str:
    if "error" in row:
        return f"{_what(row)}: ERROR {row['error']}"
    return (f"{_what(row)}: loaded in {row['load_s']:.1f} s, first pass {row['warmup_s']:.1f} s; faces "
            f"{_faces(row['faces'], names)}")


def round_line(done, total, rows) -> str:
    """rows: (row result, its last pass or None)."""
    cells = [f"{_what(r)} " + (f"{sum(t['ms'] for t in last) / len(last):.0f}" if last else "ERROR")
             for r, last in rows]
    return f"round {done}/{total}, mean ms per photo: {'; '.join(cells)}"


def progress_line(row) -> str:
    if "error" in row:
        return f"{_what(row)}: ERROR {row['error']}"
    stages = ", ".join(f"{STAGE_NAMES[s]} {v:.1f}" for s, v in row["stages_ms"].items())
    return (f"{_what(row)}: median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms per photo "
            f"({row['detections']} detections); mean by stage: {stages}")


def write_all(result, out_dir):
    write_section(result, out_dir, "detect", markdown, chart)


def markdown(result) -> str:
    m, o, rows = result["machine"], result["options"], result["rows"]
    names = [p["name"] for p in result["photos"]]
    width, height = result["size"]
    ok = [r for r in rows if "error" not in r]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    calls = sorted({r["calls_per_photo"]["pnet"] for r in ok})
    sizes = ", ".join(f"{p['name']} {p['size'][0]}x{p['size'][1]}" for p in result["photos"])
    lines = [
        f"Run {result['started']}, {result['seconds'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB; {versions}; load average (1/5/15 min) {load_text(m['load_start'])} at the start, "
        f"{load_text(m['load_end'])} at the end.",
        _kernels_line(m.get("kernels")),
        f"Photos: {len(names)} ({sizes}), "
        f"each **scaled to fit {width}x{height} and padded with black** (letterboxed, not cropped: every face stays "
        f"in; the pyramid is the same for every photo: {'/'.join(f'{c:g}' for c in calls) or '-'} P-Net scales).",
        f"Timed: `detect_faces` on the decoded photo (pyramid resizes, the three nets, NMS, box regression, crops, "
        f"landmarks; default MTCNN settings); {o['repeats']} passes over the photos per row after one untimed pass, "
        "the rows taking turns (order reversed every other round), each row in a process of its own. Stages: each "
        "net's calls timed around the nets object; numpy cascade = the rest (pyramid resizes, NMS, box regression, "
        "crops, landmark decoding).",
        "",
        "| runtime | threads | median ms / photo | p90 ms | photos/s | P-Net pyramid ms | R-Net ms | O-Net ms "
        "| numpy cascade ms | mean ms | load s | first pass s | peak RSS MB |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        cells = [RUNTIME_NAMES[r["runtime"]], r["threads"]]
        if "error" in r:
            lines.append(f"| {' | '.join(map(str, cells))} | ERROR: {r['error']} |")
            continue
        cells += [f"**{_fmt(r['median_ms'])}**", _fmt(r["p90_ms"]), _fmt(r["photos_per_s"], 2)]
        cells += [_fmt(r["stages_ms"][s]) for s in STAGE_NAMES]
        cells += [_fmt(r["mean_ms"]), _fmt(r["load_s"]), _fmt(r["warmup_s"]), _fmt(r.get("peak_rss_mb"), 0)]
        lines.append(f"| {' | '.join(map(str, cells))} |")
    lines += ["", "Stage columns are means per photo (they add up to the mean); the median and p90 are over every "
                  "detection (photos x passes)."]
    if ok:
        agree = ("equal in every row" if result["faces_agree"] else
                 "**DIFFER between rows**: " + "; ".join(f"{_what(r)}: {_faces(r['faces'], names)}" for r in ok))
        lines += ["", f"Faces found per photo (kept: O-Net score >= 0.95, what `twinface align` keeps): "
                      f"{_faces(ok[0]['faces'], names)}; {agree}."]
        lines += ["", "### Median ms per photo", "",
                  "| photo | " + " | ".join(f"{r['runtime']} {r['threads']}t" for r in ok) + " |",
                  "|" + "---|" * (len(ok) + 1)]
        lines += [f"| {n} | " + " | ".join(_fmt(r["photo_median_ms"][n]) for r in ok) + " |" for n in names]
    return "\n".join(lines) + "\n"


def chart(result, path):
    """One bar per row: the mean ms per photo split by stage; the median written beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in result["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(9.5, 1.2 + 0.45 * max(len(ok), 1)))
    left = [0.0] * len(ok)
    for stage, name in STAGE_NAMES.items():
        values = [r["stages_ms"][stage] for r in ok]
        ax.barh(range(len(ok)), values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    for i, r in enumerate(ok):
        ax.text(left[i], i, f" median {r['median_ms']:.0f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(ok)), [f"{RUNTIME_NAMES[r['runtime']]}, {r['threads']} thr." for r in ok], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left, default=1) * 1.3)
    width, height = result["size"]
    ax.set_xlabel(f"ms per {width}x{height} photo (mean, by stage)")
    ax.set_title(f"MTCNN detection, {len(result['photos'])} photos letterboxed to {width}x{height}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))           # beside the bars, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
