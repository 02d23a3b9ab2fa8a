"""Reading ONNX graphs by their structure: our exports, arcface_torch's torch2onnx.py, tf2onnx, lying names."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from twinface_convert.convert import convert
from twinface_convert.onnx_import import IDENTITY_VAR, read_onnx
from twinface_torch.backbones import get_model
from twinface_torch.calibrate import trained_like
from twinface_torch.export import export_onnx

SIZE = 32


def torch2onnx_like_arcface(model, path, input_name="data"):
    """As arcface_torch's torch2onnx.py: legacy exporter, default constant folding (BN folded into convs),
    opset 11, one named input, batch made dynamic afterwards by naming dim 0."""
    torch.onnx.export(model, torch.rand(1, 3, SIZE, SIZE), path, input_names=[input_name], dynamo=False,
                      keep_initializers_as_inputs=False, opset_version=11)
    proto = onnx.load(path)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "None"
    onnx.save(proto, path)


def with_flatten_shape_computed_at_run_time(path, out):
    """Rewrite each Reshape's constant target shape as Concat(Slice(Shape(x), 0, 1), [-1]): what tf2onnx leaves
    of Keras' Flatten (reshape to (tf.shape(x)[0], -1)) on machines where it cannot fold the batch size away."""
    proto = onnx.load(path)
    graph = proto.graph
    consts = {t.name for t in graph.initializer}
    reshapes = [n for n in graph.node if n.op_type == "Reshape" and n.input[1] in consts]
    for k, name in enumerate(["zero", "one", "minus_one"]):
        graph.initializer.append(numpy_helper.from_array(np.array([k - (k == 2) * 3], np.int64), f"rt_{name}"))
    for j, node in enumerate(reshapes):
        plumbing = [helper.make_node("Shape", [node.input[0]], [f"rt_shape{j}"], name=f"rt_shape{j}"),
                    helper.make_node("Slice", [f"rt_shape{j}", "rt_zero", "rt_one"], [f"rt_batch{j}"],
                                     name=f"rt_slice{j}"),
                    helper.make_node("Concat", [f"rt_batch{j}", "rt_minus_one"], [f"rt_target{j}"], axis=0,
                                     name=f"rt_concat{j}")]
        node.input[1] = f"rt_target{j}"
        at = list(graph.node).index(node)
        for offset, new in enumerate(plumbing):
            graph.node.insert(at + offset, new)
    onnx.save(proto, out)
    return len(reshapes)


