"""--runtime auto's decision: the fastest measured runtime, remembered per machine, model and batch, measured again
when any of them changes; a runtime that fails is left out, not fatal. The real measurement and conversion run in
weights_convert/tests/test_runtime_cli.py."""
import json

import pytest

from twinface import runtime


class Clock:
    """A stand-in for the child-process measurement: fixed milliseconds per runtime, calls counted."""

    def __init__(self, ms, failing=()):
        self.ms, self.failing, self.calls = ms, failing, []

    def __call__(self, weights, framework, name, arch, model_kwargs, batch):
        self.calls.append((name, batch))
        if name in self.failing:
            raise RuntimeError(f"{name} is not installed")
        return self.ms[name] * batch, ""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINFACE_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"weights")
    return tmp_path / "cache" / "runtime-choice.json", str(weights)


def test_auto_picks_the_fastest_and_remembers_it(cache):
    table, weights = cache
    log, clock = [], Clock({"torch": 3.0, "tf": 5.0, "onnx": 2.0})
    kwargs = {"input_size": 112, "num_features": 512}
    assert runtime.choose(weights, "torch", "r50", kwargs, 32, log.append, clock) == "onnx"
    assert [c[0] for c in clock.calls] == ["torch", "tf", "onnx"]
    assert "picked onnx (onnx 64.0 ms, torch 96.0 ms, tf 160.0 ms per batch)" in log[-1]
    decisions = json.loads(table.read_text())
    assert [d["runtime"] for d in decisions.values()] == ["onnx"]

    clock.ms["torch"] = 1.0                                 # remembered: not measured again
    assert runtime.choose(weights, "torch", "r50", kwargs, 32, log.append, clock) == "onnx"
    assert len(clock.calls) == 3 and "remembered in" in log[-1]

    assert runtime.choose(weights, "torch", "r50", kwargs, 1, log.append, clock) == "torch"    # another batch
    assert runtime.choose(weights, "torch", "r18", kwargs, 32, log.append, clock) == "torch"   # another model
    assert len(clock.calls) == 9 and len(json.loads(table.read_text())) == 3


def test_a_new_thread_setting_or_version_is_another_machine(cache, monkeypatch):
    _, weights = cache
    clock = Clock({"torch": 3.0, "tf": 5.0, "onnx": 2.0})
    runtime.choose(weights, "torch", "r50", {}, 8, lambda _: None, clock)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runtime.choose(weights, "torch", "r50", {}, 8, lambda _: None, clock)
    monkeypatch.setattr(runtime.metadata, "version", lambda package: "9.9")
    runtime.choose(weights, "torch", "r50", {}, 8, lambda _: None, clock)
    assert len(clock.calls) == 9


def test_without_arch_the_file_keeps_its_own_runtime(cache, tmp_path):
    _, weights = cache
    log, clock = [], Clock({"torch": 3.0, "tf": 5.0, "onnx": 2.0})
    assert runtime.choose(weights, "onnx", None, {}, 8, log.append, clock) == "onnx" and clock.calls == []
    assert "pass --arch to let them compete" in log[-1]
    with pytest.raises(ValueError, match=r"backbone.pth: --runtime torch needs --arch"):
        runtime.converted(weights, "onnx", "torch")


def test_the_source_format_and_a_compiled_package_are_part_of_the_model(cache, tmp_path):
    _, weights = cache
    clock = Clock({"torch": 3.0, "tf": 5.0, "onnx": 2.0})
    runtime.choose(weights, "torch", "r50", {}, 8, lambda _: None, clock)
    runtime.choose(weights, "onnx", "r50", {}, 8, lambda _: None, clock)       # the user's own ONNX graph
    (tmp_path / "backbone.pt2").write_bytes(b"compiled")                         # torch then runs the package
    runtime.choose(weights, "torch", "r50", {}, 8, lambda _: None, clock)
    runtime.choose(weights, "torch", "r50", {}, 8, lambda _: None, clock)
    assert len(clock.calls) == 9


def test_a_failing_runtime_is_left_out_and_all_failing_is_an_error(cache):
    _, weights = cache
    log = []
    clock = Clock({"torch": 3.0, "tf": 1.0, "onnx": 2.0}, failing=("tf",))
    assert runtime.choose(weights, "torch", "r50", {}, 4, log.append, clock) == "onnx"
    assert "runtime auto: tf left out: tf is not installed" in log
    with pytest.raises(RuntimeError, match=r"backbone.pth: no runtime could run it"):
        runtime.choose(weights, "torch", "r18", {}, 4, log.append, Clock({}, failing=runtime.RUNTIMES))


def test_a_damaged_decision_table_is_measured_again_and_rewritten(cache):
    table, weights = cache
    table.parent.mkdir(parents=True)
    table.write_text("[not a table")
    log = []
    assert runtime.choose(weights, "torch", "r50", {}, 4, log.append, Clock({"torch": 1, "tf": 2, "onnx": 3})) == "torch"
    assert any("is not a decision table" in line for line in log)
    assert len(json.loads(table.read_text())) == 1


def test_tflite_runs_only_in_its_interpreter(cache):
    _, weights = cache
    assert runtime.choose(weights, "tflite", None, {}, 4, lambda _: None, Clock({})) == "tflite"
    with pytest.raises(ValueError, match=r"backbone.pth: a .tflite file runs only in TensorFlow Lite's interpreter; "
                                         r"--runtime onnx needs"):
        runtime.converted(weights, "tflite", "onnx")
    assert runtime.converted(weights, "torch", "torch") == weights


def test_the_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TWINFACE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.cache_dir() == str(tmp_path / "twinface")
    monkeypatch.setenv("TWINFACE_CACHE", str(tmp_path / "mine"))
    assert runtime.cache_dir() == str(tmp_path / "mine")
