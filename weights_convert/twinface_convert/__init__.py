"""Backbone weights between PyTorch, TensorFlow and ONNX, each conversion verified: `twinface convert`
(cli.py), or convert.convert(src, dst) from Python."""
