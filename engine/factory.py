"""Building things from the resolved config or a checkpoint's settings: the model (checked against
timm's registry), the model a checkpoint's weights go in, its eval transform settings, the data
settings that data.build_datasets takes, and exported weights files.

Owns the mapping from config sections and checkpoint settings to timm / data calls, so train, eval,
torch.hub and the scripts make models the same way. `import models` here is what registers nat_* /
dinat_* with timm. Builds on engine/checkpoint.py (files and settings), never the other way.
"""

from __future__ import annotations

from pathlib import Path

from configs import ConfigError
from engine.checkpoint import (
    WEIGHTS_FORMATS,
    checkpoint_num_classes,
    checkpoint_settings,
    extract_state_dict,
    load_checkpoint,
    load_model_weights,
    save_weights,
)
from engine.errors import CheckpointError, first_line


def import_model_registry():
    """`import models` registers nat_*/dinat_* with timm; say why if it can't."""
    try:
        import models  # noqa: F401

        return None
    except Exception as e:  # the NAT package may be missing a piece; timm models still work
        return f"{type(e).__name__}: {e}"


def check_model_name(name: str):
    """A ConfigError with the nearest registered name (and why NAT didn't register) for an unknown model."""
    import timm

    registry_problem = import_model_registry()
    if not timm.is_model(name):
        hint = ""
        if registry_problem and name.startswith(("nat", "dinat")):
            hint = f" (the NAT models did not register: {registry_problem})"
        import difflib

        near = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.0)
        raise ConfigError(
            f"unknown model '{name}'{hint}; did you mean '{near[0] if near else '?'}'? "
            "(python -c 'import timm, models; print(timm.list_models())' lists them)"
        )


def create_model(name: str, num_classes: int | None, cfg_model: dict, pretrained: bool = False):
    """timm.create_model from the `model` config section (kwargs, drop rates); bad kwargs: ConfigError."""
    import timm

    check_model_name(name)
    kwargs = dict(cfg_model.get("kwargs") or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    for key in ("drop_rate", "drop_path_rate"):
        if cfg_model.get(key) is not None:
            kwargs[key] = cfg_model[key]
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(
            f"model '{name}' rejected its arguments ({first_line(e)}); fix its kwargs (model.kwargs in a "
            "config, --model-kwargs on the command line; model.drop_path_rate=null for a model without "
            "drop-path)"
        ) from None
    except (RuntimeError, OSError) as e:
        if not pretrained:
            raise
        raise ConfigError(  # offline, no weights published for the name, or a hub error
            f"model '{name}': its pretrained weights could not be loaded ({first_line(e)[:200]}); timm "
            "downloads them from the Hugging Face hub: connect, or give a local file (model.checkpoint)"
        ) from None


def fit_fixed_input_size(cfg_model: dict, img_size) -> None:
    """A model built for one input size (timm's `fixed_input_size`: Swin, ViT) gets `data.img_size` as
    its `img_size` kwarg (recorded in the config), as NAT and ConvNeXt take any size; kwargs naming
    another size are one ConfigError instead of the model's assertion at the first batch."""
    import timm

    if img_size is None:
        return
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg_model["name"])
    if pretrained_cfg is None or not pretrained_cfg.fixed_input_size:
        return

    def pair(size) -> tuple:
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    kwargs = dict(cfg_model.get("kwargs") or {})
    built = kwargs.get("img_size", img_size)
    if pair(built) != pair(img_size):
        raise ConfigError(
            f"model '{cfg_model['name']}' takes one input size: model.kwargs.img_size={built} but "
            f"data.img_size={img_size}; set both to the same size"
        )
    cfg_model["kwargs"] = {**kwargs, "img_size": built}


def parse_model_kwargs(text: str | None) -> dict:
    """A `--model-kwargs` YAML mapping ('{kernel_size: 5}'); anything else: one ConfigError line."""
    import yaml

    try:
        kwargs = yaml.safe_load(text or "{}")
    except yaml.YAMLError as e:
        raise ConfigError(f"--model-kwargs is not YAML ({first_line(e)}): {text!r}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a YAML mapping, got {text!r}")
    return kwargs


def create_model_for_checkpoint(
    name: str, ckpt, sd: dict, path, model_kwargs: str | None = None, num_classes: int | None = None
) -> tuple:
    """(model `name` holding the weights `sd` of checkpoint `ckpt`, its create_model kwargs).

    Checkpoints with settings (this repo's training checkpoints and exported weights) of `name` bring
    their model kwargs and class count; other files get the class count from their classifier.
    `model_kwargs` (YAML: its keys over the checkpoint's) and `num_classes` override both. The weights
    must fit exactly (the family's checkpoint_filter_fn maps official / Hugging Face layouts)."""
    settings = checkpoint_settings(ckpt)
    check_named_model(settings, name, path)
    kwargs = dict(settings.get("model_kwargs") or {})
    kwargs.update(parse_model_kwargs(model_kwargs))  # given keys over the checkpoint's, the rest kept
    num_classes = num_classes or settings.get("num_classes")
    model = create_model(name, num_classes, {"kwargs": kwargs, "drop_path_rate": 0.0})
    if num_classes is None:
        n = checkpoint_num_classes(model, sd)
        if n is not None and n != model.num_classes:
            model.reset_classifier(n)
    load_model_weights(model, sd, path, name, resize_head=False)
    return model, kwargs


