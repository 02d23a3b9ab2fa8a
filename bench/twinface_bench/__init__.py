"""`twinface bench`: both twins and onnxruntime measured side by side, in one run, on the same machine.

Every row runs in its own child process (peak RSS per row), on the same models, weights and images; the
machine's reference peak (a large fp32 matrix product) is measured in the same run, so each row also reads as
a fraction of what the machine can do. Results: bench/results/bench.{md,json,png}.
"""

import twinface  # noqa: F401,E402  (its CPU-kernel choice must precede any TensorFlow import)
