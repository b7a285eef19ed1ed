"""Tests for the embedded long-range set (data/pathfinder.py): the label is what the picture says, and
nothing near one dot tells it."""

import colorsys
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import DataError, build_datasets, generate_pathfinder_dataset
from data.pathfinder import CLASS_NAMES

SIZE = 48


@pytest.fixture(scope="module")
def pathfinder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf") / "set"
    return generate_pathfinder_dataset(root, train_per_class=60, val_per_class=4, image_size=SIZE)


def _images(root, split="train"):
    out = []
    for label, name in enumerate(CLASS_NAMES):
        for path in sorted((root / split / name).glob("*.png")):
            out.append((np.asarray(Image.open(path).convert("RGB"), dtype=np.float32), label))
    return out


def _dots(img):
    """Centres of the two dots, found from the pixels alone: their white rings split by 2-means."""
    ys, xs = np.nonzero(img.min(axis=-1) > 230)
    pts = np.stack([ys, xs], 1).astype(np.float64)
    a = pts[0]
    b = pts[np.argmax(((pts - a) ** 2).sum(1))]
    for _ in range(5):
        near_a = ((pts - a) ** 2).sum(1) <= ((pts - b) ** 2).sum(1)
        a, b = pts[near_a].mean(0), pts[~near_a].mean(0)
    return a, b


