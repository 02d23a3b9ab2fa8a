"""The detection section end to end, tiny: the group photo, one timed pass, one thread, every runtime in its own
real process; the numbers positive and adding up, the faces equal across runtimes, the three files written."""
import argparse
import json

import numpy as np
import pytest
from twinface import fixtures

from twinface_bench import detect
from twinface_bench.cli import add_parser, run
from twinface_bench.detect_rows import letterbox

RUNTIMES = ("torch", "tf", "onnx")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    opts = detect.DetectOptions(photos=("t1.jpg",), runtimes=RUNTIMES, threads=(1,), repeats=1, timeout_s=120.0,
                                out=str(out))
    lines = []
    return detect.run_detect(opts, log=lines.append), out, lines


def test_every_row_measured(result):
    res, _, lines = result
    rows = res["rows"]
    assert [(r["runtime"], r["threads"]) for r in rows] == [(rt, 1) for rt in RUNTIMES]
    assert [r.get("error") for r in rows] == [None] * 3
    for r in rows:
        assert r["detections"] == 1 and r["passes"] == 1
        assert 0 < r["p90_ms"] and 0 < r["median_ms"] <= r["p90_ms"]
        assert all(v > 0 for v in r["stages_ms"].values()), r["stages_ms"]
        assert sum(r["stages_ms"].values()) == pytest.approx(r["mean_ms"])
        # 640x480, min face 20 px, factor 0.709: 10 pyramid levels; the group photo's P-Net candidates fill two
        # R-Net batches (cascade.CROP_BATCH = 256 crops), what R-Net passes one O-Net batch
        assert r["calls_per_photo"] == {"pnet": 10, "rnet": 2, "onet": 1}
        assert r["passes_ms"] == [[pytest.approx(r["median_ms"])]]
        assert r["photo_median_ms"] == {"t1.jpg": pytest.approx(r["median_ms"])}
    assert len(lines) == 3 + 1 + 3                               # each row's start, the round, each row's result


def test_faces_agree_across_runtimes(result):
    res = result[0]
    assert res["faces_agree"] is True
    assert [r["faces"] for r in res["rows"]] == [[{"found": 6, "kept": 6}]] * 3      # the group photo of 6


def test_faces_agree_says_when_they_differ():
    same = {"faces": [{"found": 1, "kept": 1}]}
    assert detect.faces_agree([same, same, {"error": "x"}])
    assert not detect.faces_agree([same, {"faces": [{"found": 2, "kept": 1}]}])


def test_files_written(result):
    res, out, _ = result
    assert json.loads((out / "detect.json").read_text()) == json.loads(json.dumps(res))
    table = (out / "detect.md").read_text()
    for name in ("torch twin", "TF twin (tf.function)", "onnxruntime (torch export)"):
        assert f"| {name} | 1 | **" in table
    assert "scaled to fit 640x480 and padded with black" in table and "equal in every row" in table
    assert "ERROR" not in table and res["machine"]["cpu"] in table
    assert (out / "detect.png").read_bytes()[:4] == b"\x89PNG"


def test_letterbox_keeps_the_whole_photo():
    tall = np.full((300, 100, 3), 255, np.uint8)
    boxed = letterbox(tall)
    assert boxed.shape == (480, 640, 3)
    cols = np.nonzero(boxed.max(axis=(0, 2)))[0]
    assert (cols[0], cols[-1] + 1) == (240, 400) and boxed[:, 240:400].min() == 255      # 160x480, centred


def test_unknown_runtime_is_refused_naming_the_known_ones(tmp_path):
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert parser.parse_args([]).detect is False
    with pytest.raises(ValueError, match="unknown runtime 'openvino'; known: torch, tf, onnx"):
        run(parser.parse_args(["--detect", "--detect-runtimes", "torch,openvino", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="distinct file names, got t1.jpg, t1.jpg"):
        detect.run_detect(detect.DetectOptions(photos=("t1.jpg", fixtures.photo("t1.jpg")), out=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_failed_row_is_an_error_row_naming_it(tmp_path, monkeypatch):
    """A row whose process fails (here: no ONNX graphs where the fixtures should be) is an error row saying why;
    the section still writes its files."""
    photo = tmp_path / "t1.jpg"
    photo.write_bytes(open(fixtures.photo("t1.jpg"), "rb").read())
    monkeypatch.setenv("TWINFACE_FIXTURES", str(tmp_path / "nothing"))
    opts = detect.DetectOptions(photos=(str(photo),), runtimes=("onnx",), threads=(1,), repeats=2, timeout_s=60.0,
                                out=str(tmp_path / "out"))
    [row] = detect.run_detect(opts, log=lambda line: None)["rows"]
    assert (row["runtime"], row["threads"]) == ("onnx", 1)
    assert "exit code 1" in row["error"] and "pnet.onnx: MTCNN ONNX graph missing" in row["error"]
    assert "| onnxruntime (torch export) | 1 | ERROR: exit code 1" in (tmp_path / "out" / "detect.md").read_text()
