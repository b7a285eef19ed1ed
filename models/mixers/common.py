"""Pieces every zoo mixer shares: the qkv/projection pair, padding a map to a block multiple, and
blocked (dense, masked) attention of query blocks against their keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.backends.windows import geometry_cache


class QKVMixer(nn.Module):
    """Base of the attention mixers: `qkv` and `proj` linears named as in NAT's NA module.

    Subclasses implement `forward(x: (B, H, W, C)) -> (B, H, W, C)`; `split_heads` gives q, k, v as
    `(B, heads, H, W, head_dim)` from one packed projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, H, W, C)` -> q, k, v, each `(B, heads, H, W, head_dim)`."""
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, heads, H, W, head_dim)` -> projected `(B, H, W, C)`."""
        B, _, H, W, _ = x.shape
        return self.proj_drop(self.proj(x.permute(0, 2, 3, 1, 4).reshape(B, H, W, self.dim)))

    @property
    def dropout_p(self) -> float:
        """Attention dropout to apply now (none in eval)."""
        return self.attn_drop if self.training else 0.0


def pad_to_multiple(x: torch.Tensor, multiple_h: int, multiple_w: int | None = None) -> torch.Tensor:
    """Zero-pad a `(B, H, W, C)` map bottom/right so H and W are multiples; crop with `[:, :H, :W]`."""
    multiple_w = multiple_h if multiple_w is None else multiple_w
    H, W = x.shape[1], x.shape[2]
    pad_h, pad_w = -H % multiple_h, -W % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def valid_token_mask(height: int, width: int, padded_h: int, padded_w: int, device=None) -> torch.Tensor:
    """`(padded_h, padded_w)` bool map: True on real tokens, False on the padding `pad_to_multiple` added."""
    rows = torch.arange(padded_h, device=device) < height
    cols = torch.arange(padded_w, device=device) < width
    return rows[:, None] & cols[None, :]


# Option checks of every zoo family: one ValueError naming the mixer, the option and the valid range.


def check_size(mixer: str, option: str, value: object, minimum: int = 1, *, even: bool = False) -> None:
    """One ValueError unless `value` is an int >= `minimum` (a window, block, token count), even if asked."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (even and value % 2):
        kind = "an even integer" if even else "an integer"
        raise ValueError(f"mixer {mixer!r}: {option} must be {kind} >= {minimum}, got {value!r}")


def check_odd_size(mixer: str, option: str, value: object) -> None:
    """One ValueError unless `value` is an odd int >= 1 (a window centred on its query)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(
            f"mixer {mixer!r}: {option} must be an odd integer >= 1 (a window centred on the query), "
            f"got {value!r}"
        )


def check_positive(mixer: str, option: str, value: object) -> None:
    """One ValueError unless `value` is a real number > 0 (a temperature, a rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"mixer {mixer!r}: {option} must be a number > 0, got {value!r}")


def reject_unused(mixer: str, qk_scale: float | None = None, attn_drop: float = 0.0) -> None:
    """Refuse block options a mechanism has nothing to apply to (no q·k logits, no attention matrix)."""
    if qk_scale is not None:
        raise ValueError(
            f"mixer {mixer!r} has no q·k logits to scale: leave qk_scale=None (got {qk_scale!r})"
        )
    if attn_drop:
        raise ValueError(
            f"mixer {mixer!r} forms no attention matrix to drop out: use attn_drop=0.0 and proj_drop "
            f"instead (got attn_drop={attn_drop!r})"
        )


def learned_global_tokens(num_global: int, dim: int) -> nn.Parameter | None:
    """`(num_global, dim)` learned tokens (trunc-normal 0.02, as timm's class tokens); None for none."""
    if num_global == 0:
        return None
    tokens = nn.Parameter(torch.zeros(num_global, dim))
    nn.init.trunc_normal_(tokens, std=0.02)
    return tokens


