"""Which CFP identities may train the embedder: none that may be an LFW person.

    python -m facewatch.training.cfp_identities [--cfp DIR] [--lfw DIR]

CFP (Celebrities in Frontal-Profile: 500 people, 10 frontal + 4 profile photos each, in folders
001..500 named by `splits/cfp_names.txt`) overlaps LFW's celebrities. LFW's validation people and
the people the project's owners hold out must never be trained on, so an identity is excluded when

1. its name matches any LFW name (`splits/lfw_names.txt`, 5,746 of LFW's 5,749): compared
   without case, accents, punctuation or underscores, and tolerant of CFP's misspellings
   ("Jennifer Anniston", "Robert Do Niro"); erring towards a match; or
2. its SFace face (mean of its frontal photos) is as close to an LFW person on disk (mean of their
   photos) as the same people found by name are (`FACE_THRESHOLD`): catches a name spelt beyond
   recognition and the three LFW names missing from the list, for the 4,786 people on disk.

The photos (TarazGr/BSProj's copy holds Git LFS pointers only; this one has the JPEGs, split into
train/001..450 and test/451..500, which are moved up into one folder):

    git --git-dir=<search tool's fetch of zhangjunh/DR-GAN-by-pytorch> archive ecb127e0 \
        cfp-dataset/Data/Images | tar -x -C /tmp/cfp
    mkdir -p ../extra/cfp/cfp-dataset/Data/Images
    mv /tmp/cfp/cfp-dataset/Data/Images/{train,test}/* ../extra/cfp/cfp-dataset/Data/Images/
    facewatch teacher-cache --teacher sface --workers 2 --chunk 256 \
        --folder ../extra/cfp/cfp-dataset/Data/Images          # ~6 min on 2 cores

The decision is written once to `splits/cfp_keep.txt` (kept: folder, name) and
`splits/cfp_excluded.tsv` (folder, name, reason) so every run trains on the same set.
"""
from __future__ import annotations

import argparse
import re
import unicodedata
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np

from facewatch.training.paths import SPLITS_DIR

CFP_NAMES_FILE = SPLITS_DIR / "cfp_names.txt"
LFW_NAMES_FILE = SPLITS_DIR / "lfw_names.txt"
CFP_KEEP_FILE = SPLITS_DIR / "cfp_keep.txt"
CFP_EXCLUDED_FILE = SPLITS_DIR / "cfp_excluded.tsv"
DEFAULT_CFP_DIR = Path("/work/extra/cfp/cfp-dataset/Data/Images")

# Whole-name similarity (difflib ratio) at or above which two names count as one person:
# "jennifer anniston" / "jennifer aniston" 0.97, "robert do niro" / "robert de niro" 0.93,
# "jevin kostner" / "kevin costner" 0.85.
NAME_RATIO = 0.84
# Word similarity for the every-word-of-the-shorter-name rule ("recep erdogen" in "recep tayyip
# erdogan": erdogen / erdogan 0.86; "rooh" / "roh" 0.86, "hyan" / "hyun" 0.75).
WORD_RATIO = 0.75
# Cosine between two people's mean SFace vectors (centred with the LFW mean) at or above which
# a CFP identity is taken for that LFW person. From the data (`main`, 2026-11-30): CFP people with
# the same name as an LFW person on disk score median 0.75, 5th percentile 0.54 (lowest 0.25);
# for the CFP people matching no LFW name, the nearest LFW person scores median 0.35, 99th
# percentile 0.44, at most 0.47. 0.42 leaves out their top ~4% (10 people), on the safe side.
FACE_THRESHOLD = 0.42


def read_names(path: Path) -> list[str]:
    """Non-empty lines that are not '#' comments, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"name list not found: {path}")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.startswith("#")]


def normalise_name(name: str) -> str:
    """'Amar'e_Stoudemire' -> 'amare stoudemire': no accents, case, punctuation or underscores."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    plain = re.sub(r"['.]", "", plain.lower())         # O'Neil, Dr. Dre, Amar'e: one word
    return " ".join(re.sub(r"[^a-z0-9]+", " ", plain).split())


def _ratio(a: str, b: str) -> float:
    return SequenceMatcher(None, a, b).ratio()


