"""Sort ImageNet's flat validation folder (ILSVRC2012_val_00000001.JPEG, ...) into val/<wnid>/ folders.

Label files understood by scripts/prepare_imagenet_val.py (format detected from the content):

  loc-csv      LOC_val_solution.csv (Kaggle ImageNet localization): header "ImageId,PredictionString",
               rows "ILSVRC2012_val_00008726,n02119789 255 142 454 329 ..." -> first word is the wnid.
  pairs        one "filename wnid" per line (space, tab or comma separated), e.g.
               "ILSVRC2012_val_00000001.JPEG n01751748". With an integer instead of a wnid
               ("... 65", e.g. Caffe's val.txt) a synset map is needed (below).
  ground-truth one integer label per line, line k is ILSVRC2012_val_<k as 8 digits> (the devkit's
               ILSVRC2012_validation_ground_truth.txt); needs a synset map.

Synset map: one wnid per line, line i (counting from --label-base) is label i; extra words after the
wnid are ignored, so LOC_synset_mapping.txt works. Caution: the devkit ground truth uses ILSVRC2012_IDs,
numbered in meta.mat order, which is NOT the sorted wnid order of LOC_synset_mapping.txt; give a map in
the order of the labels (Caffe's val.txt uses the sorted order with --label-base 0).

Safety: everything is checked before the first file is touched; existing files are never overwritten;
a re-run after an interruption picks up where it stopped (files already in their class folder count as
done); unlabelled files are left where they are and reported.
"""

import csv
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .folder import _image_extensions

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_VAL_NAME = "ILSVRC2012_val_{:08d}"


def _stem(name):
    return os.path.splitext(os.path.basename(name.strip()))[0]


def _check_wnid(wnid, where):
    if not _SAFE_NAME.match(wnid):
        raise DataError(
            f"{where}: class name {wnid!r} is not a plain folder name; check the labels file format"
        )
    return wnid


def read_synsets(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"synset map {path} does not exist; give a file with one wnid per line")
    wnids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"synset map {path} is empty; give a file with one wnid per line")
    for i, w in enumerate(wnids):
        _check_wnid(w, f"{path} line {i + 1}")
    return wnids


def _label_to_wnid(token, synsets, label_base, where):
    if synsets is None:
        raise DataError(
            f"{where}: labels are integers, so a synset map is needed; "
            "pass --synsets FILE (one wnid per line)"
        )
    k = int(token) - label_base
    if not 0 <= k < len(synsets):
        raise DataError(
            f"{where}: label {token} is outside the synset map's {len(synsets)} entries "
            f"(with --label-base {label_base}); check --label-base and the map"
        )
    return synsets[k]


def read_val_labels(labels_path, synsets_path=None, label_base=1):
    """{image stem: wnid} from any supported labels file (see the module docstring)."""
    labels_path = Path(labels_path)
    if not labels_path.is_file():
        raise DataError(
            f"labels file {labels_path} does not exist; give LOC_val_solution.csv or a labels file"
        )
    synsets = read_synsets(synsets_path) if synsets_path else None
    text = labels_path.read_text(encoding="utf-8-sig")
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise DataError(f"labels file {labels_path} is empty")
    labels = {}

    def add(stem, wnid, where):
        _check_wnid(wnid, where)
        if labels.setdefault(stem, wnid) != wnid:
            raise DataError(
                f"{where}: {stem} is labelled both {labels[stem]} and {wnid}; fix the labels file"
            )

    first = lines[0][1]
    if first.replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row_no, row in enumerate(csv.reader(text.splitlines()[1:]), start=2):
            if not row:
                continue
            where = f"{labels_path} line {row_no}"
            if len(row) < 2 or not row[1].split():
                raise DataError(f"{where}: expected 'ImageId,PredictionString', got {','.join(row)!r}")
            add(_stem(row[0]), row[1].split()[0], where)
    elif all(len(line.split()) == 1 and "," not in line for _, line in lines):
        for line_no, line in lines:
            where = f"{labels_path} line {line_no}"
            if not line.lstrip("-").isdigit():
                raise DataError(f"{where}: expected one integer label per line, got {line!r}")
            add(_VAL_NAME.format(line_no), _label_to_wnid(line, synsets, label_base, where), where)
        raw = text.splitlines()
        while raw and not raw[-1].strip():
            raw.pop()
        if len(lines) != len(raw):
            raise DataError(
                f"{labels_path} has blank lines; in the one-label-per-line format line k labels image k, "
                "so blank lines would shift every label after them: remove them"
            )
    else:
        for line_no, line in lines:
            where = f"{labels_path} line {line_no}"
            parts = line.replace(",", " ").split()
            if len(parts) != 2:
                raise DataError(f"{where}: expected 'filename wnid', got {line!r}")
            name, label = parts
            wnid = _label_to_wnid(label, synsets, label_base, where) if label.lstrip("-").isdigit() else label
            add(_stem(name), wnid, where)
    return labels


@dataclass
class ValSortPlan:
    val_dir: Path
    out_dir: Path
    todo: list = field(default_factory=list)  # (src, dst)
    # (path, dst): sorted by an earlier run into another class folder than the labels now name (a wrong
    # synset order, corrected): renamed to the right one, whatever the mode
    resort: list = field(default_factory=list)
    done: int = 0  # already in their class folder (re-run)
    unlabelled: list = field(default_factory=list)  # flat images without a label: left in place
    missing: list = field(default_factory=list)  # labelled stems with no image anywhere

    @property
    def classes(self):
        return sorted({dst.parent.name for _, dst in self.todo})

    def summary(self):
        return (
            f"{len(self.todo)} images to sort into {len(self.classes)} class folders under {self.out_dir}, "
            + (f"{len(self.resort)} to move to the class folder their label names, " if self.resort else "")
            + f"{self.done} already sorted, {len(self.unlabelled)} unlabelled (left in place), "
            f"{len(self.missing)} labelled but not found"
        )


