"""Class-folder datasets (ImageNet layout: split/<wnid>/*.JPEG) on timm's ImageDataset.

Class selection (`resolve_classes`) happens once, on the train split, and the resulting ordered list is
used for every split, so label i means the same class in train and val. Only the selected class folders
are scanned (a 10-class ImageNet subset does not walk all 1.28M files).

Unreadable images: timm's `ImageDataset.__getitem__` already catches IOError/OSError on open/decode,
logs "Skipped sample" and moves on to the next index (giving up after TIMM_DATASET_MAX_RETRIES
consecutive failures); PIL's other decode failures (SyntaxError for a broken PNG chunk,
DecompressionBombError, a ValueError raised inside PIL) are skipped the same way one level up.
`FolderImageDataset` builds on that loop: its reader records which indices the loop asked for, so the
failed ones are known, marked in a shared-memory table (visible from DataLoader workers) and retrievable
through `dataset.corrupt_count()` / `dataset.corrupt_files()` for the trainer to log. If the loop gives
up, a DataError names the files instead of a bare RuntimeError.
"""

import logging
import os
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key

from .errors import DataError

_logger = logging.getLogger(__name__)


def _image_extensions():
    return {e.lower() for e in get_img_extensions(as_set=True)}


def list_images(class_dir):
    """Image files under one class folder (recursive, symlinks followed), in natural sort order. A
    folder reached twice (a symlink back up the tree, or two links to one folder) is read once: a
    cycle would otherwise list its images once per level, up to the OS's symlink limit."""
    extensions = _image_extensions()
    found = []
    seen = {os.path.realpath(class_dir)}
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort(key=natural_key)  # which of two links to one folder is read: the first in order
        kept = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(d)
        dirnames[:] = kept
        found.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
        )
    return sorted(found, key=natural_key)


