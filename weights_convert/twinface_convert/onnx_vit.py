"""ONNX -> canonical state_dict for arcface_torch's ViT (vit_t / vit_s / vit_b), by graph structure.

The conv walker of onnx_import does not fit a transformer (tokens, not channels, flow between the linear
layers), so this reader uses the ViT's fixed dataflow instead, in topological order:
- patch_embed.proj: the one Conv (kernel = stride = 9); pos_embed: the Add of a [1, tokens, dim] constant.
- Linear layers: MatMuls with a constant 2-D weight ([in, out]: transposed), matched by shape to the template's
  in module order; a bias is the Add of a constant after it (Reshapes looked through). Exporters drop an
  all-zero bias Add (tf2onnx), so a missing one reads as zeros.
- LayerNorms (norm1 / norm2 of each block, then norm): a LayerNormalization node (torch, opset >= 17), or the
  decomposed form (torch opset < 17: ReduceMean/Sub/Pow/Sqrt/Div then Mul gamma, Add beta; tf2onnx:
  GlobalAveragePool/Sqrt/Reciprocal, Mul gamma, Add beta): gamma is a [dim] constant of a Mul, beta of an Add.
- feature.1 / feature.3: one BatchNormalization node (kept exactly), or the per-channel Mul/Add it became.
- mask_token is used only by training-time masking, so no inference graph computes with it: it is read from an
  initializer of that name and shape when the exporter kept one (twinface's exports do), else set to zeros
  and reported.
"""
import numpy as np

from .arch import Backbone, infer_unnamed, template

LOOK_THROUGH = ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze")


def is_vit(graph) -> bool:
    """A graph that adds a [1, tokens, dim] constant to its activations (the positional embedding)."""
    return _pos_embed(graph) is not None


def _pos_embed(graph):
    for node in graph.nodes:
        if node.op_type == "Add":
            values = [graph.const.get(i) for i in node.input]
            consts = [v for v in values if v is not None]
            if len(consts) == 1 and consts[0].ndim == 3 and consts[0].shape[0] == 1 and consts[0].shape[1] > 1:
                return node, consts[0]
    return None


def _linears(graph):
    return [n for n in graph.nodes if n.op_type == "MatMul" and n.input[1] in graph.const
            and graph.const[n.input[1]].ndim == 2]


def _mask_token(graph, dim):
    value = graph.const.get("mask_token")
    return value if value is not None and value.shape == (1, 1, dim) else None


def _shapes(graph):
    """Weight shapes (torch layouts) for architecture inference: conv, linears, pos_embed, mask_token."""
    convs = [graph.const[n.input[1]].shape for n in graph.nodes if n.op_type == "Conv" and n.input[1] in graph.const]
    pos = _pos_embed(graph)[1]
    return convs + [graph.const[n.input[1]].T.shape for n in _linears(graph)] + [pos.shape, (1, 1, pos.shape[2])]


def _bias_after(graph, node, width):
    """(bias, Add node) of the constant Add after `node` (Reshapes looked through), else (None, None)."""
    tensor = node.output[0]
    while True:
        nxt = graph.only_consumer(tensor)
        if nxt is None:
            return None, None
        if nxt.op_type in LOOK_THROUGH:
            tensor = nxt.output[0]
            continue
        value = graph.constant_operand(nxt, tensor) if nxt.op_type == "Add" else None
        if value is not None and value.size == width:
            return value.reshape(-1), nxt
        return None, None


def _vectors(graph, op, width, nodes, claimed):
    """[width] constants of `op` nodes among `nodes` (unclaimed), in topological order."""
    out = []
    for node in nodes:
        if node.op_type == op and id(node) not in claimed:
            for i in node.input:
                value = graph.const.get(i)
                if value is not None and value.size == width and value.shape[-1] == width and value.ndim >= 1:
                    out.append(value.reshape(-1))
    return out


