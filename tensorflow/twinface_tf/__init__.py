"""The TensorFlow twin. `twinface` is imported first: it switches TensorFlow's oneDNN CPU kernels on (unless the
user chose otherwise), which only works before TensorFlow's own import."""
import twinface  # noqa: F401
