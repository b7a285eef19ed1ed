"""`build_datasets(data_cfg)`: the one call engine.trainer / engine.evaluate make for train and val sets."""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from timm.data import create_dataset

from .errors import DataError, unknown_key_error
from .folder import build_image_folder, class_folders, corrupt_count, resolve_classes
from .pathfinder import generate_pathfinder_dataset
from .synthetic import generate_synthetic_dataset

_logger = logging.getLogger(__name__)

DEFAULTS = dict(
    dataset="folder",
    root=None,
    train_split="train",
    val_split="val",
    class_list=None,
    num_classes=None,
    max_per_class=None,
    max_per_class_val=None,
    seed=0,
    synthetic=None,
    pathfinder=None,
    # Only for timm reader pass-through (tfds/, wds/, hfds/, hfids/, torch/): extra create_dataset
    # arguments (e.g. batch_size / is_training for iterable readers) and the explicit download opt-in.
    timm_kwargs=None,
    download=False,
)
SYNTHETIC_DEFAULTS = dict(
    num_classes=10, train_per_class=200, val_per_class=50, image_size=64, seed=0, polarity="any"
)
DEFAULT_SYNTHETIC_ROOT = "datasets/synthetic"
PATHFINDER_DEFAULTS = dict(
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
)
DEFAULT_PATHFINDER_ROOT = "datasets/pathfinder"
FOLDER_NAMES = ("folder", "imagefolder", "")
TIMM_PREFIXES = ("tfds", "wds", "hfds", "hfids", "torch")
SUBSET_KEYS = ("class_list", "num_classes", "max_per_class", "max_per_class_val")


@dataclass
class DatasetBundle:
    train: object
    val: object
    classes: list
    selection: dict = field(default_factory=dict)  # what classes.json records

    @property
    def num_classes(self):
        return len(self.classes)

    def corrupt_counts(self) -> dict:
        """Unreadable images skipped so far, per split (for the training log)."""
        return {"train": corrupt_count(self.train), "val": corrupt_count(self.val)}


def _check_keys(cfg, valid, where):
    if not isinstance(cfg, dict):
        raise DataError(f"{where} must be a mapping of options, got {type(cfg).__name__}")
    for key in cfg:
        if key not in valid:
            raise unknown_key_error(key, valid, where)


def _dataset_kind(name):
    name = "" if name is None else str(name)
    if name.lower() in FOLDER_NAMES:
        return "folder"
    if name.lower() in ("synthetic", "pathfinder"):
        return name.lower()
    prefix, sep, _ = name.partition("/")
    if sep and prefix.lower() in TIMM_PREFIXES:
        return "timm"
    choices = ["folder", "synthetic", "pathfinder"] + [p + "/" for p in TIMM_PREFIXES]
    raise unknown_key_error(
        name,
        choices,
        "data.dataset (folder, synthetic, pathfinder, or a timm reader name like torch/cifar10)",
        "dataset",
    )


def build_datasets(data_cfg: dict, run_dir=None) -> DatasetBundle:
    """Train and val datasets (and the class list) from the `data` section of a config.

    dataset: 'folder' (root/train/<class>/*, root/val/<class>/*), 'synthetic' (the embedded shapes
    set, generated into root first if needed, then read as a folder), 'pathfinder' (the embedded
    long-range set of data/pathfinder.py, options under data.pathfinder, generated the same way),
    or a timm reader name such as 'torch/cifar10', 'hfds/<name>', 'tfds/<name>', 'wds/<name>' passed
    to timm.data.create_dataset.
    With run_dir, the selection (class order, per-class counts, caps, seed) goes to
    run_dir/classes.json and run_dir/classes.txt (the latter loadable as a timm class_map).
    """
    _check_keys(data_cfg, DEFAULTS, "data config")
    cfg = {**DEFAULTS, **data_cfg}
    kind = _dataset_kind(cfg["dataset"])
    if kind == "timm":
        bundle = _build_timm(cfg)
    else:
        if kind == "synthetic":
            syn = cfg["synthetic"] or {}
            _check_keys(syn, SYNTHETIC_DEFAULTS, "data.synthetic")
            syn = {**SYNTHETIC_DEFAULTS, **syn}
            cfg["root"] = cfg["root"] or DEFAULT_SYNTHETIC_ROOT
            generate_synthetic_dataset(cfg["root"], **syn)
            cfg["synthetic"] = syn
        if kind == "pathfinder":
            opts = cfg["pathfinder"] or {}
            _check_keys(opts, PATHFINDER_DEFAULTS, "data.pathfinder")
            opts = {**PATHFINDER_DEFAULTS, **opts}
            cfg["root"] = cfg["root"] or DEFAULT_PATHFINDER_ROOT
            generate_pathfinder_dataset(cfg["root"], **opts)
            cfg["pathfinder"] = opts
        # generator settings only matter for their own dataset
        cfg["synthetic"] = cfg["synthetic"] if kind == "synthetic" else None
        cfg["pathfinder"] = cfg["pathfinder"] if kind == "pathfinder" else None
        bundle = _build_folder(cfg)
    if run_dir is not None:
        write_selection(run_dir, bundle)
    return bundle


