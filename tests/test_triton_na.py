"""The Triton NA backend against the float64 reference (tests/na_reference.py), and auto's CUDA choice.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, which conftest.py
sets before torch imports Triton); with one, on CUDA. Interpreted Triton is slow: shapes are tiny,
and the wider sweep is marked slow.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from na_reference import reference_na2d

pytest.importorskip("triton", reason="Triton is not importable: the 'triton' NA backend can't run")

from models.layers import (  # noqa: E402
    NeighborhoodAttention2D,
    explain_backends,
    functional,  # noqa: E402
    neighborhood_attention_2d,
)
from models.layers.backends import checks, self_check, triton_na  # noqa: E402
from models.layers.backends.checks import CallInfo, select_backend  # noqa: E402
from models.layers.backends.triton_na import na2d_triton, triton_interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_interpreting():
    pytest.skip(
        "no GPU and Triton not in interpreter mode: set TRITON_INTERPRET=1 before torch is imported "
        "(tests/conftest.py does when there is no /dev/nvidia0)",
        allow_module_level=True,
    )


def _inputs(height, width, kernel_size, heads=2, head_dim=16, batch=1, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, height, width, heads, head_dim)
    q, k, v, grad_out = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE) for t in (q, k, v, rpb, grad_out)]


def _run(fn, q, k, v, rpb, grad_out, dtype, rpb_dtype=None):
    """Outputs and gradients of `fn` on `dtype` copies of the float64 inputs (rpb: `rpb_dtype`)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    bias = None if rpb is None else rpb.detach().to(rpb_dtype or dtype).requires_grad_()
    out = fn(*leaves, bias)
    wrt = leaves if bias is None else [*leaves, bias]
    return [out, *torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), wrt)]


def _relative_errors(got, want):
    names = ["out", "dq", "dk", "dv", "drpb"]
    return {n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(names, got, want, strict=False)}


def _reference(q, k, v, rpb, grad_out, kernel_size, dilation, scale=None):
    def fn(q_, k_, v_, rpb_):
        return reference_na2d(q_, k_, v_, kernel_size, dilation, rpb_, scale=scale)

    return _run(fn, q, k, v, rpb, grad_out, torch.float64)


# (height, width, kernel, dilation, query/key tile): k 3-9, dilation 1-3, odd sizes, maps not
# divisible by the dilation, kernel == map, several tiles per dilation group (borders inside and
# between tiles), tiles wider than tall.
CASES = [
    (9, 9, 3, 1, None),
    (12, 11, 5, 2, None),
    (10, 13, 3, 3, (4, 4)),
    (9, 9, 9, 1, None),
    (13, 11, 7, 1, (4, 4)),
    (12, 12, 3, 1, (2, 8)),
    (9, 20, 9, 1, None),  # a key tile's queries (border: 20 columns) span two chunks of the dk/dv walk
    (13, 14, 11, 1, None),  # 32-key halo rows: one row per step (every case above takes two)
]
SLOW_CASES = [
    (14, 14, 7, 2, None),
    (19, 18, 9, 2, (4, 4)),
    (17, 16, 5, 3, (4, 8)),
    (21, 23, 7, 1, None),
    (11, 9, 3, 3, (4, 4)),
    (18, 20, 9, 1, (8, 4)),
]


def _case_id(case):
    height, width, kernel_size, dilation, tile = case
    return f"{height}x{width}-k{kernel_size}-d{dilation}-tile{'x'.join(map(str, tile or ('default',)))}"


def _check_float64_case(case, batch=1, heads=1):
    height, width, kernel_size, dilation, tile = case
    q, k, v, rpb, grad_out = _inputs(height, width, kernel_size, heads=heads, batch=batch)
    scale = q.shape[-1] ** -0.5

    def triton_fn(q_, k_, v_, rpb_):
        return na2d_triton(q_, k_, v_, kernel_size, dilation, rpb_, scale, 0.0, tile)

    got = _run(triton_fn, q, k, v, rpb, grad_out, torch.float64)
    want = _reference(q, k, v, rpb, grad_out, kernel_size, dilation)
    for name, err in _relative_errors(got, want).items():
        assert err < 1e-12, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_float64_output_and_every_gradient_match_reference(case):
    _check_float64_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=_case_id)
