"""The NA operator against an independent float64 reference (tests/na_reference.py) and natten."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from na_reference import reference_na2d

from models.layers import (
    NeighborhoodAttention2D,
    explain_backends,
    neighborhood_attention_2d,
    neighborhood_attention_2d_qkvpacked,
    use_backend,
)
from models.layers.backends.checks import call_info, why_not
from models.layers.backends.triton_na import triton_error, triton_interpreting

# These tests use CPU tensors: Triton runs them interpreted (tests/conftest.py, without a GPU), at
# seconds a case, so in the slow selection here; tests/test_triton_na.py covers it in the default one.
TRITON = pytest.param(
    "triton",
    marks=[
        pytest.mark.slow,
        pytest.mark.skipif(
            triton_error() is not None or not triton_interpreting(),
            reason=triton_error() or "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)",
        ),
    ],
)


def _random_case(seed: int):
    """Random odd/even map sizes at least the window, k in {3,5,7,9}, dilation in {1,2,3}."""
    rng = random.Random(seed)
    kernel_size = rng.choice([3, 5, 7, 9])
    dilation = rng.choice([1, 2, 3]) if kernel_size <= 5 else rng.choice([1, 2])
    window = kernel_size * dilation
    height = rng.randint(window, window + 9)
    width = rng.randint(window, window + 9)
    return height, width, kernel_size, dilation


CASES = [_random_case(seed) for seed in range(8)] + [
    (7, 7, 7, 1),  # kernel == map
    (9, 9, 3, 3),  # dilated window == map
    (10, 13, 3, 3),  # map not divisible by the dilation
    (5, 8, 5, 1),  # one axis == kernel
]


def _inputs(height, width, kernel_size, heads=2, head_dim=4, batch=2, dtype=torch.float64, grad=True):
    shape = (batch, height, width, heads, head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=grad) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=dtype, requires_grad=grad)
    return q, k, v, rpb


def _grads(out, inputs, grad_out):
    return torch.autograd.grad((out * grad_out).sum(), inputs)


@pytest.mark.parametrize("backend", ["cpp", "torch", "naive", TRITON])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_and_gradients_match_reference(backend, case):
    height, width, kernel_size, dilation = case
    q, k, v, rpb = _inputs(height, width, kernel_size)
    grad_out = torch.randn_like(q)
    ref = reference_na2d(q, k, v, kernel_size, dilation, rpb)
    out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb=rpb, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(
        _grads(out, (q, k, v, rpb), grad_out), _grads(ref, (q, k, v, rpb), grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["cpp", "torch", TRITON])
@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: "x".join(map(str, c)))
def test_backend_without_rpb_and_custom_scale(backend, case):
    height, width, kernel_size, dilation = case
    q, k, v, _ = _inputs(height, width, kernel_size)
    grad_out = torch.randn_like(q)
    ref = reference_na2d(q, k, v, kernel_size, dilation, None, scale=0.37)
    out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, scale=0.37, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(_grads(out, (q, k, v), grad_out), _grads(ref, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_torch_backend_float32_close_to_float64_reference():
    q, k, v, rpb = _inputs(23, 19, 7, heads=3, head_dim=16, dtype=torch.float32)
    out = neighborhood_attention_2d(q, k, v, 7, 1, rpb=rpb, backend="torch")
    ref = reference_na2d(q, k, v, 7, 1, rpb)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-5


# float32 with head dim 16/32/64 runs the kernel's vector code (its own exp, transposing reductions,
# tails of k*k not a multiple of the lanes: 16 in its AVX-512 build, 8 in the others); 8 and 24 run
# its scalar float code.
@pytest.mark.parametrize(
    "height,width,kernel_size,dilation,head_dim",
    [
        (23, 19, 7, 1, 32),
        (17, 20, 5, 2, 16),
        (13, 13, 9, 1, 64),
        (12, 15, 3, 3, 32),
        (11, 9, 3, 1, 8),
        (14, 14, 7, 2, 24),
    ],
)
def test_cpp_backend_float32_close_to_float64_reference(height, width, kernel_size, dilation, head_dim):
    q, k, v, rpb = _inputs(height, width, kernel_size, heads=3, head_dim=head_dim)
    grad_out = torch.randn_like(q)
    ref = reference_na2d(q, k, v, kernel_size, dilation, rpb)
    inputs32 = [t.detach().float().requires_grad_() for t in (q, k, v, rpb)]
    out = neighborhood_attention_2d(*inputs32[:3], kernel_size, dilation, rpb=inputs32[3], backend="cpp")
    assert out.dtype == torch.float32
    got = [out, *_grads(out, inputs32, grad_out.float())]
    want = [ref, *_grads(ref, (q, k, v, rpb), grad_out)]
    for name, a, b in zip(["out", "dq", "dk", "dv", "drpb"], got, want, strict=True):
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 2e-6, f"{name}: relative error {rel:.2e}"


# bfloat16 is storage only: sums are float32, so each output element is the float64 value of the
# same (bf16) inputs rounded once to bf16 (half a bf16 step: 2^-8 relative), plus float32's error.
# Head dims 16/32/64 run the vector code (rows read as even/odd pairs; 32 and 64 at 16 lanes in the
# AVX-512 build, 16 at 8 lanes); 8 and 24 the scalar loops.
# Contiguous inputs sum dk, dv in float tensors laid out like k; NAT's q, k, v (views of one qkv
# projection) are copied into per-head planes, whose dk, dv are summed one plane at a time in a
# thread's buffer: both are checked.
@pytest.mark.parametrize("packed_qkv", [False, True], ids=["contiguous", "qkv-views"])
@pytest.mark.parametrize(
    "height,width,kernel_size,dilation,head_dim",
    [
        (23, 19, 7, 1, 32),
        (17, 20, 5, 2, 16),
        (13, 13, 9, 1, 64),
        (12, 15, 3, 3, 32),
        (11, 9, 3, 1, 8),
        (14, 14, 7, 2, 24),
    ],
)
def test_cpp_backend_bfloat16_rounds_float64_reference_once(
    height, width, kernel_size, dilation, head_dim, packed_qkv
):
    shape = (2, height, width, 3, head_dim)
    span = 2 * kernel_size - 1
    if packed_qkv:
        qkv = torch.randn(2, height, width, 3, 3, head_dim).bfloat16().requires_grad_()
        inputs = list(qkv.unbind(3))
    else:
        inputs = [torch.randn(shape).bfloat16().requires_grad_() for _ in range(3)]
    inputs.append(torch.randn(3, span, span, requires_grad=True))  # the RPB parameter stays float32
    grad_out = torch.randn(shape).bfloat16()
    out = neighborhood_attention_2d(*inputs[:3], kernel_size, dilation, rpb=inputs[3], backend="cpp")
    got = [out, *_grads(out.float(), inputs, grad_out.float())]
    assert [t.dtype for t in got] == [torch.bfloat16] * 4 + [torch.float32]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference_na2d(*exact[:3], kernel_size, dilation, exact[3])
    want = [ref, *_grads(ref, exact, grad_out.double())]
    for name, a, b in zip(["out", "dq", "dk", "dv"], got[:4], want[:4], strict=True):
        excess = (a.double() - b).abs() - 2**-8 * b.abs()
        assert excess.max() < 1e-6, f"{name}: {excess.max():.2e} beyond one bf16 rounding"
    rel = (got[4].double() - want[4]).norm() / want[4].norm()
    assert rel < 2e-6, f"drpb (float32 sums): relative error {rel:.2e}"


# 7x7 windows, dilation 1, maps >= 8 wide, on AVX-512: the forward takes 16 neighbouring queries of a
# map row per vector (windows clamped at the edges by a permute per lane), two query rows at a time.
# Widths: 8 (one part-empty group), 16 (one full), 37 (two full and a part); odd heights leave a
# single row at each plane's end; 3 threads split the rows mid-plane. Forward (output and the kept
# probabilities, through the backward's gradients) against float64, with and without an RPB.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
@pytest.mark.parametrize("height,width,head_dim", [(9, 8, 32), (16, 16, 64), (7, 37, 32)])
def test_cpp_backend_7x7_query_lanes_forward_against_float64(height, width, head_dim, with_rpb, dtype):
    torch.manual_seed(height * width)
    qkv = torch.randn(2, height, width, 3, 3, head_dim).to(dtype).requires_grad_()
    rpb = torch.randn(3, 13, 13, requires_grad=True) if with_rpb else None
    grad_out = torch.randn(2, height, width, 3, head_dim).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out = neighborhood_attention_2d_qkvpacked(qkv, 7, 1, rpb=rpb, backend="cpp")
        inputs = [qkv] + ([rpb] if with_rpb else [])
        got = [out, *_grads(out.float(), inputs, grad_out.float())]
    finally:
        torch.set_num_threads(threads)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference_na2d(*exact[0].unbind(3), 7, 1, exact[1] if with_rpb else None)
    want = [ref, *_grads(ref, exact, grad_out.double())]
    # bf16: the output rounded once (half a bf16 step), qkv's gradient as the backward rounds it;
    # float32: float32 sums.
    bound = 2**-8 if dtype == torch.bfloat16 else 0.0
    excess = (got[0].double() - want[0]).abs() - bound * want[0].abs()
    assert excess.max() < (1e-6 if dtype == torch.bfloat16 else 1e-5), f"out: {excess.max():.2e}"
    for name, a, b in zip(["dqkv", "drpb"][: len(inputs)], got[1:], want[1:], strict=True):
        rel = (a.double() - b).norm() / b.norm()
        assert rel < (4e-3 if dtype == torch.bfloat16 and name == "dqkv" else 2e-5), f"{name}: {rel:.2e}"


# Where no backward can come, the kernel reads the packed projection's q, k, v views where they are
# (no copy into per-head planes): the same output, bit for bit, as the training path's on its planes.
# Both forwards: 16 queries per vector (7x7, dilation 1, wide maps) and one query at a time.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "height,width,kernel_size,dilation", [(12, 19, 7, 1), (9, 7, 7, 1), (13, 14, 5, 2)], ids=str
)
def test_cpp_backend_inference_reads_packed_views_in_place(height, width, kernel_size, dilation, dtype):
    torch.manual_seed(0)
    qkv = torch.randn(2, height, width, 3, 4, 32).to(dtype)
    rpb = torch.randn(4, 2 * kernel_size - 1, 2 * kernel_size - 1)
    with torch.no_grad():
        inference = neighborhood_attention_2d_qkvpacked(qkv, kernel_size, dilation, rpb=rpb, backend="cpp")
    training = neighborhood_attention_2d_qkvpacked(
        qkv.clone().requires_grad_(), kernel_size, dilation, rpb=rpb, backend="cpp"
    )
    assert training.requires_grad and not inference.requires_grad
    assert torch.equal(inference, training.detach())


def test_cpp_backend_inference_copies_inputs_without_a_contiguous_head_dim():
    """The in-place read above needs a contiguous head dim: other inputs are still copied first."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 11, 12, 32, 3).transpose(-1, -2) for _ in range(3))
    with torch.no_grad():
        out = neighborhood_attention_2d(q, k, v, 7, 1, backend="cpp")
    ref = reference_na2d(q.double(), k.double(), v.double(), 7, 1, None)
    assert (out.double() - ref).abs().max() < 1e-5


