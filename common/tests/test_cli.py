"""The `twinface` command end to end on tiny data, with a framework-free ONNX model (global average pooling)."""
import errno
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from twinface import cli, embedders
from twinface.data.images import encode_image
from twinface.eval.embeddings import load_embeddings
from twinface.testing import pool_onnx, tiny_dataset, with_external_weight

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def pool_model(tmp_path_factory):
    """data [N, 3, 16, 16] -> 4x4 average pooling -> 48-d 'embedding': colour layout, enough to score pairs."""
    return pool_onnx(tmp_path_factory.mktemp("onnx") / "pool.onnx")


def test_data_conversions_round_trip(data, tmp_path, capsys):
    prefix = os.path.join(data, "train")
    cli.main(["data", "rec2folder", prefix, str(tmp_path / "folder")])
    cli.main(["data", "folder2rec", str(tmp_path / "folder"), str(tmp_path / "again")])
    assert open(prefix + ".rec", "rb").read() == open(tmp_path / "again.rec", "rb").read()
    cli.main(["data", "folder2bin", str(tmp_path / "folder"), str(tmp_path / "pairs.bin"), "--pairs", "20"])
    assert (tmp_path / "pairs.bin").stat().st_size > 0
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["data", "rec2folder", prefix, str(tmp_path / "folder")])


