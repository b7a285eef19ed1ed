from .backends.checks import BackendChoice, explain_backends, select_backend
from .functional import (
    neighborhood_attention_2d,
    neighborhood_attention_2d_qkvpacked,
    neighborhood_attention_weights,
    use_backend,
)
from .neighborhood_attention import NeighborhoodAttention2D

__all__ = [
    "BackendChoice",
    "NeighborhoodAttention2D",
    "explain_backends",
    "neighborhood_attention_2d",
    "neighborhood_attention_2d_qkvpacked",
    "neighborhood_attention_weights",
    "select_backend",
    "use_backend",
]
