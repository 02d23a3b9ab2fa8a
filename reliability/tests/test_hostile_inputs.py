"""A corpus of corrupt and hostile inputs, each given to the `twinface` verb a user would run on it.

What each case must reach (docs/design.md, "Hostile inputs"):
- ERROR (nearly all): exit status 1 and one line `twinface <verb>: error: ...` naming the file (or key) and
  what was expected; no traceback; no code run from the file (its payload would create `PWNED`); every file
  there was stays byte-identical (a run's train.log may only grow); nothing new is left behind.
- SKIPPED: a corrupt image inside a good set; the run completes and reports the count.
- WORKS: a good model or data set under a path with spaces and non-ASCII letters.
Bombs run in their own process, whose peak RSS must stay under MAX_RSS_MB. Each case counts in one row of the
room's figures (reliability/conftest.py): injected, survived (reached its outcome), data lost (a file altered).
"""
import builtins
import dataclasses
import hashlib
import io
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from twinface import cli, config, run_dir
from twinface.data.images import encode_image
from twinface.testing import pool_onnx, tiny_config, tiny_dataset, with_external_weight

ERROR, SKIPPED, WORKS = "error", "skipped and counted", "works"
MAX_RSS_MB = 1536
UNICODE = "dätä sét ✓"                  # spaces, accents and a symbol in one directory name
LOGS = {"train.log"}                     # append-only: may grow, never change
ALLOWED_NEW = LOGS | {run_dir.LOCK_NAME}  # a failed train may leave its log and its (released) lock file
RESULTS = {}                             # fault class -> [injected, survived, data lost]
PEAKS = {}                               # bomb case -> peak RSS of its process, MB


@dataclasses.dataclass
class Case:
    fault: str                           # its row in the figures
    name: str
    build: callable                      # build(env) -> (argv, path the outcome must name)
    says: str | tuple                    # in the error line (ERROR) or the output (SKIPPED, WORKS); a tuple: any
    outcome: str = ERROR
    own_process: bool = False            # a bomb: run in a child process whose peak RSS is measured
    rewrites: str = None                 # a directory under the case's root the verb may (re)write: WORKS, or an
    #                                      ERROR found while a run is under way (damage met mid-stream)


class Shared:
    """Built once: the tiny data set, a framework-free ONNX model and (on first use) a trained torch run."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.data = tiny_dataset(root / "synth")
        self.model = pool_onnx(root / "pool.onnx")
        self._run = None

    def trained_run(self) -> str:
        """One epoch of the tiny torch config, data and run under UNICODE paths; -> the run directory."""
        if self._run is None:
            data = self.root / UNICODE / "data"
            shutil.copytree(self.data, data)
            self._run = str(self.root / UNICODE / "rün")
            cli.main(["train", "--framework", "torch", "--config", _config(data, self._run, self.root / "cfg"),
                      "--output", self._run])
        return self._run


def _config(data_dir, output, directory) -> str:
    os.makedirs(directory, exist_ok=True)
    cfg = tiny_config(data_dir, output, data={"source": "rec"}, train={"epochs": 1})
    return config.save_resolved(cfg, os.fspath(directory))


class Env:
    """One case's directory, where it builds its hostile input from the shared pristine files."""

    def __init__(self, root: pathlib.Path, shared: Shared):
        self.root, self.shared = root, shared
        self.sentinel = str(root / "PWNED")
        root.mkdir(parents=True)

    def path(self, *parts) -> str:
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def write(self, name, data: bytes) -> str:
        path = self.path(name)
        pathlib.Path(path).write_bytes(data)
        return path

    def copy(self, source, name, cut=None) -> str:
        """A copy of `source`; cut=0.5 keeps the first half of its bytes (a truncated file)."""
        data = pathlib.Path(source).read_bytes()
        return self.write(name, data if cut is None else data[:int(len(data) * cut)])

    def rec(self, patch=None, idx=None, where="set") -> str:
        """A copy of the tiny train.rec/.idx in root/where; patch(rec: bytearray, offsets: {key: byte}) edits the
        .rec, idx(lines) -> lines the .idx. Returns the prefix."""
        lines = pathlib.Path(self.shared.data, "train.idx").read_text().splitlines()
        rec = bytearray(pathlib.Path(self.shared.data, "train.rec").read_bytes())
        if patch:
            patch(rec, {int(k): int(o) for k, o in (line.split("\t") for line in lines)})
        prefix = self.path(where, "train")
        self.write(prefix + ".rec", bytes(rec))
        self.write(prefix + ".idx", "".join(line + "\n" for line in (idx(lines) if idx else lines)).encode())
        return prefix

    def tfr(self, patch=None, index=None) -> str:
        """The tiny set as TFRecord (2 shards) in root/tfr; patch(shard: bytearray, offset) edits record 4
        (shard 0, its record 2), index(dict of arrays) -> dict rewrites index.npz. Returns the directory."""
        from twinface.data import convert, tfrecord
        root = self.path("tfr")
        convert.rec_to_tfrecord(os.path.join(self.shared.data, "train"), root, shards=2, progress=False)
        shard, _, offset = tfrecord.TFRecordSet(root).where(4)
        if patch:
            data = bytearray(pathlib.Path(shard).read_bytes())
            patch(data, offset)
            pathlib.Path(shard).write_bytes(bytes(data))
        if index:
            with np.load(os.path.join(root, tfrecord.INDEX)) as z:
                arrays = index({k: z[k] for k in z.files})
            np.savez(os.path.join(root, tfrecord.INDEX), **arrays)
        return root

    def png(self, name, seed=0) -> str:
        pixels = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
        return self.write(name, encode_image(pixels, ".png"))

    def loop(self, name) -> str:
        link = pathlib.Path(self.path(name))
        link.symlink_to(link)
        return str(link)

    def train_config(self, data_dir) -> str:
        return _config(data_dir, self.path("run"), self.path("cfg"))

    def run_copy(self, state=None) -> str:
        """A copy of the shared trained run; state(bytes) -> bytes rewrites its state.pt."""
        run = self.path("run")
        shutil.copytree(self.shared.trained_run(), run)
        if state:
            self.write(os.path.join(run, "state.pt"), state(pathlib.Path(run, "state.pt").read_bytes()))
        return run


