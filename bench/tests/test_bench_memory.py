"""The opt-in gradient-checkpointing rows: both run, on a tiny IResNet, and checkpointing leaves the loss alone."""
from twinface_bench.run import MEMORY_RUNTIMES, Options, plan, run_in_process


def test_checkpointing_rows_run_and_agree(tmp_path):
    opts = Options(models=("r18",), input_size=32, num_features=16, runtimes=MEMORY_RUNTIMES, train_batch=4,
                   train_steps=1, train_max_seconds=30.0)
    specs = plan(opts, str(tmp_path), model="r18")
    assert [s["runtime"] for s in specs] == list(MEMORY_RUNTIMES)
    rows = [row for spec in specs for row in run_in_process(spec, opts.timeout_s)]
    assert [r.get("error") for r in rows] == [None, None]
    plain, checkpointed = (r["losses"] for r in rows)
    assert plain == checkpointed and len(plain) >= 2
