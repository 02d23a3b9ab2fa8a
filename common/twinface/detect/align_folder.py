"""`twinface align SRC DST`: a folder tree of photos -> aligned face crops in the same tree, with a report.

Every file under SRC (symlinked folders followed once, hidden files included) ends in exactly one place: crops
(DST/<its folder>/<stem>.jpg, or <stem>_<k>.jpg for the k-th face by score with faces=all) recorded in
DST/landmarks.json, or a line of DST/report.tsv saying why not (no face, below the score, cannot be read or
decoded, hidden, not a photo). Resumable: each crop is written atomically and each finished photo appended to a
journal (DST/.align-journal.jsonl, flushed to disk) before the next, so a re-run skips the photos done (same size
and modification time, crops still there) and redoes the rest; crops no finished photo claims (a kill between a
crop and its journal line, a photo since removed) are deleted. landmarks.json and report.tsv are rewritten
atomically at the end of every run.
"""
import json
import os
import shutil

from tqdm import tqdm

from .. import atomic
from ..data.folder import IMAGE_EXTS
from ..data.images import UnusableImageError, encode_image, read_image
from .faces import FaceAligner, face_record

JOURNAL, SETTINGS = ".align-journal.jsonl", ".align-settings.json"
LANDMARKS, REPORT = "landmarks.json", "report.tsv"
WRITER = "twinface align"


def settings_of(aligner: FaceAligner) -> dict:
    """What decides the crops (not the runtime: the twins agree to 0.5 px, docs/detect.md)."""
    p = aligner.params
    return {"faces": aligner.faces, "size": aligner.size, "min_score": aligner.min_score,
            "min_face_size": p.min_face_size, "scale_factor": p.scale_factor, "thresholds": list(p.thresholds)}


def list_files(src: str) -> list:
    """Every file under src, relative, sorted; symlinked folders are followed, each real folder walked once."""
    found, seen = [], set()
    for root, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:                       # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [os.path.relpath(os.path.join(root, f), src) for f in sorted(files)]
    return found


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split(os.sep))


def _crop_names(photos: list) -> dict:
    """photo -> crop stem (folder/stem), refusing two photos that would write the same crops."""
    stems, seen = {}, {}
    for rel in photos:
        stem = os.path.splitext(rel)[0]
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {rel}: both would be aligned to {stem}.jpg; rename one")
        seen[stem], stems[rel] = rel, stem
    return stems


def _stamp(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _open_destination(dst: str, settings: dict, overwrite: str) -> dict:
    """The journal's entries (photo -> last entry) of a resumable earlier run into dst. `overwrite`: "no",
    "yes" (start over), "stale" (start over only when the settings differ)."""
    if os.path.isdir(dst) and os.listdir(dst):
        marker = _read_json(os.path.join(dst, atomic.MARKER))
        if not (isinstance(marker, dict) and marker.get("writer") == WRITER):
            raise FileExistsError(f"{dst}: exists and is not a twinface align output; refusing to touch it")
        previous = _read_json(os.path.join(dst, SETTINGS))
        if previous is not None and previous != settings and overwrite == "no":
            differ = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in settings.items() if previous.get(k) != v)
            raise FileExistsError(f"{dst}: holds an alignment made with other settings ({differ}); pass "
                                  "--overwrite to start over")
        if overwrite == "yes" or previous != settings:     # no settings yet: a kill at the very start
            shutil.rmtree(dst)
        else:
            return _read_journal(os.path.join(dst, JOURNAL))
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, atomic.MARKER), "w") as f:
        json.dump({"writer": WRITER}, f)
    _write_text(os.path.join(dst, SETTINGS), json.dumps(settings))
    return {}


def _read_journal(path: str) -> dict:
    """The finished photos' entries. A line a kill cut short is cut off (its photo is redone), so that the next
    entry appended starts on a line of its own."""
    entries = {}
    if not os.path.isfile(path):
        return entries
    with open(path, "rb+") as f:
        data = f.read()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            f.truncate(len(whole))
    for line in whole.decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        entries[entry["photo"]] = entry
    return entries


def _write_text(path: str, text: str) -> None:
    atomic.write_bytes(path, text.encode())


def _write_crop(path: str, crop) -> None:
    atomic.write_bytes(path, encode_image(crop, ".jpg", quality=95))


def _crops_of(entry: dict) -> list:
    return [face["crop"] for face in entry.get("faces", [])]


def _still_done(src: str, dst: str, entry: dict) -> bool:
    """A journal entry that still holds: its photo unchanged, its crops on disk."""
    try:
        same = entry.get("stamp") == _stamp(os.path.join(src, entry["photo"]))
    except OSError:
        return False
    return same and all(os.path.isfile(os.path.join(dst, crop)) for crop in _crops_of(entry))


def _remove_unclaimed_crops(dst: str, done: dict) -> None:
    """Crops no finished photo claims: written before a kill cut their journal line, or of a photo changed or
    gone since. dst is an align output (checked), so every .jpg in it is a crop."""
    claimed = {crop for entry in done.values() for crop in _crops_of(entry)}
    for rel in list_files(dst):
        if rel.endswith(".jpg") and rel not in claimed:
            os.remove(os.path.join(dst, rel))


