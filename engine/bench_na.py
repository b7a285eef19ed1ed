"""The NA operator benchmark behind scripts/bench_na.py: each backend against a naive gather, dense
attention and Swin windows, one attention call (q, k, v of shape (B, S, S, heads, D), plus the
relative position bias where the method has one) per step, forward and forward + backward.

The methods (`na_method`, `window_attention`, `dense_attention`), which can run where (`available`)
and within memory (`working_set`, `MEMORY_BUDGET`), their steps on shared seeded inputs (`step_fns`),
then `run(args)`, the script's command: interleaved rounds through `engine.bench` per mode and size,
bench_na.csv, the ratio table against the first method (`print_ratios`) and the log-log plot.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import bench
from models.layers import neighborhood_attention_2d
from models.layers.backends import torch_tiled
from models.layers.backends.checks import call_info, why_not

# Working-set estimate (bytes) above which a method is skipped rather than swapping the machine.
MEMORY_BUDGET = 6 * 2**30


def window_attention(q, k, v, rpb, kernel_size: int, scale: float) -> torch.Tensor:
    """Swin-style attention inside non-overlapping k x k windows, with its relative position bias."""
    B, H, W, heads, dim = q.shape
    ws = kernel_size

    def windows(x):
        x = x.view(B, H // ws, ws, W // ws, ws, heads, dim).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(-1, heads, ws * ws, dim)

    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :] + ws - 1).permute(1, 2, 0)
    bias = rpb[:, rel[..., 0], rel[..., 1]].unsqueeze(0).to(q.dtype)  # (1, heads, ws^2, ws^2), as timm's Swin
    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=bias, scale=scale)
    out = out.view(B, H // ws, W // ws, heads, ws, ws, dim).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, H, W, heads, dim)


def dense_attention(q, k, v, rpb, kernel_size: int, scale: float) -> torch.Tensor:
    """Global self-attention over all tokens (ViT-style; no bias): the quadratic reference."""
    B, H, W, heads, dim = q.shape
    seq = [t.reshape(B, H * W, heads, dim).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*seq, scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, heads, dim)


def na_method(backend: str, tile: int | None = None) -> Callable:
    def run(q, k, v, rpb, kernel_size, scale):
        if tile is not None:
            return torch_tiled.na2d_tiled(q, k, v, kernel_size, 1, rpb, scale, 0.0, tile=tile)
        return neighborhood_attention_2d(q, k, v, kernel_size, rpb=rpb, scale=scale, backend=backend)

    return run


def working_set(method: str, batch: int, size: int, heads: int, dim: int, kernel_size: int) -> int:
    tokens = batch * size * size * heads
    if method == "dense":
        return 4 * 3 * tokens * size * size  # scores, probs and their gradient
    if method == "naive":
        return 4 * 4 * tokens * kernel_size**2 * dim  # gathered K, V and their gradients
    if method in ("natten", "flex"):
        return 4 * 2 * tokens * size * size  # their CPU paths materialise full scores
    halo = (kernel_size + 1) + kernel_size - 1  # the torch backend's halo edge at tile k+1
    logits = halo * halo if method == "torch" else kernel_size**2
    return 4 * tokens * (8 * dim + 4 * logits)  # q/k/v/out (+ grads), logits, probs and grads


def step_fns(
    methods: dict[str, tuple[Callable, torch.dtype]], args, size: int, mode: str
) -> dict[str, Callable[[], None]]:
    """One zero-argument step per method label (its function and q, k, v dtype), all on the same q, k, v
    and bias (seeded: every run alike; other dtypes get the float32 values rounded). The bias stays
    float32, as the RPB parameter does under autocast. With `args.qkv_views`, q, k, v are the slices of
    one (B, S, S, 3, heads, D) tensor, as NAT's qkv projection gives them (the `cpp` backend copies
    them into per-head planes; contiguous inputs it reads as they are)."""
    torch.manual_seed(0)
    B, heads, dim, kernel_size = args.batch, args.heads, args.head_dim, args.kernel_size
    grad = mode == "fwd+bwd"
    values = [torch.randn(B, size, size, heads, dim) for _ in range(3)]
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, requires_grad=grad)

    def leaves(dtype: torch.dtype) -> list[torch.Tensor]:
        if args.qkv_views:
            return list(torch.stack(values, dim=3).to(dtype).requires_grad_(grad).unbind(3))
        return [t.to(dtype).requires_grad_(grad) for t in values]

    inputs = {dtype: leaves(dtype) for dtype in {d for _, d in methods.values()}}
    scale = dim**-0.5

    def step(label: str, fn: Callable, dtype: torch.dtype) -> Callable[[], None]:
        bias = rpb if label.split(":")[0] not in ("dense", "natten") else None
        q, k, v = inputs[dtype]

        def run():
            if grad:
                fn(q, k, v, bias, kernel_size, scale).float().sum().backward()
            else:
                with torch.no_grad():
                    fn(q, k, v, bias, kernel_size, scale)

        return run

    return {label: step(label, fn, dtype) for label, (fn, dtype) in methods.items()}


def row(method: str, mode: str, size: int, times: list[float]) -> dict:
    stats = bench.spread(times)
    return {
        "method": method,
        "mode": mode,
        "size": size,
        "tokens": size * size,
        "median_s": stats["median"],
        "min_s": stats["min"],
        "max_s": stats["max"],
    }


def available(method: str, mode: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if `method` can run in `mode` on `dtype` inputs of `head_dim`, else why not."""
    if method not in ("cpp", "natten", "flex"):
        return None
    probe = torch.zeros(1, 1, 1, 1, head_dim, dtype=dtype, requires_grad=mode == "fwd+bwd")
    return why_not(method, call_info(probe, probe, probe, None, 0.0))


