import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from twinface.onnx_meta import export_metadata, read_metadata  # noqa: E402
from twinface_tf import export  # noqa: E402
from twinface_tf.backbones import get_model  # noqa: E402
from twinface_tf.backbones.iresnet import iresnet  # noqa: E402

SIZE, FEATURES = 32, 8


def run_onnx(path, nchw):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"data": nchw})[0]


def assert_matches_keras(model, path, batch):
    nchw = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, SIZE, SIZE)).astype(np.float32)
    reference = model(nchw.transpose(0, 2, 3, 1), training=False).numpy()
    got = run_onnx(path, nchw)
    assert got.shape == (batch, FEATURES)
    np.testing.assert_allclose(got, reference, atol=1e-5 * max(1.0, np.abs(reference).max()))


@pytest.fixture(scope="module")
def exported_mbf(tmp_path_factory):
    """MobileFaceNet: grouped, depthwise and strided convolutions, the GDC; fresh BN stats made non-trivial."""
    model = get_model("mbf", num_features=FEATURES, input_size=SIZE)
    model(np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32), training=True)
    path = tmp_path_factory.mktemp("onnx") / "mbf.onnx"
    return model, path, export.export_onnx(model, str(path), "mbf", input_size=SIZE)


def test_export_verifies_itself_and_leaves_only_the_file(exported_mbf):
    _, path, max_abs_diff = exported_mbf
    assert isinstance(max_abs_diff, float) and 0 <= max_abs_diff < 1e-4
    assert os.listdir(path.parent) == ["mbf.onnx"]


def test_graph_interface_and_metadata(exported_mbf):
    _, path, _ = exported_mbf
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(i.name, dims(i)) for i in model.graph.input] == [("data", ["batch", 3, SIZE, SIZE])]
    assert [(o.name, dims(o)) for o in model.graph.output] == [("embedding", ["batch", FEATURES])]
    meta = read_metadata(str(path))
    assert {k: meta[k] for k in export_metadata("mbf", "tf", SIZE, FEATURES)} == \
        export_metadata("mbf", "tf", SIZE, FEATURES)


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_keras_inference_at_any_batch(exported_mbf, batch):
    model, path, _ = exported_mbf
    assert_matches_keras(model, path, batch)


def test_iresnet_export_without_verification(tmp_path):
    """IResNet adds the NCHW flatten before fc; verify=False returns NaN, the file is checked here instead."""
    model = iresnet((1, 1, 1, 1), num_features=FEATURES, input_size=SIZE, name="tiny")
    path = tmp_path / "tiny.onnx"
    assert math.isnan(export.export_onnx(model, str(path), "tiny", input_size=SIZE, verify=False))
    for batch in (1, 3):
        assert_matches_keras(model, path, batch)


def test_verification_rejects_a_file_that_is_not_the_model(exported_mbf):
    _, path, _ = exported_mbf
    other = get_model("mbf", num_features=FEATURES, input_size=SIZE)
    with pytest.raises(RuntimeError, match="onnxruntime differs from tf by"):
        export.verify_onnx(str(path), other, SIZE, str(path))


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    def reject(*args):
        raise RuntimeError("rejected")

    monkeypatch.setattr(export, "verify_onnx", reject)
    inputs = keras.Input((SIZE, SIZE, 3))                   # any NHWC model will do, a small one converts fast
    model = keras.Model(inputs, keras.layers.Dense(FEATURES)(keras.layers.GlobalAveragePooling2D()(inputs)))
    with pytest.raises(RuntimeError, match="rejected"):
        export.export_onnx(model, str(tmp_path / "tiny.onnx"), "tiny", input_size=SIZE)
    assert os.listdir(tmp_path) == []


def test_conversion_skips_tf2onnx_graph_copies_and_falls_back_to_them(tmp_path, monkeypatch):
    """Conversion runs with tf2onnx's per-optimiser copies off (TF2ONNX_CATCH_ERRORS present), once; only if that
    raises, again in tf2onnx's default copying mode; the caller's environment is kept either way."""
    real, seen, failures = export.tf2onnx.convert.from_function, [], [ValueError("an optimiser failed")]

    def recorded(*args, **kwargs):
        seen.append(os.environ.get("TF2ONNX_CATCH_ERRORS"))
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setenv("TF2ONNX_CATCH_ERRORS", "mine")
    monkeypatch.setattr(export.tf2onnx.convert, "from_function", recorded)
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, keras.layers.Dense(FEATURES)(keras.layers.GlobalAveragePooling2D()(inputs)))
    assert export.export_onnx(model, str(tmp_path / "retried.onnx"), "tiny", input_size=SIZE) < 1e-5
    assert seen == ["FALSE", None] and os.environ["TF2ONNX_CATCH_ERRORS"] == "mine"
    export.export_onnx(model, str(tmp_path / "once.onnx"), "tiny", input_size=SIZE)
    assert seen[2:] == ["FALSE"]