def _hue(img, centre, inner, outer, min_saturation=0.45, min_value=0.45):
    """Circular-mean hue of the saturated pixels between radii `inner` and `outer` around `centre`
    (None if there are none)."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    dist = np.hypot(yy - centre[0], xx - centre[1])
    ring = img[(dist >= inner) & (dist <= outer)] / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in ring])
    keep = hsv[(hsv[:, 1] > min_saturation) & (hsv[:, 2] > min_value)]
    if not len(keep):
        return None
    angle = 2 * np.pi * keep[:, 0]
    return np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi) % 1.0


def _hue_gap(a, b):
    gap = abs(a - b)
    return min(gap, 1 - gap)


def test_layout_determinism_and_idempotence(tmp_path, pathfinder_root):
    args = dict(train_per_class=3, val_per_class=2, image_size=32, seed=3)

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(Path(root).rglob("*.png")):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    a = generate_pathfinder_dataset(tmp_path / "a", **args)
    assert digest(a) == digest(generate_pathfinder_dataset(tmp_path / "b", **args))
    assert digest(a) != digest(generate_pathfinder_dataset(tmp_path / "c", **{**args, "seed": 4}))
    assert generate_pathfinder_dataset(a, **args) == a  # complete: returns at once
    with pytest.raises(DataError, match="different parameters"):
        generate_pathfinder_dataset(a, **{**args, "min_dot_distance": 0.6})
    assert sorted(p.name for p in (pathfinder_root / "val").iterdir()) == sorted(CLASS_NAMES)
    assert Image.open(next((pathfinder_root / "val" / "connected").glob("*.png"))).size == (SIZE, SIZE)


@pytest.mark.parametrize("palette", [2, 0])
def test_label_matches_the_picture_and_dots_are_far_apart(pathfinder_root, tmp_path, palette):
    """Read back from the pixels alone, train and val: the two dots' cores have one hue iff
    `connected`, each core has the hue of the curve leaving its dot (read just outside the white
    ring), and the dots are at least min_dot_distance (0.5) x size apart in both classes."""
    root = pathfinder_root
    if palette == 0:  # random hues, three curves (one distractor)
        root = generate_pathfinder_dataset(
            tmp_path / "hues", train_per_class=30, val_per_class=1, image_size=SIZE, num_curves=3, palette=0
        )
    agree, core_is_curve = [], []
    for img, label in _images(root) + _images(root, "val"):  # both splits: val's labels are scored
        a, b = _dots(img)
        assert np.hypot(*(a - b)) >= 0.5 * SIZE - 1.5
        cores = [_hue(img, c, 0, 1.8, min_saturation=0.2) for c in (a, b)]  # blurred by the ring
        agree.append((_hue_gap(*cores) < 0.06) == bool(label))
        for centre, core in zip((a, b), cores, strict=True):
            curve = _hue(img, centre, 3.6, 5.0, min_value=0.25)  # curves are dim
            if curve is not None:
                core_is_curve.append(_hue_gap(core, curve) < 0.06)
    assert np.mean(agree) > 0.95, np.mean(agree)
    assert len(core_is_curve) > 30 and np.mean(core_is_curve) > 0.9, np.mean(core_is_curve)


def test_one_dot_neighbourhood_does_not_tell_the_class(pathfinder_root):
    """A nearest-centroid classifier on what a local window around one dot sees (its 11x11 patch) or
    on the whole image's colour statistics stays at chance, while the two-dot hue comparison above
    decides the class: the task needs both dots at once."""
    data = _images(pathfinder_root)
    rng = np.random.default_rng(0)
    rng.shuffle(data)
    features, labels = [], []
    for img, label in data:
        a, b = _dots(img)
        y, x = np.clip(np.round(a if rng.random() < 0.5 else b).astype(int), 5, SIZE - 6)
        patch = img[y - 5 : y + 6, x - 5 : x + 6]
        features.append(
            np.concatenate([patch.mean((0, 1)), patch.std((0, 1)), img.mean((0, 1)), img.std((0, 1))])
        )
        labels.append(label)
    x, y = np.array(features), np.array(labels)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    half = len(x) // 2
    centroids = np.stack([x[:half][y[:half] == c].mean(0) for c in (0, 1)])
    pred = np.argmin(((x[half:, None] - centroids[None]) ** 2).sum(-1), 1)
    # 60 held-out images: one standard error at chance is 6.5 %; 0.72 is > 3 sigma above chance.
    assert np.mean(pred == y[half:]) < 0.72


def test_build_datasets_pathfinder_and_errors(tmp_path):
    bundle = build_datasets(
        dict(
            dataset="pathfinder",
            root=str(tmp_path / "pf"),
            pathfinder=dict(train_per_class=2, val_per_class=1),
        )
    )
    assert bundle.classes == sorted(CLASS_NAMES) and len(bundle.train) == 4 and len(bundle.val) == 2
    assert bundle.selection["pathfinder"]["image_size"] == 48
    with pytest.raises(DataError, match="unknown key 'num_curve'.*'num_curves'"):
        build_datasets(dict(dataset="pathfinder", root=str(tmp_path / "x"), pathfinder=dict(num_curve=2)))
    with pytest.raises(DataError, match="num_curves=9"):
        generate_pathfinder_dataset(tmp_path / "y", num_curves=9)
    with pytest.raises(DataError, match="palette=2 with num_curves=3"):
        generate_pathfinder_dataset(tmp_path / "p", num_curves=3)
    with pytest.raises(DataError, match="dot_radius=9.0 px: use 2..6"):
        generate_pathfinder_dataset(tmp_path / "r", dot_radius=9.0)
    with pytest.raises(DataError, match="min_dot_distance=0.95"):
        generate_pathfinder_dataset(tmp_path / "z", min_dot_distance=0.95)


def test_near_fraction_is_a_training_curriculum_only(tmp_path):
    """near_fraction puts that share of the training pairs side by side (edges 1-6 px apart, read from
    the pixels), and none of the val pairs: val always asks for the long-range comparison."""
    root = generate_pathfinder_dataset(
        tmp_path / "near", train_per_class=30, val_per_class=15, image_size=SIZE, near_fraction=0.5
    )

    def distances(split):
        return np.array([np.hypot(*np.subtract(*_dots(img))) for img, _ in _images(root, split)])

    train, val = distances("train"), distances("val")
    near = train < 0.5 * SIZE - 1.5
    assert 0.3 < near.mean() < 0.7
    assert np.all(train[near] <= 2 * 3.2 + 6.0 + 1.5)
    assert np.all(val >= 0.5 * SIZE - 1.5)


def test_far_layouts_give_every_curve_the_dot_span():
    """Far pairs: every curve's ends are >= the dot distance apart in both classes, so the curve a
    connected pair sits on is no straighter than the curves of a disconnected pair (a local cue a
    rejection on the pair alone would leave). Near pairs (training curriculum) have no such bound."""
    from data.pathfinder import pathfinder_layout

    size, fraction = 64, 0.65
    spans = {True: [], False: []}
    for i in range(120):
        connected = bool(i % 2)
        curves, dots, owners = pathfinder_layout(
            connected, size, np.random.default_rng(i), min_dot_distance=fraction, dot_radius=5.0
        )
        assert np.hypot(*(dots[0] - dots[1])) >= fraction * size
        curve_spans = [np.hypot(*(c[0] - c[-1])) for c in curves]
        assert min(curve_spans) >= fraction * size
        spans[connected] += [curve_spans[o] for o in set(owners)]
    # same span distribution for the dot-carrying curves: a few px at most between the class means
    assert abs(np.mean(spans[True]) - np.mean(spans[False])) < 2.5, {k: np.mean(v) for k, v in spans.items()}
    near_spans = [
        np.hypot(*(c[0] - c[-1]))
        for i in range(20)
        for c in pathfinder_layout(True, size, np.random.default_rng(i), dot_radius=5.0, near=True)[0][:1]
    ]
    assert min(near_spans) < 2 * 5.0 + 6.0 + 1e-6  # a near connected pair: its curve's ends touch
