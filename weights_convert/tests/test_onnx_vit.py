"""ViT graphs (onnx_vit): both twins' exports and arcface_torch's torch2onnx.py style, read back by structure."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from twinface_convert.convert import convert
from twinface_convert.onnx_import import read_onnx
from twinface_torch.backbones import get_model
from twinface_torch.calibrate import trained_like
from twinface_torch.export import export_onnx

SIZE = 32          # a 3x3 patch grid


@pytest.fixture(scope="module")
def vit():
    model = trained_like("vit_t", input_size=SIZE, num_features=16)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():                   # fresh Linear biases are zeros, which exporters may drop: make them show
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.05, generator=generator)
    return model


def expected_state(model):
    return {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def embeddings(model, x):
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(x)).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_own_export_reads_back_every_tensor_bit_for_bit(vit, tmp_path):
    path = str(tmp_path / "own.onnx")
    export_onnx(vit, path, "vit_t", input_size=SIZE, verify=False)
    assert "LayerNormalization" in {n.op_type for n in onnx.load(path).graph.node}
    imported = read_onnx(path)
    assert str(imported.backbone) == "vit_t (num_features 16, input_size 32)" and imported.folded == []
    expected = expected_state(vit)
    assert set(imported.state) == set(expected)
    for name, value in expected.items():                # mask_token included: the export keeps it
        assert np.array_equal(imported.state[name], value), name


def test_opset11_export_with_decomposed_layer_norm(vit, tmp_path):
    # arcface_torch's torch2onnx.py: opset 11, constant folding; LayerNorm becomes ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add
    path, dst = str(tmp_path / "torch2onnx.onnx"), str(tmp_path / "back.pth")
    torch.onnx.export(vit.eval(), torch.rand(1, 3, SIZE, SIZE), path, input_names=["data"], dynamo=False,
                      opset_version=11)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "LayerNormalization" not in ops and {"ReduceMean", "Pow", "Sqrt"} <= ops
    with pytest.warns(UserWarning, match="no 'mask_token' initializer"):
        report = convert(path, dst, log=lambda line: None)
    assert report.max_abs_diff <= 1e-5 and report.backbone.arch == "vit_t"
    state, expected = torch.load(dst, weights_only=True), expected_state(vit)
    assert torch.equal(state["mask_token"], torch.zeros(1, 1, 256))
    for name, value in expected.items():
        if name != "mask_token":
            assert np.array_equal(state[name].numpy(), value), name


def test_tf2onnx_export_of_the_tf_twin(vit, tmp_path):
    from twinface_convert.mapping import torch_to_keras
    from twinface_tf.backbones import get_model as keras_model
    from twinface_tf.export import export_onnx as tf2onnx_export
    keras = keras_model("vit_t", input_size=SIZE, num_features=16)
    torch_to_keras(vit.state_dict(), keras)
    path = str(tmp_path / "tf2onnx.onnx")
    tf2onnx_export(keras, path, "vit_t", input_size=SIZE, verify=False)
    assert not {"BatchNormalization", "LayerNormalization"} & {n.op_type for n in onnx.load(path).graph.node}
    imported = read_onnx(path)
    assert imported.folded == ["feature.1", "feature.3"]       # tf2onnx dissolves them into Mul / Add
    expected = expected_state(vit)
    for name, value in expected.items():
        if not name.startswith(("feature.1", "feature.3")):
            assert np.array_equal(imported.state[name], value), name
    converted = get_model("vit_t", input_size=SIZE, num_features=16)
    converted.load_state_dict({k: torch.from_numpy(v) for k, v in imported.state.items()}, strict=False)
    x = np.random.default_rng(3).uniform(-1, 1, (3, 3, SIZE, SIZE)).astype(np.float32)
    assert np.abs(embeddings(converted, x) - embeddings(vit, x)).max() <= 1e-5


def test_wrong_arch_is_refused(vit, tmp_path):
    path = str(tmp_path / "own.onnx")
    export_onnx(vit, path, "vit_t", input_size=SIZE, verify=False)
    with pytest.raises(ValueError, match=r"tensor 'blocks\.0\.attn\.qkv\.weight' \(shape \(1536, 512\)\) of vit_b "
                                         r".* not the graph's next MatMul weight \(\(768, 256\)\)"):
        read_onnx(path, arch="vit_b")


def test_convert_round_trip_through_both_twins_is_bit_identical(vit, tmp_path):
    # torch -> Keras .weights.h5 -> torch, each hop through the ONNX hub: every tensor back bit for bit,
    # mask_token included (the hub export keeps it as an initializer).
    src, d = str(tmp_path / "backbone.pth"), str(tmp_path)
    torch.save(vit.state_dict(), src)
    convert(src, f"{d}/vit.weights.h5", log=lambda line: None)
    report = convert(f"{d}/vit.weights.h5", f"{d}/back.pth", log=lambda line: None)
    assert str(report.backbone) == "vit_t (num_features 16, input_size 32)" and report.max_abs_diff <= 1e-5
    back = torch.load(f"{d}/back.pth", weights_only=True)
    for name, tensor in vit.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(back[name], tensor), name
