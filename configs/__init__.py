"""Training configs: a typed schema with defaults, YAML files that inherit (`base:`), CLI overrides.

A config is a nested dict with the sections of `DEFAULTS` below. YAML files only state what differs
from their base; `load_config` resolves the chain, applies `key=value` overrides, checks every key
and type, and returns the fully resolved dict (saved as `config.yaml` with every run).

    cfg = load_config(["configs/nat_tiny.yaml", "configs/imagenet100.yaml"], ["optim.lr=5e-4"])

* `base: other.yaml` (or a list of files, merged in order) is resolved relative to the file naming it.
* Several files (`-c a.yaml -c b.yaml`) are merged left to right: model files + subset overlays.
* Overrides are `section.key=value`; the value is parsed as YAML (`[1, 2]`, `{a: 1}`, `null`, `true`).
* An unknown or misspelled key is an error naming the key and its nearest valid neighbour.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent

# Keys whose value is a free-form dict (no schema below them).
FREEFORM = {"model.kwargs", "data.timm_kwargs"}

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "nat_mini",  # any timm model name: nat_*, dinat_*, swin_*, convnext_*, resnet*, ...
        "pretrained": False,  # timm pretrained weights (downloads: only when you ask for it)
        "checkpoint": None,  # fine-tune from a file: ours, a timm state_dict, or an official NAT/DiNAT .pth
        "checkpoint_use_ema": False,  # take `state_dict_ema` from one of our checkpoints
        "num_classes": None,  # None: number of classes in the dataset (head re-sized when fine-tuning)
        "drop_rate": 0.0,
        "drop_path_rate": 0.1,
        "kwargs": {},  # extra timm.create_model kwargs (e.g. embed_dim, depths for small variants)
    },
    "data": {  # passed to data.build_datasets (see data/)
        "dataset": "folder",  # folder | synthetic | pathfinder | a timm reader name
        "root": None,  # None: folder data needs one; the generated sets use their own default folders
        "train_split": "train",
        "val_split": "val",
        "class_list": None,  # file or list of class names (wnids) making the subset
        "num_classes": None,  # a subset of N classes drawn with `seed` (sorted)
        "max_per_class": None,  # cap images per class (train)
        "max_per_class_val": None,
        "seed": 0,
        "synthetic": {
            "num_classes": 10,
            "train_per_class": 200,
            "val_per_class": 50,
            "image_size": 64,
            "seed": 0,
            "polarity": "any",  # any | light (light shapes on a dark background: learnt much sooner)
        },
        "pathfinder": {  # dataset: pathfinder (data/pathfinder.py): are the two dots on one curve?
            "train_per_class": 1000,
            "val_per_class": 200,
            "image_size": 48,
            "num_curves": 2,
            "colour_curves": True,
            "min_dot_distance": 0.5,
            "palette": 2,
            "dot_radius": 3.2,  # px: the dots' size (a white ring around the curve's colour)
            "near_fraction": 0.0,  # training images with the dots side by side (a curriculum)
            "seed": 0,
        },
        "timm_kwargs": None,  # extra timm create_dataset arguments (timm reader datasets only)
        "download": False,  # let a timm reader download its dataset (never implicit)
        "img_size": None,  # None: the model's default input size
        "crop_pct": None,  # None: the model's default
        "interpolation": "",  # '': the model's default
        "mean": None,
        "std": None,
        "workers": 4,
        "pin_memory": True,
        "val_batch_size": None,  # None: 2 x train batch size
    },
    "aug": {  # timm.data.create_transform + timm.data.Mixup
        "no_aug": False,
        "auto_augment": "rand-m9-mstd0.5-inc1",  # RandAugment m9 (None/'' disables)
        "scale": [0.08, 1.0],
        "ratio": [0.75, 1.3333333333333333],
        "hflip": 0.5,
        "vflip": 0.0,
        "color_jitter": 0.4,
        "train_interpolation": "random",
        "reprob": 0.25,
        "remode": "pixel",
        "recount": 1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "cutmix_minmax": None,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "mixup_off_epoch": 0,  # turn mixup/cutmix off from this epoch (0: never)
        "smoothing": 0.1,
    },
    "optim": {  # timm.optim.create_optimizer_v2
        "opt": "adamw",
        "lr": None,  # absolute lr; None: lr_base * global_batch / lr_base_size
        "lr_base": 1e-3,
        "lr_base_size": 1024,
        "weight_decay": 0.05,
        "momentum": 0.9,
        "opt_eps": None,
        "opt_betas": None,
        "layer_decay": None,  # layer-wise lr decay (fine-tuning), e.g. 0.75
        "clip_grad": None,
        "clip_mode": "norm",
        "grad_accum_steps": 1,
        # true: torch's fused optimizer kernel (adam/adamw/sgd, CPU and CUDA): on CPU the default
        # per-tensor loop was ~30% of a Swin-T train step; null: torch's default implementation
        "fused": None,
    },
    "sched": {  # timm.scheduler.create_scheduler_v2
        "sched": "cosine",
        "epochs": 300,
        "warmup_epochs": 20,
        "cooldown_epochs": 10,
        "warmup_lr": 1e-6,
        "min_lr": 5e-6,
        "decay_epochs": 90,  # sched=step: lr x decay_rate every this many epochs
        "decay_milestones": [90, 180, 270],  # sched=multistep: lr x decay_rate at each of these epochs
        "decay_rate": 0.1,
        "patience_epochs": 10,  # sched=plateau: epochs without a better val metric before a decay
        "step_on_updates": True,  # lr changes every optimizer update, not only per epoch
    },
    "ema": {  # timm.utils.ModelEmaV3
        "enabled": False,
        "decay": 0.9998,
        "warmup": False,
        "force_cpu": False,
    },
    "train": {
        "batch_size": 128,  # per process, per micro-batch
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "amp": None,  # autocast: null = on GPU only; true = on CPU too (bfloat16); false = off
        "amp_dtype": "bfloat16",  # bfloat16 | float16 (float16 uses a GradScaler)
        "channels_last": False,
        "compile": False,  # torch.compile the model (or a mode name: 'max-autotune', ...)
        "seed": 42,
        "deterministic": False,  # deterministic algorithms, exact resume on CPU
        "output": "runs",
        "experiment": None,  # run folder name; None: <date-time>-<model>
        "checkpoint_hist": 3,  # best-k epoch checkpoints kept (plus last and model_best)
        "eval_metric": "top1",  # top1 | top5 | loss
        "eval_interval": 1,  # validate every N epochs (and after the last)
        "log_interval": 50,  # TensorBoard scalars every N updates
        "progress": "auto",  # auto (only on a terminal) | on | off
        "stop_after_updates": None,  # stop (as if SIGTERM) after N updates: saves and exits, for tests
    },
}

# Types for keys whose default is None (or that need more than the default's type).
TYPES: dict[str, tuple] = {
    "model.checkpoint": (str,),
    "data.root": (str,),
    "model.num_classes": (int,),
    "data.class_list": (str, list),
    "data.timm_kwargs": (dict,),
    "data.num_classes": (int,),
    "data.max_per_class": (int,),
    "data.max_per_class_val": (int,),
    "data.img_size": (int, list),
    "data.crop_pct": (float,),
    "data.mean": (list,),
    "data.std": (list,),
    "data.val_batch_size": (int,),
    "aug.auto_augment": (str,),
    "aug.cutmix_minmax": (list,),
    "optim.lr": (float,),
    "optim.opt_eps": (float,),
    "optim.opt_betas": (list,),
    "optim.layer_decay": (float,),
    "optim.clip_grad": (float,),
    "optim.fused": (bool,),
    "train.amp": (bool,),
    "train.compile": (bool, str),
    "train.experiment": (str,),
    "train.stop_after_updates": (int,),
}

CHOICES: dict[str, tuple] = {
    "train.amp_dtype": ("bfloat16", "float16"),
    "train.eval_metric": ("top1", "top5", "loss"),
    "train.progress": ("auto", "on", "off"),
    "optim.clip_mode": ("norm", "value", "agc"),
    "aug.mixup_mode": ("batch", "pair", "elem"),
    "aug.remode": ("pixel", "rand", "const"),
    # timm's resize modes ('': the model's default; 'random': one of bilinear / bicubic per image)
    "data.interpolation": ("", "bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"),
    "aug.train_interpolation": ("random", "bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"),
}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key/file and the fix."""


