"""One backbone through both twins under whatever CPU kernels this process was started with; prints the parity
rows as JSON:

    TF_ENABLE_ONEDNN_OPTS=0 python parity_tests/cpu_kernel_rows.py ARCH step|model

test_cpu_kernels.py runs it once per backbone, part and kernel setting (TensorFlow's Eigen kernels, its oneDNN
kernels, oneDNN and ATen capped at AVX2), each in a fresh process: TensorFlow reads the switch once, at import.

- step rows: TFTwin.train_step and TorchTwin.train_step, the real adapters (ArcFace, plain SGD, so the update
  is -lr * gradient), on the same batch. The loss keeps the design's 1e-5. Each twin's update is held against a
  float64 run of the same step, relative to the gradient scale, at STEP_TOL = 2e-2: a fresh network's
  training-mode gradient is not a smooth function of rounding. A forward value within an ulp of a PReLU's
  kink lands on either side depending on the kernels' summation order and switches that unit's slope, and
  batch-statistics BatchNorm turns each conv's weight gradient into a difference of near-equal terms. Measured
  here over all backbones and settings: torch 4e-6..7e-3, TF 3e-6..7e-3, either twin the worse one depending
  on the backbone. A wrong gradient formula is off by O(1).
- gradient row: the kink-free check at the design's 1e-4 per tensor. A data-like backbone (calibrated BatchNorm,
  eval mode) with every PReLU slope set to 1, so no forward rounding can switch a branch, and
  d(embeddings . R)/d(parameters) per tensor, TF vs torch (measured: 1e-6..8e-6). It proves every backward
  kernel, the grouped convolution's Eigen fallback included, and the PReLU slopes' own gradients.
- inference rows: both twins' default embedding paths (what `twinface embed` runs: frozen TorchScript in
  oneDNN's layout for IResNets, Keras' traced function) against torch's eager module, on the data-like
  backbone, L2-normalised, the design's 1e-5.
- export rows (backbones with grouped convolutions): the Keras twin's ONNX export still holds one grouped Conv
  per grouped convolution, and onnxruntime reproduces it.
"""
import copy
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

BATCH, SIZE, CLASSES, LR = 8, 32, 20, 0.1
# DenseNet-121 at 32x32 ends on 2x2 maps, where training-mode BatchNorm sees 32 values per channel: a fresh net's
# step is then too ill-conditioned for STEP_TOL (measured, worst tensor / scale: TF oneDNN 2.9e-2 at 32, 2.9e-3 at
# 64; torch 6.6e-3 / 4.6e-3), while its kink-free gradient row agrees to 4e-6 at 32. At 64 its last maps are 4x4.
SIZES = {"densenet121": 64}
LOSS_TOL, STEP_TOL, GRAD_TOL, EMB_TOL = 1e-5, 2e-2, 1e-4, 1e-5


def kernels() -> str:
    """What this process runs: TensorFlow's oneDNN state and oneDNN's ISA cap, if any."""
    from twinface_tf.layers import native_grouped_gradients
    state = "oneDNN" if native_grouped_gradients() else "Eigen"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"TF {state}" + (f", ISA <= {isa}" if isa and state == "oneDNN" else "")


def _twins(arch):
    import torch
    from twinface import config
    from twinface_convert.mapping import torch_to_keras
    from twinface_tf.train import TFTwin
    from twinface_torch.train import TorchTwin
    cfg = config.from_dict({"backbone": {"name": arch, "num_features": 64, "input_size": SIZE},
                            "head": {"type": "arcface"},
                            "optimizer": {"type": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0},
                            "train": {"batch_size": BATCH, "clip_grad_norm": 0.0}})
    torch.manual_seed(0)
    tt, kt = TorchTwin(), TFTwin()
    tt.build(cfg, CLASSES)
    kt.build(cfg, CLASSES)
    torch_to_keras(tt.backbone.state_dict(), kt.backbone, source=f"torch {arch}")
    torch_to_keras(tt.head.state_dict(), kt.head, source="torch head")
    return tt, kt


