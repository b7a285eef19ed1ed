"""Embedded long-range task: Pathfinder-like "are the two marked dots on the same curve?".

Every image holds `num_curves` smooth random curves, each long enough to cross most of the image, on
a dark noisy background. Two dots (a white ring around the curve's own colour) mark two curve ends.
Class `connected`: the dots sit on the two ends of one curve; class `disconnected`: on one end each
of two different curves. Both classes have the same number of curves, dots and unmarked ends, and
the dots are at least `min_dot_distance` (a fraction of the side) apart in both, and so are the two
ends of every curve (a connected pair's curve is no straighter than any other), so nothing near
either dot tells the class: the answer needs information from both dots, which are further apart
than a small local window can see.

With `colour_curves: true` (the default) each curve has its own colour, drawn dim, and its dots carry
it at full brightness, so the class is "do the two dots have the same colour": one long-range
comparison. An additive model of local features (a local mixer, then average pooling and a linear
head) cannot compute it: with the default two curves in a two-colour palette (`palette: 2`), the
count of red dots is 0 or 2 when connected and 1 when not, and no threshold on a sum splits {0, 2}
from {1}. `palette: 0` draws random hues (>= 0.2 apart) instead: harder, continuous comparisons.
With `colour_curves: false` every curve is the same grey and the class can
only be read by tracing the curve (LRA's Pathfinder): far harder, and beyond a short CPU budget.

Written as `root/{train,val}/{disconnected,connected}/*.png` by the shapes set's writer
(`data.synthetic.write_generated_dataset`): deterministic, idempotent, read back as a folder dataset.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import DataError
from .synthetic import write_generated_dataset

# Bump when the drawing changes, so an old dataset on disk is not mistaken for a current one.
GENERATOR_VERSION = 5
CLASS_NAMES = ["disconnected", "connected"]
_SUPERSAMPLE = 4  # curves are drawn at 4x and box-filtered down: anti-aliased, ~1.5 px wide
_CURVE_WIDTH = 2.0  # px at the output size
_RING_WIDTH = 1.2  # px: a dot is a white ring this wide around a core of its curve's colour
_CURVE_LENGTH = 1.1  # curve length as a fraction of the image side: most of the image
_TURN_STD = 0.35  # heading change per step (radians, steps of ~1 px): smooth but not straight
_MIN_HUE_GAP = 0.2  # hues of two curves in one image differ by at least this (of the 0..1 circle)
_DOT_CLEARANCE = 2.0  # px between a dot's edge and any other curve
_NEAR_GAP = (1.0, 6.0)  # px between the edges of two `near` dots: both in one small window
_MAX_TRIES = 3000


def _random_curve(rng, size: int) -> np.ndarray:
    """(n, 2) points of a smooth random walk of length `_CURVE_LENGTH * size` that stays inside the
    image: the heading drifts by a Gaussian turn per 1-px step and turns back from the border."""
    margin, far = 3.0, size - 3.0
    steps = int(_CURVE_LENGTH * size)
    x, y = rng.uniform(margin, far, 2)
    heading = rng.uniform(0, 2 * np.pi)
    turns, steers = rng.normal(0.0, _TURN_STD, steps), rng.normal(0.0, 0.5, steps)
    points = np.empty((steps + 1, 2))
    points[0] = x, y
    for i in range(steps):  # plain floats: a numpy op per step would be ~10x slower
        heading += turns[i]
        nx, ny = x + math.cos(heading), y + math.sin(heading)
        if not (margin <= nx <= far and margin <= ny <= far):
            # steer toward the centre, keeping some randomness
            heading = math.atan2(size / 2 - y, size / 2 - x) + steers[i]
            nx, ny = x + math.cos(heading), y + math.sin(heading)
        x, y = min(max(nx, margin), far), min(max(ny, margin), far)
        points[i + 1] = x, y
    return points


def _spanning_curve(rng, size: int, span: float) -> np.ndarray:
    """A `_random_curve` whose ends are >= `span` px apart (curves are drawn independently, so
    rejecting each on its own is the same distribution as rejecting the set)."""
    for _ in range(_MAX_TRIES):
        curve = _random_curve(rng, size)
        if np.linalg.norm(curve[0] - curve[-1]) >= span:
            return curve
    raise DataError(f"pathfinder: no curve spans {span:.0f} px in a {size} px image; lower min_dot_distance")


def _clear_of_others(dot: np.ndarray, owner: int, curves: list[np.ndarray], dot_radius: float) -> bool:
    """No other curve passes within `_DOT_CLEARANCE` px of a dot's edge: which curve a dot ends is
    then visible, not hidden under a crossing."""
    return all(
        np.min(np.linalg.norm(curve - dot, axis=1)) >= dot_radius + _DOT_CLEARANCE
        for i, curve in enumerate(curves)
        if i != owner
    )


def _rgb(colour: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colour)


def _hues(rng, count: int, palette: int = 0) -> list[float]:
    """`count` distinct hues: from a fixed palette of `palette` evenly spaced ones (red first), or with
    `palette=0` random hues at least `_MIN_HUE_GAP` apart on the hue circle."""
    if palette:
        return (rng.permutation(palette)[:count] / palette).tolist()
    for _ in range(_MAX_TRIES):
        hues = rng.uniform(0, 1, count)
        gaps = np.abs(hues[:, None] - hues[None, :])
        gaps = np.minimum(gaps, 1 - gaps) + np.eye(count)
        if gaps.min() >= _MIN_HUE_GAP:
            return hues.tolist()
    raise DataError(f"pathfinder: cannot draw {count} hues {_MIN_HUE_GAP} apart; use fewer curves")


def pathfinder_layout(
    connected: bool,
    size: int,
    rng,
    num_curves: int = 2,
    min_dot_distance: float = 0.5,
    dot_radius: float = 3.2,
    near: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """(curves, dots, owners) of one image: the dots are on one curve's two ends iff `connected`, and
    >= min_dot_distance x size apart, or with `near` only `_NEAR_GAP` px apart (edge to edge)."""
    min_dist, max_dist = min_dot_distance * size, np.inf
    if near:
        min_dist, max_dist = 2 * dot_radius + _NEAR_GAP[0], 2 * dot_radius + _NEAR_GAP[1]
    # Far pairs: every curve spans at least the dot distance, in both classes, so a connected pair's
    # curve is no straighter than any other and a curve's shape near a dot tells nothing.
    span = 0.0 if near else min_dist
    for _ in range(_MAX_TRIES):
        curves = [_spanning_curve(rng, size, span) for _ in range(num_curves)]
        if connected:
            dots, owners = [curves[0][0], curves[0][-1]], [0, 0]
        else:
            dots, owners = [curves[0][rng.integers(2) * -1], curves[1][rng.integers(2) * -1]], [0, 1]
        if min_dist <= np.linalg.norm(dots[0] - dots[1]) <= max_dist and all(
            _clear_of_others(dot, owner, curves, dot_radius) for dot, owner in zip(dots, owners, strict=True)
        ):
            return curves, dots, owners
    raise DataError(
        f"pathfinder: no curves with dots {min_dot_distance} x size apart after {_MAX_TRIES} tries; "
        "lower min_dot_distance or num_curves"
    )


def render_pathfinder(
    connected: bool,
    size: int,
    rng,
    num_curves: int = 2,
    colour_curves: bool = True,
    min_dot_distance: float = 0.5,
    palette: int = 2,
    dot_radius: float = 3.2,
    near: bool = False,
) -> np.ndarray:
    """One H x W x 3 uint8 image of a `pathfinder_layout`: dim curves, and the two dots as white rings
    around their curve's colour at full brightness."""
    curves, dots, owners = pathfinder_layout(
        connected, size, rng, num_curves, min_dot_distance, dot_radius, near
    )
    s = _SUPERSAMPLE
    background = rng.uniform(0, 40, 3)
    img = Image.new("RGB", (size * s, size * s), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(img)
    hues = _hues(rng, num_curves, palette) if colour_curves else [None] * num_curves
    curve_colours, dot_colours = [], []
    for i in range(num_curves):
        if colour_curves:  # a dim curve; its dots in the same hue at full brightness
            saturation = rng.uniform(0.7, 1.0)
            curve_colours.append(_rgb(colorsys.hsv_to_rgb(hues[i], saturation, rng.uniform(0.35, 0.55))))
            dot_colours.append(_rgb(colorsys.hsv_to_rgb(hues[i], saturation, 1.0)))
        else:
            grey = int(rng.uniform(150, 200))
            curve_colours.append((grey, grey, grey))
            dot_colours.append((grey, grey, grey))
    for i in rng.permutation(num_curves):  # which curve is on top at a crossing carries no class
        line = [tuple(p) for p in curves[i] * s]
        draw.line(line, fill=curve_colours[i], width=round(_CURVE_WIDTH * s), joint="curve")
    # A dot: a white ring (the mark) around its curve's hue at full brightness (what has to be
    # compared), so the mark and the colour fall in the same token after a stride-4 stem.
    for (x, y), owner in zip((d * s for d in dots), owners, strict=True):
        for radius, fill in ((dot_radius, (255, 255, 255)), (dot_radius - _RING_WIDTH, dot_colours[owner])):
            r = radius * s
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    pixels = np.asarray(img.reduce(s), dtype=np.float32)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(3, 10))
    return np.clip(pixels + noise, 0, 255).round().astype(np.uint8)