def method_labels(args) -> dict[str, tuple[str, torch.dtype]]:
    """Label -> (method, dtype): every method at every `--dtype`; labels after the first dtype say
    theirs (`cpp:bfloat16`), so the first method at the first dtype is the ratios' reference."""
    dtypes = [getattr(torch, name) for name in args.dtype]
    tiles = [f"torch:tile{t}" for t in args.tiles]
    return {
        (name if n == 0 else f"{name}:{args.dtype[n]}"): (name, dtype)
        for n, dtype in enumerate(dtypes)
        for name in [*args.methods, *tiles]
    }


NA_METHODS = ("cpp", "torch", "naive", "natten", "flex")  # the operator's backends
METHODS = (*NA_METHODS, "window", "dense")  # and the attention they are compared with


def argument_error(args: argparse.Namespace) -> str | None:
    """What makes the arguments unusable, for the parser to report (None: nothing)."""
    if [t for t in args.tiles if t < 1] or args.warmup < 0:
        return f"--tiles must be >= 1 and --warmup >= 0, got --tiles {args.tiles} --warmup {args.warmup}"
    tiles = [f"torch:tile{t}" for t in args.tiles]  # what --tiles adds, a method --methods may name
    unknown = [m for m in args.methods if m not in METHODS and m not in tiles]
    if unknown:
        return f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)} (torch:tileN with --tiles N)"
    if args.kernel_size % 2 == 0:
        return f"--kernel-size must be odd (a window centred on its query), got {args.kernel_size}"
    bad = [s for s in args.sizes if s % args.kernel_size or s < args.kernel_size]
    if bad:
        return f"sizes must be multiples of --kernel-size {args.kernel_size} (window attention): {bad}"
    reference = args.methods[0]
    for mode in args.modes:
        if reason := available(reference, mode, getattr(torch, args.dtype[0]), args.head_dim):
            return f"the first method {reference!r} is the ratios' reference but can't run {mode}: {reason}"
    return bench.writable_folder(args.out)


