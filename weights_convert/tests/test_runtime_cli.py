"""`--runtime` end to end: torch weights embedded by onnxruntime and by the TF twin through verified, cached
conversions give the torch twin's embeddings; `auto` measures each runtime in its own process once, says what it
picked, and remembers it."""
import os

import numpy as np
import pytest
import torch

from twinface.cli import main
from twinface.data.images import encode_image
from twinface.eval.embeddings import load_embeddings
from twinface_torch.calibrate import trained_like


def _embed(tmp_path, name, *options):
    out = str(tmp_path / f"{name}.npy")
    main(["embed", "--weights", str(tmp_path / "backbone.pth"), "--arch", "mbf", "--input-size", "32",
          "--images", str(tmp_path / "faces"), "--out", out, "--batch-size", "4", *options])
    return load_embeddings(out)[0]


def test_runtimes_give_the_twins_embeddings_and_auto_remembers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWINFACE_CACHE", str(tmp_path / "cache"))
    torch.save(trained_like("mbf", input_size=32).state_dict(), tmp_path / "backbone.pth")
    (tmp_path / "faces").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "faces" / f"{i}.png").write_bytes(encode_image(rng.integers(0, 256, (112, 112, 3), np.uint8)))

    own = _embed(tmp_path, "own")
    for name in ("onnx", "tf"):
        capsys.readouterr()
        other = _embed(tmp_path, name, "--runtime", name)
        assert np.abs(other - own).max() <= 1e-5, name
        assert f"runtime {name}: converted" in capsys.readouterr().out
    copies = sorted(os.listdir(tmp_path / "cache" / "runtimes"))
    assert sorted(c.split("-")[1:] for c in copies) == [["mbf", "32.onnx"], ["mbf", "32.weights.h5"]]
    stamps = {c: os.stat(tmp_path / "cache" / "runtimes" / c).st_mtime_ns for c in copies}
    _embed(tmp_path, "again", "--runtime", "onnx")                    # the cached copy, not converted again
    assert "converted" not in capsys.readouterr().out
    assert stamps == {c: os.stat(tmp_path / "cache" / "runtimes" / c).st_mtime_ns for c in copies}

    auto = _embed(tmp_path, "auto", "--runtime", "auto")
    out = capsys.readouterr().out
    picked = out.split("runtime auto: picked ")[1].split()[0]
    assert picked in ("torch", "tf", "onnx") and "torch" in out and "tf" in out and "onnx" in out
    assert np.abs(auto - own).max() <= 1e-5
    _embed(tmp_path, "auto2", "--runtime", "auto")
    assert f"runtime auto: {picked} (measured " in capsys.readouterr().out


def test_a_copy_another_process_made_meanwhile_is_used(tmp_path, monkeypatch):
    from twinface import runtime
    from twinface_convert import convert as convert_module
    monkeypatch.setenv("TWINFACE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "backbone.pth").write_bytes(b"weights")

    def racing(src, dst, **kwargs):                # the other process renames its copy in first
        open(dst, "wb").close()
        raise FileExistsError(f"{dst}: already exists; pass --force to replace it")
    monkeypatch.setattr(convert_module, "convert", racing)
    path = runtime.converted(str(tmp_path / "backbone.pth"), "torch", "onnx", "mbf", 32)
    assert path.endswith("-mbf-32.onnx") and os.path.isfile(path)


def test_a_copy_read_at_another_input_size_is_refused(tmp_path, monkeypatch):
    from twinface import runtime
    monkeypatch.setenv("TWINFACE_CACHE", str(tmp_path / "cache"))
    torch.save(trained_like("mbf", input_size=32).state_dict(), tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match=r"backbone.pth: its weights read as input size 32, not --input-size 64"):
        runtime.converted(str(tmp_path / "backbone.pth"), "torch", "onnx", "mbf", 64)
    assert os.listdir(tmp_path / "cache" / "runtimes") == []