def _same_noise(model, framework):
    """ViT: each run of the step draws the same patch-masking and stochastic-depth noise (set_noise)."""
    import importlib

    from twinface.registry import backbone_spec
    from twinface.testing import seeded_noise
    if backbone_spec(model.arch if framework == "torch" else model.name).family == "vit":
        importlib.import_module(f"twinface_{framework}.backbones.vit").set_noise(model, seeded_noise(7))


def _params(module):
    return {n: p.detach().numpy().astype(np.float64) for n, p in module.named_parameters() if p.requires_grad}


def step_rows(arch, images, labels):
    import torch
    from twinface.data.transforms import to_model_input
    from twinface_convert.mapping import keras_to_torch
    tt, kt = _twins(arch)
    start = _params(tt.backbone)
    _same_noise(kt.backbone, "tf")
    # TF first, then its traced step is dropped: IResNet-200's step graph and the float64 copy below are GBs each
    loss_tf = kt.train_step(images, labels, LR, LR)
    after_tf = keras_to_torch(kt.backbone)
    del kt
    import keras
    keras.backend.clear_session()
    trim()
    # the exact step: the same modules in float64
    backbone, head = copy.deepcopy(tt.backbone).double().train(), copy.deepcopy(tt.head).double()
    _same_noise(backbone, "torch")
    y = torch.from_numpy(labels)
    tt.loss_fn(head(backbone(torch.from_numpy(to_model_input(images)).double()), y), y).backward()
    exact = {n: p.grad.numpy() for n, p in backbone.named_parameters() if p.requires_grad}
    del backbone, head
    trim()
    _same_noise(tt.backbone, "torch")
    loss_torch = tt.train_step(images, labels, LR, LR)
    after_torch = _params(tt.backbone)
    scale = max(np.abs(g).max() for g in exact.values())
    err = {twin: max(np.abs((start[n] - after[n]) / LR - exact[n]).max() for n in exact) / scale
           for twin, after in (("torch", after_torch), ("TF", after_tf))}
    return [(f"{arch}: train_step loss, torch vs TF", abs(loss_torch - loss_tf) / abs(loss_torch), LOSS_TOL, True),
            (f"{arch}: train_step gradients, torch fp32 vs exact (fp64), / scale", err["torch"], STEP_TOL, True),
            (f"{arch}: train_step gradients, TF fp32 vs exact (fp64), / scale", err["TF"], STEP_TOL, True)]


def _data_like_twins(arch):
    """A data-like torch backbone (calibrated BatchNorm, eval mode) and its Keras twin with the same weights."""
    from twinface_convert.mapping import torch_to_keras
    from twinface_tf.backbones import get_model as tf_model
    from twinface_torch.calibrate import trained_like
    tm = trained_like(arch, input_size=SIZE, num_features=64)
    km = tf_model(arch, input_size=SIZE, num_features=64)
    torch_to_keras(tm.state_dict(), km, source=f"torch {arch}")
    return tm, km


def inference_rows(arch, tm, km, images):
    """What `twinface embed` runs in each twin (torch: frozen TorchScript, channels_last, oneDNN layout for
    IResNets; TF: its traced function) against torch's eager module, L2-normalised."""
    import torch
    from twinface.data.transforms import to_model_input
    from twinface_tf.embed import embed_images as tf_embed
    from twinface_torch.embed import embed_images as torch_embed

    def unit(e):
        e = np.asarray(e, np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)
    with torch.no_grad():
        eager = unit(tm(torch.from_numpy(to_model_input(images))).numpy())
    return [(f"{arch}: torch default embedding path vs torch eager", np.abs(unit(torch_embed(tm, images)) - eager).max(),
             EMB_TOL, False),
            (f"{arch}: TF default embedding path vs torch eager", np.abs(unit(tf_embed(km, images)) - eager).max(),
             EMB_TOL, False)]


