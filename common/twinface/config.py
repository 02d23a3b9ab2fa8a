"""One experiment config (YAML) that both twins read.

Configs are data: nested sections of typed fields with defaults. Loading checks every key, its type and, for
numbers, its range (RANGES), and fails with the dotted key name, the value and what was expected, so a typo never
silently falls back to a default and a value that would crash or mislead a run later is refused up front.
"""
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

import yaml

from . import registry
from .precision import CHECKPOINTED, PRECISIONS
from .atomic import atomic_path


class ConfigError(ValueError):
    pass


@dataclass
class BackboneConfig:
    name: str = "r50"
    num_features: int = 512
    dropout: float = 0.0
    fp16: bool = False                          # arcface_torch's switch: an alias of train.precision: fp16
    input_size: int = 112
    checkpointing: bool = False                 # IResNet: recompute activations in backward (less memory)


@dataclass
class HeadConfig:
    # `type` picks margin defaults from the registry (arcface, cosface, ...) or "linear" (plain softmax classifier);
    # s/m1/m2/m3 left unset (null) take the registry's values for that type.
    type: str = "arcface"
    s: typing.Optional[float] = None
    m1: typing.Optional[float] = None
    m2: typing.Optional[float] = None
    m3: typing.Optional[float] = None
    interclass_filtering_threshold: float = 0.0
    gradient: str = "straight_through"          # or "analytic"
    easy_margin: bool = False                   # insightface's option: the margin only where cos(theta) > 0
    sample_rate: float = 1.0                    # Partial FC class sampling (1.0 = all classes)
    subcenters: int = 1                         # Sub-center ArcFace: K centres per class, max cosine (margin heads)
    # adaface only (registry.ADAFACE defaults when unset): margin, norm-scaler width, EMA rate of the norm statistics
    m: typing.Optional[float] = None
    h: typing.Optional[float] = None
    t_alpha: typing.Optional[float] = None


@dataclass
class LossConfig:
    type: str = "cross_entropy"                 # or "focal", or "triplet" (on embeddings, with head.type none)
    gamma: float = 2.0                          # focal only
    margin: float = 0.2                         # triplet: d(a, p) + margin <= d(a, n) is satisfied
    mining: str = "batch_hard"                  # triplet: batch_all | batch_hard | semi_hard (docs/losses.md)
    squared: bool = False                       # triplet: squared euclidean distances


@dataclass
class OptimizerConfig:
    type: str = "sgd"                           # or "adamw"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    type: str = "polynomial"                    # polynomial | cosine | step
    warmup_epochs: float = 0.0
    power: float = 2.0                          # polynomial decay exponent (arcface_torch uses 2)
    milestones: typing.List[float] = field(default_factory=list)   # step: epochs where lr *= gamma
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class DataConfig:
    source: str = "synthetic"                   # synthetic | folder | rec | tfrecord
    path: str = "data/synth"                    # synthetic: cache dir; folder: root; rec: dir or prefix; tfrecord: dir
    damaged_records: str = "fail"               # tfrecord: a CRC mismatch / truncated shard stops the run, or "skip"
    num_classes: int = 0                        # 0 = read from the data
    num_workers: int = 2
    synth_identities: int = 1000
    synth_images_per_identity: int = 20
    synth_val_identities: int = 200
    synth_val_pairs: int = 3000
    flip: bool = True                           # random horizontal flip (the only augmentation)
    memory_cache_gb: float = 2.0                # decode the set once into memory if it fits (0 = never)
    sampler: str = "epoch"                      # epoch (shuffled samples) | identity (P identities x K images) |
    #                                             stream (TFRecord shards read in turn, window-shuffled)
    images_per_identity: int = 4                # identity sampler: K (the batch holds batch_size / K identities)
    stream_window: int = 16384                  # stream sampler: records permuted together (a shuffle buffer)
    deterministic: bool = True                  # stream sampler, TF twin: false lets tf.data reorder for speed


