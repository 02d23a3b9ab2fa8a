import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from twinface.onnx_meta import read_metadata
from twinface_torch.backbones import get_model
from twinface_torch.calibrate import trained_like
from twinface_torch.export import export_onnx, verify_onnx

SIZE = 32


@pytest.fixture(scope="module", params=["r18", "mbf", "densenet121"])
def exported(request, tmp_path_factory):
    """One fresh and one trained-like export per architecture, shared by the tests below."""
    name = request.param
    fresh, trained = get_model(name, input_size=SIZE), trained_like(name, input_size=SIZE)
    directory = tmp_path_factory.mktemp(name)
    paths = {"fresh": str(directory / "fresh.onnx"), "trained": str(directory / "trained.onnx")}
    diffs = {kind: export_onnx(model, paths[kind], name, input_size=SIZE)
             for kind, model in (("fresh", fresh), ("trained", trained))}
    return name, {"fresh": fresh, "trained": trained}, paths, diffs


@pytest.mark.parametrize("kind", ["fresh", "trained"])
def test_initializers_keep_state_dict_names_and_values(exported, kind):
    # A fresh model has many equal tensors (BN ones/zeros) that the legacy exporter merges by default.
    _, models, paths, _ = exported
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(paths[kind]).graph.initializer}
    state = {k: v for k, v in models[kind].state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(state) <= set(initializers)
    for key, value in state.items():
        assert initializers[key].dtype == np.float32, key
        assert np.array_equal(initializers[key], value.numpy()), key


def test_batchnorm_is_not_folded_and_io_is_named(exported):
    name, models, paths, _ = exported
    graph = onnx.load(paths["fresh"]).graph
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models["fresh"].modules())
    assert sum(node.op_type == "BatchNormalization" for node in graph.node) == norms
    assert [i.name for i in graph.input] == ["data"] and [o.name for o in graph.output] == ["embedding"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert onnx.load(paths["fresh"]).opset_import[0].version == 17
    meta = read_metadata(paths["fresh"])
    assert meta["twinface.arch"] == name and meta["twinface.framework"] == "torch"
    assert meta["twinface.num_features"] == "512" and meta["preprocess.input_size"] == f"{SIZE}x{SIZE}"


def test_onnxruntime_matches_torch_at_batch_1_and_5(exported):
    _, models, paths, diffs = exported
    assert 0 <= diffs["trained"] < 1e-4
    session = ort.InferenceSession(paths["trained"], providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.rand(batch, 3, SIZE, SIZE) * 2 - 1
        with torch.no_grad():
            reference = models["trained"](x).numpy()
        output = session.run(["embedding"], {"data": x.numpy()})[0]
        assert output.shape == (batch, 512)
        assert 0.1 < np.abs(reference).max() < 100                 # a meaningful scale, not all zeros
        np.testing.assert_allclose(output, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_export_restores_training_mode_and_fp16(tmp_path):
    model = get_model("mbf", fp16=True, input_size=SIZE).train()
    export_onnx(model, str(tmp_path / "mbf.onnx"), "mbf", input_size=SIZE)
    assert model.training and model.precision == "fp16"
    graph = onnx.load(str(tmp_path / "mbf.onnx")).graph
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer)
    assert not any(node.op_type == "Cast" for node in graph.node)     # an fp32 graph


class TraceDiffers(nn.Module):
    """Its traced graph bakes in a Python counter, so onnxruntime disagrees with the eager call."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.flatten(1)[:, :4] * self.scale + self.calls


def test_failed_verification_raises_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(RuntimeError, match="onnxruntime differs from torch by 1"):
        export_onnx(TraceDiffers(), str(path), "bad", input_size=SIZE)
    assert list(tmp_path.iterdir()) == []
    assert np.isnan(export_onnx(TraceDiffers(), str(path), "bad", input_size=SIZE, verify=False))
    assert list(tmp_path.iterdir()) == [path]


class Scaled(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x):
        return x.flatten(1)[:, :8] * self.factor


@pytest.mark.parametrize("factor", [0.5, 1000.0])
def test_verify_tolerance_is_relative_to_the_output_scale(tmp_path, factor):
    path = str(tmp_path / "scaled.onnx")
    export_onnx(Scaled(factor), path, "scaled", input_size=SIZE)
    x = (torch.rand(3, 3, SIZE, SIZE) * 2 - 1).numpy()
    output = ort.InferenceSession(path).run(["embedding"], {"data": x})[0].astype(np.float64)
    tolerance = 1e-4 * max(1.0, np.abs(output).max())       # 1e-4 absolute below scale 1, relative above
    assert verify_onnx(path, x, output, path) == 0.0
    near, far = output.copy(), output.copy()
    near[1, 2] += 0.5 * tolerance
    far[1, 2] += 2.0 * tolerance
    assert verify_onnx(path, x, near, path) == pytest.approx(0.5 * tolerance, rel=1e-3)
    with pytest.raises(RuntimeError, match="more than the tolerance"):
        verify_onnx(path, x, far, path)
