"""IResNet (arcface_torch backbones/iresnet.py) as Keras functional models; layer names are torch module paths."""
import keras

from twinface.precision import resolve_precision
from twinface_tf.layers import POLICIES, FaceModel, TorchBatchNorm, conv, prelu, torch_linear_init


def conv_init():
    # arcface_torch: nn.init.normal_(conv.weight, 0, 0.1)
    return keras.initializers.RandomNormal(0.0, 0.1)


def basic_block(x, planes, stride, name, dtype):
    """IBasicBlock: bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3 (stride) -> bn3, plus the identity.

    The identity goes through downsample (1x1 conv with stride, BN) when the shape changes; no activation
    after the add.
    """
    out = TorchBatchNorm(name=f"{name}.bn1", dtype=dtype)(x)
    out = conv(out, planes, 3, f"{name}.conv1", padding=1, kernel_initializer=conv_init(), dtype=dtype)
    out = TorchBatchNorm(name=f"{name}.bn2", dtype=dtype)(out)
    out = prelu(f"{name}.prelu", dtype)(out)
    out = conv(out, planes, 3, f"{name}.conv2", stride=stride, padding=1, kernel_initializer=conv_init(),
               dtype=dtype)
    out = TorchBatchNorm(name=f"{name}.bn3", dtype=dtype)(out)
    return residual_add(x, out, stride, name, dtype)


def residual_add(x, out, stride, name, dtype):
    """out + the block's input `x`, through downsample (1x1 conv with stride, BN) when the shape changes."""
    identity = x
    if stride != 1 or x.shape[-1] != out.shape[-1]:
        identity = conv(x, out.shape[-1], 1, f"{name}.downsample.0", stride=stride, kernel_initializer=conv_init(),
                        dtype=dtype)
        identity = TorchBatchNorm(name=f"{name}.downsample.1", dtype=dtype)(identity)
    return keras.layers.Add(name=f"{name}.add", dtype=dtype)([out, identity])


def iresnet(layers, num_features=512, dropout=0.0, fp16=False, input_size=112, name="iresnet", precision=None,
            checkpointing=False, block=basic_block):
    """IResNet with `layers` blocks per stage (widths 64/128/256/512, each stage starts with stride 2);
    `block(x, planes, stride, name, dtype)` builds each residual block (ResNeXt passes its bottleneck).

    Input [N, input_size, input_size, 3] float32, normalised (x - 127.5) / 127.5; output [N, num_features].
    precision "fp16" / "bf16" (or fp16=True) runs the conv trunk under "mixed_float16" / "mixed_bfloat16" and
    fc/features in float32, as arcface_torch's autocast; checkpointing recomputes each block in backprop.
    """
    if input_size <= 0 or input_size % 16:
        raise ValueError(f"{name}: input_size must be a positive multiple of 16 (four stride-2 stages), "
                         f"got {input_size}")
    trunk = POLICIES[resolve_precision(name, precision, fp16)]
    inputs = keras.Input((input_size, input_size, 3), name="data", dtype="float32")
    x = conv(inputs, 64, 3, "conv1", padding=1, kernel_initializer=conv_init(), dtype=trunk)
    x = TorchBatchNorm(name="bn1", dtype=trunk)(x)
    x = prelu("prelu", trunk)(x)
    block_ends = [x]
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for i in range(blocks):
            x = block(x, planes, 2 if i == 0 else 1, f"layer{stage}.{i}", trunk)
            block_ends.append(x)
    x = TorchBatchNorm(name="bn2", dtype=trunk)(x)
    # Flatten in torch's NCHW order, so fc.kernel is exactly the transpose of torch's fc.weight.
    x = keras.layers.Permute((3, 1, 2), name="flatten.transpose", dtype=trunk)(x)
    x = keras.layers.Flatten(name="flatten", dtype=trunk)(x)
    x = keras.layers.Dropout(dropout, name="dropout", dtype=trunk)(x)
    fan_in = x.shape[-1]
    x = keras.layers.Dense(num_features, kernel_initializer=torch_linear_init(fan_in),
                           bias_initializer=torch_linear_init(fan_in), name="fc", dtype="float32")(x)
    x = TorchBatchNorm(gamma_trainable=False, name="features", dtype="float32")(x)
    model = FaceModel(inputs, x, name=name)
    if checkpointing:
        model.checkpoint_between(block_ends)
    return model


def iresnet18(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return iresnet((2, 2, 2, 2), num_features, dropout, fp16, input_size, "iresnet18", **options)


def iresnet34(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return iresnet((3, 4, 6, 3), num_features, dropout, fp16, input_size, "iresnet34", **options)


def iresnet50(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return iresnet((3, 4, 14, 3), num_features, dropout, fp16, input_size, "iresnet50", **options)


def iresnet100(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return iresnet((3, 13, 30, 3), num_features, dropout, fp16, input_size, "iresnet100", **options)


def iresnet200(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return iresnet((6, 26, 60, 6), num_features, dropout, fp16, input_size, "iresnet200", **options)
