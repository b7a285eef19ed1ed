"""NAT / DiNAT image classifiers. Importing this package registers every variant with timm."""

from . import nat
from .flops import count_flops
from .nat import NAT, checkpoint_filter_fn

__all__ = ["NAT", "checkpoint_filter_fn", "count_flops", "nat"]
