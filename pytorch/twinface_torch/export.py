"""ONNX export of a backbone, name-faithful and unfolded so weights_convert can map it back by name.

The legacy exporter without constant folding keeps every state_dict name as an initializer and every
BatchNorm as a node (docs/design.md: folding would silently put Conv*BN values under the name `conv1.weight`).
"""
import onnx
import torch

from twinface.atomic import atomic_path
from twinface.onnx_meta import (INPUT_NAME, OUTPUT_NAME, TRAINING_ONLY, check_against, export_metadata,
                                keep_training_only, stamp_metadata)


def export_onnx(model, path, arch, input_size=112, opset=17, verify=True):
    """Write `model` (eval mode) to `path` as ONNX [batch, 3, S, S] -> [batch, F]; return max |onnx - torch|
    on a random batch of 3 (NaN when verify=False).

    The file appears only once complete (and verified when verify=True): written to a temporary file in
    the same directory, then moved into place (twinface.atomic).
    """
    was_training, precision = model.training, getattr(model, "precision", "fp32")
    model.eval()
    if precision != "fp32":
        model.precision = "fp32"    # the exported graph is fp32 whatever precision the model trains in
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    sample = (torch.rand(3, 3, input_size, input_size, generator=generator) * 2 - 1).to(device)
    try:
        with atomic_path(path, suffix=".onnx") as tmp_path, torch.no_grad():
            reference = model(sample).float().cpu().numpy()
            torch.onnx.export(
                model, (sample[:1],), tmp_path, dynamo=False, do_constant_folding=False, export_params=True,
                keep_initializers_as_inputs=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            restore_shared_initializers(tmp_path, set(model.state_dict()))
            keep_training_only(tmp_path, {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()
                                          if n in TRAINING_ONLY})
            stamp_metadata(tmp_path, export_metadata(arch, "torch", input_size, reference.shape[1]))
            max_abs_diff = verify_onnx(tmp_path, sample.cpu().numpy(), reference, path) if verify else float("nan")
    finally:
        model.train(was_training)
        if precision != "fp32":
            model.precision = precision
    return max_abs_diff


def restore_shared_initializers(onnx_path, names):
    """Give every state_dict entry its own initializer again.

    The legacy exporter merges initializers with equal values (in a fresh model every BatchNorm holds the
    same ones and zeros) and re-creates the other names as outputs of Identity nodes; a loader reading
    weights by name would miss those.
    """
    model = onnx.load(onnx_path)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    aliases = [node for node in graph.node
               if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] in names]
    for node in aliases:
        tensor = graph.initializer.add()
        tensor.CopyFrom(initializers[node.input[0]])
        tensor.name = node.output[0]
        graph.node.remove(node)
    onnx.save(model, onnx_path)


def verify_onnx(onnx_path, inputs, reference, path):
    """onnxruntime vs torch on `inputs`; raises past tolerance, else returns the max abs diff."""
    return check_against(onnx_path, inputs, reference, "torch", path)
