"""`twinface bench`: the verb, registered in twinface.cli as (add_parser, run). Importing it loads no framework."""
from .detect import DetectOptions, run_detect
from .head import WORKERS, HeadOptions, run_head
from .loader import DEFAULT_WORKERS, FORMATS, FRAMEWORKS, LoaderOptions, run_loader
from .run import CPU_RUNTIMES, MEMORY_RUNTIMES, OPT_IN_RUNTIMES, TRAIN_RUNTIMES, Options

KNOWN_RUNTIMES = CPU_RUNTIMES + TRAIN_RUNTIMES + MEMORY_RUNTIMES


def _csv(text):
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(subparsers):
    d = Options()
    p = subparsers.add_parser("bench", help="throughput of both twins and onnxruntime side by side: table, JSON, chart",
                              description="Inference and training throughput of both twins and onnxruntime on the "
                                          "same weights and inputs, each row in its own process; writes bench.md, "
                                          "bench.json and bench.png (docs/bench.md explains the rows).")
    p.add_argument("--models", type=_csv, default=d.models, help=f"backbones (default {','.join(d.models)})")
    p.add_argument("--batches", type=lambda s: tuple(int(x) for x in _csv(s)), default=d.batches,
                   help="inference batch sizes (default 1,32)")
    p.add_argument("--runtimes", type=_csv, default=d.runtimes,
                   help=f"rows to run (default all but {','.join(OPT_IN_RUNTIMES + MEMORY_RUNTIMES)}; torch-cuda rows "
                        f"join when torch sees a GPU): {','.join(KNOWN_RUNTIMES)}")
    p.add_argument("--input-size", type=int, default=d.input_size)
    p.add_argument("--num-features", type=int, default=d.num_features)
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument("--classes", type=int, default=d.classes, help="ArcFace head size for the training rows")
    p.add_argument("--min-seconds", type=float, default=d.min_seconds, help="timed seconds per inference batch, at least")
    p.add_argument("--min-iters", type=int, default=d.min_iters, help="timed calls per inference batch, at least")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="timed training steps after the first")
    p.add_argument("--peak-n", type=int, default=d.peak_n, help="side of the reference fp32 matrix product")
    p.add_argument("--out", default=d.out,
                   help="writes bench.json, bench.md and bench.png here (head.* with --head, loader.* with --loader, detect.* with --detect)")
    h = HeadOptions()
    p.add_argument("--head", action="store_true",
                   help="only the Partial FC head section (opt-in, ~15 min): classes x sample_rate 1.0/0.1 x world 1/2; "
                        "writes head.md, head.json and head.png")
    p.add_argument("--head-classes", type=lambda s: tuple(int(x) for x in _csv(s)), default=h.classes,
                   help="classes of the head section (default 10000,100000,1000000)")
    p.add_argument("--head-frameworks", type=_csv, default=h.frameworks,
                   help=f"twins of the head section (default {','.join(h.frameworks)})")
    p.add_argument("--head-batch", type=int, default=h.batch, help=f"head section: batch per rank (default {h.batch})")
    p.add_argument("--head-steps", type=int, default=h.steps,
                   help=f"head section: timed steps after {h.warmup} warm-up (default {h.steps})")
    lo = LoaderOptions()
    p.add_argument("--loader", action="store_true",
                   help="only the data loader section (opt-in, ~7 min): 112x112 JPEGs from a folder, .rec and "
                        "TFRecord through each twin's loader against the decode limit, and a training step fed by "
                        "the loader; writes loader.md, loader.json and loader.png")
    p.add_argument("--loader-images", type=int, default=lo.images, help=f"loader section: images (default {lo.images})")
    p.add_argument("--loader-workers", type=lambda s: tuple(int(x) for x in _csv(s)), default=lo.workers,
                   help=f"loader section: worker counts, the default {DEFAULT_WORKERS} always included "
                        f"(default {','.join(map(str, lo.workers))}: 0 to the cores)")
    p.add_argument("--loader-formats", type=_csv, default=lo.formats,
                   help=f"loader section: formats (default {','.join(lo.formats)})")
    p.add_argument("--loader-frameworks", type=_csv, default=lo.frameworks,
                   help=f"loader section: twins of the loader and training rows (default {','.join(lo.frameworks)})")
    de = DetectOptions()
    p.add_argument("--detect", action="store_true",
                   help="only the face detection section (opt-in, ~3 min): MTCNN ms per photo letterboxed to 640x480, "
                        "torch / TF / onnxruntime at 1 thread and all cores, by stage; writes detect.md, detect.json "
                        "and detect.png")
    p.add_argument("--detect-photos", type=_csv, default=de.photos,
                   help=f"detect section: fixture photo names or paths (default {','.join(de.photos)})")
    p.add_argument("--detect-repeats", type=int, default=de.repeats,
                   help=f"detect section: timed passes over the photos per row, interleaved (default {de.repeats})")
    p.add_argument("--detect-runtimes", type=_csv, default=de.runtimes,
                   help=f"detect section: runtimes (default {','.join(de.runtimes)})")
    return p


