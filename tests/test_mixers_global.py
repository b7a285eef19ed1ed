"""The global / content-based zoo mixers against float64 references written here from each definition.

Each reference recomputes q, k, v from the module's weights and builds the attention the mechanism
defines (densely, N x N, where the module never does); outputs and gradients (input and every
parameter) must agree. `count_flops` must charge each mixer the multiply-adds its mechanism
defines. Then the shared contract: any size, determinism in eval, gradients everywhere, one
ValueError per bad option.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_mixers import _MapModel  # a mixer alone on count_flops' NCHW input
from timm.models.pvt_v2 import Attention as PvtV2Attention
from torch.utils._python_dispatch import TorchDispatchMode

from models import count_flops
from models.mixers import MIXERS
from models.mixers.kernel import LinearAttention, PerformerAttention
from models.mixers.lowrank import LinformerAttention, SpatialReductionAttention
from models.mixers.lsh import ReformerAttention
from models.mixers.sinkhorn import SinkhornAttention
from models.mixers.synthesizer import DenseSynthesizerAttention, RandomSynthesizerAttention

GLOBAL_MIXERS = [
    "reformer",
    "sinkhorn",
    "linformer",
    "compressed",
    "linear",
    "performer",
    "synthesizer_dense",
    "synthesizer_random",
]
DIM, HEADS = 16, 2


def build(cls, seed: int = 0, **options):
    torch.manual_seed(seed)
    return cls(DIM, HEADS, **options).double()


def heads_of(t: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, N, heads * D)` -> `(B, heads, N, D)`."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def project_out(module, out: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """`(B, heads, N, D)` -> the module's output projection as `(B, H, W, C)`."""
    merged = out.transpose(1, 2).flatten(2)
    return F.linear(merged, module.proj.weight, module.proj.bias).unflatten(1, (H, W))


def packed(module, x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """The module's packed input projection applied to the tokens, split into `parts` heads tensors."""
    y = F.linear(x.flatten(1, 2), module.qkv.weight, module.qkv.bias)
    return [heads_of(t, module.num_heads) for t in y.chunk(parts, dim=-1)]


def assert_matches(module, reference, x: torch.Tensor, atol: float = 1e-10) -> None:
    """Output and gradients (input, every parameter) of `module` equal those of `reference(module, x)`."""
    x = x.detach().requires_grad_(True)
    params = list(module.parameters())
    weight = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    got, want = module(x), reference(module, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-8)
    got_grads = torch.autograd.grad((got * weight).sum(), [x, *params])
    want_grads = torch.autograd.grad((want * weight).sum(), [x, *params])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-7)


def softmax_attention(q, k, v, scale, log_weights=None):
    logits = scale * q @ k.transpose(-2, -1)
    if log_weights is not None:
        logits = logits + log_weights
    return logits.softmax(-1) @ v


