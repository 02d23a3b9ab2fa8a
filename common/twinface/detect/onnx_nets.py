"""The detector-nets interface (twinface.detect.nets) over onnxruntime, framework-neutral: the three graphs
twinface_torch.mtcnn.export_onnx writes (NHWC in, the interface's outputs), which `make setup` exports to
twinface.fixtures.mtcnn_onnx_dir()."""
import os

import numpy as np

from twinface.fixtures import MTCNN_NETS as NETS

from .nets import NetsByName


class OnnxDetectorNets(NetsByName):
    name = "onnx"

    def __init__(self, onnx_dir: str, threads: int = 0):
        """`threads`: onnxruntime's intra-op threads (0: its default, one per core)."""
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # The cascade makes many small calls with numpy work between them: threads spinning in that gap take the
        # cores from it (640x480 photo, 2 loaded cores: 299 ms per photo spinning, 153 ms without).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for name in NETS:
            path = os.path.join(onnx_dir, f"{name}.onnx")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: MTCNN {name} graph missing; write the three with "
                                        f"twinface_torch.mtcnn.export_onnx (make setup puts them in "
                                        f"twinface.fixtures.mtcnn_onnx_dir())")
            self.sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def _run(self, name, x):
        session = self.sessions[name]
        return tuple(session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)}))
