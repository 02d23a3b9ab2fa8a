"""The TensorFlow twin's adapter for the shared training loop (twinface.trainer)."""
import json

import keras
import numpy as np
import tensorflow as tf

from twinface import partial_fc as plan, run_dir
from twinface.atomic import atomic_path
from twinface.data.transforms import to_model_input

from . import checkpoint, data, distributed as dist, export
from .backbones import get_model
from .embed import embed_images
from .heads import get_head
from .losses import TripletLoss, get_loss
from .optim import build_optimizer
from .partial_fc import PartialFC


def _read_npz(path: str) -> dict:
    """Every array of an .npz; a truncated or foreign file is a one-line ValueError naming it."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:                     # zipfile.BadZipFile, EOFError, ValueError from a cut-off member, ...
        raise ValueError(f"{path}: not a readable training state, truncated or not written by twinface "
                         f"({type(e).__name__}: {e})") from None


class TFTwin:
    framework = "tf"
    backbone_filename = "backbone.weights.h5"
    state_filename = "state.npz"

    def __init__(self, timeout_s: float = 1800.0):
        # TF_CONFIG naming several workers: MultiWorkerMirroredStrategy, one replica per worker process (it must
        # be created before any other TensorFlow operation runs); timeout_s bounds every collective
        self.rank, self.world_size = dist.world()
        self.strategy = dist.strategy(self.world_size, timeout_s)

    def build(self, cfg, num_classes: int):
        plan.check_supported(cfg, self.world_size)
        self.cfg = cfg
        keras.utils.set_random_seed(cfg.seed)                     # same config, same initial weights
        b = cfg.backbone
        self.backbone = get_model(b.name, num_features=b.num_features, dropout=b.dropout, input_size=b.input_size,
                                  precision=cfg.train.precision, checkpointing=b.checkpointing)
        if plan.needed(cfg, self.world_size):        # the head returns the global batch's loss
            self.head = PartialFC(b.num_features, num_classes, sample_rate=cfg.head.sample_rate, rank=self.rank,
                                  world_size=self.world_size, seed=cfg.seed, **cfg.head_params())
        elif cfg.head.type == "none":
            self.head = TripletLoss(**cfg.triplet_params())    # no variables: the loss takes the head's slot
        else:
            self.head = get_head(cfg.head.type, b.num_features, num_classes, **cfg.head_params())
            self.head.build((None, b.num_features))
            self.loss_fn = get_loss(cfg.loss.type, **({"gamma": cfg.loss.gamma} if cfg.loss.type == "focal" else {}))
        o = cfg.optimizer
        kw = dict(momentum=o.momentum, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
        self.opt_backbone = build_optimizer(o.type, self.backbone.trainable_variables, o.lr, **kw)
        self.opt_head = build_optimizer(o.type, self.head.trainable_variables, o.lr, **kw)
        self.frozen = False
        self._steps = {}
        # fp16: dynamic loss scaling with torch.amp.GradScaler's rule (x0.5 on overflow, x2 after growth_interval
        # finite steps), kept here because Keras' LossScaleOptimizer scales per optimizer and unscales inside
        # apply, while this step shares one scale between backbone and head and clips the unscaled gradients.
        t = cfg.train
        self.fp16 = t.precision == "fp16"
        self.scale = tf.Variable(t.loss_scale if self.fp16 else 1.0, dtype=tf.float32, trainable=False)
        self.growth_tracker = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.growth_interval = t.loss_scale_growth_interval
        self.overflow = False                     # the last step was skipped for a loss-scale overflow
        self.no_triplets = False                  # the last step was skipped: no valid triplet on any worker
        self.triplets = None                      # valid triplets of the last batch (triplet loss only)

    def load_backbone(self, path: str):
        checkpoint.load_into(self.backbone, path)

    def set_backbone_frozen(self, frozen: bool):
        self.frozen = frozen

    def batches(self, dataset, sampler, epoch, start_step):
        return data.batches(dataset, sampler, epoch, start_step, num_workers=self.cfg.data.num_workers,
                            size=self.cfg.backbone.input_size, deterministic=self.cfg.data.deterministic)

    def _make_step(self, frozen: bool):
        """One step: this worker's replica computes the loss and gradients (collectives inside strategy.run),
        then the updates apply to this worker's own variables, or none does when any worker found the step
        non-finite."""
        backbone_vars = self.backbone.trainable_variables
        head_vars = self.head.trainable_variables
        partial = isinstance(self.head, PartialFC)
        stats = [v for v in self.backbone.non_trainable_variables if "moving" in v.path]
        head_stats = [] if partial else self.head.non_trainable_variables      # AdaFace's norm EMA
        clip = float(self.cfg.train.clip_grad_norm)
        triplet = isinstance(self.head, TripletLoss)

        def replica(x, y):
            saved = [tf.identity(v) for v in stats + head_stats]
            triplets = tf.constant(-1)
            with tf.GradientTape() as tape:
                emb = tf.cast(self.backbone(x, training=not frozen), tf.float32)
                if triplet:       # each worker mines its own batch: its share of the summed gradient
                    loss, triplets = self.head(emb, y)
                    scaled = loss / self.world_size
                else:
                    loss = self.head(emb, y) if partial else self.loss_fn(self.head(emb, y), y)
                    scaled = loss
                scaled = scaled * self.scale if self.fp16 else scaled
            # dense: Partial FC's sampled centres give IndexedSlices
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, head_vars if frozen else
                                                                     backbone_vars + head_vars)]
            grads_head = grads[len(grads) - len(head_vars):]
            grads_backbone = dist.sum_gradients(grads[:len(backbone_vars)] if not frozen else [])
            if not frozen and dist.running():          # BatchNorm statistics: the mean of every worker's update
                for v, mean in zip(stats, dist.average([tf.identity(v) for v in stats])):
                    v.assign(mean)
            ok = tf.math.is_finite(loss)
            overflow = tf.constant(False)
            if self.fp16:                # as GradScaler.unscale_: multiply by the float32 reciprocal of the scale
                inv = tf.cast(1.0 / tf.cast(self.scale, tf.float64), tf.float32)
                grads_head = [g * inv for g in grads_head]
                grads_backbone = [g * inv for g in grads_backbone]
                finite = dist.all_agree(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                                                       for g in grads_head + grads_backbone]))
                overflow = tf.logical_and(ok, tf.logical_not(finite))
                ok = tf.logical_and(ok, finite)
            if grads_backbone and clip > 0:
                # torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (total_norm + 1e-6))
                norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads_backbone]))
                coef = tf.minimum(clip / (norm + 1e-6), 1.0)
                grads_backbone = [g * coef for g in grads_backbone]
                ok = tf.logical_and(ok, tf.math.is_finite(norm))
            empty = dist.all_agree(tf.equal(triplets, 0)) if triplet else tf.constant(False)   # none on any worker
            ok = tf.logical_and(ok, tf.logical_not(empty))
            return loss, dist.all_agree(ok), overflow, empty, triplets, grads_head, grads_backbone, saved

        @tf.function(reduce_retracing=True, )
        def step(x, y, lr_backbone, lr_head):
            loss, ok, overflow, empty, triplets, grads_head, grads_backbone, saved = dist.run(self.strategy, replica,
                                                                                              x, y)
            if ok:
                if head_vars:
                    self.opt_head.learning_rate.assign(lr_head)
                    self.opt_head.apply(grads_head, head_vars)
                if grads_backbone:
                    self.opt_backbone.learning_rate.assign(lr_backbone)
                    self.opt_backbone.apply(grads_backbone, backbone_vars)
                if self.fp16:
                    self._grow_scale()
            else:
                for v, old in zip(stats + head_stats, saved):
                    v.assign(old)
                if overflow:
                    self.scale.assign(self.scale * 0.5)
                    self.growth_tracker.assign(0)
            # a skipped step that is no overflow (non-finite loss or gradient norm) reads as NaN, as in torch
            return tf.where(ok | overflow | empty, loss, float("nan")), overflow, empty, triplets

        return step

    def _grow_scale(self):
        """GradScaler.update after a finite step: count it; every growth_interval-th one doubles the scale."""
        self.growth_tracker.assign_add(1)
        if self.growth_tracker >= self.growth_interval:
            self.scale.assign(self.scale * 2.0)
            self.growth_tracker.assign(0)

    @property
    def loss_scale(self):
        """The fp16 loss scale now (None when not training in fp16)."""
        return float(self.scale.numpy()) if self.fp16 else None

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr_backbone: float, lr_head: float) -> float:
        if self.frozen not in self._steps:
            self._steps[self.frozen] = self._make_step(self.frozen)
        x = tf.constant(to_model_input(images, "NHWC"))
        with dist.peers_lost_explained(self.rank, self.world_size):
            loss, overflow, empty, triplets = self._steps[self.frozen](
                x, tf.constant(labels), tf.constant(lr_backbone, tf.float32), tf.constant(lr_head, tf.float32))
        self.overflow, self.no_triplets = bool(overflow), bool(empty)
        self.triplets = int(triplets) if isinstance(self.head, TripletLoss) else None
        return float(loss)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return embed_images(self.backbone, images)

    def save_backbone(self, path: str):
        checkpoint.save_backbone(self.backbone, path)

    def _variables(self, shard: bool):
        """What a checkpoint file holds. One process: everything, in the state file. Several workers: rank 0's
        state file holds the backbone, its optimizer and the loss scale (the same on every worker), and each
        worker's shard file its own head shard and that shard's optimizer state."""
        groups = {"backbone": self.backbone.variables, "head": self.head.variables,
                  "opt_backbone": self.opt_backbone.variables, "opt_head": self.opt_head.variables,
                  **({"loss_scale": [self.scale, self.growth_tracker]} if self.fp16 else {})}
        head = ("head", "opt_head")
        if shard or self.world_size > 1:
            groups = {k: vs for k, vs in groups.items() if (k in head) == shard}
        # Keyed by position: Keras' auto-generated layer names (margin_head_2, ...) change between processes.
        return {f"{group}/{i:04d}": v for group, vs in groups.items() for i, v in enumerate(vs)}

    def _save(self, path: str, meta: dict, shard: bool):
        arrays = {k: v.numpy() for k, v in self._variables(shard).items()}
        arrays["meta"] = np.array(json.dumps(meta))
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    def _load(self, path: str, shard: bool) -> dict:
        saved = _read_npz(path)
        what = f"head shard of rank {self.rank} of {self.world_size}" if shard else "training state"
        if "meta" not in saved:
            raise ValueError(f"{path}: {what} has no 'meta' entry")
        meta = json.loads(str(saved["meta"]))
        if not shard:
            run_dir.check_world_size(path, meta, self.world_size)
        variables = self._variables(shard)
        for key, var in variables.items():
            if key not in saved:
                raise ValueError(f"{path}: {what} has no '{key}' (saved by another config?)")
            if saved[key].shape != tuple(var.shape):
                raise ValueError(f"{path}: '{key}' ({var.path}) has shape {saved[key].shape}, expected "
                                 f"{tuple(var.shape)} for the {what} (saved with another world size or "
                                 f"number of classes?)")
        for key, var in variables.items():
            var.assign(saved[key])
        if isinstance(self.head, PartialFC):         # the negatives' draw continues where the run stopped
            self.head.step.assign(int(meta.get("step", 0)))
        return meta

    def save_state(self, path: str, meta: dict):
        self._save(path, meta, shard=False)

    def load_state(self, path: str) -> dict:
        return self._load(path, shard=False)

    def save_shard(self, path: str, meta: dict):
        """This worker's head shard and its optimizer state (several workers; atomic as save_state)."""
        self._save(path, meta, shard=True)

    def load_shard(self, path: str) -> dict:
        return self._load(path, shard=True)

    def barrier(self):
        """Every worker waits here for the others (the trainer's checkpoint protocol)."""
        with dist.peers_lost_explained(self.rank, self.world_size):
            dist.barrier(self.strategy)

    def export_onnx(self, path: str) -> float:
        """The fp32 graph whatever the training precision (as the torch twin exports): same variables, ONNX
        models that every runtime takes (onnxruntime has no bf16 Conv on CPU)."""
        b = self.cfg.backbone
        model = self.backbone
        if self.cfg.train.precision != "fp32" or b.checkpointing:
            model = get_model(b.name, num_features=b.num_features, input_size=b.input_size)
            model.set_weights(self.backbone.get_weights())
        return export.export_onnx(model, path, b.name, input_size=b.input_size)