def test_cpp_kernel_8_lane_build_on_an_avx512_machine():
    """The kernel's loops are built at 16 lanes for AVX-512 and at 8 for the rest: where this machine
    runs the first, the reference tests above run again under ATEN_CPU_CAPABILITY=avx2, which makes
    the kernel (like ATen) take the 8-lane build, so both builds are checked on one machine."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this machine runs the 8-lane build in every test above")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    assert (
        subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()
        == "AVX2"
    )
    here = Path(__file__)
    tests = [
        f"{here}::test_cpp_backend_float32_close_to_float64_reference[{case}]"
        for case in ("23-19-7-1-32", "17-20-5-2-16")
    ] + [
        f"{here}::test_cpp_backend_bfloat16_rounds_float64_reference_once[23-19-7-1-32-{layout}]"
        for layout in ("contiguous", "qkv-views")
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env,
        cwd=here.parent.parent,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch", "naive", "flex", "natten"])
def test_float32_inputs_under_cpu_autocast_run_in_bf16_on_every_backend(backend):
    """As autocast treats SDPA: float32 q, k, v are cast to bf16, whichever backend runs (cpp and
    torch used to return float32, naive, flex and natten bf16); gradients reach the float32 leaves."""
    torch.manual_seed(0)
    shape, kernel_size = (2, 11, 9, 2, 16), 3
    rpb = None if backend == "natten" else torch.randn(2, 5, 5)  # natten >= 0.20 has no RPB
    needs_grad = backend not in ("flex", "natten")  # forward only on the CPU
    q, k, v = (torch.randn(shape, requires_grad=needs_grad) for _ in range(3))
    want = reference_na2d(*(t.detach().bfloat16() for t in (q, k, v)), kernel_size, rpb=rpb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if backend == "auto":
            assert explain_backends(q, rpb).name == "cpp"  # what runs: the bf16 kernel
        out = neighborhood_attention_2d(q, k, v, kernel_size, rpb=rpb, backend=backend)
    assert out.dtype == torch.bfloat16
    assert (out.double() - want).abs().max() < 2e-2
    if needs_grad:
        out.float().sum().backward()
        assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_module_under_cpu_autocast_runs_the_bf16_kernel():
    """Under CPU autocast the qkv projection gives bf16 views: auto runs the kernel on them (not the
    float32 path on casts), the RPB trains in float32, and the block agrees with float64."""
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(64, 2, 7)
    x = torch.randn(2, 15, 13, 64)
    assert explain_backends(torch.zeros(1, 1, 1, 1, 1, dtype=torch.bfloat16)).name == "cpp"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    exact = NeighborhoodAttention2D(64, 2, 7).double()
    exact.load_state_dict(attn.state_dict())
    want = exact(x.double())
    want.square().sum().backward()
    assert (out.double() - want).norm() / want.norm() < 1e-2
    assert attn.rpb.grad.dtype == torch.float32
    assert (attn.rpb.grad.double() - exact.rpb.grad).norm() / exact.rpb.grad.norm() < 3e-2


def test_cpp_backend_rpb_without_gradient_and_under_inference_mode():
    q, k, v, rpb = _inputs(12, 10, 5, head_dim=32, dtype=torch.float32)
    rpb = rpb.detach()
    ref = neighborhood_attention_2d(q, k, v, 5, rpb=rpb, backend="torch")
    out = neighborhood_attention_2d(q, k, v, 5, rpb=rpb, backend="cpp")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(neighborhood_attention_2d(q, k, v, 5, rpb=rpb, backend="cpp"), out)


def test_cpp_backend_keeps_probabilities_only_when_a_backward_can_come(monkeypatch):
    """The k*k-per-query probability buffer is training memory: not under no_grad / inference_mode,
    where the RPB parameter still has requires_grad (and autograd's needs_input_grad says True)."""
    from models.layers.backends.cpp_kernel import kernel_build_error

    if kernel_build_error():
        pytest.skip(kernel_build_error())
    forward = torch.ops.nat_na2d_cpu.forward
    kept = []

    def spy(*args):
        out, probs = forward(*args)
        kept.append(probs.numel() > 0)
        return out, probs

    monkeypatch.setattr(torch.ops.nat_na2d_cpu, "forward", spy)
    q, k, v, _ = _inputs(9, 9, 3, dtype=torch.float32, grad=False)
    rpb = torch.nn.Parameter(torch.zeros(2, 5, 5))
    with torch.no_grad():
        neighborhood_attention_2d(q, k, v, 3, rpb=rpb, backend="cpp")
    with torch.inference_mode():
        neighborhood_attention_2d(q, k, v, 3, rpb=rpb, backend="cpp")
    neighborhood_attention_2d(q, k, v, 3, backend="cpp")  # nothing requires grad
    neighborhood_attention_2d(q, k, v, 3, rpb=rpb, backend="cpp").sum().backward()
    assert kept == [False, False, False, True]
    assert rpb.grad is not None


def test_cpp_kernel_rejects_windows_that_jump_columns():
    """The backward walks a block of neighbouring queries' windows as one k x (k + 3) patch of keys,
    which holds only if each window starts 0 or d columns after the previous one in its dilation
    group (windows.py's geometry): anything else is refused rather than read past the patch."""
    from models.layers.backends.cpp_kernel import _axis_geometry, kernel_build_error

    if kernel_build_error():
        pytest.skip(kernel_build_error())
    q = torch.randn(1, 9, 9, 1, 16)
    row_start, row_bias = _axis_geometry(9, 3, 1)
    jumping = row_start.clone()
    jumping[4] += 1  # query 4's window starts two columns after query 3's (still inside the map)
    geometry = (row_start, jumping, row_bias, row_bias, 3, 1, 0.25)
    torch.ops.nat_na2d_cpu.forward(q, q, q, None, row_start, row_start, row_bias, row_bias, 3, 1, 0.25, False)
    with pytest.raises(RuntimeError, match="advance by 0 or dilation"):
        torch.ops.nat_na2d_cpu.forward(q, q, q, None, *geometry, False)


# The packed form (NeighborhoodAttention2D's call): the cpp backend copies qkv into planes itself and
# writes its gradient whole, dq, dk, dv into their slices (float: summed in k's layout, then copied
# in; bfloat16: rounded from a thread's plane sums straight into them); other backends get the views.
@pytest.mark.parametrize(
    "backend,dtype",
    [("cpp", torch.float64), ("cpp", torch.float32), ("cpp", torch.bfloat16), ("naive", torch.float64)],
    ids=["cpp-float64", "cpp-float32", "cpp-bfloat16", "naive-float64"],
)
def test_qkvpacked_matches_reference_on_the_views(backend, dtype):
    batch, height, width, heads, head_dim, kernel_size, dilation = 2, 13, 11, 3, 32, 5, 2
    span = 2 * kernel_size - 1
    qkv = torch.randn(batch, height, width, 3, heads, head_dim).to(dtype).requires_grad_()
    rpb = torch.randn(heads, span, span, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    rpb.requires_grad_()
    grad_out = torch.randn(batch, height, width, heads, head_dim).to(dtype)
    out = neighborhood_attention_2d_qkvpacked(qkv, kernel_size, dilation, rpb=rpb, backend=backend)
    got = [out, *_grads(out.double(), (qkv, rpb), grad_out.double())]
    exact = [t.detach().double().requires_grad_() for t in (qkv, rpb)]
    ref = reference_na2d(*exact[0].unbind(3), kernel_size, dilation, exact[1])
    want = [ref, *_grads(ref, exact, grad_out.double())]
    for name, a, b in zip(["out", "dqkv", "drpb"], got, want, strict=True):
        if dtype == torch.bfloat16 and name != "drpb":  # one rounding of the exact value, as above
            assert (a.double() - b).abs().sub(2**-8 * b.abs()).max() < 1e-6, name
        else:
            rel = (a.double() - b).norm() / b.norm()
            assert rel < (1e-12 if dtype == torch.float64 else 2e-6), f"{name}: relative error {rel:.2e}"


def test_qkvpacked_rejects_unpacked_input():
    with pytest.raises(ValueError, match=r"qkv must be \(batch, height, width, 3, heads, head_dim\)"):
        neighborhood_attention_2d_qkvpacked(torch.randn(1, 8, 8, 2, 4), 3)


def test_naive_bfloat16_rpb_gradient_sums_in_the_tables_dtype():
    """The naive gather's RPB gradient, bf16 inputs and a float32 table: every query's bias gradient is
    scatter-added into the table in float32 (the table's dtype). Cast before the gather, the sum ran in
    bf16: 3.1% relative error (norm) here; 0.6% after, from the bf16 logits' gradient."""
    torch.manual_seed(0)
    shape, kernel_size = (2, 28, 28, 2, 16), 7
    q, k, v, grad_out = (torch.randn(shape, dtype=torch.float64) for _ in range(4))
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=torch.float64)

    def rpb_grad(dtype, backend):
        table = rpb.to(torch.float64 if dtype == torch.float64 else torch.float32).detach().requires_grad_()
        out = neighborhood_attention_2d(
            *(t.to(dtype) for t in (q, k, v)), kernel_size, rpb=table, backend=backend
        )
        (out.double() * grad_out).sum().backward()
        return table.grad.double()

    want = rpb_grad(torch.float64, "naive")
    rel = (rpb_grad(torch.bfloat16, "naive") - want).norm() / want.norm()
    assert rel < 0.01, f"relative error {rel:.2e}"


@pytest.mark.parametrize("layout", ["qkv_views", "k_tokens_v_planes", "tokens", "mixed"])
def test_cpp_kernel_reads_other_layouts(layout):
    """NAT's q, k, v (views into the qkv projection) go to the kernel in per-head planes; contiguous
    ones as they are. The kernel itself takes q in any strides and k, v dense in any dim order (head
    dim contiguous): every layout must give the reference's numbers, gradients included."""
    from models.layers.backends.cpp_kernel import _ExactWindowAttention, kernel_build_error

    if kernel_build_error():
        pytest.skip(kernel_build_error())
    batch, height, width, heads, head_dim, kernel_size, dilation = 2, 11, 13, 3, 32, 5, 2
    qkv = torch.randn(batch, height, width, 3, heads, head_dim, dtype=torch.float64, requires_grad=True)
    span = 2 * kernel_size - 1
    rpb = torch.randn(heads, span, span, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(batch, height, width, heads, head_dim, dtype=torch.float64)
    scale = head_dim**-0.5
    q, k, v = qkv.unbind(3)
    if layout in ("qkv_views", "k_tokens_v_planes"):
        if layout == "k_tokens_v_planes":  # each readable alone, but not walkable with one offset table
            k, v = k.contiguous(), v.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)
        out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb=rpb, scale=scale, backend="cpp")
    else:
        if layout == "tokens":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        else:  # q strided as it comes; k, v in (B, W, H, heads, D) memory
            k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
        out = _ExactWindowAttention.apply(q, k, v, rpb, kernel_size, dilation, scale, True)
    ref = reference_na2d(*qkv.unbind(3), kernel_size, dilation, rpb, scale=scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(_grads(out, (qkv, rpb), grad_out), _grads(ref, (qkv, rpb), grad_out), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["one_head_mixed", "head_dim_1_transposed", "empty_batch"])
def test_cpp_kernel_takes_the_strides_torch_calls_contiguous(layout):
    """torch calls a tensor contiguous whatever the strides of its size-1 axes (one head, head dim 1)
    or of an empty one; the kernel compares strides exactly, and raised on such inputs (an empty
    batch's backward: the expanded grad of .sum()). Each must give the reference's numbers."""
    from models.layers.backends.cpp_kernel import kernel_build_error

    if kernel_build_error():
        pytest.skip(kernel_build_error())
    dims = dict(one_head_mixed=(1, 1, 16), head_dim_1_transposed=(1, 4, 1), empty_batch=(0, 2, 8))[layout]
    batch, heads, head_dim = dims
    q, k, v = (torch.randn(batch, 8, 7, heads, head_dim, dtype=torch.float64) for _ in range(3))
    if layout == "one_head_mixed":  # v in per-head planes: same memory order, other heads stride
        v = torch.randn(batch, heads, 8, 7, head_dim, dtype=torch.float64).permute(0, 2, 3, 1, 4)
        assert v.is_contiguous() and v.stride() != k.stride()
    elif layout == "head_dim_1_transposed":
        q, k, v = (torch.randn(1, 8, 7, 1, heads, dtype=torch.float64).transpose(-1, -2) for _ in range(3))
        assert q.is_contiguous() and q.stride(-1) != 1
    rpb = torch.randn(heads, 5, 5, dtype=torch.float64, requires_grad=True)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = neighborhood_attention_2d(*leaves, 3, rpb=rpb, backend="cpp")
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = reference_na2d(*ref_leaves, 3, rpb=rpb)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.sum().backward()  # the expanded, stride-0 gradient
    grads = [t.grad for t in leaves]
    ref.sum().backward()
    for got, want in zip(grads, [t.grad for t in ref_leaves], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: "x".join(map(str, c)))
def test_flex_forward_matches_reference(case):
    height, width, kernel_size, dilation = case
    q, k, v, rpb = _inputs(height, width, kernel_size, grad=False)
    out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb=rpb, backend="flex")
    torch.testing.assert_close(
        out, reference_na2d(q, k, v, kernel_size, dilation, rpb), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: "x".join(map(str, c)))