def class_folders(split_dir) -> list[str]:
    """The class folder names of a split folder, in natural order (as timm sorts: '2' before '10')."""
    return sorted(
        (e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")), key=natural_key
    )


def _flat_images_hint(split_dir) -> str:
    """The prepare_imagenet_val.py hint, for a split folder that holds images directly (ImageNet's
    official flat val folder); '' otherwise."""
    extensions = _image_extensions()
    with os.scandir(split_dir) as it:
        if any(e.is_file() and os.path.splitext(e.name)[1].lower() in extensions for e in it):
            return (
                f"; {split_dir} holds images directly (ImageNet's flat val folder?): sort them into "
                "class folders with scripts/prepare_imagenet_val.py"
            )
    return ""


def _require_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        fix = "check the data root in the config"
        if path.parent.is_dir():
            present = ", ".join(class_folders(path.parent)[:8]) or "nothing"
            fix = f"{path.parent} holds: {present}"
        raise DataError(f"{what} {path} does not exist or is not a folder; {fix}")
    return path


def read_class_list(path):
    """Class folder names from a file, one a line, in file order. Blank lines and '#' comments are
    skipped. Lines like ImageNet's LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca") give their
    first word."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class list file {path} does not exist; give a text file of class folder names")
    names = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise DataError(f"class list file {path} names no classes; put one class folder name per line")
    return names


def resolve_classes(train_dir, class_list=None, num_classes=None, seed=0) -> list[str]:
    """The ordered list of class folder names to use; index in the list = label.

    class_list: file of class folder names (e.g. ImageNet wnids), one a line -> that order; a list of
        names is taken as it is (configs may inline the list).
    num_classes: that many classes drawn from train_dir with `seed`, returned sorted.
    Neither: every class folder of train_dir, sorted (natural order, as timm sorts).
    """
    train_dir = _require_dir(train_dir, "train folder")
    available = class_folders(train_dir)
    if not available:
        raise DataError(
            f"train folder {train_dir} has no class subfolders; expected {train_dir}/<class>/<images>"
            + _flat_images_hint(train_dir)
        )
    if class_list is not None and num_classes is not None:
        raise DataError(
            "both class_list and num_classes are set; use class_list for a fixed subset "
            "or num_classes for a seeded random one, not both"
        )
    if class_list is not None:
        if isinstance(class_list, (list, tuple)):
            source = "data.class_list"
            lines = [str(c).strip() for c in class_list]
            if not lines or not all(lines):
                raise DataError(f"{source} must be a non-empty list of class folder names")
        else:
            source = f"class list {class_list}"
            lines = read_class_list(class_list)
        present = set(available)
        # Whole line if it is a folder (names with spaces), otherwise its first word.
        classes = [line if line in present else line.split()[0] for line in lines]
        dupes = sorted(name for name, n in Counter(classes).items() if n > 1)
        if dupes:
            raise DataError(f"{source} names {', '.join(dupes)} more than once; remove the repeats")
        missing = [c for c in classes if c not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"class '{missing[0]}'{more} from {source} is not a folder in {train_dir}; "
                "fix the list or the data root"
            )
    elif num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise DataError(f"num_classes={num_classes!r} must be a positive integer")
        if num_classes > len(available):
            raise DataError(
                f"num_classes={num_classes} but {train_dir} has only {len(available)} class folders; "
                f"use num_classes <= {len(available)}"
            )
        classes = sorted(random.Random(seed).sample(available, num_classes), key=natural_key)
    else:
        classes = available
    for name in classes:
        _check_not_empty(train_dir / name, name, train_dir)
    return list(classes)


def _check_not_empty(class_dir, name, split_dir):
    with os.scandir(class_dir) as it:
        # Cheap test first (flat ImageNet folders); full walk only if the first entries are not images.
        extensions = _image_extensions()
        for entry in it:
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in extensions:
                return
    if not list_images(class_dir):
        raise DataError(
            f"class '{name}' in {split_dir} has no images "
            f"(extensions {', '.join(sorted(_image_extensions()))}); "
            "add images or leave the class out with a class list"
        )


class ClassFolderReader(ReaderImageFolder):
    """timm's folder reader over an explicit (path, label) list; records the indices it is asked for so
    the dataset can tell which ones timm's retry loop skipped."""

    def __init__(self, root, samples, class_to_idx):
        # ReaderImageFolder.__init__ would walk the whole root; the samples are already known.
        super(ReaderImageFolder, self).__init__()
        self.root = str(root)
        self.samples = samples
        self.class_to_idx = class_to_idx
        self.requested = []

    def __getitem__(self, index):
        self.requested.append(index)
        return super().__getitem__(index)


class _DropTimmSkipLine(logging.Filter):
    """timm's "Skipped sample" warning, for a file FolderImageDataset reports itself (once, by name)."""

    def filter(self, record):
        return not record.getMessage().startswith("Skipped sample")


_TIMM_DATASET_LOGGER = logging.getLogger("timm.data.dataset")
# The label an unreadable image's sample carries where scoring leaves it out (eval.py, validation)
UNREADABLE = -1
# What PIL raises for a damaged file (errors.IMAGE_READ_ERRORS) besides OSError, which timm's retry loop
# already skips, and ValueError, taken only where PIL raised it (_raised_in_pil): here the except
# also covers timm's transform, whose ValueErrors are bugs
_DECODE_ERRORS = (SyntaxError, Image.DecompressionBombError)


def _raised_in_pil(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is PIL's: its ValueErrors are damaged files,
    a ValueError from elsewhere (a transform) is a bug to see."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").partition(".")[0] == "PIL"


class FolderImageDataset(ImageDataset):
    """timm ImageDataset over selected class folders that counts the unreadable images it skips."""

    def __init__(self, reader: ClassFolderReader, transform=None, **kwargs):
        super().__init__(root=reader.root, reader=reader, transform=transform, **kwargs)
        if not any(isinstance(f, _DropTimmSkipLine) for f in _TIMM_DATASET_LOGGER.filters):
            _TIMM_DATASET_LOGGER.addFilter(_DropTimmSkipLine())
        self.classes = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
        # One byte per sample in shared memory: DataLoader workers mark the files they could not read
        # and the main process sees it (worker-local counters would be lost).
        self._corrupt = torch.zeros(len(reader), dtype=torch.uint8).share_memory_()
        # None: an unreadable image's neighbour is used in its place (training); a label (eval.py's
        # -1): the neighbour's pixels come with it, so scoring can leave the sample out
        self.unreadable_target: int | None = None

    def __getitem__(self, index):
        failed = []  # indices that could not be read, in the order tried
        for _ in range(self._max_retries):
            self.reader.requested = []
            try:
                item = super().__getitem__(index)  # timm's loop skips files whose reading raises OSError
            except (*_DECODE_ERRORS, ValueError) as e:  # PIL's other failures: a broken chunk, a bomb
                if isinstance(e, ValueError) and not _raised_in_pil(e):
                    raise
                failed += self.reader.requested
                index = (self.reader.requested[-1] + 1) % len(self.reader)
                continue
            except RuntimeError as e:
                if len(self.reader.requested) < self._max_retries:  # not timm giving up: not ours
                    raise
                self._raise_damaged(failed + self.reader.requested, e)
            failed += self.reader.requested[:-1]  # every index before the one that loaded
            break
        else:
            self._raise_damaged(failed, None)
        self._mark(failed)
        if failed and self.unreadable_target is not None:
            return item[0], self.unreadable_target
        return item

    def _raise_damaged(self, failed: list[int], cause):
        self._mark(failed)
        names = ", ".join(self.filename(i, absolute=True) for i in failed[:3])
        raise DataError(
            f"{len(failed)} consecutive images could not be read ({names}, ...) in {self.reader.root}; "
            "the data is damaged: re-extract it, or delete the broken files "
            "(or raise TIMM_DATASET_MAX_RETRIES)"
        ) from cause

    def _mark(self, indices):
        for i in indices:
            # the shared table says whether any process has met it: each file warned once, not once
            # per DataLoader worker (and per epoch: the train loader's workers are new each epoch)
            if not self._corrupt[i]:
                self._corrupt[i] = 1
                _logger.warning(
                    "skipped unreadable image %s (%s); dataset.corrupt_files() lists all, delete or "
                    "replace them",
                    self.filename(i, absolute=True),
                    "a neighbour was used instead" if self.unreadable_target is None else "not scored",
                )

    def corrupt_count(self) -> int:
        """Number of distinct files found unreadable so far (across DataLoader workers)."""
        return int(self._corrupt.sum())

    def corrupt_files(self) -> list[str]:
        return [self.filename(int(i), absolute=True) for i in torch.nonzero(self._corrupt).flatten()]

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.reader.samples:
            counts[self.classes[label]] += 1
        return counts


def _counting_dataset(dataset) -> FolderImageDataset | None:
    """The FolderImageDataset under `dataset` (itself, or through a DataLoader's or wrapper's
    `.dataset` links); None for datasets that do not count unreadable images."""
    for _ in range(8):
        if isinstance(dataset, FolderImageDataset):
            return dataset
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            break
    return None


def corrupt_count(dataset) -> int:
    """Unreadable images skipped so far by `dataset` (0 for datasets that do not count them). Also
    takes a DataLoader or a wrapper dataset."""
    folder = _counting_dataset(dataset)
    return folder.corrupt_count() if folder is not None else 0


def unreadable_files(dataset, device: torch.device | None = None) -> list[str]:
    """The files `dataset` found unreadable so far (as `corrupt_count`). With `device`, a collective
    under torch.distributed: every rank's finds (each read its own shard), merged into each rank's table."""
    folder = _counting_dataset(dataset)
    if folder is None:
        return []
    if device is not None:
        table = folder._corrupt.to(device)
        torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.MAX)
        folder._corrupt.copy_(table.cpu())
    return folder.corrupt_files()