def test_eval_embed_verify_with_an_onnx_model(data, pool_model, tmp_path, capsys):
    val = os.path.join(data, "val.bin")
    cli.main(["eval", "--weights", pool_model, "--bin", val, "--roc", str(tmp_path / "roc.png"),
              "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "[val.bin]Accuracy-Flip:" in out and "XNorm" in out and (tmp_path / "roc.png").stat().st_size > 0
    assert 0.0 <= json.load(open(tmp_path / "r.json"))["val.bin"]["acc_mean"] <= 1.0

    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        (faces / f"{i}.png").write_bytes(encode_image(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), ".png"))
    cli.main(["embed", "--weights", pool_model, "--images", str(faces), "--out", str(tmp_path / "emb")])
    emb, names = load_embeddings(str(tmp_path / "emb.npy"))
    assert emb.shape == (3, 48) and [os.path.basename(n) for n in names] == ["0.png", "1.png", "2.png"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    capsys.readouterr()
    cli.main(["verify", "--weights", pool_model, str(faces / "0.png"), str(faces / "0.png")])
    out = capsys.readouterr().out
    assert "cosine similarity 1.0000" in out and "SAME person" in out
    cli.main(["verify", "--weights", pool_model, str(faces / "0.png"), str(faces / "1.png"), "--threshold", "0"])
    assert "DIFFERENT people" in capsys.readouterr().out


def test_clear_errors(pool_model, tmp_path):
    with pytest.raises(SystemExit, match="cannot tell the framework"):
        cli.main(["eval", "--weights", str(tmp_path / "model.xyz"), "--bin", "x.bin"])
    with pytest.raises(SystemExit, match="no such folder or list file"):
        cli.main(["embed", "--weights", pool_model, "--images", str(tmp_path / "nope"), "--out", "e.npy"])


def _png(path, height=112, width=112):
    path.write_bytes(encode_image(np.zeros((height, width, 3), np.uint8), ".png"))
    return str(path)


def _idx_with(data, tmp_path, edit):
    """A copy of the tiny set's train.rec with its .idx lines passed through `edit`; -> the copy's .idx path."""
    prefix = tmp_path / "bad" / "train"
    prefix.parent.mkdir()
    shutil.copy(os.path.join(data, "train.rec"), str(prefix) + ".rec")
    lines = open(os.path.join(data, "train.idx")).read().splitlines()
    pathlib.Path(str(prefix) + ".idx").write_text("\n".join(edit(lines)) + "\n")
    return str(prefix) + ".idx"


def _loop(tmp_path, name):
    link = tmp_path / name
    link.symlink_to(link)
    return str(link)


def _onnx_with_external_data_outside(pool_model, tmp_path):
    """The pool model times an initializer whose external data lies outside the model's folder."""
    (tmp_path / "outside.bin").write_bytes(np.float32([1]).tobytes())
    (tmp_path / "m").mkdir()
    return with_external_weight(pool_model, tmp_path / "m" / "ext.onnx", "../outside.bin")


class Evil:
    def __reduce__(self):
        return os.system, ("echo should-never-run",)


def _savedmodel(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    return str(tmp_path / "sm")


def _zero_onnx(tmp_path):
    (tmp_path / "zero.onnx").write_bytes(b"")
    return str(tmp_path / "zero.onnx")


def _evil_bin(tmp_path):
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(Evil(), f)
    return str(tmp_path / "evil.bin")


def _drop_first_key(lines):
    return lines[1:]


def _negative_first_offset(lines):
    return [lines[0].split("\t")[0] + "\t-40"] + lines[1:]


# name: (make_path(data, model, tmp_path) -> the file the error line must name,
#        argv(data, model, tmp_path, path) -> the command line, what else the line must say)
ERROR_CASES = {
    "idx negative offset": (lambda d, m, t: _idx_with(d, t, _negative_first_offset)[:-len(".idx")],
                                 lambda d, m, t, p: ["data", "rec2folder", p, str(t / "out")], "byte offset -40"),
    "idx missing key": (lambda d, m, t: _idx_with(d, t, _drop_first_key),
                             lambda d, m, t, p: ["data", "rec2folder", p[:-len(".idx")], str(t / "out")],
                             "lists only"),
    "symlink loop image": (lambda d, m, t: _loop(t, "loop.png"),
                                lambda d, m, t, p: ["verify", "--weights", m, _png(t / "a.png"), p], "symbolic links"),
    "symlink loop config": (lambda d, m, t: _loop(t, "loop.yaml"),
                                 lambda d, m, t, p: ["train", "--framework", "torch", "--config", p], "symbolic links"),
    "symlink loop weights": (lambda d, m, t: _loop(t, "loop.onnx"),
                                  lambda d, m, t, p: ["eval", "--weights", p, "--bin", "x.bin"], "failed"),
    "verify given a directory": (lambda d, m, t: str(t),
                                      lambda d, m, t, p: ["verify", "--weights", m, _png(t / "a.png"), p],
                                      "Is a directory"),
    "0-byte onnx": (lambda d, m, t: _zero_onnx(t),
                         lambda d, m, t, p: ["embed", "--weights", p, "--images", _png(t / "a.png"), "--out",
                                             str(t / "e")], "No graph"),
    "refused pickle in a .bin": (lambda d, m, t: _evil_bin(t),
                                      lambda d, m, t, p: ["eval", "--weights", m, "--bin", p],
                                      "refusing to load global"),
    "onnx external data outside its folder": (
        lambda d, m, t: _onnx_with_external_data_outside(m, t),
        lambda d, m, t, p: ["eval", "--weights", p, "--bin", os.path.join(d, "val.bin")], "escapes model directory"),
    "output below a file": (lambda d, m, t: _png(t / "a.png"),
                                 lambda d, m, t, p: ["embed", "--weights", m, "--images", p, "--out",
                                                     os.path.join(p, "e.npy")], "exists"),
    "SavedModel directory to embed": (
        lambda d, m, t: _savedmodel(t),
        lambda d, m, t, p: ["embed", "--weights", p, "--images", _png(t / "a.png"), "--out", str(t / "e")],
        "a TensorFlow SavedModel, not a weights file; this command loads an .onnx file"),
    "bad --set value": (lambda d, m, t: str(ROOT / "configs" / "default.yaml"),
                             lambda d, m, t, p: ["train", "--framework", "torch", "--config", p,
                                                 "--set", "train.log_every=0"],
                             "config key 'train.log_every': expected an integer >= 1, got 0"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors_read_as_one_line_naming_the_file(case, data, pool_model, tmp_path):
    make_path, make_argv, says = ERROR_CASES[case]
    path = make_path(data, pool_model, tmp_path)
    argv = make_argv(data, pool_model, tmp_path, path)
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    line = str(err.value.code)
    assert line.startswith(f"twinface {argv[0]}: error: ") and "\n" not in line
    assert path in line and says in line, line


# What torch, safetensors and onnxruntime raise for a 0-byte or truncated .pth / state.pt, a refused pickle and a
# bad header (their messages name no file), raised here by the model loader to keep torch out of this room.
def _safetensor_error():
    from safetensors import SafetensorError
    return SafetensorError("Error while deserializing header: invalid header length")


def _onnxruntime_error():
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail
    return Fail("[ONNXRuntimeError] : 1 : FAIL : External data path escapes model directory")


@pytest.mark.parametrize("error,says", [
    (EOFError(), "the file ends early (empty or truncated)"),
    (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"),
     "failed finding central directory"),
    (pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` "
                            "will likely succeed\n\nTrying to load unsupported GLOBAL posix.system whose module "
                            "posix is blocked.\n\nCheck the documentation of torch.load"),
     "refused to unpickle it (only tensors and plain containers are loaded): Trying to load unsupported GLOBAL "
     "posix.system whose module posix is blocked."),
    (_safetensor_error(), "Error while deserializing header"),
    (_onnxruntime_error(), "External data path escapes"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    (KeyError("a key"), "a key"),
], ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else "")
def test_loader_errors_that_name_no_file_get_the_weights_path(error, says, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise error
    monkeypatch.setattr(embedders, "load_embedder", refuse)
    weights = str(tmp_path / "state.pt")
    with pytest.raises(SystemExit) as err:
        cli.main(["verify", "--weights", weights, "--arch", "r18", "a.png", "b.png"])
    line = err.value.code
    assert line.startswith(f"twinface verify: error: {weights}: ") and says in line and "\n" not in line, line


def test_a_read_only_output_directory_is_named(pool_model, tmp_path, monkeypatch):
    # Root ignores directory permissions, so the refusal the kernel gives a normal user is raised where numpy writes.
    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    monkeypatch.setattr(np, "save", read_only)
    out = str(tmp_path / "ro" / "e.npy")
    with pytest.raises(SystemExit) as err:
        cli.main(["embed", "--weights", pool_model, "--images", _png(tmp_path / "a.png"), "--out", out])
    assert err.value.code == f"twinface embed: error: {out}: Permission denied"


def test_bugs_keep_their_traceback_and_debug_shows_user_errors_in_full(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise TypeError("a bug")
    monkeypatch.setattr(embedders, "load_embedder", bug)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["verify", "--weights", "m.onnx", "a.png", "b.png"])
    loop = _loop(tmp_path, "loop.yaml")
    with pytest.raises(ValueError, match="symbolic links"):
        cli.main(["--debug", "train", "--framework", "torch", "--config", loop])
    monkeypatch.setenv("TWINFACE_DEBUG", "1")
    with pytest.raises(ValueError, match="symbolic links"):
        cli.main(["train", "--framework", "torch", "--config", loop])


def test_the_command_exits_with_one_line_and_no_traceback(pool_model, tmp_path):
    loop = _loop(tmp_path, "loop.png")
    run = subprocess.run([sys.executable, "-m", "twinface.cli", "verify", "--weights", pool_model, loop, loop],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == f"twinface verify: error: {loop}: Too many levels of symbolic links\n"


@pytest.mark.parametrize("argv,says", [
    (["embed", "--weights", "m.onnx", "--images", "d", "--out", "e", "--batch-size", "0"],
     "twinface embed: error: argument --batch-size: expected an integer >= 1, got '0'"),
    (["verify", "--weights", "m.onnx", "a.png", "b.png", "--threshold", "nan"],
     "twinface verify: error: argument --threshold: expected a finite number in [0.0, 4.0], got 'nan'"),
    (["eval", "--weights", "m.onnx", "--bin", "x.bin", "--input-size", "-1"],
     "twinface eval: error: argument --input-size: expected an integer >= 1, got '-1'"),
])
def test_bad_numeric_arguments_are_refused_before_anything_runs(argv, says, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == says


def test_embed_says_which_non_square_images_it_squashed(pool_model, tmp_path, capsys):
    faces = tmp_path / "faces"
    faces.mkdir()
    _png(faces / "a_square.png")
    for name in ("b_wide.png", "c_wide.png", "d_wide.png", "e_wide.png"):
        _png(faces / name, height=100, width=130)
    cli.main(["embed", "--weights", pool_model, "--images", str(faces), "--out", str(tmp_path / "e")])
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("twinface embed: warning: 4 of 5 images are not square and "
                                                       "were squashed to 112x112")
    assert f"{faces / 'b_wide.png'} (130x100)" in warning[0] and "e_wide.png" not in warning[0]   # 3 examples
    assert load_embeddings(str(tmp_path / "e.npy"))[0].shape == (5, 48)


def test_embed_takes_one_image_and_names_an_unreadable_list(pool_model, tmp_path):
    cli.main(["embed", "--weights", pool_model, "--images", _png(tmp_path / "a.png"), "--out", str(tmp_path / "e")])
    assert load_embeddings(str(tmp_path / "e.npy"))[0].shape == (1, 48)
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SystemExit, match="list.txt: neither an image .* nor a text file of paths"):
        cli.main(["embed", "--weights", pool_model, "--images", str(tmp_path / "list.txt"), "--out", "e"])


def test_our_own_messages_are_not_prefixed_with_another_file(tmp_path):
    src, dst = tmp_path / "src.pth", tmp_path / "dst.onnx"
    with zipfile.ZipFile(src, "w") as archive:             # what torch.save writes, as far as the sniffing reads
        archive.writestr("src/data.pkl", b"")
    dst.write_bytes(b"precious")
    with pytest.raises(SystemExit) as err:
        cli.main(["convert", str(src), str(dst)])
    assert err.value.code == f"twinface convert: error: {dst}: already exists; pass --force to replace it"
    assert dst.read_bytes() == b"precious"
