"""The P x K identity sampler: identities per batch, images per identity, determinism, rank shards, resume."""
import os
import types

import numpy as np
import pytest

from twinface import config
from twinface.data.sampler import EpochSampler, IdentitySampler, sampler_for

# 12 identities with 6 images each, plus 3 identities with only 2 images (fewer than K = 4)
LABELS = np.concatenate([np.repeat(np.arange(12), 6), np.repeat(np.arange(12, 15), 2)])
np.random.default_rng(0).shuffle(LABELS)


def test_every_batch_is_p_distinct_identities_times_k_images():
    s = IdentitySampler(LABELS, 16, 4, seed=3)
    batches = list(s.batches(0))
    assert len(batches) == s.steps_per_epoch() == len(LABELS) // 16
    for index, flips in batches:
        assert len(index) == len(flips) == 16
        ids = LABELS[index].reshape(4, 4)                     # P = 4 rows of K = 4 images
        assert (ids == ids[:, :1]).all() and len(set(ids[:, 0].tolist())) == 4
        for row, block in zip(ids[:, 0], index.reshape(4, 4)):
            if (LABELS == row).sum() >= 4:
                assert len(set(block.tolist())) == 4         # enough images: no image twice
    flips = np.concatenate([f for _, f in batches])
    assert 0.3 < flips.mean() < 0.7


def test_short_identities_are_drawn_with_replacement_and_counted():
    s = IdentitySampler(LABELS, 16, 4, seed=3)
    assert s.short_identities == 3
    draws = np.concatenate([LABELS[i].reshape(4, 4)[:, 0] for i, _ in s.batches(1)])
    assert s.short_draws(1) == int((draws >= 12).sum()) > 0
    for index, _ in s.batches(1):
        for block in index.reshape(4, 4):
            if LABELS[block[0]] >= 12:
                assert len(set(block.tolist())) <= 2          # two images for four slots: repeats


def test_identity_order_covers_all_identities_before_repeating():
    s = IdentitySampler(LABELS, 16, 4, seed=1)
    ids = np.concatenate([LABELS[i].reshape(4, 4)[:, 0] for i, _ in s.batches(0)])
    assert sorted(ids[:15].tolist()) == list(range(15))      # the first lap is a permutation of every identity


def test_every_epoch_completes_when_a_batch_holds_most_identities():
    """40 identities, 32 per batch: batches straddle permutations and meet repeats all the time (an earlier version
    looped forever on epoch 6 here). A SIGALRM turns a hang into a failure."""
    import signal

    def hang(*_):
        raise TimeoutError("IdentitySampler did not finish an epoch in 20 s")
    labels = np.repeat(np.arange(40), 160)
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        s = IdentitySampler(labels, 128, 4, seed=0)
        for epoch in range(20):
            batches = [labels[i] for i, _ in s.batches(epoch)]
            assert len(batches) == s.steps_per_epoch() == 50
            assert all(len(set(b.tolist())) == 32 for b in batches)
            counts = np.bincount(np.concatenate(batches) // 1, minlength=40) // 4
            assert counts.max() - counts.min() <= 2                  # laps of permutations: each identity evenly
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_deterministic_resumable_and_rank_sharded():
    a, b = (list(IdentitySampler(LABELS, 8, 4, seed=5).batches(2)) for _ in range(2))
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b))
    assert not all((x[0] == y[0]).all() for x, y in zip(a, IdentitySampler(LABELS, 8, 4, seed=5).batches(3)))
    rest = list(IdentitySampler(LABELS, 8, 4, seed=5).batches(2, start_step=3))
    assert len(rest) == len(a) - 3 and all((x[0] == y[0]).all() for x, y in zip(rest, a[3:]))
    shards = [IdentitySampler(LABELS, 8, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert shards[0].steps_per_epoch() == len(LABELS) // 16
    for (i0, _), (i1, _) in zip(*(s.batches(0) for s in shards)):
        assert not set(LABELS[i0].tolist()) & set(LABELS[i1].tolist())     # ranks mine disjoint identities


def test_errors_name_the_keys():
    with pytest.raises(ValueError, match="batch_size 10 is not a multiple of data.images_per_identity 4"):
        IdentitySampler(LABELS, 10, 4)
    with pytest.raises(ValueError, match="15 identities cannot fill 2 rank"):
        IdentitySampler(LABELS, 32, 4, world_size=2)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        IdentitySampler(LABELS, 8, 4, rank=2, world_size=2)


def test_the_config_picks_the_sampler():
    cfg = config.from_dict({"data": {"sampler": "identity", "images_per_identity": 2}, "train": {"batch_size": 8},
                            "head": {"type": "none"}, "loss": {"type": "triplet"}})
    labelled = types.SimpleNamespace(labels=LABELS)
    assert isinstance(sampler_for(cfg, labelled), IdentitySampler)
    assert isinstance(sampler_for(config.from_dict({"train": {"batch_size": 8}}), labelled), EpochSampler)


def test_triplet_and_head_none_go_together():
    with pytest.raises(config.ConfigError, match="loss.type triplet trains on embeddings and needs head.type none"):
        config.from_dict({"loss": {"type": "triplet"}})
    with pytest.raises(config.ConfigError, match="'loss.type: cross_entropy' and 'head.type: none'"):
        config.from_dict({"head": {"type": "none"}})
    with pytest.raises(config.ConfigError, match="finetune.freeze_epochs"):
        config.from_dict({"head": {"type": "none"}, "loss": {"type": "triplet"}, "finetune": {"freeze_epochs": 1}})
    with pytest.raises(config.ConfigError, match="loss.mining"):
        config.from_dict({"head": {"type": "none"}, "loss": {"type": "triplet", "mining": "hardest"}})
    with pytest.raises(config.ConfigError, match="data.images_per_identity"):
        config.from_dict({"data": {"images_per_identity": 1}})
    with pytest.raises(config.ConfigError, match=r"'train.batch_size' \(10\) must be a multiple of"):
        config.from_dict({"data": {"sampler": "identity"}, "train": {"batch_size": 10}})
    with pytest.raises(config.ConfigError, match="'head.sample_rate' does not apply to head.type none"):
        config.from_dict({"head": {"type": "none", "sample_rate": 0.5}, "loss": {"type": "triplet"}})
    with pytest.raises(config.ConfigError, match="'head.m2' does not apply to head.type none"):
        config.from_dict({"head": {"type": "none", "m2": 0.3}, "loss": {"type": "triplet"}})
    with pytest.raises(config.ConfigError, match="adaface .* needs >= 2"):
        config.from_dict({"head": {"type": "adaface"}, "train": {"batch_size": 1}})
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "triplet_finetune.yaml"))
    assert cfg.triplet_params() == {"margin": 0.2, "mining": "batch_hard", "squared": False}
    assert cfg.head_params() == {}
