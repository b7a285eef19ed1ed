"""Backends of `neighborhood_attention_2d`: one module each; `checks` decides which can run."""
