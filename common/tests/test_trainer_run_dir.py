"""The run directory's guards, without a framework: the lock, and which config changes a resume may make."""
import pytest
import yaml

from twinface import config, run_dir


def _saved(tmp_path, **sections):
    cfg = config.from_dict({"output": str(tmp_path), **sections})
    config.save_resolved(cfg, str(tmp_path))
    return cfg


def test_a_second_lock_on_the_directory_names_the_holder(tmp_path):
    with run_dir.RunLock(str(tmp_path)):
        with pytest.raises(run_dir.RunLocked, match=rf"{tmp_path}: another training \(pid \d+\) is running"):
            with run_dir.RunLock(str(tmp_path)):
                pass
    with run_dir.RunLock(str(tmp_path)):           # released on exit
        pass


def test_resume_config_changes_are_split_into_breaking_and_safe(tmp_path):
    _saved(tmp_path, train={"batch_size": 16, "epochs": 2}, head={"type": "arcface"})
    now = config.from_dict({"output": "elsewhere", "seed": 1, "train": {"batch_size": 8, "epochs": 5, "log_every": 7},
                            "head": {"type": "cosface"}, "val": {"batch_size": 8}, "data": {"num_workers": 0}})
    breaking, safe = run_dir.config_changes(str(tmp_path), now)
    assert [c.split(":")[0] for c in breaking] == ["head.m2", "head.m3", "head.type", "seed", "train.batch_size"]
    assert "train.batch_size: 16 -> 8" in breaking
    assert [c.split(":")[0] for c in safe] == ["data.num_workers", "output", "train.epochs", "train.log_every",
                                              "val.batch_size"]


def test_a_margin_written_out_at_its_default_is_no_change(tmp_path):
    _saved(tmp_path, head={"type": "arcface"})
    assert run_dir.config_changes(str(tmp_path), config.from_dict({"output": str(tmp_path),
                                                                   "head": {"type": "arcface", "m2": 0.5}})) == ([], [])


def test_an_unreadable_saved_config_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"no_such_key": 1}}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.yaml'} is not a readable twinface config"):
        run_dir.config_changes(str(tmp_path), config.from_dict({}))
