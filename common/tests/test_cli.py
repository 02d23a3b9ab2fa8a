"""The `twinface` command end to end on tiny data, with a framework-free ONNX model (global average pooling)."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from twinface import cli
from twinface.data.images import encode_image
from twinface.eval.embeddings import load_embeddings
from twinface.testing import tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def pool_model(tmp_path_factory):
    """data [N, 3, 16, 16] -> 4x4 average pooling -> 48-d 'embedding': colour layout, enough to score pairs."""
    path = str(tmp_path_factory.mktemp("onnx") / "pool.onnx")
    nodes = [helper.make_node("AveragePool", ["data"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Flatten", ["p"], ["embedding"])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 48])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


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