def _layer_norms(graph, dim, end, claimed, count, source):
    """(gammas, betas) of the `count` LayerNorms before topological position `end`."""
    nodes = [n for n in graph.nodes[:end] if id(n) not in claimed]
    fused = [n for n in nodes if n.op_type == "LayerNormalization"]
    if fused:
        bad = [n for n in fused if abs(graph.attrs(n).get("epsilon", 1e-5) - 1e-5) > 1e-9]
        if bad:
            raise ValueError(f"{source}: LayerNormalization '{bad[0].name}' has epsilon "
                             f"{graph.attrs(bad[0]).get('epsilon')}; arcface_torch's ViT uses 1e-5")
        gammas = [graph.const[n.input[1]].reshape(-1) for n in fused]
        betas = [graph.const[n.input[2]].reshape(-1) if len(n.input) > 2 and n.input[2] else np.zeros(dim)
                 for n in fused]
    else:
        gammas, betas = _vectors(graph, "Mul", dim, nodes, claimed), _vectors(graph, "Add", dim, nodes, claimed)
    if len(gammas) != count or len(betas) != count:
        raise ValueError(f"{source}: expected the {count} LayerNorms of this ViT (a [{dim}] scale and shift each), "
                         f"found {len(gammas)} scales and {len(betas)} shifts")
    return gammas, betas


def _batchnorm(graph, state, folded, name, tensor, width, claimed, eps):
    ops, scale, shift, _ = graph.chain_after(tensor, width, 2, claimed)
    claimed.update(id(n) for n in ops)
    if len(ops) == 1 and ops[0].op_type == "BatchNormalization" and \
            np.float32(graph.attrs(ops[0]).get("epsilon", 1e-5)) == np.float32(eps):
        values = [graph.const[i].reshape(-1) for i in ops[0].input[1:5]]
        state.update(dict(zip((f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")), values)))
        return
    state.update({f"{name}.weight": scale, f"{name}.bias": shift, f"{name}.running_mean": np.zeros(width),
                  f"{name}.running_var": np.full(width, np.float32(1.0) - np.float32(eps))})
    folded.append(name)


def walk_vit(graph, backbone: Backbone):
    """(canonical state, folded BatchNorms, mask_token found) of `backbone` read from `graph`."""
    model = template(backbone)
    source, dim, depth = graph.source, model.dim, len(model.blocks)
    state, folded, claimed = {}, [], set()
    convs = [n for n in graph.nodes if n.op_type == "Conv"]
    if len(convs) != 1:
        raise ValueError(f"{source}: a ViT has one convolution (patch_embed.proj), the graph has {len(convs)}")
    conv = convs[0]
    state["patch_embed.proj.weight"] = graph.const[conv.input[1]]
    state["patch_embed.proj.bias"] = graph.const[conv.input[2]] if len(conv.input) > 2 else np.zeros(dim)
    add, state["pos_embed"] = _pos_embed(graph)
    claimed.add(id(add))
    linears = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear"]
    found = _linears(graph)
    shapes = [graph.const[n.input[1]].T.shape for n in found] + [None] * len(linears)
    misfit = next(((n, m, s) for (n, m), s in zip(linears, shapes) if tuple(m.weight.shape) != s), None)
    if misfit or len(found) > len(linears):
        name, module, shape = misfit or (None, None, None)
        raise ValueError(f"{source}: tensor '{name}.weight' (shape {tuple(module.weight.shape)}) of {backbone} is "
                         f"not the graph's next MatMul weight ({shape})" if misfit else
                         f"{source}: the graph has {len(found)} MatMul weights, {backbone} {len(linears)} linears")
    for (name, module), node in zip(linears, found):
        state[f"{name}.weight"] = graph.const[node.input[1]].T
        if module.bias is not None:
            bias, bias_add = _bias_after(graph, node, module.out_features)
            state[f"{name}.bias"] = np.zeros(module.out_features) if bias is None else bias
            if bias_add is not None:
                claimed.add(id(bias_add))
    feature0 = found[-2]
    gammas, betas = _layer_norms(graph, dim, graph.position[id(feature0)], claimed, 2 * depth + 1, source)
    norms = [f"blocks.{i}.norm{j}" for i in range(depth) for j in (1, 2)] + ["norm"]
    for name, gamma, beta in zip(norms, gammas, betas):
        state[f"{name}.weight"], state[f"{name}.bias"] = gamma, beta
    for bn, node in (("feature.1", feature0), ("feature.3", found[-1])):
        width = model.get_submodule(bn).num_features
        _batchnorm(graph, state, folded, bn, node.output[0], width, claimed, model.get_submodule(bn).eps)
    token = _mask_token(graph, dim)
    state["mask_token"] = np.zeros((1, 1, dim)) if token is None else token
    return {k: np.array(v, np.float32) for k, v in state.items()}, folded, token is not None


def vit_candidates(graph, arch=None):
    return infer_unnamed(_shapes(graph), graph.source, arch)
