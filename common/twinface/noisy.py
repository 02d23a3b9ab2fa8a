"""Sub-center ArcFace's noise drop (Deng et al. 2020, sec. 3.2), `twinface data drop-noisy`.

After training with K sub-centres per class, a class's dominant sub-centre is the one most of its samples are
nearest to (a tie goes to the lower sub-centre index). A sample whose angle to its class's dominant sub-centre
exceeds the threshold (75 degrees in the paper) is dropped; the kept samples form a clean set to retrain on with
K = 1. The run's own twin embeds every training sample; the kept records are copied byte for byte (never
re-encoded) into a new .rec/.idx, with the dropped samples listed in a tab-separated file beside it.
"""
import os

import numpy as np
from tqdm import tqdm

from . import config as config_mod
from .atomic import Outputs, check_destination
from .data.recordio import is_recordio, write_insightface_rec

NON_DOMINANT = "nearest to a non-dominant sub-centre"
FAR = "nearest to the dominant sub-centre, beyond the threshold"
TSV_HEADER = "index\tlabel\tangle_deg\treason\n"
STATES = {"state.pt": "torch", "state.npz": "tf"}


def noisy_samples(own_cos: np.ndarray, labels: np.ndarray, num_classes: int, threshold_deg: float):
    """own_cos [N, K]: each sample's cosine with its own class's K sub-centres. -> (dropped [N] bool, angle to the
    dominant sub-centre in degrees [N], nearest sub-centre is the dominant one [N] bool)."""
    labels = np.asarray(labels, np.int64)
    nearest = own_cos.argmax(axis=1)
    votes = np.zeros((num_classes, own_cos.shape[1]), np.int64)
    np.add.at(votes, (labels, nearest), 1)
    dominant = votes.argmax(axis=1)[labels]                       # argmax: the lowest index among tied counts
    angle = np.degrees(np.arccos(np.clip(own_cos[np.arange(len(labels)), dominant], -1.0, 1.0)))
    return angle > threshold_deg, angle, nearest == dominant


def angle_report(angle: np.ndarray, dropped: np.ndarray) -> dict:
    """The angle distribution, so a threshold can be chosen from it, and a warning when the rule drops most of the
    set: an unconverged model (a large loss, few epochs) keeps its samples far from every centre, clean or not."""
    p50, p90, p99 = np.percentile(angle, [50, 90, 99])
    report = {"angle to the dominant sub-centre (p50 / p90 / p99)": f"{p50:.1f} / {p90:.1f} / {p99:.1f} degrees"}
    if dropped.mean() > 0.5:
        report["warning"] = (f"{dropped.mean():.0%} of the samples are beyond the threshold: the model is likely "
                             f"not converged (the paper's 75 degrees assumes a trained one); choose --threshold-deg "
                             f"from the percentiles above, or train longer")
    return report


def _twin(run_dir: str):
    """(twin built and restored from the run's state, its config, the training set)."""
    from .trainer import prepare_data
    found = [name for name in STATES if os.path.isfile(os.path.join(run_dir, name))]
    if len(found) != 1:
        raise ValueError(f"{run_dir}: expected one training state ({' or '.join(STATES)}), found "
                         f"{', '.join(found) or 'none'}")
    cfg = config_mod.load(os.path.join(run_dir, "config.yaml"))
    if cfg.head.type in ("linear", "none", "adaface"):
        raise ValueError(f"{run_dir}: drop-noisy needs a margin head's class centres, the run has head.type "
                         f"'{cfg.head.type}'")
    if STATES[found[0]] == "torch":
        from twinface_torch.train import TorchTwin as Twin
    else:
        from twinface_tf.train import TFTwin as Twin
    dataset, _ = prepare_data(cfg)
    twin = Twin()
    twin.build(cfg, dataset.num_classes)
    twin.load_state(os.path.join(run_dir, found[0]))
    return twin, cfg, dataset


def _own_cosines(twin, dataset, subcenters: int, batch_size: int, progress: bool) -> np.ndarray:
    """[N, K]: every training sample's cosine with its own class's sub-centres (class-major head weight)."""
    weight = twin.head.weight
    weight = weight.detach().cpu().numpy() if hasattr(weight, "detach") else weight.numpy()
    weight = weight.astype(np.float64)
    centres = (weight / np.linalg.norm(weight, axis=1, keepdims=True)).reshape(-1, subcenters, weight.shape[1])
    labels, out = dataset.labels, []
    for start in tqdm(range(0, len(dataset), batch_size), desc="drop-noisy: embed", unit="batch",
                      disable=not progress):
        index = np.arange(start, min(start + batch_size, len(dataset)))
        emb = np.asarray(twin.embed(np.stack([dataset.image(int(i)) for i in index])), np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        out.append(np.einsum("ne,nke->nk", emb, centres[labels[index]]))
    return np.concatenate(out)


def _inputs(dataset):
    rec = getattr(dataset, "rec", None)
    return [rec.reader.rec_path, rec.reader.idx_path] if rec is not None else [getattr(dataset, "root", None)]


def _is_drop_list(path) -> bool:
    with open(path) as f:
        return f.readline() == TSV_HEADER


def drop_noisy(run_dir, dst_prefix, threshold_deg=75.0, overwrite=False, batch_size=256, progress=True) -> dict:
    """Write dst_prefix.rec/.idx (the kept samples, labels renumbered 0..C'-1 when a class loses every sample)
    and dst_prefix.dropped.tsv (index, label, angle to the dominant sub-centre, reason); returns the counts."""
    run_dir, dst_prefix = os.fspath(run_dir), os.fspath(dst_prefix)
    tsv = dst_prefix + ".dropped.tsv"
    for path, recognise in ((dst_prefix + ".rec", is_recordio), (tsv, _is_drop_list)):
        check_destination(path, overwrite=overwrite, recognise=recognise)          # before the long embedding
    twin, cfg, dataset = _twin(run_dir)
    labels = dataset.labels
    own_cos = _own_cosines(twin, dataset, cfg.head.subcenters, batch_size, progress)
    dropped, angle, dominant = noisy_samples(own_cos, labels, dataset.num_classes, threshold_deg)
    kept = np.flatnonzero(~dropped)
    classes = np.unique(labels[kept])
    new_label = np.full(dataset.num_classes, -1, np.int64)
    new_label[classes] = np.arange(len(classes))
    kept = kept[np.argsort(new_label[labels[kept]], kind="stable")]       # each identity contiguous, as written
    records = ((int(new_label[labels[i]]), dataset.encoded(int(i)))
               for i in tqdm(kept, desc="drop-noisy: write", unit="img", disable=not progress))
    with Outputs([tsv], "twinface data drop-noisy", overwrite=overwrite, recognise=_is_drop_list) as (tmp,):
        with open(tmp, "w") as f:
            f.write(TSV_HEADER)
            for i in np.flatnonzero(dropped):
                f.write(f"{i}\t{labels[i]}\t{angle[i]:.3f}\t{FAR if dominant[i] else NON_DOMINANT}\n")
        write_insightface_rec(dst_prefix, records, writer="twinface data drop-noisy", overwrite=overwrite,
                              inputs=_inputs(dataset))
    return {"num_images": len(labels), "kept": len(kept), "dropped": int(dropped.sum()), **angle_report(angle, dropped),
            f"dropped ({NON_DOMINANT})": int((dropped & ~dominant).sum()),
            f"dropped ({FAR})": int((dropped & dominant).sum()),
            "classes_left": len(classes), "classes_emptied": int(dataset.num_classes - len(classes)),
            "threshold_deg": threshold_deg, "dropped_list": tsv}