def x_of(H: int, W: int, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, H, W, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- linear ---------------------------------------------------------------------------------------


def linear_reference(m, x):
    q, k, v = packed(m, x, 3)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    weights = phi_q @ phi_k.transpose(-2, -1)  # explicit N x N
    return project_out(m, (weights / weights.sum(-1, keepdim=True)) @ v, *x.shape[1:3])


@pytest.mark.parametrize("size", [(7, 9), (1, 1), (2, 3)])
def test_linear_equals_explicit_kernel_product(size):
    assert_matches(build(LinearAttention), linear_reference, x_of(*size))


def test_linear_never_counts_padding():
    """No padding exists to leak: a 7x9 map's result is its own 63 tokens', not a padded 8x10's."""
    m = build(LinearAttention)
    x = x_of(7, 9)
    padded = F.pad(x, (0, 0, 0, 1, 0, 1))
    assert not torch.allclose(m(padded)[:, :7, :9], m(x))
    torch.testing.assert_close(m(x), linear_reference(m, x))


class MatrixProducts(TorchDispatchMode):
    """The ATen matrix products a call runs (after autocast's casts): (op name, input dtypes)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            self.seen.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))


def test_kernel_mixers_accumulate_in_fp32_under_autocast():
    """Under bf16 autocast the q / k projections run in bf16 (addmm), but the feature maps (mm) and
    the sums over all tokens (bmm) in fp32: exp-type features and sums over thousands of tokens lose
    their small terms in bf16 (an output comparison can't tell: CPU bf16 GEMMs add in fp32 inside).
    1600 tokens stay finite and near fp32."""
    for cls in (LinearAttention, PerformerAttention):
        torch.manual_seed(0)
        m = cls(DIM, HEADS)
        x = 4 * torch.randn(1, 40, 40, DIM)
        with torch.autocast("cpu", dtype=torch.bfloat16), MatrixProducts() as products:
            low = m(x)
        ops = {name for name, _ in products.seen}
        assert ops == ({"addmm", "bmm", "mm"} if cls is PerformerAttention else {"addmm", "bmm"}), ops
        for name, dtypes in products.seen:
            assert dtypes == ({torch.bfloat16} if name == "addmm" else {torch.float32}), (cls, name, dtypes)
        assert torch.isfinite(low).all()
        torch.testing.assert_close(low.float(), m(x), atol=0.05, rtol=0.05)


# ---- performer ------------------------------------------------------------------------------------


def exact_softmax_reference(m, x):
    q, k, v = packed(m, x, 3)
    return project_out(m, softmax_attention(q, k, v, m.scale), *x.shape[1:3])


def performer_errors(feature_counts, draws: int = 8, model_seed: int = 0) -> list[float]:
    """Mean relative error vs exact softmax attention of one model, features redrawn `draws` times."""
    x = x_of(8, 8, batch=1)
    weights = build(PerformerAttention, seed=model_seed, num_features=1).state_dict()
    errors = []
    for num_features in feature_counts:
        trials = []
        for seed in range(draws):
            m = build(PerformerAttention, seed=100 + seed, num_features=num_features).eval()
            m.load_state_dict({**weights, "features": m.features})
            with torch.no_grad():
                want = exact_softmax_reference(m, x)
                trials.append(((m(x) - want).norm() / want.norm()).item())
        errors.append(sum(trials) / draws)
    return errors


def test_performer_error_falls_with_more_features():
    errors = performer_errors((16, 256, 4096))
    assert errors[0] > errors[1] > errors[2], errors
    # Unbiased features: error ~ features^-1/2, 1/16 of it at 256x the features (0.13 measured).
    # A biased draw (e.g. QR without the sign fix) levels off instead (0.28).
    assert errors[2] < 0.2 * errors[0], errors


def performer_reference(m, x):
    """FAVOR+ from its definition, in log space: weight_ij proportional to sum_r phi_r(q_i) phi_r(k_j)
    with log phi_r(t) = w_r·t' - |t'|^2 / 2, t' = t scale^(1/2); a logsumexp over the features r, then
    a softmax over the keys j: exact at any logit size, and dense N x N (the module never is)."""
    q, k, v = packed(m, x, 3)
    w = m.features.to(x.dtype)

    def log_phi(t):
        t = t * m.scale**0.5
        return t @ w.T - t.square().sum(-1, keepdim=True) / 2

    log_weights = torch.logsumexp(log_phi(q).unsqueeze(-2) + log_phi(k).unsqueeze(-3), dim=-1)
    return project_out(m, log_weights.softmax(-1) @ v, *x.shape[1:3])


@pytest.mark.parametrize("size", [(5, 7), (1, 1)])
def test_performer_equals_its_feature_estimate_written_densely(size):
    assert_matches(build(PerformerAttention, num_features=64), performer_reference, x_of(*size))


def test_performer_is_stable_for_large_logits_and_keeps_its_features():
    """At 50x the inputs the features' exponents run to thousands: fp32 still gives the float64
    log-space estimate (a plain exp overflows; a clamped one is finite but wrong)."""
    m = build(PerformerAttention, num_features=64)
    x = 50 * x_of(6, 6, batch=1)
    with torch.no_grad():
        q = packed(m, x, 3)[0] * m.scale**0.5
        assert (q @ m.features.T).abs().max() > 89  # in the regime it claims: a plain fp32 exp overflows
        want = performer_reference(m, x)
        got = copy.deepcopy(m).float()(x.float()).double()
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)
    assert "features" in m.state_dict()


def test_performer_features_are_orthogonal_blocks_of_gaussian_rows():
    """Unbiased positive features need rows N(0, I) marginally: zero mean, identity second moment
    (a QR without the sign fix fails the mean: -0.1 on the first coordinate); rows orthogonal in blocks."""
    features = build(PerformerAttention, num_features=2**15).features.double()
    D = features.shape[1]
    assert features.mean(0).abs().max() < 0.03, features.mean(0)
    torch.testing.assert_close(
        features.T @ features / len(features), torch.eye(D, dtype=features.dtype), atol=0.05, rtol=0
    )
    rows = features[:D] / features[:D].norm(dim=1, keepdim=True)
    torch.testing.assert_close(rows @ rows.T, torch.eye(D, dtype=features.dtype), atol=1e-6, rtol=0)


# ---- reformer -------------------------------------------------------------------------------------


def reformer_reference(m, x, return_counts=False):
    B, H, W, _ = x.shape
    N = H * W
    qk, v = packed(m, x, 2)
    rotated = torch.einsum("bhnd,hrdk->bhrnk", qk, m.rotations.to(x.dtype))
    buckets = torch.cat([rotated, -rotated], -1).argmax(-1)  # (B, heads, rounds, N)
    positions = torch.arange(N)
    rank = (buckets * N + positions).argsort(-1).argsort(-1)  # place in the (bucket, position) order
    chunk = rank // m.block_size
    num_chunks = math.ceil(N / m.block_size)
    qc, kc = chunk.unsqueeze(-1), chunk.unsqueeze(-2)
    pattern = (kc == qc) | (kc == (qc - 1) % num_chunks)  # own chunk and the previous one (cyclic)
    counts = pattern.double().sum(2)  # a key found in n rounds counts n times
    others = counts * (1 - torch.eye(N, dtype=x.dtype))
    # Itself only when it has no other key.
    counts = torch.where(others.sum(-1, keepdim=True) > 0, others, torch.eye(N, dtype=x.dtype))
    if return_counts:
        return counts
    out = softmax_attention(qk, F.normalize(qk, dim=-1), v, m.scale, log_weights=counts.log())
    return project_out(m, out, H, W)


@pytest.mark.parametrize(
    "size,options",
    [
        ((7, 9), dict(block_size=8, num_buckets=4, num_hashes=3)),
        ((5, 5), dict(block_size=4, num_buckets=6, num_hashes=1)),
        ((3, 5), dict(block_size=8, num_buckets=2, num_hashes=2)),  # 15 tokens: 2 chunks
        ((2, 2), dict(block_size=8)),  # one chunk, smaller than a block
        ((1, 1), dict(block_size=4)),  # only itself
    ],
)
def test_reformer_equals_masked_dense_attention(size, options):
    m = build(ReformerAttention, **options)
    assert_matches(m, reformer_reference, x_of(*size))


def test_reformer_pattern_is_sparse():
    """The reference pattern really masks keys (the equality above is not full attention)."""
    m = build(ReformerAttention, block_size=8, num_buckets=4, num_hashes=2)
    counts = reformer_reference(m, x_of(7, 9), return_counts=True)
    assert (counts == 0).double().mean() > 0.5


# ---- sinkhorn -------------------------------------------------------------------------------------


def sinkhorn_reference(m, x, return_permutation=False):
    """Eval (no noise) Sparse Sinkhorn attention, blocks cut by slicing, Sinkhorn in exp space."""
    B, H, W, C = x.shape
    s, heads, D = m.block_size, m.num_heads, m.head_dim
    Hp, Wp = math.ceil(H / s) * s, math.ceil(W / s) * s
    grid = [(r, c) for r in range(Hp // s) for c in range(Wp // s)]

    def blocks(t):  # (B, heads, H, W, D) zero-padded -> (B, heads, blocks, s*s, D)
        padded = t.new_zeros(*t.shape[:2], Hp, Wp, t.shape[-1])
        padded[:, :, :H, :W] = t
        return torch.stack(
            [padded[:, :, r * s : (r + 1) * s, c * s : (c + 1) * s].flatten(2, 3) for r, c in grid], 2
        )

    valid = blocks(torch.ones(1, 1, H, W, 1, dtype=x.dtype))[0, 0, ..., 0]  # (blocks, s*s)
    summaries = (blocks(x.unsqueeze(1))[:, 0].sum(2)) / valid.sum(1, keepdim=True)  # (B, blocks, C)
    fc1, fc2 = m.sort_net[0], m.sort_net[2]
    codes = F.linear(F.gelu(F.linear(summaries, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    a, b = heads_of(codes[..., :C], heads), heads_of(codes[..., C:], heads)
    p = torch.exp(m.scale * a @ b.transpose(-2, -1) / m.temperature)
    for _ in range(m.sinkhorn_iters):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    if return_permutation:
        return p
    q, k, v = (blocks(t.unflatten(2, (H, W))) for t in packed(m, x, 3))
    sorted_k, sorted_v = torch.einsum("bhij,bhjpd->bhipd", p, k), torch.einsum("bhij,bhjpd->bhipd", p, v)
    sorted_valid = torch.einsum("bhij,jp->bhip", p, valid)
    # log(0) = -inf for slots that are padding everywhere, without a 0 * inf gradient there.
    log_sorted_valid = (
        torch.where(sorted_valid > 0, sorted_valid, 1.0).log().masked_fill(sorted_valid == 0, -math.inf)
    )
    log_weights = torch.cat([valid.log().expand_as(sorted_valid), log_sorted_valid], -1).unsqueeze(-2)
    out = softmax_attention(
        q, torch.cat([k, sorted_k], -2), torch.cat([v, sorted_v], -2), m.scale, log_weights
    )
    out_map = out.new_zeros(B, heads, Hp, Wp, D)
    for index, (r, c) in enumerate(grid):
        out_map[:, :, r * s : (r + 1) * s, c * s : (c + 1) * s] = out[:, :, index].unflatten(2, (s, s))
    return project_out(m, out_map[:, :, :H, :W].flatten(2, 3), H, W)


@pytest.mark.parametrize("size,block_size", [((7, 9), 3), ((6, 6), 2), ((2, 3), 4), ((1, 1), 3), ((5, 4), 5)])
def test_sinkhorn_equals_dense_reference_with_its_permutation(size, block_size):
    m = build(SinkhornAttention, block_size=block_size, sinkhorn_iters=5).eval()
    x = x_of(*size)
    torch.testing.assert_close(m.block_permutation(x), sinkhorn_reference(m, x, return_permutation=True))
    assert_matches(m, sinkhorn_reference, x)


def test_sinkhorn_permutation_is_doubly_stochastic_and_noisy_only_in_training():
    m = build(SinkhornAttention, block_size=2, sinkhorn_iters=30)
    x = x_of(6, 8)
    m.eval()
    p = m.block_permutation(x)
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones_like(p.sum(-2)))
    assert not torch.allclose(p, torch.full_like(p, 1 / p.shape[-1]), atol=1e-3)  # not uniform mixing
    m.train()
    assert not torch.equal(m(x), m(x))  # Gumbel noise
    assert torch.equal(m.eval()(x), m(x))


# ---- linformer, compressed ------------------------------------------------------------------------


def linformer_reference(m, x):
    B, H, W, _ = x.shape
    q, k, v = packed(m, x, 3)
    maps = F.interpolate(m.kv_proj, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
    e, f = (maps * m.ref_size**2 / (H * W)).flatten(2)
    return project_out(m, softmax_attention(q, e @ k, f @ v, m.scale), H, W)


@pytest.mark.parametrize("size", [(7, 9), (14, 14), (1, 1), (20, 3)])
def test_linformer_equals_projected_attention(size):
    assert_matches(build(LinformerAttention, num_proj=5, ref_size=6), linformer_reference, x_of(*size))


def test_linformer_projection_keeps_its_scale_across_resolutions():
    m = build(LinformerAttention, num_proj=8, ref_size=14)
    with torch.no_grad():
        m.kv_proj.copy_(1 + 0.1 * m.kv_proj)  # a smooth, non-zero-mean projection
        at_ref, at_4x = m.projections(14, 14).sum(-1), m.projections(56, 56).sum(-1)
    torch.testing.assert_close(at_4x, at_ref, rtol=0.02, atol=0)


def adaptive_bins(size: int, pooled: int) -> list[range]:
    """The tokens adaptive average pooling averages into each of `pooled` outputs along one axis."""
    return [range(i * size // pooled, -(-(i + 1) * size // pooled)) for i in range(pooled)]


def compressed_reference(m, x):
    """Every query against keys/values of the reduced map: P x P bin means -> 1x1 conv -> LN -> GELU
    (pooled), or r x r cells of the zero-padded map -> conv -> LN (strided)."""
    B, H, W, C = x.shape
    q = heads_of(F.linear(x.flatten(1, 2), m.qkv.weight[:C], m.qkv.bias[:C]), m.num_heads)
    if m.pool_size is not None:
        P = m.pool_size
        bins = [(rows, cols) for rows in adaptive_bins(H, P) for cols in adaptive_bins(W, P)]  # row-major
        means = torch.stack([x[:, rows][:, :, cols].mean((1, 2)) for rows, cols in bins], 1)  # (B, P*P, C)
        reduced = F.linear(means, m.sr.weight.flatten(1), m.sr.bias)
        reduced = F.gelu(F.layer_norm(reduced, (C,), m.norm.weight, m.norm.bias, m.norm.eps))
    elif m.sr_ratio > 1:
        r = m.sr_ratio
        padded = F.pad(x, (0, 0, 0, -W % r, 0, -H % r)).permute(0, 3, 1, 2)
        reduced = F.conv2d(padded, m.sr.weight, m.sr.bias, stride=r).flatten(2).transpose(1, 2)
        reduced = F.layer_norm(reduced, (C,), m.norm.weight, m.norm.bias, m.norm.eps)
    else:
        reduced = x.flatten(1, 2)
    k, v = (
        heads_of(t, m.num_heads) for t in F.linear(reduced, m.qkv.weight[C:], m.qkv.bias[C:]).chunk(2, -1)
    )
    return project_out(m, softmax_attention(q, k, v, m.scale), H, W)


@pytest.mark.parametrize(
    "size,options",
    [
        ((7, 9), dict()),  # pooled to 7 x 7: uneven bins
        ((16, 12), dict(pool_size=5)),
        ((3, 5), dict()),  # smaller than the pool: overlapping bins
        ((1, 1), dict(pool_size=3)),
        ((7, 9), dict(pool_size=None, sr_ratio=2)),
        ((8, 8), dict(pool_size=None, sr_ratio=4)),
        ((1, 1), dict(pool_size=None, sr_ratio=2)),
        ((3, 2), dict(pool_size=None, sr_ratio=4)),
        ((5, 5), dict(pool_size=None, sr_ratio=1)),
    ],
)
def test_compressed_equals_reduced_attention(size, options):
    m = build(SpatialReductionAttention, **options)
    if m.norm is not None:
        with torch.no_grad():
            m.norm.weight.normal_()  # 1 at init: make the LayerNorm's scale visible
    assert_matches(m, compressed_reference, x_of(*size))


def timm_twin(m: SpatialReductionAttention, **options) -> PvtV2Attention:
    """timm's PVT-v2 attention holding `m`'s weights (its q / kv are our packed qkv's rows)."""
    timm_attn = PvtV2Attention(DIM, HEADS, **options).double().eval()
    timm_attn.q.weight.data, timm_attn.q.bias.data = m.qkv.weight[:DIM], m.qkv.bias[:DIM]
    timm_attn.kv.weight.data, timm_attn.kv.bias.data = m.qkv.weight[DIM:], m.qkv.bias[DIM:]
    for name in ("sr", "norm", "proj"):
        getattr(timm_attn, name).load_state_dict(getattr(m, name).state_dict())
    return timm_attn


@pytest.mark.parametrize("size", [(8, 6), (14, 14), (7, 7), (3, 5), (1, 1), (20, 9)])
def test_compressed_default_equals_timm_pvt_v2_linear(size):
    """The default is PVT-v2-li (timm `linear_attn=True`, 7 x 7 pooled keys), at any map size."""
    m = build(SpatialReductionAttention)
    assert m.pool_size == 7 and m.sr.kernel_size == (1, 1)
    x = x_of(*size)
    with torch.no_grad():
        m.norm.weight.normal_()
        want = timm_twin(m, linear_attn=True)(x.flatten(1, 2), list(size))
        torch.testing.assert_close(m(x).flatten(1, 2), want)


def test_compressed_sr_ratio_equals_timm_pvt_v2_on_divisible_maps():
    m = build(SpatialReductionAttention, pool_size=None, sr_ratio=2)
    x = x_of(8, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x).flatten(1, 2), timm_twin(m, sr_ratio=2)(x.flatten(1, 2), [8, 6]))


# ---- synthesizers ---------------------------------------------------------------------------------


def resized(maps, H, W):
    return F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False, antialias=True)


def dense_synthesizer_reference(m, x):
    B, H, W, _ = x.shape
    hidden, v = packed(m, x, 2)
    key_maps = resized(m.key_maps, H, W).flatten(2)  # (heads, head_dim, N): W2 at this size
    key_bias = resized(m.key_bias[None], H, W).flatten(2).transpose(0, 1)  # (heads, 1, N): b2
    logits = m.scale * F.relu(hidden) @ key_maps + key_bias
    return project_out(m, logits.softmax(-1) @ v, H, W)


def random_synthesizer_reference(m, x):
    """The full ref^2 x ref^2 table R1 R2^T, resized in its key then its query positions."""
    B, H, W, _ = x.shape
    heads, ref = m.num_heads, m.ref_size
    r1, r2 = m.factors.flatten(3)
    table = r1.transpose(1, 2) @ r2  # (heads, ref^2 queries, ref^2 keys)
    table = resized(table.reshape(heads * ref * ref, 1, ref, ref), H, W).reshape(heads, ref, ref, H * W)
    table = resized(table.permute(0, 3, 1, 2), H, W).flatten(2).transpose(1, 2)  # (heads, N, N)
    v = packed(m, x, 1)[0]
    return project_out(m, table.softmax(-1) @ v, H, W)


@pytest.mark.parametrize("size", [(7, 9), (6, 6), (1, 1), (13, 2)])
def test_dense_synthesizer_equals_reference(size):
    m = build(DenseSynthesizerAttention, ref_size=6)
    with torch.no_grad():
        m.key_bias.normal_()  # zero at init: make the bias path visible
    assert_matches(m, dense_synthesizer_reference, x_of(*size))


@pytest.mark.parametrize("size", [(7, 9), (5, 5), (1, 1), (9, 2)])
def test_random_synthesizer_equals_resized_full_table(size):
    m = build(RandomSynthesizerAttention, rank=3, ref_size=5)
    assert_matches(m, random_synthesizer_reference, x_of(*size))


def test_synthesizers_exempt_their_bias_and_position_logits_from_weight_decay():
    for cls, exempt in ((DenseSynthesizerAttention, {"key_bias"}), (RandomSynthesizerAttention, {"factors"})):
        m = build(cls)
        assert m.no_weight_decay() == exempt and exempt <= dict(m.named_parameters()).keys()


# ---- FLOPs ----------------------------------------------------------------------------------------


def mechanism_macs(name: str, options: dict, H: int, W: int, C: int, heads: int) -> int:
    """Multiply-adds of one forward of mixer `name` on an H x W map, from its mechanism's definition.

    Linears, convs and matmuls only, as `models.count_flops` (pooling, norms, softmax are not counted).
    """
    N, d = H * W, C // heads
    linears = 4 * N * C * C  # qkv and proj
    if name == "linear":  # phi(K)^T [V, 1] and phi(Q) (...): d x (d + 1) per token and head each
        return linears + 2 * heads * N * d * (d + 1)
    if name == "performer":
        # features of q and of k: w_r·x and -|x|^2 / 2 per feature; then phi(K)^T [V, 1], phi(Q) (...)
        return linears + 4 * heads * N * options["num_features"] * (d + 1)
    if name == "linformer":  # E K and F V (k x N projections), then N queries x k keys: QK^T and AV
        k = options["num_proj"]
        return linears + 2 * k * N * C + 2 * N * k * C
    if name == "compressed":
        if options.get("pool_size", 7) is not None:  # P^2 pooled tokens, 1x1 conv
            keys = options.get("pool_size", 7) ** 2
            conv = keys * C * C
        else:  # one token per r x r cell of the zero-padded map, r x r conv
            r = options["sr_ratio"]
            keys = math.ceil(H / r) * math.ceil(W / r)
            conv = keys * C * C * r * r
        return 2 * N * C * C + conv + keys * 2 * C * C + 2 * N * keys * C  # q, proj; conv; kv; attention
    if name == "reformer":  # shared qk (2 C outputs); per round: hashing, a chunk and its previous one
        R, b = options["num_hashes"], options["block_size"]
        chunks = math.ceil(N / b)
        keys = 2 * b if chunks > 1 else b
        hashing = R * heads * N * d * options["num_buckets"] // 2
        return 3 * N * C * C + hashing + 2 * R * heads * chunks * b * keys * d
    if name == "sinkhorn":
        s = options["block_size"]
        blocks, hidden = math.ceil(H / s) * math.ceil(W / s), C // 4
        sort_net = blocks * (C * hidden + hidden * 2 * C)
        block_logits = heads * blocks * blocks * d
        sorting = heads * blocks * blocks * s * s * (2 * d + 1)  # S K, S V and S (validity)
        attention = 2 * heads * blocks * s * s * (2 * s * s) * d  # own block + the sorted block
        return linears + sort_net + block_logits + sorting + attention
    if name == "synthesizer_dense":  # (hidden, v) and proj; logits over d + 1 columns (W2 and b2),
        return 3 * N * C * C + 2 * heads * N * N * (d + 1)  # v zero-padded to d + 1 for fused SDPA
    if name == "synthesizer_random":  # v and proj; R1 R2^T logits and AV at max(rank, d) columns
        return 2 * N * C * C + 2 * heads * N * N * max(options["rank"], d)
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name,options",
    [
        ("linear", {}),
        ("performer", dict(num_features=24)),
        ("linformer", dict(num_proj=5)),
        ("compressed", {}),
        ("compressed", dict(pool_size=3)),
        ("compressed", dict(pool_size=None, sr_ratio=3)),
        ("reformer", dict(block_size=16, num_buckets=4, num_hashes=3)),
        ("sinkhorn", dict(block_size=4)),
        ("synthesizer_dense", dict(ref_size=6)),
        ("synthesizer_random", dict(rank=3, ref_size=5)),
    ],
)
def test_flops_charge_each_mixer_its_mechanism(name, options):
    H, W = 13, 11
    mixer = MIXERS[name](DIM, HEADS, **options)
    assert count_flops(_MapModel(mixer), (DIM, H, W)) == mechanism_macs(name, options, H, W, DIM, HEADS)


