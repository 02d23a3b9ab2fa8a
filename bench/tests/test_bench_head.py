"""The Partial FC head section end to end on tiny settings: real processes (world 2 under torchrun), every row
measured, memory per rank falling with world and sample_rate as the sharding says, the three files written."""
import json

import pytest

from twinface_bench import head
from twinface_bench.cli import add_parser, run


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("head")
    opts = head.HeadOptions(classes=(1000,), frameworks=("torch",), embedding=32, batch=8, steps=1, timeout_s=120.0,
                            out=str(out))
    return head.run_head(opts, log=lambda line: None), out


def _rows(result):
    return {(r["world"], r["classes"], r["sample_rate"]): r for r in result[0]["rows"]}


def test_every_setting_measured(result):
    rows = _rows(result)
    assert sorted(rows) == sorted((w, c, s) for w in (1, 2) for c in (1000,) for s in (1.0, 0.1))
    for key, r in rows.items():
        assert "error" not in r, (key, r.get("error"))
        assert len(r["ranks"]) == r["world"] and r["step_ms"] > 0 and r["peak_rss_mb"] > 0
        assert r["total_mb"] == pytest.approx(sum(r[k] for k in head.MEMORY_KEYS[:-1]))


def test_memory_falls_with_world_and_sample_rate(result):
    rows = _rows(result)
    mb = 32 * 4 / 2 ** 20                                                   # one fp32 centre of 32
    one, two = rows[(1, 1000, 1.0)], rows[(2, 1000, 1.0)]
    assert one["centres"] == 1000 and two["centres"] == 500
    for key in ("weight_mb", "grad_mb", "momentum_mb"):
        assert one[key] == pytest.approx(1000 * mb) and two[key] == pytest.approx(one[key] / 2)
    for world in (1, 2):
        full, sampled = rows[(world, 1000, 1.0)], rows[(world, 1000, 0.1)]
        # sampling shrinks the logits, not the shard each rank holds (and optimises)
        assert sampled["weight_mb"] == full["weight_mb"]
        assert sampled["sampled"] == full["centres"] // 10 and full["sampled"] == full["centres"]
        assert full["logits_mb"] == pytest.approx(8 * world * full["centres"] * 4 / 2 ** 20)
        assert sampled["logits_mb"] == pytest.approx(full["logits_mb"] / 10)


def test_tf_rows(tmp_path):
    """The TF twin's two workers (TF_CONFIG, started by the worker module) each report half the shard."""
    opts = head.HeadOptions(classes=(1000,), frameworks=("tf",), worlds=(2,), sample_rates=(0.1,), embedding=32,
                            batch=8, steps=1, timeout_s=120.0, out=str(tmp_path))
    [row] = head.run_head(opts, log=lambda line: None)["rows"]
    assert "error" not in row, row.get("error")
    assert [r["rank"] for r in row["ranks"]] == [0, 1] and (row["centres"], row["sampled"]) == (500, 50)
    for key in ("weight_mb", "grad_mb", "momentum_mb"):
        assert row[key] == pytest.approx(500 * 32 * 4 / 2 ** 20)
    assert row["logits_mb"] == pytest.approx(16 * 50 * 4 / 2 ** 20)


def test_files_written(result):
    res, out = result
    assert json.loads((out / "head.json").read_text())["rows"] == res["rows"]
    table = (out / "head.md").read_text()
    assert table.count("| torch |") == 4 and "ERROR" not in table
    assert (out / "head.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_setting_is_an_error_row_naming_it():
    spec = head.settings(head.HeadOptions(classes=(0,), worlds=(1,), sample_rates=(1.0,)))[0]
    row = head.measure(spec)
    assert row["classes"] == 0 and row["world"] == 1 and "exit code" in row["error"]


def test_cli_flag_is_opt_in():
    import argparse
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert parser.parse_args([]).head is False
    args = parser.parse_args(["--head", "--head-batch", "16", "--head-classes", "10,20"])
    assert args.head and args.head_batch == 16 and args.head_classes == (10, 20)
    with pytest.raises(ValueError, match="--head-frameworks: unknown 'jax'"):
        run(parser.parse_args(["--head", "--head-frameworks", "jax"]))


def test_setting_that_cannot_fit_is_skipped(monkeypatch, tmp_path):
    """Peak RSS 100 + 1 MB per class at world 1: 10 and 20 classes measured, 1000 projected at 1100 MB."""
    monkeypatch.setattr(head, "measure", lambda spec: {**head._setting(spec), "step_ms": 1.0, "peak_rss_mb":
                                                       100.0 + spec["classes"], **dict.fromkeys(head.MEMORY_KEYS, 0.0),
                                                       "centres": 1, "sampled": 1})
    monkeypatch.setattr(head, "available_mb", lambda: 1000.0)
    monkeypatch.setattr(head, "machine", lambda load: {"cpu": "cpu", "cores": 2, "memory_gib": 1.0,
                                                       "load_start": load, "load_end": load})
    opts = head.HeadOptions(classes=(10, 20, 1000), frameworks=("torch",), worlds=(1,), sample_rates=(1.0,),
                            out=str(tmp_path))
    rows = head.run_head(opts, log=lambda line: None)["rows"]
    assert [head.measured(r) for r in rows] == [True, True, False]
    assert rows[2]["skipped"] == "projected peak RSS 1.1 GB per rank x 1, 1.0 GB available"
    assert "| 1,000 | 1.0 | not run: projected peak RSS 1.1 GB" in (tmp_path / "head.md").read_text()
    monkeypatch.setattr(head, "available_mb", lambda: 1300.0)            # fits, with the margin
    assert all(head.measured(r) for r in head.run_head(opts, log=lambda line: None)["rows"])
