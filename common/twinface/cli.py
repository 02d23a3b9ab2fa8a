"""`twinface <verb>`: the one command line. A twin is imported only when the verb needs it.

Every failure a user can cause (a bad file, key or value) ends as one line, `twinface <verb>: error: ...`,
naming the file or key, exit status 1 (2 for a bad argument, from argparse); `--debug` or TWINFACE_DEBUG=1
shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""
import argparse
import contextlib
import math
import os
import pickle
import sys

from .runtime import CHOICES as RUNTIME_CHOICES


class UsageError(Exception):
    """A mistake in the command line, already worded for the user."""


# Errors that libraries raise for bad input in their own classes, recognised by module so that this file
# imports none of them.
_USER_ERROR_MODULES = ("onnxruntime.", "onnx.", "safetensors.", "google.protobuf.")


_USER_ERRORS = (UsageError, ValueError, OSError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError)


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, NotImplementedError):                          # a RuntimeError, but always ours to fix
        return False
    return isinstance(e, _USER_ERRORS) or type(e).__module__.startswith(_USER_ERROR_MODULES)


def error_line(e: BaseException) -> str:
    """The one line that reports a user error."""
    if isinstance(e, OSError) and e.filename is not None:          # "[Errno 40] ...: 'x'" -> "x: ..."
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, KeyError) and e.args:                        # str(KeyError) adds quotes
        text = str(e.args[0])
    elif isinstance(e, EOFError) and not str(e):                   # pickle's, on a 0-byte file
        text = "the file ends early (empty or truncated)"
    elif type(e) is pickle.UnpicklingError:                         # torch.load(weights_only=True) refusing
        lines = [line for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
        text = f"refused to unpickle it (only tensors and plain containers are loaded): {why}"
    else:
        text = str(e)
    return " ".join(text.split()) or f"{type(e).__name__} (no message)"


def _worded_by_us(e: BaseException) -> bool:
    """Raised by a `raise` in twinface's own code, whose messages name their file; not a bare OSError (a seek or
    read that the OS refused) and not a library's error passing through."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    ours = tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("twinface")
    return ours and not (isinstance(e, OSError) and e.filename is None and e.errno is not None)


@contextlib.contextmanager
def reading(path: str):
    """Errors while reading `path` that name no file get `path: ` in front: torch's EOFError on a 0-byte file,
    onnxruntime's and safetensors' refusals, a seek to a negative offset say nothing of where."""
    try:
        yield
    except Exception as e:
        if not is_user_error(e) or _worded_by_us(e) or getattr(e, "filename", None) or path in error_line(e):
            raise
        raise UsageError(f"{path}: {error_line(e)}") from e


def _bounded(kind, low, high=None):
    """An argparse type: `kind` (int or float), finite, within [low, high]."""
    what = "an integer" if kind is int else "a finite number"
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value
    return parse


POSITIVE_INT = _bounded(int, 1)


