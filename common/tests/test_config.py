import dataclasses
import math
import pathlib
import typing

import pytest
import yaml

from twinface import config, registry

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config.load(str(path))
    assert cfg.backbone.name


def test_defaults_and_head_params_fill_from_registry():
    cfg = config.from_dict({"head": {"type": "cosface"}})
    assert cfg.head_params()["m3"] == 0.4 and cfg.head_params()["m2"] == 0.0 and cfg.head_params()["s"] == 64.0
    cfg = config.from_dict({"head": {"type": "arcface", "m2": 0.3}})
    assert cfg.head_params()["m2"] == 0.3 and cfg.head_params()["easy_margin"] is False
    assert config.from_dict({"head": {"type": "arcface", "easy_margin": True}}).head_params()["easy_margin"] is True
    assert config.from_dict({"head": {"type": "linear"}}).head_params() == {}


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(config.ConfigError, match=r"unknown config key 'optimizer.lrr'.*optimizer.lr"):
        config.from_dict({"optimizer": {"lrr": 0.1}})
    with pytest.raises(config.ConfigError, match=r"unknown config key 'bogus'"):
        config.from_dict({"bogus": 1})


@pytest.mark.parametrize("data,match", [
    ({"optimizer": {"lr": "fast"}}, r"'optimizer.lr': expected float, got str 'fast'"),
    ({"train": {"batch_size": 1.5}}, r"'train.batch_size': expected int"),
    ({"train": {"batch_size": True}}, r"'train.batch_size': expected int"),
    ({"val": {"bins": "lfw.bin"}}, r"'val.bins': expected a list"),
    ({"backbone": "r50"}, r"'backbone': expected a section"),
    ({"head": {"type": "arcfce"}}, r"'head.type': expected one of"),
    ({"backbone": {"name": "r51"}}, r"unknown backbone 'r51'; known: .*r50"),
    ({"train": {"batch_size": 0}}, r"'train.batch_size': expected an integer >= 1, got 0"),
    ({"backbone": {"input_size": 100}}, r"multiple of 16"),
])
def test_ill_typed_values_fail_with_key_and_expectation(data, match):
    with pytest.raises(config.ConfigError, match=match):
        config.from_dict(data)


def test_yaml_scientific_notation_strings_read_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  weight_decay: 5e-4\n")          # PyYAML reads this as a string
    assert config.load(str(path)).optimizer.weight_decay == 5e-4


def test_overrides_and_resolved_config_round_trip(tmp_path):
    cfg = config.load(str(ROOT / "configs/default.yaml"), ["optimizer.lr=0.05", "val.bins=[a.bin, b.bin]"])
    assert cfg.optimizer.lr == 0.05 and cfg.val.bins == ["a.bin", "b.bin"]
    written = config.save_resolved(cfg, str(tmp_path / "run"))
    again = config.from_dict(yaml.safe_load(open(written)))
    assert again == cfg
    with pytest.raises(config.ConfigError, match="KEY=VALUE"):
        config.apply_overrides({}, ["optimizer.lr"])


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(config.ConfigError, match="not found: .*missing.yaml"):
        config.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batch_size: [\n")
    with pytest.raises(config.ConfigError, match="bad.yaml is not valid YAML"):
        config.load(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train: {epochs: many}\n")
    with pytest.raises(config.ConfigError, match=r"typo.yaml: config key 'train.epochs'"):
        config.load(str(typo))


# Each value a user reported accepted at load and failing later (or silently training nonsense).
@pytest.mark.parametrize("key,value,allowed", [
    ("train.checkpoint_every", 0, ">= 1"),
    ("train.log_every", 0, ">= 1"),
    ("val.batch_size", 0, ">= 1"),
    ("data.num_workers", -3, ">= 0"),
    ("head.s", 0.0, "> 0"),
    ("head.s", -64.0, "> 0"),
    ("optimizer.lr", math.nan, "> 0"),
    ("optimizer.lr", math.inf, "> 0"),
    ("optimizer.momentum", -5.0, "in [0, 1)"),
    ("optimizer.weight_decay", math.nan, ">= 0"),
    ("optimizer.eps", 0.0, "> 0"),
    ("loss.gamma", math.nan, ">= 0"),
    ("schedule.warmup_epochs", -1.0, ">= 0"),
    ("train.epochs", 0, ">= 1"),
    ("train.clip_grad_norm", -1.0, ">= 0"),
    ("backbone.dropout", 1.0, "in [0, 1)"),
    ("head.sample_rate", 0.0, "in (0, 1]"),
])
def test_out_of_range_values_are_refused_at_load_naming_key_value_and_range(key, value, allowed):
    section, name = key.split(".")
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({section: {name: value}})
    kind = "an integer" if isinstance(value, int) else "a finite number"
    assert str(err.value) == f"config key '{key}': expected {kind} {allowed}, got {value!r}"


def test_list_items_are_checked_one_by_one():
    with pytest.raises(config.ConfigError,
                       match=r"'optimizer.betas\[1\]': expected a finite number in \[0, 1\), got 1.0"):
        config.from_dict({"optimizer": {"betas": [0.9, 1.0]}})
    with pytest.raises(config.ConfigError, match=r"'optimizer.betas': expected 2 values"):
        config.from_dict({"optimizer": {"betas": [0.9]}})
    with pytest.raises(config.ConfigError, match=r"'schedule.milestones\[1\]': expected a finite number >= 0"):
        config.from_dict({"schedule": {"milestones": [3, -1]}})


def _numeric_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, prefix + f.name + ".")
        elif {int, float} & {tp, *typing.get_args(tp)}:        # int, float, Optional[float], List[float]
            yield prefix + f.name


def test_every_numeric_key_has_a_range_and_the_boundaries_are_accepted():
    keys = sorted(_numeric_keys(config.Config))
    assert len(keys) > 30 and sorted(config.RANGES) == keys
    for key, allowed in config.RANGES.items():          # the inclusive lower bound itself is a valid value
        if allowed.low is not None and not allowed.low_open and key != "backbone.input_size":
            section, _, name = key.rpartition(".")
            value = [allowed.low] * 2 if key in ("optimizer.betas", "schedule.milestones") else allowed.low
            data = {section: {name: value}} if section else {name: value}
            if key in ("head.m", "head.h", "head.t_alpha"):                 # AdaFace's own keys
                data["head"]["type"] = "adaface"
            assert config.from_dict(data) is not None
    for head, margins in registry.HEADS.items():        # the registry's own margins are in range
        assert config.from_dict({"head": {"type": head, **margins}}).head_params()["s"] == margins["s"]


def test_set_values_take_the_key_type_so_string_keys_stay_strings():
    data = config.apply_overrides({}, ["output=no", "data.path=2024", "finetune.weights=on", "val.bins=[no, 2024]",
                                       "optimizer.lr=0.05", "train.resume=true", "head.s=null"])
    cfg = config.from_dict(data)
    assert (cfg.output, cfg.data.path, cfg.finetune.weights) == ("no", "2024", "on")
    assert cfg.val.bins == ["no", "2024"]
    assert cfg.optimizer.lr == 0.05 and cfg.train.resume is True and cfg.head.s is None
    with pytest.raises(config.ConfigError, match=r"'train.epochs': expected int, got str 'many'"):
        config.from_dict(config.apply_overrides({}, ["train.epochs=many"]))


def test_a_config_path_that_is_a_directory_or_a_symlink_loop_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match=f"config file {tmp_path}: Is a directory"):
        config.load(str(tmp_path))
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    with pytest.raises(config.ConfigError, match=r"loop.yaml: Too many levels of symbolic links"):
        config.load(str(loop))