def run(args):
    if args.head:
        return _run_head(args)
    if args.loader:
        return _run_loader(args)
    if args.detect:
        return _run_detect(args)
    unknown = [r for r in args.runtimes if r not in KNOWN_RUNTIMES]
    if unknown:
        raise ValueError(f"--runtimes: unknown {unknown[0]!r}; known: {', '.join(KNOWN_RUNTIMES)}")
    from .run import run_bench
    opts = Options(models=args.models, batches=args.batches, runtimes=args.runtimes, input_size=args.input_size,
                   num_features=args.num_features, train_batch=args.train_batch, classes=args.classes,
                   min_seconds=args.min_seconds, min_iters=args.min_iters, train_steps=args.train_steps,
                   peak_n=args.peak_n, out=args.out)
    result = run_bench(opts)
    print(f"\nwrote {args.out}/bench.md, bench.json, bench.png ({result['seconds'] / 60:.1f} min)")
    for t in result["targets"]:
        print(f"target {t['model']} batch {t['batch']}: {t['what']} {t['ratio']:.2f} ({t['target']}): "
              f"{'met' if t['met'] else 'NOT MET'}")


def _run_head(args):
    unknown = [f for f in args.head_frameworks if f not in WORKERS]
    if unknown:
        raise ValueError(f"--head-frameworks: unknown {unknown[0]!r}; known: {', '.join(WORKERS)}")
    result = run_head(HeadOptions(classes=args.head_classes, frameworks=args.head_frameworks,
                                  embedding=args.num_features, batch=args.head_batch, steps=args.head_steps,
                                  out=args.out))
    print(f"\nwrote {args.out}/head.md, head.json, head.png ({result['seconds'] / 60:.1f} min)")


def _run_loader(args):
    for flag, values, known in (("--loader-formats", args.loader_formats, FORMATS),
                                ("--loader-frameworks", args.loader_frameworks, FRAMEWORKS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"{flag}: unknown {unknown[0]!r}; known: {', '.join(known)}")
    if args.loader_images < 1 or any(w < 0 for w in args.loader_workers):
        raise ValueError(f"--loader-images must be >= 1 and --loader-workers >= 0, got {args.loader_images} and "
                         f"{','.join(map(str, args.loader_workers))}")
    result = run_loader(LoaderOptions(images=args.loader_images, workers=args.loader_workers,
                                      formats=args.loader_formats, frameworks=args.loader_frameworks,
                                      train_frameworks=args.loader_frameworks, out=args.out))
    print(f"\nwrote {args.out}/loader.md, loader.json, loader.png ({result['seconds'] / 60:.1f} min)")
    for t in result["targets"]:
        print(f"target {t['what']}: {t['ratio']:.2f} ({t['target']}): {'met' if t['met'] else 'NOT MET'}")


def _run_detect(args):
    result = run_detect(DetectOptions(photos=args.detect_photos, runtimes=args.detect_runtimes,
                                      repeats=args.detect_repeats, out=args.out))
    print(f"\nwrote {args.out}/detect.md, detect.json, detect.png ({result['seconds'] / 60:.1f} min); faces per photo "
          f"{'equal in every row' if result['faces_agree'] else 'DIFFER between rows'}")