def _build_folder(cfg):
    if not cfg["root"]:
        raise DataError("data.root is not set; point it at a folder holding train/ and val/ class folders")
    root = Path(cfg["root"]).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data root {root} {what}; fix data.root (or use dataset: synthetic)")
    seed = cfg["seed"]
    classes = resolve_classes(
        root / cfg["train_split"], class_list=cfg["class_list"], num_classes=cfg["num_classes"], seed=seed
    )
    train = build_image_folder(
        root / cfg["train_split"], classes, max_per_class=cfg["max_per_class"], seed=seed
    )
    val = build_image_folder(
        root / cfg["val_split"], classes, max_per_class=cfg["max_per_class_val"], seed=seed
    )
    extra = sorted(set(class_folders(root / cfg["val_split"])) - set(classes))
    if extra and cfg["class_list"] is None and cfg["num_classes"] is None:  # a subset leaves folders out
        _logger.warning(
            f"warning: {len(extra)} class folder(s) of {root / cfg['val_split']} are not in "
            f"{cfg['train_split']} (e.g. '{extra[0]}'): not scored, the model learns only the train classes"
        )
    selection = dict(
        dataset=str(cfg["dataset"]),
        root=str(root),
        train_split=cfg["train_split"],
        val_split=cfg["val_split"],
        class_list=cfg["class_list"]
        if isinstance(cfg["class_list"], (list, tuple, type(None)))
        else str(cfg["class_list"]),
        num_classes_requested=cfg["num_classes"],
        seed=seed,
        max_per_class=cfg["max_per_class"],
        max_per_class_val=cfg["max_per_class_val"],
        synthetic=cfg["synthetic"],
        pathfinder=cfg["pathfinder"],
        num_classes=len(classes),
        classes=classes,
        counts=dict(train=train.class_counts(), val=val.class_counts()),
        num_images=dict(train=len(train), val=len(val)),
    )
    return DatasetBundle(train=train, val=val, classes=classes, selection=selection)


def _classes_of(ds):
    """Class names of a timm / torchvision dataset, in label order, where it exposes them."""
    reader = getattr(ds, "reader", None)
    for obj in (ds, reader):
        mapping = getattr(obj, "class_to_idx", None)
        if isinstance(mapping, dict) and mapping:
            return [str(c) for c in sorted(mapping, key=mapping.get)]
        names = getattr(obj, "classes", None)
        if isinstance(names, (list, tuple)) and names:
            return [str(c) for c in names]
    return []


def _build_timm(cfg):
    used = [k for k in SUBSET_KEYS if cfg[k] is not None]
    if used:
        raise DataError(
            f"{', '.join(used)} only work with folder datasets, not dataset={cfg['dataset']}; "
            "export the data to the folder layout or drop these keys"
        )
    extra = dict(cfg["timm_kwargs"] or {})
    root = None if cfg["root"] is None else str(Path(cfg["root"]).expanduser())
    if str(cfg["dataset"]).startswith("hfds/"):
        _check_hf_datasets(bool(cfg["download"]))
    splits = {}
    for which in ("train", "val"):
        kwargs = dict(is_training=which == "train", download=bool(cfg["download"]), seed=cfg["seed"])
        kwargs.update(extra)
        try:
            splits[which] = create_dataset(cfg["dataset"], root=root, split=cfg[f"{which}_split"], **kwargs)
        except ImportError as e:
            raise DataError(
                f"dataset {cfg['dataset']} needs a package that is not installed ({e}); install it"
            ) from e
        except (AssertionError, FileNotFoundError, RuntimeError) as e:
            raise DataError(
                f"timm could not open dataset {cfg['dataset']} split '{cfg[f'{which}_split']}' "
                f"at root {root}: "
                f"{e or type(e).__name__}; check data.root (and data.download: true to fetch it)"
            ) from e
    classes = _classes_of(splits["train"])
    selection = dict(
        dataset=str(cfg["dataset"]),
        root=root,
        train_split=cfg["train_split"],
        val_split=cfg["val_split"],
        seed=cfg["seed"],
        num_classes=len(classes),
        classes=classes,
        num_images={k: _safe_len(v) for k, v in splits.items()},
    )
    return DatasetBundle(train=splits["train"], val=splits["val"], classes=classes, selection=selection)


def _check_hf_datasets(download: bool) -> None:
    """timm's hfds reader: Hugging Face `datasets` must be installed (a `datasets/` data folder in the
    working directory, as this repo keeps, imports as an empty namespace package in its place), and
    without data.download it reads only what the hub cache holds (timm drops `download` for hfds)."""
    import importlib.util

    spec = importlib.util.find_spec("datasets")
    if spec is None or spec.origin is None:  # missing, or the data folder taken for it
        found = "" if spec is None else f" ('datasets' is the folder {spec.submodule_search_locations[0]})"
        raise DataError(f"hfds/ datasets need Hugging Face's `datasets` package{found}: pip install datasets")
    if not download:
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # the cache only, as data.download: false promises


def _safe_len(ds):
    try:
        return len(ds)
    except TypeError:
        return None


def write_selection(run_dir, bundle: DatasetBundle):
    """run_dir/classes.json (full selection record) and run_dir/classes.txt (class names, label order)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "classes.json").write_text(json.dumps(bundle.selection, indent=1, default=str) + "\n")
    (run_dir / "classes.txt").write_text("".join(f"{c}\n" for c in bundle.classes))