def _add_data(sub):
    p = sub.add_parser("data", help="generate the synthetic set and convert between data formats")
    verbs = p.add_subparsers(dest="data_verb", required=True)
    s = verbs.add_parser("synth", help="write the synthetic training set (.rec + folder) and a held-out val.bin")
    s.add_argument("--config", default="configs/default.yaml", help="take sizes and path from this config's data section")
    s.add_argument("--out", help="output directory (default: the config's data.path)")
    s.add_argument("--identities", type=POSITIVE_INT)
    s.add_argument("--images-per-identity", type=POSITIVE_INT)
    s.add_argument("--val-identities", type=POSITIVE_INT)
    s.add_argument("--val-pairs", type=POSITIVE_INT)
    s.add_argument("--seed", type=int)
    s.add_argument("--formats", default="rec,folder", help="comma list of rec, folder")
    s.add_argument("--overwrite", action="store_true")
    c = verbs.add_parser("folder2rec", help="image folder (one sub-folder per identity) -> insightface .rec/.idx")
    c.add_argument("src"), c.add_argument("dst_prefix", help="writes DST_PREFIX.rec and DST_PREFIX.idx")
    c.add_argument("--overwrite", action="store_true")
    _add_detect_args(c, "the folder holds photos: align the largest face of each into DST_PREFIX.aligned/ "
                        "(resumable, with its report) and pack those crops")
    c = verbs.add_parser("rec2folder", help="insightface .rec/.idx -> image folder")
    c.add_argument("src_prefix", help="PREFIX of PREFIX.rec/.idx (or the .rec path)"), c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")
    for verb, src, what in (("rec2tfrecord", "src_prefix", "insightface .rec/.idx"),
                            ("folder2tfrecord", "src", "image folder (one sub-folder per identity)")):
        c = verbs.add_parser(verb, help=f"{what} -> TFRecord shards + index.npz (image bytes copied, docs/data.md)")
        c.add_argument(src), c.add_argument("dst_dir")
        c.add_argument("--shards", type=POSITIVE_INT, default=8, help="number of shards (default 8; at least the "
                                                                      "number of training processes)")
        c.add_argument("--overwrite", action="store_true")
    c = verbs.add_parser("tfrecord2folder", help="TFRecord data set -> image folder (bytes unchanged)")
    c.add_argument("src_dir"), c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")
    c = verbs.add_parser("tfrecord-index", help="write index.npz for TFRecord shards another tool wrote (one scan)")
    c.add_argument("dir")
    c.add_argument("--overwrite", action="store_true")
    c = verbs.add_parser("folder2bin", help="image folder -> verification .bin with generated pairs")
    c.add_argument("src"), c.add_argument("dst")
    c.add_argument("--pairs", type=POSITIVE_INT, default=6000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--image-size", type=POSITIVE_INT, default=112)
    c.add_argument("--overwrite", action="store_true")
    c = verbs.add_parser("drop-noisy", help="Sub-center ArcFace's noise drop: a finished run's training set without "
                                            "the samples far from their class's dominant sub-centre -> .rec/.idx")
    c.add_argument("run_dir", help="a finished training run (config.yaml and state.pt or state.npz)")
    c.add_argument("dst_prefix", help="writes DST_PREFIX.rec/.idx and DST_PREFIX.dropped.tsv (the dropped samples)")
    c.add_argument("--threshold-deg", type=_bounded(float, 0.0, 180.0), default=75.0,
                   help="drop a sample whose angle to its class's dominant sub-centre exceeds this (default 75, "
                        "the paper's)")
    c.add_argument("--batch-size", type=POSITIVE_INT, default=256)
    c.add_argument("--overwrite", action="store_true")


def _run_data(args):
    from .data import convert
    if args.data_verb == "synth":
        from . import config as config_mod
        from .data import synth
        full = config_mod.load(args.config)
        cfg = full.data
        params = dict(num_identities=args.identities or cfg.synth_identities,
                      images_per_identity=args.images_per_identity or cfg.synth_images_per_identity,
                      val_identities=args.val_identities or cfg.synth_val_identities,
                      val_pairs=args.val_pairs or cfg.synth_val_pairs,
                      seed=full.seed if args.seed is None else args.seed)
        out = args.out or cfg.path
        stats = synth.generate(out, formats=tuple(args.formats.split(",")), overwrite=args.overwrite, **params)
        _print_stats(stats)
    elif args.data_verb == "folder2rec":
        src = args.src
        if args.detect:       # the .rec is checked first; the crops are kept (and resumed) unless settings changed
            from .atomic import check_destination
            from .data.recordio import is_recordio
            for path in (f"{args.dst_prefix}.idx", f"{args.dst_prefix}.rec"):
                check_destination(path, overwrite=args.overwrite, recognise=is_recordio, what="a RecordIO file",
                                  inputs=[args.src])
            src = f"{args.dst_prefix}.aligned"
            with reading(args.src):
                _print_stats(_align(args, args.src, src, overwrite="stale" if args.overwrite else "no"))
        with reading(src):
            _print_stats(convert.folder_to_rec(src, args.dst_prefix, overwrite=args.overwrite))
    elif args.data_verb == "rec2folder":
        with reading(args.src_prefix):
            _print_stats(convert.rec_to_folder(args.src_prefix, args.dst, overwrite=args.overwrite))
    elif args.data_verb == "rec2tfrecord":
        with reading(args.src_prefix):
            _print_stats(convert.rec_to_tfrecord(args.src_prefix, args.dst_dir, args.shards, overwrite=args.overwrite))
    elif args.data_verb == "folder2tfrecord":
        with reading(args.src):
            _print_stats(convert.folder_to_tfrecord(args.src, args.dst_dir, args.shards, overwrite=args.overwrite))
    elif args.data_verb == "tfrecord2folder":
        with reading(args.src_dir):
            _print_stats(convert.tfrecord_to_folder(args.src_dir, args.dst, overwrite=args.overwrite))
    elif args.data_verb == "tfrecord-index":
        from .data.tfrecord import write_index
        with reading(args.dir):
            _print_stats(write_index(args.dir, overwrite=args.overwrite))
    elif args.data_verb == "drop-noisy":
        from .noisy import drop_noisy
        with reading(args.run_dir):
            _print_stats(drop_noisy(args.run_dir, args.dst_prefix, threshold_deg=args.threshold_deg,
                                    overwrite=args.overwrite, batch_size=args.batch_size))
    elif args.data_verb == "folder2bin":
        with reading(args.src):
            _print_stats(convert.folder_to_bin(args.src, args.dst, num_pairs=args.pairs, seed=args.seed,
                                               image_size=args.image_size, overwrite=args.overwrite))


def _print_stats(stats: dict):
    for key, value in stats.items():
        print(f"{key}: {value}")


def _add_detect_args(p, detect_help=None):
    """The detector's options; `detect_help` adds --detect (the inputs are photos), else detection is the verb."""
    from .detect import DEFAULT_MIN_SCORE, FRAMEWORKS
    if detect_help:
        p.add_argument("--detect", action="store_true", help=detect_help)
        p.add_argument("--detector", choices=FRAMEWORKS, help="runtime of the MTCNN nets (default: the "
                       "model's framework; torch for folder2rec)")
    p.add_argument("--min-size", type=_bounded(float, 12.0), default=20.0,
                   help="smallest face side searched, in photo pixels (default 20)")
    p.add_argument("--min-score", type=_bounded(float, 0.0, 1.0), default=DEFAULT_MIN_SCORE,
                   help=f"keep a face whose final (O-Net) score reaches this (default {DEFAULT_MIN_SCORE}; "
                        "docs/detect.md)")


def _aligner(args, faces="largest", size=112):
    from .detect.cascade import DetectParams
    from .detect.faces import FaceAligner, load_detector_nets
    # embed / verify: the runtime the model runs in (set by _load_embedder, else the weights'); align: --framework
    framework = getattr(args, "detector", None) or getattr(args, "runtime_used", None) \
        or getattr(args, "framework", None)
    if not framework and getattr(args, "weights", None):
        from .embedders import detect_framework
        framework = detect_framework(args.weights)
    framework = "tf" if framework == "tflite" else framework            # TF's interpreter runs a .tflite file
    return FaceAligner(load_detector_nets(framework or "torch"), DetectParams(min_face_size=args.min_size),
                       min_score=args.min_score, faces=faces, size=size)


def _align(args, src, dst, overwrite, faces="largest", size=112) -> dict:
    from .detect.align_folder import align_folder
    return align_folder(src, dst, _aligner(args, faces, size), overwrite=overwrite)


def _add_align(sub):
    from .detect import FACE_MODES, FRAMEWORKS, MAX_CROP_SIZE
    p = sub.add_parser("align", help="photos -> aligned face crops (MTCNN + insightface's 5-point alignment), "
                                     "same folder tree, with landmarks.json and a report of photos without a face")
    p.add_argument("src", help="folder of photos (any size; jpg, png, webp, bmp), searched recursively")
    p.add_argument("dst", help="output folder; a re-run into it resumes, skipping photos already done")
    p.add_argument("--faces", choices=FACE_MODES, default="largest",
                   help="crop the largest face of each photo (default) or every face, as STEM_K.jpg by score")
    p.add_argument("--size", type=_bounded(int, 16, MAX_CROP_SIZE), default=112,
                   help="crop side (default 112; docs/detect.md)")
    p.add_argument("--framework", choices=FRAMEWORKS, default="torch",
                   help="runtime of the MTCNN nets (default torch)")
    p.add_argument("--overwrite", action="store_true", help="start over in DST (only a twinface align output)")
    _add_detect_args(p)


def _run_align(args):
    with reading(args.src):
        _print_stats(_align(args, args.src, args.dst, args.overwrite, args.faces, args.size))


def _add_eval(sub):
    p = sub.add_parser("eval", help="insightface verification protocol on .bin sets")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help=".npy of the set's 2N embeddings (precomputed, no flip)")
    _add_model_args(p, weights_in=src)
    p.add_argument("--bin", action="append", required=True, help="verification .bin (repeatable)")
    p.add_argument("--roc", help="write a ROC plot (PNG) of all sets here")
    p.add_argument("--json", help="write the numbers as JSON here")