# --- hostile bytes --------------------------------------------------------------------------------------------
def at(key, offset, data: bytes):
    """A .rec patch: overwrite bytes at `offset` into record `key`'s chunk (0: magic, 4: cflag/length,
    8: IRHeader flag, 12: label, 32: the image, or record 0's label vector)."""
    def patch(rec, offsets):
        rec[offsets[key] + offset:offsets[key] + offset + len(data)] = data
    return patch


class _Call:
    """Pickles as fn(*args): what a hostile pickle makes its reader call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def code_payloads(sentinel):
    """Three ways a pickle runs code, each creating `sentinel` if it ever ran."""
    return {"os.system": _Call(os.system, f"touch '{sentinel}'"),
            "subprocess.call": _Call(subprocess.call, ["touch", sentinel]),
            "builtins.eval": _Call(builtins.eval, f"open({sentinel!r}, 'w')")}


def call_op(global_name: bytes, arg: int) -> bytes:
    """Protocol-2 opcodes for global(arg) with an int argument: a memory bomb in a few bytes."""
    return b"c" + global_name + b"\nJ" + struct.pack("<i", arg) + b"\x85R"


def nested(opcode: bytes, depth=10 ** 6) -> bytes:
    """A pickle of `depth` nested lists (b"l") or tuples (b"t"): a recursion bomb of 2 MB."""
    return b"\x80\x02" + b"(" * depth + opcode * depth + b"."


def pickled_state(env):
    """A state.pt rewrite: the training state with a payload (that would create the sentinel) in its meta."""
    import torch

    def rewrite(data):
        state = torch.load(io.BytesIO(data), weights_only=True)
        state["meta"]["note"] = code_payloads(env.sentinel)["os.system"]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    return rewrite


def safetensors_claiming(env, name, size: int) -> str:
    """A safetensors file whose one tensor claims `size` bytes of data the file does not hold."""
    header = ('{"w":{"dtype":"F32","shape":[%d],"data_offsets":[0,%d]}}' % (size // 4, size)).encode()
    return env.write(name, struct.pack("<Q", len(header)) + header + b"\0" * 16)


def npy(env, name, rows=40, header_rows=None) -> str:
    """An embeddings .npy of [rows, 8]; header_rows makes the header claim another row count."""
    path = env.path(name)
    np.save(path, np.random.default_rng(0).random((rows, 8), dtype=np.float32))
    if header_rows is not None:
        data = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(data.replace(f"({rows}, 8)".encode(), f"({header_rows}, 8)".encode(), 1))
    return path


def yaml_tag(env, name) -> str:
    return env.write(name, f"seed: !!python/object/apply:os.system ['touch {env.sentinel}']\n".encode())


# --- the verbs ------------------------------------------------------------------------------------------------
def rec2folder(env, prefix, named=None):
    return ["data", "rec2folder", prefix, env.path("out")], named or prefix


def eval_bin(env, path, named=None):
    return ["eval", "--weights", env.shared.model, "--bin", path], named or path


def eval_weights(env, weights, named=None):
    return ["eval", "--weights", weights, *_arch(weights), "--bin", os.path.join(env.shared.data, "val.bin")], \
        named or weights


def embed(env, weights, named=None, images=None):
    return ["embed", "--weights", weights, *_arch(weights), "--images", images or env.png("faces/a.png"),
            "--out", env.path("emb.npy")], named or weights


def eval_embeddings(env, path, named=None):
    return ["eval", "--embeddings", path, "--bin", os.path.join(env.shared.data, "val.bin")], named or path


def convert(env, src, dst="out.onnx", named=None):
    return ["convert", src, env.path(dst)], named or src


def export(env, weights):
    return ["export", "--weights", weights, "--arch", "mbf", "--out", env.path("out.onnx")], weights


def train(env, config_path, named=None, *extra):
    return ["train", "--framework", "torch", "--config", config_path, "--output", env.path("run"), *extra], \
        named or config_path


def train_on(env, prefix, named=None):
    return train(env, env.train_config(os.path.dirname(prefix)), named or prefix)


def tfrecord2folder(env, root, named=None):
    return ["data", "tfrecord2folder", root, env.path("out")], named or root


def train_on_tfrecord(env, root, named=None, damaged="fail", framework="torch", **data):
    cfg = tiny_config(root, env.path("run"), data={"source": "tfrecord", "damaged_records": damaged, **data},
                      val={"bins": [os.path.join(env.shared.data, "val.bin")]}, train={"epochs": 1})
    return ["train", "--framework", framework, "--config", config.save_resolved(cfg, env.path("cfg")), "--output",
            env.path("run")], named or root


def resume(env, run, named=None):
    return ["train", "--framework", "torch", "--config", os.path.join(run, "config.yaml"), "--output", run,
            "--resume", "--set", "train.epochs=2"], named or os.path.join(run, "state.pt")


def _arch(weights):
    return ["--arch", "mbf", "--input-size", "32", "--num-features", "32"] if weights.endswith((".pth", ".pt")) else []


# --- the corpus -----------------------------------------------------------------------------------------------
REC = "corrupt .rec/.idx bytes"
TRUNCATED = "truncated files"
EMPTY = "0-byte files"
PICKLE = "pickle payloads in a .bin/.npy (code, memory, recursion)"
PTH = ".pth / state.pt with a pickle payload"
YAML = "YAML with python tags"
ONNX = "ONNX external data outside its folder"
SIZES = "absurd size claims (safetensors, .npy, .rec)"
LOOPS = "symlink loops"
PATHS = "unicode and space paths (must work)"
SKIPS = "corrupt image in a good set (skip, count)"
TFR = "corrupt TFRecord shards and index.npz"

GARBLED_IMAGE = at(2, 32, b"\0" * 64)             # record 2's JPEG header zeroed: the record itself is sound
SHARD_0 = "tfr/train-00000-of-00002.tfrecord"


def flip_byte(at):
    """A TFRecord patch: invert one byte `at` bytes into the record (0-7 length, 8-11 its CRC, 12- the data)."""
    def patch(data, offset):
        data[offset + at] ^= 0xFF
    return patch


def key2_at(offset):
    """An .idx edit: key 2 (the second line) listed at byte `offset`."""
    return lambda lines: [lines[0], f"2\t{offset}", *lines[2:]]


CASES = [
    # .rec/.idx: every byte class of a record, through the two verbs that read them
    Case(REC, "rec: bad chunk magic", lambda e: rec2folder(e, e.rec(at(2, 0, b"XXXX")), e.path("set/train.rec")),
         "bad magic 0x58585858, expected 0xced7230a"),
    Case(REC, "rec: length past EOF", lambda e: rec2folder(e, e.rec(at(2, 4, struct.pack("<I", 200000))),
                                                           e.path("set/train.rec")), "chunk holds 200000 bytes"),
    Case(REC, "rec: length 2**29-1 (absurd)", lambda e: rec2folder(e, e.rec(at(2, 4, struct.pack("<I", 2 ** 29 - 1))),
                                                                   e.path("set/train.rec")),
         "chunk holds 536870911 bytes", own_process=True),
    Case(REC, "rec: length 0", lambda e: rec2folder(e, e.rec(at(2, 4, struct.pack("<I", 0))), e.path("set/train.rec")),
         "record 2: 0 bytes is shorter than the 24-byte record header"),
    Case(REC, "rec: chunk flag 5", lambda e: rec2folder(e, e.rec(at(2, 4, struct.pack("<I", 5 << 29 | 100))),
                                                        e.path("set/train.rec")), "unexpected chunk flag 5"),
    Case(REC, "rec: IRHeader claims 10**6 labels", lambda e: rec2folder(e, e.rec(at(2, 8, struct.pack("<I", 10 ** 6))),
                                                                        e.path("set/train.rec")),
         "record 2: header announces 1000000 float32 labels"),
    Case(REC, "rec: IRHeader label NaN", lambda e: rec2folder(e, e.rec(at(2, 12, struct.pack("<f", float("nan")))),
                                                              e.path("set/train.rec")),
         "record 2: label nan is not a class index"),
    Case(REC, "rec: IRHeader label 1e9", lambda e: rec2folder(e, e.rec(at(2, 12, struct.pack("<f", 1e9))),
                                                              e.path("set/train.rec")),
         "label 1000000000, but the header (record 0) declares 6 identities"),
    Case(REC, "idx: offset past the end", lambda e: rec2folder(
        e, e.rec(idx=key2_at(99999999)), e.path("set/train.idx")),
         "key 2 at byte offset 99999999, outside"),
    Case(REC, "idx: negative offset", lambda e: rec2folder(
        e, e.rec(idx=key2_at(-8)), e.path("set/train.idx")), "byte offset -8, outside"),
    Case(REC, "idx: missing key", lambda e: rec2folder(e, e.rec(idx=lambda ls: ls[:1] + ls[2:]),
                                                       e.path("set/train.idx")), "lists only 42 records"),
    Case(REC, "idx: non-numeric line", lambda e: rec2folder(
        e, e.rec(idx=key2_at("abc")), e.path("set/train.idx")),
         "expected 'key<TAB>offset' (two integers)"),
    Case(REC, "idx: key listed twice", lambda e: rec2folder(e, e.rec(idx=lambda ls: ls + ls[:1]),
                                                            e.path("set/train.idx")), "key 1 listed twice"),
    Case(REC, "idx: offset off by one", lambda e: rec2folder(
        e, e.rec(idx=lambda ls: key2_at(int(ls[1].split("\t")[1]) + 1)(ls)),
        e.path("set/train.idx")), "bad magic"),
    Case(REC, "train: bad chunk magic", lambda e: train_on(e, e.rec(at(2, 0, b"XXXX")), e.path("set/train.rec")),
         "bad magic"),
    Case(REC, "train: negative idx offset", lambda e: train_on(
        e, e.rec(idx=key2_at(-8)), e.path("set/train.idx")), "byte offset -8, outside"),
    Case(REC, "train: IRHeader label 1e9", lambda e: train_on(e, e.rec(at(2, 12, struct.pack("<f", 1e9))),
                                                              e.path("set/train.rec")), "label 1000000000"),

    # truncated files: the first half of a good one
    Case(TRUNCATED, ".rec", lambda e: rec2folder(
        e, e.rec(patch=lambda rec, _: rec.__delitem__(slice(len(rec) // 2, None))), e.path("set/train.rec")),
         "outside"),
    Case(TRUNCATED, ".idx (cut mid-line)", lambda e: rec2folder(
        e, e.rec(idx=lambda ls: "\n".join(ls)[:len("\n".join(ls)) // 2].split("\n")), e.path("set/train.idx")),
         "bad magic"),
    Case(TRUNCATED, "verification .bin", lambda e: eval_bin(e, e.copy(os.path.join(e.shared.data, "val.bin"),
                                                                       "val.bin", cut=0.5)),
         "not a readable verification .bin pickle"),
    Case(TRUNCATED, ".onnx", lambda e: eval_weights(e, e.copy(e.shared.model, "m.onnx", cut=0.5)),
         "Protobuf parsing failed"),
    Case(TRUNCATED, ".npy embeddings", lambda e: eval_embeddings(e, e.copy(npy(e, "whole.npy"), "e.npy", cut=0.5)),
         "header says shape (40, 8)"),
    Case(TRUNCATED, ".pth to embed", lambda e: embed(e, e.copy(os.path.join(e.shared.trained_run(), "backbone.pth"),
                                                               "b.pth", cut=0.5)), "not a readable torch file"),
    Case(TRUNCATED, ".pth to convert", lambda e: convert(e, e.copy(os.path.join(e.shared.trained_run(), "backbone.pth"),
                                                                   "b.pth", cut=0.5)), "truncated zip archive"),
    Case(TRUNCATED, ".safetensors", lambda e: convert(e, e.copy(safetensors_claiming(e, "whole.safetensors", 64),
                                                                "w.safetensors", cut=0.5)), "safetensors header"),
    Case(TRUNCATED, "state.pt to train --resume", lambda e: resume(e, e.run_copy(lambda d: d[:len(d) // 2])),
         "not a readable torch file"),

    # 0-byte files of every input type
    Case(EMPTY, ".rec", lambda e: rec2folder(e, e.rec(patch=lambda rec, _: rec.clear()), e.path("set/train.idx")),
         "outside"),
    Case(EMPTY, ".idx", lambda e: rec2folder(e, e.rec(idx=lambda ls: []), e.path("set/train.rec")), "no image records"),
    Case(EMPTY, ".rec and .idx", lambda e: rec2folder(e, e.rec(patch=lambda rec, _: rec.clear(), idx=lambda ls: []),
                                                      e.path("set/train.rec")), "no image records"),
    Case(EMPTY, ".idx to train", lambda e: train_on(e, e.rec(idx=lambda ls: []), e.path("set/train.rec")),
         "no image records"),
    Case(EMPTY, "verification .bin", lambda e: eval_bin(e, e.write("val.bin", b"")), "not a readable verification"),
    Case(EMPTY, ".onnx to eval", lambda e: eval_weights(e, e.write("m.onnx", b"")), "No graph"),
    Case(EMPTY, ".onnx to convert", lambda e: convert(e, e.write("m.onnx", b""), "out.pth"), "an empty file"),
    Case(EMPTY, ".pth to embed", lambda e: embed(e, e.write("b.pth", b"")), "not a readable torch file"),
    Case(EMPTY, ".pth to convert", lambda e: convert(e, e.write("b.pth", b"")), "an empty file"),
    Case(EMPTY, ".safetensors", lambda e: convert(e, e.write("w.safetensors", b"")), "an empty file"),
    Case(EMPTY, ".weights.h5", lambda e: convert(e, e.write("w.weights.h5", b"")), "an empty file"),
    Case(EMPTY, ".npy embeddings", lambda e: eval_embeddings(e, e.write("e.npy", b"")), "not a plain numeric .npy"),
    Case(EMPTY, "config .yaml to train", lambda e: train(e, e.write("c.yaml", b"")), "got an empty file"),
    Case(EMPTY, "config .yaml to data synth", lambda e: (["data", "synth", "--config", e.write("c.yaml", b""),
                                                          "--out", e.path("synth")], e.path("c.yaml")),
         "an empty file"),
    Case(EMPTY, "state.pt to train --resume", lambda e: resume(e, e.run_copy(lambda d: b"")),
         "not a readable torch file"),
    Case(EMPTY, ".png to verify", lambda e: (["verify", "--weights", e.shared.model, e.png("a.png"),
                                              e.write("z.png", b"")], e.path("z.png")), "empty image data"),
    Case(EMPTY, ".jpg to embed", lambda e: embed(e, e.shared.model, e.path("z.jpg"), e.write("z.jpg", b"")),
         "empty image data"),
    Case(EMPTY, "image list .txt to embed", lambda e: embed(e, e.shared.model, e.path("l.txt"), e.write("l.txt", b"")),
         "no images found"),

    # pickle payloads in a verification .bin (and an .npy): code, memory, recursion
    *[Case(PICKLE, f".bin runs {how}", lambda e, how=how: eval_bin(
        e, e.write("val.bin", pickle.dumps(code_payloads(e.sentinel)[how], protocol=4))), "refusing to load global")
      for how in ("os.system", "subprocess.call", "builtins.eval")],
    Case(PICKLE, ".bin payload inside (bins, issame)", lambda e: eval_bin(
        e, e.write("val.bin", pickle.dumps(([code_payloads(e.sentinel)["os.system"]] * 2, [True]), protocol=2))),
         "refusing to load global"),
    Case(PICKLE, ".bin two bytearray(1.5e9) in 66 bytes", lambda e: eval_bin(e, e.write(
        "val.bin", b"\x80\x02(" + call_op(b"__builtin__\nbytearray", 1_500_000_000) * 2 + b"t.")),
         "bytearray() would allocate about 1500000064 bytes", own_process=True),
    Case(PICKLE, ".bin bytes(2**31-1)", lambda e: eval_bin(e, e.write(
        "val.bin", b"\x80\x02" + call_op(b"builtins\nbytes", 2 ** 31 - 1) + b".")), "may build at most",
         own_process=True),
    Case(PICKLE, ".bin BINBYTES8 claiming 1 TiB", lambda e: eval_bin(e, e.write(
        "val.bin", b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 40) + b"x.")), "expected 1099511627776 bytes",
         own_process=True),
    Case(PICKLE, ".bin memo index 2**31", lambda e: eval_bin(e, e.write(
        "val.bin", b"\x80\x02Nr" + struct.pack("<I", 2 ** 31) + b".")), "memo index 2147483648", own_process=True),
    Case(PICKLE, ".bin 10**6 nested lists", lambda e: eval_bin(e, e.write("val.bin", nested(b"l"))),
         "expected a pickled (bins, issame_list) pair", own_process=True),
    Case(PICKLE, ".bin 10**6 nested tuples", lambda e: eval_bin(e, e.write("val.bin", nested(b"t"))),
         "expected a pickled (bins, issame_list) pair", own_process=True),
    Case(PICKLE, ".npy of pickled objects", lambda e: eval_embeddings(e, _object_npy(e)), "pickled Python objects"),

    # .pth and state.pt with a pickle payload: torch.load(weights_only=True) refuses, the file is named
    *[Case(PTH, f"{kind} .pth to {verb.__name__}", lambda e, verb=verb, kind=kind: verb(e, _evil_pth(e, kind)),
           "refused to unpickle it") for kind in ("zip", "legacy") for verb in (convert, embed, eval_weights)],
    Case(PTH, "zip .pth to export", lambda e: export(e, _evil_pth(e, "zip")), "refused to unpickle it"),
    Case(PTH, "state.pt to train --resume", lambda e: resume(e, e.run_copy(pickled_state(e))),
         "refused to unpickle it"),

    # YAML with python tags
    Case(YAML, "--config to train", lambda e: train(e, yaml_tag(e, "c.yaml")), "python/object/apply:os.system"),
    Case(YAML, "--config to data synth", lambda e: (["data", "synth", "--config", yaml_tag(e, "c.yaml"), "--out",
                                                     e.path("synth")], e.path("c.yaml")), "python/object/apply"),
    Case(YAML, "--set value", lambda e: train(e, e.train_config(e.shared.data), "train.epochs", "--set",
                                              f"train.epochs=!!python/object/apply:os.system ['touch {e.sentinel}']"),
         "train.epochs"),

    # ONNX external data leading outside the model's folder
    *[Case(ONNX, f"{where} to {verb.__name__}", lambda e, verb=verb, where=where: verb(e, _external(e, where)),
           ("escapes model directory", "points outside the directory", "bsolute path"))
      for where in ("../x.bin", "absolute", "../../../../etc/passwd") for verb in (eval_weights, embed, convert)],

    # absurd sizes claimed by headers, in files of a few bytes
    Case(SIZES, "safetensors header length 2**63", lambda e: convert(
        e, e.write("w.safetensors", struct.pack("<Q", 2 ** 63) + b'{"w":{}}')),
         "header of 9223372036854775808 bytes is claimed", own_process=True),
    Case(SIZES, "safetensors data offsets 1 GiB past EOF", lambda e: convert(
        e, safetensors_claiming(e, "w.safetensors", 2 ** 30)), "not a readable safetensors file", own_process=True),
    Case(SIZES, ".npy header claiming 4e9 x 8 floats", lambda e: eval_embeddings(
        e, npy(e, "e.npy", header_rows=4_000_000_000)), "header says shape (4000000000, 8)", own_process=True),
    Case(SIZES, ".rec header record claiming labels [1e9, 1e9+5]", lambda e: rec2folder(
        e, e.rec(at(0, 32, struct.pack("<ff", 1e9, 1e9 + 5))), e.path("set/train.rec")),
         "(header): claims 999999999 images", own_process=True),

    # symlink loops (a link to itself) as input
    Case(LOOPS, ".rec to rec2folder", lambda e: rec2folder(e, e.loop("loop.rec")[:-4], e.path("loop.rec")),
         "RecordIO file not found"),
    Case(LOOPS, ".bin to eval", lambda e: eval_bin(e, e.loop("loop.bin")), "Too many levels of symbolic links"),
    Case(LOOPS, ".npy to eval", lambda e: eval_embeddings(e, e.loop("loop.npy")), "embedding file not found"),
    Case(LOOPS, ".onnx to embed", lambda e: embed(e, e.loop("loop.onnx")), "system error number 40"),
    Case(LOOPS, ".pth to convert", lambda e: convert(e, e.loop("loop.pth")), "no such file or directory"),
    Case(LOOPS, "image folder to folder2rec", lambda e: (["data", "folder2rec", e.loop("loop"), e.path("out")],
                                                         e.path("loop")), "image folder not found"),
    Case(LOOPS, "image folder to embed", lambda e: embed(e, e.shared.model, e.path("loop"), e.loop("loop")),
         "no such folder or list file"),
    Case(LOOPS, "--config to train", lambda e: train(e, e.loop("loop.yaml")), "Too many levels of symbolic links"),

    # a good model or data set under a unicode and space path must work
    Case(PATHS, "rec2folder", lambda e: rec2folder(e, e.rec(where=UNICODE)), "num_images: 36", outcome=WORKS),
    Case(PATHS, "eval of an .onnx", lambda e: eval_weights(e, e.copy(e.shared.model, f"{UNICODE}/m o.onnx")),
         "[val.bin]Accuracy-Flip", outcome=WORKS),
    Case(PATHS, "embed", lambda e: embed(e, e.copy(e.shared.model, f"{UNICODE}/m.onnx"),
                                         images=e.png(f"{UNICODE}/fäces/a b.png")), "1 embeddings", outcome=WORKS),
    Case(PATHS, "verify", lambda e: (["verify", "--weights", e.shared.model, e.png(f"{UNICODE}/a b.png"),
                                      e.png(f"{UNICODE}/ç d.png")], None), "SAME person", outcome=WORKS),
    Case(PATHS, "eval --embeddings", lambda e: eval_embeddings(e, npy(e, f"{UNICODE}/e m.npy")), "[val.bin]Accuracy",
         outcome=WORKS),
    Case(PATHS, "convert .pth -> .onnx", lambda e: convert(
        e, e.copy(os.path.join(e.shared.trained_run(), "backbone.pth"), f"{UNICODE}/b b.pth"), f"{UNICODE}/ö.onnx"),
         "PASS", outcome=WORKS),
    Case(PATHS, "train --resume", lambda e: resume(e, e.run_copy()), "resumed from", outcome=WORKS, rewrites="run"),

    # a corrupt image inside an otherwise good set: skipped and counted, the run completes
    Case(SKIPS, "rec2folder", lambda e: rec2folder(e, e.rec(GARBLED_IMAGE)), "num_skipped: 1", outcome=SKIPPED),
    Case(SKIPS, "folder2rec", lambda e: (["data", "folder2rec", _folder_with_bad_images(e), e.path("out")], None),
         "num_skipped: 2", outcome=SKIPPED),
    Case(SKIPS, "train", lambda e: train_on(e, e.rec(GARBLED_IMAGE)), "1 of 36 images are unusable", outcome=SKIPPED),

    # TFRecord: damage to a shard names shard, record and byte offset; index.npz is checked before use
    Case(TFR, "tfrecord2folder: data CRC mismatch", lambda e: tfrecord2folder(e, e.tfr(flip_byte(300)),
                                                                               e.path(SHARD_0)),
         "record 2 at byte offset"),
    Case(TFR, "tfrecord2folder: length CRC mismatch", lambda e: tfrecord2folder(e, e.tfr(flip_byte(3)),
                                                                                 e.path(SHARD_0)),
         "length CRC mismatch"),
    Case(TFR, "tfrecord2folder: truncated shard", lambda e: tfrecord2folder(
        e, e.tfr(lambda data, offset: data.__delitem__(slice(offset + 100, None))), e.path(SHARD_0)),
         "truncated: the shard is"),
    Case(TFR, "train: data CRC mismatch", lambda e: train_on_tfrecord(e, e.tfr(flip_byte(300)), e.path(SHARD_0)),
         "data CRC mismatch"),
    *[Case(TFR, f"train tf ({sampler}, no cache): data CRC mismatch", lambda e, sampler=sampler: train_on_tfrecord(
        e, e.tfr(flip_byte(300)), e.path(SHARD_0), framework="tf", sampler=sampler, memory_cache_gb=0),
        "record 2 at byte offset", rewrites="run") for sampler in ("epoch", "stream")],
    Case(TFR, "train: damaged_records skip", lambda e: train_on_tfrecord(e, e.tfr(flip_byte(300)), damaged="skip"),
         "1 of 36 images are unusable", outcome=SKIPPED),
    Case(TFR, "index: shard name outside the set", lambda e: tfrecord2folder(
        e, e.tfr(index=lambda z: {**z, "shards": np.array(["../../etc/passwd", z["shards"][1]])}),
        e.path("tfr/index.npz")), "is not a .tfrecord file name"),
    Case(TFR, "index: offset past the shard", lambda e: tfrecord2folder(
        e, e.tfr(index=lambda z: {**z, "offset": z["offset"] + 10 ** 9}), e.path("tfr/index.npz")),
         "do not follow each other through their shards"),
    Case(TFR, "index: object array (pickle)", lambda e: tfrecord2folder(e, _pickled_index(e), e.path("tfr/index.npz")),
         "not a readable TFRecord index"),
    Case(TFR, "index: 0 bytes", lambda e: tfrecord2folder(e, _empty_index(e), e.path("tfr/index.npz")),
         "not a readable TFRecord index"),
]


def _pickled_index(env) -> str:
    root = env.tfr()
    with np.load(os.path.join(root, "index.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["label"] = np.array([code_payloads(env.sentinel)["os.system"]] * len(arrays["label"]), dtype=object)
    np.savez(os.path.join(root, "index.npz"), **arrays)
    return root


def _empty_index(env) -> str:
    root = env.tfr()
    env.write("tfr/index.npz", b"")
    return root


def _object_npy(env) -> str:
    path = env.path("e.npy")
    np.save(path, np.array([code_payloads(env.sentinel)["os.system"]] * 2, dtype=object), allow_pickle=True)
    return path


def _evil_pth(env, kind) -> str:
    """kind "zip": torch.save's format with a payload among the tensors; "legacy": a bare pickle, as torch < 1.6."""
    payload = code_payloads(env.sentinel)["os.system"]
    if kind == "legacy":
        return env.write("evil.pth", pickle.dumps({"conv.weight": payload}, protocol=2))
    import torch
    torch.save({"conv.weight": torch.zeros(2), "payload": payload}, env.path("evil.pth"))
    return env.path("evil.pth")


