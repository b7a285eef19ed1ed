"""BigBird's block-sparse attention (Zaheer et al. 2020) on 2-D blocks: window + random + global."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.backends.windows import window_indices
from . import register_mixer
from .common import (
    QKVMixer,
    blocked_attention,
    check_size,
    global_token_keys,
    learned_global_tokens,
    pad_to_multiple,
)


def _to_blocks(t: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """`(B, heads, Hp, Wp, D)` -> `(B, heads, num_blocks, bh * bw, D)`, blocks in row-major order."""
    B, heads, Hp, Wp, D = t.shape
    t = t.reshape(B, heads, Hp // bh, bh, Wp // bw, bw, D).transpose(3, 4)
    return t.reshape(B, heads, -1, bh * bw, D)


@register_mixer("bigbird")
class BigBirdAttention(QKVMixer):
    """Block-sparse attention: each query block sees its 3x3 neighbour blocks, random blocks and
    global tokens.

    The map is cut into `block_size x block_size` blocks (zero-padded bottom/right, the padding
    masked out of the keys; an axis shorter than the block is one block). Every query of block
    `(bi, bj)` attends, in one softmax, to:
    * the 3 x 3 blocks around it, the window clamped inside the block grid as NA's is (all the
      blocks on a grid axis of fewer than 3), so always 9 blocks when the grid allows;
    * `num_random` other blocks per head, drawn without replacement among the blocks not in that
      window (fewer when fewer remain): a fixed pattern per grid size, drawn from the module's
      `random_seed` buffer (saved with the weights), the same in training and eval, so outputs
      depend only on the weights and the input;
    * `num_global` learned global tokens, which attend to every token (`common.global_token_keys`).
    No positional bias (as BigBird). Cost: (9 + num_random) * block_size^2 + num_global keys per
    query, one SDPA per query block over its gathered key blocks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        block_size: int = 7,
        num_random: int = 2,
        num_global: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        check_size("bigbird", "block_size", block_size)
        check_size("bigbird", "num_random", num_random, minimum=0)
        check_size("bigbird", "num_global", num_global, minimum=0)
        self.block_size = block_size
        self.num_random = num_random
        self.num_global = num_global
        self.global_tokens = learned_global_tokens(num_global, dim)
        # drawn from torch's RNG like the weights (a seeded model gets the same pattern), on the CPU so
        # a model built on the meta device keeps it too
        self.register_buffer("random_seed", torch.randint(2**31 - 1, (), device="cpu"))
        self._patterns: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"global_tokens"} if self.global_tokens is not None else set()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._patterns.clear()  # a loaded random_seed draws other random blocks

    def key_blocks(self, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(heads, num_blocks, slots)` key-block index of every query block and whether the slot is used.

        Slots: the window blocks, then `num_random` random ones (unused slots: index 0, False).
        """
        with torch.inference_mode(False):
            rows = window_indices(grid_h, min(3, grid_h))
            cols = window_indices(grid_w, min(3, grid_w))
            window = (rows[:, None, :, None] * grid_w + cols[None, :, None, :]).reshape(grid_h * grid_w, -1)
            num_blocks = grid_h * grid_w
            seed = 0 if self.random_seed.is_meta else int(self.random_seed)
            generator = torch.Generator().manual_seed(seed)
            random = torch.zeros(self.num_heads, num_blocks, self.num_random, dtype=torch.long)
            used = torch.zeros(self.num_heads, num_blocks, self.num_random, dtype=torch.bool)
            for block in range(num_blocks):
                others = torch.ones(num_blocks, dtype=torch.bool)
                others[window[block]] = False
                others = others.nonzero().flatten()
                take = min(self.num_random, len(others))
                for head in range(self.num_heads):
                    random[head, block, :take] = others[
                        torch.randperm(len(others), generator=generator)[:take]
                    ]
                    used[head, block, :take] = True
            index = torch.cat([window.expand(self.num_heads, -1, -1), random], dim=-1)
            used = torch.cat(
                [torch.ones_like(window, dtype=torch.bool).expand(self.num_heads, -1, -1), used], -1
            )
        return index, used

    def _pattern(self, grid_h: int, grid_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid_h, grid_w, str(device))
        if key not in self._patterns:
            with torch.inference_mode(False):  # an inference tensor could not serve a later training step
                self._patterns[key] = tuple(t.to(device) for t in self.key_blocks(grid_h, grid_w))
        return self._patterns[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        bh, bw = min(self.block_size, H), min(self.block_size, W)
        q, k, v = self.split_heads(pad_to_multiple(x, bh, bw))  # (B, heads, Hp, Wp, D)
        Hp, Wp = q.shape[2:4]
        grid_h, grid_w = Hp // bh, Wp // bw
        index, used = self._pattern(grid_h, grid_w, x.device)  # (heads, num_blocks, slots)
        real = (torch.arange(Hp, device=x.device) < H)[:, None] & (torch.arange(Wp, device=x.device) < W)
        real = real.reshape(grid_h, bh, grid_w, bw).transpose(1, 2).reshape(grid_h * grid_w, bh * bw)
        heads = torch.arange(self.num_heads, device=x.device)[:, None, None]
        # (B, heads, num_blocks, slots * block tokens, D): the key blocks each query block attends to
        keys = _to_blocks(k, bh, bw)[:, heads, index].flatten(3, 4)
        values = _to_blocks(v, bh, bw)[:, heads, index].flatten(3, 4)
        mask = (used[..., None] & real[index]).flatten(2)  # (heads, num_blocks, slots * block tokens)
        if self.global_tokens is not None:
            flat = (t[:, :, :H, :W].flatten(2, 3) for t in (k, v))  # the map's real tokens only
            global_k, global_v = (
                t[:, :, None].expand(-1, -1, mask.shape[1], -1, -1)
                for t in global_token_keys(self, self.global_tokens, *flat)
            )
            keys = torch.cat([keys, global_k], dim=3)
            values = torch.cat([values, global_v], dim=3)
            mask = F.pad(mask, (0, self.num_global), value=True)
        out = blocked_attention(
            _to_blocks(q, bh, bw), keys, values, mask[:, :, None], self.dropout_p, self.scale
        )  # (B, heads, num_blocks, block tokens, D)
        out = out.reshape(B, self.num_heads, grid_h, grid_w, bh, bw, -1).transpose(3, 4)
        return self.merge_heads(out.reshape(B, self.num_heads, Hp, Wp, -1)[:, :, :H, :W])

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, block_size={self.block_size}, num_random={self.num_random}, "
            f"num_global={self.num_global}"
        )