def _run_eval(args):
    import json

    from .data.verification_bin import load_bin
    from .eval import bins as bins_mod
    from .eval.embeddings import load_embeddings
    from .eval.verification import evaluate_embeddings, format_result
    results = {}
    if args.embeddings:
        if args.runtime:
            raise UsageError("--runtime runs a model (--weights); --embeddings are already computed")
        if len(args.bin) != 1:
            raise UsageError("--embeddings scores exactly one --bin")
        with reading(args.bin[0]):
            _, issame = load_bin(args.bin[0])
        with reading(args.embeddings):
            embeddings, _ = load_embeddings(args.embeddings)   # checks the header's size against the file first
        results[os.path.basename(args.bin[0])] = evaluate_embeddings(embeddings, None, issame)
    else:
        embed = _load_embedder(args, args.batch_size)
        for path in args.bin:
            with reading(path):
                results[os.path.basename(path)] = bins_mod.evaluate_bin(embed, path, flip=not args.no_flip,
                                                                        batch_size=args.batch_size)
    for name, result in results.items():
        print(format_result(name, result))
    if args.roc:
        from .eval.roc_plot import save_roc_plot
        save_roc_plot(results, args.roc)
        print(f"ROC plot: {args.roc}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v.summary() for k, v in results.items()}, f, indent=2)


def _add_export(sub):
    p = sub.add_parser("export", help="export a backbone to ONNX (NCHW input 'data', dynamic batch) or, TF weights, to "
                                      "TFLite (NHWC float input, fp32 / fp16 / int8), verified")
    p.add_argument("--framework", choices=["torch", "tf"], help="default: from the weights' extension")
    p.add_argument("--weights", required=True)
    p.add_argument("--arch", required=True, help="backbone name (r50, mbf, ...)")
    p.add_argument("--out", required=True, help="the file to write: .onnx, .tflite with --format tflite, .pt2 with "
                                                 "--format pt2 (embed uses WEIGHTS_STEM.pt2 beside the weights)")
    p.add_argument("--format", choices=["onnx", "tflite", "pt2"], default="onnx",
                   help="default onnx; tflite (TF weights, docs/tflite.md); pt2: torch weights compiled ahead of time "
                        "for this CPU (AOTInductor, docs/bench.md)")
    p.add_argument("--quantization", choices=["fp32", "fp16", "int8", "int8-float-prelu"], default="fp32",
                   help="tflite: fp32 (default), fp16 weights, int8 weights and activations (needs --calibration), or "
                        "int8-float-prelu: int8 but PReLU in float, 3-4x faster under XNNPACK on x86 (docs/tflite.md)")
    p.add_argument("--calibration", metavar="DATA",
                   help="tflite: real face images (.rec, TFRecord or image folder): a seeded sample calibrates int8 "
                        "and checks the file against the Keras twin (without it fp32/fp16 are checked on noise)")
    p.add_argument("--num-features", type=POSITIVE_INT, default=512)
    p.add_argument("--input-size", type=POSITIVE_INT, default=112)
    p.add_argument("--opset", type=POSITIVE_INT, default=17, help="onnx only")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (never the weights)")


def _run_export(args):
    from .embedders import detect_framework
    framework = detect_framework(args.weights, args.framework)
    tflite = args.format == "tflite"
    if not tflite and (args.quantization != "fp32" or args.calibration):
        raise UsageError("--quantization and --calibration apply to --format tflite only")
    if args.format == "pt2" and framework != "torch":
        raise UsageError(f"--format pt2 compiles torch weights, got {framework}; convert them first (twinface convert)")
    from .atomic import check_destination
    check_destination(args.out, overwrite=args.force, flag="--force", inputs=[args.weights, args.calibration],
                      ext="." + args.format)
    if framework == "torch" and not tflite:
        from twinface_torch import checkpoint, export
    elif framework == "tf":
        from twinface_tf import checkpoint, export
    else:
        raise UsageError(f"{args.format} export takes {'TF' if tflite else 'torch or TF'} weights, got {framework}"
                         + ("; convert torch weights first (twinface convert)" if framework == "torch" else ""))
    with reading(args.weights):
        model = checkpoint.load_backbone(args.weights, args.arch, num_features=args.num_features,
                                         input_size=args.input_size)
    if tflite:
        from twinface_tf.tflite import export_tflite
        with reading(args.calibration) if args.calibration else contextlib.nullcontext():
            r = export_tflite(model, args.out, args.quantization, calibration=args.calibration)
        print(f"wrote {args.out} ({args.quantization}, {r['bytes'] / 2 ** 20:.1f} MiB; vs the Keras twin on "
              f"{r['verified_on']}: cosine min {r['cosine_min']:.6f}, mean {r['cosine_mean']:.6f}; "
              f"XNNPACK delegate nodes: {r['delegate_nodes']})")
        return
    if args.format == "pt2":
        from .atomic import file_sha256
        from twinface_torch import aot
        spec = aot.identity(args.arch, args.input_size, args.num_features, file_sha256(args.weights))
        print(f"compiling {args.out} (AOTInductor, about a minute) ...")
        diff = aot.compile_package(model, args.out, spec)
        beside = aot.package_path(args.weights)
        used = ("embed / eval / verify use it" if os.path.abspath(args.out) == os.path.abspath(beside) else
                f"embed / eval / verify look for it as {beside}")
        print(f"wrote {args.out} (vs the module: max abs diff {diff:.3g}, L2-normalised; {used})")
        return
    diff = export.export_onnx(model, args.out, args.arch, input_size=args.input_size, opset=args.opset)
    print(f"wrote {args.out} (onnxruntime vs {framework}: max abs diff {diff:.3g})")


def _add_model_args(p, weights_in=None):
    """The model options of embed, verify and eval; `weights_in` is a mutually exclusive group that --weights
    joins (eval: --weights or --embeddings), else --weights is required."""
    (weights_in or p).add_argument("--weights", required=weights_in is None,
                                   help="model: .onnx, .tflite, torch .pth/.pt, Keras .weights.h5")
    p.add_argument("--framework", choices=["torch", "tf", "onnx", "tflite"],
                   help="override detection from the extension")
    p.add_argument("--arch", help="backbone name for torch/TF weights (e.g. r50); ONNX files need none")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES,
                   help="run the model in this framework (converted once, verified, cached) or, auto, in the fastest "
                        "one here, measured once per machine, model and batch (default: the weights' own)")
    p.add_argument("--input-size", type=POSITIVE_INT, default=112, help="torch/TF weights: the input size trained at")
    p.add_argument("--num-features", type=POSITIVE_INT, default=512, help="torch/TF weights: the embedding size")
    p.add_argument("--no-flip", action="store_true",
                   help="skip the flip test: embed each image alone, without adding its mirror's embedding")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)