def _same_file(src: Path, dst: Path) -> bool:
    """Whether `dst` is already `src` sorted: a link to it, or a copy of its size (a copy cut short
    leaves a shorter file, which is not)."""
    if dst.is_symlink():
        return os.path.realpath(dst) == os.path.realpath(src)
    return dst.is_file() and dst.stat().st_size == src.stat().st_size


def plan_val_sort(val_dir, labels, out_dir=None, allow_missing=False) -> ValSortPlan:
    """Work out every move without touching anything; raise DataError on anything doubtful."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise DataError(
            f"validation folder {val_dir} does not exist; give the folder of ILSVRC2012_val_*.JPEG"
        )
    out_dir = Path(out_dir) if out_dir else val_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output folder {out_dir} is a file; give a folder (new or of class folders)")
    extensions = _image_extensions()
    flat = {}
    for entry in os.scandir(val_dir):
        if entry.is_file() and os.path.splitext(entry.name)[1].lower() in extensions:
            stem = _stem(entry.name)
            if stem in flat:
                raise DataError(
                    f"{val_dir} holds both {flat[stem].name} and {entry.name}; "
                    "keep one so labels are unambiguous"
                )
            flat[stem] = Path(entry.path)
    sorted_already: dict[str, list[Path]] = {}  # stem -> where earlier runs put it
    for wnid in sorted(set(labels.values())):
        d = out_dir / wnid
        if os.path.lexists(d) and not d.is_dir():
            raise DataError(f"{d} is a file where class folder {wnid} goes; move it away first")
        if d.is_dir():
            for f in sorted(os.listdir(d)):
                if _stem(f) in labels:
                    sorted_already.setdefault(_stem(f), []).append(d / f)
    plan = ValSortPlan(val_dir=val_dir, out_dir=out_dir)
    for stem, wnid in sorted(labels.items()):
        src = flat.get(stem)
        placed = sorted_already.get(stem, [])
        wrong = [p for p in placed if p.parent.name != wnid]
        # a second copy: another class folder's, or (sorting in place) the flat original; with --out
        # the flat originals stay by design (copy / symlink modes)
        twin = [p for p in placed if p != wrong[0]] if wrong else []
        if wrong and not twin and src is not None and out_dir.resolve() == val_dir.resolve():
            twin = [src]
        if wrong and twin:
            raise DataError(
                f"{wrong[0]} is labelled {wnid} but sits in class folder {wrong[0].parent.name}, and "
                f"{twin[0]} is the same image; delete {wrong[0]}"
            )
        if wrong:  # sorted before with other labels: to the folder these labels name
            plan.resort.append((wrong[0], out_dir / wnid / wrong[0].name))
            continue
        if src is None:
            if placed:
                plan.done += 1
            else:
                plan.missing.append(stem)
            continue
        dst = out_dir / wnid / src.name
        if os.path.lexists(dst):
            if _same_file(src, dst):  # a copy / symlink run stopped half way, or run again
                plan.done += 1
                continue
            raise DataError(f"{dst} already exists and {src} would replace it; move one of them away first")
        plan.todo.append((src, dst))
    plan.unlabelled = sorted(str(p) for s, p in flat.items() if s not in labels)
    if plan.missing and not allow_missing:
        raise DataError(
            f"{len(plan.missing)} labelled images are not in {val_dir} (first: {plan.missing[0]}); "
            "check the folder and labels file, or pass --allow-missing to sort the rest"
        )
    if not plan.todo and not plan.done and not plan.resort:
        raise DataError(f"no image in {val_dir} matches a label in the labels file; check both paths")
    return plan


def check_sort_mode(plan: ValSortPlan, mode: str) -> None:
    """DataError for a mode the plan can't be carried out in (also checked by a dry run)."""
    if mode not in ("move", "symlink", "copy"):
        raise DataError(f"mode {mode!r} is not one of move, symlink, copy")
    if mode in ("symlink", "copy") and plan.todo and plan.out_dir.resolve() == plan.val_dir.resolve():
        raise DataError(
            f"{mode} mode would leave the flat originals next to the class folders; give --out NEW_FOLDER "
            "(or sort them in place with --mode move)"
        )


def execute_val_sort(plan: ValSortPlan, mode="move", log=None):
    """Carry out a plan: 'move' (rename), 'symlink' (relative links, originals untouched) or 'copy'."""
    check_sort_mode(plan, mode)
    for path, dst in plan.resort:  # within the output tree: a rename (a symlink keeps its relative target)
        dst.parent.mkdir(exist_ok=True)
        if os.path.lexists(dst):
            raise DataError(f"{dst} appeared while sorting; nothing overwritten")
        os.rename(path, dst)
    for n, (src, dst) in enumerate(plan.todo):
        dst.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dst):  # appeared since planning: never overwrite
            raise DataError(f"{dst} appeared while sorting; stopped after {n} files, nothing overwritten")
        if mode == "move":
            shutil.move(src, dst)  # a rename on one file system; copy-then-delete across
        elif mode == "symlink":
            os.symlink(os.path.relpath(src.resolve(), dst.parent.resolve()), dst)
        else:
            shutil.copy2(src, dst)
        if log and (n + 1) % 10000 == 0:
            log(f"{n + 1}/{len(plan.todo)} done")
    return len(plan.todo)
