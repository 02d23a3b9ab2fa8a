"""The Keras MTCNN twin: names that map to torch's, strict loading, ceil-mode pooling, shapes, one trace per net."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from twinface.fixtures import mtcnn_state_dicts  # noqa: E402
from twinface.testing import PNET_SIZES, check_mtcnn_shapes, check_mtcnn_strict_loading  # noqa: E402
from twinface_convert.mapping import keras_to_torch  # noqa: E402
from twinface_tf import mtcnn  # noqa: E402


@pytest.fixture(scope="module")
def nets():
    return mtcnn.TFDetectorNets()


def test_keras_names_map_to_every_torch_tensor(nets):
    state = mtcnn_state_dicts()
    for name, model in nets.nets.items():
        ours = keras_to_torch(model)
        assert set(ours) == set(state[name]), name
        assert all(np.array_equal(ours[k], state[name][k]) for k in ours), name


def test_outputs_have_the_interface_shapes(nets):
    check_mtcnn_shapes(nets)


def test_bad_weights_are_named():
    check_mtcnn_strict_loading(mtcnn.load_nets)


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2)])
def test_ceil_max_pool_keeps_the_partial_last_window(kernel, stride):
    # all values negative, so zero padding (or dropping the partial window) would show
    x = -np.random.default_rng(0).uniform(1, 2, (1, 8, 9, 2)).astype(np.float32)
    out = mtcnn.CeilMaxPool2D(kernel, stride)(x).numpy()
    size = [-(-(n - kernel) // stride) + 1 for n in x.shape[1:3]]
    expected = np.array([[x[0, r * stride:r * stride + kernel, c * stride:c * stride + kernel].max((0, 1))
                          for c in range(size[1])] for r in range(size[0])])   # numpy slices stop at the edge
    assert out.shape == (1, *size, 2) and np.array_equal(out[0], expected)


def test_pnet_traces_once_for_a_pyramid(nets):
    for h, w in PNET_SIZES:
        nets.pnet(np.zeros((1, h, w, 3), np.float32))
    assert nets._calls["pnet"].experimental_get_tracing_count() == 1
