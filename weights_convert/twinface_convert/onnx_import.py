"""ONNX -> canonical state_dict by walking the graph, never by trusting initializer names.

Exporters rename, merge and fold (docs/design.md, "Converting weights: the traps"): torch's constant folding puts Conv*BN values
under new names (the dynamo exporter even under the old `conv1.weight`), equal initializers are merged behind
Identity aliases, and tf2onnx dissolves BatchNorm into a Conv bias or Mul/Add and PReLU into Relu/Neg/Mul/Add.
What every such graph keeps is its structure, so the walker reads that:

1. The graph's convolutions and linear layers, in topological order, are matched by weight shape to the
   template's (a torch model of the architecture, module order). Pads, Flatten and tf2onnx's per-group
   Split/Conv/Concat are looked through.
2. Each BatchNorm slot of the template is read from the ops around its convolution:
     BN after a conv/linear    the conv's bias and the per-channel Mul/Add/Sub/Div/BatchNormalization after it
     BN before a conv/linear   the per-channel ops on its input (IResNet's block bn1 and its final bn2: a
                               pre-activation BN has no conv before it to fold into, so exporters leave it be;
                               DenseNet's BN -> PReLU -> conv after each Concat)
3. Each PReLU is a PRelu node, or tf2onnx's relu(x) + c * relu(-x) (slope = -c).
4. ReLU and pooling nodes carry no weights; they are accepted where the template has such modules.

A slot that holds exactly one BatchNormalization node with eps 1e-5 keeps its four tensors bit for bit.
Anything else has become y = s * x + t and is loaded as BatchNorm(gamma=s, beta=t, mean=0, var=1-eps): the
same function in inference (float32 var + eps == 1 exactly), but the running statistics are gone.
"""
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import onnx_vit
from .arch import Backbone, infer_unnamed, template

EPS = np.float32(1e-5)
IDENTITY_VAR = np.float32(1.0) - EPS          # float32: IDENTITY_VAR + EPS == 1.0 exactly
AFFINE_OPS = ("Mul", "Add", "Sub", "Div", "BatchNormalization")
# Ops that carry no weights of their own: residual Adds, layout and constant plumbing.
STRUCTURAL_OPS = ("Add", "Identity", "Constant", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Split",
                  "Concat", "Pad", "Dropout", "Shape", "Gather", "Cast")


class StructureError(ValueError):
    """The graph does not have the structure of the architecture tried."""


@dataclass
class Unit:
    """One convolution or linear layer of the graph, weights in torch layout."""
    kind: str                   # "conv" | "linear"
    weight: np.ndarray
    bias: np.ndarray            # None when the node has none
    input: str                  # the tensor it reads (Pad / Flatten / group split looked through)
    output: str
    position: int               # topological index, for matching in data-flow order
    nodes: list
    stride: tuple = ()
    pads: tuple = ()            # (top, left, bottom, right)
    group: int = 1
    trailing_add: object = None  # MatMul + Add(constant): the bias, when the template has one

    @property
    def label(self):
        return f"{self.nodes[0].op_type} '{self.nodes[0].name or self.output}'"


@dataclass
class Imported:
    state: dict                 # canonical name -> float32 array
    backbone: Backbone
    folded: list = field(default_factory=list)   # BatchNorms loaded from folded affines (statistics gone)


