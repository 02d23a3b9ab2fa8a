"""torch over 2 processes (torchrun) against TF over 2 workers (MultiWorkerMirroredStrategy): the same centres
sampled, the same loss and gradients, the same weights after one training step."""
import numpy as np

from twinface import partial_fc as plan
from twinface.testing import STEP_CAP

from .inputs import D
from .processes import tf_workers, torchrun


def _ranks(out, world=2):
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(world)]


def _both(tmp_path, torch_args, tf_args=()):
    """The same check as 2 torch ranks and as 2 TF workers; (torch ranks' outputs, TF workers' outputs)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "tf").mkdir()
    torchrun(["torch_worker.py", *torch_args, str(tmp_path / "torch")])
    codes, outs = tf_workers(["tf_worker.py", *torch_args, str(tmp_path / "tf"), *tf_args])
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    return _ranks(tmp_path / "torch"), _ranks(tmp_path / "tf")


def test_sampled_partial_fc_picks_the_same_centres_in_both_twins(tmp_path, parity):
    torch_ranks, tf_ranks = _both(tmp_path, ["head", "0.3"])
    what = "Partial FC 0.3 over 2 processes, torch vs TF"
    for rank, (t, k) in enumerate(zip(torch_ranks, tf_ranks)):
        assert t["index"].tolist() == k["index"].tolist(), f"rank {rank}: the twins sampled other centres"
        parity.check(f"{what}: loss (rank {rank})", [float(t["loss"])], [float(k["loss"])], 1e-5, relative=True)
        parity.check(f"{what}: d loss / d embeddings (rank {rank})", t["emb_grad"], k["emb_grad"], 1e-4,
                     relative=True)
        parity.check(f"{what}: d loss / d centre shard (rank {rank})", t["weight_grad"], k["weight_grad"], 1e-4,
                     relative=True)


def test_torch_two_ranks_equal_tf_two_workers_after_one_step(tmp_path, parity):
    torch_ranks, tf_ranks = _both(tmp_path, ["step"], [str(tmp_path / "torch" / "rank0.npz")])
    what = "mbf one SGD step over 2 processes, torch vs TF"
    first = torch_ranks[0]
    params = [k for k in first if k.startswith("backbone/") and "running" not in k]
    update = max(np.abs(first[k] - first[k.replace("backbone/", "start/", 1)]).max() for k in params)
    for rank, (t, k) in enumerate(zip(torch_ranks, tf_ranks)):
        parity.check(f"{what}: loss (rank {rank})", [float(t["loss"])], [float(k["loss"])], 1e-5, relative=True)
        diff = max(np.abs(t[p] - k[p]).max() for p in params) / update
        parity.check(f"{what}: backbone params (rank {rank}), / update", [diff], [0.0], STEP_CAP)
        start_centres = plan.init_centres(0, int(t["class_start"]), len(t["head"]), D)
        diff = np.abs(t["head"] - k["head"]).max() / np.abs(t["head"] - start_centres).max()
        parity.check(f"{what}: centre shard (rank {rank}), / update", [diff], [0.0], STEP_CAP)
