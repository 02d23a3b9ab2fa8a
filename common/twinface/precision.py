"""What a backbone's `precision`, arcface_torch's `fp16` flag and `checkpointing` mean, for both twins.

"fp16" / "bf16" run the conv trunk in that type (torch autocast, Keras "mixed_float16" / "mixed_bfloat16");
the embedding layers, BatchNorm statistics and every variable stay fp32 (docs/design.md, "Mixed precision").
"""
from twinface.registry import backbone_spec

PRECISIONS = ("fp32", "fp16", "bf16")
CHECKPOINTED = ("iresnet", "resnext")       # families whose residual blocks are recomputed one by one


def resolve_precision(owner: str, precision=None, fp16: bool = False) -> str:
    """`precision`, or when None "fp16" if `fp16` else "fp32"; fp16=True with another precision is refused."""
    if precision is None:
        return "fp16" if fp16 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if fp16 and precision != "fp16":
        raise ValueError(f"{owner}: fp16=True contradicts precision={precision!r}; set only one of them")
    return precision


def check_checkpointing(name: str, checkpointing: bool) -> None:
    """Gradient checkpointing (backbone.checkpointing) exists for IResNet (as in arcface_torch) and ResNeXt."""
    family = backbone_spec(name).family
    if checkpointing and family not in CHECKPOINTED:
        raise ValueError(f"{name}: gradient checkpointing (backbone.checkpointing) exists for IResNet and ResNeXt "
                         f"only, not for {family}")
