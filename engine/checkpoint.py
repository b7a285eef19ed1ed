"""Checkpoint I/O: reading any checkpoint file, the settings it carries, finding the model weights
in it, fitting them to a model (classifier resize, the family's checkpoint_filter_fn), and the
atomic training saves.

`load_checkpoint` is the one function that opens a checkpoint file (torch.load with
weights_only=True, or safetensors for a `.safetensors` file); a new format is added there and every
caller gets it. `SETTINGS_KEYS` / `checkpoint_settings` are the one place that says which model and
data settings a checkpoint carries (a training checkpoint, an exported .pth, a .safetensors file's
metadata) and reads them back; `save_weights` writes them with exported weights.
Training checkpoints carry `CHECKPOINT_FORMAT` and everything an exact resume needs.

This module is the lower layer: it builds no models (engine/factory.py builds on it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from engine.errors import CheckpointError, first_line

CHECKPOINT_FORMAT = "nat-classification/1"
# What a checkpoint says about its model and data, under these keys in every file kind: top-level
# entries of a training checkpoint or an exported .pth ({"state_dict": ..., **settings}), JSON
# strings in a .safetensors file's metadata. arch: timm model name; model_kwargs: its create_model
# kwargs; num_classes / classes: outputs and their names; data_config: the eval transform (timm's
# resolve_data_config: input_size, mean, std, crop_pct, crop_mode, interpolation).
SETTINGS_KEYS = ("arch", "model_kwargs", "num_classes", "classes", "data_config")


def checkpoint_settings(ckpt) -> dict:
    """The model and data settings `ckpt` (as `load_checkpoint` returns it) carries: the keys of
    SETTINGS_KEYS it has; {} for files that say nothing about their model (timm's, official, HF)."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or not ckpt.get("arch"):
        return {}
    return {k: ckpt[k] for k in SETTINGS_KEYS if ckpt.get(k) is not None}


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Read a checkpoint file, or a run folder's weights: its model_best.pth.tar (what eval.py scores
    and export_weights.py writes; its last.pth.tar where there is none), so a run folder means the same
    weights to every tool; resuming names last.pth.tar itself. The one place that opens a checkpoint.

    torch.load(weights_only=True), or safetensors' loader for a `.safetensors` file (a flat state
    dict); a one-line error for every way a file can be wrong. `mmap`: tensors stay in the file until
    read (for a look at a checkpoint's settings; torch.save's zip files only)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model_best.pth.tar", "last.pth.tar"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(
                f"no model_best.pth.tar or last.pth.tar in folder '{path}'; give a checkpoint file"
            )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; check the path")
    if path.suffix == ".safetensors":  # by extension, as timm's load_state_dict
        return _load_safetensors(path)
    try:
        # timm's train.py stores its argparse.Namespace under 'args'; timm's own loader allows it too
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle/zip errors have many types
        # torch's own text for objects a weights-only load refuses advises weights_only=False: not ours
        reason = (
            "it holds Python objects beyond tensors and plain containers"
            if "Weights only load failed" in str(e)
            else f"torch.load: {type(e).__name__}: {first_line(e)[:200]}"
        )
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({reason}); give a PyTorch .pth/.pth.tar file of weights "
            "(torch.load(weights_only=True) reads it) or a .safetensors file"
        ) from None


