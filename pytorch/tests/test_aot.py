"""AOT-compiled backbones (aot.py): a training with train.aot_package writes backbone.pt2 beside backbone.pth;
embed runs it (any batch size) with the module's embeddings, and refuses it, saying why, for other weights, another
CPU or a damaged file; without a C++ compiler nothing is written and the reason is given; export --format pt2."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from twinface import cpu
from twinface.cli import main
from twinface.eval.embeddings import l2_normalize
from twinface.testing import run_tiny, tiny_dataset
from twinface_torch import aot
from twinface_torch.backbones import get_model
from twinface_torch.embed import Embedder, embed_images
from twinface_torch.train import TorchTwin

KWARGS = {"num_features": 32, "input_size": 32}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tiny_dataset(tmp_path_factory.mktemp("synth"))
    out = tmp_path_factory.mktemp("run") / "run"
    summary, _ = run_tiny(TorchTwin, data, out, train={"aot_package": True, "epochs": 1})
    return out, summary


def _images(n):
    return np.random.default_rng(n).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_training_writes_a_package_that_embed_runs(run, capsys):
    out, summary = run
    assert summary["aot_package"] == str(out / "backbone.pt2") and summary["aot_package_max_abs_diff"] <= 1e-5
    capsys.readouterr()
    embedder = Embedder(str(out / "backbone.pth"), "mbf", **KWARGS)
    assert f"embedding with the AOT-compiled {out / 'backbone.pt2'}" in capsys.readouterr().err
    assert embedder.package is not None
    for n in (1, 5, 33):                                     # the batch is dynamic
        default = embed_images(embedder.model, _images(n))
        assert np.abs(l2_normalize(embedder(_images(n))) - l2_normalize(default)).max() <= 1e-5, n


def _fallback(tmp_path, out, capsys, change=None, edit_package=None):
    shutil.copy(out / "backbone.pth", tmp_path / "backbone.pth")
    shutil.copy(out / "backbone.pt2", tmp_path / "backbone.pt2")
    if change:
        change(tmp_path / "backbone.pth")
    if edit_package:
        edit_package(tmp_path / "backbone.pt2")
    capsys.readouterr()
    embedder = Embedder(str(tmp_path / "backbone.pth"), "mbf", **KWARGS)
    err = capsys.readouterr().err
    assert embedder.package is None and "not used, embedding with the default path" in err, err
    images = _images(3)
    assert np.array_equal(embedder(images), embed_images(embedder.model, images))
    return err


def test_a_package_of_other_weights_is_not_used(run, tmp_path, capsys):
    def retrain(path):
        state = torch.load(path, weights_only=True)
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name] * 1.5
        torch.save(state, path)
    err = _fallback(tmp_path, run[0], capsys, change=retrain)
    assert "backbone.pt2: compiled from other weights (sha256 differs)" in err


def test_a_package_for_another_cpu_or_torch_is_not_used(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cpu, "isa", lambda: ["AVX2"])           # as on an AVX2-only EPYC
    err = _fallback(tmp_path, run[0], capsys)
    assert "compiled for another CPU: instruction sets " in err and "this one has AVX2 / ATen" in err
    monkeypatch.undo()
    found = aot.read_identity(str(run[0] / "backbone.pt2"))
    here = dict(found, torch="9.9.9")
    assert aot.mismatch(found, here) == f"compiled by another torch version: {found['torch']} vs 9.9.9"
    assert aot.mismatch(found, dict(found)) is None


def test_a_damaged_package_is_not_used(run, tmp_path, capsys):
    err = _fallback(tmp_path, run[0], capsys, edit_package=lambda p: p.write_bytes(p.read_bytes()[:4096]))
    assert "backbone.pt2" in err


def test_no_compiler_writes_nothing_and_says_why(tmp_path):
    model = get_model("mbf", **KWARGS).eval()
    spec = aot.identity("mbf", 32, 32, "0" * 64)
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        with pytest.raises(RuntimeError, match=r"backbone.pt2: AOTInductor could not compile mbf: .*/nonexistent/g\+\+"):
            aot.compile_package(model, str(tmp_path / "backbone.pt2"), spec)
    assert os.listdir(tmp_path) == []


def test_export_writes_the_package_embed_picks_up(run, tmp_path, capsys):
    shutil.copy(run[0] / "backbone.pth", tmp_path / "backbone.pth")
    main(["export", "--format", "pt2", "--weights", str(tmp_path / "backbone.pth"), "--arch", "mbf",
          "--input-size", "32", "--num-features", "32", "--out", str(tmp_path / "backbone.pt2")])
    assert "embed / eval / verify use it" in capsys.readouterr().out
    identity = aot.read_identity(str(tmp_path / "backbone.pt2"))
    assert identity["arch"] == "mbf" and identity["input_size"] == 32 and identity["isa"] == cpu.isa()
    with pytest.raises(SystemExit, match=r"backbone.pt2.*--force"):
        main(["export", "--format", "pt2", "--weights", str(tmp_path / "backbone.pth"), "--arch", "mbf",
              "--out", str(tmp_path / "backbone.pt2")])
    with pytest.raises(SystemExit, match=r"--format pt2 compiles torch weights, got onnx"):
        main(["export", "--format", "pt2", "--weights", str(run[0] / "backbone.onnx"), "--arch", "mbf",
              "--out", str(tmp_path / "x.pt2")])
    assert json.loads((run[0] / "summary.json").read_text())["aot_package"]


def test_a_training_without_a_compiler_finishes_and_says_why(tmp_path):
    data = tiny_dataset(tmp_path / "synth")
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        summary, _ = run_tiny(TorchTwin, data, tmp_path / "run", train={"aot_package": True, "epochs": 1})
    assert summary["finished"] and summary["aot_package"] is None
    assert summary["aot_package_error"].startswith(str(tmp_path / "run" / "backbone.pt2"))
    assert "/nonexistent/g++" in summary["aot_package_error"]
    assert (tmp_path / "run" / "backbone.pth").is_file() and not (tmp_path / "run" / "backbone.pt2").exists()
    assert "embed runs the default path" in (tmp_path / "run" / "train.log").read_text()
