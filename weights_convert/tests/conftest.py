"""Room-wide settings: tf2onnx without its per-optimiser graph copies, and memory handed back after each test
(the ResNeXt, DenseNet and ViT tests build large graphs in this one process)."""
import os

import pytest

from twinface.testing import TF2ONNX_NO_COPIES, release_memory

for key, value in TF2ONNX_NO_COPIES.items():
    os.environ.setdefault(key, value)


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    release_memory()