# ---- the shared contract --------------------------------------------------------------------------


@pytest.mark.parametrize("name", GLOBAL_MIXERS)
def test_any_size_deterministic_eval_and_every_parameter_learns(name):
    torch.manual_seed(0)
    m = MIXERS[name](DIM, HEADS)
    for size in [(1, 1), (1, 6), (5, 3), (9, 11), (16, 16)]:
        x = torch.randn(2, *size, DIM)
        m.train()
        m.zero_grad()
        y = m(x)
        assert y.shape == x.shape and torch.isfinite(y).all(), size
        y.square().sum().backward()
        if size == (16, 16):  # several blocks / chunks / reduced keys: everything takes part
            silent = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, silent
        m.eval()
        with torch.no_grad():
            assert torch.equal(m(x), m(x)), size


@pytest.mark.parametrize("name", GLOBAL_MIXERS)
def test_no_token_by_token_matrix_is_kept_for_backward(name):
    """At 64x64 (4096 tokens) nothing autograd saves is N x N per head: the content-sparse mixers
    gather or chunk, the low-rank and kernel ones stay linear, and the synthesizers' N x N weights
    (their mechanism) are formed inside fused SDPA only."""
    torch.manual_seed(0)
    m = MIXERS[name](DIM, HEADS)
    tokens, largest = 64 * 64, [0]

    def pack(t):
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(torch.randn(1, 64, 64, DIM))
    assert largest[0] < tokens**2 / 4, largest[0] / tokens**2