@dataclass
class TrainConfig:
    batch_size: int = 128
    epochs: int = 20
    max_steps: int = 0                          # stop after this many steps (0 = train all epochs): smoke runs
    log_every: int = 20                         # steps between progress lines
    checkpoint_every: int = 1                   # epochs between full checkpoints
    max_bad_steps: int = 5                      # NaN/Inf losses tolerated (updates skipped) before the run stops
    clip_grad_norm: float = 5.0                 # backbone gradient norm clip, as arcface_torch (0 = off)
    precision: str = "fp32"                     # fp32 | fp16 (dynamic loss scaling) | bf16; conv trunk only
    loss_scale: float = 65536.0                 # fp16: initial loss scale (torch GradScaler's 2**16)
    loss_scale_growth_interval: int = 100       # fp16: finite steps before the scale doubles (arcface_torch)
    resume: bool = False
    aot_package: bool = False                   # torch: compile backbone.pt2 at the end (AOTInductor; docs/bench.md)
    distributed_timeout_s: float = 1800.0       # several processes: a collective waiting this long fails the run


@dataclass
class FinetuneConfig:
    weights: str = ""                           # backbone checkpoint to start from ("" = from scratch)
    freeze_epochs: float = 0.0                  # backbone frozen for this long, head only
    backbone_lr_scale: float = 0.1              # backbone lr multiplier once unfrozen


@dataclass
class ValConfig:
    bins: typing.List[str] = field(default_factory=list)   # verification .bin files; synthetic adds its own
    flip: bool = True                           # flip test: emb(img) + emb(flip(img))
    batch_size: int = 64


@dataclass
class Config:
    seed: int = 0
    output: str = "runs/default"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def head_params(self) -> dict:
        """Margin parameters with registry defaults filled in (empty for the linear head and for none)."""
        if self.head.type in ("linear", "none"):
            return {}
        params = registry.head_defaults(self.head.type)
        for key in ADAFACE_KEYS if self.head.type == "adaface" else ("s", "m1", "m2", "m3"):
            value = getattr(self.head, key)
            if value is not None:
                params[key] = value
        if self.head.type == "adaface":
            return params
        params["interclass_filtering_threshold"] = self.head.interclass_filtering_threshold
        params["gradient"] = self.head.gradient
        params["easy_margin"] = self.head.easy_margin
        if self.head.subcenters > 1:            # Partial FC, which refuses K > 1, takes no such argument
            params["subcenters"] = self.head.subcenters
        return params

    def triplet_params(self) -> dict:
        return {"margin": self.loss.margin, "mining": self.loss.mining, "squared": self.loss.squared}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ADAFACE_KEYS = ("s", "m", "h", "t_alpha")