def _external(env, where) -> str:
    target = env.write("x.bin", np.float32([1]).tobytes())
    location = target if where == "absolute" else where
    return with_external_weight(env.shared.model, env.path("m", "ext.onnx"), location)


def _folder_with_bad_images(env) -> str:
    for identity in ("a", "b"):
        for i in range(2):
            env.png(f"faces/{identity}/{i}.png", seed=i)
    env.write("faces/a/empty.jpg", b"")
    env.write("faces/b/garbage.png", b"\x89PNG not really")
    return env.path("faces")


# --- running a case and checking its outcome --------------------------------------------------------------------
def _in_process(argv, capsys, caplog):
    """The CLI's exit in process: a user error is SystemExit("twinface VERB: error: ...") -> stderr, status 1.
    Warnings logged by twinface.data reach stderr in a real run; here pytest's caplog takes them."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    err = caplog.text + err
    if isinstance(code, str):
        return 1, out, err + code + "\n", None
    return code or 0, out, err, None


# `twinface ARGV` that writes its peak RSS (VmHWM, kB) to PEAK_FILE on exit. Not getrusage: a child's ru_maxrss
# starts at the size of the process it was forked from (this one, holding torch).
_MEASURED_CLI = """
import atexit, os, runpy, sys

def peak():
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM")).split()[1])

