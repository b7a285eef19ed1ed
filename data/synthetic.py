"""Embedded default dataset: cluttered shapes, generated locally and written in the folder layout.

Every image holds one large "main" shape whose type is the class, drawn at a random position, scale,
rotation and colour, over a random two-colour gradient with clutter lines, 1-2 smaller distractor
shapes of *other* classes and pixel noise. The main shape's colour, area and the background are drawn
independently of the class (and each shape is scaled to the same pixel area), so the class cannot be
read off the mean colour or the colour histogram: a model has to look at spatial structure
(the outline of the largest object). ``tests/test_data.py`` checks a mean-colour classifier is at chance.

``polarity`` sets how hard the colours make it. ``"any"`` (the default, above): the main shape may be
lighter or darker than what is under it, so a model must first learn edges of either sign, in any
hue, before outlines help; small models need tens of thousands of images to leave chance.
``"light"``: the main shape is light on a dark background gradient; geometry, distractors (any colour),
clutter and noise are unchanged. The class is still only in the outline, but the figure/ground sign
is fixed, so the same models learn it several times sooner (``make demo`` uses it to fit a few
minutes of a 2-core CPU).

The dataset is written to ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` and read back by
the same folder code as ImageNet. Each image comes from its own seeded RNG, so the bytes depend only on
(seed, split, class, index) and the library versions (PIL's drawing and zlib).
"""

import errno
import json
import os
import shutil
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .errors import DataError

MANIFEST_NAME = "synthetic_manifest.json"
# Bump when the drawing changes, so an old dataset on disk is not mistaken for a current one.
GENERATOR_VERSION = 1
_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: anti-aliased edges, no heavy deps
_MAIN_AREA = (0.07, 0.20)  # fraction of the image covered by the class shape
_DISTRACTOR_AREA = (0.010, 0.025)  # distractors stay well below the smallest main shape
POLARITIES = ("any", "light")
_DARK_MAX = 0.4  # polarity "light": background channels in [0, 0.4 * 255]
_LIGHT_MIN = 200.0  # polarity "light": main-shape channels in [200, 255]