def l2(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def torch_embeddings(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def loaded(state, arch):
    model = get_model(arch, input_size=SIZE)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    return model.eval()


@pytest.fixture(scope="module", params=["r18", "mbf", "resnext50", "densenet121"])
def source(request):
    return request.param, trained_like(request.param, input_size=SIZE)


@pytest.fixture(scope="module")
def r18_export(tmp_path_factory):
    model = trained_like("r18", input_size=SIZE)
    path = str(tmp_path_factory.mktemp("r18") / "r18.onnx")
    export_onnx(model, path, "r18", input_size=SIZE, verify=False)
    return model, path


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(3).uniform(-1, 1, (3, 3, SIZE, SIZE)).astype(np.float32)


def test_own_export_reads_back_every_tensor_bit_for_bit(source, tmp_path):
    arch, model = source
    path = str(tmp_path / "own.onnx")
    export_onnx(model, path, arch, input_size=SIZE, verify=False)
    imported = read_onnx(path)
    expected = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert imported.backbone.arch == arch and imported.folded == []
    assert set(imported.state) == set(expected)
    for name, value in expected.items():
        assert imported.state[name].dtype == np.float32 and np.array_equal(imported.state[name], value), name


def test_equal_shaped_convolutions_are_told_apart_by_stride(source, tmp_path):
    """ResNeXt's conv3 and its stage's stride-2 downsample have the same weight shape; an exporter may write the
    downsample branch first, which must not swap the two."""
    arch, model = source
    path = str(tmp_path / "own.onnx")
    export_onnx(model, path, arch, input_size=SIZE, verify=False)
    proto = onnx.load(path)
    nodes = proto.graph.node
    for name in [n.name for n in nodes if n.op_type == "Conv" and n.input[1].endswith("downsample.0.weight")]:
        node = next(n for n in nodes if n.name == name)
        moved = type(node)()
        moved.CopyFrom(node)
        nodes.remove(node)
        producer = next(i for i, n in enumerate(nodes) if moved.input[0] in n.output)
        nodes.insert(producer + 1, moved)                   # straight after its input: still topological
    onnx.save(proto, path)
    imported = read_onnx(path)
    for name, value in model.state_dict().items():
        assert name.endswith("num_batches_tracked") or np.array_equal(imported.state[name], value.numpy()), name


def test_arcface_torch2onnx_export_imports_with_folded_batchnorms_as_identity_statistics(source, batch, tmp_path):
    arch, model = source
    path, dst = str(tmp_path / "torch2onnx.onnx"), str(tmp_path / "back.pth")
    torch2onnx_like_arcface(model, path)
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # folded ... (DenseNet-121: norm0 and the 58 norm2 follow a conv; its other 63 read a concatenation or pool)
    folds = norms - sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    assert folds == 59 if arch == "densenet121" else folds > norms / 2
    report = convert(path, dst, log=lambda line: None)
    assert report.max_abs_diff <= 1e-5 and report.backbone.arch == arch and report.folded
    state = {k: v for k, v in torch.load(dst, weights_only=True).items()}
    for bn in report.folded:                                          # ... whose statistics are gone
        assert torch.all(state[f"{bn}.running_mean"] == 0) and torch.all(state[f"{bn}.running_var"] == IDENTITY_VAR)
    kept = [n[:-len(".running_var")] for n in state if n.endswith(".running_var") and n[:-12] not in report.folded]
    if arch == "r18":                         # pre-activation BNs (block bn1, bn2, features) cannot fold: exact
        assert "layer1.0.bn1" in kept and "bn2" in kept and "features" in kept
    if arch == "densenet121":
        assert {"denseblock1.denselayer1.norm1", "transition3.norm", "bn2"} <= set(kept)
    for bn in kept:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(state[f"{bn}.{suffix}"], model.state_dict()[f"{bn}.{suffix}"]), f"{bn}.{suffix}"
    converted = get_model(arch, input_size=SIZE).eval()
    converted.load_state_dict(state)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert np.abs(l2(torch_embeddings(converted, batch)) - l2(session.run(None, {"data": batch})[0])).max() <= 1e-5
    assert np.abs(l2(torch_embeddings(converted, batch)) - l2(torch_embeddings(model, batch))).max() <= 1e-5


def test_tf2onnx_export_of_the_tf_twin_imports_through_dissolved_batchnorm_and_prelu(source, batch, tmp_path):
    from twinface_convert.mapping import torch_to_keras
    from twinface_tf.backbones import get_model as keras_model
    from twinface_tf.export import export_onnx as tf2onnx_export
    arch, model = source
    keras = keras_model(arch, input_size=SIZE)
    torch_to_keras(model.state_dict(), keras)
    path = str(tmp_path / "tf2onnx.onnx")
    tf2onnx_export(keras, path, arch, input_size=SIZE, verify=False)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & {"BatchNormalization", "PRelu"}                 # what makes name-based import impossible
    imported = read_onnx(path)
    assert imported.backbone.arch == arch
    assert len(imported.folded) == sum(n.endswith("running_var") for n in model.state_dict())
    keras_out = keras(batch.transpose(0, 2, 3, 1), training=False).numpy()
    converted = torch_embeddings(loaded(imported.state, arch), batch)
    assert np.abs(l2(converted) - l2(keras_out)).max() <= 1e-5
    slopes = [n for n in imported.state if n.endswith(("prelu.weight", "relu1.weight", "relu2.weight", "relu.weight"))
              or n.endswith("layers.2.weight") and imported.state[n].ndim == 1]
    for name in slopes:                                               # PReLU slopes recovered exactly
        assert np.array_equal(imported.state[name], model.state_dict()[name].numpy()), name
    # The flatten's shape as some machines' tf2onnx leaves it (Shape -> Slice -> Concat): shape plumbing, no layer
    runtime = str(tmp_path / "tf2onnx_runtime_shape.onnx")
    assert with_flatten_shape_computed_at_run_time(path, runtime) == 1
    session = ort.InferenceSession(runtime, providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"data": batch})[0] - keras_out).max() <= 1e-4
    again = read_onnx(runtime)
    assert again.state.keys() == imported.state.keys()
    assert all(np.array_equal(again.state[k], imported.state[k]) for k in imported.state)