def _align_photo(src: str, dst: str, rel: str, stem: str, aligner: FaceAligner) -> dict:
    entry = {"photo": rel}
    try:
        entry["stamp"] = _stamp(os.path.join(src, rel))
        image = read_image(os.path.join(src, rel))
    except (UnusableImageError, OSError) as e:            # a dangling link, no permission, a vanished file
        reason = str(e) if isinstance(e, UnusableImageError) else f"{e.strerror or e}"
        return {**entry, "status": "unreadable", "reason": reason}
    if min(image.shape[:2]) < aligner.params.min_face_size:
        return {**entry, "status": "no_face", "reason": f"{image.shape[1]}x{image.shape[0]} photo is smaller than "
                                                         f"the minimum face size {aligner.params.min_face_size:g}"}
    faces, below = aligner.find(image)
    records = []
    for k, crop in enumerate(aligner.crops(image, faces)):
        name = f"{stem}.jpg" if aligner.faces == "largest" else f"{stem}_{k}.jpg"
        _write_crop(os.path.join(dst, name), crop)
        records.append({**face_record(faces, k), "crop": name})
    if records:
        return {**entry, "status": "ok", "faces": records, "below_min_score": below}
    reason = (f"{below} detection(s) below the minimum score {aligner.min_score}" if below
              else "no face found")
    return {**entry, "status": "no_face", "reason": reason}


def align_folder(src: str, dst: str, aligner: FaceAligner, overwrite="no", progress: bool = True) -> dict:
    """`overwrite`: "no" (resume; other settings are refused), "yes" (start over), "stale" (resume when the
    settings match, else start over); True / False mean "yes" / "no"."""
    overwrite = {True: "yes", False: "no"}.get(overwrite, overwrite)
    if not os.path.isdir(src):
        raise NotADirectoryError(f"{src}: expected a folder of photos")
    files = list_files(src)
    hidden = [f for f in files if _hidden(f)]
    photos = [f for f in files if not _hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    others = sorted(set(files) - set(photos) - set(hidden))
    stems = _crop_names(photos)
    # an existing dst is resumed (or, with overwrite, replaced) only when twinface align wrote it
    dst = atomic.check_destination(dst, overwrite=True, directory=True, inputs=[src],
                                   what="a twinface align output")
    if (os.path.realpath(dst) + os.sep).startswith(os.path.realpath(src).rstrip(os.sep) + os.sep):
        raise ValueError(f"{dst}: inside the photo folder {src}; its crops would be taken for photos next time")
    done = _open_destination(dst, settings_of(aligner), overwrite)
    current = set(photos)
    done = {rel: e for rel, e in done.items() if rel in current and _still_done(src, dst, e)}
    _remove_unclaimed_crops(dst, done)
    todo = [rel for rel in photos if rel not in done]
    resumed = len(photos) - len(todo)
    faces = sum(len(_crops_of(e)) for e in done.values())
    with open(os.path.join(dst, JOURNAL), "a") as journal, atomic.writing(dst):
        bar = tqdm(todo, desc="align", unit="photo", disable=not progress)
        for rel in bar:
            entry = _align_photo(src, dst, rel, stems[rel], aligner)
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            done[rel] = entry
            faces += len(_crops_of(entry))
            bar.set_postfix(faces=faces, refresh=False)
    return _finish(dst, photos, others, hidden, done, resumed)


def _cell(text: str) -> str:
    """A report field: tabs and line breaks in a file name or message would break the TSV's rows."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _finish(dst: str, photos: list, others: list, hidden: list, done: dict, resumed: int) -> dict:
    entries = [done[rel] for rel in photos]
    landmarks = {e["photo"]: e["faces"] for e in entries if e["status"] == "ok"}
    problems = [(e["photo"], e["status"], e["reason"]) for e in entries if e["status"] != "ok"]
    problems += [(rel, "not_a_photo", f"extension not one of {', '.join(IMAGE_EXTS)}") for rel in others]
    problems += [(rel, "hidden", "a hidden file or folder (name starts with '.'): not read") for rel in hidden]
    _write_text(os.path.join(dst, LANDMARKS), json.dumps(landmarks, indent=1))
    lines = ["photo\tstatus\treason"] + ["\t".join(map(_cell, p)) for p in sorted(problems)]
    _write_text(os.path.join(dst, REPORT), "\n".join(lines) + "\n")
    count = {s: sum(e["status"] == s for e in entries) for s in ("ok", "no_face", "unreadable")}
    return {"photos": len(photos), "with_faces": count["ok"], "crops": sum(len(f) for f in landmarks.values()),
            "no_face": count["no_face"], "unreadable": count["unreadable"], "not_photos": len(others),
            "hidden": len(hidden), "resumed": resumed, "landmarks": os.path.join(dst, LANDMARKS), "report": os.path.join(dst, REPORT)}