def _add_embed(sub):
    p = sub.add_parser("embed", help="embeddings of aligned 112x112 face images -> .npy (+ names .txt)")
    _add_model_args(p)
    p.add_argument("--images", required=True, help="a folder (searched recursively), one image, or a text file of "
                                                    "paths (one a line)")
    p.add_argument("--out", required=True, help="output .npy; the image paths go to a .names.txt beside it")
    p.add_argument("--raw", action="store_true", help="keep raw vectors (default: L2-normalised)")
    _add_detect_args(p, "the images are photos: embed the largest face of each (detected, aligned); photos "
                        "without one are listed on stderr and left out")


def _image_paths(spec: str):
    from .data.folder import IMAGE_EXTS
    if os.path.isdir(spec):
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                       if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    elif os.path.splitext(spec)[1].lower() in IMAGE_EXTS:
        paths = [spec]
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                paths = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--images {spec}: neither an image (by its extension) nor a text file of paths") from None
    else:
        raise FileNotFoundError(f"--images {spec}: no such folder or list file")
    if not paths:
        raise ValueError(f"--images {spec}: no images found (extensions: {', '.join(sorted(IMAGE_EXTS))})")
    return paths


def _load_embedder(args, batch: int):
    """The model of embed / eval / verify, in --runtime's framework (`batch`: the shape auto times)."""
    from .embedders import detect_framework, load_embedder
    model_kwargs = dict(input_size=args.input_size, num_features=args.num_features)
    with reading(args.weights):
        framework, weights = detect_framework(args.weights, args.framework), args.weights
        if args.runtime:
            from . import runtime
            chosen = args.runtime
            if chosen == "auto":
                chosen = runtime.choose(weights, framework, args.arch, model_kwargs, batch)
            weights = runtime.converted(weights, framework, chosen, args.arch, args.input_size)
            framework = chosen
        args.runtime_used = framework
        return load_embedder(weights, framework, args.arch, **model_kwargs)


