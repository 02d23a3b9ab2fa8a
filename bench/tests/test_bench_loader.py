"""The loader section end to end on a tiny set (96 JPEGs, one default-workers row per format, sampler and twin,
one MobileFaceNet training row): real child processes, every row measured, the ratios following from the rows, the
three files written."""
import argparse
import json
import math
import os

import pytest

from twinface_bench import loader
from twinface_bench.cli import add_parser, run

FORMATS = ("folder", "rec", "tfrecord")
SOURCES = [(f, "epoch") for f in FORMATS] + [("tfrecord", "stream")]      # TFRecord also streamed


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    opts = loader.LoaderOptions(images=96, formats=FORMATS, workers=(loader.DEFAULT_WORKERS,), batch=16, passes=1,
                                train_model="mbf", train_batch=8, train_steps=2, train_frameworks=("torch",),
                                timeout_s=120.0, out=str(out))
    lines = []
    return loader.run_loader(opts, log=lines.append), out, lines


def test_every_row_measured(result):
    res, _, lines = result
    assert [r for r in res["rows"] + res["training"] + res["limits"] if "error" in r] == []
    assert sorted((r["format"], r["sampler"], r["framework"], r["workers"]) for r in res["rows"]) == sorted(
        (f, s, fw, loader.DEFAULT_WORKERS) for f, s in SOURCES for fw in ("torch", "tf"))
    assert res["data"]["images"] == 96 and set(res["data"]["paths"]) == set(FORMATS)
    for r in res["rows"]:
        assert r["images_per_s"] > 0 and r["first_batch_s"] > 0 and r["default"], r
        assert r["images_per_pass"] == 96 // 16 * 16
    assert len(lines) == 1 + 2 + len(res["rows"]) + len(res["training"])        # data, limits, rows


def test_ratios_follow_from_the_rows(result):
    res = result[0]
    limit = res["limit"]
    assert limit["cores"] == len(os.sched_getaffinity(0)) and limit["single_core_images_per_s"] > 0
    assert limit["limit_images_per_s"] == pytest.approx(limit["single_core_images_per_s"] * limit["cores"])
    assert limit["limit_images_per_s"] == max(r["limit_images_per_s"] for r in res["limits"])
    for r in res["rows"]:
        assert r["vs_limit"] == pytest.approx(r["images_per_s"] / limit["limit_images_per_s"])
    [train] = res["training"]
    assert train["framework"] == "torch" and train["format"] == "rec" and train["workers"] == loader.DEFAULT_WORKERS
    assert len(train["memory_steps_s"]) == len(train["loader_steps_s"]) == len(train["loader_wait_s"]) == 2
    assert len(train["losses"]) == 2 + 2 * 2 and all(math.isfinite(x) for x in train["losses"])
    assert train["memory_images_per_s"] == pytest.approx(8 * 2 / sum(train["memory_steps_s"]))
    assert all(0 < wait < step for wait, step in zip(train["loader_wait_s"], train["loader_steps_s"]))
    assert train["ratio"] == pytest.approx(train["loader_images_per_s"] / train["memory_images_per_s"])
    targets = res["targets"]
    assert len(targets) == len(res["rows"]) + 1
    assert [t["ratio"] for t in targets] == [r["vs_limit"] for r in res["rows"]] + [train["ratio"]]
    assert [t["met"] for t in targets] == [r["vs_limit"] >= 0.8 for r in res["rows"]] + [train["ratio"] >= 0.95]


def test_files_written(result):
    res, out, _ = result
    assert json.loads((out / "loader.json").read_text()) == json.loads(json.dumps(res))
    table = (out / "loader.md").read_text()
    assert table.count("| torch DataLoader | 2 (default) |") == len(SOURCES)
    assert table.count("| tf.data | 2 (default) |") == len(SOURCES)
    assert table.count("| TFRecord, stream sampler | ") == 2
    for t in res["targets"]:
        assert f"| {t['what']} | {t['ratio']:.2f} | {t['target']} | {'met' if t['met'] else 'NOT MET'} |" in table
    assert "ERROR" not in table
    assert (out / "loader.png").read_bytes()[:4] == b"\x89PNG"


def test_worker_counts():
    opts = loader.LoaderOptions(workers=(0, 1, 2))
    assert loader.worker_counts(opts, "torch") == [0, 1, 2]
    assert loader.worker_counts(opts, "tf") == [1, 2]                   # tf.data runs at least one thread
    assert loader.worker_counts(loader.LoaderOptions(workers=(0,)), "torch") == [0, loader.DEFAULT_WORKERS]


def test_failed_child_is_an_error_row_naming_it(tmp_path):
    spec = {"task": "loader", "framework": "torch", "format": "rec", "sampler": "epoch",
            "path": str(tmp_path / "none.rec"), "workers": 0, "batch": 8, "passes": 1}
    row = loader.run_child(spec, 60.0)
    assert (row["section"], row["framework"], row["format"], row["workers"]) == ("loader", "torch", "rec", 0)
    assert "exit code 1" in row["error"] and "none.rec" in row["error"]


def test_cli_flag_is_opt_in():
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert parser.parse_args([]).loader is False
    args = parser.parse_args(["--loader", "--loader-images", "512", "--loader-workers", "0,2",
                              "--loader-formats", "rec"])
    assert args.loader and args.loader_images == 512 and args.loader_workers == (0, 2)
    assert args.loader_formats == ("rec",)
    with pytest.raises(ValueError, match="--loader-formats: unknown 'lmdb'"):
        run(parser.parse_args(["--loader", "--loader-formats", "lmdb"]))
    with pytest.raises(ValueError, match="--loader-workers >= 0"):
        run(parser.parse_args(["--loader", "--loader-workers", "-1"]))
