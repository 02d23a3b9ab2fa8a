"""`twinface convert SRC DST`: the verb, registered in twinface.cli as (add_parser, run).

Importing this module is cheap; the frameworks load only when `run` converts something.
"""
import argparse

FORMATS_HELP = """formats (SRC by content, DST by extension):
  .pth / .pt       PyTorch state_dict (arcface_torch backbone.pth too) or training checkpoint ('backbone' entry)
  .safetensors     a torch state_dict in safetensors (the safetensors package)
  .weights.h5      Keras weights of the TF twin
  NAME (no ext.)   TensorFlow SavedModel directory; serving signature: 'data' NHWC float32 [N, S, S, 3]
                   normalised (x - 127.5) / 127.5 -> 'embedding' (as SRC only with --trust-savedmodel)
  .onnx            twinface exports, arcface_torch torch2onnx.py, insightface model-zoo IResNets, tf2onnx
Twin to twin goes through an ONNX hub; every conversion runs SRC and DST on the same images and fails
(non-zero exit, DST untouched) when L2-normalised embeddings differ by more than the tolerance."""


def add_parser(subparsers):
    p = subparsers.add_parser("convert", help="convert backbone weights between PyTorch, TensorFlow and ONNX, verified",
                              description=FORMATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source weights (file, or SavedModel directory)")
    p.add_argument("dst", help="target weights; its extension picks the format")
    p.add_argument("--arch", help="backbone (r18 r34 r50 r100 r200 mbf mbf_large resnext50 resnext101 densenet121 "
                                  "vit_t vit_s vit_b); default: inferred from the tensor shapes")
    p.add_argument("--keep-onnx", metavar="PATH", help="keep the intermediate ONNX hub file here")
    p.add_argument("--force", action="store_true", help="replace an existing DST (and --keep-onnx file) of the same "
                                                        "format; never SRC, nor a directory twinface did not write")
    p.add_argument("--trust-savedmodel", action="store_true",
                   help="read a SavedModel SRC: loading one runs its graph, which can read and write files, so "
                        "only for SavedModels from someone you trust (refused without this flag)")
    p.add_argument("--images", metavar="DIR", help="verify on these aligned face crops (searched recursively, "
                                                   "at most 64) instead of random images")
    return p


def run(args):
    from .convert import convert
    convert(args.src, args.dst, arch=args.arch, keep_onnx=args.keep_onnx, force=args.force, images=args.images,
            trust_savedmodel=args.trust_savedmodel)
