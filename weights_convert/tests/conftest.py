"""Room-wide: memory handed back after each test (the ResNeXt, DenseNet and ViT tests build large graphs in this
one process)."""
import pytest

from twinface.testing import release_memory


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    release_memory()
