"""pytest's importlib mode names test modules after their folders (`tensorflow.tests.test_x`) and would register
our `tensorflow/` folder as a namespace package called `tensorflow`, hiding the real TensorFlow. Importing the
real one first, as soon as anything under `tensorflow/` is collected, keeps the name taken by the right module.
Runs that collect only other rooms never pay for the TensorFlow import.
"""
import pathlib

TF_ROOM = pathlib.Path(__file__).parent / "tensorflow"


def pytest_collect_file(file_path, parent):
    if TF_ROOM in file_path.parents:
        import twinface  # noqa: F401  (its CPU-kernel choice must precede TensorFlow's import)
        import tensorflow  # noqa: F401