atexit.register(peak)
sys.argv[0] = "twinface"
runpy.run_module("twinface.cli", run_name="__main__")
"""


def _own_process(argv, cwd):
    """`twinface ARGV` in a child process; -> (status, stdout, stderr, peak RSS in MB)."""
    peak_file = os.path.join(cwd, "..", "peak")
    env = {**{k: v for k, v in os.environ.items() if k != "TWINFACE_DEBUG"}, "PEAK_FILE": peak_file}
    run = subprocess.run([sys.executable, "-c", _MEASURED_CLI, *argv], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=300)
    return run.returncode, run.stdout, run.stderr, int(pathlib.Path(peak_file).read_text()) / 1024


def _snapshot(*roots) -> dict:
    """path -> sha256 of every file below roots; a log's whole content (it may grow); symlinks are not followed."""
    files = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                data = b"" if os.path.islink(path) else pathlib.Path(path).read_bytes()
                files[path] = data if name in LOGS else hashlib.sha256(data).hexdigest()
    return files


def _altered(before: dict, after: dict) -> list:
    """Files that changed or vanished; a log may only have grown."""
    return [p for p, was in before.items() if after.get(p) != was
            and not (isinstance(was, bytes) and isinstance(after.get(p), bytes) and after[p].startswith(was))]


