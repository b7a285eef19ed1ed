"""Dense prediction data: an embedded shapes scene task (generated, no download) and the readers for
COCO-format instance folders and ADE20K-style semantic folders, which read the embedded task too.

The embedded task draws 2-4 non-overlapping shapes of the shapes set (data/synthetic.py's drawing) per
image, each of a random class, on that set's gradient background with clutter lines and pixel noise.
It is written in both layouts at once::

    root/images/{training,validation}/00000.png          the images
    root/annotations/instances_{train,val}.json          COCO instances: boxes, RLE masks, categories
    root/annotations/{training,validation}/00000.png     semantic masks: 0 background, k = category k

Readers and what they do with bad annotations (one error line for a broken folder, skipped and
counted for a bad annotation, so a mostly-good real data set still trains):

* `CocoInstances(image_dir, ann_file, masks=True)`: unknown category, missing / empty / degenerate /
  out-of-image box, mask of another size than its image, no mask where masks are wanted -> annotation
  skipped, counted in `skipped`; crowd regions are left out of the training targets and kept in
  `coco_gt`, where COCOeval ignores detections on them (as COCO's own numbers are scored); unreadable
  JSON, no categories, an image file missing, an image of another size than its JSON entry, every
  annotation skipped -> DataError.
* `SemanticFolder(image_dir, mask_dir, num_classes)`: keep-ratio rescaling and random crops for
  training, the shorter side rescaled for validation with masks at their own resolution (mmseg's
  ADE20K pipelines); an image without a mask or a mask of another size -> image skipped and counted;
  mask values above `num_classes` -> ignored pixels (`IGNORE_INDEX`); no image with a mask ->
  DataError. `reduce_zero_label` (ADE20K: 0 is "other") maps 0 to ignored and k to k-1.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import IMAGE_READ_ERRORS, DataError
from .synthetic import (
    MAX_CLASSES,
    POLARITIES,
    SHAPE_NAMES,
    _contrasting_colour,
    _draw_mask,
    _light_colour,
    _rgb,
    _unit_area,
    draw_background,
)

DENSE_MANIFEST = "dense_manifest.json"
GENERATOR_VERSION = 1
SPLIT_FOLDERS = {"train": "training", "val": "validation"}  # ADE20K's folder names
IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_OBJECT_AREA = (0.03, 0.08)  # fraction of the image each shape covers
_MIN_PIXELS = 12  # an instance smaller than this is not written (never happens at these areas)


def render_scene(size, rng, class_names, objects=(2, 4), polarity="light"):
    """(H x W x 3 uint8 image, [(class_index, H x W bool mask), ...]) of one scene.

    Shapes are placed without overlap (rejection sampling of their bounding circles), so every
    instance is whole and the semantic mask is their union. Equal area per class, as in the shapes set.
    """
    light = polarity == "light"
    img = draw_background(size, rng, light)
    placed, instances = [], []
    for _ in range(rng.integers(objects[0], objects[1] + 1)):
        class_index = int(rng.integers(len(class_names)))
        name = class_names[class_index]
        radius = np.sqrt(rng.uniform(*_OBJECT_AREA) * size * size / _unit_area(name))
        for _attempt in range(30):
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            if all(np.hypot(cx - x, cy - y) > radius + r + 1 for x, y, r in placed):
                break
        else:
            continue  # no room left: fewer objects in this image
        placed.append((cx, cy, radius))
        under = np.asarray(img.getpixel((int(cx), int(cy))), dtype=np.float64)
        colour = _light_colour(rng) if light else _contrasting_colour(rng, under)
        coverage = _draw_mask(name, size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        img.paste(_rgb(colour), mask=coverage)
        mask = np.asarray(coverage) >= 128
        if mask.sum() >= _MIN_PIXELS:
            instances.append((class_index, mask))
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(4, 14))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8)
    return pixels, instances


def mask_to_box(mask) -> list[float]:
    """COCO [x, y, w, h] of a bool mask's pixels (pixel edges: a one-pixel mask is 1 x 1)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def encode_mask(mask) -> dict:
    """COCO RLE of a bool H x W mask, JSON-ready (counts as text)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _check_dense_params(params):
    if not 1 <= params["num_classes"] <= MAX_CLASSES:
        raise DataError(
            f"dense num_classes={params['num_classes']} must be 1..{MAX_CLASSES} (the shape classes)"
        )
    if params["train_images"] < 1 or params["val_images"] < 1:
        raise DataError("dense train_images and val_images must both be >= 1")
    if not isinstance(params["seed"], int) or params["seed"] < 0:
        raise DataError(f"dense seed={params['seed']!r} must be an integer >= 0")
    if params["image_size"] < 48:
        raise DataError(f"dense image_size={params['image_size']} is too small for several shapes: use >= 48")
    lo, hi = params["objects"]
    if not 1 <= lo <= hi:
        raise DataError(f"dense objects={params['objects']} must be [min, max] with 1 <= min <= max")
    if params["polarity"] not in POLARITIES:
        raise DataError(f"dense polarity={params['polarity']!r} is not one of {', '.join(POLARITIES)}")


def _read_manifest(root):
    try:
        return json.loads((Path(root) / DENSE_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate_dense_dataset(
    root,
    num_classes=4,
    train_images=800,
    val_images=200,
    image_size=64,
    objects=(2, 4),
    seed=0,
    polarity="light",
) -> Path:
    """Write the embedded dense task to `root` (layout in the module docstring); return root.

    Deterministic (each image from its own RNG seeded by (seed, split, index)) and idempotent: a
    complete dataset with the same parameters is reused. Built in a staging folder renamed into
    place, so `root` is complete or absent; a non-empty `root` holding something else -> DataError.
    """
    params = dict(
        generator_version=GENERATOR_VERSION,
        num_classes=int(num_classes),
        train_images=int(train_images),
        val_images=int(val_images),
        image_size=int(image_size),
        objects=[int(o) for o in objects],
        seed=int(seed),
        polarity=polarity,
    )
    _check_dense_params(params)
    root = Path(root).resolve()  # a symlinked root: generate into its target (a link can't be renamed onto)
    old = _read_manifest(root)
    if old is not None and {k: old.get(k) for k in params} == params:
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if old:
            raise DataError(
                f"dense dataset root {root} already holds a dense dataset made with other parameters "
                f"({old}); choose another root or delete it"
            )
        raise DataError(
            f"dense dataset root {root} already holds other files; a data set of yours: set "
            "data.layout=folders (the embedded task is generated only into an empty or new root)"
        )
    classes = SHAPE_NAMES[:num_classes]
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "annotations").mkdir(parents=True)
        categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
        for split_index, (split, folder) in enumerate(SPLIT_FOLDERS.items()):
            image_dir, mask_dir = staging / "images" / folder, staging / "annotations" / folder
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            images, annotations = [], []
            for i in range(params[f"{split}_images"]):
                rng = np.random.default_rng([seed, split_index, i])
                pixels, instances = render_scene(image_size, rng, classes, objects, polarity)
                name = f"{i:05d}.png"
                Image.fromarray(pixels).save(image_dir / name, compress_level=1)
                semantic = np.zeros((image_size, image_size), dtype=np.uint8)
                for class_index, mask in instances:
                    semantic[mask] = class_index + 1
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": i + 1,
                            "category_id": class_index + 1,
                            "bbox": mask_to_box(mask),
                            "area": float(mask.sum()),
                            "segmentation": encode_mask(mask),
                            "iscrowd": 0,
                        }
                    )
                Image.fromarray(semantic).save(mask_dir / name, compress_level=1)
                images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
            coco = {"images": images, "annotations": annotations, "categories": categories}
            (staging / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (staging / DENSE_MANIFEST).write_text(json.dumps(dict(params, classes=classes), indent=1) + "\n")
        try:
            os.rename(staging, root)
        except OSError:
            if _read_manifest(root) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def embedded_paths(root, split) -> dict:
    """The reader arguments for one split of the embedded task (or any folder in its layout)."""
    root = Path(root)
    folder = SPLIT_FOLDERS[split]
    return {
        "image_dir": root / "images" / folder,
        "ann_file": root / "annotations" / f"instances_{split}.json",
        "mask_dir": root / "annotations" / folder,
    }


def _load_rgb(path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except IMAGE_READ_ERRORS as e:
        raise DataError(f"cannot read image {path} ({e}); replace or remove it") from None


def _to_tensor(pixels) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().div_(255)


class CocoInstances(torch.utils.data.Dataset):
    """COCO-format instances: (image 3 x H x W in [0, 1], target) as torchvision's detectors take them.

    target: boxes (N x 4, x1 y1 x2 y2), labels (N, 1..K: the categories in id order), masks
    (N x H x W uint8; only with `masks`, which box-only detectors such as FCOS don't need), image_id.
    Crowd regions are not targets. `coco_gt` is the filtered annotation dict, crowd regions included,
    each with `id`, `iscrowd` and `area` (filled in where the file leaves them out: pycocotools needs
    them); `label_to_category` maps labels back to category ids; `skipped` counts what was dropped.
    `hflip` (training) mirrors image, boxes and masks with probability 0.5.
    """

    def __init__(self, image_dir, ann_file, hflip=False, masks=True):
        self.image_dir, self.ann_file, self.hflip = Path(image_dir), Path(ann_file), hflip
        self.masks = masks
        try:
            raw = json.loads(self.ann_file.read_text())
        except (OSError, ValueError) as e:
            raise DataError(
                f"cannot read COCO annotation file {ann_file} ({e}); give an instances_*.json"
            ) from None
        if not isinstance(raw, dict) or not raw.get("categories") or "images" not in raw:
            raise DataError(f"{ann_file} is not a COCO instances file (needs 'images' and 'categories')")
        categories = sorted(raw["categories"], key=lambda c: c["id"])
        self.class_names = [c["name"] for c in categories]
        self.label_to_category = {i + 1: c["id"] for i, c in enumerate(categories)}
        category_to_label = {c: lbl for lbl, c in self.label_to_category.items()}
        self.images = []
        for entry in raw["images"]:
            path = self.image_dir / entry["file_name"]
            if not path.is_file():
                raise DataError(
                    f"image '{entry['file_name']}' of {ann_file} not found in {image_dir}; "
                    "point the image folder at the right place or remove the entry"
                )
            self.images.append(entry)
        sizes = {e["id"]: (e["height"], e["width"]) for e in self.images}
        self.skipped: Counter = Counter()
        kept, self.by_image = [], {e["id"]: [] for e in self.images}
        annotations = raw.get("annotations", [])
        given_ids = [a["id"] for a in annotations if isinstance(a.get("id"), int)]
        id_base = max(given_ids, default=0)  # ids for annotations without one come after the file's
        for ann in annotations:
            problem = self._problem(ann, category_to_label, sizes, masks)
            if problem:
                self.skipped[problem] += 1
                continue
            ann = _scorable(ann, sizes[ann["image_id"]], next_id=id_base + len(kept) + 1)
            kept.append(ann)
            if not ann["iscrowd"]:
                self.by_image[ann["image_id"]].append(ann)
        if not annotations:  # COCOeval scores an empty ground truth as -1 ("no data"): AP -100
            raise DataError(
                f"{ann_file} has no annotations: nothing to train on or score; give an instances_*.json"
            )
        if not kept:
            raise DataError(f"every annotation of {ann_file} was skipped: {self.skipped_line()}")
        if len({a["id"] for a in kept}) != len(kept):
            raise DataError(f"{ann_file} gives two annotations the same 'id'; ids must be unique")
        self.category_to_label = category_to_label
        self.coco_gt = {"images": self.images, "annotations": kept, "categories": categories}

    @staticmethod
    def _problem(ann, category_to_label, sizes, masks: bool) -> str | None:
        """Why an annotation can't be used (None: it can)."""
        if ann.get("image_id") not in sizes:
            return "unknown image id"
        if ann.get("category_id") not in category_to_label:
            return "unknown category"
        h, w = sizes[ann["image_id"]]
        box = ann.get("bbox")
        if not box or len(box) != 4 or box[2] < 1 or box[3] < 1:
            return "empty or degenerate box"
        if box[0] >= w or box[1] >= h or box[0] + box[2] <= 0 or box[1] + box[3] <= 0:
            return "box outside its image"
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and list(seg.get("size", [])) != [h, w]:
            return "mask size mismatch"
        if masks and not seg:
            return "no mask"
        return None

    def skipped_line(self) -> str | None:
        """'instances_train.json: skipped 3 annotations (2 unknown category, ...)' or None."""
        if not self.skipped:
            return None
        parts = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.ann_file.name}: skipped {sum(self.skipped.values())} annotations ({parts})"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from pycocotools import mask as mask_utils

        entry = self.images[index]
        pixels = _load_rgb(self.image_dir / entry["file_name"])
        h, w = entry["height"], entry["width"]
        if pixels.shape[:2] != (h, w):
            raise DataError(
                f"image {entry['file_name']} is {pixels.shape[1]}x{pixels.shape[0]} but {self.ann_file.name} "
                f"says {w}x{h}; fix the annotation file"
            )
        anns = self.by_image[entry["id"]]
        masks = np.zeros((len(anns) if self.masks else 0, h, w), dtype=np.uint8)
        for i, ann in enumerate(anns if self.masks else []):
            masks[i] = mask_utils.decode(_rle(ann["segmentation"], h, w))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        image, masks = _to_tensor(pixels), torch.from_numpy(masks)
        if self.hflip and torch.rand(()) < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "image_id": entry["id"]}
        return image, target | ({"masks": masks} if self.masks else {})


