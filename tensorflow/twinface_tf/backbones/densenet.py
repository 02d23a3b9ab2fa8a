"""Face-adapted DenseNet-BC (pytorch twin backbones/densenet.py) as a Keras functional model.

Initialisation as the torch twin: he_uniform (kaiming uniform, fan_in) kernels, zero fc bias. Layer names are
the torch module paths: `denseblock<i>.denselayer<j>.{norm1,relu1,conv1,norm2,relu2,conv2}`,
`transition<i>.{norm,relu,conv,pool}`. Channels are concatenated on the last (NHWC) axis, old ones first,
so channel c is channel c of the torch twin and every kernel maps 1:1.
"""
import keras

from twinface.densenet import dense_stages
from twinface.precision import resolve_precision
from twinface_tf.layers import POLICIES, FaceModel, TorchBatchNorm, conv, prelu


def dense_layer(x, growth, bn_size, name, dtype):
    width = bn_size * growth
    y = TorchBatchNorm(name=f"{name}.norm1", dtype=dtype)(x)
    y = prelu(f"{name}.relu1", dtype)(y)
    y = conv(y, width, 1, f"{name}.conv1", kernel_initializer="he_uniform", dtype=dtype)
    y = TorchBatchNorm(name=f"{name}.norm2", dtype=dtype)(y)
    y = prelu(f"{name}.relu2", dtype)(y)
    y = conv(y, growth, 3, f"{name}.conv2", padding=1, kernel_initializer="he_uniform", dtype=dtype)
    return keras.layers.Concatenate(name=f"{name}.cat", dtype=dtype)([x, y])


def transition(x, out, name, dtype):
    x = TorchBatchNorm(name=f"{name}.norm", dtype=dtype)(x)
    x = prelu(f"{name}.relu", dtype)(x)
    x = conv(x, out, 1, f"{name}.conv", kernel_initializer="he_uniform", dtype=dtype)
    return keras.layers.AveragePooling2D(2, 2, name=f"{name}.pool", dtype=dtype)(x)


def densenet(blocks=(6, 12, 24, 16), growth=32, init=64, bn_size=4, num_features=512, dropout=0.0, fp16=False,
             input_size=112, name="densenet", precision=None):
    """Input [N, input_size, input_size, 3] float32, normalised (x - 127.5) / 127.5; output [N, num_features].

    precision "fp16" / "bf16" (or fp16=True) runs the trunk under "mixed_float16" / "mixed_bfloat16" and
    fc/features in float32, as IResNet.
    """
    if input_size <= 0 or input_size % 16:
        raise ValueError(f"{name}: input_size must be a positive multiple of 16 (max pool and three transitions "
                         f"of stride 2), got {input_size}")
    trunk = POLICIES[resolve_precision(name, precision, fp16)]
    inputs = keras.Input((input_size, input_size, 3), name="data", dtype="float32")
    x = conv(inputs, init, 3, "conv0", padding=1, kernel_initializer="he_uniform", dtype=trunk)
    x = TorchBatchNorm(name="norm0", dtype=trunk)(x)
    x = keras.layers.ReLU(name="relu0", dtype=trunk)(x)
    # torch MaxPool2d(3, 2, padding=1) pads with -inf; after the ReLU zeros give the same maxima.
    x = keras.layers.ZeroPadding2D(1, name="pool0.pad", dtype=trunk)(x)
    x = keras.layers.MaxPooling2D(3, 2, name="pool0", dtype=trunk)(x)
    for i, ((_, _, halved), layers) in enumerate(zip(dense_stages(init, growth, blocks), blocks), start=1):
        for j in range(1, layers + 1):
            x = dense_layer(x, growth, bn_size, f"denseblock{i}.denselayer{j}", trunk)
        if halved:
            x = transition(x, halved, f"transition{i}", trunk)
    x = TorchBatchNorm(name="bn2", dtype=trunk)(x)
    # Flatten in torch's NCHW order, so fc.kernel is exactly the transpose of torch's fc.weight.
    x = keras.layers.Permute((3, 1, 2), name="flatten.transpose", dtype=trunk)(x)
    x = keras.layers.Flatten(name="flatten", dtype=trunk)(x)
    x = keras.layers.Dropout(dropout, name="dropout", dtype=trunk)(x)
    x = keras.layers.Dense(num_features, kernel_initializer="he_uniform", bias_initializer="zeros", name="fc",
                           dtype="float32")(x)
    x = TorchBatchNorm(gamma_trainable=False, name="features", dtype="float32")(x)
    return FaceModel(inputs, x, name=name)