def test_natten_forward_matches_reference(case):
    pytest.importorskip("natten")
    height, width, kernel_size, dilation = case
    q, k, v, _ = _inputs(height, width, kernel_size, head_dim=8, dtype=torch.float32, grad=False)
    out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, backend="natten")
    ref = reference_na2d(q, k, v, kernel_size, dilation)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    # and our own backend agrees with natten directly
    ours = neighborhood_attention_2d(q, k, v, kernel_size, dilation, backend="torch")
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)


def test_natten_forced_on_a_call_it_has_no_kernel_for_is_a_value_error():
    pytest.importorskip("natten")
    q, k, v, _ = _inputs(9, 9, 3, head_dim=12, dtype=torch.float32, grad=False)  # CPU: powers of two only
    with pytest.raises(ValueError, match="natten's CPU path takes head dims 8, 16, 32, .* got 12"):
        neighborhood_attention_2d(q, k, v, 3, backend="natten")


@pytest.mark.parametrize("head_dim", [4, 8, 12, 16, 24, 32])
def test_the_dispatcher_knows_which_cpu_head_dims_natten_runs(head_dim):
    """explain_backends' reason for natten on CPU is natten's own answer (it said 'slower than cpp'
    for head dims natten cannot run at all): natten called directly fails exactly where it says so."""
    pytest.importorskip("natten")
    from models.layers.backends.natten_na import na2d_natten

    q, k, v, _ = _inputs(9, 9, 3, head_dim=head_dim, dtype=torch.float32, grad=False)
    reason = explain_backends(q).rejected["natten"]
    try:
        na2d_natten(q, k, v, 3, 1, None, head_dim**-0.5, 0.0)
        runs = True
    except ValueError:
        runs = False
    assert ("CPU path takes head dims" not in reason) == runs, reason


