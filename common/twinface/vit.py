"""Shapes and schedules of arcface_torch's ViT (backbones/vit.py) that both twins share.

arcface_torch builds vit_t / vit_s / vit_b with patch 9 on 112x112 (a 12x12 grid, 144 tokens, no cls token),
MLP ratio 4, qkv without bias, LayerNorm with torch's default eps, ReLU6 in the MLP, patch masking (in training)
and stochastic depth rising linearly over the blocks.
"""
PATCH = 9
MLP_RATIO = 4
LN_EPS = 1e-5         # nn.LayerNorm(dim): torch's default eps, not timm's 1e-6


def check_vit_input_size(arch: str, input_size: int) -> int:
    """The side of the patch grid, input_size // 9 (arcface_torch's Conv2d drops the remainder)."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < PATCH:
        raise ValueError(f"{arch}: input_size must be an integer >= the patch size {PATCH}, got {input_size!r}")
    return input_size // PATCH


def kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens that random masking keeps in training: int(L * (1 - mask_ratio)), as arcface_torch."""
    return int(num_tokens * (1 - mask_ratio))


def drop_path_rates(rate: float, depth: int) -> list:
    """Stochastic-depth rate of each block: linear from 0 to `rate` (arcface_torch's torch.linspace, in float64
    here so that both twins use the very same numbers)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def input_size_of_grid(side: int) -> int:
    """The input size a checkpoint with a side x side patch grid was built for. The nine sizes 9 * side ..
    9 * side + 8 give that grid; take the multiple of 16 among them (twinface configs use multiples of 16: 112 for
    arcface_torch's 12x12, 32 for 3x3), else the smallest, 9 * side."""
    return next((s for s in range(PATCH * side, PATCH * side + PATCH) if s % 16 == 0), PATCH * side)
