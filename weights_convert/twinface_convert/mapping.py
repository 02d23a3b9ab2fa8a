"""The one mapping between the twins' parameters: a pure function of (canonical name, layer kind).

Canonical names are the torch state_dict names; every weighted Keras layer is named with the torch module
path, so `layer1.0.conv1` (Keras) owns `layer1.0.conv1.weight` (torch). Only the layout differs:
    Conv2D kernel HWIO        <-> OIHW              DepthwiseConv2D (kh, kw, C, 1) <-> (C, 1, kh, kw)
    Dense kernel (in, out)    <-> weight (out, in)  PReLU alpha (1, 1, C)          <-> weight (C,)
    BN gamma/beta/moving_mean/moving_variance <-> weight/bias/running_mean/running_var
    LayerNormalization gamma/beta <-> weight/bias
    a layer marked `torch_parameter` (ViT's pos_embed, mask_token) owns the bare torch Parameter of its name
Heads keep one layout in both twins (`weight` [classes, features]).
"""
import keras
import numpy as np

_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _variable_rules(layer):
    """[(keras variable, canonical suffix, to_torch, to_keras)] for one weighted Keras layer."""
    same = (lambda a: a, lambda a: a)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        rules = {"kernel": ("weight", lambda a: a.transpose(2, 3, 0, 1), lambda a: a.transpose(2, 3, 0, 1)),
                 "bias": ("bias", *same)}
    elif isinstance(layer, keras.layers.Conv2D):
        rules = {"kernel": ("weight", lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0)),
                 "bias": ("bias", *same)}
    elif isinstance(layer, keras.layers.Dense):
        rules = {"kernel": ("weight", lambda a: a.T, lambda a: a.T), "bias": ("bias", *same)}
    elif isinstance(layer, keras.layers.BatchNormalization):
        rules = {k: (v, *same) for k, v in _BN.items()}
    elif isinstance(layer, keras.layers.LayerNormalization):
        rules = {"gamma": ("weight", *same), "beta": ("bias", *same)}
    elif getattr(layer, "torch_parameter", False):
        rules = {v.name: ("", *same) for v in layer.weights}
    elif isinstance(layer, keras.layers.PReLU):
        rules = {"alpha": ("weight", lambda a: a.reshape(-1), None)}
    else:                                                   # heads: same names and layout in both twins
        rules = {v.name: (v.name, *same) for v in layer.weights}
    out = []
    for var in layer.weights:
        if var.name not in rules:
            raise ValueError(f"no mapping for variable '{var.path}' of layer '{layer.name}' "
                             f"({type(layer).__name__})")
        suffix, to_torch, to_keras = rules[var.name]
        if to_keras is None:                                # PReLU: reshape to the Keras variable's shape
            to_keras = (lambda shape: lambda a: a.reshape(shape))(tuple(var.shape))
        out.append((var, suffix, to_torch, to_keras))
    return out


def canonical_variables(model, prefix: str = ""):
    """{canonical torch name: (keras variable, to_torch, to_keras)} for every weight of a Keras model or layer."""
    if isinstance(model, keras.Model):                      # backbone: one module path per layer
        owners = [(layer, f"{prefix}{layer.name}.") for layer in model.layers if layer.weights]
    else:                                                   # a head is itself the module
        owners = [(model, prefix)]
    return {f"{path}{suffix}" if suffix else path[:-1]: (var, to_torch, to_keras)
            for layer, path in owners for var, suffix, to_torch, to_keras in _variable_rules(layer)}


def keras_to_torch(model, prefix: str = "") -> dict:
    """numpy state_dict (torch names and layouts) of a Keras backbone or head."""
    return {name: np.ascontiguousarray(to_torch(np.asarray(var.numpy())))
            for name, (var, to_torch, _) in canonical_variables(model, prefix).items()}


def torch_to_keras(state: dict, model, prefix: str = "", source: str = "state_dict") -> None:
    """Assign a torch state_dict (tensors or arrays) to a Keras model; errors name the first misfit tensor."""
    table = canonical_variables(model, prefix)
    for name, (var, _, to_keras) in table.items():
        if name not in state:
            raise ValueError(f"{source}: tensor '{name}' is missing")
        value = state[name]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        converted = to_keras(value)
        if tuple(converted.shape) != tuple(var.shape):
            raise ValueError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, which does not fit "
                             f"Keras variable '{var.path}' of shape {tuple(var.shape)}")
        var.assign(converted.astype(var.dtype))
    extra = [k for k in state if k not in table and not k.endswith("num_batches_tracked")]
    if extra:
        raise ValueError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} in all) for this architecture")