def global_token_keys(
    mixer: QKVMixer, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Let learned global tokens attend to every token, then give the keys/values they are attended by.

    tokens: `(G, C)`; k, v: the map's `(B, heads, N, head_dim)`. Each global token's query attends to
    all N tokens and the G global tokens (one SDPA, cost N*G); its update is added back through
    `mixer.proj` (a residual, as a transformer layer would), and the updated tokens are projected
    with `mixer.qkv`'s key/value rows. Returns keys, values `(B, heads, G, head_dim)`. Done per block
    (nothing carried between blocks), so the global tokens' pooling over the map reaches every query
    in the same block.
    """
    B, G, C = k.shape[0], tokens.shape[0], mixer.dim
    qg, kg, vg = mixer.qkv(tokens).reshape(G, 3, mixer.num_heads, mixer.head_dim).permute(1, 2, 0, 3)
    keys = torch.cat([k, kg.expand(B, -1, -1, -1)], dim=2)
    values = torch.cat([v, vg.expand(B, -1, -1, -1)], dim=2)
    pooled = F.scaled_dot_product_attention(
        qg.expand(B, -1, -1, -1), keys, values, dropout_p=mixer.dropout_p, scale=mixer.scale
    )
    updated = tokens + mixer.proj(pooled.transpose(1, 2).reshape(B, G, C))
    bias = mixer.qkv.bias[C:] if mixer.qkv.bias is not None else None
    kv = F.linear(updated, mixer.qkv.weight[C:], bias).reshape(B, G, 2, mixer.num_heads, mixer.head_dim)
    key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return key, value


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA of many small blocks: q `(*batch, L, D)`, k / v `(*batch, S, D)`, `mask` (bool, or a float
    bias with -inf) broadcastable to `(*batch, L, S)`.

    Runs as one 4-D call over the flattened batch: torch's fused CPU kernel takes 4-D inputs only,
    and beats the math path that 5-D inputs fall back to by ~2x forward+backward.
    """
    *batch, L, D = q.shape
    S = k.shape[-2]
    mask = mask.expand(*batch, mask.shape[-2], S).reshape(-1, 1, mask.shape[-2], S)
    out = F.scaled_dot_product_attention(
        q.reshape(-1, 1, L, D),
        k.reshape(-1, 1, S, D),
        v.reshape(-1, 1, S, v.shape[-1]),
        mask,
        dropout_p,
        scale=scale,
    )
    return out.view(*batch, L, v.shape[-1])


# Queries per block side in `blocked_window_attention`: larger blocks run fewer, larger matmuls but
# compute more masked logits ((b + k - 1)^2 per query for k^2 used).
QUERY_BLOCK = 7


def _axis_blocks(keys: torch.Tensor, real: torch.Tensor, bias: torch.Tensor, dilation: int, block: int):
    """Cut one axis's queries into blocks and give each block the union of its queries' window keys.

    keys, real, bias: `(n, k)` key position, whether it is a real key, and RPB row of each query's
    window slot. Queries of one block share a dilation group (`i % dilation`), `block` of them
    (the group's last block is filled by repeating its last query; those slots are never read).
    An axis whose groups are shorter than `block` takes blocks of the longest group's length.
    Returns `queries (nb, block)`, `keys (nb, S)` (S: the largest union; short ones are filled with
    key 0, never allowed), `allowed (nb, block, S)`, `bias (nb, block, S)` (0 where not allowed) and
    `inverse (n,)`: the flat (block, slot) of each position, to read the outputs back.
    """
    n = keys.shape[0]
    block = min(block, -(-n // dilation))
    chunks = [  # a map side shorter than the dilation has only n groups, one position each
        chunk
        for g in range(min(dilation, n))
        for chunk in torch.arange(g, n, dilation).split(block)
        if len(chunk)
    ]
    queries = torch.stack([F.pad(c, (0, block - len(c)), value=int(c[-1])) for c in chunks])
    unions = [keys[c][real[c]].unique() for c in chunks]  # sorted
    S = max(len(u) for u in unions)
    block_keys = torch.stack([F.pad(u, (0, S - len(u))) for u in unions])
    filled = torch.arange(S) < torch.tensor([len(u) for u in unions])[:, None]
    # (nb, block, S, k): which window slot of the query a key of the block is
    match = (block_keys[:, None, :, None] == keys[queries][:, :, None]) & real[queries][:, :, None]
    match &= filled[:, None, :, None]
    allowed = match.any(-1)
    slot_bias = (match * bias[queries][:, :, None]).sum(-1)
    inverse = torch.empty(n, dtype=torch.long)
    flat = queries.flatten()
    for i in reversed(range(len(flat))):  # the first slot of each position wins
        inverse[flat[i]] = i
    return queries, block_keys, allowed, slot_bias, inverse


@geometry_cache(maxsize=64)
def _window_block_geometry(height: int, width: int, windows: tuple, block: int, bias_span: int, device: str):
    """2-D blocks of `blocked_window_attention` (see there for `windows`)."""
    axis_windows, *options = windows
    rows = _axis_blocks(*axis_windows(height, *options), block=block)
    cols = _axis_blocks(*axis_windows(width, *options), block=block)
    (nbh, bh), (nbw, bw) = rows[0].shape, cols[0].shape
    L, S = bh * bw, rows[1].shape[1] * cols[1].shape[1]
    allowed = rows[2][:, None, :, None, :, None] & cols[2][None, :, None, :, None, :]
    bias = rows[3][:, None, :, None, :, None] * bias_span + cols[3][None, :, None, :, None, :]
    allowed, bias = (t.reshape(nbh * nbw, L, S) for t in (allowed, bias))
    # blocks away from the borders share one pattern: the RPB is gathered once per distinct pattern
    # (-1: masked), then copied per block, so its gradient is a sum over blocks, not a scatter
    patterns, pattern_of_block = torch.where(allowed, bias, -1).unique(dim=0, return_inverse=True)
    index = (rows[0].flatten(), cols[0].flatten(), rows[1].flatten(), cols[1].flatten())
    return (
        (nbh, nbw, bh, bw, rows[1].shape[1], cols[1].shape[1]),
        [t.to(device) for t in index],
        [t.to(device) for t in (rows[4], cols[4])],
        allowed.to(device),
        (patterns.to(device), pattern_of_block.to(device)),
    )


def blocked_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: tuple,
    block: int,
    rpb: torch.Tensor | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each query to its own window of keys (and to shared extra keys, in one softmax),
    computed blocked: exact, but dense math instead of a per-query gather.

    q, k, v: `(B, heads, H, W, D)`. `windows = (function, *options)`, a key of the geometry cache:
    `function(n, *options)` gives one axis's windows as `(keys, real, bias, dilation)`: `(n, k)` key
    positions, whether each is a real key, the RPB row of each slot, and the dilation; a query (i, j) attends
    to the keys (y, x) with y in its row window and x in its column window (both real), with bias
    `rpb[h, row bias, col bias]`. Queries run `block x block` at a time (within one dilation group)
    against the union of their windows: one SDPA over all blocks, a per-query mask inside the block's
    key set. So each query computes (block + k - 1)^2 logits, k^2 of them unmasked. extra_k /
    extra_v: `(B, heads, G, D)` keys every query also attends to (global tokens, no bias).
    Returns `(B, heads, H, W, D)`.
    """
    B, heads, H, W, D = q.shape
    span = rpb.shape[-1] if rpb is not None else 1
    (nbh, nbw, bh, bw, sh, sw), index, inverse, allowed, (patterns, pattern_of_block) = (
        _window_block_geometry(H, W, windows, block, span, str(q.device))
    )
    rows_q, cols_q, rows_k, cols_k = index

    def gather(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
        t = t.index_select(2, rows).index_select(3, cols).reshape(B, heads, nbh, bh, nbw, bw, -1)
        return t.permute(0, 2, 4, 1, 3, 5, 6).reshape(B, nbh * nbw, heads, bh * bw, -1)

    qb = gather(q, rows_q, cols_q, bh, bw)
    kb, vb = gather(k, rows_k, cols_k, sh, sw), gather(v, rows_k, cols_k, sh, sw)
    if rpb is None:
        mask = allowed[:, None]
    else:
        table = rpb.to(q.dtype).flatten(1)[:, patterns.clamp(min=0)].masked_fill(patterns < 0, float("-inf"))
        mask = table.transpose(0, 1).index_select(0, pattern_of_block)  # (nb, heads, L, S)
    if extra_k is not None:
        G = extra_k.shape[2]
        kb = torch.cat([kb, extra_k[:, None].expand(-1, nbh * nbw, -1, -1, -1)], 3)
        vb = torch.cat([vb, extra_v[:, None].expand(-1, nbh * nbw, -1, -1, -1)], 3)
        unmasked = torch.ones if mask.dtype == torch.bool else torch.zeros  # no bias on the extra keys
        mask = torch.cat([mask, unmasked(*mask.shape[:-1], G, dtype=mask.dtype, device=mask.device)], -1)
    out = blocked_attention(qb, kb, vb, mask, dropout_p, scale)  # (B, nb, heads, L, D)
    out = out.reshape(B, nbh, nbw, heads, bh, bw, -1).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.reshape(B, heads, nbh * bh, nbw * bw, -1)
    return out.index_select(2, inverse[0]).index_select(3, inverse[1])