def test_float64_sweep_matches_reference(case):
    _check_float64_case(case, batch=2, heads=2)


@pytest.mark.parametrize(
    "dtype, bound",
    [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)],
    ids=["fp32", "fp16", "bf16"],
)
def test_low_precision_within_tolerance_of_reference(dtype, bound):
    """fp32 accumulation: fp32 close to exact; fp16/bf16 at the inputs' rounding, and the bf16 error
    no worse than the existing SDPA path's ('torch' backend) on the same inputs."""
    height, width, kernel_size, dilation = 11, 12, 5, 1
    q, k, v, rpb, grad_out = _inputs(height, width, kernel_size, head_dim=32)
    want = _reference(q, k, v, rpb, grad_out, kernel_size, dilation)

    def backend_fn(name):
        return lambda q_, k_, v_, rpb_: neighborhood_attention_2d(
            q_, k_, v_, kernel_size, dilation, rpb=rpb_, backend=name
        )

    # the RPB is a float32 parameter under autocast; q, k, v come in `dtype`
    got = _relative_errors(_run(backend_fn("triton"), q, k, v, rpb, grad_out, dtype, torch.float32), want)
    assert got["out"] < bound and max(got.values()) < 2 * bound, got
    if dtype == torch.bfloat16:
        sdpa = _relative_errors(_run(backend_fn("torch"), q, k, v, rpb, grad_out, dtype, torch.float32), want)
        for name, err in got.items():
            assert err < 2 * sdpa[name] + 1e-3, f"{name}: triton {err:.2e} vs torch {sdpa[name]:.2e}"


def test_without_rpb_custom_scale_and_strided_views_of_a_packed_qkv():
    """NAT's q, k, v are views into the qkv projection (strided); no RPB; a non-default scale;
    head_dim 8 below the kernel's 16-wide block (masked lanes)."""
    batch, height, width, heads, head_dim, kernel_size, dilation = 2, 10, 9, 2, 8, 3, 2
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(batch, height, width, 3, heads, head_dim, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:], generator=gen, dtype=torch.float64).to(DEVICE)
    qkv = qkv.to(DEVICE).requires_grad_()
    out = neighborhood_attention_2d(*qkv.unbind(3), kernel_size, dilation, scale=0.37, backend="triton")
    ref = reference_na2d(*qkv.unbind(3), kernel_size, dilation, None, scale=0.37)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad((out * grad_out).sum(), qkv)
    (want,) = torch.autograd.grad((ref * grad_out).sum(), qkv)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_module_trains_its_rpb_and_frozen_rpb_gets_no_gradient():
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(32, 2, 5, dilation=2, backend="triton").double().to(DEVICE)
    x = torch.randn(1, 11, 10, 32, dtype=torch.float64, device=DEVICE)
    attn(x).square().sum().backward()
    grad = attn.rpb.grad.clone()
    assert grad.abs().sum() > 0
    attn.zero_grad()
    with torch.no_grad():
        ref_attn = NeighborhoodAttention2D(32, 2, 5, dilation=2, backend="torch").double().to(DEVICE)
        ref_attn.load_state_dict(attn.state_dict())
    ref_attn(x).square().sum().backward()
    torch.testing.assert_close(grad, ref_attn.rpb.grad, rtol=1e-10, atol=1e-10)
    # a frozen RPB: the kernel skips its gradient, q/k/v gradients still flow
    attn.rpb.requires_grad_(False)
    x.requires_grad_()
    attn(x).sum().backward()
    assert attn.rpb.grad is None and x.grad.abs().sum() > 0


def _fp32_args(kernels):
    """The kernels with every float argument rounded to float32, as the compiled launcher passes it
    (the interpreter keeps Python doubles)."""

    class Launcher:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args = [
                    struct.unpack("f", struct.pack("f", a))[0] if isinstance(a, float) else a for a in args
                ]
                return self.kernel[grid](*args, **kwargs)

            return launch

    return tuple(Launcher(kernel) for kernel in kernels)


def test_float64_stays_exact_with_float32_kernel_arguments(monkeypatch):
    """A GPU's launcher types float arguments float32: the scale must still reach float64 exactly."""
    kernels = _fp32_args(triton_na._kernels())
    monkeypatch.setattr(triton_na, "_kernels", lambda: kernels)
    _check_float64_case((9, 10, 5, 1, None))


