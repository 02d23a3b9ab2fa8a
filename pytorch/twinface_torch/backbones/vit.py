"""ViT as in insightface's arcface_torch (backbones/vit.py): vit_t, vit_s, vit_b.

Module names and nesting are arcface_torch's, so its ViT `backbone.pth` (pos_embed, mask_token, patch_embed.proj,
blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, feature.0-3) loads with strict=True.
Training draws its randomness (patch masking, stochastic depth) through `noise` hooks (set_noise), so a test
can feed both twins the same numbers.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from twinface.precision import resolve_precision
from twinface.vit import LN_EPS, MLP_RATIO, PATCH, check_vit_input_size, drop_path_rates, kept_tokens
from twinface_torch.backbones.iresnet import check_input, trunk_precision


def uniform(module, shape, like):
    """U[0, 1) noise of `shape`: module.noise(shape) when a test set one, else torch.rand."""
    if module.noise is not None:
        return torch.as_tensor(module.noise(shape), dtype=torch.float32, device=like.device)
    return torch.rand(shape, device=like.device)


def at_least_fp32(x):
    """arcface_torch's .float() under mixed precision, without lowering a float64 run (a test's exact reference)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def set_noise(model, noise):
    """Make every random draw of `model` (masking, stochastic depth) call noise(shape), in forward order."""
    for m in model.modules():
        if hasattr(m, "noise"):
            m.noise = noise


class DropPath(nn.Module):
    """Stochastic depth (timm's drop_path): per sample, the branch is dropped with probability p, else scaled by
    1 / (1 - p). The keep mask floor(1 - p + u) is timm's classic bernoulli draw from uniform noise u."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.noise = None

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = torch.floor(keep + uniform(self, (x.shape[0], 1, 1), x)).to(x.dtype)
        return x * (mask / keep)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()       # arcface_torch's act_layer default, not GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    fused = False       # set by fused_attention (inference tracing) only

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # Scores, softmax and the weighted sum in fp32 even under mixed precision, as arcface_torch.
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = (at_least_fp32(t) for t in qkv.unbind(0))
            if self.fused:
                x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            else:
                x = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
            x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(x)


@contextlib.contextmanager
def fused_attention(model):
    """Every Attention of `model` through torch's fused kernel (scaled_dot_product_attention) for the block, the
    same function up to float rounding: 1.5x faster ViT-T inference on CPU (docs/bench.md). For tracing the
    frozen inference copy only: the module's own path stays the reference's decomposed one, which ONNX opsets
    below 14 (arcface_torch's torch2onnx uses 11) can express and the fused op cannot."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attentions:
        m.fused = True
    try:
        yield
    finally:
        for m in attentions:
            m.fused = False


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)      # [N, tokens, dim], tokens in row-major grid order


class VisionTransformer(nn.Module):
    def __init__(self, dim, depth, heads, mask_ratio, drop_path_rate, num_features=512, fp16=False,
                 input_size=112, arch="vit", precision=None):
        super().__init__()
        side = check_vit_input_size(arch, input_size)
        self.arch = arch
        self.precision = resolve_precision(arch, precision, fp16)
        self.input_size = input_size
        self.num_patches, self.dim = side * side, dim
        self.mask_ratio = mask_ratio
        self.noise = None
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, p) for p in drop_path_rates(drop_path_rate, depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # arcface_torch's init: timm's trunc_normal_(std=.02) (bounds +-2, i.e. +-100 std) on pos_embed and
        # every Linear, zero Linear biases, LayerNorm 1 / 0, normal(std=.02) mask_token; Conv2d / BN default.
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def random_masking(self, x):
        """Keep kept_tokens(L) tokens per sample, those with the smallest noise; also the permutation undoing it."""
        n, tokens, dim = x.shape
        ids_shuffle = torch.argsort(uniform(self, (n, tokens), x), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        keep = ids_shuffle[:, :kept_tokens(tokens, self.mask_ratio)]
        return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, dim)), ids_restore

    def forward(self, x):
        check_input(x, self.arch, self.input_size)
        masking = self.training and self.mask_ratio > 0
        with trunk_precision(x, self.precision):
            x = self.patch_embed(x) + self.pos_embed
            if masking:
                x, ids_restore = self.random_masking(x)
            for block in self.blocks:
                x = block(x)
        x = self.norm(at_least_fp32(x))
        if masking:
            # masked places get mask_token (after the final norm, as arcface_torch), then the grid order returns
            fill = self.mask_token.expand(x.shape[0], self.num_patches - x.shape[1], -1)
            x = torch.gather(torch.cat([x, fill], dim=1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, self.dim))
        return self.feature(x.reshape(x.shape[0], self.num_patches * self.dim))