def run(args: argparse.Namespace) -> int:
    """The benchmark (`args`: scripts/bench_na.py's, checked by `argument_error`): 0 once the CSV and
    the plot are written."""
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = args.methods[0]

    methods = {name: na_method(name) for name in NA_METHODS} | {
        "window": window_attention,
        "dense": dense_attention,
    }
    methods.update({f"torch:tile{t}": na_method("torch", tile=t) for t in args.tiles})

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"heads {args.heads}, head_dim {args.head_dim}, kernel {args.kernel_size}, "
        f"dtype {' '.join(args.dtype)}{', q/k/v views of one qkv tensor' if args.qkv_views else ''}"
    )
    rows, notes = [], []
    for mode in args.modes:
        for size in args.sizes:
            runnable = {}
            for label, (name, dtype) in method_labels(args).items():
                reason = available(name, mode, dtype, args.head_dim)
                if reason is None:
                    need = working_set(name, args.batch, size, args.heads, args.head_dim, args.kernel_size)
                    if need > MEMORY_BUDGET:
                        reason = f"needs ~{need / 2**30:.1f} GiB"
                if reason:
                    notes.append(f"{mode} {size}^2 {label}: skipped ({reason})")
                else:
                    runnable[label] = (methods[name], dtype)
            # interleaved: every method once per round, so load on the machine hits them alike
            times = bench.interleaved_rounds(step_fns(runnable, args, size, mode), args.repeats, args.warmup)
            for name, seconds in times.items():
                rows.append(row(name, mode, size, seconds))
                print(f"  {mode:8s} {size:4d}^2 {name:12s} {rows[-1]['median_s'] * 1e3:10.2f} ms", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    bench.write_csv(rows, args.out / "bench_na.csv")
    print_ratios(rows, args, reference)
    for note in notes:
        print("note:", note)
    plot(rows, args.out / "bench_na.png")
    print(f"wrote {args.out / 'bench_na.csv'} and {args.out / 'bench_na.png'}")
    return 0


def print_ratios(rows: list[dict], args, reference: str) -> None:
    """Time of each method over the reference method's, per size (>1: slower than the reference)."""
    index = {(r["method"], r["mode"], r["size"]): r["median_s"] for r in rows}
    names = list(dict.fromkeys(r["method"] for r in rows))
    for mode in args.modes:
        print(f"\n{mode}: time / {reference} time ({reference} column: ms)")
        width = max(13, *(len(n) + 2 for n in names))
        print("size   " + "".join(f"{n:>{width}s}" for n in names))
        for size in args.sizes:
            base = index.get((reference, mode, size))
            cells = []
            for n in names:
                t = index.get((n, mode, size))
                if t is None or base is None:
                    cells.append(f"{'-':>{width}s}")
                elif n == reference:
                    cells.append(f"{t * 1e3:{width - 3}.1f} ms")
                else:
                    cells.append(f"{t / base:{width}.2f}")
            print(f"{size:4d}^2" + "".join(cells))
        slopes = {n: time_slope(rows, n, mode) for n in names}
        sides = {
            n: [r["size"] for r in rows if (r["method"], r["mode"]) == (n, mode) and r["median_s"]]
            for n in names
        }
        shown = ", ".join(
            f"{n} {v:.2f} ({min(sides[n])}^2-{max(sides[n])}^2)" for n, v in slopes.items() if v is not None
        )
        print(f"log-log slope of time vs tokens over the sizes each ran (1 = linear, 2 = quadratic): {shown}")


def time_slope(rows: list[dict], method: str, mode: str) -> float | None:
    """Slope of log(time) against log(tokens) over the sizes `method` ran at."""
    sel = [r for r in rows if r["method"] == method and r["mode"] == mode]
    return bench.loglog_slope([r["tokens"] for r in sel], [r["median_s"] for r in sel])


def plot(rows: list[dict], path: Path) -> None:
    """Seconds per call vs tokens, log-log, one panel per mode."""
    names = list(dict.fromkeys(r["method"] for r in rows))
    panels = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = [r for r in rows if r["mode"] == mode]
        series = {n: [(r["tokens"], r["median_s"]) for r in sel if r["method"] == n] for n in names}
        panels.append((f"NA operator, {mode}", series))
    xlabel, ylabel = "tokens (H x W)", "seconds per call"
    bench.plot_panels([panels], path, xlabel, ylabel, loglog=True, panel_size=(6, 4.5), dpi=90, fontsize=None)