CHOICES = {
    "head.type": sorted(registry.HEADS) + ["adaface", "linear", "none"],
    "head.gradient": ["straight_through", "analytic"],
    "loss.type": sorted(registry.LOSSES),
    "loss.mining": list(registry.TRIPLET_MINING),
    "data.sampler": ["epoch", "identity", "stream"],
    "optimizer.type": ["sgd", "adamw"],
    "schedule.type": ["polynomial", "cosine", "step"],
    "data.source": ["synthetic", "folder", "rec", "tfrecord"],
    "data.damaged_records": ["fail", "skip"],
    "train.precision": list(PRECISIONS),
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key):
    origin = typing.get_origin(tp)
    if origin is typing.Union:                                  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):                              # YAML reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys in this section: "
                          f"{', '.join(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: low/high bounds (None = unbounded), each inclusive unless open.
    Floats must also be finite: nan and inf pass no comparison a training could rely on."""
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)          # momentum, betas, dropout: 1 would never forget / drop all

# Every numeric config key and its allowed range (a list key: each element). A test checks that no numeric key
# is missing here, so a new key cannot skip validation.
RANGES = {
    "seed": NON_NEGATIVE,
    "backbone.num_features": AT_LEAST_1,
    "backbone.dropout": FRACTION,
    "backbone.input_size": Range(16),
    "head.s": POSITIVE,                         # s = 0 makes every logit 0: a constant loss
    "head.m1": Range(1),                        # multiplicative angular margin; 1 = none
    "head.m2": Range(0, math.pi, high_open=True),   # additive angular margin (radians)
    "head.m3": Range(0, 1),                     # additive cosine margin
    "head.interclass_filtering_threshold": Range(0, 1),
    "head.sample_rate": Range(0, 1, low_open=True),
    "head.subcenters": AT_LEAST_1,
    "head.m": Range(0, 1),                      # adaface: angular margin +-m, additive margin in [0, 2m]
    "head.h": NON_NEGATIVE,
    "head.t_alpha": Range(0, 1, low_open=True),     # 0 would never move the norm statistics off their start
    "loss.gamma": NON_NEGATIVE,
    "loss.margin": NON_NEGATIVE,
    "optimizer.lr": POSITIVE,
    "optimizer.momentum": FRACTION,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.betas": FRACTION,
    "optimizer.eps": POSITIVE,
    "schedule.warmup_epochs": NON_NEGATIVE,
    "schedule.power": POSITIVE,
    "schedule.milestones": NON_NEGATIVE,
    "schedule.gamma": POSITIVE,
    "schedule.min_lr": NON_NEGATIVE,
    "data.num_classes": NON_NEGATIVE,           # 0 = read from the data
    "data.num_workers": NON_NEGATIVE,
    "data.synth_identities": Range(2),          # different-identity pairs need two identities
    "data.synth_images_per_identity": Range(2),     # same-identity pairs need two images
    "data.synth_val_identities": Range(2),
    "data.synth_val_pairs": Range(2),
    "data.memory_cache_gb": NON_NEGATIVE,
    "data.images_per_identity": Range(2),       # positives need two images of an identity
    "data.stream_window": Range(1),
    "train.batch_size": AT_LEAST_1,
    "train.epochs": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,
    "train.checkpoint_every": AT_LEAST_1,
    "train.max_bad_steps": NON_NEGATIVE,
    "train.distributed_timeout_s": POSITIVE,
    "train.max_steps": NON_NEGATIVE,
    "train.clip_grad_norm": NON_NEGATIVE,       # 0 = off
    "train.loss_scale": Range(1),               # below 1 the scaled loss loses fp16 range instead of gaining it
    "train.loss_scale_growth_interval": AT_LEAST_1,
    "finetune.freeze_epochs": NON_NEGATIVE,
    "finetune.backbone_lr_scale": NON_NEGATIVE,
    "val.batch_size": AT_LEAST_1,
}


def _lookup(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_range(key: str, value, allowed: Range) -> None:
    if value is None:                           # an optional key left unset takes its default elsewhere
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(f"{key}[{i}]", item, allowed)
    elif value not in allowed:
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise ConfigError(f"config key '{key}': expected {kind} {allowed}, got {value!r}")


def _validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': expected one of {allowed}, got {value!r}")
    try:
        registry.backbone_spec(cfg.backbone.name)
    except ValueError as e:
        raise ConfigError(f"config key 'backbone.name': {e}") from None
    for key, allowed in RANGES.items():
        _check_range(key, _lookup(cfg, key), allowed)
    if cfg.backbone.input_size % 16:
        raise ConfigError(f"config key 'backbone.input_size': expected a multiple of 16, got {cfg.backbone.input_size}")
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"config key 'optimizer.betas': expected 2 values [beta1, beta2], got {cfg.optimizer.betas}")
    if cfg.data.sampler == "stream" and cfg.data.source != "tfrecord":
        raise ConfigError(f"config key 'data.sampler' is stream, which reads TFRecord shards in turn; it needs "
                          f"data.source tfrecord, not {cfg.data.source}")
    _check_head_keys(cfg.head)
    _resolve_precision(cfg)
    _check_embedding_loss(cfg)


def _check_embedding_loss(cfg: Config) -> None:
    """A triplet loss scores embeddings, a margin or linear head scores classes: exactly one of them trains."""
    triplet, headless = cfg.loss.type == "triplet", cfg.head.type == "none"
    if triplet != headless:
        raise ConfigError(f"config keys 'loss.type: {cfg.loss.type}' and 'head.type: {cfg.head.type}' do not go "
                          f"together: loss.type triplet trains on embeddings and needs head.type none; every other "
                          f"loss needs a head")
    if cfg.data.sampler == "identity" and cfg.train.batch_size % cfg.data.images_per_identity:
        raise ConfigError(f"config key 'train.batch_size' ({cfg.train.batch_size}) must be a multiple of "
                          f"'data.images_per_identity' ({cfg.data.images_per_identity}) with data.sampler identity "
                          f"(P identities x K images)")
    if cfg.head.type == "adaface" and cfg.train.batch_size < 2:
        raise ConfigError("config key 'train.batch_size' is 1, but head.type adaface standardises the embedding "
                          "norms with the batch's (unbiased) standard deviation: it needs >= 2")
    if headless and cfg.finetune.freeze_epochs > 0:
        raise ConfigError(f"config key 'finetune.freeze_epochs' is {cfg.finetune.freeze_epochs}, but with head.type "
                          f"none a frozen backbone leaves nothing to train; set it to 0")


def _check_head_keys(head: HeadConfig) -> None:
    """Keys that the chosen head type would silently ignore are refused, naming the key."""
    defaults = HeadConfig()
    if head.type == "adaface":
        foreign = [k for k in ("m1", "m2", "m3", "subcenters", "gradient", "easy_margin",
                               "interclass_filtering_threshold")
                   if getattr(head, k) not in (None, getattr(defaults, k))]
        if foreign:
            raise ConfigError(f"config key 'head.{foreign[0]}' does not apply to head.type adaface (its keys: "
                              f"{', '.join('head.' + k for k in ADAFACE_KEYS)}), got {getattr(head, foreign[0])!r}")
        return
    foreign = [k for k in ("m", "h", "t_alpha") if getattr(head, k) is not None]
    if foreign:
        raise ConfigError(f"config key 'head.{foreign[0]}' applies to head.type adaface only, not {head.type!r}")
    if head.type in ("linear", "none") and head.subcenters != 1:
        raise ConfigError(f"config key 'head.subcenters': margin heads only, not head.type '{head.type}', "
                          f"got {head.subcenters}")
    if head.type == "none":
        foreign = [k for k in ("s", "m1", "m2", "m3", "gradient", "easy_margin", "interclass_filtering_threshold",
                               "sample_rate") if getattr(head, k) not in (None, getattr(defaults, k))]
        if foreign:
            raise ConfigError(f"config key 'head.{foreign[0]}' does not apply to head.type none (no head: the "
                              f"triplet loss has loss.margin), got {getattr(head, foreign[0])!r}")


def _resolve_precision(cfg: Config) -> None:
    """arcface_torch's recipes say `fp16: true`; here that reads as train.precision: fp16 (one source of truth
    from then on: both keys agree after loading)."""
    if cfg.backbone.fp16 and cfg.train.precision == "fp32":
        cfg.train.precision = "fp16"
    elif cfg.backbone.fp16 and cfg.train.precision != "fp16":
        raise ConfigError(f"config keys 'backbone.fp16: true' and 'train.precision: {cfg.train.precision}' "
                          f"disagree; backbone.fp16 is an alias of train.precision: fp16, set one of them")
    cfg.backbone.fp16 = cfg.train.precision == "fp16"
    if cfg.backbone.checkpointing and registry.backbone_spec(cfg.backbone.name).family not in CHECKPOINTED:
        raise ConfigError(f"config key 'backbone.checkpointing': IResNets and ResNeXts only, not "
                          f"{cfg.backbone.name!r}")


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data or {})
    _validate(cfg)
    return cfg


def _declared_type(key: str):
    """The type a dotted key is declared with in Config (None for an unknown key: _build reports it)."""
    tp = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _parse_override(text: str):
    """KEY=VALUE with VALUE read as the key's declared type would have it: a string key takes the text verbatim
    (a path named `no`, `on` or `2024` stays a string), a list of strings takes YAML's list syntax with every
    item a string, anything else is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optimizer.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    tp = _declared_type(key)
    if tp is str:
        return key, raw
    try:
        if tp == typing.List[str]:
            return key, yaml.load(raw, Loader=yaml.BaseLoader)      # BaseLoader resolves no scalar types
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {' '.join(str(e).split())}") from None


def apply_overrides(data: dict, overrides) -> dict:
    """Apply `section.key=value` strings (values read as the key's type, see _parse_override) onto a raw config
    dict."""
    for text in overrides or ():
        key, value = _parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load(path: str, overrides=None) -> Config:
    """Read a YAML config; `overrides` are `section.key=value` strings applied on top."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)                            # an empty file is no config: never the defaults
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:                                        # a directory, a symlink loop, no permission
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got "
                          f"{'an empty file' if data is None else type(data).__name__}")
    try:
        return from_dict(apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_resolved(cfg: Config, out_dir: str) -> str:
    """Write the fully resolved config (defaults filled in) into the run directory, atomically."""
    path = os.path.join(out_dir, "config.yaml")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return path