def all_keys(schema: dict = DEFAULTS, prefix: str = "") -> list[str]:
    """Every valid dotted key (sections, leaves and nested schema dicts)."""
    keys = []
    for name, value in schema.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict) and key not in FREEFORM:
            keys.extend(all_keys(value, key + "."))
    return keys


# Names from other trainers (timm's and PyTorch's flags, Keras) -> this config's leaf names.
ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "optimizer": "opt",
    "scheduler": "sched",
    "wd": "weight_decay",
    "bs": "batch_size",
    "input_size": "img_size",
    "image_size": "img_size",
    "warmup": "warmup_epochs",
    "lr_min": "min_lr",
    "label_smoothing": "smoothing",
    "num_workers": "workers",
    "data_dir": "root",
    "model_name": "name",
}


def _initials(name: str) -> str:
    return "".join(word[0] for word in name.split("_") if word)


def nearest_key(key: str) -> str:
    """The valid key closest to `key`: the same name (or its known alias: learning_rate -> lr) in this
    or another section, else the most similar sibling (a prefix counts: drop_path -> drop_path_rate;
    so do initials: learning_rate -> lr, wd -> weight_decay)."""
    valid = all_keys()
    section, _, leaf = key.rpartition(".")
    leaf = leaf.replace("-", "_")  # a flag's spelling: amp-dtype -> amp_dtype
    names = (leaf, ALIASES.get(leaf))
    same_name = [
        k for k in valid if k.rpartition(".")[2] in names and k != key and k.count(".") == key.count(".")
    ]
    if same_name:  # this section first (sched.warmup -> sched.warmup_epochs, not ema.warmup), then the name
        return min(same_name, key=lambda k: (k.rpartition(".")[0] != section, k.rpartition(".")[2] != leaf))
    siblings = [k for k in valid if k.rpartition(".")[0] == section]
    siblings = siblings or [k for k in valid if k.count(".") == key.count(".")] or valid

    def score(k: str) -> float:
        name = k.rpartition(".")[2]
        s = difflib.SequenceMatcher(None, leaf, name).ratio()
        s += 0.5 if name.startswith(leaf) or leaf.startswith(name) else 0.0
        return s + (1.0 if leaf == _initials(name) or name == _initials(leaf) else 0.0)

    return max(siblings, key=score)


