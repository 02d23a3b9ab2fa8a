"""`twinface bench` end to end on a tiny model (MobileFaceNet at 32x32, one or two timed calls per row), so the
bench cannot rot; plus the child-process runner and the target verdicts on made-up numbers."""
import json

import pytest

from twinface.registry import backbone_spec
from twinface_bench import measure
from twinface_bench.run import CPU_RUNTIMES, TRAIN_RUNTIMES, Options, derive, run_bench, run_child

# torch.compile is left out: inductor takes ~20 s to compile even this tiny model.
RUNTIMES = tuple(r for r in CPU_RUNTIMES if r != "torch-compile") + TRAIN_RUNTIMES
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import torch
    out = tmp_path_factory.mktemp("bench")
    opts = Options(models=("mbf",), batches=BATCHES, input_size=32, num_features=32, runtimes=RUNTIMES,
                   train_batch=4, classes=10, min_iters=1, min_seconds=0.0, max_seconds=5.0, train_steps=1,
                   duel_rounds=2, peak_n=128, peak_libs=("numpy",), out=str(out), isolate=False)
    # Speed is not under test here, and two OpenMP threads on a busy 2-core machine can stall for seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines = []
        result = run_bench(opts, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return result, out, lines


def test_every_row_is_measured(bench):
    result, _, lines = bench
    rows = result["rows"]
    assert [r for r in rows if "error" in r] == []
    inference = {(r["runtime"], r["batch"]) for r in rows if r["section"] == "inference"}
    assert inference == {(r, b) for r in RUNTIMES if r not in TRAIN_RUNTIMES for b in BATCHES}
    assert {r["runtime"] for r in rows if r["section"] == "training"} == set(TRAIN_RUNTIMES)
    assert [r["runtime"] for r in rows if r["section"] == "peak"] == ["peak-numpy", "peak-numpy"]   # start, end
    for r in rows:
        if r["section"] in ("inference", "training"):
            assert r["images_per_s"] > 0 and r["best_images_per_s"] >= r["images_per_s"], r
            assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
            assert r["peak_rss_mb"] > 0, r
    assert len(lines) == len(rows)                         # one progress line per row, as it completes


def test_derived_numbers_follow_from_the_measurements(bench):
    result, _, _ = bench
    peak = max(r["gflops"] for r in result["rows"] if r["section"] == "peak")
    assert result["peak_gflops"] == peak
    forward = 2 * backbone_spec("mbf").gmacs * (32 / 112) ** 2   # registry MACs of mbf at 112, scaled to 32x32
    for r in result["rows"]:
        if r["section"] == "inference":
            assert r["gflop_per_image"] == pytest.approx(forward)
        if r["section"] == "training":
            assert r["gflop_per_image"] == pytest.approx(3 * forward)
        if r["section"] in ("inference", "training"):
            assert r["gflops"] == pytest.approx(r["images_per_s"] * r["gflop_per_image"])
            assert r["peak_fraction"] == pytest.approx(r["gflops"] / peak)
    for batch in BATCHES:
        ratios = [r["vs_fastest"] for r in result["rows"] if r["section"] == "inference" and r["batch"] == batch]
        assert max(ratios) == 1.0 and min(ratios) > 0
    verdicts = {(t["what"].split()[0], t["batch"]) for t in result["targets"]}
    assert verdicts == {("torch-embed", 2), ("tf-embed", 2), ("training", 4)}     # duel: at the largest batch
    duel = [r for r in result["rows"] if r["section"] == "duel"]
    assert len(duel) == 4 and {"torch-embed", "tf-embed"} <= {r["runtime"] for r in duel}   # + 2 contenders
    assert all(r["iterations"] == 2 and r["batch"] == 2 for r in duel)
    assert max(r["vs_fastest"] for r in duel) == 1.0


def test_files_are_written(bench):
    result, out, _ = bench
    saved = json.loads((out / "bench.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) and saved["targets"] == result["targets"]
    table = (out / "bench.md").read_text()
    for needle in ("torch embed_images (default)", "TF embed_images (default)", "onnxruntime, TF export",
                   "torch TorchTwin.train_step", "TF TFTwin.train_step", "### Targets", "Reference peak"):
        assert needle in table, needle
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kernels = saved["machine"]["kernels"]                   # what decides the numbers, in the JSON and the table
    assert kernels["torch"].split()[0] in ("AVX512", "AVX2", "DEFAULT") and kernels["isa"]
    assert f"torch: {kernels['torch']} (ATen kernel level, oneDNN)" in table
    assert f"CPU kernels: instruction sets {', '.join(kernels['isa'])}; TensorFlow runs {kernels['tf']}" in table


def test_child_process_rows_and_errors(tmp_path):
    (row,) = run_child({"task": "peak", "lib": "numpy", "n": 64}, timeout_s=120)
    assert row["gflops"] > 0 and row["peak_rss_mb"] > 0
    assert row["process_s"] > 0                             # the child's wall time, start-up included
    spec = {"task": "infer", "runtime": "torch-eager", "model": "r7", "input_size": 32, "num_features": 8,
            "work_dir": str(tmp_path), "batches": [1], "latency_batch": 1, "min_iters": 1, "min_seconds": 0.0,
            "max_seconds": 1.0}
    (row,) = run_child(spec, timeout_s=120)
    assert row["runtime"] == "torch-eager" and row["model"] == "r7"
    assert "unknown backbone 'r7'" in row["error"], row


def _row(runtime, ips, batch=32, section="inference"):
    return {"section": section, "runtime": runtime, "model": "r50", "batch": batch, "images_per_s": ips}


def test_targets_come_from_the_interleaved_duel_and_flag_misses():
    result = {"options": {"input_size": 112, "models": ["r50"], "train_batch": 64, "batches": [1, 32]},
              "rows": [{"section": "peak", "runtime": "peak-numpy", "gflops": 200.0},
                       _row("tf-function", 20.0), _row("torch-embed", 22.0),     # rows: torch looks fastest here
                       _row("tf-function", 20.0, section="duel"), _row("tf-embed", 19.0, section="duel"),
                       _row("torch-embed", 10.0, section="duel"),                # interleaved: it is not
                       _row("torch-train", 3.0, 64, "training"), _row("tf-train", 2.0, 64, "training")]}
    derive(result)
    verdicts = {t["what"]: (round(t["ratio"], 3), t["met"]) for t in result["targets"]}
    assert verdicts == {"tf-embed vs fastest (tf-function), interleaved": (0.95, True),
                        "torch-embed vs fastest (tf-function), interleaved": (0.5, False),
                        "training torch / TF": (1.5, False)}
    tf_function = result["rows"][1]
    assert tf_function["gflops"] == pytest.approx(20 * measure.gflop_per_image("r50", 112))
    assert tf_function["peak_fraction"] == pytest.approx(tf_function["gflops"] / 200)