@pytest.mark.parametrize("name", GLOBAL_MIXERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_and_half_weights(name, dtype):
    """Under autocast: finite outputs and gradients (padding included), close to fp32; half weights run."""
    torch.manual_seed(0)
    m = MIXERS[name](DIM, HEADS).eval()
    x = 4 * torch.randn(2, 9, 11, DIM)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        low = m(x)
    low.float().square().sum().backward()
    assert torch.isfinite(low).all() and torch.isfinite(x.grad).all()
    want = m(x)
    assert ((low.float() - want).norm() / want.norm()) < 0.02
    assert torch.isfinite(m.to(dtype)(x.detach().to(dtype))).all()


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("reformer", dict(block_size=0), r"block_size must be an integer >= 1, got 0"),
        ("reformer", dict(num_buckets=3), r"num_buckets must be an even integer >= 2, got 3"),
        ("reformer", dict(num_hashes=0), r"num_hashes must be an integer >= 1"),
        ("sinkhorn", dict(block_size=-2), r"block_size must be an integer >= 1"),
        ("sinkhorn", dict(sinkhorn_iters=0), r"sinkhorn_iters must be an integer >= 1"),
        ("sinkhorn", dict(temperature=0.0), r"temperature must be a number > 0"),
        ("linformer", dict(num_proj=0), r"num_proj must be an integer >= 1"),
        ("linformer", dict(ref_size=2.5), r"ref_size must be an integer >= 1, got 2.5"),
        ("compressed", dict(pool_size=0), r"'compressed': pool_size must be an integer >= 1, got 0"),
        ("compressed", dict(pool_size=None, sr_ratio=0), r"sr_ratio must be an integer >= 1"),
        ("compressed", dict(sr_ratio=2), r"set exactly one of pool_size .* pass pool_size=None with it"),
        ("compressed", dict(pool_size=None), r"exactly one of .* got pool_size=None, sr_ratio=None"),
        ("linear", dict(qk_scale=0.5), r"no q·k logits to scale"),
        ("linear", dict(attn_drop=0.1), r"no attention matrix to drop out"),
        ("performer", dict(num_features=0), r"num_features must be an integer >= 1, got 0"),
        ("performer", dict(attn_drop=0.1), r"no attention matrix to drop out"),
        ("synthesizer_dense", dict(ref_size=0), r"ref_size must be an integer >= 1"),
        ("synthesizer_random", dict(rank=0), r"rank must be an integer >= 1"),
        ("synthesizer_random", dict(qk_scale=1.0), r"no q·k logits to scale"),
    ],
)
def test_bad_options_raise_one_clear_error(name, options, message):
    with pytest.raises(ValueError, match=message):
        MIXERS[name](DIM, HEADS, **options)