def _unknown(key: str, where: str, value=None) -> ConfigError:
    near = nearest_key(key)
    if isinstance(value, dict) and len(value) == 1:  # 'optimizer.lr' -> 'optim.lr', not just 'optim'
        sub = next(iter(value))
        key = f"{key}.{sub}"
        if f"{near}.{sub}" in all_keys():
            near = f"{near}.{sub}"
    return ConfigError(f"unknown config key '{key}'{where}; did you mean '{near}'?")


def _schema_at(key: str):
    node: Any = DEFAULTS
    for part in key.split("."):
        node = node[part]
    return node


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check `value` against the type of `key`'s default (or TYPES); convert the harmless cases."""
    if value is None:
        return None
    default = _schema_at(key)
    types = TYPES.get(key) or (type(default),)
    if key in FREEFORM:
        types = (dict,)
    for t in types:
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
                return value.lower() in ("true", "yes", "on")
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads '5e-4' as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif t is list:
            if isinstance(value, (list, tuple)):
                return [_maybe_float(v) for v in value]
        elif t is str:
            if isinstance(value, str):
                return value
        elif isinstance(value, t):
            return value
    names = " or ".join(t.__name__ for t in types)
    raise ConfigError(f"config key '{key}'{where} must be {names}, got {value!r}")


def _maybe_float(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _check_tree(tree: dict, where: str, prefix: str = "") -> dict:
    """Validate a (partial) config tree against the schema; returns it with coerced values."""
    out = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str):
            raise ConfigError(f"config key {name!r}{where} must be a string")
        try:
            default = _schema_at(key)
        except (KeyError, TypeError):
            raise _unknown(key, where, value) from None
        if isinstance(default, dict) and key not in FREEFORM:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}'{where} is a section: give a mapping, got {value!r}")
            out[name] = _check_tree(value, where, key + ".")
        else:
            out[name] = _coerce(key, value, where)
            if key in CHOICES and out[name] not in CHOICES[key]:
                raise ConfigError(f"config key '{key}'{where} must be one of {CHOICES[key]}, got {value!r}")
    return out


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("kwargs", "timm_kwargs"):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A config path: a `base:` relative to the file naming it (`relative_to`), first, so a same-named
    file in the working folder can't stand in for it; a command-line one as given; else inside
    configs/ (`nat_tiny` works)."""
    p = Path(path)
    candidates = [p] if relative_to is None or p.is_absolute() else [relative_to / p, p]
    candidates += [CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file '{path}' not found; see {CONFIG_DIR} for the available configs")


def load_file(path: str | Path, _chain: tuple = ()) -> dict:
    """Load one YAML file with its `base:` chain resolved (still partial: not merged with DEFAULTS)."""
    path = resolve_path(path, Path(_chain[-1]).parent if _chain else None).resolve()
    if path in _chain:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file '{path}'{at} is not valid YAML: {getattr(e, 'problem', e)}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("base", None) or raw.pop("defaults", None) or []
    if isinstance(bases, str):
        bases = [bases]
    tree: dict = {}
    for b in bases:
        tree = merge(tree, load_file(b, (*_chain, path)))
    return merge(tree, _check_tree(raw, f" in {path}"))


def parse_override(text: str) -> dict:
    """'optim.lr=5e-4' -> {'optim': {'lr': 5e-4}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. optim.lr=5e-4)")
    key, _, value = text.partition("=")
    key = key.strip().lstrip("-")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parsed
    return tree