def build_image_folder(split_dir, classes, max_per_class=None, seed=0, transform=None) -> ImageDataset:
    """timm ImageDataset over split_dir/<class>/* for the given classes; label = index in `classes`.

    max_per_class: keep at most that many images per class, chosen with `seed` (per class, so a class's
    pick does not depend on the other classes), in file order.
    """
    split_dir = _require_dir(split_dir, "split folder")
    classes = list(classes)
    if not classes:
        raise DataError("no classes given; pass the list returned by resolve_classes()")
    if max_per_class is not None and (
        isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1
    ):
        raise DataError(f"max_per_class={max_per_class!r} must be a positive integer or None")
    missing = [c for c in classes if not (split_dir / c).is_dir()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"class '{missing[0]}'{more} has no folder in {split_dir}; every split needs the same class "
            "folders (a subset of them: list it in data.class_list, or eval.py --class-list)"
            + _flat_images_hint(split_dir)
        )
    samples = []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name)
        if not files:
            raise DataError(
                f"class '{name}' in {split_dir} has no images; "
                "add images or leave the class out with a class list"
            )
        if max_per_class is not None and len(files) > max_per_class:
            keep = set(random.Random(f"{seed}:{name}").sample(range(len(files)), max_per_class))
            files = [f for i, f in enumerate(files) if i in keep]
        samples.extend((f, label) for f in files)
    reader = ClassFolderReader(split_dir, samples, {c: i for i, c in enumerate(classes)})
    return FolderImageDataset(reader, transform=transform)