def _words_within(short: list[str], long: list[str]) -> float:
    """How well every word of `short` matches a later word of `long`, in order ('luiz lula da
    silva' in 'luiz inacio lula da silva'): the mean word similarity, 0 when a word has no
    match of at least WORD_RATIO. A one-word name must be the other's first or last word
    ('beyonce' in 'beyonce knowles'), not a middle name."""
    if len(short) == 1:
        return max(_ratio(short[0], long[0]), _ratio(short[0], long[-1]))
    at, scores = 0, []
    for word in short:
        while at < len(long) and _ratio(word, long[at]) < WORD_RATIO:
            at += 1
        if at == len(long):
            return 0.0
        scores.append(_ratio(word, long[at]))
        at += 1
    return float(np.mean(scores))


def name_match(name: str, lfw_names: list[str]) -> tuple[str, str] | None:
    """(LFW name, why) of the LFW name this name most likely denotes, else None."""
    norm = normalise_name(name)
    compact = norm.replace(" ", "")
    others = [(lfw, normalise_name(lfw)) for lfw in lfw_names]
    words = norm.split()
    for lfw, other in others:
        if norm == other or compact == other.replace(" ", ""):
            return lfw, "same name"
    for lfw, other in others:   # family name first or last: "Ziyi Zhang" is LFW's Zhang_Ziyi
        if sorted(words) == sorted(other.split()):
            return lfw, "same words in another order"
    best, best_score, best_why = None, 0.0, ""
    for lfw, other in others:
        other_words = other.split()
        short, long = sorted((words, other_words), key=len)
        if len(short) < len(long):
            score = _words_within(short, long)
            if score >= NAME_RATIO and score > best_score:
                best, best_score = lfw, score
                best_why = f"every word of the shorter name in the other, {score:.2f} similar"
        # quick_ratio bounds ratio from above: skips the slow comparison for far names
        matcher = SequenceMatcher(None, norm, other)
        if matcher.quick_ratio() >= max(NAME_RATIO, best_score):
            score = matcher.ratio()
            if score >= NAME_RATIO and score > best_score:
                best, best_score, best_why = lfw, score, f"spelling {score:.2f} similar"
    return None if best is None else (best, best_why)


