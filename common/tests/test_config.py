import pathlib

import pytest
import yaml

from twinface import config

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config.load(str(path))
    assert cfg.backbone.name


def test_defaults_and_head_params_fill_from_registry():
    cfg = config.from_dict({"head": {"type": "cosface"}})
    assert cfg.head_params()["m3"] == 0.4 and cfg.head_params()["m2"] == 0.0 and cfg.head_params()["s"] == 64.0
    cfg = config.from_dict({"head": {"type": "arcface", "m2": 0.3}})
    assert cfg.head_params()["m2"] == 0.3
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
    ({"train": {"batch_size": 0}}, r"'train.batch_size': expected a positive number"),
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