def _apply_override(cfg: dict, text: str) -> dict:
    tree = parse_override(text)
    key = text.partition("=")[0].strip().lstrip("-")
    # model.kwargs.embed_dim=32: a single key inside a free-form dict
    for ff in FREEFORM:
        if key.startswith(ff + "."):
            sub = key[len(ff) + 1 :]
            section, name = ff.split(".")
            cfg = copy.deepcopy(cfg)
            cfg[section][name][sub] = tree[section][name][sub]
            return cfg
    try:  # a str-typed key keeps the text as typed: YAML would turn 'on' into True, '1e-3' stays
        default = _schema_at(key)
        if (TYPES.get(key) or (type(default),)) == (str,):
            raw = text.partition("=")[2].strip()
            if raw not in ("null", "~", ""):
                node = tree
                parts = key.split(".")
                for part in parts[:-1]:
                    node = node[part]
                node[parts[-1]] = raw
    except (KeyError, TypeError):
        pass  # unknown key: _check_tree names it
    return merge(cfg, _check_tree(tree, f" (override '{text}')"))


def load_config(paths=(), overrides=(), base: dict | None = None) -> dict:
    """Resolve DEFAULTS (or `base`) <- files (with their bases) <- overrides into a full config."""
    cfg = copy.deepcopy(base if base is not None else DEFAULTS)
    for p in paths:
        cfg = merge(cfg, load_file(p))
    for o in overrides:
        cfg = _apply_override(cfg, o)
    return validate(cfg)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: dict) -> dict:
    """Check a complete config (e.g. one stored in a checkpoint) and cross-key constraints."""
    cfg = merge(DEFAULTS, _check_tree(cfg, ""))
    for key, least in (
        ("optim.grad_accum_steps", 1),
        ("train.batch_size", 1),
        ("sched.epochs", 1),
        ("train.eval_interval", 1),
        ("train.log_interval", 1),
        ("train.checkpoint_hist", 1),
        ("data.workers", 0),
    ):
        section, name = key.split(".")
        if cfg[section][name] < least:
            raise ConfigError(f"config key '{key}' must be >= {least}, got {cfg[section][name]}")
    for key, value in (("aug.scale", cfg["aug"]["scale"]), ("aug.ratio", cfg["aug"]["ratio"]),
                       ("data.img_size", cfg["data"]["img_size"])):  # fmt: skip
        if isinstance(value, list) and not (len(value) == 2 and all(_is_number(v) and v > 0 for v in value)):
            raise ConfigError(f"config key '{key}' must be two positive numbers (range or H, W), got {value}")
    d = cfg["data"]
    bad_size = isinstance(d["img_size"], int) and d["img_size"] < 1  # a list is checked above
    bad_crop = d["crop_pct"] is not None and d["crop_pct"] <= 0
    if bad_size or bad_crop:
        raise ConfigError(
            f"data.img_size and data.crop_pct must be > 0, got {d['img_size']} and {d['crop_pct']}"
        )
    for key in ("mean", "std"):  # one value per RGB channel; a std of 0 divides by zero
        value = d[key]
        if value is not None and not (len(value) == 3 and all(_is_number(v) for v in value)):
            raise ConfigError(f"config key 'data.{key}' must be three numbers (R, G, B), got {value}")
    if d["std"] is not None and min(d["std"]) <= 0:
        raise ConfigError(f"config key 'data.std' must be positive, got {d['std']}")
    if cfg["sched"]["sched"] == "plateau" and cfg["sched"]["step_on_updates"]:
        raise ConfigError(
            "sched.sched=plateau steps once per epoch (on the val metric); set sched.step_on_updates=false"
        )
    decay = cfg["optim"]["layer_decay"]
    if decay is not None and not 0 < decay <= 1:
        raise ConfigError(
            f"config key 'optim.layer_decay' is {decay}; it must be in (0, 1]: a layer's lr is optim.lr x "
            "layer_decay ** (its depth below the head), so > 1 gives the lowest layers the largest lr "
            "(fine-tuning uses 0.65-0.9)"
        )
    return cfg


def dump_config(cfg: dict, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text


def flat(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': 1e-3, ...} for logging."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREEFORM:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out