def _says(says, text) -> bool:
    return any(s in text for s in ((says,) if isinstance(says, str) else says))


def _problems(case, argv, named, status, out, err, env) -> list:
    problems = []
    if "Traceback" in err:
        problems.append("a traceback")
    if os.path.exists(env.sentinel):
        problems.append("the payload ran")
    if case.outcome != ERROR:
        if status != 0:
            problems.append(f"exit status {status}: {err.strip().splitlines()[-1:]}")
        if not _says(case.says, out + err):
            problems.append(f"the output does not say {case.says!r}")
        return problems
    line = err.rstrip("\n").splitlines()[-1] if err.strip() else ""
    if status != 1:
        problems.append(f"exit status {status}, expected 1")
    if not line.startswith(f"twinface {argv[0]}: error: "):
        problems.append(f"the last stderr line is not `twinface {argv[0]}: error: ...`")
    if named not in line:
        problems.append(f"the error does not name {named}")
    if not _says(case.says, line):
        problems.append(f"the error does not say {case.says!r}")
    return [f"{p}; stderr ends: {line!r}" for p in problems]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return Shared(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module", autouse=True)
def figures(faults):
    """One row per fault class once every case of the module has run (a case asserts its own outcome)."""
    yield
    for fault, (injected, survived, lost) in RESULTS.items():
        faults.record(fault, injected, survived, lost)
    for name, peak in PEAKS.items():
        print(f"peak RSS {peak:7.0f} MB  {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.fault.split()[0]} {c.name}")
def test_hostile_input(case, shared, tmp_path, monkeypatch, capsys, caplog):
    env = Env(tmp_path / "case", shared)
    argv, named = case.build(env)
    monkeypatch.chdir(env.root)                  # a relative default path (configs/, data/) must not be found
    monkeypatch.delenv("TWINFACE_DEBUG", raising=False)
    roots = (env.root, shared.root)
    before = _snapshot(*roots)
    if case.rewrites:
        before = {p: was for p, was in before.items() if not p.startswith(env.path(case.rewrites) + os.sep)}
    capsys.readouterr()
    row = RESULTS.setdefault(case.fault, [0, 0, 0])
    row[0] += 1
    problems = ["the command raised"]
    try:
        if case.own_process:
            status, out, err, peak = _own_process(argv, str(env.root))
            PEAKS[f"{case.fault.split()[0]} {case.name}"] = peak
        else:
            status, out, err, peak = _in_process(argv, capsys, caplog)
        problems = _problems(case, argv, named, status, out, err, env)
        if peak and peak > MAX_RSS_MB:
            problems.append(f"peak RSS {peak:.0f} MB, over {MAX_RSS_MB} MB")
    finally:
        after = _snapshot(*roots)
        altered = _altered(before, after)
        row[2] += bool(altered)
        if case.outcome == ERROR:
            left = sorted(p for p in set(after) - set(before) if os.path.basename(p) not in ALLOWED_NEW
                          and not (case.rewrites and p.startswith(env.path(case.rewrites) + os.sep)))
            problems += [f"left behind {left}"] if left else []
        row[1] += not problems and not altered
    assert not altered, f"inputs altered: {altered}"
    assert not problems, problems