def gradient_row(arch, tm, km, images):
    import tensorflow as tf
    import torch
    from twinface.data.transforms import to_model_input
    from twinface_convert.mapping import keras_to_torch, torch_to_keras
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.fill_(1.0)
    torch_to_keras(tm.state_dict(), km, source=f"torch {arch}")
    projection = np.random.default_rng(7).standard_normal((len(images), 64)).astype(np.float32)
    (tm(torch.from_numpy(to_model_input(images))) * torch.from_numpy(projection)).sum().backward()
    # eval mode leaves ViT's mask_token (training-time masking) unused and frozen parameters (IResNet's
    # features.weight, fixed at 1 as in arcface_torch) take none; any other one without a gradient is a wiring fault
    unused = {"mask_token"}
    trainable = {n: p for n, p in tm.named_parameters() if p.requires_grad and n not in unused}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"{arch}: torch parameters without a gradient: {missing[:3]}"
    expected = {n: p.grad.numpy() for n, p in trainable.items()}
    x = tf.constant(to_model_input(images, "NHWC"))
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(km(x, training=False) * projection)
    variables = km.trainable_variables
    # the TF gradients in torch's names and layouts: the converter's own mapping, applied to them in place
    for v, g in zip(variables, tape.gradient(out, variables)):
        assert g is not None or v.path.split("/")[0] in unused, f"{arch}: TF variable {v.path} without a gradient"
        if g is not None:
            v.assign(g)
    mapped = keras_to_torch(km)
    worst = max(np.abs(mapped[n] - expected[n]).max() / np.abs(expected[n]).max() for n in expected)
    return [(f"{arch}: backbone gradients (eval mode, PReLU slopes 1), torch vs TF, worst tensor", worst, GRAD_TOL,
             True)]


def export_rows(arch):
    """The Keras twin's export holds one ONNX Conv per Keras convolution, each grouped one with its `group`
    (nothing of the gradient fallback leaks into the graph); export_onnx itself checks it with onnxruntime."""
    import tempfile

    import keras
    import onnx
    from twinface_convert.mapping import torch_to_keras
    from twinface_tf.backbones import get_model as tf_model
    from twinface_tf.export import export_onnx
    from twinface_tf.layers import GroupedConv2D
    from twinface_torch.calibrate import trained_like
    model = tf_model(arch, input_size=SIZE, num_features=64)
    grouped = sorted(layer.groups for layer in model.layers if isinstance(layer, GroupedConv2D))
    if not grouped:
        return []
    convs = sum(isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) for layer in model.layers)
    torch_to_keras(trained_like(arch, input_size=SIZE, num_features=64).state_dict(), model, source=arch)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, f"{tmp}/{arch}.onnx", arch, input_size=SIZE)      # raises if onnxruntime disagrees
        graph = onnx.load(f"{tmp}/{arch}.onnx").graph
    nodes = [n for n in graph.node if n.op_type == "Conv"]
    in_per_group = {t.name: t.dims[1] for t in graph.initializer if len(t.dims) == 4}  # OIHW: in / group
    onnx_grouped = sorted(next(a.i for a in n.attribute if a.name == "group") for n in nodes
                          if in_per_group.get(n.input[1], 1) > 1 and any(a.name == "group" and a.i > 1
                                                                           for a in n.attribute))
    return [(f"{arch}: ONNX export, Conv nodes - Keras conv layers", abs(len(nodes) - convs), 0.0, False),
            (f"{arch}: ONNX export, grouped Convs (groups {grouped}) not in the graph as such",
             len(set(grouped) ^ set(onnx_grouped)) + abs(len(grouped) - len(onnx_grouped)), 0.0, False)]


def main(arch, part):
    """The rows of one part, "step" (the training step) or "model" (inference, gradients, export): two processes
    per backbone, so that IResNet-200's traced training step and its data-like twins never share one."""
    global SIZE
    SIZE = SIZES.get(arch, SIZE)            # one backbone per process
    rng = np.random.default_rng(100)
    images = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    if part == "step":
        rows = step_rows(arch, images, labels)
    else:
        tm, km = _data_like_twins(arch)
        rows = inference_rows(arch, tm, km, images) + gradient_row(arch, tm, km, images)
        del tm, km
        import keras
        keras.backend.clear_session()
        trim()
        rows += export_rows(arch)
    return {"kernels": kernels(), "rows": [{"what": what, "max_diff": float(diff), "tolerance": tol, "relative": rel}
                                           for what, diff, tol, rel in rows]}


def trim():
    """Hand freed heap back to the system (glibc keeps it otherwise, and the next model comes on top)."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