def _embed_paths(embed, paths, flip: bool, batch_size: int, verb: str, progress: bool = True, aligner=None):
    """(embeddings, paths embedded): raw, flip-summed when `flip`, of image files decoded batch by batch. With an
    aligner each file is a photo and its largest face is embedded; photos without one are left out. Without,
    images that are not square are squashed to 112x112 like the others, and said so on stderr: they are not
    aligned crops."""
    import numpy as np
    from tqdm import tqdm
    from .data.images import read_image
    from .data.transforms import hflip, resize
    chunks, squashed, kept, faceless = [], [], [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="embed", unit="batch", disable=not progress):
        images = []
        for path in paths[start:start + batch_size]:
            image = read_image(path)
            if aligner:
                faces, below = aligner.find(image)
                if not len(faces):
                    faceless.append(f"{path} ({f'{below} below --min-score' if below else 'no face'})")
                    continue
                image = aligner.crops(image, faces)[0]
            elif image.shape[0] != image.shape[1]:
                squashed.append(f"{path} ({image.shape[1]}x{image.shape[0]})")
            images.append(resize(image, 112))
            kept.append(path)
        if images:
            images = np.stack(images)
            emb = np.asarray(embed(images), np.float32)
            chunks.append(emb + np.asarray(embed(hflip(images)), np.float32) if flip else emb)
    if squashed:
        print(f"twinface {verb}: warning: {len(squashed)} of {len(paths)} images are not square and were squashed "
              f"to 112x112, aspect ratio lost, so their embeddings are unreliable; align the faces first "
              f"(twinface align, or --detect). E.g. {', '.join(squashed[:3])}", file=sys.stderr)
    if faceless:
        print(f"twinface {verb}: {len(faceless)} of {len(paths)} photos have no face and are left out: "
              f"{', '.join(faceless)}", file=sys.stderr)
    if not chunks:
        raise ValueError(f"no face found in any of the {len(paths)} photos")
    return np.concatenate(chunks), kept


