"""Backbone files in Keras' own format (`backbone.weights.h5`, `model.load_weights` reads it), written atomically."""
from twinface.atomic import atomic_path

from .backbones import get_model


def save_backbone(model, path: str) -> None:
    if not path.endswith(".weights.h5"):
        raise ValueError(f"{path}: Keras weights files must end with '.weights.h5'")
    with atomic_path(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)


def load_into(model, path: str) -> None:
    try:
        model.load_weights(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # Keras reports shape/structure mismatches with many exception types
        raise ValueError(f"{path}: does not fit {model.name} ({type(e).__name__}: {e}); wrong --arch or num_features?") \
            from None


def load_backbone(path: str, arch: str, num_features: int = 512, input_size: int = 112, **kwargs):
    model = get_model(arch, num_features=num_features, input_size=input_size, **kwargs)
    load_into(model, path)
    return model