# ---------------------------------------------------------------------------- faces
def _mean_vectors(vectors: np.ndarray, groups: np.ndarray, centre: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(group ids, unit mean of each group's centred unit vectors)."""
    from facewatch.training.teacher_cache import centred

    ids = np.unique(groups)
    c = centred(vectors, centre)
    means = np.stack([c[groups == g].mean(axis=0) for g in ids])
    return ids, means / (np.linalg.norm(means, axis=1, keepdims=True) + 1e-12)


def _usable(faces) -> np.ndarray:
    return faces.detected & faces.yunet_plausible


@dataclass
class FaceMeans:
    cfp_folders: np.ndarray     # (C,) CFP folder names with a usable frontal face
    cfp: np.ndarray             # (C, 128) unit mean vectors
    lfw_names: np.ndarray       # (L,) LFW people on disk
    lfw: np.ndarray             # (L, 128)

    def nearest(self, folder: str) -> tuple[str, float] | None:
        rows = np.flatnonzero(self.cfp_folders == folder)
        if not len(rows):
            return None
        sims = self.lfw @ self.cfp[rows[0]]
        best = int(np.argmax(sims))
        return str(self.lfw_names[best]), float(sims[best])

    def similarity(self, folder: str, lfw_name: str) -> float | None:
        a, b = np.flatnonzero(self.cfp_folders == folder), np.flatnonzero(self.lfw_names == lfw_name)
        return float(self.cfp[a[0]] @ self.lfw[b[0]]) if len(a) and len(b) else None


def face_means(cfp_dir: Path, lfw_dir: Path) -> FaceMeans:
    """Mean SFace vectors of every CFP identity (frontal photos: SFace is weak on profiles) and
    every LFW person on disk, from the `teacher-cache --folder` caches (computed if missing)."""
    from facewatch.training.folder_teacher import load_folder_faces

    lfw = load_folder_faces(lfw_dir, "sface")
    keep = _usable(lfw)
    lfw_people = np.array([p.split("/", 1)[0] for p in lfw.paths])
    centre = lfw.sface[keep].mean(axis=0)
    lfw_ids, lfw_means = _mean_vectors(lfw.sface[keep], lfw_people[keep], centre)
    cfp = load_folder_faces(cfp_dir, "sface")
    frontal = np.array(["/frontal/" in p for p in cfp.paths]) & _usable(cfp)
    cfp_folder = np.array([p.split("/", 1)[0] for p in cfp.paths])
    cfp_ids, cfp_means = _mean_vectors(cfp.sface[frontal], cfp_folder[frontal], centre)
    return FaceMeans(cfp_ids, cfp_means, lfw_ids, lfw_means)


# ---------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class Decision:
    folder: str
    name: str
    keep: bool
    reason: str


def decide(cfp_names: list[str], lfw_names: list[str], faces: FaceMeans | None,
           face_threshold: float = FACE_THRESHOLD) -> list[Decision]:
    """One decision per CFP folder (001.., the name list's order)."""
    out = []
    for number, name in enumerate(cfp_names, start=1):
        folder = f"{number:03d}"
        match = name_match(name, lfw_names)
        if match is not None:
            lfw, why = match
            sim = faces.similarity(folder, lfw) if faces is not None else None
            face = f"; face cosine {sim:.2f}" if sim is not None else "; LFW person not on disk"
            out.append(Decision(folder, name, False, f"name matches LFW {lfw} ({why}){face}"))
            continue
        near = faces.nearest(folder) if faces is not None else None
        if near is not None and near[1] >= face_threshold:
            out.append(Decision(folder, name, False, f"face like LFW {near[0]} (cosine "
                                f"{near[1]:.2f} >= {face_threshold})"))
            continue
        reason = (f"nearest LFW face {near[0]} cosine {near[1]:.2f}" if near is not None
                  else "no usable frontal face for the face check")
        out.append(Decision(folder, name, True, reason))
    return out


def write_decisions(decisions: list[Decision], keep_file: Path = CFP_KEEP_FILE,
                    excluded_file: Path = CFP_EXCLUDED_FILE, note: str = "") -> None:
    kept = [d for d in decisions if d.keep]
    excluded = [d for d in decisions if not d.keep]
    head = (f"# CFP identities kept as labelled embedder classes: {len(kept)} of {len(decisions)} "
            f"({len(excluded)} that may be LFW people are in {excluded_file.name}). Written by "
            f"`python -m facewatch.training.cfp_identities`{note}.\n"
            f"# Columns: CFP folder (train-embedder --labelled-keep reads this one), name, the "
            f"nearest LFW person's face.\n")
    keep_file.write_text(head + "".join(f"{d.folder}\t{d.name}\t{d.reason}\n" for d in kept),
                         encoding="utf-8")
    excluded_file.write_text(
        "# CFP identities left out of training because they may be LFW people (validation or held "
        "out). Columns: CFP folder, name, reason.\n"
        + "".join(f"{d.folder}\t{d.name}\t{d.reason}\n" for d in excluded), encoding="utf-8")


def main() -> None:
    from facewatch.training.lfw import default_images_dir

    parser = argparse.ArgumentParser(description="decide which CFP identities may be trained on")
    parser.add_argument("--cfp", type=Path, default=DEFAULT_CFP_DIR, help="CFP's Images folder")
    parser.add_argument("--lfw", type=Path, default=None, help="LFW images on disk (face check)")
    parser.add_argument("--face-threshold", type=float, default=FACE_THRESHOLD)
    args = parser.parse_args()
    cfp_names, lfw_names = read_names(CFP_NAMES_FILE), read_names(LFW_NAMES_FILE)
    missing = [f"{n:03d}" for n in range(1, len(cfp_names) + 1) if not (args.cfp / f"{n:03d}").is_dir()]
    if missing:
        raise FileNotFoundError(f"{args.cfp}: CFP folders {missing[:3]} missing "
                                f"({len(missing)} of {len(cfp_names)}); wrong --cfp?")
    faces = face_means(args.cfp, Path(args.lfw or default_images_dir()))
    decisions = decide(cfp_names, lfw_names, faces, args.face_threshold)
    write_decisions(decisions, note=f" with face threshold {args.face_threshold}")
    by_name = [d for d in decisions if d.reason.startswith("name")]
    by_face = [d for d in decisions if d.reason.startswith("face")]
    print(f"kept {sum(d.keep for d in decisions)} of {len(decisions)}; excluded {len(by_name)} by "
          f"name, {len(by_face)} by face; {CFP_KEEP_FILE}, {CFP_EXCLUDED_FILE}")


if __name__ == "__main__":
    main()