def _rle(seg, h: int, w: int):
    """A COCO `segmentation` (polygons, uncompressed or compressed RLE) as one compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(seg, h, w)
    return seg


def _scorable(ann: dict, size: tuple[int, int], next_id: int) -> dict:
    """`ann` with the fields pycocotools' COCOeval reads and a COCO file may leave out: `iscrowd` (0),
    `area` (the mask's pixels, else the box's) and `id` (`next_id`)."""
    from pycocotools import mask as mask_utils

    ann = dict(ann)
    ann.setdefault("iscrowd", 0)
    ann.setdefault("id", next_id)
    if "area" not in ann:
        seg = ann.get("segmentation")
        box_area = ann["bbox"][2] * ann["bbox"][3]
        ann["area"] = float(mask_utils.area(_rle(seg, *size))) if seg else float(box_area)
    return ann


# The longest side a rescaled image may have, in shorter sides: mmseg's ADE20K scale (2048, 512)
MAX_ASPECT = 4


def _keep_ratio_size(width: int, height: int, short: float) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is `short` and the longer at most MAX_ASPECT * short
    (mmseg's keep-ratio Resize to (MAX_ASPECT * short, short))."""
    factor = min(short / min(width, height), MAX_ASPECT * short / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


class SemanticFolder(torch.utils.data.Dataset):
    """ADE20K-style semantic segmentation: images in `image_dir`, masks of the same stem (.png) in
    `mask_dir`; (image 3 x H x W in [0, 1], mask H x W int64 with IGNORE_INDEX for unlabelled pixels).

    Class indices: 0..num_classes-1 after `reduce_zero_label` (ADE20K: 0 "other" -> ignored), else the
    mask values themselves (the embedded task: 0 is background, a class of its own).

    Sizes, as mmseg's ADE20K pipelines (aspect ratio kept; bilinear image, nearest mask):
    `scale_range=(lo, hi)` (training): the shorter side rescaled to `size * r`, r uniform in
    [lo, hi] (ADE20K: 0.5, 2.0), then a random `size x size` crop (padded with black pixels and ignored
    labels where the image is smaller), so batches stack. No `scale_range` (validation): the shorter
    side rescaled to `size` and the mask kept at its own resolution: the evaluation scores the
    logits upsampled to it, as mmseg scores ADE20K. `size=None`: images as they are. The longer side
    is capped at MAX_ASPECT shorter sides. `hflip` mirrors both with probability 0.5.
    """

    def __init__(
        self,
        image_dir,
        mask_dir,
        num_classes,
        reduce_zero_label=False,
        size=None,
        hflip=False,
        scale_range: tuple[float, float] | None = None,
    ):
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.size, self.hflip, self.scale_range = size, hflip, scale_range
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {image_dir} not found; give the images/<split> folder")
        self.skipped: Counter = Counter()
        self.pairs = []
        for path in sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            mask_path = self.mask_dir / f"{path.stem}.png"
            if not mask_path.is_file():
                self.skipped["image without mask"] += 1
                continue
            try:
                with Image.open(path) as im, Image.open(mask_path) as m:
                    image_size, mask_size, mask_mode = im.size, m.size, m.mode
            except IMAGE_READ_ERRORS as e:
                raise DataError(
                    f"cannot read {path.name} or its mask in {image_dir} ({e}); replace or remove the pair"
                ) from None
            if mask_mode not in ("L", "P", "I", "I;16"):
                raise DataError(
                    f"mask {mask_path} is a {mask_mode} image; masks hold one class index per pixel "
                    "(mode L or P PNGs, as ADE20K's): convert colour-coded masks to indices first"
                )
            if image_size != mask_size:
                self.skipped["mask size mismatch"] += 1
                continue
            self.pairs.append((path, mask_path))
        if not self.pairs:
            raise DataError(
                f"no image in {image_dir} has a mask in {mask_dir} ({dict(self.skipped) or 'no images'}); "
                "give matching images/ and annotations/ folders"
            )

    def skipped_line(self) -> str | None:
        if not self.skipped:
            return None
        parts = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.image_dir}: skipped {sum(self.skipped.values())} images ({parts})"

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        path, mask_path = self.pairs[index]
        try:
            with Image.open(path) as im, Image.open(mask_path) as m:
                image, mask = im.convert("RGB"), m.copy()
        except IMAGE_READ_ERRORS as e:  # a damaged body: the header read fine when the folder was scanned
            raise DataError(
                f"cannot read {path} or its mask {mask_path} ({e}); replace or remove the pair"
            ) from None
        if self.size is not None:
            short = self.size
            if self.scale_range is not None:
                lo, hi = self.scale_range
                short *= lo if lo == hi else float(torch.empty(()).uniform_(lo, hi))
            new_size = _keep_ratio_size(*image.size, short)
            if new_size != image.size:
                image = image.resize(new_size, Image.BILINEAR)
                if self.scale_range is not None:  # training; validation keeps the mask's own resolution
                    mask = mask.resize(new_size, Image.NEAREST)
        target = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
        if self.reduce_zero_label:
            target = torch.where(target == 0, IGNORE_INDEX, target - 1)
        target[(target >= self.num_classes) & (target != IGNORE_INDEX)] = IGNORE_INDEX
        image = _to_tensor(np.asarray(image))
        if self.size is not None and self.scale_range is not None:
            image, target = self._random_crop(image, target)
        if self.hflip and torch.rand(()) < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        return image, target

    def _random_crop(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A `size x size` window at a random place; sides shorter than `size` padded bottom / right
        (black pixels, ignored labels). No random draw where the window has one place (the embedded
        task's square images at `size`: its runs are unchanged)."""
        size = self.size
        height, width = target.shape
        top = int(torch.randint(height - size + 1, ())) if height > size else 0
        left = int(torch.randint(width - size + 1, ())) if width > size else 0
        image, target = (
            image[:, top : top + size, left : left + size],
            target[top : top + size, left : left + size],
        )
        pad_h, pad_w = size - target.shape[0], size - target.shape[1]
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h))
            target = torch.nn.functional.pad(target, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return image, target