class Graph:
    """Nodes, producers, consumers and the value of every constant tensor of an ONNX model."""

    def __init__(self, model: onnx.ModelProto, source: str):
        graph = model.graph
        self.source = source
        self.const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.nodes = list(graph.node)
        self.producer, self.consumers = {}, defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)
            self._fold(node)
        # Tensors computed from tensor shapes alone (Shape -> Slice / Gather / Concat ...): a flatten's target
        # shape when the exporter could not fold it to a constant. They carry no data, so they belong to no layer.
        self.shape_values = set()
        for node in self.nodes:
            known = [i for i in node.input if i]
            if node.op_type == "Shape" or known and all(i in self.const or i in self.shape_values for i in known) \
                    and any(i in self.shape_values for i in known):
                self.shape_values.update(node.output)
        inputs = [i.name for i in graph.input if i.name not in self.const]
        if len(inputs) != 1:
            raise ValueError(f"{source}: expected one image input, found {inputs}")
        self.outputs = {o.name for o in graph.output}
        self.position = {id(node): i for i, node in enumerate(self.nodes)}

    def _fold(self, node):
        """Evaluate the constant-only ops exporters leave around weights (aliases, PReLU slope reshapes)."""
        attrs = self.attrs(node)
        if node.op_type == "Constant":
            if "value" in attrs:
                self.const[node.output[0]] = numpy_helper.to_array(attrs["value"])
            return
        if not node.input or not all(i in self.const for i in node.input if i):
            return
        values = [self.const.get(i) for i in node.input]
        x, op = values[0], node.op_type
        if op == "Identity":
            out = x
        elif op == "Neg":
            out = -x
        elif op == "Transpose":
            out = np.transpose(x, attrs.get("perm"))
        elif op in ("Unsqueeze", "Squeeze"):
            axes = attrs.get("axes", values[1].tolist() if len(values) > 1 and values[1] is not None else None)
            if op == "Unsqueeze":
                out = np.expand_dims(x, tuple(axes))
            else:
                out = np.squeeze(x, None if axes is None else tuple(axes))
        elif op == "Reshape":
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(values[1].tolist())]
            out = np.reshape(x, shape)
        else:
            return
        self.const[node.output[0]] = out

    def attrs(self, node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def only_consumer(self, tensor):
        """The one node that reads `tensor`'s values (a Shape node reads only its shape), else None."""
        consumers = [n for n in self.consumers.get(tensor, []) if n.op_type != "Shape"]
        return consumers[0] if len(consumers) == 1 and tensor not in self.outputs else None

    def constant_operand(self, node, data):
        """The constant operand of a binary op whose other operand is `data`, else None."""
        if len(node.input) != 2 or data not in node.input:
            return None
        other = node.input[1] if node.input[0] == data else node.input[0]
        return self.const.get(other)

    # --- convolutions and linear layers ---------------------------------------------------------------------
    def units(self):
        units, grouped = [], set()
        for node in self.nodes:
            if node.op_type == "Concat":
                unit = self._grouped_conv(node)
                if unit:
                    grouped.update(id(n) for n in unit.nodes)
                    units.append(unit)
        for node in self.nodes:
            if node.op_type == "Conv" and id(node) not in grouped:
                units.append(self._conv(node))
            elif node.op_type in ("Gemm", "MatMul") and node.input[1] in self.const:
                units.append(self._linear(node))
        return sorted(units, key=lambda u: u.position)

    def _conv_attrs(self, node):
        attrs = self.attrs(node)
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            raise ValueError(f"{self.source}: Conv '{node.name}' uses auto_pad={attrs['auto_pad']!r}; "
                             f"only explicit pads are supported")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise ValueError(f"{self.source}: Conv '{node.name}' is dilated; no supported backbone is")
        if node.input[1] not in self.const:
            raise ValueError(f"{self.source}: Conv '{node.name}' has a computed weight; expected a constant")
        pads = tuple(attrs.get("pads", [0, 0, 0, 0]))
        return attrs, (pads[0], pads[1], pads[2], pads[3])

    def _look_through_pad(self, tensor, pads, nodes):
        """Zero padding before a conv is part of the conv: add its spatial pads to `pads`."""
        node = self.producer.get(tensor)
        if node is None or node.op_type != "Pad":
            return tensor, pads
        attrs = self.attrs(node)
        widths = self.const.get(node.input[1]) if len(node.input) > 1 else np.array(attrs.get("pads"))
        value = self.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else attrs.get("value", 0.0)
        if attrs.get("mode", b"constant") not in (b"constant", "constant") or widths is None or np.any(value) \
                or len(widths) != 8 or any(widths[[0, 1, 4, 5]]):
            raise ValueError(f"{self.source}: Pad '{node.name}' is not a spatial zero padding")
        nodes.append(node)
        top, left, bottom, right = widths[2], widths[3], widths[6], widths[7]
        return node.input[0], (pads[0] + top, pads[1] + left, pads[2] + bottom, pads[3] + right)

    def _conv(self, node):
        attrs, pads = self._conv_attrs(node)
        nodes = [node]
        source, pads = self._look_through_pad(node.input[0], pads, nodes)
        bias = self.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return Unit("conv", self.const[node.input[1]], bias, source, node.output[0], self.position[id(node)], nodes,
                    tuple(attrs.get("strides", [1, 1])), tuple(int(p) for p in pads), attrs.get("group", 1))

    def _split_slice(self, tensor):
        """(source, index, count) when `tensor` is channel slice `index` of `count` equal slices of `source`:
        Split(axis=1), or tf2onnx's Transpose(NHWC) -> Split(axis=-1) -> Transpose(NCHW)."""
        node, nhwc = self.producer.get(tensor), False
        if node is not None and node.op_type == "Transpose" and list(self.attrs(node).get("perm", [])) == [0, 3, 1, 2]:
            tensor, node, nhwc = node.input[0], self.producer.get(node.input[0]), True
        if node is None or node.op_type != "Split":
            return None
        axis = self.attrs(node).get("axis", 0)
        source = node.input[0]
        if nhwc:
            before = self.producer.get(source)
            if axis not in (3, -1) or before is None or before.op_type != "Transpose" \
                    or list(self.attrs(before).get("perm", [])) != [0, 2, 3, 1]:
                return None
            source = before.input[0]
        elif axis != 1:
            return None
        return source, list(node.output).index(tensor), len(node.output)

    def _grouped_conv(self, concat):
        """tf2onnx writes a grouped convolution as Split -> one Conv per group -> Concat(axis=1)."""
        convs = [self.producer.get(i) for i in concat.input]
        if self.attrs(concat).get("axis") != 1 or len(convs) < 2 or \
                any(c is None or c.op_type != "Conv" or self.attrs(c).get("group", 1) != 1 for c in convs):
            return None
        slices = [self._split_slice(c.input[0]) for c in convs]
        if any(s is None for s in slices) or len({s[0] for s in slices}) != 1 or \
                [s[1] for s in slices] != list(range(len(convs))) or slices[0][2] != len(convs):
            return None
        attrs, pads = self._conv_attrs(convs[0])
        if any(self._conv_attrs(c) != (attrs, pads) for c in convs):
            return None
        nodes = [concat, *convs]
        source, pads = self._look_through_pad(slices[0][0], pads, nodes)
        weight = np.concatenate([self.const[c.input[1]] for c in convs], axis=0)
        biases = [self.const.get(c.input[2]) if len(c.input) > 2 else None for c in convs]
        bias = None if any(b is None for b in biases) else np.concatenate(biases)
        return Unit("conv", weight, bias, source, concat.output[0], self.position[id(concat)], nodes,
                    tuple(attrs.get("strides", [1, 1])), tuple(int(p) for p in pads), len(convs))

    def _linear(self, node):
        attrs, b = self.attrs(node), self.const[node.input[1]]
        trailing = None
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise ValueError(f"{self.source}: Gemm '{node.name}' has transA/alpha/beta other than 0/1/1")
            weight = b if attrs.get("transB", 0) else b.T
            bias = self.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        else:
            if b.ndim != 2:
                raise ValueError(f"{self.source}: MatMul '{node.name}' has a {b.ndim}-d weight; expected 2-d")
            weight, bias = b.T, None
            add = self.only_consumer(node.output[0])
            value = self.constant_operand(add, node.output[0]) if add is not None and add.op_type == "Add" else None
            if value is not None and value.size == weight.shape[0]:
                trailing = (add, value.reshape(-1))
        nodes = [node]
        return Unit("linear", np.ascontiguousarray(weight), None if bias is None else bias.reshape(-1),
                    self._look_through_flatten(node.input[0], nodes), node.output[0], self.position[id(node)], nodes,
                    trailing_add=trailing)

    def _look_through_flatten(self, tensor, nodes):
        """The NCHW tensor that Flatten(axis=1) or Reshape([N, -1]) turned into the linear layer's input."""
        node = self.producer.get(tensor)
        if node is None or node.op_type not in ("Flatten", "Reshape"):
            return tensor
        shape = self.const.get(node.input[1]) if node.op_type == "Reshape" else None   # None: computed at run time
        if node.op_type == "Flatten" and self.attrs(node).get("axis", 1) != 1 or shape is not None and len(shape) != 2:
            raise ValueError(f"{self.source}: {node.op_type} '{node.name}' before a linear layer does not flatten "
                             f"to [batch, features]")
        before = self.producer.get(node.input[0])
        if before is not None and before.op_type == "Transpose":
            raise ValueError(f"{self.source}: the graph flattens a transposed tensor ('{before.name}') before its "
                             f"linear layer; only NCHW flattening (as torch) is supported")
        nodes.append(node)
        return node.input[0]

    # --- per-channel ops and activations --------------------------------------------------------------------
    def channel_vector(self, value, channels, rank, node):
        """A constant broadcast per channel (axis 1) over a rank-`rank` tensor, as a [channels] float64 vector."""
        value = np.asarray(value, np.float64)
        per_channel = (channels,) + (1,) * (rank - 2)
        if value.size == 1 or value.shape in (per_channel, (1,) + per_channel):
            return np.broadcast_to(value.reshape(-1), (channels,)).copy()
        raise StructureError(f"{self.source}: {node.op_type} '{node.name}' uses a constant of shape {value.shape}, "
                             f"not one value per channel of {channels}")

    def affine_step(self, node, data, scale, shift, channels, rank):
        """Compose the per-channel affine op `node` (reading `data`) onto y = scale * x + shift; None if not one."""
        if node.op_type == "BatchNormalization":
            if node.input[0] != data or not all(i in self.const for i in node.input[1:5]):
                return None
            gamma, beta, mean, var = (self.channel_vector(self.const[i], channels, 2, node) for i in node.input[1:5])
            k = gamma / np.sqrt(var + np.float64(self.attrs(node).get("epsilon", 1e-5)))
            return scale * k, shift * k + beta - mean * k
        value = self.constant_operand(node, data)
        if value is None:
            return None
        c = self.channel_vector(value, channels, rank, node)
        if node.op_type == "Mul":
            return scale * c, shift * c
        if node.op_type == "Add":
            return scale, shift + c
        if node.op_type == "Div" and node.input[0] == data:
            return scale / c, shift / c
        if node.op_type == "Sub":
            return (scale, shift - c) if node.input[0] == data else (-scale, c - shift)
        return None

    def chain_after(self, tensor, channels, rank, claimed):
        """The per-channel ops that follow `tensor` one after the other: (ops, scale, shift, end tensor)."""
        ops, scale, shift = [], np.ones(channels), np.zeros(channels)
        while True:
            node = self.only_consumer(tensor)
            if node is None or node.op_type not in AFFINE_OPS or id(node) in claimed:
                return ops, scale, shift, tensor
            step = self.affine_step(node, tensor, scale, shift, channels, rank)
            if step is None:
                return ops, scale, shift, tensor
            ops.append(node)
            (scale, shift), tensor = step, node.output[0]

    def chain_before(self, tensor, claimed, shared=False):
        """The unclaimed per-channel ops (constant operand) that produce `tensor`, first op first: [(node, data)].
        `shared`: `tensor` itself may feed several nodes (tf2onnx's PReLU reads its input twice)."""
        ops = []
        node = self.producer.get(tensor)
        while node is not None and node.op_type in AFFINE_OPS and id(node) not in claimed \
                and (shared and node.output[0] == tensor or self.only_consumer(node.output[0]) is not None):
            if node.op_type == "BatchNormalization":
                data = node.input[0]
                if not all(i in self.const for i in node.input[1:5]):
                    break
            elif len(node.input) == 2 and (node.input[0] in self.const) != (node.input[1] in self.const):
                data = node.input[1] if node.input[0] in self.const else node.input[0]
            else:
                break
            ops.insert(0, (node, data))
            node = self.producer.get(data)
        return ops

    def prelu_after(self, tensor, channels, claimed, what):
        """(slope [channels], nodes) of the PReLU applied to `tensor`: a PRelu node or tf2onnx's Relu/Neg/Mul/Add."""
        consumers = [n for n in self.consumers.get(tensor, []) if id(n) not in claimed]
        kinds = sorted(n.op_type for n in consumers)
        if kinds == ["PRelu"] and consumers[0].input[1] in self.const:
            node = consumers[0]
            return self.channel_vector(self.const[node.input[1]], channels, 4, node), [node]
        if kinds == ["Neg", "Relu"]:
            relu, neg = sorted(consumers, key=lambda n: n.op_type == "Neg")
            found = self._decomposed_prelu(relu, neg)
            if found:
                c, mul, nodes = found
                return -self.channel_vector(c, channels, 4, mul), nodes
        raise StructureError(f"{self.source}: expected the PReLU '{what}' (a PRelu node, or Relu/Neg/Mul/Add as "
                             f"tf2onnx writes it) after tensor '{tensor}', found {kinds or 'nothing'}")

    def prelu_before(self, tensor, channels, claimed, what):
        """(slope [channels], nodes, its input) of the PReLU that produces `tensor` (a pre-activation PReLU)."""
        node = self.producer.get(tensor)
        if node is not None and id(node) not in claimed:
            if node.op_type == "PRelu" and node.input[1] in self.const:
                return self.channel_vector(self.const[node.input[1]], channels, 4, node), [node], node.input[0]
            relus = [self.producer.get(i) for i in node.input] if node.op_type == "Add" else []
            for relu in (r for r in relus if r is not None and r.op_type == "Relu"):
                negs = [n for n in self.consumers.get(relu.input[0], []) if n.op_type == "Neg"]
                found = self._decomposed_prelu(relu, negs[0]) if len(negs) == 1 else None
                if found and found[2][-1] is node:
                    c, mul, nodes = found
                    return -self.channel_vector(c, channels, 4, mul), nodes, relu.input[0]
        raise StructureError(f"{self.source}: expected the PReLU '{what}' (a PRelu node, or Relu/Neg/Mul/Add as "
                             f"tf2onnx writes it) producing tensor '{tensor}', found "
                             f"{node.op_type if node is not None else 'the graph input'}")

    def _decomposed_prelu(self, relu, neg):
        """tf2onnx's Keras PReLU: Add(Relu(x), Mul(Relu(Neg(x)), c)) with c = -slope; None if it is not that."""
        relu_neg = self.only_consumer(neg.output[0])
        if relu_neg is None or relu_neg.op_type != "Relu":
            return None
        mul = self.only_consumer(relu_neg.output[0])
        if mul is None or mul.op_type != "Mul":
            return None
        c = self.constant_operand(mul, relu_neg.output[0])
        add = self.only_consumer(mul.output[0])
        if c is None or add is None or add.op_type != "Add" or set(add.input) != {relu.output[0], mul.output[0]}:
            return None
        return c, mul, [relu, neg, relu_neg, mul, add]


# Weightless modules a template may hold, and the ONNX ops they export as.
FREE_OPS = {nn.ReLU: "Relu", nn.MaxPool2d: "MaxPool", nn.AvgPool2d: "AveragePool"}


def _parent(name):
    return name.rpartition(".")[0]


def _template_plan(model):
    """Weighted modules in order, and where each BatchNorm and PReLU sits relative to a conv / linear:
    a BN right after a conv/linear of the same parent module is its `post`, any other BN the `pre` of the next
    one (a DenseNet layer's norm1 follows the previous layer's conv2 but reads the concatenation), a PReLU the
    `act` of the conv whose post BN it follows, or the `pre_act` of the conv whose pre BN it follows."""
    modules = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm, nn.PReLU))]
    post, pre, act, pre_act = {}, {}, {}, {}
    for i, (name, module) in enumerate(modules):
        previous = modules[i - 1] if i else (None, None)
        if isinstance(module, _BatchNorm):
            if isinstance(previous[1], (nn.Conv2d, nn.Linear)) and _parent(previous[0]) == _parent(name):
                post[previous[0]] = name
            else:
                pre[next(n for n, m in modules[i + 1:] if isinstance(m, (nn.Conv2d, nn.Linear)))] = name
        elif isinstance(module, nn.PReLU):
            owner = next((conv for conv, bn in post.items() if bn == previous[0]), None)
            before = next((conv for conv, bn in pre.items() if bn == previous[0]), None)
            if owner is None and before is None:
                raise NotImplementedError(f"PReLU '{name}' does not follow a BatchNorm; the walker cannot place it")
            (act if owner else pre_act)[owner or before] = name
    layers = [(n, m) for n, m in modules if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers, post, pre, act, pre_act


def walk(graph: Graph, backbone: Backbone) -> Imported:
    """Read `backbone`'s canonical state from `graph`; StructureError names the first tensor that does not fit."""
    model = template(backbone)
    layers, post, pre, act, pre_act = _template_plan(model)
    modules = dict(model.named_modules())
    free_ops = {op for kind, op in FREE_OPS.items() if any(isinstance(m, kind) for m in modules.values())}
    units = graph.units()
    used, claimed = set(), set()
    state, folded = {}, []
    for name, module in layers:
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        expected = tuple(module.weight.shape)
        want = (tuple(module.stride), tuple(module.padding) * 2, module.groups) if kind == "conv" else None
        fits = [u for u in units if id(u) not in used and u.kind == kind and u.weight.shape == expected]
        # Equal shapes can differ in stride (ResNeXt's conv3 and its stage's downsample), and exporters order
        # parallel branches freely: the first unit of the right geometry, else the first of the right shape.
        unit = next((u for u in fits if kind == "linear" or (u.stride, u.pads, u.group) == want),
                    fits[0] if fits else None)
        if unit is None:
            pending = next((u for u in units if id(u) not in used), None)
            found = f"the next unmatched one, {pending.label}, has weight shape {pending.weight.shape}" if pending \
                else "the graph has no more"
            raise StructureError(f"{graph.source}: tensor '{name}.weight' of {backbone} (shape {expected}) has no "
                                 f"{kind} of that shape in the graph; {found}")
        used.add(id(unit))
        claimed.update(id(n) for n in unit.nodes)
        if kind == "conv":
            if (unit.stride, unit.pads, unit.group) != want:
                raise StructureError(f"{graph.source}: {unit.label} (for '{name}') has stride {unit.stride}, pads "
                                     f"{unit.pads}, group {unit.group}; {backbone} expects {want[0]}, {want[1]}, "
                                     f"{want[2]}")
        state[f"{name}.weight"] = np.asarray(unit.weight, np.float32)
        bias, output = unit.bias, unit.output
        if module.bias is not None:                 # the template's own bias (IResNet fc)
            if bias is None and unit.trailing_add is not None:
                add, bias = unit.trailing_add
                claimed.add(id(add))
                output = add.output[0]
            state[f"{name}.bias"] = np.zeros(expected[0], np.float32) if bias is None else bias.astype(np.float32)
            bias = None
        channels = expected[0]
        ops, scale, shift, output = graph.chain_after(output, channels, 4 if kind == "conv" else 2, claimed)
        claimed.update(id(n) for n in ops)
        if bias is not None:                        # a folded conv bias b: s * (conv + b) + t
            shift = shift + scale * np.asarray(bias, np.float64).reshape(-1)
        _place(graph, state, folded, post.get(name), ops, scale, shift, bias is not None,
               f"after {unit.label} ('{name}')")
        if name in act:
            slope, nodes = graph.prelu_after(output, channels, claimed, act[name])
            claimed.update(id(n) for n in nodes)
            state[f"{act[name]}.weight"] = slope.astype(np.float32)
        source = unit.input
        if name in pre_act:
            slope, nodes, source = graph.prelu_before(source, module.weight.shape[1], claimed, pre_act[name])
            claimed.update(id(n) for n in nodes)
            state[f"{pre_act[name]}.weight"] = slope.astype(np.float32)
        before = graph.chain_before(source, claimed, shared=name in pre_act)
        claimed.update(id(n) for n, _ in before)
        scale = shift = None
        if name in pre:
            width = modules[pre[name]].num_features
            scale, shift = np.ones(width), np.zeros(width)
            for node, data in before:
                scale, shift = graph.affine_step(node, data, scale, shift, width, 4)
        _place(graph, state, folded, pre.get(name), [n for n, _ in before], scale, shift, False,
               f"before {unit.label} ('{name}')")
    extra = [u for u in units if id(u) not in used]
    if extra:
        raise StructureError(f"{graph.source}: the graph has {len(extra)} more convolution / linear layers than "
                             f"{backbone}, first {extra[0].label} with weight shape {extra[0].weight.shape}")
    unexplained = [n for n in graph.nodes if id(n) not in claimed
                   and not all(o in graph.const or o in graph.shape_values for o in n.output)
                   and (n.op_type not in STRUCTURAL_OPS + tuple(free_ops)
                        or n.op_type == "Add" and set(n.input) & set(graph.const))]
    if unexplained:
        node = unexplained[0]
        raise StructureError(f"{graph.source}: {node.op_type} '{node.name or node.output[0]}' belongs to no layer of "
                             f"{backbone} ({len(unexplained)} such nodes)")
    return Imported({k: np.array(v, np.float32) for k, v in state.items()}, backbone, folded)   # own, writable


def _place(graph, state, folded, bn, nodes, scale, shift, has_bias, where):
    """Store the BN slot `bn`: exact when it is one BatchNormalization node (eps 1e-5, no bias folded into it),
    else the identity-statistics form of y = scale * x + shift."""
    if bn is None:
        if nodes or has_bias:
            raise StructureError(f"{graph.source}: per-channel ops {[n.op_type for n in nodes] or ['Conv bias']} "
                                 f"{where} have no BatchNorm to go to in this architecture (normalisation inside "
                                 f"the graph, as in MXNet-era models, is not supported)")
        return
    if len(nodes) == 1 and nodes[0].op_type == "BatchNormalization" and not has_bias and \
            np.float32(graph.attrs(nodes[0]).get("epsilon", 1e-5)) == EPS:
        values = (graph.const[i] for i in nodes[0].input[1:5])
        names = ("weight", "bias", "running_mean", "running_var")
        state.update({f"{bn}.{k}": np.asarray(v, np.float32).reshape(-1) for k, v in zip(names, values)})
        return
    state.update({f"{bn}.weight": scale.astype(np.float32), f"{bn}.bias": shift.astype(np.float32),
                  f"{bn}.running_mean": np.zeros(len(scale), np.float32),
                  f"{bn}.running_var": np.full(len(scale), IDENTITY_VAR, np.float32)})
    folded.append(bn)


def read_onnx(path: str, arch: str = None) -> Imported:
    """Import an ONNX backbone: infer the architecture from its weight shapes (or take `arch`) and walk it."""
    try:
        model = onnx.load(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # protobuf reports a damaged file with several exception types
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    graph = Graph(model, path)
    if onnx_vit.is_vit(graph):                      # a transformer: its own reader (onnx_vit)
        return _read_vit(graph, arch)
    errors = []
    for backbone in infer_unnamed([u.weight.shape for u in graph.units()], path, arch):
        try:
            return walk(graph, backbone)
        except StructureError as e:
            errors.append(e)
    raise ValueError(str(errors[0]))


def _read_vit(graph: Graph, arch: str = None) -> Imported:
    errors = []
    for backbone in onnx_vit.vit_candidates(graph, arch):
        try:
            state, folded, has_mask_token = onnx_vit.walk_vit(graph, backbone)
        except ValueError as e:
            errors.append(e)
            continue
        if not has_mask_token:
            warnings.warn(f"{graph.source}: no 'mask_token' initializer (only training-time masking uses it); "
                          f"loaded as zeros")
        return Imported(state, backbone, folded)
    raise ValueError(str(errors[0]))
