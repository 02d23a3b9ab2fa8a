"""twinface: the framework-neutral core both twins share (never imports torch or TensorFlow).

Importing it fixes one process-wide choice before TensorFlow can be imported through twinface: TensorFlow's
oneDNN CPU kernels are switched on unless the user set TF_ENABLE_ONEDNN_OPTS. TensorFlow turns them on by
itself only on CPUs with AVX-512 VNNI/BF16 or AMX; elsewhere its Eigen kernels are 1.5-2.5x slower and have
no gradient for grouped convolutions (the TF twin then falls back, see twinface_tf.layers.grouped_conv2d).
TensorFlow reads the variable once, at its import; docs/design.md, "CPU kernels", has the whole story.
"""
import os as _os

_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
