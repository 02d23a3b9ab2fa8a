"""Backbone files in arcface_torch's format (a plain state_dict, `backbone.pth`), written atomically."""
import torch

from twinface.atomic import atomic_path

from .backbones import get_model


def save_backbone(model, path: str) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)


def save_file(obj, path: str) -> None:
    """torch.save, atomically, through a Python file: a failed write then carries the OS's reason ('No space left
    on device', 'File too large'), where torch's own file writer says only 'unexpected pos'."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_file(path: str, map_location="cpu"):
    """torch.load(weights_only=True); a truncated, empty or foreign file, or a refused pickle, is a one-line
    ValueError naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:                     # torch reports these as RuntimeError, EOFError, UnpicklingError, ...
        reason = (str(e).strip().splitlines() or [""])[0]
        if "Weights only load failed" in str(e):
            raise ValueError(f"{path}: refused to unpickle it with weights_only=True (it holds more than tensors and "
                             f"plain containers): {reason}") from None
        raise ValueError(f"{path}: not a readable torch file, truncated or not written by torch.save "
                         f"({type(e).__name__}: {reason})") from None


def read_state_dict(path: str) -> dict:
    """A backbone state_dict from a `backbone.pth` or from a full training state (its 'backbone' entry)."""
    obj = load_file(path)
    if isinstance(obj, dict) and "backbone" in obj and isinstance(obj["backbone"], dict):
        obj = obj["backbone"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (name -> tensor) or a training state with a 'backbone' entry")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_into(model, state: dict, source: str) -> None:
    """load_state_dict(strict) with an error naming the first tensor that does not fit, with both shapes."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if name.endswith("num_batches_tracked"):
                continue
            raise ValueError(f"{source}: tensor '{name}' (shape {tuple(tensor.shape)}) is missing")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(tensor.shape)} (wrong --arch or num_features?)")
    extra = [k for k in state if k not in own]
    if extra:
        raise ValueError(f"{source}: unexpected tensor '{extra[0]}' (and {len(extra) - 1} more) for this architecture")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)


def load_backbone(path: str, arch: str, num_features: int = 512, input_size: int = 112, **kwargs):
    model = get_model(arch, num_features=num_features, input_size=input_size, **kwargs)
    load_into(model, read_state_dict(path), path)
    return model.eval()
