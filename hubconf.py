"""torch.hub entry points: `torch.hub.load(<repo path>, 'nat_tiny', source='local', pretrained=...)`.

`pretrained` is False (random init), True (download the official checkpoint: needs network) or a
local checkpoint path (.pth or .safetensors; official, Hugging Face or this repo's key layout; no
network). Other keyword arguments go to the model (e.g. `num_classes=10`, `drop_path_rate=0.1`,
`pretrained_cfg_overlay=dict(file=...)`).
"""

dependencies = ["torch", "timm"]

from models.nat import (  # noqa: E402  (torch.hub reads `dependencies` first)
    dinat_base,
    dinat_large,
    dinat_large_11x11,
    dinat_large_384,
    dinat_large_384_11x11,
    dinat_mini,
    dinat_small,
    dinat_tiny,
    nat_base,
    nat_mini,
    nat_small,
    nat_tiny,
)

__all__ = [
    "dinat_base",
    "dinat_large",
    "dinat_large_11x11",
    "dinat_large_384",
    "dinat_large_384_11x11",
    "dinat_mini",
    "dinat_small",
    "dinat_tiny",
    "nat_base",
    "nat_mini",
    "nat_small",
    "nat_tiny",
]