def _load_safetensors(path: Path) -> dict:
    """A .safetensors file: a flat name -> tensor dict (weights only: no optimizer, no run state), or
    {"state_dict": tensors, **settings} when its metadata carries settings (scripts/export_weights.py)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        settings = {k: json.loads(metadata[k]) for k in SETTINGS_KEYS if k in metadata}
    except (SafetensorError, OSError, ValueError) as e:  # json's errors are ValueErrors
        raise CheckpointError(
            f"cannot read safetensors file '{path}' ({first_line(e)[:200]}); it must be a safetensors "
            "file of tensors (e.g. written by scripts/export_weights.py or safetensors.torch.save_file)"
        ) from None
    return {"state_dict": tensors, **settings} if settings.get("arch") else tensors


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, settings: dict | None = None) -> Path:
    """Write weights (timm's clean_checkpoint output) and the `settings` (SETTINGS_KEYS) they carry:
    .safetensors by extension (settings as JSON strings in its metadata), else torch.save of a bare
    state dict, or of {"state_dict": ..., **settings} with settings (timm's load_state_dict reads both).

    Tensors are made contiguous and un-shared (safetensors refuses aliased or strided storage); the
    file is written next to its target and renamed, so a failed export leaves no partial file."""
    settings = {k: v for k, v in (settings or {}).items() if k in SETTINGS_KEYS and v is not None}
    path = Path(path)
    tensors, storages = {}, set()
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        if v.untyped_storage().data_ptr() in storages:
            v = v.clone()
        storages.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", **{k: json.dumps(v, sort_keys=True) for k, v in settings.items()}}
        save_file(tensors, tmp, metadata=metadata)
        # safetensors writes 0600; a weights file is for sharing: the umask's mode, as torch.save's
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    else:
        torch.save({"state_dict": tensors, **settings} if settings else tensors, tmp)
    os.replace(tmp, path)
    return path


WEIGHTS_FORMATS = (".safetensors", ".pth", ".pt", ".bin")


def extract_state_dict(ckpt, path, use_ema: bool = False) -> dict:
    """The model weights inside ours / timm's / official NAT's / a raw state_dict."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{path}' holds a {type(ckpt).__name__}, not a model state_dict")
    if use_ema:
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(ckpt.get(key), dict):
                return strip_prefix(ckpt[key])
        raise CheckpointError(f"'{path}' has no EMA weights (state_dict_ema); drop the EMA option")
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(ckpt.get(key), dict):
            return strip_prefix(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefix(ckpt)
    raise CheckpointError(f"'{path}' has no model weights (no state_dict/model entry of tensors)")


def strip_prefix(sd: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def classifier_names(model) -> list[str]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return [cls] if isinstance(cls, str) else list(cls)


def checkpoint_num_classes(model, sd: dict) -> int | None:
    """The class count of `sd`'s classifier for `model`'s family (official / Hugging Face NAT layouts
    read in this repo's key names, where their classifier is `head` / `classifier`); None: headless."""
    from models.nat import NAT, native_state_dict

    if isinstance(model, NAT):
        sd = native_state_dict(sd)
    for name in classifier_names(model):
        w = sd.get(f"{name}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


def load_model_weights(model, sd: dict, path, model_name: str, resize_head: bool) -> list[str]:
    """Load `sd` into `model`; the classifier may be re-initialised (fine-tuning to a subset).

    Official NAT/DiNAT files and timm files go through the model family's `checkpoint_filter_fn`
    (as timm's pretrained loading does). Anything else that does not fit is an error.
    """
    model_sd = model.state_dict()
    heads = tuple(n + "." for n in classifier_names(model))
    head_change = [
        f"{k} {list(v.shape)} vs model {list(model_sd[k].shape)}"
        for k, v in sd.items()
        if k.startswith(heads)
        and k in model_sd
        and v.shape != model_sd[k].shape
        and v.shape[1:] == model_sd[k].shape[1:]  # only the number of classes differs
    ]
    if head_change and not resize_head:
        raise CheckpointError(
            f"checkpoint '{path}' does not match model '{model_name}': classifier {head_change[0]}; "
            "create the model with the checkpoint's number of classes"
        )
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(dict(sd), model)
        except Exception as e:  # the family's filter knows its format best: pass its reason on
            raise CheckpointError(
                f"checkpoint '{path}' does not match model '{model_name}': {first_line(e)}"
            ) from None
    dropped, mismatched = [], []
    for k in list(sd):
        if k in model_sd and sd[k].shape != model_sd[k].shape:
            if resize_head and k.startswith(heads):
                dropped.append(k)
                del sd[k]
            else:
                mismatched.append(f"{k} {list(sd[k].shape)} vs model {list(model_sd[k].shape)}")
    if head_change:
        dropped += [k for k in model_sd if k.startswith(heads) and k not in dropped]
        for k in dropped:
            sd[k] = model_sd[k]  # keep the fresh initialisation
    missing = [k for k in model_sd if k not in sd and k not in dropped]
    unexpected = [k for k in sd if k not in model_sd]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"checkpoint '{path}' does not match model '{model_name}': {'; '.join(parts)}. "
            "Pick the model (and model.kwargs) the checkpoint was trained with"
        )
    model.load_state_dict(sd, strict=False)
    return dropped


def make_saver_class():
    """The saver class, built on first use (timm is imported lazily: errors in the command line and
    config report before the import)."""
    from timm.utils import CheckpointSaver

    class RunCheckpointSaver(CheckpointSaver):
        """timm's CheckpointSaver (last + best-k + model_best, atomic replace) plus the extra state
        that an exact resume needs (scheduler, step, data position, RNG, config)."""

        def __init__(self, *a, extra_state=None, **kw):
            super().__init__(*a, **kw)
            self.extra_state = extra_state

        def _save(self, save_path, epoch, metric=None):
            from timm.utils.model import get_state_dict

            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "optimizer": self.optimizer.state_dict(),
                "version": 2,
                "state_dict": get_state_dict(self.model, self.unwrap_fn),
            }
            if self.model_ema is not None:
                state["state_dict_ema"] = get_state_dict(self.model_ema, self.unwrap_fn)
            if self.amp_scaler is not None:
                state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
            if metric is not None:
                state["metric"] = metric
            state["saver"] = self.state_dict(epoch if metric is not None else None, metric)
            if self.extra_state is not None:
                state.update(self.extra_state())
            with open(save_path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        def save_last(self):
            """Mid-epoch save (interrupt): replaces last.pth.tar atomically, no history entry."""
            tmp = os.path.join(self.checkpoint_dir, "tmp" + self.extension)
            last = os.path.join(self.checkpoint_dir, "last" + self.extension)
            self._save(tmp, -1)
            self._replace(tmp, last)
            return last

    return RunCheckpointSaver
