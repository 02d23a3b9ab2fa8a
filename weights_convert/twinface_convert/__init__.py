"""Backbone weights between PyTorch, TensorFlow and ONNX, each conversion verified: `twinface convert`
(cli.py), or convert.convert(src, dst) from Python."""

import twinface  # noqa: F401,E402  (its CPU-kernel choice must precede any TensorFlow import)