def test_fp32_follows_the_new_tf32_api_without_raising():
    """torch >= 2.9's `fp32_precision` setting: reading the legacy `allow_tf32` flag then raises."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    q = torch.randn(1, 7, 7, 1, 16, device=DEVICE)
    try:
        matmul.fp32_precision = "tf32"
        assert triton_na._precision(torch.float32) == "tf32"
        out = neighborhood_attention_2d(q, q, q, 3, backend="triton")
        torch.testing.assert_close(out, neighborhood_attention_2d(q, q, q, 3, backend="torch"))
        matmul.fp32_precision = "ieee"
        assert triton_na._precision(torch.float32) == "ieee"
    finally:
        matmul.fp32_precision = saved


def test_double_backward_raises_instead_of_dropping_terms():
    """A gradient penalty through the kernel: without the error, `penalty` was a constant and its terms
    silently missing from x.grad."""
    x = torch.randn(1, 7, 7, 1, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = na2d_triton(x, x, x, 3, 1, None, 0.25, 0.0)
    with pytest.raises(RuntimeError, match="no double backward"):
        (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        penalty = dx.square().sum()
        (out.sum() + penalty).backward()


_LARGE_OFFSETS_SCRIPT = """
import sys, tempfile
import torch
from models.layers.backends.torch_tiled import na2d_tiled
from models.layers.backends.triton_na import na2d_triton

height, width, dim = 17, 5, 16
row_stride = 2**31 // 12  # elements: rows 12-16 start past 2**31 (rows of one 8-row tile stay within)
n = (height - 1) * row_stride + width * 3 * dim
with tempfile.NamedTemporaryFile() as f:
    f.truncate(n * 4)  # sparse: only the pages touched below are ever allocated
    storage = torch.from_file(f.name, shared=True, size=n, dtype=torch.float32)
    qkv = storage.as_strided((1, height, width, 3, 1, dim), (0, row_stride, 3 * dim, dim, dim, 1))
    qkv.copy_(torch.randn(qkv.shape, generator=torch.Generator().manual_seed(0)))
    q, k, v = qkv.unbind(3)
    out = na2d_triton(q, k, v, 3, 1, None, 0.25, 0.0)
    want = na2d_tiled(q.contiguous(), k.contiguous(), v.contiguous(), 3, 1, None, 0.25, 0.0)
    torch.testing.assert_close(out, want)
    print("ok")
