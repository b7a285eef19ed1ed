"""Keeps timm's RandAugment working on current Pillow.

timm's `PosterizeIncreasing` (the `inc1` RandAugment of the recipes) keeps 4 - level * 4 / 10 bits:
0 bits at magnitude 10, which `mstd0.5` noise reaches from m9. Pillow 13 (this repo's) refuses
`ImageOps.posterize(img, 0)`, where older Pillow returned the black image that keeping no bits means,
so a run died in whichever epoch first drew it. `posterize_bits` restores that meaning for every
posterize op timm has; it is installed once, when `data` is imported, and only where Pillow refuses.
"""

from __future__ import annotations

from PIL import Image, ImageOps


def posterize_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's `posterize` with 0 bits kept giving a black image, as older Pillow did."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_refuses_zero_bits() -> bool:
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return True
    return False


def install() -> None:
    from timm.data import auto_augment

    if _pillow_refuses_zero_bits():
        for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
            if name in auto_augment.NAME_TO_OP:
                auto_augment.NAME_TO_OP[name] = posterize_bits
