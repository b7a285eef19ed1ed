"""Dense prediction: the embedded task and its readers, the FPN adapter under torchvision's detectors,
the metrics against hand-computed / pycocotools references, and scripts/dense.py end to end."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_train import load_entry_point

import models  # noqa: F401  (registers nat_*/dinat_* with timm)
from configs import ConfigError
from data import DataError
from data.dense import CocoInstances, SemanticFolder, embedded_paths, generate_dense_dataset
from engine import dense_config, dense_eval
from engine.errors import CheckpointError

DEMO_NAT = dict(embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], mlp_ratio=3.0, kernel_size=[7, 3, 3])


def classification_checkpoint(path, randomise: bool = False):
    """A train.py-style checkpoint of the demo NAT (10 classes) at `path`; the classifier it holds.
    `randomise`: every weight drawn anew, norms included, so none equals a fresh init."""
    import timm

    torch.manual_seed(0)
    classifier = timm.create_model("nat_mini", num_classes=10, **DEMO_NAT)
    if randomise:
        with torch.no_grad():
            for p in classifier.parameters():
                p.normal_()
    ckpt = {
        "arch": "nat_mini",
        "model_kwargs": DEMO_NAT,
        "num_classes": 10,
        "state_dict": classifier.state_dict(),
    }
    torch.save(ckpt, path)
    return classifier


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_dense_dataset(
        tmp_path_factory.mktemp("dense") / "d", train_images=6, val_images=4, image_size=48
    )


def test_embedded_task_coco_and_semantic_layouts_agree(scenes, tmp_path):
    paths = embedded_paths(scenes, "val")
    coco = CocoInstances(paths["image_dir"], paths["ann_file"])
    semantic = SemanticFolder(paths["image_dir"], paths["mask_dir"], num_classes=5)
    assert len(coco) == len(semantic) == 4 and not coco.skipped and not semantic.skipped
    for i in range(4):
        image, target = coco[i]
        image2, mask = semantic[i]
        assert torch.equal(image, image2) and image.shape == (3, 48, 48)
        assert 2 <= len(target["labels"]) <= 4
        rebuilt = torch.zeros(48, 48, dtype=torch.int64)
        for m, label, box in zip(target["masks"], target["labels"], target["boxes"], strict=True):
            assert not (rebuilt[m.bool()] > 0).any()  # instances never overlap
            rebuilt[m.bool()] = label
            ys, xs = torch.nonzero(m, as_tuple=True)  # the box is the mask's extent (pixel edges)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert torch.equal(rebuilt, mask)
    # deterministic: the same parameters write the same bytes
    again = generate_dense_dataset(tmp_path / "again", train_images=6, val_images=4, image_size=48)
    for rel in (
        "images/validation/00003.png",
        "annotations/instances_val.json",
        "annotations/training/00005.png",
    ):
        assert (again / rel).read_bytes() == (scenes / rel).read_bytes()


def _coco_folder(tmp_path, annotations, size=(40, 30)):
    w, h = size
    (tmp_path / "img").mkdir()
    Image.new("RGB", (w, h)).save(tmp_path / "img" / "a.png")
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
        "categories": [{"id": 3, "name": "disk"}, {"id": 7, "name": "star"}],
        "annotations": [dict(a, id=i + 1, image_id=1) for i, a in enumerate(annotations)],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return tmp_path / "img", tmp_path / "ann.json"


def test_bad_annotations_are_skipped_and_counted_broken_folders_are_one_error(tmp_path):
    poly = [[5, 5, 15, 5, 15, 12, 5, 12]]
    good = {"category_id": 7, "bbox": [5, 5, 10, 7], "segmentation": poly, "iscrowd": 0}
    bad = [
        dict(good, category_id=99),  # unknown category
        dict(good, bbox=[5, 5, 0, 7]),  # empty box
        dict(good, bbox=[50, 5, 4, 4]),  # outside the 40 x 30 image
        dict(good, segmentation={"size": [10, 10], "counts": "a"}),  # mask of another size
    ]
    ds = CocoInstances(*_coco_folder(tmp_path, [good, *bad]))
    assert dict(ds.skipped) == {
        "unknown category": 1,
        "empty or degenerate box": 1,
        "box outside its image": 1,
        "mask size mismatch": 1,
    }
    assert "skipped 4 annotations" in ds.skipped_line()
    _, target = ds[0]
    assert target["labels"].tolist() == [2]  # category 7 is the second category: label 2
    assert target["boxes"].tolist() == [[5, 5, 15, 12]] and target["masks"].shape == (1, 30, 40)
    (tmp_path / "img" / "a.png").unlink()
    with pytest.raises(DataError, match="image 'a.png' .* not found"):
        CocoInstances(tmp_path / "img", tmp_path / "ann.json")
    # semantic folders: a mask of another size, an image without a mask
    img, masks = tmp_path / "s" / "images", tmp_path / "s" / "annotations"
    img.mkdir(parents=True)
    masks.mkdir(parents=True)
    for name, msize in (("ok", (8, 8)), ("wrong", (4, 8)), ("nomask", None)):
        Image.new("RGB", (8, 8)).save(img / f"{name}.png")
        if msize:
            Image.fromarray(np.full(msize[::-1], 9, dtype=np.uint8)).save(masks / f"{name}.png")
    seg = SemanticFolder(img, masks, num_classes=5)
    assert len(seg) == 1 and dict(seg.skipped) == {"mask size mismatch": 1, "image without mask": 1}
    assert (seg[0][1] == 255).all()  # value 9 >= 5 classes: ignored pixels
    with pytest.raises(DataError, match="no image"):
        SemanticFolder(img, tmp_path / "none", num_classes=5)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(masks / "ok.png")  # a colour-coded mask, not class indices
    with pytest.raises(DataError, match="is a RGB image; masks hold one class index per pixel"):
        SemanticFolder(img, masks, num_classes=5)
    # a detector's label without a category (FCOS's never-trained label 0) is not a COCO result
    boxes = torch.tensor([[1.0, 2, 5, 6]] * 2)
    out = {"boxes": boxes, "labels": torch.tensor([0, 2]), "scores": torch.ones(2)}
    assert [r["category_id"] for r in dense_eval.detections_to_coco(out, 1, ds.label_to_category)] == [7]


COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


def quadrant_folder(root, sizes):
    """images/ and annotations/ of `sizes` ((width, height) each): quadrant k of an image is class k,
    painted COLOURS[k], so a pixel's colour says its label."""
    img, masks = root / "images", root / "annotations"
    img.mkdir(parents=True)
    masks.mkdir(parents=True)
    for n, (width, height) in enumerate(sizes):
        label = np.zeros((height, width), dtype=np.uint8)
        label[: height // 2, width // 2 :], label[height // 2 :, : width // 2] = 1, 2
        label[height // 2 :, width // 2 :] = 3
        Image.fromarray(COLOURS[label]).save(img / f"{n}.png")
        Image.fromarray(label).save(masks / f"{n}.png")
    return img, masks


def test_semantic_folder_keeps_aspect_ratios_crops_for_training_and_scores_at_mask_size(
    tmp_path, monkeypatch
):
    """mmseg's ADE20K pipelines: training rescales the shorter side by a random factor and crops a
    square (padded, ignored, where the image is smaller); validation rescales the shorter side and keeps
    the mask at its own resolution. Square resizing used to stretch every non-square image."""
    img, masks = quadrant_folder(tmp_path, [(90, 40), (30, 70), (400, 50)])
    train = SemanticFolder(img, masks, 4, size=32, hflip=True, scale_range=(0.5, 2.0))
    palette = torch.from_numpy(COLOURS).float() / 255
    torch.manual_seed(0)
    for _ in range(4):
        for i in range(3):
            image, target = train[i]
            assert image.shape == (3, 32, 32) and target.shape == (32, 32)
            labelled = target != 255
            colour_class = torch.cdist(image.permute(1, 2, 0).flatten(0, 1), palette).argmin(1).view(32, 32)
            # the image's crop is the mask's crop (bilinear blends only the quadrants' borders)
            assert (colour_class == target)[labelled].float().mean() > 0.85
            assert (image[:, ~labelled] == 0).all()  # padding: black pixels, ignored labels
    _, target = train[2]  # 400 x 50 at shorter side <= 64: longer side capped at 4x -> at most 16 rows
    assert (target[16:] == 255).all() and (target[:16] != 255).any()
    val = SemanticFolder(img, masks, 4, size=32)
    for i, (width, height) in enumerate([(90, 40), (30, 70), (400, 50)]):
        image, target = val[i]
        assert target.shape == (height, width)  # the annotation's own resolution
        short, long = sorted(image.shape[1:])
        assert short == 32 or long == 128  # the shorter side at size, the longer capped at 4x
        assert abs(image.shape[2] / image.shape[1] - width / height) < 0.1 * width / height

    class ColourSegmenter(torch.nn.Module):  # logits that name each pixel's quadrant by its colour
        def forward(self, x):
            return (
                -torch.cdist(
                    x.permute(0, 2, 3, 1).flatten(1, 2), torch.from_numpy(COLOURS).float()[None] / 255
                )
                .unflatten(1, x.shape[2:])
                .permute(0, 3, 1, 2)
            )

    loader = torch.utils.data.DataLoader(val, 3, collate_fn=dense_config.collate)
    metrics = dense_eval.evaluate(ColourSegmenter(), loader, "segmentation", val, 4)
    assert metrics["mIoU"] > 95 and metrics["pixel_acc"] > 98
    seen = []
    original = dense_eval.confusion_matrix
    monkeypatch.setattr(
        dense_eval,
        "confusion_matrix",
        lambda pred, target, n: seen.append(target.numel()) or original(pred, target, n),
    )
    dense_eval.evaluate(ColourSegmenter(), loader, "segmentation", val, 4)
    assert seen == [90 * 40, 30 * 70, 400 * 50]  # every annotated pixel scored, none resampled


def test_flip_test_time_augmentation_makes_predictions_mirror_equivariant():
    """--flip averages each input with its mirror image: the class map of a mirrored image is then the
    mirror of the image's, for any model (a random convolution here is not, alone); more scales keep
    that, and one scale without flip is the plain argmax at the mask's size."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # logits at the input's size
        torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 5, padding=2)
    )
    image = torch.rand(3, 24, 36)
    size = (48, 72)
    mirrored = image.flip(-1)

    def predict(x, **kw):
        return dense_eval.segment(model, [x], [size], **kw)[0]

    plain = predict(image)
    want = torch.nn.functional.interpolate(model(image[None]), size=size, mode="bilinear").argmax(1)[0]
    assert torch.equal(plain, want)
    assert not torch.equal(predict(mirrored), plain.flip(-1))  # the model alone is not equivariant
    for scales in [(1.0,), (0.5, 1.0, 1.5)]:
        assert torch.equal(
            predict(mirrored, scales=scales, flip=True), predict(image, scales=scales, flip=True).flip(-1)
        )


def test_semantic_folder_at_its_own_size_draws_nothing_and_returns_the_files(scenes):
    """The embedded task's square images at `size`: no rescale, no crop and no random draw (its
    documented runs stay as they were)."""
    paths = embedded_paths(scenes, "train")
    ds = SemanticFolder(paths["image_dir"], paths["mask_dir"], 5, size=48, scale_range=(1.0, 1.0))
    state = torch.get_rng_state()
    image, target = ds[0]
    assert torch.equal(torch.get_rng_state(), state)
    path, mask_path = ds.pairs[0]
    assert torch.equal(
        image, torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
    )
    assert torch.equal(target, torch.from_numpy(np.array(Image.open(mask_path), dtype=np.int64)))


@pytest.mark.parametrize("bad", ["[2.0, 0.5]", "[0, 1]", "[1.0]", "[a, b]"])
def test_bad_scale_range_is_one_config_error(bad):
    with pytest.raises(ConfigError, match="'data.scale_range' must be \\[low, high\\]|must be list"):
        dense_config.load_dense_config(overrides=[f"data.scale_range={bad}"])


def test_ade20k_recipe_loads_builds_nat_tiny_upernet_and_names_the_missing_data(tmp_path):
    """configs/dense_ade20k.yaml: the official UPerNet recipe's numbers, a 150-class NAT-T UPerNet
    with a 512-channel decoder, and without the data set one error naming the folder to unpack."""
    cfg = dense_config.load_dense_config(["dense_ade20k.yaml"], [f"data.root={tmp_path / 'ADE'}"])
    d = cfg["data"]
    assert (d["img_size"], d["scale_range"], d["num_classes"], d["reduce_zero_label"]) == (
        512,
        [0.5, 2.0],
        150,
        True,
    )
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["train"]["batch_size"]) == (6e-5, 0.01, 16)
    with pytest.raises(DataError, match="image folder .*ADE/images/training not found"):
        dense_config.build_data(cfg, "segmentation")
    model, name = dense_config.build_model(cfg, "segmentation", 150)
    assert name == "nat_tiny" and model.segmentation_head[0].out_channels == 150
    params = sum(p.numel() for p in model.parameters())
    assert 55e6 < params < 70e6, params  # NAT-T 28M + UPerNet-512 (the paper: 58M with its FCN head)


def test_real_folders_broken_in_ways_a_run_met_are_one_error(tmp_path):
    """From a user's folders: train and val COCO files with other category lists (labels are numbered
    from each file's own list: a model trained on one was scored against the other, silently), a val
    file without annotations (pycocotools' 'no data' made AP -100), a damaged image in a semantic
    folder (an OSError traceback), and a real folder under the embedded layout (told to delete it)."""
    poly = [[5, 5, 15, 5, 15, 12, 5, 12]]
    ann = {"category_id": 3, "bbox": [5, 5, 10, 7], "segmentation": poly, "iscrowd": 0}
    root = tmp_path / "coco"
    for split, categories in (("train", [3, 7, 12]), ("val", [3, 12, 15])):
        (tmp_path / split).mkdir()
        folder, ann_file = _coco_folder(tmp_path / split, [ann])
        raw = json.loads(ann_file.read_text())
        raw["categories"] = [{"id": c, "name": f"c{c}"} for c in categories]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(raw))
        shutil.copytree(folder, root / "images" / ("training" if split == "train" else "validation"))
    overrides = ["data.layout=folders", f"data.root={root}"]
    cfg = dense_config.load_dense_config([], overrides)
    with pytest.raises(
        DataError, match=r"list different categories \(ids only in train: \[7\], only in val: \[15\]\)"
    ):
        dense_config.build_data(cfg, "detection")
    raw["annotations"] = []
    (root / "annotations" / "instances_val.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="instances_val.json has no annotations"):
        dense_config.build_data(cfg, "detection")
    # a semantic folder with a damaged image: its header when scanned, its body when read
    img, masks = quadrant_folder(tmp_path / "seg", [(40, 30), (30, 40)])
    (img / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 12)
    with pytest.raises(DataError, match="cannot read 0.png or its mask"):
        SemanticFolder(img, masks, 4)
    Image.new("RGB", (40, 30)).save(img / "0.png")
    ds = SemanticFolder(img, masks, 4)
    (img / "1.png").write_bytes((img / "1.png").read_bytes()[:60])  # the header kept, the pixels cut
    with pytest.raises(DataError, match="cannot read .*1.png or its mask"):
        ds[1]
    with pytest.raises(DataError, match="set data.layout=folders"):  # the embedded layout on a real folder
        dense_config.build_data(dense_config.load_dense_config([], [f"data.root={root}"]), "detection")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "R", "--set", "sched.epochs=5"], "--resume takes a run as it was configured; --set"),
        (["--evaluate", "R", "--draw", "R"], "--draw and --evaluate: give one of them"),
        (["--draw", "R", "--flip"], "--scales and --flip go with --evaluate"),
        (["--evaluate", "R", "--scales", "0.01"], "--scales must be between 0.25 and 4"),
        (["--task", "segmentation", "--speed-rounds", "2"], "--speed-rounds goes with --report"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(args, message, capsys):
    """--resume ignored --set (sched.epochs=5 trained the run's 3 epochs and said done); --scales with
    a training run, --evaluate with --draw: one of them silently did nothing."""
    with pytest.raises(SystemExit) as exit_info:
        load_entry_point("scripts/dense.py").main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_crowd_regions_are_ignored_when_scored_and_missing_coco_fields_are_filled(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "img" / "a.png")
    square = [[5, 5, 20, 5, 20, 20, 5, 20]]
    crowd = [[30, 30, 60, 30, 60, 60, 30, 60]]
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [  # the first without iscrowd, area or id, which pycocotools needs
            {"image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15], "segmentation": square},
            {
                "id": 9,
                "image_id": 1,
                "category_id": 1,
                "bbox": [30, 30, 30, 30],
                "segmentation": crowd,
                "iscrowd": 1,
                "area": 900.0,
            },
        ],  # fmt: skip
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoInstances(tmp_path / "img", tmp_path / "ann.json")
    _, target = ds[0]
    assert target["boxes"].tolist() == [[5, 5, 20, 20]] and target["masks"].shape == (1, 64, 64)  # no crowd
    person, region = ds.coco_gt["annotations"]
    assert (person["iscrowd"], person["id"], region["iscrowd"]) == (0, 10, 1)
    assert person["area"] == pytest.approx(225, rel=0.1)
    # COCO's rule: a detection on a crowd region is neither a hit nor a false positive
    hit = {"image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15], "score": 0.6}
    on_crowd = dict(hit, bbox=[30, 30, 30, 30], score=0.9)
    assert dense_eval.coco_ap(ds.coco_gt, [hit, on_crowd], "bbox")["AP"] == pytest.approx(100)
    assert (
        dense_eval.coco_ap(ds.coco_gt, [dict(hit, score=0.3), dict(hit, bbox=[40, 5, 15, 15])], "bbox")["AP"]
        < 100
    )  # a detection on plain background still counts against it


def test_box_only_annotations_serve_a_box_detector_and_are_one_error_for_masks(tmp_path):
    box = {"category_id": 3, "bbox": [5, 5, 10, 7], "iscrowd": 0}
    paths = _coco_folder(tmp_path, [box, dict(box, bbox=[20, 10, 8, 8])])
    _, target = CocoInstances(*paths, masks=False)[0]
    assert target["boxes"].tolist() == [[5, 5, 15, 12], [20, 10, 28, 18]] and "masks" not in target
    with pytest.raises(DataError, match=r"every annotation of .* was skipped.*2 no mask"):
        CocoInstances(*paths)


def test_coco_ap_of_ground_truth_is_100_and_a_missed_object_lowers_it(scenes):
    paths = embedded_paths(scenes, "val")
    ds = CocoInstances(paths["image_dir"], paths["ann_file"])
    gt = ds.coco_gt
    as_results = [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 1.0}
        for a in gt["annotations"]
    ]
    for iou_type in ("bbox", "segm"):
        assert dense_eval.coco_ap(gt, as_results, iou_type) == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    # drop one object: its category's recall stops short of 1, the other categories stay at 100
    categories = {a["category_id"] for a in gt["annotations"]}
    ap = dense_eval.coco_ap(gt, as_results[1:], "bbox")["AP50"]
    assert 100 * (len(categories) - 1) / len(categories) < ap < 100


def test_miou_matches_a_hand_computation():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2], [2, 0, 0, 1]])
    conf = dense_eval.confusion_matrix(pred, target, num_classes=4)
    # class 0: 3 hits, true 4, predicted 4 -> 3/5; class 1: 3 hits, true 4, pred 4 -> 3/5;
    # class 2: 1 hit, true 2, pred 2 -> 1/3; class 3 absent everywhere -> left out of the mean
    assert conf.sum() == 10
    mean, per_class = dense_eval.miou(conf)
    assert per_class[:3] == pytest.approx([3 / 5, 3 / 5, 1 / 3]) and np.isnan(per_class[3])
    assert mean == pytest.approx(100 * (3 / 5 + 3 / 5 + 1 / 3) / 3)


@pytest.mark.parametrize(
    "name, kwargs, pad",
    [
        ("nat_mini", DEMO_NAT, 1),
        ("dinat_mini", dict(DEMO_NAT, dilations=[[1, 2], [1, 2], [1, 1]]), 1),
        ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, embed_dim=32, depths=[2, 2, 2],
                                              num_heads=[2, 4, 8], strict_img_size=False), 16),
        ("convnext_atto", dict(dims=[32, 64, 128, 256], depths=[2, 2, 2, 0]), 1),
    ],
)  # fmt: skip
def test_fpn_adapter_feeds_mask_rcnn_and_fcos_at_a_non_square_size(name, kwargs, pad):
    import timm

    from models.dense import HeadSizes, TimmFPN, fcos, mask_rcnn

    torch.manual_seed(0)
    body = timm.create_model(name, features_only=True, out_indices=(0, 1, 2), **kwargs)
    fpn = TimmFPN(body, 32, "pool", pad)
    x = torch.randn(1, 3, 72, 52)  # not a multiple of 32, not square
    maps = fpn.eval()(x)  # eval: no drop path, so the reference below sees the same body
    assert list(maps) == ["0", "1", "2", "pool"] and fpn.out_channels == 32
    feats = body(torch.nn.functional.pad(x, (0, -52 % pad, 0, -72 % pad)))  # zeros on the bottom / right
    feats = [f.permute(0, 3, 1, 2) if fpn.nhwc else f for f in feats]  # Swin's maps are NHWC
    want = fpn.fpn(OrderedDict((str(i), f.contiguous()) for i, f in enumerate(feats)))
    for level in want:  # the values, not only the shapes: padding on another side moves every map
        torch.testing.assert_close(maps[level], want[level])
    fpn.train()
    images = [torch.rand(3, 72, 52), torch.rand(3, 72, 52)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
         "masks": torch.zeros(1, 72, 52, dtype=torch.uint8)} for _ in images
    ]  # fmt: skip
    for build, extra in ((mask_rcnn, "pool"), (fcos, "p6p7")):
        classes = 3  # background / unused 0 + two classes: the label-1 target is class 1
        model = build(
            TimmFPN(body, 32, extra, pad),
            classes,
            HeadSizes(fpn_channels=32),
            (72, 72),
            [0.5] * 3,
            [0.25] * 3,
        )
        losses = model(images, targets)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        model.eval()
        with torch.no_grad():
            out = model([images[0]])[0]
        assert (out["boxes"][:, 2] <= 52).all() and (out["boxes"][:, 3] <= 72).all()


def test_pretrained_backbone_carries_the_classification_weights(tmp_path):
    classifier = classification_checkpoint(tmp_path / "c.pth.tar")
    cfg = dense_config.load_dense_config(
        [], [f"backbone.checkpoint={tmp_path / 'c.pth.tar'}", "backbone.drop_path_rate=0"]
    )
    body, name, kwargs, levels = dense_config.build_backbone(cfg["backbone"])
    assert name == "nat_mini" and levels == [0, 1, 2] and kwargs["depths"] == [2, 2, 2]
    reference = dict(classifier.named_parameters())
    params = dict(body.named_parameters())
    assert len(params) == len(reference) - 4  # everything but the classifier's norm and head
    for key, value in params.items():
        assert torch.equal(value, reference[key.removeprefix("model.")]), key
    # weights of another width: one CheckpointError line
    cfg["backbone"]["kwargs"] = {"embed_dim": 48}
    with pytest.raises(CheckpointError, match="does not fit backbone 'nat_mini'"):
        dense_config.build_backbone(cfg["backbone"])


def test_a_checkpoint_that_cannot_serve_the_backbone_says_why(tmp_path):
    """--pretrained with a dense run (not a classification one), or a NAT checkpoint under another
    family: the error names the checkpoint's part, not the user's backbone.kwargs."""
    classification_checkpoint(tmp_path / "c.pth.tar")
    other = ["backbone.name=convnext_atto", f"backbone.checkpoint={tmp_path / 'c.pth.tar'}"]
    match = "holds nat_mini weights, whose model kwargs backbone 'convnext_atto' rejects .* nat_mini or"
    with pytest.raises(CheckpointError, match=match):
        dense_config.build_backbone(dense_config.load_dense_config([], other)["backbone"])
    torch.save({"task": "detection", "state_dict": {}, "config": {}}, tmp_path / "dense.pth.tar")
    dense_run = [f"backbone.checkpoint={tmp_path / 'dense.pth.tar'}"]
    with pytest.raises(CheckpointError, match="is a detection run of scripts/dense.py, not a classification"):
        dense_config.build_backbone(dense_config.load_dense_config([], dense_run)["backbone"])


def test_backbone_settings_reach_the_model_in_their_documented_order(tmp_path):
    from engine.dense import _backbone_overrides, _optimizer

    tiny = "backbone.kwargs={embed_dim: 16, depths: [1, 1, 2], num_heads: [1, 1, 1], kernel_size: [3, 3, 3]}"
    # backbone.drop_path_rate applies unless backbone.kwargs names its own
    cfg = dense_config.load_dense_config([], [tiny, "backbone.kwargs.drop_path_rate=0.5"])
    body, _, kwargs, _ = dense_config.build_backbone(cfg["backbone"])
    assert kwargs["drop_path_rate"] == 0.5 and body.model.stages[2].blocks[1].drop_path1.drop_prob == 0.5
    assert (
        dense_config.load_dense_config([], ["backbone.drop_path_rate=null"])["backbone"]["drop_path_rate"]
        is None
    )
    # no weight decay on the backbone's relative position tables wherever the detector / segmenter
    # puts them: NAT's RPB, and Swin's, whose features_only wrapper renames them and drops the method
    swin = "backbone.kwargs={img_size: 64, window_size: 4, embed_dim: 16, depths: [1, 1, 1], "
    swin += "num_heads: [1, 1, 1], strict_img_size: false}"
    for task, backbone, table in [
        *((task, ["backbone.name=nat_mini", tiny], ".rpb") for task in dense_config.TASKS),
        ("detection", ["backbone.name=swin_tiny_patch4_window7_224", swin], ".relative_position_bias_table"),
    ]:
        model, _ = dense_config.build_model(dense_config.load_dense_config([], backbone), task, 3)
        names = {id(p): n for n, p in model.named_parameters()}
        decay = {
            g["weight_decay"]: [names[id(p)] for p in g["params"]]
            for g in _optimizer(model, cfg).param_groups
        }
        tables = [n for n in names.values() if n.endswith(table)]
        assert tables and set(tables) <= set(decay[0.0]), (backbone, tables)
        assert any(n.endswith("attn.qkv.weight") for n in decay[0.05])
    # --pretrained keeps the config files' kwargs for the model they configure, drops them for another
    classification_checkpoint(tmp_path / "c.pth.tar")  # arch nat_mini
    same = {"name": "nat_mini", "model_config": None}
    assert "backbone.kwargs={}" not in _backbone_overrides(None, str(tmp_path / "c.pth.tar"), same)
    assert "backbone.kwargs={}" in _backbone_overrides(
        None, str(tmp_path / "c.pth.tar"), dict(same, name="swin_tiny_patch4_window7_224")
    )
    # segmentation: any H x W in (padded to smp's output stride and cropped back); out_indices refused
    seg, _ = dense_config.build_model(dense_config.load_dense_config([], [tiny]), "segmentation", 3)
    seg = dense_config.Normalise(seg, [0.5] * 3, [0.25] * 3).eval()
    assert seg(torch.rand(1, 3, 72, 50)).shape == (1, 3, 72, 50)
    with pytest.raises(ConfigError, match="out_indices is for detection"):
        dense_config.build_model(
            dense_config.load_dense_config([], [tiny, "backbone.out_indices=[0, 2]"]), "segmentation", 3
        )


def test_config_unknown_key_names_the_nearest(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'detection.box_heads'.*did you mean 'detection.box_head'"):
        dense_config.load_dense_config([], ["detection.box_heads=128"])
    with pytest.raises(ConfigError, match="must be one of"):
        dense_config.load_dense_config([], ["detection.detector=yolo"])
    script = load_entry_point("scripts/dense.py")
    assert script.main(["--task", "detection", "--set", "optim.lrr=1", f"train.output={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'optim.lrr'") and len(err.strip().splitlines()) == 1


def test_a_segmenters_flops_are_counted_at_a_size_off_its_output_stride():
    """At 50 px (not a multiple of smp's output stride 32) the segmenter runs on the input padded to
    64 px (Normalise): its FLOPs, and its backbone's, are counted as they run, those of 64 px."""
    from engine.dense import _count_flops

    tiny = "backbone.kwargs={embed_dim: 16, depths: [1, 1, 2], num_heads: [1, 1, 1], kernel_size: [3, 3, 3]}"
    seg, _ = dense_config.build_model(dense_config.load_dense_config([], [tiny]), "segmentation", 3)
    seg = dense_config.Normalise(seg, [0.5] * 3, [0.25] * 3)
    at_50, at_64 = _count_flops(seg, "segmentation", 50), _count_flops(seg, "segmentation", 64)
    assert at_50 == at_64 and at_50["flops"] > at_50["backbone_flops"] > 0


def test_drawn_boxes_sit_on_their_objects_in_a_non_square_image(tmp_path, monkeypatch):
    """--draw on a 20 x 36 image (a COCO folder's are rarely square): each panel keeps the image's
    shape, and the truth's and prediction's box outlines are drawn where the object is."""
    height, width, box, scale = 20, 36, [22, 4, 30, 12], 4
    mask = torch.zeros(1, height, width, dtype=torch.uint8)
    mask[0, box[1] : box[3], box[0] : box[2]] = 1
    truth = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1]), "masks": mask}
    found = dict(truth, scores=torch.tensor([0.9]), masks=mask[None].float())
    run = (lambda images: [found], {}, "detection", [(torch.zeros(3, height, width), truth)], ["thing"])
    monkeypatch.setattr(dense_eval, "_load_run", lambda run_dir: run)
    png = np.asarray(Image.open(dense_eval.draw_predictions(tmp_path, count=1)))
    assert png.shape == (height * scale, 3 * width * scale, 3)
    outline = (230, 25, 75)  # class 1's colour
    for panel in (1, 2):  # image | truth | prediction
        left = panel * width * scale
        corners = [(box[1] * scale, left + box[0] * scale), (box[3] * scale, left + box[2] * scale)]
        assert [tuple(png[y, x]) for y, x in corners] == [outline, outline], panel


def test_a_failed_start_is_one_error_line_and_leaves_no_run_folder(tmp_path, capsys):
    """A wrong model name fails before any data is generated; feature levels out of range, repeated
    or out of order are one error line (not an assertion from timm or torchvision's anchors); a start
    that failed leaves no run folder; a backbone.model_config's model names the folder and config.yaml."""
    script = load_entry_point("scripts/dense.py")
    runs, data = tmp_path / "runs", tmp_path / "data"
    args = ["--task", "detection", "--quick", "--set", f"train.output={runs}", f"data.root={data}"]
    assert script.main([*args[:2], "--backbone", "nat_minii", *args[2:]]) == 2
    assert "unknown model 'nat_minii'; did you mean 'nat_mini'" in capsys.readouterr().err
    assert not data.exists() and not runs.exists()
    for levels in ("[4]", "[-5]", "[0, 0]", "[2, 1]"):
        assert script.main([*args, f"backbone.out_indices={levels}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'nat_mini' has 4 stages; give distinct stage indices in 0..3" in err[0], err
    assert data.is_dir() and list(runs.iterdir()) == []
    assert (
        script.main([*args, "backbone.out_indices=[-3, -1]", "sched.epochs=1", "train.experiment=neg"]) == 0
    )
    assert torch.load(runs / "neg" / "last.pth.tar", weights_only=True)["history"]  # timm's negative indices
    swin = "backbone.kwargs={img_size: 64, strict_img_size: false, window_size: 4, embed_dim: 16, "
    swin += "depths: [1, 1], num_heads: [1, 1]}"
    model_config = ["--backbone", "configs/demo_swin.yaml", *args, swin, "backbone.pad_multiple=8"]
    assert script.main([*model_config, "sched.epochs=1"]) == 0
    (folder,) = runs.glob("*-detection-swin_tiny_patch4_window7_224")
    assert yaml.safe_load((folder / "config.yaml").read_text())["backbone"]["name"] == folder.name[26:]


# ~10 s (detection) and ~3 s (segmentation) on the quiet 2-core Xeon; 55 s / 17 s with five other jobs
@pytest.mark.parametrize("task", dense_config.TASKS)
def test_quick_run_end_to_end_learns(task, tmp_path):
    """--quick: data generated, trained, scored with pycocotools / mIoU, checkpointed, resumable."""
    script = load_entry_point("scripts/dense.py")
    out = tmp_path / "runs"
    config = f"configs/dense_{task}.yaml"
    args = ["--task", task, "--config", config, "--quick", "--set", f"train.output={out}"]
    args += [f"train.experiment={task}-nat-s0", f"data.root={tmp_path / 'data'}", "sched.epochs=3"]
    assert script.main(args) == 0
    run = out / f"{task}-nat-s0"
    results = json.loads((run / "results.json").read_text())
    history = torch.load(run / "last.pth.tar", weights_only=True)["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]  # it learns
    assert results["flops"] > results["backbone_flops"] > 0 and results["params"] > results["backbone_params"]
    best_by = "box_AP" if task == "detection" else "mIoU"  # the saver's choice of best epoch
    if task == "detection":
        assert {"box_AP", "box_AP50", "mask_AP"} <= set(results) and results["box_AP50"] > 0
    else:
        assert results["mIoU"] > 100 / 5  # above a constant prediction of the background
    assert (run / "summary.csv").read_text().count("\n") == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {
        "train/loss",
        "train/epoch_loss",
        "train/lr",
        "val/mIoU" if task != "detection" else "val/box_AP",
    } <= set(tags)
    for tag in tags:  # one point per step: a tag written twice at a step draws a zigzag
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-3.pth.tar"]  # epochs count from 1
    # resuming a finished run trains nothing more and keeps its results (its speed: every epoch's)
    assert script.main(["--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text()) == results
    # the comparison table and the picture of predictions (6 val images: image, truth, prediction)
    assert script.main(["--report", str(out)]) == 0
    table = (out / "dense_comparison.md").read_text()
    metric = results["box_AP50"] if task == "detection" else results["mIoU"]
    assert "| nat | 0 |" in table and f"{metric:.1f}" in table and (out / "learning_curves.png").is_file()
    default_name = f"20261207-120000-{task}-nat_mini"  # a run not named for the study: a row of its own
    shutil.copytree(run, out / default_name, ignore=shutil.ignore_patterns("*.pth.tar", "tb"))
    assert script.main(["--report", str(out)]) == 0
    assert f"| {default_name} | 0 |" in (out / "dense_comparison.md").read_text()
    assert script.main(["--draw", str(run)]) == 0
    assert Image.open(run / "predictions.png").size == (3 * 256, 6 * 256)
    # --evaluate: the best weights rescored, single scale as during training; detection refuses --flip
    best = max(r[best_by] for r in history)
    assert script.main(["--evaluate", str(run)]) == 0
    assert json.loads((run / "evaluation.json").read_text())[best_by] == pytest.approx(best)
    flipped = ["--evaluate", str(run), "--scales", "0.75", "1", "--flip"]
    assert script.main(flipped) == (0 if task == "segmentation" else 2)
    if task == "segmentation":  # its own file: the single-scale one is kept
        assert (run / "evaluation-0.75-1-flip.json").is_file() and (run / "evaluation.json").is_file()
    train_images = tmp_path / "data" / "images" / "training"  # a machine with the val split alone
    train_images.rename(tmp_path / "elsewhere")
    assert script.main(["--evaluate", str(run)]) == 0 and script.main(["--draw", str(run)]) == 0
    (tmp_path / "elsewhere").rename(train_images)
    # --speed-rounds' timing with a batch larger than the 16 val images: what each split has
    speeds = dense_eval.interleaved_speeds({"nat": run}, rounds=1, batch=32)["nat"]
    assert speeds["train"] > 0 and speeds["infer"] > 0


def test_resume_continues_a_stopped_run_from_its_last_epoch(tmp_path, capsys):
    """A run stopped after epoch 1 of 2 (its checkpoint says 2 epochs) resumes at epoch 2, keeps its
    history and its update count."""
    script = load_entry_point("scripts/dense.py")
    args = ["--task", "segmentation", "--config", "configs/dense_segmentation.yaml", "--quick", "--set"]
    args += [
        f"train.output={tmp_path}",
        "train.experiment=r",
        f"data.root={tmp_path / 'data'}",
        "sched.epochs=1",
    ]
    assert script.main(args) == 0
    assert script.main(args) == 2  # a new run in its folder would overwrite it: one error line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a training run; continue it with --resume" in err[0], err
    last = tmp_path / "r" / "last.pth.tar"
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["sched"]["epochs"] = 2  # as if stopped after the first of two epochs
    torch.save(ckpt, last)
    assert script.main(["--resume", str(tmp_path / "r")]) == 0
    history = torch.load(last, weights_only=True)["history"]
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 6), (2, 12)]  # 48 images / batch 8 per epoch
    speeds = [r["train_img_per_sec"] for r in history]  # the median of the epochs after the first
    assert json.loads((tmp_path / "r" / "results.json").read_text())["train_img_per_sec"] == speeds[1]
    assert history[0] == ckpt["history"][0]


# ~3 s per task on the quiet 2-core Xeon
@pytest.mark.parametrize("task", dense_config.TASKS)
def test_official_dense_layout_from_a_classification_checkpoint(task, scenes, tmp_path):
    """backbone.kwargs stage_norms / frozen_stages (models/nat.py's official dense layout) with a
    classification checkpoint: its weights loaded exactly, the stage norms fresh (LayerNorm's init),
    the stem and first level frozen: no grad and unchanged after a training step."""
    from engine import dense

    classifier = classification_checkpoint(tmp_path / "c.pth.tar", randomise=True)
    overrides = [f"backbone.checkpoint={tmp_path / 'c.pth.tar'}", "backbone.drop_path_rate=0"]
    overrides += [
        "backbone.kwargs.stage_norms=true",
        "backbone.kwargs.frozen_stages=1",
        f"data.root={scenes}",
    ]
    overrides += ["data.embedded.train_images=6", "data.embedded.val_images=4", "data.embedded.image_size=48"]
    cfg = dense_config.load_dense_config([f"configs/dense_{task}.yaml"], overrides)
    train_set, _, names = dense_config.build_data(cfg, task)
    model, _ = dense_config.build_model(cfg, task, len(names))
    body = model.backbone.body if task == "detection" else model.encoder.model
    reference = classifier.state_dict()
    params = {k.removeprefix("model."): v for k, v in body.named_parameters()}
    norms = {k: v for k, v in params.items() if k.startswith("stage_norms.")}
    assert sorted(norms) == [f"stage_norms.{i}.{p}" for i in range(3) for p in ("bias", "weight")]
    for key, value in norms.items():
        assert torch.equal(
            value, torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
        )
    loaded = {k: v for k, v in params.items() if k not in norms}
    assert set(loaded) == set(reference) - {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key
    frozen = {k for k, v in params.items() if not v.requires_grad}
    level0 = ("stem.", "stages.0.blocks.", "stages.1.downsample.", "stage_norms.0.")
    assert frozen == {k for k in params if k.startswith(level0)} and frozen

    before = {k: v.detach().clone() for k, v in params.items()}
    images, targets = dense_config.collate([train_set[i] for i in range(2)])
    model.train()
    loss = dense_config.training_loss(model, task, images, targets)
    optimizer = dense._optimizer(model, cfg)
    loss.backward()
    optimizer.step()
    for key in frozen:
        assert params[key].grad is None and torch.equal(params[key], before[key]), key
    assert not torch.equal(
        params["stages.1.blocks.0.mlp.fc1.weight"], reference["stages.1.blocks.0.mlp.fc1.weight"]
    )
    assert all(norms[k].grad is not None for k in norms if not k.startswith("stage_norms.0."))


def test_ctrl_c_is_one_line_and_keeps_what_a_resume_needs(tmp_path, monkeypatch, capsys):
    """Ctrl-C (here: during the first checkpoint's write) is one line and exit 130, not a traceback:
    the cut-off tmp.pth.tar is removed, a new run that saved nothing leaves no folder, and a folder
    without last.pth.tar is not 'not found, check the path' to --resume."""
    import engine.dense

    def interrupted(cfg, task, run_dir, resume_ckpt):
        (run_dir / "tmp.pth.tar").write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    def saved_then_interrupted(cfg, task, run_dir, resume_ckpt):
        (run_dir / "last.pth.tar").write_bytes(b"epoch 1")
        interrupted(cfg, task, run_dir, resume_ckpt)

    monkeypatch.setattr(engine.dense, "train_and_evaluate", interrupted)
    script = load_entry_point("scripts/dense.py")
    args = ["--task", "segmentation", "--quick", "--set", f"train.output={tmp_path}", "train.experiment=c"]
    assert script.main([*args, f"data.root={tmp_path / 'data'}"]) == 130
    assert capsys.readouterr().err == "interrupted; no epoch had finished, nothing was kept\n"
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(engine.dense, "train_and_evaluate", saved_then_interrupted)
    assert script.main([*args[:-1], "train.experiment=s", f"data.root={tmp_path / 'data'}"]) == 130
    hint = (
        f"interrupted; its last finished epoch is kept: python scripts/dense.py --resume {tmp_path / 's'}\n"
    )
    assert capsys.readouterr().err == hint and (tmp_path / "s" / "last.pth.tar").exists()
    (tmp_path / "c").mkdir()  # a folder from before this fix: config.yaml, no checkpoint yet
    (tmp_path / "c" / "config.yaml").write_text("{}")
    assert script.main(["--resume", str(tmp_path / "c")]) == 2
    assert "has no last.pth.tar: the run stopped before its first epoch ended" in capsys.readouterr().err


@pytest.mark.parametrize("detector", ["mask_rcnn", "fcos"])
def test_an_epoch_without_detections_scores_0_ap(detector, scenes):
    """No detection at all (every score under the threshold): box AP 0, and a mask head's mask AP 0
    too (it was left out of the epoch's metrics); FCOS, without masks, has none."""
    tiny = "backbone.kwargs={embed_dim: 16, depths: [1, 1, 2], num_heads: [1, 1, 1], kernel_size: [3, 3, 3]}"
    overrides = [tiny, f"data.root={scenes}", f"detection.detector={detector}"]
    overrides += ["data.embedded.train_images=6", "data.embedded.val_images=4", "data.embedded.image_size=48"]
    cfg = dense_config.load_dense_config(["configs/dense_detection.yaml"], overrides)
    _, val_set, names = dense_config.build_data(cfg, "detection")
    model, _ = dense_config.build_model(cfg, "detection", len(names))
    heads = model.roi_heads if detector == "mask_rcnn" else model
    heads.score_thresh = 1.1  # above any score
    batch = dense_config.collate([val_set[i] for i in range(len(val_set))])
    metrics = dense_eval.evaluate(model, [batch], "detection", val_set, len(names))
    assert metrics["box_AP"] == metrics["box_AP50"] == 0
    assert (metrics.get("mask_AP"), metrics.get("mask_AP50")) == (
        (0, 0) if detector == "mask_rcnn" else (None, None)
    )