def _run_embed(args):
    from .eval.embeddings import l2_normalize, save_embeddings
    paths = _image_paths(args.images)
    embed = _load_embedder(args, min(args.batch_size, len(paths)))
    aligner = _aligner(args) if args.detect else None
    emb, paths = _embed_paths(embed, paths, not args.no_flip, args.batch_size, args.verb, aligner=aligner)
    out = save_embeddings(args.out, emb if args.raw else l2_normalize(emb), names=paths)
    print(f"wrote {out}: {emb.shape[0]} embeddings of dimension {emb.shape[1]}")


def _add_verify(sub):
    p = sub.add_parser("verify", help="same person or not: similarity of two aligned face images (or photos, --detect)")
    _add_model_args(p)
    p.add_argument("images", nargs=2, metavar="IMAGE")
    p.add_argument("--threshold", type=_bounded(float, 0.0, 4.0), default=1.4,
                   help="same person when the squared L2 distance of the normalised embeddings is below this "
                        "(0 to 4; insightface's protocol; `twinface eval` prints the best one per set). Default 1.4")
    _add_detect_args(p, "the images are photos: compare their largest faces (detected, aligned)")


def _run_verify(args):
    import numpy as np
    from .eval.embeddings import l2_normalize
    embed = _load_embedder(args, 2)
    aligner = _aligner(args) if args.detect else None
    emb, kept = _embed_paths(embed, list(args.images), not args.no_flip, 2, args.verb, progress=False, aligner=aligner)
    if len(kept) < 2:
        missing = [p for p in args.images if p not in kept]
        raise ValueError(f"{missing[0]}: no face found (see --min-size, --min-score); cannot compare")
    a, b = l2_normalize(emb)
    cos = float(np.dot(a, b))
    dist = float(np.sum((a - b) ** 2))
    same = dist < args.threshold
    print(f"cosine similarity {cos:.4f}, squared L2 distance {dist:.4f} (threshold {args.threshold}): "
          f"{'SAME person' if same else 'DIFFERENT people'}")
    return same


