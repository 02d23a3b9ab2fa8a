"""Short names shared by both twins: backbones, margin heads, losses and their defaults.

The names follow arcface_torch (`r50`, `mbf`, ...) so configs written for it read the same here.
Each twin's `get_model(name, ...)` looks the name up here, so both twins accept exactly the same set.
"""
from dataclasses import dataclass, field

from twinface.macs import count_macs


@dataclass(frozen=True)
class BackboneSpec:
    family: str                     # "iresnet" | "mobilefacenet" | "resnext" | "densenet" | "vit"
    kwargs: dict = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        """Giga multiply-accumulates of one 112x112 image (ptflops' convention), counted from the architecture;
        FLOP/s reports use 2 FLOPs per MAC."""
        return count_macs(self.family, self.kwargs) / 1e9


BACKBONES = {
    "r18": BackboneSpec("iresnet", {"layers": (2, 2, 2, 2)}),
    "r34": BackboneSpec("iresnet", {"layers": (3, 4, 6, 3)}),
    "r50": BackboneSpec("iresnet", {"layers": (3, 4, 14, 3)}),
    "r100": BackboneSpec("iresnet", {"layers": (3, 13, 30, 3)}),
    "r200": BackboneSpec("iresnet", {"layers": (6, 26, 60, 6)}),
    "mbf": BackboneSpec("mobilefacenet", {"blocks": (1, 4, 6, 2), "scale": 2}),
    "mbf_large": BackboneSpec("mobilefacenet", {"blocks": (2, 8, 12, 4), "scale": 4}),
    "resnext50": BackboneSpec("resnext", {"layers": (3, 4, 6, 3), "cardinality": 32, "base_width": 4}),
    "resnext101": BackboneSpec("resnext", {"layers": (3, 4, 23, 3), "cardinality": 32, "base_width": 4}),
    "densenet121": BackboneSpec("densenet", {"blocks": (6, 12, 24, 16), "growth": 32, "init": 64, "bn_size": 4}),
    # arcface_torch's vit_* entries: patch 9, 8 heads, patch masking 0.1 and stochastic depth 0.1 in training
    "vit_t": BackboneSpec("vit", {"dim": 256, "depth": 12, "heads": 8, "mask_ratio": 0.1, "drop_path_rate": 0.1}),
    "vit_s": BackboneSpec("vit", {"dim": 512, "depth": 12, "heads": 8, "mask_ratio": 0.1, "drop_path_rate": 0.1}),
    "vit_b": BackboneSpec("vit", {"dim": 512, "depth": 24, "heads": 8, "mask_ratio": 0.1, "drop_path_rate": 0.1}),
}

# Margin settings of the one combined-margin head: target logit = s * (cos(m1*theta + m2) - m3).
HEADS = {
    "softmax": {"s": 64.0, "m1": 1.0, "m2": 0.0, "m3": 0.0},    # normalised softmax, no margin
    "sphereface": {"s": 64.0, "m1": 1.35, "m2": 0.0, "m3": 0.0},
    "arcface": {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},
    "cosface": {"s": 64.0, "m1": 1.0, "m2": 0.0, "m3": 0.4},
    "combined": {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
}

# AdaFace (Kim et al. 2022): its own head, not a margin setting; the official defaults (docs/heads.md).
ADAFACE = {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01}

LOSSES = {
    "cross_entropy": {},
    "focal": {"gamma": 2.0},
    "triplet": {"margin": 0.2, "mining": "batch_hard", "squared": False},
}
TRIPLET_MINING = ("batch_all", "batch_hard", "semi_hard")


def _lookup(table, kind, name):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def backbone_spec(name: str) -> BackboneSpec:
    return _lookup(BACKBONES, "backbone", name)


# Families whose reference architecture has no dropout layer: both twins' get_model refuse `dropout` for them.
NO_DROPOUT = {"mobilefacenet": "MobileFaceNet", "vit": "arcface_torch's ViT"}


def check_dropout(name: str, dropout: float) -> None:
    family = backbone_spec(name).family
    if dropout and family in NO_DROPOUT:
        raise ValueError(f"{name}: {NO_DROPOUT[family]} has no dropout layer, got dropout={dropout}")


def head_defaults(name: str) -> dict:
    return dict(ADAFACE if name == "adaface" else _lookup(HEADS, "head", name))


def margin_settings(name: str, overrides: dict) -> dict:
    """Keyword arguments of a MarginHead called `name`: the registry's settings with `overrides` on top.
    Both twins' get_head use it ("linear" is the one head that is not a margin setting)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(sorted([*HEADS, 'adaface', 'linear']))}")
    return {**HEADS[name], **overrides}


def check_subcenters(who: str, subcenters) -> int:
    """Sub-center ArcFace's K (centres per class), as both twins' MarginHead take it."""
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or subcenters < 1:
        raise ValueError(f"{who}: subcenters must be an integer >= 1, got {subcenters!r}")
    return subcenters


def loss_defaults(name: str) -> dict:
    return dict(_lookup(LOSSES, "loss", name))