def test_names_are_not_trusted(r18_export, tmp_path):
    # Swap the names of two same-shaped conv weights: a name-based loader would swap the values silently.
    model, exported = r18_export
    path = str(tmp_path / "lying.onnx")
    proto = onnx.load(exported)
    a, b = "layer1.1.conv1.weight", "layer1.1.conv2.weight"
    for tensor in proto.graph.initializer:
        tensor.name = {a: b, b: a}.get(tensor.name, tensor.name)
    for node in proto.graph.node:
        node.input[:] = [{a: b, b: a}.get(i, i) for i in node.input]
    onnx.save(proto, path)
    state = read_onnx(path).state
    assert np.array_equal(state[a], model.state_dict()[a].numpy())
    assert np.array_equal(state[b], model.state_dict()[b].numpy())


def test_wrong_arch_names_the_first_tensor_that_does_not_fit(r18_export):
    _, path = r18_export
    with pytest.raises(ValueError, match=r"tensor 'layer1\.2\.conv1\.weight' of r34 .* \(shape \(64, 64, 3, 3\)\) "
                                         r"has no conv of that shape in the graph; the next unmatched one, Conv .* "
                                         r"has weight shape \(128, 64, 3, 3\)"):
        read_onnx(path, arch="r34")


def test_normalisation_inside_the_graph_is_refused(r18_export, tmp_path):
    # MXNet-era models subtract and scale inside the graph: that has no place in our backbones.
    path = str(tmp_path / "mxnet_like.onnx")
    proto = onnx.load(r18_export[1])
    graph = proto.graph
    graph.initializer.append(numpy_helper.from_array(np.full((1, 3, 1, 1), 127.5, np.float32), "mean"))
    first = next(n for n in graph.node if n.op_type == "Conv")
    first.input[0] = "centred"
    graph.node.insert(0, helper.make_node("Sub", ["data", "mean"], ["centred"]))
    onnx.save(proto, path)
    with pytest.raises(ValueError, match=r"per-channel ops \['Sub'\] before Conv .* \('conv1'\) have no BatchNorm "
                                         r".*normalisation inside the graph"):
        read_onnx(path)


def test_a_node_that_belongs_to_no_layer_is_refused(r18_export, tmp_path):
    # A scale on a block output feeds both the next block and the skip connection: no BatchNorm slot can hold it.
    path = str(tmp_path / "extra_op.onnx")
    proto = onnx.load(r18_export[1])
    graph = proto.graph
    add = next(n for n in graph.node if n.op_type == "Add")
    for node in graph.node:
        node.input[:] = ["scaled" if i == add.output[0] else i for i in node.input]
    graph.initializer.append(numpy_helper.from_array(np.full((1, 64, 1, 1), 1.5, np.float32), "scale"))
    graph.node.insert(list(graph.node).index(add) + 1, helper.make_node("Mul", [add.output[0], "scale"], ["scaled"]))
    onnx.save(proto, path)
    with pytest.raises(ValueError, match=r"Mul .* belongs to no layer of r18"):
        read_onnx(path)
