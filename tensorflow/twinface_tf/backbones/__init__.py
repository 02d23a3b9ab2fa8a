"""get_model(name): the short names of twinface.registry (r18 ... r200, mbf, mbf_large, resnext50, resnext101,
densenet121, vit_t, vit_s, vit_b) as Keras models."""
from twinface.precision import check_checkpointing
from twinface.registry import backbone_spec, check_dropout
from twinface_tf.backbones.densenet import densenet
from twinface_tf.backbones.iresnet import iresnet
from twinface_tf.backbones.mobilefacenet import mobilefacenet
from twinface_tf.backbones.resnext import resnext
from twinface_tf.backbones.vit import vit


def get_model(name, num_features=512, dropout=0.0, fp16=False, input_size=112, precision=None, checkpointing=False):
    """A fresh, randomly initialised backbone named `name` (unknown names raise with the known list).

    precision "fp32" | "fp16" | "bf16" (None: arcface_torch's `fp16` flag) for the conv trunk; checkpointing
    recomputes each IResNet / ResNeXt block in backprop instead of keeping its activations (training only).
    """
    spec = backbone_spec(name)
    check_checkpointing(name, checkpointing)
    check_dropout(name, dropout)
    if spec.family == "iresnet":
        return iresnet(spec.kwargs["layers"], num_features, dropout, fp16, input_size, name=name,
                       precision=precision, checkpointing=checkpointing)
    if spec.family == "densenet":
        return densenet(**spec.kwargs, num_features=num_features, dropout=dropout, fp16=fp16, input_size=input_size,
                        name=name, precision=precision)
    if spec.family == "resnext":
        return resnext(spec.kwargs["layers"], spec.kwargs["cardinality"], spec.kwargs["base_width"], num_features,
                       dropout, fp16, input_size, name=name, precision=precision, checkpointing=checkpointing)
    if spec.family == "vit":
        return vit(**spec.kwargs, num_features=num_features, fp16=fp16, input_size=input_size, name=name,
                   precision=precision)
    return mobilefacenet(spec.kwargs["blocks"], spec.kwargs["scale"], num_features, fp16, input_size, name=name,
                         precision=precision)
