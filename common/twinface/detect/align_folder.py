"""`twinface align SRC DST`: a folder tree of photos -> aligned face crops in the same tree, with a report.

Every file under SRC ends in exactly one place: crops (DST/<its folder>/<stem>.jpg, or <stem>_<k>.jpg for the
k-th face by score with faces=all) recorded in DST/landmarks.json, or a line of DST/report.tsv saying why not
(no face, below the score, cannot be decoded, not a photo). Resumable: each crop is written atomically and each
finished photo appended to a journal (DST/.align-journal.jsonl, flushed to disk) before the next, so a re-run
skips the photos done (same size and modification time) and redoes only the rest; a kill loses at most the
photo in progress. landmarks.json and report.tsv are rewritten atomically at the end of every run.
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
_OWN = {JOURNAL, SETTINGS, LANDMARKS, REPORT, atomic.MARKER}


def settings_of(aligner: FaceAligner) -> dict:
    """What decides the crops (not the runtime: the twins agree to 0.5 px, docs/detect.md)."""
    p = aligner.params
    return {"faces": aligner.faces, "size": aligner.size, "min_score": aligner.min_score,
            "min_face_size": p.min_face_size, "scale_factor": p.scale_factor, "thresholds": list(p.thresholds)}


def list_files(src: str) -> list:
    """Every regular, non-hidden file under src, relative, sorted (hidden folders skipped too)."""
    found = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), src) for f in sorted(files) if not f.startswith(".")]
    return found


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


def _open_destination(dst: str, settings: dict, overwrite: bool) -> dict:
    """The journal's entries (photo -> last entry) of a resumable earlier run into dst (checked: ours)."""
    settings_path = os.path.join(dst, SETTINGS)
    if overwrite and os.path.isdir(dst):
        shutil.rmtree(dst)
    if os.path.isdir(dst) and os.listdir(dst):
        try:
            with open(settings_path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
        if previous != settings:
            raise FileExistsError(f"{dst}: holds an alignment made with other settings ({previous}); pass "
                                  f"--overwrite to start over")
        return _read_journal(os.path.join(dst, JOURNAL))
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, atomic.MARKER), "w") as f:
        json.dump({"writer": "twinface align"}, f)
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
    with atomic.atomic_path(path) as tmp, atomic.writing(path), open(tmp, "w") as f:
        f.write(text)


def _write_crop(path: str, crop) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = encode_image(crop, ".jpg", quality=95)
    with atomic.atomic_path(path) as tmp, atomic.writing(path), open(tmp, "wb") as f:
        f.write(data)


def _remove_crops(dst: str, entry: dict) -> None:
    for face in entry.get("faces", []):
        path = os.path.join(dst, face["crop"])
        if os.path.isfile(path):
            os.remove(path)


def _align_photo(src: str, dst: str, rel: str, stem: str, aligner: FaceAligner) -> dict:
    entry = {"photo": rel, "stamp": _stamp(os.path.join(src, rel))}
    try:
        image = read_image(os.path.join(src, rel))
    except UnusableImageError as e:
        return {**entry, "status": "unreadable", "reason": str(e)}
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


def align_folder(src: str, dst: str, aligner: FaceAligner, overwrite: bool = False, progress: bool = True) -> dict:
    if not os.path.isdir(src):
        raise NotADirectoryError(f"{src}: expected a folder of photos")
    files = list_files(src)
    photos = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    others = sorted(set(files) - set(photos))
    stems = _crop_names(photos)
    # an existing dst is resumed (or, with overwrite, replaced) only when twinface align wrote it
    dst = atomic.check_destination(dst, overwrite=True, directory=True, inputs=[src],
                                   what="a twinface align output (it holds no .twinface-output)")
    if (os.path.realpath(dst) + os.sep).startswith(os.path.realpath(src).rstrip(os.sep) + os.sep):
        raise ValueError(f"{dst}: inside the photo folder {src}; its crops would be taken for photos next time")
    done = _open_destination(dst, settings_of(aligner), overwrite)
    current = set(photos)
    for rel, entry in done.items():                # crops of photos gone from src, or changed since
        if rel not in current or entry["stamp"] != _stamp(os.path.join(src, rel)):
            _remove_crops(dst, entry)
    done = {rel: e for rel, e in done.items() if rel in current and e["stamp"] == _stamp(os.path.join(src, rel))}
    todo = [rel for rel in photos if rel not in done]
    resumed = len(photos) - len(todo)
    with open(os.path.join(dst, JOURNAL), "a") as journal, atomic.writing(dst):
        bar = tqdm(todo, desc="align", unit="photo", disable=not progress)
        for rel in bar:
            entry = _align_photo(src, dst, rel, stems[rel], aligner)
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            done[rel] = entry
            bar.set_postfix(faces=sum(len(e.get("faces", [])) for e in done.values()), refresh=False)
    return _finish(dst, photos, others, done, resumed)


def _finish(dst: str, photos: list, others: list, done: dict, resumed: int) -> dict:
    entries = [done[rel] for rel in photos]
    landmarks = {e["photo"]: e["faces"] for e in entries if e["status"] == "ok"}
    problems = [(e["photo"], e["status"], e["reason"]) for e in entries if e["status"] != "ok"]
    problems += [(rel, "not_a_photo", f"extension not one of {', '.join(IMAGE_EXTS)}") for rel in others]
    _write_text(os.path.join(dst, LANDMARKS), json.dumps(landmarks, indent=1))
    lines = ["photo\tstatus\treason"] + ["\t".join(p) for p in sorted(problems)]
    _write_text(os.path.join(dst, REPORT), "\n".join(lines) + "\n")
    count = {s: sum(e["status"] == s for e in entries) for s in ("ok", "no_face", "unreadable")}
    return {"photos": len(photos), "with_faces": count["ok"], "crops": sum(len(f) for f in landmarks.values()),
            "no_face": count["no_face"], "unreadable": count["unreadable"], "not_photos": len(others),
            "resumed": resumed, "landmarks": os.path.join(dst, LANDMARKS), "report": os.path.join(dst, REPORT)}