def _unit(points):
    """Polygon vertices scaled so the farthest one lies on the unit circle (shapes share one extent)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts / np.linalg.norm(pts, axis=1).max()


def _star(n=5, inner=0.42):
    angles = np.pi / 2 + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular(n):
    angles = np.pi / 2 + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Each shape is a list of (polygon | ("disk", cx, cy, r), add) parts in unit coordinates; add=False
# cuts the part out (ring, crescent). Polygons are rotated; disks only move with their centre.
_CHECKER = [(_rect(-0.9 + 0.6 * i, -0.9 + 0.6 * j, -0.3 + 0.6 * i, -0.3 + 0.6 * j), True)
            for i in range(3) for j in range(3) if (i + j) % 2 == 0]  # fmt: skip
SHAPES = {
    "disk": [(("disk", 0.0, 0.0, 1.0), True)],
    "square": [(_unit(_rect(-1, -1, 1, 1)), True)],
    "triangle": [(_regular(3), True)],
    "star": [(_star(), True)],
    "cross": [
        (
            _unit(
                [
                    (-0.3, 1),
                    (0.3, 1),
                    (0.3, 0.3),
                    (1, 0.3),
                    (1, -0.3),
                    (0.3, -0.3),
                    (0.3, -1),
                    (-0.3, -1),
                    (-0.3, -0.3),
                    (-1, -0.3),
                    (-1, 0.3),
                    (-0.3, 0.3),
                ]
            ),
            True,
        )
    ],  # fmt: skip
    "ring": [(("disk", 0.0, 0.0, 1.0), True), (("disk", 0.0, 0.0, 0.6), False)],
    "crescent": [(("disk", 0.0, 0.0, 1.0), True), (("disk", 0.45, 0.0, 0.85), False)],
    "arrow": [
        (
            _unit([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]),
            True,
        )
    ],  # fmt: skip
    "bars": [(np.array(_rect(x, -0.95, x + 0.3, 0.95)) / 1.26, True) for x in (-0.8, -0.15, 0.5)],
    "checker": [(np.array(p) / (0.9 * 2**0.5), add) for p, add in _CHECKER],
    "tee": [
        (
            _unit(
                [(-1, 1), (1, 1), (1, 0.55), (0.25, 0.55), (0.25, -1), (-0.25, -1), (-0.25, 0.55), (-1, 0.55)]
            ),
            True,
        )
    ],  # fmt: skip
    "bowtie": [
        (np.array([(-0.7, -0.7), (0.7, -0.7), (0, 0)]), True),
        (np.array([(-0.7, 0.7), (0.7, 0.7), (0, 0)]), True),
    ],  # fmt: skip
}
SHAPE_NAMES = list(SHAPES)
MAX_CLASSES = len(SHAPE_NAMES)


def _draw_mask(name, size, cx, cy, radius, angle):
    """Anti-aliased coverage mask (PIL "L", size x size) of one shape."""
    s = _SUPERSAMPLE
    big = size * s
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    mask = Image.new("L", (big, big), 0)
    cut = None
    for part, add in SHAPES[name]:
        if not add:
            cut = cut or Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask if add else cut)
        if isinstance(part, tuple):  # ("disk", x, y, r)
            _, px, py, pr = part
            ox, oy = rot @ np.array([px, py])
            x, y, r = (cx + radius * ox) * s, (cy + radius * oy) * s, radius * pr * s
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        else:
            pts = (np.asarray(part) @ rot.T) * radius + np.array([cx, cy])
            draw.polygon([tuple(p) for p in (pts * s)], fill=255)
    if cut is not None:
        mask = ImageChops.subtract(mask, cut)
    return mask.reduce(s)


@cache
def _unit_area(name):
    """Pixel area of a shape drawn at radius 1 (measured once at a large size): sets equal-area scales."""
    size, radius = 256, 100.0
    mask = np.asarray(_draw_mask(name, size, size / 2, size / 2, radius, 0.0), dtype=np.float64)
    return float(mask.sum()) / 255.0 / radius**2


@lru_cache(maxsize=8)
def _grid(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    return yy, xx


def _random_colour(rng):
    return rng.uniform(0, 255, size=3)


def _rgb(colour):
    return tuple(int(round(c)) for c in colour)


def _contrasting_colour(rng, against, min_dist=110.0):
    """Uniform colour at least `min_dist` (RGB L2) from `against`. Symmetric under c -> 255 - c, so its
    mean is still mid-grey and independent of the class."""
    for _ in range(100):
        colour = _random_colour(rng)
        if np.linalg.norm(colour - against) >= min_dist:
            return colour
    return 255.0 - against


def _light_colour(rng):
    return rng.uniform(_LIGHT_MIN, 255, size=3)


def draw_background(size, rng, light=False):
    """PIL RGB image: a linear gradient between two random colours (dark ones when `light`: the shapes
    drawn on it are light) at a random angle, with 1-3 thin clutter lines (data/dense.py uses it too)."""
    c0, c1 = _random_colour(rng).astype(np.float32), _random_colour(rng).astype(np.float32)
    if light:
        c0, c1 = c0 * np.float32(_DARK_MAX), c1 * np.float32(_DARK_MAX)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(size)
    t = np.clip(0.5 + xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta)), 0, 1)[..., None]
    img = Image.fromarray(np.rint(c0 + (c1 - c0) * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 4)):
        ends = [tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))]
        draw.line(ends, fill=_rgb(_random_colour(rng)))
    return img


def render_image(class_index, size, rng, class_names=None, polarity="any"):
    """One H x W x 3 uint8 image whose main shape is `class_names[class_index]` (polarity: see above)."""
    names = class_names or SHAPE_NAMES
    light = polarity == "light"
    img = draw_background(size, rng, light)
    # Distractors: smaller shapes of other classes, anywhere (may be cut by the border).
    others = [n for i, n in enumerate(names) if i != class_index]
    for _ in range(rng.integers(1, 3)):
        name = others[rng.integers(len(others))]
        radius = np.sqrt(rng.uniform(*_DISTRACTOR_AREA) * size * size / _unit_area(name))
        cx, cy = rng.uniform(0, size, 2)
        mask = _draw_mask(name, size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        img.paste(_rgb(_random_colour(rng)), mask=mask)
    # Main shape: equal area for every class, fully inside the image, contrasting with what is under it.
    name = names[class_index]
    radius = np.sqrt(rng.uniform(*_MAIN_AREA) * size * size / _unit_area(name))
    cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
    under = np.asarray(img.getpixel((int(cx), int(cy))), dtype=np.float64)
    colour = _light_colour(rng) if light else _contrasting_colour(rng, under)
    img.paste(_rgb(colour), mask=_draw_mask(name, size, cx, cy, radius, rng.uniform(0, 2 * np.pi)))
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(4, 14))
    return np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8)


def _params(num_classes, train_per_class, val_per_class, image_size, seed, polarity):
    return dict(
        generator_version=GENERATOR_VERSION,
        num_classes=int(num_classes),
        train_per_class=int(train_per_class),
        val_per_class=int(val_per_class),
        image_size=int(image_size),
        seed=int(seed),
        polarity=polarity,
    )


def _check_params(num_classes, train_per_class, val_per_class, image_size, polarity):
    if not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(
            f"synthetic num_classes={num_classes} is out of range; the generator has {MAX_CLASSES} shape "
            f"classes ({', '.join(SHAPE_NAMES)}): pick 2..{MAX_CLASSES}"
        )
    if train_per_class < 1 or val_per_class < 1:
        raise DataError(
            f"synthetic train_per_class={train_per_class}, val_per_class={val_per_class}: both must be >= 1"
        )
    if image_size < 32:
        raise DataError(f"synthetic image_size={image_size} is too small for the shapes: use >= 32 (e.g. 64)")
    if polarity not in POLARITIES:
        raise DataError(f"synthetic polarity={polarity!r} is not one of {', '.join(POLARITIES)}: pick one")


def read_manifest(root):
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict):
        manifest.setdefault("polarity", "any")  # written before the option existed: same images
    return manifest


def _is_complete(root, params):
    manifest = read_manifest(root)
    if not manifest or any(manifest.get(k) != v for k, v in params.items()):
        return False
    for split, per_class in (("train", params["train_per_class"]), ("val", params["val_per_class"])):
        for name in manifest["classes"]:
            d = Path(root) / split / name
            if not d.is_dir() or sum(1 for f in os.scandir(d) if f.name.endswith(".png")) != per_class:
                return False
    return True


def write_generated_dataset(root, params: dict, classes: list, render, kind: str = "synthetic") -> Path:
    """Write a generated dataset to root/{train,val}/<class>/*.png; return root.

    `params` (recorded in the manifest) must hold `train_per_class` and `val_per_class`;
    `render(rng, class_index, split) -> H x W x 3 uint8` draws one image from its own RNG, seeded by
    (params["seed"], split, class, index), so the bytes depend only on those and the library versions.
    Idempotent: if `root` already holds a complete dataset with the same `params` it returns at once.
    The data is built in a sibling staging folder and renamed into place, so `root` is either complete
    or absent, never half-written. An existing non-empty `root` that is not this dataset -> DataError.
    """
    root = Path(root).resolve()  # a symlinked root: generate into its target (a link can't be renamed onto)
    if not isinstance(params["seed"], int) or params["seed"] < 0:
        raise DataError(f"{kind} seed={params['seed']!r} must be an integer >= 0")
    if _is_complete(root, params):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        old = read_manifest(root)
        if old is not None:
            diff = {k: old.get(k) for k, v in params.items() if old.get(k) != v}
            what = f"a {kind} dataset made with different parameters {diff} (now {params})"
            if not diff:
                what = f"an incomplete {kind} dataset (files missing)"
        else:
            what = f"other files (it is not a {kind} dataset)"
        raise DataError(
            f"{kind} dataset root {root} already holds {what}; choose another root or delete {root}"
        )

    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a stale one, left by a crashed run with this pid
        staging.mkdir()
    except OSError as e:  # a read-only or full disk: the user's to fix, one line (not a traceback)
        if e.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(
            f"cannot write the {kind} dataset to {root} ({e.strerror}); set its root to a writable folder "
            "(e.g. data.root=...)"
        ) from None
    seed = params["seed"]
    try:
        for split_index, split in enumerate(("train", "val")):
            for class_index, name in enumerate(classes):
                out = staging / split / name
                out.mkdir(parents=True)
                for i in range(params[f"{split}_per_class"]):
                    rng = np.random.default_rng([seed, split_index, class_index, i])
                    pixels = render(rng, class_index, split)
                    Image.fromarray(pixels).save(out / f"{name}_{i:05d}.png", compress_level=1)
        manifest = dict(params, classes=classes)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(staging, root)  # atomic; allowed onto an absent or empty directory
        except OSError:
            if not _is_complete(root, params):  # another process may have finished the same data first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def generate_synthetic_dataset(
    root, num_classes=10, train_per_class=200, val_per_class=50, image_size=64, seed=0, polarity="any"
) -> Path:
    """Write the shapes dataset to root/{train,val}/<class>/*.png; return root.

    Deterministic (same arguments -> same bytes) and idempotent (see `write_generated_dataset`, which
    also says how a half-written or foreign `root` is handled).
    """
    _check_params(num_classes, train_per_class, val_per_class, image_size, polarity)
    params = _params(num_classes, train_per_class, val_per_class, image_size, seed, polarity)
    classes = SHAPE_NAMES[:num_classes]
    return write_generated_dataset(
        root,
        params,
        classes,
        lambda rng, class_index, split: render_image(class_index, image_size, rng, classes, polarity),
    )
