"""The torch MTCNN twin: its weights are facenet-pytorch's, strict loading, the interface's shapes, ONNX export."""
import os

import numpy as np
import pytest
import torch

from twinface import fixtures
from twinface.detect.onnx_nets import OnnxDetectorNets
from twinface.detect.nets import normalise
from twinface.testing import check_mtcnn_shapes, check_mtcnn_strict_loading, face_crop
from twinface_torch import mtcnn


@pytest.fixture(scope="module")
def nets():
    return mtcnn.TorchDetectorNets()


def test_fixture_arrays_are_the_pinned_state_dicts():
    arrays = fixtures.mtcnn_state_dicts()
    for net in fixtures.MTCNN_NETS:
        state = torch.load(fixtures.fixture_path(f"mtcnn/{net}.pt"), map_location="cpu", weights_only=True)
        assert list(arrays[net]) == list(state), net
        for name, tensor in state.items():
            assert np.array_equal(arrays[net][name], tensor.numpy()), f"{net} {name}"


def test_state_dicts_load_strict_into_the_modules():
    for name, net in mtcnn.load_nets().items():
        assert set(net.state_dict()) == set(fixtures.mtcnn_state_dicts()[name]) and not net.training


def test_outputs_have_the_interface_shapes(nets):
    check_mtcnn_shapes(nets)


def test_bad_weights_are_named():
    check_mtcnn_strict_loading(mtcnn.load_nets)


def test_a_real_face_is_a_face_with_its_landmarks_in_place(nets):
    # A (N, H, W, C) flatten instead of Caffe's (N, W, H, C) still loads, but RNet then gives this face 0.93 and
    # ONet puts the eyes 0.04 apart vertically.
    (rnet_prob,), _ = nets.rnet(normalise(face_crop(24)))
    (onet_prob,), _, (landmarks,) = nets.onet(normalise(face_crop(48)))
    x, y = landmarks[:5], landmarks[5:]
    assert rnet_prob > 0.99 and onet_prob > 0.99, (rnet_prob, onet_prob)
    assert x[0] < x[2] < x[1] and x[3] < x[2] < x[4], x           # left eye, nose, right eye; mouth corners
    assert max(y[:2]) < y[2] < min(y[3:]) and abs(y[0] - y[1]) < 0.02, y   # eyes level, above nose, above mouth
    assert ((0 < landmarks) & (landmarks < 1)).all()


def test_pooling_rounds_up():
    x = torch.arange(25.0).reshape(1, 1, 5, 5) * -1          # every value negative: the max of the last, partial
    pool = mtcnn.PNet().pool1                                  # window is its only real element, -24
    assert pool(x)[0, 0, -1, -1].item() == -24.0


def test_export_writes_three_graphs_that_match_torch(tmp_path, nets):
    diffs = mtcnn.export_onnx(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["onet.onnx", "pnet.onnx", "rnet.onnx"]
    assert all(d <= mtcnn.ONNX_TOLERANCE for d in diffs.values()), diffs
    onnx = OnnxDetectorNets(str(tmp_path))
    images = np.random.default_rng(1).uniform(-1, 1, (1, 29, 41, 3)).astype(np.float32)   # a size not checked at export
    for ours, theirs in zip(onnx.pnet(images), nets.pnet(images)):
        assert np.abs(ours - theirs).max() <= mtcnn.ONNX_TOLERANCE


def test_export_leaves_no_file_past_tolerance(tmp_path, monkeypatch):
    monkeypatch.setattr(mtcnn, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(RuntimeError, match=r"pnet\.onnx: onnxruntime differs from torch by .* file was not written"):
        mtcnn.export_onnx(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_missing_graphs_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"pnet\.onnx: MTCNN pnet graph missing"):
        OnnxDetectorNets(str(tmp_path))
    monkeypatch.setenv("TWINFACE_FIXTURES", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"onnx/pnet\.onnx: MTCNN ONNX graph missing"):
        fixtures.mtcnn_onnx_dir()
