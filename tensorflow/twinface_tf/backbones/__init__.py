"""get_model(name): the short names of twinface.registry (r18 ... r200, mbf, mbf_large) as Keras models."""
from twinface.registry import backbone_spec
from twinface_tf.backbones.iresnet import iresnet
from twinface_tf.backbones.mobilefacenet import mobilefacenet


def get_model(name, num_features=512, dropout=0.0, fp16=False, input_size=112):
    """A fresh, randomly initialised backbone named `name` (unknown names raise with the known list)."""
    spec = backbone_spec(name)
    if spec.family == "iresnet":
        return iresnet(spec.kwargs["layers"], num_features, dropout, fp16, input_size, name=name)
    if dropout:
        raise ValueError(f"{name}: MobileFaceNet has no dropout layer, got dropout={dropout}")
    return mobilefacenet(spec.kwargs["blocks"], spec.kwargs["scale"], num_features, fp16, input_size, name=name)