def test_kernel_equal_to_map_is_dense_attention_with_rpb():
    size, kernel_size, heads = 9, 9, 2
    q, k, v, rpb = _inputs(size, size, kernel_size, heads=heads, grad=False)
    out = neighborhood_attention_2d(q, k, v, kernel_size, rpb=rpb, backend="torch")
    pos = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).view(-1, 2)
    rel = pos[None, :, :] - pos[:, None, :] + kernel_size - 1  # (query, key, 2)
    bias = rpb[:, rel[..., 0], rel[..., 1]]  # (heads, N, N)
    seq = [t.reshape(2, size * size, heads, -1).transpose(1, 2) for t in (q, k, v)]
    dense = F.scaled_dot_product_attention(*seq, attn_mask=bias)
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape_as(out), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dilation", [1, 2])
def test_translation_equivariance_away_from_borders(dilation):
    kernel_size, size, shift = 3, 24, dilation  # shift by whole dilation periods keeps groups aligned
    q, k, v, rpb = _inputs(size, size, kernel_size, grad=False)
    out = neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb=rpb)
    rolled = [t.roll((shift, shift), dims=(1, 2)) for t in (q, k, v)]
    out_rolled = neighborhood_attention_2d(*rolled, kernel_size, dilation, rpb=rpb)
    margin = kernel_size * dilation + shift
    inner = slice(margin, size - margin)
    expected = out.roll((shift, shift), dims=(1, 2))
    torch.testing.assert_close(out_rolled[:, inner, inner], expected[:, inner, inner])
    # (borders: clamped windows, checked against the float64 reference in the tests above; a rolled
    # map's corner differs from its twin whatever the border rule, so it can't tell them apart)


