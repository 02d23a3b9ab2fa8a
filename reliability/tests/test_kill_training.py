"""kill -9 at seeded random moments of a tiny torch training, checkpoint writes included (killing.py says what
must hold: every restart succeeds, no announced checkpoint lost, the run ends bit-identical)."""
from .killing import KilledTraining

KILLS = 20                   # kill -9s this test delivers (stated in the README)
SEED = 20261201
EPOCHS = 3


def test_kill_9_at_random_moments_loses_nothing_and_ends_bit_identical(tmp_path, faults):
    tally = KilledTraining("torch", tmp_path, EPOCHS).kill_repeatedly(KILLS, SEED)
    print(f"{tally.kills} kill -9s ({tally.during_writes} during checkpoint writes) over {tally.starts} starts; "
          f"{tally.completed} killed runs completed bit-identical; seed {SEED}")
    assert tally.during_writes >= 3
    faults.record(f"kill -9 during torch training ({tally.during_writes} in checkpoint writes)", tally.kills,
                  tally.kills)
