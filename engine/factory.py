"""Building things from the resolved config: the model (checked against timm's registry) and the
data settings that data.build_datasets takes.

Owns the mapping from config sections to timm / data calls, so train, eval and scripts make models
the same way. `import models` here is what registers nat_* / dinat_* with timm.
"""

from __future__ import annotations

from configs import ConfigError
from engine.errors import first_line


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
            f"model '{name}' rejected its arguments ({first_line(e)}); fix model.kwargs "
            "(or set model.drop_path_rate=null for a model without drop-path)"
        ) from None


def create_model_for_checkpoint(
    name: str, ckpt, sd: dict, path, model_kwargs: str | None = None, num_classes: int | None = None
) -> tuple:
    """(model `name` holding the weights `sd` of checkpoint `ckpt`, its create_model kwargs).

    This repo's checkpoints of `name` bring their model kwargs and class count; other files get the
    class count from their classifier. `model_kwargs` (YAML) and `num_classes` override both. The weights
    must fit exactly (the family's checkpoint_filter_fn maps official / Hugging Face layouts)."""
    import yaml

    from engine.checkpoint import checkpoint_num_classes, load_model_weights

    same_arch = isinstance(ckpt, dict) and "state_dict" in ckpt and ckpt.get("arch") == name
    kwargs = (ckpt.get("model_kwargs") or {}) if same_arch else {}
    if model_kwargs:
        kwargs = yaml.safe_load(model_kwargs)
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a YAML mapping, got {model_kwargs!r}")
    num_classes = num_classes or (ckpt.get("num_classes") if same_arch else None)
    model = create_model(name, num_classes, {"kwargs": kwargs, "drop_path_rate": 0.0})
    if num_classes is None:
        n = checkpoint_num_classes(model, sd)
        if n is not None and n != model.num_classes:
            model.reset_classifier(n)
    load_model_weights(model, sd, path, name, resize_head=False)
    return model, kwargs


def unwrap(model):
    """The model inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def data_build_config(cfg: dict) -> dict:
    """The subset of `data` that data.build_datasets takes (the rest is loader/transform settings)."""
    from data.builder import DEFAULTS as BUILD_KEYS

    return {k: cfg["data"][k] for k in BUILD_KEYS}
