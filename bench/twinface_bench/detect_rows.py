"""One row of the detection section (detect.py): one detector runtime at one thread count, in a process of its own

    python -m twinface_bench.detect_rows '<spec json>'

so torch's, TensorFlow's and onnxruntime's thread pools never share a process. The row loads its nets, runs one
untimed pass over the photos (tracing, allocation) and reports the faces found; then it times one pass per "run"
line on stdin until stdin closes, so the parent can interleave the rows' passes. Replies are JSON lines on the
stdout the process started with; whatever the libraries print goes to stderr.
"""
import json
import os
import sys
import time

import cv2
import numpy as np

from twinface.data.images import read_image
from twinface.detect.cascade import detect_faces
from twinface.detect import DEFAULT_MIN_SCORE
from twinface.detect.nets import NetsByName

from .measure import peak_rss_mb

WIDTH, HEIGHT = 640, 480
NETS = ("pnet", "rnet", "onet")


def letterbox(image: np.ndarray) -> np.ndarray:
    """The photo scaled to fit 640x480 (aspect kept, INTER_AREA down / INTER_LINEAR up) and centred on black:
    every face of the photo stays in, and the pyramid is the same for every photo."""
    h, w = image.shape[:2]
    scale = min(WIDTH / w, HEIGHT / h)
    size = (min(WIDTH, round(w * scale)), min(HEIGHT, round(h * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    top, left = (HEIGHT - size[1]) // 2, (WIDTH - size[0]) // 2
    out[top:top + size[1], left:left + size[0]] = resized
    return out


class TimedNets(NetsByName):
    """The detector-nets interface around another one, adding each net's seconds and calls to `seconds` and
    `calls`: the stage breakdown, without touching the cascade."""

    def __init__(self, nets):
        self.nets, self.name = nets, nets.name
        self.reset()

    def reset(self):
        self.seconds, self.calls = dict.fromkeys(NETS, 0.0), dict.fromkeys(NETS, 0)

    def _run(self, net, x):
        t0 = time.perf_counter()
        out = getattr(self.nets, net)(x)
        self.seconds[net] += time.perf_counter() - t0
        self.calls[net] += 1
        return out


def load_nets(runtime: str, threads: int):
    """The runtime's detector nets with `threads` threads for its ops (and OpenCV's, which the cascade resizes
    with), set before the framework runs anything: TensorFlow fixes its pools at its first op."""
    cv2.setNumThreads(threads)
    if runtime == "torch":
        import torch
        torch.set_num_threads(threads)
    elif runtime == "tf":
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif runtime == "onnx":
        from twinface import fixtures
        from twinface.detect.onnx_nets import OnnxDetectorNets
        return OnnxDetectorNets(fixtures.mtcnn_onnx_dir(), threads=threads)
    from twinface.detect.faces import load_detector_nets
    return load_detector_nets(runtime)


def detect_pass(nets: TimedNets, photos: list) -> tuple:
    """One detection per photo: (per photo {"ms", "<net>_ms", "<net>_calls", "cascade_ms"}, faces per photo)."""
    times, faces = [], []
    for image in photos:
        nets.reset()
        t0 = time.perf_counter()
        found = detect_faces(image, nets)
        total = time.perf_counter() - t0
        stage = {f"{net}_ms": 1e3 * nets.seconds[net] for net in NETS}
        times.append({"ms": 1e3 * total, **stage, "cascade_ms": 1e3 * total - sum(stage.values()),
                      **{f"{net}_calls": nets.calls[net] for net in NETS}})
        faces.append({"found": len(found), "kept": int(np.sum(found.scores >= DEFAULT_MIN_SCORE))})
    return times, faces


def main(argv):
    spec = json.loads(argv[0])
    reply = os.fdopen(os.dup(1), "w")          # the protocol's stdout; fd 1 itself now goes to stderr
    os.dup2(2, 1)

    def send(message):
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    t0 = time.perf_counter()
    photos = [letterbox(read_image(path)) for path in spec["photos"]]
    nets = TimedNets(load_nets(spec["runtime"], spec["threads"]))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, faces = detect_pass(nets, photos)
    send({"load_s": load_s, "warmup_s": time.perf_counter() - t0, "faces": faces})
    for line in sys.stdin:
        if line.strip() != "run":
            raise ValueError(f"detect_rows: expected the line 'run' on stdin, got {line.strip()!r}")
        times, again = detect_pass(nets, photos)
        if again != faces:
            raise RuntimeError(f"{spec['runtime']}: faces per photo changed between passes: {faces} then {again}")
        send({"times": times})
    send({"peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main(sys.argv[1:])
