"""Small, fast building blocks for tests of either twin: a tiny synthetic set and a config that trains in seconds."""
import copy
import json
import os

import numpy as np

from . import config
from .data import synth

TINY_DATA = {"synth_identities": 6, "synth_images_per_identity": 6, "synth_val_identities": 4, "synth_val_pairs": 20}


def tiny_dataset(directory) -> str:
    """Generate (once; cached by its manifest) the tiny synthetic set; returns its directory."""
    path = os.fspath(directory)
    synth.ensure_dataset(path, num_identities=TINY_DATA["synth_identities"],
                         images_per_identity=TINY_DATA["synth_images_per_identity"],
                         val_identities=TINY_DATA["synth_val_identities"], val_pairs=TINY_DATA["synth_val_pairs"],
                         seed=0, formats=("rec",), workers=1, progress=False)
    return path


def tiny_config(data_dir, output, **sections) -> config.Config:
    """MobileFaceNet at 32x32, 32-d embeddings, batch 8, 2 epochs of 4 steps; `sections` override keys."""
    raw = {"seed": 0, "output": os.fspath(output),
           "backbone": {"name": "mbf", "input_size": 32, "num_features": 32},
           "head": {"type": "arcface"},
           "data": {"source": "synthetic", "path": os.fspath(data_dir), "num_workers": 0, **TINY_DATA},
           "train": {"batch_size": 8, "epochs": 2, "log_every": 1},
           "val": {"batch_size": 16}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return config.from_dict(copy.deepcopy(raw))


def run_tiny(make_twin, data_dir, output, kill_after=None, poison_after=None, poison=None, resume=False,
             overwrite=False, **sections):
    """Train the tiny config with a fresh twin; returns (summary, twin).

    kill_after=k raises KeyboardInterrupt at the (k+1)-th step, as a kill would; poison_after=k calls
    poison(twin) before every later step (e.g. to plant a NaN and exercise the guard rails).
    """
    from .trainer import Trainer
    twin = make_twin()
    original, calls = twin.train_step, [0]

    def step(*args):
        calls[0] += 1
        if kill_after is not None and calls[0] > kill_after:
            raise KeyboardInterrupt("simulated kill")
        if poison_after is not None and calls[0] > poison_after:
            poison(twin)
        return original(*args)

    twin.train_step = step
    cfg = tiny_config(data_dir, output, **sections)
    return Trainer(cfg, twin, resume=resume, overwrite=overwrite, progress=False).run(), twin


def check_training_outputs(make_twin, backbone_file, state_file, reloaded_weights, weights_of, data_dir, tmp_path):
    """Train the tiny config and check what a run promises: every output file, TensorBoard events, progress and
    evaluation lines, a faithful ONNX export, and a backbone file the framework's own loader reads back
    (reloaded_weights(path) -> {name: array} of a fresh model) holding the trained weights (weights_of(twin))."""
    import json
    import numpy as np
    run = tmp_path / "run"
    summary, twin = run_tiny(make_twin, data_dir, run)
    for name in (backbone_file, state_file, "config.yaml", "train.log", "backbone.onnx", "summary.json", "roc.png"):
        assert (run / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    assert summary["steps"] == 8 and 0.0 <= summary["results"]["val"]["acc_mean"] <= 1.0
    assert summary["onnx_max_abs_diff"] < 1e-4
    log = (run / "train.log").read_text()
    assert "img/s ETA" in log and "[val]Accuracy-Flip" in log
    assert json.load(open(run / "summary.json"))["arch"] == "mbf"
    expected, got = weights_of(twin), reloaded_weights(run / backbone_file)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def check_resume_matches_uninterrupted(make_twin, weights_of, state_step, data_dir, tmp_path, **sections):
    """Kill a run in epoch 2 (after the epoch-1 checkpoint), resume it, and compare its final backbone with an
    uninterrupted run's. weights_of(twin) -> {name: array}; state_step(run_dir) -> step in the saved state;
    `sections` override config keys (run_tiny)."""
    import numpy as np
    _, full = run_tiny(make_twin, data_dir, tmp_path / "full", **sections)
    try:
        run_tiny(make_twin, data_dir, tmp_path / "killed", kill_after=6, **sections)
        raise AssertionError("the simulated kill did not happen")
    except KeyboardInterrupt:
        pass
    assert state_step(tmp_path / "killed") == 4
    summary, resumed = run_tiny(make_twin, data_dir, tmp_path / "killed", resume=True, **sections)
    assert summary["steps"] == 8
    expected, got = weights_of(full), weights_of(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # TensorBoard shows the resumed run as one curve: the killed run's steps 5-6 are replaced, not duplicated
    (steps, losses), (full_steps, full_losses) = (tensorboard_scalars(tmp_path / run, "train/loss")
                                                  for run in ("killed", "full"))
    assert steps == full_steps == list(range(1, 9))
    np.testing.assert_allclose(losses, full_losses, rtol=1e-5)


def tensorboard_scalars(run_dir, tag):
    """(steps, values) of one scalar as TensorBoard itself loads the run's event files (stale events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(os.fspath(run_dir), "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars(tag)
    return [e.step for e in scalars], [e.value for e in scalars]


def check_nan_guard(make_twin, poison, saved_backbone_finite, data_dir, tmp_path, precision="fp32"):
    """Plant a NaN from step 6 on: updates are skipped, the run stops after train.max_bad_steps with the last
    good checkpoint named, and the backbone file on disk stays finite. Under fp16 too: a NaN loss is a
    divergence, never mistaken for a loss-scale overflow."""
    import re
    from .trainer import TrainingDiverged
    try:
        run_tiny(make_twin, data_dir, tmp_path / "run", poison_after=5, poison=poison,
                 train={"max_bad_steps": 2, "precision": precision})
        raise AssertionError("the run did not stop on non-finite losses")
    except TrainingDiverged as e:
        assert re.search(r"non-finite loss.*Last good checkpoint: .*state", str(e)), str(e)
    assert saved_backbone_finite(tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("non-finite loss nan") == 2 and "update skipped" in log


def check_fp16_overflow_backs_off(make_twin, saved_scale, data_dir, tmp_path):
    """fp16 with a loss scale this tiny model's gradients overflow at: each overflowing step is skipped and
    halves the scale, finite steps are applied and after loss_scale_growth_interval of them the scale doubles;
    the run finishes, the NaN guard never fires, and the checkpoint holds the scale reached (resume continues
    from it). saved_scale(run_dir) -> the loss scale in the saved state."""
    import re
    run = tmp_path / "run"
    summary, twin = run_tiny(make_twin, data_dir, run, train={"precision": "fp16", "loss_scale": 4096.0,
                                                              "loss_scale_growth_interval": 2})
    assert summary["finished"] and summary["precision"] == "fp16"
    skipped = summary["skipped_steps"]
    assert skipped["non_finite_loss"] == 0 and 1 <= skipped["loss_scale_overflow"] < summary["steps"], skipped
    scales = [float(v) for v in re.findall(r"loss scale (\S+)", (run / "train.log").read_text())]
    assert scales[0] == 2048.0                                   # the first step overflowed and backed off
    assert any(b == 2 * a for a, b in zip(scales, scales[1:]))   # two finite steps in a row doubled it
    assert saved_scale(run) == twin.loss_scale == scales[-1]


def check_truncated_state_is_named(make_twin, state_file, data_dir, tmp_path):
    """A state file cut in half (a kill or a full disk outside twinface) makes --resume fail with one line that
    names the file, not with the framework's traceback."""
    import re
    import pytest
    run = tmp_path / "run"
    run_tiny(make_twin, data_dir, run, train={"epochs": 1})
    state = run / state_file
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"{state}: not a readable ")):
        run_tiny(make_twin, data_dir, run, resume=True, train={"epochs": 2})


def check_tfrecord_trains_like_rec(make_twin, weights_of, data_dir, tmp_path):
    """Training from the TFRecord copy of the tiny .rec gives the very same network (same samples, same order,
    same pixels); under the stream sampler without the memory cache (the TF twin's native reader) it trains
    and evaluates like any run."""
    import numpy as np
    from .data.convert import rec_to_tfrecord
    tfr = tmp_path / "tfr"
    rec_to_tfrecord(os.path.join(data_dir, "train"), tfr, shards=3, progress=False)
    as_tfrecord = {"data": {"source": "tfrecord", "path": str(tfr)},
                   "val": {"bins": [os.path.join(data_dir, "val.bin")]}}
    rec_summary, rec_twin = run_tiny(make_twin, data_dir, tmp_path / "rec")
    tfr_summary, tfr_twin = run_tiny(make_twin, data_dir, tmp_path / "tfrecord", **as_tfrecord)
    a, b = weights_of(rec_twin), weights_of(tfr_twin)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert tfr_summary["results"] == rec_summary["results"]
    stream, _ = run_tiny(make_twin, data_dir, tmp_path / "stream", data={**as_tfrecord["data"], "sampler": "stream",
                                                                         "stream_window": 16, "memory_cache_gb": 0},
                         val=as_tfrecord["val"])
    assert stream["finished"] and stream["steps"] == 2 * (36 // 8) and "val" in stream["results"]


def pool_onnx(path) -> str:
    """A framework-free ONNX 'embedder': data [N, 3, 16, 16] -> 4x4 average pooling -> 48-d vector (the colour
    layout, enough to score pairs)."""
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("AveragePool", ["data"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Flatten", ["p"], ["embedding"])]
    graph = helper.make_graph(nodes, "pool",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 48])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(path))
    return os.fspath(path)


def with_external_weight(model_path, out_path, location: str) -> str:
    """The ONNX model at model_path times an initializer whose data the file places at `location` (external
    data, relative to out_path's folder or absolute): a loader must refuse one that leads outside that folder."""
    import onnx
    from onnx import TensorProto, helper
    model = onnx.load(os.fspath(model_path))
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    model.graph.initializer.append(weight)
    model.graph.node.insert(0, helper.make_node("Mul", ["data", "w"], ["scaled"]))
    model.graph.node[1].input[0] = "scaled"
    onnx.save(model, os.fspath(out_path))
    return os.fspath(out_path)


# -- the parity table: parity_tests and distributed_tests add rows to one table (`twinface parity` runs both) -------
PARITY_ROWS = []
STEP_CAP = 1e-3        # a training step's weights, twin vs twin (or N ranks vs 1): difference / update, at most


def _np(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


class Parity:
    def check(self, what: str, a, b, tol: float, relative: bool = False):
        """Record max|a - b| (divided by max|a| when `relative`) against `tol`, and assert it."""
        a, b = _np(a), _np(b)
        assert a.shape == b.shape, f"{what}: shapes differ {a.shape} vs {b.shape}"
        assert np.isfinite(a).all() and np.isfinite(b).all(), f"{what}: non-finite values"
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        if relative:
            diff /= max(float(np.max(np.abs(a))), 1e-12)
        ok = diff <= tol
        PARITY_ROWS.append({"what": what, "max_diff": diff, "tolerance": tol, "relative": relative,
                            "result": "pass" if ok else "FAIL"})
        assert ok, f"{what}: max {'relative ' if relative else ''}diff {diff:.3g} > tolerance {tol:g}"
        return diff


_summarised = []


def parity_summary(tr):
    """Print the table once (each room's conftest calls this) and write it as JSON to TWINFACE_PARITY_JSON."""
    if not PARITY_ROWS or _summarised:
        return
    _summarised.append(True)
    rows = PARITY_ROWS
    width = max(len(r["what"]) for r in rows)
    tr.section("twinface parity")
    tr.write_line(f"{'what':<{width}}  {'max diff':>10}  {'tolerance':>10}  result")
    for r in rows:
        tol = f"{r['tolerance']:.0e}{' rel' if r['relative'] else ''}"
        tr.write_line(f"{r['what']:<{width}}  {r['max_diff']:>10.2e}  {tol:>10}  {r['result']}")
    failed = sum(r["result"] != "pass" for r in rows)
    tr.write_line(f"{len(rows) - failed} of {len(rows)} rows pass")
    write_report(tr, "TWINFACE_PARITY_JSON", {"rows": rows, "failed": failed})


def write_report(tr, env_var: str, report: dict):
    """A room's table as JSON, to the file the environment variable names (`twinface parity`, the README's
    figures); nothing when it is unset."""
    path = os.environ.get(env_var)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        tr.write_line(f"JSON: {path}")


def triplet_reference(embeddings, labels, margin, mining, squared):
    """(loss, valid) of the twins' triplet loss, by explicit loops in float64: the rules of docs/losses.md written
    out one triplet at a time (hard-mining ties: the lowest index wins)."""
    x = np.asarray(embeddings, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(x[:, None] - x[None, :], axis=2)
    d = d ** 2 if squared else d
    labels = np.asarray(labels)
    n = len(labels)
    positives = [[j for j in range(n) if j != a and labels[j] == labels[a]] for a in range(n)]
    negatives = [[k for k in range(n) if labels[k] != labels[a]] for a in range(n)]
    terms = []
    for a in range(n):
        if not negatives[a]:
            continue
        if mining == "batch_all":
            terms += [d[a, p] - d[a, k] + margin for p in positives[a] for k in negatives[a]]
        elif mining == "batch_hard" and positives[a]:
            p = max(positives[a], key=lambda j: (d[a, j], -j))
            k = min(negatives[a], key=lambda j: (d[a, j], j))
            terms.append(d[a, p] - d[a, k] + margin)
        elif mining == "semi_hard":
            for p in positives[a]:
                farther = [k for k in negatives[a] if d[a, k] > d[a, p]]
                k = min(farther, key=lambda j: (d[a, j], j)) if farther else \
                    max(negatives[a], key=lambda j: (d[a, j], -j))
                terms.append(d[a, p] - d[a, k] + margin)
    hinge = np.maximum(np.array(terms), 0.0)
    if mining == "batch_all":
        return hinge.sum() / max(int((hinge > 1e-16).sum()), 1), len(terms)
    return hinge.sum() / max(len(terms), 1), len(terms)


CURVE_CAP = 2e-2       # torch vs TF, max relative loss difference over a curve, whatever the nudge drift


def loss_curves(twins, cfg, dataset, sampler, lr_of):
    """Loss per step of each twin, all fed the same batches (checked) with the same lr."""
    losses, step = [[] for _ in twins], 0
    for epoch in range(cfg.train.epochs):
        for batches in zip(*(twin.batches(dataset, sampler, epoch, 0) for twin in twins)):
            for x, y in batches[1:]:
                np.testing.assert_array_equal(x, batches[0][0])   # same images, flips and order everywhere
                np.testing.assert_array_equal(y, batches[0][1])
            lr = lr_of(step)
            for curve, twin, (x, y) in zip(losses, twins, batches):
                curve.append(twin.train_step(x, y, lr, lr))
            step += 1
    return [np.array(c) for c in losses]


def curve_tolerance(drift):
    """10x torch's own drift under a one-ulp nudge, never below 1e-4 nor above CURVE_CAP."""
    return min(max(10 * drift, 1e-4), CURVE_CAP)


def check_triplet_batches_without_triplets_are_skipped(make_twin, weights_of, data_dir, tmp_path):
    """Triplet loss over shuffled batches of 3: a batch yields a triplet only if two of its images share an identity
    and the third does not. Every other step must be skipped (no update) and counted, exactly; then P x K batches
    train without a skip."""
    from .data import dataset as dataset_mod
    from .data.sampler import EpochSampler
    triplet = {"head": {"type": "none"}, "loss": {"type": "triplet"}}
    dataset = dataset_mod.open_dataset(os.path.join(os.fspath(data_dir), "train.rec"))
    sampler = EpochSampler(len(dataset), 3, seed=0)
    expected = sum(triplet_reference(np.eye(3), dataset.labels[i], 0.2, "batch_hard", False)[1] == 0
                   for epoch in range(2) for i, _ in sampler.batches(epoch))
    summary, twin = run_tiny(make_twin, data_dir, tmp_path / "b3", train={"batch_size": 3}, **triplet)
    assert 0 < expected < summary["steps"] and summary["skipped_steps"]["no_valid_triplet"] == expected
    assert "no valid triplet in the batch" in (tmp_path / "b3" / "train.log").read_text()
    summary, _ = run_tiny(make_twin, data_dir, tmp_path / "pk", train={"batch_size": 6}, **triplet,
                          data={"sampler": "identity", "images_per_identity": 3})
    assert summary["skipped_steps"]["no_valid_triplet"] == 0 and summary["steps"] == 2 * (len(dataset) // 6)
    # P = 1: every batch is one identity, without a negative; every step skipped leaves the backbone as built
    # (its BatchNorm statistics included)
    cfg = tiny_config(data_dir, tmp_path / "one", train={"batch_size": 3}, **triplet,
                      data={"sampler": "identity", "images_per_identity": 3})
    summary, trained = run_tiny(make_twin, data_dir, tmp_path / "one", train={"batch_size": 3}, **triplet,
                                data={"sampler": "identity", "images_per_identity": 3})
    assert summary["skipped_steps"]["no_valid_triplet"] == summary["steps"] == 2 * (len(dataset) // 3)
    fresh = make_twin()
    fresh.build(cfg, dataset.num_classes)
    expected, got = weights_of(fresh), weights_of(trained)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


# -- AdaFace's official formula, for both twins' tests ---------------------------------------------------------------
def adaface_reference(embeddings, weight, labels, batch_mean, batch_std, s=64.0, m=0.4, h=0.333, t_alpha=0.01,
                      training=True):
    """The official AdaFace head.py forward (github mk-minchul/AdaFace, class AdaFace) in float64 numpy, written
    from its formula: -> (logits, batch_mean, batch_std), the EMA as left after this call."""
    eps = 1e-3
    emb, weight = np.asarray(embeddings, np.float64), np.asarray(weight, np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    kernel = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip((emb / norms) @ kernel.T, -1 + eps, 1 - eps)
    safe_norms = np.clip(norms, 0.001, 100)
    if training:                                                # updated before use; torch.std is unbiased
        batch_mean = safe_norms.mean() * t_alpha + (1 - t_alpha) * batch_mean
        batch_std = safe_norms.std(ddof=1) * t_alpha + (1 - t_alpha) * batch_std
    scaler = np.clip((safe_norms - batch_mean) / (batch_std + eps) * h, -1, 1)
    rows = np.flatnonzero(np.asarray(labels) >= 0)
    one_hot = np.zeros_like(cos)
    one_hot[rows, np.asarray(labels)[rows]] = 1.0
    theta = np.clip(np.arccos(cos) + one_hot * (-m * scaler), eps, np.pi - eps)
    return s * (np.cos(theta) - one_hot * (m + m * scaler)), batch_mean, batch_std


def check_drop_noisy(make_twin, head_weight, data_dir, tmp_path, capsys):
    """Train the tiny config with 3 sub-centres, then `twinface data drop-noisy` its run at a threshold between two
    of the samples' angles: the dropped list is exactly the samples beyond it (angles recomputed here from the
    trained twin in memory), the clean .rec holds every other record's bytes unchanged with its identity, and an
    existing output is replaced only with --overwrite. head_weight(twin) -> [C * 3, D] array."""
    import pytest
    from .cli import main
    from .data.dataset import open_dataset
    from .noisy import noisy_samples
    run = tmp_path / "run"
    _, twin = run_tiny(make_twin, data_dir, run, head={"type": "arcface", "subcenters": 3})
    train = open_dataset(os.path.join(data_dir, "train.rec"))
    emb = np.asarray(twin.embed(np.stack([train.image(i) for i in range(len(train))])), np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    weight = np.asarray(head_weight(twin), np.float64)
    centres = (weight / np.linalg.norm(weight, axis=1, keepdims=True)).reshape(train.num_classes, 3, -1)
    own = np.einsum("ne,nke->nk", emb, centres[train.labels])
    _, angle, _ = noisy_samples(own, train.labels, train.num_classes, 180.0)
    ordered = np.sort(angle)
    threshold = float(ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2
    dst = tmp_path / "clean"
    argv = ["data", "drop-noisy", str(run), str(dst), "--threshold-deg", repr(threshold)]
    main(argv)
    printed = capsys.readouterr().out
    dropped = np.flatnonzero(angle > threshold)
    assert f"dropped: {len(dropped)}" in printed and "dropped (nearest to a non-dominant sub-centre)" in printed
    assert "angle to the dominant sub-centre (p50 / p90 / p99)" in printed
    rows = [line.split("\t") for line in (tmp_path / "clean.dropped.tsv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == dropped.tolist()
    assert [int(r[1]) for r in rows] == train.labels[dropped].tolist()
    np.testing.assert_allclose([float(r[2]) for r in rows], angle[dropped], atol=2e-3)
    clean = open_dataset(str(dst) + ".rec")
    kept = np.setdiff1d(np.arange(len(train)), dropped)
    assert len(clean) == len(kept)
    renumber = {c: i for i, c in enumerate(np.unique(train.labels[kept]))}
    assert sorted((renumber[int(train.labels[i])], train.encoded(int(i))) for i in kept) == \
        sorted((int(clean.labels[j]), clean.encoded(j)) for j in range(len(clean)))
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        main(argv)
    main(argv + ["--overwrite"])


# -- Sub-center ArcFace, for both twins' tests ---------------------------------------------------------------------
SUBCENTRE_TARGETS = {"arcface": lambda c: np.cos(np.arccos(c) + 0.5), "cosface": lambda c: c - 0.4}   # registry's


def head_test_batch(seed, n, d):
    """(embeddings [n, d] float32, labels [n] int64 over 5 classes with a repeat)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), np.array([0, 1, 2, 3, 4, 2])[:n]


def subcentre_reference(embeddings, weight, labels, subcenters, head, s=64.0):
    """Sub-center logits in float64 numpy: each class's cosine is the max over its sub-centres (class-major rows
    c * K + k), then `head`'s target margin (SUBCENTRE_TARGETS)."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = np.arange(len(labels))
    cos = np.clip(unit(embeddings) @ unit(weight).T, -1, 1).reshape(len(labels), -1, subcenters).max(axis=2)
    cos[rows, labels] = SUBCENTRE_TARGETS[head](cos[rows, labels])
    return s * cos


# -- MTCNN, for both twins' tests ----------------------------------------------------------------------------------
PNET_SIZES = ((12, 12), (13, 17), (37, 50), (50, 37))   # odd and even sides: ceil-mode pooling pads or does not
OBAMA_FACE = (slice(100, 380), slice(360, 640))          # rows, columns of the face in photos/obama.jpg, by eye


def face_crop(size: int) -> np.ndarray:
    """OBAMA_FACE resized to size x size, RGB uint8 [1, size, size, 3]."""
    import cv2
    from .data.images import read_image
    from .fixtures import photo
    return cv2.resize(read_image(photo("obama.jpg"))[OBAMA_FACE], (size, size), interpolation=cv2.INTER_AREA)[None]


def check_mtcnn_shapes(nets) -> None:
    """The detector-nets interface's shapes (twinface.detect.nets) on odd and even PNet sizes, probabilities in
    [0, 1]; floor-mode pooling would give one cell fewer on the odd sides."""
    rng = np.random.default_rng(0)
    for h, w in PNET_SIZES:
        prob, offsets = nets.pnet(rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32))
        cells = tuple(-(-(side - 2) // 2) - 4 for side in (h, w))
        assert prob.shape == (2, *cells) and offsets.shape == (2, *cells, 4), (h, w, prob.shape, offsets.shape)
        assert 0 <= prob.min() and prob.max() <= 1
    for stage, size, widths in (("rnet", 24, (4,)), ("onet", 48, (4, 10))):
        prob, *rest = getattr(nets, stage)(rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32))
        assert prob.shape == (3,) and [r.shape for r in rest] == [(3, k) for k in widths], stage


def check_mtcnn_strict_loading(load_nets) -> None:
    """A missing, an extra or a wrong-shaped tensor is refused in one line naming it (and both shapes)."""
    import pytest
    from .fixtures import mtcnn_state_dicts

    def altered(net, change):
        state = mtcnn_state_dicts()
        change(state[net])
        return state

    with pytest.raises(ValueError, match=r"^mtcnn rnet: tensor 'dense4\.bias' is missing"):
        load_nets(altered("rnet", lambda s: s.pop("dense4.bias")))
    with pytest.raises(ValueError, match=r"^mtcnn onet: unexpected tensor 'dense7\.weight'"):
        load_nets(altered("onet", lambda s: s.update({"dense7.weight": np.zeros((1, 256), np.float32)})))
    for net, name, shape, expected in (("pnet", "prelu1.weight", (11,), (10,)),
                                       ("rnet", "dense4.weight", (128, 575), (128, 576))):
        with pytest.raises(ValueError) as error:
            load_nets(altered(net, lambda s: s.update({name: np.zeros(shape, np.float32)})))
        assert str(error.value) == f"mtcnn {net}: tensor '{name}' has shape {shape}, the net expects {expected}"


def check_verify_photos(tmp_path, capsys, monkeypatch, framework: str, get_model, save_weights) -> None:
    """`twinface verify a.jpg b.jpg --detect --weights <backbone>` end to end in one twin: MTCNN of the same
    framework as the weights finds and aligns the faces, the backbone (`save_weights(model, path)`: the twin's
    save_backbone, given a fresh mbf from `get_model`) embeds them, and the verdict line comes out."""
    import re
    from . import cli, fixtures
    from .detect import faces
    used = []
    load = faces.load_detector_nets
    monkeypatch.setattr(faces, "load_detector_nets", lambda name: used.append(name) or load(name))
    weights = str(tmp_path / ("mbf.pth" if framework == "torch" else "mbf.weights.h5"))
    save_weights(get_model("mbf"), weights)
    cli.main(["verify", "--weights", weights, "--arch", "mbf", fixtures.photo("obama.jpg"),
              fixtures.photo("obama2.jpg"), "--detect"])
    out = capsys.readouterr().out
    assert used == [framework]
    assert re.fullmatch(r"cosine similarity -?\d\.\d{4}, squared L2 distance \d\.\d{4} \(threshold 1\.4\): "
                        r"(SAME person|DIFFERENT people)\n", out), out


TORCHVISION_RESNEXT50_PARAMS = 25_028_904   # torchvision resnext50_32x4d (ImageNet, 7x7 stem, fc 2048 -> 1000)


def resnext_blocks(layers, cardinality=32, base_width=4):
    """(input channels, grouped width, output channels, has downsample) of each ResNeXt block, written out
    from the paper's 32x4d rule (width = planes * base_width / 64 * cardinality, output 4 * planes)."""
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        width, out = planes * base_width // 64 * cardinality, 4 * planes
        for index in range(blocks):
            yield (inplanes if index == 0 else out), width, out, index == 0
        inplanes = out


def resnext_conv_weights(layers, cardinality=32) -> int:
    """Weights of the stages' convolutions (1x1, grouped 3x3, 1x1, downsample): the same in torchvision's ResNeXt."""
    return sum(cin * width + width * (width // cardinality) * 9 + width * out + (cin * out if down else 0)
               for cin, width, out, down in resnext_blocks(layers, cardinality))


def resnext_param_count(layers, num_features=512, input_size=112) -> int:
    """Parameters (torch) of the face-adapted ResNeXt: IResNet's stem and E output around the pre-BN bottleneck
    (bn1 on the input, bn2 / prelu1 and bn3 / prelu2 on the grouped width, bn4 on the output)."""
    blocks = list(resnext_blocks(layers))
    norms = sum(2 * cin + 3 * 2 * width + 2 * out + (2 * out if down else 0) for cin, width, out, down in blocks)
    fc_in = 2048 * (input_size // 16) ** 2
    return (3 * 64 * 9 + 2 * 64 + 64 + resnext_conv_weights(layers) + norms + 2 * 2048
            + fc_in * num_features + num_features + 2 * num_features)


def check_resnext_trains_with_checkpointing(make_twin, data_dir, tmp_path):
    """ResNeXt-50 at 16x16 (a 1x1 final map) trains the tiny config with every block recomputed in backprop."""
    summary, _ = run_tiny(make_twin, data_dir, tmp_path / "run", train={"epochs": 1},
                          backbone={"name": "resnext50", "input_size": 16, "checkpointing": True})
    assert summary["finished"] and summary["arch"] == "resnext50"
    assert np.isfinite(summary["results"]["val"]["acc_mean"])


def seeded_noise(seed):
    """noise(shape) -> U[0, 1) float32 of a fixed seeded sequence: give each twin (set_noise) its own
    seeded_noise(seed) and their random draws (ViT masking, stochastic depth) are the same numbers."""
    rng = np.random.default_rng(seed)
    return lambda shape: rng.random(tuple(int(s) for s in shape), dtype=np.float32)


# get_model("vit_t", **kwargs) must refuse these in both twins, with these messages
VIT_REFUSED = [({"dropout": 0.2}, "vit_t: arcface_torch's ViT has no dropout layer"),
               ({"input_size": 8}, "vit_t: input_size must be an integer >= the patch size 9"),
               ({"checkpointing": True}, "vit_t: gradient checkpointing")]


def densenet_param_count(blocks, growth=32, init=64, bn_size=4, num_features=512, input_size=112) -> int:
    """Parameters of the face DenseNet written out from docs/backbones.md (conv weights, BN gamma/beta, PReLU
    slopes, fc weight + bias; no running statistics), independently of both twins' builders."""
    width = bn_size * growth
    total = 3 * init * 9 + 2 * init                                 # conv0, norm0 (relu0 has none)
    channels = init
    for i, layers in enumerate(blocks):
        for _ in range(layers):                                     # norm1, relu1, conv1, norm2, relu2, conv2
            total += 3 * channels + channels * width + 3 * width + width * growth * 9
            channels += growth
        if i < len(blocks) - 1:                                     # transition: norm, relu, 1x1 conv to half
            total += 3 * channels + channels * (channels // 2)
            channels //= 2
    fc_in = channels * (input_size // 16) ** 2
    return total + 2 * channels + fc_in * num_features + num_features + 2 * num_features


def check_densenet_trains(make_twin, data_dir, tmp_path) -> None:
    """DenseNet-121 at 32x32 through the real trainer: it finishes, validates and exports its backbone."""
    summary, _ = run_tiny(make_twin, data_dir, tmp_path / "run", backbone={"name": "densenet121"},
                          train={"epochs": 1})
    assert summary["finished"] and summary["steps"] == 4 and summary["arch"] == "densenet121"
    assert 0 <= summary["history"][-1]["val"]["acc"] <= 1 and summary["onnx_max_abs_diff"] < 1e-4


def release_memory() -> None:
    """Collect and hand glibc's free heap back to the system: after a test that built large models, so that the
    room's process does not keep its largest test's footprint."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