def _check_params(
    train_per_class, val_per_class, image_size, num_curves, min_dot_distance, palette, dot_radius
):
    if train_per_class < 1 or val_per_class < 1:
        raise DataError(
            f"pathfinder train_per_class={train_per_class}, val_per_class={val_per_class}: both must be >= 1"
        )
    if image_size < 16:
        raise DataError(f"pathfinder image_size={image_size} is too small for curves: use >= 16 (e.g. 48)")
    if not 2 <= num_curves <= 6:
        raise DataError(
            f"pathfinder num_curves={num_curves}: use 2..6 (two carry the dots, the rest distract)"
        )
    if palette and not num_curves <= palette <= 12:
        raise DataError(
            f"pathfinder palette={palette} with num_curves={num_curves}: every curve needs its own colour; "
            "use num_curves..12 colours, or 0 for random hues"
        )
    if not 2.0 <= dot_radius <= image_size / 8:
        raise DataError(f"pathfinder dot_radius={dot_radius} px: use 2..{image_size / 8:g} (image_size / 8)")
    if not 0 <= min_dot_distance <= 0.8:
        raise DataError(
            f"pathfinder min_dot_distance={min_dot_distance} (a fraction of the side): use 0..0.8"
        )


def generate_pathfinder_dataset(
    root,
    train_per_class=1000,
    val_per_class=200,
    image_size=48,
    num_curves=2,
    colour_curves=True,
    min_dot_distance=0.5,
    palette=2,
    dot_radius=3.2,
    near_fraction=0.0,
    seed=0,
) -> Path:
    """Write the pathfinder set to root/{train,val}/{disconnected,connected}/*.png; return root.

    `near_fraction` of the training images (none of the val images) have their dots side by side
    instead: a curriculum. The comparison is then learnable inside one window, by every mixer; the
    val set, all far pairs, asks which mixers carry it across the image. Deterministic (same
    arguments -> same bytes) and idempotent, as `generate_synthetic_dataset`.
    """
    if not 0 <= near_fraction < 1:
        raise DataError(f"pathfinder near_fraction={near_fraction}: use 0 <= near_fraction < 1")
    _check_params(
        train_per_class, val_per_class, image_size, num_curves, min_dot_distance, palette, dot_radius
    )
    params = dict(
        generator="pathfinder",
        generator_version=GENERATOR_VERSION,
        train_per_class=int(train_per_class),
        val_per_class=int(val_per_class),
        image_size=int(image_size),
        num_curves=int(num_curves),
        colour_curves=bool(colour_curves),
        min_dot_distance=float(min_dot_distance),
        palette=int(palette),
        dot_radius=float(dot_radius),
        near_fraction=float(near_fraction),
        seed=int(seed),
    )

    def render(rng, class_index, split):
        near = split == "train" and rng.random() < near_fraction
        return render_pathfinder(
            bool(class_index),
            image_size,
            rng,
            num_curves,
            bool(colour_curves),
            float(min_dot_distance),
            int(palette),
            float(dot_radius),
            near,
        )

    return write_generated_dataset(root, params, CLASS_NAMES, render, kind="pathfinder")
