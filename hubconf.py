"""torch.hub entry points: `torch.hub.load(<repo path>, 'nat_tiny', source='local', pretrained=...)`.

`pretrained` is False (random init), True (download the official checkpoint: needs network) or a
local checkpoint path (.pth or .safetensors; official, Hugging Face or this repo's key layout; no
network). This repo's training checkpoints and exported weights bring their own model settings
(kwargs such as embed_dim / depths, the class count) and eval transform (`model.pretrained_cfg`:
input size, mean/std, crop, what `timm.data.resolve_data_config(model=model)` reads). Other keyword
arguments go to the model and win over the checkpoint's (e.g. `num_classes=10`: a fresh classifier,
`drop_path_rate=0.1`, `pretrained_cfg_overlay=dict(file=...)`).
"""

dependencies = ["torch", "timm"]

from engine.factory import hub_model  # noqa: E402  (torch.hub reads `dependencies` first)


def _entry_point(name: str):
    def entry_point(pretrained=False, **kwargs):
        return hub_model(name, pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = f"timm.create_model('{name}', pretrained, **kwargs); see hubconf's docstring."
    return entry_point


dinat_base = _entry_point("dinat_base")
dinat_large = _entry_point("dinat_large")
dinat_large_11x11 = _entry_point("dinat_large_11x11")
dinat_large_384 = _entry_point("dinat_large_384")
dinat_large_384_11x11 = _entry_point("dinat_large_384_11x11")
dinat_mini = _entry_point("dinat_mini")
dinat_small = _entry_point("dinat_small")
dinat_tiny = _entry_point("dinat_tiny")
nat_base = _entry_point("nat_base")
nat_mini = _entry_point("nat_mini")
nat_small = _entry_point("nat_small")
nat_tiny = _entry_point("nat_tiny")
