"""NAT / DiNAT image classifiers. Importing this package registers every variant with timm and every
token mixer of the attention zoo (`MIXERS`, usable as `timm.create_model("nat_mini", mixer=...)`)."""

from . import mixers, nat
from .flops import count_flops
from .mixers import MIXERS
from .nat import NAT, checkpoint_filter_fn

__all__ = ["MIXERS", "NAT", "checkpoint_filter_fn", "count_flops", "mixers", "nat"]