def test_module_pads_small_maps_before_qkv_and_crops():
    torch.manual_seed(0)
    dim, heads, kernel_size, dilation = 16, 2, 3, 2
    attn = NeighborhoodAttention2D(dim, heads, kernel_size, dilation).double()
    x = torch.randn(2, 4, 5, dim, dtype=torch.float64)  # smaller than the 6x6 window
    padded = F.pad(x, (0, 0, 0, 1, 0, 2))
    q, k, v = attn.qkv(padded).reshape(2, 6, 6, 3, heads, dim // heads).unbind(3)
    expected = reference_na2d(q, k, v, kernel_size, dilation, attn.rpb, scale=attn.scale)
    expected = attn.proj(expected.reshape(2, 6, 6, dim)[:, :4, :5])
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_module_trains_on_cpu_and_attention_dropout_runs():
    attn = NeighborhoodAttention2D(16, 2, 5, attn_drop=0.5)
    x = torch.randn(2, 12, 12, 16)
    out_train = attn(x)
    out_train.sum().backward()
    assert attn.rpb.grad is not None and attn.rpb.grad.abs().sum() > 0
    assert attn.qkv.weight.grad.abs().sum() > 0
    attn.eval()
    with torch.no_grad():
        out_eval_a, out_eval_b = attn(x), attn(x)
    torch.testing.assert_close(out_eval_a, out_eval_b)
    assert not torch.allclose(out_train.detach(), out_eval_a)  # dropout changed the training pass


@pytest.mark.parametrize("dilation", [1, 2])
def test_attention_dropout_drops_single_weights_and_rescales_the_rest(dilation):
    """Values one-hot per token plus a channel of ones, identity projections: the module's output is
    its attention matrix and that row's sum. In training each weight is dropped alone (the rest not
    renormalised) or scaled by 1 / (1 - p), against the float64 reference weights; nothing outside
    the window appears; and the ones channel sums the same kept weights (dropping output channels
    instead would drop it on its own)."""
    from na_reference import reference_attention_maps

    H = W = 6
    N, p = H * W, 0.5
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(N + 1, 1, 3, dilation=dilation, attn_drop=p)
    with torch.no_grad():
        attn.qkv.weight[2 * (N + 1) :] = torch.eye(N + 1)  # v = x
        attn.qkv.bias[2 * (N + 1) :] = 0
        attn.proj.weight.copy_(torch.eye(N + 1))
        attn.proj.bias.zero_()
        attn.rpb.normal_()
        x = torch.cat([torch.eye(N), torch.ones(N, 1)], 1).view(1, H, W, N + 1)  # token (i, j): i * W + j
        q, k, _ = attn.qkv(x).view(1, H, W, 3, 1, N + 1).unbind(3)
        want = reference_attention_maps(q, k, 3, dilation, attn.rpb, attn.scale)[0, :, :, 0].flatten(2)
        out = attn.train()(x)[0].double()
    got, row_sums = out[..., :N], out[..., N]
    torch.testing.assert_close(row_sums, got.sum(-1), rtol=1e-5, atol=1e-6)
    inside = want > 0
    assert (got[~inside] == 0).all()  # no weight outside the window
    kept = got[inside] != 0
    torch.testing.assert_close(got[inside][kept], want[inside][kept] / (1 - p), rtol=1e-5, atol=1e-7)
    assert 0.35 < 1 - kept.double().mean() < 0.65  # p of the 324 weights dropped, one by one
    torch.testing.assert_close(attn.eval()(x)[0, ..., :N].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel_size=4), "odd integer"),
        (dict(kernel_size=7, dilation=2), "smaller than the window"),
        (dict(kernel_size=3, dilation=0), "dilation"),
        (dict(kernel_size=3, rpb=torch.zeros(2, 3, 3)), "rpb must have shape"),
        (dict(kernel_size=3, backend="cuda-magic"), "unknown backend"),
        (dict(kernel_size=True), "odd integer"),  # ran as kernel 1 on 'torch'
        (dict(kernel_size=3, attn_drop=-0.5), "attn_drop is a probability"),  # was ignored
        (dict(kernel_size=3, q=torch.randn(1, 10, 10, 0, 4, dtype=torch.float16)), "a head"),  # SIGFPE
        (dict(kernel_size=3, q=torch.ones(1, 10, 10, 2, 4, dtype=torch.int64)), "floating point"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    q = kwargs.pop("q", torch.randn(1, 10, 10, 2, 4))
    with pytest.raises(ValueError, match=message):
        neighborhood_attention_2d(q, q, q, **kwargs)


def test_mismatched_tensors_raise():
    q = torch.randn(1, 10, 10, 2, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        neighborhood_attention_2d(q, q, torch.randn(1, 10, 11, 2, 4), 3)
    with pytest.raises(ValueError, match="dtypes differ"):
        neighborhood_attention_2d(q, q, q.double(), 3)
    with pytest.raises(ValueError, match=r"\(batch, height, width, heads, head_dim\)"):
        neighborhood_attention_2d(q[0], q[0], q[0], 3)


def test_explicit_backend_that_cannot_serve_says_why():
    q = torch.randn(1, 10, 10, 2, 8, requires_grad=True)
    rpb = torch.zeros(2, 5, 5)
    with pytest.raises(ValueError, match="no relative position bias"):
        neighborhood_attention_2d(q, q, q, 3, rpb=rpb, backend="natten")
    with pytest.raises(ValueError, match="no backward on CPU"):
        neighborhood_attention_2d(q, q, q, 3, backend="flex")


def test_auto_is_inspectable_and_use_backend_overrides():
    q = torch.randn(1, 14, 14, 2, 8)
    choice = explain_backends(q, rpb=torch.zeros(2, 13, 13), requires_grad=True)
    assert choice.name == "cpp"
    assert set(choice.rejected) == {"torch", "naive", "natten", "flex", "triton"}
    assert "relative position bias" in choice.rejected["natten"]
    assert "backend: cpp" in str(choice)
    call = call_info(q, q, q, None, 0.0)
    assert why_not("torch", call) is None
    # What the C++ kernel can't serve goes to 'torch', with the reason on show.
    half = explain_backends(q.half())
    assert half.name == "torch" and "bfloat16 only" in half.rejected["cpp"]
    dropout = explain_backends(q, attn_drop=0.1, requires_grad=True)
    assert dropout.name == "torch" and "dropout" in dropout.rejected["cpp"]
    with use_backend("naive"):
        out = neighborhood_attention_2d(q, q, q, 7)
    torch.testing.assert_close(out, neighborhood_attention_2d(q, q, q, 7))
    with pytest.raises(ValueError, match="unknown NA backend"):
        with use_backend("fast"):
            pass


def test_explain_backends_names_what_the_call_runs_when_traced_exported_or_forced(monkeypatch, tmp_path):
    """explain_backends and the call agree: eager `auto` (the C++ kernel), `naive` while torch.jit.trace
    or torch.onnx.export records a graph, and a use_backend block's backend (it said `cpp` for all)."""
    import models.layers.functional as functional

    ran, explained = [], []
    for name, implementation in list(functional._IMPLEMENTATIONS.items()):

        def spy(*args, _name=name, _implementation=implementation, **kwargs):
            ran.append(_name)
            return _implementation(*args, **kwargs)

        monkeypatch.setitem(functional._IMPLEMENTATIONS, name, spy)

    class Probe(torch.nn.Module):
        def forward(self, x):
            explained.append(explain_backends(x))
            return neighborhood_attention_2d(x, x, x, 3)

    def legacy_onnx_export(model, x, path):  # a traced graph: it warns that the graph has x's size
        with pytest.warns(UserWarning, match=r"records neighborhood attention for this input's height"):
            torch.onnx.export(model, (x,), path, dynamo=False)

    q = torch.randn(1, 6, 6, 1, 4)
    cases = [
        ("cpp", lambda: Probe()(q)),
        ("naive", lambda: torch.jit.trace(Probe(), q, check_trace=False)),  # no eager rerun
        ("naive", lambda: legacy_onnx_export(Probe(), q, tmp_path / "p.onnx")),
    ]
    for expected, call in cases:
        explained.clear(), ran.clear()
        call()
        assert {c.name for c in explained} == set(ran) == {expected}, (expected, explained, ran)
    assert (
        "a graph being recorded (torch.export, ONNX export, torch.jit.trace)" in explained[0].rejected["cpp"]
    )
    explained.clear(), ran.clear()
    with use_backend("torch"):
        Probe()(q)
    assert [c.name for c in explained] == ran == ["torch"]
    assert explained[0].rejected == {"auto": "use_backend('torch') is in force"}


def test_auto_decision_table_for_cuda_calls():
    """The CUDA choices, checked on the decision logic itself (this suite runs without a GPU)."""
    from models.layers.backends.checks import CallInfo, select_backend
    from models.layers.backends.natten_na import natten_has_cuda_kernels
    from models.layers.backends.triton_na import triton_error

    def pick(**kw):
        base = dict(device_type="cuda", dtype=torch.bfloat16, has_rpb=True, attn_drop=0.0, needs_grad=False)
        return select_backend(CallInfo(**{**base, **kw})).name

    fused_rpb = "triton" if triton_error() is None else None  # tests/test_triton_na.py: without it
    # natten's CUDA kernels when built with them (make setup NATTEN_CUDA=1); else its CUDA path is eager flex
    assert pick(has_rpb=False) == ("natten" if natten_has_cuda_kernels() else fused_rpb or "flex")
    assert pick() == (fused_rpb or "flex")  # RPB inference: a fused kernel
    assert pick(needs_grad=True) == (fused_rpb or "torch")  # RPB training: fused, else SDPA's mask gradient
    assert pick(attn_drop=0.1, has_rpb=False) == "torch"  # only SDPA has attention dropout


def test_tensors_on_other_devices_go_to_torch_not_the_cpu_kernel():
    """An MPS / XPU tensor is not a CPU tensor: auto gives it the portable `torch` backend (here a
    meta tensor stands in for any such device), and asking for the CPU kernel says why not."""
    from models.layers.backends.checks import resolve_backend

    q = torch.empty(1, 14, 14, 2, 8, device="meta")
    choice = explain_backends(q, rpb=torch.zeros(2, 13, 13, device="meta"), requires_grad=True)
    assert choice.name == "torch" and choice.rejected["cpp"] == "CPU-only kernel", choice
    for device_type in ("mps", "xpu"):
        assert resolve_backend("auto", device_type, torch.float32, True, 0.0, False) == "torch"
        with pytest.raises(ValueError, match="CPU-only kernel"):
            resolve_backend("cpp", device_type, torch.float32, True, 0.0, False)
    out = neighborhood_attention_2d(q, q, q, 7)  # runs (shapes only) where the C++ kernel would crash
    assert out.shape == q.shape and out.device.type == "meta"


def test_cpp_kernel_build_folder_follows_the_kernel_source(tmp_path, monkeypatch):
    """Checkouts with the same kernel source share a build; a changed source (another branch or
    worktree) gets its own folder instead of rebuilding over the other's, at every switch."""
    import shutil

    from models.layers.backends import cpp_kernel

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    copies = [shutil.copytree(cpp_kernel._CSRC, tmp_path / name / "csrc") for name in ("a", "b", "c")]
    (copies[2] / "na2d_cpu_loops.h").write_text((copies[2] / "na2d_cpu_loops.h").read_text() + "\n// edit\n")
    folders = []
    for csrc in copies:
        monkeypatch.setattr(cpp_kernel, "_CSRC", csrc)
        folders.append(cpp_kernel._build_directory())
    assert folders[0] == folders[1] != folders[2]  # a header counts too
    assert all(f.parent == tmp_path / "ext" and f.is_dir() for f in folders)
    assert torch.__version__.split("+")[0] in folders[0].name


def test_cpp_backend_unavailable_falls_back_to_torch(monkeypatch):
    """No compiler / ninja on the machine: auto runs 'torch', and says why not 'cpp'."""
    from models.layers.backends import checks

    monkeypatch.setattr(checks, "kernel_build_error", lambda: "C++ kernel unavailable (no compiler)")
    q = torch.randn(1, 9, 9, 2, 8)
    choice = explain_backends(q)
    assert choice.name == "torch" and "no compiler" in choice.rejected["cpp"]
    with pytest.raises(ValueError, match="no compiler"):
        neighborhood_attention_2d(q, q, q, 3, backend="cpp")


@pytest.mark.parametrize("backend", ["cpp", "torch", "naive"])
def test_inference_mode_first_call_does_not_poison_training(backend):
    """Index caches built under inference_mode must still serve a later training step."""
    attn = NeighborhoodAttention2D(8, 2, 3, backend=backend)
    x = torch.randn(1, 13, 11, 8)  # a size no other test uses, so the first call builds the cache
    with torch.inference_mode():
        attn.eval()(x)
    attn.train()(x).sum().backward()
    assert attn.rpb.grad is not None


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_module_compiles_to_one_graph_and_matches_eager(backend, tmp_path, monkeypatch):
    """torch.compile traces the module in one graph (fullgraph: no break at the backend choice, whose
    checks once broke every NA layer into its own graph), through the kernel's fake ops; outputs and
    grads agree with eager; and no warning from Dynamo about the window-geometry caches."""
    # A fresh inductor cache: its keys don't cover the C++ kernel's fake ops, so a graph cached from an
    # earlier version of the kernel (another checkout on this machine) would be served.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(32, 2, 5, backend=backend)
    x = torch.randn(2, 12, 11, 32)
    eager = attn(x)
    eager.sum().backward()
    eager_grad = attn.rpb.grad.clone()
    attn.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(attn, fullgraph=True)(x)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message)[:120] for w in caught]
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(attn.rpb.grad, eager_grad)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_a_fused_backends_double_backward_is_refused_and_naive_has_exact_ones(backend):
    """A gradient penalty through cpp / torch would miss NA's second-order terms (their backwards
    treat saved tensors as constants): one error naming the way out; naive's pass gradgradcheck."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 7, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = neighborhood_attention_2d(q, k, v, 3, backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), q)  # first order: fine
    out = neighborhood_attention_2d(q, k, v, 3, backend=backend)
    with pytest.raises(RuntimeError, match=f"'{backend}' NA backend has no double backward.*backend='naive'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: neighborhood_attention_2d(q, k, v, 3, backend="naive"), (q, k, v)
    )