"""


@pytest.mark.skipif(
    DEVICE != "cpu", reason="the interpreter's view of a sparse file stands in for a huge map"
)
def test_offsets_past_2_31_elements():
    """A packed-qkv view whose row offsets pass int32 (a 1024^2 map with C >= 683, here a 17x5 map
    with a huge row stride over a sparse file): int32 offsets wrapped (a segfault in the interpreter)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LARGE_OFFSETS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_torch_compile_sees_one_op_per_pass_without_a_graph_break():
    """The kernels are torch custom ops: dynamo traces the whole function (fullgraph) with the forward
    as one node, and the compiled function's gradients equal eager's."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def loss_fn(x, rpb):
        q, k, v = (x * 2, x.sin(), x)
        return neighborhood_attention_2d(q, k, v, 3, 1, rpb=rpb, backend="triton").square().sum()

    x = torch.randn(1, 9, 10, 2, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    compiled = torch.compile(loss_fn, backend=recording_backend, fullgraph=True, dynamic=False)
    got = torch.autograd.grad(compiled(x, rpb), (x, rpb))
    want = torch.autograd.grad(loss_fn(x, rpb), (x, rpb))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (graph,) = graphs
    ops = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert sum("na2d_triton_forward" in op for op in ops) == 1, ops


def _pick(**overrides) -> str:
    base = dict(device_type="cuda", dtype=torch.bfloat16, has_rpb=True, attn_drop=0.0, needs_grad=True)
    return select_backend(CallInfo(**{**base, **overrides})).name


def test_auto_on_cuda_prefers_triton_for_rpb_training_and_inference(monkeypatch):
    assert _pick() == "triton"
    assert _pick(needs_grad=False) == "triton"
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:  # float32: Triton first only with TF32 (tensor cores); without, after SDPA until timed
        matmul.fp32_precision = "ieee"
        assert (
            _pick(dtype=torch.float32) == "torch" and _pick(dtype=torch.float32, needs_grad=False) == "flex"
        )
        reason = select_backend(CallInfo("cuda", torch.float32, True, 0.0, True)).rejected["triton"]
        assert "CUDA cores" in reason and "'torch'" in reason
        matmul.fp32_precision = "tf32"
        assert _pick(dtype=torch.float32) == "triton"
    finally:
        matmul.fp32_precision = saved
    # without RPB: natten's CUDA kernels when it was built with them (else its CUDA path is eager flex)
    monkeypatch.setattr(checks, "natten_version", lambda: "0.21.7")
    monkeypatch.setattr(checks, "natten_has_cuda_kernels", lambda: False)
    assert _pick(has_rpb=False) == "triton"
    no_rpb = select_backend(CallInfo("cuda", torch.bfloat16, False, 0.0, True))
    assert "make setup NATTEN_CUDA=1" in no_rpb.rejected["natten"]
    monkeypatch.setattr(checks, "natten_has_cuda_kernels", lambda: True)
    assert _pick(has_rpb=False) == "natten"
    assert _pick(attn_drop=0.1) == "torch"  # only the SDPA path has attention dropout
    choice = select_backend(CallInfo("cuda", torch.bfloat16, True, 0.0, True))
    assert set(choice.rejected) == set(checks.BACKENDS) - {"triton"}
    assert "relative position bias" in choice.rejected["natten"]
    assert "CPU-only" in choice.rejected["cpp"]
    assert "upstream" in choice.rejected["flex"]  # RPB training: flex only when asked for
    inference = select_backend(CallInfo("cuda", torch.bfloat16, True, 0.0, False))
    assert "'triton' comes first" in inference.rejected["flex"]


@pytest.fixture
def cuda_path_on_cpu(monkeypatch):
    """The CUDA dispatch (auto's CUDA order, the self-checks) on CPU tensors: calls are labelled
    'cuda', Triton runs interpreted; a fresh record of self-checks."""
    if DEVICE != "cpu":
        pytest.skip("on a GPU the real CUDA path runs")

    call_fields = checks.call_fields

    def labelled(*args):
        return ("cuda", *call_fields(*args)[1:])

    monkeypatch.setattr(functional, "call_fields", labelled)
    monkeypatch.setattr(checks, "call_fields", labelled)  # explain_backends
    monkeypatch.setattr(self_check, "_outcomes", {})
    # float32 with TF32, where auto ranks Triton first (the interpreter's dots are float32 anyway)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    yield
    matmul.fp32_precision = saved


def _na(q, rpb, **kwargs):
    return neighborhood_attention_2d(q, q, q, 3, 1, rpb=rpb, **kwargs)


def test_self_check_passes_then_triton_serves(cuda_path_on_cpu):
    q = torch.randn(1, 9, 10, 2, 16, requires_grad=True)
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _na(q, rpb)
    torch.testing.assert_close(out, _na(q, rpb, backend="torch"), rtol=1e-5, atol=1e-5)
    choice = explain_backends(q, rpb=rpb, requires_grad=True, kernel_size=3)
    assert choice.name == "triton"
    assert choice.self_checks == (
        "self-check triton on cpu (float32, kernel 3, dilation 1, head dim 16, with RPB): passed",
    )


def test_injected_compile_error_warns_once_and_auto_falls_back(cuda_path_on_cpu, monkeypatch):
    def broken_kernels():
        raise RuntimeError("injected: out of resources: shared memory")

    monkeypatch.setattr(triton_na, "_kernels", broken_kernels)
    q = torch.randn(1, 9, 10, 2, 16, requires_grad=True)
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    with pytest.warns(
        RuntimeWarning, match=r"'triton' failed its self-check on cpu .*injected: out of resources"
    ):
        out = _na(q, rpb)  # RPB training: flex isn't auto's for it, so SDPA over halo tiles
    want = _na(q, rpb, backend="torch")
    torch.testing.assert_close(out, want)
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the outcome is remembered
        torch.testing.assert_close(_na(q, rpb), want)
    choice = explain_backends(q, rpb=rpb, requires_grad=True, kernel_size=3)
    assert choice.name == "torch" and "self-check" in choice.rejected["triton"]
    assert "injected" in choice.self_checks[0]
    with pytest.raises(ValueError, match="'triton' can't serve this call: failed its self-check"):
        _na(q, rpb, backend="triton")


def test_injected_wrong_result_falls_back_to_flex_for_inference(cuda_path_on_cpu, monkeypatch):
    forward = triton_na._forward

    def off_by_a_bit(*args):
        out, lse = forward(*args)
        return out * 1.05, lse

    monkeypatch.setattr(triton_na, "_forward", off_by_a_bit)
    q = torch.randn(1, 9, 10, 2, 16)
    rpb = torch.randn(2, 5, 5)
    with pytest.warns(RuntimeWarning, match="mismatch against the 'torch' backend"):
        out = _na(q, rpb)
    torch.testing.assert_close(out, _na(q, rpb, backend="torch"), rtol=1e-5, atol=1e-5)
    assert explain_backends(q, rpb=rpb, kernel_size=3).name == "flex"


def test_failure_after_a_passed_self_check_falls_back_once(cuda_path_on_cpu, monkeypatch):
    """A checked configuration that fails on a larger map than the check's (grid, shared memory, a
    launch) warns once and reruns on the next backend; so do later calls, silently. Out of memory is
    not a backend's fault: it raises."""
    forward = triton_na._forward

    def fails_on_large_maps(q, *args):
        if q.shape[1] > 20:
            raise RuntimeError("injected: launch failed on a large grid")
        return forward(q, *args)

    monkeypatch.setattr(triton_na, "_forward", fails_on_large_maps)
    small, large = torch.randn(1, 9, 10, 2, 16), torch.randn(1, 24, 22, 2, 16)
    rpb = torch.randn(2, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _na(small, rpb)  # the self-check passes, Triton serves
    assert explain_backends(small, rpb=rpb, kernel_size=3).name == "triton"
    with pytest.warns(
        RuntimeWarning, match=r"'triton' failed on cpu .*after passing its self-check.*large grid"
    ):
        out = _na(large, rpb)
    torch.testing.assert_close(out, _na(large, rpb, backend="torch"), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second failure
        torch.testing.assert_close(_na(large, rpb), out)
    choice = explain_backends(small, rpb=rpb, kernel_size=3)
    assert choice.name == "flex" and "after the self-check failed" in choice.rejected["triton"]

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    monkeypatch.setattr(self_check, "_outcomes", {})
    monkeypatch.setattr(triton_na, "_forward", out_of_memory)
    monkeypatch.setattr(self_check, "self_check", lambda *args: None)  # trusted, as after a passed check
    monkeypatch.setattr(checks, "self_check", lambda *args: None)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        _na(large, rpb)


def test_natten_failing_its_self_check_hands_over_to_triton(cuda_path_on_cpu, monkeypatch):
    def broken_natten(*args):
        raise RuntimeError("injected: libnatten has no kernel for this GPU")

    monkeypatch.setattr(checks, "natten_version", lambda: "0.21.7")
    monkeypatch.setattr(checks, "natten_has_cuda_kernels", lambda: True)
    monkeypatch.setitem(self_check.SELF_CHECKED, "natten", broken_natten)
    q = torch.randn(1, 9, 10, 2, 16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="'natten' failed its self-check.*libnatten"):
        out = _na(q, None)
    torch.testing.assert_close(out, _na(q, None, backend="torch"), rtol=1e-5, atol=1e-5)
    choice = explain_backends(q, requires_grad=True, kernel_size=3)
    assert choice.name == "triton" and "libnatten" in choice.rejected["natten"]
    assert [line.split(" (")[0] for line in choice.self_checks] == [
        "self-check natten on cpu",
        "self-check triton on cpu",
    ]


def test_torch_compile_runs_the_self_check_while_tracing(cuda_path_on_cpu):
    """Under torch.compile auto's choice, self-check included, is made once while tracing (a constant
    to dynamo): the graph holds the trusted kernel as one op, with no graph break."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    q = torch.randn(1, 9, 10, 2, 16, requires_grad=True)
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    compiled = torch.compile(lambda q, rpb: _na(q, rpb).sum(), backend=recording_backend, fullgraph=True)
    compiled(q, rpb).backward()
    assert list(self_check.outcomes().values()) == [None]
    (graph,) = graphs
    assert any("na2d_triton_forward" in str(node.target) for node in graph.graph.nodes)


def test_each_autotuning_holds_for_one_compiled_variant():
    """The autotuner's key names every constexpr (tiles, dilation, RPB, precision) and the shape:
    a key of head dim, kernel size and map size alone gave every tile of gpu_check's tile sweep the
    default tile's launch settings. Triton keys only on names it finds among the kernel's arguments."""
    import inspect

    for kernel in triton_na.KERNELS:
        key, names = triton_na.autotune_key(kernel), list(inspect.signature(kernel).parameters)
        assert set(key) <= set(names), set(key) - set(names)
        assert names[-len(key) + 3 :] == key[3:]  # every constexpr: the signature's tail
        assert {"head_dim", "height", "width", "KS", "DIL", "HAS_RPB", "PRECISION"} <= set(key)
    assert {"BH", "BW"} <= set(triton_na.autotune_key(triton_na.KERNELS[0]))  # the query tile
    assert {"KH", "KWT"} <= set(triton_na.autotune_key(triton_na.KERNELS[2]))  # the key tile


def test_auto_without_triton_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(checks, "triton_error", lambda: "Triton is not importable (test)")
    assert _pick() == "torch"  # RPB training: SDPA over halo tiles
    assert _pick(needs_grad=False) == "flex"
    choice = select_backend(CallInfo("cuda", torch.bfloat16, True, 0.0, True))
    assert choice.rejected["triton"] == "Triton is not importable (test)"
    with pytest.raises(ValueError, match="not importable"):
        q = torch.randn(1, 9, 9, 2, 16)
        neighborhood_attention_2d(q, q, q, 3, backend="triton")


def test_auto_never_picks_the_interpreter_on_cpu(monkeypatch):
    q = torch.randn(1, 9, 9, 2, 16)
    choice = explain_backends(q, rpb=torch.zeros(2, 5, 5), requires_grad=True)
    assert choice.name in ("cpp", "torch") and "CUDA" in choice.rejected["triton"]
    with pytest.raises(ValueError, match="attention dropout"):
        neighborhood_attention_2d(q, q, q, 3, attn_drop=0.1, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in explain_backends(q).rejected["triton"]
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        neighborhood_attention_2d(q, q, q, 3, backend="triton")


# Compiles the three kernels for a GPU without one: Triton's front end, its NVIDIA passes and the
# bundled ptxas (types, layouts, tl.gather, the fp32 one-hot dot): what the interpreter can't show.
# Run in a fresh process, since this one has Triton in interpreter mode.
_COMPILE_SCRIPT = """
import json, sys
import torch
from models.layers.backends.triton_na import compile_offline

arch, dtype, shared_limit = int(sys.argv[1]), getattr(torch, sys.argv[2]), int(sys.argv[3])
stats = {
    f"{head_dim} {kernel_size}": compile_offline(arch, dtype, kernel_size, head_dim, shared_limit)
    for head_dim in (32, 64, 128)
    for kernel_size in (7, 13)
}
print(json.dumps(stats))
"""
# Opt-in shared memory per block (CUDA programming guide): A100 (sm_80), A10 / RTX 30xx / L4 class
# (sm_86, sm_89), H100 (sm_90).
SHARED_LIMIT = {80: 166_912, 86: 101_376, 90: 232_448}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_compile_within_each_architectures_limits(arch, dtype):
    """Head dims 32/64/128 and k 7/13: every kernel has a launch config (of those the autotuner
    times) within the architecture's shared memory; in bf16 up to head dim 64 one that also spills
    no registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype, str(SHARED_LIMIT[arch])],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, kernels in stats.items():
        head_dim = int(case.split()[0])
        for kernel, used in kernels.items():
            where = f"sm_{arch} {dtype} head_dim/k {case} {kernel}: {used}"
            assert used is not None and used["shared"] <= SHARED_LIMIT[arch], where
            if dtype == "bfloat16" and head_dim <= 64:
                assert used["spills"] == 0, where