def _add_parity(sub):
    p = sub.add_parser("parity", help="prove the twins agree: table of diffs vs tolerances")
    p.add_argument("--json", default="parity_report.json", help="also write the table as JSON here")
    p.add_argument("--quick", action="store_true", help="skip the large backbones (r100, r200)")


PARITY_ROOMS = ("parity_tests", "distributed_tests")       # one table: cross-framework and scale-out proofs


def parity_command(quick: bool) -> list:
    """pytest over the parity rooms; --quick deselects the checks marked `large` (IResNet-100/200)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-m", "not large"] if quick else []),
            *(os.path.join(root, room) for room in PARITY_ROOMS)]


def _run_parity(args):
    import subprocess
    env = {**os.environ, "TWINFACE_PARITY_JSON": os.path.abspath(args.json)}
    cmd = parity_command(args.quick)
    raise SystemExit(subprocess.call(cmd, env=env, cwd=os.path.dirname(cmd[-1])))


def _add_train(sub):
    p = sub.add_parser("train", help="train a config with one twin (torch or tf)")
    p.add_argument("--framework", choices=["torch", "tf"], required=True)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--output", help="run directory (default: the config's output, suffixed by the framework)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last full checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a directory that holds a previous run")
    p.add_argument("--nproc", type=POSITIVE_INT, default=1,
                   help="processes on this machine (torchrun for torch, MultiWorkerMirroredStrategy workers for tf); "
                        "train.batch_size is per process")


def _run_train(args):
    from . import config as config_mod
    from . import launch
    from .trainer import Trainer
    cfg = config_mod.load(args.config, args.set)         # a bad config fails here, before any process starts
    if args.nproc > 1 and not launch.launched():
        argv = ["train", "--framework", args.framework, "--config", args.config,
                *[a for s in args.set for a in ("--set", s)], *(["--output", args.output] if args.output else []),
                *(["--resume"] if args.resume else []), *(["--overwrite"] if args.overwrite else [])]
        raise SystemExit(launch.launch(args.framework, args.nproc, argv))
    cfg.output = args.output or f"{cfg.output}_{args.framework}"
    if args.framework == "torch":
        from twinface_torch.train import TorchTwin as Twin
    else:
        from twinface_tf.train import TFTwin as Twin
    Trainer(cfg, Twin(timeout_s=cfg.train.distributed_timeout_s), resume=args.resume, overwrite=args.overwrite).run()


def _add_convert(sub):
    from twinface_convert.cli import add_parser   # argparse only: no framework is imported here
    add_parser(sub)


def _run_convert(args):
    from twinface_convert.cli import run
    with reading(args.src):
        return run(args)


def _add_bench(sub):
    from twinface_bench.cli import add_parser     # argparse only: no framework is imported here
    add_parser(sub)


def _run_bench(args):
    from twinface_bench.cli import run
    return run(args)


VERBS = {"train": (_add_train, _run_train), "convert": (_add_convert, _run_convert), "bench": (_add_bench, _run_bench),
         "embed": (_add_embed, _run_embed), "verify": (_add_verify, _run_verify), "align": (_add_align, _run_align),
         "data": (_add_data, _run_data), "eval": (_add_eval, _run_eval), "export": (_add_export, _run_export),
         "parity": (_add_parity, _run_parity)}


def build_parser():
    parser = argparse.ArgumentParser(prog="twinface", description="twinface: train, convert, embed and evaluate "
                                     "face recognition models with the PyTorch and TensorFlow twins. A failure reads "
                                     "as one line, `twinface VERB: error: ...`; --debug shows its traceback.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or TWINFACE_DEBUG=1)")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add, _ in VERBS.values():
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        VERBS[args.verb][1](args)
    except Exception as e:
        if args.debug or os.environ.get("TWINFACE_DEBUG") == "1" or not is_user_error(e):
            raise
        raise SystemExit(f"twinface {args.verb}: error: {error_line(e)}") from None


if __name__ == "__main__":
    main()
