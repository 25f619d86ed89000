"""LFW on disk: identities, the fixed people-disjoint split, and pairs files in the LFW format.

    python -m training.lfw [--images DIR]     # (re)write training/splits/lfw_split.json + pairs

The split is decided by a hash of each person's name, so it does not depend on listing order or
on which other people exist; once written, the JSON file is the record and is read back as is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from facewatch.training.paths import SPLITS_DIR, require_dir, shared_data_dir

SPLIT_FILE = SPLITS_DIR / "lfw_split.json"
VAL_PAIRS_FILE = SPLITS_DIR / "lfw_val_pairs.txt"
VAL_PERMILLE = 150  # ~15% of people with >= 2 images go to validation
PAIRS_FOLDS = 10
PAIRS_PER_FOLD = 300  # per fold: 300 match + 300 mismatch pairs, as in LFW's pairs.txt
SPLIT_VERSION = 1


def default_images_dir() -> Path:
    return shared_data_dir() / "lfw" / "lfw-deepfunneled"


def image_path(images_dir: Path, name: str, index: int) -> Path:
    """LFW numbering is 1-based: <dir>/<name>/<name>_0001.jpg."""
    return Path(images_dir) / name / f"{name}_{index:04d}.jpg"


def list_people(images_dir: Path) -> dict[str, list[int]]:
    """name -> sorted 1-based image indices, for every folder holding `<name>_NNNN.jpg` files."""
    images_dir = require_dir(Path(images_dir), "LFW images folder")
    people: dict[str, list[int]] = {}
    for folder in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        indices = sorted(int(f.stem.rsplit("_", 1)[1]) for f in folder.glob(f"{folder.name}_*.jpg")
                         if f.stem.rsplit("_", 1)[1].isdigit())
        if indices:
            people[folder.name] = indices
    if not people:
        raise FileNotFoundError(f"no LFW identities (<name>/<name>_NNNN.jpg) under {images_dir}")
    return people


def is_val_person(name: str) -> bool:
    """Stable across machines and Python runs (unlike hash())."""
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 1000 < VAL_PERMILLE


@dataclass(frozen=True)
class Pair:
    name1: str
    index1: int
    name2: str
    index2: int

    @property
    def same(self) -> bool:
        return self.name1 == self.name2


def make_val_pairs(people: dict[str, list[int]], val_people: list[str], seed: int = 0,
                   folds: int = PAIRS_FOLDS, per_fold: int = PAIRS_PER_FOLD) -> list[list[Pair]]:
    """Deterministic match/mismatch pairs over validation people, grouped into folds.

    Match pairs are drawn round-robin over people so that a person with hundreds of photos
    cannot dominate; each fold holds `per_fold` match then `per_fold` mismatch pairs (fewer
    if the people do not allow that many distinct match pairs).
    """
    rng = random.Random(seed)
    candidates: dict[str, list[tuple[int, int]]] = {}
    for name in sorted(val_people):
        idx = people[name]
        all_pairs = [(a, b) for i, a in enumerate(idx) for b in idx[i + 1:]]
        rng.shuffle(all_pairs)
        if all_pairs:
            candidates[name] = all_pairs
    matches: list[Pair] = []
    want = folds * per_fold
    while len(matches) < want and any(candidates.values()):
        for name in sorted(candidates):
            if candidates[name] and len(matches) < want:
                a, b = candidates[name].pop()
                matches.append(Pair(name, a, name, b))
    rng.shuffle(matches)
    names = sorted(val_people)
    mismatches: list[Pair] = []
    seen: set[tuple] = set()
    while len(mismatches) < len(matches):
        n1, n2 = rng.sample(names, 2)
        pair = Pair(n1, rng.choice(people[n1]), n2, rng.choice(people[n2]))
        key = tuple(sorted([(pair.name1, pair.index1), (pair.name2, pair.index2)]))
        if key not in seen:
            seen.add(key)
            mismatches.append(pair)
    n = len(matches) // folds
    return [matches[k * n:(k + 1) * n] + mismatches[k * n:(k + 1) * n] for k in range(folds)]


def write_pairs(path: Path, folds: list[list[Pair]]) -> None:
    """LFW pairs.txt format: `folds per_fold`, then per fold the match lines then mismatch lines."""
    per_fold = sum(p.same for p in folds[0])
    lines = [f"{len(folds)}\t{per_fold}"]
    for fold in folds:
        for p in fold:
            lines.append(f"{p.name1}\t{p.index1}\t{p.index2}" if p.same
                         else f"{p.name1}\t{p.index1}\t{p.name2}\t{p.index2}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_pairs(path: Path) -> tuple[list[Pair], list[int]]:
    """Pairs and a fold id per pair, from an LFW-format file.

    First line: `count` (pairsDevTrain.txt) or `folds per_fold` (pairs.txt, where each fold is
    per_fold match then per_fold mismatch lines). With only a count, pair i goes to fold i % 10,
    which keeps both kinds in every fold of a file listing all matches first (pairsDevTrain.txt).
    """
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"pairs file {path} is empty")
    header, rows = lines[0], lines[1:]
    pairs: list[Pair] = []
    for number, row in enumerate(rows, start=2):
        if len(row) == 3:
            pairs.append(Pair(row[0], int(row[1]), row[0], int(row[2])))
        elif len(row) == 4:
            pairs.append(Pair(row[0], int(row[1]), row[2], int(row[3])))
        else:
            raise ValueError(f"{path}:{number}: expected `name i j` or `name1 i name2 j`, got {row}")
    if len(header) == 2:
        n_folds, per_fold = int(header[0]), int(header[1])
        if len(pairs) != n_folds * 2 * per_fold:
            raise ValueError(f"{path}: header says {n_folds} folds x {2 * per_fold} pairs, "
                             f"found {len(pairs)} pairs")
        fold_ids = [i // (2 * per_fold) for i in range(len(pairs))]
    elif len(header) == 1:
        fold_ids = [i % PAIRS_FOLDS for i in range(len(pairs))]
    else:
        raise ValueError(f"{path}: first line must be `count` or `folds count`, got {header}")
    return pairs, fold_ids


def build_split(images_dir: Path) -> dict:
    people = list_people(images_dir)
    val = sorted(n for n, idx in people.items() if len(idx) >= 2 and is_val_person(n))
    val_set = set(val)
    train = sorted(n for n in people if n not in val_set)
    return {
        "version": SPLIT_VERSION,
        "source": "LFW deep-funneled (vis-www.cs.umass.edu/lfw)",
        "rule": f"people with >= 2 images whose sha1(name) % 1000 < {VAL_PERMILLE} are validation; "
                "everyone else is training",
        "train_people": len(train),
        "train_images": sum(len(people[n]) for n in train),
        "val_people_count": len(val),
        "val_images": sum(len(people[n]) for n in val),
        "val_people": val,
    }


def write_split(images_dir: Path, split_file: Path = SPLIT_FILE,
                pairs_file: Path = VAL_PAIRS_FILE) -> dict:
    split = build_split(images_dir)
    people = list_people(images_dir)
    folds = make_val_pairs(people, split["val_people"])
    write_pairs(pairs_file, folds)
    split["val_pairs_file"] = pairs_file.name
    split["val_pairs"] = sum(len(f) for f in folds)
    split_file.write_text(json.dumps(split, indent=1) + "\n")
    return split


def load_split(images_dir: Path, split_file: Path = SPLIT_FILE,
               pairs_file: Path = VAL_PAIRS_FILE) -> dict:
    """The recorded split; written on first use. Validation people must still be on disk."""
    if not split_file.is_file() or not pairs_file.is_file():
        return write_split(images_dir, split_file, pairs_file)
    split = json.loads(split_file.read_text())
    people = list_people(images_dir)
    missing = [n for n in split["val_people"] if n not in people]
    if missing:
        raise ValueError(f"{split_file}: {len(missing)} validation people are not in {images_dir} "
                         f"(e.g. {missing[:3]}); wrong images folder?")
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description="write the fixed LFW split and validation pairs")
    parser.add_argument("--images", type=Path, default=None)
    args = parser.parse_args()
    split = write_split(Path(args.images or default_images_dir()))
    print(json.dumps({k: v for k, v in split.items() if k != "val_people"}, indent=1))


if __name__ == "__main__":
    main()