def test_precision_takes_arcface_torch_fp16_as_an_alias_and_refuses_contradictions():
    assert config.from_dict({}).train.precision == "fp32"
    recipe = config.from_dict({"backbone": {"fp16": True}})                   # arcface_torch's recipes
    assert recipe.train.precision == "fp16" and recipe.backbone.fp16
    bf16 = config.from_dict({"train": {"precision": "bf16"}})
    assert bf16.train.precision == "bf16" and not bf16.backbone.fp16
    with pytest.raises(config.ConfigError, match=r"'backbone.fp16: true' and 'train.precision: bf16' disagree"):
        config.from_dict({"backbone": {"fp16": True}, "train": {"precision": "bf16"}})
    with pytest.raises(config.ConfigError, match=r"'train.precision': expected one of \['fp32', 'fp16', 'bf16'\]"):
        config.from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(config.ConfigError, match=r"'train.loss_scale': expected a finite number >= 1, got 0.5"):
        config.from_dict({"train": {"precision": "fp16", "loss_scale": 0.5}})


def test_gradient_checkpointing_is_for_iresnets():
    assert config.from_dict({"backbone": {"name": "r50", "checkpointing": True}}).backbone.checkpointing
    with pytest.raises(config.ConfigError, match=r"'backbone.checkpointing': IResNets and ResNeXts only, not 'mbf'"):
        config.from_dict({"backbone": {"name": "mbf", "checkpointing": True}})


def test_subcentres_and_adaface_keys_fill_from_the_registry_and_foreign_keys_are_refused():
    cfg = config.from_dict({"head": {"type": "cosface", "subcenters": 3}})
    assert cfg.head_params()["subcenters"] == 3 and cfg.head_params()["m3"] == 0.4
    assert "subcenters" not in config.from_dict({}).head_params()      # K = 1: the plain head, as before
    assert config.from_dict({"head": {"type": "adaface"}}).head_params() == registry.ADAFACE
    assert config.from_dict({"head": {"type": "adaface", "h": 0.5}}).head_params()["h"] == 0.5
    refused = [({"type": "adaface", "m2": 0.5}, r"'head.m2' does not apply to head.type adaface"),
               ({"type": "adaface", "subcenters": 2}, r"'head.subcenters' does not apply to head.type adaface"),
               ({"type": "adaface", "gradient": "analytic"}, r"'head.gradient' does not apply to head.type adaface"),
               ({"type": "arcface", "t_alpha": 0.1}, r"'head.t_alpha' applies to head.type adaface only"),
               ({"type": "linear", "subcenters": 2}, r"'head.subcenters': margin heads only"),
               ({"type": "none", "subcenters": 2}, r"'head.subcenters': margin heads only, not head.type 'none'"),
               ({"type": "arcface", "subcenters": 0}, r"'head.subcenters': expected an integer >= 1, got 0"),
               ({"type": "adaface", "t_alpha": 0.0}, r"'head.t_alpha': expected a finite number in \(0, 1\]")]
    for head, match in refused:
        with pytest.raises(config.ConfigError, match=match):
            config.from_dict({"head": head})


@pytest.mark.parametrize("head", [{"type": "adaface"}, {"type": "arcface", "subcenters": 2}])
def test_partial_fc_refuses_adaface_and_subcentres(head):
    from twinface import partial_fc
    partial_fc.check_supported(config.from_dict({"head": head}), 1)             # one process, every class: fine
    for world, rate in ((2, 1.0), (1, 0.5)):
        with pytest.raises(ValueError, match=r"Partial FC, which supports neither head.type adaface nor "
                                             r"head.subcenters > 1"):
            partial_fc.check_supported(config.from_dict({"head": {**head, "sample_rate": rate}}), world)