def check_named_model(settings: dict, name: str, path) -> None:
    """A file whose settings name its model (this repo's checkpoints and exported weights) goes into
    that model only: NAT and DiNAT weights have the same shapes, and DiNAT run with NAT's weights (and
    the default transform in place of the file's) scored silently."""
    arch = settings.get("arch")
    if arch and arch != name:
        raise CheckpointError(
            f"'{path}' holds {arch} weights (its saved settings say so), not {name}; use {arch}"
        )


def hub_model(name: str, pretrained=False, **kwargs):
    """A torch.hub entry point (hubconf.py): timm.create_model(name, pretrained, **kwargs), except that a
    local checkpoint carrying settings for `name` (this repo's training checkpoints and exported
    weights) brings its model kwargs, class count and eval transform (`model.pretrained_cfg`, what
    timm.data.resolve_data_config reads); `kwargs` win (another num_classes: a fresh classifier)."""
    import os

    import timm

    import_model_registry()
    if isinstance(pretrained, (str, os.PathLike)):
        ckpt = load_checkpoint(pretrained)
        settings = checkpoint_settings(ckpt)
        check_named_model(settings, name, pretrained)
        if settings.get("arch"):
            sd = extract_state_dict(ckpt, pretrained)
            model_kwargs = {**(settings.get("model_kwargs") or {}), **kwargs}
            num_classes = model_kwargs.pop("num_classes", settings.get("num_classes"))
            features = bool(model_kwargs.get("features_only"))
            if features:  # timm wraps the model: the weights go in through timm's pretrained path
                overlay = dict(state_dict=sd, num_classes=settings.get("num_classes"))
                model_kwargs["pretrained_cfg_overlay"] = overlay
            model = create_model(name, num_classes, {"kwargs": model_kwargs}, pretrained=features)
            if not features:
                load_model_weights(model, sd, pretrained, name, resize_head=True)
            data_config = settings.get("data_config") or {}
            model.pretrained_cfg = {
                **model.pretrained_cfg,
                **{
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in data_config.items()
                    if k in DATA_CONFIG_KEYS
                },
                "file": os.fspath(pretrained),
            }
            model.default_cfg = model.pretrained_cfg  # timm's older name, the same dict
            return model
    return timm.create_model(name, pretrained=pretrained, **kwargs)


DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def checkpoint_data_config(model, *layers: dict) -> dict:
    """timm's data config (resolve_data_config) for `model` from settings layers, later ones winning
    and None meaning "not set": e.g. a config's data section, the checkpoint's `data_config`, flags.
    An `img_size` (int or (H, W)) in a layer sets input_size."""
    from timm.data import resolve_data_config

    merged = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key == "img_size" and value is not None:
                h, w = (value, value) if isinstance(value, int) else value
                key, value = "input_size", (3, h, w)
            if key in DATA_CONFIG_KEYS and value is not None and value != "":
                merged[key] = tuple(value) if isinstance(value, list) else value
    return resolve_data_config(merged, model=model)


def export_weights(
    checkpoint: str | Path,
    output: str | Path,
    use_ema: bool = False,
    model_name: str | None = None,
    model_kwargs: str | None = None,
) -> tuple[Path, int]:
    """A checkpoint's (EMA) weights and settings as a weights file; (output path, number of tensors).

    timm's clean_checkpoint: no optimizer / run state / wrapper prefixes. The weights are loaded into
    the model (checkpoints with settings: their own arch; else `model_name` if given), which checks
    them and re-keys official / Hugging Face layouts to this repo's; the file then carries the model's
    settings (checkpoint_settings: arch, kwargs, classes, eval transform) so eval.py, torch.hub and the
    scripts rebuild it alone. Without a model the weights are copied as they are."""
    output = Path(output)
    if output.suffix not in WEIGHTS_FORMATS:
        raise CheckpointError(
            f"output '{output}' must end in one of {', '.join(WEIGHTS_FORMATS)} (the format to write)"
        )
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model_best.pth.tar"
    ckpt = load_checkpoint(path)
    sd = extract_state_dict(ckpt, path, use_ema=use_ema)
    settings = checkpoint_settings(ckpt)
    name = model_name or settings.get("arch")
    if name:
        check_model_name(name)
        model, kwargs = create_model_for_checkpoint(name, ckpt, sd, path, model_kwargs=model_kwargs)
        sd = model.state_dict()
        same_arch = settings.get("arch") == name
        settings = {
            "arch": name,
            "model_kwargs": kwargs,
            "num_classes": model.num_classes,
            "classes": settings.get("classes") if same_arch else None,
            "data_config": settings.get("data_config") if same_arch else None,
        }
        if settings["data_config"] is None:  # a foreign file: the model's own (pretrained cfg) transform
            dc = checkpoint_data_config(model)
            settings["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dc.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(sd, output, settings), len(sd)


def unwrap(model):
    """The model inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def data_build_config(cfg: dict) -> dict:
    """The subset of `data` that data.build_datasets takes (the rest is loader/transform settings)."""
    from data.builder import DEFAULTS as BUILD_KEYS

    return {k: cfg["data"][k] for k in BUILD_KEYS}


def has_na(model) -> bool:
    from models.layers import NeighborhoodAttention2D

    return any(isinstance(m, NeighborhoodAttention2D) for m in model.modules())


def predicted_na_backend(model, device, dtype, train: bool = True) -> str:
    """The NA backend `auto` picks for `model`'s steps on `device` in `dtype`
    (models.layers.explain_backends), or why there is none."""
    import torch

    from models.layers import explain_backends

    if not has_na(model):
        return "none (no NA layers)"
    q = torch.empty(1, 7, 7, 2, 32, device=device, dtype=dtype)
    return explain_backends(q, rpb=torch.zeros(2, 13, 13, device=device), requires_grad=train).name
